"""Test tiers.

``tests/unit`` needs no privileges.  ``tests/kernel`` talks to the real kernel:
every test gets a fresh network namespace of its own (``Namespace.isolated``)
and the host's SAD is checked to be untouched at the end.  Without
CAP_NET_ADMIN + CAP_SYS_ADMIN the kernel tier is skipped with a hint
(``unshare -Urn python -m pytest`` gives both in a private user namespace);
with ``SPIALLOC_REQUIRE_KERNEL=1`` (CI) a skipped kernel test fails the run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

KERNEL_DIR = Path(__file__).parent / "kernel"
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


def _caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def have_kernel_privileges() -> bool:
    caps = _caps()
    return bool(caps & (1 << CAP_NET_ADMIN)) and bool(caps & (1 << CAP_SYS_ADMIN))


def require_kernel() -> bool:
    return os.environ.get("SPIALLOC_REQUIRE_KERNEL", "") not in ("", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(
        reason="kernel tier needs CAP_NET_ADMIN and CAP_SYS_ADMIN: run as root, "
        "or as a normal user with `unshare -Urn python -m pytest`"
    )
    privileged = have_kernel_privileges()
    for item in items:
        if KERNEL_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kernel)
            if not privileged:
                item.add_marker(skip)


_kernel_skipped: list[str] = []
_kernel_ran: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "kernel" not in report.keywords:
        return
    if report.skipped:
        _kernel_skipped.append(report.nodeid)
    elif report.when == "call":
        _kernel_ran.append(report.nodeid)


def _xdist_worker(config: pytest.Config) -> bool:
    # Under pytest-xdist every report also reaches the controller's
    # pytest_runtest_logreport, so the controller alone judges the whole run;
    # a worker's own count covers only its share (possibly no kernel test).
    return hasattr(config, "workerinput")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _xdist_worker(session.config):
        return
    if require_kernel() and (_kernel_skipped or not _kernel_ran):
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    if _xdist_worker(config):
        return
    tr = terminalreporter
    tr.write_line(f"spialloc kernel tier: {len(_kernel_ran)} ran, {len(_kernel_skipped)} skipped")
    if require_kernel() and (_kernel_skipped or not _kernel_ran):
        tr.write_line("SPIALLOC_REQUIRE_KERNEL=1 but the kernel tier did not run in full: failing the run", red=True)


def _host_states() -> str | None:
    try:
        out = subprocess.run(["ip", "xfrm", "state", "list"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def host_sad_untouched() -> Iterator[None]:
    """The host's SAD must be the same after the run as before it."""
    before = _host_states() if have_kernel_privileges() else None
    yield
    if before is not None:
        after = _host_states()
        assert after == before, "the test run changed the host's SAD"
