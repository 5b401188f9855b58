#!/usr/bin/env bash
# Creates .venv (if missing) and installs nadoo with the compiler, ONNX Runtime and test extras.
# torch is pinned to 2.13.0 first: that CPU build is on this machine's disk, and an unpinned torch
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.nadoo-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[compile,ort,lm,dev]"
  touch "$stamp"
fi
