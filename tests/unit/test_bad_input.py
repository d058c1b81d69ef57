"""Bad input at the edges that need no kernel: API arguments not covered by
test_model.py, environment variables (SPIALLOC_BACKEND), HA partition
configurations, CLI flags rejected by argparse.  Each must be a typed error
naming the bad value (InvalidRequest / NamespaceError, or ImportError for a
missing extension), raised before any socket exists; the CLI exits 2 with one
line and no traceback.  (Kernel-side faults: tests/kernel/test_faults.py.)"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import spialloc
from spialloc import (
    Allocator,
    AsyncAllocator,
    InvalidRequest,
    Monitor,
    Namespace,
    NamespaceError,
    Partition,
    check_disjoint,
)
from spialloc import _kernel as kernel_mod

ROOT = Path(__file__).resolve().parents[2]


class _NoSocket:
    """Stands in for XfrmSocket: nothing here may reach a socket."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.lock = threading.RLock()
        self.portid = 1
        self.sock = None

    def next_seq(self, count: int = 1) -> int:
        return 1

    def window(self) -> int:
        return 1

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"XfrmSocket.{name} used although the input was bad")


@pytest.fixture
def no_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_mod, "XfrmSocket", _NoSocket)


@pytest.fixture
def fake(no_socket: None) -> Allocator:
    a = Allocator(watch_expiry=False, backend="python")
    yield a  # type: ignore[misc]
    a.close()


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def run_py(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(**env), timeout=60, cwd="/"
    )


# --- SPIALLOC_BACKEND ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["bogus", "pyhton", "C++", "auto,c", "0"])
def test_backend_env_bogus_on_allocator(monkeypatch: pytest.MonkeyPatch, no_socket: None, value: str) -> None:
    monkeypatch.setenv("SPIALLOC_BACKEND", value)
    with pytest.raises(InvalidRequest, match=repr(value).replace("+", r"\+")):
        Allocator(watch_expiry=False)
    with pytest.raises(InvalidRequest, match=repr(value).replace("+", r"\+")):
        AsyncAllocator()


@pytest.mark.parametrize("value", ["bogus", "pyhton"])
def test_backend_env_bogus_on_spialloc_backend(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SPIALLOC_BACKEND", value)
    with pytest.raises(InvalidRequest, match=repr(value)):
        _ = spialloc.backend


@pytest.mark.parametrize("value, expect", [("python", "python"), (" PYTHON ", "python"), ("", None), ("auto", None)])
def test_backend_env_spellings_accepted(monkeypatch: pytest.MonkeyPatch, value: str, expect: str | None) -> None:
    monkeypatch.setenv("SPIALLOC_BACKEND", value)
    got = spialloc.backend
    assert got in ("c", "python") and (expect is None or got == expect)


def test_backend_argument_bogus(no_socket: None) -> None:
    with pytest.raises(InvalidRequest, match="'turbo'"):
        Allocator(backend="turbo", watch_expiry=False)


def test_bad_backend_env_does_not_break_import() -> None:
    proc = run_py("import spialloc; print('imported')", SPIALLOC_BACKEND="bogus")
    assert proc.returncode == 0 and proc.stdout.strip() == "imported", proc.stderr


HIDE_NATIVE = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "spialloc._native":
            raise ImportError("spialloc._native hidden by the test")
        return None
sys.meta_path.insert(0, _Block())
"""


def test_backend_c_with_extension_hidden_is_clear_import_error() -> None:
    code = (
        HIDE_NATIVE
        + """
import spialloc
for what in ("spialloc.backend", "Allocator"):
    try:
        spialloc.backend if what == "spialloc.backend" else spialloc.Allocator(watch_expiry=False)
    except ImportError as exc:
        print(what, "ImportError", exc)
    else:
        print(what, "no error")
"""
    )
    proc = run_py(code, SPIALLOC_BACKEND="c")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2, proc.stdout
    for line in lines:
        assert "ImportError" in line
        assert "SPIALLOC_BACKEND=c" in line and "C extension is not available" in line
        assert "hidden by the test" in line  # the cause is kept


def test_backend_auto_with_extension_hidden_falls_back_with_a_warning() -> None:
    code = (
        HIDE_NATIVE
        + """
import warnings
warnings.simplefilter("error")
import spialloc
try:
    spialloc.backend
except RuntimeWarning as w:
    print("warned:", w)
warnings.simplefilter("ignore")
print("backend:", spialloc.backend)
"""
    )
    proc = run_py(code, SPIALLOC_BACKEND="auto")
    assert proc.returncode == 0, proc.stderr
    assert "warned:" in proc.stdout and "pure-Python" in proc.stdout
    assert "backend: python" in proc.stdout


# --- API arguments not covered in test_model.py ------------------------------------------------


@pytest.mark.parametrize("count, text", [(True, "True"), (1.5, "1.5"), ("3", "'3'"), (None, "None"), (-5, "-5")])
def test_allocate_many_bad_count(fake: Allocator, count: object, text: str) -> None:
    with pytest.raises(InvalidRequest, match=text):
        fake.allocate_many(count, "192.0.2.1")  # type: ignore[arg-type]


def test_allocate_many_unknown_option_is_named(fake: Allocator) -> None:
    with pytest.raises(InvalidRequest, match="colour"):
        fake.allocate_many(2, "192.0.2.1", colour="red")  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"scope": "everything"}, "'everything'"),
        ({"max_retries": True}, "True"),
        ({"max_retries": 1.5}, "1.5"),
        ({"max_retries": "8"}, "'8'"),
        ({"guard": 1}, "1"),
        ({"guard": "no"}, "'no'"),
        ({"spi_range": (0x100, 0x200), "partition": Partition(0, 1000)}, "1000"),
        ({"cpi_range": (0x100, 0x101), "partition": Partition(0, 4)}, "0x100-0x101"),
        ({"on_lost": "print"}, "'print'"),
        ({"on_lost": 5}, "on_lost=5"),
    ],
)
def test_allocator_constructor_more_bad_arguments(no_socket: None, kwargs: dict[str, object], text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        Allocator(watch_expiry=False, backend="python", **kwargs)  # type: ignore[arg-type]
    assert text in str(info.value)


@pytest.mark.parametrize("bad", ["node 0 of 2", 2, (0, 2)])
def test_allocator_partition_not_a_partition(no_socket: None, bad: object) -> None:
    """partition= is used as ``partition.apply(lo, hi)`` without a type check:
    anything else raises AttributeError, not InvalidRequest naming it."""
    with pytest.raises(InvalidRequest, match="partition"):
        Allocator(watch_expiry=False, backend="python", partition=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [True, b"blue", "", -1, 2**40])
def test_allocator_bad_netns_is_namespace_error(no_socket: None, bad: object) -> None:
    with pytest.raises(spialloc.NamespaceError):
        Allocator(bad, watch_expiry=False, backend="python")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [3.5, object(), ["blue"]])
def test_allocator_netns_of_wrong_type_is_typed(no_socket: None, bad: object) -> None:
    """Namespace.open passes anything that is not None/bool/int/Namespace to
    os.fspath, which raises a bare TypeError for a float, a list, an object."""
    with pytest.raises(spialloc.SpiallocError, match="netns"):
        Allocator(bad, watch_expiry=False, backend="python")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [3.5, ["blue"]])
def test_monitor_netns_of_wrong_type_is_typed(bad: object) -> None:
    with pytest.raises(spialloc.SpiallocError, match="netns"):
        spialloc.Monitor(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["gre", 47, None, True])
def test_lookup_bad_proto(fake: Allocator, bad: object) -> None:
    with pytest.raises(InvalidRequest, match=repr(bad)):
        fake.lookup("192.0.2.1", 0xC0000001, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["not an address", None, 0xC0000001])
def test_lookup_bad_dst(fake: Allocator, bad: object) -> None:
    with pytest.raises(InvalidRequest, match=repr(bad)):
        fake.lookup(bad, 0xC0000001)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0xC0000001, "esp spi 0xc0000001", None, [None]])
def test_release_of_non_reservations(fake: Allocator, bad: object) -> None:
    with pytest.raises(InvalidRequest):
        fake.release(bad)  # type: ignore[arg-type]


def test_release_validates_all_before_any_syscall(fake: Allocator) -> None:
    import ipaddress

    good = spialloc.Reservation(
        0xC0000001, ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("0.0.0.0"), spialloc.Proto.ESP
    )
    with pytest.raises(InvalidRequest):
        fake.release([good, good, "junk"])  # type: ignore[list-item]


# --- HA partitions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs, text",
    [
        ((2, 2), {}, "node=2"),
        ((5, 2), {}, "node=5"),
        ((0, 0), {}, "nodes=0"),
        ((-1, 2), {}, "node=-1"),
        ((0, 2**32), {}, "nodes=4294967296"),
        ((0, 2), {"method": "modulo"}, "'modulo'"),
        ((0, 2), {"method": "label_bits", "bits": True}, "bits"),
        ((0, 2), {"method": "label_bits", "bits": -1}, "bits=-1"),
        ((0, 5), {"method": "label_bits", "bits": 2}, "nodes=5"),
        ((0, 2), {"bits": 4}, "bits=4"),
    ],
)
def test_partition_bad_config_names_the_value(args: tuple[object, ...], kwargs: dict[str, object], text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        Partition(*args, **kwargs)  # type: ignore[arg-type]
    assert text in str(info.value)


@pytest.mark.parametrize(
    "ranges, text",
    [
        ([(0x1000, 0x1FFF), (0x1800, 0x2FFF)], "0x1000-0x1fff and 0x1800-0x2fff"),
        ([(10, 20), (30, 40), (15, 16)], "0xa-0x14 and 0xf-0x10"),
        (Partition(0, 3).split(0x100, 0x1FF) + [(0x1F0, 0x300)], "0x1f0-0x300"),
    ],
)
def test_check_disjoint_overlap_names_both(ranges: list[tuple[int, int]], text: str) -> None:
    with pytest.raises(InvalidRequest, match=text):
        check_disjoint(ranges)


def test_check_disjoint_of_real_splits_is_fine() -> None:
    for method in ("range", "label_bits"):
        check_disjoint(Partition(0, 5, method).split(0xC0000000, 0xCFFFFFFF))  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [None, 5, "0x1-0x2"])
def test_check_disjoint_not_a_list_of_pairs(bad: object) -> None:
    """check_disjoint(None) / (5) iterate the argument bare: TypeError."""
    with pytest.raises(InvalidRequest):
        check_disjoint(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("spi", [-1, 2**32, "0x100", 1.0])
def test_partition_queries_reject_bad_spi(spi: object) -> None:
    p = Partition(1, 4)
    with pytest.raises(InvalidRequest, match="spi"):
        p.contains(spi, 0x100, 0x1FF)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="spi"):
        p.node_of(spi, 0x100, 0x1FF)  # type: ignore[arg-type]


# --- CLI flags that argparse rejects (exit 2, one line) -----------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spialloc.cli", *args], capture_output=True, text=True, env=_env(), timeout=60, cwd="/"
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["alloc", "--dst", "10.0.0.1", "--count", "1e3"], "'1e3'"),
        (["alloc", "--dst", "10.0.0.1", "--count", ""], "--count"),
        (["alloc", "--dst", "10.0.0.1", "--count", "0x"], "'0x'"),
        (["alloc", "--dst", "10.0.0.1", "--mark", "1/2/3"], "--mark"),
        (["alloc", "--dst", "10.0.0.1", "--mark", ""], "--mark"),
        (["alloc", "--dst", "10.0.0.1", "--seq", "five"], "'five'"),
        (["alloc", "--dst", "10.0.0.1", "--netns"], "--netns"),
        (["alloc", "--dst"], "--dst"),
        (["alloc", "--dst", "10.0.0.1", "--proto", "ESP"], "'ESP'"),
        (["release", "--dst", "10.0.0.1", "--spi", "0x100", "--spi", "0xg"], "'0xg'"),
        (["list", "--larval=yes"], "--larval"),
    ],
)
def test_cli_argparse_rejects_with_one_line(args: list[str], needle: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("spialloc"), proc.stderr
    assert needle in errors[0], (needle, errors[0])


# --- issue 12, item 10: input that used to slip through ------------------------------------


def test_non_callable_on_lost_set_later_is_refused(fake: Allocator) -> None:
    with pytest.raises(InvalidRequest, match="on_lost"):
        fake.on_lost = "not a function"  # type: ignore[assignment]
    assert fake.on_lost is None


@pytest.mark.parametrize("hold", [10**400, float("inf"), float("nan"), 1e12, -1, 0, True])
def test_absurd_hold_is_refused_before_any_syscall(fake: Allocator, hold: object) -> None:
    """hold=10**400 used to raise OverflowError after the ALLOCSPI, leaving a
    state and a guard entry behind; the socket stub fails on any use."""
    with pytest.raises(InvalidRequest, match="hold"):
        fake.allocate("192.0.2.1", hold=hold)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["x", None, 5])
def test_commit_of_a_non_reservation_is_invalid_request(fake: Allocator, bad: object) -> None:
    with pytest.raises(InvalidRequest, match="Reservation"):
        fake.commit(bad)  # type: ignore[arg-type]


def test_batch_count_beyond_any_range_is_refused_up_front(fake: Allocator) -> None:
    """More SPIs than 32 bits hold: refused before any syscall (it used to
    run into a MemoryError).  A count above one range's size is not refused:
    strict=False returns what the range holds, with an error per index."""
    with pytest.raises(InvalidRequest, match="count"):
        fake.allocate_many(10**20, "192.0.2.1")


def test_netns_with_a_nul_byte_is_a_namespace_error(no_socket: None) -> None:
    with pytest.raises(NamespaceError, match="netns"):
        Allocator("a\x00b", watch_expiry=False)


@pytest.mark.parametrize("bad", [-5, 0, True, 1.5, 1 << 31])
def test_monitor_bad_rcvbuf_is_invalid_request(bad: object) -> None:
    with pytest.raises(InvalidRequest, match="rcvbuf"):
        Monitor(rcvbuf=bad)  # type: ignore[arg-type]


# --- netns that name something other than a network namespace ----------------------------------


def _open_in_thread(spec: object) -> BaseException | Namespace:
    """Namespace.open(spec) in a thread, so a blocking open() fails the test
    instead of hanging the run; a FIFO it blocks on is then opened for
    writing, which lets the open() return."""
    out: list[BaseException | Namespace] = []

    def body() -> None:
        try:
            out.append(Namespace.open(spec))  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        if isinstance(spec, str) and os.path.exists(spec):
            os.close(os.open(spec, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
        pytest.fail(f"Namespace.open({spec!r}) blocked")
    return out[0]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda d: os.mkfifo(d / "ns") or str(d / "ns"), "a FIFO"),
        (lambda d: str(d), "a directory"),
        (lambda d: (d / "ns").write_text("x") and str(d / "ns"), "a regular file"),
        (lambda d: "/dev/null", "a character device"),
        (lambda d: "/proc/self/ns/uts", "another kind of namespace"),
    ],
    ids=["fifo", "directory", "regular-file", "device", "uts-namespace"],
)
def test_netns_path_not_a_network_namespace_is_refused_at_once(tmp_path: Path, make: Any, kind: str) -> None:
    """Opened without blocking (a FIFO used to hang open() forever) and
    checked with NS_GET_NSTYPE before any setns: NamespaceError(EINVAL)
    naming the path and what it is, and no fd left open."""
    spec = make(tmp_path)
    before = _open_fds()
    got = _open_in_thread(spec)
    assert isinstance(got, NamespaceError), got
    assert got.errno == errno.EINVAL
    assert repr(spec) in str(got) and f"not a network namespace: it is {kind}" in str(got)
    assert _open_fds() == before


def test_netns_fd_not_a_network_namespace_is_refused() -> None:
    r, w = os.pipe()
    try:
        before = _open_fds()
        got = _open_in_thread(r)
        assert isinstance(got, NamespaceError) and got.errno == errno.EINVAL, got
        assert f"netns fd {r} is not a network namespace: it is a FIFO" in str(got)
        assert _open_fds() == before
    finally:
        os.close(r)
        os.close(w)


def test_netns_missing_name_is_enoent() -> None:
    got = _open_in_thread("spialloc-no-such-ns")
    assert isinstance(got, NamespaceError) and got.errno == errno.ENOENT, got
    assert "/run/netns/spialloc-no-such-ns" in str(got)


@pytest.mark.parametrize("spec", ["/proc/self/ns/net", "/proc/thread-self/ns/net"])
def test_netns_path_of_a_network_namespace_opens(spec: str) -> None:
    ns = _open_in_thread(spec)
    assert isinstance(ns, Namespace), ns
    assert ns.fd is not None
    with ns, Namespace.open(ns.fd) as again:
        assert again.fd is not None and os.fstat(again.fd).st_ino == os.stat("/proc/self/ns/net").st_ino
