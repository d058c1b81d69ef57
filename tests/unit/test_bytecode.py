"""No loop in spialloc whose back edge CPython leaves outside its ``with``.

CPython 3.12 and 3.13 compile a ``while <condition>:`` loop inside a
``with`` or ``try`` so that the loop's last instruction, the jump back,
lies outside the block's exception-table range.  3.12 checks for signals
after that jump, inside the range again: harmless.  3.13 checks before it
(gh-130279, open for 3.13.0-3.13.2 at least): a signal handler's exception
(KeyboardInterrupt, or a daemon's own) raised there skips ``__exit__`` and
``finally``.  It left a socket's lock held for good (tests/kernel/
test_batch.py: the signal storms).  This finds the shape in the bytecode
the running interpreter makes of every spialloc module; the 3.13 run of
the unit tier (nox) is the one that matters.
"""

from __future__ import annotations

import dis
import sys
import textwrap
import types
from pathlib import Path

import pytest

import spialloc

pytestmark = pytest.mark.skipif(
    sys.version_info < (3, 13), reason="before 3.13 the interpreter checks for signals after the back jump"
)

PACKAGE = Path(spialloc.__file__).resolve().parent


def _escaping_back_edges(code: types.CodeType) -> list[str]:
    """Every JUMP_BACKWARD in ``code`` (and the code objects in it) that
    leaves a handler's range which holds both the loop's head and the
    instruction before the jump: a loop inside the block whose back edge
    is not.  Only the handlers of ``with`` and ``try`` blocks, which begin
    with PUSH_EXC_INFO: not a generator's StopIteration conversion, nor the
    clean-up of a comprehension 3.12 inlines (its loop variable)."""
    found: list[str] = []
    entries = list(getattr(dis.Bytecode(code), "exception_entries", ()))  # none before 3.11
    instructions = list(dis.get_instructions(code))
    first_op = {i.offset: i.opname for i in instructions}
    for i, ins in enumerate(instructions):
        if ins.opname != "JUMP_BACKWARD" or i == 0:
            continue
        before = instructions[i - 1].offset
        for e in entries:
            holds_loop = e.start < ins.argval and e.start <= before < e.end
            if holds_loop and not e.start <= ins.offset < e.end and first_op[e.target] == "PUSH_EXC_INFO":
                line = ins.positions.lineno if ins.positions else None
                found.append(f"{code.co_filename}:{line} in {code.co_qualname}")
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found += _escaping_back_edges(const)
    return found


def _compiled(path: Path) -> types.CodeType:
    return compile(path.read_text(), str(path), "exec")


def test_no_spialloc_loop_leaves_its_with_or_try_at_the_back_edge() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20
    found = [f for m in modules for f in _escaping_back_edges(_compiled(m))]
    assert not found, "write these as `while True: ... break` (gh-130279):\n" + "\n".join(found)


SHAPE = textwrap.dedent(
    """
    def f(lock, n):
        with lock:
            while n:
                n -= 1
    """
)


def test_the_check_finds_the_shape_it_exists_for() -> None:
    found = _escaping_back_edges(compile(SHAPE, "<shape>", "exec"))
    assert len(found) == 1 and found[0].endswith(" in f")
