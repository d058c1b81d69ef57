"""What following the kernel's SA events costs when others churn SAs.

The guard's watcher listens on XFRMNLGRP_SA besides EXPIRE, so every DELSA
and UPDSA in the namespace, whoever sends it, reaches every guarded
allocator.  Here another process allocates and deletes larval states as fast
as it can (one DELSA event each), while this process allocates and
releases with the guard on; the same with the watcher on EXPIRE only
(``_expiry.SA_GROUP = 0``, what spialloc did before).  Reported: the
allocate+release pair's CPU time (pytest-benchmark, per pair), and the
watcher thread's CPU per event received (extra_info).

    python -m pytest benchmarks/test_sa_churn.py -p no:cacheprovider --benchmark-only
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any, Iterator

import pytest

from spialloc import Allocator, Namespace, _expiry

CHURN_DST = "10.9.0.1"
DST = "10.0.0.1"
PAIRS = 20000


def _churn(path: str, stop: Any, count: Any) -> None:
    with Allocator(path, guard=False) as a:
        n = 0
        while not stop.is_set():
            r = a.allocate(CHURN_DST)
            a.release(r)
            n += 1
        count.value = n


def _thread_cpu(tid: int) -> float:
    fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(params=["sa+expire", "expire-only", "sa+expire, no churn"])
def setup(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    ns = Namespace.isolated()
    ctx = multiprocessing.get_context("fork")
    stop, count = ctx.Event(), ctx.Value("q", 0)
    path = f"/proc/{os.getpid()}/fd/{ns.fd}"
    churn = ctx.Process(target=_churn, args=(path, stop, count)) if "no churn" not in request.param else None
    if request.param == "expire-only":
        monkeypatch.setattr(_expiry, "SA_GROUP", 0)
    if churn is not None:
        churn.start()
    a = Allocator(ns)
    try:
        assert a.core.watcher is not None
        tid = a.core.watcher._thread.native_id
        assert tid is not None
        t0, cpu0 = time.monotonic(), _thread_cpu(tid)
        yield {"alloc": a, "name": request.param}
        seconds, cpu = time.monotonic() - t0, _thread_cpu(tid) - cpu0
    finally:
        stop.set()
        if churn is not None:
            churn.join(30)
        a.close()
        ns.close()
    events = count.value  # one DELSA event per churn pair (ALLOCSPI sends none)
    request.node.user_properties.append(("watcher", {"seconds": seconds, "cpu": cpu, "churn_pairs": count.value}))
    print(
        f"\n{request.param}: churn pairs {count.value} ({count.value / seconds:.0f}/s) in {seconds:.1f} s, "
        f"watcher CPU {cpu:.2f} s" + (f" = {1e6 * cpu / events:.1f} us per DELSA event" if events else "")
    )


def test_allocate_release_under_sa_churn(benchmark: Any, setup: dict[str, Any]) -> None:
    a: Allocator = setup["alloc"]

    def pair() -> None:
        a.release(a.allocate(DST))

    benchmark.group = "allocate+release, guard on, while another process churns larval states"
    benchmark.extra_info["watcher"] = setup["name"]
    benchmark.pedantic(pair, rounds=PAIRS, iterations=1, warmup_rounds=50)
