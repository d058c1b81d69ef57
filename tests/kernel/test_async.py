"""AsyncAllocator against the real kernel: concurrency, cancellation, batches,
the guard.  pytest-asyncio is not used: each test drives its own loop with
``asyncio.run`` (bounded by ``run``'s timeout, so a hang is a failure)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import pytest
from nsutil import make_acquire, ns_run, sad_count, sad_spis, wait_for

from spialloc import (
    Acquire,
    Allocator,
    AsyncAllocator,
    BatchError,
    BatchResult,
    ClosedError,
    KernelState,
    Monitor,
    Namespace,
    Proto,
    Reservation,
    ReservationLost,
    Reservations,
    SpiExhausted,
    State,
    aio,
)

T = TypeVar("T")
DST = "10.0.0.1"


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def reservations(results: list[Any]) -> list[Reservation]:
    return [r for r in results if isinstance(r, Reservation)]


def delete_outside(netns: Namespace, spi: int) -> None:
    """Another process deletes one of our states."""
    ns_run(netns, ["ip", "xfrm", "state", "delete", "dst", DST, "proto", "esp", "spi", hex(spi)])


def before_second_chunk(monkeypatch: pytest.MonkeyPatch, netns: Namespace, then: Callable[[int], None]) -> list[int]:
    """Batches run their chunks so that, before the second, another process
    deletes the lowest state (the first chunk's), and ``then(its SPI)`` runs.
    Returns the count of chunks run, as a one-item list."""
    real, calls = aio._batch_part, [0]

    def chunk(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            victim = min(sad_spis(netns))
            delete_outside(netns, victim)
            then(victim)
        return real(*args)

    monkeypatch.setattr(aio, "_batch_part", chunk)
    return calls


# --- concurrency -----------------------------------------------------------------------


@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "raw"])
def test_thousand_concurrent_allocations_are_distinct_and_exist(netns: Namespace, guard: bool) -> None:
    async def main() -> None:
        async with AsyncAllocator(netns, guard=guard) as alloc:
            got = await asyncio.gather(*(alloc.allocate(DST) for _ in range(1000)))
            assert all(isinstance(r, Reservation) for r in got)
            spis = {r.spi for r in got}
            assert len(spis) == 1000
            assert all(0xC0000000 <= s <= 0xCFFFFFFF for s in spis)
            assert sad_count(netns) == 1000
            assert sad_spis(netns) == spis
            assert alloc.stats.allocated == 1000
            if guard:
                assert alloc.guard.stats.reserved == 1000
            assert await alloc.release(got) == 1000
            assert sad_count(netns) == 0
            if guard:
                assert len(alloc.guard) == 0

    run(main())


@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "raw"])
def test_cancellation_mid_flight_leaves_no_larval_state(netns: Namespace, guard: bool) -> None:
    """200 allocations, cancelled at different points of their life: before
    they run, after the request is sent, after the reply may have been read
    but before the caller resumed, never.  The SAD holds exactly the states of
    the tasks that returned a Reservation."""

    async def main() -> None:
        async with AsyncAllocator(netns, guard=guard) as alloc:
            tasks = [asyncio.ensure_future(alloc.allocate(DST)) for _ in range(200)]
            # step 0: cancel right after creation (the coroutine never ran);
            # step k: cancel after k trips through the loop.  i % 6 == 5: never.
            for step in range(5):
                for i, t in enumerate(tasks):
                    if i % 6 == step:
                        t.cancel()
                await asyncio.sleep(0)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            ok = reservations(results)
            cancelled = [r for r in results if isinstance(r, asyncio.CancelledError)]
            assert len(ok) + len(cancelled) == 200, [
                r for r in results if not isinstance(r, (Reservation, asyncio.CancelledError))
            ]
            assert len(cancelled) >= 34  # at least step 0 (never ran) is always cancelled
            assert len(ok) >= 33  # i % 6 == 5 is never cancelled
            # Tasks of steps 1-3 had sent their request (they ran in step 0's
            # trip through the loop): some of them must have been cancelled
            # with their larval state already in the kernel.
            assert any(isinstance(results[i], asyncio.CancelledError) for i in range(200) if i % 6 in (1, 2, 3))
            assert sad_spis(netns) == {r.spi for r in ok}
            assert sad_count(netns) == len(ok)
            if guard:
                assert alloc.guard.stats.reserved == len(ok)
            assert await alloc.release(ok) == len(ok)
            assert sad_count(netns) == 0

    run(main())


@pytest.mark.parametrize("how", ["cancel-then-close", "close-in-flight"])
def test_close_with_allocations_in_flight_leaves_no_larval_state(netns: Namespace, how: str) -> None:
    """A daemon shutting down: cancels its tasks (or not) and closes the
    allocator without letting the loop run in between.  Every request was
    already handled by the kernel inside sendmsg, so its larval state exists;
    no caller gets a Reservation, so none of these states may survive.

    BUG (spialloc/aio.py, AsyncAllocator.close_now): it removes the reader and
    closes the socket without reading the replies already queued on it, so
    the states of cancelled / failed requests are never deleted (they linger
    until xfrm_acq_expires)."""

    async def main() -> None:
        alloc = AsyncAllocator(netns)
        tasks = [asyncio.ensure_future(alloc.allocate(DST)) for _ in range(10)]
        await asyncio.sleep(0)  # every task has sent its request
        if how == "cancel-then-close":
            for t in tasks:
                t.cancel()
        await alloc.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        ok = reservations(results)
        for r in results:
            assert isinstance(r, (Reservation, asyncio.CancelledError, ClosedError)), r
        left = sad_spis(netns) - {r.spi for r in ok}
        assert not left, f"{len(left)} larval states nobody holds after close ({len(ok)} reservations returned)"

    run(main())


def test_concurrent_allocations_beyond_the_receive_buffer_leave_no_orphans(netns: Namespace) -> None:
    """More requests in flight than the receive buffer holds replies for: the
    kernel drops replies (ENOBUFS).  Whatever the callers get, the SAD must
    hold exactly the states of the Reservations returned.

    The buffer is shrunk to make this cheap; with the default 8 MiB buffer the
    same happens from about 10,000 concurrent ``allocate`` calls.

    BUG (spialloc/aio.py, AsyncAllocator._on_readable/_fail_unanswered): on
    ENOBUFS every still-pending future gets NetlinkError(ENOBUFS), but their
    requests were handled and their larval states exist; nothing deletes
    them (the blocking Allocator runs Kernel.recover_lost here; the async path does
    not, and it does not cap requests in flight to the socket's window())."""

    async def main() -> None:
        async with AsyncAllocator(netns, guard=False) as alloc:
            alloc._sock.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)  # shrinking needs no privilege
            results = await asyncio.gather(*(alloc.allocate(DST) for _ in range(500)), return_exceptions=True)
            ok = reservations(results)
            failed = [r for r in results if not isinstance(r, Reservation)]
            assert ok  # some replies fit
            assert sad_spis(netns) == {r.spi for r in ok}, (
                f"{len(ok)} reservations, {len(failed)} errors ({failed[:1]}), {sad_count(netns)} states in the SAD"
            )
            await alloc.release(ok)

    run(main())


# --- batches ---------------------------------------------------------------------------


def test_allocate_many_strict(netns: Namespace) -> None:
    async def main() -> None:
        async with AsyncAllocator(netns) as alloc:
            got = await alloc.allocate_many(500, DST)
            assert isinstance(got, Reservations) and len(got) == 500
            assert len({r.spi for r in got}) == 500
            assert sad_spis(netns) == {r.spi for r in got}
            assert await alloc.release(got) == 500
            assert sad_count(netns) == 0

            # strict, more than the range holds: all or nothing
            with pytest.raises(BatchError) as ei:
                await alloc.allocate_many(40, DST, spi_range=(0x1000, 0x100F))
            assert ei.value.requested == 40
            assert len(ei.value.failures) == 24
            assert ei.value.released == 16
            assert sad_count(netns) == 0
            assert alloc.guard.stats.reserved == 0

    run(main())


def test_allocate_many_not_strict_with_a_small_range(netns: Namespace) -> None:
    async def main() -> None:
        async with AsyncAllocator(netns) as alloc:
            res = await alloc.allocate_many(40, DST, spi_range=(0x1000, 0x100F), strict=False)
            assert isinstance(res, BatchResult)
            assert not res.ok
            assert len(res.reservations) == 16
            assert {r.spi for r in res.reservations} == set(range(0x1000, 0x1010))
            assert len(res.errors) == 24
            assert all(isinstance(e, SpiExhausted) for e in res.errors.values())
            assert all(0 <= i < 40 for i in res.errors)
            assert sad_spis(netns) == set(range(0x1000, 0x1010))
            assert await alloc.release(res.reservations) == 16
            assert sad_count(netns) == 0

    run(main())


@pytest.mark.parametrize("chunks_before_cancel", [1, 2, 3])
def test_cancelling_allocate_many_leaves_no_states(netns: Namespace, chunks_before_cancel: int) -> None:
    """A 20,000 batch runs in chunks of the receive window, yielding to the
    loop in between; cancelling it there releases every state it made."""

    async def main() -> None:
        async with AsyncAllocator(netns) as alloc:
            task = asyncio.ensure_future(alloc.allocate_many(20_000, DST))
            for _ in range(chunks_before_cancel):
                await asyncio.sleep(0)
            inflight = sad_count(netns)
            for _ in range(100):  # on a loaded machine the first chunk can take more turns
                if inflight or task.done():
                    break
                await asyncio.sleep(0)
                inflight = sad_count(netns)
            assert not task.done()
            assert 0 < inflight < 20_000  # really mid-flight
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert sad_count(netns) == 0
            assert alloc.guard.stats.reserved == 0
            # the allocator is still usable afterwards
            r = await alloc.allocate(DST)
            assert sad_spis(netns) == {r.spi}
            await alloc.release(r)

    run(main(), timeout=120)


@pytest.mark.parametrize("end", ["strict_failure", "cancel"])
def test_batch_whose_early_state_was_deleted_outside_still_leaves_no_states(
    netns: Namespace, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    """A batch runs in chunks; while a later chunk runs, someone deletes a
    state of an earlier one (it is lost, its SPI free for anyone).  The
    batch then fails (strict, range exhausted) or is cancelled: every state
    it still owns goes, the lost one is not deleted again, and the caller
    gets BatchError or CancelledError, not the lost reservation's error."""
    lo, size = 0x10000, 1500
    lost: list[Reservation] = []

    async def main() -> None:
        async with AsyncAllocator(netns, on_lost=lost.append) as alloc:
            loop = asyncio.get_running_loop()
            task: asyncio.Task[Any] | None = None

            def then(victim: int) -> None:
                if end == "cancel":
                    assert task is not None
                    loop.call_soon_threadsafe(task.cancel)

            calls = before_second_chunk(monkeypatch, netns, then)
            task = asyncio.ensure_future(alloc.allocate_many(size + 100, DST, spi_range=(lo, lo + size - 1)))
            if end == "cancel":
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                with pytest.raises(BatchError) as ei:
                    await task
                # All but the deleted one, and its SPI again if a later chunk got it back.
                assert ei.value.released in (size - 1, size)
            assert calls[0] >= 2  # the batch really ran in chunks
            assert sad_count(netns) == 0
            await asyncio.sleep(0.3)  # the watcher's thread has read every event by now
            assert lost == []  # the caller never got the lost one: on_lost is not told either
            assert alloc.guard.stats.reserved == 0
            r = await alloc.allocate(DST, spi_range=(lo, lo + size - 1))  # the whole range is free again
            await alloc.release(r)

    run(main(), timeout=120)


def test_async_batch_reports_a_loss_once_its_caller_has_it(netns: Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """on_lost names only reservations the caller holds: a state of the first
    chunk deleted by someone else while the second runs is reported when the
    batch returns (not before, not never), and a state deleted after that
    as any reservation's."""
    lost: list[Reservation] = []
    heard_before_return: list[int] = []

    async def main() -> None:
        async with AsyncAllocator(netns, on_lost=lost.append) as alloc:

            def then(victim: int) -> None:
                wait_for(lambda: alloc.stats.lost == 1, timeout=5.0)  # the watcher has handled it
                heard_before_return.append(len(lost))

            calls = before_second_chunk(monkeypatch, netns, then)
            rs = await alloc.allocate_many(3000, DST)
            assert calls[0] >= 2 and heard_before_return == [0]
            assert len(lost) == 1 and lost[0] in rs and lost[0].spi not in sad_spis(netns)
            other = rs[-1]
            delete_outside(netns, other.spi)
            assert wait_for(lambda: len(lost) == 2, timeout=5.0)
            assert lost[1] == other
            assert await alloc.release([r for r in rs if r not in lost]) == 2998
            assert sad_count(netns) == 0

    run(main(), timeout=120)


@pytest.mark.parametrize("how", ["close", "cancel-then-close"])
@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "raw"])
def test_close_between_chunks_of_a_batch_leaves_no_states(
    netns: Namespace, monkeypatch: pytest.MonkeyPatch, guard: bool, how: str
) -> None:
    """A daemon shutting down closes its allocator (perhaps cancelling its
    tasks first, without letting the loop run) while a batch waits between
    chunks (the earlier chunks' states exist, nobody holds them): the batch
    raises ClosedError, or CancelledError if cancelled, and none of its
    states survive."""
    real = aio._batch_part
    calls = 0

    async def main() -> None:
        alloc = AsyncAllocator(netns, guard=guard)
        chunk_done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def counted(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            part = real(*args)
            if calls == 2:
                loop.call_soon_threadsafe(chunk_done.set)
            return part

        monkeypatch.setattr(aio, "_batch_part", counted)
        task = asyncio.ensure_future(alloc.allocate_many(20_000, DST))
        await chunk_done.wait()  # two chunks' states exist, the third is being asked for
        assert sad_count(netns) > 0
        if how == "cancel-then-close":
            task.cancel()
        await alloc.close()
        with pytest.raises(ClosedError if how == "close" else asyncio.CancelledError):
            await task
        assert sad_count(netns) == 0

    run(main(), timeout=120)


def test_close_with_two_batches_in_flight_leaves_no_states(netns: Namespace) -> None:
    """Two batches of one allocator under way when it closes: each raises
    ClosedError and the states of both go (each batch's parts are its own)."""

    async def main() -> None:
        alloc = AsyncAllocator(netns)
        tasks = [
            asyncio.ensure_future(alloc.allocate_many(20_000, DST)),
            asyncio.ensure_future(alloc.allocate_many(20_000, DST, "ah")),
        ]
        for _ in range(200):  # until both have states (or a generous number of loop turns)
            await asyncio.sleep(0)
            listed = ns_run(netns, ["ip", "xfrm", "state", "list"]).stdout
            if "proto esp" in listed and "proto ah" in listed:
                break
        assert not any(t.done() for t in tasks)
        assert sad_count(netns) > 0
        await alloc.close()
        for t in tasks:
            with pytest.raises(ClosedError):
                await t
        assert sad_count(netns) == 0

    run(main(), timeout=120)


def test_failed_batch_leaves_the_lost_spi_to_the_allocator_that_took_it(
    netns: Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other allocators: a state of an async batch's first chunk is deleted
    by someone else, and a blocking allocator on the same guard takes its SPI
    at once; the batch then fails.  Its clean-up deletes its own states and
    leaves that one alone: it is the other allocator's now."""
    lo, size = 0x10000, 1500

    async def main() -> None:
        with Allocator(netns) as other:
            async with AsyncAllocator(netns) as alloc:
                assert alloc.guard is other.guard
                taken: list[Reservation] = []

                def then(victim: int) -> None:
                    taken.append(other.allocate(DST, spi_range=(victim, victim)))

                before_second_chunk(monkeypatch, netns, then)
                with pytest.raises(BatchError):
                    await alloc.allocate_many(size + 100, DST, spi_range=(lo, lo + size - 1))
                assert len(taken) == 1 and sad_spis(netns) == {taken[0].spi}
                other.release(taken[0])
                assert sad_count(netns) == 0

    run(main(), timeout=120)


# A daemon's asyncio.run(main()) hit by Ctrl-C mid-batch: asyncio cancels
# the main task.  The second chunk says "running" and is slow, so the SIGINT
# lands while the batch has states and more to make.  argv[1]: namespace name.
CTRL_C_MID_BATCH = r"""
import asyncio, sys, time
import spialloc.aio as aio
from spialloc import AsyncAllocator
real, calls = aio._batch_part, [0]
def slow_second(*args):
    calls[0] += 1
    if calls[0] == 2:
        print("running", file=sys.stderr, flush=True)
        time.sleep(1.0)
    return real(*args)
aio._batch_part = slow_second
async def main():
    async with AsyncAllocator(sys.argv[1]) as alloc:
        await alloc.allocate_many(20_000, "10.0.0.1")
        print("returned", file=sys.stderr, flush=True)
asyncio.run(main())
"""


def test_ctrl_c_in_asyncio_run_mid_batch_leaves_no_states(named_netns: str) -> None:
    """Signals: SIGINT to a process in asyncio.run while an async batch is
    between chunks.  It exits with KeyboardInterrupt, and none of the batch's
    states are left in the namespace."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_MID_BATCH, named_netns],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])),
    )
    assert proc.stderr is not None
    assert proc.stderr.readline() == "running\n"
    listed = subprocess.run(["ip", "-n", named_netns, "xfrm", "state", "list"], capture_output=True, text=True)
    assert listed.stdout.count("\nsrc ") + listed.stdout.startswith("src ") > 0  # the first chunk's states
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "KeyboardInterrupt" in err and "returned" not in err, err
    left = subprocess.run(["ip", "-n", named_netns, "xfrm", "state", "list"], capture_output=True, text=True)
    assert left.stdout == "", f"{left.stdout.count('src ')} states left"


# --- the other operations, as coroutines -----------------------------------------------


def test_release_lookup_states_sync_commit_are_coroutines(netns: Namespace) -> None:
    for name in ("allocate", "allocate_many", "release", "lookup", "states", "sync", "commit", "close"):
        assert asyncio.iscoroutinefunction(getattr(AsyncAllocator, name)), name

    async def main() -> None:
        async with AsyncAllocator(netns) as alloc:
            r = await alloc.allocate(DST, "ah")
            assert r.proto is Proto.AH

            st = await alloc.lookup(DST, r.spi, "ah")
            assert isinstance(st, KernelState)
            assert (st.spi, st.proto, str(st.dst), st.larval) == (r.spi, Proto.AH, DST, True)
            assert await alloc.lookup(DST, r.spi, "esp") is None

            states = await alloc.states(larval=True)
            assert [s.spi for s in states] == [r.spi]
            assert await alloc.states(proto="esp") == []

            # a state made by someone else is foreign after sync
            with Allocator(netns, guard=False) as other:
                foreign = other.allocate(DST, "ah")
                assert await alloc.sync() == 1
                assert alloc.guard.state(*foreign.key) is State.FOREIGN
                assert alloc.guard.state(*r.key) is State.RESERVED
                other.release(foreign)

            await alloc.commit(r)
            assert alloc.guard.state(*r.key) is State.COMMITTED

            assert await alloc.release(r) == 1
            with pytest.raises(ReservationLost, match="not current"):
                await alloc.release(r)  # released already: a stale handle touches nothing
            assert alloc.guard.state(*r.key) is None
            assert sad_count(netns) == 0

    run(main())


def test_closed_async_allocator_refuses_work(netns: Namespace) -> None:
    async def main() -> None:
        alloc = AsyncAllocator(netns)
        await alloc.close()
        await alloc.close()  # idempotent
        with pytest.raises(ClosedError):
            await alloc.allocate(DST)

    run(main())


# --- the guard, seed scenario ----------------------------------------------------------


def _acquire(netns: Namespace, mon: Monitor) -> Acquire:
    """make_acquire with a listener open (the kernel keeps an ACQ state only
    if a key manager hears the ACQUIRE)."""
    make_acquire(netns)
    ev = mon.get(timeout=5)
    assert isinstance(ev, Acquire), ev
    return ev


def test_reused_acquire_seq_guarded_async_gets_distinct_spis(netns: Namespace) -> None:
    with Monitor(netns, expire=False) as mon:
        ev = _acquire(netns, mon)

        async def main() -> tuple[Reservation, Reservation, list[KernelState], int]:
            async with AsyncAllocator(netns) as alloc:
                kw: dict[str, Any] = dict(seq=ev.seq, src="10.99.0.1", mode="tunnel", reqid=7)
                r1 = await alloc.allocate("10.99.0.2", **kw)
                r2 = await alloc.allocate("10.99.0.2", **kw)
                states = await alloc.states()
                collisions = alloc.stats.collisions
                await alloc.release([r1, r2])
                return r1, r2, states, collisions

        r1, r2, states, collisions = run(main())
    assert r1.spi != r2.spi
    by_spi = {s.spi: s for s in states}
    assert set(by_spi) == {r1.spi, r2.spi}
    assert by_spi[r1.spi].acquire_seq == ev.seq  # the ACQ state got the first SPI
    assert by_spi[r2.spi].acquire_seq == 0  # the retry made a plain larval state
    assert collisions == 1
    assert sad_count(netns) == 0


def test_reused_acquire_seq_raw_async_returns_the_same_spi(netns: Namespace) -> None:
    """Control: without the guard the kernel's answer comes through as it is."""
    with Monitor(netns, expire=False) as mon:
        ev = _acquire(netns, mon)

        async def main() -> tuple[Reservation, Reservation]:
            async with AsyncAllocator(netns, guard=False) as alloc:
                kw: dict[str, Any] = dict(seq=ev.seq, src="10.99.0.1", mode="tunnel", reqid=7)
                return await alloc.allocate("10.99.0.2", **kw), await alloc.allocate("10.99.0.2", **kw)

        r1, r2 = run(main())
    assert r1.spi == r2.spi
    assert sad_count(netns) == 1


def test_concurrent_allocations_with_the_same_acquire_seq_are_distinct(netns: Namespace) -> None:
    """Several coroutines racing on one ACQUIRE seq (a daemon that handles a
    duplicated event twice): at most one of them gets the ACQ state's SPI."""
    with Monitor(netns, expire=False) as mon:
        ev = _acquire(netns, mon)

        async def main() -> list[Reservation]:
            async with AsyncAllocator(netns) as alloc:
                kw: dict[str, Any] = dict(seq=ev.seq, src="10.99.0.1", mode="tunnel", reqid=7)
                got = await asyncio.gather(*(alloc.allocate("10.99.0.2", **kw) for _ in range(8)))
                assert sad_spis(netns) == {r.spi for r in got}
                await alloc.release(got)
                return got

        got = run(main())
    assert len({r.spi for r in got}) == 8
    assert wait_for(lambda: sad_count(netns) == 0, timeout=5)
