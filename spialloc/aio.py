"""AsyncAllocator: the asyncio face of an allocator.

Single allocations go over a non-blocking netlink socket registered with the
running loop: each request is sent with its own sequence number and its
future is resolved by the loop's reader callback, so many ``allocate``
coroutines can be in flight at once.  The guarded retry rules are the very
generators the blocking face runs (``_rules.single_plan``); here the
ALLOCSPIs are awaited and every other operation (a DELSA, a poll of the
EXPIRE socket, a SAD dump) runs in a worker thread, so nothing that can wait
on the kernel's dump runs on the event loop.  Batches, release, commit,
lookup and the SAD dumps run in the worker thread too.

Cancellation never orphans a larval state: the kernel handles a request inside
sendmsg, so once sent its state exists; if the caller is cancelled before the
reply is consumed, the reader deletes the state when the reply shows up (or at
once, if it was already read).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import threading
import warnings
from typing import Any, Callable, Iterable, Literal, TypeVar, cast, overload

from . import _binding as binding
from . import _lifecycle
from . import _rules as rules
from . import _wire as w
from ._core import BatchResult, Core
from ._lifecycle import close_copy
from ._model import Address, KernelState, MarkSpec, Proto, Request, Reservation, Reservations, joined_batches
from ._netlink import DEFAULT_RCVBUF, XfrmSocket
from ._netns import NetnsSpec
from ._rules import AllocatorStats
from .allocator import Allocator
from .errors import BatchError, ClosedError, ForkedError, NetlinkError, SpiallocError, from_errno
from .guard import Guard
from .monitor import Acquire

T = TypeVar("T")


class AsyncAllocator:
    """Same operations as ``Allocator``, as coroutines.  Takes the same
    keyword arguments (guard, scope, backend, ranges, partition, on_lost ...).

    >>> async with AsyncAllocator() as alloc:
    ...     r = await alloc.allocate("192.0.2.1")

    Closing, garbage collection and fork() as ``Allocator``.
    """

    def __init__(self, netns: NetnsSpec = None, **options: Any) -> None:
        self._sync = Allocator(netns, **options)
        self._core: Core = self._sync.core
        self._core.what = "AsyncAllocator"
        try:
            self._sock = XfrmSocket(self._core.ns, rcvbuf=options.get("rcvbuf", DEFAULT_RCVBUF))
            self._sock.sock.setblocking(False)
        except BaseException:
            self._sync.close()
            raise
        self._replies = _Replies(self._sock, self._core)
        self._pending = self._replies.pending
        self._unclaimed = _Unclaimed()
        self._core.before_close.append(self._unclaimed.release_all)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._window = asyncio.Semaphore(1)  # replaced per loop in _attach
        self._closed = False
        self._forked_from: int | None = None  # see _after_fork
        _lifecycle.track(self)

    def _after_fork(self, parent: int) -> None:
        """In a fork child (``_lifecycle``): inert.  The loop it is attached
        to is the parent's too (the epoll instance is shared): never touch it."""
        if self._closed:
            return
        self._closed = True
        self._forked_from = parent
        close_copy(self._sock.sock)

    # --- plumbing ----------------------------------------------------------------

    @property
    def guard(self) -> Guard | None:
        """``Allocator.guard``."""
        return self._sync.guard

    @property
    def stats(self) -> AllocatorStats:
        """``Allocator.stats``."""
        return self._sync.stats

    @property
    def backend(self) -> str:
        """``Allocator.backend``."""
        return self._sync.backend

    @property
    def sync_allocator(self) -> Allocator:
        """The blocking Allocator underneath (same guard, namespace, stats)."""
        return self._sync

    def _attach(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            if self._forked_from is not None:
                raise ForkedError("AsyncAllocator", self._forked_from)
            raise ClosedError(errno.EBADF, "allocator is closed")
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return loop
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._loop = loop
        self._window = asyncio.Semaphore(self._sock.window())
        loop.add_reader(self._sock.fileno(), self._replies.on_readable)
        return loop

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call in the loop's worker threads."""
        loop = self._attach()
        return await loop.run_in_executor(None, functools.partial(fn, *args))

    async def _alloc_one(self, req: Request, lo: int, hi: int) -> int:
        self._attach()
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
                self._replies.on_readable()
            elif fut.exception() is None:
                # The reply arrived but our caller was cancelled: undo it.
                self._core.kernel.delete(req.daddr, fut.result(), req.family, req.proto, req.mark)
            raise

    async def _drive(self, plan: rules.Plan) -> Reservation:
        """``Core.drive`` with awaits: ALLOCSPIs on the loop, the rest in a thread."""
        step = rules.Stepper(plan)
        while not step.done:
            op = step.op
            result: object
            try:
                if isinstance(op, rules.AllocOp):
                    result = await self._alloc_one(op.req, op.lo, op.hi)
                else:
                    result = await self._in_thread(self._core.execute, op)
            except BaseException as exc:
                step.throw(exc)
            else:
                step.send(result)
        return step.value

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
        core = self._core
        core.check_open()
        until = core.hold_until(hold)
        req = core.request(dst, proto, src, spi_range, mode, reqid, mark, if_id, direction, seq, pcpu)
        if not req.seq:
            return await self._allocate(req, until)
        binding.check(req.seq)
        r = await self._allocate(req, until)
        binding.bound(req.seq, r, False)
        return r

    async def allocate_for(
        self,
        acquire: Acquire,
        *,
        spi_range: tuple[int, int] | None = None,
        direction: str | int | None = None,
        hold: float | None = None,
    ) -> Reservation:
        """``Allocator.allocate_for`` as a coroutine.  Cancelled before the
        kernel answered, the seq may be bound again."""
        core = self._core
        core.check_open()
        until = core.hold_until(hold)
        req = core.request_for(acquire, spi_range, direction)
        with binding.Claim(req.seq) as claim:
            return claim.done(await self._allocate(req, until))

    async def _allocate(self, req: Request, until: float | None) -> Reservation:
        core = self._core
        book = core.book
        if book.guard is None:
            return book.won(req, await self._alloc_one(req, req.spi_min, req.spi_max), 0)
        return book.note(req, await self._drive(rules.single_plan(book, req)), until)

    @overload
    async def allocate_many(
        self, count: int, dst: Address, proto: str | int | Proto = ..., *, strict: Literal[True] = ..., **options: Any
    ) -> Reservations: ...

    @overload
    async def allocate_many(
        self, count: int, dst: Address, proto: str | int | Proto = ..., *, strict: Literal[False], **options: Any
    ) -> BatchResult: ...

    async def allocate_many(
        self, count: int, dst: Address, proto: str | int | Proto = "esp", *, strict: bool = True, **options: Any
    ) -> Reservations | BatchResult:
        """``Allocator.allocate_many`` in chunks of what the receive buffer
        holds, each run in a worker thread.  All or nothing across the whole
        batch when ``strict``; cancellation releases what was allocated,
        including a chunk still running when the caller was cancelled, and
        skips what was lost meanwhile.  The successes come as one
        ``Reservations`` over the chunks' arrays, as ``Allocator``'s."""
        core = self._core
        core.check_batch_args(count, {k: v for k, v in options.items() if k not in _BATCH_OPTIONS})
        core.check_open()
        req = core.request(
            dst,
            proto,
            options.get("src"),
            options.get("spi_range"),
            options.get("mode", "transport"),
            options.get("reqid", 0),
            options.get("mark"),
            options.get("if_id"),
            options.get("direction"),
            0,
            options.get("pcpu"),
        )
        chunk = max(1, min(1024, core.kernel.sock.window()))
        loop = self._attach()
        # Each chunk's Reservations (arrays: no object per SPI), appended by
        # the chunk itself and known to close() until the caller has them:
        # nobody else would ever release them.
        parts = self._unclaimed.open()
        got = 0
        errors: dict[int, SpiallocError] = {}
        try:
            while got + len(errors) < count and not (errors and strict):
                n = min(chunk, count - got - len(errors))
                base = got + len(errors)
                part = await _chunk(loop, core, req, n, parts, self._unclaimed)
                got += len(part.reservations)
                errors.update({base + i: e for i, e in part.errors.items()})
            if errors and strict:
                await asyncio.shield(loop.run_in_executor(None, _give_up, core, self._unclaimed, parts, count, errors))
        except BaseException:
            # ClosedError here: close() began first and releases them; the
            # caller hears why the batch stopped, not that.
            with contextlib.suppress(ClosedError):
                await asyncio.shield(loop.run_in_executor(None, _give_up, core, self._unclaimed, parts))
            raise
        # No await from here on: a cancellation now would strand states nobody holds.
        mine = self._unclaimed.take(parts)
        if mine is None:  # close() released them
            raise ClosedError(errno.EBADF, "allocator closed during the batch")
        done = joined_batches(mine) if mine else core.empty_batch(req)
        core.report_from_now(done)
        return done if strict else BatchResult(done, errors)

    async def release(self, reservations: Reservation | Iterable[Reservation]) -> int:
        """``Allocator.release`` (DELSA), in a worker thread."""
        return await self._in_thread(self._sync.release, reservations)

    async def commit(self, reservation: Reservation) -> None:
        """``Allocator.commit`` (no syscall)."""
        await self._in_thread(self._sync.commit, reservation)

    async def lookup(
        self, dst: Address, spi: int, proto: str | int | Proto = "esp", *, mark: MarkSpec = None
    ) -> KernelState | None:
        """``Allocator.lookup`` (GETSA), in a worker thread."""
        return await self._in_thread(functools.partial(self._sync.lookup, mark=mark), dst, spi, proto)

    async def states(self, **filters: Any) -> list[KernelState]:
        """``Allocator.states`` (GETSA dump), in a worker thread."""
        return await self._in_thread(functools.partial(self._sync.states, **filters))

    async def sync(self) -> int:
        """``Allocator.sync`` (GETSA dump), in a worker thread."""
        return await self._in_thread(self._sync.sync)

    async def purge(self, *, reqid: int | None = None, mark: MarkSpec = None, if_id: int | None = None) -> int:
        """``Allocator.purge``, in a worker thread (a SAD dump)."""
        return await self._in_thread(functools.partial(self._sync.purge, reqid=reqid, mark=mark, if_id=if_id))

    async def close(self) -> None:
        """Close the sockets (``close_now``); pending allocations raise ClosedError."""
        self.close_now()

    def close_now(self) -> None:
        """Close without awaiting: for ``__del__``-like paths and signal handlers."""
        if self._closed:
            return
        self._closed = True
        self._replies.close(self._loop, self._sync)

    def __del__(self) -> None:
        if getattr(self, "_closed", True):  # True: __init__ failed, nothing to close
            return
        self._closed = True
        loop, replies, sync = self._loop, self._replies, self._sync
        try:
            what = f"unclosed AsyncAllocator in {self._core.ns.description}"
            warnings.warn(what, ResourceWarning, stacklevel=1, source=self)
        finally:
            if loop is not None and loop.is_running() and _running_loop() is not loop:
                # Collected in another thread: the loop's reader is removed in
                # the loop's own (the socket stays open until then).
                loop.call_soon_threadsafe(replies.close, loop, sync)
            else:
                replies.close(loop, sync)

    async def __aenter__(self) -> AsyncAllocator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close_now()


class _Replies:
    """The request socket's reader, which the loop holds while attached.
    Kept apart from AsyncAllocator so that the loop's reference does not keep
    a dropped AsyncAllocator alive (its __del__ closes it)."""

    def __init__(self, sock: XfrmSocket, core: Core) -> None:
        self.sock = sock
        self.core = core
        self.pending: dict[int, asyncio.Future[int]] = {}

    def on_readable(self) -> None:
        while True:
            try:
                data = self.sock.recv_nowait()
            except SpiallocError as exc:
                for waiting in self.pending.values():
                    if not waiting.done():
                        waiting.set_exception(exc)
                self.pending.clear()
                return
            if data is None:
                if self.sock.overruns:
                    self.sock.overruns = 0
                    self.fail_unanswered()
                return
            for kind, flags, seq, pid, payload in w.iter_messages(data):
                if pid != self.sock.portid:
                    continue
                fut: asyncio.Future[int] | None = self.pending.pop(seq, None)
                if kind == w.XFRM_MSG_NEWSA:
                    spi = w.decode_alloc_reply(payload)
                    if fut is None or fut.done():
                        # Its caller was cancelled: the state must not outlive it.
                        self.delete_state(bytes(payload[w.SA_ID_DADDR : w.SA_ID_DADDR + 16]), spi, payload)
                    else:
                        fut.set_result(spi)
                elif kind == w.NLMSG_ERROR and fut is not None and not fut.done():
                    code, text, _ = w.decode_error(payload, flags)
                    fut.set_exception(from_errno(code or errno.EPROTO, text, "allocspi"))

    def fail_unanswered(self) -> None:
        """ENOBUFS: some replies were dropped.  The kernel answers inside
        sendmsg, so every future still pending now will never be answered."""
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(NetlinkError(errno.ENOBUFS, "reply dropped: receive buffer full", "allocspi"))
        self.pending.clear()

    def delete_state(self, daddr: bytes, spi: int, payload: memoryview) -> None:
        # One DELSA on the loop: the kernel answers inside sendmsg, so it
        # never waits (unlike a dump, which is never run here).
        sa = w.decode_sa(payload)
        try:
            self.core.kernel.delete(daddr, spi, sa.family, sa.proto, sa.mark)
        except SpiallocError:
            pass

    def close(self, loop: asyncio.AbstractEventLoop | None, sync: Allocator) -> None:
        """``AsyncAllocator.close_now``'s work."""
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ClosedError(errno.EBADF, "allocator closed"))
        # Their replies are queued already: read them, so that the reader
        # deletes the states nobody will get a Reservation for.
        self.on_readable()
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self.sock.fileno())
        self.pending.clear()
        self.sock.close()
        sync.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


_BATCH_OPTIONS = frozenset({"src", "spi_range", "mode", "reqid", "mark", "if_id", "direction", "pcpu"})


async def _chunk(
    loop: asyncio.AbstractEventLoop,
    core: Core,
    req: Request,
    n: int,
    parts: list[Reservations],
    unclaimed: _Unclaimed,
) -> BatchResult:
    """One batch chunk in a worker thread.  If the caller is cancelled
    meanwhile, the chunk still finishes there: wait for it, so that the
    caller's clean-up finds its part (cancelled again while waiting: the
    chunk releases its part itself, finding the batch given up)."""
    fut = loop.run_in_executor(None, _batch_part, core, req, n, parts, unclaimed)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        raise


def _batch_part(core: Core, req: Request, n: int, parts: list[Reservations], unclaimed: _Unclaimed) -> BatchResult:
    """A chunk, counted as running by close() until its part is in
    ``parts``, or released if the batch was given up (by its caller, or by
    close) while it ran."""
    with core.busy():
        part = core.run_batch(req, n, False, report=False)  # on_lost: once the caller has them
        assert isinstance(part, BatchResult)
        rs = cast(Reservations, part.reservations)
        if not unclaimed.add(parts, rs):
            core.release_owned(rs)
    return part


def _give_up(
    core: Core,
    unclaimed: _Unclaimed,
    parts: list[Reservations],
    count: int = 0,
    errors: dict[int, SpiallocError] | None = None,
) -> None:
    """Release what a batch's chunks made (in a worker thread), and with
    ``errors`` raise its BatchError.  ClosedError if close() began first:
    then close released them."""
    with core.busy():
        mine = unclaimed.take(parts)
        released = core.release_owned(joined_batches(mine)) if mine else 0
    if errors:
        raise BatchError(count, errors, released)


class _Unclaimed:
    """The chunks of batches nobody has been given yet.  Released by
    whoever comes first (the batch's clean-up, a chunk that finds its batch
    given up, or close), and by that one only: a part released twice could
    delete a state that is someone else's by then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: list[list[Reservations]] = []

    def open(self) -> list[Reservations]:
        """A new batch's list of parts."""
        parts: list[Reservations] = []
        with self._lock:
            self._groups.append(parts)
        return parts

    def add(self, parts: list[Reservations], rs: Reservations) -> bool:
        """Append ``rs`` to ``parts``; False if the batch was given up."""
        with self._lock:
            if not any(group is parts for group in self._groups):
                return False
            parts.append(rs)
            return True

    def take(self, parts: list[Reservations]) -> list[Reservations] | None:
        """``parts``, now the caller's alone; None if close took them."""
        with self._lock:
            for i, group in enumerate(self._groups):
                if group is parts:
                    del self._groups[i]
                    return parts
        return None

    def release_all(self, core: Core) -> None:
        """Release every batch's parts (``Core.before_close``)."""
        with self._lock:
            groups, self._groups = self._groups, []
        for parts in groups:
            if parts:
                core.release_owned(joined_batches(parts))
