#!/usr/bin/env python3
"""The whole benchmark suite in one command.

    python benchmarks/run.py [--quick] [--out DIR]

Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN) and a C compiler.  Every
namespace it uses is made here (``Namespace.isolated()``) and gone at the end;
the host's SAD is checked to be untouched.  Writes ``results.json`` (raw
numbers, machine, command), ``results.md`` (tables) and ``scaling.png``
(needs matplotlib, the ``bench`` extra) to DIR (default benchmarks/results/).

``--quick`` runs everything tiny (no 50k level, no PNG without matplotlib)
so CI can smoke-test it; its numbers mean little.
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

TARGET_BATCH = 1.15  # C batch path vs floor batched
TARGET_SINGLE = 2.0  # pure-Python single allocate vs floor single


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test that takes seconds")
    ap.add_argument("--out", type=Path, default=h.HERE / "results", help="output directory (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=1, help="seed for the round order (default: %(default)s)")
    args = ap.parse_args(argv)

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
        with h.BenchNS(binary) as bns:
            try:
                results["spialloc_batch_chunk"] = bns.allocator("c", False).core.kernel.sock.window()
            except Exception as exc:  # private; informative only
                results["spialloc_batch_chunk"] = f"unknown ({exc})"
            for level in plan.levels:
                log(f"level {level}: pre-filling")
                fill_s = bns.fill_to(level)
                log(f"level {level}: {bns.sad_count()} states (pre-fill took {fill_s:.1f}s); measuring")
                cases = h.measure_level(bns, plan, level, plan.cases_at(level), rng, log)
                levels[str(level)] = {"prefill_s": fill_s, "cases": cases}
                if level == 0:
                    log("level 0: single-path breakdown and profiles")
                    results["breakdown"] = h.breakdown(bns, plan.profile_n, plan.n)
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


def derive(results: dict[str, Any], plan: h.Plan) -> dict[str, Any]:
    d: dict[str, Any] = {"ratios": {}, "guard": {}, "scaling": [], "targets": {}}
    for level in plan.table_levels:
        rows = {}
        for key in plan.cases_at(level):
            floor_key = h.FLOOR_OF[h.CASES[key].mode]
            rows[key] = {
                "vs": floor_key,
                "ratio_median": _ratio(_med(results, level, key), _med(results, level, floor_key)),
                "ratio_min": _ratio(_med(results, level, key, "min_us"), _med(results, level, floor_key, "min_us")),
                "ratio_median_wall": _ratio(
                    _med(results, level, key, clock="wall"), _med(results, level, floor_key, clock="wall")
                ),
            }
        d["ratios"][str(level)] = rows
        g = {}
        for on, off in (("single_c_guard", "single_c"), ("single_py_guard", "single_py"), ("c_batch_guard", "c_batch")):
            a, b = _med(results, level, on), _med(results, level, off)
            g[on] = {"vs": off, "ratio": _ratio(a, b), "extra_us": None if a is None or b is None else a - b}
        d["guard"][str(level)] = g
    for level in plan.levels:
        row: dict[str, Any] = {"level": level}
        for key in h.SCALING_CASES:
            row[key] = _med(results, level, key)
        for key, floor_key in (
            ("c_batch", "floor_batch"),
            ("single_c", "floor_single"),
            ("single_c_guard", "floor_single"),
        ):
            a, b = row[key], row[floor_key]
            row[f"{key}_minus_floor_us"] = None if a is None or b is None else a - b
            row[f"{key}_ratio"] = _ratio(a, b)
        d["scaling"].append(row)
    small = plan.table_levels[0]
    for name, key, floor_key, target in (
        ("C batch path vs floor batched", "c_batch", "floor_batch", TARGET_BATCH),
        ("pure-Python single allocate vs floor single", "single_py", "floor_single", TARGET_SINGLE),
    ):
        per_level = {}
        for level in plan.table_levels:
            r = _ratio(_med(results, level, key), _med(results, level, floor_key))
            rmin = _ratio(_med(results, level, key, "min_us"), _med(results, level, floor_key, "min_us"))
            rwall = _ratio(_med(results, level, key, clock="wall"), _med(results, level, floor_key, clock="wall"))
            per_level[str(level)] = {"ratio_median": r, "ratio_min": rmin, "ratio_median_wall": rwall}
        r0 = per_level[str(small)]["ratio_median"]
        d["targets"][key] = {
            "name": name,
            "case": key,
            "floor": floor_key,
            "target": target,
            "levels": per_level,
            "met_small_table": r0 is not None and r0 <= target,
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


def render_md(results: dict[str, Any], plan: h.Plan) -> str:
    m = results["machine"]
    der = results["derived"]
    L: list[str] = []
    add = L.append
    add("# spialloc benchmarks" + (" (quick smoke run: sizes too small to mean much)" if plan.quick else ""))
    add("")
    add(f"- date: {results['date']}, took {results['elapsed_s']:.0f} s")
    add(f"- command: `{' '.join(results['command'])}`")
    add(
        f"- machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, Python {m['python']}, "
        f"spialloc {m['spialloc_version']} (default backend `{m['spialloc_backend_default']}`), "
        f"git {str(m['git_commit'])[:12]}{' (dirty tree)' if m['git_dirty'] else ''}"
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
        "interleaved in a shuffled order each round, in one namespace. CPU = user + system time of the "
        "measuring thread (the kernel does ALLOCSPI inside send(), in that thread), the primary number: other "
        "processes share these cores and wall time counts their turns too. Median µs per SPI over the rounds; "
        "× floor = ratio of CPU medians to the floor of the same kind in the same run (batch cases vs the floor "
        "batched, one-at-a-time cases vs the floor single). Levels: states already in the namespace "
        f"(pre-filled larval states, another dst): {', '.join(map(_level_name, tl))}."
    )
    add("")
    head = "| case |"
    sep = "| --- |"
    for level in tl:
        lv = _level_name(level)
        head += f" CPU µs/SPI @{lv} | × floor @{lv} | wall µs/SPI @{lv} |"
        sep += " ---: | ---: | ---: |"
    add(head)
    add(sep)
    for key in h.TABLE_CASES:
        row = f"| {h.CASES[key].label} |"
        for level in tl:
            r = der["ratios"][str(level)].get(key, {})
            tag = " (b)" if r.get("vs") == "floor_batch" else " (s)"
            row += (
                f" {_us(_med(results, level, key))} | {_f(r.get('ratio_median'))}{tag} |"
                f" {_us(_med(results, level, key, clock='wall'))} |"
            )
        add(row)
    add("")
    add(
        "(s) vs floor single, (b) vs floor batched. The one-at-a-time `allocate` path is the same Python code "
        'for both backends (the backend only runs batches: `allocate_many` and batched release), so its "c" '
        'and "python" rows measure the same code twice; their difference is noise.'
    )
    add("")

    # targets
    add("## Targets")
    add("")
    cols = " | ".join(f"ratio @{_level_name(lv)}: CPU median; CPU min/min; wall median" for lv in tl)
    add(f"| target | case / floor | limit | {cols} | met (small table, CPU median) |")
    add("| --- | --- | ---: |" + " ---: |" * len(tl) + " --- |")
    for t in der["targets"].values():
        cells = []
        for lv in tl:
            x = t["levels"][str(lv)]
            cells.append(f"{_f(x['ratio_median'])}; {_f(x['ratio_min'])}; {_f(x['ratio_median_wall'])}")
        add(
            f"| {t['name']} | `{t['case']}` / `{t['floor']}` | ≤ {t['target']:.2f} | "
            + " | ".join(cells)
            + f" | {'yes' if t['met_small_table'] else 'no'} |"
        )
    add("")

    # guard
    add("## Guard overhead")
    add("")
    add("Guarded / unguarded CPU medians in the same run; extra µs is their difference per SPI.")
    add("")
    add(
        "| guarded case | vs unguarded | "
        + " | ".join(f"ratio @{_level_name(lv)} | extra µs @{_level_name(lv)}" for lv in tl)
        + " |"
    )
    add("| --- | --- |" + " ---: | ---: |" * len(tl))
    for key in ("single_c_guard", "single_py_guard", "c_batch_guard"):
        row = f"| `{key}` | `{der['guard'][str(tl[0])][key]['vs']}` |"
        for lv in tl:
            g = der["guard"][str(lv)][key]
            row += f" {_f(g['ratio'])} | {_f(g['extra_us'])} |"
        add(row)
    add("")

    # scaling
    add("## Scaling with the number of states in the namespace")
    add("")
    add(
        "Median CPU µs per SPI at each level (rounds allocated and released at that level; the pre-fill stays). "
        "The kernel scans the whole table per pick (KERNEL.md), so everything grows with the level; "
        "spialloc's own work should show as a constant difference to the floor, its ratio going to 1."
    )
    add("")
    add(
        "| states | floor single | floor batched | C batch | allocate | allocate, guard | "
        "C batch − floor batched | allocate − floor single | allocate, guard − floor single | "
        "C batch ratio | allocate ratio | pre-fill s |"
    )
    add("| ---: |" + " ---: |" * 11)
    for row in der["scaling"]:
        lv = row["level"]
        add(
            f"| {_level_name(lv)} | {_us(row['floor_single'])} | {_us(row['floor_batch'])} | {_us(row['c_batch'])} | "
            f"{_us(row['single_c'])} | {_us(row['single_c_guard'])} | {_f(row['c_batch_minus_floor_us'])} | "
            f"{_f(row['single_c_minus_floor_us'])} | {_f(row['single_c_guard_minus_floor_us'])} | "
            f"{_f(row['c_batch_ratio'])} | {_f(row['single_c_ratio'])} | "
            f"{_f(results['levels'][str(lv)]['prefill_s'], 1)} |"
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
    add("| what | bytes each |")
    add("| --- | ---: |")
    add(f'| Guard tuple (scope "spi", one dst) | {_f(mem["guard_bytes_per_tuple"], 1)} |')
    add(f"| Reservation object, incl. its 8-byte list slot | {_f(mem['reservation_bytes_each_incl_list_slot'], 1)} |")
    add(f"| total | {_f(mem['bytes_per_reservation'], 1)} |")
    add("")
    add(
        f"CPU time, without tracemalloc: `Guard.reserve` {_f(mem['guard_reserve_us'])} µs, "
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
    rows = (
        ("floor single (C: send + recv)", bd.get("floor_single_us")),
        ("Python, raw socket + struct: send + recv_into, nothing else", bd.get("python_raw_round_trip_us")),
        (
            "library round trip `Kernel.alloc_one` (copy template, patch, lock, transact, decode)",
            bd.get("alloc_one_round_trip_us"),
        ),
        ("`Core.request` alone, same arguments each call (validation / request cache)", bd.get("request_build_us")),
        ("`reservation_from` alone (the Reservation dataclass)", bd.get("reservation_build_us")),
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
