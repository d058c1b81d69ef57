"""HA partitioning: split an SPI range between the nodes of a cluster without
any coordination, so SAs can fail over from one node to another without SPI
clashes.  Every node must use the same base range and the same ``nodes``.

Both methods give each node one contiguous sub-range, so ``apply`` is all an
allocator needs: the sub-range goes to the kernel as the ALLOCSPI min/max, and
the kernel's own random pick (or the guard's directed pick) stays inside it.
An interleaved split (``spi % nodes == node``) was left out on purpose: the
kernel cannot be told to pick from a residue class, so every allocation would
have to be directed, and an allocator that simply used ``apply`` would
silently hand out the other nodes' SPIs.

``"range"``: node k takes the k-th of ``nodes`` equal slices of [lo, hi]; the
last slice also takes the remainder.  Nothing is wasted, but changing
``nodes`` moves every boundary, so a cluster must not be resized while SAs
allocated under the old split are alive.

``"label_bits"``: the range is cut into 2**bits equal blocks and node k takes
block k, so for a power-of-two sized range the node id is the top ``bits``
bits of ``spi - lo`` (readable in ``ip xfrm state`` output; see ``node_of``).
``bits`` defaults to the fewest that fit ``nodes``; choosing more leaves room
to add nodes later without moving anyone's block.  Blocks beyond ``nodes``,
and the ``size % 2**bits`` values at the top of the range, are unused.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Iterable, Literal

from ._model import check_int
from .errors import InvalidRequest

__all__ = ["Partition", "check_disjoint"]

_SPI_MAX = 0xFFFFFFFF
_METHODS = ("range", "label_bits")


def _base_range(lo: object, hi: object) -> tuple[int, int]:
    lo_i = check_int("lo", lo)
    hi_i = check_int("hi", hi)
    if lo_i > hi_i:
        raise InvalidRequest(f"range lo {lo_i:#x} is greater than hi {hi_i:#x}")
    return lo_i, hi_i


@dataclass(frozen=True, slots=True)
class Partition:
    """This node's share of every SPI range: ``Partition(node, nodes)``.

    ``node`` counts from 0 to ``nodes - 1``.  ``method="range"`` gives node k
    the k-th of ``nodes`` contiguous sub-ranges; ``"label_bits"`` puts the
    node label in the top ``bits`` of the range's free bits (room for
    ``2**bits`` nodes, so a cluster can grow without renumbering).  Raises
    ``InvalidRequest`` for a bad combination, before any syscall."""

    node: int
    nodes: int
    method: Literal["range", "label_bits"] = "range"
    bits: int | None = None  # "label_bits" only; None: the fewest that fit nodes

    def __post_init__(self) -> None:
        nodes = check_int("nodes", self.nodes)
        node = check_int("node", self.node)
        if nodes < 1:
            raise InvalidRequest(f"nodes={nodes} must be at least 1")
        if node >= nodes:
            raise InvalidRequest(f"node={node} must be less than nodes={nodes} (nodes count from 0)")
        if self.method not in _METHODS:
            raise InvalidRequest(f"method={self.method!r} must be 'range' or 'label_bits'")
        if self.bits is not None:
            if self.method != "label_bits":
                raise InvalidRequest(f"bits={self.bits!r} only applies to method='label_bits'")
            bits = check_int("bits", self.bits, 0, 32)
            if nodes > 1 << bits:
                raise InvalidRequest(f"bits={bits} labels at most {1 << bits} nodes, not nodes={nodes}")

    @property
    def label_bits(self) -> int:
        """Bits of the node label ("label_bits"); 0 for "range"."""
        if self.method != "label_bits":
            return 0
        return self.bits if self.bits is not None else (self.nodes - 1).bit_length()

    def _slices(self, lo: int, hi: int) -> tuple[int, int]:
        """(slice width, number of slices) for the base range."""
        size = hi - lo + 1
        count = 1 << self.label_bits if self.method == "label_bits" else self.nodes
        width = size // count
        if width < 1:
            raise InvalidRequest(
                f"range {lo:#x}-{hi:#x} has {size} values, too few for "
                f"{count} {'blocks' if self.method == 'label_bits' else 'nodes'} "
                f"(nodes={self.nodes}, method={self.method!r})"
            )
        return width, count

    def apply(self, lo: int, hi: int) -> tuple[int, int]:
        """This node's sub-range (min, max) of the base range [lo, hi]."""
        lo, hi = _base_range(lo, hi)
        width, _ = self._slices(lo, hi)
        first = lo + self.node * width
        if self.method == "range" and self.node == self.nodes - 1:
            return first, hi
        return first, first + width - 1

    def contains(self, spi: int, lo: int, hi: int) -> bool:
        """Whether ``spi`` is this node's, for the base range [lo, hi]."""
        spi = check_int("spi", spi)
        first, last = self.apply(lo, hi)
        return first <= spi <= last

    def node_of(self, spi: int, lo: int, hi: int) -> int | None:
        """Which node of this cluster owns ``spi`` in the base range [lo, hi];
        None outside every node's sub-range."""
        spi = check_int("spi", spi)
        lo, hi = _base_range(lo, hi)
        width, _ = self._slices(lo, hi)
        if not lo <= spi <= hi:
            return None
        k = (spi - lo) // width
        if self.method == "range":
            return min(k, self.nodes - 1)
        return k if k < self.nodes else None

    def split(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Every node's sub-range, node 0 first (e.g. for ``check_disjoint``
        or to log the cluster layout)."""
        return [Partition(k, self.nodes, self.method, self.bits).apply(lo, hi) for k in range(self.nodes)]


def check_disjoint(partitions: Iterable[tuple[int, int]]) -> None:
    """Raise InvalidRequest naming two overlapping (min, max) ranges, if any."""
    if isinstance(partitions, (str, bytes)) or not isinstance(partitions, Iterable):
        raise InvalidRequest(f"check_disjoint takes an iterable of (min, max) pairs, got {partitions!r}")
    ranges = []
    for item in partitions:
        if not isinstance(item, tuple) or len(item) != 2:
            raise InvalidRequest(f"{item!r} is not a (min, max) pair")
        ranges.append(_base_range(*item))
    ranges.sort()
    # Sorted and disjoint so far, the previous range reaches furthest: one
    # comparison also catches a range nested in an earlier, wider one.
    for (plo, phi), (lo, hi) in pairwise(ranges):
        if lo <= phi:
            raise InvalidRequest(f"ranges {plo:#x}-{phi:#x} and {lo:#x}-{hi:#x} overlap")
