"""AsyncAllocator's record of batch chunks nobody has been given yet: each
part is released by exactly one of the batch's clean-up, a chunk that
finds its batch given up, or close."""

from __future__ import annotations

import array
from typing import Any, cast

from spialloc._model import Reservations, batch_reservations, build_request
from spialloc.aio import _Unclaimed

REQ = build_request("10.0.0.1")


def _part(*spis: int) -> Reservations:
    return batch_reservations(REQ, array.array("I", spis), 7, 1.0)


class _Releases:
    """What release_all hands the core (the kernel side is tested in tests/kernel)."""

    def __init__(self) -> None:
        self.released: list[list[int]] = []

    def release_owned(self, rs: Reservations) -> int:
        self.released.append(rs.spis)
        return len(rs)


def test_a_batch_taken_by_its_owner_is_not_released_by_close() -> None:
    u, core = _Unclaimed(), _Releases()
    parts = u.open()
    assert u.add(parts, _part(1, 2)) and u.add(parts, _part(3))
    assert u.take(parts) == parts and [p.spis for p in parts] == [[1, 2], [3]]
    u.release_all(cast(Any, core))
    assert core.released == []
    assert not u.add(parts, _part(4))  # a chunk finishing now releases its part itself


def test_close_releases_each_open_batch_once_and_its_owner_then_gets_none() -> None:
    u, core = _Unclaimed(), _Releases()
    a, b, empty = u.open(), u.open(), u.open()
    u.add(a, _part(1))
    u.add(a, _part(2, 3))
    u.add(b, _part(9))
    u.release_all(cast(Any, core))
    assert sorted(core.released) == [[1, 2, 3], [9]]  # joined per batch; nothing for an empty one
    assert u.take(a) is None and u.take(b) is None and u.take(empty) is None
    assert not u.add(a, _part(4))
    u.release_all(cast(Any, core))
    assert len(core.released) == 2
