"""AsyncAllocator: the asyncio face of Allocator.

Single allocations go over a non-blocking netlink socket registered with the
running loop: each request is sent with its own sequence number and its
future is resolved by the loop's reader callback, so many ``allocate``
coroutines can be in flight at once.  The guarded retry rules are the very
same generator ``Allocator`` runs (``_guarded_plan``), driven here with awaits.

Cancellation never orphans a larval state: the kernel handles a request inside
sendmsg, so once sent its state exists; if the caller is cancelled before the
reply is consumed, the reader deletes the state when the reply shows up (or at
once, if it was already read).
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any, Iterable

from . import _wire as w
from ._model import Address, KernelState, MarkSpec, Proto, Request, Reservation, reservation_from
from ._netlink import DEFAULT_RCVBUF, XfrmSocket
from ._netns import NetnsSpec
from .allocator import (
    Allocator,
    AllocatorStats,
    AllocOp,
    BatchResult,
    ClaimOp,
    DeleteOp,
    Plan,
    SyncOp,
    _check_hold,
)
from .errors import BatchError, ClosedError, NetlinkError, SpiallocError, from_errno


class AsyncAllocator:
    """Same operations as ``Allocator``, as coroutines.  Takes the same
    keyword arguments (guard, scope, backend, ranges, partition, on_lost ...).

    >>> async with AsyncAllocator() as alloc:
    ...     r = await alloc.allocate("192.0.2.1")
    """

    def __init__(self, netns: NetnsSpec = None, **options: Any) -> None:
        self._sync = Allocator(netns, **options)
        try:
            self._sock = XfrmSocket(self._sync.ns, rcvbuf=options.get("rcvbuf", DEFAULT_RCVBUF))
            self._sock.sock.setblocking(False)
        except BaseException:
            self._sync.close()
            raise
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._window = asyncio.Semaphore(1)  # replaced per loop in _attach
        self._closed = False

    # --- plumbing ----------------------------------------------------------------

    @property
    def guard(self):  # type: ignore[no-untyped-def]
        return self._sync.guard

    @property
    def stats(self) -> AllocatorStats:
        return self._sync.stats

    @property
    def backend(self) -> str:
        return self._sync.backend

    @property
    def sync_allocator(self) -> Allocator:
        """The blocking Allocator underneath (same guard, namespace, stats)."""
        return self._sync

    def _attach(self) -> None:
        if self._closed:
            raise ClosedError(errno.EBADF, "allocator is closed")
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._loop = loop
        self._window = asyncio.Semaphore(self._sock.window())
        loop.add_reader(self._sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        while True:
            try:
                data = self._sock.recv_nowait()
            except SpiallocError as exc:
                for waiting in self._pending.values():
                    if not waiting.done():
                        waiting.set_exception(exc)
                self._pending.clear()
                return
            if data is None:
                if self._sock.overruns:
                    self._sock.overruns = 0
                    self._fail_unanswered()
                return
            for kind, flags, seq, pid, payload in w.iter_messages(data):
                if pid != self._sock.portid:
                    continue
                fut: asyncio.Future[int] | None = self._pending.pop(seq, None)
                if kind == w.XFRM_MSG_NEWSA:
                    spi = w.decode_alloc_reply(payload)
                    if fut is None or fut.done():
                        # Its caller was cancelled: the state must not outlive it.
                        self._delete_state(bytes(payload[w.SA_ID_DADDR : w.SA_ID_DADDR + 16]), spi, payload)
                    else:
                        fut.set_result(spi)
                elif kind == w.NLMSG_ERROR and fut is not None and not fut.done():
                    code, text, _ = w.decode_error(payload, flags)
                    fut.set_exception(from_errno(code or errno.EPROTO, text, "allocspi"))

    def _fail_unanswered(self) -> None:
        """ENOBUFS: some replies were dropped.  The kernel answers inside
        sendmsg, so every future still pending now will never be answered."""
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(NetlinkError(errno.ENOBUFS, "reply dropped: receive buffer full", "allocspi"))
        self._pending.clear()

    def _delete_state(self, daddr: bytes, spi: int, payload: memoryview) -> None:
        sa = w.decode_sa(payload)
        try:
            self._sync._delete(daddr, spi, sa.family, sa.proto, sa.mark)
        except SpiallocError:
            pass

    async def _alloc_one(self, req: Request, lo: int, hi: int) -> int:
        self._attach()
        assert self._loop is not None
        async with self._window:  # never more replies in flight than the buffer holds
            return await self._alloc_one_now(req, lo, hi)

    async def _alloc_one_now(self, req: Request, lo: int, hi: int) -> int:
        assert self._loop is not None
        msg = bytearray(req.template)
        w.patch_range(msg, 0, lo, hi)
        seq = self._sock.next_seq()
        w.patch_seq(msg, 0, seq)
        fut: asyncio.Future[int] = self._loop.create_future()
        self._pending[seq] = fut
        try:
            self._sock.send(msg)
        except BaseException:
            self._pending.pop(seq, None)
            raise
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.cancelled():
                # The kernel answered inside sendmsg: the reply is queued now.
                # Read it at once so the reader deletes the state (closing
                # before the loop runs the reader again would orphan it).
                self._on_readable()
            elif fut.exception() is None:
                # The reply arrived but our caller was cancelled: undo it.
                self._sync._delete(req.daddr, fut.result(), req.family, req.proto, req.mark)
            raise

    async def _drive(self, plan: Plan) -> Reservation:
        value: object = None
        error: BaseException | None = None
        while True:
            try:
                op = plan.send(value) if error is None else plan.throw(error)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            value, error = None, None
            try:
                if isinstance(op, AllocOp):
                    value = await self._alloc_one(op.req, op.lo, op.hi)
                elif isinstance(op, DeleteOp):
                    value = self._sync._delete(op.daddr, op.spi, op.family, op.proto, op.mark)
                elif isinstance(op, SyncOp):
                    value = self._sync.sync()
                elif isinstance(op, ClaimOp):
                    self._sync._claim_stray(op.req)
                else:
                    value = self._sync.poll_events()
            except BaseException as exc:
                error = exc

    # --- API -----------------------------------------------------------------------

    async def allocate(
        self,
        dst: Address,
        proto: str | int | Proto = "esp",
        *,
        src: Address | None = None,
        spi_range: tuple[int, int] | None = None,
        mode: str | int = "transport",
        reqid: int = 0,
        mark: MarkSpec = None,
        if_id: int | None = None,
        direction: str | int | None = None,
        seq: int = 0,
        pcpu: int | None = None,
        hold: float | None = None,
    ) -> Reservation:
        """``Allocator.allocate`` as a coroutine."""
        sync = self._sync
        sync._check_open()
        if hold is not None:
            _check_hold(hold, sync._events is not None)
        req = sync._request(dst, proto, src, spi_range, mode, reqid, mark, if_id, direction, seq, pcpu)
        if sync.guard is None:
            spi = await self._alloc_one(req, req.spi_min, req.spi_max)
            sync._stats.allocated += 1
            return reservation_from(req, spi)
        return sync._book(req, await self._drive(sync._guarded_plan(req)), hold)

    async def allocate_many(
        self, count: int, dst: Address, proto: str | int | Proto = "esp", *, strict: bool = True, **options: Any
    ) -> list[Reservation] | BatchResult:
        """``Allocator.allocate_many`` in chunks of what the receive buffer
        holds, yielding to the loop between chunks.  All or nothing across the
        whole batch when ``strict``; cancellation releases what was allocated."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            from .errors import InvalidRequest

            raise InvalidRequest(f"count={count!r} must be a non-negative integer")
        # Each chunk runs without yielding: keep it short enough for the loop.
        chunk = max(1, min(1024, self._sync._sock.window()))
        done: list[Reservation] = []
        errors: dict[int, SpiallocError] = {}
        try:
            while len(done) + len(errors) < count:
                n = min(chunk, count - len(done) - len(errors))
                base = len(done) + len(errors)
                part = self._sync.allocate_many(n, dst, proto, strict=False, **options)
                assert isinstance(part, BatchResult)
                done.extend(part.reservations)
                errors.update({base + i: e for i, e in part.errors.items()})
                if errors and strict:
                    break
                await asyncio.sleep(0)
        except BaseException:
            self._sync.release(done)
            raise
        if errors and strict:
            released = self._sync.release(done)
            raise BatchError(count, errors, released)
        return done if strict else BatchResult(done, errors)

    async def release(self, reservations: Reservation | Iterable[Reservation]) -> int:
        return self._sync.release(reservations)

    async def commit(self, reservation: Reservation) -> None:
        self._sync.commit(reservation)

    async def lookup(
        self, dst: Address, spi: int, proto: str | int | Proto = "esp", *, mark: MarkSpec = None
    ) -> KernelState | None:
        return self._sync.lookup(dst, spi, proto, mark=mark)

    async def states(self, **filters: Any) -> list[KernelState]:
        return self._sync.states(**filters)

    async def sync(self) -> int:
        return self._sync.sync()

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ClosedError(errno.EBADF, "allocator closed"))
        # Their replies are queued already: read them, so that the reader
        # deletes the states nobody will get a Reservation for.
        self._on_readable()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._pending.clear()
        self._sock.close()
        self._sync.close()

    async def __aenter__(self) -> AsyncAllocator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close_now()
