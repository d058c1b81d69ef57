"""A short soak (benchmarks/soak.py) in the normal test run: 20,000
allocate/release operations through every entry point (guarded and unguarded
single and batch, AsyncAllocator), then flat fds, no kernel state left, guards
empty, no errors.  The 10^6-operation run is ``python benchmarks/soak.py``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("spialloc_soak", ROOT / "benchmarks" / "soak.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


def test_soak_20000_ops_is_flat_and_leaves_nothing() -> None:
    soak = _soak()
    lines: list[str] = []
    report = soak.run(ops=20_000, interval=2.0, warmup=0.25, out=lines.append)
    assert report.ops >= 20_000
    assert set(report.by_kind) == {
        "guarded single",
        "unguarded single",
        "guarded batch",
        "unguarded batch",
        "async single",
        "async batch",
    }
    assert report.errors == {}
    assert report.final_fds == report.baseline_fds, lines
    assert all(s.fds == report.baseline_fds for s in report.samples), lines
    assert report.final_states == 0
    assert report.final_guard == 0 and report.final_async_guard == 0
    # a short run is noisier than the long one (10%): a leak of ~1 KiB per op
    # would still show as +20 MiB here
    assert report.final_rss_kb < report.baseline_rss_kb * 1.25 + 4096, lines
    assert soak.check(report, rss_growth=0.25 + 4096 / max(report.baseline_rss_kb, 1)) == []
    assert report.seconds < 20, f"20,000 ops took {report.seconds:.1f} s"
