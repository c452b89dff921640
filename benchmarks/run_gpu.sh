#!/usr/bin/env bash
# GPU workloads (not run yet: no GPU was available when the harness was written). The Feldman &
# Zhang MNIST protocol (MLP 784-512-256-10, 10 epochs, 70% subsets; 500 models per timed variant,
# models/hour reported; the full protocol is 2,000 models) and an airbench-class CIFAR-10 CNN
# (64-256-256, flip+crop, batch 512) on random data of the real shapes. Loops train 1-2 models.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results-gpu.txt}
jaxmem bench --workloads mnist-protocol,cifar-cnn --repeats "${REPEATS:-3}" --baselines jax-step-loop,jax-model-loop --out "$out"
# Device memory of the CIFAR-10 experiment's programs on this device (XLA's analysis against its
# bytes_limit; nothing is trained; the data need not be present), and the compile count of one
# short real run (printed as "compiled programs: ...").
jaxmem plan --config experiments/cifar10_memorization.py --num-train 50000 --num-test 10000 | tee -a "$out"
jaxmem run --num-models 128 --epochs 2 --out /tmp/jaxmem-gpu-digits --overwrite --no-progress | tee -a "$out"
