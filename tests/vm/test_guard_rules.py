"""The guard against the kernel's duplicate rules.

Old rules (5.10, 6.1.176): ALLOCSPI checks (daddr, spi, proto), so one SPI can
be handed out for two destinations.  New rules (6.17+, backported as
CVE-2025-39797: 6.1.191+, 6.12): (spi, proto), any destination.  The guard's
default scope "spi" never returns one SPI for two destinations on either;
scope "dst" mirrors the old kernel rule, so on a new-rules kernel the kernel
itself refuses.
"""

from __future__ import annotations

from typing import Iterator

import pytest

import spialloc

FIXED = (0x4242, 0x4242)
DST1, DST2 = "192.0.2.1", "192.0.2.2"


@pytest.fixture
def netns() -> Iterator[spialloc.Namespace]:
    ns = spialloc.Namespace.isolated()
    try:
        yield ns
    finally:
        ns.close()


def test_kernel_alone(netns: spialloc.Namespace, rules: str, facts) -> None:  # type: ignore[no-untyped-def]
    with spialloc.Allocator(netns, guard=False) as alloc:
        r1 = alloc.allocate(DST1, spi_range=FIXED)
        assert r1.spi == 0x4242
        try:
            r2 = alloc.allocate(DST2, spi_range=FIXED)
        except spialloc.SpiExhausted as exc:
            second = f"refused: {exc}"
            assert rules == "new", f"an old-rules kernel refused 0x4242 for a second destination: {exc}"
        else:
            second = f"{r2.spi:#x}"
            assert rules == "old", "a new-rules kernel gave 0x4242 to a second destination"
            assert r2.spi == 0x4242
        facts.record("guard.kernel_alone_second_0x4242", second)
        facts.record("rules", rules)


def test_scope_spi_never_duplicates(netns: spialloc.Namespace, rules: str) -> None:
    with spialloc.Allocator(netns) as alloc:
        assert alloc.guard is not None and alloc.guard.scope == "spi"
        assert alloc.allocate(DST1, spi_range=FIXED).spi == 0x4242
        with pytest.raises(spialloc.SpiExhausted):
            alloc.allocate(DST2, spi_range=FIXED)
        # A range of 16 values for 16 destinations: 16 distinct SPIs, on both rules.
        spis = [alloc.allocate(f"198.51.100.{i}", spi_range=(0x5000, 0x500F)).spi for i in range(1, 17)]
        assert sorted(spis) == list(range(0x5000, 0x5010)), [hex(s) for s in spis]
        with pytest.raises(spialloc.SpiExhausted):
            alloc.allocate("198.51.100.17", spi_range=(0x5000, 0x500F))


def test_scope_spi_against_other_processes(netns: spialloc.Namespace, rules: str) -> None:
    """Another (unguarded) process holds 0x4242 for DST1: the guarded
    allocator must not return it for DST2, though an old kernel would."""
    with spialloc.Allocator(netns, guard=False) as other, spialloc.Allocator(netns, sync=True) as alloc:
        other.allocate(DST1, spi_range=FIXED)
        alloc.sync()
        with pytest.raises(spialloc.SpiExhausted):
            alloc.allocate(DST2, spi_range=FIXED)
        assert alloc.allocate(DST2, spi_range=(0x4242, 0x4243)).spi == 0x4243


def test_scope_dst_mirrors_kernel(netns: spialloc.Namespace, rules: str, facts) -> None:  # type: ignore[no-untyped-def]
    with spialloc.Allocator(netns, guard=spialloc.Guard("dst")) as alloc:
        assert alloc.allocate(DST1, spi_range=FIXED).spi == 0x4242
        with pytest.raises(spialloc.SpiExhausted):  # the guard itself: same dst
            alloc.allocate(DST1, spi_range=FIXED)
        if rules == "old":
            assert alloc.allocate(DST2, spi_range=FIXED).spi == 0x4242
            facts.record("guard.scope_dst_second_0x4242", "0x4242 (as the kernel)")
        else:
            with pytest.raises(spialloc.SpiExhausted):
                alloc.allocate(DST2, spi_range=FIXED)
            facts.record("guard.scope_dst_second_0x4242", "refused (as the kernel)")
