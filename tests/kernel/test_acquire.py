"""allocate_for(): binding a kernel ACQUIRE, attacked.

Each test makes an ACQUIRE from a policy of its own (mark, mask, transport or
tunnel, IPv4 or IPv6) and checks, against ip(8) as the witness, that the
kernel's ACQ state got the SPI and that no other state exists; then tries to
bind the same ACQUIRE again in every way a daemon could (another allocator,
the async face, another thread, allocate(seq=), another direction) and checks
that each is refused before the kernel is touched: the first state's fields,
direction included, stay as they were.
"""

from __future__ import annotations

import asyncio
import platform
import re
import threading

import pytest
from nsutil import acquire_from_policy, ns_run, sad_count, sad_spis

from spialloc import (
    Acquire,
    Allocator,
    AlreadyBound,
    AsyncAllocator,
    Direction,
    InvalidRequest,
    KernelState,
    Mode,
    Namespace,
    Proto,
    SpiExhausted,
    UnsupportedByKernel,
)

# Linux 6.10 added SA directions and makes ACQ states with direction out; the
# VM tier runs this file on older kernels too.
_v = re.match(r"(\d+)\.(\d+)", platform.release())
HAS_SA_DIR = _v is not None and (int(_v.group(1)), int(_v.group(2))) >= (6, 10)
ACQ_DIR = Direction.OUT if HAS_SA_DIR else None

MARKED_TUNNEL = (
    "src 10.97.0.1/32 dst 10.97.0.2/32 dir out mark 0x70 mask 0xf0 "
    "tmpl src 10.97.0.1 dst 10.97.0.2 proto esp mode tunnel reqid 7"
)
V4_TRANSPORT = "src 10.97.0.1/32 dst 10.97.0.3/32 proto udp dir out tmpl proto esp mode transport reqid 8"
V6_TUNNEL = (
    "src fd00:97::1/128 dst fd00:97::2/128 dir out mark 9 "
    "tmpl src fd00:97::1 dst fd00:97::2 proto ah mode tunnel reqid 10"
)
V6_TRANSPORT = "src fd00:97::1/128 dst fd00:97::3/128 dir out tmpl proto esp mode transport reqid 11"

CASES = {
    "v4-tunnel-marked": (MARKED_TUNNEL, "10.97.0.2", 0x75),
    "v4-transport": (V4_TRANSPORT, "10.97.0.3", 0),
    "v6-tunnel-marked-ah": (V6_TUNNEL, "fd00:97::2", 9),
    "v6-transport": (V6_TRANSPORT, "fd00:97::3", 0),
}


def only_state(alloc: Allocator) -> KernelState:
    states = alloc.states()
    assert len(states) == 1, states
    return states[0]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("direction", [None, "out"])
def test_allocate_for_gives_the_acq_state_its_spi(netns: Namespace, case: str, direction: str | None) -> None:
    policy, dst, mark = CASES[case]
    ev = acquire_from_policy(netns, policy, dst, mark=mark)
    with Allocator(netns) as alloc:
        acq = only_state(alloc)
        assert acq.spi == 0 and acq.acquire_seq == ev.seq and acq.mark == ev.mark
        assert acq.direction is ACQ_DIR  # the kernel's own
        if direction is not None and not HAS_SA_DIR:
            with pytest.raises(UnsupportedByKernel):
                alloc.allocate_for(ev, direction=direction)
            direction = None  # and the ACQUIRE is still free to bind
        r = alloc.allocate_for(ev, direction=direction)
        st = only_state(alloc)  # no extra larval state: the ACQ state itself
        assert (st.spi, st.acquire_seq) == (r.spi, ev.seq)
        assert (st.dst, st.src, st.proto, st.mode, st.reqid, st.mark) == (
            ev.dst,
            ev.src,
            ev.proto,
            ev.mode,
            ev.reqid,
            ev.mark,
        )
        assert st.direction is ACQ_DIR
        assert (r.seq, r.mark, r.mode, r.reqid) == (ev.seq, ev.mark, ev.mode, ev.reqid)
        assert sad_spis(netns) == {r.spi} and sad_count(netns) == 1  # ip(8) sees the same
        if "transport" in case:
            assert st.mode is Mode.TRANSPORT  # Mode.TRANSPORT is 0: not replaced by a default
        assert alloc.release(r) == 1
        assert sad_count(netns) == 0


@pytest.mark.parametrize("first,second", [("out", None), (None, "out")])
def test_second_binding_is_refused_and_leaves_the_first_state_unchanged(
    netns: Namespace, first: str | None, second: str | None
) -> None:
    ev = acquire_from_policy(netns, MARKED_TUNNEL, "10.97.0.2", mark=0x75)
    with Allocator(netns) as a, Allocator(netns, guard="private") as b, Allocator(netns, guard=False) as raw:
        if not HAS_SA_DIR:  # the kernel has no SA directions: only None can be asked for
            first = second = None
        r = a.allocate_for(ev, direction=first)
        before = only_state(a)
        attempts = [
            lambda: a.allocate_for(ev, direction=second),
            lambda: b.allocate_for(ev, direction=second),
            lambda: raw.allocate_for(ev, direction=second),
            lambda: a.allocate(ev.dst, ev.proto, src=ev.src, mode=ev.mode, reqid=ev.reqid, mark=ev.mark, seq=ev.seq),
            lambda: raw.allocate(ev.dst, ev.proto, src=ev.src, mode=ev.mode, reqid=ev.reqid, mark=ev.mark, seq=ev.seq),
        ]
        if HAS_SA_DIR:  # what rewrote the first state's direction before: the same seq, direction in
            attempts.append(
                lambda: a.allocate(
                    ev.dst, ev.proto, src=ev.src, mode=ev.mode, reqid=ev.reqid, mark=ev.mark, seq=ev.seq, direction="in"
                )
            )
        for attempt in attempts:
            with pytest.raises(AlreadyBound) as info:
                attempt()
            assert info.value.seq == ev.seq and info.value.reservation == r
        after = only_state(a)
        assert after == before  # direction included: the kernel never saw a second request
        assert after.direction is ACQ_DIR
        assert a.release(r) == 1


def test_async_binding_is_refused_after_a_blocking_one(netns: Namespace) -> None:
    ev = acquire_from_policy(netns, V4_TRANSPORT, "10.97.0.3")

    async def main() -> None:
        async with AsyncAllocator(netns) as aa:
            with Allocator(netns) as a:
                r = await aa.allocate_for(ev, direction="out" if HAS_SA_DIR else None)
                with pytest.raises(AlreadyBound):
                    a.allocate_for(ev)
                with pytest.raises(AlreadyBound):
                    await aa.allocate_for(ev)
                assert only_state(a).direction is ACQ_DIR
                assert await aa.release(r) == 1

    asyncio.run(main())


def test_racing_threads_bind_once(netns: Namespace) -> None:
    ev = acquire_from_policy(netns, MARKED_TUNNEL, "10.97.0.2", mark=0x75)
    with Allocator(netns) as a, Allocator(netns, guard="private") as b:
        start = threading.Barrier(8)
        won: list[object] = []
        refused: list[AlreadyBound] = []

        def bind(alloc: Allocator, direction: str | None) -> None:
            start.wait()
            try:
                won.append(alloc.allocate_for(ev, direction=direction))
            except AlreadyBound as exc:
                refused.append(exc)

        dirs = (None, "out" if HAS_SA_DIR else None)
        threads = [threading.Thread(target=bind, args=((a, b)[i % 2], dirs[i % 2])) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 7
        st = only_state(a)
        assert st.spi == won[0].spi  # type: ignore[attr-defined]
        assert st.direction is ACQ_DIR


def test_a_failed_binding_can_be_retried(netns: Namespace) -> None:
    """No free SPI in the range asked for: nothing is bound, the ACQ state
    keeps SPI 0, and a second try with a wider range binds it."""
    ev = acquire_from_policy(netns, V4_TRANSPORT, "10.97.0.3")
    with Allocator(netns) as alloc:
        taken = alloc.allocate("192.0.2.9", spi_range=(0xC0000100, 0xC0000100))
        with pytest.raises(SpiExhausted):
            alloc.allocate_for(ev, spi_range=(0xC0000100, 0xC0000100))
        acq = [s for s in alloc.states() if s.acquire_seq == ev.seq]
        assert len(acq) == 1 and acq[0].spi == 0
        r = alloc.allocate_for(ev)
        assert {s.spi: s.acquire_seq for s in alloc.states()} == {taken.spi: 0, r.spi: ev.seq}
        assert alloc.release([r, taken]) == 2


def test_bad_input_touches_nothing(netns: Namespace) -> None:
    ev = acquire_from_policy(netns, V4_TRANSPORT, "10.97.0.3")
    with Allocator(netns) as alloc:
        with pytest.raises(InvalidRequest):
            alloc.allocate_for("not an event")  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest):
            alloc.allocate_for(ev, direction="sideways")
        with pytest.raises(InvalidRequest, match="outbound SA"):
            alloc.allocate_for(ev, direction="in")  # would turn the ACQ state around
        with pytest.raises(InvalidRequest):
            alloc.allocate_for(ev, spi_range=(5, 1))
        no_template = Acquire(
            seq=ev.seq, dst=ev.dst, src=ev.src, proto=Proto.ESP, reqid=0, mode=None, selector=ev.selector
        )
        with pytest.raises(InvalidRequest):
            alloc.allocate_for(no_template)
        assert only_state(alloc).spi == 0  # the ACQ state, untouched
        r = alloc.allocate_for(ev)  # and the ACQUIRE is still free to bind
        assert only_state(alloc).spi == r.spi
        alloc.release(r)


def test_ip_witness_shows_the_mark_and_seq(netns: Namespace) -> None:
    ev = acquire_from_policy(netns, MARKED_TUNNEL, "10.97.0.2", mark=0x75)
    with Allocator(netns) as alloc:
        r = alloc.allocate_for(ev)
        out = ns_run(netns, ["ip", "xfrm", "state", "list"]).stdout
        assert f"spi {r.spi:#010x}" in out and "mark 0x70/0xf0" in out
        alloc.release(r)
