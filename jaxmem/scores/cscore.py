"""Consistency score (Jiang et al. 2021, "Characterizing Structural Regularities of Labeled Data in
Overparameterized Models", eq. 1 and Sec. 3).

  C_i = E_n E_{S ⊂ D∖i, |S| = n} P[f_S(x_i) = y_i],

the expected accuracy on example i of models trained on random subsets that do not contain it,
averaged over training-set sizes n. Hold-out estimator (their Sec. 3, ratios 10%..90%): for each
subset ratio r, the mean correctness of i over the models of ratio r that did not train on i,

  Ĉ_i(r) = mean_{m: r_m = r, i ∉ S_m} 1[f_m(x_i) = y_i],      Ĉ_i = mean_r Ĉ_i(r).

Per-ratio columns ``cscore_at_<r>``. Standard error of each Ĉ_i(r): the binomial SE with one
pseudo-success and one pseudo-failure, ``p̃ = (s + 1) / (n + 2)``, ``se = sqrt(p̃ (1 − p̃) / (n + 2))``
— the same per-group rule as the Agresti–Caffo SE of memorization, so it stays positive when all
models agree; the ratios use disjoint models, so ``se(Ĉ_i) = sqrt(Σ_r se_r²) / R``.

Learning-speed proxy (Jiang et al. Sec. 5, "cumulative training accuracy" as a cheap proxy that
needs no hold-out): the mean over training epochs and over the models that train on i of their
correctness on i (needs the per-epoch records ``train_correct_epochs`` (M, E, N)). Its Spearman
correlation with the C-score goes into the summary.

Differences from the reference (their code trains each ratio as separate jobs and releases only
the final scores): all ratios are blocks of one run (ratios interleaved over model ids, so a partial
run covers every ratio); Ĉ_i is NaN (empty cell) when some ratio has no held-out model for i
instead of averaging over the remaining ratios, which would change the estimand; we also give
standard errors. The proxy here averages over the subset models rather than one full-data run.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxmem.scores._result import EstimatorResult
from jaxmem.scores._stats import (in_out_stats, masked_mean, nanmedian, plus_two_se, ratio_name, ratio_strata, spearman,
                                  successes, sum_over_ratios)


class CScore(NamedTuple):
  estimate: np.ndarray                   # (N,) mean over ratios, NaN if any ratio lacks held-out models
  se: np.ndarray                         # (N,)
  ratios: tuple[float, ...]
  per_ratio: np.ndarray                  # (R, N) held-out accuracy per ratio
  per_ratio_se: np.ndarray               # (R, N)
  n_out: np.ndarray                      # (R, N) held-out models per ratio


def cscore(keep_MxN: np.ndarray, correct_MxN: np.ndarray, ratio_M: np.ndarray) -> CScore:
  """Jiang et al.'s hold-out C-score for every training example, per ratio and averaged.

  Args:
    keep_MxN: bool, model m trained on example i.
    correct_MxN: bool, model m classifies training example i correctly.
    ratio_M: subset ratio of every model.
  """
  keep_MxN, correct_MxN = np.asarray(keep_MxN, bool), np.asarray(correct_MxN, bool)
  ratio_M = np.asarray(ratio_M, np.float64)
  if keep_MxN.shape != correct_MxN.shape or ratio_M.shape != keep_MxN.shape[:1]:
    raise ValueError(f"keep {keep_MxN.shape}, correct {correct_MxN.shape} and ratio {ratio_M.shape} "
                     "must be (M, N), (M, N) and (M,)")
  n = keep_MxN.shape[1]
  if not len(ratio_M):
    empty = np.zeros((0, n))
    return CScore(np.full(n, np.nan), np.full(n, np.nan), (), empty, empty, empty.astype(np.int64))
  ratios, onehot_MxR = ratio_strata(ratio_M)
  held_out = in_out_stats(keep_MxN, correct_MxN.astype(np.float32), onehot_MxR, with_m2=False).outside
  n_out = np.asarray(held_out.n, np.float64)
  s = successes(held_out)
  per = np.where(n_out > 0, s / np.maximum(n_out, 1), np.nan)
  per_se = plus_two_se(s, n_out)
  # a plain mean propagates NaN: a ratio without held-out models makes C_i unknown
  estimate, se = sum_over_ratios(per) / len(ratios), np.sqrt(sum_over_ratios(per_se**2)) / len(ratios)
  return CScore(estimate, se, ratios, per, per_se, n_out.astype(np.int64))


def learning_speed(keep_MxN: np.ndarray, correct_epochs_MxExN: np.ndarray) -> np.ndarray:
  """Jiang et al.'s learning-speed proxy: mean over epochs and over models that train on i of
  their correctness on i; NaN where no model trains on i. This is the same quantity as the
  dynamics estimator's ``cumulative_accuracy`` (one implementation serves both names)."""
  keep_MxN = np.asarray(keep_MxN, bool)
  correct = np.asarray(correct_epochs_MxExN, bool)
  if correct.ndim != 3 or correct.shape[0] != keep_MxN.shape[0] or correct.shape[2] != keep_MxN.shape[1]:
    raise ValueError(f"train_correct_epochs {correct.shape} must be (M, E, N) for keep {keep_MxN.shape}")
  return masked_mean(correct.mean(axis=1), keep_MxN).mean


def cscore_columns(records, *, context=None) -> EstimatorResult:
  """Adapter: ``cscore``, ``cscore_se`` and ``cscore_at_<r>`` per ratio."""
  result = cscore(records.keep, records["train_correct"], records.subset_ratio)
  columns = {"cscore": result.estimate, "cscore_se": result.se}
  for r, values in zip(result.ratios, result.per_ratio):
    columns[f"cscore_at_{ratio_name(r)}"] = values
  return EstimatorResult(columns=columns)


def cscore_summary(columns, records, **options) -> dict:
  ratio_M = np.round(np.asarray(records.subset_ratio, np.float64), 6)
  ratios = [float(r) for r in np.unique(ratio_M)]
  return {"ratios": ratios, "models_per_ratio": {ratio_name(r): int((ratio_M == r).sum()) for r in ratios},
          "median": nanmedian(columns["cscore"]), "median_se": nanmedian(columns["cscore_se"]),
          "undefined": int(np.isnan(columns["cscore"]).sum())}


def several_ratios(records) -> bool:
  """The C-score is a default estimator only with several subset ratios: with one ratio it is that
  ratio's held-out accuracy, which memorization already contrasts (and a summary line would just
  report their -1 correlation)."""
  return len({round(float(r), 6) for r in np.asarray(records.subset_ratio).reshape(-1)}) > 1


def learning_speed_columns(records, *, context=None) -> EstimatorResult:
  """Adapter: ``learning_speed``, and the C-score it is compared with as the hidden column
  ``_cscore`` (the driver drops columns starting with ``_`` from the score table)."""
  return EstimatorResult(columns={"learning_speed": learning_speed(records.keep, records["train_correct_epochs"]),
                                  "_cscore": cscore(records.keep, records["train_correct"], records.subset_ratio).estimate})


def learning_speed_summary(columns, records, **options) -> dict:
  return {"spearman_with_cscore": spearman(columns["learning_speed"], columns["_cscore"]),
          "median": nanmedian(columns["learning_speed"])}
