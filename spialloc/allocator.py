"""Allocator: the public face that a keying daemon holds.

One Allocator owns one request socket in one network namespace, a Guard (its
own or shared), and, while the guard is on, a watcher thread that listens for
the kernel's EXPIRE events so a reservation whose larval state died is known
as lost before its SPI can be handed to anyone else.
"""

from __future__ import annotations

import array
import errno
import ipaddress
import os
import random
import select
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Generator, Iterable, Literal, NamedTuple, Sequence, Union, overload

from . import _backend
from . import _wire as w
from ._model import (
    Address,
    Direction,
    KernelState,
    MarkSpec,
    Mode,
    Proto,
    Request,
    Reservation,
    address_key,
    build_request,
    guard_dst,
    guard_dst_address,
    pack_address,
    parse_address,
    parse_mark,
    parse_proto,
    parse_range,
    reservation_from,
)
from ._netlink import DEFAULT_RCVBUF, XfrmSocket
from ._netns import Namespace, NetnsSpec, read_sysctl, write_sysctl
from .errors import (
    RESTART_ERRNOS,
    BatchError,
    ClosedError,
    DuplicateSpi,
    InvalidRequest,
    NamespaceError,
    NetlinkError,
    ReservationLost,
    SpiallocError,
    SpiExhausted,
    from_errno,
)
from .guard import Guard, State
from .ha import Partition

LOST = -2
#: At most this many engine rounds per batch (each round asks again, batched,
#: for what the previous one lost); a round that gains nothing ends it sooner.
BATCH_ROUNDS = 16
_CACHEABLE = frozenset({str, int, type(None), ipaddress.IPv4Address, ipaddress.IPv6Address, Proto, Mode, Direction})
_CACHEABLE_T = _CACHEABLE | {tuple}
#: Ranges at most this wide are filled by directed allocation: the guard picks
#: a free value and asks for exactly it, instead of the kernel's random picks
#: with replacement that fail spuriously while free values remain.
DIRECTED_MAX_RANGE = 1 << 16


class AllocOp(NamedTuple):
    req: Request
    lo: int
    hi: int


class DeleteOp(NamedTuple):
    daddr: bytes
    spi: int
    family: int
    proto: int
    mark: tuple[int, int] | None


class PollOp(NamedTuple):
    pass


class SyncOp(NamedTuple):
    pass


class ClaimOp(NamedTuple):
    req: Request


Plan = Generator[Union[AllocOp, DeleteOp, PollOp, SyncOp, ClaimOp], object, Reservation]


@dataclass
class AllocatorStats:
    """Counters since the allocator opened (a snapshot is returned by ``stats``)."""

    allocated: int = 0
    released: int = 0
    batches: int = 0
    collisions: int = 0  # the kernel returned an SPI that was still outstanding
    retries: int = 0  # requests re-sent after a collision
    directed_misses: int = 0  # directed picks the kernel refused (held by others)
    lost: int = 0  # reservations whose larval state expired before commit
    overruns: int = 0  # ENOBUFS seen on the request socket
    recovered: int = 0  # larval states of dropped replies found and deleted
    renewed: int = 0  # held reservations whose expired larval state was made again
    expired_in_batch: int = 0  # states that died before their batch ended (asked again)


@dataclass
class BatchResult:
    """What ``allocate_many(..., strict=False)`` returns: the successes in
    request order, and for each failed request index its typed error."""

    reservations: list[Reservation]
    errors: dict[int, SpiallocError] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


class Allocator:
    """Allocate and release SPIs in one network namespace.

    ``netns``: None (the caller's namespace), a name from ``ip netns``, a path
    (``/proc/PID/ns/net``), an open fd, or a ``Namespace``.
    ``guard``: True (a private Guard), False (no tracking: the kernel's answers
    as they are, duplicates included), or a Guard shared with other allocators.
    """

    def __init__(
        self,
        netns: NetnsSpec = None,
        *,
        guard: bool | Guard = True,
        scope: Literal["spi", "dst"] = "spi",
        backend: str | None = None,
        spi_range: tuple[int, int] | None = None,
        cpi_range: tuple[int, int] | None = None,
        partition: Partition | None = None,
        allow_reserved: bool = False,
        sync: bool = False,
        on_lost: Callable[[Reservation], None] | None = None,
        watch_expiry: bool = True,
        max_retries: int = 8,
        rcvbuf: int = DEFAULT_RCVBUF,
    ) -> None:
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise InvalidRequest(f"max_retries={max_retries!r} must be a non-negative integer")
        if isinstance(rcvbuf, bool) or not isinstance(rcvbuf, int) or not 0 <= rcvbuf <= 1 << 30:
            raise InvalidRequest(f"rcvbuf={rcvbuf!r} must be a byte count from 0 to 1 GiB (0: kernel default)")
        self.backend, self._engine = _backend.select(backend)
        self._allow_reserved = allow_reserved
        self._ranges = {
            Proto.ESP: parse_range(Proto.ESP, spi_range, allow_reserved),
            Proto.AH: parse_range(Proto.AH, spi_range, allow_reserved),
            Proto.COMP: parse_range(Proto.COMP, cpi_range, allow_reserved),
        }
        if partition is not None and not isinstance(partition, Partition):
            raise InvalidRequest(f"partition={partition!r} must be a spialloc.Partition")
        self.partition = partition
        if partition is not None:
            for lo, hi in self._ranges.values():
                partition.apply(lo, hi)  # validates: raises InvalidRequest if too small
        if isinstance(guard, Guard):
            self.guard: Guard | None = guard
        elif guard is True:
            self.guard = Guard(scope)
        elif guard is False or guard is None:
            self.guard = None
        else:
            raise InvalidRequest(f"guard={guard!r} must be True, False or a Guard")
        self.on_lost = on_lost
        self.max_retries = max_retries
        self._stats = AllocatorStats()
        self._acq_expires: float | None = None
        self._req_cache: dict[tuple[object, ...], Request] = {}
        self._held: dict[tuple[bytes, int, int], tuple[Request, float]] = {}
        # Keys of a running batch, not yet seen by the caller; the watcher
        # records their deaths in _died instead of calling on_lost.
        self._inflight: set[tuple[bytes, int, int]] = set()
        # With on_lost set: the request of each reserved tuple, so a loss found
        # by a resync (events dropped) reports the reservation as allocated.
        self._origin: dict[tuple[bytes, int, int], Request] = {}
        self._idle = threading.Condition()
        self._running = 0  # batches under way; close() waits for them
        self._died: set[tuple[bytes, int, int]] = set()
        self._rng = random.Random()
        self._closed = False
        self.ns = Namespace.open(netns)
        try:
            self._sock = XfrmSocket(self.ns, rcvbuf=rcvbuf)
        except BaseException:
            self.ns.close()
            raise
        self._events: XfrmSocket | None = None
        self._watcher: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        try:
            if self.guard is not None and watch_expiry:
                self._start_watcher()
            if sync:
                self.sync()
        except BaseException:
            self.close()
            raise

    # --- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Close the sockets.  A batch running in another thread stops at its
        next round and releases what it had (it raises ClosedError); close
        waits for that, so the release can still reach the kernel."""
        if self._closed:
            return
        self._closed = True
        with self._idle:
            self._idle.wait_for(lambda: self._running == 0, timeout=60)
        if self._watcher is not None:
            os.write(self._wake_w, b"x")
            self._watcher.join()
            os.close(self._wake_r)
            os.close(self._wake_w)
        if self._events is not None:
            self._events.close()
        with self._sock.lock:  # never between a request and its reply
            self._sock.close()
        self.ns.close()

    def __enter__(self) -> Allocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> AllocatorStats:
        return replace(self._stats)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(errno.EBADF, "allocator is closed")

    # --- requests --------------------------------------------------------------

    def _request(
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
        # Validating and encoding costs more than the kernel round trip, and a
        # daemon asks with the same arguments again and again: cache by the
        # arguments as given, but only for exact simple types, so that no
        # invalid value (a bool, a float) can ever hit a valid entry.
        args = (dst, proto, src, spi_range, mode, reqid, mark, if_id, direction, seq, pcpu)
        types = set(map(type, args))
        cacheable = types <= _CACHEABLE or (
            types <= _CACHEABLE_T and all(type(x) is int for a in args if type(a) is tuple for x in a)  # noqa: E721
        )
        if cacheable:
            req = self._req_cache.get(args)
            if req is not None:
                return req
        req = self._build_request(args)
        if cacheable:
            if len(self._req_cache) >= 1024:
                self._req_cache.clear()
            self._req_cache[args] = req
        return req

    def _build_request(self, args: tuple[Any, ...]) -> Request:
        """``_request`` without the cache; ``args`` in ``_request``'s order."""
        dst, proto, src, spi_range, mode, reqid, mark, if_id, direction, seq, pcpu = args
        p = parse_proto(proto)
        if spi_range is None:
            lo, hi = self._ranges[p]
            spi_range = self.partition.apply(lo, hi) if self.partition is not None else (lo, hi)
        elif self.partition is not None:
            lo, hi = parse_range(p, spi_range, self._allow_reserved)
            spi_range = self.partition.apply(lo, hi)
        return build_request(
            dst,
            p,
            src=src,
            spi_range=spi_range,
            mode=mode,
            reqid=reqid,
            mark=mark,
            if_id=if_id,
            direction=direction,
            seq=seq,
            pcpu=pcpu,
            allow_reserved=self._allow_reserved,
        )

    def _directed(self, req: Request) -> bool:
        if self.guard is None:
            return False
        size = req.spi_max - req.spi_min + 1
        if size <= DIRECTED_MAX_RANGE:
            return True
        # Dense by the guard's count: random kernel picks would hit outstanding
        # values often enough that directed picks are cheaper.
        return self.guard.count_in(req.proto, req.gdst) * 16 > size

    def _alloc_one(self, req: Request, spi_min: int, spi_max: int) -> int:
        """One ALLOCSPI round trip; returns the SPI (host order)."""
        msg = bytearray(req.template)
        if spi_min != req.spi_min or spi_max != req.spi_max:
            w.patch_range(msg, 0, spi_min, spi_max)
        for _ in range(64):
            try:
                return self._sock.allocspi(msg)
            except NetlinkError as exc:
                if exc.errno in RESTART_ERRNOS:
                    if spi_min == spi_max:
                        # The kernel checks for signals only after a pick that
                        # hit a used SPI: with one value, that value is taken.
                        raise SpiExhausted(errno.ENOENT, "the requested SPI is in use", "allocspi") from None
                    continue  # interrupted between random picks: ask again
                if exc.errno == errno.ENOBUFS and "reply dropped" in str(exc):
                    self._stats.overruns += 1
                    self._recover_lost(req, 1, time.time() - 1.0)
                raise
        raise NetlinkError(errno.EINTR, "interrupted by signals 64 times in a row", "allocspi")

    def _claim_stray(self, req: Request) -> None:
        """A refused ALLOCSPI leaves its larval state behind with SPI 0 until it
        expires, and DELSA cannot name SPI 0.  A request with the same
        parameters reuses that state, so ask for any SPI, then delete it."""
        if req.seq:
            return  # the kernel's own ACQ state: not ours to remove
        lo, hi = (0x100, 0xFFFF) if req.proto is Proto.COMP else (0x100, 0xFFFFFFFF)
        try:
            spi = self._alloc_one(req, lo, hi)
            self._delete(req.daddr, spi, req.family, req.proto, req.mark)
        except SpiallocError:
            pass  # nothing free at all: it expires on its own

    def allocate(
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
        """Allocate one SPI (``ip xfrm state allocspi``): a larval state in the kernel.

        ``seq`` binds the request to a kernel ACQUIRE (its ``seq``), so the
        ACQ state gets the SPI.  With the guard on, an SPI that is still
        outstanding is never returned: the request is changed (``seq`` dropped,
        then a known-free SPI asked for exactly) and retried.

        ``hold`` (seconds): your negotiation may outlast the larval lifetime
        (``acq_expires``); until ``hold`` runs out, commit or release, an
        expired larval state is allocated again at once with the same SPI, so
        the reservation is not lost (unless someone takes the SPI in between).
        """
        self._check_open()
        if hold is not None:
            _check_hold(hold, self._events is not None)
        req = self._request(dst, proto, src, spi_range, mode, reqid, mark, if_id, direction, seq, pcpu)
        guard = self.guard
        if guard is not None and (req.seq or self._directed(req)):
            return self._book(req, self._allocate_guarded(req), hold)
        # One round trip; with the guard, the common case skips the plan's
        # generator unless the SPI collides.
        try:
            spi = self._alloc_one(req, req.spi_min, req.spi_max)
        except SpiExhausted:
            self._claim_stray(req)
            raise
        if guard is None:
            self._stats.allocated += 1
            return reservation_from(req, spi)
        if guard.reserve_trusted(req.gdst, req.proto, spi):
            self._stats.allocated += 1
            return self._book(req, reservation_from(req, spi), hold)
        self._stats.collisions += 1
        return self._book(req, self._drive(self._guarded_plan(req, first=spi)), hold)

    def _book(self, req: Request, r: Reservation, hold: float | None) -> Reservation:
        """Note a guarded single reservation for on_lost and hold (shared
        with AsyncAllocator.allocate)."""
        if self.on_lost is not None:
            self._origin[(req.gdst, int(req.proto), r.spi)] = req
        if hold is not None:
            self._held[(req.gdst, int(req.proto), r.spi)] = (req.with_seq(0), time.monotonic() + hold)
        return r

    def _allocate_guarded(self, req: Request) -> Reservation:
        return self._drive(self._guarded_plan(req))

    def _drive(self, plan: Plan) -> Reservation:
        """Run a guarded plan with blocking round trips (AsyncAllocator has
        the awaiting twin of this loop; the plan itself is shared)."""
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
                    value = self._alloc_one(op.req, op.lo, op.hi)
                elif isinstance(op, DeleteOp):
                    value = self._delete(op.daddr, op.spi, op.family, op.proto, op.mark)
                elif isinstance(op, SyncOp):
                    value = self.sync()
                elif isinstance(op, ClaimOp):
                    self._claim_stray(op.req)
                else:
                    value = self.poll_events()
            except BaseException as exc:  # handed to the plan, which cleans up and re-raises
                error = exc

    def _guarded_plan(self, req: Request, first: int | None = None) -> Plan:
        """The guarded allocation algorithm, as a generator of kernel operations.

        It yields AllocOp / DeleteOp / PollOp and receives their results (or
        their exceptions, thrown in), so the blocking and the asyncio drivers
        share one implementation of the retry rules.
        """
        guard = self.guard
        assert guard is not None
        retries = 0
        misses = 0
        refused: SpiExhausted | None = None  # the kernel's own words, kept
        resynced = False
        directed = self._directed(req)
        size = req.spi_max - req.spi_min + 1
        while True:
            cand = None
            if first is not None:
                # The caller asked once already and got an SPI the guard holds.
                spi, first = first, None
                yield PollOp()  # maybe its holder just died
                if guard.reserve(req.gdst, req.proto, spi):
                    self._stats.allocated += 1
                    return reservation_from(req, spi)
                yield DeleteOp(req.daddr, spi, req.family, req.proto, req.mark)
                retries += 1
                self._stats.retries += 1
                directed = True
                continue
            if directed:
                cand = guard.reserve_free(req.gdst, req.proto, req.spi_min, req.spi_max, self._rng)
                if cand is None:
                    if not resynced and guard.stats.foreign:
                        # Values marked foreign may have been freed since: look again.
                        resynced = True
                        yield SyncOp()
                        continue
                    if refused is not None:
                        yield ClaimOp(req)
                        raise refused
                    raise _all_outstanding(req)
                lo = hi = cand
            else:
                lo, hi = req.spi_min, req.spi_max
            try:
                got = yield AllocOp(req, lo, hi)
                assert isinstance(got, int)
                spi = got
            except SpiExhausted as exc:
                if cand is None:
                    yield ClaimOp(req)
                    raise
                refused = exc
                # Someone outside this guard holds it: remember, pick another.
                guard.release(req.gdst, req.proto, cand)
                guard.mark_foreign(req.gdst, req.proto, cand)
                self._stats.directed_misses += 1
                misses += 1
                if misses > min(size, 4096):
                    yield ClaimOp(req)
                    raise
                continue
            except BaseException:
                if cand is not None:
                    guard.release(req.gdst, req.proto, cand)
                raise
            if cand is not None and spi == cand:
                self._stats.allocated += 1
                return reservation_from(req, spi)
            if cand is not None:
                guard.release(req.gdst, req.proto, cand)
            if guard.reserve(req.gdst, req.proto, spi):
                self._stats.allocated += 1
                return reservation_from(req, spi)
            # A collision: the kernel returned an SPI that is still out.
            self._stats.collisions += 1
            yield PollOp()  # maybe the holder's state just expired
            if guard.reserve(req.gdst, req.proto, spi):
                self._stats.allocated += 1
                return reservation_from(req, spi)
            if not req.seq or guard.owner_dst(req.proto, spi, req.gdst) != req.gdst:
                # A state of ours that must not be handed out: another destination's
                # SPI (kernels before 6.17), or, without a seq, a fresh state whose
                # SPI the guard still holds (the holder died unseen).  With a seq and
                # the same destination it is the holder's own ACQ state: leave it.
                yield DeleteOp(req.daddr, spi, req.family, req.proto, req.mark)
            retries += 1
            self._stats.retries += 1
            if retries > self.max_retries:
                raise DuplicateSpi(
                    f"the kernel returned outstanding SPIs {retries} times for {req.dst} "
                    f"(last {spi:#010x}); giving up after {self.max_retries} retries"
                )
            if req.seq:
                req = req.with_seq(0)
            directed = True

    # --- batches ----------------------------------------------------------------

    @overload
    def allocate_many(
        self,
        count: int,
        dst: Address,
        proto: str | int | Proto = ...,
        *,
        strict: Literal[True] = ...,
        src: Address | None = ...,
        spi_range: tuple[int, int] | None = ...,
        mode: str | int = ...,
        reqid: int = ...,
        mark: MarkSpec = ...,
        if_id: int | None = ...,
        direction: str | int | None = ...,
        pcpu: int | None = ...,
        **unknown: object,
    ) -> list[Reservation]: ...

    @overload
    def allocate_many(
        self,
        count: int,
        dst: Address,
        proto: str | int | Proto = ...,
        *,
        strict: Literal[False],
        src: Address | None = ...,
        spi_range: tuple[int, int] | None = ...,
        mode: str | int = ...,
        reqid: int = ...,
        mark: MarkSpec = ...,
        if_id: int | None = ...,
        direction: str | int | None = ...,
        pcpu: int | None = ...,
        **unknown: object,
    ) -> BatchResult: ...

    def allocate_many(
        self,
        count: int,
        dst: Address,
        proto: str | int | Proto = "esp",
        *,
        strict: bool = True,
        src: Address | None = None,
        spi_range: tuple[int, int] | None = None,
        mode: str | int = "transport",
        reqid: int = 0,
        mark: MarkSpec = None,
        if_id: int | None = None,
        direction: str | int | None = None,
        pcpu: int | None = None,
        **unknown: object,
    ) -> list[Reservation] | BatchResult:
        """Allocate ``count`` SPIs with the same parameters in few syscalls.

        All or nothing by default: if any request fails, the SPIs that were
        allocated are released and BatchError says how many failed and why.
        With ``strict=False`` a BatchResult carries the successes and, per
        failed index, the error.
        """
        if unknown:
            if "seq" in unknown:
                raise InvalidRequest("allocate_many takes no seq: one ACQUIRE binds one SPI; use allocate(seq=...)")
            raise InvalidRequest(f"allocate_many got unknown options: {', '.join(sorted(unknown))}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidRequest(f"count={count!r} must be a non-negative integer")
        self._check_open()
        req = self._request(dst, proto, src, spi_range, mode, reqid, mark, if_id, direction, 0, pcpu)
        if count == 0:
            return [] if strict else BatchResult([])
        with self._idle:
            self._running += 1
        try:
            spis, errors = self._batch(req, count)
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()
        good = [i for i in range(count) if i not in errors] if errors else range(count)
        if errors and strict:
            released = self._release_keys([(req.daddr, spis[i], req.family, int(req.proto), req.mark) for i in good])
            raise BatchError(count, errors, released)
        now = time.time()
        reservations = [reservation_from(req, spis[i], now) for i in good]
        self._stats.allocated += len(reservations)
        if self.on_lost is not None and self.guard is not None:
            gdst, proto = req.gdst, int(req.proto)
            self._origin.update(((gdst, proto, r.spi), req) for r in reservations)
        return reservations if strict else BatchResult(reservations, errors)

    def _batch(self, req: Request, count: int) -> tuple[list[int], dict[int, SpiallocError]]:
        """Run a batch through the engine in rounds; returns (spis, errors by index).

        Round one asks for everything; each later round asks again, batched,
        for what was lost: dropped replies, collisions, directed misses, and
        states that expired before the batch ended (a batch in a large table
        can outlive the larval lifetime).  With the guard, every success is
        reserved as soon as the engine returns and its key is marked in
        flight, so an EXPIRE for it is neither missed nor reported to on_lost
        (the caller never saw it): the index is asked again instead.
        """
        guard = self.guard
        spis = [0] * count
        errors: dict[int, SpiallocError] = {}
        owned: dict[int, tuple[bytes, int, int]] = {}  # index -> guard key
        holder: dict[tuple[bytes, int, int], int] = {}  # guard key -> index
        keys: set[tuple[bytes, int, int]] = set()  # every key this batch put in flight
        pending = list(range(count))
        directed = guard is not None and self._directed(req)
        resynced = False
        proto = int(req.proto)
        began = time.monotonic()
        since = time.time() - 1.0
        why: dict[int, SpiallocError] = {}  # why an index is being asked again
        chunk = self._sock.window()
        in_round: tuple[list[int], list[int], list[int], list[int]] | None = None
        refused = False
        try:
            for _ in range(BATCH_ROUNDS):
                if not pending:
                    break
                if self._closed:
                    raise ClosedError(errno.EBADF, "allocator closed during the batch")
                before = len(owned)
                cands: list[int] = []
                if directed:
                    assert guard is not None
                    for _i in pending:
                        c = guard.reserve_free(req.gdst, proto, req.spi_min, req.spi_max, self._rng)
                        if c is None:
                            break
                        cands.append(c)
                        key = (req.gdst, proto, c)
                        keys.add(key)
                        self._inflight.add(key)
                        self._died.discard(key)  # an earlier death of this value is not this state's
                    if len(cands) < len(pending) and not resynced and guard.stats.foreign:
                        resynced = True  # foreign marks may be stale: look again once
                        for c in cands:
                            guard.release(req.gdst, proto, c)
                        self.sync()
                        continue
                    for i in pending[len(cands) :]:
                        errors[i] = _all_outstanding(req)
                    pending = asked = pending[: len(cands)]
                else:
                    asked = pending
                if not asked:
                    break
                got, errs, text, overran = self._engine_round(
                    req, len(asked), cands if directed else None, since, chunk
                )
                refused = errno.ENOENT in errs  # leaves an SPI-0 larval state, unless reused later
                if overran:
                    # The window overflowed the receive buffer: step down to what came back.
                    chunk = max(1, min(chunk, sum(1 for e in errs if e != LOST)) // 2)
                in_round = (asked, got, errs, cands if directed else [])
                retry: list[int] = []
                lost = misses = 0
                ok: list[bool] = []
                if guard is not None and not directed:
                    # The round's successes reserved under one lock.
                    succ = [j for j, e in enumerate(errs) if e == 0]
                    ok = [False] * len(errs)
                    held = guard.reserve_many_trusted(req.gdst, proto, [got[j] for j in succ])
                    for j, o in zip(succ, held, strict=True):
                        ok[j] = o
                clean = errs.count(0) == len(errs) and (got == cands if directed else guard is None or all(ok))
                if clean:
                    # Every request of the round came back as asked: book them in bulk.
                    ks = [(req.gdst, proto, spi) for spi in got]
                    owned.update(zip(asked, ks, strict=True))
                    holder.update(zip(ks, asked, strict=True))
                    for i, spi in zip(asked, got, strict=True):
                        spis[i] = spi
                    if guard is not None:
                        keys.update(ks)
                        self._inflight.update(ks)
                        self._died.difference_update(ks)
                for j, i in enumerate(() if clean else asked):
                    e, spi = errs[j], got[j]
                    if directed:
                        assert guard is not None
                        c = cands[j]
                        if e == 0 and spi == c:
                            owned[i] = (req.gdst, proto, c)
                            holder[owned[i]] = i
                            spis[i] = c
                            continue
                        guard.release(req.gdst, proto, c)
                        if e == errno.ENOENT or e in RESTART_ERRNOS:  # restart: only after hitting a used SPI
                            guard.mark_foreign(req.gdst, proto, c)  # someone else holds it
                            self._stats.directed_misses += 1
                            misses += 1
                            retry.append(i)
                            continue
                    if e == 0:
                        key = (req.gdst, proto, spi)
                        if guard is not None and not ok[j]:
                            # Held: maybe its holder just died (the EXPIRE is queued
                            # before the kernel could hand the SPI out again).
                            self._stats.collisions += 1
                            self.poll_events()
                            retry.extend(self._reap(owned, holder, spis))
                            if not guard.reserve(*key):
                                self._delete(req.daddr, spi, req.family, proto, req.mark)
                                why[i] = DuplicateSpi(f"the kernel kept returning outstanding SPIs (last {spi:#010x})")
                                retry.append(i)
                                continue
                        owned[i] = key
                        holder[key] = i
                        spis[i] = spi
                        if guard is not None:
                            keys.add(key)
                            self._inflight.add(key)
                            self._died.discard(key)
                    elif e == LOST:
                        lost += 1
                        why[i] = NetlinkError(errno.ENOBUFS, "reply dropped: receive buffer full", "allocspi")
                        retry.append(i)
                    elif e in RESTART_ERRNOS:
                        why[i] = NetlinkError(errno.EINTR, "interrupted by a signal", "allocspi")
                        retry.append(i)  # the kernel gave up on it before allocating
                    elif e == errno.ENOENT and guard is not None and not directed:
                        retry.append(i)  # asked again below, directed
                    else:
                        errors[i] = from_errno(e, text, "allocspi")
                if lost:
                    known = {spi for spi in spis if spi}
                    self._recover_lost(req, lost, since, known=known)
                in_round = None
                dead = self._reap(owned, holder, spis) + self._drop_dead(req, owned, holder, spis, began)
                for i in dead:
                    why[i] = ReservationLost(
                        "the larval state expired before the batch ended: raise acq_expires, "
                        "or allocate in smaller batches"
                    )
                retry.extend(dead)
                if retry:
                    self._stats.retries += len(retry)
                    directed = guard is not None
                pending = sorted(set(retry))
                if len(owned) <= before and not misses:
                    break  # a round that gained nothing: asking again will not either
            for i in pending:
                errors[i] = why.get(i) or NetlinkError(errno.EAGAIN, "no SPI after repeated tries", "allocspi")
            if refused:
                self._claim_stray(req)
        except BaseException:
            # Interrupted (Ctrl-C, close, a bug): every state this batch made goes.
            doomed = {spis[i] for i in owned}
            if in_round is not None:
                r_asked, r_got, r_errs, r_cands = in_round
                doomed.update(g for g, e in zip(r_got, r_errs, strict=True) if e == 0)
                if guard is not None:
                    for c in r_cands:
                        if (req.gdst, proto, c) not in holder:
                            guard.release(req.gdst, proto, c)
            self._release_keys([(req.daddr, spi, req.family, proto, req.mark) for spi in doomed])
            raise
        finally:
            self._inflight.difference_update(keys)
        late = keys & self._died
        if late:
            # Died between the last check and now: the caller gets them, and
            # hears of their loss as for any other reservation.
            self._died.difference_update(keys)
            for i, key in owned.items():
                if key in late:
                    self._lost(reservation_from(req, spis[i]))
        return spis, errors

    def _engine_round(
        self, req: Request, n: int, cands: list[int] | None, since: float, chunk: int
    ) -> tuple[list[int], list[int], str | None, bool]:
        """One engine call for ``n`` requests (exact SPIs when ``cands``)."""
        ranges = None if cands is None else (array.array("I", cands), array.array("I", cands))
        sock = self._sock
        with sock.lock:
            seq0 = sock.next_seq(n)
            try:
                got, errs, text, overruns = self._engine.alloc_batch(
                    sock.sock, sock.portid, req.template, n, seq0, ranges, min(chunk, sock.window()), _no_interrupt
                )
            except BaseException as exc:
                self._abandon_round(req, getattr(exc, "spialloc_partial", None), cands or [], since)
                raise
        self._stats.batches += 1
        self._stats.overruns += overruns
        return list(got), list(errs), text, bool(overruns) or LOST in errs

    def _reap(
        self, owned: dict[int, tuple[bytes, int, int]], holder: dict[tuple[bytes, int, int], int], spis: list[int]
    ) -> list[int]:
        """Indices of this batch whose state the watcher saw die (in flight,
        so kept from on_lost): free them to be asked again."""
        dead = []
        for key in self._died.intersection(holder):
            i = holder.pop(key)
            owned.pop(i, None)
            self._died.discard(key)
            if self.guard is not None:
                self.guard.release(*key)  # expired by the watcher already; make sure
            spis[i] = 0
            dead.append(i)
        self._stats.expired_in_batch += len(dead)
        return dead

    def _drop_dead(
        self,
        req: Request,
        owned: dict[int, tuple[bytes, int, int]],
        holder: dict[tuple[bytes, int, int], int],
        spis: list[int],
        began: float,
    ) -> list[int]:
        """Once a batch has run for a good part of the larval lifetime, check
        with a dump: indices whose SPI is missing, or held twice, died."""
        dead: list[int] = []
        if time.monotonic() - began > self._larval_lifetime() / 2:
            present = {s.spi for s in self._dump_states() if s.proto == req.proto and pack_address(s.dst) == req.daddr}
            seen: set[int] = set()
            for i in sorted(owned):
                spi = spis[i]
                if spi not in present or spi in seen:
                    dead.append(i)
                seen.add(spi)
        for i in set(dead):
            key = owned.pop(i)
            if holder.get(key) == i:
                del holder[key]
                if self.guard is not None:
                    self.guard.release(*key)
            spis[i] = 0
            self._stats.expired_in_batch += 1
        return sorted(set(dead))

    def _larval_lifetime(self) -> float:
        if self._acq_expires is None:
            try:
                self._acq_expires = float(self.acq_expires)
            except (OSError, ValueError, SpiallocError):
                self._acq_expires = 30.0  # the kernel's default
        return self._acq_expires

    def _abandon_round(
        self, req: Request, partial: tuple[Sequence[int], Sequence[int]] | None, cands: list[int], since: float
    ) -> None:
        """An interrupted engine call: delete what the kernel allocated, free the guard."""
        if self.guard is not None:
            for c in cands:
                self.guard.release(req.gdst, req.proto, c)
        if partial is None:
            return
        got, errs = partial
        keys = [(req.daddr, s, req.family, int(req.proto), req.mark) for s, e in zip(got, errs, strict=True) if e == 0]
        self._release_keys(keys)
        lost = sum(1 for e in errs if e == LOST)
        if lost:
            self._recover_lost(req, lost, since, known=set())

    def _recover_lost(self, req: Request, lost: int, since: float, known: set[int] | None = None) -> None:
        """Replies were dropped (ENOBUFS): the kernel may hold larval states
        nobody knows.  Find them in a dump (same request parameters, made since
        the batch began, not ours and not in the guard) and delete them."""
        known = known or set()
        found = 0
        for st in self._dump_states():
            if not st.larval or st.acquire_seq:
                continue
            if (
                st.proto != req.proto
                or pack_address(st.dst) != req.daddr
                or pack_address(st.src) != req.saddr
                or st.mode != req.mode
                or st.reqid != req.reqid
                or (st.mark or (0, 0)) != (req.mark or (0, 0))  # the kernel omits zero values
                or (st.if_id or 0) != (req.if_id or 0)
                or st.added < int(since)
                or st.spi in known
            ):
                continue
            if self.guard is not None and self.guard.is_outstanding(req.gdst, req.proto, st.spi):
                continue
            self._delete(req.daddr, st.spi, req.family, req.proto, req.mark)
            found += 1
        self._stats.recovered += found

    # --- release ----------------------------------------------------------------

    def release(self, reservations: Reservation | Iterable[Reservation]) -> int:
        """Delete the larval state(s) (DELSA) and free their tuples in the guard.

        A state already gone (expired, deleted by someone else, never
        installed) is not an error; a reservation the guard knows as lost is
        not deleted at all (its SPI may belong to someone else by now).
        Returns how many states were deleted.
        """
        self._check_open()
        if isinstance(reservations, Reservation):
            items = [reservations]
        elif isinstance(reservations, Iterable) and not isinstance(reservations, (str, bytes)):
            items = list(reservations)
        else:
            raise InvalidRequest(f"release takes a Reservation or an iterable of them, got {reservations!r}")
        keys = [_release_key(r) for r in items]  # all validated before any syscall
        guard = self.guard
        if guard is not None:
            # A lost reservation's state is gone, and its SPI may be someone
            # else's by now: deleting by (dst, spi, proto) would hit theirs.
            keys = [k for k in keys if not guard.is_lost(guard_dst(k[2], k[0]), k[3], k[1])]
        return self._release_keys(keys)

    def _release_keys(self, keys: list[tuple[bytes, int, int, int, tuple[int, int] | None]]) -> int:
        if not keys:
            return 0
        if len(keys) == 1:
            deleted = int(self._delete(*keys[0]))
        else:
            deleted = self._delete_many(keys)
        if self.guard is not None:
            for daddr, spi, family, proto, _ in keys:
                gkey = (guard_dst(family, daddr), proto, spi)
                self.guard.release(*gkey)
                if self._held:
                    self._held.pop(gkey, None)
                if self._origin:
                    self._origin.pop(gkey, None)
        self._stats.released += deleted
        return deleted

    def _delsa_message(self, daddr: bytes, spi: int, family: int, proto: int, mark: tuple[int, int] | None) -> bytes:
        return w.delsa(0, w.usersa_id(daddr, spi, family, proto), w.sa_attrs(mark, None, None, None))

    def _delete(self, daddr: bytes, spi: int, family: int, proto: int, mark: tuple[int, int] | None) -> bool:
        msg = bytearray(self._delsa_message(daddr, spi, family, proto, mark))
        with self._sock.lock:
            seq = self._sock.next_seq()
            w.patch_seq(msg, 0, seq)
            try:
                self._sock.transact(bytes(msg), seq, "delsa")
            except NetlinkError as exc:
                if exc.errno == errno.ESRCH:
                    return False
                raise
        return True

    def _delete_many(self, keys: list[tuple[bytes, int, int, int, tuple[int, int] | None]]) -> int:
        # Messages differ only in size when some carry a mark: batch by size.
        by_size: dict[int, list[bytes]] = {}
        for k in keys:
            m = self._delsa_message(*k)
            by_size.setdefault(len(m), []).append(m)
        deleted = 0
        sock = self._sock
        for size, msgs in by_size.items():
            with sock.lock:
                seq0 = sock.next_seq(len(msgs))
                errs = self._engine.delsa_batch(
                    sock.sock, sock.portid, b"".join(msgs), size, len(msgs), seq0, sock.window()
                )
            for e in errs:
                if e == 0:
                    deleted += 1
                elif e == LOST:
                    # Only the ack was dropped: the kernel handles a request
                    # inside sendmsg, so the state is gone (counted as ours).
                    self._stats.overruns += 1
                    deleted += 1
                elif e not in (errno.ESRCH,):
                    raise from_errno(e, None, "delsa")
        return deleted

    # --- guard lifecycle --------------------------------------------------------

    def commit(self, reservation: Reservation) -> None:
        """Mark the reservation as installed (the caller ran UPDSA on it): the
        guard keeps its tuple outstanding until ``release``.  Raises
        ReservationLost if its larval state expired first."""
        self._check_open()
        if self.guard is None:
            return
        self.poll_events()
        self.guard.commit(*reservation.key)
        self._held.pop(reservation.key, None)
        self._origin.pop(reservation.key, None)

    def poll_events(self) -> int:
        """Process queued EXPIRE events now (the watcher thread does it too)."""
        if self._events is None:
            return 0
        handled = 0
        with self._events.lock:
            while True:
                data = self._events.recv_nowait()
                if data is None:
                    break
                handled += self._handle_events(data)
            if self._events.overruns:
                self._events.overruns = 0
                self._resync_lost()
        return handled

    def _handle_events(self, data: memoryview) -> int:
        handled = 0
        for kind, _, _, _, payload in w.iter_messages(data):
            if kind != w.XFRM_MSG_EXPIRE:
                continue
            sa, hard = w.decode_expire(payload)
            if not hard or self.guard is None:
                continue
            handled += 1
            key = (guard_dst(sa.family, sa.daddr), sa.proto, sa.spi)
            if key in self._inflight:
                self._died.add(key)
                self.guard.expire(*key)
                continue
            if self._held and self._renew(key):
                continue
            old = self.guard.expire(*key)
            origin = self._origin.pop(key, None)
            if old is State.RESERVED:
                self._lost(reservation_from(origin, sa.spi) if origin else KernelState.from_wire(sa).reservation())
        return handled

    def _renew(self, key: tuple[bytes, int, int]) -> bool:
        """A held reservation's larval state expired: allocate its SPI again.
        The guard keeps the tuple reserved meanwhile, so no thread of ours
        can take it; another process could, and then it is lost after all."""
        held = self._held.pop(key, None)
        if held is None or time.monotonic() >= held[1] or self.guard is None:
            return False
        if self.guard.state(*key) is not State.RESERVED:
            return False
        try:
            self._alloc_one(held[0], key[2], key[2])
        except SpiallocError:
            return False
        self._held[key] = held
        self._stats.renewed += 1
        return True

    def _lost(self, reservation: Reservation) -> None:
        self._stats.lost += 1
        if self.on_lost is not None:
            try:
                self.on_lost(reservation)
            except Exception as exc:  # a callback bug must not kill the watcher
                warnings.warn(f"spialloc on_lost callback raised {exc!r}", RuntimeWarning, stacklevel=2)

    def _resync_lost(self) -> None:
        """EXPIRE events were dropped: anything the guard holds as reserved
        that is no longer in the SAD has died unseen."""
        guard = self.guard
        if guard is None:
            return
        present = {(address_key(s.dst), int(s.proto), s.spi) for s in self._dump_states()}
        self._expire_missing(present)

    def _expire_missing(self, present: set[tuple[bytes, int, int]]) -> None:
        """Reserved tuples whose state is not in the SAD died unseen.  on_lost
        gets the reservation as allocated when on_lost was set at allocation
        time; otherwise only spi, dst and proto are known (the event with the
        state's details was dropped)."""
        guard = self.guard
        assert guard is not None
        for key in guard.reserved():
            if key in present:
                continue
            if key in self._inflight:
                self._died.add(key)
                guard.expire(*key)
            elif guard.expire(*key) is State.RESERVED:
                origin = self._origin.pop(key, None)
                if origin is not None:
                    self._lost(reservation_from(origin, key[2]))
                    continue
                dst = guard_dst_address(key[0])
                src = ipaddress.ip_address(0) if dst.version == 4 else ipaddress.IPv6Address(0)
                self._lost(Reservation(spi=key[2], dst=dst, src=src, proto=Proto(key[1])))

    def _start_watcher(self) -> None:
        self._events = XfrmSocket(self.ns, groups=1 << (w.XFRMNLGRP_EXPIRE - 1), rcvbuf=1 << 20)
        self._wake_r, self._wake_w = os.pipe()
        self._watcher = threading.Thread(target=self._watch, name="spialloc-expiry", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        assert self._events is not None
        while True:
            try:
                ready, _, _ = select.select([self._events.fileno(), self._wake_r], [], [])
            except (OSError, ValueError):
                return
            if self._wake_r in ready:
                return
            try:
                self.poll_events()
            except Exception as exc:  # the watcher must outlive any one bad event
                if self._closed:
                    return
                warnings.warn(f"spialloc expiry watcher: {exc!r}", RuntimeWarning, stacklevel=1)

    # --- reading the SAD --------------------------------------------------------

    def lookup(
        self, dst: Address, spi: int, proto: str | int | Proto = "esp", *, mark: MarkSpec = None
    ) -> KernelState | None:
        """Read one state (GETSA, ``ip xfrm state get``); None if there is none."""
        self._check_open()
        d = parse_address("dst", dst)
        p = parse_proto(proto)
        if isinstance(spi, bool) or not isinstance(spi, int) or not 0 <= spi <= 0xFFFFFFFF:
            raise InvalidRequest(f"spi={spi!r} must be an integer 0..0xffffffff")
        family = w.AF_INET if d.version == 4 else w.AF_INET6
        msg = bytearray(
            w.getsa(0, w.usersa_id(pack_address(d), spi, family, p), w.sa_attrs(parse_mark(mark), None, None, None))
        )
        with self._sock.lock:
            seq = self._sock.next_seq()
            w.patch_seq(msg, 0, seq)
            try:
                kind, payload = self._sock.transact(bytes(msg), seq, "getsa")
            except NetlinkError as exc:
                if exc.errno == errno.ESRCH:
                    return None
                raise
        if kind != w.XFRM_MSG_NEWSA or payload is None:
            return None
        return KernelState.from_wire(w.decode_sa(payload))

    def _dump_states(self) -> list[KernelState]:
        return [KernelState.from_wire(sa) for sa in self._sock.dump_sas()]

    def states(self, *, larval: bool | None = None, proto: str | int | Proto | None = None) -> list[KernelState]:
        """Every state in the namespace (GETSA dump, ``ip xfrm state list``),
        of all processes; ``larval=True`` keeps only larval ones."""
        self._check_open()
        p = None if proto is None else parse_proto(proto)
        out = self._dump_states()
        return [s for s in out if (larval is None or s.larval == larval) and (p is None or s.proto == p)]

    def sync(self) -> int:
        """Seed the guard from the SAD: every state that is not ours is marked
        foreign, so it is never handed out, and reservations whose state is
        gone are marked lost.  Returns the number of foreign tuples."""
        self._check_open()
        guard = self.guard
        if guard is None:
            return 0
        states = self._dump_states()
        guard.clear_foreign()
        foreign = 0
        for s in states:
            if not isinstance(s.proto, Proto):
                continue
            gkey = address_key(s.dst)
            if not guard.is_outstanding(gkey, s.proto, s.spi):
                guard.mark_foreign(gkey, s.proto, s.spi)
                foreign += 1
        self._expire_missing({(address_key(s.dst), int(s.proto), s.spi) for s in states})
        return foreign

    # --- namespace settings -----------------------------------------------------

    @property
    def acq_expires(self) -> int:
        """``net.core.xfrm_acq_expires`` of the namespace: larval lifetime, seconds."""
        try:
            return int(read_sysctl(self.ns, "net.core.xfrm_acq_expires"))
        except (OSError, NamespaceError) as exc:
            raise _no_acq_sysctl(exc) from None

    @acq_expires.setter
    def acq_expires(self, seconds: int) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 1:
            raise InvalidRequest(f"acq_expires={seconds!r} must be a positive integer (seconds)")
        try:
            write_sysctl(self.ns, "net.core.xfrm_acq_expires", seconds)
        except (OSError, NamespaceError) as exc:
            raise _no_acq_sysctl(exc) from None
        self._acq_expires = float(seconds)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        guard = "off" if self.guard is None else "on"
        return f"<Allocator {self.ns.description} backend={self.backend} guard={guard} {state}>"


def _all_outstanding(req: Request) -> SpiExhausted:
    """The guard, not the kernel, found no free value in the range."""
    return SpiExhausted(
        errno.ENOENT,
        f"every SPI in {req.spi_min:#x}-{req.spi_max:#x} is outstanding (held by this process, or seen held by others)",
        "allocspi",
    )


def _check_hold(hold: object, watching: bool) -> None:
    if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not hold > 0:
        raise InvalidRequest(f"hold={hold!r} must be a positive number of seconds")
    if not watching:
        raise InvalidRequest("hold needs the guard's expiry watcher (guard on, watch_expiry=True)")


def _no_acq_sysctl(exc: OSError | NamespaceError) -> NamespaceError:
    code = exc.errno or errno.EIO
    if code == errno.ENOENT:
        return NamespaceError(
            code,
            "net.core.xfrm_acq_expires is not available here: the kernel hides XFRM sysctls "
            "in network namespaces owned by a user namespace (run as root to change it)",
        )
    return NamespaceError(code, f"net.core.xfrm_acq_expires: {exc.strerror or exc}")


def _release_key(r: object) -> tuple[bytes, int, int, int, tuple[int, int] | None]:
    if not isinstance(r, Reservation):
        raise InvalidRequest(f"release takes Reservations, got {r!r}")
    dst = parse_address("dst", r.dst)
    proto = parse_proto(r.proto)
    if isinstance(r.spi, bool) or not isinstance(r.spi, int) or not 0 <= r.spi <= 0xFFFFFFFF:
        raise InvalidRequest(f"spi={r.spi!r} must be an integer 0..0xffffffff")
    family = w.AF_INET if dst.version == 4 else w.AF_INET6
    return (pack_address(dst), r.spi, family, int(proto), parse_mark(r.mark))


def _no_interrupt() -> None:
    return None
