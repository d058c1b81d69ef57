"""Which kernel ACQUIREs this process has bound to an SPI.

An ALLOCSPI carrying an ACQUIRE's ``seq`` finds the ACQ state by that seq and
gives it an SPI.  A second one finds the same state and returns the same SPI
(the guard would catch that duplicate), but the kernel first overwrites the
state's direction with the second request's (``xfrm_alloc_userspi`` sets
``x->dir`` after ``xfrm_alloc_spi`` returned the old SPI): a side effect no
retry can undo.  So ``allocate_for`` binds a seq once per process and refuses
a second binding before any syscall; ``allocate(seq=)`` refuses a seq that
``allocate_for`` bound (it keeps its own retry semantics otherwise).

The kernel draws seqs from one counter for all namespaces
(``xfrm_get_acqseq``), so a seq alone names one ACQUIRE in the process.
Only the newest ``REMEMBERED`` bindings are kept: an ACQ state lives
``xfrm_acq_expires`` seconds (30 by default), far less than it takes to bind
that many others.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from ._model import Reservation
from .errors import AlreadyBound

REMEMBERED = 1 << 16

_lock = threading.Lock()
# seq -> (the binding's reservation, None while in flight; bound by allocate_for)
_bound: OrderedDict[int, tuple[Reservation | None, bool]] = OrderedDict()


def _forget_oldest() -> None:
    # ``for``, not ``while len(_bound) > ...``: CPython 3.13 compiles a
    # ``while`` loop's back edge outside the enclosing with/try (gh-130279),
    # so a signal handler's exception raised there skips the lock's release
    # (tests/unit/test_bytecode.py finds such loops).
    for _ in range(len(_bound) - REMEMBERED):
        _bound.popitem(last=False)


def claim(seq: int) -> None:
    """Start binding ``seq`` (allocate_for), or AlreadyBound."""
    with _lock:
        held = _bound.get(seq)
        if held is not None:
            raise AlreadyBound(seq, held[0])
        _bound[seq] = (None, True)
        _forget_oldest()


def bound(seq: int, r: Reservation, strict: bool) -> None:
    """``seq`` is bound to ``r`` (allocate_for: strict; allocate(seq=): not,
    and then a strict entry already there is kept)."""
    with _lock:
        held = _bound.get(seq)
        if strict or held is None:
            _bound[seq] = (r, strict or (held is not None and held[1]))
            _forget_oldest()


class Claim:
    """``with Claim(seq) as c: return c.done(allocate(...))``: the seq is
    claimed on entry (AlreadyBound if taken), bound by ``done``, and free
    again if the block raised (or was cancelled) first."""

    def __init__(self, seq: int) -> None:
        claim(seq)
        self.seq = seq

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is not None:
            unclaim(self.seq)

    def done(self, r: Reservation) -> Reservation:
        bound(self.seq, r, True)
        return r


def unclaim(seq: int) -> None:
    """A claimed binding failed: the seq may be bound again."""
    with _lock:
        held = _bound.get(seq)
        if held is not None and held[0] is None:
            del _bound[seq]


def check(seq: int) -> None:
    """For ``allocate(seq=)``: AlreadyBound if allocate_for bound or is binding ``seq``."""
    held = _bound.get(seq)  # a dict read is atomic; no lock on this path
    if held is not None and held[1]:
        raise AlreadyBound(seq, held[0])


def _in_child() -> None:
    # The bindings stay (the ACQ states are the parent's too: the child must
    # not rebind them); the lock may be held by a thread the child lacks.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_in_child)
