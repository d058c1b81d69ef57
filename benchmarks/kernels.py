#!/usr/bin/env python3
"""ALLOCSPI's cost against the SA table's size, per kernel (issue: the duplicate
SPI check of 6.17+ and of the CVE-2025-39797 backports).

    python benchmarks/kernels.py                       # 6.1.176 (old rules), 6.12 and 7.3 (new)
    python benchmarks/kernels.py --kernel 6.1.176,7.3  # any of tests/vm's kernels

Boots each kernel once under QEMU (tests/vm's runner, as root), runs
benchmarks/vm_tablesize.py in it, and writes benchmarks/results/kernels.md and
kernels.json: per table size (0, 1k, 10k, 20k states), the median ALLOCSPI
and NEWSA times and their ratio, measured interleaved in the same boot.
Under software emulation only the ratios mean something.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run_one(kernel: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.vm", "--kernel", kernel, "--", "benchmarks/vm_tablesize.py", "-q", "-s"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    m = re.search(r"guest files in (\S+)", out)
    if proc.returncode != 0 or m is None:
        sys.exit(f"kernels: the {kernel} run failed:\n{out}")
    data = json.loads((Path(m.group(1)) / "tablesize.json").read_text())
    data["option"] = kernel
    return data  # type: ignore[no-any-return]


def report(runs: list[dict[str, Any]]) -> str:
    sizes = [r["states"] for r in runs[0]["results"]]
    head = "| states | " + " | ".join(f"{r['option']} ({r['kernel']})" for r in runs) + " |"
    lines = [head, "| ---: |" + " ---: |" * len(runs)]
    for i, size in enumerate(sizes):
        cells = [f"{r['results'][i]['ratio']:.2f}" for r in runs]
        lines.append(f"| {size:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", default="6.1.176,6.12,7.3", help="comma-separated tests/vm kernel options")
    args = p.parse_args()
    runs = [run_one(k) for k in args.kernel.split(",")]
    table = report(runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kernels.json").write_text(json.dumps(runs, indent=1) + "\n")
    (RESULTS / "kernels.md").write_text(
        "# ALLOCSPI / NEWSA per SA-table size, per kernel\n\n"
        f"`python benchmarks/kernels.py --kernel {args.kernel}` (one boot per kernel, QEMU/TCG; "
        "median of 5 interleaved rounds of 40 requests each; a ratio above 1: one ALLOCSPI costs more "
        "than installing a real SA)\n\n" + table + "\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
