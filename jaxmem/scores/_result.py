"""What an estimator adapter returns, and how the registry describes one: arrays and numbers only."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Protocol

import numpy as np


class BlockMatrix(Protocol):
  """A large (rows, columns) float32 matrix an estimator can produce block by block (the driver
  decides whether and where to store it)."""
  shape: tuple[int, int]

  def dense_blocks(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]: ...


@dataclasses.dataclass
class EstimatorResult:
  """An estimator's output: per-example ``columns`` (N,) for its score table, JSON-able ``summary``
  numbers, extra ``tables`` (name -> equal-length columns, e.g. influence top-k rows or ROC curves)
  and ``matrices`` too large to hold (name -> :class:`BlockMatrix`). No files, no text."""
  columns: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  summary: dict[str, Any] = dataclasses.field(default_factory=dict)
  tables: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
  matrices: dict[str, BlockMatrix] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Estimator:
  """One entry of the estimator registry.

  ``fn(records, *, context, **options) -> EstimatorResult``; ``context`` holds the columns of the
  estimators that ran before it. ``requires``: record names it needs. ``default``: part of the
  default set when its records exist (a bool, or a predicate of the records: the C-score only with
  several ratios). ``per_example``: its columns depend on each example's own records only, so the
  driver may run it block by block over examples and concatenate; its ``summarize`` then sees the
  concatenated columns (hidden ones, named ``_...``, included) and never the records' arrays."""
  name: str
  fn: Callable[..., EstimatorResult]
  requires: tuple[str, ...] = ()
  default: bool | Callable[[Any], bool] = True
  per_example: bool = False
  summarize: Callable[..., dict] | None = None  # (columns, records, **options) -> summary, on all N
  # (records, **options) -> working bytes per training example of a block beyond its records' values
  # (those the driver counts itself): arrays whose size is set by an option, e.g. bootstrap resamples
  block_bytes: Callable[..., int] | None = None

  def available(self, records) -> bool:
    return all(name in records for name in self.requires)

  def is_default(self, records) -> bool:
    return bool(self.default(records) if callable(self.default) else self.default)
