"""A stateful attack on the guard's promise, against the real kernel: no two
live reservations share (proto, spi), and every state spialloc deletes is
one it created and was asked to delete.

A hypothesis ``RuleBasedStateMachine`` drives two allocators that share one
guard (the default in one process) on a fresh network namespace.  Both
allocate from one narrow range (16 or 4 values), on two destinations and two
protocols, so SPIs run out and are handed out again and again; larval states
die after 2 s in half of the runs (``acq_expires``), and a rule sleeps
through those deaths.  The
steps commit, release, use stale handles (released, lost, died) and handles
of the other allocator, and (in ``TestGuardMachineExternalDelete``) delete a
live reservation's state behind the library's back with ip(8).

The model does not ask the library what is alive.  Every reservation gets a
reqid of its own, so each state in the SAD names the one reservation it
belongs to; two witnesses besides spialloc see the kernel: ``ip xfrm state
list`` after every step, and ``ip xfrm monitor`` for the whole run, whose
"Deleted" and "Expired" events tell a DELSA from a death.  A reservation is
live until we release it, ``on_lost`` reports it, a commit or release of it
raises ReservationLost or, committed (commit here only marks the guard: this
kernel may have no ESP/AH types, so no SA can be installed over the larval
state), its state leaves the SAD.  A state can die only after
``acq_expires - 1`` s (the kernel keeps add times in whole seconds): anything
earlier is a deletion, and a loss reported earlier is a false one.

Checked after every step: no two live reservations share (proto, spi); every
live reservation's state is in the SAD, young ones always, and the guard holds
it as current; no state in the SAD is not a live reservation's (nothing
leaked, nothing released left behind); every uncommitted state that died is
reported to ``on_lost`` of the allocator that issued it, once, within 5 s,
and nothing else is; every DELSA the kernel saw was of a reservation we
released, or deleted ourselves.  Each step checks that the SAD changed only
as it should: a commit, a refused handle or an allocation removes no state
that cannot have expired, a release removes only its own.

CI runs a few short machines (about 15 s per test).  A longer run, with
shrinking on so that a failure is reported minimised (an hour or so)::

    cd /work/main && . .venv/bin/activate && SPIALLOC_REQUIRE_KERNEL=1 \\
        SPIALLOC_MACHINE_EXAMPLES=300 SPIALLOC_MACHINE_STEPS=60 SPIALLOC_MACHINE_SHRINK=1 \\
        python -m pytest tests/kernel/test_guard_machine.py -q -p no:randomly
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Literal

import pytest
from hypothesis import HealthCheck, Phase, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from nsutil import ns_run, wait_for

from spialloc import Allocator, InvalidRequest, Namespace, Reservation, ReservationLost, SpiExhausted

DSTS = ("10.0.0.1", "10.0.0.2")
PROTOS = ("esp", "ah")
SPI_LO = 0x1000
#: Range widths: 4 values run out (SpiExhausted) and come round again often.
WIDTHS = (16, 4)
#: Clock and scheduling slack on the "cannot have died yet" bound.
SLACK = 0.15
#: How long on_lost may lag the death of a state on this loaded machine.
LOST_DEADLINE = 5.0
#: External deletes: how long the library may take to notice one.
NOTICE_GRACE = 0.5
NOTICE_WAIT = 2.0
#: Seconds one example may sleep: an example that draws little but sleeps
#: would otherwise take most of the CI budget.
SLEEP_BUDGET = 5.0

EXAMPLES = int(os.environ.get("SPIALLOC_MACHINE_EXAMPLES", "0") or 0) or 6
STEPS = int(os.environ.get("SPIALLOC_MACHINE_STEPS", "0") or 0) or 20
# Each replay is a machine in real time, and kernel timing makes replays
# inexact: shrinking is for long runs, where a minimal report pays for it.
SHRINK = os.environ.get("SPIALLOC_MACHINE_SHRINK", "") not in ("", "0")

#: Reservations are picked by index into a list that timing changes
#: (states die): an integer draw keeps the choices hypothesis records the
#: same from run to run, where a precondition or a sampled_from over the
#: list would make them flaky.
PICK = st.integers(0, 255)

#: (dst, proto, spi, reqid): one state, named by its reservation's reqid.
StateT = tuple[str, str, int, int]

LIVE, GONE, LOST, RELEASED, DIED, EXTDEL = "live", "gone", "lost", "released", "died", "extdel"


def sad_states(ns: Namespace) -> set[StateT]:
    """The SAD as ip(8) lists it: every state with its reqid."""
    out = ns_run(ns, ["ip", "xfrm", "state", "list"]).stdout
    states: set[StateT] = set()
    dst = ""
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("src "):
            dst = parts[parts.index("dst") + 1]
        elif parts[:1] == ["proto"] and "spi" in parts and "reqid" in parts:
            states.add((dst, parts[1], int(parts[parts.index("spi") + 1], 16), int(parts[parts.index("reqid") + 1])))
    return states


class XfrmMonitor:
    """``ip xfrm monitor`` in the namespace: the kernel's own account of
    which states were deleted (DELSA) and which expired."""

    MARKER = "192.0.2.77"

    def __init__(self, ns: Namespace) -> None:
        assert ns.fd is not None
        self.ns = ns
        self.lock = threading.Lock()
        self.events: list[tuple[str, StateT]] = []
        self.marker = threading.Event()
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/proc/self/fd/{ns.fd}", "ip", "xfrm", "monitor", "SA", "expire", "policy"],
            pass_fds=[ns.fd],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        # Events before ip subscribed are never seen: a policy it reports
        # proves it listens.  Made and deleted until it does.
        marker = ["src", f"{self.MARKER}/32", "dst", f"{self.MARKER}/32", "dir", "out"]
        deadline = time.monotonic() + 15.0
        while not self.marker.is_set() and time.monotonic() < deadline:
            ns_run(ns, ["ip", "xfrm", "policy", "add", *marker])
            ns_run(ns, ["ip", "xfrm", "policy", "delete", *marker])
            self.marker.wait(0.2)
        assert self.marker.is_set(), "ip xfrm monitor reported nothing: it cannot witness the run"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        kind, dst = "", ""
        for line in self.proc.stdout:
            parts = line.split()
            if not parts:
                continue
            if not line[0].isspace():
                if self.MARKER in line:
                    self.marker.set()
                kind = parts[0] if parts[0] in ("Deleted", "Expired") else "other"
                dst = parts[parts.index("dst") + 1] if "dst" in parts else ""
            elif parts[0] == "proto" and "spi" in parts and "reqid" in parts:
                st_ = (dst, parts[1], int(parts[parts.index("spi") + 1], 16), int(parts[parts.index("reqid") + 1]))
                with self.lock:
                    self.events.append((kind, st_))

    def since(self, n: int) -> list[tuple[str, StateT]]:
        with self.lock:
            return self.events[n:]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.thread.join(10)


@dataclass(eq=False)
class Rec:
    """The model's view of one reservation."""

    label: str
    who: str
    r: Reservation
    proto: str
    reqid: int
    t0: float  # before allocate(): the kernel made the state no earlier
    status: str = LIVE
    committed: bool = False
    raised: bool = False  # a commit or release of it raised ReservationLost
    gone_at: float = 0.0  # its (uncommitted) state was seen gone: on_lost is due
    ext_at: float | None = None  # its state was deleted with ip(8)
    released: int | None = None  # what release() returned
    reported: bool = False  # on_lost

    @property
    def state(self) -> StateT:
        return (str(self.r.dst), self.proto, self.r.spi, self.reqid)


class GuardMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ns: Namespace | None = None
        self.monitor: XfrmMonitor | None = None
        self.alloc: dict[str, Allocator] = {}
        self.expires = 0
        self.slept = 0.0
        self.spi_range = (SPI_LO, SPI_LO)
        self.recs: dict[str, Rec] = {}
        self.by_token: dict[int, Rec] = {}
        self.by_reqid: dict[int, Rec] = {}
        self.next_reqid = 1
        self.lost_lock = threading.Lock()
        self.lost_calls: list[tuple[str, Reservation, float]] = []
        self.lost_seen = 0
        self.events_seen = 0
        self.deleted: set[int] = set()  # reqids the monitor saw deleted
        self.expired: set[int] = set()  # reqids the monitor saw expire
        self.sad: set[StateT] = set()

    # --- setup and teardown --------------------------------------------------------------

    @initialize(expires=st.sampled_from([2, 3600]), width=st.sampled_from(WIDTHS))
    def start(self, expires: int, width: int) -> None:
        self.spi_range = (SPI_LO, SPI_LO + width - 1)
        self.ns = Namespace.isolated()
        self.monitor = XfrmMonitor(self.ns)
        for who in ("A", "B"):
            self.alloc[who] = Allocator(self.ns, on_lost=self._on_lost_for(who))
        assert self.alloc["A"].guard is self.alloc["B"].guard, "allocators in one process do not share a guard"
        self.alloc["A"].acq_expires = expires
        self.expires = expires
        self.sad = sad_states(self.ns)
        assert self.sad == set()
        # Most rules need a reservation: without one, hypothesis gives up on
        # the first steps (no enabled rule) and the example is wasted.
        for who, dst in (("A", DSTS[0]), ("B", DSTS[1])):
            self.allocate(who, dst, "esp")
            self.sad = sad_states(self.ns)

    def _on_lost_for(self, who: str) -> Callable[[Reservation], None]:
        def on_lost(r: Reservation) -> None:
            with self.lost_lock:
                self.lost_calls.append((who, r, time.time()))

        return on_lost

    def teardown(self) -> None:
        try:
            # Hypothesis calls teardown in a finally: after a failed step the
            # checks would only bury its error under one of their own.
            if self.alloc and sys.exc_info()[0] is None:
                self._final_checks()
        finally:
            for a in self.alloc.values():
                a.close()
            if self.monitor is not None:
                self.monitor.close()
            if self.ns is not None:
                self.ns.close()

    def _final_checks(self) -> None:
        """What is due after the last step: on_lost for states that died,
        and the monitor's account of every deletion and death."""
        self._check_external(final=True)
        deadline = time.monotonic() + LOST_DEADLINE
        while any(rec.status == GONE for rec in self.recs.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
            self._take_lost()
        self._take_lost()
        self._check_gone(final=True)
        assert self.monitor is not None

        def accounted() -> bool:
            self._take_events()
            return all(self._witnessed(rec) for rec in self.recs.values())

        wait_for(accounted, timeout=5.0)
        for rec in self.recs.values():
            assert self._witnessed(rec), (
                f"{rec.label} ({rec.r}, reqid {rec.reqid}): {self._story(rec)}, but ip xfrm monitor saw "
                f"{'a DELSA' if rec.reqid in self.deleted else 'no DELSA'} and "
                f"{'an EXPIRE' if rec.reqid in self.expired else 'no EXPIRE'} of its state"
            )

    def _witnessed(self, rec: Rec) -> bool:
        """Whether the kernel's events agree with how the reservation ended."""
        deleted, expired = rec.reqid in self.deleted, rec.reqid in self.expired
        if rec.ext_at is not None:
            return deleted and not expired
        if rec.released == 1:
            return deleted and not expired
        if rec.status in (LOST, DIED) or rec.released == 0:
            return expired and not deleted  # a death, not a deletion
        return not deleted  # still live: nobody may have deleted it

    @staticmethod
    def _story(rec: Rec) -> str:
        if rec.ext_at is not None:
            return "deleted with ip(8)"
        if rec.released is not None:
            return f"released (release() returned {rec.released})"
        return {LOST: "reported lost", DIED: "committed and died", GONE: "died"}.get(rec.status, rec.status)

    # --- helpers -------------------------------------------------------------------------------

    def _labels(self, *statuses: str, who: str | None = None) -> list[str]:
        return sorted(
            (label for label, rec in self.recs.items() if rec.status in statuses and (who is None or rec.who == who)),
            key=lambda label: (label[0], int(label[1:])),
        )

    def _pick(self, labels: list[str], pick: int, what: str) -> Rec | None:
        """The reservation ``pick`` names among ``labels``; None (a no-op step) if there is none."""
        if not labels:
            note(f"{what}: nothing to pick")
            return None
        rec = self.recs[labels[pick % len(labels)]]
        note(f"{what} {rec.label} ({rec.r}, {rec.status}{', committed' if rec.committed else ''})")
        return rec

    def _snapshot(self) -> tuple[set[StateT], float]:
        assert self.ns is not None
        states = sad_states(self.ns)
        return states, time.time()

    def _may_have_died(self, rec: Rec, at: float) -> bool:
        """A larval state dies no earlier than acq_expires - 1 s after it was made."""
        return at >= rec.t0 + self.expires - 1 - SLACK

    def _check_change(
        self, before: set[StateT], after: set[StateT], at: float, what: str, own: StateT | None = None
    ) -> None:
        """Between the last step's snapshot and ``after``, only deaths (and
        ``own``: the state ``what`` was meant to create or delete) changed the SAD."""
        added = after - before - ({own} if own else set())
        assert not added, f"{what} created states {sorted(added)}"
        for s in sorted(before - after - ({own} if own else set())):
            rec = self.by_reqid.get(s[3])
            assert rec is not None and self._may_have_died(rec, at), (
                f"{what} removed the state {s} of {rec.label if rec else 'nobody'}, "
                f"{at - rec.t0 if rec else 0:.2f} s old, which cannot have expired (acq_expires {self.expires})"
            )

    def _lost(self, rec: Rec, after: set[StateT], at: float, what: str) -> None:
        """``what`` raised ReservationLost for a reservation the model held live."""
        assert rec.ext_at is not None or self._may_have_died(rec, at), (
            f"{what} raised ReservationLost for {rec.label} ({rec.r}), {at - rec.t0:.2f} s old: "
            f"its state cannot have expired (acq_expires {self.expires})"
        )
        assert rec.state not in after, f"{what} raised ReservationLost, but {rec.label}'s state is still in the SAD"
        rec.raised = True
        event(f"{what.split('(')[0]}: ReservationLost for a live reservation")
        if rec.committed:
            rec.status = DIED
        elif rec.status == LIVE:
            rec.status, rec.gone_at = GONE, at

    # --- rules ----------------------------------------------------------------------------------

    @rule(who=st.sampled_from(["A", "B"]), dst=st.sampled_from(DSTS), proto=st.sampled_from(PROTOS))
    def allocate(self, who: str, dst: str, proto: Literal["esp", "ah"]) -> None:
        reqid = self.next_reqid
        self.next_reqid += 1
        before = self.sad
        t0 = time.time()
        try:
            r = self.alloc[who].allocate(dst, proto, spi_range=self.spi_range, reqid=reqid)
        except SpiExhausted as exc:
            after, at = self._snapshot()
            # What the guard may still hold of this protocol: everything not
            # released, not reported lost, not refused as stale.
            held = [
                rec
                for rec in self.recs.values()
                if rec.proto == proto and rec.status in (LIVE, GONE, DIED, EXTDEL) and not rec.raised
            ]
            size = self.spi_range[1] - self.spi_range[0] + 1
            assert len(held) >= size, (
                f"SpiExhausted for {proto} with only {len(held)} of {size} values possibly outstanding "
                f"({', '.join(f'{rec.label}:{rec.r.spi:#x}/{rec.status}' for rec in held)}): {exc}"
            )
            self._check_change(before, after, at, f"allocate({dst}, {proto}) raising SpiExhausted")
            event("allocate: SpiExhausted")
            note(f"allocate {who} {dst} {proto}: SpiExhausted")
            return
        after, at = self._snapshot()
        label = f"{who}{reqid}"
        rec = Rec(label, who, r, proto, reqid, t0)
        note(f"allocate {who} {dst} {proto} -> {label} ({r})")
        assert self.spi_range[0] <= r.spi <= self.spi_range[1], r
        assert (str(r.dst), r.proto.name.lower(), r.reqid) == (dst, proto, reqid), r
        assert r.token and r.token not in self.by_token, f"token {r.token} of {r} is not new"
        self._check_change(before, after, at, f"allocate -> {label} ({r})", own=rec.state)
        assert rec.state in after or self._may_have_died(rec, at), f"{label} ({r}): its state is not in the SAD"
        if any(old.proto == proto and old.r.spi == r.spi for old in self.recs.values()):
            event("allocate: an SPI handed out before")
        self.recs[label] = rec
        self.by_token[r.token] = rec
        self.by_reqid[reqid] = rec

    @rule(pick=PICK)
    def commit(self, pick: int) -> None:
        rec = self._pick(self._labels(LIVE), pick, "commit")
        if rec is None:
            return
        before = self.sad
        try:
            self.alloc[rec.who].commit(rec.r)
        except ReservationLost:
            after, at = self._snapshot()
            self._lost(rec, after, at, f"commit({rec.label})")
        else:
            after, at = self._snapshot()
            rec.committed = True
        self._check_change(before, after, at, f"commit({rec.label})")

    @rule(pick=PICK)
    def release(self, pick: int) -> None:
        rec = self._pick(self._labels(LIVE), pick, "release")
        if rec is None:
            return
        before = self.sad
        try:
            n = self.alloc[rec.who].release(rec.r)
        except ReservationLost:
            after, at = self._snapshot()
            self._lost(rec, after, at, f"release({rec.label})")
            self._check_change(before, after, at, f"release({rec.label}) raising ReservationLost")
            return
        after, at = self._snapshot()
        self._check_change(before, after, at, f"release({rec.label})", own=rec.state)
        assert rec.state not in after, f"release({rec.label}) returned {n}, and its state is still in the SAD"
        # 0: the state died in the instant between the check and the DELSA.
        assert n == 1 or (n == 0 and self._may_have_died(rec, at)), (
            f"release({rec.label}) of a live reservation, {at - rec.t0:.2f} s old, returned {n}"
        )
        rec.status, rec.released = RELEASED, n

    @rule(pick=PICK, pick_stale=PICK, stale_first=st.booleans())
    def release_pair_with_stale(self, pick: int, pick_stale: int, stale_first: bool) -> None:
        """A list with one stale handle releases nothing (README)."""
        live = self._pick(
            [label for label in self._labels(LIVE) if self._stale_labels(self.recs[label].who)], pick, "release live"
        )
        if live is None:
            return
        old = self._pick(self._stale_labels(live.who), pick_stale, "with stale")
        assert old is not None
        before = self.sad
        try:
            n = self.alloc[live.who].release([old.r, live.r] if stale_first else [live.r, old.r])
        except ReservationLost as exc:
            after, at = self._snapshot()
            assert old.r in exc.reservations, f"{exc.reservations} does not name the stale {old.label}"
            if live.r in exc.reservations:
                self._lost(live, after, at, f"release([{live.label}, {old.label}])")
            self._check_change(before, after, at, f"release([{live.label}, stale {old.label}])")
            return
        pytest.fail(f"release([{live.label}, stale {old.label} ({old.status})]) returned {n}")

    def _stale_labels(self, who: str | None = None) -> list[str]:
        return self._labels(GONE, LOST, RELEASED, DIED, who=who)

    @rule(pick=PICK, op=st.sampled_from(["commit", "release"]))
    def use_stale_handle(self, pick: int, op: str) -> None:
        """A handle that is not current touches nothing: in particular not
        the state of whoever holds its SPI now."""
        rec = self._pick(self._stale_labels(), pick, f"{op} stale")
        if rec is None:
            return
        before = self.sad
        try:
            got = getattr(self.alloc[rec.who], op)(rec.r)
        except ReservationLost:
            pass
        else:
            pytest.fail(
                f"{op}({rec.label}) of a stale handle ({rec.status}, {self._story(rec)}) succeeded (returned {got!r})"
            )
        after, at = self._snapshot()
        self._check_change(before, after, at, f"{op}(stale {rec.label})")
        event(f"stale handle refused: {op} of a {rec.status} reservation")
        if any(o.status == LIVE and (o.proto, o.r.spi) == (rec.proto, rec.r.spi) for o in self.recs.values()):
            event("stale handle refused while its SPI is another's")
        if rec.status == GONE:
            rec.raised = True

    @rule(pick=PICK, op=st.sampled_from(["commit", "release"]))
    def use_other_allocators_handle(self, pick: int, op: str) -> None:
        rec = self._pick(self._labels(LIVE, GONE, LOST, RELEASED, DIED, EXTDEL), pick, f"{op} with the other allocator")
        if rec is None:
            return
        other = "B" if rec.who == "A" else "A"
        before = self.sad
        with pytest.raises(InvalidRequest, match="not issued by this"):
            getattr(self.alloc[other], op)(rec.r)
        after, at = self._snapshot()
        self._check_change(before, after, at, f"{op}({rec.label}) with allocator {other}")

    @rule(seconds=st.sampled_from([0.3, 1.2, 2.2]))
    def sleep(self, seconds: float) -> None:
        """Let larval states die, and their SPIs come free.  (A no-op when
        nothing dies: a precondition would make hypothesis give up on
        examples that draw it too often.)"""
        if self.expires < 60 and self.slept < SLEEP_BUDGET:
            self.slept += seconds
            time.sleep(seconds)

    # --- checks after every step ----------------------------------------------------------------

    @invariant()
    def model_agrees_with_the_kernel(self) -> None:
        if not self.alloc:
            return
        # on_lost before the snapshot: a state reported lost is gone from it.
        self._take_lost()
        states, at = self._snapshot()
        for rec in self.recs.values():
            if rec.status == LIVE and rec.state not in states:
                assert self._may_have_died(rec, at), (
                    f"{rec.label}'s state ({rec.r}, reqid {rec.reqid}) left the SAD {at - rec.t0:.2f} s after "
                    f"allocation, before it could expire (acq_expires {self.expires}), and nobody released it"
                )
                event("a state died")
                if rec.committed:
                    rec.status = DIED  # the guard drops a committed death silently
                else:
                    rec.status, rec.gone_at = GONE, at
        self._check_gone(final=False)
        for s in sorted(states):
            owner = self.by_reqid.get(s[3])
            assert owner is not None, f"state {s} in the SAD was never handed out"
            assert owner.status == LIVE, f"{owner.label}'s state {s} is in the SAD, but it is {self._story(owner)}"
        live = [rec for rec in self.recs.values() if rec.status == LIVE]
        for rec in live:
            guard = self.alloc[rec.who].guard
            assert guard is not None
            if not guard.is_current(*rec.r.key, rec.r.token):
                # It may have died since the snapshot; then it is gone now.
                assert rec.state not in self._snapshot()[0], (
                    f"the guard does not hold the live reservation {rec.label} ({rec.r}), whose state is in the SAD"
                )
        seen: dict[tuple[str, int], Rec] = {}
        for rec in live:
            key = (rec.proto, rec.r.spi)
            assert key not in seen, (
                f"{seen[key].label} and {rec.label} are both live with {rec.proto} spi {rec.r.spi:#x} "
                f"({seen[key].r.dst}, {rec.r.dst})"
            )
            seen[key] = rec
        self._take_events()
        self._check_external(final=False)
        self.sad = states

    def _take_lost(self) -> None:
        with self.lost_lock:
            calls = self.lost_calls[self.lost_seen :]
            self.lost_seen = len(self.lost_calls)
        for who, r, t in calls:
            rec = self.by_token.get(r.token)
            assert rec is not None, f"on_lost of {who} reported {r} (token {r.token}), which was never handed out"
            assert rec.who == who, f"on_lost of {who} reported {rec.label}, issued by {rec.who}"
            assert r == rec.r, f"on_lost reported {r!r}, not the handle {rec.r!r} it was handed out as"
            assert not rec.reported, f"on_lost reported {rec.label} twice"
            assert not rec.committed, f"on_lost reported {rec.label}, which was committed"
            assert rec.status != RELEASED, f"on_lost reported {rec.label}, which was released ({rec.released})"
            assert rec.ext_at is not None or self._may_have_died(rec, t), (
                f"on_lost reported {rec.label} {t - rec.t0:.2f} s after allocation: its state cannot have "
                f"expired yet (acq_expires {self.expires})"
            )
            rec.reported = True
            rec.status = LOST
            event("on_lost")

    def _check_gone(self, final: bool) -> None:
        now = time.time()
        for rec in self.recs.values():
            if rec.status == GONE:
                assert not final and now - rec.gone_at <= LOST_DEADLINE, (
                    f"{rec.label} ({rec.r}) died (its state left the SAD {now - rec.gone_at:.1f} s ago), "
                    "and on_lost was not called"
                )

    def _take_events(self) -> None:
        assert self.monitor is not None
        events = self.monitor.since(self.events_seen)
        self.events_seen += len(events)
        for kind, s in events:
            if kind not in ("Deleted", "Expired"):
                continue
            rec = self.by_reqid.get(s[3])
            assert rec is not None, f"ip xfrm monitor: {kind} {s}, a state never handed out"
            if kind == "Deleted":
                assert rec.reqid not in self.deleted, f"{rec.label}'s state was deleted twice"
                assert rec.released == 1 or rec.ext_at is not None, (
                    f"ip xfrm monitor saw {rec.label}'s state {s} deleted (DELSA), but it is "
                    f"{self._story(rec)}: spialloc deleted a state it was not asked to"
                )
                self.deleted.add(rec.reqid)
            else:
                self.expired.add(rec.reqid)

    def _check_external(self, final: bool) -> None:
        """Only the machine with external deletes has something to check."""


class GuardMachineExternalDelete(GuardMachine):
    """The same, and a live reservation's state deleted with ip(8): the
    library must notice (the kernel multicasts the DELSA), so that the
    reservation is lost: commit() raises ReservationLost, on_lost is called
    for one not committed, and its SPI can be handed out again."""

    @rule(pick=PICK)
    def delete_externally(self, pick: int) -> None:
        rec = self._pick(self._labels(LIVE), pick, "delete with ip(8)")
        if rec is None:
            return
        assert self.ns is not None
        dst, proto, spi, _ = rec.state
        argv = ["ip", "xfrm", "state", "delete", "src", "0.0.0.0", "dst", dst, "proto", proto, "spi", hex(spi)]
        done = ns_run(self.ns, argv, check=False)
        at = time.time()
        if done.returncode != 0:
            # It died first: the invariant sees it gone.
            assert self._may_have_died(rec, at), f"{' '.join(argv)} failed for {rec.label}: {done.stderr}"
            return
        rec.status, rec.ext_at = EXTDEL, at
        event(f"deleted with ip(8): a {'committed' if rec.committed else 'reserved'} reservation")

    def _check_external(self, final: bool) -> None:
        for rec in list(self.recs.values()):
            if rec.status != EXTDEL or rec.ext_at is None:
                continue
            if final:
                time.sleep(max(0.0, rec.ext_at + NOTICE_GRACE - time.time()))
            elif time.time() - rec.ext_at < NOTICE_GRACE:
                continue
            self._wait_noticed(rec)
            try:
                self.alloc[rec.who].commit(rec.r)
            except ReservationLost:
                pass
            else:
                pytest.fail(
                    f"{rec.label} ({rec.r}, {'committed' if rec.committed else 'reserved'}): its state was deleted "
                    f"with ip(8) {time.time() - rec.ext_at:.1f} s ago, and commit() still succeeds "
                    "(the guard holds it as current, and keeps its SPI from everyone)"
                )
            event("an external delete checked")
            if rec.committed:
                rec.status = DIED
            else:
                self._wait_reported(rec)
                assert rec.reported, f"{rec.label}: its state was deleted with ip(8), and on_lost was not called"

    def _wait_noticed(self, rec: Rec) -> None:
        guard = self.alloc[rec.who].guard
        assert guard is not None
        wait_for(lambda: not guard.is_current(*rec.r.key, rec.r.token), timeout=NOTICE_WAIT)

    def _wait_reported(self, rec: Rec) -> None:
        def reported() -> bool:
            self._take_lost()
            return rec.reported

        wait_for(reported, timeout=NOTICE_WAIT)


def _settings() -> settings:
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if SHRINK else [])
    return settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        phases=phases,
        # Steps run ip(8) and sleep: slow by design, on a loaded machine.
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


TestGuardMachine = GuardMachine.TestCase
TestGuardMachine.settings = _settings()

TestGuardMachineExternalDelete = GuardMachineExternalDelete.TestCase
TestGuardMachineExternalDelete.settings = _settings()
