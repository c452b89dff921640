"""Device memory: what a device has, and what a compiled program needs.

XLA's own analysis of a compiled program (``jax.jit(f).lower(...).compile().memory_analysis()``)
gives the bytes of its arguments, outputs and temporaries per device; the engine compiles its
training and evaluation programs on abstract inputs (no data, no training) and keeps the strategies
and evaluation batches whose programs fit the device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from jaxmem.errors import JaxmemError

GiB = 1 << 30
# Of a device's memory, the share a program may plan to use: XLA's estimate leaves out the runtime's
# own buffers and fragmentation.
USABLE_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """Bytes per device of one compiled program (XLA ``CompiledMemoryStats``)."""
  arguments: int
  outputs: int
  temporaries: int
  aliased: int  # outputs written into donated arguments (not allocated twice)
  code: int

  @property
  def peak(self) -> int:
    """Live bytes at the program's peak, as planned: inputs, outputs not aliased to donated
    inputs, temporaries and generated code."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

  @classmethod
  def of(cls, compiled: Any) -> "ProgramMemory":
    stats = compiled.memory_analysis()
    if stats is None:  # a backend without the analysis
      raise JaxmemError("this JAX backend gives no memory analysis of compiled programs")
    return cls(arguments=int(stats.argument_size_in_bytes), outputs=int(stats.output_size_in_bytes),
               temporaries=int(stats.temp_size_in_bytes), aliased=int(stats.alias_size_in_bytes),
               code=int(stats.generated_code_size_in_bytes))

  def to_dict(self) -> dict[str, int]:
    return {**dataclasses.asdict(self), "peak": self.peak}


def device_memory_bytes(device: Any, configured_gib: float | None = None) -> int | None:
  """The memory a program may use on ``device``: ``configured_gib`` when given, else the device's
  own limit (``memory_stats()["bytes_limit"]`` on GPUs and TPUs), else None (CPUs report none)."""
  if configured_gib is not None:
    return int(configured_gib * GiB)
  try:
    stats = device.memory_stats()
  except Exception:  # some backends raise instead of returning None
    stats = None
  limit = (stats or {}).get("bytes_limit")
  return int(limit) if limit else None


def fits(memory: ProgramMemory, budget_bytes: int | None) -> bool:
  return budget_bytes is None or memory.peak <= USABLE_FRACTION * budget_bytes


def eval_batch_ladder(largest: int, smallest: int = 16) -> list[int]:
  """Evaluation batches to try, largest first: halving from ``largest`` down to ``smallest``."""
  ladder = [largest]
  while ladder[-1] // 2 >= smallest:
    ladder.append(ladder[-1] // 2)
  return ladder


def largest_fitting_batch(ladder: Sequence[int], memory_at: Callable[[int], ProgramMemory],
                          budget_bytes: int) -> int | None:
  """The largest batch of ``ladder`` (descending) whose program fits ``budget_bytes``, or None.

  Each ``memory_at`` is a compile, so the ladder is not walked: the largest and smallest batches
  are analyzed, the fitting batch predicted from the line through them (temporaries grow about
  linearly with the batch), and only the prediction and, if it misses, the batches below it checked.
  """
  if fits(memory_at(ladder[0]), budget_bytes):
    return ladder[0]
  smallest = memory_at(ladder[-1])
  if not fits(smallest, budget_bytes):
    return None
  largest = memory_at(ladder[0])
  slope = (largest.peak - smallest.peak) / max(ladder[0] - ladder[-1], 1)
  predicted = ladder[-1] + (USABLE_FRACTION * budget_bytes - smallest.peak) / max(slope, 1e-9)
  for batch in [b for b in ladder if b <= predicted]:
    if batch == ladder[-1] or fits(memory_at(batch), budget_bytes):
      return batch
  return ladder[-1]


def gib(num_bytes: float) -> str:
  return f"{num_bytes / GiB:,.2f} GiB"
