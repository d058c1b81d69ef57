"""The guard's cost on a single allocate, alone: guarded and unguarded
allocators in separate namespaces, so neither's releases reach the other's
watcher (in ``run.py`` they share one, and the unguarded releases are outside
DELSAs to the guarded watchers).  CPU time of this thread per allocate,
rounds of 256 alternating, minimum and median.

    python benchmarks/guard_overhead.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import time

from spialloc import Allocator, Namespace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    rounds = ap.parse_args().rounds
    ns_off, ns_on = Namespace.isolated(), Namespace.isolated()
    try:
        with Allocator(ns_off, guard=False) as off, Allocator(ns_on) as on:
            got: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(rounds):
                for name, a in (("off", off), ("on", on)):
                    t = time.thread_time()
                    rs = [a.allocate("10.0.0.1") for _ in range(256)]
                    got[name].append((time.thread_time() - t) / 256 * 1e6)
                    a.release(rs)
    finally:
        ns_off.close()
        ns_on.close()
    lo = {k: min(v) for k, v in got.items()}
    med = {k: sorted(v)[len(v) // 2] for k, v in got.items()}
    print(f"unguarded {lo['off']:.2f} us (median {med['off']:.2f}), guarded {lo['on']:.2f} us (median {med['on']:.2f})")
    print(f"guard overhead: {lo['on'] / lo['off']:.2f}x (min), {med['on'] / med['off']:.2f}x (median)")


if __name__ == "__main__":
    main()
