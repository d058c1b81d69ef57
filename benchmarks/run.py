#!/usr/bin/env python3
"""The whole benchmark suite in one command.

    python benchmarks/run.py [--quick] [--out DIR]

Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN) and a C compiler.  Every
namespace it uses is made here (``Namespace.isolated()``) and gone at the end;
the host's SAD is checked to be untouched.  Two namespaces, pre-filled alike
at each level: the guarded cases in one (their expiry watchers see only
their own guard's allocators), everything else in the other; rounds of all
cases interleave across both.  Writes ``results.json`` (raw numbers,
machine, command), ``results.md`` (tables) and ``scaling.png`` (needs
matplotlib, the ``bench`` extra) to DIR (default benchmarks/results/).

``--quick`` runs everything tiny (no 50k level, no PNG without matplotlib)
so CI can smoke-test it; its numbers mean little.  No number fails a run:
targets are reported met or not, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402

#: Issue 15's targets: (case, floor of the same kind, limit, what).  Each is judged on
#: the ratio of CPU medians and of wall medians to that floor, same run, at TARGET_LEVELS.
TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("c_batch", "floor_batch", 1.10, 'allocate_many, backend "c", guard off'),
    ("c_batch_guard", "floor_batch", 1.20, 'allocate_many, backend "c", guard on'),
    ("single_c", "floor_single", 1.50, 'allocate, backend "c", guard off'),
    ("single_c_guard", "floor_single", 1.75, 'allocate, backend "c", guard on'),
    ("py_batch", "floor_batch", 2.2, 'allocate_many, backend "python" (pure-Python engine), guard off'),
    ("single_py", "floor_single", 2.2, 'allocate, backend "python" (pure-Python engine), guard off'),
)
TARGET_LEVELS = (0, 1000)
#: The first allocate_many of a fresh process vs that process's warm ones.
TARGET_COLD_START = 1.2
#: Bytes per outstanding reservation (guard entry + what the caller holds), at 10^6.
TARGET_MEMORY = 120


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test that takes seconds")
    ap.add_argument("--out", type=Path, default=h.HERE / "results", help="output directory (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=1, help="seed for the round order (default: %(default)s)")
    ap.add_argument(
        "--cpu",
        type=int,
        default=max(os.sched_getaffinity(0)),
        help="pin this process and every child (the floors included) to this CPU; -1: no pinning "
        "(default: the last CPU, %(default)s)",
    )
    args = ap.parse_args(argv)
    if args.cpu >= 0:
        # The floor programs and spialloc then run on one core, alike: unpinned,
        # the floor's cost per SPI moved by a fifth between runs as the scheduler
        # placed it on the other core or this one.
        os.sched_setaffinity(0, {args.cpu})

    if not h.have_privileges():
        print(
            "benchmarks/run.py needs CAP_NET_ADMIN and CAP_SYS_ADMIN (run as root): "
            "it makes network namespaces and allocates SPIs in them",
            file=sys.stderr,
        )
        return 2
    plan = h.Plan.quick_plan() if args.quick else h.Plan.full()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {msg}", flush=True)

    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "machine": h.machine_info(),
        "pinned_cpu": args.cpu if args.cpu >= 0 else None,
        "load_before": list(os.getloadavg()),
        "plan": plan.as_dict(),
        "cases": {k: {"label": c.label, "mode": c.mode} for k, c in h.CASES.items()},
    }
    host_before = h.host_sad_count()
    tmp = h.make_tempdir()
    try:
        binary = h.compile_floor(tmp)
        results["floor"] = {
            "source": "benchmarks/floor.c",
            "compiled_with": "cc -O2",
            "batch": h.FLOOR_BATCH,
            "request_bytes_match_spialloc": h.floor_template_matches(binary),
        }
        rng = random.Random(args.seed)
        levels: dict[str, Any] = {}
        results["namespaces"] = {
            "main": "floors, unguarded cases, ip_process, breakdown (unguarded pieces), cold start",
            "guarded": f"the guarded cases ({', '.join(h.GUARDED_CASES)}) and the breakdown's guarded pieces",
            "note": "both pre-filled to the same level (each by a floor program of its own); "
            "rounds of all cases interleave across both",
        }
        # Two namespaces, the same acq_expires (BenchNS's default) and pre-fill: a
        # guard's watcher must not wake on the unguarded allocators' releases.
        with h.BenchNS(binary) as bns, h.BenchNS(binary) as gns:
            try:
                results["spialloc_batch_chunk"] = bns.allocator("c", False).core.kernel.sock.window()
            except Exception as exc:  # private; informative only
                results["spialloc_batch_chunk"] = f"unknown ({exc})"
            for level in plan.levels:
                log(f"level {level}: pre-filling both namespaces")
                fill_s = bns.fill_to(level)
                gfill_s = gns.fill_to(level)
                states = {"main": bns.sad_count(), "guarded": gns.sad_count()}
                if set(states.values()) != {level}:
                    raise RuntimeError(f"level {level}: namespaces hold {states} states")
                log(
                    f"level {level}: {states['main']} + {states['guarded']} states "
                    f"(pre-fill took {fill_s:.1f}s + {gfill_s:.1f}s); measuring"
                )
                cases = h.measure_level(bns, plan, level, plan.cases_at(level), rng, log, guarded=gns)
                levels[str(level)] = {
                    "prefill_s": fill_s,
                    "prefill_guarded_s": gfill_s,
                    "states": states,
                    "cases": cases,
                }
                if level == plan.levels[0]:
                    log(f"level {level}: single-path breakdown and profiles")
                    results["breakdown"] = h.breakdown(bns, plan.profile_n, plan.n, guarded_ns=gns)
                    log(
                        f"level {level}: cold start, {plan.coldstart_trials} fresh process(es) per guard setting, "
                        f"first allocate_many({plan.coldstart_n}) vs {plan.coldstart_warm} warm"
                    )
                    results["cold_start"] = h.cold_start(bns, plan, log)
        results["levels"] = levels
        lo, hi = plan.dense_range
        dense: dict[str, list[dict[str, Any]]] = {"kernel": [], "directed": []}
        for trial in range(plan.dense_trials):
            for method in ("kernel", "directed"):
                log(f"dense range {lo:#x}-{hi:#x}, {method}, trial {trial + 1}/{plan.dense_trials}")
                d = h.dense_fill(method, lo, hi)
                log(
                    f"    {d['fill_s']:.2f}s CPU ({d['fill_wall_s']:.2f}s wall), {d['us_per_spi']:.1f} us/SPI, "
                    f"{d['spurious_exhausted']} spurious SpiExhausted, {d['directed_misses']} directed misses"
                )
                dense[method].append(d)
        results["dense"] = dense
        log(f"memory: {plan.memory_n:,} reservations, tracemalloc")
        results["memory"] = h.memory(plan.memory_n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    host_after = h.host_sad_count()
    results["host_sad"] = {"before": host_before, "after": host_after, "untouched": host_before == host_after}
    results["load_after"] = list(os.getloadavg())
    results["elapsed_s"] = time.monotonic() - started
    results["derived"] = derive(results, plan)

    png = out / "scaling.png"
    results["png"] = plot(results, png)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    md = render_md(results, plan)
    (out / "results.md").write_text(md)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f", {png}" if results["png"] else " (no PNG)"))
    print()
    print(md)
    if host_before != host_after:
        print("ERROR: the host SAD changed during the run", file=sys.stderr)
        return 1
    return 0


# --- derived numbers -------------------------------------------------------------


def _med(results: dict[str, Any], level: int, key: str, stat: str = "median_us", clock: str = "cpu") -> float | None:
    case = results["levels"].get(str(level), {}).get("cases", {}).get(key)
    return None if case is None else float(case[clock][stat])


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _ratios(results: dict[str, Any], level: int, key: str, floor_key: str) -> dict[str, float | None]:
    return {
        "ratio_median": _ratio(_med(results, level, key), _med(results, level, floor_key)),
        "ratio_min": _ratio(_med(results, level, key, "min_us"), _med(results, level, floor_key, "min_us")),
        "ratio_median_wall": _ratio(
            _med(results, level, key, clock="wall"), _med(results, level, floor_key, clock="wall")
        ),
    }


def _met(cpu: float | None, wall: float | None, limit: float) -> bool | None:
    """Both medians' ratios within the limit; None when either is missing."""
    return None if cpu is None or wall is None else cpu <= limit and wall <= limit


def derive(results: dict[str, Any], plan: h.Plan) -> dict[str, Any]:
    d: dict[str, Any] = {"ratios": {}, "guard": {}, "scaling": [], "targets": {}}
    for level in plan.table_levels:
        rows = {}
        for key in plan.cases_at(level):
            floor_key = h.FLOOR_OF[h.CASES[key].mode]
            rows[key] = {"vs": floor_key, **_ratios(results, level, key, floor_key)}
        d["ratios"][str(level)] = rows
        g = {}
        for on, off in (("single_c_guard", "single_c"), ("single_py_guard", "single_py"), ("c_batch_guard", "c_batch")):
            a, b = _med(results, level, on), _med(results, level, off)
            aw, bw = _med(results, level, on, clock="wall"), _med(results, level, off, clock="wall")
            g[on] = {
                "vs": off,
                "ratio": _ratio(a, b),
                "ratio_wall": _ratio(aw, bw),
                "extra_us": None if a is None or b is None else a - b,
                "extra_wall_us": None if aw is None or bw is None else aw - bw,
            }
        d["guard"][str(level)] = g
    for level in plan.levels:
        row: dict[str, Any] = {"level": level}
        for key in h.SCALING_CASES:
            row[key] = _med(results, level, key)
            row[f"{key}_wall"] = _med(results, level, key, clock="wall")
        for key, floor_key in (
            ("c_batch", "floor_batch"),
            ("single_c", "floor_single"),
            ("single_c_guard", "floor_single"),
        ):
            a, b = row[key], row[floor_key]
            row[f"{key}_minus_floor_us"] = None if a is None or b is None else a - b
            row[f"{key}_ratio"] = _ratio(a, b)
            row[f"{key}_ratio_wall"] = _ratio(row[f"{key}_wall"], row[f"{floor_key}_wall"])
        d["scaling"].append(row)
    for key, floor_key, limit, what in TARGETS:
        per_level = {}
        for level in TARGET_LEVELS:
            r = _ratios(results, level, key, floor_key)
            per_level[str(level)] = {
                "cpu_ratio": r["ratio_median"],
                "wall_ratio": r["ratio_median_wall"],
                "cpu_ratio_min": r["ratio_min"],
                "met": _met(r["ratio_median"], r["ratio_median_wall"], limit),
            }
        mets = [x["met"] for x in per_level.values()]
        d["targets"][key] = {
            "kind": "vs_floor",
            "name": what,
            "case": key,
            "floor": floor_key,
            "limit": limit,
            "levels": per_level,
            "met": None if None in mets else all(mets),
        }
    cs = results.get("cold_start")
    for setting in ("off", "on"):
        c = None if cs is None else cs[f"guard_{setting}"]
        cpu = None if c is None else c["ratio_cpu_median"]
        wall = None if c is None else c["ratio_wall_median"]
        met = _met(cpu, wall, TARGET_COLD_START)
        d["targets"][f"cold_start_guard_{setting}"] = {
            "kind": "cold_start",
            "name": f"first allocate_many of a process vs its warm ones, guard {setting}",
            "limit": TARGET_COLD_START,
            "level": None if cs is None else cs["states_before"],
            "trials": None if cs is None else cs["trials"],
            "cpu_ratio": cpu,
            "wall_ratio": wall,
            "met": met,
        }
    return d


# --- Markdown --------------------------------------------------------------------


def _f(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:,.{nd}f}"


def _us(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if x >= 1000 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def _level_name(level: int) -> str:
    return f"{level:,}"


def _yes(met: bool | None) -> str:
    return "n/a" if met is None else "yes" if met else "no"


def render_md(results: dict[str, Any], plan: h.Plan) -> str:
    m = results["machine"]
    der = results["derived"]
    L: list[str] = []
    add = L.append
    add("# spialloc benchmarks" + (" (quick smoke run: sizes too small to mean much)" if plan.quick else ""))
    add("")
    add(f"- command: `{' '.join(results['command'])}`")
    add(
        "- one quiet run: every number below comes from this single invocation (medians over its rounds, "
        "not over runs), with no other benchmark running; none is asserted (targets say met or not)"
    )
    add(f"- date: {results['date']}, took {results['elapsed_s']:.0f} s")
    add(
        f"- machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, Python {m['python']}, "
        f"spialloc {m['spialloc_version']} (default backend `{m['spialloc_backend_default']}`), "
        f"git {str(m['git_commit'])[:12]}{' (dirty tree)' if m['git_dirty'] else ''}"
    )
    pinned = results.get("pinned_cpu")
    add(
        f"- pinned to CPU {pinned}, this process and every child (floor programs, cold-start processes)"
        if pinned is not None
        else "- not pinned (`--cpu -1`): the scheduler placed processes"
    )
    lb, la = results["load_before"], results["load_after"]
    add(
        f"- load average (1/5/15 min): before {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f}, "
        f"after {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f} "
        "(other processes share the cores: medians of interleaved rounds are reported)"
    )
    hs = results["host_sad"]
    verdict = "untouched" if hs["untouched"] else "CHANGED"
    add(f"- host SAD: {hs['before']} states before, {hs['after']} after ({verdict})")
    fl = results["floor"]
    add(
        f"- floor: `benchmarks/floor.c`, {fl['compiled_with']}, requests prebuilt, byte-identical to "
        f"spialloc's template (seq aside): {fl['request_bytes_match_spialloc']}; batched = {fl['batch']} "
        f"requests per send then {fl['batch']} recv(); spialloc's batch sends up to "
        f"{results.get('spialloc_batch_chunk')} requests per sendmsg and reads replies with recvmmsg"
    )
    add("")

    # main table
    tl = plan.table_levels
    add("## Cost per SPI")
    add("")
    add(
        f"Rounds of {plan.n} SPIs (`ip`: {plan.ip_n}) allocated (timed) then released (untimed), all cases "
        "interleaved in a shuffled order each round. Two namespaces, pre-filled alike: the guarded cases "
        f"({', '.join(f'`{k}`' for k in h.GUARDED_CASES)}) in one, everything else in the other, so no guard's "
        "expiry watcher wakes on the unguarded allocators' releases (a daemon shares one guard per namespace). "
        "CPU = user + system time of the measuring thread (the kernel does ALLOCSPI inside send(), in that "
        "thread); wall counts other processes' turns on the cores too. Median µs per SPI over the rounds; "
        "× floor = ratio of medians (CPU; wall) to the floor of the same kind in the same run (batch cases vs "
        "the floor batched, one-at-a-time cases vs the floor single). Levels: states already in each namespace "
        f"(pre-filled larval states, another dst): {', '.join(map(_level_name, tl))}."
    )
    add("")
    head = "| case |"
    sep = "| --- |"
    for level in tl:
        at = f"@{_level_name(level)}"
        head += f" CPU µs/SPI {at} | × floor CPU {at} | wall µs/SPI {at} | × floor wall {at} |"
        sep += " ---: | ---: | ---: | ---: |"
    add(head)
    add(sep)
    for key in h.TABLE_CASES:
        row = f"| {h.CASES[key].label} |"
        for level in tl:
            r = der["ratios"][str(level)].get(key, {})
            tag = " (b)" if r.get("vs") == "floor_batch" else " (s)"
            row += (
                f" {_us(_med(results, level, key))} | {_f(r.get('ratio_median'))}{tag} |"
                f" {_us(_med(results, level, key, clock='wall'))} | {_f(r.get('ratio_median_wall'))}{tag} |"
            )
        add(row)
    add("")
    add(
        '(s) vs floor single, (b) vs floor batched. One at a time, backend "c" sends, reads and parses in '
        'one C call (`spialloc_alloc_one`); backend "python" through Python\'s socket and struct: the rows '
        "compare the two single paths."
    )
    add("")

    # targets
    add("## Targets")
    add("")
    add(
        "Issue 15's targets. Ratio of medians to the floor of the same kind, same run, CPU and wall; "
        f"met = both within the limit, at each of {' and '.join(_level_name(lv) for lv in TARGET_LEVELS)} "
        "states. Reported, never asserted."
    )
    add("")
    head = "| target | case / floor | limit |"
    sep = "| --- | --- | ---: |"
    for lv in TARGET_LEVELS:
        head += f" CPU @{_level_name(lv)} | wall @{_level_name(lv)} | met @{_level_name(lv)} |"
        sep += " ---: | ---: | --- |"
    add(head)
    add(sep)
    for t in der["targets"].values():
        if t["kind"] != "vs_floor":
            continue
        row = f"| {t['name']} | `{t['case']}` / `{t['floor']}` | ≤ {t['limit']:.2f} |"
        for lv in TARGET_LEVELS:
            x = t["levels"][str(lv)]
            row += f" {_f(x['cpu_ratio'])} | {_f(x['wall_ratio'])} | {_yes(x['met'])} |"
        add(row)
    add("")
    cold = [t for t in der["targets"].values() if t["kind"] == "cold_start"]
    if cold:
        add(
            "Cold start: first `allocate_many` of a fresh process / median of its warm ones "
            "(median over fresh processes; see below)."
        )
        add("")
        add("| target | limit | states | processes | CPU | wall | met |")
        add("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for t in cold:
            states = "n/a" if t["level"] is None else _level_name(t["level"])
            trials = "n/a" if t["trials"] is None else t["trials"]
            add(
                f"| {t['name']} | ≤ {t['limit']:.2f} | {states} | {trials} | "
                f"{_f(t['cpu_ratio'])} | {_f(t['wall_ratio'])} | {_yes(t['met'])} |"
            )
        add("")

    # guard
    add("## Guard overhead")
    add("")
    add(
        "Guarded / unguarded medians in the same run (the guarded in their own namespace, pre-filled alike); "
        "extra µs is the CPU medians' difference per SPI."
    )
    add("")
    add(
        "| guarded case | vs unguarded | "
        + " | ".join(
            f"ratio CPU @{_level_name(lv)} | ratio wall @{_level_name(lv)} | extra CPU µs @{_level_name(lv)}"
            for lv in tl
        )
        + " |"
    )
    add("| --- | --- |" + " ---: | ---: | ---: |" * len(tl))
    for key in ("single_c_guard", "single_py_guard", "c_batch_guard"):
        row = f"| `{key}` | `{der['guard'][str(tl[0])][key]['vs']}` |"
        for lv in tl:
            g = der["guard"][str(lv)][key]
            row += f" {_f(g['ratio'])} | {_f(g['ratio_wall'])} | {_f(g['extra_us'])} |"
        add(row)
    add("")

    # scaling
    add("## Scaling with the number of states in the namespace")
    add("")
    add(
        "Median CPU µs per SPI at each level (rounds allocated and released at that level; the pre-fill stays); "
        "ratios to the floor of the same kind, of CPU medians and of wall medians; pre-fill s: main + guarded "
        "namespace. "
        "The kernel scans the whole table per pick (KERNEL.md), so everything grows with the level; "
        "spialloc's own work should show as a constant difference to the floor, its ratio going to 1."
    )
    add("")
    add(
        "| states | floor single | floor batched | C batch | allocate | allocate, guard | "
        "C batch − floor batched | allocate − floor single | allocate, guard − floor single | "
        "C batch ratio CPU; wall | allocate ratio CPU; wall | allocate, guard ratio CPU; wall | pre-fill s |"
    )
    add("| ---: |" + " ---: |" * 12)
    for row in der["scaling"]:
        lv = row["level"]
        lvl = results["levels"][str(lv)]
        add(
            f"| {_level_name(lv)} | {_us(row['floor_single'])} | {_us(row['floor_batch'])} | {_us(row['c_batch'])} | "
            f"{_us(row['single_c'])} | {_us(row['single_c_guard'])} | {_f(row['c_batch_minus_floor_us'])} | "
            f"{_f(row['single_c_minus_floor_us'])} | {_f(row['single_c_guard_minus_floor_us'])} | "
            f"{_f(row['c_batch_ratio'])}; {_f(row['c_batch_ratio_wall'])} | "
            f"{_f(row['single_c_ratio'])}; {_f(row['single_c_ratio_wall'])} | "
            f"{_f(row['single_c_guard_ratio'])}; {_f(row['single_c_guard_ratio_wall'])} | "
            f"{_f(lvl['prefill_s'], 1)} + {_f(lvl.get('prefill_guarded_s'), 1)} |"
        )
    add("")
    if results.get("png"):
        add("![cost per SPI vs outstanding states](scaling.png)")
        add("")

    add(
        "Dotted lines in the right panel: the ratio a constant per-SPI overhead (the one measured at 0 states) "
        "would give, 1 + overhead / floor. At 10,000 states and more the kernel's scan dominates and "
        "round-to-round spread is large on a shared machine (every round's numbers are in results.json); "
        "differences of a few µs there are within noise."
    )
    add("")

    # cold start
    cs = results.get("cold_start")
    if cs:
        add(f"## Cold start: the first `allocate_many({cs['n']:,})` of a process")
        add("")
        add(
            f"{cs['trials']} fresh `{Path(sys.executable).name}` process(es) per guard setting, in the main "
            f"namespace ({_level_name(cs['states_before'])} pre-filled states): import spialloc, open an "
            f"Allocator (both untimed), then time the first `allocate_many({cs['n']:,})` and {cs['warm_rounds']} "
            "more (each released, untimed). µs per SPI, medians over the processes; ratio = first / median of "
            "that process's warm rounds, median over processes. CPU = the calling thread's."
        )
        add("")
        add(
            "| guard | first CPU µs/SPI | warm CPU µs/SPI | ratio CPU | first wall µs/SPI | warm wall µs/SPI | "
            "ratio wall | import ms | open ms |"
        )
        add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for setting in ("off", "on"):
            c = cs[f"guard_{setting}"]
            add(
                f"| {setting} | {_us(c['first_cpu_us_per_spi_median'])} | {_us(c['warm_cpu_us_per_spi_median'])} | "
                f"{_f(c['ratio_cpu_median'])} | {_us(c['first_wall_us_per_spi_median'])} | "
                f"{_us(c['warm_wall_us_per_spi_median'])} | {_f(c['ratio_wall_median'])} | "
                f"{_f(c['import_s_median'] * 1000, 0)} | {_f(c['open_s_median'] * 1000, 0)} |"
            )
        add("")

    # dense
    lo, hi = plan.dense_range
    add(f"## Dense range: filling {lo:#x}-{hi:#x} ({hi - lo + 1:,} values) one SPI at a time")
    add("")
    add(
        "kernel = guard off, the kernel's random picks with replacement; a SpiExhausted while values are still "
        "free is spurious (counted, retried). directed = guard on: the guard picks a free value and asks the "
        "kernel for exactly it. Fresh namespace per fill. Mean over trials; CPU = the allocating thread's "
        "user + system time (the kernel's picks included), wall for reference."
    )
    add("")
    add(
        "| method | trials | fill, CPU s | µs/SPI | fill, wall s | last 1%, CPU s | spurious SpiExhausted per fill | "
        "ALLOCSPI calls per fill | directed misses | proving full, CPU s |"
    )
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for method, trials in results["dense"].items():
        n = len(trials)

        def mean(k: str, trials: list[dict[str, Any]] = trials, n: int = n) -> float:
            return sum(float(t[k]) for t in trials) / n

        add(
            f"| {method} | {n} | {_f(mean('fill_s'), 3)} | {_f(mean('us_per_spi'), 1)} | "
            f"{_f(mean('fill_wall_s'), 3)} | "
            f"{_f(mean('last_1pct_s'), 3)} | {_f(mean('spurious_exhausted'))} | {_f(mean('calls'), 0)} | "
            f"{_f(mean('directed_misses'))} | {_f(mean('confirm_s'), 4)} |"
        )
    add("")

    # memory
    mem = results["memory"]
    add(f"## Memory per outstanding reservation ({mem['n']:,} of them, tracemalloc, no kernel)")
    add("")
    add(
        f"Target: ≤ {TARGET_MEMORY} bytes per reservation held (guard entry + the caller's handle), "
        f'scope "spi", one dst.'
    )
    add("")
    add("| held as | bytes each | met |")
    add("| --- | ---: | --- |")
    batch = mem["batch_bytes_per_reservation"]
    single = mem["single_bytes_per_reservation"]
    add(
        f"| `allocate_many({mem['batch_chunk']})` results (`Reservations`): guard entry + SPI and token "
        f"in the batch's arrays | {_f(batch, 1)} | {'yes' if batch <= TARGET_MEMORY else 'no'} |"
    )
    add(
        f"| `allocate()` results, each `Reservation` object kept in a list: guard entry + object "
        f"| {_f(single, 1)} | {'yes' if single <= TARGET_MEMORY else 'no'} |"
    )
    add(f"| of which the guard entry (key, code and token ints, dict slot) | {_f(mem['guard_bytes_per_tuple'], 1)} | |")
    add(
        f"| of which a `Reservation` object (4 slots, its SPI int and float, 8-byte list slot) "
        f"| {_f(mem['reservation_bytes_each_incl_list_slot'], 1)} | |"
    )
    add("")
    add(
        f"CPU time, without tracemalloc: `Guard.reserve_trusted` {_f(mem['guard_reserve_us'])} µs per SPI, "
        f"`reserve_many_trusted` in batches of {mem['batch_chunk']} {_f(mem['guard_reserve_batch_us'])} µs per SPI, "
        f"building a Reservation {_f(mem['reservation_build_us'])} µs."
    )
    add("")

    # breakdown
    bd = results.get("breakdown", {})
    add("## Where the single `allocate` path spends its time (small table)")
    add("")
    add(
        f"Each step alone, CPU µs per SPI: median over rounds of {plan.n} in which all steps (these and the "
        "batch ones below) ran interleaved; a separate pass from the table above, so expect small differences."
    )
    add("")
    add("| step | CPU µs per SPI |")
    add("| --- | ---: |")
    rows: tuple[tuple[str, Any], ...] = (
        ("floor single (C: send + recv)", bd.get("floor_single_us")),
        ("Python, raw socket + struct: send + recv_into, nothing else", bd.get("python_raw_round_trip_us")),
        (
            "locked round trip `Kernel.alloc_one` (backend c: the request socket's lock, one C call with seven "
            "arguments: copy, patch, send, read, parse)",
            bd.get("alloc_one_round_trip_us"),
        ),
        (
            "`allocate`'s C call alone (`Core.fast`: its own socket, taken in C, three arguments)",
            bd.get("fast_call_round_trip_us"),
        ),
        ("`Core.request` alone, same arguments each call (validation / request cache)", bd.get("request_build_us")),
        ("`reservation_from` alone (a Reservation: four slots)", bd.get("reservation_build_us")),
        ("`allocate`, guard off", bd.get("allocate_guard_off_us")),
        ("`allocate`, guard on", bd.get("allocate_guard_on_us")),
    )
    for name, v in rows:
        add(f"| {name} | {v if isinstance(v, str) else _f(v)} |")
    add("")
    add("## Where the C batch path spends its time (small table)")
    add("")
    add("| step | CPU µs per SPI |")
    add("| --- | ---: |")
    rows = (
        (f"floor batched ({h.FLOOR_BATCH} per send)", bd.get("floor_batch_us")),
        ("the C engine alone (`_cbatch.alloc_batch`: one sendmsg, recvmmsg)", bd.get("c_engine_alloc_batch_us")),
        ("`reservation_from` alone (one Reservation per SPI)", bd.get("reservation_build_us")),
        ('`allocate_many`, backend "c", guard off', bd.get("allocate_many_c_us")),
    )
    for name, v in rows:
        add(f"| {name} | {v if isinstance(v, str) else _f(v)} |")
    add("")
    for key, title in (
        ("profile_allocate_guard_off", "cProfile, `allocate` guard off"),
        ("profile_allocate_guard_on", "cProfile, `allocate` guard on"),
        ("profile_allocate_many_c_guard_off", 'cProfile, `allocate_many` backend "c", guard off (per SPI)'),
    ):
        prof = bd.get(key)
        if not prof:
            continue
        add(
            f"{title}: top functions by own time, median over rounds of {plan.n} (wall clock; the profiler's "
            "overhead inflates every row: compare rows, not totals)"
        )
        add("")
        add("| function | calls per SPI | own µs per SPI | cumulative µs per SPI |")
        add("| --- | ---: | ---: | ---: |")
        for r in prof[:12]:
            add(
                f"| `{r['function']}` | {_f(r['calls_per_op'])} | {_f(r['own_us_per_op'])} | {_f(r['cum_us_per_op'])} |"
            )
        add("")
    return "\n".join(L) + "\n"


# --- plot ------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'spialloc[bench]'): no scaling.png", file=sys.stderr)
        return False
    rows = results["derived"]["scaling"]
    n = results["plan"]["n"]
    # x: the mean number of states in the table while a round ran (pre-fill + half a
    # round), so level 0 has a place on a log axis.
    xs = [r["level"] + n / 2 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = (
        ("floor_single", "floor single (C)", "k", "--"),
        ("floor_batch", f"floor batched ({h.FLOOR_BATCH}/send, C)", "0.4", "--"),
        ("c_batch", "spialloc allocate_many (C)", "tab:blue", "-"),
        ("single_c", "spialloc allocate", "tab:orange", "-"),
        ("single_c_guard", "spialloc allocate, guard on", "tab:red", "-"),
    )
    for key, label, color, ls in styles:
        ys = [r[key] for r in rows]
        ax1.plot(xs, ys, marker="o", color=color, linestyle=ls, label=label)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel(f"states in the namespace (pre-filled level + {n // 2}, half a round)")
    ax1.set_ylabel("CPU µs per SPI (median)")
    ax1.set_title("Cost per SPI vs outstanding states")
    ax1.set_xticks(xs, [f"{r['level']:,}" for r in rows])
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    # Right: ratio to the floor, against what a constant per-SPI overhead (the
    # one measured with the smallest table) would give: 1 + overhead / floor.
    first = rows[0]
    for key, floor_key, label, color in (
        ("c_batch", "floor_batch", "allocate_many (C) / floor batched", "tab:blue"),
        ("single_c", "floor_single", "allocate / floor single", "tab:orange"),
        ("single_c_guard", "floor_single", "allocate, guard on / floor single", "tab:red"),
    ):
        ax2.plot(xs, [r[key] / r[floor_key] for r in rows], marker="o", color=color, label=label)
        extra = first[key] - first[floor_key]
        ax2.plot(xs, [1 + extra / r[floor_key] for r in rows], color=color, linestyle=":", linewidth=1)
    ax2.axhline(1, color="k", linewidth=0.8)
    ax2.set_xscale("log")
    ax2.set_xticks(xs, [f"{r['level']:,}" for r in rows])
    ax2.set_xlabel("pre-filled states")
    ax2.set_ylabel("ratio to the floor (CPU medians)")
    ax2.set_title("spialloc / floor; dotted: a constant overhead (the 0-state one)")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
