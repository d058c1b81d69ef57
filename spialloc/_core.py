"""What both faces of an allocator share, and the blocking driver of the rules.

``Allocator`` (blocking) and ``AsyncAllocator`` (asyncio) are two faces of one
``Core``: its options, its request cache, its bookkeeping (``_rules.Book``),
its kernel I/O (``_kernel.Kernel``) and its expiry watcher.  ``execute`` runs
one of the rules' operations with blocking calls and ``drive`` runs a whole
plan with it; AsyncAllocator awaits the ALLOCSPIs itself and hands every
other operation to ``execute`` in a worker thread.
"""

from __future__ import annotations

import array
import contextlib
import errno
import inspect
import ipaddress
import threading
import time
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Callable, Generator, Iterable, Iterator, Literal, Sequence, TypeVar, cast

from . import _backend, _lifecycle, _log, _shared
from . import _rules as rules
from . import _wire as w
from ._batch import BatchRun
from ._expiry import ExpiryWatcher
from ._kernel import Kernel
from ._model import (
    Address,
    Direction,
    KernelState,
    MarkSpec,
    Mode,
    Proto,
    Request,
    Reservation,
    Reservations,
    address_key,
    batch_reservations,
    batch_without,
    build_request,
    check_int,
    pack_address,
    parse_direction,
    parse_dst,
    parse_mark,
    parse_proto,
    parse_range,
)
from ._netns import Namespace, NetnsSpec
from ._shared import GuardSpec
from .errors import STRAY, BatchError, ClosedError, ForkedError, InvalidRequest, ReservationLost, SpiallocError
from .guard import State
from .ha import Partition
from .monitor import Acquire

T = TypeVar("T")

_CACHEABLE = frozenset({str, int, type(None), ipaddress.IPv4Address, ipaddress.IPv6Address, Proto, Mode, Direction})
_CACHEABLE_T = _CACHEABLE | {tuple}
#: The most SPIs one allocate_many may ask for: more than any range holds
#: (2^32 - 1 values) is refused before the first syscall.
MAX_BATCH = 0xFFFFFFFF
#: Distinct argument sets the request cache keeps before it starts over.
REQUEST_CACHE_SIZE = 1024
#: ``allocate``'s defaults for everything after dst and proto, compared by
#: identity (small ints and identifier-like literals are singletons), so
#: that no equal value of another type (False for 0) can match.
PLAIN = (None, None, "transport", 0, None, None, None, 0, None)


@dataclass
class BatchResult:
    """What ``allocate_many(..., strict=False)`` returns: the successes in
    request order, and for each failed request index its typed error."""

    reservations: Sequence[Reservation]
    errors: dict[int, SpiallocError] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every request of the batch succeeded."""
        return not self.errors


class Core:
    """One allocator: see the module doc.  Arguments as ``Allocator``'s."""

    def __init__(
        self,
        netns: NetnsSpec,
        *,
        guard: GuardSpec,
        scope: Literal["spi", "dst"],
        backend: str | None,
        spi_range: tuple[int, int] | None,
        cpi_range: tuple[int, int] | None,
        partition: Partition | None,
        allow_reserved: bool,
        on_lost: Callable[[Reservation], None] | None,
        watch_expiry: bool,
        max_retries: int,
        rcvbuf: int,
    ) -> None:
        check_int("max_retries", max_retries, 0, 1 << 31)
        check_callback(on_lost)
        check_int("rcvbuf", rcvbuf, 0, 1 << 30, "a byte count from 0 to 1 GiB (0: kernel default)")
        self.backend, engine = _backend.select(backend)
        self.allow_reserved = allow_reserved
        self.ranges = {
            Proto.ESP: parse_range(Proto.ESP, spi_range, allow_reserved),
            Proto.AH: parse_range(Proto.AH, spi_range, allow_reserved),
            Proto.COMP: parse_range(Proto.COMP, cpi_range, allow_reserved),
        }
        if partition is not None and not isinstance(partition, Partition):
            raise InvalidRequest(f"partition={partition!r} must be a spialloc.Partition")
        self.partition = partition
        if partition is not None:
            for lo, hi in self.ranges.values():
                partition.apply(lo, hi)  # validates: raises InvalidRequest if too small
        _shared.check(guard)
        self.closed = False
        #: In a fork child: the process that made this allocator (it is inert here).
        self.forked_from: int | None = None
        #: The face's name, for errors.
        self.what = "Allocator"
        # The count is kept under the bare lock (a C-level with); only a
        # close() waiting for it to reach 0 needs the Condition.
        self._idle_lock = threading.Lock()
        self._idle = threading.Condition(self._idle_lock)
        self._running = 0  # batches under way; close() waits for them
        #: Called by close() with this core once no batch runs, before the
        #: sockets close: AsyncAllocator releases batches nobody was given.
        self.before_close: list[Callable[[Core], None]] = []
        self._req_cache: dict[tuple[object, ...], Request] = {}
        #: Requests made with every option but dst and proto (a str) left
        #: at its default, by (dst, proto): ``Allocator.allocate`` finds
        #: them with identity checks instead of hashing eleven arguments.
        #: Each with its ``Kernel.prepare`` form (None without the C engine).
        self.plain: dict[tuple[object, str], tuple[Request, Any]] = {}
        self.ns = Namespace.open(netns)
        self._shared = False
        try:
            chosen, self._shared = _shared.attach(guard, scope, self.ns)
            self.book = rules.Book(chosen, max_retries, on_lost)
            self.kernel = Kernel(self.ns, engine, self.book, rcvbuf)
            self.kernel.warm()
            #: The C engine's lock-free single call for ``Allocator.allocate``'s
            #: plain requests, guard off only: ``(call, struct, seq counter)``
            #: (see ``_cbatch.Fast``; every request in ``plain`` is prepared).
            self.fast: tuple[Any, Any, Iterator[int]] | None = None
            k = self.kernel
            if k.fast is not None and self.book.guard is None:
                self.fast = (k.fast.call, k.fast.one, k.fast.seqs)
        except BaseException:
            if self._shared:
                _shared.detach(chosen)
            self.ns.close()
            raise
        self.watcher: ExpiryWatcher | None = None
        try:
            if self.book.guard is not None and watch_expiry:
                self.watcher = ExpiryWatcher(self.ns, self.book, self.kernel)
        except BaseException:
            self.close()
            raise
        _lifecycle.track(self)

    # --- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """See ``Allocator.close``."""
        if self.closed:
            return
        self.closed = True
        if hasattr(self, "kernel"):
            self.kernel.closing = True
        with self._idle:
            self._idle.wait_for(lambda: self._running == 0, timeout=60)
        for hook in self.before_close:
            try:
                hook(self)
            except SpiallocError as exc:
                _log.kernel.warning("%s.close: releasing unfinished batches failed: %s", self.what, exc)
        if self.watcher is not None:
            self.watcher.close()
        if hasattr(self, "kernel"):
            self.kernel.close()
        if getattr(self, "_shared", False) and self.book.guard is not None:
            _shared.detach(self.book.guard)
        self.ns.close()

    def _after_fork(self, parent: int) -> None:
        """In a fork child (``_lifecycle``): closed, touching nothing of the
        parent's.  No lock: a thread of the parent may have held one."""
        if self.closed:
            return
        self.forked_from = parent
        self.closed = True
        self.kernel.after_fork()
        if self.watcher is not None:
            self.watcher.after_fork()
        self.ns.close_copy()

    def check_open(self) -> None:
        if self.closed:
            if self.forked_from is not None:
                raise ForkedError(self.what, self.forked_from)
            raise ClosedError(errno.EBADF, "allocator is closed")

    def hold_until(self, hold: object) -> float | None:
        """The monotonic deadline of ``allocate(hold=...)``, validated."""
        if hold is None:
            return None
        if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not 0 < hold < 1e9:
            raise InvalidRequest(f"hold={hold!r} must be a positive number of seconds (below 1e9)")
        if self.watcher is None:
            raise InvalidRequest("hold needs the guard's expiry watcher (guard on, watch_expiry=True)")
        return time.monotonic() + float(hold)

    # --- requests -------------------------------------------------------------------------

    def request(
        self,
        dst: Address,
        proto: str | int | Proto,
        src: Address | None,
        spi_range: tuple[int, int] | None,
        mode: str | int,
        reqid: int,
        mark: MarkSpec,
        if_id: int | None,
        direction: str | int | None,
        seq: int,
        pcpu: int | None,
    ) -> Request:
        """The validated request for these ``allocate`` arguments.

        Validating and encoding costs more than the kernel round trip, and a
        daemon asks with the same arguments again and again: cache by the
        arguments as given, but only for exact simple types, so that no
        invalid value (a bool, a float) can ever hit a valid entry."""
        args = (dst, proto, src, spi_range, mode, reqid, mark, if_id, direction, seq, pcpu)
        types = set(map(type, args))
        cacheable = types <= _CACHEABLE or (
            types <= _CACHEABLE_T and all(type(x) is int for a in args if type(a) is tuple for x in a)  # noqa: E721
        )
        if cacheable:
            req = self._req_cache.get(args)
            if req is not None:
                return req
        p = parse_proto(proto)
        req = build_request(
            dst,
            p,
            src=src,
            spi_range=self.effective_range(p, spi_range),
            mode=mode,
            reqid=reqid,
            mark=mark,
            if_id=if_id,
            direction=direction,
            seq=seq,
            pcpu=pcpu,
            allow_reserved=self.allow_reserved,
        )
        self.kernel.require(req)  # once per attribute: a cached request passed it
        if cacheable:
            if len(self._req_cache) >= REQUEST_CACHE_SIZE:
                self._req_cache.clear()
                self.plain.clear()
            # plain first: a request found in the cache is not looked at again,
            # so an interrupt between the two must not leave it out of plain.
            if type(proto) is str and all(a is b for a, b in zip(args[2:], PLAIN, strict=True)):
                prepared = self.kernel.prepare(req)
                if prepared is not None or self.kernel.fast is None:
                    self.plain[(dst, proto)] = (req, prepared)
            self._req_cache[args] = req
        return req

    def request_for(self, acquire: object, spi_range: tuple[int, int] | None, direction: str | int | None) -> Request:
        """The request that binds a kernel ACQUIRE: every field the kernel
        matches the ACQ state by comes from the event."""
        if not isinstance(acquire, Acquire):
            raise InvalidRequest(f"allocate_for takes a spialloc.Acquire event, got {type(acquire).__name__}")
        if not acquire.seq:
            raise InvalidRequest("this Acquire has seq 0: the kernel never sends that; nothing to bind")
        if acquire.mode is None:
            raise InvalidRequest(f"ACQUIRE seq {acquire.seq} carries no template: its mode is unknown")
        if parse_direction(direction) is Direction.IN:
            # ACQUIREs come from output lookups: the ACQ state is the outbound
            # SA, and 6.10+ kernels make it with direction out.  "in" would
            # turn it around and the UPDSA that installs it would then fail.
            raise InvalidRequest(
                f"ACQUIRE seq {acquire.seq}: its ACQ state is the outbound SA (direction out, or none "
                "before Linux 6.10); allocate the inbound SPI with allocate(..., direction='in')"
            )
        return self.request(
            acquire.dst,
            acquire.proto,
            acquire.src,
            spi_range,
            acquire.mode,
            acquire.reqid,
            acquire.mark,
            acquire.if_id,
            direction,
            acquire.seq,
            acquire.pcpu,
        )

    def effective_range(self, proto: Proto, spi_range: object) -> tuple[int, int]:
        """The range to ask for: the caller's or the allocator's default,
        narrowed to this process's partition."""
        lo, hi = self.ranges[proto] if spi_range is None else parse_range(proto, spi_range, self.allow_reserved)
        return self.partition.apply(lo, hi) if self.partition is not None else (lo, hi)

    # --- running the rules ---------------------------------------------------------------

    def execute(self, op: rules.Op) -> object:
        """One of the rules' operations, with blocking calls."""
        k = self.kernel
        # The hot ones first: a single's AllocOp, a batch's RoundOp and LifetimeOp.
        if isinstance(op, rules.AllocOp):
            return k.alloc_one(op.req, op.lo, op.hi, box=op.box)
        if isinstance(op, rules.RoundOp):
            return k.round(op.req, op.n, op.cands, op.since, op.chunk, op.box)
        if isinstance(op, rules.LifetimeOp):
            return k.lifetime()
        if isinstance(op, rules.DeleteOp):
            return k.delete(op.daddr, op.spi, op.family, op.proto, op.mark)
        if isinstance(op, rules.PollOp):
            return self.poll()
        if isinstance(op, rules.SyncOp):
            return self.sync()
        if isinstance(op, rules.ClaimOp):
            k.claim_stray(op.req)
            return None
        if isinstance(op, rules.RecoverOp):
            return k.recover_lost(op)
        if isinstance(op, rules.PresentOp):
            return k.present(op.req)
        if isinstance(op, rules.ReleaseOp):
            return self.release_keys(op.keys)
        raise TypeError(f"unknown operation {op!r}")

    def drive(self, plan: Generator[rules.Op, object, T]) -> T:
        """Run a plan to its end: each op's result is sent back in, each
        op's exception thrown in (the plan cleans up and re-raises)."""
        try:
            step = rules.Stepper(plan)
            return self._drive(step)
        except BaseException as exc:
            if inspect.getgeneratorstate(plan) == inspect.GEN_SUSPENDED:
                self._finish(plan, exc)
            raise

    def _finish(self, plan: Generator[rules.Op, object, object], exc: BaseException) -> None:
        """An interrupt landed where ``_drive`` could not hand it to the plan
        (as the plan's first step returned, say), and the plan waits at a
        yield: let it clean up now, as for an exception of its op, running
        what it asks for; its own exception is dropped, ``exc`` goes on.
        Left suspended, it would clean up when the garbage collector
        finalizes it: at any point of any code, perhaps where this thread
        holds the guard's lock (a deadlock, seen under a storm of interrupts)."""
        with contextlib.suppress(BaseException):
            self._drive(rules.Stepper.thrown(plan, exc))

    def _drive(self, step: rules.Stepper[T]) -> T:
        pending: BaseException | None = None
        while True:
            try:
                while not step.done:
                    if pending is not None:
                        exc, pending = pending, None
                        step.throw(exc)
                        continue
                    try:
                        result = self.execute(step.op)
                    except BaseException as exc:
                        pending = exc
                        continue
                    step.send(result)
                return step.value
            except BaseException as exc:
                if not step.suspended():
                    raise  # the plan's own exception, or it has finished
                # An interrupt (Ctrl-C, a timer's exception) that landed in
                # this loop, wherever, while the plan waits at a yield: the
                # plan cleans up as for an exception of its op.  Leaving
                # instead would drop a suspended plan, whose states then
                # belong to nobody.
                pending = exc

    def poll(self) -> int:
        """Process queued EXPIRE events now (the watcher thread does it too)."""
        return 0 if self.watcher is None else self.watcher.poll()

    def sync(self) -> int:
        self.check_open()
        book = self.book
        if book.guard is None:
            return 0
        before = book.guard.mark()
        states = self.kernel.dump_states()
        with book.guard.deaths_lock:
            foreign = rules.seed_foreign(book, states)
            rules.missing_from(book, rules.state_keys(states), before)
        return foreign

    def purge(self, reqid: object, mark: MarkSpec, if_id: object) -> int:
        if reqid is None and mark is None and if_id is None:
            raise InvalidRequest(
                "purge needs reqid=, mark= or if_id=: what identifies this daemon's states "
                "(without one it would delete every other daemon's larval states too)"
            )
        rq = None if reqid is None else check_int("reqid", reqid)
        mk = parse_mark(mark)
        ii = None if if_id is None else check_int("if_id", if_id)
        self.check_open()
        doomed = rules.leftovers(self.book, self.kernel.dump_states(), rq, mk, ii)
        keys = [
            (pack_address(st.dst), st.spi, w.AF_INET if st.dst.version == 4 else w.AF_INET6, int(st.proto), st.mark)
            for st in doomed
        ]
        deleted = self.kernel.delete_all(keys)
        if self.book.guard is not None:
            for st in doomed:  # marked foreign by a sync: free again
                if isinstance(st.proto, Proto):
                    self.book.guard.release(address_key(st.dst), st.proto, st.spi)
        return deleted

    # --- batches ------------------------------------------------------------------------------

    def check_batch_args(self, count: object, unknown: dict[str, object]) -> int:
        if unknown:
            if "seq" in unknown:
                raise InvalidRequest("allocate_many takes no seq: one ACQUIRE binds one SPI; use allocate(seq=...)")
            raise InvalidRequest(f"allocate_many got unknown options: {', '.join(sorted(unknown))}")
        return check_int("count", count, 0, MAX_BATCH, f"a number of SPIs from 0 to {MAX_BATCH}")

    def empty_batch(self, req: Request) -> Reservations:
        return batch_reservations(req, array.array("I"), None if self.book.guard is None else array.array("Q"), 0.0)

    def run_batch(self, req: Request, count: int, strict: bool, report: bool = True) -> Reservations | BatchResult:
        """A batch through the engine in rounds (``_rules.BatchRun``).  All or
        nothing when ``strict``: a failed batch releases its SPIs and raises
        BatchError; else a BatchResult with the errors by index.

        Every exit other than the return hands the batch's states back: an
        interrupted plan releases them itself; after it finished, a Ctrl-C,
        close() or anything else before the return releases them here."""
        self._started()
        running = True
        run: BatchRun | None = None
        try:
            run = BatchRun(
                self.book, req, count, since=time.time() - 1.0, began=time.monotonic(), chunk=self.kernel.window(req)
            )
            # Round one's engine call made here, and the plan driven only if
            # its result leaves anything to do: the generator, its driver and
            # their operations cost a batch more than its guard bookkeeping.
            op = run.first_round()
            if op is None or not run.took_first(
                cast(rules.RoundResult, self.execute(op)), time.monotonic() - run.began, self.kernel.lifetime()
            ):
                self.drive(run.plan(time.monotonic, lambda: self.closed))
            if self.closed:
                # close() came while the last round ran: nobody may get SPIs
                # from a closed allocator, so they go back while close() waits.
                raise ClosedError(errno.EBADF, "allocator closed during the batch")
            result = self._deliver(run, req, count, strict, report)
            self._stopped()
            running = False
            return result  # nothing that can be interrupted lies between here and the caller
        except BaseException:
            if run is not None and run.finished and not run.settled:
                self.release_all(self._keys(run, req))
                run.hand_over()
            elif run is not None and not run.planned and run.in_round is not None:
                # Round one made here (first_round) and then interrupted
                # before a plan took it over: its states go, as a plan's would.
                self.release_all(run._abandon())
                run.hand_over()
            raise
        finally:
            if running:
                self._stopped()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """A block close() waits for, as for a running batch (and ClosedError
        if close() began already: the sockets may be gone by then)."""
        self._started()
        try:
            yield
        finally:
            self._stopped()

    def _started(self) -> None:
        with self._idle_lock:
            if self.closed:  # checked with the count: close() waits for what began before it
                raise ClosedError(errno.EBADF, "allocator is closed")
            self._running += 1

    def _stopped(self) -> None:
        with self._idle_lock:
            self._running -= 1
            if self.closed:  # set before close() waits: only then is anyone waiting
                self._idle.notify_all()

    @staticmethod
    def _keys(run: BatchRun, req: Request) -> list[rules.DelKey]:
        """The DELSA keys of a finished batch's states (the late dead are
        gone already: their SPIs may be someone else's now)."""
        late = set(run.late) | run.dead()
        return Core._batch_keys(req, [run.spis[i] for i in run.good() if i not in late])

    def _deliver(
        self, run: BatchRun, req: Request, count: int, strict: bool, report: bool
    ) -> Reservations | BatchResult:
        if run.errors and strict:
            run.settled = True  # by release_all, which a second Ctrl-C does not cut short
            released = self.release_all(self._keys(run, req))
            run.hand_over()  # after the release: nothing of this batch reaches on_lost
            raise BatchError(count, run.errors, released)
        run.hand_over()
        now = time.time()
        spis = run.spis
        book = self.book
        gdst, proto = req.gdst, int(req.proto)
        tokens: array.array[int] | int | None = None
        if run.bulk and not run.errors and (book.guard is None or run.bulk_tokens is not None):
            got = spis if isinstance(spis, array.array) else array.array("I", spis)
            # One token for the whole batch (the common case): no 8 bytes per SPI.
            tokens = run.bulk_tokens
        else:
            good = run.good()
            got = array.array("I", [spis[i] for i in good])
            if book.guard is not None:
                by_key = run.tokens
                tokens = array.array("Q", [by_key[(gdst, proto, spi)] for spi in got])
        reservations = batch_reservations(req, got, tokens, now)
        if tokens is not None and book.on_lost is not None and report:
            each = repeat(tokens) if isinstance(tokens, int) else tokens
            book.origin.update(zip(zip(repeat(gdst), repeat(proto), got), zip(repeat(req), each), strict=False))
        book.stats.allocated += len(got)
        for i in sorted(run.late):
            key = (gdst, proto, spis[i])
            book.lost(key, rules.lost_reservation(book, key, run.tokens.get(key, 0)))
        return reservations if strict else BatchResult(reservations, run.errors)

    def report_from_now(self, rs: Reservations) -> None:
        """A batch made in parts with ``run_batch(report=False)`` (an async
        batch's chunks) reaches its caller: from now on ``on_lost`` hears of
        its reservations, and of those that died since their chunk ended
        at once (the caller holds them now).  Until now a death of one of
        them told nobody: the caller might never have got it."""
        book, guard = self.book, self.book.guard
        if guard is None or book.on_lost is None or not len(rs):
            return
        req, spis, tokens = rs._parts()
        assert tokens is not None
        gdst, proto = req.gdst, int(req.proto)
        with guard.deaths_lock:  # no death is handled between the check and the record
            dead = set(guard.stale_many(gdst, proto, spis, tokens))
            pairs = enumerate(zip(spis, tokens, strict=True))
            book.origin.update(((gdst, proto, spi), (req, t)) for i, (spi, t) in pairs if i not in dead)
        for i in sorted(dead):
            book.tell_lost(rs[i])

    def take_back(self, req: Request, box: list[Any]) -> None:
        """An exception (Ctrl-C, a timer's) is leaving a single allocate
        after the kernel made its state (``box[0]``, the SPI) and before the
        caller got its Reservation: delete the state, then free the guard's
        tuple if this call reserved it (``box[1]``, its token; 0 if not, and
        then another reservation may hold the tuple: it is left alone).
        ``box[0]`` is ``STRAY`` after a refusal: the request's SPI-less state
        is claimed and deleted as after any refusal."""
        if box[0] is None and box[3]:
            self.kernel.fast_salvage(box)
        spi = box[0]
        if spi is None:
            return
        box[0] = None
        if spi == STRAY:  # refused: the kernel's SPI-less state, unless a retry took it
            with contextlib.suppress(SpiallocError):
                self.kernel.claim_stray(req)
            return
        keys = self._batch_keys(req, [spi])
        while True:  # a second Ctrl-C must not leave the state behind either
            try:
                self.kernel.delete_all(keys)
                break
            except KeyboardInterrupt:
                continue
            except SpiallocError as exc:
                _log.kernel.warning("allocate interrupted: deleting its state %#010x failed: %s", spi, exc)
                break
        if box[1]:
            rules.forget(self.book, keys, [box[1]])

    def release_all(self, keys: list[rules.DelKey]) -> int:
        """``release_keys`` that a second Ctrl-C does not cut short: the
        states of a batch nobody will get must all go."""
        while True:
            try:
                return self.release_keys(keys)
            except KeyboardInterrupt:
                continue

    # --- release and commit --------------------------------------------------------------------

    def release(self, reservations: Reservation | Iterable[Reservation]) -> int:
        if type(reservations) is Reservations:
            return self._release_batch(reservations)
        if isinstance(reservations, Reservation):
            items = [reservations]
        elif isinstance(reservations, Iterable) and not isinstance(reservations, (str, bytes)):
            items = list(reservations)
        else:
            raise InvalidRequest(f"release takes a Reservation or an iterable of them, got {reservations!r}")
        keys = [_release_key(r) for r in items]  # all validated before any syscall
        book = self.book
        if book.guard is None:
            return self.release_keys(keys)
        self.check_issued(items)
        # Deaths already queued first: a state that died has no EXPIRE left to
        # come, and its SPI may be another allocator's state by now.  Under
        # the guard's deaths lock until the tuples are forgotten: another
        # allocator's watcher may be acting on the same death, and a resync
        # (events overran) must not take a state deleted here, not yet
        # forgotten, for a death.
        with book.guard.deaths_lock:
            self.poll()
            stale = rules.stale(book, items)
            if stale:
                raise ReservationLost(
                    f"{len(stale)} of {len(items)} reservations are not current (their state expired or was "
                    f"deleted, or they were released; the SPI may be another's now), e.g. {stale[0]}: "
                    "nothing was released",
                    stale,
                )
            return self.release_keys(keys, items)

    def release_owned(self, rs: Reservations) -> int:
        """Release what a batch nobody was given still owns (an
        ``AsyncAllocator.allocate_many`` that failed or was cancelled after
        some chunks): entries lost meanwhile (expired, deleted by someone
        else) are skipped, not refused, since their SPIs may be others' now."""
        return self._release_batch(rs, skip_stale=True)

    def _release_batch(self, rs: Reservations, skip_stale: bool = False) -> int:
        """``release`` of an ``allocate_many`` result (or a slice of one):
        one request, arrays of SPIs and tokens, so every step is one call
        for the whole batch instead of one per reservation."""
        req, spis, tokens = rs._parts()
        if not spis:
            return 0
        book = self.book
        guard = book.guard
        if guard is None:
            return self.release_keys(self._batch_keys(req, spis))
        self.check_issued(rs[:1])  # one allocator's tokens: the first tells (token 0: none of ours)
        with guard.deaths_lock:  # as release(): see there
            self.poll()
            assert tokens is not None
            stale = guard.stale_many(req.gdst, int(req.proto), spis, tokens)
            if stale:
                if not skip_stale:
                    raise ReservationLost(
                        f"{len(stale)} of {len(spis)} reservations are not current (their state expired or was "
                        f"deleted, or they were released; the SPI may be another's now), e.g. {rs[stale[0]]}: "
                        "nothing was released",
                        [rs[i] for i in stale],
                    )
                rs = batch_without(rs, set(stale))
                req, spis, tokens = rs._parts()
            return self.release_keys(self._batch_keys(req, spis), rs)

    @staticmethod
    def _batch_keys(req: Request, spis: Sequence[int]) -> list[rules.DelKey]:
        return list(zip(repeat(req.daddr), spis, repeat(req.family), repeat(int(req.proto)), repeat(req.mark)))

    def release_keys(self, keys: list[rules.DelKey], items: Sequence[Reservation] | None = None) -> int:
        """DELSA for ``keys`` and forget their tuples (given the reservations
        they came from, only those reservations' entries)."""
        deleted = self.kernel.delete_all(keys)
        guard = self.book.guard
        if deleted < len(keys) and items is not None and guard is not None:
            # Rare: only then look for SAs installed with another mark.
            installed = [k for k, r in zip(keys, items, strict=True) if guard.state(*r.key) is State.COMMITTED]
            if installed:
                deleted += self._delete_moved(installed)
        if type(items) is Reservations:
            req, spis, tokens = items._parts()
            assert tokens is not None
            rules.forget_batch(self.book, req, spis, tokens)
        else:
            rules.forget(self.book, keys, None if items is None else [r.token for r in items])
        self.book.stats.released += deleted
        return deleted

    def _delete_moved(self, keys: Sequence[rules.DelKey]) -> int:
        """Committed reservations whose SA a DELSA with the reservation's
        mark did not find: an UPDSA may have given it another mark.  Each is
        deleted with the mark it has now, when it is the only state on its
        tuple (the tuple is ours: with two, which one is not provable)."""
        wanted = {rules.guard_key(k): k for k in keys}
        found: dict[rules.Key, list[KernelState]] = {}
        for st in self.kernel.dump_states():
            key = rules.state_key(st)
            if key in wanted:
                found.setdefault(key, []).append(st)
        deleted = 0
        for key, states in found.items():
            if len(states) == 1:
                daddr, spi, family, proto, _ = wanted[key]
                deleted += self.kernel.delete(daddr, spi, family, proto, states[0].mark)
        return deleted

    def check_issued(self, items: Iterable[Reservation]) -> None:
        """Refuse a reservation this allocator did not hand out (another
        allocator's, unpickled, built by hand): its state is not ours to touch."""
        for r in items:
            if not self.book.issued(r):
                raise InvalidRequest(
                    f"{r} (token {r.token!r}) was not issued by this {self.what}: release or commit "
                    "it with the allocator that allocated it"
                )

    def commit(self, reservation: Reservation) -> None:
        if not isinstance(reservation, Reservation):
            raise InvalidRequest(f"commit takes a Reservation, got {reservation!r}")
        if self.book.guard is None:
            return
        self.check_issued([reservation])
        with self.book.guard.deaths_lock:
            self.poll()
            rules.committed(self.book, reservation)


def check_callback(on_lost: object) -> None:
    if on_lost is not None and not callable(on_lost):
        raise InvalidRequest(f"on_lost={on_lost!r} must be a callable taking a Reservation, or None")


def _release_key(r: object) -> rules.DelKey:
    """The DELSA key of a reservation, validated."""
    if not isinstance(r, Reservation):
        raise InvalidRequest(f"release takes Reservations, got {r!r}")
    dst = parse_dst(r.dst)
    proto = int(parse_proto(r.proto))
    spi = check_int("spi", r.spi, 0, 0xFFFFFFFF)
    family = w.AF_INET if dst.version == 4 else w.AF_INET6
    return (pack_address(dst), spi, family, proto, parse_mark(r.mark))
