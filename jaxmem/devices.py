"""One JAX device per CPU core.

JAX sees a CPU as one device by default. The per-model work here is small matmuls (64x256 @ 256x256
for the default run), which XLA's CPU runtime cannot split well across cores: one device used about
one core. Models are independent, so the engine shards them over devices; with one CPU device per
core each core trains its own models. Measured on a 2-core CPU (16 digits MLPs, 8 epochs): 19.5
models/s on one device, 34.9 on two (4 devices: 29.4). See benchmarks/RESULTS.md.

This must be decided before JAX runs anything, so it is a function for the program's entry point
(the ``jaxmem`` CLI calls it first), not something the library does behind a user's back.
"""

from __future__ import annotations

import os


def available_cores() -> int:
  """Cores this process may run on (its affinity mask, not the machine's total)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def use_one_cpu_device_per_core(count: int | None = None) -> int | None:
  """Ask JAX for ``count`` CPU devices (default: one per available core).

  Returns the device count set, or None when it was left alone: the user already chose (the
  ``jax_num_cpu_devices`` option or ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``), or
  JAX has already run something (then the count can no longer change). On a GPU or TPU machine the
  CPU devices are not the default devices, so this changes nothing there.
  """
  import jax
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return None
  if jax.config.jax_num_cpu_devices not in (-1, None):
    return None
  count = available_cores() if count is None else int(count)
  if count < 1:
    raise ValueError(f"CPU device count must be >= 1, got {count}")
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # backends already initialized: too late, keep what JAX has
    return None
  return count
