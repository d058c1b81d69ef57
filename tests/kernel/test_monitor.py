"""Monitor against the real kernel: ACQUIRE and EXPIRE events, blocking and
async iteration, and surviving a receive-buffer overrun (ENOBUFS)."""

from __future__ import annotations

import asyncio
import ipaddress
import select
import time
from typing import Awaitable, TypeVar

from nsutil import make_acquire, sad_count, wait_for

from spialloc import (
    Acquire,
    Allocator,
    ClosedError,
    EventsLost,
    Expire,
    KernelState,
    Mode,
    Monitor,
    Namespace,
    Proto,
    Selector,
)

T = TypeVar("T")
DST = "10.0.0.1"
A1, A2 = ipaddress.ip_address("10.99.0.1"), ipaddress.ip_address("10.99.0.2")


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def set_acq_expires(netns: Namespace, seconds: int) -> None:
    with Allocator(netns, guard=False) as a:
        a.acq_expires = seconds
        assert a.acq_expires == seconds


def check_acquire(ev: object) -> Acquire:
    assert isinstance(ev, Acquire), ev
    assert ev.seq != 0
    assert (ev.dst, ev.src) == (A2, A1)
    assert ev.proto is Proto.ESP
    assert ev.reqid == 7
    assert ev.mode is Mode.TUNNEL
    sel = ev.selector
    assert isinstance(sel, Selector)
    assert (sel.src, sel.dst) == (A1, A2)
    assert (sel.prefixlen_s, sel.prefixlen_d) == (32, 32)
    assert sel.proto == 17 and sel.dport == 9  # the UDP datagram make_acquire sends
    return ev


# --- ACQUIRE ---------------------------------------------------------------------------


def test_acquire_arrives_with_the_right_fields_and_binds(netns: Namespace) -> None:
    with Monitor(netns) as mon:  # open BEFORE the packet: the kernel needs a listener
        make_acquire(netns)
        ev = check_acquire(mon.get(timeout=5))

        with Allocator(netns) as alloc:
            acq = [s for s in alloc.states() if s.spi == 0]
            assert len(acq) == 1 and acq[0].acquire_seq == ev.seq

            r = alloc.allocate(str(ev.dst), ev.proto, src=str(ev.src), mode=Mode.TUNNEL, reqid=ev.reqid, seq=ev.seq)
            assert r.seq == ev.seq
            states = alloc.states()
            assert len(states) == 1  # bound to the ACQ state, no new larval state
            st = states[0]
            assert st.spi == r.spi != 0
            assert st.acquire_seq == ev.seq
            assert (st.dst, st.src, st.mode, st.reqid) == (A2, A1, Mode.TUNNEL, 7)
            alloc.release(r)
        assert sad_count(netns) == 0


def test_async_iteration_gets_the_acquire(netns: Namespace) -> None:
    with Monitor(netns) as mon:

        async def main() -> Acquire:
            loop = asyncio.get_running_loop()
            # The packet is sent while the iterator already waits on the loop.
            trigger = loop.run_in_executor(None, make_acquire, netns)
            try:
                async for ev in mon:
                    if isinstance(ev, Acquire):
                        return ev
                raise AssertionError("async iteration ended")
            finally:
                await trigger

        check_acquire(run(main()))


def test_blocking_iterator(netns: Namespace) -> None:
    with Monitor(netns) as mon:
        make_acquire(netns)
        # the event is queued before we block on the iterator (no hang if not)
        assert select.select([mon], [], [], 5)[0], "no event within 5 s"
        got = None
        for ev in mon:
            got = ev
            break
        check_acquire(got)
        assert mon.get(timeout=0) is None  # one ACQUIRE, one event


def test_get_times_out_with_none(netns: Namespace) -> None:
    with Monitor(netns) as mon:
        t = time.monotonic()
        assert mon.get(timeout=0.3) is None
        assert 0.25 <= time.monotonic() - t < 3


# --- EXPIRE ----------------------------------------------------------------------------


def test_expire_arrives_for_a_larval_state(netns: Namespace) -> None:
    set_acq_expires(netns, 1)
    with Monitor(netns) as mon, Allocator(netns, guard=False) as alloc:
        r = alloc.allocate(DST, "esp")
        t = time.monotonic()
        ev = mon.get(timeout=10)
        assert isinstance(ev, Expire), ev
        assert time.monotonic() - t < 10
        assert ev.hard is True
        assert ev.spi == r.spi
        assert ev.dst == ipaddress.ip_address(DST)
        assert ev.proto is Proto.ESP
        assert isinstance(ev.state, KernelState)
        assert ev.state.spi == r.spi and ev.state.larval
    assert sad_count(netns) == 0


def test_subscriptions_filter_the_event_types(netns: Namespace) -> None:
    set_acq_expires(netns, 1)
    with Monitor(netns, expire=False) as acq_only, Monitor(netns, acquire=False) as exp_only:
        make_acquire(netns)
        with Allocator(netns, guard=False) as alloc:
            r = alloc.allocate(DST)
            ev = exp_only.get(timeout=10)
            assert isinstance(ev, Expire) and ev.spi in (r.spi, 0), ev
            check_acquire(acq_only.get(timeout=5))
            # the ACQ state (seq-bound, spi 0) expires too, after 1 s: still no Expire here
            assert wait_for(lambda: sad_count(netns) == 0, timeout=10)
            assert acq_only.get(timeout=0.5) is None


# --- overrun ---------------------------------------------------------------------------


def test_monitor_survives_enobufs_and_reports_the_loss(netns: Namespace) -> None:
    with Allocator(netns, guard=False) as alloc, Monitor(netns, rcvbuf=4096) as mon:
        alloc.acq_expires = 1
        doomed = alloc.allocate_many(300, DST)
        alloc.acq_expires = 30  # set at creation: these five outlive the test
        survivors = alloc.allocate_many(5, DST)
        # do not read: 300 EXPIREs against a 4 KiB buffer
        assert wait_for(lambda: sad_count(netns) == 5, timeout=15)

        events = []
        while (ev := mon.get(timeout=0.5)) is not None:
            events.append(ev)
        lost = [e for e in events if isinstance(e, EventsLost)]
        expires = [e for e in events if isinstance(e, Expire)]
        assert lost, [type(e).__name__ for e in events]
        assert mon.lost >= 1
        assert len(expires) < 300  # some were dropped ...
        doomed_spis = {r.spi for r in doomed}
        assert all(e.hard and e.spi in doomed_spis for e in expires)  # ... those read are right
        # the resync dump: the SAD after the loss
        assert isinstance(lost[0].states, tuple)
        assert all(isinstance(s, KernelState) for s in lost[0].states)
        assert {s.spi for s in lost[-1].states} == {r.spi for r in survivors}

        # and the monitor still works
        alloc.acq_expires = 1
        r = alloc.allocate(DST)
        ev = mon.get(timeout=10)
        assert isinstance(ev, Expire) and ev.spi == r.spi, ev
        alloc.release(survivors)
    assert sad_count(netns) == 0


def test_monitor_survives_enobufs_async(netns: Namespace) -> None:
    with Allocator(netns, guard=False) as alloc, Monitor(netns, rcvbuf=4096) as mon:
        alloc.acq_expires = 1
        alloc.allocate_many(200, DST)
        assert wait_for(lambda: sad_count(netns) == 0, timeout=15)

        async def main() -> list[object]:
            seen: list[object] = []
            async for ev in mon:
                seen.append(ev)
                if isinstance(ev, EventsLost):
                    break
            return seen

        seen = run(main(), timeout=10)
        assert isinstance(seen[0], EventsLost) and seen[0].states == ()
        assert mon.lost >= 1


def test_two_concurrent_async_consumers_both_get_events(netns: Namespace) -> None:
    """Two coroutines awaiting ``aget`` on one Monitor, two events: both
    must wake.

    BUG (spialloc/monitor.py, Monitor.aget): each call does
    ``loop.add_reader(fd, ...)``, which replaces the reader of the other
    waiter, and removes the reader when it is done; the first waiter is never
    woken, even with an event sitting in the queue, and hangs."""
    set_acq_expires(netns, 1)
    with Monitor(netns) as mon, Allocator(netns, guard=False) as alloc:

        async def main() -> int:
            a = asyncio.ensure_future(mon.aget())
            b = asyncio.ensure_future(mon.aget())
            await asyncio.sleep(0)  # both are waiting
            alloc.allocate_many(2, DST)  # two EXPIREs after ~1 s
            done, pending = await asyncio.wait({a, b}, timeout=4)
            for p in pending:
                p.cancel()
            return len(done)

        assert run(main()) == 2


def test_close_ends_a_waiting_async_iteration(netns: Namespace) -> None:
    """A daemon stops its event loop by closing the monitor: the ``async for``
    waiting for the next event must end (or raise ClosedError), not hang.

    BUG (spialloc/monitor.py, Monitor.aget/close): aget waits on a future
    that only the fd's reader callback resolves; close() closes the fd (epoll
    drops it) without resolving that future, so the waiter hangs forever."""
    mon = Monitor(netns)

    async def main() -> str:
        async def consume() -> str:
            try:
                async for _ in mon:
                    pass
            except ClosedError:
                return "closed"
            return "ended"

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.1)  # it is waiting on the socket
        mon.close()
        try:
            return await asyncio.wait_for(task, 3)
        except asyncio.TimeoutError:
            return "hung"

    assert run(main()) in ("ended", "closed")
