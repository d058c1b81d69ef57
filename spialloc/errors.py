"""The exception tree.  Every error spialloc raises derives from SpiallocError.

Kernel errors keep the kernel's own words (the extended-ack text) and errno, so
a daemon can log them as they are and branch on type or errno.
"""

from __future__ import annotations

import errno as _errno
import os
import resource
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from ._model import Reservation


class SpiallocError(Exception):
    """Base class of every spialloc error."""


class InvalidRequest(SpiallocError, ValueError):
    """Bad input, raised before any syscall."""


class NetlinkError(SpiallocError, OSError):
    """The kernel refused a request: errno plus the kernel's extended-ack text."""

    def __init__(self, code: int, kernel_text: str | None = None, operation: str = "") -> None:
        self.kernel_text = kernel_text
        self.operation = operation
        # The kernel's own words when it gave any, else the errno text.
        message = kernel_text or os.strerror(code)
        if operation:
            message = f"{operation}: {message}"
        super().__init__(code, message)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.errno, self.kernel_text, self.operation))


class SpiExhausted(NetlinkError):
    """No free SPI in the requested range (kernel ENOENT on ALLOCSPI, or the
    guard found every value of the range outstanding)."""


class UnsupportedByKernel(NetlinkError):
    """The running kernel ignores an attribute the request carries (older
    kernels skip unknown XFRM attributes silently): EOPNOTSUPP, with the
    attribute, the kernel version that added it and the running one."""


class InsufficientPrivilege(NetlinkError, PermissionError):
    """The socket's network namespace does not grant CAP_NET_ADMIN."""

    HINT = (
        "CAP_NET_ADMIN is needed in the target network namespace: run as root, "
        "or in a private namespace of your own with `unshare -Urn`"
    )

    def __init__(self, code: int = _errno.EPERM, kernel_text: str | None = None, operation: str = "") -> None:
        super().__init__(code, kernel_text, operation)
        self.args = (code, f"{self.strerror}; {self.HINT}")
        self.strerror = f"{self.strerror}; {self.HINT}"


class NamespaceError(SpiallocError, OSError):
    """The network namespace could not be opened or entered."""


class ResourceError(SpiallocError, OSError):
    """Out of file descriptors (EMFILE: the process's RLIMIT_NOFILE; ENFILE:
    the system's limit) while making a socket, a pipe or a namespace handle."""


def out_of_fds(code: int | None, doing: str) -> ResourceError | None:
    """A ResourceError naming ``doing`` if ``code`` is EMFILE or ENFILE, else
    None: ``raise out_of_fds(exc.errno, ...) or OtherError(...)``."""
    if code == _errno.EMFILE:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return ResourceError(
            code, f"{doing}: EMFILE, this process has reached its limit of {limit} open files (RLIMIT_NOFILE)"
        )
    if code == _errno.ENFILE:
        return ResourceError(code, f"{doing}: ENFILE, the system's limit on open files is reached")
    return None


class DecodeError(SpiallocError, ValueError):
    """A kernel message did not parse; the bytes are kept in ``data``."""

    def __init__(self, message: str, data: bytes = b"") -> None:
        super().__init__(message)
        self.data = data


class BatchError(SpiallocError):
    """Some requests of an all-or-nothing batch failed; the successes were released.

    ``failures`` maps the batch index of each failed request to its exception;
    ``released`` is how many SPIs were handed back to the kernel.
    """

    def __init__(self, requested: int, failures: dict[int, SpiallocError], released: int) -> None:
        self.requested = requested
        self.failures = failures
        self.released = released
        first = next(iter(failures.values()), None)
        super().__init__(
            f"{len(failures)} of {requested} allocations failed "
            f"(first: {first}); {released} successful allocations were released"
        )


class ReservationLost(SpiallocError):
    """The reservation is not current: its larval state expired or was
    deleted before commit, or it was released; its SPI may already belong to
    someone else.  ``reservations``: the handles concerned, where known."""

    def __init__(self, message: str, reservations: Sequence[Reservation] = ()) -> None:
        super().__init__(message)
        self.reservations = list(reservations)


class AlreadyBound(InvalidRequest):
    """This process already bound the kernel ACQUIRE ``seq`` to an SPI (or is
    binding it now, in another thread).  Raised before any syscall: a second
    ALLOCSPI with the seq would get the same SPI back and, on the way,
    overwrite the ACQ state's direction with its own.  ``reservation``: the
    first binding's, None while it is in flight."""

    def __init__(self, seq: int, reservation: Reservation | None) -> None:
        self.seq = seq
        self.reservation = reservation
        first = "is being bound now" if reservation is None else f"got {reservation}"
        super().__init__(f"ACQUIRE seq {seq} is already bound in this process: it {first}")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.seq, self.reservation))


class DuplicateSpi(SpiallocError):
    """The kernel kept returning outstanding SPIs and the retry budget ran out."""


class ClosedError(SpiallocError, OSError):
    """The allocator (or its socket) is closed."""


class ForkedError(SpiallocError):
    """An object that holds kernel resources was made before fork() and used in
    the child.  Its sockets are the parent's too (same netlink port: the two
    processes would read each other's replies and delete each other's
    states), so in the child it is inert: open a new one there."""

    def __init__(self, what: str, pid: int) -> None:
        self.what = what
        self.pid = pid
        super().__init__(f"{what} created before fork() in process {pid}: open a new one in the child")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.what, self.pid))


#: Kernel-internal "interrupted, restart" codes (ERESTARTSYS, ERESTARTNOINTR,
#: ERESTARTNOHAND, ERESTART_RESTARTBLOCK) that netlink leaks to userspace when
#: a signal is pending (6.17+ xfrm_alloc_spi checks between picks), and EINTR.
RESTART_ERRNOS = frozenset({_errno.EINTR, 512, 513, 514, 516})

#: In an ALLOCSPI's box (``Kernel.alloc_one``: ``[SPI or None, guard token
#: or 0, directed candidate or None, seq of a ``Kernel.fast`` call or 0]``),
#: for ``Core.take_back``: the request was refused and left the kernel's
#: SPI-less larval state behind (``Kernel.claim_stray`` removes it).
STRAY = -1


def note_stray(box: list[object], exc: NetlinkError) -> None:
    """Mark ``box`` STRAY for a refusal that leaves the request's larval
    state, with no SPI, behind: no SPI free (ENOENT), or the kernel's pick
    loop interrupted by a signal."""
    if exc.errno == _errno.ENOENT or exc.errno in RESTART_ERRNOS:
        box[0] = STRAY


def from_errno(code: int, kernel_text: str | None, operation: str) -> NetlinkError:
    """Map a kernel errno (+ extack text) from ``operation`` to the typed error."""
    if code in RESTART_ERRNOS and code != _errno.EINTR:
        return NetlinkError(_errno.EINTR, kernel_text or "interrupted by a signal", operation)
    if code == _errno.EPERM:
        return InsufficientPrivilege(code, kernel_text, operation)
    if code == _errno.ENOENT and operation == "allocspi":
        return SpiExhausted(code, kernel_text or "No SPI available in the requested range", operation)
    return NetlinkError(code, kernel_text, operation)
