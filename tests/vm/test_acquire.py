"""allocate_for() on a policy with an if_id: the host has no xfrm interfaces
(no xfrm_interface module), so an ACQUIRE that carries XFRMA_IF_ID is made
here, in the guest.  The packet leaves through xfrm interface if_id 5, the
ACQUIRE carries the if_id, allocate_for gives the ACQ state its SPI, and an
UPDSA with keys (what the daemon does after negotiating) installs that very
state: one state, the SPI allocate_for returned, no longer larval.
"""

from __future__ import annotations

import secrets
import socket
import subprocess

import pytest

import spialloc

LOCAL, PEER = "10.96.0.1", "10.96.0.2"


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout


def test_allocate_for_binds_an_if_id_policy_and_updsa_installs_that_state(name: str) -> None:
    subprocess.run(["modprobe", "xfrm_interface"], check=True, capture_output=True)
    ip(name, "link", "set", "lo", "up")
    ip(name, "link", "add", "xi5", "type", "xfrm", "dev", "lo", "if_id", "5")
    ip(name, "link", "set", "xi5", "up")
    ip(name, "addr", "add", f"{LOCAL}/24", "dev", "xi5")
    ip(name, *f"xfrm policy add src {LOCAL}/32 dst {PEER}/32 dir out if_id 5 mark 3".split(),
       *f"tmpl src {LOCAL} dst {PEER} proto esp mode tunnel reqid 5".split())  # fmt: skip

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 3)
            try:
                s.sendto(b"x", (PEER, 9))
            except OSError:
                pass

    ns = spialloc.Namespace.open(name)
    try:
        with spialloc.Monitor(ns, expire=False) as mon, spialloc.Allocator(ns) as alloc:
            ns.run(send)
            ev = mon.get(timeout=60)
            assert isinstance(ev, spialloc.Acquire), ev
            assert (ev.if_id, ev.mark, ev.reqid, ev.mode) == (5, (3, 0xFFFFFFFF), 5, spialloc.Mode.TUNNEL)
            r = alloc.allocate_for(ev)
            (st,) = alloc.states()
            assert (st.spi, st.acquire_seq, st.if_id, st.mark) == (r.spi, ev.seq, 5, (3, 0xFFFFFFFF))
            with pytest.raises(spialloc.AlreadyBound):
                alloc.allocate_for(ev)
            ip(name, *f"xfrm state update src {LOCAL} dst {PEER} proto esp spi {r.spi:#x} reqid 5".split(),
               *"mode tunnel if_id 5 mark 3 aead rfc4106(gcm(aes))".split(),
               "0x" + secrets.token_hex(20), "128")  # fmt: skip
            (st,) = alloc.states()
            assert (st.spi, st.if_id, st.larval) == (r.spi, 5, False)
            alloc.commit(r)
            assert alloc.release(r) == 1
            assert alloc.states() == []
    finally:
        ns.close()
