#!/usr/bin/env bash
# The GPU run (benchmarks/gpu_run.py): BadNets -> FST, PAM -> RA at CIFAR-10 size on synthetic data, input-stage
# images/s against BackdoorBench's DataLoader, fp32 vs bf16, peak GPU memory per stage. No internet needed.
#   bash benchmarks/gpu.sh [--attack_epochs N] [--model resnet18_cifar] [...]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p record/gpu_run
python benchmarks/gpu_run.py --device cuda "$@" 2>&1 | tee record/gpu_run/gpu_run.log
