"""Multi-process (multi-host) setup: detect a cluster job and call ``jax.distributed.initialize``.

Nothing here reads the environment by itself or keeps global state: :func:`detect_cluster` takes
the environment mapping and the explicit flags as arguments and returns a :class:`ClusterSpec` (or
None for a single process); the CLI passes ``os.environ`` and calls :func:`initialize`.

After initialization, :func:`jaxmem.run.run` splits the run's chunks over processes (process i
trains the chunks c with c % P == i on a mesh of its local devices and writes only those; process 0
waits for the others' chunks and writes the scores). The models are independent, so a global mesh
over all hosts would add lockstep and cross-host gathers and nothing else. Orbax checkpoints are
written by each process alone (``jaxmem.records.checkpoints._this_process_only``).

Job arrays are a different thing: independent single-process jobs that share a run directory and
split its chunks with ``--shard i/k`` (see ``experiments/slurm_array.sh``); they need no
coordinator and no initialization.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

from jaxmem.errors import JaxmemError

DEFAULT_PORT = 12355


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
  coordinator_address: str   # host:port of process 0
  num_processes: int
  process_id: int
  source: str                # "flags" or "slurm"


def first_host(nodelist: str) -> str:
  """The first host of a SLURM node list: ``'gpu[07-09,12],cpu1'`` -> ``'gpu07'``."""
  match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
  if not match or not match.group(1):
    raise JaxmemError(f"cannot read the SLURM node list {nodelist!r}")
  prefix, ranges = match.group(1), match.group(2)
  if ranges is None:
    return prefix
  return prefix + ranges.split(",")[0].split("-")[0]


def _int(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env[name])
  except (KeyError, ValueError):
    raise JaxmemError(f"environment variable {name}={env.get(name)!r} is not an integer") from None


def detect_cluster(env: Mapping[str, str], *, coordinator: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None) -> ClusterSpec | None:
  """The multi-process setup this process belongs to, or None when it runs alone.

  Explicit flags win (all three are needed). Otherwise a SLURM job step with more than one task
  (``srun`` with ``SLURM_NTASKS`` > 1) is a cluster: process id ``SLURM_PROCID``, coordinator the
  first node of ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``) on a port derived from the job
  id, so every task computes the same address. One task per job, e.g. each task of a job array, is
  a single process.
  """
  given = [v is not None for v in (coordinator, num_processes, process_id)]
  if any(given):
    if not all(given):
      raise JaxmemError("multi-process flags go together: give --coordinator HOST:PORT, --num-processes N "
                        "and --process-id I")
    if not (isinstance(num_processes, int) and num_processes >= 1 and 0 <= process_id < num_processes):
      raise JaxmemError(f"--process-id must be in [0, --num-processes), got {process_id} of {num_processes}")
    if ":" not in coordinator:
      coordinator = f"{coordinator}:{DEFAULT_PORT}"
    return ClusterSpec(coordinator, num_processes, process_id, "flags")
  if "SLURM_JOB_ID" in env and "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
      raise JaxmemError("SLURM job with several tasks but no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST")
    port = 20000 + _int(env, "SLURM_JOB_ID") % 20000
    return ClusterSpec(f"{first_host(nodelist)}:{port}", _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID"),
                       "slurm")
  return None


def initialize(spec: ClusterSpec | None) -> None:
  """``jax.distributed.initialize`` for ``spec`` (nothing for a single process). Must run before
  anything touches a JAX device."""
  if spec is None:
    return
  import jax
  jax.distributed.initialize(coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
                             process_id=spec.process_id)
