"""Estimators: pure functions of records, and a registry that adapts them to a run.

An estimator adapter takes :class:`jaxmem.records.Records` and keyword options and returns an
:class:`EstimatorResult` (per-example columns for ``scores.csv``, summary numbers and lines, and
optional extra files). Adapters never read or write files themselves; :mod:`jaxmem.scoring` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from jaxmem.registry import Registry
from jaxmem.scores._stats import InOutDifference, auroc, in_out_difference
from jaxmem.scores.memorization import counterfactual_memorization, memorization


@dataclasses.dataclass
class EstimatorResult:
  columns: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # (N,) per training example
  summary: dict[str, Any] = dataclasses.field(default_factory=dict)         # into summary.json
  lines: list[str] = dataclasses.field(default_factory=list)                # printed summary lines
  files: dict[str, Callable[[Any], None]] = dataclasses.field(default_factory=dict)  # name -> writer(path)


@dataclasses.dataclass(frozen=True)
class Estimator:
  name: str
  fn: Callable[..., EstimatorResult]
  requires: tuple[str, ...] = ()  # record arrays it needs
  default: bool = True            # part of the default estimator set when its records exist

  def available(self, records) -> bool:
    return all(name in records for name in self.requires)


ESTIMATORS: Registry[Estimator] = Registry("estimator")


def register_estimator(name: str, *, requires: tuple[str, ...] = (), default: bool = True):
  def decorator(fn):
    ESTIMATORS.register(name)(Estimator(name, fn, requires, default))
    return fn
  return decorator


@register_estimator("memorization", requires=("train_correct",))
def _memorization(records, **options) -> EstimatorResult:
  result = memorization(records.keep, records["train_correct"])
  return EstimatorResult(columns={
      "memorization": result.estimate, "memorization_se": result.se,
      "n_in": result.n_in, "n_out": result.n_out})


__all__ = ["ESTIMATORS", "Estimator", "EstimatorResult", "InOutDifference", "auroc",
           "counterfactual_memorization", "in_out_difference", "memorization", "register_estimator"]

from jaxmem.scores import counterfactual, cscore, influence, uncertainty  # noqa: E402,F401  (issue 3: registers estimators)
from jaxmem.scores import lira  # noqa: E402,F401  (issue 4: registers the lira estimator)
from jaxmem.scores import correlations, dynamics  # noqa: E402,F401  (issue 5: registers dynamics, el2n_grand, correlations)
from jaxmem.scores import lds, proxies, rmia  # noqa: E402,F401  (register the lds, csl and rmia estimators)
from jaxmem.scores import lm  # noqa: E402,F401  (registers text_memorization, exposure, lm_attacks)
