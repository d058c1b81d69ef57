"""C batch engine: thin wrapper around ``spialloc._native`` (csrc/spialloc.c).

Same functions, signatures and results as ``_pybatch``.  Python owns every
buffer; C fills them.  Each ``spialloc_batch_step`` call sends one chunk and
collects its replies with the GIL released, then returns here, so signal
handlers (Ctrl-C) run between chunks.
"""

from __future__ import annotations

import array
import errno
import itertools
import os
import socket
import weakref
from typing import Any, Callable

from ._native import ffi, lib
from ._pybatch import ERESTARTSYS, BatchArgs, Result, engine_entry  # noqa: F401  (shared with the Python engine)

PENDING = lib.SPIALLOC_PENDING  # not sent (only in partial results)
LOST = lib.SPIALLOC_LOST  # reply dropped: a larval state may exist

_ERRMSG_LEN = 256


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _u32_array(name: str, values: array.array[int], count: int) -> Any:
    if values.itemsize != 4 or values.typecode not in "IL":
        raise TypeError(f"{name} must be array.array('I'), got typecode {values.typecode!r}")
    if len(values) < count:
        raise ValueError(f"{name} has {len(values)} entries, need {count}")
    return ffi.from_buffer("uint32_t[]", values)


#: Each socket's send, receive and error-text buffers, kept from one batch
#: to the next: made (and zeroed, and faulted in) anew they cost more than
#: the Python work of the whole batch.  A socket runs one batch at a time
#: (its lock), so its buffers are never shared by two.
_BUFFERS: weakref.WeakKeyDictionary[socket.socket, tuple[Any, Any, Any]] = weakref.WeakKeyDictionary()


def _buffers(sock: socket.socket, send_size: int) -> tuple[Any, Any, Any]:
    bufs = _BUFFERS.get(sock)
    if bufs is None or len(bufs[0]) < send_size:
        old = 0 if bufs is None else len(bufs[0])
        recv_size = lib.SPIALLOC_RECV_SLOT * lib.SPIALLOC_RECV_BATCH
        bufs = (
            ffi.new("uint8_t[]", max(send_size, 2 * old)),
            ffi.new("uint8_t[]", recv_size),
            ffi.new("char[]", _ERRMSG_LEN),
        )
        _BUFFERS[sock] = bufs
    return bufs


def prepare(sock: socket.socket, send_size: int) -> None:
    """Make (and fault in: ffi.new zeroes them) the socket's buffers for
    batches of up to ``send_size`` bytes of requests, ahead of the first."""
    _buffers(sock, send_size)


def _new_batch(
    sock: socket.socket, portid: int, msgs: bytes, stride: int, count: int, seq0: int, chunk: int
) -> tuple[Any, list[Any]]:
    """A struct spialloc_batch with its buffers; ``keep`` holds what C points into."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    chunk = max(1, min(chunk, count))
    msg_size = stride or _align4(len(msgs))
    b = ffi.new("struct spialloc_batch *")
    tmpl = ffi.from_buffer("uint8_t[]", msgs)
    sendbuf, recvbuf, errmsg = _buffers(sock, chunk * msg_size)
    b.fd = sock.fileno()
    b.portid = portid
    b.tmpl, b.tmpl_len, b.stride = tmpl, len(msgs), stride
    b.count, b.seq0, b.chunk = count, seq0 & 0xFFFFFFFF, chunk
    b.sendbuf, b.sendbuf_len = sendbuf, len(sendbuf)
    b.recvbuf, b.recvbuf_len = recvbuf, len(recvbuf)
    b.errmsg, b.errmsg_len = errmsg, _ERRMSG_LEN
    return b, [tmpl, sendbuf, recvbuf, errmsg]


def _check_init(rc: int, what: str) -> None:
    if rc < 0:
        code = ffi.errno
        raise ValueError(f"{what}: {os.strerror(code)} (errno {code}): bad template or buffer sizes")


def _run(b: Any, check_interrupt: Callable[[], None] | None) -> None:
    """Step until done, calling ``check_interrupt`` after every chunk (as
    _pybatch does); on any exception settle what was sent, then re-raise."""
    try:
        while True:
            rc = lib.spialloc_batch_step(b)
            if rc < 0:
                code = ffi.errno
                if code == errno.EMSGSIZE and b.chunk > 1:
                    # The chunk exceeds SO_SNDBUF; nothing was sent.
                    b.chunk //= 2
                    continue
                raise OSError(code, os.strerror(code))
            if check_interrupt is not None:
                check_interrupt()
            if rc == 0:
                return
    except BaseException:
        lib.spialloc_batch_drain(b)  # marks unanswered requests LOST even if it fails
        raise


def _alloc_once(args: BatchArgs) -> Result:
    sock, portid, template, count, seq0, ranges, chunk, check_interrupt, box = args
    if count <= 0:
        return [], [], None, 0
    b, keep = _new_batch(sock, portid, template, 0, count, seq0, chunk)
    spis = array.array("I", bytes(4 * count))
    errs = array.array("i", bytes(4 * count))
    keep += [ffi.from_buffer("uint32_t[]", spis), ffi.from_buffer("int32_t[]", errs)]
    b.spis, b.errs = keep[-2], keep[-1]
    if ranges is not None:
        keep += [_u32_array("ranges[0]", ranges[0], count), _u32_array("ranges[1]", ranges[1], count)]
        b.mins, b.maxs = keep[-2], keep[-1]
    _check_init(lib.spialloc_batch_init_allocspi(b), "alloc_batch")
    if box is not None:
        box[0] = (spis, errs)  # every errs[i] PENDING now, filled in place from here on
    try:
        _run(b, check_interrupt)
        # Inside the try: an interrupt while the result is made still
        # hands the caller what the kernel allocated.
        # The arrays themselves: no int object per SPI until one is read.
        result = spis, errs, ffi.string(b.errmsg).decode("utf-8", "replace") or None, b.overruns
    except BaseException as exc:
        exc.spialloc_partial = (spis.tolist(), errs.tolist())  # type: ignore[attr-defined]
        raise
    return result


alloc_batch = engine_entry(_alloc_once)


def delsa_batch(
    sock: socket.socket, portid: int, messages: bytes, stride: int, count: int, seq0: int, chunk: int
) -> list[int]:
    """Send ``count`` pre-encoded DELSA messages, ``stride`` bytes apart (a
    multiple of 4), each with NLM_F_REQUEST | NLM_F_ACK and its own
    nlmsg_len <= stride; only nlmsg_seq is patched.  Returns errno per message
    as a list: 0 deleted, ESRCH already gone, LOST.  On an exception the list
    so far is attached as ``exc.spialloc_partial = errs``."""
    if count <= 0:
        return []
    b, keep = _new_batch(sock, portid, messages, stride, count, seq0, chunk)
    errs = array.array("i", bytes(4 * count))
    keep.append(ffi.from_buffer("int32_t[]", errs))
    b.errs = keep[-1]
    _check_init(lib.spialloc_batch_init_delsa(b), "delsa_batch")
    try:
        _run(b, None)
    except BaseException as exc:
        exc.spialloc_partial = errs.tolist()  # type: ignore[attr-defined]
        raise
    return errs.tolist()


def native_single(buf: bytearray, portid: int) -> tuple[Any, ...]:
    """What ``XfrmSocket.allocspi_native`` needs, made once per socket:
    ``spialloc_alloc_one``, its struct (``buf``, the socket's own receive
    buffer, is where the reply is read, for Python's slow path), a way to
    read C's errno, and the return value that means send() failed."""
    one = ffi.new("struct spialloc_one *")
    rbuf = ffi.from_buffer("uint8_t[]", buf)
    one.portid, one.rbuf, one.rlen = portid, rbuf, len(buf)
    return (lib.spialloc_alloc_one, one, rbuf, lambda: ffi.errno, lib.SPIALLOC_ONE_FAILED)


#: The longest template ``native_single`` takes; longer ones go the Python way.
ONE_MAX = lib.SPIALLOC_ONE_MAX


class Fast:
    """``spialloc_alloc_req`` on a socket of its own: the single allocate's
    request path with no Python lock (see csrc/spialloc.c for why).

    ``call(one, prepared, seq)`` returns the SPI, or ``BUSY`` (nothing
    sent: another thread has the socket; go the locked way), ``FAILED``
    (send() failed, ``errno()`` says why) or ``OTHER`` (the reply, read
    into the socket's own buffer, is Python's: this thread holds the
    socket until ``release``).  ``last(seq)``: the SPI this thread's call
    with ``seq`` returned, for a caller that an exception left before it
    stored it.  ``close()`` returns once no call uses the socket.

    ``seqs``: every call's sequence number, from one counter for the whole
    process, so that ``last`` can never mistake another call's SPI for its
    own (a closed allocator's struct may be made again at the same address
    and its thread-local record still name it).  The kernel only echoes
    nlmsg_seq."""

    seqs = itertools.count(1)
    BUSY = lib.SPIALLOC_ONE_BUSY
    FAILED = lib.SPIALLOC_ONE_FAILED
    OTHER = lib.SPIALLOC_ONE_OTHER
    call = lib.spialloc_alloc_req

    def __init__(self, fd: int, buf: bytearray, portid: int) -> None:
        self.one = ffi.new("struct spialloc_one *")
        self._rbuf = ffi.from_buffer("uint8_t[]", buf)
        self.one.fd, self.one.portid, self.one.rbuf, self.one.rlen = fd, portid, self._rbuf, len(buf)

    @staticmethod
    def prepare(template: bytes, lo: int, hi: int) -> Any:
        """A request for ``call``, or None if the template is too long."""
        if len(template) > lib.SPIALLOC_ONE_MAX:
            return None
        r = ffi.new("struct spialloc_req *")
        r.len, r.lo, r.hi = len(template), lo, hi
        ffi.memmove(r.msg, template, len(template))
        return r

    @staticmethod
    def errno() -> int:
        return int(ffi.errno)

    def got(self) -> int:
        return int(self.one.got)

    def last(self, seq: int) -> int | None:
        spi = int(lib.spialloc_one_last(self.one, seq))
        return None if spi < 0 else spi

    def held(self) -> bool:
        return bool(lib.spialloc_one_held(self.one))

    def release(self) -> None:
        lib.spialloc_one_release(self.one)

    def close(self) -> None:
        lib.spialloc_one_close(self.one)

    def forget_fd(self) -> None:
        """In a fork child: the fd is a copy, closed by the caller; no lock
        (the parent's thread that held it is not here)."""
        self.one.fd = -1
