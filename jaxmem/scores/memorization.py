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
"""

from __future__ import annotations

import numpy as np

from jaxmem.scores._stats import InOutDifference, agresti_caffo_se, in_out_difference


def memorization(keep_MxN: np.ndarray, correct_MxN: np.ndarray) -> InOutDifference:
  """Feldman & Zhang's memorization estimate and standard error for every training example.

  Args:
    keep_MxN: bool, model m trained on example i.
    correct_MxN: bool, model m classifies training example i correctly.
  """
  keep_MxN, correct_MxN = np.asarray(keep_MxN, bool), np.asarray(correct_MxN)
  if keep_MxN.shape != correct_MxN.shape:
    raise ValueError(f"keep {keep_MxN.shape} and correct {correct_MxN.shape} must have the same shape")
  result = in_out_difference(keep_MxN, correct_MxN.astype(np.float32))
  successes_in = np.where(result.n_in > 0, result.mean_in, 0) * result.n_in
  successes_out = np.where(result.n_out > 0, result.mean_out, 0) * result.n_out
  return result._replace(se=agresti_caffo_se(np.rint(successes_in), result.n_in,
                                             np.rint(successes_out), result.n_out))


def counterfactual_memorization(keep_MxN: np.ndarray, values_MxN: np.ndarray) -> InOutDifference:
  """Zhang et al. (2021) counterfactual memorization: mean_in − mean_out of any measure M(f, x_i)."""
  keep_MxN = np.asarray(keep_MxN, bool)
  if keep_MxN.shape != np.shape(values_MxN):
    raise ValueError(f"keep {keep_MxN.shape} and values {np.shape(values_MxN)} must have the same shape")
  return in_out_difference(keep_MxN, values_MxN)
