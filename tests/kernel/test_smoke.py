"""The kernel smoke test: the library as installed does its job on this
kernel, in a fresh namespace.  nox runs it on every supported CPython against
the one abi3 wheel (and against an sdist installed without a compiler); the
full kernel tier runs it too."""

from __future__ import annotations

import asyncio
import os

import spialloc
from spialloc import Allocator, AsyncAllocator, Namespace


def test_allocate_batch_list_release(netns: Namespace) -> None:
    expected = os.environ.get("SPIALLOC_EXPECT_BACKEND")
    if expected:
        assert spialloc.backend == expected
    with Allocator(netns) as a:
        r = a.allocate("192.0.2.1", "esp", mode="tunnel", reqid=7, mark=(5, 0xFF))
        rs = a.allocate_many(1000, "2001:db8::1", "ah")
        cpi = a.allocate("192.0.2.1", "comp")
        assert len({x.spi for x in rs}) == 1000
        assert len(a.states(larval=True)) == 1002
        st = a.lookup("192.0.2.1", r.spi, mark=(5, 0xFF))
        assert st is not None and st.reqid == 7 and st.mark == (5, 0xFF)
        assert a.release([r, cpi, *rs]) == 1002
        assert a.states() == []


def test_async_allocator(netns: Namespace) -> None:
    async def main() -> None:
        async with AsyncAllocator(netns) as a:
            rs = await asyncio.gather(*(a.allocate("192.0.2.1") for _ in range(50)))
            assert len({r.spi for r in rs}) == 50
            assert await a.release(rs) == 50

    asyncio.run(main())
