"""CLI usage errors: rejected before any socket is made (argparse, or a
--netns that names no network namespace), exit status 2, one line on stderr
(no usage block), no traceback, no hang."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run(
        [sys.executable, "-m", "spialloc.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        cwd="/",
    )


def assert_usage_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("spialloc") and "error: " in line, line
    for n in needles:
        assert n in line, (n, line)
    return line


@pytest.mark.parametrize(
    "args, needles",
    [
        (["alloc", "--dst", "10.0.0.1", "--count", "abc"], ["--count", "'abc'", "not an integer"]),
        (["alloc", "--dst", "10.0.0.1", "--min", "0xZZ"], ["--min", "'0xZZ'"]),
        (["alloc", "--dst", "10.0.0.1", "--max", "1.5"], ["--max", "'1.5'"]),
        (["alloc", "--dst", "10.0.0.1", "--reqid", ""], ["--reqid"]),
        (["alloc", "--dst", "10.0.0.1", "--mark", "5/zz"], ["--mark"]),
        (["alloc", "--dst", "10.0.0.1", "--if-id", "x"], ["--if-id", "'x'"]),
        (["release", "--dst", "10.0.0.1", "--spi", "nope"], ["--spi", "'nope'"]),
        (["alloc", "--dst", "10.0.0.1", "--count", "99999999999999999999"], ["--count", "99999999999999999999"]),
        (["alloc", "--dst", "10.0.0.1", "--count", str(1 << 32)], ["--count", str(1 << 32), "4294967295"]),
        (["alloc", "--dst", "10.0.0.1", "--count", "0"], ["--count", "'0'", "from 1"]),
        (["alloc", "--dst", "10.0.0.1", "--count", "-1"], ["--count", "'-1'", "from 1"]),
    ],
)
def test_bad_integer_exits_2_with_one_line(args: list[str], needles: list[str]) -> None:
    assert_usage_error(run_cli(*args), *needles)


@pytest.mark.parametrize(
    "args",
    [
        ["alloc", "--dst", "10.0.0.1", "--netns", "blue", "--isolated"],
        ["list", "--isolated", "--netns", "blue"],
        ["release", "--dst", "10.0.0.1", "--spi", "0x100", "--netns", "/proc/1/ns/net", "--isolated"],
    ],
)
def test_netns_and_isolated_conflict_exits_2(args: list[str]) -> None:
    line = assert_usage_error(run_cli(*args))
    assert "--netns" in line and "--isolated" in line and "not allowed" in line


@pytest.mark.parametrize(
    "args, needles",
    [
        (["alloc", "--dst", "10.0.0.1", "--proto", "gre"], ["--proto", "'gre'"]),
        (["alloc", "--dst", "10.0.0.1", "--mode", "tunel"], ["--mode", "'tunel'"]),
        (["alloc", "--dst", "10.0.0.1", "--dir", "up"], ["--dir", "'up'"]),
        (["alloc"], ["--dst"]),
        (["release", "--dst", "10.0.0.1"], ["--spi"]),
        (["frobnicate"], ["'frobnicate'"]),
        ([], ["command"]),
        (["list", "--bogus"], ["--bogus"]),
        (["alloc", "--dst", "10.0.0.1", "--seq", "5", "--count", "2"], ["--seq", "--count 1"]),
    ],
)
def test_other_usage_errors_exit_2(args: list[str], needles: list[str]) -> None:
    assert_usage_error(run_cli(*args), *needles)


@pytest.mark.parametrize(
    "make, needles",
    [
        (lambda d: os.mkfifo(d / "ns") or str(d / "ns"), ["not a network namespace", "FIFO"]),
        (lambda d: str(d), ["not a network namespace", "directory"]),
        (lambda d: (d / "ns").write_text("x") and str(d / "ns"), ["not a network namespace", "regular file"]),
        (lambda d: "/proc/self/ns/uts", ["not a network namespace", "another kind of namespace"]),
        (lambda d: "spialloc-missing-zz9", ["/run/netns/spialloc-missing-zz9", "No such file"]),
        (lambda d: str(d / "missing" / "ns"), ["No such file"]),
        (lambda d: "", ["netns=''"]),
    ],
    ids=["fifo", "directory", "regular-file", "uts-namespace", "missing-name", "missing-path", "empty"],
)
@pytest.mark.parametrize("command", [["list"], ["alloc", "--dst", "10.0.0.1"]])
def test_netns_not_a_network_namespace_exits_2(
    tmp_path: Path, make: Any, needles: list[str], command: list[str]
) -> None:
    """--netns naming a FIFO used to hang forever (open(2) waits for a
    writer); a file, a directory or another namespace type failed later as
    "cannot enter network namespace" with exit status 1."""
    spec = make(tmp_path)
    line = assert_usage_error(run_cli(*command, "--netns", spec), *needles)
    assert line.startswith("spialloc: error: ")
    assert spec in line


def test_help_exits_0() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "alloc" in proc.stdout and "release" in proc.stdout and "list" in proc.stdout


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--min", "0x1000", "--max", "0x10ff", "--count", "257"], ["--count 257", "256 SPIs", "0x1000-0x10ff"]),
        (["--proto", "comp", "--count", "61185"], ["--count 61185", "61184 SPIs"]),
        (["--count", "1000001"], ["--count 1000001", "1000000"]),
    ],
)
def test_count_beyond_the_range_or_the_ceiling_is_refused_before_any_syscall(
    args: list[str], needles: list[str]
) -> None:
    """No namespace is opened (a --netns that does not exist is never looked
    at): the count is checked first."""
    proc = run_cli("alloc", "--dst", "10.0.0.1", "--netns", "spialloc-no-such-ns-zz", *args)
    assert_usage_error(proc, *needles)


def test_version() -> None:
    from importlib.metadata import version

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"spialloc {version('spialloc')}"
    import spialloc

    assert spialloc.__version__ == version("spialloc")


def test_help_documents_exit_codes_and_keep() -> None:
    text = " ".join(run_cli("--help").stdout.split())
    assert "exit status: 0 done" in text and "130 interrupted" in text
    assert "--keep" in run_cli("alloc", "--help").stdout
