"""pytest-benchmark suite for spialloc (not part of the normal test run:
pyproject's ``testpaths`` is ``tests``).

    python -m pytest benchmarks -p no:cacheprovider --benchmark-only [--spialloc-quick]

Every time pytest-benchmark reports here is PER SPI: each round allocates a
batch of SPIs, the case measures only the allocation itself (the floor
program reports its own nanoseconds; release happens after, untimed), and a
virtual clock handed to pytest-benchmark advances by that time divided by the
number of SPIs.  Cases at one level of outstanding states share a benchmark
group, so they print side by side; a summary with ratios to the floor follows
the run.  ``benchmarks/run.py`` runs the same cases interleaved and writes
the report files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402

#: (states, case) -> median seconds per SPI, for the summary
RESULTS: dict[tuple[int, str], float] = {}
#: --spialloc-clock, set at configure time
_CLOCK = ["cpu"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("spialloc benchmarks")
    group.addoption(
        "--spialloc-quick",
        action="store_true",
        default=False,
        help="tiny sizes, no 50k level (also SPIALLOC_BENCH_QUICK=1)",
    )
    group.addoption(
        "--spialloc-clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="what the per-SPI times measure: the measuring thread's CPU time (default; robust when other "
        "processes share the cores) or wall-clock time",
    )


def _plan(config: pytest.Config) -> h.Plan:
    quick = config.getoption("--spialloc-quick") or os.environ.get("SPIALLOC_BENCH_QUICK", "") not in ("", "0")
    return h.Plan.quick_plan() if quick else h.Plan.full()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if h.have_privileges():
        return
    skip = pytest.mark.skip(reason="benchmarks need CAP_NET_ADMIN and CAP_SYS_ADMIN (run as root)")
    for item in items:
        item.add_marker(skip)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    plan = _plan(metafunc.config)
    if {"bench_ns", "case"} <= set(metafunc.fixturenames):
        pairs = [(level, key) for level in plan.levels for key in plan.cases_at(level)]
        metafunc.parametrize(
            ("bench_ns", "case"),
            pairs,
            indirect=["bench_ns"],
            scope="session",  # all cases of one level run together, in one namespace
            ids=[f"{level}-{key}" for level, key in pairs],
        )
    if "dense_method" in metafunc.fixturenames:
        metafunc.parametrize("dense_method", ["kernel", "directed"])


@pytest.fixture(scope="session")
def plan(pytestconfig: pytest.Config) -> h.Plan:
    return _plan(pytestconfig)


@pytest.fixture(scope="session")
def floor_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return h.compile_floor(tmp_path_factory.mktemp("floor"))


@pytest.fixture(scope="session")
def bench_ns(request: pytest.FixtureRequest, floor_binary: Path) -> Iterator[tuple[h.BenchNS, h.BenchNS]]:
    """Two isolated namespaces pre-filled to ``request.param`` larval states
    (acq_expires 3600), each with a floor program inside; gone afterwards.
    The second is the guarded cases' (as in run.py: a guard's watcher must
    not see the unguarded allocators' releases)."""
    with h.BenchNS(floor_binary) as bns, h.BenchNS(floor_binary) as gns:
        bns.fill_to(request.param)
        gns.fill_to(request.param)
        yield bns, gns


class PerSpiClock:
    """pytest-benchmark's timer, advanced by measured nanoseconds / SPIs."""

    __name__ = "per_spi_clock"  # pytest-benchmark prints and saves the timer's name

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def per_spi(
    benchmark: Any,
    fn: Callable[[int], tuple[int, int]],
    n: int,
    rounds: int,
    group: str,
    *,
    warmup: bool = True,
    **extra: object,
) -> None:
    """Benchmark ``fn(n) -> (wall ns, CPU ns)`` (allocate n SPIs) so that
    every statistic pytest-benchmark reports is per SPI, on the clock chosen
    with --spialloc-clock; the other clock's per-round values go to extra_info."""
    if not hasattr(benchmark, "_timer"):
        pytest.fail("pytest-benchmark changed: BenchmarkFixture._timer is gone, the per-SPI clock cannot be installed")
    use_cpu = _CLOCK[0] == "cpu"
    clock = PerSpiClock()
    benchmark._timer = clock
    benchmark.group = group
    other: list[float] = []
    benchmark.extra_info.update(
        {
            "unit": f"{'CPU' if use_cpu else 'wall'} seconds per SPI",
            "spis_per_round": n,
            f"{'wall' if use_cpu else 'cpu'}_seconds_per_spi": other,
            **extra,
        }
    )
    if warmup:
        fn(min(8, n))  # imports, first-call costs; untimed

    def target() -> None:
        wall, cpu = fn(n)
        clock.now += (cpu if use_cpu else wall) / n / 1e9
        other.append((wall if use_cpu else cpu) / n / 1e9)

    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0)


def pytest_configure(config: pytest.Config) -> None:
    _CLOCK[0] = config.getoption("--spialloc-clock")


def record(key: tuple[int, str], benchmark: Any) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        RESULTS[key] = stats.stats.median


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section(f"spialloc: median {_CLOCK[0]} µs per SPI, ratio to the floor of the same kind (same run)")
    for level in sorted({lv for lv, _ in RESULTS}):
        tr.write_line(f"{level:,} outstanding states")
        for (lv, key), secs in RESULTS.items():
            if lv != level:
                continue
            floor = RESULTS.get((lv, h.FLOOR_OF[h.CASES[key].mode]))
            ratio = f"{secs / floor:8.2f}x" if floor else "        "
            tr.write_line(f"  {h.CASES[key].label:66s} {secs * 1e6:10.2f} µs {ratio}")
    from run import TARGET_LEVELS, TARGETS

    for key, floor_key, target, _ in TARGETS:
        for level in TARGET_LEVELS:
            a, b = RESULTS.get((level, key)), RESULTS.get((level, floor_key))
            if a and b:
                verdict = "met" if a / b <= target else "NOT met"
                tr.write_line(f"target {key} / {floor_key} <= {target}: {a / b:.2f} at {level:,} states ({verdict})")
