"""A few cases of run.py, interleaved in one process: for checking one change.

    python benchmarks/pair.py floor_batch,c_batch --rounds 1500

Runs the named cases (``_harness.CASES`` keys) in rounds of 256 SPIs, in a
shuffled order each round, in one fresh namespace, pinned to one CPU, and
prints each case's CPU and wall medians per SPI and their ratio to the first
case's.  Run it on each version of a change, the same way, and compare the
ratios: each is normalised by a floor measured beside it, so drift between the
two runs cancels.  Which cases run beside each other changes the ratios (a
case that spawns processes, ``ip_process``, leaves the caches cold for
whatever follows it): compare runs of the same case list only.  Nothing is
written or asserted; run.py makes the recorded run.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", help="comma-separated case keys; ratios are to the first (e.g. floor_batch,c_batch)")
    ap.add_argument("--rounds", type=int, default=1000, help="rounds of 256 SPIs per case (default: %(default)s)")
    ap.add_argument("--level", type=int, default=0, help="larval states pre-filled (default: %(default)s)")
    ap.add_argument(
        "--cpu", type=int, default=max(os.sched_getaffinity(0)), help="CPU to pin to (default: %(default)s)"
    )
    args = ap.parse_args(argv)
    keys = args.cases.split(",")
    unknown = [k for k in keys if k not in h.CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(h.CASES)}")
    if not h.have_privileges():
        print("benchmarks/pair.py needs CAP_NET_ADMIN and CAP_SYS_ADMIN (run as root)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {args.cpu})
    binary = h.compile_floor(h.make_tempdir())
    with h.BenchNS(binary) as bns:
        bns.fill_to(args.level)
        run = {k: h.case_function(bns, k) for k in keys}
        for k in keys:
            run[k](256)  # warm-up, untimed
        wall: dict[str, list[float]] = {k: [] for k in keys}
        cpu: dict[str, list[float]] = {k: [] for k in keys}
        rng = random.Random(1)
        for _ in range(args.rounds):
            order = list(keys)
            rng.shuffle(order)
            for k in order:
                w, c = run[k](256)
                wall[k].append(w / 256 / 1000)
                cpu[k].append(c / 256 / 1000)
    base_c, base_w = statistics.median(cpu[keys[0]]), statistics.median(wall[keys[0]])
    print(f"{'case':20s} {'CPU us/SPI':>10s} {'x first':>8s} {'wall us/SPI':>11s} {'x first':>8s}")
    for k in keys:
        c, w = statistics.median(cpu[k]), statistics.median(wall[k])
        print(f"{k:20s} {c:10.3f} {c / base_c:8.3f} {w:11.3f} {w / base_w:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
