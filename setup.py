"""Build of the C fast path (cffi, API mode), as an optional extension.

The wheel is tagged cp310-abi3: cffi compiles the extension against the
stable ABI (Py_LIMITED_API), so one wheel serves every CPython >= 3.10.

From the sdist on a machine without a C compiler (or without the kernel
headers), the extension is skipped with one clear message and spialloc
installs with its pure-Python engine (the "auto" backend falls back to it,
with a RuntimeWarning saying so).  SPIALLOC_REQUIRE_C=1 turns that into a
failed build, for packagers who must ship the C engine.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

MISSING = (
    "spialloc: building the C fast path failed ({error}); installing with the pure-Python engine "
    "(spialloc.backend == 'python'). For the C engine install a C compiler and the kernel headers "
    "(apt-get install gcc libc6-dev linux-libc-dev) and reinstall; SPIALLOC_REQUIRE_C=1 makes this an error."
)


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # a missing compiler fails before any extension is built
            self._skip(exc)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:  # CompileError, LinkError, a compiler that is not there
            self._skip(exc)

    def _skip(self, exc: Exception) -> None:
        if os.environ.get("SPIALLOC_REQUIRE_C") == "1":
            raise exc
        print(MISSING.format(error=str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__),
              file=sys.stderr)


setup(
    cffi_modules=["spialloc/_ffi_build.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
