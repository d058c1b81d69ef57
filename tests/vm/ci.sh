#!/usr/bin/env bash
# The VM tier in CI (called by .ci/run after the host tiers, as root, with
# the project's venv made): boot three kernels under QEMU/TCG and run
# tests/vm inside each, one boot per kernel, one VM at a time:
#   6.1.176  old duplicate rules (bookworm point release before CVE-2025-39797)
#   6.12     new rules, backported (trixie)
#   7.3      the newest (trixie-backports): SA_DIR, per-CPU SAs
# Any failure, skip, or a guest that never reports fails the run.
# The full matrix (adds 5.10 and bookworm's current 6.1): python -m tests.vm --all
# The venv is $SPIALLOC_VENV (default .venv); extra arguments go to the runner.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${SPIALLOC_VENV:-.venv}"
exec "$venv/bin/python" -m tests.vm --ci --venv "$venv" "$@"
