"""Label memorization (Feldman 2020; Feldman & Zhang 2020, "What Neural Networks Memorize and Why").

Definition (survey def. 1): mem(A, D, i) = P_{f~A(D)}[f(x_i) = y_i] − P_{f~A(D∖i)}[f(x_i) = y_i].

Estimator (Feldman & Zhang 2020, eq. 3 / Algorithm 1, the subsampled "leave-subset-out" estimator):
train M models on random subsets S_m of the training set and take, per example i,

  mem_i = mean_{m: i ∈ S_m} 1[f_m(x_i) = y_i] − mean_{m: i ∉ S_m} 1[f_m(x_i) = y_i].

Differences from the reference code (google-research/heldout-influence-estimation): we also return
the standard error of the difference, and examples with no in- or no out-model get NaN (an empty
cell) instead of a number computed from nothing. The estimate is exactly the plain in−out
difference; its standard error is Agresti & Caffo's (2000) for a difference of proportions, which
stays positive when all models agree (the plain Welch SE would claim certainty from 0 variance).
Counterfactual memorization (Zhang et al. 2021, def. 3) is the same difference of any per-model
measure; :func:`counterfactual_memorization` takes the measure's values directly.

Several subset ratios (a deviation the reference code never meets: it trains one ratio, 0.7): the
difference is taken within each ratio r (mem_i(r), its own Agresti-Caffo SE) and the estimate is
their equal-weight mean over ratios, SE ``sqrt(Σ_r se_r²) / R`` (the ratios use disjoint models).
Pooling the models of all ratios would compare mostly high-ratio (more accurate) in-models with
mostly low-ratio out-models and report the accuracy gap between ratios as memorization. An example
without in- or out-models at some ratio has no estimate (NaN), as for the C-score.
"""

from __future__ import annotations

import numpy as np

from jaxmem.scores._result import EstimatorResult
from jaxmem.scores._stats import InOutDifference, nanmedian, ratio_name, stratified_difference


def memorization(keep_MxN: np.ndarray, correct_MxN: np.ndarray, ratio_M: np.ndarray | None = None) -> InOutDifference:
  """Feldman & Zhang's memorization estimate and standard error for every training example.

  Args:
    keep_MxN: bool, model m trained on example i.
    correct_MxN: bool, model m classifies training example i correctly.
    ratio_M: subset ratio of every model (None: one ratio); differences are taken within ratios.
  """
  keep_MxN, correct_MxN = np.asarray(keep_MxN, bool), np.asarray(correct_MxN)
  if keep_MxN.shape != correct_MxN.shape:
    raise ValueError(f"keep {keep_MxN.shape} and correct {correct_MxN.shape} must have the same shape")
  return stratified_difference(keep_MxN, correct_MxN.astype(np.float32), ratio_M, binary=True)


def counterfactual_memorization(keep_MxN: np.ndarray, values_MxN: np.ndarray,
                                ratio_M: np.ndarray | None = None) -> InOutDifference:
  """Zhang et al. (2021) counterfactual memorization: mean_in − mean_out of any measure M(f, x_i),
  within each subset ratio, with Welch standard errors."""
  keep_MxN = np.asarray(keep_MxN, bool)
  if keep_MxN.shape != np.shape(values_MxN):
    raise ValueError(f"keep {keep_MxN.shape} and values {np.shape(values_MxN)} must have the same shape")
  return stratified_difference(keep_MxN, values_MxN, ratio_M)


def memorization_columns(records, *, context=None) -> EstimatorResult:
  """Adapter: ``memorization``, ``memorization_se``, ``n_in``, ``n_out`` and, with several subset
  ratios, ``memorization_at_<r>`` and ``memorization_at_<r>_se`` per ratio."""
  result = memorization(records.keep, records["train_correct"], records.subset_ratio)
  columns = {"memorization": result.estimate, "memorization_se": result.se,
             "n_in": result.n_in, "n_out": result.n_out}
  if len(result.ratios) > 1:
    for r, values, se in zip(result.ratios, result.per_ratio, result.per_ratio_se):
      columns[f"memorization_at_{ratio_name(r)}"] = values
      columns[f"memorization_at_{ratio_name(r)}_se"] = se
  return EstimatorResult(columns=columns)


def memorization_summary(columns, records, **options) -> dict:
  ratios = sorted({round(float(r), 6) for r in np.asarray(records.subset_ratio).reshape(-1)})
  return {"median": nanmedian(columns["memorization"]), "median_se": nanmedian(columns["memorization_se"]),
          "undefined": int(np.isnan(columns["memorization"]).sum()), "ratios": ratios}
