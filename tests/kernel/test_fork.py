"""fork() and garbage collection against the real kernel.

A child inherits every Allocator, AsyncAllocator, Monitor and Guard of its
parent: the same netlink sockets (same port id), the watcher's wake pipe,
the parent's event loop's epoll instance, and locks as the parent's threads
held them.  These tests attack the promise that in the child they are inert
(ForkedError on use, close() touches nothing of the parent's) while the
parent goes on as if nothing happened, and that an Allocator, Monitor or
AsyncAllocator dropped without close() is collected, warned about and freed.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import select
import signal
import threading
import time
import traceback
from typing import Any, Callable

import pytest
from nsutil import sad_count, wait_for

import spialloc
from spialloc import AsyncAllocator, Expire, ForkedError, Guard, Monitor, Namespace, Reservation
from spialloc._netns import _UserNsHelper

DST = "192.0.2.1"


class Child:
    """``fn`` run in a forked child, which always ends with os._exit; its
    return value (JSON) or its traceback comes back through a pipe."""

    def __init__(self, fn: Callable[[], object]) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                os.close(r)
                try:
                    out = json.dumps({"value": fn()}).encode()
                    code = 0
                except BaseException:  # noqa: BLE001 - reported to the parent
                    out = json.dumps({"error": traceback.format_exc()}).encode()
                while out:
                    out = out[os.write(w, out) :]
            finally:
                os._exit(code)
        os.close(w)
        self.pid = pid
        self._r = r

    def result(self, timeout: float = 20.0) -> Any:
        """The child's return value; fails the test if it raised or hung."""
        data = bytearray()
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._r], [], [], left)[0]:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    pytest.fail(f"the child hung for {timeout} s (a lock inherited held?)")
                chunk = os.read(self._r, 1 << 16)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(self._r)
        _, status = os.waitpid(self.pid, 0)
        reply = json.loads(data) if data else {"error": f"no report; exit status {status}"}
        if "error" in reply:
            pytest.fail(f"in the child:\n{reply['error']}")
        assert os.waitstatus_to_exitcode(status) == 0
        return reply["value"]


def not_inert(calls: dict[str, Callable[[], object]], what: str) -> list[str]:
    """Run each call in the child (inherited objects must raise ForkedError
    naming ``what``); the calls that did something else.  Errors are
    collected, not raised, so that whatever the calls did to the parent is
    what the parent's own checks see."""
    wrong = []
    for name, call in calls.items():
        try:
            call()
        except ForkedError as exc:
            if not str(exc).startswith(f"{what} created before fork() in process {os.getppid()}: "):
                wrong.append(f"{name}: {exc}")
        except BaseException as exc:  # noqa: BLE001
            wrong.append(f"{name}: {exc!r}")
        else:
            wrong.append(f"{name}: no error")
    return wrong


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def watchers() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "spialloc-expiry")


def wait_lost(lost: list[Reservation], r: Reservation, timeout: float = 10.0) -> bool:
    return wait_for(lambda: r in lost, timeout)


# --- fork: the parent goes on, the child's copies are inert -------------------------------------


def test_child_close_leaves_the_parent_watcher_and_states_alone(netns: Namespace) -> None:
    """The child's close() used to write the shared wake pipe: the parent's
    watcher stopped and its reservations expired unnoticed."""
    lost: list[Reservation] = []
    guard = Guard()
    with spialloc.Allocator(netns, guard=guard, on_lost=lost.append) as alloc:
        before = alloc.allocate(DST)  # default lifetime (30 s): outlives the test

        def child() -> list[str]:
            wrong = not_inert(
                {
                    "allocate": lambda: alloc.allocate(DST),
                    "allocate_many": lambda: alloc.allocate_many(4, DST),
                    "release": lambda: alloc.release(before),
                    "commit": lambda: alloc.commit(before),
                    "lookup": lambda: alloc.lookup(DST, before.spi),
                    "states": lambda: alloc.states(),
                    "sync": lambda: alloc.sync(),
                    "poll_events": lambda: alloc.poll_events(),
                    "acq_expires": lambda: alloc.acq_expires,
                    "acq_expires=": lambda: setattr(alloc, "acq_expires", 1),
                },
                "Allocator",
            )
            wrong += not_inert({"len(guard)": lambda: len(guard)}, "Guard")
            if not (alloc.closed and alloc.core.kernel.sock.closed):
                wrong.append("the child's copy of the request socket is still open")
            alloc.close()
            alloc.__exit__(None, None, None)
            alloc.__del__()
            return wrong

        wrong = Child(child).result()
        assert alloc.core.watcher is not None and alloc.core.watcher.alive, "the child's close() stopped the watcher"
        assert alloc.lookup(DST, before.spi) is not None, "the child deleted the parent's state"
        alloc.acq_expires = 1
        after = alloc.allocate(DST)  # not held: its larval state dies in ~1 s
        assert wait_lost(lost, after), "the parent's watcher no longer sees EXPIREs after the child's close()"
        assert guard.state(*after.key) is None
        assert before not in lost
        assert alloc.release(before) == 1
        r = alloc.allocate(DST)
        assert alloc.release(r) == 1
        assert wrong == []


def _churn(alloc: spialloc.Allocator, seconds: float) -> list[int]:
    """Allocate singles and batches, releasing half at once: the SPIs kept."""
    kept: list[int] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rs = alloc.allocate_many(32, DST) + [alloc.allocate(DST)]
        keep = 17 if len(kept) < 2000 else 0
        alloc.release(rs[keep:])
        kept += [r.spi for r in rs[:keep]]
    return kept


def test_parent_and_child_allocating_at_once_never_touch_each_others_states(netns: Namespace) -> None:
    with spialloc.Allocator(netns) as alloc:
        warm = alloc.allocate(DST)
        alloc.release(warm)

        def child() -> tuple[list[str], list[int]]:
            # While the parent is mid-call on the same sockets:
            calls = {"allocate": lambda: alloc.allocate(DST), "churn": lambda: _churn(alloc, 0.2)}
            wrong = not_inert(calls, "Allocator")
            alloc.close()
            with spialloc.Allocator(netns) as mine:  # a new one in the child works
                return wrong, _churn(mine, 1.5)  # its states stay: larval states outlive their socket

        kid = Child(child)
        ours = _churn(alloc, 1.5)
        wrong, theirs = kid.result(timeout=30)
        print(f"\nkept: parent {len(ours)}, child {len(theirs)}")
        assert ours and theirs
        assert len(set(ours)) == len(ours) and len(set(theirs)) == len(theirs)
        assert set(ours).isdisjoint(theirs), "the same SPI was handed to both processes"
        present = {s.spi for s in alloc.states(larval=True)}
        assert set(ours) <= present, f"{len(set(ours) - present)} of the parent's states were deleted"
        assert set(theirs) <= present, f"{len(set(theirs) - present)} of the child's states were deleted"
        assert len(present) == len(ours) + len(theirs), "states left that nobody kept"
        assert alloc.stats.lost == 0
        assert alloc.core.watcher is not None and alloc.core.watcher.alive
        assert wrong == []


def test_inherited_monitor_and_async_allocator_are_inert(netns: Namespace) -> None:
    """The child's AsyncAllocator.close() used to read replies from the
    parent's socket and remove the reader from the parent's loop (epoll is
    shared after fork): the parent's next allocate never got its answer."""
    loop = asyncio.new_event_loop()
    try:
        with Monitor(netns, acquire=False) as mon:
            aa = AsyncAllocator(netns)
            try:
                r0 = loop.run_until_complete(aa.allocate(DST))  # attached: its reader is on the loop

                def child() -> list[str]:
                    async def first_event() -> object:
                        async for ev in mon:
                            return ev
                        return None

                    def run(coro: Any) -> Callable[[], object]:
                        return lambda: asyncio.run(asyncio.wait_for(coro, 1))

                    wrong = not_inert(
                        {
                            "allocate": run(aa.allocate(DST)),
                            "allocate_many": run(aa.allocate_many(3, DST)),
                            "release": run(aa.release(r0)),
                            "commit": run(aa.commit(r0)),
                            "lookup": run(aa.lookup(DST, r0.spi)),
                            "states": run(aa.states()),
                            "sync": run(aa.sync()),
                            "sync_allocator.allocate": lambda: aa.sync_allocator.allocate(DST),
                        },
                        "AsyncAllocator",
                    )
                    wrong += not_inert(
                        {
                            "get": lambda: mon.get(timeout=0),
                            "iter": lambda: next(iter(mon)),
                            "aiter": run(first_event()),
                            "fileno": mon.fileno,
                        },
                        "Monitor",
                    )
                    asyncio.run(aa.close())
                    aa.close_now()
                    aa.__del__()
                    mon.close()
                    mon.__del__()
                    return wrong

                wrong = Child(child).result()
                r1 = loop.run_until_complete(asyncio.wait_for(aa.allocate(DST), 5))
                with spialloc.Allocator(netns, guard=False) as plain:
                    plain.acq_expires = 1
                    r2 = plain.allocate(DST)
                    deadline = time.monotonic() + 10
                    seen = None
                    while seen is None and time.monotonic() < deadline:
                        ev = mon.get(timeout=max(0.0, deadline - time.monotonic()))
                        if isinstance(ev, Expire) and ev.spi == r2.spi:
                            seen = ev
                    assert seen is not None and seen.hard, "the parent's Monitor lost its events"
                assert loop.run_until_complete(asyncio.wait_for(aa.release([r0, r1]), 5)) == 2
                assert wrong == []
            finally:
                aa.close_now()
    finally:
        loop.close()


def test_locks_held_by_parent_threads_at_fork_never_hang_the_child(netns: Namespace) -> None:
    """A parent thread (the watcher, a batch) holding a lock at fork time
    holds it for ever in the child: nothing inherited may wait for it."""
    guard = Guard()
    with spialloc.Allocator(netns, guard=guard) as alloc, Monitor(netns) as mon:
        assert alloc.core.watcher is not None
        holding, done = threading.Event(), threading.Event()

        def holder() -> None:
            core = alloc.core
            assert core.watcher is not None
            with core.kernel.sock.lock, core.watcher.sock.lock, core._idle, guard._lock:
                holding.set()
                done.wait(30)

        t = threading.Thread(target=holder)
        t.start()
        try:
            assert holding.wait(5)

            def child() -> tuple[list[str], int]:
                wrong = not_inert(
                    {"allocate": lambda: alloc.allocate(DST), "poll_events": alloc.poll_events, "states": alloc.states},
                    "Allocator",
                )
                wrong += not_inert({"stats": lambda: guard.stats}, "Guard")
                alloc.close()
                mon.close()
                with spialloc.Allocator(netns) as mine:
                    return wrong, mine.release(mine.allocate(DST))

            assert Child(child).result() == [[], 1]
        finally:
            done.set()
            t.join()
        r = alloc.allocate(DST)
        assert alloc.release(r) == 1
        assert mon.get(timeout=0) is None


def test_allocates_own_socket_held_by_a_parent_thread_at_fork(netns: Namespace) -> None:
    """The single allocate's socket (backend "c", ``Core.fast``) is taken in
    C; a parent thread holding it at fork time (reading a refusal) holds it
    for ever in the child's copy.  The inherited allocator is inert there
    anyway, a new one has a socket of its own, and the parent's holder
    finishes and gives the socket back as if nothing happened."""
    with spialloc.Allocator(netns, backend="c", guard=False, spi_range=(0x7000, 0x7000)) as alloc:
        held = alloc.allocate(DST)  # the range's one SPI: the next request is refused
        req, prepared = alloc.core.plain[(DST, "esp")]
        k = alloc.core.kernel
        holding, done = threading.Event(), threading.Event()
        seen: list[object] = []

        def holder() -> None:
            seq = next(k.fast.seqs) & 0xFFFFFFFF
            rc = k.fast.call(k.fast.one, prepared, seq)
            seen.append(rc == k.fast.OTHER and k.fast.held())
            holding.set()
            done.wait(30)
            try:
                k.fast_rest(seq, rc, [None, 0, None, 0])
            except spialloc.SpiExhausted:
                seen.append("refused")

        t = threading.Thread(target=holder)
        t.start()
        try:
            assert holding.wait(5) and seen == [True]

            def child() -> tuple[list[str], int]:
                wrong = not_inert({"allocate": lambda: alloc.allocate(DST)}, "Allocator")
                alloc.close()  # must not wait for the parent thread's hold
                with spialloc.Allocator(netns, backend="c", guard=False) as mine:
                    return wrong, mine.release(mine.allocate("192.0.2.2"))

            assert Child(child).result() == [[], 1]
        finally:
            done.set()
            t.join()
        assert seen == [True, "refused"] and not k.fast.held()
        alloc.release(held)
        k.claim_stray(req)  # the refusal's SPI-less state
        r = alloc.allocate(DST)
        assert r.spi == 0x7000 and alloc.release(r) == 1
    assert sad_count(netns) == 0


def test_namespace_helper_is_inert_in_the_child() -> None:
    """A namespace reached through a helper process (unprivileged
    Namespace.isolated()) has one request channel: a child's requests would
    interleave with the parent's and take its replies."""
    try:
        helper = _UserNsHelper()
    except OSError as exc:
        pytest.skip(f"no user namespaces here: {exc}")
    ns = Namespace(None, "helper namespace", helper)
    try:
        with spialloc.Allocator(ns, watch_expiry=False) as alloc:

            def child() -> list[str]:
                wrong = not_inert({"Allocator": lambda: spialloc.Allocator(ns)}, "Namespace")
                alloc.close()
                ns.close()
                return wrong

            assert Child(child).result() == []
            r = alloc.allocate(DST)
            assert alloc.release(r) == 1
        with spialloc.Allocator(ns, watch_expiry=False) as again:
            assert again.release(again.allocate(DST)) == 1
    finally:
        ns.close()


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


def _collect(caught: Any) -> None:
    """gc until the ResourceWarning came: the watcher thread holds its
    watcher while it reads events (the DELSA events of the releases above),
    so for that moment the allocator is still reachable.  Bounded."""
    for _ in range(500):
        gc.collect()
        if any(issubclass(w.category, ResourceWarning) for w in caught):
            return
        time.sleep(0.01)


@pytest.mark.parametrize("cycle", [False, True], ids=["plain", "on_lost-cycle"])
def test_unclosed_allocator_is_collected_warned_and_freed(netns: Namespace, cycle: bool) -> None:
    with pytest.warns(ResourceWarning) as caught:
        _use_and_drop(netns, cycle)  # warm-up: imports, caches
        _collect(caught)
    fds0, threads0, watchers0 = fds(), threading.active_count(), watchers()
    with pytest.warns(ResourceWarning, match="unclosed Allocator in isolated network namespace") as caught:
        _use_and_drop(netns, cycle)
        _collect(caught)
    assert caught[0].source is not None  # source=self, as unclosed files do
    assert (fds(), threading.active_count(), watchers()) == (fds0, threads0, watchers0)
    for _ in range(50):
        with pytest.warns(ResourceWarning, match="unclosed Allocator") as caught:
            _use_and_drop(netns, cycle)
            _collect(caught)
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
