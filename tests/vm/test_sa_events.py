"""The UPDSA that installs an SA on a reserved SPI, seen by the guard.

The host cannot install an SA (no ESP there), so these run in the guest: an
outside ``ip xfrm state update`` (what a daemon's own netlink code does)
commits the reservation without ``commit()``; one that also changes the
mark still lets ``release()`` delete that SA; and a DELSA of the installed
SA by someone else releases it.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from typing import Callable

import pytest

import spialloc

DST, SRC = "192.0.2.1", "192.0.2.2"


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, "xfrm", "state", *args], check=True, capture_output=True, text=True)


def _update(ns: str, r: spialloc.Reservation, *extra: str) -> None:
    _ip(ns, "update", "src", SRC, "dst", DST, "proto", "esp", "spi", f"{r.spi:#x}",
        "aead", "rfc4106(gcm(aes))", "0x" + secrets.token_hex(20), "128", *extra)  # fmt: skip


def _until(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Under TCG everything is slow: wait generously, decide on the outcome."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_an_outside_updsa_commits_the_reservation(name: str) -> None:
    with spialloc.Allocator(name) as a:
        r = a.allocate(DST, src=SRC)
        _update(name, r)
        assert a.guard is not None
        assert _until(lambda: a.guard is not None and a.guard.state(*r.key) is spialloc.State.COMMITTED)
        st = a.lookup(DST, r.spi)
        assert st is not None and not st.larval
        a.commit(r)  # still fine: committing twice is a no-op
        assert a.release(r) == 1
        assert a.lookup(DST, r.spi) is None


def test_release_follows_a_mark_changed_by_updsa(name: str) -> None:
    """The larval state had mark 0x10/0xff; the update (which the kernel
    matches under the old mask) gives the SA 0x110/0xfff.  A DELSA with the
    reservation's mark misses it; release must still delete it."""
    with spialloc.Allocator(name) as a:
        r = a.allocate(DST, src=SRC, mark=(0x10, 0xFF))
        _update(name, r, "mark", "0x110", "mask", "0xfff")
        assert _until(lambda: a.guard is not None and a.guard.state(*r.key) is spialloc.State.COMMITTED)
        assert a.lookup(DST, r.spi, mark=(0x110, 0xFFF)) is not None
        assert a.release(r) == 1
        assert a.lookup(DST, r.spi, mark=(0x110, 0xFFF)) is None
        assert a.guard is not None and a.guard.state(*r.key) is None


def test_an_outside_delete_of_the_installed_sa_releases_it(name: str) -> None:
    lost: list[spialloc.Reservation] = []
    with spialloc.Allocator(name, on_lost=lost.append) as a:
        r = a.allocate(DST, src=SRC)
        _update(name, r)
        assert _until(lambda: a.guard is not None and a.guard.state(*r.key) is spialloc.State.COMMITTED)
        _ip(name, "delete", "src", SRC, "dst", DST, "proto", "esp", "spi", f"{r.spi:#x}")
        assert _until(lambda: a.guard is not None and a.guard.state(*r.key) is None)
        assert lost == []  # an installed SA that ends was not lost
        with pytest.raises(spialloc.ReservationLost):
            a.commit(r)
