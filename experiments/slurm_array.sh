#!/bin/bash
# A jaxmem run split over a SLURM job array: K independent tasks train disjoint chunks of ONE run
# directory on a shared filesystem (no coordinator, no communication), then one job merges.
#
#   sbatch --array=0-7 experiments/slurm_array.sh          # 8 shards
#   sbatch --dependency=afterany:<array job id> --wrap "jaxmem merge $RUN"   # scores from all shards
#
# Task i trains the chunks c with c mod K == i (`--shard i/K`). A preempted or killed task is simply
# resubmitted with the same command: finished chunks are kept (checksummed) and the chunk in progress
# continues from its last orbax checkpoint, bit for bit. SLURM sends SIGTERM before killing a task
# (`--signal` below asks for it 120 s early); jaxmem then saves the chunk in progress and exits 143,
# and `--requeue` puts the task back in the queue. `jaxmem merge RUN` (or `jaxmem scores RUN`)
# works at any time on whatever is complete and names the missing chunks and their shards.
#
# Cost: not measured for this config here. Time a small run first (e.g. --num-models 128); the
# per-chunk start/end times are in RUN/events.jsonl. (For scale: the default digits MLP run trains
# 256 models in ~75 s on a 2-core CPU.)
#
#SBATCH --job-name=jaxmem
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --gres=gpu:1
#SBATCH --time=04:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --output=logs/jaxmem-%A_%a.out

set -euo pipefail
RUN=${RUN:-runs/cifar10-cnn-s0}
SHARD=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))/${SLURM_ARRAY_TASK_COUNT}

# `exec` makes jaxmem the batch step's main process, so SLURM's SIGTERM reaches it directly.
exec jaxmem run --out "$RUN" --shard "$SHARD" \
  --dataset tfds:cifar10 --data-dir "${TFDS_DATA_DIR:-/data/tfds}" --model cnn --augment \
  --num-models 4000 --chunk-size 64 --epochs 30 --checkpoint-every 5 --keep-params 64 --no-progress

# Multi-host instead of a job array (one run over all GPUs of several nodes, one process per node):
#   srun --nodes=4 --ntasks-per-node=1 jaxmem run --out "$RUN" ...
# jaxmem detects the SLURM step (SLURM_NTASKS > 1) and calls jax.distributed.initialize with the
# first node as coordinator; or pass --coordinator HOST:PORT --num-processes N --process-id I.
# NOT yet supported end to end (untested, see jaxmem/distributed.py): prefer job arrays above.
