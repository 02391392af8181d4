#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root and install tunelab with the packaged model and data.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test,bench
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# torch first and pinned: the CPU wheel of 2.13.0 is what this project is built on; anything that asked
# for another torch would download a multi-GB CUDA build.
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".${extras:+[$extras]}"
.venv/bin/pip install -q --no-deps -r requirements-data.txt
# Benchmark files read out of the BIG-bench sdist on PyPI (SQuAD, SQuADShifts, VitaminC, XSum): downloaded once
# into the data cache (TUNELAB_DATA, default ~/.cache/tunelab), checked by SHA-256; never installed.
.venv/bin/python -m tunelab.data.bigbench >/dev/null
