"""hold=: a reservation outlives the larval lifetime until its negotiation time runs out."""

from __future__ import annotations

import time

import pytest

import spialloc
from spialloc import Allocator, Namespace


def test_held_reservation_is_renewed_until_hold_runs_out(netns: Namespace) -> None:
    lost: list[spialloc.Reservation] = []
    with Allocator(netns, on_lost=lost.append) as alloc:
        alloc.acq_expires = 1
        held = alloc.allocate("10.0.0.1", spi_range=(0x5000, 0x5000), hold=4)
        plain = alloc.allocate("10.0.0.1", spi_range=(0x5001, 0x5001))
        deadline = time.monotonic() + 10
        while plain not in lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert plain in lost, "the larval state without hold never expired"
        # Past several larval lifetimes, still ours and still in the kernel.
        time.sleep(2.5)
        assert held not in lost
        assert alloc.stats.renewed >= 2
        assert alloc.guard is not None and alloc.guard.state(*held.key) is spialloc.State.RESERVED
        while held not in lost and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        assert held in lost, "hold ran out but the reservation was never reported lost"
        with pytest.raises(spialloc.ReservationLost):
            alloc.commit(held)


def test_commit_ends_the_hold(netns: Namespace) -> None:
    with Allocator(netns) as alloc:
        r = alloc.allocate("10.0.0.1", hold=30)
        alloc.commit(r)
        assert r.key not in alloc.core.book.held
        alloc.release(r)


def test_hold_needs_the_watcher(netns: Namespace) -> None:
    with Allocator(netns, watch_expiry=False) as alloc:
        with pytest.raises(spialloc.InvalidRequest, match="watch"):
            alloc.allocate("10.0.0.1", hold=5)
        with pytest.raises(spialloc.InvalidRequest, match="hold=-1"):
            alloc.allocate("10.0.0.1", hold=-1)


def test_release_of_a_lost_reservation_never_deletes_the_new_holder(netns: Namespace) -> None:
    """Once a reservation is lost its SPI may go to someone else; releasing
    the stale Reservation must not delete the new holder's state."""
    lost: list[spialloc.Reservation] = []
    with Allocator(netns, on_lost=lost.append) as alloc, Allocator(netns, guard=False) as other:
        alloc.acq_expires = 1
        r = alloc.allocate("10.0.0.1", spi_range=(0x6000, 0x6000))
        deadline = time.monotonic() + 10
        while r not in lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r in lost
        theirs = other.allocate("10.0.0.1", spi_range=(0x6000, 0x6000))
        with pytest.raises(spialloc.ReservationLost):
            alloc.release(r)
        assert alloc.lookup("10.0.0.1", theirs.spi) is not None
        other.release(theirs)
