"""Reservation (four slots over a shared tuple) and Reservations (a batch's
lazy sequence), and the guard's bulk paths that batches use: each checked
against the one-at-a-time behaviour it replaces."""

from __future__ import annotations

import array
import dataclasses
import pickle
import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spialloc import Guard, Reservation
from spialloc import guard as guard_mod
from spialloc._model import (
    Proto,
    Reservations,
    batch_reservations,
    batch_without,
    build_request,
    joined_batches,
    reservation_from,
)

REQ = build_request("10.0.0.1", "esp", reqid=7, mark=(1, 0xFF))


def _batch(spis: list[int], tokens: list[int] | None = None, at: float = 1000.0) -> Reservations:
    return batch_reservations(REQ, array.array("I", spis), None if tokens is None else array.array("Q", tokens), at)


# --- Reservation ----------------------------------------------------------------------


def test_reservation_reads_its_request_fields() -> None:
    r = reservation_from(REQ, 0x1234, 5.0, 99)
    assert (r.spi, r.dst, r.src, r.proto, r.mode, r.reqid, r.mark, r.if_id, r.direction, r.seq) == (
        0x1234,
        REQ.dst,
        REQ.src,
        Proto.ESP,
        REQ.mode,
        7,
        (1, 0xFF),
        None,
        None,
        0,
    )
    assert (r.allocated_at, r.token) == (5.0, 99)
    assert r.key == (REQ.gdst, 50, 0x1234)


def test_reservation_is_equal_to_one_built_by_hand_and_hashes_alike() -> None:
    made = reservation_from(REQ, 0x1234, 5.0, 99)
    hand = Reservation(0x1234, REQ.dst, REQ.src, Proto.ESP, REQ.mode, 7, (1, 0xFF), token=99)
    assert made == hand and hash(made) == hash(hand)  # allocated_at is not compared
    assert made != dataclasses.replace(hand, token=98)
    assert made != dataclasses.replace(hand, reqid=8)
    assert made != "esp spi 0x00001234"


def test_reservation_is_frozen() -> None:
    r = reservation_from(REQ, 0x1234, 5.0, 99)
    for name in (*(f.name for f in dataclasses.fields(r)), "_shared"):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(r, name, 1)
        with pytest.raises(dataclasses.FrozenInstanceError):
            delattr(r, name)
    with pytest.raises(AttributeError):  # a slotted class: no other attributes
        r.new = 1  # type: ignore[attr-defined]
    assert r == reservation_from(REQ, 0x1234, 5.0, 99) and r.spi == 0x1234 and r.token == 99


def test_reservation_works_with_the_dataclasses_functions() -> None:
    r = reservation_from(REQ, 0x1234, 5.0, 99)
    assert dataclasses.is_dataclass(r)
    assert [f.name for f in dataclasses.fields(r)][:2] == ["spi", "dst"]
    d = dataclasses.asdict(r)
    assert d["spi"] == 0x1234 and d["mark"] == (1, 0xFF) and d["token"] == 99
    moved = dataclasses.replace(r, spi=0x4321)
    assert type(moved) is Reservation and moved.spi == 0x4321 and moved.reqid == 7 and moved.allocated_at == 5.0
    assert "Reservation(spi=4660, dst=IPv4Address('10.0.0.1')" in repr(r)


def test_reservation_pickles_to_an_equal_one() -> None:
    r = reservation_from(REQ, 0x1234, 5.0, 99)
    back = pickle.loads(pickle.dumps(r))
    assert back == r and back.allocated_at == 5.0 and back.mark == (1, 0xFF)


def test_reservations_of_one_request_share_its_fields() -> None:
    a, b = reservation_from(REQ, 1000, 5.0, 1), reservation_from(REQ, 1001, 5.0, 2)
    assert a._shared is b._shared is REQ.shared
    # Four slots (spi, shared, allocated_at, token): the object itself.
    assert sys.getsizeof(a) <= 80


# --- Reservations ---------------------------------------------------------------------


def test_reservations_builds_each_entry_on_access() -> None:
    spis, tokens = [0x100, 0x200, 0x300], [11, 12, 13]
    rs = _batch(spis, tokens)
    expected = [reservation_from(REQ, s, 1000.0, t) for s, t in zip(spis, tokens, strict=True)]
    assert len(rs) == 3
    assert list(rs) == expected
    assert [rs[i] for i in range(3)] == expected
    assert rs[-1] == expected[-1]
    assert rs[1].allocated_at == 1000.0
    assert rs.spis == spis
    assert rs == expected and rs == tuple(expected)
    assert rs != expected[:2] and rs != [*expected[:2], expected[0]]
    assert expected[1] in rs
    assert rs.index(expected[2]) == 2
    with pytest.raises(IndexError):
        rs[3]
    with pytest.raises(TypeError):
        rs["0"]  # type: ignore[call-overload]


def test_reservations_without_a_guard_have_token_zero() -> None:
    rs = _batch([0x100, 0x200])
    assert [r.token for r in rs] == [0, 0] and rs._token_list() == [0, 0]


def test_a_slice_is_reservations_again() -> None:
    rs = _batch([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    part = rs[1:4]
    assert isinstance(part, Reservations)
    assert part.spis == [2, 3, 4] and part._token_list() == [7, 8, 9]
    assert list(rs[::-2]) == [rs[4], rs[2], rs[0]]
    assert len(rs[10:]) == 0


def test_joined_batches_are_the_parts_in_order() -> None:
    """AsyncAllocator's chunks, each with one token or one per entry (or
    none, unguarded), as one batch; empty parts drop out; the first
    part's allocated_at, the earliest, is everyone's."""
    one_token = batch_reservations(REQ, array.array("I", [1, 2]), 50, 10.0)
    per_entry = _batch([3, 4], [60, 61], at=20.0)
    empty = _batch([], [], at=5.0)
    rs = joined_batches([empty, one_token, empty, per_entry])
    assert rs.spis == [1, 2, 3, 4] and rs._token_list() == [50, 50, 60, 61]
    assert [r.allocated_at for r in rs] == [10.0] * 4
    assert list(rs) == [reservation_from(REQ, s, 10.0, t) for s, t in [(1, 50), (2, 50), (3, 60), (4, 61)]]
    assert joined_batches([per_entry]) is per_entry
    assert len(joined_batches([empty, empty])) == 0
    unguarded = joined_batches([_batch([5]), _batch([6, 7])])
    assert unguarded.spis == [5, 6, 7] and unguarded._tokens is None


def test_batch_without_drops_the_named_entries() -> None:
    rs = _batch([1, 2, 3, 4], [5, 6, 7, 8], at=3.0)
    rest = batch_without(rs, {0, 2})
    assert list(rest) == [rs[1], rs[3]] and rest[0].allocated_at == 3.0
    assert batch_without(batch_reservations(REQ, array.array("I", [1, 2]), 9, 1.0), {1})._token_list() == [9]
    assert batch_without(_batch([1, 2]), {0}).spis == [2]
    assert len(batch_without(rs, range(4))) == 0


def test_reservations_is_immutable_and_unhashable() -> None:
    rs = _batch([1, 2], [3, 4])
    with pytest.raises(TypeError):
        rs[0] = rs[1]  # type: ignore[index]
    with pytest.raises(AttributeError):
        rs.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        hash(rs)


def test_reservations_pickles_as_a_list() -> None:
    rs = _batch([1, 2], [3, 4])
    back = pickle.loads(pickle.dumps(rs))
    assert type(back) is list and back == list(rs)


def test_reservations_repr_names_count_proto_and_dst() -> None:
    assert repr(_batch([1, 2], [3, 4])) == "<Reservations: 2 esp SPIs, dst 10.0.0.1>"


# --- the guard's bulk paths against the one-at-a-time ones ------------------------------

DST = b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 1])
OTHER = b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 2])


def _twins(scope: str, pre: list[tuple[bytes, int, str]]) -> tuple[Guard, Guard]:
    """Two guards in the same state, with the same serial numbers ahead."""
    a, b = Guard(scope, rng=random.Random(7)), Guard(scope, rng=random.Random(7))  # type: ignore[arg-type]
    for g in (a, b):
        for dst, spi, how in pre:
            if how == "foreign":
                g.mark_foreign(dst, 50, spi)
            else:
                t = g.reserve(dst, 50, spi)
                if how == "committed" and t:
                    g.commit(dst, 50, spi, t)
    return a, b


def _state(g: Guard) -> tuple[object, ...]:
    return (g.stats, sorted(g.reserved(committed=True)), g._table, g._counts, g._dst_index, g._by_state)


spi_values = st.integers(0x100, 0x140)
pre_state = st.lists(
    st.tuples(st.sampled_from([DST, OTHER]), spi_values, st.sampled_from(["r", "committed", "foreign"]))
)


def _untokened(g: Guard) -> tuple[object, ...]:
    """A guard's state with the tokens left out of its codes."""
    table = {k: code & ((1 << guard_mod._TOK) - 1) for k, code in g._table.items()}
    return (g.stats, sorted(g.reserved(committed=True)), table, g._counts, g._dst_index, g._by_state)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["spi", "dst"]), pre_state, st.lists(spi_values, max_size=20), st.integers(0, 5))
def test_reserve_many_is_reserve_one_by_one(
    scope: str, pre: list[tuple[bytes, int, str]], spis: list[int], owner: int
) -> None:
    bulk, single = _twins(scope, pre)
    got = bulk.reserve_many_trusted(DST, 50, spis, owner)
    want = [single.reserve_trusted(DST, 50, s, owner) for s in spis]
    # The same tuples reserved, refused and counted; a batch taken whole has
    # one token for all its tuples, the one-by-one calls one each.
    assert [bool(t) for t in got] == [bool(t) for t in want]
    assert all(t & 0xFFFFF == owner for t in got if t)
    assert _untokened(bulk) == _untokened(single)
    for s, t in zip(spis, got, strict=True):
        if t:
            assert bulk.is_current(DST, 50, s, t)


def test_a_free_batch_is_reserved_whole_under_one_token() -> None:
    g = Guard()
    spis = list(range(0x1000, 0x1100))
    token = g.reserve_batch(DST, 50, spis, 3)
    assert token is not None and token & 0xFFFFF == 3
    assert all(g.is_current(DST, 50, s, token) for s in spis)
    assert g.stats.reserved == 0x100
    codes = {id(g._table[(50 << 32) | s]) for s in spis}
    assert len(codes) == 1  # one code object shared by the batch's entries
    # the next batch gets the next serial; a batch with a held SPI is refused whole
    assert g.reserve_batch(DST, 50, [0x2000, 0x2001], 3) == token + (1 << 20)
    assert g.reserve_batch(DST, 50, [0x3000, 0x1000], 3) is None
    assert g.reserve_batch(DST, 50, [0x4000, 0x4000], 3) is None  # repeated
    assert not g.is_outstanding(DST, 50, 0x3000) and not g.is_outstanding(DST, 50, 0x4000)
    assert g.stats.reserved == 0x102


def test_a_stale_handle_of_a_batch_frees_nothing() -> None:
    g = Guard()
    old = g.reserve_batch(DST, 50, [0x10, 0x11], 1)
    assert old is not None and g.release(DST, 50, 0x10, old)
    new = g.reserve_batch(DST, 50, [0x10, 0x12], 1)
    assert new is not None and new != old
    assert not g.release(DST, 50, 0x10, old)  # the first batch's handle is stale
    assert g.release_many(DST, 50, [0x10, 0x11], [old, old]) == 1  # only 0x11 is still the old batch's
    assert g.is_current(DST, 50, 0x10, new)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["spi", "dst"]),
    pre_state,
    st.lists(spi_values, max_size=20, unique=True),
    st.lists(st.integers(0, 3), max_size=20),
)
def test_stale_and_release_many_are_the_one_by_one_calls(
    scope: str, pre: list[tuple[bytes, int, str]], spis: list[int], bent: list[int]
) -> None:
    bulk, single = _twins(scope, pre)
    for g in (bulk, single):
        g.reserve_many_trusted(DST, 50, spis, 1)
    tokens = [bulk.token(DST, 50, s) or 12345 for s in spis]
    # Some handles stale: a token off by one serial, or one that never was.
    for i, how in enumerate(bent[: len(tokens)]):
        if how == 1:
            tokens[i] += 1 << 20
        elif how == 2:
            tokens[i] = 0
    assert bulk.stale_many(DST, 50, spis, tokens) == [
        i for i, (s, t) in enumerate(zip(spis, tokens, strict=True)) if not single.is_current(DST, 50, s, t)
    ]
    freed = bulk.release_many(DST, 50, spis, tokens)
    assert freed == sum(single.release(DST, 50, s, t) for s, t in zip(spis, tokens, strict=True))
    assert _state(bulk) == _state(single)


def test_reservations_concatenate_as_lists_do() -> None:
    a, b = _batch([1, 2], [3, 4]), _batch([5], [6])
    assert a + b == [*a, *b] and type(a + b) is list
    assert a + [b[0]] == [*a, b[0]] and [b[0]] + a == [b[0], *a]
    with pytest.raises(TypeError):
        a + (1,)  # type: ignore[operator]
