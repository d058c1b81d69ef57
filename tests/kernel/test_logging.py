"""What spialloc logs (the ``spialloc`` logger tree), provoked on the real
kernel: each event an operator needs comes as one record naming the tuple,
the success path logs nothing at INFO or above, and nothing is printed
unless the application configured logging."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nsutil import make_acquire, wait_for

from spialloc import Allocator, Namespace, Reservation, SpiExhausted

ROOT = Path(__file__).resolve().parents[2]


def records(caplog: pytest.LogCaptureFixture, logger: str, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and r.levelno == level]


def test_success_path_logs_nothing_at_info_or_above(netns: Namespace, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="spialloc")
    with Allocator(netns) as a:
        rs = [a.allocate("10.0.0.1") for _ in range(200)]
        rs += a.allocate_many(2000, "10.0.0.2")
        a.commit(rs[0])
        assert a.release(rs) == len(rs)
    assert [r for r in caplog.records if r.name.startswith("spialloc") and r.levelno >= logging.INFO] == []


def test_collision_and_retry_is_a_warning_with_the_tuple(netns: Namespace, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="spialloc")
    ev = make_acquire(netns)
    with Allocator(netns) as a:
        params = dict(src="10.99.0.1", mode="tunnel", reqid=7, seq=ev.seq)
        r1 = a.allocate("10.99.0.2", **params)  # type: ignore[arg-type]
        a.allocate("10.99.0.2", **params)  # type: ignore[arg-type]  # the kernel returns r1's SPI again
    (rec,) = records(caplog, "spialloc.guard", logging.WARNING)
    assert f"esp spi {r1.spi:#010x} dst 10.99.0.2" in rec.getMessage()
    assert "collision" in rec.getMessage() and "retry 1 of" in rec.getMessage()


def test_lost_reservation_and_failing_callback(netns: Namespace, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="spialloc")

    def on_lost(r: Reservation) -> None:
        raise RuntimeError("daemon bug")

    with Allocator(netns, on_lost=on_lost) as a:
        a.acq_expires = 1
        r = a.allocate("10.0.0.1")
        assert wait_for(lambda: a.stats.lost == 1, timeout=15)
        assert wait_for(lambda: records(caplog, "spialloc.guard", logging.ERROR), timeout=5)
    (lost,) = records(caplog, "spialloc.guard", logging.WARNING)
    assert lost.getMessage().startswith(f"reservation lost: esp spi {r.spi:#010x} dst 10.0.0.1")
    (err,) = records(caplog, "spialloc.guard", logging.ERROR)
    assert str(r) in err.getMessage()
    assert err.exc_info is not None and "daemon bug" in str(err.exc_info[1])  # the traceback goes with it


def test_hold_renewal_is_debug(netns: Namespace, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="spialloc")
    with Allocator(netns) as a:
        a.acq_expires = 1
        r = a.allocate("10.0.0.1", hold=30)
        assert wait_for(lambda: a.stats.renewed >= 1, timeout=15)
        a.release(r)
    renewed = records(caplog, "spialloc.guard", logging.DEBUG)
    assert renewed and f"hold renewed: esp spi {r.spi:#010x} dst 10.0.0.1" in renewed[0].getMessage()
    assert not [x for x in caplog.records if x.name.startswith("spialloc") and x.levelno >= logging.INFO]


def test_refused_directed_pick_is_info(netns: Namespace, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="spialloc")
    with Allocator(netns, guard=False) as other, Allocator(netns) as a:
        foreign = other.allocate("10.0.0.9", spi_range=(0x5000, 0x5000))
        with pytest.raises(SpiExhausted):  # narrow: the guard asks for 0x5000 exactly, which is foreign
            a.allocate("10.0.0.1", spi_range=(0x5000, 0x5000))
        assert a.stats.directed_misses == 1
        other.release(foreign)
    infos = [r.getMessage() for r in records(caplog, "spialloc.guard", logging.INFO)]
    assert any("directed pick refused: esp spi 0x00005000" in m for m in infos), infos


def test_nothing_is_printed_without_logging_configured(netns: Namespace) -> None:
    """A collision (a WARNING) in a process that configured no logging: the
    NullHandler keeps Python's last-resort handler from printing it."""
    assert netns.fd is not None
    code = """
import socket, subprocess, spialloc
ns = spialloc.Namespace.open(None)
for cmd in ("link add va type veth peer name vb", "addr add 10.99.0.1/24 dev va", "link set va up",
            "link set vb up", "xfrm policy add src 10.99.0.1/32 dst 10.99.0.2/32 dir out "
            "tmpl src 10.99.0.1 dst 10.99.0.2 proto esp mode tunnel reqid 7"):
    subprocess.run(["ip", *cmd.split()], check=True)
with spialloc.Monitor() as mon, spialloc.Allocator() as a:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", ("10.99.0.2", 9))
    ev = mon.get(timeout=10)
    for _ in range(2):
        a.allocate(ev.dst, src=ev.src, mode=ev.mode, reqid=ev.reqid, seq=ev.seq)
    assert a.stats.collisions == 1
ns.close()
"""
    proc = subprocess.run(
        ["nsenter", f"--net=/proc/self/fd/{netns.fd}", sys.executable, "-c", code],
        pass_fds=[netns.fd],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == ""
