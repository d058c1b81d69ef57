"""One guard per namespace per process: a second allocator cannot bring the
seed's duplicate back (issue 11, item 5).

With a private guard each, two allocators in one process that answer one
ACQUIRE (same ``seq``) both got the ACQ state's SPI.  These tests attack the
sharing itself: two handles on one namespace, sync and async faces, other
namespaces, the opt-out, a Guard used in two namespaces, the last close,
fork, and N watchers each receiving every EXPIRE (one death must be acted
on once: reported once, renewed once).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from nsutil import make_acquire, sad_spis, wait_for

from spialloc import Allocator, AsyncAllocator, Guard, InvalidRequest, Namespace, Reservation, State, _shared

DST = "10.0.0.1"
ACQ = dict(src="10.99.0.1", mode="tunnel", reqid=7)


def _path_of(netns: Namespace) -> str:
    helper = netns._helper
    return f"/proc/{os.getpid()}/fd/{netns.fd}" if helper is None else f"/proc/{helper.pid}/ns/net"


def test_allocators_on_one_namespace_share_its_guard(netns: Namespace) -> None:
    with Allocator(netns) as a, Allocator(netns) as b:
        assert a.guard is not None and a.guard is b.guard
        r = a.allocate(DST, spi_range=(0x3000, 0x3001))
        assert b.guard is not None and b.guard.state(*r.key) is State.RESERVED
        s = b.allocate(DST, spi_range=(0x3000, 0x3001))  # the only other value
        assert {r.spi, s.spi} == {0x3000, 0x3001}


def test_a_path_and_a_handle_to_one_namespace_share(netns: Namespace) -> None:
    """Told apart by the nsfs inode, not by how the namespace was named."""
    path = _path_of(netns)
    with Allocator(netns) as a, Allocator(path) as b:
        assert a.guard is b.guard


def test_sync_and_async_allocators_share(netns: Namespace) -> None:
    async def main() -> None:
        with Allocator(netns) as a:
            async with AsyncAllocator(netns) as b:
                assert b.guard is a.guard

    asyncio.run(main())


def test_other_namespaces_and_private_guards_do_not_share(netns: Namespace) -> None:
    other = Namespace.isolated()
    try:
        with Allocator(netns) as a, Allocator(other) as b, Allocator(netns, guard="private") as c:
            assert a.guard is not None and b.guard is not None and c.guard is not None
            assert len({id(a.guard), id(b.guard), id(c.guard)}) == 3
        with Allocator(netns, scope="dst") as d, Allocator(netns) as e:
            assert d.guard is not e.guard  # a guard has one scope
    finally:
        other.close()


def test_two_allocators_answering_one_acquire_get_different_spis(netns: Namespace) -> None:
    """The seed's bug through a second allocator: the kernel answers every
    ALLOCSPI with the ACQUIRE's seq with the ACQ state's one SPI."""
    ev = make_acquire(netns)
    with Allocator(netns) as a, Allocator(netns) as b:
        r1 = a.allocate("10.99.0.2", seq=ev.seq, **ACQ)
        r2 = b.allocate("10.99.0.2", seq=ev.seq, **ACQ)
        assert r1.spi != r2.spi
        assert {r1.spi, r2.spi} <= sad_spis(netns)
    with Allocator(netns, guard=False) as raw:  # what private guards would each have got
        assert raw.allocate("10.99.0.2", seq=ev.seq, **ACQ).spi == r1.spi


def test_a_guard_used_in_a_second_namespace_is_refused_before_any_syscall(netns: Namespace) -> None:
    g = Guard()
    other = Namespace.isolated()
    try:
        with Allocator(netns, guard=g) as a:
            a.allocate(DST)
        before = sad_spis(other)
        with pytest.raises(InvalidRequest, match="another network namespace"):
            Allocator(other, guard=g)
        assert sad_spis(other) == before
    finally:
        other.close()
    with pytest.raises(InvalidRequest, match="guard="):
        Allocator(netns, guard="shared")  # type: ignore[arg-type]


def test_the_namespace_guard_is_forgotten_after_the_last_close(netns: Namespace) -> None:
    """Its inode may later name a new namespace, whose SAD this guard is not."""
    base = _shared.shared_guards()
    a = Allocator(netns)
    b = Allocator(netns)
    assert _shared.shared_guards() == base + 1
    first = a.guard
    a.close()
    assert _shared.shared_guards() == base + 1
    b.close()
    b.close()  # twice: detaches once
    assert _shared.shared_guards() == base
    with Allocator(netns) as c:
        assert c.guard is not first


def test_a_fork_child_gets_a_guard_of_its_own(netns: Namespace) -> None:
    path = _path_of(netns)  # the Namespace itself is inert in the child, like the allocator
    with Allocator(netns) as a:
        r = a.allocate(DST, spi_range=(0x4000, 0x4001))
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                with Allocator(path) as c:
                    ok = c.guard is not None and c.guard.state(*r.key) is None
                    code = 0 if ok else 3
            except BaseException:
                code = 2
            os.write(wfd, bytes([code]))
            os._exit(0)
        os.close(wfd)
        got = os.read(rfd, 1)
        os.close(rfd)
        os.waitpid(pid, 0)
        assert got == b"\x00"
        assert a.guard is not None and a.guard.state(*r.key) is State.RESERVED


def test_one_expire_seen_by_every_watcher_is_reported_once(netns: Namespace) -> None:
    """Both allocators' watchers receive each EXPIRE; only the issuer hears
    of its loss, once, and nobody else counts it."""
    lost_a: list[Reservation] = []
    lost_b: list[Reservation] = []
    with Allocator(netns, on_lost=lost_a.append) as a, Allocator(netns, on_lost=lost_b.append) as b:
        a.acq_expires = 1
        mine = [a.allocate(DST, spi_range=(0x5000, 0x50FF)) for _ in range(8)]
        assert wait_for(lambda: len(lost_a) >= 8, timeout=15.0), lost_a
        time.sleep(0.5)  # any second report would have come by now
        assert sorted(lost_a, key=lambda r: r.spi) == sorted(mine, key=lambda r: r.spi)
        assert lost_b == [] and b.stats.lost == 0 and a.stats.lost == 8
        assert a.guard is not None and all(a.guard.state(*r.key) is None for r in mine)


def test_a_held_reservation_is_renewed_once_per_death(netns: Namespace) -> None:
    """Two watchers on one guard: a held state that expires must be made
    again by one of them; a second renewal would find the SPI taken (or
    make a second state)."""
    lost: list[Reservation] = []
    with Allocator(netns, on_lost=lost.append) as a, Allocator(netns) as b:
        a.acq_expires = 1
        held = a.allocate(DST, spi_range=(0x6000, 0x6000), hold=30)
        time.sleep(3.5)
        assert lost == []
        assert sad_spis(netns) == {held.spi}
        assert a.guard is not None and a.guard.is_current(*held.key, held.token)
        # every renewal is one death: about one per second, counted once each
        assert 2 <= a.stats.renewed <= 4 and b.stats.renewed == 0
        a.commit(held)
