#!/usr/bin/env python3
"""The VM tier: boot Debian kernels under QEMU (TCG) with virtme-ng and run a
pytest selection inside each, as root, in one boot per kernel.

    python -m tests.vm                         # one kernel: 6.1.176 (old duplicate rules)
    python -m tests.vm --kernel 7.3            # another; --kernel may repeat or take a list
    python -m tests.vm --ci                    # the CI set (tests/vm/ci.sh)
    python -m tests.vm --all                   # the full matrix: 5.10 6.1.176 6.1 6.12 7.3
    python -m tests.vm --kernel 7.3 -- tests/kernel -x -q     # any pytest selection

What it does, in order (everything large is cached under ``.vmcache/``, which
is gitignored):

1. apt: ``qemu-system-x86 busybox-static kmod iproute2 iputils-ping`` when a
   command is missing (the machine's own sources; nothing else is changed).
2. virtme-ng, pinned, in its own venv (``.vmcache/vng``): never in the
   project's venv.
3. The kernel packages, from Debian's mirror through a private sources list
   and private apt state (``-o Dir::...``): the machine's apt sources and
   lists are not touched.  6.1.176 is no longer the bookworm point release;
   its .deb is taken from ``/work/shared/kernels`` (or ``$SPIALLOC_VM_DEBS``)
   when there, else from the mirror if it still has it, else from
   snapshot.debian.org, else the run fails saying where to put the file.
4. ``dpkg-deb -x`` into ``.vmcache/kernels/NAME`` (7.x: the image and modules
   packages into one folder, laid out the way virtme-ng expects), ``depmod``.
5. ``vng -r VMLINUZ --disable-kvm ...``: the host's ``/`` read-only, the
   project's venv as it is.  This machine has no udev, so virtme-ng cannot
   hand the guest's console back: the guest command writes its log, a JUnit
   XML and its exit status into a ``--rwdir`` folder, read back here.

Exit status: 0 only if every kernel booted, the guest wrote its status, and
pytest ran at least one test with no failure, error or skip.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VNG_VERSION = "1.42"
APT_PACKAGES = {  # command -> package
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "modprobe": "kmod",
    "depmod": "kmod",
    "ip": "iproute2",
    "ping": "iputils-ping",
    "dpkg-deb": "dpkg",
}
SHARED_DEBS = Path("/work/shared/kernels")
SNAPSHOT = "https://snapshot.debian.org"
# Modules loaded in the guest before the tests: every transform the traffic
# tests use.  A module the kernel has built in (or lacks) is not an error here;
# the tests say what is missing.
GUEST_MODULES = (
    "xfrm_user xfrm_algo af_key esp4 esp6 ah4 ah6 ipcomp ipcomp6 xfrm4_tunnel xfrm6_tunnel tunnel4 tunnel6 "
    "xfrm_ipcomp deflate veth aes_generic aesni_intel gcm ghash_generic sha256_generic sha512_generic hmac "
    "cbc seqiv echainiv authenc"
)


@dataclass(frozen=True)
class Kernel:
    name: str  # the runner's option value
    suite: str  # Debian suite whose linux-image-amd64 gives the kernel
    rules: str  # "old": duplicate SPI per (dst, spi, proto); "new": per (spi, proto)
    note: str
    package: str = ""  # a fixed image package instead of the suite's linux-image-amd64
    version: str = ""  # its Debian version
    deb: str = ""  # its file name (looked for in SHARED_DEBS / $SPIALLOC_VM_DEBS)


KERNELS = {
    k.name: k
    for k in (
        Kernel("5.10", "bullseye", "old", "bullseye: linux-image-5.10.0-32-amd64"),
        Kernel(
            "6.1.176",
            "bookworm",
            "old",
            "bookworm 12.x point release, before the CVE-2025-39797 backport",
            package="linux-image-6.1.0-50-amd64",
            version="6.1.176-1",
            deb="linux-image-6.1.0-50-amd64_6.1.176-1_amd64.deb",
        ),
        Kernel("6.1", "bookworm-security", "new", "bookworm's current 6.1 (6.1.192+): new rules backported"),
        Kernel("6.12", "trixie", "new", "trixie: new rules backported"),
        Kernel("7.3", "trixie-backports", "new", "trixie-backports: SA_DIR, per-CPU SAs"),
    )
}
DEFAULT_KERNEL = "6.1.176"
CI_KERNELS = ("6.1.176", "6.12", "7.3")
ALL_KERNELS = tuple(KERNELS)
# The host's pytest plugins that the VM tests do not use cost seconds to import under TCG.
DEFAULT_SELECTION = [
    "tests/vm", "-q", "--durations=10", "-p", "no:hypothesispytest", "-p", "no:benchmark", "-p", "no:xdist",
]  # fmt: skip


def log(text: str) -> None:
    print(f"vm: {text}", flush=True)


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, **kw)  # type: ignore[call-overload,no-any-return]


# --- 1, 2: tools ---------------------------------------------------------------


def ensure_apt_tools() -> None:
    missing = sorted({pkg for cmd, pkg in APT_PACKAGES.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"vm: missing {' '.join(missing)}; install them (apt-get install) or run as root")
    log(f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env, stdout=subprocess.DEVNULL)


def ensure_vng(cache: Path) -> Path:
    venv = cache / "vng"
    vng = venv / "bin" / "vng"
    stamp = venv / f".virtme-ng-{VNG_VERSION}"
    if vng.exists() and stamp.exists():
        return vng
    log(f"virtme-ng=={VNG_VERSION} into {venv}")
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"virtme-ng=={VNG_VERSION}"])
    stamp.touch()
    return vng


# --- 3: kernel packages ----------------------------------------------------------


def debian_mirrors() -> tuple[str, str]:
    """(debian, debian-security) base URLs: the ones the machine's apt already
    uses (read, never changed), deb.debian.org if none; $SPIALLOC_VM_MIRROR wins."""
    main = os.environ.get("SPIALLOC_VM_MIRROR", "")
    security = os.environ.get("SPIALLOC_VM_SECURITY_MIRROR", "")
    uris: list[str] = []
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if not f.is_file() or f.name.endswith((".disabled", ".save")) or "disabled" in f.name:
            continue
        try:
            text = f.read_text()
        except OSError:
            continue
        uris += re.findall(r"^\s*URIs:\s*(\S+)", text, re.M)
        uris += re.findall(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.M)
    for u in uris:
        u = u.rstrip("/")
        if not security and u.endswith("/debian-security"):
            security = u
        elif not main and u.endswith("/debian"):
            main = u
    return (main or "http://deb.debian.org/debian", security or "http://deb.debian.org/debian-security")


class PrivateApt:
    """apt-get/apt-cache on a private sources list and private lists/cache:
    the machine's own apt configuration and state are read-only to us."""

    SUITES = ("bullseye", "bookworm", "bookworm-updates", "trixie", "trixie-backports")

    def __init__(self, cache: Path) -> None:
        self.root = cache / "apt"
        self.debs = cache / "debs"
        self._updated = False

    def opts(self) -> list[str]:
        return [
            "-o", f"Dir::Etc::SourceList={self.root / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={self.root / 'lists'}",
            "-o", f"Dir::Cache={self.root / 'cache'}",
            "-o", "APT::Sandbox::User=root",
        ]  # fmt: skip

    def update(self) -> None:
        if self._updated:
            return
        (self.root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        main, security = debian_mirrors()
        key = "/usr/share/keyrings/debian-archive-keyring.gpg"
        signed = f"[signed-by={key}] " if Path(key).exists() else ""
        lines = [f"deb {signed}{main} {s} main" for s in self.SUITES]
        lines.append(f"deb {signed}{security} bookworm-security main")
        (self.root / "sources.list").write_text("\n".join(lines) + "\n")
        lists = self.root / "lists"
        fresh = any(lists.glob("*Packages*")) and time.time() - lists.stat().st_mtime < 6 * 3600
        if not fresh:
            log(f"apt-get update (private lists in {lists}; mirror {main})")
            run(["apt-get", *self.opts(), "-qq", "update"])
            lists.touch()
        self._updated = True

    def show(self, spec: str) -> str:
        return run(["apt-cache", *self.opts(), "show", spec], capture_output=True).stdout

    def candidate(self, package: str, suite: str) -> str:
        """The highest version of `package` that `suite` offers."""
        out = run(["apt-cache", *self.opts(), "madison", package], capture_output=True).stdout
        versions = []
        for line in out.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) == 3 and re.search(rf"\s{re.escape(suite)}/", " " + parts[2]):
                versions.append(parts[1])
        if not versions:
            raise SystemExit(f"vm: {suite} has no {package} on the mirror")
        return versions[0]  # madison lists the newest first

    def depends(self, package: str, version: str) -> list[str]:
        for line in self.show(f"{package}={version}").splitlines():
            if line.startswith("Depends:"):
                return [d.strip().split(" ")[0] for d in line[8:].split(",")]
        return []

    def download(self, package: str, version: str) -> Path:
        self.debs.mkdir(parents=True, exist_ok=True)
        found = sorted(self.debs.glob(f"{package}_{version.replace(':', '%3a')}_*.deb"))
        if found:
            return found[0]
        log(f"apt-get download {package}={version}")
        run(["apt-get", *self.opts(), "-qq", "download", f"{package}={version}"], cwd=self.debs)
        found = sorted(self.debs.glob(f"{package}_*{version.split(':')[-1].replace('~', '*')}*_*.deb"))
        if not found:
            raise SystemExit(f"vm: apt-get download {package}={version} left no .deb in {self.debs}")
        return found[0]


def kernel_debs(k: Kernel, apt: PrivateApt, cache: Path) -> list[Path]:
    """The .deb files that make up kernel `k` (image; 7.x: binary + modules)."""
    if k.package:
        return [fixed_deb(k, apt, cache)]
    apt.update()
    meta = apt.candidate("linux-image-amd64", k.suite)
    image = next(d for d in apt.depends("linux-image-amd64", meta) if d.startswith("linux-image-"))
    parts = [d for d in apt.depends(image, meta) if d.startswith(("linux-binary-", "linux-modules-"))]
    if parts:  # 7.x: linux-image-VER is an empty package pulling these two
        return [apt.download(p, meta) for p in sorted(parts)]
    return [apt.download(image, meta)]


def fixed_deb(k: Kernel, apt: PrivateApt, cache: Path) -> Path:
    dirs = [Path(d) for d in os.environ.get("SPIALLOC_VM_DEBS", "").split(":") if d]
    for d in [*dirs, SHARED_DEBS, apt.debs]:
        if (d / k.deb).is_file():
            return d / k.deb
    apt.update()
    try:
        return apt.download(k.package, k.version)
    except (subprocess.CalledProcessError, SystemExit):
        log(f"{k.package}={k.version} is not on the mirror any more; trying snapshot.debian.org")
    dest = apt.debs / k.deb
    try:
        url = snapshot_download(k, dest)
        log(f"{k.deb} from {url}")
        return dest
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        raise SystemExit(
            f"vm: kernel {k.name} needs {k.deb} ({k.package} {k.version}), which Debian's mirror no longer "
            f"carries, and snapshot.debian.org failed: {exc!r}.\n"
            f"vm: put the file in {SHARED_DEBS}, {apt.debs}, or a folder named by $SPIALLOC_VM_DEBS"
        ) from exc


def snapshot_download(k: Kernel, dest: Path) -> str:
    """Fetch k.deb from snapshot.debian.org through its machine-readable API
    (package -> source -> file hash), checking the SHA-1 it names."""

    def get_json(path: str) -> dict:  # type: ignore[type-arg]
        with urllib.request.urlopen(f"{SNAPSHOT}{path}", timeout=60) as resp:
            return json.load(resp)  # type: ignore[no-any-return]

    binary = get_json(f"/mr/binary/{k.package}/")
    source = next(r for r in binary["result"] if r["binary_version"] == k.version)
    files = get_json(f"/mr/package/{source['source']}/{source['version']}/binfiles/{k.package}/{k.version}")
    digest = next(f["hash"] for f in files["result"] if f["architecture"] == "amd64")
    url = f"{SNAPSHOT}/file/{digest}"
    sha1 = hashlib.sha1()
    with urllib.request.urlopen(url, timeout=60) as resp, open(f"{dest}.part", "wb") as f:
        while chunk := resp.read(1 << 20):
            sha1.update(chunk)
            f.write(chunk)
    if sha1.hexdigest() != digest:
        raise ValueError(f"{url}: SHA-1 {sha1.hexdigest()}, expected {digest}")
    os.replace(f"{dest}.part", dest)
    return url


# --- 4: extract ---------------------------------------------------------------------


def extract(k: Kernel, debs: list[Path], cache: Path) -> Path:
    """Unpack the packages into .vmcache/kernels/NAME; return the vmlinuz path
    (at boot/vmlinuz-VER, modules at lib/modules/VER, as virtme-ng expects)."""
    root = cache / "kernels" / k.name
    stamp = root / ".debs"
    key = "\n".join(d.name for d in debs)
    if not (stamp.exists() and stamp.read_text() == key):
        log(f"extracting {' '.join(d.name for d in debs)}")
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        for d in debs:
            run(["dpkg-deb", "-x", str(d), str(root)])
        usr_modules = root / "usr" / "lib" / "modules"
        if usr_modules.is_dir():  # 7.x: everything under usr/lib; give virtme-ng /boot and /lib
            (root / "boot").mkdir(exist_ok=True)
            for img in usr_modules.glob("*/vmlinuz"):
                link = root / "boot" / f"vmlinuz-{img.parent.name}"
                if not link.exists():
                    link.symlink_to(img.relative_to(root).as_posix().replace("usr/", "../usr/", 1))
            if not (root / "lib").exists():
                (root / "lib").symlink_to("usr/lib")
        for mod in (root / "lib" / "modules").iterdir():
            run(["depmod", "-b", str(root), mod.name], stdout=subprocess.DEVNULL)
        stamp.write_text(key)
    found = sorted((root / "boot").glob("vmlinuz-*"))
    if not found:
        raise SystemExit(f"vm: no boot/vmlinuz-* in {root}")
    return found[0]


def source_tree(rev: str, cache: Path) -> Path:
    """A copy of the working tree whose spialloc/ is the one committed at
    `rev` (plus the built extension): the guest can test a known library
    while someone edits the working tree.  The tests and examples stay the
    working tree's."""
    sha = run(["git", "-C", str(REPO), "rev-parse", f"{rev}^{{commit}}"], capture_output=True).stdout.strip()
    dest = cache / "src" / sha[:12]
    shutil.rmtree(dest, ignore_errors=True)
    skip = shutil.ignore_patterns(".git", ".venv", ".vmcache", "__pycache__", "*.egg-info", ".*_cache", "build")
    shutil.copytree(REPO, dest, ignore=skip, symlinks=True)
    shutil.rmtree(dest / "spialloc")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "spialloc"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    for so in (REPO / "spialloc").glob("_native*.so"):
        shutil.copy2(so, dest / "spialloc")
    log(f"spialloc/ from {rev} ({sha[:12]}), the rest from the working tree: {dest}")
    return dest


def warm_bytecode(src: Path, python: Path, selection: list[str]) -> None:
    """Write the bytecode the guest would otherwise compile on every boot:
    the guest sees the host's tree read-only, so whatever .pyc is missing
    (spialloc, the examples, and pytest's assertion-rewritten test modules
    and conftests; the environment may set PYTHONDONTWRITEBYTECODE) is
    compiled again in each guest, under TCG.  A host-side collection of the
    guest's selection writes the rewritten modules; compileall the rest."""
    # Not the host's CI switches either: a collection runs no kernel test.
    drop = ("PYTHONDONTWRITEBYTECODE", "SPIALLOC_REQUIRE_KERNEL")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["SPIALLOC_VM_GUEST"] = "1"  # collect tests/vm as the guest does
    t0 = time.monotonic()
    subprocess.run(
        [str(python), "-m", "compileall", "-q", "spialloc", "examples", "tests"],
        cwd=src, env=env, check=False, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    collect = [a for a in selection if not a.startswith("--junit")]
    done = subprocess.run(
        [str(python), "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *collect],
        cwd=src, env=env, check=False, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:  # the guest will report the same; say it early
        log(f"host-side collection of the guest's selection failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    log(f"bytecode for the guest written in {time.monotonic() - t0:.1f} s")


# --- 5: boot ------------------------------------------------------------------------


GUEST_SCRIPT = """\
#!/bin/sh
# Written by tests/vm/run.py; runs inside the guest.  Its console is lost
# (no udev on the host), so everything goes to files in {out}.
out={out}
exec >"$out/guest.log" 2>&1
uname -r >"$out/uname"
echo "guest: kernel $(uname -r), $(nproc) cpus"
t0=$(date +%s)
modprobe -q -a {modules} 2>/dev/null  # one exec: every process start is slow under TCG
echo "guest: modules loaded in $(( $(date +%s) - t0 )) s"
ip link set lo up
cd {repo}
unset SPIALLOC_REQUIRE_KERNEL
{env}
export PYTHONDONTWRITEBYTECODE=1 SPIALLOC_VM_GUEST=1 SPIALLOC_VM_OUT="$out" \\
    SPIALLOC_VM_KERNEL={name} SPIALLOC_VM_RULES={rules} SPIALLOC_VM_PYTHON={python}
t0=$(date +%s)
{python} -m pytest -p no:cacheprovider --junitxml="$out/junit.xml" {args}
rc=$?
echo "guest: pytest exit $rc after $(( $(date +%s) - t0 )) s"
echo $rc >"$out/status.tmp" && mv "$out/status.tmp" "$out/status"
sync
"""


@dataclass
class Result:
    kernel: str
    uname: str = "?"
    seconds: float = 0.0
    status: int | None = None
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    problem: str = ""
    started: bool = False  # the guest's script ran (it wrote guest.log)

    @property
    def ok(self) -> bool:
        return not self.problem


def boot(k: Kernel, vmlinuz: Path, vng: Path, args: argparse.Namespace, selection: list[str]) -> Result:
    runs = args.cache / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    out = runs / f"{k.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir()
    python = Path(args.venv) / "bin" / "python"
    env = " ".join(f"export {shlex.quote(e)}" for e in args.guest_env)
    script = GUEST_SCRIPT.format(
        out=shlex.quote(str(out)),
        modules=GUEST_MODULES,
        repo=shlex.quote(str(args.src)),
        env=env,
        name=shlex.quote(k.name),
        rules=k.rules,
        python=shlex.quote(str(python)),
        args=" ".join(shlex.quote(a) for a in selection),
    )
    (out / "guest.sh").write_text(script)
    cmd = [
        str(vng), "-r", str(vmlinuz), "--disable-kvm", "--user", "root",
        "--memory", args.memory, "--cpus", str(args.cpus), "--rwdir", str(out),
        "--exec", f"sh {shlex.quote(str(out / 'guest.sh'))}",
    ]  # fmt: skip
    log(f"booting {k.name} ({vmlinuz.name}, {k.note}); guest files in {out}")
    res = Result(k.name)
    t0 = time.monotonic()
    with open(out / "vng.log", "w") as vlog:
        env = {**os.environ, "PATH": f"{vng.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=vlog, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            res.problem = f"timed out after {args.timeout} s"
        finally:  # also on Ctrl-C: the VM is in its own session, take it down with us
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    res.seconds = time.monotonic() - t0
    if (out / "uname").exists():
        res.uname = (out / "uname").read_text().strip()
    guest_log = out / "guest.log"
    res.started = guest_log.exists()
    if guest_log.exists():
        print(f"----- guest output ({k.name}) -----", flush=True)
        sys.stdout.write(guest_log.read_text(errors="replace"))
        print("----- end of guest output -----", flush=True)
    facts = out / "facts.json"
    if facts.exists():
        print(f"----- facts ({k.name}) -----\n{facts.read_text()}", flush=True)
    if (out / "status").exists():
        res.status = int((out / "status").read_text().strip() or "-1")
    elif not res.problem:
        res.problem = f"the guest never wrote its status (vng exit {proc.returncode})"
    if res.problem and not guest_log.exists():
        tail = (out / "vng.log").read_text(errors="replace").splitlines()[-30:]
        print("----- virtme-ng output (tail) -----\n" + "\n".join(tail), flush=True)
    junit = out / "junit.xml"
    if junit.exists():
        root = ET.parse(junit).getroot()
        for suite in root.iter("testsuite"):
            res.tests += int(suite.get("tests", 0))
            res.failures += int(suite.get("failures", 0))
            res.errors += int(suite.get("errors", 0))
            res.skipped += int(suite.get("skipped", 0))
    if not res.problem:
        if res.status != 0:
            res.problem = f"pytest exit {res.status}"
        elif res.tests == 0:
            res.problem = "no test ran"
        elif res.skipped:
            res.problem = f"{res.skipped} test(s) skipped"
    summary = {**res.__dict__, "ok": res.ok, "vmlinuz": str(vmlinuz), "selection": selection, "src": str(args.src)}
    (out / "result.json").write_text(json.dumps(summary, indent=1) + "\n")
    return res


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        i = argv.index("--")
        argv, selection = argv[:i], argv[i + 1 :]
    else:
        selection = []
    p = argparse.ArgumentParser(
        prog="python -m tests.vm",
        description="Boot Debian kernels under QEMU/TCG with virtme-ng and run pytest inside; "
        "arguments after -- are the pytest selection (default: tests/vm -q).",
    )
    p.add_argument(
        "--kernel",
        "-k",
        action="append",
        default=[],
        help=f"kernel(s), comma-separated or repeated: {', '.join(KERNELS)} (default {DEFAULT_KERNEL})",
    )
    p.add_argument("--ci", action="store_true", help=f"the CI set: {' '.join(CI_KERNELS)}")
    p.add_argument("--all", action="store_true", help=f"the full matrix: {' '.join(ALL_KERNELS)}")
    p.add_argument("--venv", default=str(REPO / ".venv"), help="venv with spialloc installed (default: .venv)")
    p.add_argument("--cache", type=Path, default=REPO / ".vmcache", help="downloads and runs (default: .vmcache)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per boot before it is killed (default 900)")
    p.add_argument("--memory", default="2G")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--env", dest="guest_env", action="append", default=[], help="NAME=VALUE for the guest")
    p.add_argument(
        "--lib-rev",
        metavar="REV",
        help="test spialloc/ as committed at git REV (a copy under .vmcache/src), not the working tree's",
    )
    p.add_argument("--prepare", action="store_true", help="fetch and extract the kernels, do not boot")
    args = p.parse_args(argv)
    names: list[str] = []
    for item in args.kernel:
        names += [n for n in item.split(",") if n]
    if args.ci:
        names += CI_KERNELS
    if args.all:
        names += ALL_KERNELS
    names = list(dict.fromkeys(names or [DEFAULT_KERNEL]))
    bad = [n for n in names if n not in KERNELS]
    if bad:
        p.error(f"unknown kernel {', '.join(bad)}; choose from {', '.join(KERNELS)}")
    args.kernels = names
    return args, selection or DEFAULT_SELECTION


def main(argv: list[str] | None = None) -> int:
    args, selection = parse_args(sys.argv[1:] if argv is None else argv)
    args.venv = str(Path(args.venv).absolute())  # the guest starts in another folder with --lib-rev
    python = Path(args.venv) / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"vm: no venv at {args.venv}: make it first (README: Run the tests) or pass --venv")
    if os.geteuid() != 0:
        raise SystemExit("vm: run as root (the guest's tests need root; so do apt and the kernel cache)")
    args.cache = args.cache.resolve()
    args.cache.mkdir(parents=True, exist_ok=True)
    ensure_apt_tools()
    args.src = source_tree(args.lib_rev, args.cache) if args.lib_rev else REPO
    vng = ensure_vng(args.cache)
    apt = PrivateApt(args.cache)
    images = {}
    for name in args.kernels:
        k = KERNELS[name]
        images[name] = extract(k, kernel_debs(k, apt, args.cache), args.cache)
    if args.prepare:
        for name, img in images.items():
            log(f"{name}: {img}")
        return 0
    warm_bytecode(args.src, python, selection)
    results = []
    t0 = time.monotonic()
    for name in args.kernels:
        r = boot(KERNELS[name], images[name], vng, args, selection)
        if not r.started and r.problem.startswith("the guest never wrote"):
            # virtme-ng gave up before the guest ran a command (exit 255 in 12 s,
            # no output, once in a few dozen CI boots; the next boot of the same
            # kernel worked).  No test ran: boot once more; a second such boot fails.
            log(f"{name}: the guest never started ({r.problem}); booting it once more")
            r = boot(KERNELS[name], images[name], vng, args, selection)
        results.append(r)
        verdict = "ok" if r.ok else f"FAILED: {r.problem}"
        log(
            f"{name}: booted {r.uname}, {r.seconds:.0f} s, {r.tests} tests, {r.failures} failed, "
            f"{r.errors} errors, {r.skipped} skipped: {verdict}"
        )
    log(f"summary ({time.monotonic() - t0:.0f} s in all, selection: {' '.join(selection)})")
    for r in results:
        log(f"  {r.kernel:8} {r.uname:28} {r.seconds:5.0f} s  {'ok' if r.ok else 'FAILED: ' + r.problem}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
