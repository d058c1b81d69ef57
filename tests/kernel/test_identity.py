"""Reservations with identity: a stale or foreign handle can neither commit
nor release, so it cannot take or delete another reservation's state.

Each test attacks one way the guard's promise broke when it knew tuples but
not reservations (issue 11): a lost reservation committed after its SPI was
handed out again, a stale release deleting the successor's state, a release
racing the EXPIRE still queued for it, handles from another allocator or
built by hand, on_lost with a shared guard, IPv4-mapped destinations.
Every test runs in a fresh namespace; ip(8) and GETSA are the witnesses.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import threading
import time

import pytest
from nsutil import sad_spis, wait_for

from spialloc import (
    Allocator,
    Guard,
    InvalidRequest,
    Namespace,
    Reservation,
    ReservationLost,
    SpiExhausted,
    State,
)

DST = "10.0.0.1"


def _lost_then_reused(netns: Namespace, a: Allocator) -> tuple[Reservation, Reservation]:
    """r1 expires (on_lost says so), then the same allocator hands its SPI
    out again as r2."""
    lost: list[Reservation] = []
    a.on_lost = lost.append
    a.acq_expires = 1
    r1 = a.allocate(DST, spi_range=(0x1000, 0x103F))
    assert wait_for(lambda: lost == [r1], timeout=10.0), lost
    a.acq_expires = 3600
    r2 = a.allocate(DST, spi_range=(r1.spi, r1.spi))
    assert r2.spi == r1.spi and r2 != r1 and r2.token != r1.token
    return r1, r2


def test_lost_reservation_cannot_be_committed_after_its_spi_was_reused(netns: Namespace) -> None:
    """Item 1: on a tuple-keyed guard, commit(r1) succeeded once r2 had
    re-reserved the tuple, and both negotiations owned one SPI."""
    with Allocator(netns) as a:
        r1, r2 = _lost_then_reused(netns, a)
        with pytest.raises(ReservationLost, match="not current"):
            a.commit(r1)
        a.commit(r2)
        assert a.guard is not None and a.guard.state(*r2.key) is State.COMMITTED
        with pytest.raises(ReservationLost):
            a.commit(r1)  # still not, now that r2 is committed


def test_stale_release_leaves_the_successors_state_and_entry(netns: Namespace) -> None:
    """Item 2: release(r1), what a daemon does after a failed negotiation,
    deleted r2's state and freed r2's entry, so r3 got the SPI too."""
    with Allocator(netns) as a:
        r1, r2 = _lost_then_reused(netns, a)
        with pytest.raises(ReservationLost, match="nothing was released") as info:
            a.release(r1)
        assert info.value.reservations == [r1]
        assert sad_spis(netns) == {r2.spi}  # r2's state is still there
        assert a.guard is not None and a.guard.is_current(*r2.key, r2.token)
        with pytest.raises(SpiExhausted):
            a.allocate(DST, spi_range=(r1.spi, r1.spi))  # nobody else gets it
        # a list with one stale handle releases nothing at all
        r4 = a.allocate(DST, spi_range=(0x2000, 0x20FF))
        with pytest.raises(ReservationLost):
            a.release([r4, r1])
        assert sad_spis(netns) == {r2.spi, r4.spi}
        assert a.release([r2, r4]) == 2
        with pytest.raises(ReservationLost, match="not current"):
            a.release(r2)  # twice: the second is a stale handle
        assert sad_spis(netns) == set()


def test_release_waits_for_the_queued_expire_and_spares_the_new_holder(netns: Namespace) -> None:
    """Item 3: A's watcher is busy in a slow on_lost while the EXPIRE of
    another of A's reservations waits in its queue; another allocator (a
    process of its own in real life: it shares no guard) gets that SPI from
    the kernel; A.release of the dead reservation deleted the newcomer's
    state.  Release now handles queued events first."""
    busy = threading.Event()
    calls: list[Reservation] = []

    def slow(r: Reservation) -> None:
        calls.append(r)
        if len(calls) == 1:
            busy.set()
            time.sleep(3.0)

    with Allocator(netns, on_lost=slow) as a, Allocator(netns, guard=False) as other:
        a.acq_expires = 1
        rs = [a.allocate(DST, spi_range=(0x3000, 0x30FF)) for _ in range(2)]
        assert busy.wait(10.0)
        (queued,) = [r for r in rs if r != calls[0]]  # its EXPIRE waits behind the slow call
        assert wait_for(lambda: a.lookup(DST, queued.spi) is None, timeout=5.0)
        a.acq_expires = 3600
        theirs = other.allocate(DST, spi_range=(queued.spi, queued.spi))
        with pytest.raises(ReservationLost):
            a.release(queued)
        st = a.lookup(DST, theirs.spi)
        assert st is not None, "release deleted the state another allocator holds"
        assert wait_for(lambda: len(calls) == 2, timeout=5.0)


def test_handles_from_another_allocator_or_built_by_hand_are_refused(netns: Namespace) -> None:
    """Item 4: release() of a reservation this allocator never issued
    deleted whatever state matched."""
    with Allocator(netns, guard=Guard()) as a, Allocator(netns, guard=Guard()) as b:
        ra = a.allocate(DST)
        for handle in (
            ra,  # another allocator's
            Reservation(spi=ra.spi, dst=ra.dst, src=ra.src, proto=ra.proto),  # built by hand
            Reservation(spi=ra.spi, dst=ra.dst, src=ra.src, proto=ra.proto, token=ra.token + 1),  # forged
        ):
            with pytest.raises(InvalidRequest, match="not issued by this Allocator"):
                b.release(handle)
            with pytest.raises(InvalidRequest, match="not issued by this Allocator"):
                b.commit(handle)
        hand = Reservation(spi=ra.spi, dst=ra.dst, src=ra.src, proto=ra.proto)
        with pytest.raises(InvalidRequest, match="not issued"):
            a.release(hand)  # the right allocator, but not a handle it gave out
        assert sad_spis(netns) == {ra.spi}
        # a pickled copy is the same reservation
        copy = pickle.loads(pickle.dumps(ra))
        assert copy == ra
        a.commit(copy)
        assert a.release(copy) == 1
        assert sad_spis(netns) == set()


def _unpickle_and_release(ns_path: str, blob: bytes, q) -> None:  # type: ignore[no-untyped-def]
    try:
        with Allocator(ns_path) as mine:
            mine.allocate(DST)  # this process's allocator has reservations of its own
            try:
                mine.release(pickle.loads(blob))
                q.put("released")
            except InvalidRequest as exc:
                q.put(f"refused: {exc}")
    except BaseException as exc:  # noqa: BLE001
        q.put(f"error: {exc!r}")


def test_a_handle_unpickled_in_another_process_is_refused(netns: Namespace) -> None:
    assert netns.fd is not None
    with Allocator(netns) as a:
        r = a.allocate(DST)
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_unpickle_and_release, args=(f"/proc/{os.getpid()}/fd/{netns.fd}", pickle.dumps(r), q))
        p.start()
        try:
            got = q.get(timeout=60)
        finally:
            p.join(30)
        assert got.startswith("refused: "), got
        assert r.spi in sad_spis(netns)
        assert a.release(r) == 1


def test_on_lost_goes_to_the_allocator_that_issued_the_reservation(netns: Namespace) -> None:
    """Item 4: with a shared guard, A's expiry called B's on_lost with A's
    reservation (whichever watcher read the EXPIRE first), never A's."""
    g = Guard()
    heard_a: list[Reservation] = []
    heard_b: list[Reservation] = []
    with Allocator(netns, guard=g, on_lost=heard_a.append) as a, Allocator(netns, guard=g, on_lost=heard_b.append) as b:
        a.acq_expires = 1
        ra = [a.allocate(DST) for _ in range(20)]
        rb = [b.allocate(DST) for _ in range(20)]
        assert wait_for(lambda: len(heard_a) + len(heard_b) == 40, timeout=15.0)
        time.sleep(0.3)
        assert sorted(heard_a, key=lambda r: r.spi) == sorted(ra, key=lambda r: r.spi)
        assert sorted(heard_b, key=lambda r: r.spi) == sorted(rb, key=lambda r: r.spi)
        assert a.stats.lost == 20 and b.stats.lost == 20


@pytest.mark.parametrize("dst", ["::ffff:192.0.2.1", "::ffff:10.0.0.1"])
def test_ipv4_mapped_destinations_are_refused(netns: Namespace, dst: str) -> None:
    """Item 7: ::ffff:a.b.c.d and a.b.c.d are two kernel states but shared a
    guard key, so releasing one freed the other's entry.  Refused, before
    any syscall, with the IPv4 form to use."""
    with Allocator(netns) as a:
        v4 = a.allocate(dst.removeprefix("::ffff:"))
        with pytest.raises(InvalidRequest, match="IPv4-mapped"):
            a.allocate(dst)
        with pytest.raises(InvalidRequest, match="IPv4-mapped"):
            a.allocate_many(3, dst)
        forged = Reservation(spi=v4.spi, dst=__import__("ipaddress").ip_address(dst), src=v4.src, proto=v4.proto)
        with pytest.raises(InvalidRequest, match="IPv4-mapped"):
            a.release(forged)
        assert sad_spis(netns) == {v4.spi}
        assert a.guard is not None and a.guard.is_current(*v4.key, v4.token)


# --- churn: stale handles, threads and processes, a narrow range ------------------------------


def _churn_worker(
    ns_path: str,
    seconds: float,
    seed: int,
    reqid_base: int,
    q,  # type: ignore[no-untyped-def]
) -> None:
    """Threads that allocate from a 32-value range whose larval states die
    after 2 s, then commit or release at once or after a nap long enough for
    the state to die and its SPI to go to another thread or process.  Each
    reservation is also a witness: until shortly before its own expiry its
    state must be there with its own reqid, or someone deleted or took it."""
    bad: list[str] = []
    counts = {"alloc": 0, "commit": 0, "stale": 0, "released": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def witness(r: Reservation, reqid: int, until: float) -> None:
        check_until = min(until, r.allocated_at + 1.5)  # it dies at allocated_at + 2 at the latest
        while time.time() < check_until:
            st = a.lookup(DST, r.spi)
            if time.time() >= check_until:
                return
            if st is None or st.reqid != reqid:
                bad.append(f"{r} (reqid {reqid}) {time.time() - r.allocated_at:.2f} s old: state now {st}")
                return
            time.sleep(0.05)

    def work(t: int) -> None:
        rng = random.Random(seed * 100 + t)
        reqid = reqid_base + t
        while time.monotonic() < deadline:
            try:
                r = a.allocate(DST, spi_range=(0x4000, 0x401F), reqid=reqid)
            except SpiExhausted:
                time.sleep(0.05)
                continue
            with lock:
                counts["alloc"] += 1
            nap = rng.choice([0.0, 0.3, 2.3, 2.6, 3.0])
            witness(r, reqid, time.time() + nap)
            time.sleep(max(0.0, r.allocated_at + nap - time.time()))
            try:
                if rng.random() < 0.5:
                    a.commit(r)
                    with lock:
                        counts["commit"] += 1
                    witness(r, reqid, time.time() + 2)
                with lock:
                    counts["released"] += a.release(r)
            except ReservationLost:
                with lock:
                    counts["stale"] += 1

    try:
        with Allocator(ns_path) as a:
            a.acq_expires = 2
            threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        q.put(("ok", bad, counts))
    except BaseException as exc:  # noqa: BLE001
        q.put(("err", [repr(exc)], counts))


CHURN_SECONDS = float(os.environ.get("SPIALLOC_CHURN_SECONDS", "20"))


def test_churn_of_stale_handles_never_deletes_or_shares_a_state(netns: Namespace) -> None:
    """Item 2 under churn: 3 processes x 6 threads on 32 values, states dying
    after 2 s, many handles used after their state died and its SPI was
    handed out again.  A stale release deleted the successor's state.
    ``SPIALLOC_CHURN_SECONDS`` sets the length (CI: 20 s)."""
    assert netns.fd is not None
    ns_path = f"/proc/{os.getpid()}/fd/{netns.fd}"
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_churn_worker, args=(ns_path, CHURN_SECONDS, n, 100 * (n + 1), q)) for n in range(3)]
    for p in procs:
        p.start()
    try:
        results = [q.get(timeout=CHURN_SECONDS + 120) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    totals = {k: sum(r[2][k] for r in results) for k in results[0][2]}
    print(f"\nchurn {CHURN_SECONDS:.0f} s: {totals}")
    for kind, bad, _ in results:
        assert kind == "ok", bad
        assert bad == [], bad[:5]
    assert totals["stale"] > 0, "no handle went stale: the test did not attack anything"
    assert totals["commit"] > 0
