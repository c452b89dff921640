#!/usr/bin/env bash
# The full CPU benchmark behind benchmarks/RESULTS.md: the default digits MLP run (64 models, 30
# epochs) and the digits CNN (16 models, 30 epochs), every engine strategy, auto, and the JAX /
# PyTorch loops, interleaved, 3 repeats. About 15 minutes on an idle 2-core CPU.
# PyTorch is optional: pip install 'jaxmem[torch]' (the CPU wheel torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results-cpu.txt}
cat /proc/loadavg > "$out.load" 2>/dev/null || true
jaxmem bench --workloads digits-mlp,digits-cnn --repeats "${REPEATS:-3}" ${TORCH_THREADS:+--torch-threads "$TORCH_THREADS"} --out "$out"
cat /proc/loadavg >> "$out.load" 2>/dev/null || true
echo "tables in $out, raw numbers in $out.json, load average before/after in $out.load"
