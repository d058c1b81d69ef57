"""Backend choice, in one place: ``SPIALLOC_BACKEND=auto|c|python``.

``auto`` uses the C engine when the extension was built and falls back to the
pure-Python engine with a warning; ``c`` fails if the extension is missing;
any other value is an error (a typo must not silently change the code path).
"""

from __future__ import annotations

import errno
import os
import warnings
from types import ModuleType

from .errors import InvalidRequest, out_of_fds

CHOICES = ("auto", "c", "python")


def select(value: str | None = None) -> tuple[str, ModuleType]:
    """Return (name, engine module) for ``value`` (default: the environment)."""
    if value is None:
        value = os.environ.get("SPIALLOC_BACKEND", "auto")
    choice = value.strip().lower() or "auto"
    if choice not in CHOICES:
        raise InvalidRequest(f"SPIALLOC_BACKEND={value!r} is not one of {', '.join(CHOICES)}")
    try:
        return _load(choice)
    except OSError as exc:  # the engine is imported on first use, and reading its files needs fds
        raise out_of_fds(exc.errno, "loading the batch engine") or exc from None


def _load(choice: str) -> tuple[str, ModuleType]:
    if choice == "python":
        from . import _pybatch

        return "python", _pybatch
    try:
        from . import _cbatch
    except ImportError as exc:
        for code in (errno.EMFILE, errno.ENFILE):
            if os.strerror(code) in str(exc):  # dlopen(3) out of fds: not a missing extension
                raise OSError(code, str(exc)) from None
        if choice == "c":
            raise ImportError(f"SPIALLOC_BACKEND=c but the C extension is not available: {exc}") from exc
        warnings.warn(
            f"spialloc: C extension not available ({exc}); using the pure-Python backend",
            RuntimeWarning,
            stacklevel=4,  # past _load and select: the line that made the allocator
        )
        from . import _pybatch

        return "python", _pybatch
    return "c", _cbatch
