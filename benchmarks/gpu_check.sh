#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) with the project's virtual environment when there is one:
#   bash benchmarks/gpu_check.sh            # results in $OUT (else benchmarks/results)
#   bash benchmarks/gpu_check.sh --dry-run  # no GPU: tiny models, 2 steps
set -u
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
exec python -m benchmarks.gpu_check --out "${OUT:-benchmarks/results}" "$@"
