"""spialloc benchmarks (pytest-benchmark); see conftest.py.  All times are per SPI.

- test_alloc[LEVEL-CASE]: every case of ``_harness.CASES`` at the table
  levels (0, 1,000 and 10,000 outstanding states), and the scaling subset at
  50,000: the floor (C, single and 64 per send), spialloc's C and Python
  batch paths, ``allocate`` one at a time (C/Python backend, guard on/off),
  and
  ``ip xfrm state allocspi`` one process per SPI.
- test_dense_range[kernel|directed]: filling a 4,096-value range.
- test_memory_per_reservation: guard entry + what the caller holds (a batch's
  Reservations, or Reservation objects), traced bytes.
"""

from __future__ import annotations

from typing import Any

import _harness as h
from conftest import per_spi, record


def test_alloc(benchmark: Any, bench_ns: tuple[h.BenchNS, h.BenchNS], case: str, plan: h.Plan) -> None:
    main, guarded = bench_ns
    level = main.prefilled
    index = plan.levels.index(level) + 1  # groups print sorted by name: keep levels in order
    fn = h.case_function(guarded if case in h.GUARDED_CASES else main, case)
    per_spi(
        benchmark,
        fn,
        plan.round_size(case),
        plan.rounds_for(case, level),
        group=f"level {index}: {level:,} outstanding states (per SPI)",
        outstanding=level,
        case=h.CASES[case].label,
    )
    record((level, case), benchmark)


def test_dense_range(benchmark: Any, dense_method: str, plan: h.Plan) -> None:
    lo, hi = plan.dense_range
    fills: list[dict[str, Any]] = []

    def fill(n: int) -> tuple[int, int]:
        d = h.dense_fill(dense_method, lo, hi)
        fills.append(d)
        k = 1e9 * n / d["size"]  # per_spi divides by n again
        return int(d["fill_wall_s"] * k), int(d["fill_s"] * k)  # (wall, CPU)

    per_spi(benchmark, fill, 1, plan.dense_trials, group=f"dense range {lo:#x}-{hi:#x} (per SPI)", warmup=False)
    benchmark.extra_info.update(
        {
            "method": dense_method,
            "range": [lo, hi],
            "spurious_exhausted_per_fill": sum(d["spurious_exhausted"] for d in fills) / len(fills),
            "directed_misses_per_fill": sum(d["directed_misses"] for d in fills) / len(fills),
            "fill_s": [d["fill_s"] for d in fills],
        }
    )
    assert all(d["confirm_exhausted"] for d in fills)
    if dense_method == "directed":
        assert all(d["spurious_exhausted"] == 0 for d in fills)


def test_memory_per_reservation(benchmark: Any, plan: h.Plan) -> None:
    got: list[dict[str, Any]] = []

    def measure(n: int) -> tuple[int, int]:
        d = h.memory(plan.memory_n)
        got.append(d)
        t = int((d["guard_reserve_us"] + d["reservation_build_us"]) * 1000 * n)  # CPU, single-threaded child
        return t, t

    per_spi(benchmark, measure, 1, 1, group="memory: Guard.reserve + Reservation (per reservation)", warmup=False)
    d = got[-1]
    benchmark.extra_info.update(
        {
            "reservations": d["n"],
            "guard_bytes_per_tuple": d["guard_bytes_per_tuple"],
            "reservation_bytes_each_incl_list_slot": d["reservation_bytes_each_incl_list_slot"],
            "batch_bytes_per_reservation": d["batch_bytes_per_reservation"],
            "single_bytes_per_reservation": d["single_bytes_per_reservation"],
        }
    )
    assert d["batch_bytes_per_reservation"] < 1024 and d["single_bytes_per_reservation"] < 1024  # measured, not judged
