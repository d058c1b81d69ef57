"""The allocation rules, with no I/O: what to ask the kernel and what its answers mean.

Every rule that decides which SPI a caller gets lives here once: the guarded
single allocation (retry on a duplicate, directed picks, learning from a
refused pick, one resync when values marked foreign may be stale), batch
rounds (the same rules, a round at a time, plus states that expire before
their batch ends), and what an EXPIRE or a SAD dump means for the guard.

The rules are generators that yield kernel operations (the ``*Op`` tuples)
and receive each one's result, or have its exception thrown in.  The
blocking ``Allocator`` and the awaiting ``AsyncAllocator`` drive the very
same generators (``single_plan`` here, ``_batch.BatchRun`` on the same
helpers); ``tests/unit/test_rules.py`` drives them against a scripted
kernel.  Nothing here opens a socket, starts a thread or reads a clock: a
batch is given its start times and asks for the larval lifetime as an op.
"""

from __future__ import annotations

import array
import errno
import inspect
import random
import threading
import weakref
from dataclasses import dataclass, field
from itertools import repeat
from time import time as _time
from typing import Any, Callable, Generator, Generic, Iterable, NamedTuple, Sequence, TypeVar, Union

from . import _log
from ._model import (
    KernelState,
    Proto,
    Request,
    Reservation,
    address_key,
    guard_dst,
    pack_address,
    reservation_from,
)
from .errors import (
    STRAY,
    DuplicateSpi,
    ReservationLost,
    SpiallocError,
    SpiExhausted,
)
from .guard import OWNER_MASK, Guard, State, owner_of

T = TypeVar("T")
#: (guard dst key, proto, spi): one tuple the guard tracks.
Key = tuple[bytes, int, int]
#: What DELSA needs: (daddr, spi, family, proto, mark).
DelKey = tuple[bytes, int, int, int, Union[tuple[int, int], None]]

#: An engine's per-request result for a reply the kernel dropped (ENOBUFS):
#: the request was handled, so a larval state may exist that nobody knows.
LOST = -2
#: In an interrupted engine call's partial result: the request was never sent.
PENDING = -1
#: At most this many engine rounds per batch (each round asks again, batched,
#: for what the previous one lost); a round that gains nothing ends it sooner.
BATCH_ROUNDS = 16
#: Ranges at most this wide are filled by directed allocation: the guard picks
#: a free value and asks for exactly it, instead of the kernel's random picks
#: with replacement that fail spuriously while free values remain.
DIRECTED_MAX_RANGE = 1 << 16


# --- operations the rules ask the kernel for -------------------------------------------


class AllocOp(NamedTuple):
    """One ALLOCSPI for ``req`` with the range ``lo``-``hi``; result: the SPI.
    ``box``: as ``Kernel.alloc_one``'s (the SPI as soon as the reply is read)."""

    req: Request
    lo: int
    hi: int
    box: list[Any] | None = None


class DeleteOp(NamedTuple):
    """One DELSA; result: whether a state was deleted."""

    daddr: bytes
    spi: int
    family: int
    proto: int
    mark: tuple[int, int] | None


class PollOp(NamedTuple):
    """Handle queued EXPIRE events now; result: how many."""


#: A Stepper's operation before its plan's first (it is never carried out).
_NO_OP = PollOp()


class SyncOp(NamedTuple):
    """Re-seed the guard's foreign marks from a SAD dump; result: their count."""


class ClaimOp(NamedTuple):
    """Remove the SPI-0 larval state a refused ALLOCSPI left; result: None."""

    req: Request


class RoundOp(NamedTuple):
    """One engine call: ``n`` ALLOCSPIs for ``req``, for exactly ``cands`` when
    given; result: a ``RoundResult``."""

    req: Request
    n: int
    cands: Sequence[int] | None
    since: float
    chunk: int
    #: Filled by the kernel side with (got, errs) the moment the engine
    #: returns, before anything can be interrupted: an interrupt between
    #: there and the plan resuming still finds the round's states.
    box: list[tuple[Sequence[int], Sequence[int]] | None] | None = None


class RecoverOp(NamedTuple):
    """Replies were dropped: delete the orphans ``orphans`` finds for them
    in a dump; result: their count."""

    req: Request
    lost: int  # replies dropped
    since: float  # the batch began (wall clock, the SAD's add time)
    known: frozenset[int]  # SPIs of req the batch already holds
    spis: frozenset[int] | None = None  # directed: the SPIs the lost requests named
    doubt: bool = False  # some request of the round was refused


class PresentOp(NamedTuple):
    """The SPIs of ``req``'s proto and destination in the SAD (a dump)."""

    req: Request


class LifetimeOp(NamedTuple):
    """The larval lifetime of the namespace, seconds."""


class ReleaseOp(NamedTuple):
    """Delete these states and forget them; result: how many were deleted."""

    keys: list[DelKey]


Op = Union[AllocOp, DeleteOp, PollOp, SyncOp, ClaimOp, RoundOp, RecoverOp, PresentOp, LifetimeOp, ReleaseOp]
Plan = Generator[Op, object, Reservation]


def made_by(st: KernelState, req: Request) -> bool:
    """Whether ``st`` has every field the kernel keeps from ``req``: the
    state an ALLOCSPI with ``req`` made or reused."""
    return (
        st.proto == req.proto
        and pack_address(st.dst) == req.daddr
        and pack_address(st.src) == req.saddr
        and st.mode == req.mode
        and st.reqid == req.reqid
        and (st.mark or (0, 0)) == (req.mark or (0, 0))  # the kernel omits zero values
        and (st.if_id or 0) == (req.if_id or 0)
    )


def orphans(op: RecoverOp, states: Iterable[KernelState], guard: Guard | None) -> list[int] | None:
    """The SPIs of the larval states made by ``op.lost`` requests whose
    replies were dropped, or None when they cannot be told from states that
    another allocator made with the same request (then they are left to
    expire: deleting another's state is worse than a larval state too many).

    A state is a candidate when it matches the request in every field the
    kernel keeps, was made since the batch began, is not an ACQ state of the
    kernel's, is not already ours and is not reserved in the guard by anyone
    else.  Directed requests named their SPIs, so only those can be ours.
    Random ones are told apart by count alone, which holds only if every
    dropped request made a state, so not after a refusal in the round, and
    only if there are no more candidates than dropped replies."""
    req = op.req
    found: list[int] = []
    for st in states:
        if not st.larval or st.acquire_seq or st.spi in op.known:
            continue
        if op.spis is not None and st.spi not in op.spis:
            continue
        if not made_by(st, req) or st.added < int(op.since):
            continue
        if op.spis is None and guard is not None and guard.is_outstanding(req.gdst, req.proto, st.spi):
            continue
        found.append(st.spi)
    if op.doubt or len(found) > op.lost:
        return None
    return found


class Stepper(Generic[T]):
    """Runs a plan one operation at a time, for a driver: ``op`` is the
    operation to carry out now; hand back its result with ``send`` or its
    exception with ``throw``; once ``done``, ``value`` is the plan's result
    (an exception the plan raises propagates from ``send``/``throw``)."""

    __slots__ = ("_plan", "op", "done", "value")
    value: T

    def __init__(self, plan: Generator[Op, object, T]) -> None:
        self._plan = plan
        self.done = False
        self.op: Op = _NO_OP
        self._advance(plan.send, None)

    def _advance(self, step: Callable[[Any], Op], arg: Any) -> None:
        try:
            self.op = step(arg)
        except StopIteration as stop:
            self.done, self.value = True, stop.value

    @classmethod
    def thrown(cls, plan: Generator[Op, object, T], exc: BaseException) -> Stepper[T]:
        """A stepper for a plan suspended at a yield, ``exc`` thrown in there
        (as for an exception of the op it waits on)."""
        step = cls.__new__(cls)
        step._plan, step.done, step.op = plan, False, _NO_OP
        step.throw(exc)
        return step

    def send(self, result: object) -> None:
        self._advance(self._plan.send, result)

    def suspended(self) -> bool:
        """The plan waits at a yield (not finished, not running)."""
        return not self.done and inspect.getgeneratorstate(self._plan) == inspect.GEN_SUSPENDED

    def throw(self, exc: BaseException) -> None:
        self._advance(self._plan.throw, exc)


class RoundResult(NamedTuple):
    got: array.array[int]  # SPI per request (valid where errs is 0), array('I')
    errs: Sequence[int]  # 0, a positive errno, or LOST
    text: str | None  # the kernel's extended-ack text of the first error
    overran: bool  # the receive buffer overflowed (replies were dropped)
    #: Every request succeeded (errs all 0): counted once, so a batch's
    #: common case scans its errs no further.
    clean: bool


# --- the bookkeeping the rules act on ------------------------------------------------------


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
    unrecovered: int = 0  # dropped replies whose states could be another's: left to expire
    renewed: int = 0  # held reservations whose expired larval state was made again
    expired_in_batch: int = 0  # states that died before their batch ended (asked again)


#: Every open allocator's Book by owner id: a guard entry's token names the
#: owner that reserved it, so a death seen by any allocator sharing the guard
#: is booked, and reported, to the one that issued the reservation.
_BOOKS: weakref.WeakValueDictionary[int, Book] = weakref.WeakValueDictionary()
_owners_lock = threading.Lock()
#: Random ids, not a count from 1: a handle from another process (pickled)
#: then names an owner here only by a 1 in 2**20 chance, and is refused.
_owner_rng = random.SystemRandom()


def _new_owner(book: Book) -> int:
    with _owners_lock:
        if len(_BOOKS) >= OWNER_MASK // 2:
            raise RuntimeError(f"more than {OWNER_MASK // 2} allocators open in one process")
        while True:
            owner = _owner_rng.getrandbits(20)
            if owner and owner not in _BOOKS:
                _BOOKS[owner] = book
                return owner


def book_of(token: int) -> Book | None:
    """The Book of the allocator that issued a token, if it is still open."""
    owner = owner_of(token)
    return _BOOKS.get(owner) if owner else None


class Flight:
    """The SPIs of one batch round that the guard reserved whole, in flight
    as one object: ``Book.inflight`` would take a key tuple per SPI, three
    set operations each, on the path every guarded batch takes, for a
    question asked only when a state dies."""

    __slots__ = ("gdst", "proto", "spis", "_set")

    def __init__(self, gdst: bytes, proto: int, spis: Sequence[int]) -> None:
        self.gdst, self.proto, self.spis = gdst, proto, spis
        self._set: frozenset[int] | None = None

    def holds(self, key: Key) -> bool:
        if key[0] != self.gdst or key[1] != self.proto:
            return False
        if self._set is None:
            self._set = frozenset(self.spis)
        return key[2] in self._set

    def keys(self) -> list[Key]:
        return list(zip(repeat(self.gdst), repeat(self.proto), self.spis))


@dataclass(eq=False)
class Book:
    """One allocator's bookkeeping: its guard and what the guard alone does
    not know.  Shared by the allocator's faces and its expiry watcher."""

    guard: Guard | None
    max_retries: int = 8
    on_lost: Callable[[Reservation], None] | None = None
    stats: AllocatorStats = field(default_factory=AllocatorStats)
    rng: random.Random = field(default_factory=random.Random)
    #: Held reservations: the request to make their state again, until when,
    #: and the token of the reservation held.
    held: dict[Key, tuple[Request, float, int]] = field(default_factory=dict)
    #: With on_lost set: the request and token of each reservation handed
    #: out, so a loss found by a resync (events dropped) reports the
    #: reservation as the caller holds it.
    origin: dict[Key, tuple[Request, int]] = field(default_factory=dict)
    #: Keys of running batches, not yet seen by the caller: their deaths are
    #: noted in ``died`` (the batch asks again) instead of going to on_lost.
    inflight: set[Key] = field(default_factory=set)
    #: ... and batch rounds in flight whole (``Flight``): no key per SPI.
    flights: set[Flight] = field(default_factory=set)
    died: set[Key] = field(default_factory=set)
    #: Makes "reserve a batch's keys and put them in flight" one step for the
    #: expiry watcher, which checks "in flight?" and expires under it too: in
    #: between, a death would go to on_lost for a reservation never returned.
    lock: threading.RLock = field(default_factory=threading.RLock)
    #: This allocator's id in the tokens it issues (see ``book_of``).
    owner: int = 0

    def __post_init__(self) -> None:
        self.owner = _new_owner(self)

    def in_flight(self, key: Key) -> bool:
        """Whether ``key`` belongs to a running batch (its death is the batch's)."""
        return key in self.inflight or (bool(self.flights) and any(f.holds(key) for f in list(self.flights)))

    def won(self, req: Request, spi: int, token: int) -> Reservation:
        """A single allocation succeeded: count it, and hand it out."""
        self.stats.allocated += 1
        return reservation_from(req, spi, _time(), token)

    def lost(self, key: Key, r: Reservation | None) -> None:
        """A reserved tuple lost its state: count it, log it, tell on_lost of
        the reservation the caller holds (None: nobody was handed one)."""
        self.stats.lost += 1
        _log.guard.warning(
            "reservation lost: %s: its larval state died (expired or deleted) before commit", _log.tuple_text(*key)
        )
        if r is not None:
            self.tell_lost(r)

    def tell_lost(self, r: Reservation) -> None:
        """on_lost(r), if set; its exceptions are logged, never raised."""
        if self.on_lost is not None:
            try:
                self.on_lost(r)
            except Exception:  # a callback bug must not kill the watcher
                _log.guard.exception("on_lost callback raised for %s", r)

    def note(self, req: Request, r: Reservation, hold_until: float | None) -> Reservation:
        """Remember what on_lost and hold renewal need of a guarded reservation."""
        key = (req.gdst, int(req.proto), r.spi)
        if self.on_lost is not None:
            self.origin[key] = (req, r.token)
        if hold_until is not None:
            self.held[key] = (req.with_seq(0), hold_until, r.token)
        return r

    def issued(self, r: Reservation) -> bool:
        """Whether this allocator handed ``r`` out (its token names us)."""
        return type(r.token) is int and r.token > 0 and owner_of(r.token) == self.owner


def is_directed(book: Book, req: Request) -> bool:
    """Whether to pick free values here and ask for exactly them."""
    guard = book.guard
    if guard is None:
        return False
    size = req.spi_max - req.spi_min + 1
    if size <= DIRECTED_MAX_RANGE:
        return True
    # Dense by the guard's count: random kernel picks would hit outstanding
    # values often enough that directed picks are cheaper.  The guard's
    # total bounds the count: most calls need neither lock nor lookup.
    if guard.size_hint() * 16 <= size:
        return False
    return guard.count_in(req.proto, req.gdst) * 16 > size


def all_outstanding(req: Request) -> SpiExhausted:
    """The guard, not the kernel, found no free value in the range."""
    return SpiExhausted(
        errno.ENOENT,
        f"every SPI in {req.spi_min:#x}-{req.spi_max:#x} is outstanding (held by this process, or seen held by others)",
        "allocspi",
    )


def take_candidates(book: Book, req: Request, n: int) -> list[tuple[int, int]]:
    """Up to ``n`` free values of ``req``'s range, reserved in the guard, as
    (spi, token)."""
    guard = book.guard
    assert guard is not None
    return guard.reserve_free_many(req.gdst, req.proto, req.spi_min, req.spi_max, n, book.rng, owner=book.owner)


def refused_pick(book: Book, req: Request, cand: int) -> None:
    """The kernel refused a directed pick: someone outside this guard holds it."""
    guard = book.guard
    assert guard is not None
    guard.release(req.gdst, req.proto, cand)
    guard.mark_foreign(req.gdst, req.proto, cand)
    book.stats.directed_misses += 1
    _log.guard.info(
        "directed pick refused: %s is held outside this guard; marked foreign",
        _log.tuple_text(req.gdst, req.proto, cand),
    )


def may_delete_duplicate(book: Book, req: Request, spi: int) -> bool:
    """After a collision: is the state the kernel returned ours to delete?

    Yes for another destination's SPI (kernels before 6.17) and, without a
    seq, for a fresh state whose SPI the guard still holds (its holder died
    unseen).  No with a seq and the same destination: that is the holder's
    own ACQ state, returned again."""
    assert book.guard is not None
    return not req.seq or book.guard.owner_dst(req.proto, spi, req.gdst) != req.gdst


# --- one guarded allocation ----------------------------------------------------------------


class _Single:
    """The state of one guarded allocation across its retries."""

    def __init__(self, book: Book, req: Request, box: list[Any] | None = None) -> None:
        assert book.guard is not None
        self.book, self.guard, self.req = book, book.guard, req
        self.directed = is_directed(book, req)
        self.size = req.spi_max - req.spi_min + 1
        self.retries = self.misses = 0
        self.refused: SpiExhausted | None = None  # the kernel's own words, kept
        self.resynced = False
        #: [SPI of the state this call made and has not handed out, or None;
        #: the guard token this call holds for it, or 0; the candidate
        #: reserved for the next request, or None; a fast call's seq]
        #: (see single_plan, errors.STRAY); the caller's, so that its own
        #: clean-up sees the same.
        self.box: list[Any] = [None, 0, None, 0] if box is None else box

    def candidate(self) -> Generator[Op, object, int]:
        """A free value, reserved; one resync when foreign marks may be stale."""
        req = self.req
        while True:
            cand = self.guard.reserve_free_trusted(
                req.gdst, req.proto, req.spi_min, req.spi_max, self.book.rng, 1, self.book.owner, self.box
            )
            if cand is not None:
                return cand
            if not self.resynced and self.guard.stats.foreign:
                self.resynced = True  # values marked foreign may have been freed since
                yield SyncOp()
                continue
            if self.refused is not None:
                yield ClaimOp(req)
                raise self.refused
            raise all_outstanding(req)

    def ask(self) -> Generator[Op, object, tuple[int, int | None]]:
        """One ALLOCSPI: (spi, the directed candidate or None)."""
        req = self.req
        while True:
            box = self.box
            box[0], box[1], box[2] = None, 0, None
            cand = None
            if self.directed:
                try:
                    cand = yield from self.candidate()
                except BaseException:
                    if box[2] is not None:  # reserved, and lost on its way here
                        self.guard.release(req.gdst, req.proto, box[2], box[1])
                    raise
            try:
                lo, hi = (cand, cand) if cand is not None else (req.spi_min, req.spi_max)
                got = yield AllocOp(req, lo, hi, box)
            except SpiExhausted as exc:
                if cand is None:
                    yield ClaimOp(req)
                    raise
                self.refused = exc
                refused_pick(self.book, req, cand)
                self.misses += 1
                if self.misses > min(self.size, 4096):
                    yield ClaimOp(req)
                    raise
                continue
            except BaseException:
                # With a state made (an interrupt after the reply), single_plan
                # deletes it first and then frees the tuple.
                if cand is not None and box[0] is None:
                    self.guard.release(req.gdst, req.proto, cand)
                raise
            assert isinstance(got, int)
            return got, cand


def single_plan(book: Book, req: Request, first: int | None = None, box: list[Any] | None = None) -> Plan:
    """Guarded allocation of one SPI.

    ``first``: an SPI the caller already got with one plain request and
    found outstanding in the guard (the fast path, counted as a collision).

    An interrupt (Ctrl-C, a timer's exception) after the kernel made a state
    for this call and before the Reservation leaves the plan deletes that
    state and frees the tuple this call reserved for it (``_Single.box``);
    not with a seq, whose state is the kernel's ACQ state.
    """
    s = _Single(book, req, box)
    guard = s.guard
    owner = book.owner
    spi = first
    s.box[0] = first
    try:
        while True:
            if spi is None:
                spi, cand = yield from s.ask()
                if cand is not None:
                    if spi == cand:
                        return book.won(s.req, spi, guard.token(s.req.gdst, s.req.proto, spi))  # reserved when picked
                    guard.release(s.req.gdst, s.req.proto, cand)
                token = guard.reserve_trusted(s.req.gdst, s.req.proto, spi, owner, s.box)
                if token:
                    return book.won(s.req, spi, token)
                book.stats.collisions += 1
            # A collision: the kernel returned an SPI that is still out.
            yield PollOp()  # maybe its holder's state just expired
            token = guard.reserve_trusted(s.req.gdst, s.req.proto, spi, owner, s.box)
            if token:
                return book.won(s.req, spi, token)
            deleted = may_delete_duplicate(book, s.req, spi)
            s.box[0] = None  # deleted here, or not this call's to delete
            if deleted:
                yield DeleteOp(s.req.daddr, spi, s.req.family, s.req.proto, s.req.mark)
            s.retries += 1
            book.stats.retries += 1
            _log.guard.warning(
                "collision: the kernel returned %s, which is still outstanding%s; retry %d of %d",
                _log.tuple_text(s.req.gdst, s.req.proto, spi),
                " (its duplicate state deleted)" if deleted else "",
                s.retries,
                book.max_retries,
            )
            if s.retries > book.max_retries:
                raise DuplicateSpi(
                    f"the kernel returned outstanding SPIs {s.retries} times for {s.req.dst} "
                    f"(last {spi:#010x}); giving up after {book.max_retries} retries"
                )
            if s.req.seq:
                s.req = s.req.with_seq(0)
            s.directed = True
            spi = None
    except BaseException as exc:
        left, token, cand, _ = s.box  # (a plan makes no fast call: no seq)
        if left is not None and not s.req.seq and not isinstance(exc, (SpiallocError, GeneratorExit)):
            s.box[0] = None
            if left == STRAY:  # a refused pick: its SPI-less state, and the candidate it asked for
                yield ClaimOp(s.req)
                left = cand
            else:
                yield DeleteOp(s.req.daddr, left, s.req.family, s.req.proto, s.req.mark)
            if token and left is not None:
                guard.release(s.req.gdst, s.req.proto, left, token)
        raise


# --- what the kernel's events and dumps mean -----------------------------------------------


def owner_book(book: Book, key: Key) -> tuple[Book, int]:
    """The Book of the allocator whose reservation holds ``key`` (``book``
    itself when the holder is not an open allocator), and its token."""
    assert book.guard is not None
    token = book.guard.token(*key)
    return (book_of(token) or book), token


def expired(book: Book, key: Key) -> tuple[Book, State, int] | None:
    """A state died (EXPIRE, or missing from a dump): free its tuple.
    Returns the Book of the allocator whose reservation it was (with a
    shared guard, not necessarily ``book``, whose watcher saw it), the state
    it had in the guard (RESERVED: a reservation was lost) and its token.
    A key of a running batch is noted for the batch instead (None)."""
    guard = book.guard
    assert guard is not None
    owner, token = owner_book(book, key)
    with owner.lock:
        # By token: if the entry changed since (released and reserved again),
        # the new reservation has a new state, which did not die.
        found = guard.expire_entry(*key, token=token)
        if owner.in_flight(key):
            owner.died.add(key)
            return None
    return None if found is None else (owner, found[0], found[1])


def died(book: Book, key: Key) -> None:
    """A state died: free its tuple; a reservation lost goes to its issuer's on_lost."""
    gone = expired(book, key)
    if gone is None:
        return
    owner, state, token = gone
    if state is State.RESERVED:
        owner.lost(key, lost_reservation(owner, key, token))
    else:
        owner.origin.pop(key, None)


def installed(book: Book, key: Key) -> None:
    """An UPDSA (anyone's) turned the tuple's larval state into a real SA:
    its current reservation is committed, as ``commit()`` would."""
    guard = book.guard
    assert guard is not None
    owner, token = owner_book(book, key)
    if not token:
        return  # not a reservation of this guard (free, or another's state)
    with owner.lock:
        if owner.in_flight(key):
            return  # a running batch's: nobody knows its SPI yet
        try:
            guard.commit(*key, token)
        except ReservationLost:
            return
        owner.held.pop(key, None)
        owner.origin.pop(key, None)


def renewable(book: Book, key: Key, now: float) -> tuple[Book, Request] | None:
    """A held reservation's state expired: its issuer's Book and the request
    to make it again (same SPI), or None when the hold ran out or the
    reservation is not current any more."""
    if book.guard is None:
        return None
    owner, token = owner_book(book, key)
    held = owner.held.pop(key, None)
    if held is None or now >= held[1] or held[2] != token:
        return None
    if book.guard.state(*key) is not State.RESERVED:
        return None
    owner.held[key] = held
    return owner, held[0]


def lost_reservation(book: Book, key: Key, token: int) -> Reservation | None:
    """The reservation to report lost, as it was handed out; None if it was
    not handed out while on_lost was set (``Book.note`` and batches keep the
    request of each one they hand out then), e.g. a batch's state that died
    before the caller got it: on_lost only reports reservations you hold."""
    origin = book.origin.pop(key, None)
    if origin is None or origin[1] != token:
        return None
    return reservation_from(origin[0], key[2], token=token)


def missing_from(book: Book, present: set[Key], before: int) -> None:
    """Reserved or committed tuples whose state is not in the SAD died
    unseen (expired, deleted, flushed): each goes as ``died`` says.
    ``before``: the guard's ``mark()`` taken before the dump (a reservation
    made since may be missing only for being newer)."""
    guard = book.guard
    assert guard is not None
    for key in guard.reserved(before, committed=True):
        if key not in present:
            died(book, key)


def state_keys(states: Iterable[KernelState]) -> set[Key]:
    return {state_key(s) for s in states}


def state_key(st: KernelState) -> Key:
    """The guard's tuple for a state of the SAD."""
    return (address_key(st.dst), int(st.proto), st.spi)


def seed_foreign(book: Book, states: Sequence[KernelState]) -> int:
    """Every state in the SAD that is not ours is marked foreign, so it is
    never handed out; returns how many."""
    guard = book.guard
    assert guard is not None
    guard.clear_foreign()
    foreign = 0
    for s in states:
        if not isinstance(s.proto, Proto):
            continue
        gkey = address_key(s.dst)
        if not guard.is_outstanding(gkey, s.proto, s.spi):
            guard.mark_foreign(gkey, s.proto, s.spi)
            foreign += 1
    return foreign


def leftovers(
    book: Book,
    states: Iterable[KernelState],
    reqid: int | None,
    mark: tuple[int, int] | None,
    if_id: int | None,
) -> list[KernelState]:
    """Larval states a previous run of the daemon left (it crashed, or was
    killed, before releasing them): an SPI given, not bound to an ACQUIRE
    (the kernel's ACQ states are the kernel's), matching every selector
    given - what the daemon, and only it, puts in its requests - and not
    reserved or committed in this allocator's guard."""
    guard = book.guard
    out = []
    for st in states:
        if not st.larval or not st.spi or st.acquire_seq:
            continue
        if reqid is not None and st.reqid != reqid:
            continue
        if mark is not None and (st.mark or (0, 0)) != mark:
            continue
        if if_id is not None and (st.if_id or 0) != if_id:
            continue
        if guard is not None and isinstance(st.proto, Proto):
            if guard.state(address_key(st.dst), st.proto, st.spi) in (State.RESERVED, State.COMMITTED):
                continue
        out.append(st)
    return out


def guard_key(k: DelKey) -> Key:
    """The guard's tuple for the state a DELSA key names."""
    return (guard_dst(k[2], k[0]), k[3], k[1])


def stale(book: Book, reservations: Iterable[Reservation]) -> list[Reservation]:
    """Those of ``reservations`` (issued by this allocator) that are not
    current: their state died or they were released, perhaps with the SPI
    handed out again since.  Releasing them could delete another's state."""
    guard = book.guard
    assert guard is not None
    return [r for r in reservations if not guard.is_current(*r.key, r.token)]


def forget(book: Book, keys: Iterable[DelKey], tokens: Sequence[int] | None = None) -> None:
    """Released: the tuples are free again (given tokens, only those
    reservations' entries)."""
    guard = book.guard
    if guard is None:
        return
    for n, k in enumerate(keys):
        key = guard_key(k)
        guard.release(*key, None if tokens is None else tokens[n])
        if book.held:
            book.held.pop(key, None)
        if book.origin:
            book.origin.pop(key, None)


def forget_batch(book: Book, req: Request, spis: Sequence[int], tokens: Sequence[int]) -> None:
    """``forget`` for reservations of one request, in bulk."""
    guard = book.guard
    if guard is None:
        return
    proto = int(req.proto)
    guard.release_many(req.gdst, proto, spis, tokens)
    for d in (book.held, book.origin):
        if d:
            for spi in spis:
                d.pop((req.gdst, proto, spi), None)


def committed(book: Book, r: Reservation) -> None:
    """The caller installed the SA: raises ReservationLost if ``r`` is not
    the current reservation of its tuple."""
    assert book.guard is not None
    key = r.key
    book.guard.commit(*key, r.token)
    book.held.pop(key, None)
    book.origin.pop(key, None)
