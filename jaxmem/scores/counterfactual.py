"""Counterfactual memorization of any per-example measure (Zhang et al. 2021, "Counterfactual
Memorization in Neural Language Models"; survey def. 3).

  mem_M(i) = mean_{m: i ∈ S_m} M(f_m, x_i) − mean_{m: i ∉ S_m} M(f_m, x_i)

for a measure M: accuracy (the default estimator ``memorization``, = Feldman & Zhang), and here the
margin, the log-probability of the true class and the loss. All three come from the recorded margin
φ = log p_y − log Σ_{y'≠y} p_y' = log p − log(1 − p) (p = p_y, the softmax probability of the true
class), i.e. φ = logit(p), so p = sigmoid(φ) and, computed stably,

  log p      = log_sigmoid(φ)          (``memorization_logprob``)
  loss = −log p = softplus(−φ)         (``memorization_loss``; cross-entropy on the true label)

(exact identities, no extra records needed). Standard errors are Welch's from the in/out sample
variances (:func:`jaxmem.scores._stats.in_out_difference`); NaN where a group has fewer than two
models. With several subset ratios the difference is taken within each ratio and averaged with
equal weight (see :mod:`jaxmem.scores.memorization`). Zhang et al. use per-token accuracy of language models; the in−out estimator is theirs.
Note the loss difference is negative for memorized examples (lower loss when trained on).
"""

from __future__ import annotations

import jax
import numpy as np

from jaxmem.errors import JaxmemError
from jaxmem.scores._result import EstimatorResult
from jaxmem.scores._stats import InOutDifference, in_out_difference, nanmedian

METRICS = ("margin", "logprob", "loss")


def measure_from_margin(metric: str, margin_MxN: np.ndarray) -> np.ndarray:
  """The per-model measure derived from the recorded margin φ = logit(p_y)."""
  margin = np.asarray(margin_MxN, np.float32)
  if metric == "margin":
    return margin
  if metric == "logprob":
    return np.asarray(jax.nn.log_sigmoid(margin))
  if metric == "loss":
    return np.asarray(jax.nn.softplus(-margin))
  raise JaxmemError(f"unknown counterfactual metric {metric!r}; choose one of: {', '.join(METRICS)}")


def counterfactual_from_margin(keep_MxN: np.ndarray, margin_MxN: np.ndarray, metric: str,
                               ratio_M: np.ndarray | None = None) -> InOutDifference:
  """Zhang et al.'s in−out difference of ``metric`` (margin, logprob or loss) per training example,
  within each subset ratio and averaged over ratios."""
  keep_MxN = np.asarray(keep_MxN, bool)
  if keep_MxN.shape != np.shape(margin_MxN):
    raise ValueError(f"keep {keep_MxN.shape} and margin {np.shape(margin_MxN)} must have the same shape")
  return in_out_difference(keep_MxN, measure_from_margin(metric, margin_MxN), ratio_M)


def parse_metrics(metrics) -> tuple[str, ...]:
  if metrics is None:
    return ()
  if isinstance(metrics, str):
    metrics = [m.strip() for m in metrics.split(",") if m.strip()]
  out = []
  for metric in metrics:
    if metric == "accuracy":
      continue  # that is the ``memorization`` column itself
    if metric not in METRICS:
      raise JaxmemError(f"unknown counterfactual metric {metric!r}; choose one of: accuracy, {', '.join(METRICS)}")
    out.append(metric)
  return tuple(dict.fromkeys(out))


def counterfactual_columns(records, *, context=None, metrics=()) -> EstimatorResult:
  """Adapter: columns ``memorization_<metric>`` and ``memorization_<metric>_se`` for the metrics
  asked (none by default, so a default run's table stays narrow)."""
  columns = {}
  for metric in parse_metrics(metrics):
    result = counterfactual_from_margin(records.keep, records["train_margin"], metric, records.subset_ratio)
    columns[f"memorization_{metric}"] = result.estimate
    columns[f"memorization_{metric}_se"] = result.se
  return EstimatorResult(columns=columns)


def counterfactual_summary(columns, records, **options) -> dict:
  return {name[len("memorization_"):]: {"median": nanmedian(columns[name]), "median_se": nanmedian(columns[f"{name}_se"])}
          for name in columns if not name.endswith("_se")}
