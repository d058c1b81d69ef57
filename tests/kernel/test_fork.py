"""Garbage collection against the real kernel: an Allocator, Monitor or
AsyncAllocator dropped without close() is collected, warned about (a
ResourceWarning, as for unclosed files) and freed: fds, threads, the loop's
reader, and no larval state left behind."""

from __future__ import annotations

import asyncio
import gc
import os
import threading

import pytest
from nsutil import sad_count, wait_for

import spialloc
from spialloc import AsyncAllocator, Monitor, Namespace, Reservation

DST = "192.0.2.1"


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def watchers() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "spialloc-expiry")


# --- garbage collection: dropped without close() -------------------------------------------------


class _Daemon:
    """Holds its Allocator and hears of losses through its own method: the
    cycle allocator -> watcher -> on_lost -> daemon -> allocator runs through
    the watcher thread, a GC root, unless the thread holds its watcher weakly."""

    def __init__(self, netns: Namespace) -> None:
        self.alloc = spialloc.Allocator(netns, on_lost=self.lost)

    def lost(self, r: Reservation) -> None:
        pass


def _use_and_drop(netns: Namespace, cycle: bool) -> None:
    alloc = _Daemon(netns).alloc if cycle else spialloc.Allocator(netns)
    alloc.release(alloc.allocate(DST))
    alloc.release(alloc.allocate_many(50, DST))


@pytest.mark.parametrize("cycle", [False, True], ids=["plain", "on_lost-cycle"])
def test_unclosed_allocator_is_collected_warned_and_freed(netns: Namespace, cycle: bool) -> None:
    with pytest.warns(ResourceWarning):
        _use_and_drop(netns, cycle)  # warm-up: imports, caches
        gc.collect()
    fds0, threads0, watchers0 = fds(), threading.active_count(), watchers()
    with pytest.warns(ResourceWarning, match="unclosed Allocator in isolated network namespace") as caught:
        _use_and_drop(netns, cycle)
        gc.collect()
    assert caught[0].source is not None  # source=self, as unclosed files do
    assert (fds(), threading.active_count(), watchers()) == (fds0, threads0, watchers0)
    for _ in range(50):
        with pytest.warns(ResourceWarning, match="unclosed Allocator"):
            _use_and_drop(netns, cycle)
            gc.collect()
    assert (fds(), threading.active_count(), watchers()) == (fds0, threads0, watchers0)
    assert sad_count(netns) == 0


def test_unclosed_monitor_is_collected_warned_and_freed(netns: Namespace) -> None:
    fds0 = fds()
    for _ in range(20):
        with pytest.warns(ResourceWarning, match="unclosed Monitor"):
            Monitor(netns).get(timeout=0)
            gc.collect()
    assert fds() == fds0


def test_unclosed_async_allocator_is_collected_while_its_loop_runs_on(netns: Namespace) -> None:
    """The loop's reader must not keep a dropped AsyncAllocator alive, and
    collecting it must take the reader off the loop (a stale entry would
    swallow a later reader on the same fd number)."""
    loop = asyncio.new_event_loop()

    def use_and_drop() -> int:
        aa = AsyncAllocator(netns)
        r = loop.run_until_complete(aa.allocate(DST))
        loop.run_until_complete(aa.release(r))
        return aa._sock.fileno()

    try:
        with pytest.warns(ResourceWarning):
            use_and_drop()  # warm-up: the loop's executor threads
            gc.collect()
        fds0, watchers0 = fds(), watchers()
        for _ in range(10):
            with pytest.warns(ResourceWarning, match="unclosed AsyncAllocator"):
                fd = use_and_drop()
                gc.collect()
            assert not loop.remove_reader(fd), "the loop still watches a collected AsyncAllocator's socket"
        assert (fds(), watchers()) == (fds0, watchers0)
        assert sad_count(netns) == 0
    finally:
        loop.close()


def test_async_allocator_dropped_outside_its_loop_thread(netns: Namespace) -> None:
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever)
    t.start()

    def use_and_drop() -> int:
        aa = AsyncAllocator(netns)
        r = asyncio.run_coroutine_threadsafe(aa.allocate(DST), loop).result(10)
        asyncio.run_coroutine_threadsafe(aa.release(r), loop).result(10)
        return aa._sock.fileno()

    async def watched(fd: int) -> bool:
        return loop.remove_reader(fd)

    try:
        fds0 = fds()
        with pytest.warns(ResourceWarning, match="unclosed AsyncAllocator"):
            fd = use_and_drop()
            gc.collect()
        # The reader is removed in the loop's thread, before this runs there.
        assert not asyncio.run_coroutine_threadsafe(watched(fd), loop).result(10)
        assert wait_for(lambda: fds() == fds0, 5)
        assert sad_count(netns) == 0
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()
