"""The exception tree, errno mapping and pickling."""

from __future__ import annotations

import errno
import os
import pickle

import pytest

import spialloc
from spialloc.errors import (
    BatchError,
    ClosedError,
    DecodeError,
    DuplicateSpi,
    ForkedError,
    InsufficientPrivilege,
    InvalidRequest,
    NamespaceError,
    NetlinkError,
    ReservationLost,
    ResourceError,
    SpiallocError,
    SpiExhausted,
    from_errno,
    out_of_fds,
)

KTEXT = "No SPI available in the requested range"


def test_every_error_derives_from_spialloc_error() -> None:
    for cls in (
        BatchError,
        ClosedError,
        DecodeError,
        DuplicateSpi,
        ForkedError,
        InsufficientPrivilege,
        InvalidRequest,
        NamespaceError,
        NetlinkError,
        ReservationLost,
        ResourceError,
        SpiExhausted,
    ):
        assert issubclass(cls, SpiallocError), cls


def test_public_names_are_the_same_classes() -> None:
    assert spialloc.NetlinkError is NetlinkError
    assert spialloc.SpiExhausted is SpiExhausted
    assert spialloc.InsufficientPrivilege is InsufficientPrivilege
    assert spialloc.InvalidRequest is InvalidRequest
    assert spialloc.BatchError is BatchError
    assert spialloc.NamespaceError is NamespaceError
    assert spialloc.ForkedError is ForkedError
    assert "ForkedError" in spialloc.__all__
    assert spialloc.ResourceError is ResourceError
    assert "ResourceError" in spialloc.__all__


def test_forked_error_names_the_object_and_process_and_pickles() -> None:
    e = ForkedError("Allocator", 4242)
    assert str(e) == "Allocator created before fork() in process 4242: open a new one in the child"
    back = pickle.loads(pickle.dumps(e))
    assert (type(back), back.what, back.pid, str(back)) == (ForkedError, "Allocator", 4242, str(e))


def test_netlink_error_is_oserror_keeping_errno_and_kernel_text() -> None:
    e = NetlinkError(errno.EINVAL, "IPCOMP SPI must be <= 65535", "allocspi")
    assert isinstance(e, OSError)
    assert e.errno == errno.EINVAL
    assert e.kernel_text == "IPCOMP SPI must be <= 65535"
    assert e.operation == "allocspi"
    assert "IPCOMP SPI must be <= 65535" in str(e)
    assert "allocspi" in str(e)
    assert e.strerror == "allocspi: IPCOMP SPI must be <= 65535"


def test_netlink_error_without_kernel_text_uses_strerror() -> None:
    e = NetlinkError(errno.ESRCH, None, "delsa")
    assert e.kernel_text is None
    assert e.errno == errno.ESRCH
    assert os.strerror(errno.ESRCH) in str(e)
    assert str(e).startswith(f"[Errno {errno.ESRCH}]")


def test_netlink_error_without_operation() -> None:
    e = NetlinkError(errno.EINVAL, "bad")
    assert e.strerror == "bad"
    assert e.operation == ""


def test_netlink_error_caught_as_oserror() -> None:
    with pytest.raises(OSError) as info:
        raise NetlinkError(errno.EEXIST, "exists", "newsa")
    assert info.value.errno == errno.EEXIST


def test_spi_exhausted_is_netlink_error() -> None:
    e = SpiExhausted(errno.ENOENT, KTEXT, "allocspi")
    assert isinstance(e, NetlinkError)
    assert isinstance(e, OSError)
    assert e.errno == errno.ENOENT
    assert KTEXT in str(e)


def test_insufficient_privilege_is_permission_error_with_hint() -> None:
    e = InsufficientPrivilege(errno.EPERM, None, "allocspi")
    assert isinstance(e, PermissionError)
    assert isinstance(e, NetlinkError)
    assert isinstance(e, OSError)
    assert e.errno == errno.EPERM
    msg = str(e)
    assert "CAP_NET_ADMIN" in msg
    assert "unshare -Urn" in msg
    assert os.strerror(errno.EPERM) in msg
    assert "allocspi" in msg
    assert "CAP_NET_ADMIN" in e.strerror


def test_insufficient_privilege_default_errno_and_kernel_text() -> None:
    e = InsufficientPrivilege()
    assert e.errno == errno.EPERM
    assert "CAP_NET_ADMIN" in str(e)
    e2 = InsufficientPrivilege(errno.EPERM, "some kernel words", "allocspi")
    assert e2.kernel_text == "some kernel words"
    assert "some kernel words" in str(e2)
    assert "CAP_NET_ADMIN" in str(e2)


def test_insufficient_privilege_caught_as_permission_error() -> None:
    with pytest.raises(PermissionError):
        raise InsufficientPrivilege(errno.EPERM, None, "allocspi")


def test_invalid_request_is_value_error() -> None:
    e = InvalidRequest("reqid=-1 is out of range")
    assert isinstance(e, ValueError)
    assert str(e) == "reqid=-1 is out of range"
    with pytest.raises(ValueError):
        raise e


def test_decode_error_is_value_error_keeping_data() -> None:
    e = DecodeError("short", b"\1\2")
    assert isinstance(e, ValueError)
    assert e.data == b"\1\2"
    assert str(e) == "short"
    assert DecodeError("x").data == b""


def test_namespace_and_closed_errors_are_oserrors() -> None:
    e = NamespaceError(errno.ENOENT, "network namespace 'blue' (/run/netns/blue): No such file or directory")
    assert isinstance(e, OSError)
    assert e.errno == errno.ENOENT
    assert "'blue'" in str(e)
    assert isinstance(ClosedError(errno.EBADF, "closed"), OSError)


def test_out_of_fds_names_emfile_and_the_limit() -> None:
    e = out_of_fds(errno.EMFILE, "socket in current network namespace")
    assert isinstance(e, ResourceError) and isinstance(e, OSError)
    assert e.errno == errno.EMFILE
    assert "EMFILE" in str(e) and "RLIMIT_NOFILE" in str(e)
    assert str(e).startswith("[Errno 24] socket in current network namespace: ")


def test_out_of_fds_names_enfile() -> None:
    e = out_of_fds(errno.ENFILE, "expiry watcher")
    assert isinstance(e, ResourceError)
    assert e.errno == errno.ENFILE and "ENFILE" in str(e)


@pytest.mark.parametrize("code", [None, 0, errno.ENOENT, errno.EPERM, errno.ENOMEM])
def test_out_of_fds_is_none_for_other_codes(code: int | None) -> None:
    assert out_of_fds(code, "x") is None


def test_batch_error_fields_and_message() -> None:
    first = SpiExhausted(errno.ENOENT, KTEXT, "allocspi")
    second = NetlinkError(errno.EINVAL, "bad", "allocspi")
    e = BatchError(10, {3: first, 7: second}, 8)
    assert e.requested == 10
    assert e.failures == {3: first, 7: second}
    assert e.released == 8
    msg = str(e)
    assert "2 of 10" in msg
    assert KTEXT in msg  # the first failure
    assert "8" in msg and "released" in msg
    assert not isinstance(e, OSError)


def test_batch_error_with_no_failures() -> None:
    e = BatchError(3, {}, 0)
    assert "0 of 3" in str(e)


# --- from_errno ----------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["allocspi", "delsa", "getsa", "getsa dump", ""])
def test_from_errno_eperm_is_insufficient_privilege(operation: str) -> None:
    e = from_errno(errno.EPERM, None, operation)
    assert type(e) is InsufficientPrivilege
    assert e.errno == errno.EPERM
    assert "CAP_NET_ADMIN" in str(e)


def test_from_errno_enoent_allocspi_is_spi_exhausted_keeping_kernel_text() -> None:
    e = from_errno(errno.ENOENT, KTEXT, "allocspi")
    assert type(e) is SpiExhausted
    assert e.kernel_text == KTEXT
    assert e.errno == errno.ENOENT
    assert KTEXT in str(e)


def test_from_errno_enoent_allocspi_without_text_gets_a_text() -> None:
    e = from_errno(errno.ENOENT, None, "allocspi")
    assert type(e) is SpiExhausted
    assert "No SPI available" in str(e)


@pytest.mark.parametrize("operation", ["delsa", "getsa", "getsa dump"])
def test_from_errno_enoent_elsewhere_is_plain_netlink_error(operation: str) -> None:
    e = from_errno(errno.ENOENT, None, operation)
    assert type(e) is NetlinkError
    assert e.errno == errno.ENOENT


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ESRCH, errno.EEXIST, errno.ENOBUFS, errno.EAFNOSUPPORT])
def test_from_errno_other_codes_are_netlink_error(code: int) -> None:
    e = from_errno(code, "kernel says no", "allocspi")
    assert type(e) is NetlinkError
    assert e.errno == code
    assert e.kernel_text == "kernel says no"
    assert e.operation == "allocspi"
    assert "kernel says no" in str(e)


# --- pickling ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        NetlinkError(errno.EINVAL, "IPCOMP SPI must be <= 65535", "allocspi"),
        NetlinkError(errno.ESRCH, None, "delsa"),
        SpiExhausted(errno.ENOENT, KTEXT, "allocspi"),
        InsufficientPrivilege(errno.EPERM, None, "allocspi"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_netlink_errors_pickle_round_trip(exc: NetlinkError) -> None:
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert back.errno == exc.errno
    assert back.kernel_text == exc.kernel_text
    assert back.operation == exc.operation
    assert back.strerror == exc.strerror
    assert str(back) == str(exc)
    assert back.args == exc.args
