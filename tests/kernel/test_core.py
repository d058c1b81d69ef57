"""The core against the real kernel: every test in a fresh network namespace of
its own (fixtures ``netns``, ``alloc``, ``raw_alloc``), with ip(8) as an
independent witness of what the kernel holds."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import secrets
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from nsutil import make_acquire, ns_run, sad_count, sad_spis, wait_for

import spialloc
from spialloc import (
    Allocator,
    Direction,
    Mode,
    Namespace,
    NamespaceError,
    NetlinkError,
    Proto,
    ReservationLost,
    SpiExhausted,
)
from spialloc import _wire as w
from spialloc._netlink import XfrmSocket

ROOT = Path(__file__).resolve().parents[2]
KTEXT = "No SPI available in the requested range"

ADDRS = {4: ("10.0.0.1", "10.0.0.2"), 6: ("2001:db8::1", "2001:db8::2")}


def ip_state(ns: Namespace) -> str:
    return ns_run(ns, ["ip", "xfrm", "state", "list"]).stdout


def ip_state_block(ns: Namespace, spi: int) -> str:
    """The ip(8) lines of the state with this SPI."""
    out = ip_state(ns)
    blocks: list[list[str]] = []
    for line in out.splitlines():
        if line.startswith("src "):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    found = [b for b in blocks if f"spi {spi:#010x}" in "\n".join(b)]
    assert len(found) == 1, out
    return "\n".join(found[0])


# --- protocols and families -----------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", ["esp", "ah"])
def test_esp_ah_allocate_in_default_range_and_state_exists(
    alloc: Allocator, netns: Namespace, proto: str, family: int
) -> None:
    dst, _ = ADDRS[family]
    r = alloc.allocate(dst, proto)
    assert 0xC0000000 <= r.spi <= 0xCFFFFFFF
    assert r.proto is Proto(w.IPPROTO_ESP if proto == "esp" else w.IPPROTO_AH)
    assert str(r.dst) == str(ipaddress.ip_address(dst))
    # ip(8) sees it
    assert sad_spis(netns) == {r.spi}
    block = ip_state_block(netns, r.spi)
    assert f"dst {ipaddress.ip_address(dst)}" in block
    assert f"proto {proto} " in block
    # and GETSA finds it
    st = alloc.lookup(dst, r.spi, proto)
    assert st is not None
    assert st.spi == r.spi
    assert st.proto is r.proto
    assert st.dst == r.dst
    assert st.larval is True
    assert st.acquire_seq == 0


@pytest.mark.parametrize("family", [4, 6])
def test_ipcomp_cpi_in_default_range_and_state_exists(alloc: Allocator, netns: Namespace, family: int) -> None:
    dst, _ = ADDRS[family]
    cpis = [alloc.allocate(dst, "comp").spi for _ in range(5)]
    assert len(set(cpis)) == 5
    for c in cpis:
        assert 0x100 <= c <= 0xEFFF
    assert sad_spis(netns) == set(cpis)
    for c in cpis:
        assert "proto comp" in ip_state_block(netns, c)
        st = alloc.lookup(dst, c, "comp")
        assert st is not None and st.proto is Proto.COMP and st.spi == c


def test_ipv6_with_src_is_stored(alloc: Allocator, netns: Namespace) -> None:
    r = alloc.allocate("2001:db8::1", "esp", src="2001:db8::2")
    block = ip_state_block(netns, r.spi)
    assert block.startswith("src 2001:db8::2 dst 2001:db8::1")
    st = alloc.lookup("2001:db8::1", r.spi)
    assert st is not None and st.src == ipaddress.ip_address("2001:db8::2")


def test_lookup_of_missing_state_is_none(alloc: Allocator) -> None:
    assert alloc.lookup("10.0.0.1", 0xC0000001) is None


# --- ranges -----------------------------------------------------------------------------


def test_custom_range_is_respected(alloc: Allocator, netns: Namespace) -> None:
    got = [alloc.allocate("10.0.0.1", spi_range=(0x10000, 0x1000F)).spi for _ in range(8)]
    assert len(set(got)) == 8
    assert all(0x10000 <= s <= 0x1000F for s in got)
    assert sad_spis(netns) == set(got)


def test_min_equal_max_gets_exactly_that_spi(raw_alloc: Allocator, netns: Namespace) -> None:
    r = raw_alloc.allocate("10.0.0.1", spi_range=(0x4242, 0x4242))
    assert r.spi == 0x4242
    assert sad_spis(netns) == {0x4242}


def test_min_equal_max_held_again_is_spi_exhausted_from_kernel(raw_alloc: Allocator) -> None:
    raw_alloc.allocate("10.0.0.1", spi_range=(0x4242, 0x4242))
    with pytest.raises(SpiExhausted) as info:
        raw_alloc.allocate("10.0.0.1", spi_range=(0x4242, 0x4242))
    assert info.value.errno == errno.ENOENT
    assert info.value.kernel_text == KTEXT
    # the kernel compares (spi, proto) across destinations on 6.17+
    with pytest.raises(SpiExhausted):
        raw_alloc.allocate("10.0.0.99", spi_range=(0x4242, 0x4242))


def test_min_equal_max_held_again_is_spi_exhausted_guarded(alloc: Allocator) -> None:
    r = alloc.allocate("10.0.0.1", spi_range=(0x4242, 0x4242))
    assert r.spi == 0x4242
    with pytest.raises(SpiExhausted) as info:
        alloc.allocate("10.0.0.1", spi_range=(0x4242, 0x4242))
    assert info.value.errno == errno.ENOENT
    # once released, the same SPI is available again
    assert alloc.release(r) == 1
    assert alloc.allocate("10.0.0.1", spi_range=(0x4242, 0x4242)).spi == 0x4242


def test_exhaustion_of_tiny_range_raw(raw_alloc: Allocator, netns: Namespace) -> None:
    lo, hi = 0x7000, 0x7003
    got: list[int] = []
    with pytest.raises(SpiExhausted) as info:
        for _ in range(100):
            got.append(raw_alloc.allocate("10.0.0.1", spi_range=(lo, hi)).spi)
    exc = info.value
    assert exc.errno == errno.ENOENT
    assert KTEXT in str(exc)
    assert exc.kernel_text == KTEXT
    assert isinstance(exc, NetlinkError) and isinstance(exc, OSError)
    # distinct SPIs, all in range; random picks may give up before the range is full
    assert 1 <= len(got) <= 4
    assert len(set(got)) == len(got)
    assert all(lo <= s <= hi for s in got)
    # fill what is left with exact asks; then the range is truly full
    for s in range(lo, hi + 1):
        if s not in got:
            got.append(raw_alloc.allocate("10.0.0.1", spi_range=(s, s)).spi)
    assert sorted(got) == [lo, lo + 1, lo + 2, lo + 3]
    for _ in range(3):
        with pytest.raises(SpiExhausted, match=KTEXT):
            raw_alloc.allocate("10.0.0.1", spi_range=(lo, hi))
    assert {lo, lo + 1, lo + 2, lo + 3} <= sad_spis(netns)


def test_exhaustion_of_tiny_range_guarded_hands_out_every_value(alloc: Allocator) -> None:
    got = [alloc.allocate("10.0.0.1", spi_range=(0x7000, 0x7003)).spi for _ in range(4)]
    assert sorted(got) == [0x7000, 0x7001, 0x7002, 0x7003]
    with pytest.raises(SpiExhausted):
        alloc.allocate("10.0.0.1", spi_range=(0x7000, 0x7003))


def test_kernel_extack_text_reaches_the_exception(alloc: Allocator) -> None:
    """Send an ALLOCSPI the library itself would refuse (IPComp max > 0xffff)
    straight through the socket: the kernel's own EINVAL text comes back."""
    sock = alloc.core.kernel.sock
    info = w.userspi_info(
        family=w.AF_INET,
        daddr=bytes([10, 0, 0, 1]) + bytes(12),
        saddr=bytes(16),
        proto=w.IPPROTO_COMP,
        mode=0,
        reqid=0,
        acq_seq=0,
        spi_min=0x100,
        spi_max=0x1FFFF,
    )
    with sock.lock:
        seq = sock.next_seq()
        with pytest.raises(NetlinkError) as exc_info:
            sock.transact(w.allocspi(seq, info, b""), seq, "allocspi")
    assert exc_info.value.errno == errno.EINVAL
    assert exc_info.value.kernel_text == "IPCOMP SPI must be <= 65535"


# --- attributes the kernel stores -----------------------------------------------------------


def test_mark_and_mask_are_stored(alloc: Allocator, netns: Namespace) -> None:
    r = alloc.allocate("10.0.0.1", mark=(0x10, 0xFF))
    assert r.mark == (0x10, 0xFF)
    assert "mark 0x10/0xff" in ip_state_block(netns, r.spi)
    st = alloc.lookup("10.0.0.1", r.spi, mark=(0x10, 0xFF))
    assert st is not None and st.mark == (0x10, 0xFF)
    # a lookup without the mark does not match the marked state
    assert alloc.lookup("10.0.0.1", r.spi) is None


def test_plain_int_mark_is_stored_with_full_mask(alloc: Allocator, netns: Namespace) -> None:
    r = alloc.allocate("10.0.0.1", mark=7)
    assert "mark 0x7/0xffffffff" in ip_state_block(netns, r.spi)


def test_if_id_is_stored(alloc: Allocator, netns: Namespace) -> None:
    r = alloc.allocate("10.0.0.1", if_id=0x2A)
    assert "if_id 0x2a" in ip_state_block(netns, r.spi)
    st = alloc.lookup("10.0.0.1", r.spi)
    assert st is not None and st.if_id == 0x2A


def test_reqid_and_tunnel_mode_are_stored(alloc: Allocator, netns: Namespace) -> None:
    r = alloc.allocate("10.0.0.1", src="10.0.0.2", mode="tunnel", reqid=7)
    assert "reqid 7 mode tunnel" in ip_state_block(netns, r.spi)
    st = alloc.lookup("10.0.0.1", r.spi)
    assert st is not None
    assert st.mode is Mode.TUNNEL
    assert st.reqid == 7
    assert st.src == ipaddress.ip_address("10.0.0.2")


@pytest.mark.parametrize("direction, expected", [("in", Direction.IN), ("out", Direction.OUT)])
def test_direction_is_stored(alloc: Allocator, direction: str, expected: Direction) -> None:
    r = alloc.allocate("10.0.0.1", direction=direction)
    assert r.direction is expected
    st = alloc.lookup("10.0.0.1", r.spi)
    assert st is not None and st.direction is expected


def test_no_direction_means_none(alloc: Allocator) -> None:
    r = alloc.allocate("10.0.0.1")
    st = alloc.lookup("10.0.0.1", r.spi)
    assert st is not None and st.direction is None and st.mark is None and st.if_id is None


def test_everything_at_once_ipv6(alloc: Allocator, netns: Namespace) -> None:
    r = alloc.allocate(
        "2001:db8::1", "ah", src="2001:db8::2", mode="tunnel", reqid=9, mark=(3, 0xF), if_id=5, direction="in"
    )
    st = alloc.lookup("2001:db8::1", r.spi, "ah", mark=(3, 0xF))
    assert st is not None
    assert (st.proto, st.mode, st.reqid, st.mark, st.if_id, st.direction) == (
        Proto.AH,
        Mode.TUNNEL,
        9,
        (3, 0xF),
        5,
        Direction.IN,
    )
    assert replace(st.reservation(), token=r.token) == r  # the kernel knows no token


# --- release -----------------------------------------------------------------------------


def test_release_removes_state_and_second_release_is_refused(alloc: Allocator, netns: Namespace) -> None:
    r = alloc.allocate("10.0.0.1")
    keep = alloc.allocate("10.0.0.1")
    assert sad_spis(netns) == {r.spi, keep.spi}
    assert alloc.release(r) == 1
    assert sad_spis(netns) == {keep.spi}
    assert alloc.lookup("10.0.0.1", r.spi) is None
    with pytest.raises(ReservationLost, match="not current"):
        alloc.release(r)  # released already: a stale handle, refused, touches nothing
    with pytest.raises(ReservationLost):
        alloc.release([r])
    assert alloc.release([]) == 0
    assert sad_spis(netns) == {keep.spi}


def test_release_of_marked_state(alloc: Allocator, netns: Namespace) -> None:
    r = alloc.allocate("10.0.0.1", mark=(0x10, 0xFF))
    assert alloc.release(r) == 1
    assert sad_count(netns) == 0


def test_release_of_state_deleted_outside_returns_zero(raw_alloc: Allocator, netns: Namespace) -> None:
    r = raw_alloc.allocate("10.0.0.1")
    ns_run(netns, ["ip", "xfrm", "state", "delete", "dst", "10.0.0.1", "proto", "esp", "spi", hex(r.spi)])
    assert raw_alloc.release(r) == 0


@pytest.mark.parametrize("guarded", [True, False])
def test_release_many(netns: Namespace, guarded: bool) -> None:
    with Allocator(netns, guard=guarded) as a:
        v4 = a.allocate_many(40, "10.0.0.1")
        v6 = [a.allocate("2001:db8::1", "ah") for _ in range(5)]
        comp = [a.allocate("10.0.0.1", "comp", mark=1) for _ in range(5)]
        assert sad_count(netns) == 50
        assert a.release(v4 + v6 + comp) == 50
        assert sad_count(netns) == 0
        if guarded:  # released already: stale handles
            with pytest.raises(ReservationLost):
                a.release(v4 + v6 + comp)
        else:  # no guard, no identity: by key, as ip xfrm state delete
            assert a.release(v4 + v6 + comp) == 0


def test_release_many_partly_gone(alloc: Allocator, netns: Namespace) -> None:
    rs = alloc.allocate_many(10, "10.0.0.1")
    assert alloc.release(rs[:4]) == 4
    with pytest.raises(ReservationLost):
        alloc.release(rs)  # four of them are released already: nothing is released
    assert sad_count(netns) == 6
    assert alloc.release(rs[4:]) == 6
    assert sad_count(netns) == 0


# --- states() ------------------------------------------------------------------------------


def test_states_lists_larval_states_including_foreign_ones(alloc: Allocator, netns: Namespace) -> None:
    ours = [alloc.allocate("10.0.0.1"), alloc.allocate("2001:db8::1", "comp")]
    out = ns_run(
        netns,
        [
            "ip",
            "xfrm",
            "state",
            "allocspi",
            "src",
            "0.0.0.0",
            "dst",
            "10.0.0.9",
            "proto",
            "ah",
            "reqid",
            "3",
            "mode",
            "tunnel",
        ],
    ).stdout
    words = out.split()
    foreign_spi = int(words[words.index("spi") + 1], 16)
    states = alloc.states()
    assert len(states) == 3
    by_spi = {s.spi: s for s in states}
    assert set(by_spi) == {ours[0].spi, ours[1].spi, foreign_spi}
    f = by_spi[foreign_spi]
    assert (str(f.dst), f.proto, f.reqid, f.mode, f.larval) == ("10.0.0.9", Proto.AH, 3, Mode.TUNNEL, True)
    assert by_spi[ours[1].spi].proto is Proto.COMP
    assert all(s.larval for s in states)
    assert {s.spi for s in alloc.states(larval=True)} == set(by_spi)
    assert alloc.states(larval=False) == []
    assert [s.spi for s in alloc.states(proto="ah")] == [foreign_spi]


def test_states_empty_namespace(alloc: Allocator) -> None:
    assert alloc.states() == []


# --- privileges -----------------------------------------------------------------------------

_CHILD = r"""
import json, sys
import spialloc
kwargs = json.loads(sys.argv[1])
stage = "create"
try:
    a = spialloc.Allocator(**kwargs)
    stage = "allocate"
    a.allocate("10.0.0.1")
    print(json.dumps({"stage": "done"}))
except BaseException as e:
    print(json.dumps({"stage": stage, "type": type(e).__name__, "errno": getattr(e, "errno", None),
                      "msg": str(e), "operation": getattr(e, "operation", None),
                      "permission": isinstance(e, PermissionError),
                      "spialloc": isinstance(e, spialloc.SpiallocError)}))
"""


def _run_without_caps(netns: Namespace, kwargs: dict[str, object]) -> dict[str, object]:
    """Run _CHILD inside the test namespace as root with every capability
    dropped (bounding, inheritable, hence effective after exec)."""
    code = "import os; assert open('/proc/self/status').read().split('CapEff:')[1].split()[0] == '0' * 16; " + _CHILD
    proc = ns_run(
        netns,
        [
            "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            "env",
            f"PYTHONPATH={ROOT}",
            f"SPIALLOC_BACKEND={os.environ.get('SPIALLOC_BACKEND', 'auto')}",
            sys.executable,
            "-W",
            "ignore",
            "-c",
            code,
            json.dumps(kwargs),
        ],
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eperm_from_kernel_is_insufficient_privilege(netns: Namespace) -> None:
    # guard off, no watcher: the only privileged step is ALLOCSPI itself, so the
    # EPERM comes from the kernel's reply and not from socket setup
    res = _run_without_caps(netns, {"guard": False})
    assert res["stage"] == "allocate", res
    assert res["type"] == "InsufficientPrivilege"
    assert res["errno"] == errno.EPERM
    assert res["operation"] == "allocspi"
    assert res["permission"] is True
    assert "CAP_NET_ADMIN" in res["msg"] and "unshare -Urn" in res["msg"]
    assert sad_count(netns) == 0


def test_unprivileged_default_allocator_raises_insufficient_privilege(netns: Namespace) -> None:
    """Allocator() with its defaults (guard + expiry watcher) without
    CAP_NET_ADMIN must fail with the typed error and its hint too, not a bare
    PermissionError from binding the EXPIRE multicast group."""
    res = _run_without_caps(netns, {})
    assert res["type"] == "InsufficientPrivilege", res
    assert res["permission"] is True
    assert res["spialloc"] is True
    assert "CAP_NET_ADMIN" in res["msg"]


# --- ACQUIRE ---------------------------------------------------------------------------------


def _provoke_acquire(netns: Namespace) -> w.AcquireInfo:
    """make_acquire plus a listener: the kernel keeps an ACQ state only if a
    key manager hears the ACQUIRE (km_query fails with no listener), so listen
    on XFRMNLGRP_ACQUIRE like a keying daemon does.  Returns the event."""
    listener = XfrmSocket(netns, groups=1 << (w.XFRMNLGRP_ACQUIRE - 1), rcvbuf=None)
    acquires = []
    try:
        make_acquire(netns)
        data = listener.recv_wait(5.0)
        assert data is not None, "no XFRM_MSG_ACQUIRE received"
        for kind, _, _, _, payload in w.iter_messages(data):
            if kind == w.XFRM_MSG_ACQUIRE:
                acquires.append(w.decode_acquire(payload))
    finally:
        listener.close()
    assert len(acquires) == 1
    return acquires[0]


def _acq_state(a: Allocator) -> spialloc.KernelState:
    assert wait_for(lambda: any(s.spi == 0 for s in a.states()), timeout=5)
    acq = [s for s in a.states() if s.spi == 0]
    assert len(acq) == 1
    return acq[0]


def test_allocate_with_acquire_seq_binds_to_the_acq_state(raw_alloc: Allocator, netns: Namespace) -> None:
    event = _provoke_acquire(netns)
    assert event.proto == w.IPPROTO_ESP and event.reqid == 7 and event.mode == w.XFRM_MODE_TUNNEL
    acq = _acq_state(raw_alloc)
    acq_seq = acq.acquire_seq
    assert acq_seq != 0
    assert acq_seq == event.seq
    assert (str(acq.dst), str(acq.src)) == ("10.99.0.2", "10.99.0.1")
    before = raw_alloc.states()

    r = raw_alloc.allocate("10.99.0.2", seq=acq_seq, src="10.99.0.1", mode="tunnel", reqid=7)
    assert 0xC0000000 <= r.spi <= 0xCFFFFFFF
    assert r.seq == acq_seq

    after = raw_alloc.states()
    assert len(after) == len(before) == 1  # no extra larval state
    st = after[0]
    assert st.acquire_seq == acq_seq
    assert st.spi == r.spi
    assert (str(st.dst), str(st.src), st.mode, st.reqid) == ("10.99.0.2", "10.99.0.1", Mode.TUNNEL, 7)
    assert sad_spis(netns) == {r.spi}


def test_reused_acquire_seq_raw_returns_the_same_spi(raw_alloc: Allocator, netns: Namespace) -> None:
    """Kernel behaviour the guard exists for: a second ALLOCSPI with the same
    ACQUIRE seq returns the SPI the ACQ state already has."""
    _provoke_acquire(netns)
    seq = _acq_state(raw_alloc).acquire_seq
    r1 = raw_alloc.allocate("10.99.0.2", seq=seq, src="10.99.0.1", mode="tunnel", reqid=7)
    r2 = raw_alloc.allocate("10.99.0.2", seq=seq, src="10.99.0.1", mode="tunnel", reqid=7)
    assert r1.spi == r2.spi
    assert sad_count(netns) == 1


def test_reused_acquire_seq_guarded_gets_a_fresh_spi(alloc: Allocator, netns: Namespace) -> None:
    _provoke_acquire(netns)
    seq = _acq_state(alloc).acquire_seq
    r1 = alloc.allocate("10.99.0.2", seq=seq, src="10.99.0.1", mode="tunnel", reqid=7)
    r2 = alloc.allocate("10.99.0.2", seq=seq, src="10.99.0.1", mode="tunnel", reqid=7)
    assert r1.spi != r2.spi
    by_spi = {s.spi: s for s in alloc.states()}
    assert set(by_spi) == {r1.spi, r2.spi}
    assert by_spi[r1.spi].acquire_seq == seq  # the ACQ state keeps the first SPI
    assert by_spi[r2.spi].acquire_seq == 0  # the retry made a plain larval state
    assert alloc.stats.collisions == 1


@pytest.mark.parametrize("guard", [True, False])
def test_refused_request_never_removes_the_kernels_acq_state(netns: Namespace, guard: bool) -> None:
    """A request without seq but with an ACQUIRE's parameters uses the
    kernel's ACQ state (SPI 0) and, refused, leaves it as it was.  The
    SPI-0 clean-up after a refusal must not take that state over and delete
    it: ALLOCSPI with the ACQUIRE's seq must still find it afterwards."""
    params = {"src": "10.99.0.1", "mode": "tunnel", "reqid": 7}
    _provoke_acquire(netns)
    with Allocator(netns, guard=False) as other, Allocator(netns, guard=guard) as alloc:
        seq = _acq_state(alloc).acquire_seq
        taken = other.allocate("10.99.0.2", spi_range=(0x4242, 0x4242), reqid=99)
        with pytest.raises(SpiExhausted):
            alloc.allocate("10.99.0.2", spi_range=(0x4242, 0x4242), **params)
        assert _acq_state(alloc).acquire_seq == seq  # still there, still SPI 0
        r = alloc.allocate("10.99.0.2", seq=seq, **params)
        by_spi = {st.spi: st for st in alloc.states()}
        assert set(by_spi) == {taken.spi, r.spi}
        assert by_spi[r.spi].acquire_seq == seq  # bound to the ACQUIRE


# --- namespaces ------------------------------------------------------------------------------


def test_allocator_on_named_netns(named_netns: str) -> None:
    name = named_netns
    with Allocator(name) as a:
        r = a.allocate("10.0.0.1")
        out = subprocess.run(
            ["ip", "-n", name, "xfrm", "state", "list"], check=True, capture_output=True, text=True, timeout=30
        ).stdout
        assert f"spi {r.spi:#010x}" in out
        assert a.states()[0].spi == r.spi
        assert a.release(r) == 1
        out = subprocess.run(
            ["ip", "-n", name, "xfrm", "state", "list"], check=True, capture_output=True, text=True, timeout=30
        ).stdout
        assert out.strip() == ""


def test_allocator_on_path(netns: Namespace) -> None:
    assert netns.fd is not None
    with Allocator(f"/proc/self/fd/{netns.fd}") as a:
        r = a.allocate("10.0.0.1")
        assert sad_spis(netns) == {r.spi}
        assert a.release(r) == 1
    assert sad_count(netns) == 0


def test_allocator_on_fd_and_namespace_object(netns: Namespace) -> None:
    assert netns.fd is not None
    with Allocator(netns.fd, guard=False) as by_fd, Allocator(netns, guard=False) as by_ns:
        r1 = by_fd.allocate("10.0.0.1")
        r2 = by_ns.allocate("10.0.0.1")
        assert sad_spis(netns) == {r1.spi, r2.spi}
    # the allocators duplicated the fd: the namespace handle is still usable
    assert sad_count(netns) == 2


def test_missing_named_netns_is_namespace_error_naming_it() -> None:
    name = f"spialloc-missing-{secrets.token_hex(4)}"
    with pytest.raises(NamespaceError) as info:
        Allocator(name)
    assert name in str(info.value)
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value, spialloc.SpiallocError)


def test_missing_path_is_namespace_error_naming_it() -> None:
    path = f"/run/netns/spialloc-missing-{secrets.token_hex(4)}/x"
    with pytest.raises(NamespaceError) as info:
        Allocator(path)
    assert path in str(info.value)


def test_direction_and_pcpu_are_probed_once_and_the_probe_leaves_nothing(netns: Namespace) -> None:
    """This kernel (6.10+ for SA_DIR, 6.13+ for SA_PCPU) keeps both: the
    first request that carries them is preceded by one probe ALLOCSPI whose
    state is deleted at once; afterwards only the caller's states exist and
    the kernel holds the attributes.  (Kernels that ignore them raise
    UnsupportedByKernel: the VM tier checks that on 6.1.)"""
    with Allocator(netns) as alloc:
        r = alloc.allocate("10.0.0.1", direction="in", pcpu=1)
        st = alloc.lookup("10.0.0.1", r.spi)
        assert st is not None and st.direction is Direction.IN
        assert [s.spi for s in alloc.states()] == [r.spi]  # the probe's state is gone
        before = alloc.core.kernel.sock.next_seq()
        r2 = alloc.allocate("10.0.0.1", direction="in", pcpu=1)
        assert alloc.core.kernel.sock.next_seq() == before + 2  # one ALLOCSPI, no second probe
        assert alloc.release([r, r2]) == 2
