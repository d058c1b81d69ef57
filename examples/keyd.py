#!/usr/bin/env python3
"""keyd: a minimal on-demand keying daemon on spialloc (Monitor + AsyncAllocator).

The kernel holds an outbound policy with an ESP template but no SA.  When a
packet matches it, the kernel makes an ACQ state and multicasts
XFRM_MSG_ACQUIRE.  A keying daemon answers by allocating SPIs (here: inbound
and outbound), negotiating with the peer (not shown) and installing the SAs
with UPDSA (not possible here: this kernel has no ESP transforms).

    python examples/keyd.py                  # --isolated: a throwaway namespace,
                                             # with its own veth, policy and packet
    python examples/keyd.py --netns NAME     # serve ACQUIREs of `ip netns` NAME

Output is one `key=value` record per line, stable for scripts and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import subprocess
import sys
from typing import Awaitable

import spialloc

LOCAL, PEER = "10.99.0.1", "10.99.0.2"


def say(text: str) -> None:
    print(text, flush=True)  # flushed: a supervisor reads us through a pipe


def setup_demo(ns: spialloc.Namespace) -> None:
    """Give the throwaway namespace something to key: a veth, a trap policy
    (ESP tunnel LOCAL -> PEER, reqid 7, no SA yet) and one UDP datagram."""
    if ns.fd is None:
        raise SystemExit("keyd: --isolated needs root (the namespace must be enterable by ip(8))")
    fd = ns.fd

    def ip(*argv: str) -> None:
        subprocess.run(
            ["nsenter", f"--net=/proc/self/fd/{fd}", "ip", *argv],
            pass_fds=[fd],
            check=True,
            capture_output=True,
            timeout=10,
        )

    for cmd in (
        "link add va type veth peer name vb",
        f"addr add {LOCAL}/24 dev va",
        "link set va up",
        "link set vb up",
        f"xfrm policy add src {LOCAL}/32 dst {PEER}/32 dir out"
        f" tmpl src {LOCAL} dst {PEER} proto esp mode tunnel reqid 7",
    ):
        ip(*cmd.split())

    def send() -> None:  # runs in a thread inside the namespace
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(b"hello", (PEER, 9))
            except OSError:
                pass  # EAGAIN: the packet is dropped while the SA is being negotiated

    ns.run(send)


async def on_acquire(alloc: spialloc.AsyncAllocator, ev: spialloc.Acquire, held: list[spialloc.Reservation]) -> None:
    mode = ev.mode if ev.mode is not None else spialloc.Mode.TRANSPORT
    proto = ev.proto.name.lower() if isinstance(ev.proto, spialloc.Proto) else ev.proto
    mode_name = mode.name.lower() if isinstance(mode, spialloc.Mode) else mode
    say(f"acquire seq={ev.seq} src={ev.src} dst={ev.dst} proto={proto} reqid={ev.reqid} mode={mode_name}")

    # Inbound SA (peer -> us): the SPI we tell the peer to put in its packets.
    # Its destination is our own address; direction "in" (XFRMA_SA_DIR) must
    # match what UPDSA will carry later, or UPDSA fails with ESRCH.
    inbound = await alloc.allocate(ev.src, ev.proto, src=ev.dst, mode=mode, reqid=ev.reqid, direction="in")
    held.append(inbound)

    # Outbound SA (us -> peer): seq=ev.seq gives the kernel's ACQ state its SPI,
    # so UPDSA later completes that very state and the waiting flow proceeds.
    # SA_DIR on a seq-bound ALLOCSPI is accepted (Linux 6.10+ sets the ACQ
    # state's dir; checked on 6.18), so the outbound request carries "out" too.
    # On a kernel that refused it, drop `direction` here and at UPDSA alike.
    def ask_outbound() -> Awaitable[spialloc.Reservation]:
        return alloc.allocate(ev.dst, ev.proto, src=ev.src, mode=mode, reqid=ev.reqid, seq=ev.seq, direction="out")

    outbound = await ask_outbound()
    held.append(outbound)

    say(f"inbound spi={inbound.spi:#010x} dst={inbound.dst}")
    say(f"outbound spi={outbound.spi:#010x} dst={outbound.dst} (bound to acquire {ev.seq})")
    say(f"distinct: {'yes' if inbound.spi != outbound.spi else 'NO'}")

    # The seed scenario: the same ACQUIRE handled twice (a duplicated event, a
    # retried handler).  The kernel answers a reused seq with the SPI the ACQ
    # state already has -- a duplicate.  The guard sees it is outstanding and
    # gets a fresh one instead (a plain larval state, which we must release).
    again = await ask_outbound()
    held.append(again)
    dup = again.spi in (inbound.spi, outbound.spi)
    say(
        f"repeat seq={ev.seq} spi={again.spi:#010x} duplicate: {'YES' if dup else 'no'} "
        f"(guard collisions={alloc.stats.collisions})"
    )


async def serve(ns: spialloc.Namespace, demo: bool, once: bool, timeout: float | None) -> int:
    held: list[spialloc.Reservation] = []  # everything we own, released on shutdown
    handled = 0
    # Open the monitor BEFORE any packet can hit the policy: with no listener
    # on the ACQUIRE group the kernel keeps no ACQ state.  EXPIREs are not
    # needed here: the allocator's guard watches them itself.
    with spialloc.Monitor(ns, expire=False) as mon:
        async with spialloc.AsyncAllocator(ns) as alloc:

            async def events() -> None:
                nonlocal handled
                async for ev in mon:
                    if isinstance(ev, spialloc.EventsLost):
                        # ACQUIREs were dropped: pending ones are the ACQ states
                        # (spi 0, acquire_seq set) in the dump; answer those.
                        pending = [s for s in ev.states if s.spi == 0 and s.acquire_seq]
                        say(f"events lost: {len(pending)} pending acquires in the SAD")
                        continue
                    if isinstance(ev, spialloc.Acquire):
                        try:
                            await on_acquire(alloc, ev, held)
                        except spialloc.SpiallocError as exc:  # one bad event must not kill us
                            say(f"error seq={ev.seq}: {exc}")
                        handled += 1
                        if once:
                            return

            work = asyncio.ensure_future(events())
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C / systemd stop
                loop.add_signal_handler(sig, work.cancel)
            say(f"listening in {ns.description}")
            status = 0
            try:
                if demo:
                    setup_demo(ns)
                await asyncio.wait_for(work, timeout)
            except asyncio.TimeoutError:
                say(f"timeout after {timeout:g}s, {handled} acquires handled")
                status = 0 if handled or not once else 1
            except asyncio.CancelledError:
                say("signal: shutting down")
            finally:
                # A real daemon releases only what it never installed (UPDSA +
                # commit); here nothing was installed, so everything goes.
                say(f"released {await alloc.release(held)}")
                if demo:
                    say(f"left {len(await alloc.states())}")
    return status


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--netns", metavar="NAME", help="serve the ACQUIREs of this `ip netns` namespace")
    where.add_argument("--isolated", action="store_true", help="a throwaway namespace with a demo packet (default)")
    p.add_argument("--timeout", type=float, help="stop after this many seconds (default: 30 with --isolated)")
    p.add_argument("--once", action="store_true", help="exit after the first ACQUIRE (implied by --isolated)")
    args = p.parse_args()
    demo = args.netns is None
    timeout = args.timeout if args.timeout is not None else (30.0 if demo else None)
    ns = spialloc.Namespace.isolated() if demo else spialloc.Namespace.open(args.netns)
    try:
        return asyncio.run(serve(ns, demo, once=demo or args.once, timeout=timeout))
    finally:
        ns.close()


if __name__ == "__main__":
    sys.exit(main())
