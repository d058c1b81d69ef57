"""Shared benchmark machinery for ``run.py`` and the pytest-benchmark tests.

Everything runs in network namespaces made here (``Namespace.isolated()``),
each closed at the end; the host's SAD is never touched.  A case is a
function ``n -> (wall ns, CPU ns)`` that allocates ``n`` SPIs, times only
that, and then releases them (untimed), so the table stays at its pre-filled
size.

``run.py`` puts the guarded cases (``GUARDED_CASES``) in a namespace of their
own, pre-filled like the main one: a guard's expiry watcher wakes on every
SA event in its namespace that its own allocators did not cause, so the
unguarded allocators' releases there would make it work (on the other core,
taking its locks) while another case's round is timed.  A daemon shares one
guard per namespace; that cross-talk is an artifact of the benchmark.
"""

from __future__ import annotations

import cProfile
import dataclasses
import hashlib
import ipaddress
import json
import os
import pstats
import random
import re
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

try:
    import spialloc
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(REPO))
    import spialloc

from spialloc import DEFAULT_SPI_RANGE, Allocator, Namespace, Proto, Reservation, SpiExhausted  # noqa: E402

DST = "10.0.0.1"  # every measured case asks for this destination
FILL_DST = "10.99.0.1"  # pre-filled states: another destination, never released
SPI_LO, SPI_HI = DEFAULT_SPI_RANGE
FLOOR_BATCH = 64  # requests per send() for the "floor batched" case
FILL_BATCH = 512
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21


# --- plan ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    mode: str  # "single", "batch" or "process": which floor it is compared with


CASES: dict[str, Case] = {
    c.key: c
    for c in (
        Case("floor_single", "floor: C, 1 request per send + 1 recv", "single"),
        Case("floor_batch", f"floor: C, {FLOOR_BATCH} requests per send + {FLOOR_BATCH} recv", "batch"),
        Case("floor_batch_round", "floor: C, the whole round in one send", "batch"),
        Case("c_batch", 'spialloc allocate_many, backend="c", guard off', "batch"),
        Case("c_batch_guard", 'spialloc allocate_many, backend="c", guard on', "batch"),
        Case("py_batch", 'spialloc allocate_many, backend="python", guard off', "batch"),
        Case("single_c", 'spialloc allocate (one at a time), backend="c", guard off', "single"),
        Case("single_py", 'spialloc allocate (one at a time), backend="python", guard off', "single"),
        Case("single_c_guard", 'spialloc allocate (one at a time), backend="c", guard on', "single"),
        Case("single_py_guard", 'spialloc allocate (one at a time), backend="python", guard on', "single"),
        Case("ip_process", "`ip xfrm state allocspi`, one process per SPI", "process"),
    )
}
TABLE_CASES = tuple(CASES)
#: Cases whose allocator has a guard (and so an expiry watcher): run.py gives them a namespace of their own.
GUARDED_CASES = ("c_batch_guard", "single_c_guard", "single_py_guard")
SCALING_CASES = ("floor_single", "floor_batch", "c_batch", "single_c", "single_c_guard")
FLOOR_OF = {"single": "floor_single", "batch": "floor_batch", "process": "floor_single"}


@dataclass(frozen=True)
class Plan:
    quick: bool
    levels: tuple[int, ...]  # outstanding (pre-filled) states, ascending
    table_levels: tuple[int, ...]  # levels where every case runs (the others: SCALING_CASES)
    n: int  # SPIs per round
    rounds: dict[int, int]  # rounds per level
    ip_n: int
    ip_rounds: int
    dense_range: tuple[int, int]
    dense_trials: int
    memory_n: int
    profile_n: int
    coldstart_n: int  # SPIs in the first (and each warm) allocate_many of a fresh process
    coldstart_warm: int  # warm rounds after the first
    coldstart_trials: int  # fresh processes per guard setting

    @classmethod
    def full(cls) -> Plan:
        return cls(
            quick=False,
            levels=(0, 1000, 10000, 50000),
            table_levels=(0, 1000, 10000),  # 50,000: the scaling cases only
            n=256,
            # 200 rounds at the target levels: 8 s each instead of 1.6, so one
            # busy second of the shared host moves the medians less (a 40-round
            # pass read the C batch at 1.31 x floor, then 1.10 on the next run).
            rounds={0: 200, 1000: 200, 10000: 30, 50000: 16},
            ip_n=50,
            ip_rounds=4,
            dense_range=(0x10000, 0x10FFF),
            dense_trials=6,
            memory_n=1_000_000,
            profile_n=20000,
            coldstart_n=1000,
            coldstart_warm=5,
            coldstart_trials=5,
        )

    @classmethod
    def quick_plan(cls) -> Plan:
        return cls(
            quick=True,
            levels=(0, 200, 1000),
            table_levels=(0, 1000),
            n=32,
            rounds={0: 3, 200: 2, 1000: 2},
            ip_n=5,
            ip_rounds=1,
            dense_range=(0x10000, 0x100FF),
            dense_trials=1,
            memory_n=20000,
            profile_n=300,
            coldstart_n=1000,
            coldstart_warm=5,
            coldstart_trials=1,
        )

    def cases_at(self, level: int) -> tuple[str, ...]:
        return TABLE_CASES if level in self.table_levels else SCALING_CASES

    def round_size(self, key: str) -> int:
        return self.ip_n if key == "ip_process" else self.n

    def rounds_for(self, key: str, level: int) -> int:
        return self.ip_rounds if key == "ip_process" else self.rounds[level]

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rounds"] = {str(k): v for k, v in self.rounds.items()}
        return d


# --- environment ---------------------------------------------------------------


def have_privileges() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
                return bool(caps >> CAP_NET_ADMIN & 1) and bool(caps >> CAP_SYS_ADMIN & 1)
    return False


def compile_floor(outdir: Path) -> Path:
    cc = os.environ.get("CC", "cc")
    binary = outdir / "floor"
    proc = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(binary), str(HERE / "floor.c")], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compiling benchmarks/floor.c failed:\n{proc.stderr}")
    return binary


def floor_template_matches(binary: Path) -> bool:
    """The floor sends the same request bytes as spialloc (seq aside)."""
    from spialloc._model import build_request

    out = subprocess.run(
        [str(binary), "template", DST, hex(SPI_LO), hex(SPI_HI)], capture_output=True, text=True, check=True
    ).stdout.strip()
    return bytes.fromhex(out) == build_request(DST).template


def host_sad_count() -> int:
    out = subprocess.run(["ip", "xfrm", "state", "count"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = dirty = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    digest = hashlib.sha256()
    pkg = Path(spialloc.__file__).resolve().parent
    for f in sorted([*pkg.glob("*.py"), *pkg.glob("_native*.so"), *(REPO / "csrc").glob("*.[ch]")]):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return {
        "spialloc_path": str(pkg),
        "spialloc_sources_sha256": digest.hexdigest(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "python_impl": sys.implementation.name,
        "spialloc_backend_default": spialloc.backend,
        "spialloc_version": spialloc.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "cc": shutil.which(os.environ.get("CC", "cc")),
    }


# --- the floor program ---------------------------------------------------------


@dataclass
class FloorResult:
    ns: int
    cpu: int
    ok: int
    err: int
    lost: int
    deleted: int
    errno: int


class Floor:
    """The floor program in ``serve`` mode, started inside ``ns``."""

    def __init__(self, ns: Namespace, binary: Path) -> None:
        def start() -> subprocess.Popen[str]:
            # A child forked by a thread that entered the namespace is in it.
            return subprocess.Popen(
                [str(binary), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
            )

        self.proc = ns.run(start)
        assert ns.fd is not None
        mine = os.fstat(ns.fd).st_ino
        theirs = os.stat(f"/proc/{self.proc.pid}/ns/net").st_ino
        if mine != theirs:
            self.close()
            raise RuntimeError("floor program is not in the benchmark namespace")

    def run(
        self,
        mode: str,
        count: int,
        batch: int = 1,
        daddr: str = DST,
        lo: int = SPI_LO,
        hi: int = SPI_HI,
        keep: bool = False,
    ) -> FloorResult:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{mode} {count} {batch} {daddr} {lo} {hi} {int(keep)}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        m = re.fullmatch(r"ns=(\d+) cpu=(\d+) ok=(\d+) err=(\d+) lost=(\d+) deleted=(\d+) errno=(\d+)\s*", line)
        if not m:
            raise RuntimeError(f"floor program: unexpected output {line!r}")
        r = FloorResult(*(int(g) for g in m.groups()))
        if r.ok != count or r.lost or r.err:
            raise RuntimeError(f"floor {mode} {count}: {r}")
        if not keep and r.deleted != r.ok:
            raise RuntimeError(f"floor {mode} {count}: deleted {r.deleted} of {r.ok}")
        return r

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --- one benchmark namespace ---------------------------------------------------


class BenchNS:
    """An isolated namespace, larval lifetime raised to an hour, an optional
    floor program inside, and allocators made on demand."""

    def __init__(self, floor_binary: Path | None, acq_expires: int = 3600) -> None:
        self.ns = Namespace.isolated()
        self._allocs: dict[tuple[str, bool], Allocator] = {}
        self.floor: Floor | None = None
        self.prefilled = 0
        try:
            self.admin = Allocator(self.ns, guard=False)
            self.admin.acq_expires = acq_expires
            if floor_binary is not None:
                self.floor = Floor(self.ns, floor_binary)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> BenchNS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def allocator(self, backend: str, guard: bool) -> Allocator:
        key = (backend, guard)
        if key not in self._allocs:
            self._allocs[key] = Allocator(self.ns, backend=backend, guard=guard)
        return self._allocs[key]

    @property
    def admin_dst(self) -> Any:
        return ipaddress.ip_address(DST)

    def ip(self, *args: str) -> str:
        def body() -> str:
            return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout

        return str(self.ns.run(body))

    def sad_count(self) -> int:
        return int(self.ip("xfrm", "state", "count").split()[-1])

    def fill_to(self, level: int) -> float:
        """Pre-fill to ``level`` larval states (kept); returns seconds taken."""
        assert self.floor is not None
        t0 = time.perf_counter()
        while self.prefilled < level:
            n = min(FILL_BATCH * 16, level - self.prefilled)
            self.floor.run("fill", n, FILL_BATCH, daddr=FILL_DST, keep=True)
            self.prefilled += n
        took = time.perf_counter() - t0
        count = self.sad_count()
        if count != self.prefilled:
            raise RuntimeError(f"namespace holds {count} states, expected {self.prefilled}")
        return took

    def close(self) -> None:
        for a in self._allocs.values():
            a.close()
        self._allocs.clear()
        if self.floor is not None:
            self.floor.close()
            self.floor = None
        admin = getattr(self, "admin", None)
        if admin is not None:
            admin.close()
        self.ns.close()


# --- cases ---------------------------------------------------------------------

_SPI_RE = re.compile(r"\bspi (0x[0-9a-fA-F]+)")


Timing = tuple[int, int]  # (wall ns, CPU ns) of one round


def _thread_clocks() -> Timing:
    return time.perf_counter_ns(), time.thread_time_ns()


def case_function(bns: BenchNS, key: str) -> Callable[[int], Timing]:
    """``n -> (wall ns, CPU ns)`` for one case: allocate n SPIs (timed), then
    release them (untimed).  CPU is the measuring thread's user + system time
    (the kernel runs ALLOCSPI inside send(), in that thread): unlike wall
    time it leaves out the time other processes had the core."""
    floor = bns.floor

    def floor_case(mode: str, batch: Callable[[int], int]) -> Callable[[int], Timing]:
        assert floor is not None

        def run(n: int) -> Timing:
            r = floor.run(mode, n, batch(n))
            return r.ns, r.cpu

        return run

    if key == "floor_single":
        return floor_case("single", lambda n: 1)
    if key == "floor_batch":
        return floor_case("batch", lambda n: FLOOR_BATCH)
    if key == "floor_batch_round":
        return floor_case("batch", lambda n: n)
    if key in ("c_batch", "c_batch_guard", "py_batch"):
        alloc = bns.allocator("python" if key == "py_batch" else "c", key.endswith("_guard"))

        def batch(n: int) -> Timing:
            w0, c0 = _thread_clocks()
            rs = alloc.allocate_many(n, DST)
            w1, c1 = _thread_clocks()
            alloc.release(rs)
            assert len(rs) == n
            return w1 - w0, c1 - c0

        return batch
    if key.startswith("single_"):
        alloc = bns.allocator("python" if "_py" in key else "c", key.endswith("_guard"))
        allocate = alloc.allocate

        def single(n: int) -> Timing:
            w0, c0 = _thread_clocks()
            rs = [allocate(DST) for _ in range(n)]
            w1, c1 = _thread_clocks()
            alloc.release(rs)
            return w1 - w0, c1 - c0

        return single
    if key == "ip_process":
        cmd = ["ip", "xfrm", "state", "allocspi", "src", "0.0.0.0", "dst", DST, "proto", "esp"]
        cmd += ["mode", "transport", "min", hex(SPI_LO), "max", hex(SPI_HI)]

        def children_cpu_ns() -> int:
            ru = resource.getrusage(resource.RUSAGE_CHILDREN)
            return int((ru.ru_utime + ru.ru_stime) * 1e9)

        def processes(n: int) -> tuple[int, int, list[str]]:
            # CPU: this thread (fork, exec, wait) plus the reaped children.
            outs = []
            w0, c0 = _thread_clocks()
            k0 = children_cpu_ns()
            for _ in range(n):
                outs.append(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            w1, c1 = _thread_clocks()
            return w1 - w0, c1 - c0 + children_cpu_ns() - k0, outs

        def ip_round(n: int) -> Timing:
            wall, cpu, outs = bns.ns.run(processes, n)
            spis = [int(m.group(1), 16) for m in map(_SPI_RE.search, outs) if m]
            if len(spis) != n:
                raise RuntimeError(f"ip xfrm state allocspi: {n - len(spis)} outputs without an SPI")
            dst = bns.admin_dst
            bns.admin.release([Reservation(spi=s, dst=dst, src=dst, proto=Proto.ESP) for s in spis])
            return wall, cpu

        return ip_round
    raise KeyError(key)


def summarize(samples: list[float]) -> dict[str, Any]:
    """Per-SPI nanosecond samples (one per round) -> microsecond statistics."""
    us = [s / 1000 for s in samples]
    return {
        "median_us": statistics.median(us),
        "mean_us": statistics.fmean(us),
        "min_us": min(us),
        "max_us": max(us),
        "stdev_us": statistics.stdev(us) if len(us) > 1 else 0.0,
        "rounds": len(us),
        "samples_us": us,
    }


def measure_level(
    bns: BenchNS,
    plan: Plan,
    level: int,
    keys: tuple[str, ...],
    rng: random.Random,
    log: Callable[[str], None],
    guarded: BenchNS | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every case in rounds, interleaved in a shuffled order each round, so
    drift and background load fall on all cases alike; per-SPI statistics
    for both clocks.  With ``guarded`` (a second namespace, pre-filled to the
    same level), the ``GUARDED_CASES`` run there and the rest in ``bns``."""
    if guarded is not None and guarded.prefilled != bns.prefilled:
        raise RuntimeError(f"guarded namespace holds {guarded.prefilled} pre-filled states, the main {bns.prefilled}")
    fns = {k: case_function(guarded if guarded is not None and k in GUARDED_CASES else bns, k) for k in keys}
    for k, fn in fns.items():  # warm-up (a full round; the ip case: 2): first calls, caches, the fresh pre-fill
        fn(2 if k == "ip_process" else plan.round_size(k))
    wall: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    max_rounds = max(plan.rounds_for(k, level) for k in keys)
    for r in range(max_rounds):
        order = [k for k in keys if r < plan.rounds_for(k, level)]
        rng.shuffle(order)
        for k in order:
            n = plan.round_size(k)
            w, c = fns[k](n)
            wall[k].append(w / n)
            cpu[k].append(c / n)
    out = {}
    for k in keys:
        out[k] = {"spis_per_round": plan.round_size(k), "cpu": summarize(cpu[k]), "wall": summarize(wall[k])}
        c, w = out[k]["cpu"], out[k]["wall"]
        log(
            f"    {k:18s} {c['median_us']:10.2f} us/SPI CPU, {w['median_us']:10.2f} wall "
            f"(medians of {c['rounds']} x {plan.round_size(k)})"
        )
    return out


# --- dense ranges ----------------------------------------------------------------


def dense_fill(method: str, lo: int, hi: int, max_spurious: int = 10000) -> dict[str, Any]:
    """Fill [lo, hi] one SPI at a time in a fresh namespace.

    ``kernel``: guard off, the kernel's random picks with replacement; a
    SpiExhausted while values remain free is spurious: counted, retried.
    ``directed``: guard on; the guard picks a free value, the kernel is asked
    for exactly it.  Ends when every value is held; then one more call must
    raise SpiExhausted (timed separately)."""
    size = hi - lo + 1
    with BenchNS(None) as bns:
        alloc = bns.allocator("c", method == "directed")
        allocate = alloc.allocate
        held: set[int] = set()
        spurious = 0
        calls = 0
        marks: dict[str, float] = {}
        checkpoints = {int(size * f): f"{int(f * 100)}%" for f in (0.5, 0.9, 0.99)}
        cpu = time.thread_time  # CPU of this thread, the kernel's work in send() included
        w0, c0 = time.perf_counter(), cpu()
        while len(held) < size:
            calls += 1
            try:
                r = allocate(DST, spi_range=(lo, hi))
            except SpiExhausted:
                spurious += 1
                if spurious > max_spurious:
                    raise RuntimeError(
                        f"{method}: {spurious} spurious SpiExhausted, {size - len(held)} still free"
                    ) from None
                continue
            if r.spi in held or not lo <= r.spi <= hi:
                raise RuntimeError(f"{method}: SPI {r.spi:#x} duplicate or out of range")
            held.add(r.spi)
            label = checkpoints.get(len(held))
            if label:
                marks[label] = cpu() - c0
        fill_cpu, fill_wall = cpu() - c0, time.perf_counter() - w0
        c1 = cpu()
        try:
            allocate(DST, spi_range=(lo, hi))
            exhausted = False
        except SpiExhausted:
            exhausted = True
        confirm = cpu() - c1
        stats = alloc.stats
        states = bns.sad_count()
    return {
        "method": method,
        "range": [lo, hi],
        "size": size,
        "fill_s": fill_cpu,  # CPU seconds; every *_s below is CPU too, except fill_wall_s
        "fill_wall_s": fill_wall,
        "us_per_spi": fill_cpu / size * 1e6,
        "at_fraction_s": marks,
        "last_1pct_s": fill_cpu - marks.get("99%", fill_cpu),
        "calls": calls,
        "spurious_exhausted": spurious,
        "directed_misses": stats.directed_misses,
        "collisions": stats.collisions,
        "confirm_exhausted": exhausted,
        "confirm_s": confirm,
        "states_after": states,
    }


# --- memory ----------------------------------------------------------------------

_MEMORY_CHILD = r"""
import array, json, random, sys, time, tracemalloc
sys.path[:0] = [sys.argv[2]]
from spialloc import Guard
from spialloc._model import batch_reservations, build_request, reservation_from
n, chunk = int(sys.argv[1]), int(sys.argv[3])
req = build_request("10.0.0.1")
spis = random.Random(1).sample(range(0xC0000000, 0xD0000000), n)
dst, proto, owner = req.gdst, int(req.proto), 5
chunks = [spis[i : i + chunk] for i in range(0, n, chunk)]

def traced(fn):
    # Bytes still allocated after fn() (its result kept), per reservation.
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    kept = fn()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / n, kept

# timing (CPU), without tracemalloc
g = Guard()
t0 = time.thread_time()
for s in spis:
    g.reserve_trusted(dst, proto, s, owner)
t1 = time.thread_time()
rs = [reservation_from(req, s) for s in spis]
t2 = time.thread_time()
g2 = Guard()
t3 = time.thread_time()
for c in chunks:
    g2.reserve_many_trusted(dst, proto, c, owner)
t4 = time.thread_time()
del g, g2, rs

# One allocator's allocate_many(chunk) calls: the guard's entries, and the
# Reservations each batch returns (its SPI array and one token; no objects).
g = Guard()
def batches():
    out = []
    now = time.time()
    for c in chunks:
        token = g.reserve_batch(dst, proto, c, owner)  # one token for the batch
        out.append(batch_reservations(req, array.array("I", c), token, now))
    return out
batch_bytes, kept = traced(batches)
assert len(g) == n and sum(map(len, kept)) == n
del g, kept

# allocate() one at a time, every Reservation object held in a list.  Each
# with an SPI int of its own, as a parsed reply gives it (the list's ints are
# made before tracing: sharing them would leave 32 bytes each uncounted).
g = Guard()
def singles():
    out = []
    for s in spis:
        spi = s ^ 0xFFFFFFFF ^ 0xFFFFFFFF  # a new int object, the same value
        out.append(reservation_from(req, spi, None, g.reserve_trusted(dst, proto, spi, owner)))
    return out
single_bytes, kept = traced(singles)
assert len(g) == n
del kept
# ... and the guard's part of that alone (its entries and the token ints it issued).
g = Guard()
guard_bytes, tokens = traced(lambda: [g.reserve_trusted(dst, proto, s, owner) for s in spis])
guard_bytes -= sys.getsizeof(tokens) / n
print(json.dumps({
    "n": n,
    "batch_chunk": chunk,
    "batch_bytes_per_reservation": batch_bytes,
    "single_bytes_per_reservation": single_bytes,
    "guard_bytes_per_tuple": guard_bytes,
    "reservation_bytes_each_incl_list_slot": single_bytes - guard_bytes,
    "guard_reserve_us": (t1 - t0) / n * 1e6,
    "guard_reserve_batch_us": (t4 - t3) / n * 1e6,
    "reservation_build_us": (t2 - t1) / n * 1e6,
}))
"""


def memory(n: int, chunk: int = 1000) -> dict[str, Any]:
    """Bytes per outstanding reservation, traced with tracemalloc in a child
    process (pure Python, no kernel), two ways: ``n`` SPIs reserved in
    batches of ``chunk`` and held as the Reservations ``allocate_many``
    returns (guard entries + SPI and token arrays), and one at a time with
    every Reservation object held in a list (guard entries + objects)."""
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(n), str(REPO), str(chunk)], capture_output=True, text=True, check=True
    ).stdout
    d: dict[str, Any] = json.loads(out)
    d["bytes_per_reservation"] = d["batch_bytes_per_reservation"]
    return d


# --- cold start: the first batch of a process -------------------------------------

_COLDSTART_CHILD = r"""
import json, sys, time
sys.path[:0] = [sys.argv[1]]
fd, guard, n, warm, dst = int(sys.argv[2]), sys.argv[3] == "on", int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
t0 = time.perf_counter()
import spialloc
t1 = time.perf_counter()
alloc = spialloc.Allocator(fd, guard=guard)  # the namespace's fd (duplicated); untimed: not the batch
t2 = time.perf_counter()


def batch():
    w0, c0, p0 = time.perf_counter_ns(), time.thread_time_ns(), time.process_time_ns()
    rs = alloc.allocate_many(n, dst)
    w1, c1, p1 = time.perf_counter_ns(), time.thread_time_ns(), time.process_time_ns()
    got = len(rs)
    alloc.release(rs)  # untimed
    if got != n:
        raise SystemExit(f"allocate_many({n}) gave {got} reservations")
    return [w1 - w0, c1 - c0, p1 - p0]  # process CPU: every thread's (informative)


first = batch()
warm_rounds = [batch() for _ in range(warm)]
alloc.close()
print(json.dumps({
    "spialloc_file": spialloc.__file__,
    "backend": spialloc.backend,
    "import_s": t1 - t0,
    "open_s": t2 - t1,
    "first": first,
    "warm": warm_rounds,
}))
"""


def cold_start(bns: BenchNS, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """The first ``allocate_many`` of a fresh process against warm ones.

    Per trial and guard setting, a fresh ``sys.executable`` imports spialloc
    (from where this process got it), opens an Allocator in ``bns``'s
    namespace (its fd is passed down), then times (wall, thread CPU) the
    first ``allocate_many(coldstart_n)`` and ``coldstart_warm`` more, each
    released untimed.  Import and construction are untimed (reported apart).
    Ratio = first / median of the warm rounds, per clock; per setting, the
    median of the trials' ratios."""
    fd = bns.ns.fd
    if fd is None:
        raise RuntimeError("the benchmark namespace has no fd to pass to a child process")
    n, warm = plan.coldstart_n, plan.coldstart_warm
    pkg_root = str(Path(spialloc.__file__).resolve().parent.parent)  # the repo, in a checkout
    before = bns.sad_count()
    per: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for trial in range(plan.coldstart_trials):
        order = ("off", "on") if trial % 2 == 0 else ("on", "off")
        for setting in order:
            proc = subprocess.run(
                [sys.executable, "-c", _COLDSTART_CHILD, pkg_root, str(fd), setting, str(n), str(warm), DST],
                capture_output=True,
                text=True,
                pass_fds=(fd,),
                timeout=300,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"cold-start child (guard {setting}) failed:\n{proc.stderr}")
            d: dict[str, Any] = json.loads(proc.stdout)
            if Path(d["spialloc_file"]).resolve() != Path(spialloc.__file__).resolve():
                raise RuntimeError(f"cold-start child imported {d['spialloc_file']}, not {spialloc.__file__}")
            first_w, first_c, first_p = d["first"]
            warm_w = statistics.median(r[0] for r in d["warm"])
            warm_c = statistics.median(r[1] for r in d["warm"])
            warm_p = statistics.median(r[2] for r in d["warm"])
            t = {
                "first_wall_us_per_spi": first_w / n / 1000,
                "first_cpu_us_per_spi": first_c / n / 1000,
                "warm_wall_us_per_spi": warm_w / n / 1000,
                "warm_cpu_us_per_spi": warm_c / n / 1000,
                "ratio_cpu": first_c / warm_c if warm_c else None,
                "ratio_wall": first_w / warm_w if warm_w else None,
                # every thread's CPU (a guard's watcher included); not part of the target
                "ratio_process_cpu": first_p / warm_p if warm_p else None,
                "warm_wall_us_per_spi_each": [r[0] / n / 1000 for r in d["warm"]],
                "warm_cpu_us_per_spi_each": [r[1] / n / 1000 for r in d["warm"]],
                "warm_process_cpu_us_per_spi_each": [r[2] / n / 1000 for r in d["warm"]],
                "first_process_cpu_us_per_spi": first_p / n / 1000,
                "import_s": d["import_s"],
                "open_s": d["open_s"],
                "backend": d["backend"],
            }
            per[setting].append(t)
            log(
                f"    guard {setting:3s} trial {trial + 1}: first {t['first_cpu_us_per_spi']:.2f} us/SPI CPU "
                f"({t['first_wall_us_per_spi']:.2f} wall), warm {t['warm_cpu_us_per_spi']:.2f} "
                f"({t['warm_wall_us_per_spi']:.2f}); import {t['import_s'] * 1000:.0f} ms, "
                f"open {t['open_s'] * 1000:.0f} ms"
            )
    after = bns.sad_count()
    if after != before:
        raise RuntimeError(f"cold start left the namespace with {after} states, {before} before")

    def med(trials: list[dict[str, Any]], key: str) -> float | None:
        vals = [t[key] for t in trials if t[key] is not None]
        return statistics.median(vals) if vals else None

    out: dict[str, Any] = {"n": n, "warm_rounds": warm, "trials": plan.coldstart_trials, "states_before": before}
    for setting, trials in per.items():
        out[f"guard_{setting}"] = {
            "ratio_cpu_median": med(trials, "ratio_cpu"),
            "ratio_wall_median": med(trials, "ratio_wall"),
            "ratio_process_cpu_median": med(trials, "ratio_process_cpu"),
            **{
                f"{k}_median": med(trials, k)
                for k in (
                    "first_cpu_us_per_spi",
                    "first_wall_us_per_spi",
                    "warm_cpu_us_per_spi",
                    "warm_wall_us_per_spi",
                    "import_s",
                    "open_s",
                )
            },
            "per_trial": trials,
        }
    return out


# --- where the time goes --------------------------------------------------------


Piece = Callable[[int], tuple["int | None", list[Any]]]


def _profile_round(prof: cProfile.Profile) -> dict[str, tuple[float, float, float]]:
    """function -> (calls, own s, cumulative s) of one profiled round."""
    st = pstats.Stats(prof)
    out = {}
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in st.stats.items():  # type: ignore[attr-defined]
        if filename == __file__:  # the benchmark's own loop
            continue
        out[f"{_short(filename)}:{line}({func})"] = (float(ncalls), tottime, cumtime)
    return out


def _profile_rows(rounds: list[dict[str, tuple[float, float, float]]], per_round: int) -> list[dict[str, Any]]:
    """Per function, the median over rounds (a round the scheduler took the
    core from counts once, not in every row's mean), per SPI."""
    names = {name for r in rounds for name in r}
    rows = []
    for name in names:
        vals = [r.get(name, (0.0, 0.0, 0.0)) for r in rounds]
        rows.append(
            {
                "function": name,
                "calls_per_op": statistics.median(v[0] for v in vals) / per_round,
                "own_us_per_op": statistics.median(v[1] for v in vals) / per_round * 1e6,
                "cum_us_per_op": statistics.median(v[2] for v in vals) / per_round * 1e6,
            }
        )
    rows.sort(key=lambda r: -r["own_us_per_op"])
    return rows[:20]


def breakdown(bns: BenchNS, total: int, round_n: int, guarded_ns: BenchNS | None = None) -> dict[str, Any]:
    """The single ``allocate`` path and the C batch path, piece by piece: CPU
    microseconds per SPI, median over rounds of ``round_n`` in which all
    pieces run interleaved in a shuffled order (so load falls on all alike),
    SPIs released between rounds (untimed); then cProfile's top functions by
    own time, per round, median over rounds.  The guarded allocator lives in
    ``guarded_ns`` when given (see the module docstring), else in ``bns``.

    Uses a few private names of the library; a piece whose names changed
    says so instead of failing the run."""
    from spialloc._model import build_request, reservation_from

    alloc = bns.allocator("c", False)
    guarded = (guarded_ns or bns).allocator("c", True)
    dst = bns.admin_dst
    args = (DST, "esp", None, None, "transport", 0, None, None, None, 0, None)
    pieces: dict[str, tuple[Piece, Allocator]] = {}
    out: dict[str, Any] = {}
    cleanup: list[Callable[[], None]] = []

    def add(name: str, make: Callable[[], Piece], owner: Allocator | None = None) -> None:
        try:
            pieces[name] = (make(), owner or bns.admin)
        except Exception as exc:  # a private name changed: say so, go on
            out[name] = f"unavailable: {type(exc).__name__}: {exc}"

    def floor_piece(batch: int) -> Piece:
        assert bns.floor is not None
        floor = bns.floor
        return lambda n: (floor.run("batch" if batch > 1 else "single", n, batch).cpu, [])

    def raw_round_trip() -> Piece:
        # The same round trip from Python with nothing but socket + struct.
        sock = bns.ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, 6)
        cleanup.append(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)
        sock.bind((0, 0))
        tmpl = bytearray(build_request(DST).template)
        seq_s, spi_s = struct.Struct("=I"), struct.Struct("!I")
        buf = bytearray(1 << 16)
        seq = [1000]

        def body(n: int) -> tuple[None, list[Any]]:
            spis = []
            for _ in range(n):
                seq[0] += 1
                seq_s.pack_into(tmpl, 8, seq[0])
                sock.send(tmpl)
                sock.recv_into(buf)
                spis.append(spi_s.unpack_from(buf, 16 + 72)[0])
            return None, spis

        return body

    def alloc_one() -> Piece:
        req = alloc.core.request(*args)
        one = alloc.core.kernel.alloc_one
        return lambda n: (None, [one(req, req.spi_min, req.spi_max) for _ in range(n)])

    def fast_call() -> Piece:
        # allocate's C call on its own socket (Core.fast) alone: no Python
        # lock, three arguments, nothing around it.
        k = alloc.core.kernel
        prepared = k.prepare(alloc.core.request(*args))
        call, one, seqs = k.fast.call, k.fast.one, k.fast.seqs
        return lambda n: (None, [call(one, prepared, next(seqs) & 0xFFFFFFFF) for _ in range(n)])

    def request_build() -> Piece:
        rq = alloc.core.request

        def body(n: int) -> tuple[None, list[Any]]:
            for _ in range(n):
                rq(*args)
            return None, []

        return body

    def reservation_build() -> Piece:
        req = build_request(DST)

        def body(n: int) -> tuple[None, list[Any]]:
            for _ in range(n):
                reservation_from(req, 0xC0000001)
            return None, []

        return body

    def engine_only() -> Piece:
        # The C engine alone (what allocate_many runs), without the Python around it.
        sock = alloc.core.kernel.sock
        req = alloc.core.request(*args)

        def body(n: int) -> tuple[None, list[Any]]:
            with sock.lock:
                seq0 = sock.next_seq(n)
                spis, errs, _, _ = alloc.core.kernel.engine.alloc_batch(
                    sock.sock, sock.portid, req.template, n, seq0, None, sock.window(), lambda: None
                )
            assert not any(errs)
            return None, list(spis)

        return body

    add("floor_single_us", lambda: floor_piece(1))
    add("floor_batch_us", lambda: floor_piece(FLOOR_BATCH))
    add("python_raw_round_trip_us", raw_round_trip)
    add("alloc_one_round_trip_us", alloc_one)
    add("fast_call_round_trip_us", fast_call)
    add("request_build_us", request_build)
    add("reservation_build_us", reservation_build)
    add("allocate_guard_off_us", lambda: lambda n: (None, [alloc.allocate(DST) for _ in range(n)]), alloc)
    add("allocate_guard_on_us", lambda: lambda n: (None, [guarded.allocate(DST) for _ in range(n)]), guarded)
    add("c_engine_alloc_batch_us", engine_only)
    add("allocate_many_c_us", lambda: lambda n: (None, alloc.allocate_many(n, DST)), alloc)

    rng = random.Random(2)
    rounds = max(3, total // round_n)
    samples: dict[str, list[float]] = {name: [] for name in pieces}
    try:
        for _ in range(rounds):
            order = list(pieces)
            rng.shuffle(order)
            for name in order:
                body, owner = pieces[name]
                t0 = time.thread_time_ns()
                try:
                    measured, got = body(round_n)
                except Exception as exc:
                    out[name] = f"unavailable: {type(exc).__name__}: {exc}"
                    del pieces[name]
                    continue
                took = measured if measured is not None else time.thread_time_ns() - t0
                samples[name].append(took / round_n / 1000)
                if got:
                    owner.release(
                        [
                            r if isinstance(r, Reservation) else Reservation(spi=r, dst=dst, src=dst, proto=Proto.ESP)
                            for r in got
                        ]
                    )
    finally:
        for fn in cleanup:
            fn()
    for name in pieces:
        out[name] = statistics.median(samples[name])

    # cProfile: a fresh profile per round (off while releasing), median per function.
    def profiled(a: Allocator, fn: Callable[[int], list[Reservation]]) -> list[dict[str, Any]]:
        per_round = []
        for _ in range(rounds):
            prof = cProfile.Profile()
            prof.enable()
            rs = fn(round_n)
            prof.disable()
            a.release(rs)  # the allocator whose guard holds them
            per_round.append(_profile_round(prof))
        return _profile_rows(per_round, round_n)

    out["profile_allocate_guard_off"] = profiled(alloc, lambda n: [alloc.allocate(DST) for _ in range(n)])
    out["profile_allocate_guard_on"] = profiled(guarded, lambda n: [guarded.allocate(DST) for _ in range(n)])
    out["profile_allocate_many_c_guard_off"] = profiled(alloc, lambda n: alloc.allocate_many(n, DST))
    return out


def _short(filename: str) -> str:
    for marker in ("/spialloc/", "/lib/python"):
        i = filename.find(marker)
        if i >= 0:
            return filename[i + 1 :]
    return filename


def make_tempdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="spialloc-bench-"))


__all__ = [
    "CASES",
    "FLOOR_OF",
    "GUARDED_CASES",
    "SCALING_CASES",
    "TABLE_CASES",
    "BenchNS",
    "Plan",
    "compile_floor",
    "dense_fill",
    "have_privileges",
    "machine_info",
    "measure_level",
    "memory",
    "breakdown",
    "cold_start",
]
