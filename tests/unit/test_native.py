"""The C extension: it imports, its compiler-computed layouts equal _wire.py's
hand-written ones, and its reply parser (fed hand-built bytes, no kernel)
matches replies to requests and never reads past what it was given."""

from __future__ import annotations

import array
import errno
import os
import struct
import threading
from typing import Any

import pytest
from spialloc._native import ffi, lib

from spialloc import _cbatch
from spialloc import _wire as w

PORTID = 4242
SEQ0 = 1000


# --- constants and layouts ------------------------------------------------------

CONSTANTS = {
    "NETLINK_XFRM": w.NETLINK_XFRM,
    "SOL_NETLINK": w.SOL_NETLINK,
    "NETLINK_EXT_ACK": w.NETLINK_EXT_ACK,
    "NETLINK_CAP_ACK": w.NETLINK_CAP_ACK,
    "NLMSG_ERROR": w.NLMSG_ERROR,
    "NLM_F_REQUEST": w.NLM_F_REQUEST,
    "NLM_F_ACK": w.NLM_F_ACK,
    "NLM_F_CAPPED": w.NLM_F_CAPPED,
    "NLM_F_ACK_TLVS": w.NLM_F_ACK_TLVS,
    "NLMSGERR_ATTR_MSG": w.NLMSGERR_ATTR_MSG,
    "XFRM_MSG_NEWSA": w.XFRM_MSG_NEWSA,
    "XFRM_MSG_DELSA": w.XFRM_MSG_DELSA,
    "XFRM_MSG_GETSA": w.XFRM_MSG_GETSA,
    "XFRM_MSG_ALLOCSPI": w.XFRM_MSG_ALLOCSPI,
    "XFRM_MSG_ACQUIRE": w.XFRM_MSG_ACQUIRE,
    "XFRM_MSG_EXPIRE": w.XFRM_MSG_EXPIRE,
    "XFRM_MSG_UPDSA": w.XFRM_MSG_UPDSA,
    "XFRMA_REPLAY_VAL": w.XFRMA_REPLAY_VAL,
    "XFRMA_MARK": w.XFRMA_MARK,
    "XFRMA_IF_ID": w.XFRMA_IF_ID,
    "XFRMA_SA_DIR": w.XFRMA_SA_DIR,
    "XFRMA_SA_PCPU": w.XFRMA_SA_PCPU,
    "SPIALLOC_PENDING": -1,
    "SPIALLOC_LOST": _cbatch.LOST,
    # sizes
    "SPIALLOC_SIZEOF_NLMSGHDR": w.NLMSGHDR_LEN,
    "SPIALLOC_SIZEOF_NLMSGERR": w.NLMSGERR_LEN,
    "SPIALLOC_SIZEOF_NLATTR": w.NLATTR_LEN,
    "SPIALLOC_SIZEOF_SELECTOR": w.XFRM_SELECTOR_LEN,
    "SPIALLOC_SIZEOF_XFRM_ID": w.XFRM_ID_LEN,
    "SPIALLOC_SIZEOF_LIFETIME_CFG": w.XFRM_LIFETIME_CFG_LEN,
    "SPIALLOC_SIZEOF_LIFETIME_CUR": w.XFRM_LIFETIME_CUR_LEN,
    "SPIALLOC_SIZEOF_STATS": w.XFRM_STATS_LEN,
    "SPIALLOC_SIZEOF_USERSA_INFO": w.XFRM_USERSA_INFO_LEN,
    "SPIALLOC_SIZEOF_USERSPI_INFO": w.XFRM_USERSPI_INFO_LEN,
    "SPIALLOC_SIZEOF_USERSA_ID": w.XFRM_USERSA_ID_LEN,
    "SPIALLOC_SIZEOF_MARK": w.XFRM_MARK_LEN,
    "SPIALLOC_SIZEOF_USER_ACQUIRE": w.XFRM_USER_ACQUIRE_LEN,
    "SPIALLOC_SIZEOF_USER_EXPIRE": w.XFRM_USER_EXPIRE_LEN,
    "SPIALLOC_SIZEOF_USERPOLICY_INFO": w.XFRM_USERPOLICY_INFO_LEN,
    "SPIALLOC_SIZEOF_USER_TMPL": w.XFRM_USER_TMPL_LEN,
    # offsets in xfrm_usersa_info / xfrm_userspi_info
    "SPIALLOC_OFFSETOF_SEL": w.SA_SEL,
    "SPIALLOC_OFFSETOF_ID_DADDR": w.SA_ID_DADDR,
    "SPIALLOC_OFFSETOF_ID_SPI": w.SA_ID_SPI,
    "SPIALLOC_OFFSETOF_ID_PROTO": w.SA_ID_PROTO,
    "SPIALLOC_OFFSETOF_SADDR": w.SA_SADDR,
    "SPIALLOC_OFFSETOF_CURLFT": w.SA_CURLFT,
    "SPIALLOC_OFFSETOF_SA_SEQ": w.SA_SEQ,
    "SPIALLOC_OFFSETOF_REQID": w.SA_REQID,
    "SPIALLOC_OFFSETOF_SA_FAMILY": w.SA_FAMILY,
    "SPIALLOC_OFFSETOF_MODE": w.SA_MODE,
    "SPIALLOC_OFFSETOF_REPLAY_WINDOW": w.SA_REPLAY_WINDOW,
    "SPIALLOC_OFFSETOF_SA_FLAGS": w.SA_FLAGS,
    "SPIALLOC_OFFSETOF_SPI_MIN": w.SPI_MIN,
    "SPIALLOC_OFFSETOF_SPI_MAX": w.SPI_MAX,
    "SPIALLOC_OFFSETOF_EXPIRE_HARD": w.EXPIRE_HARD,
    # offsets in xfrm_user_acquire
    "SPIALLOC_OFFSETOF_ACQUIRE_ID": w.ACQ_ID,
    "SPIALLOC_OFFSETOF_ACQUIRE_SADDR": w.ACQ_SADDR,
    "SPIALLOC_OFFSETOF_ACQUIRE_SEL": w.ACQ_SEL,
    "SPIALLOC_OFFSETOF_ACQUIRE_POLICY": w.ACQ_POLICY,
    "SPIALLOC_OFFSETOF_ACQUIRE_SEQ": w.ACQ_SEQ,
    "SPIALLOC_OFFSETOF_ACQUIRE_ALGOS": w.ACQ_ALGOS,
    "SPIALLOC_OFFSETOF_SA_LFT": w.SA_LFT,
    "SPIALLOC_OFFSETOF_POLICY_LFT": w.POL_LFT,
    "SPIALLOC_OFFSETOF_POLICY_PRIORITY": w.POL_PRIORITY,
    # the fields _wire._POLICY_TAIL and _wire._TMPL lay out by position
    "SPIALLOC_OFFSETOF_POLICY_INDEX": w.POL_PRIORITY + 4,
    "SPIALLOC_OFFSETOF_POLICY_DIR": w.POL_PRIORITY + 8,
    "SPIALLOC_OFFSETOF_TMPL_FAMILY": w.TMPL_FAMILY,
    "SPIALLOC_OFFSETOF_TMPL_REQID": w.TMPL_REQID,
    "SPIALLOC_OFFSETOF_TMPL_MODE": w.TMPL_MODE,
    "SPIALLOC_OFFSETOF_TMPL_SADDR": 28,
    "SPIALLOC_OFFSETOF_TMPL_AALGOS": 52,
    # literals inside _wire._USERSA_ID
    "SPIALLOC_OFFSETOF_USERSA_ID_FAMILY": 20,
    "SPIALLOC_OFFSETOF_USERSA_ID_PROTO": 22,
}


@pytest.mark.parametrize("name", sorted(CONSTANTS))
def test_constant_matches_wire(name: str) -> None:
    assert getattr(lib, name) == CONSTANTS[name]


def test_struct_formats_match_compiler() -> None:
    assert w.NLMSGHDR.size == lib.SPIALLOC_SIZEOF_NLMSGHDR
    assert w.XFRM_MARK.size == lib.SPIALLOC_SIZEOF_MARK
    assert w._USERSA_ID.size == lib.SPIALLOC_SIZEOF_USERSA_ID
    assert w._SELECTOR.size == lib.SPIALLOC_SIZEOF_SELECTOR
    assert w._TMPL.size == lib.SPIALLOC_SIZEOF_USER_TMPL
    assert w._LIFETIME_CFG.size == lib.SPIALLOC_SIZEOF_LIFETIME_CFG
    assert w.POL_PRIORITY + w._POLICY_TAIL.size <= lib.SPIALLOC_SIZEOF_USERPOLICY_INFO
    assert w.ACQ_ALGOS + w._ALGOS.size == lib.SPIALLOC_OFFSETOF_ACQUIRE_SEQ
    assert w.SA_ID_DADDR + w._SA_HEAD.size == lib.SPIALLOC_OFFSETOF_SADDR + 16
    assert w.SA_SEQ + w._SA_TAIL.size == lib.SPIALLOC_OFFSETOF_SA_FLAGS + 1
    assert w.MSG_SPI_MIN == lib.SPIALLOC_SIZEOF_NLMSGHDR + lib.SPIALLOC_OFFSETOF_SPI_MIN
    assert w.MSG_SPI_MAX == lib.SPIALLOC_SIZEOF_NLMSGHDR + lib.SPIALLOC_OFFSETOF_SPI_MAX
    assert w.MSG_REPLY_SPI == lib.SPIALLOC_SIZEOF_NLMSGHDR + lib.SPIALLOC_OFFSETOF_ID_SPI
    assert len(allocspi_template()) == lib.SPIALLOC_SIZEOF_NLMSGHDR + lib.SPIALLOC_SIZEOF_USERSPI_INFO


def test_lost_and_pending_agree_with_pybatch() -> None:
    from spialloc import _pybatch

    assert _pybatch.LOST == _cbatch.LOST == lib.SPIALLOC_LOST
    assert _pybatch.PENDING == _cbatch.PENDING == lib.SPIALLOC_PENDING


# --- hand-built messages ------------------------------------------------------------


def allocspi_template(flags: int = w.NLM_F_REQUEST) -> bytes:
    info = w.userspi_info(
        family=w.AF_INET,
        daddr=bytes([10, 0, 0, 1]) + bytes(12),
        saddr=bytes(16),
        proto=w.IPPROTO_ESP,
        mode=0,
        reqid=0,
        acq_seq=0,
        spi_min=0xC0000000,
        spi_max=0xCFFFFFFF,
    )
    return w.allocspi(0, info, b"", flags)


def newsa(seq: int, spi: int, pid: int = PORTID, payload_len: int = w.XFRM_USERSA_INFO_LEN) -> bytes:
    info = bytearray(w.XFRM_USERSA_INFO_LEN)
    w.BE32.pack_into(info, w.SA_ID_SPI, spi)
    replay = w.attr(w.XFRMA_REPLAY_VAL, bytes(12))
    return w.message(w.XFRM_MSG_NEWSA, 0, seq, (bytes(info) + replay)[:payload_len], pid)


def nlerr(seq: int, code: int, text: str | None = None, capped: bool = True, pid: int = PORTID) -> bytes:
    """NLMSG_ERROR as netlink_ack builds it (code is -errno, 0 for an ack)."""
    request = allocspi_template()
    flags = 0
    if capped:
        body = w.I32.pack(code) + request[: w.NLMSGHDR_LEN]
        flags |= w.NLM_F_CAPPED
    else:
        body = w.I32.pack(code) + request
        body += b"\0" * (w.align4(len(body)) - len(body))
    if text is not None:
        body += w.attr(w.NLMSGERR_ATTR_MSG, text.encode() + b"\0")
        flags |= w.NLM_F_ACK_TLVS
    return w.message(w.NLMSG_ERROR, flags, seq, body, pid)


class Batch:
    """A struct spialloc_batch with Python-owned buffers, ready to be fed."""

    def __init__(self, count: int = 4, seq0: int = SEQ0, delsa: bool = False, errmsg_len: int = 128) -> None:
        self.b: Any = ffi.new("struct spialloc_batch *")
        self.spis = array.array("I", bytes(4 * count))
        self.errs = array.array("i", bytes(4 * count))
        if delsa:
            one = w.delsa(0, w.usersa_id(bytes(16), 1, 2, 50), b"")
            self.tmpl = one * count
            self.b.stride = len(one)
        else:
            self.tmpl = allocspi_template()
        self.keep = [
            ffi.from_buffer("uint8_t[]", self.tmpl),
            ffi.new("uint8_t[]", 4096),
            ffi.new("uint8_t[]", lib.SPIALLOC_RECV_SLOT),
            ffi.new("char[]", max(errmsg_len, 1)),
            ffi.from_buffer("uint32_t[]", self.spis),
            ffi.from_buffer("int32_t[]", self.errs),
        ]
        b = self.b
        b.fd, b.portid, b.count, b.seq0, b.chunk = -1, PORTID, count, seq0, count
        b.tmpl, b.tmpl_len = self.keep[0], len(self.tmpl)
        b.sendbuf, b.sendbuf_len = self.keep[1], 4096
        b.recvbuf, b.recvbuf_len = self.keep[2], lib.SPIALLOC_RECV_SLOT
        b.errmsg, b.errmsg_len = self.keep[3], errmsg_len
        b.errs = self.keep[5]
        if not delsa:
            b.spis = self.keep[4]
        init = lib.spialloc_batch_init_delsa if delsa else lib.spialloc_batch_init_allocspi
        assert init(b) == 0, os.strerror(ffi.errno)
        b.sent = b.pending = count  # as if the whole batch had been sent

    def feed(self, data: bytes, src_pid: int = 0, truncated: bool = False) -> int:
        return int(lib.spialloc_batch_feed(self.b, data, len(data), src_pid, truncated))

    @property
    def text(self) -> bytes:
        return bytes(ffi.string(self.b.errmsg))


# --- the reply parser -------------------------------------------------------------------


def test_newsa_gives_spi_in_host_order() -> None:
    t = Batch()
    assert t.feed(newsa(SEQ0 + 2, 0xC0FFEE01)) == 1
    assert t.spis[2] == 0xC0FFEE01
    assert list(t.errs) == [-1, -1, 0, -1]
    assert (t.b.received, t.b.pending, t.b.strays, t.b.malformed) == (1, 3, 0, 0)


def test_capped_error_with_extack_text() -> None:
    t = Batch()
    assert t.feed(nlerr(SEQ0, -errno.ENOENT, "No SPI available in the requested range")) == 1
    assert t.errs[0] == errno.ENOENT
    assert t.text == b"No SPI available in the requested range"


def test_uncapped_error_text_found_after_the_echoed_request() -> None:
    t = Batch()
    assert t.feed(nlerr(SEQ0 + 1, -errno.EINVAL, "IPCOMP SPI must be <= 65535", capped=False)) == 1
    assert t.errs[1] == errno.EINVAL
    assert t.text == b"IPCOMP SPI must be <= 65535"


def test_first_error_text_is_kept() -> None:
    t = Batch()
    t.feed(nlerr(SEQ0, -errno.EPERM))  # no text
    t.feed(nlerr(SEQ0 + 1, -errno.ENOENT, "first"))
    t.feed(nlerr(SEQ0 + 2, -errno.ENOENT, "second"))
    assert list(t.errs[:3]) == [errno.EPERM, errno.ENOENT, errno.ENOENT]
    assert t.text == b"first"


def test_error_text_is_cut_to_the_buffer_and_terminated() -> None:
    t = Batch(errmsg_len=5)
    t.feed(nlerr(SEQ0, -errno.ENOENT, "No SPI available"))
    assert t.text == b"No S"


def test_several_messages_in_one_datagram() -> None:
    t = Batch()
    data = newsa(SEQ0, 0xC0000001) + nlerr(SEQ0 + 1, -errno.ENOENT, "x") + newsa(SEQ0 + 3, 0xC0000003)
    assert t.feed(data) == 3
    assert list(t.errs) == [0, errno.ENOENT, -1, 0]
    assert (t.spis[0], t.spis[3]) == (0xC0000001, 0xC0000003)


def test_sequence_numbers_wrap() -> None:
    t = Batch(seq0=0xFFFFFFFF)
    assert t.feed(newsa(0xFFFFFFFF, 7) + newsa(0, 8) + newsa(1, 9)) == 3
    assert list(t.spis[:3]) == [7, 8, 9]


@pytest.mark.parametrize(
    "data, kwargs",
    [
        (newsa(SEQ0, 5, pid=PORTID + 1), {}),  # someone else's reply
        (newsa(SEQ0 - 1, 5), {}),  # before the batch
        (newsa(SEQ0 + 4, 5), {}),  # after the batch
        (newsa(SEQ0, 5), {"src_pid": 99}),  # not from the kernel
        (nlerr(SEQ0, 0), {}),  # an ack: ALLOCSPI succeeds with NEWSA only
        (w.message(w.XFRM_MSG_EXPIRE, 0, SEQ0, bytes(232), PORTID), {}),
    ],
)
def test_strays_are_counted_and_ignored(data: bytes, kwargs: dict[str, Any]) -> None:
    t = Batch()
    assert t.feed(data, **kwargs) == 0
    assert list(t.errs) == [-1] * 4
    assert (t.b.strays, t.b.malformed, t.b.received) == (1, 0, 0)


def test_second_reply_for_a_settled_request_is_a_stray() -> None:
    t = Batch()
    t.feed(newsa(SEQ0, 5))
    assert t.feed(newsa(SEQ0, 6)) == 0
    assert (t.spis[0], t.b.strays) == (5, 1)


def test_reply_for_request_not_sent_yet_is_a_stray() -> None:
    t = Batch()
    t.b.sent = 2
    assert t.feed(newsa(SEQ0 + 2, 5)) == 0
    assert t.b.strays == 1


@pytest.mark.parametrize(
    "data, truncated",
    [
        (newsa(SEQ0, 5), True),  # MSG_TRUNC
        (newsa(SEQ0, 5)[:100], False),  # nlmsg_len beyond the datagram
        (struct.pack("=IHHII", 8, w.XFRM_MSG_NEWSA, 0, SEQ0, PORTID), False),  # nlmsg_len < 16
        (newsa(SEQ0, 5, payload_len=200), False),  # NEWSA shorter than usersa_info
        (w.message(w.NLMSG_ERROR, 0, SEQ0, b"\0" * 8, PORTID), False),  # short nlmsgerr
        (nlerr(SEQ0, 5), False),  # positive error code
        (nlerr(SEQ0, -(2**31)), False),  # error code with no errno
    ],
)
def test_malformed_is_counted_and_ignored(data: bytes, truncated: bool) -> None:
    t = Batch()
    assert t.feed(data, truncated=truncated) == 0
    assert list(t.errs) == [-1] * 4
    assert t.b.malformed == 1


def test_trailing_bytes_after_last_message_are_malformed() -> None:
    t = Batch()
    assert t.feed(newsa(SEQ0, 5) + b"\0" * 8) == 1
    assert (t.errs[0], t.b.malformed) == (0, 1)


def test_extack_attribute_overrunning_payload_is_not_read() -> None:
    t = Batch()
    msg = bytearray(nlerr(SEQ0, -errno.ENOENT, "abc"))
    struct.pack_into("=H", msg, w.NLMSGHDR_LEN + w.NLMSGERR_LEN, 200)  # nla_len past the end
    assert t.feed(bytes(msg)) == 1
    assert t.errs[0] == errno.ENOENT
    assert t.text == b""


def test_delsa_ack_and_esrch() -> None:
    t = Batch(delsa=True)
    assert t.feed(nlerr(SEQ0, 0) + nlerr(SEQ0 + 1, -errno.ESRCH)) == 2
    assert list(t.errs) == [0, errno.ESRCH, -1, -1]
    assert t.feed(newsa(SEQ0 + 2, 5)) == 0  # no NEWSA expected from DELSA
    assert t.b.strays == 1


# --- input validation -------------------------------------------------------------------


def _batch_with(tmpl: bytes, sendbuf_len: int = 4096, ranges: str = "", stride: int = 0) -> tuple[int, int]:
    b: Any = ffi.new("struct spialloc_batch *")
    keep = [ffi.from_buffer("uint8_t[]", tmpl), ffi.new("uint8_t[]", max(sendbuf_len, 1))]
    keep += [ffi.new("uint8_t[]", 1024), ffi.new("uint32_t[]", 4), ffi.new("int32_t[]", 4)]
    b.tmpl, b.tmpl_len, b.stride, b.count, b.chunk = keep[0], len(tmpl), stride, 4, 4
    b.sendbuf, b.sendbuf_len, b.recvbuf, b.recvbuf_len = keep[1], sendbuf_len, keep[2], 1024
    b.errs = keep[4]
    if "min" in ranges:
        b.mins = keep[3]
    if "max" in ranges:
        b.maxs = keep[3]
    if stride:
        rc = lib.spialloc_batch_init_delsa(b)
    else:
        b.spis = keep[3]
        rc = lib.spialloc_batch_init_allocspi(b)
    return rc, ffi.errno if rc else 0


def test_init_accepts_a_good_template() -> None:
    assert _batch_with(allocspi_template()) == (0, 0)
    assert _batch_with(allocspi_template(), ranges="min max") == (0, 0)


@pytest.mark.parametrize(
    "tmpl, kwargs, code",
    [
        (allocspi_template()[:-4], {}, errno.EINVAL),  # shorter than userspi_info
        (allocspi_template() + b"\0\0\0\0", {}, errno.EINVAL),  # nlmsg_len != template length
        (allocspi_template(w.NLM_F_REQUEST | w.NLM_F_ACK), {}, errno.EINVAL),  # two replies each
        (allocspi_template(0), {}, errno.EINVAL),  # not a request
        (w.delsa(0, bytes(24), b""), {}, errno.EINVAL),  # wrong type
        (allocspi_template(), {"ranges": "min"}, errno.EINVAL),  # min without max
        (allocspi_template(), {"sendbuf_len": 4 * 248 - 1}, errno.EMSGSIZE),
    ],
)
def test_init_rejects(tmpl: bytes, kwargs: dict[str, Any], code: int) -> None:
    assert _batch_with(tmpl, **kwargs) == (-1, code)


def test_delsa_init_checks_every_message() -> None:
    good = w.delsa(0, bytes(24), b"")
    assert _batch_with(good * 4, stride=len(good)) == (0, 0)
    no_ack = w.delsa(0, bytes(24), b"", flags=w.NLM_F_REQUEST)
    assert _batch_with(good * 3 + no_ack, stride=len(good)) == (-1, errno.EINVAL)
    assert _batch_with(good * 3, stride=len(good)) == (-1, errno.EMSGSIZE)  # 3 of 4 messages
    assert _batch_with(good * 4 + b"\0" * 8, stride=len(good) + 2) == (-1, errno.EINVAL)  # stride % 4


# --- the wrapper, without a kernel ------------------------------------------------------------


class BadSocket:
    def fileno(self) -> int:
        return 1023  # not open in the test process


def test_socket_error_raises_with_partial_results() -> None:
    with pytest.raises(OSError) as info:
        _cbatch.alloc_batch(BadSocket(), 1, allocspi_template(), 3, 1, None, 2, lambda: None)  # type: ignore[arg-type]
    assert info.value.errno == errno.EBADF
    assert info.value.spialloc_partial == ([0, 0, 0], [-1, -1, -1])  # type: ignore[attr-defined]


def test_ranges_must_be_u32_arrays() -> None:
    wide = (array.array("Q", [1, 2]), array.array("Q", [1, 2]))
    with pytest.raises(TypeError):
        _cbatch.alloc_batch(BadSocket(), 1, allocspi_template(), 2, 1, wide, 2, lambda: None)  # type: ignore[arg-type]


def test_empty_batches() -> None:
    assert _cbatch.alloc_batch(BadSocket(), 1, b"", 0, 1, None, 2, lambda: None) == ([], [], None, 0)  # type: ignore[arg-type]
    assert _cbatch.delsa_batch(BadSocket(), 1, b"", 40, 0, 1, 2) == []  # type: ignore[arg-type]


# --- spialloc_alloc_one, fed through a socketpair -----------------------------------------
#
# The C call sends the request and reads one datagram.  With an AF_UNIX
# datagram pair the request goes to the peer (where the test reads it) and
# the reply is whatever the test queued before: every case of the parser.


class One:
    def __init__(self) -> None:
        import socket

        self.ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.buf = bytearray(1 << 16)
        _, self.o, self.rbuf, self.errno, _ = _cbatch.native_single(self.buf, PORTID)

    def call(self, reply: bytes | None, seq: int = 77, lo: int = 0x1000, hi: int = 0x2000) -> int:
        if reply is not None:
            self.peer.send(reply)
        tmpl = allocspi_template()
        rc = int(lib.spialloc_alloc_one(self.o, self.ours.fileno(), tmpl, len(tmpl), seq, lo, hi))
        if rc != lib.SPIALLOC_ONE_FAILED:
            self.check_sent(tmpl, seq, lo, hi)
        return rc

    def check_sent(self, tmpl: bytes, seq: int, lo: int, hi: int) -> None:
        """The peer got ``tmpl`` with ``seq`` and the range patched in."""
        sent = self.peer.recv(4096)
        assert len(sent) == len(tmpl)
        assert w.U32.unpack_from(sent, w.MSG_SEQ)[0] == seq
        assert struct.unpack_from("=II", sent, w.NLMSGHDR_LEN + w.XFRM_USERSA_INFO_LEN) == (lo, hi)
        assert sent[: w.MSG_SEQ] == tmpl[: w.MSG_SEQ]

    def close(self) -> None:
        self.ours.close()
        self.peer.close()


@pytest.fixture
def one() -> Any:
    t = One()
    yield t
    t.close()


def test_alloc_one_reads_our_newsa(one: One) -> None:
    assert one.call(newsa(77, 0xC0FFEE01)) == 0xC0FFEE01  # the SPI is the return value


def test_alloc_one_returns_every_spi_value(one: One) -> None:
    # 0 and 2^32 - 1 too: only the negative values are not SPIs.
    for spi in (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF):
        assert one.call(newsa(77, spi)) == spi


@pytest.mark.parametrize(
    "reply",
    [
        newsa(78, 1),  # another request's reply
        newsa(77, 1, pid=PORTID + 1),  # another socket's
        newsa(77, 1, payload_len=100),  # truncated payload
        newsa(77, 1)[:-4],  # the datagram shorter than its nlmsg_len
        newsa(77, 1) + b"\0" * 8,  # longer: more than one message
        nlerr(77, -errno.ENOENT, "No SPI available"),  # an error: Python reads its text
        w.message(w.NLMSG_DONE, 0, 77, b"\0" * 4, PORTID),
    ],
)
def test_alloc_one_hands_everything_else_to_python(one: One, reply: bytes) -> None:
    assert one.call(reply) == lib.SPIALLOC_ONE_OTHER
    assert one.o.got == len(reply)
    assert bytes(one.buf[: len(reply)]) == reply  # for _reply, in the socket's own buffer


def test_alloc_one_with_nothing_queued_says_why(one: One) -> None:
    assert one.call(None) == lib.SPIALLOC_ONE_OTHER
    assert one.o.got == -errno.EAGAIN


def test_alloc_one_refuses_bad_lengths_before_sending(one: One) -> None:
    for tmpl in (b"", allocspi_template()[:20], b"\0" * (lib.SPIALLOC_ONE_MAX + 1)):
        assert lib.spialloc_alloc_one(one.o, one.ours.fileno(), tmpl, len(tmpl), 1, 1, 2) == lib.SPIALLOC_ONE_FAILED
        assert ffi.errno == errno.EINVAL
    one.peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        one.peer.recv(4096)  # nothing was sent


def test_alloc_one_on_a_closed_socket_fails_with_ebadf(one: One) -> None:
    tmpl = allocspi_template()
    assert lib.spialloc_alloc_one(one.o, -1, tmpl, len(tmpl), 1, 1, 2) == lib.SPIALLOC_ONE_FAILED
    assert ffi.errno == errno.EBADF


# --- spialloc_alloc_req: the same round trip on a socket of its own (_cbatch.Fast) ---------


class FastPair(One):
    def __init__(self) -> None:
        super().__init__()
        self.fast = _cbatch.Fast(self.ours.fileno(), self.buf, PORTID)

    def req(self, reply: bytes | None, seq: int = 77, lo: int = 0x1000, hi: int = 0x2000) -> int:
        if reply is not None:
            self.peer.send(reply)
        tmpl = allocspi_template()
        rc = int(self.fast.call(self.fast.one, self.fast.prepare(tmpl, lo, hi), seq))
        if rc not in (self.fast.FAILED, self.fast.BUSY):
            self.check_sent(tmpl, seq, lo, hi)
        return rc


@pytest.fixture
def fast() -> Any:
    t = FastPair()
    yield t
    t.close()


def test_alloc_req_reads_our_newsa_and_keeps_this_threads_last_spi(fast: FastPair) -> None:
    seq = next(fast.fast.seqs)
    assert fast.req(newsa(seq, 0xC0FFEE01), seq) == 0xC0FFEE01
    assert not fast.fast.held()
    assert fast.fast.last(seq) == 0xC0FFEE01
    assert fast.fast.last(seq + 1) is None  # another call's seq
    seen: list[int | None] = []
    t = threading.Thread(target=lambda: seen.append(fast.fast.last(seq)))
    t.start()
    t.join()
    assert seen == [None]  # another thread's calls are not its own


def test_alloc_req_holds_the_socket_after_other_until_released(fast: FastPair) -> None:
    seq = next(fast.fast.seqs)
    err = nlerr(seq, -errno.ENOENT, "No SPI available")
    assert fast.req(err, seq) == fast.fast.OTHER
    assert fast.fast.got() == len(err) and bytes(fast.buf[: len(err)]) == err
    assert fast.fast.held()
    assert fast.fast.last(seq) is None  # no SPI: nothing to take back
    # Meanwhile another thread is told BUSY and sends nothing.
    rcs: list[int] = []
    t = threading.Thread(target=lambda: rcs.append(fast.req(None, next(fast.fast.seqs))))
    t.start()
    t.join()
    assert rcs == [fast.fast.BUSY]
    fast.peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        fast.peer.recv(4096)
    fast.peer.setblocking(True)
    # Only the holder's release gives it back.
    t = threading.Thread(target=fast.fast.release)
    t.start()
    t.join()
    assert fast.fast.held()
    fast.fast.release()
    assert not fast.fast.held()
    seq = next(fast.fast.seqs)
    assert fast.req(newsa(seq, 5), seq) == 5


def test_alloc_req_after_close_fails_with_ebadf_and_sends_nothing(fast: FastPair) -> None:
    fast.fast.close()
    assert fast.req(newsa(77, 1)) == fast.fast.FAILED
    assert fast.fast.errno() == errno.EBADF
    assert not fast.fast.held()


def test_close_waits_for_the_holder_but_not_for_itself(fast: FastPair) -> None:
    assert fast.req(nlerr(77, -errno.ENOENT, "")) == fast.fast.OTHER
    fast.fast.close()  # this thread holds it (a handler's close): no wait
    fast.fast.release()
    fast2 = FastPair()
    try:
        assert fast2.req(nlerr(77, -errno.ENOENT, "")) == fast2.fast.OTHER
        done = threading.Event()
        t = threading.Thread(target=lambda: (fast2.fast.close(), done.set()))
        t.start()
        assert not done.wait(0.2)  # waits: the reply is still being read here
        fast2.fast.release()
        assert done.wait(5)
        t.join()
        assert fast2.req(newsa(78, 1), 78) == fast2.fast.FAILED
    finally:
        fast2.close()


def test_prepare_refuses_what_does_not_fit() -> None:
    assert _cbatch.Fast.prepare(b"\0" * (lib.SPIALLOC_ONE_MAX + 1), 1, 2) is None
