#!/usr/bin/env bash
# One short GPU check: the pretraining step at CIFAR shapes (full-width ResNet-18,
# batch 256) on CUDA, in fp32 and bf16, contiguous and channels_last, then bf16 with
# torch.compile. It prints images/s, achieved TFLOP/s against the fp32 and bf16
# matrix-multiply peaks measured in the same run, peak memory, and the projected time
# of 200 CIFAR-10 epochs. Record the output in benchmarks/README.md.
#
#   bash benchmarks/gpu_check.sh            # uses `python` from PATH (activate the venv first)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi not found"
common=(--device cuda --method msvq --width 64 --batch 256 --project-epochs 200 --epoch-images 50000)
"$PYTHON" benchmarks/train_step.py "${common[@]}" --precisions fp32 bf16 --warmup 3 --steps 10
"$PYTHON" benchmarks/train_step.py "${common[@]}" --precisions bf16 --compile --warmup 5 --steps 10
