"""Faults against the real kernel.  Each one must end in a typed error
(``spialloc.SpiallocError``) or a correct result, and leave no larval state of
ours behind in the SAD (ip(8) is the witness: ``sad_count``).

* the namespace deleted (``ip netns del``) under an open allocator
* the socket closed under pending calls (close() from another thread)
* ENOBUFS on the request socket (over-sending batches) and on the expiry
  watcher's multicast socket (events dropped: resync, on_lost)
* SIGINT in the middle of a 50,000-SPI batch (child process)
* EINTR storms (SIGALRM every 100 us) during single and batch allocations
* another process deleting or flushing our larval states
* a full range (SpiExhausted)
* bad CLI values and environment (one line, no traceback; exit 2 for bad usage)
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from nsutil import MID_BATCH_HOOK, ns_run, sad_count, sad_spis, wait_for

import spialloc
from spialloc import (
    Allocator,
    AsyncAllocator,
    BatchError,
    ClosedError,
    Namespace,
    Reservation,
    Reservations,
    SpiallocError,
    SpiExhausted,
    _netlink,
)
from spialloc._expiry import ExpiryWatcher

ROOT = Path(__file__).resolve().parents[2]
DST = "192.0.2.1"
BACKENDS = ["c", "python"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def larval_spis(ns: Namespace) -> set[int]:
    return sad_spis(ns)


def _sad_hash(ns: Namespace) -> str:
    """``ip -s xfrm state count``: the state count and the SAD hash's buckets."""
    return " ".join(ns_run(ns, ["ip", "-s", "xfrm", "state", "count"]).stdout.split())


# --- the namespace goes away under us ------------------------------------------------


def _netns_names() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout


def test_named_netns_deleted_while_allocator_open_keeps_working(named_netns: str) -> None:
    """``ip netns del`` only unmounts the name: the namespace lives on while
    our fds (the Namespace handle and the sockets) hold it.  Everything keeps
    working, sysctls included, and close() is clean."""
    a = Allocator(named_netns)
    before = a.allocate(DST)
    subprocess.run(["ip", "netns", "del", named_netns], check=True, capture_output=True, timeout=30)
    assert named_netns not in _netns_names()
    after = a.allocate(DST)
    many = a.allocate_many(100, DST)
    assert len({r.spi for r in [before, after, *many]}) == 102
    assert a.acq_expires > 0  # the sysctl is read through our fd
    assert {before.spi, after.spi} <= {s.spi for s in a.states(larval=True)}
    assert a.release([before, after, *many]) == 102
    assert a.states() == []
    a.close()
    assert a.closed
    with pytest.raises(ClosedError):
        a.allocate(DST)
    # a new allocator by the (now gone) name fails with a typed error
    with pytest.raises(spialloc.NamespaceError, match=named_netns):
        Allocator(named_netns)


def test_isolated_namespace_handle_closed_while_allocator_open_keeps_working() -> None:
    ns = Namespace.isolated()
    a = Allocator(ns)
    b = AsyncAllocator(ns)
    ns.close()  # the caller's handle; the allocators hold their own
    try:
        r = a.allocate(DST)
        rs = asyncio.run(b.allocate_many(10, DST))
        assert isinstance(rs, Reservations) and len(rs) == 10
        assert len(a.states()) == 11
        assert a.release(r) == 1
        assert asyncio.run(b.release(rs)) == 10  # each by the allocator that issued it
        assert a.states() == []
    finally:
        b.close_now()
        a.close()


def test_closed_namespace_handle_is_never_the_current_namespace() -> None:
    """A closed handle's fd is gone; it used to mean "the caller's namespace"
    then, so an Allocator opened with it allocated in the host's SAD."""
    ns = Namespace.isolated()
    ns.close()
    with pytest.raises(spialloc.NamespaceError, match="closed"):
        Allocator(ns)
    with pytest.raises(spialloc.NamespaceError, match="closed"):
        ns.run(os.getpid)


# --- close() under pending calls -------------------------------------------------------


def _hammer_then_close(
    netns: Namespace,
    batch: bool,
    threads: int = 4,
    run_for: float = 0.3,
    guard: bool = True,
) -> tuple[list[Reservation], collections.Counter[str], list[BaseException]]:
    a = Allocator(netns, guard=guard)
    got: list[Reservation] = []
    kinds: collections.Counter[str] = collections.Counter()
    unrelated: list[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        while True:
            try:
                rs = a.allocate_many(50, DST) if batch and i % 2 else [a.allocate(DST)]
            except SpiallocError as exc:
                with lock:
                    kinds[type(exc).__name__] += 1
                return
            except BaseException as exc:  # noqa: BLE001 - recorded and asserted on
                with lock:
                    unrelated.append(exc)
                return
            with lock:
                got.extend(rs)

    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    time.sleep(run_for)
    a.close()
    for t in ts:
        t.join(20)
    assert not any(t.is_alive() for t in ts), "a thread hung after close()"
    return got, kinds, unrelated


def _left_over(netns: Namespace, got: list[Reservation]) -> set[int]:
    """Release what callers got through a fresh allocator; return the SPIs of
    any state left (orphans), then clean up whatever is there."""
    with Allocator(netns, guard=False, watch_expiry=False) as b:  # deletes by key, whoever allocated
        b.release(got)
        left = {s.spi for s in b.states()}
        for s in b.states():
            b.release(s.reservation())
    return left


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "no-guard"])
@pytest.mark.parametrize("batch", [False, True], ids=["single", "single+batch"])
def test_close_under_pending_calls_typed_errors_and_no_orphans(netns: Namespace, batch: bool, guard: bool) -> None:
    """Four threads allocate in a loop; another thread closes the allocator.
    Each thread must end with ClosedError (or another SpiallocError), none
    may hang, and the only states left are those handed to callers.

    Bugs this finds (several rounds, as it is a race):
    * Allocator.close() closes the request socket without taking its lock,
      so it can land between sendmsg and recv of XfrmSocket.allocspi: the
      kernel made the larval state, the caller gets ClosedError, nobody owns
      the state (it stays until acq_expires).
    * allocate_many with the C engine: the closed fd makes
      spialloc_batch_step fail with EBADF, and _cbatch._run raises a plain
      OSError(EBADF), not ClosedError."""
    unrelated_all: list[str] = []
    orphans_all: set[int] = set()
    for _ in range(5):
        got, kinds, unrelated = _hammer_then_close(netns, batch, guard=guard)  # no guard: Core.fast
        unrelated_all += [f"{type(e).__name__}: {e}" for e in unrelated]
        assert sum(kinds.values()) + len(unrelated) == 4
        orphans_all |= _left_over(netns, got)
    assert not unrelated_all, f"threads ended with non-spialloc exceptions: {unrelated_all}"
    assert not orphans_all, f"{len(orphans_all)} larval state(s) nobody was given: {sorted(map(hex, orphans_all))}"
    assert sad_count(netns) == 0


@pytest.mark.parametrize("warm", [False, True], ids=["first-call", "plain-warm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_close_between_send_and_reply_orphans_nothing(
    netns: Namespace, monkeypatch: pytest.MonkeyPatch, backend: str, warm: bool
) -> None:
    """The race above made deterministic: the request is on its way (the
    kernel has made the state) when close() runs.  Either close() waits for
    the call in flight (the caller gets its Reservation) or the state is
    deleted; a ClosedError with the state left behind is the bug.  Backend
    "c" sends and reads in one C call; it is held up right after it.  warm:
    allocate(dst)'s request is known already, so with backend "c" the call
    is made straight from allocate (Core.fast), not through _allocate."""
    a = Allocator(netns, guard=False, backend=backend)
    if warm:
        a.release(a.allocate(DST))
        assert (a.core.fast is not None) == (backend == "c")
    in_flight = threading.Event()
    real_send = _netlink.XfrmSocket.send

    def slow_send(self: _netlink.XfrmSocket, data: Any) -> None:
        real_send(self, data)
        if self is a.core.kernel.sock:
            in_flight.set()
            time.sleep(0.3)

    if backend == "c":

        def held_up(c_call: Any) -> Any:
            def slow_call(*args: Any) -> int:
                rc = int(c_call(*args))
                in_flight.set()
                time.sleep(0.3)
                return rc

            return slow_call

        one = a.core.kernel._one
        assert one is not None
        a.core.kernel._one = (held_up(one[0]), *one[1:])
        if a.core.fast is not None:
            a.core.fast = (held_up(a.core.fast[0]), *a.core.fast[1:])
    else:
        monkeypatch.setattr(_netlink.XfrmSocket, "send", slow_send)
    result: list[object] = []

    def call() -> None:
        try:
            result.append(a.allocate(DST))
        except BaseException as exc:  # noqa: BLE001
            result.append(exc)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    assert in_flight.wait(10)
    a.close()
    t.join(10)
    assert not t.is_alive()
    monkeypatch.setattr(_netlink.XfrmSocket, "send", real_send)
    (outcome,) = result
    left = _left_over(netns, [outcome] if isinstance(outcome, Reservation) else [])
    assert isinstance(outcome, (Reservation, SpiallocError)), repr(outcome)
    assert not left, f"close() during the call left larval state(s) {sorted(map(hex, left))}; got {outcome!r}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_during_batch_is_closed_error(netns: Namespace, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """allocate_many in small chunks, closed from another thread: ClosedError
    (a SpiallocError), not a bare OSError, and not a list of reservations from
    a closed allocator (issue 12, item 5); nothing of the batch left behind."""
    monkeypatch.setattr(_netlink.XfrmSocket, "window", lambda self, truesize=0: 1)
    a = Allocator(netns, guard=False, backend=backend)
    result: list[object] = []

    def call() -> None:
        try:
            result.append(a.allocate_many(20000, DST))
        except BaseException as exc:  # noqa: BLE001
            result.append(exc)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    assert wait_for(lambda: sad_count(netns) > 50, timeout=20)
    a.close()
    t.join(30)
    assert not t.is_alive()
    (outcome,) = result
    got = list(outcome) if isinstance(outcome, Reservations) else []
    left = _left_over(netns, got)
    problems = []
    if not isinstance(outcome, ClosedError):
        problems.append(f"the caller got {type(outcome).__name__}: {outcome}")
    if left:
        problems.append(f"{len(left)} larval states of the batch left behind (nobody was given them)")
    assert not problems, "; ".join(problems)


# --- ENOBUFS ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "unguarded"])
def test_enobufs_on_request_socket_recovers(
    netns: Namespace, monkeypatch: pytest.MonkeyPatch, backend: str, guard: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A receive buffer of ~40 replies and a window of 512: the kernel drops
    most replies (ENOBUFS).  The batch still returns 1,000 distinct SPIs, the
    states of dropped replies are found and deleted (no orphan), and release
    leaves the SAD empty."""
    monkeypatch.setattr(_netlink.XfrmSocket, "window", lambda self, truesize=0: 512)
    with Allocator(netns, rcvbuf=16384, backend=backend, guard=guard) as a:
        assert a.core.kernel.sock.rcvbuf < 512 * 840
        rs = a.allocate_many(1000, DST)
        st = a.stats
        assert len({r.spi for r in rs}) == 1000
        assert st.overruns > 0 and st.recovered > 0
        assert larval_spis(netns) == {r.spi for r in rs}, "states of dropped replies were left behind"
        # SPIs compared as sets cannot see a second state with one of the
        # batch's SPIs (or another destination): count the states too.
        assert sad_count(netns) == len(rs), "more states than SPIs in the batch"
        hash_before = _sad_hash(netns)
        released = a.release(rs)
        # Seen once in CI (guarded-c): one state left after the release; not
        # reproduced in 15 local runs, nor in ~4,000 runs under load.  Say
        # which state, what was counted, and whether the kernel resized the
        # SAD hash meanwhile (a resize runs in a kworker, often 5-80 ms after
        # a burst of ALLOCSPIs; DELSA looks states up in that hash under RCU).
        left = larval_spis(netns)
        assert not left, (
            f"release returned {released}; left {sorted(map(hex, left))}, of the batch: "
            f"{sorted(map(hex, left & {r.spi for r in rs}))}; stats {a.stats}; "
            f"SAD hash {hash_before} -> {_sad_hash(netns)}; "
            f"the state(s): {ns_run(netns, ['ip', '-o', 'xfrm', 'state', 'list']).stdout.strip()}"
        )
        assert sad_count(netns) == 0
    logged = [r.getMessage() for r in caplog.records if r.name == "spialloc.kernel" and r.levelno == logging.WARNING]
    assert any("dropped (ENOBUFS)" in m and "orphaned larval states found and deleted" in m for m in logged), logged


@pytest.mark.parametrize("backend", BACKENDS)
def test_enobufs_on_release_counts_what_was_deleted(
    netns: Namespace, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """release() returns "how many states were deleted".  When the DELSA acks
    are dropped (over-sent window), every state is deleted all the same, but
    release() counts only the acks it read (e.g. 78 of 1000): the acks that
    went missing should be checked (GETSA/dump), not counted as not deleted."""
    monkeypatch.setattr(_netlink.XfrmSocket, "window", lambda self, truesize=0: 512)
    with Allocator(netns, rcvbuf=16384, backend=backend, guard=False) as a:
        rs = a.allocate_many(1000, DST)
        deleted = a.release(rs)
        assert sad_count(netns) == 0
        assert deleted == 1000


def test_enobufs_on_expiry_watcher_resyncs_and_reports_lost(
    netns: Namespace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """EXPIRE events dropped: 500 larval states expire (acq_expires=1) while
    the watcher's socket has the smallest buffer and cannot read.  The
    allocator must notice the overrun, resync from a dump (_resync_lost),
    mark every reservation lost and call on_lost for each."""
    lost: list[Reservation] = []
    resyncs = []
    real = ExpiryWatcher.resync

    def spy(self: ExpiryWatcher) -> None:
        resyncs.append(time.monotonic())
        real(self)

    monkeypatch.setattr(ExpiryWatcher, "resync", spy)
    a = Allocator(netns, on_lost=lost.append)
    try:
        a.acq_expires = 1
        assert a.core.watcher is not None
        a.core.watcher.sock.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the minimum; no privilege needed
        with a.core.watcher.sock.lock:  # the watcher blocks in poll_events meanwhile
            rs = a.allocate_many(500, DST)
            assert wait_for(lambda: sad_count(netns) == 0, timeout=30)
        assert wait_for(lambda: len(lost) == 500, timeout=20), len(lost)
        assert resyncs, "events were dropped but the watcher never resynced"
        kernel_warnings = [r.getMessage() for r in caplog.records if r.name == "spialloc.kernel"]
        assert any("dropped" in m and "resyncing the guard from a dump" in m for m in kernel_warnings), kernel_warnings
        assert a.stats.lost == 500
        assert a.guard is not None and len(a.guard) == 0
        assert {r.key for r in lost} == {r.key for r in rs}
        for r in rs[:5]:
            with pytest.raises(spialloc.ReservationLost):
                a.commit(r)
        # still works afterwards
        r = a.allocate(DST)
        a.release(r)
    finally:
        a.close()


def test_on_lost_after_resync_names_the_lost_reservations(netns: Namespace) -> None:
    """From the resync path on_lost gets a Reservation rebuilt from the guard's
    key (documented in _rules.lost_reservation: spi, dst, proto; src
    unspecified, mode/reqid/mark default), so match callbacks by ``.key``."""
    lost: list[Reservation] = []
    a = Allocator(netns, on_lost=lost.append)
    try:
        a.acq_expires = 1
        assert a.core.watcher is not None
        a.core.watcher.sock.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        with a.core.watcher.sock.lock:
            rs = a.allocate_many(50, DST, mode="tunnel", reqid=7, mark=(1, 0xFF))
            assert wait_for(lambda: sad_count(netns) == 0, timeout=30)
        assert wait_for(lambda: len(lost) == 50, timeout=20)
        assert sorted(r.key for r in lost) == sorted(r.key for r in rs)
        assert all(str(r.dst) == DST and r.proto == spialloc.Proto.ESP for r in lost)
    finally:
        a.close()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_on_lost_raising_in_resync_does_not_kill_the_watcher(netns: Namespace) -> None:
    """_lost() shields the watcher from a failing callback; _resync_lost()
    calls on_lost bare, so an exception there ends the watcher thread (and the
    rest of the resync).  Later expiries are then never noticed."""
    calls: list[Reservation] = []

    def bad(r: Reservation) -> None:
        calls.append(r)
        raise RuntimeError("callback bug")

    a = Allocator(netns, on_lost=bad)
    try:
        a.acq_expires = 1
        assert a.core.watcher is not None
        a.core.watcher.sock.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        with a.core.watcher.sock.lock:
            a.allocate_many(20, DST)
            assert wait_for(lambda: sad_count(netns) == 0, timeout=30)
        wait_for(lambda: len(calls) >= 20, timeout=10)
        assert a.core.watcher.alive, "the expiry watcher thread died"
        assert len(calls) == 20, f"resync stopped after the first failing callback: {len(calls)} of 20"
    finally:
        a.close()


# --- SIGINT during a big batch -------------------------------------------------------------

CHILD = (
    MID_BATCH_HOOK
    + r"""
import sys, spialloc
fd, backend = int(sys.argv[1]), sys.argv[2]
a = spialloc.Allocator(fd, backend=backend)
print("ready", flush=True)
try:
    a.allocate_many(50000, "192.0.2.1")
    print("finished", flush=True)
except KeyboardInterrupt:
    print("interrupted", a.stats, flush=True)
    a.close()
    sys.exit(130)
"""
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigint_during_50000_batch_leaves_no_larval_state(netns: Namespace, backend: str) -> None:
    with Allocator(netns, watch_expiry=False) as a:
        a.acq_expires = 3600  # nothing may vanish by itself during the test
    assert netns.fd is not None
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(netns.fd), backend],
        pass_fds=[netns.fd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert proc.stdout.readline().strip() == "running"  # the first chunk is in the kernel
        assert sad_count(netns) > 0
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "finished" not in out, "the batch ended before SIGINT: make it bigger"
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert "interrupted" in out and "Traceback" not in err, err
    assert sad_count(netns) == 0


# --- EINTR storms ------------------------------------------------------------------------


class Storm:
    """SIGALRM every 100 us while active; counts deliveries."""

    def __init__(self) -> None:
        self.hits = 0

    def _handler(self, signum: int, frame: object) -> None:
        self.hits += 1

    def __enter__(self) -> Storm:
        self._old = signal.signal(signal.SIGALRM, self._handler)
        signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "unguarded"])
def test_eintr_storm_single_and_batch(netns: Namespace, backend: str, guard: bool) -> None:
    with Allocator(netns, backend=backend, guard=guard) as a:
        with Storm() as storm:
            singles = [a.allocate(DST if i % 2 else "2001:db8::1") for i in range(1500)]
            batch = a.allocate_many(5000, DST)
            rest = a.release(singles[:500])
        assert storm.hits > 100, f"only {storm.hits} signals: no storm"
        spis = {(str(r.dst), r.spi) for r in singles + batch}
        assert len(spis) == 6500
        assert rest == 500
        assert sad_count(netns) == 6000
        assert {s.spi for s in a.states()} == {r.spi for r in singles[500:] + batch}
        with Storm():
            assert a.release(singles[500:] + batch) == 6000
        assert sad_count(netns) == 0


def test_eintr_storm_async(netns: Namespace) -> None:
    async def run() -> list[Reservation]:
        async with AsyncAllocator(netns) as b:
            got = list(await asyncio.gather(*(b.allocate(DST) for _ in range(300))))
            more = await b.allocate_many(2000, DST)
            assert isinstance(more, Reservations)
            got += more
            assert len({r.spi for r in got}) == 2300
            assert await b.release(got) == 2300
            return got

    with Storm() as storm:
        asyncio.run(run())
    assert storm.hits > 10
    assert sad_count(netns) == 0


# --- someone else deletes our states --------------------------------------------------------


def test_states_deleted_behind_our_back(netns: Namespace) -> None:
    """ip xfrm state delete / flush from another process: the watcher (SA
    events) or sync() marks them lost, commit and release then raise
    ReservationLost and delete nothing, new allocations work, and nothing
    is left."""
    a = Allocator(netns)
    try:
        rs = [a.allocate(DST) for _ in range(10)]
        for r in rs[:3]:
            ns_run(
                netns,
                ["ip", "xfrm", "state", "delete", "src", "0.0.0.0", "dst", DST, "proto", "esp", "spi", hex(r.spi)],
            )
        assert sad_count(netns) == 7
        assert a.sync() == 0  # nothing foreign: the 7 left are ours
        assert wait_for(lambda: a.stats.lost == 3, timeout=5.0)
        assert a.guard is not None
        assert [a.guard.is_lost(*r.key) for r in rs] == [True] * 3 + [False] * 7
        with pytest.raises(spialloc.ReservationLost):
            a.commit(rs[0])
        a.commit(rs[3])
        ns_run(netns, ["ip", "xfrm", "state", "flush"])
        assert sad_count(netns) == 0
        with pytest.raises(spialloc.ReservationLost):
            a.release(rs)  # rs[:3] are known lost: not current, so nothing is released
        # The FLUSHSA event ends the rest: the committed one released, the others lost.
        assert wait_for(lambda: not any(a.guard is not None and a.guard.is_current(*r.key, r.token) for r in rs))
        with pytest.raises(spialloc.ReservationLost):
            a.release(rs[3:])
        assert a.stats.lost == 9
        new = a.allocate_many(20, DST) + [a.allocate(DST)]
        assert sad_count(netns) == 21
        assert a.release(new) == 21
        assert sad_count(netns) == 0
    finally:
        a.close()


def test_flush_behind_unguarded_allocator(raw_alloc: Allocator, netns: Namespace) -> None:
    rs = raw_alloc.allocate_many(50, DST)
    ns_run(netns, ["ip", "xfrm", "state", "flush"])
    assert raw_alloc.release(rs) == 0
    assert raw_alloc.release(rs[0]) == 0
    assert raw_alloc.sync() == 0
    r = raw_alloc.allocate(DST)
    assert raw_alloc.release(r) == 1
    assert sad_count(netns) == 0


# --- a full range ----------------------------------------------------------------------------

FULL = (0x1000, 0x100F)


def test_full_range_guarded_is_spi_exhausted_and_leaks_nothing(alloc: Allocator, netns: Namespace) -> None:
    rs = [alloc.allocate(DST, spi_range=FULL) for _ in range(16)]
    assert sorted(r.spi for r in rs) == list(range(FULL[0], FULL[1] + 1))
    with pytest.raises(SpiExhausted):
        alloc.allocate(DST, spi_range=FULL)
    with pytest.raises(BatchError) as info:
        alloc.allocate_many(4, DST, spi_range=FULL)
    assert all(isinstance(e, SpiExhausted) for e in info.value.failures.values())
    res = alloc.allocate_many(4, DST, spi_range=FULL, strict=False)
    assert not res.reservations and len(res.errors) == 4
    assert sad_spis(netns) == {r.spi for r in rs} and sad_count(netns) == 16
    assert alloc.release(rs) == 16
    assert sad_count(netns) == 0


def test_full_range_unguarded_leaves_no_state(raw_alloc: Allocator, netns: Namespace) -> None:
    """The kernel keeps the larval state of a failed ALLOCSPI (KERNEL.md, step
    6: ENOENT, "the larval state is not deleted"), with SPI 0, which DELSA
    cannot address.  spialloc returns SpiExhausted (right) but leaves that
    state behind until acq_expires (30 s by default): after releasing every
    reservation, ip xfrm state still lists one state with spi 0x00000000."""
    # Fill the range whatever the kernel's draws: its picks are random with
    # replacement, so one SpiExhausted can be spurious while values are free
    # (a 4-SPI batch then succeeds).  Keep asking until all 16 are out.
    got: list[Reservation] = []
    for _ in range(2000):
        if len(got) == 16:
            break
        try:
            got.append(raw_alloc.allocate(DST, spi_range=FULL))
        except SpiExhausted:
            continue
    assert len(got) == 16
    with pytest.raises(SpiExhausted):
        raw_alloc.allocate(DST, spi_range=FULL)
    with pytest.raises(BatchError):
        raw_alloc.allocate_many(4, DST, spi_range=FULL)
    assert raw_alloc.release(got) == len(got)
    assert sad_count(netns) == 0, ns_run(netns, ["ip", "xfrm", "state", "list"]).stdout


# --- bad input through the CLI, against the kernel --------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None, pre: str = "") -> subprocess.CompletedProcess[str]:
    e = _env()
    e.update(env or {})
    if pre:
        code = (
            pre + "\nimport runpy, sys\nsys.argv = ['spialloc', *sys.argv[1:]]\n"
            "runpy.run_module('spialloc.cli', run_name='__main__')\n"
        )
        argv = [sys.executable, "-c", code, *args]
    else:
        argv = [sys.executable, "-m", "spialloc.cli", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=e, timeout=60, cwd="/")


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode in (1, 2), (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("spialloc"), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize(
    "args, needles",
    [
        (["alloc", "--dst", "10.0.0.1", "--count", "-1"], ["-1"]),
        (["alloc", "--dst", "10.0.0.1", "--min", "0x2000", "--max", "0x1000"], ["0x2000", "0x1000"]),
        (["alloc", "--dst", "10.0.0.1", "--min", "5"], ["0x5"]),
        (["alloc", "--dst", "10.0.0.1", "--max", "0x100000000"], ["4294967296"]),
        (["alloc", "--dst", "10.0.0.1", "--proto", "comp", "--max", "0x10000"], ["0x10000"]),
        (["alloc", "--dst", "10.0.0.1", "--mark", "0x100000000"], ["4294967296"]),
        (["alloc", "--dst", "10.0.0.1", "--mark", "1/0x100000000"], ["4294967296"]),
        (["alloc", "--dst", "10.0.0.1", "--mark", "-1"], ["-1"]),
        (["alloc", "--dst", "10.0.0.1", "--reqid", "-1"], ["-1"]),
        (["alloc", "--dst", "10.0.0.1", "--if-id", "0x100000000"], ["4294967296"]),
        (["alloc", "--dst", "10.0.0.1", "--seq", "-5"], ["-5"]),
        (["alloc", "--dst", "10.0.0.1", "--src", "2001:db8::1"], ["2001:db8::1"]),
        (["alloc", "--dst", "10.0.0.256"], ["10.0.0.256"]),
        (["alloc", "--dst", "10.0.0.1", "--seq", "5", "--count", "2"], ["--seq"]),
        (["release", "--dst", "10.0.0.1", "--spi", "0x100000000"], ["4294967296"]),
        (["release", "--dst", "10.0.0.1", "--spi", "-1"], ["-1"]),
        (["release", "--dst", "nope", "--spi", "0x100"], ["nope"]),
    ],
)
def test_cli_bad_value_one_line(args: list[str], needles: list[str]) -> None:
    proc = run_cli(*args, "--isolated")
    assert_one_line_error(proc, *needles)
    assert proc.returncode == 2  # bad usage
    assert proc.stdout == ""


@pytest.mark.parametrize("netns_arg", ["/etc/passwd", "/nonexistent/ns", "spialloc-no-such-ns", ""])
def test_cli_bad_netns_one_line(netns_arg: str) -> None:
    proc = run_cli("list", "--netns", netns_arg)
    assert_one_line_error(proc)
    assert proc.returncode == 2  # names no network namespace: bad usage
    assert repr(netns_arg) in proc.stderr or netns_arg in proc.stderr


def test_cli_bad_backend_env_one_line() -> None:
    proc = run_cli("list", "--isolated", env={"SPIALLOC_BACKEND": "bogus"})
    assert_one_line_error(proc, "bogus")
    assert proc.returncode == 2


BLOCK_NATIVE = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "spialloc._native":
            raise ImportError("spialloc._native hidden by the test")
        return None
sys.meta_path.insert(0, _Block())
"""


def test_cli_backend_c_without_extension_one_line() -> None:
    """SPIALLOC_BACKEND=c with the extension missing: the CLI prints the
    ImportError as a traceback (cli.run catches SpiallocError only)."""
    proc = run_cli("list", "--isolated", env={"SPIALLOC_BACKEND": "c"}, pre=BLOCK_NATIVE)
    assert_one_line_error(proc, "SPIALLOC_BACKEND=c")
    assert proc.returncode == 1  # the installation, not the command line


def test_cli_backend_auto_without_extension_still_works() -> None:
    proc = run_cli("list", "--isolated", "--json", env={"SPIALLOC_BACKEND": "auto"}, pre=BLOCK_NATIVE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert "Traceback" not in proc.stderr


# --- bad arguments that only show once a socket exists -------------------------------------------


@pytest.mark.parametrize("bad", ["big", 1.5, [1 << 20]])
def test_allocator_bad_rcvbuf_is_invalid_request(netns: Namespace, bad: object) -> None:
    """rcvbuf goes straight to setsockopt: a non-integer raises TypeError."""
    with pytest.raises(spialloc.InvalidRequest):
        Allocator(netns, rcvbuf=bad).close()  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "30"])
def test_acq_expires_bad_value_is_invalid_request(alloc: Allocator, bad: object) -> None:
    before = alloc.acq_expires
    with pytest.raises(spialloc.InvalidRequest, match=repr(bad)):
        alloc.acq_expires = bad  # type: ignore[assignment]
    assert alloc.acq_expires == before


def test_spiallocerror_only_from_closed_allocator(netns: Namespace) -> None:
    a = Allocator(netns)
    r = a.allocate(DST)
    a.close()
    a.close()  # idempotent
    # acq_expires went through the closed namespace handle to the caller's own namespace.
    for call in (
        lambda: a.allocate(DST),
        lambda: a.allocate_many(3, DST),
        lambda: a.release(r),
        lambda: a.states(),
        lambda: a.sync(),
        lambda: a.lookup(DST, r.spi),
        lambda: a.commit(r),
        lambda: a.poll_events(),
        lambda: a.acq_expires,
        lambda: setattr(a, "acq_expires", 7),
    ):
        with pytest.raises(ClosedError):
            call()
    with Allocator(netns, guard=False) as b:  # by key: r is not b's reservation
        assert b.release(r) == 1


# --- a crashed daemon's leftovers -------------------------------------------------------------

CRASHER = r"""
import sys, time
from spialloc import Allocator
a = Allocator(None)
a.acq_expires = 3600
rs = a.allocate_many(3000, sys.argv[1], reqid=42)
print(len(rs), flush=True)
time.sleep(60)
"""


def test_killed_daemon_leaves_larval_states_that_purge_removes(netns: Namespace) -> None:
    """kill -9 right after a batch: its 3,000 larval states stay (nothing in
    the kernel ties them to the dead process).  A restarted daemon's
    purge(reqid=42) deletes exactly those: not another daemon's state, not
    what the new allocator has reserved (ACQ states: tests/unit/test_rules.py)."""
    assert netns.fd is not None
    proc = subprocess.Popen(
        ["nsenter", f"--net=/proc/self/fd/{netns.fd}", sys.executable, "-c", CRASHER, DST],
        pass_fds=[netns.fd],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "3000"
    finally:
        proc.kill()
        proc.wait()
    assert sad_count(netns) == 3000
    with Allocator(netns, guard=False) as other:
        theirs = other.allocate(DST, reqid=7)
    with Allocator(netns, sync=True) as a:
        mine = a.allocate(DST, reqid=42)
        with pytest.raises(spialloc.InvalidRequest):
            a.purge()  # no selector: it would take every daemon's states
        assert a.purge(reqid=42) == 3000
        assert sad_spis(netns) == {theirs.spi, mine.spi}
        assert a.purge(reqid=42) == 0
        assert a.release(mine) == 1
        assert a.guard is not None and len(a.guard) == 1  # only the other daemon's, marked foreign
