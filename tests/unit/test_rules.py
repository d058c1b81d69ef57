"""The allocation rules (spialloc._rules) driven against a scripted kernel.

No sockets and no privileges: ``FakeKernel`` answers the rules' operations
from a table of states it keeps (the 6.17+ rule: an SPI is taken per proto,
whatever the destination) or from a script of forced answers (a duplicate,
ENOENT, a dropped reply, an expiry while the batch runs).  Each test checks
what the rules asked for and what they handed out; the kernel tier checks
the same paths against the real kernel where it can reach them.
"""

from __future__ import annotations

import array
import errno
import random
from typing import Any, Callable, Generator

import pytest

from spialloc import _rules as rules
from spialloc._batch import BatchRun
from spialloc._model import KernelState, Request, Reservation, build_request
from spialloc.errors import ClosedError, DuplicateSpi, NetlinkError, SpiExhausted
from spialloc.guard import Guard, State

DST = "192.0.2.1"
DST2 = "192.0.2.2"
WIDE = (0xC0000000, 0xCFFFFFFF)  # random picks (more than DIRECTED_MAX_RANGE values)
NARROW = (0x1000, 0x100F)  # directed picks


class FakeKernel:
    """A SAD of (proto, spi) -> daddr and the rules' operations over it.

    ``script`` forces answers, in order, for the next AllocOp / per request
    of the next RoundOp: an int is the SPI returned (made if new), an
    exception is raised (AllocOp) or its errno returned (RoundOp), LOST
    drops the reply (the state is made anyway)."""

    def __init__(self, book: rules.Book, seed: int = 7) -> None:
        self.book = book
        self.sad: dict[tuple[int, int], bytes] = {}
        self.script: list[Any] = []
        self.expire_on_poll: list[rules.Key] = []  # deaths the next PollOp reports
        self.ops: list[rules.Op] = []
        self.rng = random.Random(seed)
        self.lifetime = 30.0

    # -- the kernel's behaviour --

    def _alloc(self, req: Request, lo: int, hi: int) -> int:
        if self.script:
            forced = self.script.pop(0)
            if isinstance(forced, BaseException):
                raise forced
            if forced == rules.LOST:
                spi = self._pick(req, lo, hi)
                raise _Lost(spi)
            self.sad[(int(req.proto), forced)] = req.daddr
            return int(forced)
        return self._pick(req, lo, hi)

    def _pick(self, req: Request, lo: int, hi: int) -> int:
        for _ in range(hi - lo + 1 if hi - lo < 4096 else 4096):
            spi = self.rng.randint(lo, hi)
            if (int(req.proto), spi) not in self.sad:
                self.sad[(int(req.proto), spi)] = req.daddr
                return spi
        raise SpiExhausted(errno.ENOENT, "No SPI available in the requested range", "allocspi")

    def expire(self, key: rules.Key) -> None:
        """The state behind ``key`` dies now; the next PollOp reports it."""
        self.sad.pop((key[1], key[2]), None)
        self.expire_on_poll.append(key)

    # -- executing the rules' operations --

    def execute(self, op: rules.Op) -> object:
        self.ops.append(op)
        if isinstance(op, rules.AllocOp):
            try:
                return self._alloc(op.req, op.lo, op.hi)
            except _Lost:
                raise NetlinkError(errno.ENOBUFS, "reply dropped: receive buffer full", "allocspi") from None
        if isinstance(op, rules.DeleteOp):
            return self.sad.pop((op.proto, op.spi), None) is not None
        if isinstance(op, rules.PollOp):
            n = len(self.expire_on_poll)
            for key in self.expire_on_poll:
                rules.died(self.book, key)
            self.expire_on_poll.clear()
            return n
        if isinstance(op, rules.SyncOp):
            return 0  # nothing foreign is left in this SAD
        if isinstance(op, rules.ClaimOp):
            return None
        if isinstance(op, rules.RoundOp):
            return self._round(op)
        if isinstance(op, rules.RecoverOp):
            return self._recover(op)
        if isinstance(op, rules.PresentOp):
            return {spi for (p, spi), d in self.sad.items() if p == int(op.req.proto) and d == op.req.daddr}
        if isinstance(op, rules.LifetimeOp):
            return self.lifetime
        if isinstance(op, rules.ReleaseOp):
            deleted = sum(self.sad.pop((k[3], k[1]), None) is not None for k in op.keys)
            rules.forget(self.book, op.keys)
            return deleted
        raise TypeError(f"unknown operation {op!r}")

    def _recover(self, op: rules.RecoverOp) -> int:
        """Orphans of dropped replies: states of op.req's destination that
        are neither known to the batch nor outstanding in the guard."""
        guard = self.book.guard
        proto = int(op.req.proto)
        doomed = [
            spi
            for (p, spi), d in self.sad.items()
            if p == proto
            and d == op.req.daddr
            and spi not in op.known
            and not (guard is not None and guard.is_outstanding(op.req.gdst, p, spi))
        ][: op.lost]
        for spi in doomed:
            del self.sad[(proto, spi)]
        return len(doomed)

    def _round(self, op: rules.RoundOp) -> rules.RoundResult:
        got, errs = [], []
        text = None
        for j in range(op.n):
            lo = hi = op.cands[j] if op.cands is not None else None
            if lo is None:
                lo, hi = op.req.spi_min, op.req.spi_max
            assert hi is not None
            try:
                got.append(self._alloc(op.req, lo, hi))
                errs.append(0)
            except _Lost:
                got.append(0)
                errs.append(rules.LOST)
            except (SpiExhausted, NetlinkError) as exc:
                got.append(0)
                errs.append(exc.errno or errno.EIO)
                text = text or "No SPI available in the requested range"
        return rules.RoundResult(array.array("I", got), errs, text, rules.LOST in errs, errs.count(0) == len(errs))


class _Lost(Exception):
    pass


def drive(plan: Generator[rules.Op, object, Any], execute: Callable[[rules.Op], object]) -> Any:
    """The blocking driver's loop, as Core.drive runs it."""
    step = rules.Stepper(plan)
    while not step.done:
        try:
            result = execute(step.op)
        except BaseException as exc:
            step.throw(exc)
        else:
            step.send(result)
    return step.value


def kinds(k: FakeKernel) -> list[str]:
    return [type(op).__name__ for op in k.ops]


@pytest.fixture
def book() -> rules.Book:
    b = rules.Book(Guard())
    b.rng.seed(1)
    return b


def req_for(dst: str = DST, spi_range: tuple[int, int] = WIDE, **kw: Any) -> Request:
    return build_request(dst, spi_range=spi_range, allow_reserved=True, **kw)


def single(book: rules.Book, k: FakeKernel, req: Request, first: int | None = None) -> Any:
    return drive(rules.single_plan(book, req, first), k.execute)


# --- one guarded allocation ---------------------------------------------------------------


def test_single_plain_success_reserves_and_counts(book: rules.Book) -> None:
    k = FakeKernel(book)
    r = single(book, k, req_for())
    assert book.guard is not None and book.guard.state(*r.key) is State.RESERVED
    assert book.stats.allocated == 1 and kinds(k) == ["AllocOp"]


def test_reused_acquire_seq_is_retried_without_it_and_the_acq_state_is_kept(book: rules.Book) -> None:
    """The seed bug: ALLOCSPI with a seq whose ACQ state already has an SPI
    returns that SPI again.  The rules poll, leave the ACQ state alone (same
    dst, with a seq: it is the holder's own), drop the seq and ask directed."""
    k = FakeKernel(book)
    first = single(book, k, req_for(seq=37))
    k.ops.clear()
    k.script = [first.spi]  # the kernel returns the ACQ state's SPI again
    second = single(book, k, req_for(seq=37))
    assert second.spi != first.spi and second.seq == 0
    assert kinds(k) == ["AllocOp", "PollOp", "AllocOp"]
    assert isinstance(k.ops[2], rules.AllocOp) and k.ops[2].lo == k.ops[2].hi == second.spi
    assert book.stats.collisions == 1 and book.stats.retries == 1


def test_duplicate_for_another_destination_is_deleted(book: rules.Book) -> None:
    """Old kernels hand one SPI to two destinations: the second state is ours
    to delete, and the caller gets another SPI."""
    k = FakeKernel(book)
    first = single(book, k, req_for(DST))
    k.ops.clear()
    k.script = [first.spi]
    r = single(book, k, req_for(DST2))
    assert r.spi != first.spi
    assert kinds(k) == ["AllocOp", "PollOp", "DeleteOp", "AllocOp"]
    assert isinstance(k.ops[2], rules.DeleteOp) and k.ops[2].spi == first.spi


def test_collision_whose_holder_just_died_is_taken(book: rules.Book) -> None:
    k = FakeKernel(book)
    first = single(book, k, req_for())
    k.expire(first.key)  # its EXPIRE is queued, not handled yet
    k.ops.clear()
    k.script = [first.spi]
    r = single(book, k, req_for())
    assert r.spi == first.spi and kinds(k) == ["AllocOp", "PollOp"]
    assert book.stats.lost == 1  # the first reservation was reported lost


def test_fast_path_collision_enters_at_first(book: rules.Book) -> None:
    """Allocator.allocate's fast path hands its colliding SPI in as ``first``."""
    k = FakeKernel(book)
    held = single(book, k, req_for())
    k.ops.clear()
    r = single(book, k, req_for(), first=held.spi)
    assert r.spi != held.spi and kinds(k) == ["PollOp", "DeleteOp", "AllocOp"]


def test_refused_directed_pick_is_marked_foreign_and_another_asked(book: rules.Book) -> None:
    k = FakeKernel(book)
    k.script = [SpiExhausted(errno.ENOENT, "No SPI available", "allocspi")]
    r = single(book, k, req_for(spi_range=NARROW))
    assert isinstance(k.ops[0], rules.AllocOp)
    refused = k.ops[0].lo
    assert r.spi != refused and book.guard is not None
    assert book.guard.state(book.guard and r.key[0], r.key[1], refused) is State.FOREIGN
    assert book.stats.directed_misses == 1


def test_full_range_resyncs_once_then_raises_the_kernels_refusal(book: rules.Book) -> None:
    """Every value refused: foreign marks may be stale, so one SyncOp; then the
    kernel's own SpiExhausted, after the SPI-0 state is claimed."""
    k = FakeKernel(book)
    k.script = [SpiExhausted(errno.ENOENT, "kernel words", "allocspi")] * 16
    with pytest.raises(SpiExhausted, match="kernel words"):
        single(book, k, req_for(spi_range=NARROW))
    assert kinds(k).count("SyncOp") == 1 and kinds(k)[-1] == "ClaimOp"
    assert book.guard is not None and book.guard.stats.foreign == 16 and book.guard.stats.reserved == 0


def test_range_outstanding_in_the_guard_fails_without_asking(book: rules.Book) -> None:
    k = FakeKernel(book)
    for _ in range(16):
        single(book, k, req_for(spi_range=NARROW))
    k.ops.clear()
    with pytest.raises(SpiExhausted, match="outstanding"):
        single(book, k, req_for(spi_range=NARROW))
    assert k.ops == []


def test_random_range_refused_claims_the_stray_state(book: rules.Book) -> None:
    k = FakeKernel(book)
    k.script = [SpiExhausted(errno.ENOENT, "No SPI available", "allocspi")]
    with pytest.raises(SpiExhausted):
        single(book, k, req_for())
    assert kinds(k) == ["AllocOp", "ClaimOp"]


def test_gives_up_after_max_retries(book: rules.Book) -> None:
    book.max_retries = 2
    k = FakeKernel(book)
    held = [single(book, k, req_for(spi_range=NARROW)) for _ in range(3)]
    # The kernel keeps answering with SPIs that are outstanding.
    k.script = [held[0].spi, held[1].spi, held[2].spi]
    with pytest.raises(DuplicateSpi, match="2 retries"):
        single(book, k, req_for(seq=5))
    assert book.stats.retries == 3


def test_interrupted_directed_pick_frees_its_candidate(book: rules.Book) -> None:
    k = FakeKernel(book)
    k.script = [KeyboardInterrupt()]
    with pytest.raises(KeyboardInterrupt):
        single(book, k, req_for(spi_range=NARROW))
    assert book.guard is not None and len(book.guard) == 0


# --- batches -------------------------------------------------------------------------------------


def batch(book: rules.Book, k: FakeKernel, req: Request, count: int, **kw: Any) -> rules.BatchRun:
    clock = kw.pop("clock", lambda: 0.0)
    closed = kw.pop("closed", lambda: False)
    run = BatchRun(book, req, count, since=0.0, began=0.0, chunk=kw.pop("chunk", 64))
    drive(run.plan(clock, closed), k.execute)
    run.hand_over()  # as Core does once the states are handed out
    return run


@pytest.mark.parametrize("spi_range", [WIDE, (0x10000, 0x10000 + 999)], ids=["random", "directed"])
def test_batch_clean_round_books_everything(book: rules.Book, spi_range: tuple[int, int]) -> None:
    k = FakeKernel(book)
    run = batch(book, k, req_for(spi_range=spi_range), 100)
    assert not run.errors and len(set(run.spis)) == 100 and 0 not in run.spis
    assert kinds(k) == ["RoundOp", "LifetimeOp"]
    assert book.guard is not None and book.guard.stats.reserved == 100
    assert not book.inflight and not book.died  # nothing left in flight


def test_batch_dropped_replies_are_recovered_and_asked_again(book: rules.Book) -> None:
    k = FakeKernel(book)
    k.script = [rules.LOST] * 3
    run = batch(book, k, req_for(), 10)
    assert not run.errors and len(set(run.spis)) == 10
    recover = [op for op in k.ops if isinstance(op, rules.RecoverOp)]
    assert len(recover) == 1 and recover[0].lost == 3
    assert kinds(k).count("RoundOp") == 2 and book.stats.retries == 3


def test_batch_duplicate_is_deleted_and_asked_again(book: rules.Book) -> None:
    k = FakeKernel(book)
    held = single(book, k, req_for())
    k.ops.clear()
    k.script = [held.spi]  # the batch's first request gets an outstanding SPI
    run = batch(book, k, req_for(), 5)
    assert not run.errors and held.spi not in run.spis
    assert kinds(k)[:3] == ["RoundOp", "PollOp", "DeleteOp"]
    assert book.stats.collisions == 1


def test_batch_state_that_dies_mid_batch_is_asked_again_not_reported(book: rules.Book) -> None:
    k = FakeKernel(book)
    lost: list[Any] = []
    book.on_lost = lost.append
    held = single(book, k, req_for())
    k.ops.clear()
    k.script = [held.spi]  # collides; its PollOp will bring the death of a batch member

    real_round = k._round

    def round_then_die(op: rules.RoundOp) -> rules.RoundResult:
        res = real_round(op)
        if len(k.ops) == 1:  # the first round: its last success dies at once
            k.expire((op.req.gdst, int(op.req.proto), res.got[-1]))
        return res

    k._round = round_then_die  # type: ignore[method-assign]
    run = batch(book, k, req_for(), 5)
    assert not run.errors and len(set(run.spis)) == 5 and 0 not in run.spis
    assert book.stats.expired_in_batch == 1 and lost == []  # the caller never saw it


def test_batch_dump_check_after_half_the_lifetime(book: rules.Book) -> None:
    k = FakeKernel(book)
    k.lifetime = 2.0
    now = [0.0]

    real_round = k._round

    def slow_round(op: rules.RoundOp) -> rules.RoundResult:
        res = real_round(op)
        if not any(isinstance(o, rules.PresentOp) for o in k.ops):
            now[0] += 1.5  # the round took longer than half the lifetime
            k.sad.pop((int(op.req.proto), res.got[0]))  # ... and a state died unseen
        return res

    k._round = slow_round  # type: ignore[method-assign]
    run = batch(book, k, req_for(), 4, clock=lambda: now[0])
    assert not run.errors and all((50, s) in k.sad for s in run.spis)
    assert "PresentOp" in kinds(k) and book.stats.expired_in_batch == 1


def test_batch_interrupted_releases_everything_it_made(book: rules.Book) -> None:
    k = FakeKernel(book)
    k.script = [rules.LOST]  # forces a second round
    calls = [0]
    real = k.execute

    def interrupt_second_round(op: rules.Op) -> object:
        if isinstance(op, rules.RoundOp):
            calls[0] += 1
            if calls[0] == 2:
                raise KeyboardInterrupt
        return real(op)

    run = BatchRun(book, req_for(spi_range=NARROW), 8, since=0.0, began=0.0, chunk=64)
    with pytest.raises(KeyboardInterrupt):
        drive(run.plan(lambda: 0.0, lambda: False), interrupt_second_round)
    release = [op for op in k.ops if isinstance(op, rules.ReleaseOp)]
    assert len(release) == 1 and len(release[0].keys) == 7
    assert book.guard is not None and len(book.guard) == 0 and not book.inflight


def test_batch_closed_meanwhile_raises_closed_after_releasing(book: rules.Book) -> None:
    k = FakeKernel(book)
    k.script = [rules.LOST]
    rounds = [0]

    def closed() -> bool:
        rounds[0] += 1
        return rounds[0] > 1

    with pytest.raises(ClosedError):
        batch(book, k, req_for(), 6, closed=closed)
    assert kinds(k)[-1] == "ReleaseOp" and k.sad == {}


def test_batch_directed_misses_are_learned(book: rules.Book) -> None:
    k = FakeKernel(book)
    k.script = [SpiExhausted(errno.ENOENT, "No SPI available", "allocspi")] * 2
    run = batch(book, k, req_for(spi_range=NARROW), 4)
    assert not run.errors and book.stats.directed_misses == 2
    assert book.guard is not None and book.guard.stats.foreign == 2


def batch_first(book: rules.Book, k: FakeKernel, req: Request, count: int, **kw: Any) -> rules.BatchRun:
    """``batch`` the way Core.run_batch runs it: round one's engine call made
    outside the plan (``first_round``, ``took_first``), the plan driven only
    if that leaves anything to do, and an interrupt before the plan took
    over releasing round one's states."""
    clock = kw.pop("clock", lambda: 0.0)
    closed = kw.pop("closed", lambda: False)
    run = BatchRun(book, req, count, since=0.0, began=0.0, chunk=kw.pop("chunk", 64))
    try:
        op = run.first_round()
        if op is None or not run.took_first(k.execute(op), clock() - run.began, k.lifetime):  # type: ignore[arg-type]
            drive(run.plan(clock, closed), k.execute)
    except BaseException:
        if not run.planned and run.in_round is not None:
            k.execute(rules.ReleaseOp(run._abandon()))
            run.hand_over()
        raise
    run.hand_over()
    return run


def _scenario(
    name: str, book: rules.Book, k: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> tuple[Request, int, dict[str, Any]]:
    """A batch's set-up: (request, count, batch() keywords)."""
    if name == "lost":
        k.script = [rules.LOST] * 3
    elif name == "duplicate":
        k.script = [single(book, k, req_for()).spi]
    elif name == "refused":
        k.script = [SpiExhausted(errno.ENOENT, "x", "allocspi")]
    elif name == "dies":
        k.script = [single(book, k, req_for()).spi]
        real_round = k._round

        def round_then_die(op: rules.RoundOp) -> rules.RoundResult:
            res = real_round(op)
            if not any(isinstance(o, rules.PollOp) for o in k.ops):
                k.expire((op.req.gdst, int(op.req.proto), res.got[-1]))
            return res

        k._round = round_then_die  # type: ignore[method-assign]
    elif name == "dies-at-reserve":
        # The watcher thread sees a death of the batch right after its round
        # was reserved (in flight), before it is booked: asked again.
        real_reserve = BatchRun._reserve_round

        def reserve_then_die(run: BatchRun, res: rules.RoundResult) -> list[bool]:
            ok = real_reserve(run, res)
            if not book.stats.expired_in_batch and not book.died:
                key = (run.req.gdst, run.proto, res.got[0])
                k.sad.pop((run.proto, res.got[0]))
                rules.died(book, key)
                assert key in book.died
            return ok

        monkeypatch.setattr(BatchRun, "_reserve_round", reserve_then_die)
    elif name == "old":
        k.lifetime = 0.0  # past half the lifetime at once: the dump check is due
        return req_for(), 6, {"clock": lambda: 1.0}
    elif name == "directed":
        return req_for(spi_range=NARROW), 20, {}
    return req_for(), 6, {}


@pytest.mark.parametrize(
    ("name", "guarded"),
    [(n, True) for n in ("clean", "lost", "duplicate", "dies", "dies-at-reserve", "old", "directed")]
    + [(n, False) for n in ("clean", "lost", "refused", "old")],  # collisions and deaths need a guard
)
def test_first_round_taken_outside_the_plan_ends_as_the_plan_does(
    name: str, guarded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Core makes round one's engine call itself and drives the plan only if
    the result leaves anything to do: every scripted batch must end the
    same as with the plan alone (the fake kernel's picks are seeded alike)."""
    ends = []
    for run_it in (batch, batch_first):
        book = rules.Book(Guard() if guarded else None)
        book.rng.seed(1)
        k = FakeKernel(book)
        req, count, kw = _scenario(name, book, k, monkeypatch)
        run = run_it(book, k, req, count, **kw)
        guard = book.guard
        ends.append(
            (
                list(run.spis),
                {i: type(e) for i, e in run.errors.items()},
                dict(k.sad),
                None if guard is None else (len(guard), guard.stats.reserved),
                book.stats.expired_in_batch,
                book.stats.collisions,
                run.late,
                [type(op).__name__ for op in k.ops if not isinstance(op, rules.LifetimeOp)],
            )
        )
    assert ends[0] == ends[1]
    if name == "clean":
        assert ends[1][-1] == ["RoundOp"]


def test_first_round_interrupted_before_a_plan_releases_its_states(book: rules.Book) -> None:
    """Ctrl-C inside took_first's whole-batch reserve: round one's states and
    reservations go, though no plan ever ran."""
    assert book.guard is not None
    k = FakeKernel(book)
    real = book.guard.reserve_batch

    def interrupted(*args: Any) -> Any:
        real(*args)
        raise KeyboardInterrupt

    book.guard.reserve_batch = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        batch_first(book, k, req_for(), 8)
    assert k.sad == {} and not book.inflight and not book.flights
    assert kinds(k) == ["RoundOp", "ReleaseOp"]


def test_batch_larger_than_the_range_fails_the_rest_up_front(book: rules.Book) -> None:
    k = FakeKernel(book)
    run = batch(book, k, req_for(spi_range=NARROW), 20)
    assert len(run.good()) == 16 and sorted(run.errors) == list(range(16, 20))
    assert all(isinstance(e, SpiExhausted) for e in run.errors.values())


def test_unguarded_batch_refusals_are_typed_with_the_kernel_text() -> None:
    book = rules.Book(None)
    k = FakeKernel(book)
    k.script = [5, 5]  # (hand-picked duplicates are the kernel's business without a guard)
    k.script = [SpiExhausted(errno.ENOENT, "x", "allocspi")]
    run = batch(book, k, req_for(), 3)
    assert list(run.errors) == [0] and isinstance(run.errors[0], SpiExhausted)
    assert "No SPI available" in str(run.errors[0]) and kinds(k)[-1] == "ClaimOp"


# --- events, dumps, release, commit ----------------------------------------------------------------


def test_expired_in_flight_goes_to_the_batch_not_on_lost(book: rules.Book) -> None:
    assert book.guard is not None
    key = (req_for().gdst, 50, 0xC0000001)
    book.guard.reserve(*key)
    book.inflight.add(key)
    assert rules.expired(book, key) is None and key in book.died and len(book.guard) == 0


def test_renewable_only_while_held_and_reserved(book: rules.Book) -> None:
    assert book.guard is not None
    req = req_for()
    key = (req.gdst, 50, 0xC0000002)
    token = book.guard.reserve(*key, owner=book.owner)
    book.held[key] = (req, 100.0, token)
    assert rules.renewable(book, key, 50.0) == (book, req) and key in book.held
    assert rules.renewable(book, key, 150.0) is None and key not in book.held
    book.held[key] = (req, 100.0, token - 1)  # another reservation's hold: not this one's to renew
    assert rules.renewable(book, key, 50.0) is None
    book.held[key] = (req, 100.0, token)
    book.guard.commit(*key)
    assert rules.renewable(book, key, 50.0) is None


def test_missing_from_reports_reserved_tuples_not_in_the_sad(book: rules.Book) -> None:
    k = FakeKernel(book)
    lost: list[Reservation] = []
    book.on_lost = lost.append  # the requests of reservations handed out are kept from now on
    req = req_for()
    rs = [book.note(req, single(book, k, req), None) for _ in range(3)]  # handed out, as Core does
    assert book.guard is not None
    book.guard.commit(*rs[2].key)
    rules.missing_from(book, {rs[0].key}, book.guard.mark())
    assert lost == [rs[1]]  # committed ones are not "lost"; the very reservation handed out
    assert book.guard.is_lost(*rs[1].key)


def test_on_lost_only_hears_of_reservations_handed_out(book: rules.Book) -> None:
    """A reserved tuple nobody was handed (a batch's state that died before
    the batch returned) is counted lost but never reported to on_lost."""
    heard: list[Reservation] = []
    book.on_lost = heard.append
    req = req_for()
    assert book.guard is not None and book.guard.reserve(req.gdst, req.proto, 0x4242, owner=book.owner)
    rules.missing_from(book, set(), book.guard.mark())
    assert heard == [] and book.stats.lost == 1


def test_stale_finds_reservations_that_are_not_current(book: rules.Book) -> None:
    k = FakeKernel(book)
    a, b, c = single(book, k, req_for()), single(book, k, req_for()), single(book, k, req_for())
    assert book.guard is not None
    book.guard.expire(*a.key)
    book.guard.release(*c.key)
    again = book.guard.reserve(*c.key, owner=book.owner)  # the SPI handed out again: a new reservation
    assert again and again != c.token
    assert rules.stale(book, [a, b, c]) == [a, c]
    dk = [(r.dst.packed.ljust(16, b"\0"), r.spi, 2, 50, None) for r in (a, b)]
    assert [rules.guard_key(k) for k in dk] == [a.key, b.key]


def test_committed_forgets_hold_and_origin(book: rules.Book) -> None:
    k = FakeKernel(book)
    book.on_lost = lambda r: None
    req = req_for()
    r = book.note(req, single(book, k, req), 99.0)
    assert r.key in book.held and r.key in book.origin
    rules.committed(book, r)
    assert r.key not in book.held and r.key not in book.origin


# --- orphans of dropped replies -------------------------------------------------------------


def _state(req: Request, spi: int, added: int = 1000, **kw: Any) -> KernelState:
    fields: dict[str, Any] = {
        "spi": spi,
        "dst": req.dst,
        "src": req.src,
        "proto": req.proto,
        "mode": req.mode,
        "reqid": req.reqid,
        "mark": req.mark,
        "if_id": req.if_id,
        "direction": req.direction,
        "acquire_seq": 0,
        "larval": True,
        "added": added,
    }
    fields.update(kw)
    return KernelState(**fields)


def test_orphans_are_deleted_only_when_provably_ours() -> None:
    req = build_request("10.0.0.1", mark=(1, 0xFF), if_id=2)
    mine = [_state(req, 0x1000 + i) for i in range(3)]
    noise = [
        _state(req, 0x2000, added=998),  # made before the batch
        _state(req, 0x2001, reqid=9),  # another request
        _state(req, 0x2002, mark=None),
        _state(req, 0x2003, acquire_seq=5),  # the kernel's ACQ state
        _state(req, 0x2004, larval=False),
        _state(req, 0x2005),  # already ours
    ]
    op = rules.RecoverOp(req, 3, 999.5, frozenset({0x2005}))
    assert rules.orphans(op, mine + noise, None) == [0x1000, 0x1001, 0x1002]
    # One more match than dropped replies: any of them may be another's.
    assert rules.orphans(op._replace(lost=2), mine + noise, None) is None
    # A refusal in the round: a dropped request may have made no state.
    assert rules.orphans(op._replace(doubt=True), mine, None) is None
    # Held by someone in the guard: not an orphan.
    g = Guard()
    assert g.reserve(req.gdst, req.proto, 0x1001)
    assert rules.orphans(op, mine, g) == [0x1000, 0x1002]
    # Directed: only the SPIs the dropped requests named.
    assert rules.orphans(op._replace(spis=frozenset({0x1002})), mine, g) == [0x1002]


def test_leftovers_are_only_this_daemons_unheld_larval_states(book: rules.Book) -> None:
    req = build_request("10.0.0.1", reqid=42, mark=(5, 0xFFFFFFFF))
    dead = [_state(req, 0x1000 + i) for i in range(3)]
    kept = [
        _state(req, 0x2000, reqid=7),  # another daemon's
        _state(req, 0x2001, acquire_seq=9),  # bound to an ACQUIRE: the kernel's
        _state(req, 0),  # SPI 0: a refused request's, DELSA cannot name it
        _state(req, 0x2002, larval=False),  # a full SA
        _state(req, 0x2003, mark=(6, 0xFFFFFFFF)),
        _state(req, 0x2004),  # reserved here
    ]
    assert book.guard is not None and book.guard.reserve(req.gdst, req.proto, 0x2004)
    got = rules.leftovers(book, dead + kept, 42, (5, 0xFFFFFFFF), None)
    assert [st.spi for st in got] == [0x1000, 0x1001, 0x1002]
    assert [st.spi for st in rules.leftovers(book, dead + kept, None, None, None)][:3] == [0x1000, 0x1001, 0x1002]
