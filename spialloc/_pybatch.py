"""Pure-Python batch engine: the same algorithm and signature as the C engine
(``_cbatch``), so either backend gives identical results.

Per chunk: one sendmsg carrying up to ``chunk`` requests (the kernel handles
them all inside that call and queues one reply each), then drain the queued
replies without blocking.  A reply still missing when the queue is empty was
dropped by the kernel (receive buffer full): that request is marked LOST, and
the caller recovers the larval state it may have created.
"""

from __future__ import annotations

import array
import errno
import socket
import struct
from typing import Callable

from . import _wire as w

PENDING = -1
LOST = -2

_HDR = w.NLMSGHDR
_BE32 = w.BE32
_I32 = w.I32
_SEQ = struct.Struct("=I")
_RANGE = struct.Struct("=II")


def _drain(
    sock: socket.socket,
    portid: int,
    seq0: int,
    sent: int,
    acks: bool,
    spis: list[int],
    errs: list[int],
    buf: bytearray,
    missing: int,
    text: list[str | None],
) -> tuple[int, int]:
    """Collect queued replies; returns (still missing, ENOBUFS seen)."""
    overruns = 0
    view = memoryview(buf)
    while missing:
        try:
            n, addr = sock.recvfrom_into(buf, len(buf), socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                overruns += 1
                continue
            raise
        if addr[0] != 0:
            continue
        off = 0
        while n - off >= w.NLMSGHDR_LEN:
            length, kind, flags, seq, pid = _HDR.unpack_from(buf, off)
            if length < w.NLMSGHDR_LEN or length > n - off:
                break
            idx = (seq - seq0) & 0xFFFFFFFF
            if pid == portid and idx < sent and errs[idx] == PENDING:
                if kind == w.XFRM_MSG_NEWSA and length >= w.NLMSGHDR_LEN + w.XFRM_USERSA_INFO_LEN:
                    spis[idx] = _BE32.unpack_from(buf, off + w.MSG_REPLY_SPI)[0]
                    errs[idx] = 0
                    missing -= 1
                elif kind == w.NLMSG_ERROR and length >= w.NLMSGHDR_LEN + w.NLMSGERR_LEN:
                    code, msg, _ = w.decode_error(view[off + w.NLMSGHDR_LEN : off + length], flags)
                    if code or acks:  # an ack answers a DELSA; for ALLOCSPI it is a stray
                        errs[idx] = code
                        if text[0] is None and msg:
                            text[0] = msg
                        missing -= 1
            off += w.align4(length)
    return missing, overruns


def alloc_batch(
    sock: socket.socket,
    portid: int,
    template: bytes,
    count: int,
    seq0: int,
    ranges: tuple[array.array[int], array.array[int]] | None,
    chunk: int,
    check_interrupt: Callable[[], None],
) -> tuple[list[int], list[int], str | None, int]:
    """Allocate ``count`` SPIs; returns (spis, errs, first error text, overruns).

    ``errs[i]`` is 0 (``spis[i]`` is valid), a positive errno, or LOST.  If
    ``check_interrupt`` (or a signal) raises between chunks, the replies
    already queued are collected first and attached to the exception as
    ``spialloc_partial = (spis, errs)`` so the caller can release them.
    """
    spis = [0] * count
    errs = [PENDING] * count
    text: list[str | None] = [None]
    overruns = 0
    stride = w.align4(len(template))
    chunk = max(1, chunk)
    out = bytearray(stride * min(chunk, count))
    for i in range(min(chunk, count)):
        out[i * stride : i * stride + len(template)] = template
    buf = bytearray(1 << 16)
    sent = 0
    try:
        while sent < count:
            n = min(chunk, count - sent)
            for i in range(n):
                base = i * stride
                _SEQ.pack_into(out, base + w.MSG_SEQ, (seq0 + sent + i) & 0xFFFFFFFF)
                if ranges is not None:
                    _RANGE.pack_into(out, base + w.MSG_SPI_MIN, ranges[0][sent + i], ranges[1][sent + i])
            try:
                _send(sock, memoryview(out)[: n * stride])
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE and chunk > 1:
                    chunk //= 2  # larger than SO_SNDBUF: nothing was sent
                    continue
                raise
            sent += n
            missing, ovr = _drain(sock, portid, seq0, sent, False, spis, errs, buf, n, text)
            overruns += ovr
            if missing:
                for i in range(sent - n, sent):
                    if errs[i] == PENDING:
                        errs[i] = LOST
            check_interrupt()
    except BaseException as exc:
        # Whatever the kernel queued for requests already sent is ours: collect
        # it so the caller can release it, then let the interrupt go on.
        missing = sum(1 for i in range(sent) if errs[i] == PENDING)
        _drain(sock, portid, seq0, sent, False, spis, errs, buf, missing, text)
        for i in range(sent):
            if errs[i] == PENDING:
                errs[i] = LOST
        exc.spialloc_partial = (spis, errs)  # type: ignore[attr-defined]
        raise
    return spis, errs, text[0], overruns


def _send(sock: socket.socket, data: memoryview) -> None:
    while True:
        try:
            sock.send(data)
            return
        except InterruptedError:
            continue


def delsa_batch(
    sock: socket.socket, portid: int, messages: bytes, stride: int, count: int, seq0: int, chunk: int
) -> list[int]:
    """Send ``count`` pre-encoded DELSA messages (``stride`` bytes apart, each
    asking for an ack); returns errno per message (0 ok, ESRCH gone, LOST)."""
    errs = [PENDING] * count
    spis = [0] * count
    text: list[str | None] = [None]
    # Only nlmsg_len (aligned) of each slot goes on the wire: padding between
    # messages would read as a zero-length header and end the datagram.
    parts = []
    for i in range(count):
        length = _HDR.unpack_from(messages, i * stride)[0]
        msg = bytearray(messages[i * stride : i * stride + w.align4(length)])
        _SEQ.pack_into(msg, w.MSG_SEQ, (seq0 + i) & 0xFFFFFFFF)
        parts.append(bytes(msg))
    buf = bytearray(1 << 16)
    sent = 0
    chunk = max(1, chunk)
    while sent < count:
        n = min(chunk, count - sent)
        try:
            _send(sock, memoryview(b"".join(parts[sent : sent + n])))
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE and chunk > 1:
                chunk //= 2
                continue
            raise
        sent += n
        missing, _ = _drain(sock, portid, seq0, sent, True, spis, errs, buf, n, text)
        if missing:
            for i in range(sent - n, sent):
                if errs[i] == PENDING:
                    errs[i] = LOST
    return errs
