"""ACQUIRE decoding: every field the kernel's build_acquire() sends, from
ACQUIREs captured in a fresh namespace (fuzz/capture_corpus.py, which the
fuzzers also read) and, for what this machine's kernel cannot make (xfrm
interfaces, per-CPU states, security contexts, offload), from bytes laid
out as build_acquire() lays them out."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

import pytest

from spialloc import INF, Acquire, Lifetime, Mode, Proto
from spialloc import _wire as w
from spialloc.monitor import decode_event

EVENTS = Path(__file__).resolve().parents[2] / "fuzz" / "corpus" / "events"


def acquire(name: str) -> Acquire:
    data = (EVENTS / name).read_bytes()
    ((kind, _, _, _, payload),) = list(w.iter_messages(data))
    ev = decode_event(kind, payload)
    assert isinstance(ev, Acquire)
    return ev


def test_marked_tunnel_policy() -> None:
    """`ip xfrm policy add ... dir out mark 0x70 mask 0xf0 tmpl ... esp mode
    tunnel reqid 7`, triggered by a datagram with SO_MARK 0x75."""
    ev = acquire("acquire_mark_tunnel.bin")
    assert ev.seq == 525
    assert (ev.dst, ev.src) == (ipaddress.ip_address("10.98.0.2"), ipaddress.ip_address("10.98.0.1"))
    assert (ev.proto, ev.reqid, ev.mode) == (Proto.ESP, 7, Mode.TUNNEL)
    assert ev.mark == (0x70, 0xF0)  # the policy's, which ALLOCSPI needs to find the ACQ state
    assert ev.if_id is None and ev.pcpu is None
    assert ev.selector.proto == 17 and ev.selector.dport == 9 and ev.selector.prefixlen_d == 32
    assert ev.policy is not None
    assert ev.policy.index & 7 == 1  # a generated index: direction out in the low bits
    assert ev.policy.dir == 1 and ev.policy.type == 0 and ev.policy.priority == 0
    assert str(ev.policy.selector) == "src 10.98.0.1/32 dst 10.98.0.2/32"
    assert ev.policy.lifetime == Lifetime()  # no limits
    assert ev.policy.lifetime.hard_bytes == INF
    (t,) = ev.templates
    assert (t.dst, t.src, t.proto, t.reqid, t.mode, t.optional) == (ev.dst, ev.src, Proto.ESP, 7, Mode.TUNNEL, False)
    assert ev.aalgos == ev.ealgos == ev.calgos == 0xFFFFFFFF
    assert ev.security_context is None and ev.offload is None


def test_ipv6_transport_policy_keeps_transport_mode() -> None:
    """Mode.TRANSPORT is 0: it must come through as TRANSPORT, not as "no mode"."""
    ev = acquire("acquire_v6_transport.bin")
    assert ev.mode is Mode.TRANSPORT
    assert (ev.dst, ev.src) == (ipaddress.ip_address("fd00:98::2"), ipaddress.ip_address("fd00:98::1"))
    assert ev.reqid == 9 and ev.mark is None
    assert ev.policy is not None
    assert (ev.policy.index, ev.policy.priority) == (0x4449, 100)  # an index given by the user is kept
    assert ev.policy.selector.proto == 17
    (t,) = ev.templates
    assert t.dst == ipaddress.ip_address("::")  # transport: the packet's own addresses


def test_bundle_binds_the_missing_sa_template() -> None:
    """AH+ESP: the ACQUIRE is for the first SA missing (AH); reqid and mode
    come from that template, not blindly from the first one."""
    ev = acquire("acquire_bundle.bin")
    assert ev.proto is Proto.AH
    assert [(t.proto, t.reqid) for t in ev.templates] == [(Proto.AH, 11), (Proto.ESP, 12)]
    assert (ev.reqid, ev.mode) == (11, Mode.TRANSPORT)


def synthetic(attrs: bytes, proto: int = w.IPPROTO_ESP) -> bytes:
    """An IPv4 ACQUIRE as build_acquire() lays it out, with ``attrs`` after it."""
    p = bytearray(w.XFRM_USER_ACQUIRE_LEN)
    dst, src = ipaddress.ip_address("192.0.2.2").packed, ipaddress.ip_address("192.0.2.1").packed
    w._SA_HEAD.pack_into(p, w.ACQ_ID, dst.ljust(16, b"\0"), bytes(4), proto, src.ljust(16, b"\0"))
    struct.pack_into("=H", p, w.ACQ_SEL + 40, w.AF_INET)
    struct.pack_into("=IIBBBB", p, w.ACQ_POLICY + w.POL_PRIORITY, 5, 0x1239, 1, 0, 0, 0)
    struct.pack_into("=III", p, w.ACQ_ALGOS, 1, 2, 3)
    w.U32.pack_into(p, w.ACQ_SEQ, 99)
    return bytes(p) + attrs


def tmpl(proto: int, reqid: int, mode: int, family: int = w.AF_INET, optional: int = 0) -> bytes:
    t = bytearray(w.XFRM_USER_TMPL_LEN)
    t[20] = proto
    w.U16.pack_into(t, w.TMPL_FAMILY, family)
    w.U32.pack_into(t, w.TMPL_REQID, reqid)
    t[w.TMPL_MODE] = mode
    t[50] = optional
    struct.pack_into("=III", t, 52, 7, 8, 9)
    return bytes(t)


def test_every_attribute_build_acquire_sends() -> None:
    ctx = b"system_u:system_r:ipsec_spd_t:s0"
    sec = struct.pack("=HHBBH", 8 + len(ctx), 1, 1, 1, len(ctx)) + ctx
    attrs = (
        w.attr(w.XFRMA_TMPL, tmpl(51, 3, 0, optional=1) + tmpl(50, 4, 1))
        + w.attr(w.XFRMA_SEC_CTX, sec)
        + w.attr(w.XFRMA_POLICY_TYPE, bytes([1, 0, 0, 0]))
        + w.attr(w.XFRMA_MARK, struct.pack("=II", 5, 0xFF))
        + w.attr(w.XFRMA_IF_ID, struct.pack("=I", 42))
        + w.attr(w.XFRMA_OFFLOAD_DEV, struct.pack("=iB3x", 7, 2))
        + w.attr(w.XFRMA_SA_PCPU, struct.pack("=I", 1))
    )
    payload = memoryview(synthetic(attrs))
    ev = decode_event(w.XFRM_MSG_ACQUIRE, payload)
    assert isinstance(ev, Acquire)
    assert (ev.seq, ev.mark, ev.if_id, ev.pcpu) == (99, (5, 0xFF), 42, 1)
    assert ev.security_context == ctx and ev.offload == (7, 2)
    assert ev.policy is not None and (ev.policy.index, ev.policy.priority, ev.policy.type) == (0x1239, 5, 1)
    assert (ev.aalgos, ev.ealgos, ev.calgos) == (1, 2, 3)
    # the ESP state's template, second in the bundle
    assert (ev.proto, ev.reqid, ev.mode) == (Proto.ESP, 4, Mode.TUNNEL)
    assert ev.templates[0].optional is True and ev.templates[0].proto is Proto.AH
    assert (ev.templates[1].aalgos, ev.templates[1].ealgos, ev.templates[1].calgos) == (7, 8, 9)


def test_acquire_without_template_has_no_mode() -> None:
    ev = decode_event(w.XFRM_MSG_ACQUIRE, memoryview(synthetic(b"")))
    assert isinstance(ev, Acquire)
    assert ev.mode is None and ev.templates == () and ev.reqid == 0


@pytest.mark.parametrize("cut", [0, 1, w.XFRM_USER_ACQUIRE_LEN - 1])
def test_short_acquire_is_a_decode_error(cut: int) -> None:
    from spialloc import DecodeError

    with pytest.raises(DecodeError):
        decode_event(w.XFRM_MSG_ACQUIRE, memoryview(synthetic(b"")[:cut]))
