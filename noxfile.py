"""nox: the unit tier and the kernel smoke test on every supported CPython.

    tools/build_dist.sh        # first: dist/ with the abi3 manylinux wheel and the sdist
    nox                        # every session (as root: the smoke test needs the kernel)
    nox -s wheel-3.12          # one of them

``wheel``: the one cp310-abi3 wheel, installed into a fresh venv of each
CPython, tested from outside the checkout so that the wheel (not the source
tree) is what is imported.  ``sdist_without_compiler``: the sdist installed
with ``CC=/bin/false``: it must install with the pure-Python engine, which
then passes the smoke test.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
TEST_DEPS = ["pytest>=8", "hypothesis>=6"]

# pyenv (this machine image) has every CPython but activates one: let its
# shims find them all, so python3.10 ... python3.13 resolve.
_pyenv = sorted(os.path.basename(p) for p in glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[0-9].*")))
if _pyenv:
    os.environ.setdefault("PYENV_VERSION", ":".join(_pyenv))

nox.options.sessions = ["wheel", "sdist_without_compiler"]


def _one(pattern: str, session: nox.Session) -> str:
    found = glob.glob(str(ROOT / "dist" / pattern))
    if len(found) != 1:
        session.error(f"dist/{pattern}: found {found}; run tools/build_dist.sh first")
    return found[0]


def _test(session: nox.Session, *paths: str, keyword: str | None = None, **env: str) -> None:
    """pytest on ``paths`` (from the repository root; ``keyword``: pytest's
    ``-k``) from a folder outside the checkout: nothing there shadows the
    installed package."""
    tmp = session.create_tmp()
    session.chdir(tmp)
    session.run("python", "-c", "import spialloc, sys; print(spialloc.__file__, spialloc.backend)")
    session.run(
        "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT),
        *(str(ROOT / p) for p in paths), *(("-k", keyword) if keyword else ()),
        env={"SPIALLOC_REQUIRE_KERNEL": "1", **env},
    )  # fmt: skip


#: The signal storms (an exception raised by a signal handler anywhere in
#: allocate, a dump, a batch): they depend on how each CPython compiles and
#: where it checks for signals (gh-130279 on 3.13).  3.11 runs them in the
#: whole kernel tier; 3.10 is known to fail them (README: Python versions).
STORMS = "interrupt or socket_locked"  # in tests/kernel/test_batch.py
STORM_PYTHONS = ("3.12", "3.13")


@nox.session(python=PYTHONS)
def wheel(session: nox.Session) -> None:
    session.install(_one("spialloc-*-cp310-abi3-manylinux*.whl", session), *TEST_DEPS)
    _test(session, "tests/unit", "tests/kernel/test_smoke.py", SPIALLOC_EXPECT_BACKEND="c")
    if session.python in STORM_PYTHONS:
        _test(session, "tests/kernel/test_batch.py", keyword=STORMS)


@nox.session(python="3.11")
def sdist_without_compiler(session: nox.Session) -> None:
    session.install(*TEST_DEPS)
    session.install(_one("spialloc-*.tar.gz", session), env={"CC": "/bin/false"})
    _test(session, "tests/kernel/test_smoke.py", SPIALLOC_EXPECT_BACKEND="python")
