"""A NETLINK_XFRM socket: sequence numbers, extended acks, reply matching.

Hand-written rather than pyroute2's IPRoute machinery because ALLOCSPI is the
per-SPI hot path: pyroute2's generic message classes cost ~70 us to encode and
~16 us to decode one message (KERNEL.md), more than the kernel's own work.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import math
import select
import socket
import struct
import threading
from typing import Any, NoReturn

from . import _wire as w
from ._netns import Namespace
from .errors import (
    ClosedError,
    DecodeError,
    InsufficientPrivilege,
    NetlinkError,
    SpiallocError,
    from_errno,
    note_stray,
)

RECV_BUF = 1 << 16
#: Receive buffer asked for with SO_RCVBUFFORCE: room for ~5,000 queued replies
#: (each costs ~840 bytes of truesize), so batches can keep large windows.
DEFAULT_RCVBUF = 4 << 20
DEFAULT_SNDBUF = 1 << 20
#: Bytes of receive buffer a reply occupies before one was measured on the
#: socket (``transact(measure=True)``): an ALLOCSPI reply without attributes
#: costs 832 on 6.18, one with a mark 1,280 (the skb head moves up a slab).
REPLY_TRUESIZE = 1024
SO_MEMINFO = 55  # socket.h; SK_MEMINFO_RMEM_ALLOC is its first u32
SO_ATTACH_FILTER = 26


def wait_readable(fd: int, timeout: float | None) -> bool:
    """Wait until ``fd`` is readable (True) or ``timeout`` seconds pass.
    poll(), not select(): a daemon's sockets may well have fd numbers above
    1023.  ValueError if ``fd`` is closed (-1)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(None if timeout is None else max(0, math.ceil(timeout * 1000))))


class XfrmSocket:
    """One NETLINK_XFRM socket.  Not thread-safe by itself: callers hold ``lock``."""

    def __init__(self, ns: Namespace, *, groups: int = 0, rcvbuf: int | None = DEFAULT_RCVBUF) -> None:
        self.ns = ns
        self.sock = ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, w.NETLINK_XFRM)
        try:
            self.sock.setsockopt(w.SOL_NETLINK, w.NETLINK_EXT_ACK, 1)
            self.sock.setsockopt(w.SOL_NETLINK, w.NETLINK_CAP_ACK, 1)
            if rcvbuf:
                self._force_buf(socket.SO_RCVBUF, 33, rcvbuf)  # 33 = SO_RCVBUFFORCE
                self._force_buf(socket.SO_SNDBUF, 32, DEFAULT_SNDBUF)  # 32 = SO_SNDBUFFORCE
            try:
                self.sock.bind((0, groups))
            except PermissionError:
                # Joining XFRM multicast groups needs CAP_NET_ADMIN, like ALLOCSPI.
                raise InsufficientPrivilege(errno.EPERM, None, "bind to XFRM events") from None
            self.portid: int = self.sock.getsockname()[0]
            # Connected to the kernel, the socket takes unicast from no one
            # else (the kernel answers other senders ECONNREFUSED): the C
            # engine relies on it and reads no sender address (csrc/spialloc.h).
            # Multicast (groups) is not affected; its readers still check.
            self.sock.connect((0, 0))
        except BaseException:
            self.sock.close()
            raise
        self.lock = threading.RLock()
        self._seq = itertools.count(1)
        self._buf = bytearray(RECV_BUF)
        self._view = memoryview(self._buf)
        self.overruns = 0
        self._rcvbuf_seen: int | None = None
        #: A dump whose end has not been read (see ``dump``).
        self._dump_seq: int | None = None

    def _force_buf(self, plain: int, forced: int, size: int) -> None:
        # FORCE needs CAP_NET_ADMIN in the netns' user namespace, which ALLOCSPI
        # needs anyway; without it the plain option is capped by net.core.rmem_max.
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, forced, size)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, plain, size)

    @property
    def rcvbuf(self) -> int:
        return int(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    @property
    def sndbuf(self) -> int:
        return int(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))

    def window(self, truesize: int = REPLY_TRUESIZE) -> int:
        """How many replies of ``truesize`` bytes fit in the receive buffer:
        the most requests we may have in flight without the kernel dropping
        a reply (ENOBUFS).  The buffer's size is read once, not per batch
        (a getsockopt each time was a measurable part of a batch's own
        cost): only setsockopt changes it, and on this private socket only
        a test does, which an overrun then shows (``forget_size``)."""
        size = self._rcvbuf_seen
        if size is None:
            size = self._rcvbuf_seen = self.rcvbuf
        return max(1, min(4096, size // max(1, truesize)))

    def forget_size(self) -> None:
        """Read the receive buffer's size again at the next ``window``."""
        self._rcvbuf_seen = None

    def queued(self) -> int:
        """Bytes of receive buffer the queued datagrams occupy (their truesize)."""
        return int(struct.unpack_from("I", self.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 36))[0])

    def fileno(self) -> int:
        return self.sock.fileno()

    def next_seq(self, count: int = 1) -> int:
        """Reserve ``count`` consecutive sequence numbers; returns the first."""
        first = next(self._seq) & 0xFFFFFFFF
        if count > 1:
            # itertools.count is atomic under the GIL; skip ahead for a batch.
            self._seq = itertools.count(first + count)
        return first

    def attach_filter(self, program: bytes) -> None:
        """SO_ATTACH_FILTER: the kernel runs ``program`` (classic BPF, see
        ``_wire.filter_own_events``) on every message before queueing it.
        struct sock_fprog holds a pointer, hence ctypes for the buffer."""
        buf = ctypes.create_string_buffer(program, len(program))
        fprog = struct.pack("@HP", len(program) // w.SOCK_FILTER.size, ctypes.addressof(buf))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)

    def close(self) -> None:
        self.sock.close()

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0

    # --- I/O -----------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.sock.send(data)
        except OSError as exc:
            self._send_failed(exc.errno)

    def _send_failed(self, code: int | None) -> NoReturn:
        if self.closed or code == errno.EBADF:
            raise ClosedError(errno.EBADF, "netlink socket is closed") from None
        raise NetlinkError(code or errno.EIO, None, "sendmsg") from None

    def recv_nowait(self) -> memoryview | None:
        """One datagram already queued, or None.  ENOBUFS is counted and skipped:
        the kernel reports it once, in place of the replies it dropped."""
        while True:
            try:
                n, addr = self.sock.recvfrom_into(self._buf, RECV_BUF, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                if self.closed or exc.errno == errno.EBADF:
                    raise ClosedError(errno.EBADF, "netlink socket is closed") from None
                raise NetlinkError(exc.errno or errno.EIO, None, "recvmsg") from None
            if addr[0] != 0:
                continue  # not from the kernel: ignore spoofed unicast
            return self._view[:n]

    def recv_wait(self, timeout: float | None) -> memoryview | None:
        """Block (up to timeout) for one datagram: used for multicast events and dumps."""
        while True:
            got = self.recv_nowait()
            if got is not None:
                return got
            try:
                ready = wait_readable(self.sock.fileno(), timeout)
            except ValueError:
                raise ClosedError(errno.EBADF, "netlink socket is closed") from None
            if not ready:
                return None

    def allocspi(self, msg: bytearray, box: list[Any]) -> int:
        """Send one ALLOCSPI (its sequence number is set here) and return the
        SPI from its NEWSA reply, also put in ``box[0]`` (see ``_salvage``).

        The per-SPI hot path: reads the SPI straight out of the receive
        buffer when the first datagram is our reply, as it nearly always is;
        anything else goes through ``transact``'s general loop."""
        with self.lock:
            seq = next(self._seq) & 0xFFFFFFFF
            w.U32.pack_into(msg, w.MSG_SEQ, seq)
            try:
                self.send(msg)
                try:
                    n, addr = self.sock.recvfrom_into(self._buf, RECV_BUF, socket.MSG_DONTWAIT)
                except OSError:
                    n, addr = -1, (None,)
                if n >= w.NLMSGHDR_LEN + w.XFRM_USERSA_INFO_LEN and addr[0] == 0:
                    length, kind, _, rseq, pid = w.NLMSGHDR.unpack_from(self._buf, 0)
                    if kind == w.XFRM_MSG_NEWSA and rseq == seq and pid == self.portid and length == n:
                        spi = box[0] = int(w.BE32.unpack_from(self._buf, w.MSG_REPLY_SPI)[0])
                        return spi
                return self._alloc_rest(seq, self._view[:n] if n >= 0 and addr[0] == 0 else None, box)
            except BaseException as exc:
                if not isinstance(exc, SpiallocError):
                    self._salvage(seq, box)
                raise

    def allocspi_native(self, one: tuple[Any, ...], template: bytes, spi_min: int, spi_max: int, box: list[Any]) -> int:
        """``allocspi`` in one C call (``_cbatch.native_single``): the
        template is copied, numbered and given its range in C, and the
        reply read into this socket's buffer; anything but our NEWSA is
        handed to ``_reply`` as ``allocspi`` does."""
        call, o, _, c_errno, failed = one
        with self.lock:
            seq = next(self._seq) & 0xFFFFFFFF
            try:
                rc = call(o, self.sock.fileno(), template, len(template), seq, spi_min, spi_max)
                if rc >= 0:
                    box[0] = rc
                    return rc  # type: ignore[no-any-return]  # the SPI
                if rc == failed:
                    self._send_failed(c_errno())
                got = o.got
                if got == -errno.ENOBUFS:
                    self.overruns += 1  # as recv_nowait counts it: the kernel reports it once
                return self._alloc_rest(seq, self._view[:got] if got >= 0 else None, box)
            except BaseException as exc:
                if not isinstance(exc, SpiallocError):
                    self._salvage(seq, box)
                raise

    def _alloc_rest(self, seq: int, first: memoryview | None, box: list[Any]) -> int:
        """An ALLOCSPI's reply the general way (``first``: a datagram read
        already): its SPI, also put in ``box[0]``, or the typed refusal."""
        kind, payload = self._reply(seq, "allocspi", first)
        spi = box[0] = _alloc_reply(kind, payload)
        return spi

    def _salvage(self, seq: int, box: list[Any]) -> None:
        """An exception that is not the kernel's answer (a signal handler's:
        Python raises it when a call returns, e.g. the send or the C call
        that made the state) is leaving an ALLOCSPI before its SPI was put
        in ``box``.  Find our reply, in the buffer (read already) or still
        queued, and put its SPI there, or ``STRAY`` for a refusal that left
        the request's SPI-less state: the caller's clean-up then deletes
        what nobody will be given.  Holding the lock: nobody else has read
        the socket since."""
        length, _, _, rseq, pid = w.NLMSGHDR.unpack_from(self._buf, 0)
        ours = rseq == seq and pid == self.portid and w.NLMSGHDR_LEN <= length <= RECV_BUF
        try:
            self._alloc_rest(seq, self._view[:length] if ours else None, box)
        except NetlinkError as exc:
            note_stray(box, exc)
        except (SpiallocError, OSError):
            pass  # the reply is gone, or the socket: nothing to name

    def transact(self, msg: bytes | bytearray, seq: int, operation: str) -> tuple[int, memoryview | None]:
        """Send one request and return (type, payload) of its reply.

        The kernel handles a request inside sendmsg, so its reply is queued
        before send returns: a missing reply was dropped (ENOBUFS), never late.
        Errors become typed exceptions; a bare ack returns (NLMSG_ERROR, None).
        """
        with self.lock:
            self.send(msg)
            return self._reply(seq, operation, None)

    def transact_measured(self, msg: bytes | bytearray, seq: int, operation: str) -> tuple[int, memoryview | None, int]:
        """``transact``, plus the bytes of receive buffer its reply took.

        Measured, not computed: the truesize depends on the kernel's slab
        sizes and skb layout, which differ between versions and configs."""
        with self.lock:
            before = self.queued()
            self.send(msg)
            size = self.queued() - before
            kind, payload = self._reply(seq, operation, None)
        return kind, payload, size

    def _reply(self, seq: int, operation: str, first: memoryview | None) -> tuple[int, memoryview | None]:
        """Read until the reply to ``seq``; ``first`` is a datagram already read."""
        while True:
            data, first = (first, None) if first is not None else (self.recv_nowait(), None)
            if data is None:
                raise NetlinkError(errno.ENOBUFS, "reply dropped: receive buffer full", operation)
            for kind, flags, rseq, pid, payload in w.iter_messages(data):
                if rseq != seq or pid != self.portid:
                    continue  # stale reply of an abandoned request
                if kind == w.NLMSG_ERROR:
                    code, text, _ = w.decode_error(payload, flags)
                    if code:
                        raise from_errno(code, text, operation)
                    return kind, None
                return kind, memoryview(bytes(payload))

    def dump_sas(self, to: tuple[int, bytes, int] | None = None) -> list[w.SaInfo]:
        """Every state in the namespace (GETSA dump), larval ones included;
        with ``to`` = (family, daddr, proto), those of one destination and
        protocol (filtered by the kernel: a daemon's SAD can be large)."""
        with self.lock:
            seq = self.next_seq()
            entries = self.dump(w.getsa_dump(seq, to), seq, "getsa dump")
        return [w.decode_sa(memoryview(p)) for k, p in entries if k == w.XFRM_MSG_NEWSA]

    def dump(self, msg: bytes, seq: int, operation: str) -> list[tuple[int, bytes]]:
        """Run a dump request: (type, payload) of each entry.

        The kernel keeps a dump running until its last part is read, and
        refuses the socket another (EBUSY) meanwhile: a dump an exception
        left unread (a signal handler's) is read to its end first."""
        with self.lock:
            if self._dump_seq is not None:
                self._finish_dump(self._dump_seq)
            self._dump_seq = seq  # before the send: an interrupt may land as it returns
            self.send(msg)
            entries: list[tuple[int, bytes]] = []
            # ``while True``, not ``while not done``: CPython 3.13 compiles a
            # conditional loop's back edge outside the enclosing ``with``
            # (gh-130279), where a signal handler's exception skips the
            # lock's release (tests/unit/test_bytecode.py).
            while True:
                data = self.recv_wait(5.0)
                if data is None:
                    raise NetlinkError(errno.ETIMEDOUT, "dump did not finish", operation)
                if self._dump_part(data, seq, operation, entries):
                    return entries

    def _dump_part(self, data: memoryview, seq: int, operation: str, entries: list[tuple[int, bytes]]) -> bool:
        """Add one datagram's entries of dump ``seq``; True once it is over."""
        for kind, flags, rseq, pid, payload in w.iter_messages(data):
            if rseq != seq or pid != self.portid:
                continue
            if kind == w.NLMSG_DONE:
                self._dump_seq = None
                return True
            if kind == w.NLMSG_ERROR:
                code, text, _ = w.decode_error(payload, flags)
                if code:
                    self._dump_seq = None  # refused, or ended by the error
                    raise from_errno(code, text, operation)
                continue
            entries.append((kind, bytes(payload)))
        return False

    def _finish_dump(self, seq: int) -> None:
        """Read what is left of dump ``seq``, dropping it.  Each read makes
        the kernel queue the next part before it returns, so an empty queue
        means the dump is over: no waiting."""
        while True:
            data = self.recv_nowait()
            if data is None:
                self._dump_seq = None
                return
            try:
                if self._dump_part(data, seq, "getsa dump", []):
                    return
            except NetlinkError:
                return  # the old dump's error: it is over, and nobody asked


def _alloc_reply(kind: int, payload: memoryview | None) -> int:
    """The SPI of an ALLOCSPI's reply read the general way (``_reply``)."""
    if kind != w.XFRM_MSG_NEWSA or payload is None:
        raise NetlinkError(errno.EPROTO, f"unexpected reply type {kind} to ALLOCSPI", "allocspi")
    return w.decode_alloc_reply(payload)


__all__ = ["XfrmSocket", "DecodeError"]
