"""Soak test: allocate/release churn for a long time, watching for leaks.

    python benchmarks/soak.py --ops 1000000 --interval 10 [--json FILE] [--md FILE]
    python benchmarks/soak.py --seconds 600

Runs in a fresh isolated network namespace (needs root or an unprivileged
user namespace), so the host's SAD is never touched.  One "op" is one SPI
allocated and released again.  The churn cycles through every entry point:

  guarded single      Allocator (guard on): allocate() x8, release(list)
  unguarded single    Allocator(guard=False): allocate() x8, release(list)
  guarded batch       allocate_many(64), release
  unguarded batch     allocate_many(64), release
  async single        AsyncAllocator: gather(allocate() x8), release
  async batch         AsyncAllocator.allocate_many(32), release

Releasing right away keeps the kernel's table small (its cost per ALLOCSPI
grows with the number of states), so what is measured is spialloc, not the
table.  Every ``--interval`` seconds a line shows ops done, throughput, RSS
(VmRSS), open fds, guard sizes and the kernel's state count; at the end the
run checks that memory and fds stayed flat after warm-up and that nothing is
left: guards empty, no state in the namespace.  Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spialloc  # noqa: E402
from spialloc import Allocator, AsyncAllocator, Namespace, Reservations  # noqa: E402

DST4 = "192.0.2.1"
DST6 = "2001:db8::1"


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Sample:
    elapsed: float
    ops: int
    ops_per_s: float  # over the last interval
    rss_kb: int
    fds: int
    guard: int
    async_guard: int
    states: int
    threads: int


@dataclass
class Report:
    target_ops: int | None
    target_seconds: float | None
    backend: str
    python: str
    kernel: str
    ops: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # user + system of this process (the kernel's work for it included)
    loadavg: tuple[str, str] = ("", "")  # /proc/loadavg at start and end: other load on the machine
    by_kind: dict[str, int] = field(default_factory=dict)
    us_per_op_by_kind: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    baseline_rss_kb: int = 0
    baseline_fds: int = 0
    final_rss_kb: int = 0
    final_fds: int = 0
    final_states: int = -1
    final_guard: int = -1
    final_async_guard: int = -1
    stats: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0


class Churn:
    """The allocators and one round of every kind of operation."""

    def __init__(self, ns: Namespace) -> None:
        self.guarded = Allocator(ns)
        self.raw = Allocator(ns, guard=False)
        self.loop = asyncio.new_event_loop()
        self.aio = AsyncAllocator(ns)
        self.by_kind: dict[str, int] = {}
        self.time_by_kind: dict[str, float] = {}
        self.errors: dict[str, int] = {}

    def close(self) -> None:
        self.aio.close_now()
        self.loop.close()
        self.raw.close()
        self.guarded.close()

    def _count(self, kind: str, n: int) -> int:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + n
        return n

    def _error(self, kind: str, exc: BaseException) -> None:
        key = f"{kind}: {type(exc).__name__}"
        self.errors[key] = self.errors.get(key, 0) + 1

    def guarded_single(self) -> int:
        got = [self.guarded.allocate(DST4 if i % 2 else DST6) for i in range(8)]
        self.guarded.release(got)
        return self._count("guarded single", len(got))

    def raw_single(self) -> int:
        got = [self.raw.allocate(DST4, "ah" if i % 4 == 0 else "esp") for i in range(8)]
        self.raw.release(got)
        return self._count("unguarded single", len(got))

    def guarded_batch(self) -> int:
        got = self.guarded.allocate_many(64, DST4)
        self.guarded.release(got)
        return self._count("guarded batch", len(got))

    def raw_batch(self) -> int:
        got = self.raw.allocate_many(64, DST6, mark=(7, 0xFF))
        self.raw.release(got)
        return self._count("unguarded batch", len(got))

    def async_single(self) -> int:
        async def run() -> int:
            got = await asyncio.gather(*(self.aio.allocate(DST4) for _ in range(8)))
            await self.aio.release(got)
            return len(got)

        return self._count("async single", self.loop.run_until_complete(run()))

    def async_batch(self) -> int:
        async def run() -> int:
            got = await self.aio.allocate_many(32, DST6)
            assert isinstance(got, Reservations)
            await self.aio.release(got)
            return len(got)

        return self._count("async batch", self.loop.run_until_complete(run()))

    def round(self) -> int:
        done = 0
        steps: list[tuple[str, Callable[[], int]]] = [
            ("guarded single", self.guarded_single),
            ("unguarded single", self.raw_single),
            ("guarded batch", self.guarded_batch),
            ("unguarded batch", self.raw_batch),
            ("async single", self.async_single),
            ("async batch", self.async_batch),
        ]
        for kind, step in steps:
            t0 = time.perf_counter()
            try:
                done += step()
            except spialloc.SpiallocError as exc:  # counted, reported, and a failure at the end
                self._error(kind, exc)
            self.time_by_kind[kind] = self.time_by_kind.get(kind, 0.0) + time.perf_counter() - t0
        return done


def run(
    ops: int | None = 1_000_000,
    seconds: float | None = None,
    interval: float = 10.0,
    warmup: float = 0.1,
    out: Callable[[str], None] = print,
) -> Report:
    """Churn until ``ops`` operations or ``seconds`` have passed; return the report.

    ``warmup``: the fraction of the run (by ops, or by time) after which the
    RSS and fd baselines are taken."""
    ns = Namespace.isolated()
    churn = Churn(ns)
    report = Report(
        target_ops=ops,
        target_seconds=seconds,
        backend=churn.guarded.backend,
        python=platform.python_version(),
        kernel=platform.release(),
    )
    header = (
        f"{'elapsed':>8} {'ops':>10} {'ops/s':>8} {'RSS kB':>8} {'fds':>4} {'guard':>5} {'aguard':>6} {'states':>6}"
    )
    out(header)
    report.loadavg = (_loadavg(), "")
    cpu0 = _cpu()
    start = time.monotonic()
    last_t, last_ops = start, 0
    baseline_taken = False
    done = 0

    def sample(now: float) -> Sample:
        nonlocal last_t, last_ops
        s = Sample(
            elapsed=round(now - start, 2),
            ops=done,
            ops_per_s=round((done - last_ops) / max(now - last_t, 1e-9), 1),
            rss_kb=rss_kb(),
            fds=open_fds(),
            guard=len(churn.guarded.guard or ()),
            async_guard=len(churn.aio.guard or ()),
            states=len(churn.raw.states()),
            threads=len(__import__("threading").enumerate()),
        )
        last_t, last_ops = now, done
        report.samples.append(s)
        out(
            f"{s.elapsed:8.1f} {s.ops:10d} {s.ops_per_s:8.0f} {s.rss_kb:8d} {s.fds:4d} {s.guard:5d} "
            f"{s.async_guard:6d} {s.states:6d}"
        )
        return s

    try:
        next_report = start + interval
        while True:
            now = time.monotonic()
            if ops is not None and done >= ops:
                break
            if seconds is not None and now - start >= seconds:
                break
            done += churn.round()
            now = time.monotonic()
            progress = (done / ops) if ops else ((now - start) / seconds if seconds else 1.0)
            if not baseline_taken and progress >= warmup:
                gc.collect()
                report.baseline_rss_kb, report.baseline_fds = rss_kb(), open_fds()
                baseline_taken = True
            if now >= next_report:
                sample(now)
                next_report = now + interval
        report.seconds = time.monotonic() - start
        report.cpu_seconds = round(_cpu() - cpu0, 2)
        report.loadavg = (report.loadavg[0], _loadavg())
        report.ops = done
        gc.collect()
        sample(time.monotonic())
        report.final_guard = len(churn.guarded.guard or ())
        report.final_async_guard = len(churn.aio.guard or ())
        report.final_states = len(churn.raw.states())
        report.final_rss_kb, report.final_fds = rss_kb(), open_fds()
        report.stats = {
            "guarded": asdict(churn.guarded.stats),
            "unguarded": asdict(churn.raw.stats),
            "async": asdict(churn.aio.stats),
        }
        report.by_kind = dict(churn.by_kind)
        report.us_per_op_by_kind = {k: round(1e6 * churn.time_by_kind[k] / n, 2) for k, n in churn.by_kind.items() if n}
        report.errors = dict(churn.errors)
    finally:
        churn.close()
        ns.close()
    if not baseline_taken:
        report.baseline_rss_kb, report.baseline_fds = report.samples[0].rss_kb, report.samples[0].fds
    report.failures = check(report)
    return report


def check(report: Report, rss_growth: float = 0.10) -> list[str]:
    """What must hold after a soak: flat memory and fds, nothing left over."""
    failures = []
    if report.baseline_rss_kb and report.final_rss_kb > report.baseline_rss_kb * (1 + rss_growth):
        failures.append(
            f"RSS grew {100 * (report.final_rss_kb / report.baseline_rss_kb - 1):.1f}% after warm-up "
            f"({report.baseline_rss_kb} -> {report.final_rss_kb} kB; limit {100 * rss_growth:.0f}%)"
        )
    if report.final_fds != report.baseline_fds:
        failures.append(f"open fds changed after warm-up: {report.baseline_fds} -> {report.final_fds}")
    if report.final_states != 0:
        failures.append(f"{report.final_states} kernel states left after the final release")
    if report.final_guard or report.final_async_guard:
        failures.append(f"guard not empty at the end: {report.final_guard} / async {report.final_async_guard}")
    if report.errors:
        failures.append(f"operations failed: {report.errors}")
    return failures


def markdown(report: Report, command: str) -> str:
    lines = [
        "# Soak: allocate/release churn",
        "",
        f"Command: `{command}`",
        "",
        f"Python {report.python}, kernel {report.kernel}, backend `{report.backend}`, fresh isolated namespace.",
        "",
        f"**{report.ops:,} operations in {report.seconds:.1f} s: {report.ops_per_s:,.0f} ops/s** "
        "(one op = one SPI allocated and released).",
        "",
        f"CPU time {report.cpu_seconds:.1f} s (user + system); load average {report.loadavg[0]} at the start, "
        f"{report.loadavg[1]} at the end ({os.cpu_count()} CPUs): wall-clock figures include waiting for "
        "other work on the machine.",
        "",
        "| kind | ops | µs per op (allocate + release, wall) |",
        "| --- | ---: | ---: |",
        *[f"| {k} | {v:,} | {report.us_per_op_by_kind.get(k, 0):.1f} |" for k, v in report.by_kind.items()],
        "",
        "| elapsed s | ops | ops/s | RSS kB | fds | guard | async guard | kernel states |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    samples = report.samples
    if len(samples) > 40:  # keep the table small: every k-th line plus the last
        k = len(samples) // 40 + 1
        samples = samples[::k] + ([samples[-1]] if samples[-1] is not samples[::k][-1] else [])
    lines += [
        f"| {s.elapsed:.0f} | {s.ops:,} | {s.ops_per_s:,.0f} | {s.rss_kb:,} | {s.fds} | {s.guard} | "
        f"{s.async_guard} | {s.states} |"
        for s in samples
    ]
    growth = 100 * (report.final_rss_kb / report.baseline_rss_kb - 1) if report.baseline_rss_kb else 0.0
    lines += [
        "",
        f"- RSS after warm-up {report.baseline_rss_kb:,} kB, at the end {report.final_rss_kb:,} kB ({growth:+.1f}%)",
        f"- open fds after warm-up {report.baseline_fds}, at the end {report.final_fds}",
        f"- kernel states after the final release: {report.final_states}; guard entries: "
        f"{report.final_guard} (async {report.final_async_guard})",
        f"- errors: {report.errors or 'none'}",
        f"- allocator counters: {json.dumps(report.stats)}",
        "",
        "Result: " + ("**PASS**" if not report.failures else "**FAIL**: " + "; ".join(report.failures)),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=int, default=None, help="operations to run (default 1,000,000 unless --seconds)")
    p.add_argument("--seconds", type=float, default=None, help="run for this long instead")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the run before the baselines are taken")
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--md", metavar="FILE", help="write a Markdown summary")
    args = p.parse_args(argv)
    ops = args.ops if args.ops is not None or args.seconds is not None else 1_000_000
    report = run(ops=ops, seconds=args.seconds, interval=args.interval, warmup=args.warmup)
    print(
        f"{report.ops} ops in {report.seconds:.1f} s = {report.ops_per_s:.0f} ops/s; "
        f"RSS {report.baseline_rss_kb} -> {report.final_rss_kb} kB; fds {report.baseline_fds} -> {report.final_fds}; "
        f"states left {report.final_states}; guard {report.final_guard}/{report.final_async_guard}"
    )
    command = "python " + " ".join(["benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])])
    if args.json:
        data = asdict(report)
        data["ops_per_s"] = report.ops_per_s
        data["command"] = command
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(markdown(report, command))
    for f in report.failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
