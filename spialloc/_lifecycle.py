"""fork(): what a child process does with the spialloc objects it inherits.

After fork() the child holds copies of the parent's sockets, pipes and
namespace fds, and its locks as the parent's threads left them (a lock held
by a thread stays held: that thread does not exist in the child).  Used from
the child, an inherited Allocator would talk on the parent's request socket
(the same netlink port: each process reads the other's replies and deletes
the other's states), and its close() would write the wake pipe of the
parent's expiry watcher, stopping it.

So every object that holds such resources registers here, and in the child
it is made inert at once: it closes the child's copies of its fds (the
parent's stay open; nothing is sent on them), raises ForkedError on any use,
and its close() does nothing more.  None of that takes a lock.
"""

from __future__ import annotations

import os
import socket
import warnings
import weakref
from typing import Protocol

from .errors import ForkedError


class Inheritable(Protocol):
    def _after_fork(self, parent: int) -> None:
        """In the child: become inert.  ``parent`` is the process that made it."""


# Weak: registering must not keep an object alive (its __del__ closes it).
_live: weakref.WeakSet[Inheritable] = weakref.WeakSet()
_pid = os.getpid()


def track(obj: Inheritable) -> None:
    """Make ``obj`` inert in every child forked from now on."""
    _live.add(obj)


def close_copy(fd: socket.socket | int | None) -> None:
    """Close this process's copy of a socket or fd: the parent's stays open."""
    try:
        if isinstance(fd, socket.socket):
            fd.close()
        elif fd is not None and fd >= 0:
            os.close(fd)
    except OSError:
        pass


class InertLock:
    """Stands in for an inherited object's lock in the child: raises
    ForkedError where the real lock could wait forever for a parent's thread."""

    def __init__(self, what: str, pid: int) -> None:
        self.what = what
        self.pid = pid

    def __enter__(self) -> bool:
        raise ForkedError(self.what, self.pid)

    def __exit__(self, *exc: object) -> None:
        return None


def _in_child() -> None:
    global _pid
    parent, _pid = _pid, os.getpid()
    inherited = list(_live)
    _live.clear()  # inert for good: a later fork of this child has nothing to do
    for obj in inherited:
        try:
            obj._after_fork(parent)
        except Exception as exc:  # one object must not leave the others usable
            warnings.warn(f"spialloc after fork: {obj!r}: {exc!r}", RuntimeWarning, stacklevel=1)


os.register_at_fork(after_in_child=_in_child)
