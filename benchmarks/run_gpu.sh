#!/usr/bin/env bash
# GPU workloads (not run yet: no GPU was available when the harness was written). The Feldman &
# Zhang MNIST protocol (MLP 784-512-256-10, 10 epochs, 70% subsets; 500 models per timed variant,
# models/hour reported; the full protocol is 2,000 models) and an airbench-class CIFAR-10 CNN
# (64-256-256, flip+crop, batch 512) on random data of the real shapes. Loops train 1-2 models.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results-gpu.txt}
jaxmem bench --workloads mnist-protocol,cifar-cnn --repeats "${REPEATS:-3}" --baselines jax-step-loop,jax-model-loop --out "$out"
