"""Likelihood-ratio membership inference (LiRA; Carlini et al. 2022, "Membership Inference Attacks
From First Principles", IEEE S&P) on the subset models jaxmem already trains.

Every model trained on a random subset is a shadow model for every other one: for example i, the
models with ``keep[m, i]`` are "in" shadows and the others "out" shadows. The statistic is the
logit-scaled confidence φ = log p_y − log Σ_{y'≠y} p_y' (eq. 3; the records' ``margin``), one value
per query (augmented copy of the example, ``train_margin_aug`` (M,N,A); A = 1 without queries).

Scores (all pure functions of margins and ``keep``; higher = "more likely a member"):

* **online** (eq. 1-2, Algorithm 1): per example and query, Gaussians N(μ_in, σ_in²) and
  N(μ_out, σ_out²) fitted to the in and out shadow margins; score = mean over queries of
  log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²). ``center="median"`` takes μ as the median
  (the reference code's choice, robust to a few diverged models); σ is always the unbiased standard
  deviation around the mean.
* **offline** (eq. 4): out shadows only, the one-sided test Λ = 1 − Pr[Z > φ], Z ~ N(μ_out, σ_out²);
  score = mean over queries of log Φ((φ − μ_out)/σ_out) (log for resolution in the tail).
  ``offline_pdf`` is the reference code's variant, −mean log N(φ; μ_out, σ_out²), kept for
  comparison: it is two-sided, so an example the target fits *worse* than the out models also looks
  like a member.
* **fixed variance** (§VI-B, "fixed variance" online/offline): one global σ_in and one global σ_out,
  each the pooled within-example variance of its own group: σ_in² = Σ_{i,a} Σ_{m∈in(i)} (φ − μ̄_in,i,a)²
  / Σ_{i,a} (n_in,i − 1), and σ_out² the same over out residuals. μ stays per example.
* **global threshold** (Yeom et al. 2018, the LOSS-style baseline): score = mean over queries of φ.

Known defects of the reference code that this avoids, on purpose:

* tensorflow/privacy ``research/mi_lira_2021/plot.py`` ``generate_ours(fix_variance=True)`` sets
  ``std_out = np.std(dat_in)``: σ_out computed from the in distribution. Both there and in
  ``generate_ours_offline`` the fixed σ is the std of the raw margins over all examples, i.e. it
  includes the spread of the per-example means; here it is pooled *residuals* of each group.
* ``generate_ours_offline`` and ``advanced_mia.compute_score_lira(option="out")`` score offline by
  the out-Gaussian's pdf, not the paper's one-sided test (eq. 4); here ``offline`` is eq. 4 and the
  pdf variant is ``offline_pdf``.
* ``plot.py`` truncates every example's shadow set to the smallest set size over all examples, and
  ``advanced_mia`` silently replaces a missing fit by the column average; here an example with
  fewer than ``min_models`` in (online) or out (both) shadows gets NaN (an empty cell) and is counted.
* The reference inference ran BatchNorm in training mode, and the mode flipped across commits;
  jaxmem's models keep no batch statistics, so queries see the same function as training.

Attack evaluation (``lira_attack``): each of T target models in turn is attacked with all the other
models as shadows (leave-one-out). The per-example in/out sums, sums of squares and counts are
computed once and the target's own contribution is subtracted, so no loop over targets is needed for
the means and variances (and the leave-one-out median comes from one sort per example, see
:func:`_leave_one_out_median`). The math runs in float64 numpy: with float32, log Φ of members
several σ above μ_out rounds to 0 and ties them, exactly where the low-FPR metrics live. Runs of
any size are read in blocks of examples sized from a memory budget (:func:`lira_report`): every
fit is a reduction over models, so the blocks change nothing but the float64 summation order of
the fixed variances, and nothing of size M·N is ever held.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import numpy as np
from scipy.special import log_ndtr

from jaxmem.errors import JaxmemError
from jaxmem.scores._result import EstimatorResult
from jaxmem.scores._stats import ratio_key, spearman
from jaxmem.scores.attack_metrics import DEFAULT_FPRS, bootstrap_attack_metrics, per_example_auc, roc, thin_roc
from jaxmem.scores.privacy_bounds import DEFAULT_DELTA, POOLED_CAVEAT, eps_lower_bound

CENTERS = ("mean", "median")
VARIANTS = ("online", "online_fixed_variance", "offline", "offline_fixed_variance", "offline_pdf",
            "global_threshold")
VARIANT_LABELS = {
    "online": "LiRA online", "online_fixed_variance": "LiRA online, fixed variance",
    "offline": "LiRA offline (one-sided)", "offline_fixed_variance": "LiRA offline, fixed variance",
    "offline_pdf": "LiRA offline, pdf (reference code)", "global_threshold": "global threshold (margin)"}
#: A zero standard deviation (all shadows agree to the last bit) would make log N infinite; this floor
#: keeps the score finite and still extreme.
MIN_STD = 1e-6
_LOG_SQRT_2PI = 0.5 * np.log(2 * np.pi)
#: Memory for one block of examples (their margins and every float64 working array of the
#: leave-one-out fits and scores of all M targets); the block size follows from it.
DEFAULT_MEMORY_BUDGET = 256 << 20
#: Bytes of working memory per margin value (model x example x query) of a block: about 17 float64
#: arrays of the block's size live at once in the leave-one-out fits, scores and per-example AUC
#: (measured with tracemalloc; benchmarks/RESULTS.md, "LiRA and RMIA in bounded memory").
BYTES_PER_VALUE = 160


@dataclasses.dataclass
class GaussianFits:
  """Per (…, example, query) Gaussians of the in and out shadow margins.

  Leading axes are whatever the fit was computed for (none, or T targets). ``std_*`` are per
  example; ``fixed_std_*`` are the pooled global values (shape of the leading axes). ``n_*`` are
  per example (…, N).
  """
  mean_in: np.ndarray
  std_in: np.ndarray
  n_in: np.ndarray
  mean_out: np.ndarray
  std_out: np.ndarray
  n_out: np.ndarray
  fixed_std_in: np.ndarray
  fixed_std_out: np.ndarray
  # Σ squared residuals and degrees of freedom behind fixed_std_* (leading axes), over the examples
  # of this fit: sums over blocks of examples give the pooled variance of all of them.
  pooled_in: tuple[np.ndarray, np.ndarray] | None = None
  pooled_out: tuple[np.ndarray, np.ndarray] | None = None


def as_queries(margin: np.ndarray) -> np.ndarray:
  """(M,N) → (M,N,1); (M,N,A) unchanged."""
  margin = np.asarray(margin, np.float64)
  if margin.ndim == 2:
    return margin[..., None]
  if margin.ndim != 3:
    raise ValueError(f"margins must be (M,N) or (M,N,A), got shape {margin.shape}")
  return margin


def _check_center(center: str) -> None:
  if center not in CENTERS:
    raise JaxmemError(f"unknown LiRA center {center!r}; choose one of: {', '.join(CENTERS)}")


def _leave_one_out_median(x_MxNxA: np.ndarray, mask_MxN: np.ndarray, drop_TxN: np.ndarray,
                          targets_T: np.ndarray) -> np.ndarray:
  """Median over the masked models of each (example, query), excluding target t where
  ``drop[t, i]`` (the target is in the group), for every target at once: (T,N,A).

  One sort per column: removing the value at sorted position r leaves ``s[j]`` for j < r and
  ``s[j+1]`` for j ≥ r, so the median of the rest is read off the sorted column without re-sorting.
  (With ties, removing any copy of a value leaves the same sorted sequence, so r = the target's
  own position is exact.)
  """
  masked = np.where(mask_MxN[..., None], x_MxNxA, np.inf)
  order = np.argsort(masked, axis=0, kind="stable")
  sorted_MxNxA = np.take_along_axis(masked, order, axis=0)
  position = np.empty_like(order)
  np.put_along_axis(position, order, np.arange(order.shape[0])[:, None, None], axis=0)
  n_N = mask_MxN.sum(0)
  drop = drop_TxN[..., None]                                   # (T,N,1)
  r = np.where(drop, position[targets_T], order.shape[0])      # removed position, or "none"
  k = n_N[None, :, None] - drop                                 # remaining count (T,N,1)

  def remaining(j):
    j = np.clip(j, 0, None)
    index = np.where(j < r, j, j + 1)
    return _gather(sorted_MxNxA, np.clip(index, 0, order.shape[0] - 1))

  lo = remaining((k - 1) // 2)
  hi = remaining(k // 2)
  median = np.where(k % 2 == 1, lo, 0.5 * (lo + hi))
  return np.where(k > 0, median, np.nan)


def _gather(sorted_MxNxA: np.ndarray, index_TxNxA: np.ndarray) -> np.ndarray:
  """``out[t, i, a] = sorted[index[t, i, a], i, a]``."""
  _, n, a = sorted_MxNxA.shape
  index_TxNxA = np.broadcast_to(index_TxNxA, index_TxNxA.shape[:1] + (n, a))
  return sorted_MxNxA[index_TxNxA, np.arange(n)[None, :, None], np.arange(a)[None, None, :]]


def _group_fit(x_MxNxA: np.ndarray, mask_MxN: np.ndarray, targets_T: np.ndarray | None, center: str,
               min_models: int, pooled: tuple[np.ndarray, np.ndarray] | None = None):
  """Mean/median, std, count and pooled std of one group (in or out), leaving each target out.
  ``pooled``: (Σ squared residuals, degrees of freedom) to take the fixed std from instead of this
  fit's own examples (the totals over every block of examples)."""
  weight = mask_MxN[..., None].astype(np.float64)
  # Shift by the all-model mean of each (example, query) first: sums of squares of centred values
  # do not cancel catastrophically when a target's term is subtracted.
  shift_NxA = x_MxNxA.mean(0)
  xc = x_MxNxA - shift_NxA
  n, s1, s2 = weight.sum(0), (weight * xc).sum(0), (weight * xc**2).sum(0)   # (N,1), (N,A), (N,A)
  if targets_T is None:
    n, s1, s2 = n[None], s1[None], s2[None]
    drop = np.zeros((1,) + mask_MxN.shape[1:], bool)
  else:
    drop = mask_MxN[targets_T]                                              # (T,N)
    w_t = drop[..., None].astype(np.float64)
    n, s1, s2 = n[None] - w_t, s1[None] - w_t * xc[targets_T], s2[None] - w_t * xc[targets_T] ** 2
  safe_n = np.maximum(n, 1)
  mean = s1 / safe_n
  ss = np.maximum(s2 - s1 * mean, 0.0)                    # Σ (x − mean)², clipped at rounding level
  var = ss / np.maximum(n - 1, 1)
  enough = n >= min_models                                  # (T,N,1)
  std = np.where(enough & (n >= 2), np.sqrt(var), np.nan)
  # Pooled within-example variance of this group over the examples with enough models.
  pooled_ss = np.where(enough & (n >= 2), ss, 0.0).sum(axis=(1, 2))
  pooled_df = np.where(enough & (n >= 2), np.broadcast_to(n - 1, ss.shape), 0.0).sum(axis=(1, 2))
  own = (pooled_ss, pooled_df)
  if pooled is not None:
    pooled_ss, pooled_df = (np.asarray(v, np.float64).reshape(pooled_ss.shape) for v in pooled)
  fixed_std = np.where(pooled_df > 0, np.sqrt(pooled_ss / np.maximum(pooled_df, 1)), np.nan)
  if center == "median":
    targets = np.zeros(1, int) if targets_T is None else targets_T
    center_value = _leave_one_out_median(x_MxNxA, mask_MxN, drop, targets)
  else:
    center_value = mean + shift_NxA
  center_value = np.where(enough, center_value, np.nan)
  count = n[..., 0].astype(np.int64)
  if targets_T is None:
    return center_value[0], std[0], count[0], fixed_std[0], (own[0][0], own[1][0])
  return center_value, std, count, fixed_std, own


def fit_gaussians(margin_MxNxA: np.ndarray, keep_MxN: np.ndarray, *, targets: np.ndarray | None = None,
                  center: str = "mean", min_models: int = 2, pooled_in=None, pooled_out=None) -> GaussianFits:
  """In and out Gaussians of every example from the shadow models.

  Args:
    margin_MxNxA: shadow margins, (M,N) or (M,N,A).
    keep_MxN: bool, shadow m trained on example i.
    targets: None — fit on all M models; or (T,) model indices — one fit per target, leaving that
      model out (leading axis T), computed from totals minus the target's contribution.
    center: "mean" or "median" of the shadow margins.
    min_models: fewer in (or out) shadows than this gives NaN for that group.
    pooled_in, pooled_out: (Σ squared residuals, degrees of freedom) per leading axis for the fixed
      variances, when the examples here are one block of more (default: these examples' own).
  """
  _check_center(center)
  if min_models < 2:
    raise JaxmemError(f"LiRA min_models must be >= 2 (a standard deviation needs two models), got {min_models}")
  x = as_queries(margin_MxNxA)
  keep = np.asarray(keep_MxN, bool)
  if keep.shape != x.shape[:2]:
    raise ValueError(f"keep {keep.shape} does not match margins {x.shape}")
  targets = None if targets is None else np.asarray(targets, np.int64)
  mean_in, std_in, n_in, fixed_in, sums_in = _group_fit(x, keep, targets, center, min_models, pooled_in)
  mean_out, std_out, n_out, fixed_out, sums_out = _group_fit(x, ~keep, targets, center, min_models, pooled_out)
  return GaussianFits(mean_in, std_in, n_in, mean_out, std_out, n_out, fixed_in, fixed_out, sums_in, sums_out)


def _log_normal_pdf(x, mean, std):
  std = np.maximum(std, MIN_STD)
  return -0.5 * ((x - mean) / std) ** 2 - np.log(std) - _LOG_SQRT_2PI


def lira_scores(target_NxA: np.ndarray, fits: GaussianFits, *, variants: Sequence[str] = VARIANTS) -> dict[str, np.ndarray]:
  """Membership scores of a target model's margins (…,N[,A]) under ``fits`` (same leading axes);
  higher = more likely a member; each variant (…,N). See the module docstring for definitions."""
  phi = np.asarray(target_NxA, np.float64)
  if phi.ndim == fits.mean_in.ndim - 1:
    phi = phi[..., None]
  ok_in = ~np.isnan(fits.mean_in[..., 0])
  ok_out = ~np.isnan(fits.mean_out[..., 0])
  out: dict[str, np.ndarray] = {}
  fixed_in = np.broadcast_to(np.asarray(fits.fixed_std_in)[..., None, None], fits.std_in.shape)
  fixed_out = np.broadcast_to(np.asarray(fits.fixed_std_out)[..., None, None], fits.std_out.shape)
  for variant in variants:
    if variant in ("online", "online_fixed_variance"):
      s_in, s_out = (fits.std_in, fits.std_out) if variant == "online" else (fixed_in, fixed_out)
      value = (_log_normal_pdf(phi, fits.mean_in, s_in) - _log_normal_pdf(phi, fits.mean_out, s_out)).mean(-1)
      out[variant] = np.where(ok_in & ok_out, value, np.nan)
    elif variant in ("offline", "offline_fixed_variance"):
      s_out = fits.std_out if variant == "offline" else fixed_out
      value = log_ndtr((phi - fits.mean_out) / np.maximum(s_out, MIN_STD)).mean(-1)
      out[variant] = np.where(ok_out, value, np.nan)
    elif variant == "offline_pdf":
      out[variant] = np.where(ok_out, -_log_normal_pdf(phi, fits.mean_out, fits.std_out).mean(-1), np.nan)
    elif variant == "global_threshold":
      out[variant] = phi.mean(-1)
    else:
      raise JaxmemError(f"unknown LiRA variant {variant!r}; choose from: {', '.join(VARIANTS)}")
  return out


def lira_online(target_NxA, shadow_margin_SxNxA, shadow_keep_SxN, *, center: str = "mean",
                fixed_variance: bool = False, min_models: int = 2) -> np.ndarray:
  """Online LiRA scores (N,) of one target model given shadow models (eq. 1-2, Algorithm 1)."""
  fits = fit_gaussians(shadow_margin_SxNxA, shadow_keep_SxN, center=center, min_models=min_models)
  variant = "online_fixed_variance" if fixed_variance else "online"
  return lira_scores(target_NxA, fits, variants=(variant,))[variant]


def lira_offline(target_NxA, shadow_margin_SxNxA, shadow_keep_SxN, *, center: str = "mean",
                 fixed_variance: bool = False, test: str = "one_sided", min_models: int = 2) -> np.ndarray:
  """Offline LiRA scores (N,): ``test="one_sided"`` is the paper's eq. 4; ``"pdf"`` the reference
  code's density score (only with per-example variance)."""
  if test not in ("one_sided", "pdf"):
    raise JaxmemError(f"unknown offline test {test!r}; choose one_sided or pdf")
  if test == "pdf" and fixed_variance:
    raise JaxmemError("the offline pdf variant is implemented with per-example variance only")
  fits = fit_gaussians(shadow_margin_SxNxA, shadow_keep_SxN, center=center, min_models=min_models)
  variant = "offline_pdf" if test == "pdf" else ("offline_fixed_variance" if fixed_variance else "offline")
  return lira_scores(target_NxA, fits, variants=(variant,))[variant]


def global_threshold(target_NxA) -> np.ndarray:
  """The LOSS-style baseline: a single threshold on the target's margin (mean over queries)."""
  return as_queries(np.asarray(target_NxA)[None])[0].mean(-1)


def leave_one_out_scores(margin_MxNxA: np.ndarray, keep_MxN: np.ndarray, targets: Sequence[int], *,
                         center: str = "mean", min_models: int = 2, variants: Sequence[str] = VARIANTS,
                         block_values: int = 8_000_000, pooled=None) -> dict[str, np.ndarray]:
  """Each target model attacked with all other models as shadows: ``{variant: (T,N)}``.

  Equivalent to calling :func:`lira_scores` with :func:`fit_gaussians` on the margins without row t,
  for every t; computed in blocks of targets (vectorized within a block) so memory stays bounded
  by ``block_values`` float64 values per intermediate array. ``pooled``: ``{"pooled_in": (ss_T,
  df_T), "pooled_out": ...}`` over all examples when these margins are one block of examples.
  """
  x = as_queries(margin_MxNxA)
  keep = np.asarray(keep_MxN, bool)
  targets = np.asarray(targets, np.int64)
  per_target = max(1, block_values // max(1, x.shape[1] * x.shape[2]))
  parts: dict[str, list[np.ndarray]] = {v: [] for v in variants}
  for start in range(0, len(targets), per_target):
    block = targets[start: start + per_target]
    rows = slice(start, start + per_target)
    fixed = {} if pooled is None else {name: tuple(np.asarray(v)[rows] for v in pooled[name])
                                       for name in ("pooled_in", "pooled_out")}
    fits = fit_gaussians(x, keep, targets=block, center=center, min_models=min_models, **fixed)
    for name, value in lira_scores(x[block], fits, variants=variants).items():
      parts[name].append(value)
    del fits  # before the next block's fits are made, so only one block's arrays live at a time
  n = x.shape[1]
  return {name: (np.concatenate(v) if v else np.zeros((0, n))) for name, v in parts.items()}


def choose_targets(num_models: int, targets: int | str | Sequence[int] | None, seed: int) -> np.ndarray:
  """Target model indices: ``"all"``, a count (drawn without replacement with ``seed``, sorted), or
  explicit indices. Default (None): min(M, 16)."""
  if targets is None:
    targets = min(num_models, 16)
  if isinstance(targets, str):
    if targets != "all":
      raise JaxmemError(f"LiRA targets must be 'all', a count or model indices, got {targets!r}")
    return np.arange(num_models)
  if isinstance(targets, (int, np.integer)):
    if not 1 <= targets <= num_models:
      raise JaxmemError(f"LiRA targets must be between 1 and the number of models ({num_models}), got {targets}")
    if targets == num_models:
      return np.arange(num_models)
    return np.sort(np.random.default_rng(seed).choice(num_models, int(targets), replace=False))
  chosen = np.asarray(targets, np.int64)
  if chosen.ndim != 1 or chosen.size == 0 or chosen.min() < 0 or chosen.max() >= num_models:
    raise JaxmemError(f"LiRA target indices must be in [0, {num_models}), got {chosen.tolist()}")
  return chosen


@dataclasses.dataclass
class LiraAttack:
  """Result of :func:`lira_attack`."""
  targets: np.ndarray                   # (T,) model rows attacked
  scores: dict[str, np.ndarray]         # variant -> (T,N)
  members: np.ndarray                   # (T,N) bool ground truth
  evaluated: np.ndarray                 # (T,N) bool: pairs every variant scored (the common set)
  metrics: dict[str, dict[str, dict[str, float]]]   # variant -> metric -> value/low/high
  curves: dict[str, tuple[np.ndarray, np.ndarray]]  # variant -> (fpr, tpr) on the common set
  unscored_examples: int                # examples with no online score for some target


def lira_attack(margin_MxNxA: np.ndarray, keep_MxN: np.ndarray, *, targets: int | str | Sequence[int] | None = None,
                center: str = "mean", min_models: int = 2, num_bootstrap: int = 200, seed: int = 0,
                fprs: Sequence[float] = DEFAULT_FPRS, variants: Sequence[str] = VARIANTS) -> LiraAttack:
  """Leave-one-out attack evaluation pooled over targets, with bootstrap intervals.

  Every variant is evaluated on the same (target, example) pairs: those where all of them have a
  score (the online test needs ``min_models`` in and out shadows), so the numbers compare like with
  like.
  """
  x = as_queries(margin_MxNxA)
  keep = np.asarray(keep_MxN, bool)
  if x.shape[0] < 3:
    raise JaxmemError(f"a LiRA attack needs at least 3 models (a target and two shadows), got {x.shape[0]}")
  chosen = choose_targets(x.shape[0], targets, seed)
  scores = leave_one_out_scores(x, keep, chosen, center=center, min_models=min_models, variants=variants)
  return evaluate_attack(chosen, scores, keep[chosen], num_bootstrap=num_bootstrap, seed=seed, fprs=fprs)


def evaluate_attack(chosen: np.ndarray, scores: dict[str, np.ndarray], members: np.ndarray, *,
                    num_bootstrap: int = 200, seed: int = 0, fprs: Sequence[float] = DEFAULT_FPRS) -> LiraAttack:
  """Pooled metrics with bootstrap intervals and ROC curves of the targets' scores ``(T, N)``."""
  evaluated = np.all([~np.isnan(s) for s in scores.values()], axis=0)
  metrics, curves = {}, {}
  for name, s in scores.items():
    masked = np.where(evaluated, s, np.nan)
    metrics[name] = bootstrap_attack_metrics(masked, members, num_bootstrap=num_bootstrap, seed=seed, fprs=fprs)
    if evaluated.any() and members[evaluated].any() and (~members[evaluated]).any():
      # the curve has a point per distinct score (millions at scale): stored and drawn thinned
      curves[name] = thin_roc(*roc(s[evaluated], members[evaluated]))
  unscored = int(np.any(~evaluated, axis=0).sum())
  return LiraAttack(chosen, scores, members, evaluated, metrics, curves, unscored)


def per_example_risk(margin_MxNxA: np.ndarray, keep_MxN: np.ndarray, *, center: str = "mean",
                     min_models: int = 2, with_gap: bool = False,
                     block_values: int = 8_000_000) -> dict[str, np.ndarray]:
  """Per-example membership exposure ``lira_online`` and ``lira_offline`` (N,).

  Definition: the per-example AUC, over *all* M models taken in turn as the target (each attacked
  with the other M−1 as shadows), of the attack score for telling the models that trained on the
  example from those that did not. 0.5 = the attack cannot tell (safe); 1 = every member model
  scores above every non-member model (fully exposed).

  Why this and not "mean score when member minus when not": log-likelihood ratios have an
  example-dependent scale (a tight out distribution gives huge ratios), so mean differences are not
  comparable across examples, and a few extreme target models dominate them. The AUC is
  scale-free, bounded, equals the attack's success probability on a random (member, non-member)
  pair of models for that example, and with all M models as targets (≈0.7·M members, 0.3·M
  non-members for r = 0.7) it is resolved far better than with the few targets of the pooled ROC.

  ``block_values``: targets are scored in groups of about this many values (see
  :func:`leave_one_out_scores`); the result does not depend on it.
  """
  x = as_queries(margin_MxNxA)
  keep = np.asarray(keep_MxN, bool)
  scores = leave_one_out_scores(x, keep, np.arange(x.shape[0]), center=center, min_models=min_models,
                                variants=("online", "offline"), block_values=block_values)
  out = {"lira_online": per_example_auc(scores["online"], keep),
         "lira_offline": per_example_auc(scores["offline"], keep)}
  if with_gap:
    # Mean online score as a member minus as a non-member: only to order examples tied at AUC 1.
    member = np.where(keep, scores["online"], np.nan)
    other = np.where(~keep, scores["online"], np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are unscored examples
      out["online_gap"] = np.nanmean(member, axis=0) - np.nanmean(other, axis=0)
  return out


def select_margins(records, queries: str = "auto") -> np.ndarray:
  """The training-set margins LiRA uses, whole (see :func:`margin_record`)."""
  return np.asarray(records[margin_record(records, queries)])


def check_single_ratio(ratio_M) -> None:
  """LiRA's shadow Gaussians are fitted over all models; with several subset ratios those mix
  models of different training-set sizes (the in-shadows mostly high-ratio ones), so the fit would
  measure the ratio gap, not membership. Such runs are refused rather than pooled."""
  ratios = sorted({ratio_key(r) for r in np.asarray(ratio_M).reshape(-1)})
  if len(ratios) > 1:
    raise JaxmemError(f"LiRA needs a run with one subset ratio (its shadow Gaussians would pool models of ratios "
                      f"{', '.join(f'{r:g}' for r in ratios)}); score LiRA on a single-ratio run")


def margin_record(records, queries: str = "auto") -> str:
  """The record LiRA uses: ``train_margin_aug`` (M,N,A) when recorded and ``queries`` is "auto" or
  "aug", else ``train_margin`` (M,N)."""
  if queries not in ("auto", "aug", "plain"):
    raise JaxmemError(f"LiRA queries must be auto, aug or plain, got {queries!r}")
  if queries in ("auto", "aug") and "train_margin_aug" in records:
    return "train_margin_aug"
  if queries == "aug":
    raise JaxmemError("this run recorded no augmented queries (train_margin_aug); rerun with --queries 2 or 18")
  return "train_margin"


def lira_report(records, *, memorization: np.ndarray | None = None, targets: int | str | Sequence[int] | None = None,
                center: str = "mean", min_models: int = 2, num_bootstrap: int = 200, seed: int = 0,
                queries: str = "auto", top: int = 10, block_size: int | None = None,
                delta: float = DEFAULT_DELTA, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                ) -> tuple[dict[str, np.ndarray], dict[str, Any], LiraAttack]:
  """Everything ``jaxmem scores --estimators lira`` reports: per-example columns, the summary
  (written to ``lira.json``) and the attack (for the ROC curves).

  The margins are read in blocks of ``block_size`` training examples (default: as many as
  ``memory_budget`` bytes allow, see :func:`examples_per_block`), in two passes: the first sums each
  target's pooled residuals for the fixed-variance variants (a sum over all examples), the second
  scores every block with them. Per-example columns and per-pair scores do not depend on the block
  size; the fixed variances only through float64 summation order.

  Memory: one block's margins and working arrays (``memory_budget``), plus the pooled attack's
  scores of the T targets, (T, N) float64 per variant, and its bootstrap, which works on those
  T·N pairs in batches of draws. Nothing of size M·N is held."""
  check_single_ratio(records.subset_ratio)
  name = margin_record(records, queries)
  num_models, num_train = records.num_models, records.num_train
  if num_models < 3:
    raise JaxmemError(f"a LiRA attack needs at least 3 models (a target and two shadows), got {num_models}")
  _check_center(center)
  chosen = choose_targets(num_models, targets, seed)
  queries_per_example = int(np.prod(records.shape(name)[2:], dtype=np.int64))
  block_values = max(1, int(memory_budget) // BYTES_PER_VALUE)
  if block_size is None:
    block_size = examples_per_block(num_models, queries_per_example, memory_budget)
  if block_size < 1:
    raise JaxmemError(f"LiRA block size must be a positive number of examples, got {block_size}")
  blocks = list(records.example_blocks(min(int(block_size), max(num_train, 1))))

  def block_arrays(block):
    return as_queries(records.read(name, examples=block)), np.asarray(records.read("keep", examples=block), bool)

  pooled = pooled_residuals(block_arrays, blocks, chosen, min_models=min_models) if len(blocks) > 1 else None
  parts: dict[str, list[np.ndarray]] = {}
  members, risk = [], {"lira_online": [], "lira_offline": [], "online_gap": []}
  queries_seen = 1
  for block in blocks:
    x, keep = block_arrays(block)
    queries_seen = x.shape[2]
    for variant, value in leave_one_out_scores(x, keep, chosen, center=center, min_models=min_models,
                                               pooled=pooled, block_values=block_values).items():
      parts.setdefault(variant, []).append(value)
    members.append(keep[chosen])
    for key, value in per_example_risk(x, keep, center=center, min_models=min_models, with_gap=True,
                                       block_values=block_values).items():
      risk[key].append(value)
    del x, keep
  scores = {variant: np.concatenate(v, axis=1) for variant, v in parts.items()}
  attack = evaluate_attack(chosen, scores, np.concatenate(members, axis=1), num_bootstrap=num_bootstrap, seed=seed)
  columns = {key: np.concatenate(v) for key, v in risk.items()}
  gap = columns.pop("online_gap")
  online = columns["lira_online"]
  unscored = int(np.isnan(online).sum())
  margin_shape = (num_models, num_train, queries_seen)
  summary: dict[str, Any] = {
      "models": int(margin_shape[0]), "examples": int(margin_shape[1]), "queries": int(margin_shape[2]),
      "center": center, "min_models": min_models, "targets": attack.targets.tolist(),
      "pairs_evaluated": int(attack.evaluated.sum()), "num_bootstrap": num_bootstrap, "seed": seed,
      "attack": attack.metrics, "unscored_examples": unscored,
      "per_example_definition": "per-example AUC of the attack score over all models as targets (leave-one-out)"}
  summary["member_percent"] = int(attack.members[attack.evaluated].mean() * 100) if attack.evaluated.any() else 0
  summary["unscored_attack_examples"] = int(attack.unscored_examples)
  # Empirical ε lower bound of each variant on the same pairs (jaxmem.scores.privacy_bounds).
  summary["eps_lower_bound"] = {
      variant: eps_lower_bound(np.where(attack.evaluated, s, np.nan), attack.members, delta=delta, seed=seed)
      for variant, s in attack.scores.items()}
  summary["eps_caveat"] = POOLED_CAVEAT
  # Most exposed first; ties (many examples reach AUC 1) broken by the mean log-ratio gap.
  order = np.lexsort((-np.nan_to_num(gap, nan=-np.inf), -np.nan_to_num(online, nan=-np.inf)))[:top]
  summary["fully_exposed_examples"] = int(np.sum(online == 1.0))
  exposed = []
  for i in order:
    row = {"index": int(i), "label": int(records.train_labels[i]), "noisy": bool(records.noisy[i]),
           "lira_online": float(online[i]), "lira_offline": float(columns["lira_offline"][i])}
    if memorization is not None:
      row["memorization"] = float(memorization[i])
    exposed.append(row)
  summary["most_exposed"] = exposed
  if memorization is not None:
    valid = ~np.isnan(online) & ~np.isnan(memorization)
    summary["spearman_lira_online_memorization"] = spearman(online, memorization)
    summary["spearman_examples"] = int(valid.sum())
  return columns, summary, attack


def pooled_residuals(read_block, blocks: Sequence[slice], chosen: np.ndarray, *, min_models: int = 2) -> dict:
  """First pass over blocks of examples: each target's Σ squared residuals and degrees of freedom
  of its in and out shadows, summed over all examples (the fixed-variance variants' σ).
  ``read_block(block) -> (margins (M, n, A) float64, keep (M, n) bool)``."""
  sums = {"pooled_in": (0.0, 0.0), "pooled_out": (0.0, 0.0)}
  for block in blocks:
    x, keep = read_block(block)
    fits = fit_gaussians(x, keep, targets=chosen, center="mean", min_models=min_models)
    for key, (ss, df) in (("pooled_in", fits.pooled_in), ("pooled_out", fits.pooled_out)):
      sums[key] = (sums[key][0] + ss, sums[key][1] + df)
    del x, keep, fits
  return sums


def attack_scores_by_blocks(read_block, blocks: Sequence[slice], chosen: np.ndarray, *, center: str = "mean",
                            min_models: int = 2, variants: Sequence[str] = VARIANTS,
                            block_values: int = 8_000_000) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """:func:`leave_one_out_scores` of the targets ``chosen`` and their membership (T, N), reading
  the margins block by block (``read_block`` as in :func:`pooled_residuals`): a first pass for the
  pooled residuals when there is more than one block, then one to score. Equal to the one-block
  result up to float64 summation order of the fixed variances."""
  pooled = pooled_residuals(read_block, blocks, chosen, min_models=min_models) if len(blocks) > 1 else None
  parts: dict[str, list[np.ndarray]] = {v: [] for v in variants}
  members = []
  for block in blocks:
    x, keep = read_block(block)
    for variant, value in leave_one_out_scores(x, keep, chosen, center=center, min_models=min_models,
                                               variants=variants, pooled=pooled, block_values=block_values).items():
      parts[variant].append(value)
    members.append(keep[chosen])
    del x, keep
  return {v: np.concatenate(p, axis=1) for v, p in parts.items()}, np.concatenate(members, axis=1)


def examples_per_block(num_models: int, queries: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
  """Training examples per block so that a block's margins (M, n, A) and the float64 working arrays
  of scoring it (:data:`BYTES_PER_VALUE` per value) fit in ``memory_budget`` bytes (at least 1)."""
  if memory_budget <= 0:
    raise JaxmemError(f"LiRA memory budget must be a positive number of bytes, got {memory_budget}")
  return max(1, int(memory_budget) // (BYTES_PER_VALUE * max(1, num_models) * max(1, queries)))


def roc_table(attack: LiraAttack) -> dict[str, np.ndarray]:
  """The ROC curve of every variant on the common (target, example) pairs, as one long table."""
  names, fpr, tpr = [], [], []
  for name, (f, t) in attack.curves.items():
    names.append(np.full(len(f), name, object))
    fpr.append(np.asarray(f, np.float64))
    tpr.append(np.asarray(t, np.float64))
  if not names:
    return {"variant": np.zeros(0, object), "fpr": np.zeros(0), "tpr": np.zeros(0)}
  return {"variant": np.concatenate(names), "fpr": np.concatenate(fpr), "tpr": np.concatenate(tpr)}


def lira_estimator(records, *, context=None, targets=None, center: str = "mean", min_models: int = 2,
                   num_bootstrap: int = 200, seed: int = 0, queries: str = "auto", top: int = 10,
                   memory_budget: int = DEFAULT_MEMORY_BUDGET, delta: float = DEFAULT_DELTA) -> EstimatorResult:
  """Adapter: ``lira_online``/``lira_offline`` columns, the attack summary and the ROC table; opt-in
  (``--estimators ...,lira``) because the leave-one-out attack over all models and the bootstrap
  take seconds, not milliseconds. ``delta``: of the ε lower bounds in the summary. Margins are read
  in blocks of examples sized from ``memory_budget`` (see :func:`lira_report`)."""
  memorization = None if context is None else context.get("memorization")
  columns, summary, attack = lira_report(
      records, memorization=memorization, targets=targets, center=center, min_models=min_models,
      num_bootstrap=num_bootstrap, seed=seed, queries=queries, top=top, delta=delta,
      memory_budget=memory_budget)
  return EstimatorResult(columns=columns, summary=summary, tables={"lira_roc": roc_table(attack)})
