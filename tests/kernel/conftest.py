"""Fixtures for the kernel tier: a fresh network namespace per test."""

from __future__ import annotations

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
    outcome = yield
    excinfo = outcome.excinfo
    if excinfo is not None and isinstance(excinfo[1], NamespaceError) and "xfrm_acq_expires" in str(excinfo[1]):
        outcome.force_exception(pytest.skip.Exception(f"needs root: {excinfo[1]}", _use_item_location=True))
