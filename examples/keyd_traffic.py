#!/usr/bin/env python3
"""keyd_traffic: spialloc's SPIs carrying real IPsec traffic (run as root, on a
kernel with the transforms: not this project's 6.18 host; the VM tier runs it).

Two throwaway namespaces (``ip netns``) on a veth pair play two keying
daemons that have finished negotiating.  Each side allocates its INBOUND SPI
with spialloc in its own namespace (a larval state), then installs the keys
on that very state with UPDSA (``ip xfrm state update``) and commits the
reservation; the peer installs the matching outbound SA (``ip xfrm state
add``); policies go both ways.  Then ping, and read the counters of exactly
those SPIs back from the kernel.

    python examples/keyd_traffic.py                          # ESP, transport, IPv4
    python examples/keyd_traffic.py --proto ah --mode tunnel --family 6
    python examples/keyd_traffic.py --proto comp             # an IPComp CPI

Output is one ``key=value`` record per line; the last line is ``result=ok``
(exit 0) or ``result=FAILED ...`` (exit 1).
"""

from __future__ import annotations

import argparse
import platform
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass, field

import spialloc

ADDRS = {4: ("10.99.1.1", "10.99.1.2", 24), 6: ("fd00:99:1::1", "fd00:99:1::2", 64)}
REQID = {"a": 0x11, "b": 0x22}


def say(text: str) -> None:
    print(text, flush=True)


def algorithm(proto: str) -> str:
    """ip-xfrm arguments for fresh keys: one per SA, as IKE would derive them."""
    if proto == "esp":  # AES-GCM-128: 16 key bytes + 4 salt bytes, 128-bit ICV (KERNEL.md)
        return f"aead rfc4106(gcm(aes)) 0x{secrets.token_hex(20)} 128"
    if proto == "ah":
        return f"auth-trunc hmac(sha256) 0x{secrets.token_hex(32)} 128"
    if proto == "comp":
        return "comp deflate"
    raise ValueError(f"proto {proto!r}")


def run(argv: list[str], script: str | None = None) -> str:
    out = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        what = " ".join(argv) + (f" <<{script!r}" if script else "")
        raise RuntimeError(f"{what}: exit {out.returncode}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def ip_batch(lines: list[str], netns: str | None = None, force: bool = False) -> str:
    """Many ip(8) commands in one process (``ip -batch``): starting processes
    is what costs most in a slow VM.  Stops at the first error unless force."""
    argv = ["ip", *(["-n", netns] if netns else []), *(["-force"] if force else []), "-batch", "-"]
    return run(argv, "\n".join(lines) + "\n")


@dataclass
class Side:
    name: str  # "a" or "b"
    netns: str  # its `ip netns` name
    addr: str
    reservation: spialloc.Reservation | None = None  # its inbound SPI

    def ip(self, *lines: str) -> str:
        return ip_batch(list(lines), self.netns)


@dataclass
class Link:
    """Two namespaces, a veth pair, and one SA each way on spialloc's SPIs."""

    proto: str = "esp"
    mode: str = "transport"
    family: int = 4
    sides: list[Side] = field(default_factory=list)

    def __post_init__(self) -> None:
        tag = secrets.token_hex(3)
        a, b, _ = ADDRS[self.family]
        self.sides = [Side("a", f"kt{tag}a", a), Side("b", f"kt{tag}b", b)]

    def __enter__(self) -> Link:
        try:
            self.wire()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            ip_batch([f"netns del {s.netns}" for s in self.sides], force=True)
        except RuntimeError:
            pass  # one was never made

    def wire(self) -> None:
        a, b = self.sides
        plen = ADDRS[self.family][2]
        nodad = " nodad" if self.family == 6 else ""
        ip_batch([f"netns add {s.netns}" for s in self.sides])
        a.ip(f"link add va type veth peer name vb netns {b.netns}")
        for s, dev in ((a, "va"), (b, "vb")):
            s.ip(f"addr add {s.addr}/{plen} dev {dev}{nodad}", f"link set {dev} up", "link set lo up")

    def key(self) -> None:
        """Each side: inbound SPI from spialloc, keys installed on it (UPDSA),
        committed; the peer: the outbound SA on that SPI; policies both ways."""
        host = 32 if self.family == 4 else 128
        todo: dict[str, list[str]] = {s.name: [] for s in self.sides}
        for me, peer in (self.sides, self.sides[::-1]):
            with spialloc.Allocator(me.netns) as alloc:
                r = alloc.allocate(me.addr, self.proto, src=peer.addr, mode=self.mode, reqid=REQID[me.name])
                state = alloc.lookup(me.addr, r.spi, self.proto)
                assert state is not None and state.larval, f"no larval state for {r}"
                sa = f"src {peer.addr} dst {me.addr} proto {self.proto} spi {r.spi:#x} mode {self.mode}"
                sa += f" reqid {REQID[me.name]} {algorithm(self.proto)}"
                me.ip(f"xfrm state update {sa}")  # UPDSA on the larval state
                alloc.commit(r)
                todo[peer.name].append(f"xfrm state add {sa}")  # the peer's outbound SA
                me.reservation = r
            say(
                f"{me.name}.inbound proto={self.proto} spi={r.spi:#010x} dst={me.addr} src={peer.addr} mode={self.mode}"
            )
            for direction, src, dst in (("out", me, peer), ("in", peer, me)):
                # IPComp leaves small packets (and those that do not shrink) alone:
                # inbound, its template is optional (not allowed outbound in tunnel mode).
                level = " level use" if self.proto == "comp" and direction == "in" else ""
                todo[me.name].append(
                    f"xfrm policy add src {src.addr}/{host} dst {dst.addr}/{host} dir {direction}"
                    f" tmpl src {src.addr} dst {dst.addr} proto {self.proto} mode {self.mode}"
                    f" reqid {REQID[dst.name]}{level}"
                )
        for s in self.sides:
            s.ip(*todo[s.name])

    def ping(self, count: int = 3) -> tuple[int, int]:
        """(sent, received) from a to b; large, compressible payloads (IPComp
        leaves packets under ~90 bytes or that do not shrink alone)."""
        a, b = self.sides
        out = subprocess.run(
            ["ip", "netns", "exec", a.netns, "ping", f"-{self.family}", "-c", str(count), "-i", "0.2",
             "-W", "3", "-s", "1000", "-p", "ff", b.addr],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        m = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", out.stdout)
        return (int(m.group(1)), int(m.group(2))) if m else (count, 0)

    def counters(self) -> dict[str, tuple[int, int]]:
        """{"a.in": (packets, bytes), "a.out": ..., ...} of the SAs on the
        allocated SPIs, as ``ip -s xfrm state`` reports them."""
        out: dict[str, tuple[int, int]] = {}
        for me, peer in (self.sides, self.sides[::-1]):
            assert me.reservation is not None and peer.reservation is not None
            seen = {}
            listing = run(["ip", "-n", me.netns, "-s", "xfrm", "state", "list"])
            for block in re.split(r"^(?=src )", listing, flags=re.M):
                spi = re.search(r"proto (\S+) spi (0x[0-9a-f]+)", block)
                count = re.search(r"(\d+)\(bytes\), (\d+)\(packets\)", block)
                if spi and count and spi.group(1) == self.proto:
                    seen[int(spi.group(2), 16)] = (int(count.group(2)), int(count.group(1)))
            out[f"{me.name}.in"] = seen.get(me.reservation.spi, (-1, -1))
            out[f"{me.name}.out"] = seen.get(peer.reservation.spi, (-1, -1))
        return out

    def spis(self) -> dict[str, set[int]]:
        """Every SPI of this protocol in each namespace (spialloc's dump)."""
        res = {}
        for s in self.sides:
            with spialloc.Allocator(s.netns, guard=False) as alloc:
                res[s.name] = {st.spi for st in alloc.states(proto=self.proto)}
        return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--proto", choices=("esp", "ah", "comp"), default="esp")
    p.add_argument("--mode", choices=("transport", "tunnel"), default="transport")
    p.add_argument("--family", type=int, choices=(4, 6), default=4)
    p.add_argument("--count", type=int, default=3, help="pings (default 3)")
    args = p.parse_args(argv)
    say(f"kernel={platform.release()} backend={spialloc.backend}")
    with Link(args.proto, args.mode, args.family) as link:
        link.key()
        sent, received = link.ping(args.count)
        say(f"ping sent={sent} received={received}")
        counters = link.counters()
        for label, (packets, nbytes) in counters.items():
            say(f"counters {label} packets={packets} bytes={nbytes}")
        expected = {s.name: {x.reservation.spi for x in link.sides if x.reservation} for s in link.sides}
        present = link.spis()
        say(f"only_allocated_spis={'yes' if present == expected else f'no {present}'}")
    problems = []
    if received != sent or received == 0:
        problems.append(f"ping {received}/{sent}")
    problems += [f"{k} carried no packets" for k, (n, _) in counters.items() if n < received or n <= 0]
    if present != expected:
        problems.append("other SPIs present")
    say("result=ok" if not problems else f"result=FAILED {'; '.join(problems)}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
