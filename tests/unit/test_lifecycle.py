"""fork() bookkeeping (``spialloc._lifecycle``) without the kernel: a Guard
made before fork() is inert in the child, whatever its lock's state."""

from __future__ import annotations

import gc
import os
import signal
import threading
import traceback
import weakref
from typing import Callable

import pytest

from spialloc import ForkedError, Guard

DST = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1])
ESP = 50


def exit_code_in_child(fn: Callable[[], object]) -> int:
    """Run ``fn`` in a forked child (which always ends with os._exit): 0 if
    it returned; killed by SIGALRM if it hangs."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(10)
            fn()
            code = 0
        except BaseException:  # noqa: BLE001 - shown in the test's captured output
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_guard_made_before_fork_is_inert_in_the_child_and_untouched_in_the_parent() -> None:
    guard = Guard()
    assert guard.reserve(DST, ESP, 0x1000)
    maker = os.getpid()

    def grandchild() -> None:
        with pytest.raises(ForkedError, match=rf"^Guard created before fork\(\) in process {maker}: "):
            guard.reserve(DST, ESP, 0x2000)

    def child() -> None:
        with pytest.raises(ForkedError, match=rf"^Guard created before fork\(\) in process {maker}: "):
            len(guard)
        fresh = Guard()  # a new one in the child works, and a grandchild may not use it either
        assert fresh.reserve(DST, ESP, 0x1000)
        assert exit_code_in_child(grandchild) == 0
        assert exit_code_in_child(lambda: pytest.raises(ForkedError, len, fresh)) == 0

    assert exit_code_in_child(child) == 0
    assert len(guard) == 1 and guard.reserve(DST, ESP, 0x2000)


def test_guard_locked_by_a_parent_thread_at_fork_never_hangs_the_child() -> None:
    guard = Guard()
    holding, done = threading.Event(), threading.Event()

    def holder() -> None:
        with guard._lock:
            holding.set()
            done.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert holding.wait(5)
        assert exit_code_in_child(lambda: pytest.raises(ForkedError, guard.reserve, DST, ESP, 1)) == 0
    finally:
        done.set()
        t.join()


def test_fork_bookkeeping_keeps_nothing_alive() -> None:
    guard = Guard()
    ref = weakref.ref(guard)
    del guard
    gc.collect()
    assert ref() is None
