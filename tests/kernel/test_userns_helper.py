"""The user-namespace helper (``Namespace.isolated()`` without CAP_SYS_ADMIN):
a forked child that makes sockets inside a fresh user + network namespace.

Each test runs a script as root with every capability dropped (setpriv), so
``unshare(CLONE_NEWNET)`` fails and the helper is used, as for a normal user;
the script runs inside the test's own namespace and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from nsutil import ns_run

from spialloc import Namespace

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = r"""
import json, os, select, signal, threading, time
import spialloc
from spialloc import Allocator, Monitor, Namespace, NamespaceError

assert open("/proc/self/status").read().split("CapEff:")[1].split()[0] == "0" * 16
out = {}


def zombies():
    # children of this process in state Z (dead, not reaped)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            found.append(int(pid))
    return found


def outcome(fn):
    try:
        fn()
        return "ok"
    except BaseException as exc:
        return f"{type(exc).__name__}: {exc}"


def isolated_via_helper():
    ns = Namespace.isolated()
    assert ns._helper is not None, "expected the user-namespace helper"
    return ns
"""


def run_unprivileged(netns: Namespace, body: str) -> dict[str, object]:
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
            PRELUDE + body + "\nprint(json.dumps(out))\n",
        ],
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_helper_holds_no_fd_of_the_parent(netns: Namespace) -> None:
    """A pipe made before the helper started sees EOF when the parent closes
    its write end (the forked helper used to keep a copy open), the helper
    holds only its channel and stdio on /dev/null, and closing one isolated
    namespace does not wait on another helper holding its channel (it
    did: close() waited forever for a helper that never saw EOF)."""
    out = run_unprivileged(
        netns,
        r"""
r, w = os.pipe()
ns = isolated_via_helper()
pid = ns._helper.pid
out["helper_fds"] = sorted(os.readlink(f"/proc/{pid}/fd/{fd}").split(":")[0] for fd in os.listdir(f"/proc/{pid}/fd"))
os.close(w)
out["pipe_eof"] = bool(select.select([r], [], [], 5)[0]) and os.read(r, 1) == b""

other = isolated_via_helper()
closer = threading.Thread(target=ns.close, daemon=True)
closer.start()
closer.join(10)
out["close_returned"] = not closer.is_alive()
out["first_helper_gone"] = not os.path.exists(f"/proc/{pid}")
with Allocator(other) as a:  # the second one is untouched
    out["second_works"] = a.release(a.allocate("10.0.0.1")) == 1
other.close()
out["zombies"] = zombies()
""",
    )
    assert out["helper_fds"] == ["/dev/null", "/dev/null", "/dev/null", "socket"], out
    assert out["pipe_eof"] is True, "the parent's pipe saw no EOF: the helper holds its write end"
    assert out["close_returned"] is True, "close() of one isolated namespace hung while another existed"
    assert out["first_helper_gone"] is True
    assert out["second_works"] is True
    assert out["zombies"] == []


def test_killed_helper_is_reaped_and_reported(netns: Namespace) -> None:
    """kill -9 of the helper: it is reaped at once (no zombie until close),
    every later use of the namespace raises NamespaceError naming the
    signal (it was a bare BrokenPipeError, or NamespaceError "Operation not
    permitted" from an empty reply), and sockets made before keep working."""
    out = run_unprivileged(
        netns,
        r"""
ns = isolated_via_helper()
a = Allocator(ns)
r = a.allocate("10.0.0.1")
pid = ns._helper.pid
os.kill(pid, signal.SIGKILL)
deadline = time.monotonic() + 5
while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
    time.sleep(0.01)
out["reaped"] = not os.path.exists(f"/proc/{pid}")
out["zombies"] = zombies()
out["allocator"] = outcome(lambda: Allocator(ns))
out["monitor"] = outcome(lambda: Monitor(ns))
out["sysctl"] = outcome(lambda: a.acq_expires)
out["old_socket"] = a.release(r) == 1 and a.release(a.allocate("10.0.0.1")) == 1
a.close()
ns.close()
out["zombies_after_close"] = zombies()
""",
    )
    assert out["reaped"] is True and out["zombies"] == [], out
    for what in ("allocator", "monitor", "sysctl"):
        text = str(out[what])
        assert text.startswith("NamespaceError: "), (what, text)
        assert "helper process" in text and "killed by signal 9 (SIGKILL)" in text, (what, text)
    assert out["old_socket"] is True
    assert out["zombies_after_close"] == []
