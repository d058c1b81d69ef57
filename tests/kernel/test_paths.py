"""The fast paths against the general ones, on the real kernel: the single
``allocate`` through one C call (backend "c") and through Python's socket
(backend "python") must behave alike in every case, the common one and the
ones the C call hands back to Python (an error, a stray reply ahead of ours,
a reply the kernel dropped); ``allocate_many``'s ``Reservations`` released in
bulk must refuse what the one-by-one release refuses, before deleting anything.
Each test runs in a fresh namespace (fixture ``netns``); ip(8) is the witness."""

from __future__ import annotations

import errno
import pickle
import time
from typing import Any

import pytest
from nsutil import ns_run, sad_count, sad_spis

from spialloc import (
    Allocator,
    InvalidRequest,
    Namespace,
    NetlinkError,
    Reservation,
    ReservationLost,
    SpiExhausted,
)
from spialloc import _wire as w
from spialloc._model import Reservations

BACKENDS = ["c", "python"]
DST = "10.0.0.1"


def _stray(alloc: Allocator, seq: int = 0x7FFF0000) -> None:
    """Queue a reply nobody waits for on each of the allocator's request
    sockets (the locked one, and allocate's own with backend "c"): a GETSA
    of a state that does not exist (its ESRCH error comes back)."""
    k = alloc.core.kernel
    daddr = bytes(16)
    for sock in (k.sock, k.fast_sock):
        if sock is not None:
            sock.send(w.getsa(seq, w.usersa_id(daddr, 0x12345678, w.AF_INET, 50), b""))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("guard", [False, True])
def test_single_allocate_is_the_same_on_both_paths(netns: Namespace, backend: str, guard: bool) -> None:
    with Allocator(netns, backend=backend, guard=guard) as a:
        assert (a.core.kernel._one is not None) == (backend == "c")
        r = a.allocate(DST, "ah", spi_range=(0x5000, 0x5FFF), reqid=9, mark=(3, 0xFF))
        assert 0x5000 <= r.spi <= 0x5FFF and r.reqid == 9 and r.mark == (3, 0xFF)
        st = a.lookup(DST, r.spi, "ah", mark=(3, 0xFF))
        assert st is not None and st.larval and st.reqid == 9
        plain = [a.allocate(DST) for _ in range(50)]
        assert len({p.spi for p in plain}) == 50
        assert sad_count(netns) == 51
        assert a.release([r, *plain]) == 51
        assert sad_count(netns) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_allocate_skips_a_stray_reply(netns: Namespace, backend: str) -> None:
    with Allocator(netns, backend=backend, guard=False) as a:
        _stray(a)
        _stray(a, 0x7FFF0001)
        r = a.allocate(DST)
        assert sad_spis(netns) == {r.spi}
        r2 = a.allocate(DST)  # nothing left behind in the socket
        assert a.release([r, r2]) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_kernel_can_answer_a_request(netns: Namespace, backend: str) -> None:
    """Root may unicast to any netlink port: a NEWSA forged by another socket
    for the allocator's next requests (an SPI the kernel never allocated) is
    refused by the kernel, because the request socket is connected to it.
    The C paths read no sender address and rely on exactly that."""
    import socket

    with Allocator(netns, backend=backend, guard=False) as a:
        sock = a.core.kernel.sock
        assert sock.sock.getpeername() == (0, 0)
        forged = bytearray(w.NLMSGHDR_LEN + w.XFRM_USERSA_INFO_LEN)
        with netns.socket(socket.AF_NETLINK, socket.SOCK_RAW, w.NETLINK_XFRM) as other:
            other.bind((0, 0))
            seq = sock.next_seq(1) + 1
            for s in range(seq, seq + 64):  # whatever seq the next requests take
                w.NLMSGHDR.pack_into(forged, 0, len(forged), w.XFRM_MSG_NEWSA, 0, s, sock.portid)
                w.BE32.pack_into(forged, w.MSG_REPLY_SPI, 0xDEADBEEF)
                with pytest.raises(ConnectionRefusedError):
                    other.sendto(forged, (sock.portid, 0))
        one = a.allocate(DST)
        many = a.allocate_many(50, DST)
        got = {one.spi, *many.spis}
        assert 0xDEADBEEF not in got and len(got) == 51
        assert sad_spis(netns) == got
        assert a.release([one, *many]) == 51


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_allocate_errors_are_the_kernels(netns: Namespace, backend: str) -> None:
    with Allocator(netns, backend=backend, guard=False) as a:
        r = a.allocate(DST, spi_range=(0x7000, 0x7000))
        with pytest.raises(SpiExhausted) as exc:
            a.allocate(DST, spi_range=(0x7000, 0x7000))
        assert exc.value.errno == errno.ENOENT
        assert sad_spis(netns) == {0x7000}  # the refused request left no state of its own
        a.release(r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_allocate_exhausted_is_the_kernels_error(netns: Namespace, backend: str) -> None:
    """``allocate(dst)`` guard off takes the C call straight (backend "c"):
    its refusal is the general path's, the refused request's SPI-less
    larval state claimed, and nothing of ours left behind."""
    with Allocator(netns, backend=backend, guard=False, spi_range=(0x7000, 0x7000)) as a:
        assert (a.core.fast is not None) == (backend == "c")
        r = a.allocate(DST)
        k = a.core.kernel

        def seqs() -> int:  # both request sockets' (the fast one's counter is the process's)
            return k.sock.next_seq() + (next(k.fast.seqs) if k.fast is not None else 0)

        sent = []  # requests each refusal took: not asked again after the quick try
        for options in ({}, {"spi_range": (0x7000, 0x7000)}):  # the quick path; the general one
            before = seqs()
            with pytest.raises(SpiExhausted) as exc:
                a.allocate(DST, **options)
            sent.append(seqs() - before)
            assert exc.value.errno == errno.ENOENT
        assert sent[0] == sent[1]
        assert sad_spis(netns) == {0x7000}
        a.release(r)
        assert a.allocate(DST).spi == 0x7000  # and the next one works


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_allocate_after_a_dropped_reply(netns: Namespace, backend: str) -> None:
    """The receive buffer is full of strays: the ALLOCSPI reply is dropped
    (ENOBUFS), its orphaned state is found and deleted, the error is typed,
    and the next allocate works."""
    with Allocator(netns, backend=backend, guard=False, rcvbuf=4096) as a:
        for i in range(200):  # far more error replies than 8 KiB holds
            _stray(a, 0x7FFF0000 + i)
        # The first call is the general one (locked socket); then, with
        # backend "c", allocate's own socket (Core.fast): both overrun.
        for overruns in (1, 2) if backend == "c" else (1,):
            with pytest.raises(NetlinkError) as exc:
                a.allocate(DST)
            assert exc.value.errno == errno.ENOBUFS
            assert a.stats.overruns >= overruns
            assert sad_count(netns) == 0  # the orphan was recovered
        r = a.allocate(DST)
        assert sad_spis(netns) == {r.spi}
        a.release(r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_allocate_on_a_closed_allocator(netns: Namespace, backend: str) -> None:
    a = Allocator(netns, backend=backend)
    a.allocate(DST)
    a.close()
    from spialloc import ClosedError

    with pytest.raises(ClosedError):
        a.allocate(DST)


# --- allocate's own socket (backend "c": Core.fast), attacked --------------------------------


@pytest.mark.parametrize("guard", [False, True], ids=["no-guard", "guard"])
def test_threads_contending_for_allocates_socket_get_distinct_states(netns: Namespace, guard: bool) -> None:
    """Four threads allocate at once.  A thread that finds the C call's
    socket taken is sent the locked way (BUSY, nothing sent): every call
    still gets its own state, no SPI twice, nothing left behind."""
    import threading

    from spialloc._kernel import Kernel

    busy = 0
    real = Kernel.fast_rest

    def counted(self: Kernel, seq: int, rc: int, box: list[Any]) -> Any:
        nonlocal busy
        if rc == self.fast.BUSY:
            busy += 1
        return real(self, seq, rc, box)

    with Allocator(netns, backend="c", guard=guard) as a:
        a.release(a.allocate(DST))  # plain from here on: the C call
        got: list[list[Reservation]] = [[] for _ in range(4)]
        errors: list[BaseException] = []
        start = threading.Barrier(4)

        def work(i: int) -> None:
            try:
                start.wait()
                for _ in range(2000):
                    got[i].append(a.allocate(DST))
            except BaseException as exc:  # noqa: BLE001 - asserted on
                errors.append(exc)

        Kernel.fast_rest = counted  # type: ignore[method-assign]
        try:
            ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
        finally:
            Kernel.fast_rest = real  # type: ignore[method-assign]
        assert not errors, errors
        spis = [r.spi for rs in got for r in rs]
        assert len(spis) == len(set(spis)) == 8000
        assert sad_spis(netns) == set(spis)
        assert busy > 0, "no thread ever found the socket taken: the locked way went untested"
        assert a.release([r for rs in got for r in rs]) == 8000
    assert sad_count(netns) == 0


@pytest.mark.parametrize("nested", ["allocate", "close"])
def test_a_handler_that_allocates_or_closes_while_this_thread_reads_a_refusal(netns: Namespace, nested: str) -> None:
    """The C call's socket stays taken while Python reads a reply that is
    not an SPI (here: "No SPI available").  A signal handler runs in that
    thread at any point of it; one that calls allocate must not wait for
    the socket its own thread holds (it goes the locked way), and one that
    calls close must not wait for itself either.  Made deterministic by
    running the 'handler' right where the reply is read."""
    from spialloc import ClosedError
    from spialloc._kernel import Kernel

    a = Allocator(netns, backend="c", guard=False, spi_range=(0x7000, 0x7000))
    held = a.allocate(DST)  # the range's one SPI: the next call is refused
    k = a.core.kernel
    inner: list[object] = []
    real = Kernel.fast_rest

    def handler_inside(self: Kernel, seq: int, rc: int, box: list[Any]) -> Any:
        if rc == self.fast.OTHER and not inner:
            assert self.fast.held()
            try:
                if nested == "allocate":
                    a.release(held)  # so that the nested call gets the SPI
                    inner.append(a.allocate(DST))
                else:
                    inner.append(a.close())
            except BaseException as exc:  # noqa: BLE001 - asserted on
                inner.append(exc)
        return real(self, seq, rc, box)

    Kernel.fast_rest = handler_inside  # type: ignore[method-assign]
    try:
        with pytest.raises((SpiExhausted, ClosedError)) as outer:
            a.allocate(DST)
    finally:
        Kernel.fast_rest = real  # type: ignore[method-assign]
    assert len(inner) == 1
    assert not k.fast.held()
    if nested == "allocate":
        assert isinstance(outer.value, SpiExhausted)
        r = inner[0]
        assert isinstance(r, Reservation) and r.spi == 0x7000, r
        assert sad_spis(netns) == {0x7000}
        a.release(r)
        a.close()
    else:
        assert inner == [None] and a.closed
        with Allocator(netns, guard=False) as b:
            b.release(held)
            # What close() cut short: the refusal's SPI-less larval state,
            # which the closed allocator could not claim.  It holds no SPI
            # (nobody can be handed its value) and expires.
            assert {s.spi for s in b.states()} <= {0}
        ns_run(netns, ["ip", "xfrm", "state", "flush"])
    assert sad_count(netns) == 0


def test_close_from_another_thread_while_refusals_are_read(netns: Namespace) -> None:
    """Every call is refused (the range's one SPI is held), so each one
    holds allocate's own socket while Python reads the refusal; another
    thread closes the allocator meanwhile.  close() must wait for a hold
    in progress and then stop the calls: the caller ends with a typed
    error, nothing hangs, and nothing but the held state stays."""
    import threading

    from spialloc import SpiallocError

    a = Allocator(netns, backend="c", guard=False, spi_range=(0x7000, 0x7000))
    held = a.allocate(DST)
    ended: list[BaseException] = []
    refusals = 0

    def work() -> None:
        nonlocal refusals
        try:
            while True:
                try:
                    a.allocate(DST)
                except SpiExhausted:
                    refusals += 1
        except BaseException as exc:  # noqa: BLE001 - asserted on
            ended.append(exc)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while refusals < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    a.close()
    t.join(10)
    assert not t.is_alive(), "a call hung after close()"
    assert refusals >= 200
    (exc,) = ended
    assert isinstance(exc, SpiallocError), repr(exc)  # ClosedError, or a refusal's claim cut short
    assert not a.core.kernel.fast.held()
    with Allocator(netns, guard=False) as b:
        b.release(held)
        assert {s.spi for s in b.states()} <= {0}  # at most a refusal's SPI-less state
    ns_run(netns, ["ip", "xfrm", "state", "flush"])


# --- Reservations, released in bulk ----------------------------------------------------------


@pytest.mark.parametrize("guard", [False, True])
def test_a_batch_is_reservations_and_releases_in_slices(netns: Namespace, guard: bool) -> None:
    with Allocator(netns, guard=guard) as a:
        rs = a.allocate_many(300, DST, reqid=4)
        assert isinstance(rs, Reservations) and len(rs) == 300
        assert set(rs.spis) == sad_spis(netns)
        assert all(type(r) is Reservation and r.reqid == 4 for r in rs)
        assert a.release(rs[:100]) == 100
        assert sad_count(netns) == 200
        assert a.release(rs[100:]) == 200
        assert sad_count(netns) == 0
        empty = a.allocate_many(0, DST)
        assert len(empty) == 0 and a.release(empty) == 0


def test_a_batch_released_twice_deletes_nothing_the_second_time(netns: Namespace) -> None:
    with Allocator(netns) as a:
        rs = a.allocate_many(50, DST)
        assert a.release(rs) == 50
        again = a.allocate_many(50, DST)  # new states, perhaps on the same SPIs
        with pytest.raises(ReservationLost) as exc:
            a.release(rs)
        assert len(exc.value.reservations) == 50
        assert sad_count(netns) == 50  # the successors' states are untouched
        assert a.release(again) == 50


def test_a_batch_with_one_state_deleted_outside_releases_nothing(netns: Namespace) -> None:
    with Allocator(netns) as a:
        rs = a.allocate_many(20, DST)
        victim = rs[7]
        ns_run(netns, ["ip", "xfrm", "state", "delete", "dst", DST, "proto", "esp", "spi", hex(victim.spi)])
        with pytest.raises(ReservationLost) as exc:
            a.release(rs)
        assert exc.value.reservations == [victim]
        assert sad_count(netns) == 19  # nothing deleted
        assert a.release(list(rs[:7]) + list(rs[8:])) == 19


def test_a_batch_is_only_its_allocators_to_release(netns: Namespace) -> None:
    with Allocator(netns) as a, Allocator(netns) as b, Allocator(netns, guard=False) as free:
        rs = a.allocate_many(10, DST)
        with pytest.raises(InvalidRequest):
            b.release(rs)  # the same shared guard, another allocator's handles
        loose = free.allocate_many(10, DST)
        with pytest.raises(InvalidRequest):
            a.release(loose)  # no tokens: not issued by a guarded allocator
        assert sad_count(netns) == 20
        assert a.release(rs) == 10 and free.release(loose) == 10


def test_a_pickled_batch_is_a_list_that_still_releases(netns: Namespace) -> None:
    with Allocator(netns) as a:
        rs = a.allocate_many(10, DST)
        back = pickle.loads(pickle.dumps(rs))
        assert type(back) is list and back == list(rs)
        assert a.release(back) == 10
        assert sad_count(netns) == 0


def test_a_batch_reserved_whole_that_loses_a_state_mid_batch_delivers_exact_handles(
    netns: Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round one is reserved whole (one token, in flight as one Flight); then
    one of its states is deleted from outside before the batch ends: that
    index is asked again, and the batch is delivered the general way.  Every
    handle must be current (its own token), the lost state's SPI not among
    them, and release must find them all."""
    from spialloc._batch import BatchRun

    with Allocator(netns) as a:
        real_clean = BatchRun._clean
        victim: list[int] = []

        def lose_one_then_check(self: BatchRun, res: Any, ok: list[bool]) -> bool:
            # Right after round one was reserved (the book's lock released),
            # before it is booked, whichever way the batch runs.
            if not victim and self.flight is not None:
                victim.append(res.got[3])
                ns_run(netns, ["ip", "xfrm", "state", "delete", "dst", DST, "proto", "esp", "spi", hex(victim[0])])
                a.poll_events()  # the watcher's work, now: the death is the batch's
            return real_clean(self, res, ok)

        monkeypatch.setattr(BatchRun, "_clean", lose_one_then_check)
        rs = a.allocate_many(50, DST)
        assert victim and victim[0] not in rs.spis
        assert a.stats.expired_in_batch == 1
        assert len(set(rs.spis)) == 50 and set(rs.spis) == sad_spis(netns)
        guard = a.guard
        assert guard is not None
        assert all(guard.is_current(*r.key, r.token) for r in rs)
        assert a.release(rs) == 50
        assert sad_count(netns) == 0


def test_a_batch_checked_against_a_dump_delivers_exact_handles(netns: Namespace) -> None:
    """A batch that outlives half the larval lifetime checks its states
    against a dump (made here with a lifetime of 0), which undoes the bulk
    booking of round one: the handles must still carry their tokens (this
    path once raised KeyError after the round's flight was handed over)."""
    with Allocator(netns) as a:
        a.core.kernel.lifetime = lambda: 0.0  # type: ignore[method-assign]
        rs = a.allocate_many(50, DST)
        guard = a.guard
        assert guard is not None
        assert all(r.token and guard.is_current(*r.key, r.token) for r in rs)
        assert a.release(rs) == 50
        assert sad_count(netns) == 0
