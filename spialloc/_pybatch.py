"""Pure-Python batch engine: the same algorithm and signature as the C engine
(``_cbatch``), so either backend gives identical results.

Per chunk: one sendmsg carrying up to ``chunk`` requests (the kernel handles
them all inside that call and queues one reply each), then drain the queued
replies without blocking.  A reply still missing when the queue is empty was
dropped by the kernel (receive buffer full): that request is marked LOST, and
the caller recovers the larval state it may have created.

The reply parser mirrors csrc/spialloc.c rule for rule (``spialloc_batch_feed``,
``handle_msg``, ``save_text``), input checks mirror its ``init`` functions, and
``tests/unit/test_differential.py`` compares the two byte for byte.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
from typing import Any, Callable, MutableSequence, NamedTuple, Optional, Tuple

from . import _wire as w

PENDING = -1
LOST = -2
#: Kernel-internal "restart the syscall" (include/linux/errno.h).  Since Linux
#: 6.17 ("xfrm: Duplicate SPI Handling") xfrm_alloc_spi() checks
#: signal_pending() after every pick that hit a used SPI and returns
#: -ERESTARTSYS, which netlink hands to userspace in that request's
#: NLMSG_ERROR: an EINTR for one request.  No SPI was assigned (the larval
#: state keeps SPI 0 and is reused by the same request sent again).
ERESTARTSYS = 512
#: Rounds in a row that may re-send requests answered ERESTARTSYS without
#: settling any of them; then it is reported as it came (a signal storm
#: faster than one kernel table scan).  Rounds that settle some are free.
MAX_RESTARTS = 8

#: One datagram per receive buffer of this size, as the C engine's slots
#: (SPIALLOC_RECV_SLOT): a longer datagram arrives truncated (MSG_TRUNC) and is
#: skipped whole, so its request ends LOST, the safe reading.
RECV_SLOT = 1024
#: The C engine keeps the ext-ack text in a 256-byte buffer (NUL included).
_ERRMSG_LEN = 256

_HDR = w.NLMSGHDR
_BE32 = w.BE32
_I32 = w.I32
_NLATTR = w.NLATTR
_SEQ = struct.Struct("=I")
_RANGE = struct.Struct("=II")
_INT_MIN = -(2**31)
_NLA_TYPE_MASK = 0x3FFF
_ALLOCSPI_MIN_LEN = w.NLMSGHDR_LEN + w.XFRM_USERSPI_INFO_LEN
_DELSA_MIN_LEN = w.NLMSGHDR_LEN + w.XFRM_USERSA_ID_LEN


def _invalid(what: str, code: int = errno.EINVAL) -> ValueError:
    # The same text as _cbatch._check_init.
    return ValueError(f"{what}: {os.strerror(code)} (errno {code}): bad template or buffer sizes")


def _u32_array(name: str, values: array.array[int], count: int) -> array.array[int]:
    # The same checks as _cbatch._u32_array.
    if values.itemsize != 4 or values.typecode not in "IL":
        raise TypeError(f"{name} must be array.array('I'), got typecode {values.typecode!r}")
    if len(values) < count:
        raise ValueError(f"{name} has {len(values)} entries, need {count}")
    return values


def _error_text(buf: Any, p: int, plen: int, flags: int) -> str | None:
    """The NLMSGERR_ATTR_MSG text of an NLMSG_ERROR whose payload is
    ``buf[p:p + plen]`` (plen >= sizeof(struct nlmsgerr)), as csrc save_text
    reads it: first MSG attribute only, at most 255 bytes, up to its NUL;
    a malformed attribute ends the walk without text."""
    if not flags & w.NLM_F_ACK_TLVS:
        return None
    if flags & w.NLM_F_CAPPED:
        off = w.NLMSGERR_LEN
    else:
        off = 4 + _HDR.unpack_from(buf, p + 4)[0]
    off = w.align4(off)
    while plen >= w.NLATTR_LEN and off <= plen - w.NLATTR_LEN:
        nla_len, nla_type = _NLATTR.unpack_from(buf, p + off)
        if nla_len < w.NLATTR_LEN or nla_len > plen - off:
            return None
        if nla_type & _NLA_TYPE_MASK != w.NLMSGERR_ATTR_MSG:
            off += w.align4(nla_len)
            continue
        n = min(nla_len - w.NLATTR_LEN, _ERRMSG_LEN - 1)
        raw = bytes(buf[p + off + w.NLATTR_LEN : p + off + w.NLATTR_LEN + n])
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace") or None
    return None


def _feed(
    buf: Any,
    n: int,
    portid: int,
    seq0: int,
    sent: int,
    acks: bool,
    spis: list[int],
    errs: list[int],
    text: list[str | None],
) -> int:
    """Process one datagram from the kernel (``buf[:n]``); returns how many
    pending requests it settled.  ``acks``: a DELSA batch (success is an ack,
    NEWSA is a stray); otherwise ALLOCSPI (success is NEWSA, an ack a stray)."""
    done = 0
    off = 0
    while n - off >= w.NLMSGHDR_LEN:
        length, kind, flags, seq, pid = _HDR.unpack_from(buf, off)
        if length < w.NLMSGHDR_LEN or length > n - off:
            break  # malformed: the rest of the datagram cannot be trusted
        idx = (seq - seq0) & 0xFFFFFFFF
        if pid == portid and idx < sent and errs[idx] == PENDING:
            p = off + w.NLMSGHDR_LEN
            plen = length - w.NLMSGHDR_LEN
            if kind == w.XFRM_MSG_NEWSA and not acks:
                if plen >= w.XFRM_USERSA_INFO_LEN:
                    spis[idx] = _BE32.unpack_from(buf, p + w.SA_ID_SPI)[0]
                    errs[idx] = 0
                    done += 1
            elif kind == w.NLMSG_ERROR and plen >= w.NLMSGERR_LEN:
                err = _I32.unpack_from(buf, p)[0]
                # A positive code or INT_MIN is no errno (malformed); an ack
                # answers a DELSA, for ALLOCSPI it is a stray.
                if err <= 0 and err != _INT_MIN and (err or acks):
                    if err and text[0] is None:
                        text[0] = _error_text(buf, p, plen, flags)
                    errs[idx] = -err
                    done += 1
        off += w.align4(length)
    return done


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
    view = memoryview(buf)[:RECV_SLOT]
    while missing:
        try:
            n, _, flags, addr = sock.recvmsg_into([view], 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                overruns += 1
                continue
            raise
        if flags & socket.MSG_TRUNC:
            continue  # did not fit a slot: skipped whole, as in C
        if addr is None or addr[0] != 0:
            continue  # not from the kernel
        missing -= _feed(buf, n, portid, seq0, sent, acks, spis, errs, text)
    return missing, overruns


def _settle(
    sock: socket.socket,
    portid: int,
    seq0: int,
    sent: int,
    acks: bool,
    spis: list[int],
    errs: list[int],
    buf: bytearray,
    text: list[str | None],
) -> None:
    """After an exception: collect what the kernel queued for the requests
    sent, mark the rest LOST (even if reading fails), as spialloc_batch_drain."""
    missing = sum(1 for i in range(sent) if errs[i] == PENDING)
    try:
        _drain(sock, portid, seq0, sent, acks, spis, errs, buf, missing, text)
    except OSError:
        pass
    finally:
        for i in range(sent):
            if errs[i] == PENDING:
                errs[i] = LOST


class BatchArgs(NamedTuple):
    """What one engine call takes: ``n`` requests made from one ALLOCSPI
    ``template`` (no NLM_F_ACK), request i with nlmsg_seq ``seq0 + i`` (mod
    2^32) and, with ``ranges`` (two ``array("I")`` of at least ``n``
    entries), SPI range ``ranges[0][i]..ranges[1][i]``; at most ``chunk``
    requests per sendmsg; ``check_interrupt`` runs after every chunk."""

    sock: socket.socket
    portid: int
    template: bytes
    n: int
    seq0: int
    ranges: tuple[array.array[int], array.array[int]] | None
    chunk: int
    check_interrupt: Callable[[], None]
    #: Where the engine puts its (spis, errs) as soon as they exist (filled
    #: in place as replies come): a caller interrupted after the engine
    #: returned, before it got the result, still finds what was allocated.
    box: list[Any] | None = None


#: (spis, errs, first error text, overruns): the C engine's arrays as they are
#: (array('I'), array('i')), the Python engine's lists.
Result = Tuple[MutableSequence[int], MutableSequence[int], Optional[str], int]
AllocOnce = Callable[[BatchArgs], Result]


def restart_interrupted(once: AllocOnce, args: BatchArgs) -> Result:
    """Run ``once`` (one engine's whole batch), then send the requests the
    kernel answered with ERESTARTSYS again, round after round while rounds
    settle some of them, and at most MAX_RESTARTS rounds in a row that settle
    none; both engines use this, so they re-send alike.  A round reuses the
    sequence numbers from ``seq0`` on: every reply of the previous round was
    read or dropped inside its sendmsg, none can arrive late."""
    spis, errs, text, overruns = once(args)
    if errs.count(0) == len(errs):
        return spis, errs, text, overruns  # the common case: nothing to restart
    try:
        ranges = args.ranges
        again = [i for i, e in enumerate(errs) if e == ERESTARTSYS]
        stalled = 0
        while again and stalled < MAX_RESTARTS:
            sub = None
            if ranges is not None:
                sub = (array.array("I", [ranges[0][i] for i in again]), array.array("I", [ranges[1][i] for i in again]))
            subbox: list[Any] = [None]
            try:
                s2, e2, t2, o2 = once(args._replace(n=len(again), ranges=sub, box=subbox))
            except BaseException as exc:
                # Raised inside the engine: its partial; on the way back: its box.
                partial = getattr(exc, "spialloc_partial", None) or subbox[0]
                if partial is not None:
                    for j, i in enumerate(again):
                        if partial[1][j] != PENDING:  # PENDING: not re-sent, ERESTARTSYS stands
                            spis[i], errs[i] = partial[0][j], partial[1][j]
                    exc.spialloc_partial = (spis, errs)  # type: ignore[attr-defined]
                raise
            for j, i in enumerate(again):
                spis[i], errs[i] = s2[j], e2[j]
            overruns += o2
            if text is None:
                text = t2
            left = [i for i in again if errs[i] == ERESTARTSYS]
            stalled = stalled + 1 if len(left) == len(again) else 0
            again = left
    except BaseException as exc:
        # Interrupted between engine calls: the caller must still learn
        # what the kernel allocated, to release it.
        if not hasattr(exc, "spialloc_partial"):
            exc.spialloc_partial = (spis, errs)  # type: ignore[attr-defined]
        raise
    return spis, errs, text, overruns


def engine_entry(once: AllocOnce) -> Callable[..., Result]:
    """An engine's public ``alloc_batch``, the same for both engines."""

    def alloc_batch(
        sock: socket.socket,
        portid: int,
        template: bytes,
        count: int,
        seq0: int,
        ranges: tuple[array.array[int], array.array[int]] | None,
        chunk: int,
        check_interrupt: Callable[[], None],
        box: list[Any] | None = None,
    ) -> Result:
        """Allocate ``count`` SPIs (see ``BatchArgs``); returns (spis, errs,
        first error text, overruns), spis and errs as sequences of int.

        ``errs[i]`` is 0 (``spis[i]`` is valid, host order), a positive
        errno, or LOST.  If anything raises between chunks
        (``check_interrupt``, KeyboardInterrupt, a socket error), the
        requests sent are settled first and the exception carries
        ``spialloc_partial = (spis, errs)`` so the caller can release them;
        there ``errs[i] == PENDING`` means request i was never sent.
        Requests answered with ERESTARTSYS are sent again
        (``restart_interrupted``).  ``box`` (a one-item list): see
        ``BatchArgs.box``."""
        return restart_interrupted(
            once, BatchArgs(sock, portid, template, count, seq0, ranges, chunk, check_interrupt, box)
        )

    return alloc_batch


def _alloc_once(args: BatchArgs) -> Result:
    sock, portid, template, count, seq0, ranges, chunk, check_interrupt, box = args
    if count <= 0:
        return [], [], None, 0
    mins = maxs = None
    if ranges is not None:  # checked before the template, as _cbatch does
        mins = _u32_array("ranges[0]", ranges[0], count)
        maxs = _u32_array("ranges[1]", ranges[1], count)
    tlen = len(template)
    if tlen < _ALLOCSPI_MIN_LEN:
        raise _invalid("alloc_batch")
    length, kind, nlflags, _, _ = _HDR.unpack_from(template, 0)
    if length != tlen or kind != w.XFRM_MSG_ALLOCSPI or not nlflags & w.NLM_F_REQUEST or nlflags & w.NLM_F_ACK:
        raise _invalid("alloc_batch")
    seq0 &= 0xFFFFFFFF
    spis = [0] * count
    errs = [PENDING] * count
    if box is not None:
        box[0] = (spis, errs)
    text: list[str | None] = [None]
    overruns = 0
    stride = w.align4(tlen)
    chunk = max(1, min(chunk, count))
    out = bytearray(stride * chunk)
    for i in range(chunk):
        out[i * stride : i * stride + tlen] = template
    buf = bytearray(RECV_SLOT)
    sent = 0
    # Requests that may be in the kernel: those sent, plus a chunk whose send
    # an exception (KeyboardInterrupt right after the syscall) cut short.
    reach = 0
    try:
        while sent < count:
            n = min(chunk, count - sent)
            for i in range(n):
                base = i * stride
                _SEQ.pack_into(out, base + w.MSG_SEQ, (seq0 + sent + i) & 0xFFFFFFFF)
                if mins is not None and maxs is not None:
                    _RANGE.pack_into(out, base + w.MSG_SPI_MIN, mins[sent + i], maxs[sent + i])
            reach = sent + n
            try:
                _send(sock, memoryview(out)[: n * stride])
            except OSError as exc:
                reach = sent  # a failed netlink send sent nothing
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
        _settle(sock, portid, seq0, max(sent, reach), False, spis, errs, buf, text)
        exc.spialloc_partial = (spis, errs)  # type: ignore[attr-defined]
        raise
    return spis, errs, text[0], overruns


alloc_batch = engine_entry(_alloc_once)


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
    asking for an ack); returns errno per message (0 ok, ESRCH gone, LOST).
    On an exception the list so far is attached as ``exc.spialloc_partial``."""
    if count <= 0:
        return []
    if stride % 4 or stride < _DELSA_MIN_LEN:
        raise _invalid("delsa_batch")
    if count * stride > len(messages):
        raise _invalid("delsa_batch", errno.EMSGSIZE)
    seq0 &= 0xFFFFFFFF
    # Only nlmsg_len (aligned, zero padded) of each slot goes on the wire:
    # padding between messages would read as a zero-length header.
    parts = []
    for i in range(count):
        length, kind, nlflags, _, _ = _HDR.unpack_from(messages, i * stride)
        want = w.NLM_F_REQUEST | w.NLM_F_ACK
        if length < _DELSA_MIN_LEN or length > stride or kind != w.XFRM_MSG_DELSA or nlflags & want != want:
            raise _invalid("delsa_batch")
        msg = bytearray(w.align4(length))
        msg[:length] = messages[i * stride : i * stride + length]
        _SEQ.pack_into(msg, w.MSG_SEQ, (seq0 + i) & 0xFFFFFFFF)
        parts.append(bytes(msg))
    errs = [PENDING] * count
    spis = [0] * count
    text: list[str | None] = [None]
    buf = bytearray(RECV_SLOT)
    sent = reach = 0
    chunk = max(1, min(chunk, count))
    try:
        while sent < count:
            n = min(chunk, count - sent)
            reach = sent + n
            try:
                _send(sock, memoryview(b"".join(parts[sent : sent + n])))
            except OSError as exc:
                reach = sent
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
    except BaseException as exc:
        _settle(sock, portid, seq0, max(sent, reach), True, spis, errs, buf, text)
        exc.spialloc_partial = errs  # type: ignore[attr-defined]
        raise
    return errs
