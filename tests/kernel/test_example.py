"""examples/keyd.py, run as a user would run it."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nsutil import make_acquire, ns_run

from spialloc import Namespace

ROOT = Path(__file__).resolve().parents[2]
KEYD = ROOT / "examples" / "keyd.py"


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def host_snapshot() -> dict[str, str]:
    def ip(*argv: str) -> str:
        return subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30, check=True).stdout

    links = "\n".join(sorted(re.findall(r"^\d+: ([^:@]+)", ip("-o", "link"), re.M)))
    return {
        "states": ip("xfrm", "state", "list"),
        "policies": ip("xfrm", "policy", "list"),
        "links": links,
        # Not the test suite's own (spialloc-*): a kernel tier running beside
        # this one (a load test) has namespaces coming and going.
        "netns": "\n".join(n for n in ip("netns", "list").splitlines() if not n.startswith("spialloc-")),
    }


def check_keying_output(out: str, mark: str = "none") -> tuple[int, int]:
    """The acquire/inbound/outbound/distinct/repeat lines; returns the SPIs."""
    acq = re.search(
        rf"^acquire seq=(\d+) src=10\.99\.0\.1 dst=10\.99\.0\.2 proto=esp reqid=7 mode=tunnel mark={mark}$", out, re.M
    )
    assert acq, out
    seq = int(acq.group(1))
    assert seq != 0
    inb = re.search(r"^inbound spi=(0x[0-9a-f]{8}) dst=10\.99\.0\.1$", out, re.M)
    outb = re.search(rf"^outbound spi=(0x[0-9a-f]{{8}}) dst=10\.99\.0\.2 \(bound to acquire {seq}\)$", out, re.M)
    rep = re.search(rf"^repeat seq={seq} refused: already bound \(no duplicate, nothing sent\)$", out, re.M)
    assert inb and outb and rep, out
    assert re.search(r"^distinct: yes$", out, re.M), out
    spis = int(inb.group(1), 16), int(outb.group(1), 16)
    assert len(set(spis)) == 2
    assert all(0xC0000000 <= s <= 0xCFFFFFFF for s in spis)
    return spis


def test_keyd_isolated_demo() -> None:
    before = host_snapshot()
    t = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(KEYD), "--isolated", "--timeout", "20"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
        cwd=str(ROOT),
    )
    elapsed = time.monotonic() - t
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    check_keying_output(out, mark="0x7/0xffffffff")
    lines = out.splitlines()
    assert lines[0] == "listening in isolated network namespace"
    assert lines[-2:] == ["released 2", "left 0"], out
    assert elapsed < 20  # it did not wait for its timeout
    # nothing left behind on the host: the namespace died with the process
    assert host_snapshot() == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_keyd_on_a_named_netns_serves_until_signalled(sig: signal.Signals) -> None:
    name = f"spialloc-keyd-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    ns = Namespace.open(name)
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, str(KEYD), "--netns", name, "--timeout", "20"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
            cwd=str(ROOT),
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first == f"listening in network namespace {name!r}\n", first + proc.stderr.read() if proc.stderr else ""
        make_acquire(ns)
        seen = []
        while True:  # bounded by --timeout 20: keyd ends the stream at the latest then
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("repeat "):
                break
        check_keying_output("".join(seen))
        assert proc.poll() is None  # still serving
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, rest + err
        assert err == ""
        assert rest.splitlines() == ["signal: shutting down", "released 2"], rest
        assert ns_run(ns, ["ip", "xfrm", "state", "list"]).stdout == ""
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        ns.close()
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def test_keyd_times_out_without_acquire() -> None:
    """--netns with no traffic and --once: gives up after --timeout, exit 1."""
    name = f"spialloc-keyd-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    try:
        proc = subprocess.run(
            [sys.executable, str(KEYD), "--netns", name, "--once", "--timeout", "0.5"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env(),
            cwd=str(ROOT),
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stdout.splitlines()[1:] == ["timeout after 0.5s, 0 acquires handled", "released 0"]
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def unprivileged(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run as a normal user would: root's uid, but no capability other than
    CAP_SETFCAP (which a real user does not need to map their own uid in a
    user namespace; root's uid 0 does, since Linux 5.12)."""
    return subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all,+setfcap", "--", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
        cwd=str(ROOT),
    )


def test_keyd_isolated_without_privilege_says_how_before_doing_anything() -> None:
    proc = unprivileged(sys.executable, str(KEYD), "--isolated", "--timeout", "10")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.strip().endswith("unshare -Urn python examples/keyd.py"), proc.stderr


def test_keyd_in_a_user_namespace_of_its_own_as_the_readme_says() -> None:
    proc = unprivileged("unshare", "-Urn", sys.executable, str(KEYD), "--timeout", "20")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_keying_output(proc.stdout, mark="0x7/0xffffffff")
    assert proc.stdout.splitlines()[-2:] == ["released 2", "left 0"]
