"""Which Guard an allocator uses: by default one per network namespace per process.

The guard stands for one SAD as this process sees it.  Two allocators with
private guards in one namespace would each let the kernel hand the other's
outstanding SPIs out again (an ALLOCSPI with an ACQUIRE's seq returns the
same SPI to both), so ``guard=True`` means the process's guard for that
namespace (and scope), shared by every allocator, sync or async, that has
it open.  Namespaces are told apart by their nsfs inode, so two handles on
one namespace (a name and ``/proc/PID/ns/net``, say) share, and a
namespace's guard is forgotten when its last allocator closes: the inode
may later name a new namespace, whose SAD is not this one.

A Guard given by the caller is bound to the first namespace it is used in;
using it in another is refused: its tuples and its expiry events are that
namespace's.  Across processes nothing is shared (see README, "Guard").
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Literal, Union

from ._netns import Namespace
from .errors import InvalidRequest
from .guard import Guard

#: What ``guard=`` accepts.
GuardSpec = Union[bool, Literal["private"], Guard]

NsId = tuple[int, int]

_lock = threading.Lock()


class _Entry:
    __slots__ = ("guard", "users")

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.users = 0  # open allocators that have it


_shared: dict[tuple[NsId, str], _Entry] = {}
_bound: weakref.WeakKeyDictionary[Guard, NsId] = weakref.WeakKeyDictionary()


def check(guard: object) -> None:
    """Validate ``guard=`` before anything is opened."""
    if isinstance(guard, Guard) or guard is True or guard is False or guard is None or guard == "private":
        return
    raise InvalidRequest(f"guard={guard!r} must be True (the namespace's), 'private', False or a Guard")


def attach(guard: GuardSpec | None, scope: Literal["spi", "dst"], ns: Namespace) -> tuple[Guard | None, bool]:
    """The guard for an allocator in ``ns``, and whether it was attached to
    the namespace's shared one (then ``detach`` it on close)."""
    if guard is False or guard is None:
        return None, False
    if guard == "private":
        return Guard(scope), False
    ident = ns.identity()
    if isinstance(guard, Guard):
        if ident is not None:
            with _lock:
                bound = _bound.setdefault(guard, ident)
            if bound != ident:
                raise InvalidRequest(
                    f"this Guard tracks another network namespace than {ns.description}: "
                    "a guard stands for one namespace's SAD (use one per namespace)"
                )
        return guard, False
    if ident is None:  # cannot tell namespaces apart (no /proc): share nothing
        return Guard(scope), False
    with _lock:
        entry = _shared.get((ident, scope))
        if entry is None:
            entry = _shared[(ident, scope)] = _Entry(Guard(scope))
            _bound[entry.guard] = ident
        entry.users += 1
        return entry.guard, True


def detach(guard: Guard | None) -> None:
    """An allocator attached to a shared guard closed."""
    with _lock:
        for key, entry in _shared.items():
            if entry.guard is guard:
                entry.users -= 1
                if not entry.users:
                    del _shared[key]
                return


def shared_guards() -> int:
    """How many namespaces have a shared guard open (for tests)."""
    with _lock:
        return len(_shared)


def _in_child() -> None:
    # The child's allocators are inert and its guards raise ForkedError: a
    # new allocator there must get a new guard.  The lock may be held by a
    # parent's thread that does not exist here.
    global _lock
    _lock = threading.Lock()
    _shared.clear()


os.register_at_fork(after_in_child=_in_child)
