"""What the booted kernel does with the attributes newer than some kernels:
XFRMA_SA_DIR (direction, 6.10) and XFRMA_SA_PCPU (per-CPU SAs, 6.13).

What each kernel does is expected from its version (conftest.FEATURES_SEEN;
an unlisted kernel fails): where it has the attribute, the state keeps it
(read back through spialloc's lookup and a raw GETSA, for what KernelState
does not carry); where it does not, spialloc refuses with
UnsupportedByKernel naming the attribute and the Linux version that has it.
The runner prints the facts per kernel.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
from typing import Iterator

import pytest
from conftest import FEATURE_SINCE

import spialloc

NETLINK_XFRM = 6
XFRM_MSG_NEWSA, XFRM_MSG_GETSA = 16, 18
XFRMA_SA_DIR, XFRMA_SA_PCPU = 33, 35
NLMSG_ERROR = 2
DST, SRC = "192.0.2.10", "192.0.2.20"


def raw_attrs(ns: spialloc.Namespace, dst: str, spi: int, proto: int = 50) -> dict[int, bytes] | str:
    """GETSA by hand: the reply's attributes {type: payload}, or an error."""
    sock = ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    with sock:
        sock.bind((0, 0))
        said = ipaddress.ip_address(dst).packed.ljust(16, b"\0") + struct.pack("!I", spi)
        said += struct.pack("=HBx", socket.AF_INET, proto)
        sock.send(struct.pack("=IHHII", 16 + len(said), XFRM_MSG_GETSA, 1, 1, 0) + said)
        data = sock.recv(65536)
    length, kind = struct.unpack_from("=IH", data)
    if kind == NLMSG_ERROR:
        return f"error {-struct.unpack_from('=i', data, 16)[0]}"
    assert kind == XFRM_MSG_NEWSA, kind
    attrs, off = {}, 16 + 224
    while off + 4 <= length:
        alen, atype = struct.unpack_from("=HH", data, off)
        if alen < 4:
            break
        attrs[atype & 0x3FFF] = bytes(data[off + 4 : off + alen])
        off += (alen + 3) & ~3
    return attrs


@pytest.fixture
def netns() -> Iterator[spialloc.Namespace]:
    ns = spialloc.Namespace.isolated()
    try:
        yield ns
    finally:
        ns.close()


def refused_as_expected(exc: pytest.ExceptionInfo[spialloc.UnsupportedByKernel], attr: str, field: str) -> None:
    """The refusal names the attribute and the Linux version that has it."""
    text = str(exc.value)
    assert attr in text and f"needs Linux {FEATURE_SINCE[field]}" in text, text


@pytest.mark.parametrize("direction", ["in", "out"])
def test_direction_kept_or_refused(  # type: ignore[no-untyped-def]
    netns: spialloc.Namespace, direction: str, features: dict[str, bool], facts
) -> None:
    """SA_DIR: kept where this kernel is known to keep it; elsewhere spialloc
    refuses with UnsupportedByKernel instead of a state without direction,
    and its probe leaves nothing behind."""
    with spialloc.Allocator(netns, guard=False) as alloc:
        if not features["direction"]:
            with pytest.raises(spialloc.UnsupportedByKernel) as exc:
                alloc.allocate(DST, src=SRC, direction=direction)
            refused_as_expected(exc, "XFRMA_SA_DIR", "direction")
            assert alloc.states() == []
            facts.record(f"direction={direction}", "refused: UnsupportedByKernel")
            return
        r = alloc.allocate(DST, src=SRC, direction=direction)
        state = alloc.lookup(DST, r.spi)
        assert state is not None and state.direction is not None
        assert state.direction.name.lower() == direction
        raw = raw_attrs(netns, DST, r.spi)
        assert isinstance(raw, dict) and raw.get(XFRMA_SA_DIR) == bytes((1 if direction == "in" else 2,)), raw
        facts.record(f"direction={direction}", "kept")


def test_pcpu_kept_or_refused(netns: spialloc.Namespace, features: dict[str, bool], facts) -> None:  # type: ignore[no-untyped-def]
    with spialloc.Allocator(netns, guard=False) as alloc:
        if not features["pcpu"]:
            with pytest.raises(spialloc.UnsupportedByKernel) as exc:
                alloc.allocate(DST, src=SRC, pcpu=1)
            refused_as_expected(exc, "XFRMA_SA_PCPU", "pcpu")
            assert alloc.states() == []
            facts.record("pcpu=1", "refused: UnsupportedByKernel")
            return
        r = alloc.allocate(DST, src=SRC, pcpu=1)
        raw = raw_attrs(netns, DST, r.spi)
        assert isinstance(raw, dict) and XFRMA_SA_PCPU in raw, raw
        assert struct.unpack("=I", raw[XFRMA_SA_PCPU])[0] == 1
        facts.record("pcpu=1", "kept")


def test_updsa_without_direction_on_direction_in_larval(features: dict[str, bool], facts) -> None:  # type: ignore[no-untyped-def]
    """A larval state allocated with direction="in", keyed by an UPDSA that
    carries no direction (ip(8) here may not know `dir`): every kernel with
    SA_DIR seen so far takes it, so a daemon need not learn SA_DIR to key
    spialloc's directed SPIs."""
    name = "spialloc-vm-dir"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with spialloc.Allocator(name, guard=False) as alloc:
            if not features["direction"]:  # no such larval state can be made here
                with pytest.raises(spialloc.UnsupportedByKernel):
                    alloc.allocate(DST, src=SRC, direction="in")
                facts.record("updsa_without_dir_on_direction_in_larval", "n/a: no SA_DIR")
                return
            r = alloc.allocate(DST, src=SRC, direction="in")
            out = subprocess.run(
                ["ip", "-n", name, "xfrm", "state", "update", "src", SRC, "dst", DST, "proto", "esp",
                 "spi", f"{r.spi:#x}", "aead", "rfc4106(gcm(aes))", "0x" + "11" * 20, "128"],
                capture_output=True, text=True,
            )  # fmt: skip
            result = "accepted" if out.returncode == 0 else f"refused: {out.stderr.strip()}"
            facts.record("updsa_without_dir_on_direction_in_larval", result)
            assert out.returncode == 0, out.stderr
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
