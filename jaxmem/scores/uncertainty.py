"""Uncertainty of the per-example estimates: confidence intervals for memorization, split-half
reliability, and how many models a target standard error needs.

- **Score interval for memorization** (the default ``memorization_ci_low/high``). Memorization on
  correctness is a difference of two binomial proportions, the in-models' and the out-models'
  accuracy on the example (``x_in/n_in − x_out/n_out``), so it gets the interval built for that:
  Newcombe's (1998, "Interval estimation for the difference between independent proportions:
  comparison of eleven methods", Stat. Med. 17:873, method 10) hybrid score interval,

    L = d − sqrt((p_in − l_in)² + (u_out − p_out)²),   U = d + sqrt((u_in − p_in)² + (p_out − l_out)²),

  with (l, u) each proportion's Wilson (1927) score interval (no continuity correction). With
  several subset ratios the estimate is the equal-weight mean over ratios of within-ratio
  differences, a linear combination Σ_r (p_in,r − p_out,r)/R of 2R independent proportions; its
  interval is Zou & Donner's (2008, "Construction of confidence limits about effect measures: a
  general approach", Stat. Med. 27:1693) MOVER recombination of the same Wilson limits,

    L = d − sqrt(Σ_r (p_in,r − l_in,r)² + (u_out,r − p_out,r)²) / R   (U likewise),

  which is Newcombe's interval when R = 1. Unlike a percentile bootstrap over models it is never
  degenerate where every model agreed (7 in-models right, 1 out-model wrong: [0.13, 1] rather
  than [1, 1]), and its coverage is near nominal across p (Newcombe's evaluation; the tests sum
  its exact coverage); coverage on trained models is in ``benchmarks/bootstrap_coverage.md``. With
  one ratio its width is at least 0.77 times the Agresti–Caffo interval ``estimate ± z·se``
  (clipped to [−1, 1]) for every count with n_in, n_out ≤ 120 (checked exhaustively; both tend to
  the Wald width for larger n), so it never claims more certainty than the reported SE.
- **Bootstrap over models** (Efron & Tibshirani 1993, percentile interval, ch. 13): the models are
  the independent units (each is one draw of a random subset and a random training run), so we
  resample M models with replacement B times and recompute every example's in−out difference.
  Vectorized: a resample is a row of multinomial counts ``w`` (B×M), and the resampled sums are
  matmuls ``w @ (keep·values)``, ``w @ keep`` etc. (B×N), computed on the device in blocks of
  examples. Seeded with an explicit ``jax.random`` key. Resamples where an example has no in- or no
  out-model are dropped for that example. The interval is the (α/2, 1 − α/2) percentile of the
  resampled estimates. The percentile interval alone is degenerate where every model agrees (the
  bootstrap cannot see variance it did not observe: [1, 1] for an example with 7 in-models all
  right and 1 out-model wrong, whose Agresti–Caffo SE is 0.29); wherever it is narrower than half
  the SE-based interval ``estimate ± z·se``, that interval is reported instead (a deviation from
  the plain percentile method; coverage in ``benchmarks/bootstrap_coverage.md``). With several
  subset ratios each resample's difference is taken within ratios, as the estimate. For
  memorization on correctness it is used only when asked for (``resamples``); the score interval
  above is the default there. It is the tool for continuous per-model measures (margins), where
  no closed-form interval applies.
- **Split-half reliability** (Spearman 1910; Brown 1910): split the models at random into two
  disjoint halves, estimate memorization on each half, and take the Spearman rank correlation over
  examples; averaged over a few seeded splits. ``2ρ / (1 + ρ)`` (Spearman–Brown) predicts the
  reliability of the estimate from all M models.
- **Models needed**: a standard error of an in−out mean difference scales as 1/√M at fixed
  subset ratio (n_in ≈ rM, n_out ≈ (1 − r)M), so reaching a median SE of ``target`` from ``se``
  with M models needs about ``M · (se / target)²`` models.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import ndtri

from jaxmem.errors import JaxmemError
from jaxmem.scores._result import EstimatorResult
from jaxmem.scores._stats import (agresti_caffo_se, in_out_stats, nanmedian, proportion_difference, ratio_strata,
                                  spearman, stratified_difference, successes, sum_over_ratios)
from jaxmem.scores.memorization import memorization

_SPLIT_TAG = 0x5B117
#: Median-SE targets shown when the user gives none.
DEFAULT_TARGETS = (0.02, 0.01)


def bootstrap_counts(key: jax.Array, num_resamples: int, num_models: int) -> jax.Array:
  """(B, M) float32 multinomial counts: how often each model appears in each resample."""
  idx_BxM = jax.random.randint(key, (num_resamples, num_models), 0, num_models)
  return jax.vmap(lambda idx: jnp.bincount(idx, length=num_models))(idx_BxM).astype(jnp.float32)


def bootstrap_differences(keep_MxN, values_MxN, counts_BxM, *, ratio_M=None, block_size: int = 4096) -> np.ndarray:
  """(B, N) in−out differences of ``values`` for each resample (rows of ``counts``); NaN where a
  resample has no in- or no out-model for the example (at some ratio). A resample's weights are its
  counts times the one-hot of each model's ratio, so the kernel gives every (resample, ratio) mean
  in one pass; differences are taken within ratios and averaged with equal weight, as the estimate
  itself. Blocks of examples bound device memory."""
  keep_MxN = np.asarray(keep_MxN, bool)
  values_MxN = np.asarray(values_MxN, np.float32)
  if keep_MxN.shape != values_MxN.shape:
    raise ValueError(f"keep {keep_MxN.shape} and values {values_MxN.shape} must have the same shape")
  m, n = keep_MxN.shape
  _, onehot_MxR = ratio_strata(np.zeros(m) if ratio_M is None else ratio_M)
  counts_BxM = np.asarray(counts_BxM, np.float32)
  resamples, r = counts_BxM.shape[0], onehot_MxR.shape[1]
  weights_MxBR = (counts_BxM.T[:, :, None] * onehot_MxR[:, None, :]).reshape(m, resamples * r)
  block = max(1, min(block_size, n))
  out = np.empty((resamples, n), np.float32)
  for start in range(0, n, block):
    k, v = keep_MxN[:, start: start + block], values_MxN[:, start: start + block]
    width = k.shape[1]
    if width < block:  # pad: one compilation for every block
      k, v = np.pad(k, ((0, 0), (0, block - width))), np.pad(v, ((0, 0), (0, block - width)))
    stats = in_out_stats(k, v, weights_MxBR, with_m2=False)
    shape = (resamples, r, block)
    n_in, n_out = stats.inside.n.reshape(shape), stats.outside.n.reshape(shape)
    diff = np.where((n_in > 0) & (n_out > 0), stats.inside.mean.reshape(shape) - stats.outside.mean.reshape(shape), np.nan)
    total = diff[:, 0].copy()
    for k in range(1, r):  # in ratio order for every example, whatever the block (see sum_over_ratios)
      total += diff[:, k]
    out[:, start: start + width] = (total / r)[:, :width]
  return out


class BootstrapInterval(NamedTuple):
  low: np.ndarray
  high: np.ndarray
  resamples: np.ndarray  # (N,) resamples that defined the estimate
  fallback: np.ndarray | None = None  # (N,) bool: the SE-based interval replaced a degenerate bootstrap one


def bootstrap_interval(keep_MxN, values_MxN, *, key: jax.Array, num_resamples: int = 200,
                       confidence: float = 0.95, ratio_M=None, block_size: int = 4096) -> BootstrapInterval:
  """Percentile bootstrap interval over models for each example's in−out difference, never
  narrower than half the SE-based interval ``estimate ± z·se`` (Agresti-Caffo SE for a 0/1 measure,
  Welch's otherwise): where the percentile interval is (the bootstrap cannot see variance that no
  resampled model showed: with every model agreeing, all resamples give the same difference and the
  interval is [x, x] while the SE is ~0.1 with 32 models), the SE-based interval is used instead,
  clipped to the measure's range for proportions. An interval never claims more certainty than
  its own estimate's SE allows."""
  if not isinstance(num_resamples, (int, np.integer)) or num_resamples < 2:
    raise JaxmemError(f"bootstrap resamples must be an integer >= 2, got {num_resamples!r}")
  if not 0 < confidence < 1:
    raise JaxmemError(f"confidence must be in (0, 1), got {confidence!r}")
  keep_MxN = np.asarray(keep_MxN, bool)
  values_MxN = np.asarray(values_MxN, np.float32)
  counts = bootstrap_counts(key, int(num_resamples), keep_MxN.shape[0])
  diffs_BxN = bootstrap_differences(keep_MxN, values_MxN, counts, ratio_M=ratio_M, block_size=block_size)
  alpha = 1.0 - confidence
  defined = np.isfinite(diffs_BxN).sum(axis=0)
  ok = defined >= 2
  n = keep_MxN.shape[1]
  low, high = np.full(n, np.nan), np.full(n, np.nan)
  if ok.any():
    q = np.nanquantile(diffs_BxN[:, ok], [alpha / 2, 1 - alpha / 2], axis=0)
    low[ok], high[ok] = q[0], q[1]
  binary = bool(np.all((values_MxN == 0) | (values_MxN == 1)))
  point = stratified_difference(keep_MxN, values_MxN, ratio_M, binary=binary)
  z = float(ndtri(1 - alpha / 2))
  se_low, se_high = point.estimate - z * point.se, point.estimate + z * point.se
  if binary:
    se_low, se_high = np.maximum(se_low, -1.0), np.minimum(se_high, 1.0)
  narrow = np.isfinite(se_low) & ~((high - low) >= 0.5 * (se_high - se_low))  # NaN bootstrap counts as narrow
  low, high = np.where(narrow, se_low, low), np.where(narrow, se_high, high)
  return BootstrapInterval(low, high, defined, narrow)


def wilson_interval(successes, n, *, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
  """Wilson's (1927) score interval for a proportion ``successes / n`` (float64; NaN where n = 0):
  centre ``(x + z²/2) / (n + z²)``, half-width ``z / (n + z²) · sqrt(x (n − x) / n + z²/4)``."""
  x, n = np.asarray(successes, np.float64), np.asarray(n, np.float64)
  z = float(ndtri(1 - (1 - confidence) / 2))
  safe = np.maximum(n, 1)
  centre = (x + z * z / 2) / (safe + z * z)
  half = z / (safe + z * z) * np.sqrt(np.maximum(x * (safe - x), 0.0) / safe + z * z / 4)
  empty = n <= 0
  # clipped: at x = 0 (or n) the limit is 0 (or 1) up to rounding
  return (np.where(empty, np.nan, np.clip(centre - half, 0.0, 1.0)),
          np.where(empty, np.nan, np.clip(centre + half, 0.0, 1.0)))


class ScoreInterval(NamedTuple):
  low: np.ndarray   # (N,) NaN where the estimate is undefined (no in- or out-model at some ratio)
  high: np.ndarray


def newcombe_interval(keep_MxN, correct_MxN, ratio_M=None, *, confidence: float = 0.95) -> ScoreInterval:
  """Newcombe's hybrid score interval (method 10) for each example's memorization
  ``x_in/n_in − x_out/n_out``, generalized to the equal-weight mean over subset ratios by MOVER
  (Zou & Donner 2008): see the module docstring. The counts come from the one in/out kernel
  (exact for a 0/1 measure), so the interval is centred on exactly the reported estimate."""
  if not 0 < confidence < 1:
    raise JaxmemError(f"confidence must be in (0, 1), got {confidence!r}")
  keep_MxN = np.asarray(keep_MxN, bool)
  correct_MxN = np.asarray(correct_MxN, np.float32)
  if keep_MxN.shape != correct_MxN.shape:
    raise ValueError(f"keep {keep_MxN.shape} and correct {correct_MxN.shape} must have the same shape")
  _, onehot_MxR = ratio_strata(np.zeros(keep_MxN.shape[0]) if ratio_M is None else ratio_M)
  stats = in_out_stats(keep_MxN, correct_MxN, onehot_MxR, with_m2=False)
  x_in_RxN, x_out_RxN = successes(stats.inside), successes(stats.outside)
  n_in_RxN = np.asarray(stats.inside.n, np.float64)
  n_out_RxN = np.asarray(stats.outside.n, np.float64)
  diff_RxN, _ = proportion_difference(stats)  # NaN where a ratio lacks in- or out-models
  with np.errstate(invalid="ignore", divide="ignore"):
    p_in_RxN, p_out_RxN = x_in_RxN / n_in_RxN, x_out_RxN / n_out_RxN
  l_in, u_in = wilson_interval(x_in_RxN, n_in_RxN, confidence=confidence)
  l_out, u_out = wilson_interval(x_out_RxN, n_out_RxN, confidence=confidence)
  r = diff_RxN.shape[0]
  estimate = sum_over_ratios(diff_RxN) / r
  below = np.sqrt(sum_over_ratios((p_in_RxN - l_in) ** 2 + (u_out - p_out_RxN) ** 2)) / r
  above = np.sqrt(sum_over_ratios((u_in - p_in_RxN) ** 2 + (p_out_RxN - l_out) ** 2)) / r
  # Newcombe's limits lie in [−1, 1] by construction; clipping only removes rounding overshoot
  return ScoreInterval(np.clip(estimate - below, -1.0, 1.0), np.clip(estimate + above, -1.0, 1.0))


class SplitHalf(NamedTuple):
  spearman: float           # mean over splits of the Spearman correlation between the halves
  spearman_brown: float     # 2ρ/(1+ρ): predicted reliability of the estimate from all models
  per_split: tuple[float, ...]


def split_half_reliability(keep_MxN, values_MxN, *, seed: int, num_splits: int = 5, ratio_M=None,
                           estimate: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> SplitHalf:
  """Spearman correlation between the estimates from two disjoint random halves of the models.

  ``estimate(keep, values) -> (N,)`` defaults to Feldman & Zhang's memorization (within the
  ratios of ``ratio_M``; each half keeps its models' ratios)."""
  keep_MxN, values_MxN = np.asarray(keep_MxN, bool), np.asarray(values_MxN)
  m = keep_MxN.shape[0]
  ratio_M = np.zeros(m) if ratio_M is None else np.asarray(ratio_M)
  if estimate is None:
    estimate = lambda k, v, rows: memorization(k, v, ratio_M[rows]).estimate
  else:
    given = estimate
    estimate = lambda k, v, rows: given(k, v)
  rhos = [spearman(estimate(keep_MxN[a], values_MxN[a], a), estimate(keep_MxN[b], values_MxN[b], b))
          for a, b in split_halves(m, seed=seed, num_splits=num_splits)]
  finite = [r for r in rhos if np.isfinite(r)]
  rho = float(np.mean(finite)) if finite else float("nan")
  brown = 2 * rho / (1 + rho) if np.isfinite(rho) and rho > -1 else float("nan")
  return SplitHalf(rho, brown, tuple(rhos))


def models_needed(median_se: float, num_models: int, target_se: float) -> int | None:
  """Models needed for the median SE to reach ``target_se`` (SE ∝ 1/√M); None if unknown."""
  if not (np.isfinite(median_se) and median_se > 0 and target_se > 0 and num_models > 0):
    return None
  return int(math.ceil(num_models * (median_se / target_se) ** 2))


def median_memorization_se(keep_MxN, correct_MxN, ratio_M=None) -> float:
  """Median Agresti–Caffo SE of memorization over examples (NaN if none is defined yet)."""
  se = memorization(keep_MxN, correct_MxN, ratio_M).se
  return float(np.nanmedian(se)) if np.isfinite(se).any() else float("nan")


class TargetSE:
  """Anytime stopping rule for ``jaxmem run --target-se X``: fed each finished chunk's records
  (``keep`` and ``train_correct`` rows), it says to stop once the median memorization SE over all
  finished models is below ``target`` (examples not yet estimable — no in- or out-model — are
  left out of the median; with none estimable it never stops).

  It keeps per example only the counts the SE needs (in-models, their correct ones, out-models,
  theirs), added chunk by chunk, never the records of the finished models: the Agresti–Caffo SE
  of these exact counts is the one :func:`median_memorization_se` computes on all the rows."""

  def __init__(self, target: float):
    self.target = float(target)
    self._counts_4xN: np.ndarray | None = None  # n_in, s_in, n_out, s_out (int64)
    self._num_models = 0
    self.median_se = float("nan")

  @property
  def num_models(self) -> int:
    return self._num_models

  def add(self, keep_KxN: np.ndarray, correct_KxN: np.ndarray) -> bool:
    """Adds a chunk's models; returns True when the target is reached."""
    keep_KxN, correct_KxN = np.asarray(keep_KxN, bool), np.asarray(correct_KxN, bool)
    if keep_KxN.shape != correct_KxN.shape:
      raise ValueError(f"keep {keep_KxN.shape} and correct {correct_KxN.shape} must have the same shape")
    n_in = keep_KxN.sum(axis=0, dtype=np.int64)
    s_in = (keep_KxN & correct_KxN).sum(axis=0, dtype=np.int64)
    counts = np.stack([n_in, s_in, len(keep_KxN) - n_in, correct_KxN.sum(axis=0, dtype=np.int64) - s_in])
    self._counts_4xN = counts if self._counts_4xN is None else self._counts_4xN + counts
    self._num_models += len(keep_KxN)
    return self.reached()

  def reached(self) -> bool:
    if not self._num_models:
      return False
    n_in, s_in, n_out, s_out = self._counts_4xN.astype(np.float64)
    se = agresti_caffo_se(s_in, n_in, s_out, n_out)
    self.median_se = float(np.nanmedian(se)) if np.isfinite(se).any() else float("nan")
    return bool(np.isfinite(self.median_se) and self.median_se < self.target)


def _targets(target_se) -> Sequence[float]:
  if target_se is None:
    return DEFAULT_TARGETS
  if isinstance(target_se, (int, float)):
    return (float(target_se),)
  return tuple(float(t) for t in target_se)


def split_halves(num_models: int, *, seed: int, num_splits: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """The seeded random halves of the models :func:`split_half_reliability` compares (none with
  fewer than 4 models: a half needs an in- and an out-model for most examples)."""
  halves = []
  if num_models >= 4:
    for s in range(num_splits):
      order = np.random.default_rng([seed, _SPLIT_TAG, s]).permutation(num_models)
      halves.append((np.sort(order[: num_models // 2]), np.sort(order[num_models // 2: 2 * (num_models // 2)])))
  return halves


def uncertainty_columns(records, *, context=None, seed: int = 0, resamples: int | None = None,
                        confidence: float = 0.95, splits: int = 5, target_se=None) -> EstimatorResult:
  """Adapter: ``memorization_ci_low/high`` (the Newcombe/MOVER score interval; with ``resamples``
  N >= 2 the percentile bootstrap over models with N resamples instead; 0: no interval), and per
  split the two halves' estimates as hidden columns ``_half_<s>_a/b`` (the driver drops them; the
  summary correlates them), so that the estimator runs block by block over examples."""
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise JaxmemError(f"bootstrap seed must be an integer in [0, 2**32), got {seed!r}")
  keep, correct = records.keep, records["train_correct"].astype(np.float32)
  columns = {}
  if resamples is None:
    interval = newcombe_interval(keep, correct, records.subset_ratio, confidence=confidence)
    columns = {"memorization_ci_low": interval.low, "memorization_ci_high": interval.high}
  elif resamples:
    interval = bootstrap_interval(keep, correct, key=jax.random.PRNGKey(seed), num_resamples=resamples,
                                  confidence=confidence, ratio_M=records.subset_ratio)
    columns = {"memorization_ci_low": interval.low, "memorization_ci_high": interval.high}
  ratio_M = np.asarray(records.subset_ratio)
  for s, (a, b) in enumerate(split_halves(keep.shape[0], seed=seed, num_splits=splits)):
    columns[f"_half_{s}_a"] = memorization(keep[a], correct[a], ratio_M[a]).estimate
    columns[f"_half_{s}_b"] = memorization(keep[b], correct[b], ratio_M[b]).estimate
  columns["_se"] = memorization(keep, correct, ratio_M).se
  return EstimatorResult(columns=columns)


#: Bytes per training example and bootstrap resample the uncertainty estimator holds for a block:
#: the resampled differences (float32), the copy of the defined ones that the percentile interval
#: sorts, their finiteness mask and the kernel's per-resample counts and means of each block pass.
BYTES_PER_RESAMPLE = 24


def uncertainty_block_bytes(records, *, resamples: int | None = None, **options) -> int:
  """Working bytes per training example beyond the records' values (see ``Estimator.block_bytes``):
  the (resamples, block) arrays of the bootstrap (none with the default score interval)."""
  return BYTES_PER_RESAMPLE * int(resamples or 0)


def uncertainty_summary(columns, records, *, seed: int = 0, resamples: int | None = None, confidence: float = 0.95,
                        splits: int = 5, target_se=None) -> dict:
  summary = {}
  m = records.num_models
  if "memorization_ci_low" in columns:
    width = columns["memorization_ci_high"] - columns["memorization_ci_low"]
    median_width = float(np.nanmedian(width)) if np.isfinite(width).any() else None
    if resamples is None:
      several = len(ratio_strata(records.subset_ratio)[0]) > 1
      summary["interval"] = {"method": "mover" if several else "newcombe", "confidence": float(confidence),
                             "median_width": median_width}
    else:
      summary["interval"] = {"method": "bootstrap", "resamples": int(resamples), "confidence": float(confidence),
                             "seed": int(seed), "median_width": median_width}
  rhos = [spearman(columns[f"_half_{s}_a"], columns[f"_half_{s}_b"]) for s in range(splits) if f"_half_{s}_a" in columns]
  finite = [r for r in rhos if np.isfinite(r)]
  rho = float(np.mean(finite)) if finite else float("nan")
  brown = 2 * rho / (1 + rho) if np.isfinite(rho) and rho > -1 else float("nan")
  summary["split_half"] = {"spearman": rho, "spearman_brown": brown, "splits": rhos, "half_models": m // 2}
  median_se = nanmedian(columns["_se"])
  summary["models_needed"] = {"median_se": median_se, "num_models": m,
                              "targets": {f"{t:g}": models_needed(median_se, m, t) for t in _targets(target_se)}}
  return summary
