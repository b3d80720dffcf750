#!/usr/bin/env bash
# The GPU-only checks of issues 11, 12 and 16 on one GPU, in under 8 minutes: a pass/fail table.
# Run from anywhere on a machine with a GPU and the project's dependencies installed; see
# benchmarks/gpu_check.py for what each check shows.  Exit code 1 when any check failed.
#   bash benchmarks/gpu_check.sh                 # every check
#   bash benchmarks/gpu_check.sh --only fsdp2_mixed_precision deepspeed_fp16
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
