"""Statistics shared by the estimators: masked in/out means with standard errors, AUROC."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import rankdata, spearmanr


class InOutDifference(NamedTuple):
  """Per-example ``mean_in − mean_out`` of some per-model value, with its standard error.

  ``se = sqrt(s_in²/n_in + s_out²/n_out)`` (Welch), with unbiased sample variances. Entries with
  no in or no out model are NaN; with a single in or out model the SE is NaN (unknown).
  """
  estimate: np.ndarray
  se: np.ndarray
  mean_in: np.ndarray
  mean_out: np.ndarray
  n_in: np.ndarray
  n_out: np.ndarray


@jax.jit
def _masked_mean_var(mask_MxN: jax.Array, values_MxN: jax.Array):
  """Column means and unbiased variances over the rows where ``mask`` holds (two-pass, stable)."""
  weight = mask_MxN.astype(values_MxN.dtype)
  count = weight.sum(axis=0)
  mean = jnp.where(count > 0, (weight * values_MxN).sum(axis=0) / jnp.maximum(count, 1), jnp.nan)
  centered = jnp.where(mask_MxN, values_MxN - mean[None, :], 0.0)
  var = jnp.where(count > 1, (centered**2).sum(axis=0) / jnp.maximum(count - 1, 1), jnp.nan)
  return mean, var, count


def in_out_difference(keep_MxN: np.ndarray, values_MxN: np.ndarray) -> InOutDifference:
  """Counterfactual in−out difference of ``values`` over models (rows) per example (column)."""
  keep = jnp.asarray(keep_MxN, dtype=bool)
  values = jnp.asarray(values_MxN, dtype=jnp.float32)
  mean_in, var_in, n_in = _masked_mean_var(keep, values)
  mean_out, var_out, n_out = _masked_mean_var(~keep, values)
  se = jnp.sqrt(var_in / jnp.maximum(n_in, 1) + var_out / jnp.maximum(n_out, 1))
  to_np = lambda a: np.asarray(a, dtype=np.float64)
  return InOutDifference(to_np(mean_in - mean_out), to_np(se), to_np(mean_in), to_np(mean_out),
                         np.asarray(n_in, dtype=np.int64), np.asarray(n_out, dtype=np.int64))


def plus_two_se(successes, n) -> np.ndarray:
  """Standard error of a proportion with one pseudo-success and one pseudo-failure added (the
  "plus two" estimate of Agresti & Caffo 2000); NaN where n = 0."""
  successes, n = np.asarray(successes, np.float64), np.asarray(n, np.float64)
  p = (successes + 1) / (n + 2)
  return np.where(n > 0, np.sqrt(p * (1 - p) / (n + 2)), np.nan)


def agresti_caffo_se(successes_in, n_in, successes_out, n_out) -> np.ndarray:
  """Standard error of a difference of two proportions with one success and one failure added to
  each group (Agresti & Caffo 2000, "Simple and effective confidence intervals for proportions and
  differences of proportions"). Unlike the plain Welch SE it is never 0 just because every model
  agreed — with 20 models all correct the true rate is not known to be exactly 1."""
  return np.sqrt(plus_two_se(successes_in, n_in) ** 2 + plus_two_se(successes_out, n_out) ** 2)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman rank correlation over the entries where both are finite; NaN with fewer than 3 such
  entries or when either side is constant there (no ranking to correlate)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  valid = np.isfinite(a) & np.isfinite(b)
  if valid.sum() < 3 or np.ptp(a[valid]) == 0 or np.ptp(b[valid]) == 0:
    return float("nan")
  return float(spearmanr(a[valid], b[valid]).statistic)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
  """Area under the ROC curve of ``scores`` for finding ``positive`` (Mann-Whitney U, ties count
  one half). NaN scores are left out; NaN if either class is empty."""
  scores = np.asarray(scores, dtype=np.float64)
  positive = np.asarray(positive, dtype=bool)
  valid = ~np.isnan(scores)
  scores, positive = scores[valid], positive[valid]
  n_pos, n_neg = int(positive.sum()), int((~positive).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = rankdata(scores)
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
