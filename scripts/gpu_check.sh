#!/usr/bin/env bash
# The GPU check: one command, ≤ 9 minutes on one H200, results as JSON + a table.
#
#   scripts/gpu_check.sh [RESULTS_DIR]                 # on a GPU machine
#   scripts/gpu_check.sh --cpu-dry-run [RESULTS_DIR]   # every step on the CPU, tiny shapes (CI)
#
# RESULTS_DIR: default $OUT, else outputs/gpu_check. Writes RESULTS_DIR/summary.json and logs/.
# Python: $PYTHON, else the repository's .venv, else python3; preftune is imported from src/ (no install
# needed). Nothing is downloaded (HF_HUB_OFFLINE). Steps and numbers: benchmarks/gpu_check.py, docs/performance.md.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3 || command -v python)"
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$ROOT"
exec "$PY" "$ROOT/benchmarks/gpu_check.py" "$@"
