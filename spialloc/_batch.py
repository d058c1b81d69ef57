"""Batch rounds: the allocation rules of ``_rules`` for many SPIs at once.

Sans I/O like ``_rules``: ``BatchRun.plan()`` yields the same operations
(a ``RoundOp`` per engine call) and is driven by the same drivers.
"""

from __future__ import annotations

import array
import errno
from itertools import repeat
from typing import Callable, Generator, Iterable, MutableSequence, Sequence

from . import _log
from ._model import Request
from ._rules import (
    BATCH_ROUNDS,
    LOST,
    Book,
    ClaimOp,
    DeleteOp,
    DelKey,
    Flight,
    Key,
    LifetimeOp,
    Op,
    PollOp,
    PresentOp,
    RecoverOp,
    ReleaseOp,
    RoundOp,
    RoundResult,
    SyncOp,
    all_outstanding,
    is_directed,
    refused_pick,
    take_candidates,
)
from .errors import (
    RESTART_ERRNOS,
    ClosedError,
    DuplicateSpi,
    NetlinkError,
    ReservationLost,
    SpiallocError,
    from_errno,
)

_DROPPED = "reply dropped: receive buffer full"
_GAVE_UP = "no SPI after repeated tries"


class BatchRun:
    """One ``allocate_many``: rounds of engine calls until every index has an
    SPI or an error.

    Round one asks for everything; each later round asks again, batched, for
    what was lost: dropped replies, collisions, directed misses, and states
    that expired before the batch ended (a batch in a large table can outlive
    the larval lifetime).  With the guard, every success is reserved as soon
    as the engine returns and its key is marked in flight, so an EXPIRE for it
    is neither missed nor reported to on_lost (the caller has not seen it):
    the index is asked again instead.

    ``plan()`` is the generator to drive; afterwards ``spis`` and ``errors``
    hold the outcome and ``late`` the indices that died after their last
    check (delivered, then reported lost as any other reservation).
    """

    # Scalars that most batches never change start as class attributes: a
    # batch is made per allocate_many, and its set-up is on the hot path.

    #: The first round got every index its SPI (and, with the guard,
    #: reserved them all): ``spis`` holds them and ``bulk_tokens`` their
    #: tokens, and the per-index maps are made only if a rare path
    #: (a death, a dump check, an interrupt) asks for them.
    bulk = False
    bulk_tokens: int | None = None
    #: Round one reserved whole: in flight as one Flight (until
    #: hand_over), its one token ``bulk_tokens``; a token per key in
    #: ``tokens`` only once a rare path asks (``_unlanded`` until then).
    flight: Flight | None = None
    _unlanded: tuple[Flight, int] | None = None
    resynced = False
    refused = False
    finished = False  # the plan ran to its end: its states await hand-off
    settled = False  # ... and were handed out or released
    #: The round under way: (asked, result, candidates), for clean-up.
    in_round: tuple[Sequence[int], RoundResult | None, Sequence[int]] | None = None
    #: This round's directed candidates, by index of ``asked`` (none for random picks).
    cands: Sequence[int] = ()
    #: Round one's result and which of its SPIs were reserved, when the
    #: caller made that engine call itself (``first_round``, ``took_first``):
    #: the plan starts from them instead of asking.
    _first: tuple[RoundResult, list[bool]] | None = None
    #: plan() has started: from then on it cleans up after itself.
    planned = False
    #: Filled by the kernel side with the engine's (got, errs) of the round under way.
    box: list[tuple[Sequence[int], Sequence[int]] | None]

    def __init__(self, book: Book, req: Request, count: int, *, since: float, began: float, chunk: int) -> None:
        self.book, self.req, self.count = book, req, count
        self.guard = book.guard
        self.proto = int(req.proto)
        self.since, self.began, self.chunk = since, began, chunk
        self.spis: MutableSequence[int] = [0] * count
        self.errors: dict[int, SpiallocError] = {}
        self._owned: dict[int, Key] = {}  # index -> guard key
        self._holder: dict[Key, int] = {}  # guard key -> index
        self.keys: set[Key] = set()  # every key this batch put in flight (but the flight's)
        self._tokens: dict[Key, int] = {}  # the guard's token of each key this batch reserved
        self.why: dict[int, SpiallocError] = {}  # why an index is being asked again
        self.directed = is_directed(book, req)
        self.late: list[int] = []

    @property
    def tokens(self) -> dict[Key, int]:
        if self._unlanded is not None:
            flight, token = self._unlanded
            self._unlanded = None
            self._tokens.update(zip(flight.keys(), repeat(token)))
        return self._tokens

    @property
    def owned(self) -> dict[int, Key]:
        if self.bulk:
            self._materialize()
        return self._owned

    @property
    def holder(self) -> dict[Key, int]:
        if self.bulk:
            self._materialize()
        return self._holder

    def _materialize(self) -> None:
        self.bulk = False
        ks = list(zip(repeat(self.req.gdst), repeat(self.proto), self.spis))
        self._owned.update(enumerate(ks))
        self._holder.update(zip(ks, range(self.count), strict=True))

    def n_owned(self) -> int:
        return self.count if self.bulk else len(self._owned)

    # -- the driver's generator --

    def plan(self, clock: Callable[[], float], closed: Callable[[], bool]) -> Generator[Op, object, None]:
        """``clock``: monotonic seconds; ``closed``: whether the allocator was
        closed meanwhile (the batch then releases what it has and raises)."""
        self.planned = True
        pending: Sequence[int] = range(self.count)
        try:
            for _ in range(BATCH_ROUNDS):
                if not pending:
                    break
                if closed():
                    raise ClosedError(errno.EBADF, "allocator closed during the batch")
                before = self.n_owned()
                asked = (yield from self._pick(pending)) if self.directed else pending
                if asked is None:
                    continue  # resynced: pick again
                if not asked:
                    pending = []
                    break
                retry, misses = yield from self._round(asked)
                retry.extend((yield from self._drop_dead(clock)))
                if retry:
                    self.book.stats.retries += len(retry)
                    self.directed = self.guard is not None
                pending = sorted(set(retry)) if retry else ()
                if self.n_owned() <= before and not misses:
                    break  # a round that gained nothing: asking again will not either
            for i in pending:
                self.errors[i] = self.why.get(i) or NetlinkError(errno.EAGAIN, _GAVE_UP, "allocspi")
            if self.refused:
                yield ClaimOp(self.req)
            # Last in the try: from here on an interrupt is the caller's to
            # handle (Core.run_batch releases a finished batch's states).
            self.finished = True
        except BaseException:
            try:
                yield ReleaseOp(self._abandon())  # interrupted (Ctrl-C, close, a bug): every state goes
            finally:
                self.hand_over()
            raise
        # A finished batch's keys stay in flight until Core has handed its
        # states out (hand_over) or released them: a death before then is
        # the batch's, never on_lost's (the caller may never see them).

    def _pick(self, pending: Sequence[int]) -> Generator[Op, object, Sequence[int] | None]:
        """Directed picks: the indices to ask for this round, their
        candidates (``cands``) reserved.  None: foreign marks were resynced,
        pick again.  (Random picks ask for every pending index.)"""
        req = self.req
        picked = take_candidates(self.book, req, len(pending))
        cands = [c for c, _ in picked]
        if len(cands) < len(pending) and not self.resynced and self.guard is not None and self.guard.stats.foreign:
            self.resynced = True  # foreign marks may be stale: look again once
            for c in cands:
                self._unreserve((req.gdst, self.proto, c))
            yield SyncOp()
            return None
        self.tokens.update(((req.gdst, self.proto, c), t) for c, t in picked)
        self._in_flight([(req.gdst, self.proto, c) for c in cands])
        for i in pending[len(cands) :]:
            self.errors[i] = all_outstanding(req)
        self.cands = cands
        return pending[: len(cands)]

    def _in_flight(self, ks: Iterable[Key]) -> None:
        ks = list(ks)
        self.keys.update(ks)
        self.book.inflight.update(ks)
        if self.book.died:
            self.book.died.difference_update(ks)  # an earlier death of a value is not this state's

    def first_round(self) -> RoundOp | None:
        """Round one's engine call, for a caller that makes it itself and
        hands the result to ``took_first`` (no driver, no generator: the
        common batch is one engine call and its booking).  Random picks
        only; None for directed ones (``plan()`` picks them)."""
        if self.directed:
            return None
        self.box = [None]
        self.in_round = (range(self.count), None, ())
        return RoundOp(self.req, self.count, None, self.since, self.chunk, self.box)

    def took_first(self, res: RoundResult, elapsed: float, lifetime: float) -> bool:
        """Round one's result (of ``first_round``), reserved as ``plan()``
        reserves a round.  True: it finished the batch, booked as ``plan()``
        books it: every request succeeded and, with the guard, was reserved,
        no death is waiting to be reaped, and the batch is within half the
        larval lifetime (no dump check due).  False: ``plan()`` must run,
        and starts from this result."""
        self.in_round = (range(self.count), res, ())
        ok = self._reserve(res)
        # Deaths last, as plan() reaps them after booking: one that lands
        # after this check is the batch's ``late``, as after plan()'s reap.
        if res.overran or elapsed > lifetime / 2 or not self._clean(res, ok) or self.book.died:
            self._first = (res, ok)
            return False
        self._book_all(range(self.count), res.got)
        self.in_round = None
        self.finished = True
        return True

    def _round(self, asked: Sequence[int]) -> Generator[Op, object, tuple[list[int], int]]:
        """One engine call and its booking: (indices to ask again, directed misses)."""
        cands = self.cands if self.directed else None
        first, self._first = self._first, None
        if first is not None:
            res, ok = first  # round one: made and reserved already (took_first)
        else:
            self.box = [None]
            self.in_round = (asked, None, self.cands)
            answer = yield RoundOp(self.req, len(asked), cands, self.since, self.chunk, self.box)
            assert isinstance(answer, RoundResult)
            res = answer
            self.in_round = (asked, res, self.cands)
            ok = self._reserve(res)
        self.refused = not res.clean and errno.ENOENT in res.errs  # leaves an SPI-0 larval state, unless reused
        if res.overran:
            # The window overflowed the receive buffer: step down to what came back.
            self.chunk = max(1, min(self.chunk, sum(1 for e in res.errs if e != LOST)) // 2)
        if self._clean(res, ok):
            self._book_all(asked, res.got)
            retry: list[int] = []
            misses = lost = 0
        else:
            retry, misses, lost = yield from self._book_each(asked, res, ok)
        if lost:
            known = frozenset(spi for spi in self.spis if spi)
            named = None
            if cands is not None:
                named = frozenset(c for c, e in zip(cands, res.errs, strict=True) if e == LOST)
            doubt = any(e not in (0, LOST) for e in res.errs)
            yield RecoverOp(self.req, lost, self.since, known, named, doubt)
        self.in_round = None
        return retry, misses

    def _reserve(self, res: RoundResult) -> list[bool]:
        """``_reserve_round`` under the book's lock (none without a guard)."""
        if self.guard is None:
            return []
        with self.book.lock:
            # In flight as they are reserved (one step for the watcher): a
            # death of one of these is the batch's, never on_lost's.
            return self._reserve_round(res)

    def _reserve_round(self, res: RoundResult) -> list[bool]:
        """Random picks: the round's successes reserved and put in flight
        (the caller holds the book's lock); which were.  Every request a
        success and every SPI free is the common case, done in bulk."""
        if self.guard is None or self.directed:
            return []
        gdst, proto, got = self.req.gdst, self.proto, res.got
        if res.clean:
            token = self.guard.reserve_batch(gdst, proto, got, self.book.owner)
            if token is not None:
                if not self._owned and len(got) == self.count and self.flight is None:
                    # Round one, every SPI reserved: in flight whole.
                    self.bulk_tokens = token
                    self.flight = Flight(gdst, proto, got)
                    self._unlanded = (self.flight, token)
                    self.book.flights.add(self.flight)
                    if self.book.died:
                        self.book.died.difference_update(self.flight.keys())
                    return [True] * len(got)
                ks = list(zip(repeat(gdst), repeat(proto), got))
                self.tokens.update(zip(ks, repeat(token)))
                self._in_flight(ks)
                return [True] * len(got)
            succ = list(range(len(got)))
            held = self.guard.reserve_many_trusted(gdst, proto, got, self.book.owner)
        else:
            succ = [j for j, e in enumerate(res.errs) if e == 0]
            held = self.guard.reserve_many_trusted(gdst, proto, [got[j] for j in succ], self.book.owner)
        ok = [False] * len(res.errs)
        tokens = self.tokens
        for j, t in zip(succ, held, strict=True):
            if t:
                ok[j] = True
                tokens[(gdst, proto, got[j])] = t
        self._in_flight([(gdst, proto, got[j]) for j, o in enumerate(ok) if o])
        return ok

    def _clean(self, res: RoundResult, ok: list[bool]) -> bool:
        if not res.clean:
            return False
        if self.directed:
            return res.got.tolist() == self.cands
        return self.guard is None or all(ok)

    def _book_all(self, asked: Sequence[int], got: array.array[int]) -> None:
        """Every request of the round came back as asked: book them in bulk."""
        if not self._owned and not self.bulk and len(asked) == self.count and not self.directed:
            self.spis = got  # asked is every index, in order: round one (an array('I'))
            self.bulk = True
            return
        self.bulk_tokens = None  # its tokens stay in _unlanded until asked for
        ks = [(self.req.gdst, self.proto, spi) for spi in got]
        self.owned.update(zip(asked, ks, strict=True))
        self.holder.update(zip(ks, asked, strict=True))
        for i, spi in zip(asked, got, strict=True):
            self.spis[i] = spi

    def _unreserve(self, key: Key) -> None:
        """Free this batch's own reservation of ``key`` (by its token: once
        it died, the tuple may be another reservation's)."""
        token = self.tokens.pop(key, 0)
        if self.guard is not None and token:
            self.guard.release(*key, token)

    def _own(self, i: int, key: Key) -> None:
        self.owned[i] = key
        self.holder[key] = i
        self.spis[i] = key[2]
        self.bulk_tokens = None  # its tokens stay in _unlanded until asked for

    def _book_each(
        self, asked: Sequence[int], res: RoundResult, ok: list[bool]
    ) -> Generator[Op, object, tuple[list[int], int, int]]:
        """Book a round index by index: (to ask again, directed misses, dropped replies)."""
        req, guard = self.req, self.guard
        retry: list[int] = []
        misses = lost = 0
        for j, i in enumerate(asked):
            e, spi = res.errs[j], res.got[j]
            if self.directed:
                assert guard is not None
                c = self.cands[j]
                if e == 0 and spi == c:
                    self._own(i, (req.gdst, self.proto, c))
                    continue
                if e == errno.ENOENT or e in RESTART_ERRNOS:  # a restart only follows a used pick
                    refused_pick(self.book, req, c)
                    misses += 1
                    retry.append(i)
                    continue
                self._unreserve((req.gdst, self.proto, c))
            if e == 0:
                key = (req.gdst, self.proto, spi)
                if guard is not None and not (ok[j] if ok else self._reserve_late(key)):
                    if not (yield from self._collided(i, spi, retry)):
                        continue
                self._own(i, key)
            elif e == LOST:
                lost += 1
                self.why[i] = NetlinkError(errno.ENOBUFS, _DROPPED, "allocspi")
                retry.append(i)
            elif e in RESTART_ERRNOS:
                self.why[i] = NetlinkError(errno.EINTR, "interrupted by a signal", "allocspi")
                retry.append(i)  # the kernel gave up on it before allocating
            elif e == errno.ENOENT and guard is not None and not self.directed:
                retry.append(i)  # asked again, directed
            else:
                self.errors[i] = from_errno(e, res.text, "allocspi")
        return retry, misses, lost

    def _reserve_late(self, key: Key) -> bool:
        """Directed, and the kernel answered another SPI than asked: reserve it now."""
        assert self.guard is not None
        with self.book.lock:
            token = self.guard.reserve_trusted(*key, self.book.owner)
            if not token:
                return False
            self.tokens[key] = token
            self._in_flight([key])
        return True

    def _collided(self, i: int, spi: int, retry: list[int]) -> Generator[Op, object, bool]:
        """A success whose SPI the guard holds: True if it could be reserved
        after all (its holder had just died), else it is deleted and retried."""
        guard = self.guard
        assert guard is not None
        req = self.req
        self.book.stats.collisions += 1
        yield PollOp()  # the EXPIRE is queued before the kernel can hand the SPI out again
        retry.extend(self.reap())
        key = (req.gdst, self.proto, spi)
        with self.book.lock:
            token = guard.reserve_trusted(*key, self.book.owner)
            if token:
                self.tokens[key] = token
                self._in_flight([key])  # the death just seen was its holder's
                return True
        yield DeleteOp(req.daddr, spi, req.family, self.proto, req.mark)
        _log.guard.warning(
            "collision in a batch: the kernel returned %s, which is still outstanding; its state deleted, asking again",
            _log.tuple_text(*key),
        )
        self.why[i] = DuplicateSpi(f"the kernel kept returning outstanding SPIs (last {spi:#010x})")
        retry.append(i)
        return False

    def reap(self) -> list[int]:
        """Indices whose state the watcher saw die (in flight, so kept from
        on_lost): freed, to be asked again."""
        dead: list[int] = []
        if not self.book.died:
            return dead
        for key in self.book.died.intersection(self.holder):
            i = self.holder.pop(key)
            self.owned.pop(i, None)
            self.book.died.discard(key)
            self._unreserve(key)  # expired by the watcher already; make sure
            self.spis[i] = 0
            dead.append(i)
        self.book.stats.expired_in_batch += len(dead)
        return dead

    def _drop_dead(self, clock: Callable[[], float]) -> Generator[Op, object, list[int]]:
        """Deaths seen by the watcher, and once the batch has run for half the
        larval lifetime, those a dump shows: missing, or held twice."""
        dead = self.reap()
        lifetime = yield LifetimeOp()
        assert isinstance(lifetime, float)
        if clock() - self.began > lifetime / 2:
            present = yield PresentOp(self.req)
            assert isinstance(present, (set, frozenset))
            seen: set[int] = set()
            missing = []
            for i in sorted(self.owned):
                spi = self.spis[i]
                if spi not in present or spi in seen:
                    missing.append(i)
                seen.add(spi)
            for i in set(missing):
                key = self.owned.pop(i)
                if self.holder.get(key) == i:
                    del self.holder[key]
                    self._unreserve(key)
                self.spis[i] = 0
                self.book.stats.expired_in_batch += 1
            dead.extend(sorted(set(missing)))
        for i in dead:
            self.why[i] = ReservationLost(
                "the larval state expired before the batch ended: raise acq_expires, or allocate in smaller batches"
            )
        return dead

    def _abandon(self) -> list[DelKey]:
        """Every state this batch made, for deletion; its candidates freed."""
        req = self.req
        doomed = {self.spis[i] for i in self.owned}
        if self.in_round is not None:
            _, res, cands = self.in_round
            # Interrupted before the plan had the round's result: the kernel side boxed it.
            got_errs = (res.got, res.errs) if res is not None else self.box[0]
            if got_errs is not None:
                doomed.update(g for g, e in zip(*got_errs, strict=True) if e == 0)
            if self.guard is not None:
                for c in cands:
                    if (req.gdst, self.proto, c) not in self.holder:
                        self._unreserve((req.gdst, self.proto, c))
        return [(req.daddr, spi, req.family, self.proto, req.mark) for spi in doomed if spi]

    def dead(self) -> set[int]:
        """Indices whose state died since their last check (the watcher saw it)."""
        if not self.book.died:
            return set()
        flight = self.flight
        # A copy first (one C call): the watcher thread adds to ``died`` as it goes.
        died = {k for k in self.book.died.copy() if k in self.keys or (flight is not None and flight.holds(k))}
        return {i for i, key in self.owned.items() if key in died} if died else set()

    def hand_over(self) -> None:
        """The batch is over: its deaths go to on_lost from now on.  Those
        noted until now are ``late``: handed out, they are reported as lost."""
        self.late = sorted(self.dead())
        flight = self.flight
        if flight is not None:
            if self.book.died:
                self.book.died.difference_update(flight.keys())
            self.book.flights.discard(flight)
            self.flight = None
        self.book.inflight.difference_update(self.keys)
        if self.book.died:
            self.book.died.difference_update(self.keys)

    def good(self) -> Sequence[int]:
        """Indices that got an SPI, in order."""
        errors = self.errors
        return [i for i in range(self.count) if i not in errors] if errors else range(self.count)
