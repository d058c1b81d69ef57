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
    python examples/keyd.py --traffic        # on a kernel with ESP: key the SAs for
                                             # real and pass ping traffic (a peer in
                                             # a second namespace plays the other end)

Output is one `key=value` record per line, stable for scripts and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import subprocess
import sys

import spialloc

LOCAL, PEER = "10.99.0.1", "10.99.0.2"
MARK = 7  # the demo policy's mark: only packets with this mark need its SA
TMPL = "proto esp mode tunnel reqid 7"  # --traffic: keyd's policies and SAs


def say(text: str) -> None:
    print(text, flush=True)  # flushed: a supervisor reads us through a pipe


def setup_demo(ns: spialloc.Namespace) -> None:
    """Give the throwaway namespace something to key: a veth, a trap policy
    (ESP tunnel LOCAL -> PEER, reqid 7, mark 7, no SA yet) and one UDP
    datagram with that mark."""
    fd = ns.fd
    assert fd is not None  # main() checked

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
        f"xfrm policy add src {LOCAL}/32 dst {PEER}/32 dir out mark {MARK}"
        f" tmpl src {LOCAL} dst {PEER} proto esp mode tunnel reqid 7",
    ):
        ip(*cmd.split())

    def send() -> None:  # runs in a thread inside the namespace
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
            try:
                s.sendto(b"hello", (PEER, 9))
            except OSError:
                pass  # EAGAIN: the packet is dropped while the SA is being negotiated

    ns.run(send)


async def on_acquire(
    alloc: spialloc.AsyncAllocator, ev: spialloc.Acquire, held: list[spialloc.Reservation]
) -> tuple[spialloc.Reservation, spialloc.Reservation]:
    """Returns (inbound, outbound)."""
    mode = ev.mode if ev.mode is not None else spialloc.Mode.TRANSPORT
    proto = ev.proto.name.lower() if isinstance(ev.proto, spialloc.Proto) else ev.proto
    mode_name = mode.name.lower() if isinstance(mode, spialloc.Mode) else mode
    mark = "none" if ev.mark is None else f"{ev.mark[0]:#x}/{ev.mark[1]:#x}"
    say(f"acquire seq={ev.seq} src={ev.src} dst={ev.dst} proto={proto} reqid={ev.reqid} mode={mode_name} mark={mark}")

    # Inbound SA (peer -> us): the SPI we tell the peer to put in its packets.
    # Its destination is our own address; direction "in" (XFRMA_SA_DIR) must
    # match what UPDSA will carry later, or UPDSA fails with ESRCH.  The
    # policy's mark is the outbound SA's business, not this one's.  A kernel
    # older than SA_DIR (6.10) would drop the direction silently; spialloc
    # refuses instead, and the daemon then goes on without directions.
    try:
        inbound = await alloc.allocate(ev.src, ev.proto, src=ev.dst, mode=mode, reqid=ev.reqid, direction="in")
    except spialloc.UnsupportedByKernel as exc:
        say(f"no SA_DIR: {exc}")
        inbound = await alloc.allocate(ev.src, ev.proto, src=ev.dst, mode=mode, reqid=ev.reqid)
    held.append(inbound)

    # Outbound SA (us -> peer): allocate_for gives the kernel's ACQ state its
    # SPI (found by the ACQUIRE's seq and the policy's mark, both taken from
    # the event), so UPDSA later completes that very state and the waiting
    # flow proceeds.  The ACQ state keeps the direction the kernel gave it
    # (out on Linux 6.10+, none before).
    outbound = await alloc.allocate_for(ev)
    held.append(outbound)

    say(f"inbound spi={inbound.spi:#010x} dst={inbound.dst}")
    say(f"outbound spi={outbound.spi:#010x} dst={outbound.dst} (bound to acquire {ev.seq})")
    say(f"distinct: {'yes' if inbound.spi != outbound.spi else 'NO'}")

    # The seed scenario: the same ACQUIRE handled twice (a duplicated event, a
    # retried handler).  The kernel would answer a reused seq with the SPI the
    # ACQ state already has -- a duplicate -- and overwrite the state's
    # direction on the way.  allocate_for refuses before sending anything.
    try:
        again = await alloc.allocate_for(ev)
    except spialloc.AlreadyBound:
        say(f"repeat seq={ev.seq} refused: already bound (no duplicate, nothing sent)")
    else:  # never: kept so that a regression shows in the output
        held.append(again)
        say(f"repeat seq={ev.seq} spi={again.spi:#010x} NOT refused")
    return inbound, outbound


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


async def serve_traffic(count: int, timeout: float) -> int:
    """--traffic: keyd in namespace a of examples/keyd_traffic.py's Link
    (two `ip netns` on a veth pair; its setup, counters and checks are
    reused).  A trap policy a -> b, a ping that hits it, on_acquire() as in
    the demo; then the "negotiated" keys go onto the two SPIs keyd allocated
    (UPDSA on the inbound larval state and on the outbound ACQ state), b
    plays the peer (its SAs and policies, as its own daemon would install
    them), and ping passes on exactly those SPIs."""
    import keyd_traffic as kt  # beside this script (sys.path[0] when run as one)

    with kt.Link("esp", "tunnel", 4) as link:
        a, b = link.sides

        def policy(src: str, dst: str, direction: str) -> str:
            return f"xfrm policy add src {src}/32 dst {dst}/32 dir {direction} tmpl src {src} dst {dst} {TMPL}"

        ns = spialloc.Namespace.open(a.netns)
        try:
            with spialloc.Monitor(ns, expire=False) as mon:  # before the trap can fire
                async with spialloc.AsyncAllocator(ns) as alloc:
                    a.ip(policy(a.addr, b.addr, "out"))  # the trap: no SA yet
                    say(f"listening in {a.netns}; peer {b.netns}")
                    trigger = await asyncio.create_subprocess_exec(
                        "ip", "netns", "exec", a.netns, "ping", "-c", "1", "-W", "1", b.addr,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip

                    async def first_acquire() -> spialloc.Acquire:
                        async for ev in mon:
                            if isinstance(ev, spialloc.Acquire):
                                return ev
                        raise RuntimeError("the monitor stopped")

                    ev = await asyncio.wait_for(first_acquire(), timeout)
                    await trigger.wait()
                    inbound, outbound = await on_acquire(alloc, ev, [])
                    sa_in = f"src {b.addr} dst {a.addr} proto esp spi {inbound.spi:#x} mode tunnel reqid 7"
                    sa_out = f"src {a.addr} dst {b.addr} proto esp spi {outbound.spi:#x} mode tunnel reqid 7"
                    key_in, key_out = kt.algorithm("esp"), kt.algorithm("esp")
                    a.ip(
                        f"xfrm state update {sa_in} {key_in}",  # the inbound larval state
                        f"xfrm state update {sa_out} {key_out}",  # the ACQ state: the flow may go
                        policy(b.addr, a.addr, "in"),
                    )
                    await alloc.commit(inbound)
                    await alloc.commit(outbound)
                    b.ip(
                        f"xfrm state add {sa_out} {key_out}",
                        f"xfrm state add {sa_in} {key_in}",
                        policy(b.addr, a.addr, "out"),
                        policy(a.addr, b.addr, "in"),
                    )
                    say("installed: UPDSA on both SPIs")
                    # What Link reads as side b's inbound SPI is keyd's outbound.
                    a.reservation, b.reservation = inbound, outbound
                    sent, received = await asyncio.to_thread(link.ping, count)
                    say(f"ping sent={sent} received={received}")
                    counters = await asyncio.to_thread(link.counters)
                    for label, (packets, nbytes) in counters.items():
                        say(f"counters {label} packets={packets} bytes={nbytes}")
                    present = await asyncio.to_thread(link.spis)
        finally:
            ns.close()
    both = {inbound.spi, outbound.spi}
    only = present == {"a": both, "b": both}
    say(f"only_allocated_spis={'yes' if only else f'no {present}'}")
    problems = [f"ping {received}/{sent}"] if received != sent or received == 0 else []
    problems += [f"{k} carried no packets" for k, (n, _) in counters.items() if n < received or n <= 0]
    problems += [] if only else ["other SPIs present"]
    say("result=ok" if not problems else f"result=FAILED {'; '.join(problems)}")
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--netns", metavar="NAME", help="serve the ACQUIREs of this `ip netns` namespace")
    where.add_argument("--isolated", action="store_true", help="a throwaway namespace with a demo packet (default)")
    where.add_argument(
        "--traffic", action="store_true", help="key the SAs for real and ping over them (needs ESP in the kernel)"
    )
    p.add_argument("--count", type=int, default=3, help="pings with --traffic (default 3)")
    p.add_argument("--timeout", type=float, help="stop after this many seconds (default: 30 with --isolated)")
    p.add_argument("--once", action="store_true", help="exit after the first ACQUIRE (implied by --isolated)")
    args = p.parse_args(argv)
    if args.traffic:
        return asyncio.run(serve_traffic(args.count, args.timeout if args.timeout is not None else 30.0))
    demo = args.netns is None
    timeout = args.timeout if args.timeout is not None else (30.0 if demo else None)
    ns = spialloc.Namespace.isolated() if demo else spialloc.Namespace.open(args.netns)
    if demo and ns.fd is None:
        # Not root: the namespace lives in a helper's user namespace, which
        # ip(8) cannot enter to set up the demo.  Say so before doing anything.
        ns.close()
        print(
            "keyd: --isolated sets up its demo with ip(8), which needs root; as a normal user run: "
            "unshare -Urn python examples/keyd.py",
            file=sys.stderr,
        )
        return 2
    try:
        return asyncio.run(serve(ns, demo, once=demo or args.once, timeout=timeout))
    finally:
        ns.close()


if __name__ == "__main__":
    sys.exit(main())
