#!/usr/bin/env bash
# Lint (ruff, undefined names included), import smoke test, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests benchmarks experiments
.venv/bin/python -c "import preftune, preftune.cli, preftune.train, preftune.trainer, preftune.losses, preftune.engine.logprobs, preftune.data, preftune.models, preftune.mt.cli; print('import smoke test: ok', preftune.__version__)"
.venv/bin/preftune --help > /dev/null
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
