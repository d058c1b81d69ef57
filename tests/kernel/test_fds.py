"""File descriptors: running out of them, and having more than 1,024.

Each test runs a child Python in the test's namespace (nsenter), since it
changes RLIMIT_NOFILE and fills the fd table, which must not touch pytest's
own process.  The child prints one JSON line; the test checks it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spialloc import Namespace

ROOT = Path(__file__).resolve().parents[2]

# argv: kind (allocator|monitor|async), target (current|isolated|fd|<netns name>).
# Fills the fd table, then tries to construct, freeing one fd after each
# failure: every failure point of construction is hit in turn.
EMFILE_CHILD = r"""
import asyncio, errno, json, os, resource, sys
from spialloc import Allocator, Monitor, Namespace, ResourceError
from spialloc.aio import AsyncAllocator

kind, target = sys.argv[1], sys.argv[2]

def nfds():
    return len(os.listdir("/proc/self/fd"))

def make():
    if target == "isolated":
        ns = Namespace.isolated()
        try:
            return build(ns)
        finally:
            ns.close()
    return build({"current": None, "fd": nsfd}.get(target, target))

def build(spec):
    if kind == "allocator":
        return Allocator(spec)
    if kind == "monitor":
        return Monitor(spec)
    return AsyncAllocator(spec)

async def use(obj):
    if kind == "allocator":
        obj.release(obj.allocate("10.0.0.1"))
        obj.close()
    elif kind == "monitor":
        obj.close()
    else:
        await obj.release(await obj.allocate("10.0.0.1"))
        await obj.close()

async def main():
    global nsfd
    nsfd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    before = nfds()
    filler = []
    try:
        while True:
            filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as exc:
        assert exc.errno == errno.EMFILE, exc
    failures, obj = [], None
    while obj is None and filler:
        try:
            obj = make()
        except Exception as exc:
            failures.append([type(exc).__name__, isinstance(exc, ResourceError), getattr(exc, "errno", None), str(exc)])
            os.close(filler.pop())
    for fd in filler:
        os.close(fd)
    await use(obj)  # after the fillers are gone: using it may import more of the stdlib
    print(json.dumps({"failures": failures, "before": before, "after": nfds()}))

asyncio.run(main())
"""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_child(netns: Namespace, code: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    if netns.fd is None:
        pytest.skip("the namespace has no fd (user-namespace helper): nsenter cannot enter it")
    proc = subprocess.run(
        ["nsenter", f"--net=/proc/self/fd/{netns.fd}", sys.executable, "-c", code, *args],
        pass_fds=[netns.fd],
        capture_output=True,
        text=True,
        env=_child_env(),
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("kind", ["allocator", "monitor", "async"])
@pytest.mark.parametrize("target", ["current", "isolated", "fd", "named"])
def test_out_of_fds_is_a_typed_error_naming_emfile_and_leaks_nothing(
    netns: Namespace, request: pytest.FixtureRequest, kind: str, target: str
) -> None:
    """Out of fds, construction fails with ResourceError (EMFILE) at whatever
    step the table is full - the engine's import, the namespace handle, a
    socket, the watcher's pipe or epoll - never a raw OSError nor "cannot
    enter network namespace"; once enough fds are free it works, and the
    failed attempts left no fd behind."""
    where = request.getfixturevalue("named_netns") if target == "named" else target
    out = run_child(netns, EMFILE_CHILD, kind, where)
    failures = out["failures"]
    assert failures, "construction never ran out of fds"
    for name, typed, code, text in failures:
        assert (name, typed, code) == ("ResourceError", True, 24), text
        assert "EMFILE" in text and "RLIMIT_NOFILE" in text, text
        assert "cannot enter" not in text, text
    assert out["after"] == out["before"], "failed constructions leaked fds"


# Allocator and Monitor made with every fd number below 1100 taken: the
# expiry watcher and the Monitor must still see the larval state expire.
HIGH_FD_CHILD = r"""
import json, os, resource, time
from spialloc import Allocator, Expire, Monitor

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, max(hard, 4096)))
filler = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
fds_before = {int(fd) for fd in os.listdir("/proc/self/fd")}
lost = []
alloc = Allocator(on_lost=lost.append)
mon = Monitor(acquire=False)
new_fds = sorted({int(fd) for fd in os.listdir("/proc/self/fd")} - fds_before)
alloc.acq_expires = 2
r = alloc.allocate("10.0.0.1")
t0 = time.monotonic()
deadline = t0 + 10
while r not in lost and time.monotonic() < deadline:
    time.sleep(0.05)
lost_after = time.monotonic() - t0 if r in lost else None
expire = None
while expire is None and time.monotonic() < deadline:
    ev = mon.get(timeout=max(0.01, deadline - time.monotonic()))
    if isinstance(ev, Expire) and ev.spi == r.spi:
        expire = {"hard": ev.hard, "spi": ev.spi}
print(json.dumps({
    "new_fds": new_fds,
    "watcher_fd": alloc.core.watcher.sock.fileno(),
    "kernel_fd": alloc.core.kernel.sock.fileno(),
    "monitor_fd": mon.fileno(),
    "lost_after": lost_after,
    "lost_spis": [x.spi for x in lost],
    "spi": r.spi,
    "expire": expire,
}))
alloc.close()
mon.close()
"""


def test_fds_above_1023_still_see_expiry(netns: Namespace) -> None:
    """select() cannot watch fd 1024 or above; the expiry watcher (epoll) and
    Monitor.get (poll) must work there: on_lost fires for an expired
    reservation and the Monitor gets its Expire."""
    out = run_child(netns, HIGH_FD_CHILD, timeout=60)
    assert out["new_fds"] and min(out["new_fds"]) > 1023, out["new_fds"]
    assert min(out["watcher_fd"], out["kernel_fd"], out["monitor_fd"]) > 1023, out
    assert out["lost_after"] is not None, f"on_lost never fired: {out}"
    assert out["lost_spis"] == [out["spi"]]
    assert out["expire"] == {"hard": True, "spi": out["spi"]}, out
