"""Membership-inference attack metrics: ROC, AUC, balanced accuracy, TPR at a fixed FPR, and
bootstrap intervals for all of them.

Carlini et al. (2022, "Membership Inference Attacks From First Principles", §III) argue that an
attack must be judged by its true-positive rate at a low false-positive rate (0.1%, 1%) on a log-log
ROC curve, not by average-case accuracy or AUC alone; we report all of them.

Conventions: a higher score means "more likely a member". ``tpr_at_fpr(α)`` is the largest TPR
among ROC points whose FPR is at most α (the reference ``plot.py`` takes the last point with
FPR < α, which for α below 1/num_negatives is the trivial point (0, 0)); balanced accuracy is the
best threshold's ``1 − (FPR + FNR)/2``, as the reference's "accuracy".

Bootstrap: the pooled (target model, example) pairs are not independent — the same example appears
under every target — so intervals resample *examples* (clusters) with replacement and keep all of an
example's pairs together, with a seeded generator.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_curve

from jaxmem.errors import JaxmemError

DEFAULT_FPRS: tuple[float, ...] = (0.001, 0.01)


def roc(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """FPR and TPR at every distinct threshold (sklearn's ``roc_curve``; ties form one point)."""
  fpr, tpr, _ = roc_curve(np.asarray(members, bool), np.asarray(scores, np.float64), drop_intermediate=False)
  return fpr, tpr


def metrics_from_roc(fpr: np.ndarray, tpr: np.ndarray, fprs: Sequence[float] = DEFAULT_FPRS) -> dict[str, float]:
  """AUC (trapezoid over the ROC, i.e. Mann-Whitney with ties counted one half), balanced accuracy,
  and TPR at each FPR in ``fprs``."""
  out = {"auc": float(np.trapezoid(tpr, fpr)), "balanced_accuracy": float(np.max(1 - (fpr + (1 - tpr)) / 2))}
  for alpha in fprs:
    out[tpr_key(alpha)] = float(np.max(tpr[fpr <= alpha]))  # (0, 0) is always a point
  return out


def tpr_key(alpha: float) -> str:
  """``0.001`` → ``'tpr_at_0.1%_fpr'``."""
  return f"tpr_at_{100 * alpha:g}%_fpr"


def attack_metrics(scores: np.ndarray, members: np.ndarray, *, fprs: Sequence[float] = DEFAULT_FPRS) -> dict[str, float]:
  """Point metrics of one attack; NaN scores are left out."""
  scores, members = np.ravel(np.asarray(scores, np.float64)), np.ravel(np.asarray(members, bool))
  valid = ~np.isnan(scores)
  scores, members = scores[valid], members[valid]
  if members.all() or not members.any():
    return {name: float("nan") for name in _metric_names(fprs)}
  return metrics_from_roc(*roc(scores, members), fprs)


def _metric_names(fprs: Sequence[float]) -> list[str]:
  return ["auc", "balanced_accuracy"] + [tpr_key(a) for a in fprs]


def _weighted_metrics(members_P: np.ndarray, boundary_P: np.ndarray, weights_BxP: np.ndarray,
                      fprs: Sequence[float]) -> dict[str, np.ndarray]:
  """Metrics for B weightings of the same pairs, already sorted by descending score.

  A bootstrap resample of examples is a weighting of the pairs by how often their example was
  drawn, so one sort serves every draw: true/false positive counts at each distinct threshold are
  cumulative sums of the weights up to the last pair of each run of tied scores (``boundary``).
  Same ROC points as ``sklearn.metrics.roc_curve(..., sample_weight=w, drop_intermediate=False)``.
  """
  tp = np.cumsum(weights_BxP * members_P, axis=1)[:, boundary_P]
  fp = np.cumsum(weights_BxP * ~members_P, axis=1)[:, boundary_P]
  positives, negatives = tp[:, -1:], fp[:, -1:]
  zero = np.zeros((weights_BxP.shape[0], 1))
  with np.errstate(invalid="ignore", divide="ignore"):
    tpr = np.concatenate([zero, tp / positives], axis=1)
    fpr = np.concatenate([zero, fp / negatives], axis=1)
  out = {"auc": np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1),
         "balanced_accuracy": np.max(1 - (fpr + (1 - tpr)) / 2, axis=1)}
  for alpha in fprs:
    out[tpr_key(alpha)] = np.max(np.where(fpr <= alpha, tpr, 0.0), axis=1)
  empty = (positives[:, 0] <= 0) | (negatives[:, 0] <= 0)
  return {name: np.where(empty, np.nan, value) for name, value in out.items()}


def bootstrap_attack_metrics(scores_TxN: np.ndarray, members_TxN: np.ndarray, *, num_bootstrap: int = 200,
                             seed: int = 0, level: float = 0.95,
                             fprs: Sequence[float] = DEFAULT_FPRS) -> dict[str, dict[str, float]]:
  """Point metrics and percentile bootstrap intervals, resampling examples (columns) as clusters.

  Args:
    scores_TxN: attack scores of T target models on N examples (higher = member); NaN = no score.
    members_TxN: bool, whether target t trained on example n.
  Returns:
    ``{metric: {"value", "low", "high"}}``.
  """
  if not isinstance(num_bootstrap, (int, np.integer)) or num_bootstrap < 2:
    raise JaxmemError(f"bootstrap resamples must be an integer >= 2, got {num_bootstrap!r}")
  scores_TxN = np.asarray(scores_TxN, np.float64)
  members_TxN = np.asarray(members_TxN, bool)
  if scores_TxN.ndim == 1:
    scores_TxN, members_TxN = scores_TxN[None], members_TxN[None]
  point = attack_metrics(scores_TxN, members_TxN, fprs=fprs)
  n = scores_TxN.shape[1]
  column_TxN = np.broadcast_to(np.arange(n), scores_TxN.shape)
  valid = ~np.isnan(scores_TxN)
  scores_P, members_P, column_P = scores_TxN[valid], members_TxN[valid], column_TxN[valid]
  order = np.argsort(-scores_P, kind="stable")
  scores_P, members_P, column_P = scores_P[order], members_P[order], column_P[order]
  boundary_P = np.append(np.diff(scores_P) != 0, True)
  rng = np.random.default_rng(seed)
  draws: dict[str, list[np.ndarray]] = {name: [] for name in point}
  per_batch = max(1, 4_000_000 // max(1, scores_P.size))  # bounded memory per batch of draws
  for start in range(0, num_bootstrap, per_batch):
    # Each batch draws its own resamples, in the same order from the same generator as drawing all
    # of them first: the same numbers, without a (num_bootstrap, N) array of counts.
    counts_BxN = np.stack([np.bincount(rng.integers(0, n, n), minlength=n)
                           for _ in range(min(per_batch, num_bootstrap - start))])
    weights = counts_BxN[:, column_P].astype(np.float64)
    for name, values in _weighted_metrics(members_P, boundary_P, weights, fprs).items():
      draws[name].append(values)
  tail = 100 * (1 - level) / 2
  out: dict[str, dict[str, Any]] = {}
  for name, value in point.items():
    values = np.concatenate(draws[name]) if draws[name] else np.zeros(0)
    values = values[~np.isnan(values)]
    low, high = (np.percentile(values, [tail, 100 - tail]) if values.size else (np.nan, np.nan))
    out[name] = {"value": value, "low": float(low), "high": float(high)}
  return out


def thin_roc(fpr: np.ndarray, tpr: np.ndarray, max_points: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
  """A curve of at most about ``max_points`` of the ROC points, for storing and plotting; the
  curve itself when it is that short.

  Every kept point is an exact point of the curve (no interpolation): the first and the last, and
  for each of ``max_points // 3`` log-spaced and as many linear FPR values g, and as many linear
  TPR values, the last point at or below g. So the stored curve's largest TPR at FPR <= g is
  exact at every grid value g, and between two kept points the full curve lies in the rectangle
  they span (it is monotone). Metrics are never computed from a thinned curve: they use all pairs.
  """
  fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
  if fpr.size <= max_points:
    return fpr, tpr
  k = max(max_points // 3, 2)
  smallest = fpr[fpr > 0].min() if (fpr > 0).any() else 1.0
  fpr_grid = np.concatenate([np.geomspace(smallest, 1.0, k), np.linspace(0.0, 1.0, k)])
  keep = np.concatenate([[0, fpr.size - 1], np.searchsorted(fpr, fpr_grid, side="right") - 1,
                         np.searchsorted(tpr, np.linspace(0.0, 1.0, k), side="right") - 1])
  keep = np.unique(np.clip(keep, 0, fpr.size - 1))
  return fpr[keep], tpr[keep]


def per_example_auc(scores_MxN: np.ndarray, members_MxN: np.ndarray, *, min_each: int = 1) -> np.ndarray:
  """For every example (column), the AUC of its scores over models for telling the models that
  trained on it from those that did not; NaN where fewer than ``min_each`` finite member or
  non-member scores exist. Computed by ranks per column (Mann-Whitney U, ties one half)."""
  scores_MxN = np.asarray(scores_MxN, np.float64)
  members_MxN = np.asarray(members_MxN, bool)
  valid = ~np.isnan(scores_MxN)
  ranks = rankdata(scores_MxN, axis=0, nan_policy="omit")  # ranks among a column's finite entries
  pos = members_MxN & valid
  n_pos, n_neg = pos.sum(0), (~members_MxN & valid).sum(0)
  u = np.where(pos, ranks, 0.0).sum(0) - n_pos * (n_pos + 1) / 2
  ok = (n_pos >= max(min_each, 1)) & (n_neg >= max(min_each, 1))
  return np.where(ok, u / np.maximum(n_pos * n_neg, 1), np.nan)
