#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) with the project's virtual environment when there is one:
#   bash benchmarks/gpu_check.sh            # results in $OUT (else benchmarks/results)
#   bash benchmarks/gpu_check.sh --dry-run  # no GPU: tiny models, 2 steps
#   bash benchmarks/gpu_check.sh --only strategies --strategies fsdp,none  # FSDP2 (configs/strategies/fsdp.yaml:
#       NCCL, fully_shard on the GPU, bf16-mixed; one process, on one GPU) and a plain GPU run: fit -> last.ckpt ->
#       single-process predict, ~2 min (sharding over several processes is tested on CPU: tests/test_fsdp2.py)
#   bash benchmarks/gpu_check.sh --only strategies --strategies qlora,none  # QLoRA (configs/strategies/qlora.yaml:
#       bitsandbytes 4-bit NF4 on the GPU, backbone_dtype auto = bf16 where the GPU has it) and a plain GPU run
set -u
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
exec python -m benchmarks.gpu_check --out "${OUT:-benchmarks/results}" "$@"
