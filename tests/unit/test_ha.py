"""HA partitioning of SPI ranges."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from spialloc.errors import InvalidRequest
from spialloc.ha import Partition, check_disjoint

SPI_MAX = 0xFFFFFFFF


# --- validation -------------------------------------------------------------


@pytest.mark.parametrize(
    "node, nodes, match",
    [
        (2, 2, "node=2"),
        (0, 0, "nodes=0"),
        (-1, 2, "node=-1"),
        (0, -3, "nodes=-3"),
        (True, 2, "node"),
        (0, True, "nodes"),
        (0, 2.0, "nodes"),
        ("0", 2, "node"),
    ],
)
def test_bad_node_numbers(node: object, nodes: object, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        Partition(node, nodes)  # type: ignore[arg-type]


def test_bad_method_and_bits() -> None:
    with pytest.raises(InvalidRequest, match="'modulo'"):
        Partition(0, 2, "modulo")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="bits=3"):
        Partition(0, 2, "range", bits=3)
    with pytest.raises(InvalidRequest, match="bits=1.*nodes=3"):
        Partition(0, 3, "label_bits", bits=1)
    with pytest.raises(InvalidRequest, match="bits=33"):
        Partition(0, 2, "label_bits", bits=33)


def test_frozen() -> None:
    p = Partition(0, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.node = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "lo, hi, match",
    [(-1, 10, "lo=-1"), (0, 1 << 32, "hi="), (10, 5, "0xa"), (True, 5, "lo"), (0, 5.5, "hi")],
)
def test_bad_base_range(lo: object, hi: object, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        Partition(0, 2).apply(lo, hi)  # type: ignore[arg-type]


def test_range_too_small_names_the_values() -> None:
    with pytest.raises(InvalidRequest, match=r"0x100-0x102 has 3 values.*4 nodes"):
        Partition(0, 4).apply(0x100, 0x102)
    with pytest.raises(InvalidRequest, match=r"has 3 values.*4 blocks"):
        Partition(0, 3, "label_bits").apply(0x100, 0x102)


# --- method "range" -----------------------------------------------------------


def test_range_split_last_takes_the_remainder() -> None:
    assert [Partition(k, 3).apply(0, 9) for k in range(3)] == [(0, 2), (3, 5), (6, 9)]
    assert Partition(0, 3).split(0, 9) == [(0, 2), (3, 5), (6, 9)]


def test_single_node_gets_everything() -> None:
    assert Partition(0, 1).apply(0xC0000000, 0xCFFFFFFF) == (0xC0000000, 0xCFFFFFFF)
    assert Partition(0, 1, "label_bits").apply(5, 5) == (5, 5)


def test_range_default_spi_range_in_halves() -> None:
    assert Partition(0, 2).apply(0xC0000000, 0xCFFFFFFF) == (0xC0000000, 0xC7FFFFFF)
    assert Partition(1, 2).apply(0xC0000000, 0xCFFFFFFF) == (0xC8000000, 0xCFFFFFFF)


def test_range_exactly_one_value_each() -> None:
    assert Partition(0, 4).split(10, 13) == [(10, 10), (11, 11), (12, 12), (13, 13)]


def test_contains_and_node_of() -> None:
    p = Partition(1, 3)
    assert not p.contains(2, 0, 9)
    assert p.contains(3, 0, 9) and p.contains(5, 0, 9)
    assert not p.contains(6, 0, 9)
    assert [p.node_of(s, 0, 9) for s in range(11)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, None]
    with pytest.raises(InvalidRequest, match="spi"):
        p.contains(-1, 0, 9)


# --- method "label_bits" --------------------------------------------------------


def test_label_bits_node_id_in_the_top_bits() -> None:
    lo, hi = 0xC0000000, 0xCFFFFFFF
    p = Partition(2, 3, "label_bits")
    assert p.label_bits == 2
    assert p.apply(lo, hi) == (0xC8000000, 0xCBFFFFFF)
    for spi in (0xC8000000, 0xC9234567, 0xCBFFFFFF):
        assert (spi - lo) >> (28 - 2) == 2 == p.node_of(spi, lo, hi)
    assert p.node_of(0xCC000000, lo, hi) is None  # block 3: no node yet
    assert Partition(0, 2).label_bits == 0


def test_label_bits_leave_room_to_grow() -> None:
    lo, hi = 0x100, 0xEFFF
    small = [Partition(k, 3, "label_bits", bits=3).apply(lo, hi) for k in range(3)]
    grown = [Partition(k, 8, "label_bits", bits=3).apply(lo, hi) for k in range(8)]
    assert grown[:3] == small  # adding nodes moves nobody
    check_disjoint(grown)


def test_label_bits_unused_tail() -> None:
    # 10 values in 4 blocks of 2: values 8 and 9 belong to nobody.
    assert Partition(0, 4, "label_bits").split(0, 9) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert Partition(0, 4, "label_bits").node_of(9, 0, 9) is None


# --- check_disjoint ---------------------------------------------------------


def test_check_disjoint_accepts_adjacent_ranges() -> None:
    check_disjoint([(0x200, 0x2FF), (0x100, 0x1FF), (0x300, 0x300)])
    check_disjoint([])


@pytest.mark.parametrize(
    "ranges, match",
    [
        ([(0x100, 0x1FF), (0x1FF, 0x2FF)], "0x100-0x1ff and 0x1ff-0x2ff"),
        ([(0x300, 0x3FF), (0x100, 0x1000)], "0x100-0x1000 and 0x300-0x3ff"),
        ([(0x100, 0x1000), (0x200, 0x300), (0x400, 0x500)], "0x100-0x1000 and 0x200-0x300"),
        ([(5, 5), (5, 5)], "0x5-0x5 and 0x5-0x5"),
    ],
)
def test_check_disjoint_names_the_overlap(ranges: list[tuple[int, int]], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        check_disjoint(ranges)


@pytest.mark.parametrize("bad", [[(1, 2, 3)], [(5, 1)], [(-1, 3)], [[1, 2]]])
def test_check_disjoint_rejects_bad_pairs(bad: list[object]) -> None:
    with pytest.raises(InvalidRequest):
        check_disjoint(bad)  # type: ignore[arg-type]


# --- properties ------------------------------------------------------------


@st.composite
def ranges_and_nodes(draw: st.DrawFn) -> tuple[int, int, int]:
    lo = draw(st.integers(0, SPI_MAX))
    hi = draw(st.integers(lo, SPI_MAX))
    n = draw(st.integers(1, min(64, hi - lo + 1)))
    return lo, hi, n


@given(ranges_and_nodes())
def test_range_split_is_a_partition(args: tuple[int, int, int]) -> None:
    lo, hi, n = args
    parts = [Partition(k, n).apply(lo, hi) for k in range(n)]
    check_disjoint(parts)
    assert all(a <= b for a, b in parts)
    assert parts[0][0] == lo and parts[-1][1] == hi
    assert all(parts[k][1] + 1 == parts[k + 1][0] for k in range(n - 1))


@given(ranges_and_nodes(), st.data())
def test_node_of_agrees_with_contains(args: tuple[int, int, int], data: st.DataObject) -> None:
    lo, hi, n = args
    method = data.draw(st.sampled_from(["range", "label_bits"]))
    assume(method == "range" or hi - lo + 1 >= 1 << (n - 1).bit_length())
    spi = data.draw(st.integers(lo, hi))
    owner = Partition(0, n, method).node_of(spi, lo, hi)  # type: ignore[arg-type]
    owners = [k for k in range(n) if Partition(k, n, method).contains(spi, lo, hi)]  # type: ignore[arg-type]
    assert owners == ([] if owner is None else [owner])
    if method == "range":
        assert len(owners) == 1


@given(ranges_and_nodes(), st.integers(0, 3))
def test_label_bits_blocks_are_disjoint_equal_and_inside(args: tuple[int, int, int], extra: int) -> None:
    lo, hi, n = args
    bits = (n - 1).bit_length() + extra
    assume(hi - lo + 1 >= 1 << bits)
    parts = Partition(0, n, "label_bits", bits=bits).split(lo, hi)
    check_disjoint(parts)
    assert len({b - a for a, b in parts}) == 1
    assert all(lo <= a <= b <= hi for a, b in parts)
    assert parts[0][0] == lo
