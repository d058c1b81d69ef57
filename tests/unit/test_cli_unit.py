"""CLI usage errors: argparse rejects them before any namespace or socket is
touched, exit status 2, one error line, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
        timeout=60,
        cwd="/",
    )


def assert_usage_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    line = errors[0]
    assert line.startswith("spialloc"), line
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
    ],
)
def test_other_usage_errors_exit_2(args: list[str], needles: list[str]) -> None:
    assert_usage_error(run_cli(*args), *needles)


def test_help_exits_0() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "alloc" in proc.stdout and "release" in proc.stdout and "list" in proc.stdout
