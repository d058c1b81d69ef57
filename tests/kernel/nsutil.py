"""Helpers for kernel tests: run ip(8) inside a test namespace, read its SAD
with ip(8) (an independent witness), provoke a kernel ACQUIRE."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Callable, Sequence

from spialloc import Acquire, Monitor, Namespace


def ns_run(ns: Namespace, argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command (ip, sysctl ...) inside the test namespace."""
    assert ns.fd is not None, "namespace has no fd (user-namespace helper)"
    return subprocess.run(
        ["nsenter", f"--net=/proc/self/fd/{ns.fd}", *argv],
        pass_fds=[ns.fd],
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


def sad_count(ns: Namespace) -> int:
    """States in the namespace's SAD, counted by ip(8), not by spialloc."""
    out = ns_run(ns, ["ip", "-o", "xfrm", "state", "list"]).stdout
    return sum(1 for line in out.splitlines() if line.startswith("src "))


def sad_spis(ns: Namespace) -> set[int]:
    out = ns_run(ns, ["ip", "xfrm", "state", "list"]).stdout
    spis = set()
    for line in out.splitlines():
        parts = line.split()
        if "spi" in parts:
            spis.add(int(parts[parts.index("spi") + 1], 16))
    return spis


def make_acquire(ns: Namespace, dst: str = "10.99.0.2", src: str = "10.99.0.1") -> Acquire:
    """veth pair + outbound trap policy with an ESP template + one datagram:
    the kernel makes an ACQ state and multicasts XFRM_MSG_ACQUIRE.

    The kernel only makes the ACQ state when some socket listens on the
    ACQUIRE group (no key manager, no state), so a Monitor listens while the
    datagram goes out; the event it reads is returned (``.seq`` binds)."""
    ns_run(ns, ["ip", "link", "add", "va", "type", "veth", "peer", "name", "vb"])
    ns_run(ns, ["ip", "addr", "add", f"{src}/24", "dev", "va"])
    ns_run(ns, ["ip", "link", "set", "va", "up"])
    ns_run(ns, ["ip", "link", "set", "vb", "up"])
    ns_run(ns, ["ip", "link", "set", "lo", "up"])
    ns_run(
        ns,
        [
            "ip",
            "xfrm",
            "policy",
            "add",
            "src",
            f"{src}/32",
            "dst",
            f"{dst}/32",
            "dir",
            "out",
            "tmpl",
            "src",
            src,
            "dst",
            dst,
            "proto",
            "esp",
            "mode",
            "tunnel",
            "reqid",
            "7",
        ],
    )

    def send() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b"x", (dst, 9))
        except OSError:
            pass  # EAGAIN while the ACQUIRE is pending is expected
        finally:
            s.close()

    with Monitor(ns, expire=False) as mon:
        ns.run(send)
        ev = mon.get(timeout=10)
    assert isinstance(ev, Acquire), f"no ACQUIRE from the kernel (got {ev!r})"
    return ev


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


#: For a child process's script: after the first chunk of its first engine
#: call, print "running" and wait where the engine checks for interrupts
#: between chunks.  A SIGINT sent on "running" then always lands mid-batch,
#: however loaded the machine is (a fixed delay, or waiting for states to show
#: up in a dump, lets a fast batch finish first).  Moments elsewhere in a
#: batch: test_interrupt_at_random_moments_delivers_all_or_leaves_nothing.
MID_BATCH_HOOK = r"""
import signal as _signal
import time as _time
# A shell starts background jobs with SIGINT ignored, and Python then keeps
# it ignored: the child must raise KeyboardInterrupt however it was started.
_signal.signal(_signal.SIGINT, _signal.default_int_handler)
from spialloc._kernel import Kernel as _Kernel
_real_stop = _Kernel._stop_if_closing
_chunks = [0]
def _hook(self):
    _chunks[0] += 1
    if _chunks[0] == 1:
        print("running", flush=True)
        _deadline = _time.monotonic() + 60
        while _time.monotonic() < _deadline:
            _time.sleep(0.01)
    _real_stop(self)
_Kernel._stop_if_closing = _hook
"""


def acquire_from_policy(
    ns: Namespace,
    policy: str,
    dst: str,
    *,
    local: str = "10.97.0.1/24",
    local6: str = "fd00:97::1/64",
    mark: int = 0,
) -> Acquire:
    """One ACQUIRE from an outbound policy of our own: a veth with ``local``
    and ``local6`` on it, ``ip xfrm policy add POLICY``, and one UDP
    datagram to ``dst`` (with SO_MARK ``mark``), sent while a Monitor listens
    (without a listener the kernel makes no ACQ state)."""
    for cmd in (
        "link add qa type veth peer name qb",
        "link set qa up",
        "link set qb up",
        f"addr add {local} dev qa",
        f"-6 addr add {local6} dev qa nodad",
        f"xfrm policy add {policy}",
    ):
        ns_run(ns, ["ip", *cmd.split()])

    def send() -> None:
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            if mark:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            try:
                s.sendto(b"x", (dst, 9))
            except OSError:
                pass  # EAGAIN while the ACQUIRE is pending

    with Monitor(ns, expire=False) as mon:
        ns.run(send)
        ev = mon.get(timeout=10)
    assert isinstance(ev, Acquire), f"no ACQUIRE from the kernel for {policy!r} (got {ev!r})"
    return ev
