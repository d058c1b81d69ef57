"""The process's record of bound ACQUIRE seqs (spialloc/_binding.py)."""

from __future__ import annotations

import ipaddress
import os
import pickle
import threading
from typing import Iterator

import pytest

from spialloc import AlreadyBound, InvalidRequest, Proto, Reservation
from spialloc import _binding as binding


@pytest.fixture(autouse=True)
def clean() -> Iterator[None]:
    binding._bound.clear()
    yield
    binding._bound.clear()


def res(spi: int, seq: int) -> Reservation:
    dst = ipaddress.ip_address("192.0.2.1")
    return Reservation(spi=spi, dst=dst, src=dst, proto=Proto.ESP, seq=seq)


def test_a_seq_binds_once() -> None:
    with binding.Claim(7) as c:
        with pytest.raises(AlreadyBound) as info:
            binding.Claim(7)  # a second binding while the first is in flight
        assert info.value.reservation is None and "being bound now" in str(info.value)
        r = c.done(res(0xC0000001, 7))
    with pytest.raises(AlreadyBound) as info:
        binding.Claim(7)
    assert info.value.seq == 7 and info.value.reservation == r
    with pytest.raises(AlreadyBound):
        binding.check(7)  # allocate(seq=) after allocate_for
    assert isinstance(info.value, InvalidRequest)


def test_a_failed_binding_frees_the_seq() -> None:
    with pytest.raises(RuntimeError):
        with binding.Claim(8):
            raise RuntimeError("no SPI")
    with binding.Claim(8) as c:
        c.done(res(1, 8))


def test_allocate_seq_records_but_does_not_refuse() -> None:
    """allocate(seq=) keeps its retry semantics: what it bound is not
    refused to allocate(seq=) again, but allocate_for refuses it."""
    binding.bound(9, res(1, 9), False)
    binding.check(9)  # no error: not strict
    with pytest.raises(AlreadyBound):
        binding.Claim(9)
    binding.bound(9, res(2, 9), False)  # a later allocate(seq=) keeps the first record
    assert binding._bound[9][0] == res(1, 9)


def test_only_the_newest_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(binding, "REMEMBERED", 4)
    for seq in range(1, 7):
        with binding.Claim(seq) as c:
            c.done(res(seq, seq))
    assert list(binding._bound) == [3, 4, 5, 6]
    with binding.Claim(1) as c:  # forgotten: the kernel's ACQ state is long gone
        c.done(res(1, 1))


def test_racing_claims_one_wins() -> None:
    start = threading.Barrier(16)
    wins: list[int] = []

    def go(i: int) -> None:
        start.wait()
        try:
            binding.claim(42)
            wins.append(i)
        except AlreadyBound:
            pass

    threads = [threading.Thread(target=go, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


def test_already_bound_pickles() -> None:
    e = AlreadyBound(5, res(3, 5))
    back = pickle.loads(pickle.dumps(e))
    assert (back.seq, back.reservation, str(back)) == (5, e.reservation, str(e))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_fork_child_keeps_the_bindings_with_a_fresh_lock() -> None:
    with binding.Claim(11) as c:
        c.done(res(1, 11))
    binding._lock.acquire()  # held by this thread at fork time: the child must not wait on it
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                binding.Claim(11)
            except AlreadyBound:
                with binding.Claim(12) as c2:
                    c2.done(res(2, 12))
                code = 0
            finally:
                os._exit(code)
    finally:
        binding._lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
