"""The command line against the real kernel (``python -m spialloc.cli``)."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from nsutil import make_acquire

from spialloc import Namespace

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "spialloc.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd="/",
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc.stdout


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str, status: int = 1) -> str:
    """One line on stderr; status 2 for bad usage, 1 when the kernel refused."""
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("spialloc: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def ip_spis(name: str) -> set[int]:
    out = subprocess.run(
        ["ip", "-n", name, "xfrm", "state", "list"], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    spis = set()
    for line in out.splitlines():
        parts = line.split()
        if "spi" in parts:
            spis.add(int(parts[parts.index("spi") + 1], 16))
    return spis


def test_alloc_isolated_json_count_3() -> None:
    out = ok(run_cli("alloc", "--dst", "10.0.0.1", "--count", "3", "--json", "--isolated"))
    entries = json.loads(out)
    assert isinstance(entries, list) and len(entries) == 3
    spis = [e["spi"] for e in entries]
    assert len(set(spis)) == 3
    for e in entries:
        assert 0xC0000000 <= e["spi"] <= 0xCFFFFFFF
        assert e["spi_hex"] == f"0x{e['spi']:08x}"
        assert e["dst"] == "10.0.0.1"
        assert e["proto"] == "esp"


def test_alloc_isolated_single_text_output() -> None:
    out = ok(run_cli("alloc", "--dst", "2001:db8::1", "--proto", "comp", "--isolated"))
    lines = out.strip().splitlines()
    assert len(lines) == 1
    words = lines[0].split()
    assert words[0] == "comp" and words[1] == "spi"
    assert 0x100 <= int(words[2], 16) <= 0xEFFF
    assert "dst 2001:db8::1" in lines[0]


def test_alloc_list_release_on_named_netns(named_netns: str) -> None:
    out = ok(
        run_cli(
            "alloc",
            "--dst",
            "10.0.0.1",
            "--count",
            "2",
            "--json",
            "--netns",
            named_netns,
            "--mode",
            "tunnel",
            "--reqid",
            "5",
            "--mark",
            "0x10/0xff",
        )
    )
    entries = json.loads(out)
    spis = {e["spi"] for e in entries}
    assert len(spis) == 2
    assert all(e["mode"] == "tunnel" and e["reqid"] == 5 and e["mark"] == [0x10, 0xFF] for e in entries)
    assert ip_spis(named_netns) == spis  # the states outlive the command

    listed = json.loads(ok(run_cli("list", "--netns", named_netns, "--json")))
    assert {e["spi"] for e in listed} == spis
    assert all(e["larval"] is True and e["mark"] == [0x10, 0xFF] for e in listed)
    larval = json.loads(ok(run_cli("list", "--netns", named_netns, "--larval", "--json")))
    assert {e["spi"] for e in larval} == spis

    text = ok(run_cli("list", "--netns", named_netns))
    heads = [line for line in text.splitlines() if not line.startswith(" ")]
    assert len(heads) == 2
    for s in spis:
        assert f"0x{s:08x}" in text

    args = ["release", "--netns", named_netns, "--dst", "10.0.0.1", "--mark", "0x10/0xff"]
    for s in sorted(spis):
        args += ["--spi", hex(s)]
    assert json.loads(ok(run_cli(*args, "--json"))) == {"released": 2, "requested": 2, "not_released": []}
    assert ip_spis(named_netns) == set()
    assert json.loads(ok(run_cli("list", "--netns", named_netns, "--json"))) == []
    # releasing again: nothing to delete, which the exit status and stderr say
    again = run_cli(*args)
    assert again.returncode == 1 and again.stdout.strip() == "released 0 of 2"
    assert again.stderr.count("no such state") == 2, again.stderr


def test_list_shows_states_made_by_ip(named_netns: str) -> None:
    out = subprocess.run(
        ["ip", "-n", named_netns, "xfrm", "state", "allocspi", "src", "0.0.0.0", "dst", "10.0.0.9", "proto", "ah"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    words = out.split()
    spi = int(words[words.index("spi") + 1], 16)
    listed = json.loads(ok(run_cli("list", "--netns", named_netns, "--json")))
    assert [(e["spi"], e["proto"], e["dst"]) for e in listed] == [(spi, "ah", "10.0.0.9")]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["alloc", "--dst", "10.0.0.1", "--min", "5", "--isolated"], ["0x5", "reserved"]),
        (["alloc", "--dst", "10.0.0.1", "--proto", "comp", "--max", "0x1ffff", "--isolated"], ["0x1ffff"]),
        (["alloc", "--dst", "10.0.0.1", "--min", "0x2000", "--max", "0x1000", "--isolated"], ["0x2000", "0x1000"]),
        (["alloc", "--dst", "10.0.0.256", "--isolated"], ["10.0.0.256"]),
        (["alloc", "--dst", "10.0.0.1", "--src", "2001:db8::1", "--isolated"], ["2001:db8::1"]),
        (["alloc", "--dst", "10.0.0.1", "--reqid", "0x100000000", "--isolated"], ["4294967296"]),
        (["alloc", "--dst", "10.0.0.1", "--count", "2", "--seq", "5", "--isolated"], ["--seq"]),
        (["release", "--dst", "nowhere", "--spi", "0x100", "--isolated"], ["nowhere"]),
        (["list", "--netns", "spialloc-missing-zz9"], ["spialloc-missing-zz9"]),
    ],
)
def test_bad_values_exit_2_with_one_line(args: list[str], needles: list[str]) -> None:
    """Values the library refuses before any syscall (InvalidRequest) and a
    --netns that names nothing are bad usage: exit 2, like argparse's."""
    assert_user_error(run_cli(*args), *needles, status=2)


@pytest.mark.parametrize("spi", ["0x100000000", "-1"])
def test_release_spi_out_of_u32_is_user_error(spi: str) -> None:
    assert_user_error(run_cli("release", "--dst", "10.0.0.1", "--spi", spi, "--isolated"), str(int(spi, 0)), status=2)


def test_release_mark_out_of_u32_is_user_error() -> None:
    assert_user_error(
        run_cli("release", "--dst", "10.0.0.1", "--spi", "0xc0000001", "--mark", "1/0x100000000", "--isolated"),
        "4294967296",
        status=2,
    )


def test_exhausted_range_is_user_error_with_kernel_text(named_netns: str) -> None:
    ok(run_cli("alloc", "--dst", "10.0.0.1", "--min", "0x4242", "--max", "0x4242", "--netns", named_netns))
    line = assert_user_error(
        run_cli("alloc", "--dst", "10.0.0.1", "--min", "0x4242", "--max", "0x4242", "--netns", named_netns)
    )
    assert "No SPI available in the requested range" in line
    assert "Errno" not in line  # the kernel's words, not OSError's repr


def not_released(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert all(line.startswith("spialloc: not released: ") for line in lines), lines
    return lines


def test_release_names_what_it_did_not_delete_and_how_to_find_it(named_netns: str) -> None:
    """A marked state needs its --mark and an AH state --proto ah: without
    them `release` used to print "released 0 of 1" and exit 0."""
    where = ("--netns", named_netns)
    (marked,) = json.loads(ok(run_cli("alloc", "--dst", "10.0.0.1", "--mark", "0x10/0xff", "--json", *where)))
    (ah,) = json.loads(ok(run_cli("alloc", "--dst", "10.0.0.1", "--proto", "ah", "--json", *where)))

    proc = run_cli("release", "--dst", "10.0.0.1", "--spi", marked["spi_hex"], *where)
    (line,) = not_released(proc)
    assert proc.stdout.strip() == "released 0 of 1"
    assert marked["spi_hex"] in line and "--mark 0x10/0xff" in line, line
    (line,) = not_released(run_cli("release", "--dst", "10.0.0.1", "--spi", ah["spi_hex"], *where))
    assert "--proto ah" in line, line
    assert ip_spis(named_netns) == {marked["spi"], ah["spi"]}  # nothing deleted

    both = ["--spi", marked["spi_hex"], "--spi", ah["spi_hex"]]
    proc = run_cli("release", "--dst", "10.0.0.1", "--proto", "ah", *both, "--json", *where)
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert (out["released"], out["requested"]) == (1, 2)
    assert [m["spi"] for m in out["not_released"]] == [marked["spi"]]
    assert ip_spis(named_netns) == {marked["spi"]}
    ok(run_cli("release", "--dst", "10.0.0.1", "--spi", marked["spi_hex"], "--mark", "0x10/0xff", *where))
    assert ip_spis(named_netns) == set()


def test_release_if_id_leaves_other_if_ids_alone(named_netns: str) -> None:
    where = ("--netns", named_netns)
    (st,) = json.loads(ok(run_cli("alloc", "--dst", "10.0.0.1", "--if-id", "5", "--json", *where)))
    (line,) = not_released(run_cli("release", "--dst", "10.0.0.1", "--spi", st["spi_hex"], "--if-id", "6", *where))
    assert "if_id is 5, not 6" in line
    assert ip_spis(named_netns) == {st["spi"]}
    ok(run_cli("release", "--dst", "10.0.0.1", "--spi", st["spi_hex"], "--if-id", "5", *where))
    assert ip_spis(named_netns) == set()


def test_help_says_what_release_deletes_and_the_exit_codes() -> None:
    text = ok(run_cli("release", "--help"))
    for flag in ("--proto", "--mark", "--if-id", "--dst", "--spi"):
        assert flag in text
    assert "larval or installed" in " ".join(text.split())
    top = " ".join(ok(run_cli("--help")).split())
    assert "exit status: 0 done; 1" in top and "2 bad usage" in top


def test_seq_as_ip_prints_it_binds_the_acquire(named_netns: str) -> None:
    """`ip -s xfrm state` prints seq N as "0x%08u" of N: pasted into --seq,
    that value is read as the ACQ state it names, not as hex."""
    ns = Namespace.open(named_netns)
    try:
        ev = make_acquire(ns)
    finally:
        ns.close()
    shown = subprocess.run(
        ["ip", "-n", named_netns, "-s", "xfrm", "state"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    ip_seq = f"0x{ev.seq:08d}"
    assert f"seq {ip_seq}" in shown, shown  # what ip really prints
    args = ["alloc", "--dst", "10.99.0.2", "--src", "10.99.0.1", "--mode", "tunnel", "--reqid", "7", "--json"]
    (r,) = json.loads(ok(run_cli(*args, "--seq", ip_seq, "--netns", named_netns)))
    assert r["seq"] == ev.seq
    listed = json.loads(ok(run_cli("list", "--netns", named_netns, "--json")))
    assert [(e["spi"], e["seq"]) for e in listed] == [(r["spi"], ev.seq)]  # the ACQ state itself, bound


def test_seq_in_ip_form_naming_no_acq_state_is_refused(named_netns: str) -> None:
    assert_user_error(
        run_cli("alloc", "--dst", "10.0.0.1", "--seq", "0x00000037", "--netns", named_netns),
        "give the seq in decimal",
        status=2,
    )


def test_list_shows_what_ip_shows_for_a_larval_state(named_netns: str) -> None:
    where = ("--netns", named_netns)
    ok(run_cli("alloc", "--dst", "10.0.0.1", "--mark", "0x10/0xff", "--if-id", "9", "--dir", "in", *where))
    (e,) = json.loads(ok(run_cli("list", "--json", *where)))
    assert (e["mark"], e["if_id"], e["dir"], e["seq"], e["pcpu"], e["larval"]) == ([0x10, 0xFF], 9, "in", 0, None, True)
    assert e["selector"]["dst"] == "10.0.0.1" and e["selector"]["prefixlen_d"] == 32
    assert e["lifetime"]["hard_add_expires"] == 30  # a new namespace's xfrm_acq_expires
    assert e["lifetime"]["hard_bytes"] is None  # no limit
    assert e["expires_at"] == e["added"] + 30
    text = ok(run_cli("list", *where))
    assert "mark 0x10/0xff if_id 0x9 dir in" in text
    assert "sel src 0.0.0.0/32 dst 10.0.0.1/32" in text
    assert "expire add: soft 0(sec), hard " in text


# A stand-in for a slow kernel and a user's Ctrl-C: allocate_many's second call
# says "running" and sleeps, so a SIGINT sent on "running" lands after the first
# chunk (10,000 SPIs) is allocated and before the second asks the kernel.
SLOW_SECOND_CHUNK = r"""
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import spialloc.allocator as A
_real, _calls = A.Allocator.allocate_many, [0]
def _slow(self, *a, **k):
    _calls[0] += 1
    if _calls[0] == 2:
        print("running", file=sys.stderr, flush=True)
        time.sleep(60)
    return _real(self, *a, **k)
A.Allocator.allocate_many = _slow
from spialloc.cli import main
sys.argv = ["spialloc"] + sys.argv[1:]
main()
"""


def interrupted_run(named_netns: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SECOND_CHUNK, "alloc", "--dst", "10.0.0.1", "--count", "30000",
         "--netns", named_netns, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    assert proc.stderr.readline() == "running\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_releases_what_the_run_allocated(named_netns: str) -> None:
    proc = interrupted_run(named_netns)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "spialloc: interrupted: released the 10000 SPIs allocated so far", proc.stderr
    assert proc.stdout == ""
    assert ip_spis(named_netns) == set()


def test_ctrl_c_with_keep_prints_and_keeps_them(named_netns: str) -> None:
    proc = interrupted_run(named_netns, "--keep", "--json")
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "spialloc: interrupted: kept the 10000 SPIs allocated so far (--keep)"
    kept = {e["spi"] for e in json.loads(proc.stdout)}
    assert len(kept) == 10000 and ip_spis(named_netns) == kept


# As SLOW_SECOND_CHUNK, and before the second chunk someone else deletes a
# state of the first (argv[1], the namespace's name): that reservation is lost.
DELETE_BEFORE_SECOND_CHUNK = r"""
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import spialloc.allocator as A
_real, _calls, _netns, _wait = A.Allocator.allocate_many, [0], sys.argv.pop(1), "--wait" in sys.argv
def _second(self, *a, **k):
    _calls[0] += 1
    if _calls[0] == 2:
        lines = subprocess.run(["ip", "-n", _netns, "xfrm", "state", "list"], capture_output=True, text=True).stdout
        victim = min(int(l.split()[l.split().index("spi") + 1], 16) for l in lines.splitlines() if " spi " in l)
        assert _wait or victim < 0x10000 + 10_000  # the first chunk's, not another process's
        subprocess.run(["ip", "-n", _netns, "xfrm", "state", "delete", "dst", "10.0.0.1", "proto", "esp",
                        "spi", hex(victim)], check=True)
        print("deleted", file=sys.stderr, flush=True)
        if _wait:
            time.sleep(60)
    return _real(self, *a, **k)
A.Allocator.allocate_many = _second
from spialloc.cli import main
sys.argv = ["spialloc"] + [a for a in sys.argv[1:] if a != "--wait"]
main()
"""


@pytest.mark.parametrize("end", ["ctrl_c", "range_exhausted"])
def test_a_run_whose_first_chunk_lost_a_state_still_releases_the_rest(named_netns: str, end: str) -> None:
    """A state of the first chunk deleted by someone else, then the run
    ends early (Ctrl-C, or the second chunk fails): the other 9,999 states
    go, the lost one is not asked for, and the message is about the run."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    lo, hi, others = 0x10000, 0x10000 + 10_099, set()
    if end == "ctrl_c":
        extra, count = ["--wait"], 10_200
    else:
        # 60 of the range's 10,100 SPIs held by another process: the second
        # chunk (100) finds 41 free, the lost SPI among them, and fails.
        ok(run_cli("alloc", "--dst", "10.0.0.1", "--count", "60", "--min", str(hi - 59), "--max", str(hi),
                   "--netns", named_netns))  # fmt: skip
        others = ip_spis(named_netns)
        extra, count = ["--min", str(lo), "--max", str(hi)], 10_100
    proc = subprocess.Popen(
        [sys.executable, "-c", DELETE_BEFORE_SECOND_CHUNK, named_netns, "alloc", "--dst", "10.0.0.1",
         "--count", str(count), "--netns", named_netns, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    assert proc.stderr.readline() == "deleted\n"
    if end == "ctrl_c":
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and "not current" not in err, err
    if end == "ctrl_c":
        assert proc.returncode == 130, err
        assert err.strip() == "spialloc: interrupted: released the 9999 SPIs allocated so far", err
    else:
        assert proc.returncode == 1, err
        assert "59 of 100 allocations failed" in err and "41 successful allocations were released" in err, err
    assert out == ""
    assert ip_spis(named_netns) == others


def test_progress_on_a_terminal_only(named_netns: str) -> None:
    """Over a second, on a terminal: "allocated N of M" on stderr; piped or
    with --json, nothing."""
    slow = SLOW_SECOND_CHUNK.replace("time.sleep(60)", "time.sleep(1.2)").replace(
        'print("running", file=sys.stderr, flush=True)', "pass"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-c", slow, "alloc", "--dst", "10.0.0.1", "--count", "20000", "--netns", named_netns]
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=secondary, env=env, timeout=60)
        os.close(secondary)
        secondary = -1
        seen = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the other end is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    assert proc.returncode == 0
    assert b"allocated 20000 of 20000" in seen, seen
    piped = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert piped.returncode == 0 and piped.stderr == ""


def test_pcpu_is_allocated_and_listed(named_netns: str) -> None:
    """A per-CPU SA's larval state: --pcpu reaches the kernel, and list shows
    it (KernelState.pcpu; it was not visible through the API before)."""
    where = ("--netns", named_netns)
    ok(run_cli("alloc", "--dst", "10.0.0.1", "--pcpu", "0", *where))
    (e,) = json.loads(ok(run_cli("list", "--json", *where)))
    assert e["pcpu"] == 0
    assert "pcpu 0" in ok(run_cli("list", *where))
