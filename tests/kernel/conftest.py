"""Fixtures for the kernel tier: a fresh network namespace per test."""

from __future__ import annotations

from typing import Iterator

import pytest

from spialloc import Allocator, Namespace


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

