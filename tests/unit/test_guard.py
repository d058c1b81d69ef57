"""The duplicate guard: pure data, no kernel."""

from __future__ import annotations

import random
import re
import threading
import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from spialloc.errors import InvalidRequest, ReservationLost
from spialloc.guard import Guard, GuardStats, State

ESP, AH, COMP = 50, 51, 108


def v4(a: int, b: int, c: int, d: int) -> bytes:
    # The allocator's key form (IPv4-mapped IPv6); the guard takes any 16 bytes.
    return bytes(10) + b"\xff\xff" + bytes([a, b, c, d])


D1, D2, D3 = v4(192, 0, 2, 1), v4(192, 0, 2, 2), bytes.fromhex("20010db8" + "00" * 11 + "01")


# --- construction and argument checks -----------------------------------------


def test_default_scope_is_spi() -> None:
    assert Guard().scope == "spi"
    assert Guard("dst").scope == "dst"


@pytest.mark.parametrize("scope", ["sa", "", None, 1])
def test_bad_scope_names_the_value(scope: object) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(repr(scope))):
        Guard(scope)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "dst, proto, spi, word",
    [
        (b"\xc0\x00\x02\x01", ESP, 0x1000, "dst"),  # 4-byte IPv4 would silently be another key
        ("192.0.2.1", ESP, 0x1000, "dst"),
        (D1, True, 0x1000, "proto"),
        (D1, 256, 0x1000, "proto"),
        (D1, ESP, -1, "spi"),
        (D1, ESP, 1 << 32, "spi"),
        (D1, ESP, 1.0, "spi"),
        (D1, ESP, False, "spi"),
    ],
)
def test_bad_arguments(dst: object, proto: object, spi: object, word: str) -> None:
    g = Guard()
    with pytest.raises(InvalidRequest, match=word):
        g.reserve(dst, proto, spi)  # type: ignore[arg-type]
    assert len(g) == 0


def test_int_subclasses_are_plain_keys() -> None:
    from spialloc._model import Proto

    g = Guard()
    assert g.reserve(D1, Proto.ESP, 0x1000)
    assert not g.reserve(D1, ESP, 0x1000)
    assert g.reserved() == [(D1, ESP, 0x1000)]
    assert type(g.reserved()[0][1]) is int


# --- reserve and the two scopes ---------------------------------------------


def test_reserve_then_collide() -> None:
    g = Guard()
    assert g.reserve(D1, ESP, 0xC0000001)
    assert not g.reserve(D1, ESP, 0xC0000001)
    assert g.reserve(D1, AH, 0xC0000001)  # another proto is another SPI space
    assert len(g) == 2
    assert g.stats.collisions == 1


def test_scope_spi_collides_across_destinations() -> None:
    g = Guard("spi")
    assert g.reserve(D1, ESP, 0x1234)
    assert not g.reserve(D2, ESP, 0x1234)
    assert g.is_outstanding(D2, ESP, 0x1234)
    assert g.state(D2, ESP, 0x1234) is State.RESERVED
    assert g.owner_dst(ESP, 0x1234, D2) == D1


def test_scope_dst_keeps_destinations_apart() -> None:
    g = Guard("dst")
    assert g.reserve(D1, ESP, 0x1234)
    assert g.reserve(D2, ESP, 0x1234)
    assert not g.reserve(D2, ESP, 0x1234)
    assert not g.is_outstanding(D3, ESP, 0x1234)
    assert g.owner_dst(ESP, 0x1234, D2) == D2
    assert g.owner_dst(ESP, 0x1234, D3) is None
    assert len(g) == 2


def test_owner_dst_tells_same_state_from_other_destination() -> None:
    g = Guard()
    assert g.owner_dst(ESP, 1, D1) is None
    g.reserve(D1, ESP, 1)
    assert g.owner_dst(ESP, 1, D1) == D1  # ALLOCSPI returned the same larval state
    assert g.owner_dst(ESP, 1, D2) == D1  # another destination holds the SPI


def test_reserve_many_one_batch() -> None:
    g = Guard()
    g.reserve(D1, ESP, 3)
    assert [bool(t) for t in g.reserve_many(D1, ESP, [1, 2, 3, 2, 4])] == [True, True, False, False, True]
    assert len(g) == 4
    assert g.stats.collisions == 2


def test_reserve_many_checks_everything_first() -> None:
    g = Guard()
    with pytest.raises(InvalidRequest, match="spi"):
        g.reserve_many(D1, ESP, [1, 2, -3])
    assert len(g) == 0


# --- commit, release, expire -------------------------------------------------


def test_commit_moves_reserved_to_committed() -> None:
    g = Guard()
    g.reserve(D1, ESP, 7)
    g.commit(D1, ESP, 7)
    assert g.state(D1, ESP, 7) is State.COMMITTED
    g.commit(D1, ESP, 7)  # idempotent
    assert g.stats == GuardStats(outstanding=1, reserved=0, committed=1, foreign=0, collisions=0, lost=0)
    assert not g.reserve(D1, ESP, 7)


def test_commit_unknown_raises_naming_spi_in_hex() -> None:
    with pytest.raises(ReservationLost, match="0xc0ffee01"):
        Guard().commit(D1, ESP, 0xC0FFEE01)


def test_commit_of_expired_tuple_raises() -> None:
    g = Guard()
    g.reserve(D1, ESP, 0xC0000005)
    assert g.expire(D1, ESP, 0xC0000005) is State.RESERVED
    assert g.is_lost(D1, ESP, 0xC0000005)
    with pytest.raises(ReservationLost, match=r"0xc0000005.*expired"):
        g.commit(D1, ESP, 0xC0000005)
    assert g.stats.lost == 1
    assert len(g) == 0


def test_commit_foreign_or_other_destination_raises() -> None:
    g = Guard()
    g.mark_foreign(D1, ESP, 9)
    with pytest.raises(ReservationLost, match="someone else"):
        g.commit(D1, ESP, 9)
    g.reserve(D2, AH, 9)
    with pytest.raises(ReservationLost, match="192.0.2.2"):
        g.commit(D1, AH, 9)  # scope "spi": held for D2, not this tuple
    assert g.state(D2, AH, 9) is State.RESERVED


def test_reserving_again_clears_lost() -> None:
    g = Guard()
    g.reserve(D1, ESP, 5)
    g.expire(D1, ESP, 5)
    assert g.reserve(D1, ESP, 5)
    assert not g.is_lost(D1, ESP, 5)
    g.commit(D1, ESP, 5)
    assert g.state(D1, ESP, 5) is State.COMMITTED


def test_lost_record_is_bounded() -> None:
    g = Guard(lost_capacity=3)
    for spi in range(1, 6):
        g.reserve(D1, ESP, spi)
        g.expire(D1, ESP, spi)
    assert [g.is_lost(D1, ESP, spi) for spi in range(1, 6)] == [False, False, True, True, True]
    assert g.stats.lost == 5
    with pytest.raises(ReservationLost, match="not reserved"):
        g.commit(D1, ESP, 1)  # forgotten, but still refused


def test_lost_record_can_be_off() -> None:
    g = Guard(lost_capacity=0)
    g.reserve(D1, ESP, 1)
    g.expire(D1, ESP, 1)
    assert not g.is_lost(D1, ESP, 1)
    assert g.stats.lost == 1


def test_expire_returns_the_old_state() -> None:
    g = Guard()
    g.reserve(D1, ESP, 1)
    g.reserve(D1, ESP, 2)
    g.commit(D1, ESP, 2)
    g.mark_foreign(D1, ESP, 3)
    assert g.expire(D1, ESP, 1) is State.RESERVED
    assert g.expire(D1, ESP, 2) is State.COMMITTED
    assert g.expire(D1, ESP, 3) is State.FOREIGN
    assert g.expire(D1, ESP, 4) is None
    assert len(g) == 0
    assert g.stats.lost == 1  # only a reservation is a lost reservation
    assert g.is_lost(D1, ESP, 2)
    assert not g.is_lost(D1, ESP, 3)  # never ours


def test_expire_or_release_of_another_destination_leaves_ours() -> None:
    g = Guard("spi")
    g.reserve(D1, ESP, 1)
    assert g.expire(D2, ESP, 1) is None
    assert not g.release(D2, ESP, 1)
    assert g.state(D1, ESP, 1) is State.RESERVED


def test_release_any_state() -> None:
    g = Guard()
    g.reserve(D1, ESP, 1)
    g.reserve(D1, ESP, 2)
    g.commit(D1, ESP, 2)
    g.mark_foreign(D1, ESP, 3)
    assert g.release(D1, ESP, 1)
    assert g.release(D1, ESP, 2)
    assert g.release(D1, ESP, 3)
    assert not g.release(D1, ESP, 1)
    assert len(g) == 0
    assert g.reserve(D1, ESP, 1)
    assert not g.is_lost(D1, ESP, 1)


# --- foreign ----------------------------------------------------------------


def test_foreign_blocks_reserve_and_is_cleared() -> None:
    g = Guard()
    g.mark_foreign(D2, ESP, 0x100)
    assert not g.reserve(D1, ESP, 0x100)
    assert g.state(D1, ESP, 0x100) is State.FOREIGN
    assert g.stats.foreign == 1
    g.reserve(D1, ESP, 0x101)
    g.clear_foreign()
    assert g.state(D1, ESP, 0x100) is None
    assert g.state(D1, ESP, 0x101) is State.RESERVED
    assert g.reserve(D1, ESP, 0x100)


def test_mark_foreign_never_overwrites_ours() -> None:
    g = Guard()
    g.reserve(D1, ESP, 1)
    g.mark_foreign(D1, ESP, 1)
    g.mark_foreign(D2, ESP, 1)
    assert g.state(D1, ESP, 1) is State.RESERVED
    assert g.owner_dst(ESP, 1, D1) == D1
    assert g.stats.foreign == 0


# --- counting ---------------------------------------------------------------


def test_count_in_and_len_scope_spi() -> None:
    g = Guard("spi")
    g.reserve(D1, ESP, 1)
    g.reserve(D2, ESP, 2)
    g.mark_foreign(D3, ESP, 3)
    g.reserve(D1, COMP, 0x200)
    assert g.count_in(ESP, D1) == 3  # per proto, whatever the dst
    assert g.count_in(ESP, D3) == 3
    assert g.count_in(COMP, D2) == 1
    assert g.count_in(AH, D1) == 0
    assert len(g) == 4
    g.release(D2, ESP, 2)
    assert g.count_in(ESP, D1) == 2


def test_count_in_scope_dst() -> None:
    g = Guard("dst")
    g.reserve(D1, ESP, 1)
    g.reserve(D1, ESP, 2)
    g.reserve(D2, ESP, 1)
    assert g.count_in(ESP, D1) == 2
    assert g.count_in(ESP, D2) == 1
    assert g.count_in(ESP, D3) == 0
    assert g.count_in(AH, D1) == 0


def test_stats_snapshot() -> None:
    g = Guard()
    g.reserve_many(D1, ESP, [1, 2, 3, 3])
    g.commit(D1, ESP, 2)
    g.mark_foreign(D1, ESP, 4)
    g.expire(D1, ESP, 1)
    s = g.stats
    assert s == GuardStats(outstanding=3, reserved=1, committed=1, foreign=1, collisions=1, lost=1)
    g.release(D1, ESP, 3)
    assert s.reserved == 1  # a snapshot, not a view
    assert "outstanding=2" in repr(g)


def test_reserved_lists_only_larval_tuples() -> None:
    g = Guard("dst")
    g.reserve(D1, ESP, 1)
    g.reserve(D2, ESP, 1)
    g.reserve(D1, AH, 0xFFFFFFFF)
    g.reserve(D2, COMP, 2)
    g.commit(D2, COMP, 2)
    g.mark_foreign(D3, ESP, 5)
    assert sorted(g.reserved()) == sorted([(D1, ESP, 1), (D2, ESP, 1), (D1, AH, 0xFFFFFFFF)])


def test_reserved_before_a_mark_leaves_out_newer_reservations() -> None:
    """A resync dumps the SAD, then asks which reservations are missing from
    it: one made after the dump began is missing only for being newer."""
    g = Guard()
    g.reserve(D1, ESP, 1)
    mark = g.mark()
    g.reserve(D1, ESP, 2)
    g.release(D1, ESP, 1)
    g.reserve(D1, ESP, 1)  # again, after the mark: a new reservation
    assert g.reserved(before=mark) == []
    assert sorted(g.reserved()) == [(D1, ESP, 1), (D1, ESP, 2)]
    g.reserve(D1, ESP, 3)
    assert sorted(g.reserved(before=g.mark())) == [(D1, ESP, 1), (D1, ESP, 2), (D1, ESP, 3)]


def test_a_death_is_seen_first_once_and_then_with_the_token_it_found() -> None:
    """Allocators sharing a guard each receive the kernel's one EXPIRE: the
    first report of a state's death is new (None); a copy names the token
    the tuple had then, so the watcher can tell a copy (same token now) from
    the death of a newer state with the same add time (another token)."""
    g = Guard()
    t1 = g.reserve(D1, ESP, 7)
    assert g.seen_death(D1, ESP, 7, 1000) is None
    assert g.seen_death(D1, ESP, 7, 1000) == t1  # a copy: the tuple still has t1
    g.expire(D1, ESP, 7)
    t2 = g.reserve(D1, ESP, 7)
    assert g.seen_death(D1, ESP, 7, 1000) == t1 != t2  # ambiguous: the kernel decides
    assert g.seen_death(D1, ESP, 7, 1000) == t1  # a skipped copy leaves the record
    assert g.seen_death(D1, ESP, 7, 1000, again=True) == t1  # a second death acted on
    assert g.seen_death(D1, ESP, 7, 1000) == t2
    assert g.seen_death(D1, ESP, 7, 1000, cause=5) is None  # a delete, not the expiry
    assert g.seen_death(D2, ESP, 7, 1000) is None
    assert g.seen_death(D1, AH, 7, 1000) is None
    assert g.seen_death(D1, ESP, 7, 1030) is None
    for t in range(20000):  # bounded: the oldest are forgotten
        g.seen_death(D3, ESP, 1, t)
    assert g.seen_death(D1, ESP, 7, 1000) is None


@pytest.mark.parametrize("scope", ["spi", "dst"])
def test_destination_indices_are_recycled(scope: str) -> None:
    g = Guard(scope)  # type: ignore[arg-type]
    for round_ in range(3):
        dsts = [v4(10, round_, i >> 8, i & 255) for i in range(300)]
        for i, d in enumerate(dsts):
            assert g.reserve(d, ESP, 1000 * round_ + i)
        for i, d in enumerate(dsts):
            assert g.owner_dst(ESP, 1000 * round_ + i, d) == d
            assert g.release(d, ESP, 1000 * round_ + i)
    assert len(g) == 0
    assert len(g._dsts) == 300  # no growth across rounds
    g.reserve(D1, ESP, 1)
    assert g.owner_dst(ESP, 1, D1) == D1


# --- pick_free ---------------------------------------------------------------


@pytest.mark.parametrize("scope", ["spi", "dst"])
def test_pick_free_fills_a_small_range_then_none(scope: str) -> None:
    g = Guard(scope)  # type: ignore[arg-type]
    rng = random.Random(7)
    got = []
    for _ in range(256):
        v = g.pick_free(ESP, D1, 0x1000, 0x10FF, rng)
        assert v is not None and 0x1000 <= v <= 0x10FF
        assert not g.is_outstanding(D1, ESP, v)
        assert g.reserve(D1, ESP, v)
        got.append(v)
    assert sorted(got) == list(range(0x1000, 0x1100))
    assert g.pick_free(ESP, D1, 0x1000, 0x10FF, rng) is None
    assert g.stats.collisions == 0
    assert g.pick_free(AH, D1, 0x1000, 0x10FF, rng) is not None


@pytest.mark.parametrize("scope", ["spi", "dst"])
def test_pick_free_fills_the_ipcomp_range_with_no_misses(scope: str) -> None:
    g = Guard(scope)  # type: ignore[arg-type]
    lo, hi = 0x100, 0xEFFF
    started = time.perf_counter()
    for _ in range(hi - lo + 1):
        v = g.pick_free(COMP, D1, lo, hi)
        assert v is not None
        assert g.reserve(D1, COMP, v)
    elapsed = time.perf_counter() - started
    assert g.pick_free(COMP, D1, lo, hi) is None
    assert len(g) == hi - lo + 1 == g.count_in(COMP, D1)
    assert g.stats.collisions == 0
    assert elapsed < 20  # ~0.5 s; a quadratic pick would take minutes


def test_pick_free_ignores_values_outside_the_range() -> None:
    g = Guard()
    g.reserve_many(D1, ESP, range(1, 100))
    for _ in range(50):
        assert g.pick_free(ESP, D1, 98, 101) in (100, 101)


def test_pick_free_scope_spi_sees_other_destinations() -> None:
    spi_scope, dst_scope = Guard("spi"), Guard("dst")
    for g in (spi_scope, dst_scope):
        g.reserve_many(D2, ESP, range(1, 17))
    assert spi_scope.pick_free(ESP, D1, 1, 16) is None
    assert dst_scope.pick_free(ESP, D1, 1, 16) is not None
    assert dst_scope.pick_free(ESP, D2, 1, 16) is None


def test_pick_free_with_step() -> None:
    g = Guard()
    seen = set()
    while (v := g.reserve_free(D1, ESP, 0x102, 0x1FF, step=3)) is not None:
        seen.add(v)
    assert seen == set(range(0x102, 0x200, 3))


def test_pick_free_is_roughly_uniform_when_sparse() -> None:
    g = Guard()
    rng = random.Random(1)
    counts = [0] * 8
    g.reserve(D1, ESP, 3)  # not empty, so the probing path runs
    for _ in range(8000):
        v = g.pick_free(ESP, D1, 0, 7, rng)
        assert v is not None and v != 3
        counts[v] += 1
    assert counts[3] == 0
    assert all(800 < c < 1500 for i, c in enumerate(counts) if i != 3)


def test_pick_free_checks_its_range() -> None:
    g = Guard()
    with pytest.raises(InvalidRequest, match="0x20"):
        g.pick_free(ESP, D1, 0x20, 0x10)
    with pytest.raises(InvalidRequest, match="step"):
        g.pick_free(ESP, D1, 1, 10, step=0)
    with pytest.raises(InvalidRequest, match="hi"):
        g.pick_free(ESP, D1, 1, 1 << 32)


def test_pick_free_is_reproducible_with_an_rng() -> None:
    a, b = Guard(), Guard()
    for g in (a, b):
        g.reserve_many(D1, ESP, range(0, 200, 2))
    assert [a.pick_free(ESP, D1, 0, 255, random.Random(s)) for s in range(20)] == [
        b.pick_free(ESP, D1, 0, 255, random.Random(s)) for s in range(20)
    ]


# --- threads ---------------------------------------------------------------


def test_threads_never_get_the_same_tuple() -> None:
    g = Guard()
    results: list[list[int]] = [[] for _ in range(8)]
    barrier = threading.Barrier(8)

    def work(n: int) -> None:
        rng = random.Random(n)
        barrier.wait()
        for _ in range(5000):
            spi = rng.randint(0x1000, 0x1000 + 9999)
            if g.reserve(D1 if n % 2 else D2, ESP, spi):
                results[n].append(spi)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [spi for r in results for spi in r]
    assert len(won) == len(set(won)) == len(g)
    assert g.stats.collisions == 8 * 5000 - len(won)


def test_threads_reserve_free_fill_a_range_exactly() -> None:
    g = Guard()
    results: list[list[int]] = [[] for _ in range(8)]

    def work(n: int) -> None:
        while (v := g.reserve_free(D1, COMP, 0x100, 0x8FF)) is not None:
            results[n].append(v)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = sorted(spi for r in results for spi in r)
    assert won == list(range(0x100, 0x900))
    assert g.stats.collisions == 0


# --- state machine against a model ------------------------------------------

DSTS = [D1, D2, D3]
PROTOS = [ESP, COMP]
SPI_LO, SPI_HI = 1, 6  # few values, so collisions and a full range are common

dsts = st.sampled_from(DSTS)
protos = st.sampled_from(PROTOS)
spis = st.integers(SPI_LO, SPI_HI)


class GuardMachine(RuleBasedStateMachine):
    scope = "spi"

    def __init__(self) -> None:
        super().__init__()
        self.guard = Guard(self.scope)  # type: ignore[arg-type]
        # scope key -> (dst, state): what is outstanding
        self.model: dict[tuple[object, ...], tuple[bytes, State]] = {}
        # (dst, proto, spi) -> the current reservation's token; every token issued
        self.tokens: dict[tuple[bytes, int, int], int] = {}
        self.issued: list[tuple[bytes, int, int, int]] = []
        self.lost: set[tuple[bytes, int, int]] = set()
        self.collisions = 0
        self.lost_count = 0

    def skey(self, dst: bytes, proto: int, spi: int) -> tuple[object, ...]:
        return (proto, spi) if self.scope == "spi" else (dst, proto, spi)

    def exact(self, dst: bytes, proto: int, spi: int) -> State | None:
        entry = self.model.get(self.skey(dst, proto, spi))
        return entry[1] if entry is not None and entry[0] == dst else None

    @rule(dst=dsts, proto=protos, spi=spis)
    def reserve(self, dst: bytes, proto: int, spi: int) -> None:
        expected = self.skey(dst, proto, spi) not in self.model
        token = self.guard.reserve(dst, proto, spi)
        assert bool(token) is expected
        if expected:
            self.model[self.skey(dst, proto, spi)] = (dst, State.RESERVED)
            self.lost.discard((dst, proto, spi))
            self.issued_token(dst, proto, spi, token)
        else:
            self.collisions += 1

    @rule(dst=dsts, proto=protos, batch=st.lists(spis, max_size=5))
    def reserve_many(self, dst: bytes, proto: int, batch: list[int]) -> None:
        got = self.guard.reserve_many(dst, proto, batch)
        for spi, ok in zip(batch, got, strict=True):
            expected = self.skey(dst, proto, spi) not in self.model
            assert bool(ok) is expected
            if expected:
                self.model[self.skey(dst, proto, spi)] = (dst, State.RESERVED)
                self.lost.discard((dst, proto, spi))
                self.issued_token(dst, proto, spi, ok)
            else:
                self.collisions += 1

    def issued_token(self, dst: bytes, proto: int, spi: int, token: int) -> None:
        # Unique per tuple: a batch reserved whole shares one token among its tuples.
        assert all((dst, proto, spi, token) != issued for issued in self.issued), "a token was issued twice"
        self.tokens[(dst, proto, spi)] = token
        self.issued.append((dst, proto, spi, token))

    def forget(self, dst: bytes, proto: int, spi: int) -> None:
        del self.model[self.skey(dst, proto, spi)]
        self.tokens.pop((dst, proto, spi), None)

    @precondition(lambda self: self.issued)
    @rule(data=st.data())
    def with_token(self, data: st.DataObject) -> None:
        """A handle, current or stale, acts only if it is current."""
        dst, proto, spi, token = data.draw(st.sampled_from(self.issued))
        current = self.tokens.get((dst, proto, spi)) == token
        assert self.guard.is_current(dst, proto, spi, token) is current
        action = data.draw(st.sampled_from(["commit", "release", "expire"]))
        if action == "commit":
            if current:
                self.guard.commit(dst, proto, spi, token)
                self.model[self.skey(dst, proto, spi)] = (dst, State.COMMITTED)
            else:
                with pytest.raises(ReservationLost):
                    self.guard.commit(dst, proto, spi, token)
        elif action == "release":
            assert self.guard.release(dst, proto, spi, token) is current
            if current:
                self.forget(dst, proto, spi)
        else:
            state = self.exact(dst, proto, spi)
            got = self.guard.expire_entry(dst, proto, spi, token)
            if not current:
                assert got is None
                return
            assert got == (state, token)
            self.forget(dst, proto, spi)
            if state is State.RESERVED:
                self.lost_count += 1
            self.lost.add((dst, proto, spi))

    @rule(dst=dsts, proto=protos, spi=spis)
    def commit(self, dst: bytes, proto: int, spi: int) -> None:
        state = self.exact(dst, proto, spi)
        if state in (State.RESERVED, State.COMMITTED):
            self.guard.commit(dst, proto, spi)
            self.model[self.skey(dst, proto, spi)] = (dst, State.COMMITTED)
        else:
            with pytest.raises(ReservationLost, match=f"{spi:#010x}"):
                self.guard.commit(dst, proto, spi)

    @rule(dst=dsts, proto=protos, spi=spis)
    def release(self, dst: bytes, proto: int, spi: int) -> None:
        tracked = self.exact(dst, proto, spi) is not None
        assert self.guard.release(dst, proto, spi) is tracked
        if tracked:
            self.forget(dst, proto, spi)

    @rule(dst=dsts, proto=protos, spi=spis)
    def expire(self, dst: bytes, proto: int, spi: int) -> None:
        state = self.exact(dst, proto, spi)
        assert self.guard.expire(dst, proto, spi) is state
        if state is not None:
            self.forget(dst, proto, spi)
            if state is State.RESERVED:
                self.lost_count += 1
            if state is not State.FOREIGN:
                self.lost.add((dst, proto, spi))

    @rule(dst=dsts, proto=protos, spi=spis)
    def mark_foreign(self, dst: bytes, proto: int, spi: int) -> None:
        self.guard.mark_foreign(dst, proto, spi)
        self.model.setdefault(self.skey(dst, proto, spi), (dst, State.FOREIGN))

    @precondition(lambda self: any(s is State.FOREIGN for _, s in self.model.values()))
    @rule()
    def clear_foreign(self) -> None:
        self.guard.clear_foreign()
        self.model = {k: v for k, v in self.model.items() if v[1] is not State.FOREIGN}

    @rule(dst=dsts, proto=protos, lo=spis, width=st.integers(0, 5), seed=st.integers(0, 2**32))
    def pick_free(self, dst: bytes, proto: int, lo: int, width: int, seed: int) -> None:
        hi = min(lo + width, SPI_HI)
        v = self.guard.pick_free(proto, dst, lo, hi, random.Random(seed))
        free = [s for s in range(lo, hi + 1) if self.skey(dst, proto, s) not in self.model]
        if free:
            assert v in free
        else:
            assert v is None

    @invariant()
    def sizes_and_stats(self) -> None:
        states = [s for _, s in self.model.values()]
        assert len(self.guard) == len(self.model)
        assert self.guard.stats == GuardStats(
            outstanding=len(self.model),
            reserved=states.count(State.RESERVED),
            committed=states.count(State.COMMITTED),
            foreign=states.count(State.FOREIGN),
            collisions=self.collisions,
            lost=self.lost_count,
        )

    @invariant()
    def every_tuple(self) -> None:
        for dst in DSTS:
            for proto in PROTOS:
                for spi in range(SPI_LO, SPI_HI + 1):
                    entry = self.model.get(self.skey(dst, proto, spi))
                    assert self.guard.state(dst, proto, spi) is (entry and entry[1])
                    assert self.guard.owner_dst(proto, spi, dst) == (entry and entry[0])
                    assert self.guard.is_outstanding(dst, proto, spi) is (entry is not None)
                    assert self.guard.is_lost(dst, proto, spi) is ((dst, proto, spi) in self.lost)
                    assert self.guard.token(dst, proto, spi) == self.tokens.get((dst, proto, spi), 0)

    @invariant()
    def counts_and_reserved(self) -> None:
        for dst in DSTS:
            for proto in PROTOS:
                if self.scope == "spi":
                    n = sum(1 for k in self.model if k[0] == proto)
                else:
                    n = sum(1 for k in self.model if k[:2] == (dst, proto))
                assert self.guard.count_in(proto, dst) == n
        expected = {(d, k[-2], k[-1]) for k, (d, s) in self.model.items() if s is State.RESERVED}
        assert sorted(self.guard.reserved()) == sorted(expected)


class GuardMachineDst(GuardMachine):
    scope = "dst"


_machine_settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestGuardScopeSpi = GuardMachine.TestCase
TestGuardScopeSpi.settings = _machine_settings
TestGuardScopeDst = GuardMachineDst.TestCase
TestGuardScopeDst.settings = _machine_settings


class _InterruptedAfterUpdate(dict):  # type: ignore[type-arg]
    """A table whose update() is followed by a signal: CPython runs signal
    handlers when a call returns, so a KeyboardInterrupt can land right there."""

    def update(self, *args: object, **kwargs: object) -> None:
        super().update(*args, **kwargs)
        raise KeyboardInterrupt


@pytest.mark.parametrize("scope", ["spi", "dst"])
def test_batch_reserve_interrupted_as_its_table_changes_keeps_the_guard_whole(scope: str) -> None:
    """A Ctrl-C right after reserve_batch changed the table (seen in a kernel
    test: the counters were not updated yet, and releasing the batch then
    raised KeyError): the batch is reserved and counted whole, and releases
    as any other."""
    g = Guard(scope=scope)
    g.reserve(D1, 50, 0x99)
    g._table = _InterruptedAfterUpdate(g._table)
    with pytest.raises(KeyboardInterrupt):
        g.reserve_batch(D1, 50, [0x100, 0x101, 0x102])
    g._table = dict(g._table)
    assert len(g) == 4 and g.stats.reserved == 4 and g.count_in(50, D1) == 4
    for spi in (0x100, 0x101, 0x102, 0x99):
        assert g.release(D1, 50, spi)
    assert len(g) == 0 and g.stats.reserved == 0 and g.count_in(50, D1) == 0
    assert g.reserve_batch(D1, 50, [0x100, 0x101]) is not None  # and the dst is interned again


@pytest.mark.parametrize("scope", ["spi", "dst"])
def test_batch_release_interrupted_as_its_table_changes_keeps_the_guard_whole(
    scope: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for release_many: a signal right after its one pass over the
    table finds the counters agreeing."""
    import collections
    import types

    import spialloc.guard as guard_mod

    g = Guard(scope=scope)
    g.reserve(D1, 50, 0x99)
    token = g.reserve_batch(D1, 50, [0x100, 0x101, 0x102])
    assert token is not None

    def deque(it: object, maxlen: int | None = None) -> None:
        collections.deque(it, maxlen=maxlen)  # type: ignore[call-overload]
        raise KeyboardInterrupt

    monkeypatch.setattr(guard_mod, "collections", types.SimpleNamespace(deque=deque))
    with pytest.raises(KeyboardInterrupt):
        g.release_many(D1, 50, [0x100, 0x101, 0x102], [token] * 3)
    monkeypatch.undo()
    assert len(g) == 1 and g.stats.reserved == 1 and g.count_in(50, D1) == 1
    assert g.release(D1, 50, 0x99)
    assert len(g) == 0 and g.count_in(50, D1) == 0


def test_port_followers_hear_each_new_port_until_dropped() -> None:
    """Watchers refilter from ``adopt_port`` itself, before the new socket's
    first request; a follower that is gone (weakly held) is not called."""
    g = Guard()
    heard: list[list[int]] = []

    class Follower:
        def ports_changed(self) -> None:
            heard.append(g.ports()[1])  # as a watcher does: takes the lock again

    f = Follower()
    g.follow_ports(f)
    g.adopt_port(7)
    g.adopt_port(9)
    assert heard == [[7], [7, 9]]
    del f
    g.adopt_port(11)
    assert heard == [[7], [7, 9]] and g.ports()[1] == [7, 9, 11]
