"""The one stratified in/out reduction every in/out estimator is a formula on, and shared statistics.

**The kernel** (:func:`in_out_stats`). For a block of training examples and any per-model measure
``values_MxN`` (or ``values_MxNxA``, a measure per query), and model *groups* given as a weight matrix
``weights_MxG`` (a one-hot of each model's subset ratio; bootstrap counts times that one-hot; one
column of ones), it returns per group g and example i the sufficient statistics of the in-models
(``keep[m, i]``) and of the out-models:

  n_g,i = Σ_m w_mg·1[in],   mean_g,i = Σ_m w_mg·1[in]·x_mi / n_g,i,   m2_g,i = Σ_m w_mg·1[in]·(x_mi − mean_g,i)²

computed on the device in float32. The variance is two-pass (mean first, then squared deviations
from it), never Σx² − n·mean² (which cancels catastrophically in float32 when the spread is small
against the mean); blocks of models merge with Chan et al.'s (1979) pairwise update
(:func:`merge_stats`), so the result does not depend on how the models were split. Integer weights
(counts) keep n exact up to 2^24.

Ratios are never pooled: in a run with several subset ratios the in-models are mostly the
high-ratio, more accurate ones, so a pooled in−out difference measures the accuracy gap between
ratios. Every estimator takes differences within each ratio (:func:`ratio_strata` gives the one-hot)
and averages them with equal weight over ratios (:func:`average_over_ratios`).

For influence the "example" is a (train i, test j) pair: in/out is decided by ``keep[:, i]`` and the
measure is test correctness ``c[:, j]``; :func:`in_out_pair_sums` gives n and Σ per pair as one
matmul (a 0/1 measure needs no M2: Σx² = Σx).

One exception: LiRA's Gaussian fits (:mod:`jaxmem.scores.lira`) keep their own float64 sums on the
host, because its leave-one-out fits subtract one target from the totals and its one-sided log Φ
of members several σ above the out-mean rounds to ties in float32, exactly where the low-FPR metrics
live; it refuses multi-ratio runs instead of stratifying.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import rankdata, spearmanr

from jaxmem.errors import JaxmemError

_HIGHEST = jax.lax.Precision.HIGHEST
_einsum = functools.partial(jnp.einsum, precision=_HIGHEST)


#: Bytes one block of training examples may use while an estimator works on it (its records, the
#: working copies made of them, the device's arguments and temporaries); block sizes follow from it.
DEFAULT_MEMORY_BUDGET = 512 * 2**20
#: Working bytes per record value (one model x one example x one query or epoch) of a block, beyond
#: the stored value itself: a float32 copy on the host (4), the device's copies of the kernel's
#: arguments (5: the value as float32 and keep as bool) and the kernel's temporaries (XLA's
#: ``memory_analysis()`` of :func:`_in_out_stats` on CPU: 12 bytes per value with one group, 20
#: with several), rounded up for the masks and measures estimators derive on the host.
WORKING_BYTES_PER_VALUE = 32


def block_size_for_budget(records, names, budget_bytes: int = DEFAULT_MEMORY_BUDGET, *,
                          extra_bytes_per_example: int = 0) -> int:
  """Training examples per block so that ``keep`` and the named records of one block, with
  :data:`WORKING_BYTES_PER_VALUE` for every value of them, plus ``extra_bytes_per_example`` (an
  estimator's own per-example arrays, e.g. bootstrap resamples) fit in ``budget_bytes``; records
  without an N axis (test records) are read whole and count once. At most N, at least 1 only if
  one example fits (else a one-line error). Only shapes are read (``records.shape/dtype/axes``)."""
  present = [name for name in dict.fromkeys(["keep", *names]) if name == "keep" or name in records]
  return records.block_size_for(budget_bytes, present, working_bytes_per_value=WORKING_BYTES_PER_VALUE,
                                extra_bytes_per_example=extra_bytes_per_example)


class GroupStats(NamedTuple):
  """Count, mean and sum of squared deviations of one side (in or out) per group and example:
  ``(G, N)`` or ``(G, N, A)`` float32 (``n`` is ``(G, N)``); mean and m2 are 0 where n = 0."""
  n: np.ndarray
  mean: np.ndarray
  m2: np.ndarray


class InOutStats(NamedTuple):
  inside: GroupStats
  outside: GroupStats


def ratio_key(ratio) -> float:
  """A subset ratio as a group key: float32 ratios rounded to 6 digits (0.3 and 0.30000001 agree)."""
  return round(float(ratio), 6)


def ratio_name(ratio: float) -> str:
  """``0.3`` -> ``'0.3'`` (column suffix ``_at_0.3``)."""
  return f"{ratio_key(ratio):g}"


def ratio_strata(ratio_M) -> tuple[tuple[float, ...], np.ndarray]:
  """The run's distinct subset ratios (ascending) and the one-hot ``(M, R)`` float32 of each model's."""
  ratio_M = np.round(np.asarray(ratio_M, np.float64).reshape(-1), 6)
  ratios, index_M = np.unique(ratio_M, return_inverse=True)
  onehot_MxR = np.zeros((len(ratio_M), len(ratios)), np.float32)
  onehot_MxR[np.arange(len(ratio_M)), index_M] = 1.0
  return tuple(float(r) for r in ratios), onehot_MxR


def _side(weights_MxG, member_MxNx1, values_MxNxA, with_m2: bool):
  """Two-pass count/mean/M2 of the models where ``member`` holds, per group. The second pass needs
  each model's own group mean: with one-hot weights (each model in one group) that is a matmul
  with the one-hot; weights that put a model in several groups (bootstrap counts) ask for means only."""
  w_MxNx1 = member_MxNx1.astype(jnp.float32)
  # Shift every example by its first model's value: sums of values far from 0 (a margin of 1e4
  # varying by 0.01) would lose the digits the variance lives in to float32 rounding of the mean.
  # Values of non-members are never read (they may be NaN: a measure undefined for that model).
  shift_1xNxA = jnp.where(jnp.isfinite(values_MxNxA[:1]), values_MxNxA[:1], 0.0)
  x_MxNxA = jnp.where(member_MxNx1, values_MxNxA - shift_1xNxA, 0.0)
  n_GxNx1 = _einsum("mg,mnk->gnk", weights_MxG, w_MxNx1)
  sum_GxNxA = _einsum("mg,mna->gna", weights_MxG, x_MxNxA)
  shifted_mean_GxNxA = jnp.where(n_GxNx1 > 0, sum_GxNxA / jnp.maximum(n_GxNx1, 1), 0.0)
  mean_GxNxA = jnp.where(n_GxNx1 > 0, shifted_mean_GxNxA + shift_1xNxA, 0.0)
  if not with_m2:
    return n_GxNx1[..., 0], mean_GxNxA, jnp.zeros_like(mean_GxNxA)
  own_mean_MxNxA = _einsum("mg,gna->mna", weights_MxG, shifted_mean_GxNxA)
  m2_GxNxA = _einsum("mg,mna->gna", weights_MxG, jnp.where(member_MxNx1, x_MxNxA - own_mean_MxNxA, 0.0) ** 2)
  return n_GxNx1[..., 0], mean_GxNxA, m2_GxNxA


@functools.partial(jax.jit, static_argnames=("with_m2",))
def _in_out_stats(weights_MxG, keep_MxN, values_MxNxA, *, with_m2: bool = True):
  keep_MxNx1 = keep_MxN[..., None]
  return (_side(weights_MxG, keep_MxNx1, values_MxNxA, with_m2),
          _side(weights_MxG, ~keep_MxNx1, values_MxNxA, with_m2))


def merge_stats(a: GroupStats, b: GroupStats) -> GroupStats:
  """Chan, Golub & LeVeque's (1979) pairwise merge of the statistics of two disjoint sets of models."""
  n = a.n + b.n
  n_x = n[..., None] if a.mean.ndim > a.n.ndim else n
  na = a.n[..., None] if a.mean.ndim > a.n.ndim else a.n
  nb = b.n[..., None] if a.mean.ndim > a.n.ndim else b.n
  safe = np.maximum(n_x, 1)
  delta = b.mean - a.mean
  mean = np.where(n_x > 0, a.mean + delta * (nb / safe), 0.0).astype(np.float32)
  m2 = (a.m2 + b.m2 + delta**2 * (na * nb / safe)).astype(np.float32)
  return GroupStats(n.astype(np.float32), mean, m2)


def in_out_stats(keep_MxN, values_MxN, weights_MxG=None, *, model_block: int | None = None,
                 with_m2: bool = True) -> InOutStats:
  """Per group and example, n / mean / M2 of ``values`` over the in-models and the out-models.

  Args:
    keep_MxN: bool, model m trained on example i.
    values_MxN: the per-model measure, (M, N) or (M, N, A) (one value per query).
    weights_MxG: model weights per group (default: one group of all models, weight 1). For M2 each
      model must be in at most one group with weight 1 (a one-hot, e.g. :func:`ratio_strata`).
    model_block: models per device pass (default: all); blocks merge exactly (Chan), so this only
      bounds memory.
    with_m2: False: counts and means only (m2 is 0), for weights that are not a one-hot.
  """
  keep_MxN = np.asarray(keep_MxN, bool)
  values = np.asarray(values_MxN, np.float32)
  squeeze = values.ndim == 2
  values_MxNxA = values[..., None] if squeeze else values
  if values_MxNxA.shape[:2] != keep_MxN.shape:
    raise ValueError(f"keep {keep_MxN.shape} and values {values.shape} must agree on (M, N)")
  m = keep_MxN.shape[0]
  weights = np.ones((m, 1), np.float32) if weights_MxG is None else np.asarray(weights_MxG, np.float32)
  step = m if not model_block else max(1, int(model_block))
  merged = None
  for start in range(0, max(m, 1), step):
    rows = slice(start, start + step)
    sides = _in_out_stats(jnp.asarray(weights[rows]), jnp.asarray(keep_MxN[rows]), jnp.asarray(values_MxNxA[rows]),
                          with_m2=with_m2)
    sides = [GroupStats(*(np.asarray(x) for x in side)) for side in sides]
    merged = sides if merged is None else [merge_stats(a, b) for a, b in zip(merged, sides)]
  if squeeze:
    merged = [GroupStats(s.n, s.mean[..., 0], s.m2[..., 0]) for s in merged]
  return InOutStats(*merged)


class Moments(NamedTuple):
  """Mean, unbiased variance and count of one side, float64, NaN where undefined."""
  mean: np.ndarray   # NaN where n = 0
  var: np.ndarray    # NaN where n < 2
  n: np.ndarray


def moments(side: GroupStats) -> Moments:
  n = np.asarray(side.n, np.float64)
  n_x = n[..., None] if side.mean.ndim > n.ndim else n
  mean = np.where(n_x > 0, np.asarray(side.mean, np.float64), np.nan)
  var = np.where(n_x > 1, np.asarray(side.m2, np.float64) / np.maximum(n_x - 1, 1), np.nan)
  return Moments(mean, var, n)


class MaskedMean(NamedTuple):
  mean: np.ndarray  # NaN where n == 0
  se: np.ndarray    # sample std / sqrt(n); NaN where n < 2
  n: np.ndarray


def masked_mean(values_MxN: np.ndarray, mask_MxN: np.ndarray) -> MaskedMean:
  """Per-column mean and standard error over the rows where ``mask`` holds: the in-side of the
  kernel with one group of all models (a mean over the models that trained on an example is not
  an in−out contrast, so nothing is stratified here)."""
  inside = moments(in_out_stats(mask_MxN, values_MxN).inside)
  mean, var, n = inside.mean[0], inside.var[0], inside.n[0]
  se = np.where(n > 1, np.sqrt(var / np.maximum(n, 1)), np.nan)
  return MaskedMean(mean, se, n.astype(np.int64))


def masked_mean_float64(values_MxN: np.ndarray, mask_MxN: np.ndarray) -> np.ndarray:
  """Per-column mean (N,) over the rows where ``mask`` holds, in float64 on the host (NaN where no
  row does): for values such as losses summed over epochs, whose float32 mean would lose the digits
  their reference comparisons pin; everything with an in/out contrast or an SE uses the kernel."""
  values = np.asarray(values_MxN, np.float64)
  mask = np.asarray(mask_MxN, bool)
  n = mask.sum(axis=0)
  total = np.where(mask, values, 0.0).sum(axis=0)
  return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def successes(side: GroupStats) -> np.ndarray:
  """Σ of a 0/1 measure, recovered exactly from the float32 mean and count (counts < 2^23)."""
  return np.rint(np.asarray(side.mean, np.float64) * np.asarray(side.n, np.float64))


def average_over_ratios(per_RxN: np.ndarray, se_RxN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Equal-weight mean over ratios and its SE (the ratios use disjoint models, so the variances add):
  ``mean_r x_r`` and ``sqrt(Σ_r se_r²) / R``. NaN wherever some ratio is NaN (a ratio without in- or
  out-models makes the headline unknown; averaging the others would change the estimand)."""
  per_RxN, se_RxN = np.asarray(per_RxN, np.float64), np.asarray(se_RxN, np.float64)
  r = per_RxN.shape[0]
  if r == 1:
    return per_RxN[0], se_RxN[0]
  return sum_over_ratios(per_RxN) / r, np.sqrt(sum_over_ratios(se_RxN**2)) / r


def sum_over_ratios(x_RxN: np.ndarray) -> np.ndarray:
  """Σ_r x_r added in ratio order for every example (numpy's reduction along an axis pairs terms
  differently for a single column than for many, which would make results depend on the block
  of examples they were computed in)."""
  total = np.array(x_RxN[0], np.float64, copy=True)
  for row in x_RxN[1:]:
    total += row
  return total


class InOutDifference(NamedTuple):
  """Per-example ``mean_in − mean_out`` of some per-model measure, with its standard error.

  With several subset ratios, ``estimate`` is the equal-weight mean over ratios of the within-ratio
  difference (``per_ratio``, one row per entry of ``ratios``) and ``se`` combines the per-ratio SEs;
  ``mean_in``/``mean_out`` are likewise averaged over ratios and ``n_in``/``n_out`` are totals.
  Entries with no in or no out model (at some ratio) are NaN; with a single in or out model the
  Welch SE is NaN (unknown).
  """
  estimate: np.ndarray
  se: np.ndarray
  mean_in: np.ndarray
  mean_out: np.ndarray
  n_in: np.ndarray
  n_out: np.ndarray
  ratios: tuple[float, ...] = ()
  per_ratio: np.ndarray | None = None      # (R, N)
  per_ratio_se: np.ndarray | None = None   # (R, N)


def welch_difference(stats: InOutStats) -> tuple[np.ndarray, np.ndarray]:
  """Per group: ``mean_in − mean_out`` and Welch's ``sqrt(s_in²/n_in + s_out²/n_out)``."""
  a, b = moments(stats.inside), moments(stats.outside)
  n_in = a.n[..., None] if a.mean.ndim > a.n.ndim else a.n
  n_out = b.n[..., None] if b.mean.ndim > b.n.ndim else b.n
  se = np.sqrt(a.var / np.maximum(n_in, 1) + b.var / np.maximum(n_out, 1))
  return a.mean - b.mean, se


def proportion_difference(stats: InOutStats) -> tuple[np.ndarray, np.ndarray]:
  """Per group, for a 0/1 measure: ``s_in/n_in − s_out/n_out`` (float64 from exact counts, so equal
  proportions give exactly 0) and the Agresti-Caffo SE."""
  s_in, s_out = successes(stats.inside), successes(stats.outside)
  n_in, n_out = np.asarray(stats.inside.n, np.float64), np.asarray(stats.outside.n, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    estimate = np.where((n_in > 0) & (n_out > 0), s_in / n_in - s_out / n_out, np.nan)
  return estimate, agresti_caffo_se(s_in, n_in, s_out, n_out)


def stratified_difference(keep_MxN, values_MxN, ratio_M=None, *, binary: bool = False) -> InOutDifference:
  """The in−out difference of ``values`` within each subset ratio, averaged over ratios.

  ``binary``: the measure is 0/1 (correctness); the difference is taken from exact counts and the SE
  is Agresti & Caffo's, else Welch's."""
  keep_MxN = np.asarray(keep_MxN, bool)
  if ratio_M is None:
    ratio_M = np.zeros(keep_MxN.shape[0])
  ratios, onehot_MxR = ratio_strata(ratio_M)
  if onehot_MxR.shape[0] != keep_MxN.shape[0]:
    raise ValueError(f"subset ratios {onehot_MxR.shape[0]} do not match keep {keep_MxN.shape}")
  stats = in_out_stats(keep_MxN, values_MxN, onehot_MxR)
  per, per_se = proportion_difference(stats) if binary else welch_difference(stats)
  estimate, se = average_over_ratios(per, per_se)
  mean_in, _ = average_over_ratios(moments(stats.inside).mean, per_se)
  mean_out, _ = average_over_ratios(moments(stats.outside).mean, per_se)
  n_in = np.asarray(stats.inside.n, np.float64).sum(axis=0).astype(np.int64)
  n_out = np.asarray(stats.outside.n, np.float64).sum(axis=0).astype(np.int64)
  return InOutDifference(estimate, se, mean_in, mean_out, n_in, n_out, ratios, per, per_se)


def in_out_difference(keep_MxN: np.ndarray, values_MxN: np.ndarray, ratio_M=None) -> InOutDifference:
  """Counterfactual in−out difference of ``values`` over models (rows) per example (column), within
  each subset ratio (one ratio if ``ratio_M`` is None), with Welch standard errors."""
  return stratified_difference(keep_MxN, values_MxN, ratio_M)


def in_out_pair_sums(keep_MxB: jax.Array, values_MxT: jax.Array, onehot_MxR: jax.Array):
  """Sufficient statistics of a 0/1 measure for (train i, test j) pairs, per ratio: counts
  ``n_in_RxB`` and ``n_out_RxB`` and sums ``sums_in_RxBxT`` and ``sums_out_RxBxT`` (one matmul;
  exact in float32 below 2^24). Traceable (called inside jitted influence blocks)."""
  m, b = keep_MxB.shape
  r = onehot_MxR.shape[1]
  keep_MxRB = (onehot_MxR[:, :, None] * keep_MxB[:, None, :]).reshape(m, r * b)
  sums_in_RxBxT = jnp.matmul(keep_MxRB.T, values_MxT, precision=_HIGHEST).reshape(r, b, -1)
  total_RxT = jnp.matmul(onehot_MxR.T, values_MxT, precision=_HIGHEST)
  n_in_RxB = jnp.matmul(onehot_MxR.T, keep_MxB, precision=_HIGHEST)
  n_out_RxB = onehot_MxR.sum(axis=0)[:, None] - n_in_RxB
  return n_in_RxB, n_out_RxB, sums_in_RxBxT, total_RxT[:, None, :] - sums_in_RxBxT


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
  agreed — with 20 models all correct the true rate is not known to be exactly 1. NaN where either
  group is empty."""
  se = np.sqrt(plus_two_se(successes_in, n_in) ** 2 + plus_two_se(successes_out, n_out) ** 2)
  return np.where((np.asarray(n_in) > 0) & (np.asarray(n_out) > 0), se, np.nan)


def nanmedian(x) -> float:
  """Median of the finite entries; NaN if there are none (no warning)."""
  x = np.asarray(x, np.float64)
  return float(np.nanmedian(x)) if np.isfinite(x).any() else float("nan")


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
