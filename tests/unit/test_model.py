"""Validation (build_request, Allocator.allocate), defaults, Reservation and
KernelState.  No privileges and no syscalls: the Allocator here gets a fake
socket that fails the test if anything is ever sent."""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import pickle
import threading
import types
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import spialloc
from spialloc import _kernel as kernel_mod
from spialloc import _wire as w
from spialloc._model import (
    DEFAULT_CPI_RANGE,
    DEFAULT_SPI_RANGE,
    Direction,
    KernelState,
    Mode,
    Proto,
    Reservation,
    build_request,
    reservation_from,
)
from spialloc.errors import InvalidRequest

U32_MAX = 0xFFFFFFFF
HOST = __import__("sys").byteorder


class _Captured(Exception):
    """Raised by the fake socket in capture mode, carrying the request bytes."""

    def __init__(self, msg: bytes) -> None:
        super().__init__("captured")
        self.msg = msg


class _NoSyscallSocket:
    """Stands in for XfrmSocket: validation must fail before any I/O."""

    def __init__(self, ns, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.lock = threading.RLock()
        self.portid = 1
        self.sock = None
        self.capture = False

    def next_seq(self, count: int = 1) -> int:
        return 1

    def window(self) -> int:
        return 1

    def transact(self, msg, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.capture:
            raise _Captured(bytes(msg))
        raise AssertionError("a request reached the socket although it should have been rejected")

    allocspi = transact

    def dump(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("unexpected dump")

    def close(self) -> None:
        pass


@pytest.fixture(params=[False, True], ids=["unguarded", "guarded"])
def fake_alloc(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[spialloc.Allocator]:
    monkeypatch.setattr(kernel_mod, "XfrmSocket", _NoSyscallSocket)
    a = spialloc.Allocator(guard=request.param, watch_expiry=False, backend="python")
    try:
        yield a
    finally:
        a.close()


def _payload_u32(msg: bytes, off: int) -> int:
    return int.from_bytes(msg[16 + off : 16 + off + 4], HOST)


# --- bad arguments ------------------------------------------------------------------

# (kwargs, text that must appear in the message)
BAD_CASES: list[tuple[dict[str, object], str]] = [
    # ranges
    ({"spi_range": (0x2000, 0x1000)}, "0x2000"),
    ({"spi_range": (0x2000, 0x1000)}, "0x1000"),
    ({"spi_range": (5, 0x1000)}, "0x5"),
    ({"spi_range": (0, 0x1000)}, "0x0"),
    ({"spi_range": (255, 0x1000)}, "0xff"),
    ({"proto": "comp", "spi_range": (0x100, 0x10000)}, "0x10000"),
    ({"proto": "comp", "spi_range": (0x100, 0xFFFFFFFF)}, "0xffffffff"),
    ({"spi_range": (0, 0xFFFFFFFF)}, "0xffffffff"),
    ({"spi_range": (0, 0xFFFFFFFF), "allow_reserved": True}, "0xffffffff"),
    ({"spi_range": (0, 0)}, "max 0"),
    ({"spi_range": (0, 0), "allow_reserved": True}, "max 0"),
    ({"spi_range": (0x100, U32_MAX + 1)}, "4294967296"),
    ({"spi_range": (-1, 0x1000)}, "-1"),
    ({"spi_range": (1.5, 0x1000)}, "1.5"),
    ({"spi_range": (0x100, "0x200")}, "'0x200'"),
    ({"spi_range": (True, 0x1000)}, "True"),
    ({"spi_range": (0x100,)}, "(256,)"),
    ({"spi_range": (1, 2, 3)}, "(1, 2, 3)"),
    ({"spi_range": 0x1000}, "4096"),
    ({"spi_range": "0x100-0x200"}, "'0x100-0x200'"),
    # families and addresses
    ({"dst": "10.0.0.1", "src": "2001:db8::1"}, "2001:db8::1"),
    ({"dst": "2001:db8::1", "src": "10.0.0.1"}, "10.0.0.1"),
    ({"dst": "10.0.0.256"}, "10.0.0.256"),
    ({"dst": "not an address"}, "not an address"),
    ({"dst": ""}, "''"),
    ({"dst": None}, "None"),
    ({"dst": 167772161}, "167772161"),
    ({"dst": b"\n\0\0\1"}, "b'\\n\\x00\\x00\\x01'"),
    ({"src": "10.0.0.x"}, "10.0.0.x"),
    ({"dst": "10.0.0.1/24"}, "10.0.0.1/24"),
    # enums
    ({"proto": "gre"}, "'gre'"),
    ({"proto": 47}, "47"),
    ({"proto": True}, "True"),
    ({"proto": None}, "None"),
    ({"proto": 50.0}, "50.0"),
    ({"mode": "tunnnel"}, "'tunnnel'"),
    ({"mode": 9}, "9"),
    ({"mode": True}, "True"),
    ({"direction": "up"}, "'up'"),
    ({"direction": 0}, "0"),
    ({"direction": 3}, "3"),
    ({"direction": True}, "True"),
    # mark
    ({"mark": "5"}, "'5'"),
    ({"mark": 1.5}, "1.5"),
    ({"mark": True}, "True"),
    ({"mark": (1, 2, 3)}, "(1, 2, 3)"),
    ({"mark": [1, 2]}, "[1, 2]"),
    ({"mark": -1}, "-1"),
    ({"mark": U32_MAX + 1}, "4294967296"),
    ({"mark": (-1, 0xFF)}, "-1"),
    ({"mark": (1, U32_MAX + 1)}, "4294967296"),
    ({"mark": (1.0, 0xFF)}, "1.0"),
    ({"mark": (1, "ff")}, "'ff'"),
    ({"mark": (False, 0xFF)}, "False"),
]

for _field in ("reqid", "if_id", "seq", "pcpu"):
    for _bad, _text in (
        (-1, "-1"),
        (U32_MAX + 1, "4294967296"),
        (2**64, str(2**64)),
        (True, "True"),
        (False, "False"),
        (1.0, "1.0"),
        ("7", "'7'"),
        ([1], "[1]"),
    ):
        BAD_CASES.append(({_field: _bad}, _text))


def _call_build(kwargs: dict[str, object]):  # type: ignore[no-untyped-def]
    kw = dict(kwargs)
    dst = kw.pop("dst", "192.0.2.1")
    proto = kw.pop("proto", "esp")
    return build_request(dst, proto, **kw)  # type: ignore[arg-type]


def _case_id(case: tuple[dict[str, object], str]) -> str:
    return ",".join(f"{k}={v!r}" for k, v in case[0].items())[:60]


@pytest.mark.parametrize("case", BAD_CASES, ids=[_case_id(c) for c in BAD_CASES])
def test_build_request_bad_argument_is_invalid_request_naming_value(case) -> None:  # type: ignore[no-untyped-def]
    kwargs, text = case
    with pytest.raises(InvalidRequest) as info:
        _call_build(kwargs)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, spialloc.SpiallocError)
    assert text in str(info.value), f"{str(info.value)!r} does not name {text!r}"


# allow_reserved is an Allocator option, not an allocate() one: covered below
ALLOCATE_CASES = [c for c in BAD_CASES if "allow_reserved" not in c[0]]


@pytest.mark.parametrize("case", ALLOCATE_CASES, ids=[_case_id(c) for c in ALLOCATE_CASES])
def test_allocate_bad_argument_is_invalid_request_naming_value(fake_alloc, case) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(case[0])
    text = case[1]
    dst = kwargs.pop("dst", "192.0.2.1")
    proto = kwargs.pop("proto", "esp")
    with pytest.raises(InvalidRequest) as info:
        fake_alloc.allocate(dst, proto, **kwargs)
    assert isinstance(info.value, ValueError)
    assert text in str(info.value), f"{str(info.value)!r} does not name {text!r}"


def test_allocate_many_bad_argument_is_invalid_request(fake_alloc) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequest, match="0x2000"):
        fake_alloc.allocate_many(2, "192.0.2.1", spi_range=(0x2000, 0x1000))
    with pytest.raises(InvalidRequest, match="-1"):
        fake_alloc.allocate_many(-1, "192.0.2.1")
    with pytest.raises(InvalidRequest, match="seq"):
        fake_alloc.allocate_many(1, "192.0.2.1", seq=5)


def test_lookup_bad_spi_is_invalid_request(fake_alloc) -> None:  # type: ignore[no-untyped-def]
    for bad in (-1, U32_MAX + 1, True, "1"):
        with pytest.raises(InvalidRequest, match=repr(bad) if not isinstance(bad, str) else "'1'"):
            fake_alloc.lookup("192.0.2.1", bad)


@pytest.mark.parametrize("bad_spi", [U32_MAX + 1, -1, 2**64])
def test_release_out_of_range_spi_is_invalid_request(fake_alloc, bad_spi: int) -> None:  # type: ignore[no-untyped-def]
    """A Reservation built by hand (e.g. from CLI input) with an SPI that is not
    a u32 must be rejected as InvalidRequest naming it, not crash in struct.pack."""
    r = Reservation(
        spi=bad_spi, dst=ipaddress.ip_address("192.0.2.1"), src=ipaddress.ip_address("0.0.0.0"), proto=Proto.ESP
    )
    with pytest.raises(InvalidRequest) as info:
        fake_alloc.release(r)
    assert str(bad_spi) in str(info.value) or hex(bad_spi) in str(info.value)
    with pytest.raises(InvalidRequest):
        fake_alloc.release([r, r])


@pytest.mark.parametrize("bad_mark, text", [((1, U32_MAX + 1), "4294967296"), ((-1, 0xFF), "-1")])
def test_release_out_of_range_mark_is_invalid_request(fake_alloc, bad_mark, text: str) -> None:  # type: ignore[no-untyped-def]
    r = Reservation(
        spi=0xC0000001,
        dst=ipaddress.ip_address("192.0.2.1"),
        src=ipaddress.ip_address("0.0.0.0"),
        proto=Proto.ESP,
        mark=bad_mark,
    )
    with pytest.raises(InvalidRequest) as info:
        fake_alloc.release(r)
    assert text in str(info.value)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"spi_range": (0x2000, 0x1000)}, "0x2000"),
        ({"spi_range": (5, 0x1000)}, "0x5"),
        ({"cpi_range": (0x100, 0x10000)}, "0x10000"),
        ({"spi_range": (0, 0xFFFFFFFF)}, "0xffffffff"),
        ({"max_retries": -1}, "-1"),
        ({"guard": "yes"}, "'yes'"),
    ],
)
def test_allocator_constructor_bad_argument_is_invalid_request(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, object], text: str
) -> None:
    monkeypatch.setattr(kernel_mod, "XfrmSocket", _NoSyscallSocket)
    with pytest.raises(InvalidRequest) as info:
        spialloc.Allocator(watch_expiry=False, backend="python", **kwargs)  # type: ignore[arg-type]
    assert text in str(info.value)


def _sent_range(a: spialloc.Allocator, *args: object, **kwargs: object) -> tuple[int, int]:
    """The (min, max) of the ALLOCSPI message allocate() would send."""
    a.core.kernel.sock.capture = True  # type: ignore[attr-defined]
    with pytest.raises(_Captured) as info:
        a.allocate(*args, **kwargs)  # type: ignore[arg-type]
    msg = info.value.msg
    assert int.from_bytes(msg[4:6], HOST) == w.XFRM_MSG_ALLOCSPI
    return _payload_u32(msg, 224), _payload_u32(msg, 228)


def test_allocator_allow_reserved_accepts_low_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_mod, "XfrmSocket", _NoSyscallSocket)
    with spialloc.Allocator(guard=False, watch_expiry=False, backend="python", allow_reserved=True) as a:
        assert _sent_range(a, "192.0.2.1", spi_range=(1, 255)) == (1, 255)
        assert _sent_range(a, "192.0.2.1", spi_range=(0, 255)) == (1, 255)


# --- accepted arguments --------------------------------------------------------------


@pytest.mark.parametrize("lo, hi", [(1, 255), (0, 0x10), (5, 5), (1, 1)])
def test_reserved_range_accepted_with_allow_reserved(lo: int, hi: int) -> None:
    req = build_request("192.0.2.1", spi_range=(lo, hi), allow_reserved=True)
    assert (req.spi_min, req.spi_max) == (max(lo, 1), hi)  # SPI 0 is never asked for
    msg = req.message(1)
    assert (_payload_u32(msg, 224), _payload_u32(msg, 228)) == (max(lo, 1), hi)


def test_lowest_non_reserved_range_accepted() -> None:
    req = build_request("192.0.2.1", spi_range=(256, 256))
    assert (req.spi_min, req.spi_max) == (256, 256)


def test_full_u32_range_from_one_accepted() -> None:
    req = build_request("192.0.2.1", spi_range=(1, U32_MAX), allow_reserved=True)
    assert (req.spi_min, req.spi_max) == (1, U32_MAX)


def test_range_object_and_list_accepted() -> None:
    assert (build_request("192.0.2.1", spi_range=range(0x1000, 0x2001)).spi_max) == 0x2000
    assert (build_request("192.0.2.1", spi_range=[0x1000, 0x2000]).spi_min) == 0x1000
    with pytest.raises(InvalidRequest, match="step"):
        build_request("192.0.2.1", spi_range=range(0x1000, 0x2000, 2))


def test_ipcomp_max_0xffff_accepted() -> None:
    req = build_request("192.0.2.1", "comp", spi_range=(0x100, 0xFFFF))
    assert req.spi_max == 0xFFFF


@pytest.mark.parametrize("proto", ["esp", "ah", Proto.ESP, 50, 51])
def test_default_range_esp_ah(proto: object) -> None:
    req = build_request("192.0.2.1", proto)
    assert (req.spi_min, req.spi_max) == (0xC0000000, 0xCFFFFFFF) == DEFAULT_SPI_RANGE
    msg = req.message(1)
    assert (_payload_u32(msg, 224), _payload_u32(msg, 228)) == (0xC0000000, 0xCFFFFFFF)


@pytest.mark.parametrize("proto", ["comp", "ipcomp", Proto.COMP, 108])
def test_default_range_ipcomp(proto: object) -> None:
    req = build_request("192.0.2.1", proto)
    assert (req.spi_min, req.spi_max) == (0x100, 0xEFFF) == DEFAULT_CPI_RANGE


def test_public_default_constants() -> None:
    assert spialloc.DEFAULT_SPI_RANGE == (0xC0000000, 0xCFFFFFFF)
    assert spialloc.DEFAULT_CPI_RANGE == (0x100, 0xEFFF)


def test_allocator_default_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_mod, "XfrmSocket", _NoSyscallSocket)
    with spialloc.Allocator(guard=False, watch_expiry=False, backend="python") as a:
        for proto, rng in (("esp", DEFAULT_SPI_RANGE), ("ah", DEFAULT_SPI_RANGE), ("comp", DEFAULT_CPI_RANGE)):
            assert _sent_range(a, "192.0.2.1", proto) == rng


def test_allocator_configured_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_mod, "XfrmSocket", _NoSyscallSocket)
    with spialloc.Allocator(
        guard=False, watch_expiry=False, backend="python", spi_range=(0x1000, 0x1FFF), cpi_range=(0x200, 0x2FF)
    ) as a:
        assert _sent_range(a, "192.0.2.1", "esp") == (0x1000, 0x1FFF)
        assert _sent_range(a, "192.0.2.1", "ah") == (0x1000, 0x1FFF)
        assert _sent_range(a, "192.0.2.1", "comp") == (0x200, 0x2FF)
        assert _sent_range(a, "192.0.2.1", "esp", spi_range=(0x5000, 0x6000)) == (0x5000, 0x6000)


@pytest.mark.parametrize(
    "given_proto, expected",
    [
        ("esp", Proto.ESP),
        ("ESP", Proto.ESP),
        ("Esp", Proto.ESP),
        ("ah", Proto.AH),
        ("AH", Proto.AH),
        ("comp", Proto.COMP),
        ("COMP", Proto.COMP),
        ("ipcomp", Proto.COMP),
        ("IPComp", Proto.COMP),
        (Proto.ESP, Proto.ESP),
        (Proto.AH, Proto.AH),
        (Proto.COMP, Proto.COMP),
        (50, Proto.ESP),
        (51, Proto.AH),
        (108, Proto.COMP),
    ],
)
def test_proto_spellings(given_proto: object, expected: Proto) -> None:
    req = build_request("192.0.2.1", given_proto)
    assert req.proto is expected
    assert req.message(1)[16 + 76] == int(expected)


@pytest.mark.parametrize(
    "mode, expected",
    [("transport", 0), ("TUNNEL", 1), ("ro", 2), ("in_trigger", 3), ("beet", 4), (Mode.TUNNEL, 1), (4, 4)],
)
def test_mode_spellings(mode: object, expected: int) -> None:
    req = build_request("192.0.2.1", mode=mode)
    assert req.mode == expected
    assert req.message(1)[16 + 214] == expected


@pytest.mark.parametrize("direction, expected", [("in", 1), ("OUT", 2), (Direction.IN, 1), (2, 2), (None, None)])
def test_direction_spellings(direction: object, expected: int | None) -> None:
    req = build_request("192.0.2.1", direction=direction)
    assert req.direction == expected
    kinds = dict((k, bytes(v)) for k, v in w.iter_attrs(req.attrs))
    if expected is None:
        assert 33 not in kinds
    else:
        assert kinds[33] == bytes([expected])


def test_mark_int_means_full_mask() -> None:
    assert build_request("192.0.2.1", mark=7).mark == (7, U32_MAX)
    assert build_request("192.0.2.1", mark=(7, 0xF)).mark == (7, 0xF)


def test_u32_boundaries_accepted() -> None:
    req = build_request("192.0.2.1", reqid=U32_MAX, if_id=0, seq=U32_MAX, pcpu=0, mark=(U32_MAX, 0))
    assert (req.reqid, req.if_id, req.seq, req.pcpu, req.mark) == (U32_MAX, 0, U32_MAX, 0, (U32_MAX, 0))


def test_ipaddress_objects_accepted() -> None:
    req = build_request(ipaddress.IPv6Address("2001:db8::1"), src=ipaddress.IPv6Address("2001:db8::2"))
    assert req.family == w.AF_INET6
    assert req.src == ipaddress.IPv6Address("2001:db8::2")


def test_src_defaults_to_unspecified_of_dst_family() -> None:
    assert build_request("192.0.2.1").src == ipaddress.IPv4Address("0.0.0.0")
    assert build_request("2001:db8::1").src == ipaddress.IPv6Address("::")


# --- properties ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.integers(256, U32_MAX).flatmap(lambda lo: st.tuples(st.just(lo), st.integers(lo, U32_MAX))),
    st.sampled_from(["esp", "ah"]),
)
def test_valid_range_round_trips_into_message_bytes(rng: tuple[int, int], proto: str) -> None:
    lo, hi = rng
    msg = build_request("192.0.2.1", proto, spi_range=(lo, hi)).message(1)
    assert msg[16 + 224 : 16 + 228] == lo.to_bytes(4, HOST)
    assert msg[16 + 228 : 16 + 232] == hi.to_bytes(4, HOST)


@settings(max_examples=200, deadline=None)
@given(st.integers(256, 0xFFFF).flatmap(lambda lo: st.tuples(st.just(lo), st.integers(lo, 0xFFFF))))
def test_valid_cpi_range_round_trips_into_message_bytes(rng: tuple[int, int]) -> None:
    lo, hi = rng
    msg = build_request("2001:db8::1", "comp", spi_range=(lo, hi)).message(1)
    assert (_payload_u32(msg, 224), _payload_u32(msg, 228)) == (lo, hi)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(-(2**33), 2**33), st.integers(-(2**33), 2**33), st.sampled_from(["esp", "ah", "comp"]), st.booleans()
)
def test_any_range_is_accepted_exactly_when_valid(lo: int, hi: int, proto: str, allow_reserved: bool) -> None:
    valid = (
        0 <= lo <= hi <= U32_MAX
        and hi != 0
        and (proto != "comp" or hi <= 0xFFFF)
        and (lo, hi) != (0, U32_MAX)
        and (allow_reserved or lo > 255)
    )
    try:
        req = build_request("192.0.2.1", proto, spi_range=(lo, hi), allow_reserved=allow_reserved)
    except InvalidRequest:
        assert not valid
    else:
        assert valid
        assert (req.spi_min, req.spi_max) == (max(lo, 1), hi)


# --- Reservation and KernelState ---------------------------------------------------------


def _reservation(**kw: object) -> Reservation:
    base: dict[str, object] = dict(
        spi=0xC0000001,
        dst=ipaddress.ip_address("192.0.2.1"),
        src=ipaddress.ip_address("192.0.2.2"),
        proto=Proto.ESP,
        mode=Mode.TUNNEL,
        reqid=3,
        mark=(1, 0xFF),
        if_id=4,
        direction=Direction.OUT,
        seq=0,
    )
    base.update(kw)
    return Reservation(**base)  # type: ignore[arg-type]


def test_reservation_is_frozen() -> None:
    r = _reservation()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.spi = 5  # type: ignore[misc]
    with pytest.raises((dataclasses.FrozenInstanceError, AttributeError, TypeError)):
        r.extra = 1  # type: ignore[attr-defined]


def test_reservation_is_hashable_and_equality_ignores_time() -> None:
    a = _reservation(allocated_at=1.0)
    b = _reservation(allocated_at=2.0)
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, _reservation(spi=0xC0000002)}) == 2
    assert {a: "x"}[b] == "x"


def test_reservation_key_family_str_and_pickle() -> None:
    r4 = _reservation()
    assert r4.family == w.AF_INET
    assert r4.key == (b"\0" * 10 + b"\xff\xff" + bytes([192, 0, 2, 1]), 50, 0xC0000001)
    assert str(r4) == "esp spi 0xc0000001 dst 192.0.2.1"
    r6 = _reservation(dst=ipaddress.ip_address("2001:db8::1"), src=ipaddress.ip_address("::"))
    assert r6.family == w.AF_INET6
    assert pickle.loads(pickle.dumps(r6)) == r6


def test_reservation_from_request_keeps_everything() -> None:
    req = build_request(
        "192.0.2.1", "ah", src="192.0.2.2", mode="tunnel", reqid=3, mark=(1, 0xFF), if_id=4, direction="out", seq=9
    )
    r = reservation_from(req, 0x1234)
    assert (r.spi, str(r.dst), str(r.src), r.proto, r.mode, r.reqid, r.mark, r.if_id, r.direction, r.seq) == (
        0x1234,
        "192.0.2.1",
        "192.0.2.2",
        Proto.AH,
        Mode.TUNNEL,
        3,
        (1, 0xFF),
        4,
        Direction.OUT,
        9,
    )


def _sa_info(**kw: object) -> w.SaInfo:
    base: dict[str, object] = dict(
        family=w.AF_INET6,
        daddr=ipaddress.ip_address("2001:db8::1").packed,
        saddr=ipaddress.ip_address("2001:db8::2").packed,
        spi=0xC0000042,
        proto=50,
        mode=1,
        reqid=7,
        seq=11,
        flags=0,
        add_time=1_700_000_000,
        mark=(5, 0xFF),
        if_id=6,
        direction=2,
        pcpu=None,
        larval=True,
    )
    base.update(kw)
    return w.SaInfo(**base)  # type: ignore[arg-type]


def test_kernel_state_from_wire() -> None:
    ks = KernelState.from_wire(_sa_info())
    assert ks.spi == 0xC0000042
    assert ks.dst == ipaddress.ip_address("2001:db8::1")
    assert ks.src == ipaddress.ip_address("2001:db8::2")
    assert ks.proto is Proto.ESP
    assert ks.mode is Mode.TUNNEL
    assert (ks.reqid, ks.mark, ks.if_id, ks.direction, ks.acquire_seq, ks.larval, ks.added) == (
        7,
        (5, 0xFF),
        6,
        Direction.OUT,
        11,
        True,
        1_700_000_000,
    )


def test_kernel_state_from_wire_ipv4_and_unknown_values() -> None:
    ks = KernelState.from_wire(
        _sa_info(
            family=w.AF_INET,
            daddr=bytes([10, 0, 0, 1]) + b"\0" * 12,
            saddr=b"\0" * 16,
            proto=43,
            mode=9,
            direction=7,
            mark=None,
            if_id=None,
            larval=False,
        )
    )
    assert ks.dst == ipaddress.IPv4Address("10.0.0.1")
    assert ks.src == ipaddress.IPv4Address("0.0.0.0")
    assert ks.proto == 43 and not isinstance(ks.proto, Proto)
    assert ks.mode == 9
    assert ks.direction is None
    assert ks.larval is False


def test_kernel_state_reservation_round_trip() -> None:
    ks = KernelState.from_wire(_sa_info())
    r = ks.reservation()
    assert (r.spi, r.dst, r.src, r.proto, r.mode, r.reqid, r.mark, r.if_id, r.direction, r.seq) == (
        ks.spi,
        ks.dst,
        ks.src,
        Proto.ESP,
        Mode.TUNNEL,
        7,
        (5, 0xFF),
        6,
        Direction.OUT,
        11,
    )
    assert r.allocated_at == 1_700_000_000.0


@pytest.mark.parametrize("dst, src", [("192.0.2.1", "192.0.2.2"), ("2001:db8::1", "2001:db8::2")])
def test_request_bytes_decode_back_to_the_same_state(dst: str, src: str) -> None:
    """Encode a request, give it an SPI the way the kernel does, decode it as a
    NEWSA payload: KernelState carries every field we asked for."""
    req = build_request(
        dst, "ah", src=src, mode="tunnel", reqid=0x77, mark=(0x10, 0xF0), if_id=0x2A, direction="in", seq=5
    )
    payload = bytearray(req.message(1)[16:])
    payload[72:76] = (0xC0000099).to_bytes(4, "big")
    as_newsa = bytes(payload[:224]) + bytes(payload[232:])  # usersa_info + attributes
    ks = KernelState.from_wire(w.decode_sa(memoryview(as_newsa)))
    assert ks.spi == 0xC0000099
    assert (ks.dst, ks.src) == (req.dst, req.src)
    assert ks.proto is Proto.AH
    assert ks.mode is Mode.TUNNEL
    assert (ks.reqid, ks.mark, ks.if_id, ks.direction, ks.acquire_seq) == (0x77, (0x10, 0xF0), 0x2A, Direction.IN, 5)
    assert ks.reservation() == reservation_from(req, 0xC0000099)


def test_allocate_hands_every_option_on_by_name() -> None:
    """``allocate(dst, **options)`` calls the documented signature with each
    option named (not through ``**``, see the wrapper), so each one must
    arrive, and the ones not given at the signature's defaults."""
    seen: dict[str, object] = {}

    def capture(dst: object, proto: object = "esp", **kw: object) -> str:
        seen.update(kw, dst=dst, proto=proto)
        return "r"

    defaults = spialloc.Allocator._OPTION_DEFAULTS
    fake = types.SimpleNamespace(_OPTION_DEFAULTS=defaults, _allocate_options=capture)
    given = {k: object() for k in defaults}
    assert spialloc.Allocator.allocate(fake, "10.0.0.1", "ah", **given) == "r"  # type: ignore[arg-type]
    assert seen == {**given, "dst": "10.0.0.1", "proto": "ah"}
    seen.clear()
    spialloc.Allocator.allocate(fake, "10.0.0.2", reqid=7)  # type: ignore[arg-type]
    assert seen == {**defaults, "reqid": 7, "dst": "10.0.0.2", "proto": "esp"}
    seen.clear()
    spialloc.Allocator.allocate(fake, "10.0.0.1", nosuch=1)  # type: ignore[arg-type, call-arg]
    assert seen == {"nosuch": 1, "dst": "10.0.0.1", "proto": "esp"}  # as given: the signature's TypeError


def test_allocate_shows_the_documented_signature() -> None:
    params = inspect.signature(spialloc.Allocator.allocate).parameters
    assert list(params)[:3] == ["self", "dst", "proto"]
    assert {k: params[k].default for k in list(params)[3:]} == spialloc.Allocator._OPTION_DEFAULTS
