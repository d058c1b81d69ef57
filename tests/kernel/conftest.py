"""Fixtures for the kernel tier: a fresh network namespace per test."""

from __future__ import annotations

import secrets
import subprocess
from typing import Iterator

import pytest

from spialloc import Allocator, Namespace, NamespaceError


@pytest.fixture
def netns() -> Iterator[Namespace]:
    ns = Namespace.isolated()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def named_netns() -> Iterator[str]:
    """A namespace made with `ip netns add` (a bind mount under /run/netns), by name."""
    name = f"spialloc-t-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@pytest.fixture
def alloc(netns: Namespace) -> Iterator[Allocator]:
    with Allocator(netns) as a:
        yield a


@pytest.fixture
def raw_alloc(netns: Namespace) -> Iterator[Allocator]:
    """No guard: what the kernel answers, as it is."""
    with Allocator(netns, guard=False) as a:
        yield a


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function):  # type: ignore[no-untyped-def]
    """Under `unshare -Urn` (a normal user) the kernel hides the XFRM sysctls
    of namespaces owned by a user namespace, so tests that shorten or extend
    the larval lifetime cannot run there: they are skipped with that reason.
    As real root (CI) the sysctl is always there, so nothing is skipped."""
    _root_only_to_skip((yield))


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):  # type: ignore[no-untyped-def]
    _root_only_to_skip((yield))


def _root_only_to_skip(outcome) -> None:  # type: ignore[no-untyped-def]
    excinfo = outcome.excinfo
    if excinfo is None or not _in_child_user_namespace():
        return
    exc = excinfo[1]
    if isinstance(exc, NamespaceError) and "xfrm_acq_expires" in str(exc):
        outcome.force_exception(pytest.skip.Exception(f"needs root: {exc}", _use_item_location=True))
    elif isinstance(exc, subprocess.CalledProcessError) and list(exc.cmd)[:3] == ["ip", "netns", "add"]:
        # Named namespaces are bind mounts under /run/netns: real root only.
        outcome.force_exception(pytest.skip.Exception("needs root: ip netns add", _use_item_location=True))


def _in_child_user_namespace() -> bool:
    """True under `unshare -U`: the initial user namespace maps all 2^32 uids."""
    with open("/proc/self/uid_map") as f:
        return f.read().split() != ["0", "0", "4294967295"]
