"""Robust membership inference (RMIA; Zarifzadeh, Liu, Mahloujifar and Shokri, ICML 2024, "Low-Cost
High-Power Membership Inference Attacks") on the subset models jaxmem already trains.

Definition (paper eq. 2-4, Algorithm 1): for a target model θ, a candidate x and a population point
z that no model trained on,

  LR_θ(x, z) = [P(x|θ) / P(x)] / [P(z|θ) / P(z)],   score(x) = Pr_z[ LR_θ(x, z) ≥ γ ],

with P(·|θ) the model's probability of the true label and P(·) its average over reference models.
Here P(x|θ) = sigmoid(φ) with φ the recorded logit-scaled margin log p_y − log Σ_{y'≠y} p_y', which
is exactly p_y; all ratios are taken in log space (log sigmoid = −softplus(−φ)), so members with
p_y within 1e-16 of 1 keep their order. The population z is the run's test split (no model ever
trains on it).

* **online**: P(x) = ½(P̄_IN(x) + P̄_OUT(x)), the reference models that did / did not train on x.
* **offline** (paper §4, "offline"): only models that did not train on x; P_IN ≈ a·P_OUT + (1 − a)
  gives P(x) ≈ ½((1 + a)·P̄_OUT(x) + 1 − a).
* ``a`` is tuned as the authors' library does (privacytrustlab/ml_privacy_meter,
  ``modules/mia/attacks/rmia.py::tune_offline_a``): one model that is not attacked (the "paired"
  model there) is attacked offline with the same references for every a on a grid, and the a with
  the highest AUC is kept. :func:`tune_offline_a` takes the tuning model as an argument.

How jaxmem adapts RMIA to random subsets (each model trains on a random r·N of the examples, not
on complementary halves as the paper's and the library's reference sets do) — deliberate
deviations, each a fix for something that breaks on these runs:

* **Balanced P(x) online.** The paper's online P(x) is the plain mean over references that are
  IN for half the examples by construction. With r = 0.7 a plain mean is ~70% IN models, so a
  memorized member's ratio p/P(x) is capped near 1/0.7 and γ = 2 can never be reached. jaxmem
  averages the IN mean and the OUT mean with equal weight, which is what the paper's pairs give.
* **OUT means over the OUT models only.** The paper's code takes "K/2 IN + K/2 OUT" references per
  example and the library takes the top-K entries of ``signals * ~membership``, which lets zeros
  into P_OUT whenever fewer than K references are OUT for an example (always, with random subsets):
  P(x) shrinks toward (1 − a)/2 and the low-FPR tail collapses. Here P̄_OUT(x) averages only the
  references that did not train on x.
* **A missing group comes from the a-relation.** With few references an example can have no IN
  (or no OUT) reference. A missing P̄_IN is a·P̄_OUT + 1 − a; a missing P̄_OUT is the inversion
  (P̄_IN − 1 + a)/a clipped to [0, 1] (the library does this inversion for a single IN reference,
  unclipped). So every example gets a score with any K ≥ 1 references.
* **Population points are never IN.** In the paper's online setting z is in half the references;
  here no model trains on the test split, so P(z) uses the offline formula in both variants (as
  the library does, which treats all population points as OUT).
* **γ and the tie rule.** ``LR ≥ γ`` (the paper; the library counts ``> γ``); γ = 1 by default
  (the library's value). With γ > 1 a member whose P̄_OUT(x) is near 0 can still pass, because
  the balanced P(x) lets its ratio reach 2.
* **The a grid** is 0.1, 0.2, …, 1.0: a = 0 (P_IN ≡ 1) cannot be inverted for a missing OUT group.
  The library includes 0 and tunes per target on the model paired with it.

Per-example column (as LiRA's ``lira_online``): the per-example AUC, over all M models taken in
turn as the target (each attacked with the other M − 1 as references), of the RMIA score for
telling the models that trained on the example from those that did not. The pooled attack uses a
few target models, all other models as references, and the same metrics and bootstrap as LiRA.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from scipy.special import log_expit

from jaxmem.errors import JaxmemError
from jaxmem.scores._result import EstimatorResult
from jaxmem.scores._stats import spearman
from jaxmem.scores.attack_metrics import DEFAULT_FPRS, attack_metrics, bootstrap_attack_metrics, per_example_auc, roc, thin_roc
from jaxmem.scores.lira import as_queries, attack_scores_by_blocks, choose_targets, evaluate_attack, roc_table
from jaxmem.scores.privacy_bounds import DEFAULT_CONFIDENCE, DEFAULT_DELTA, POOLED_CAVEAT, eps_lower_bound

VARIANTS = ("rmia_online", "rmia_offline")
A_GRID: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(1, 11))
DEFAULT_GAMMA = 1.0
#: P(x) is at least this (a probability of 0 would make log P(x) infinite).
_TINY = 1e-300


@dataclasses.dataclass
class ReferenceMeans:
  """Per-example means of P(x|θ') over the IN and OUT reference models, with their counts.

  Leading axes are whatever they were computed for (none, or T targets); the last axis is examples.
  ``mean_*`` are NaN where the count is 0.
  """
  mean_in: np.ndarray
  n_in: np.ndarray
  mean_out: np.ndarray
  n_out: np.ndarray


def true_label_prob(margin) -> np.ndarray:
  """P(x|θ) = sigmoid(φ) = p_y from the recorded margin φ, float64."""
  return np.exp(log_expit(np.asarray(margin, np.float64)))


def reference_means(p_RxN: np.ndarray, keep_RxN: np.ndarray) -> ReferenceMeans:
  """IN and OUT means over the rows (reference models) of ``p``."""
  p_RxN = np.asarray(p_RxN, np.float64)
  keep_RxN = np.asarray(keep_RxN, bool)
  n_in, n_out = keep_RxN.sum(0), (~keep_RxN).sum(0)
  sum_in = np.where(keep_RxN, p_RxN, 0.0).sum(0)
  sum_out = np.where(keep_RxN, 0.0, p_RxN).sum(0)
  return _means(sum_in, n_in, sum_out, n_out)


def _means(sum_in, n_in, sum_out, n_out) -> ReferenceMeans:
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_in = np.where(n_in > 0, sum_in / np.maximum(n_in, 1), np.nan)
    mean_out = np.where(n_out > 0, sum_out / np.maximum(n_out, 1), np.nan)
  return ReferenceMeans(mean_in, n_in, mean_out, n_out)


def leave_one_out_means(p_MxN: np.ndarray, keep_MxN: np.ndarray, targets_T: np.ndarray) -> ReferenceMeans:
  """For each target t, the IN/OUT means over all models except t: (T, N) each, from the totals
  minus the target's own row (no loop over targets)."""
  p_MxN = np.asarray(p_MxN, np.float64)
  keep_MxN = np.asarray(keep_MxN, bool)
  in_MxN = np.where(keep_MxN, p_MxN, 0.0)
  out_MxN = p_MxN - in_MxN
  own_keep = keep_MxN[targets_T]
  n_in = keep_MxN.sum(0)[None] - own_keep
  n_out = (~keep_MxN).sum(0)[None] - ~own_keep
  sum_in = in_MxN.sum(0)[None] - in_MxN[targets_T]
  sum_out = out_MxN.sum(0)[None] - out_MxN[targets_T]
  return _means(sum_in, n_in, sum_out, n_out)


def _check_a(a: float) -> None:
  if not 0 < a <= 1:
    raise JaxmemError(f"RMIA's a must be in (0, 1], got {a}")


def _out_from_in(mean_in, a: float):
  """P_OUT from P_IN ≈ a·P_OUT + 1 − a, clipped to a probability."""
  return np.clip((mean_in - 1 + a) / a, 0.0, 1.0)


def prob_x(means: ReferenceMeans, a: float, variant: str) -> np.ndarray:
  """P(x) of each example for ``variant`` ("rmia_online" or "rmia_offline"); see the module
  docstring for the missing-group rule. NaN only where there is no reference at all."""
  _check_a(a)
  p_out = np.where(means.n_out > 0, means.mean_out, _out_from_in(means.mean_in, a))
  if variant == "rmia_offline":
    return 0.5 * ((1 + a) * p_out + 1 - a)
  if variant == "rmia_online":
    p_in = np.where(means.n_in > 0, means.mean_in, a * means.mean_out + 1 - a)
    return 0.5 * (p_in + p_out)
  raise JaxmemError(f"unknown RMIA variant {variant!r}; choose from: {', '.join(VARIANTS)}")


def prob_population(mean_out_Z: np.ndarray, a: float) -> np.ndarray:
  """P(z) of population points, which no model trained on: the offline formula."""
  _check_a(a)
  return 0.5 * ((1 + a) * np.asarray(mean_out_Z, np.float64) + 1 - a)


def rmia_scores(log_p_target_N: np.ndarray, prob_x_N: np.ndarray, log_p_target_Z: np.ndarray,
                prob_z_Z: np.ndarray, gamma: float = DEFAULT_GAMMA) -> np.ndarray:
  """score(x) = fraction of population points z with LR(x, z) ≥ γ, for one target or a leading
  axis of targets (…,N) and (…,Z). Sorting the population's log ratios once makes it
  O((N + Z) log Z) instead of N·Z comparisons. NaN where P(x) is NaN."""
  if not gamma > 0:
    raise JaxmemError(f"RMIA's gamma must be positive, got {gamma}")
  return scores_from_sorted(log_p_target_N, prob_x_N, sorted_population_ratios(log_p_target_Z, prob_z_Z), gamma)


def sorted_population_ratios(log_p_target_Z: np.ndarray, prob_z_Z: np.ndarray) -> np.ndarray:
  """log P(z|θ) − log P(z) of every population point, sorted along the last axis (…, Z): what
  :func:`scores_from_sorted` compares each candidate with. Computed once per target and reused
  for every block of candidates."""
  log_ratio_z = np.asarray(log_p_target_Z, np.float64) - np.log(np.maximum(prob_z_Z, _TINY))
  return np.sort(log_ratio_z, axis=-1)


def scores_from_sorted(log_p_target_N: np.ndarray, prob_x_N: np.ndarray, sorted_z: np.ndarray,
                       gamma: float = DEFAULT_GAMMA) -> np.ndarray:
  """:func:`rmia_scores` with the population's sorted log ratios (…, Z) already computed."""
  if not gamma > 0:
    raise JaxmemError(f"RMIA's gamma must be positive, got {gamma}")
  log_ratio_x = np.asarray(log_p_target_N, np.float64) - np.log(np.maximum(prob_x_N, _TINY))
  lead = log_ratio_x.shape[:-1]
  flat_x = log_ratio_x.reshape(-1, log_ratio_x.shape[-1])
  flat_z = np.broadcast_to(sorted_z, lead + sorted_z.shape[-1:]).reshape(-1, sorted_z.shape[-1])
  out = np.empty(flat_x.shape)
  for row, (x_N, z_Z) in enumerate(zip(flat_x, flat_z)):
    # LR(x, z) ≥ γ  ⟺  log_ratio_z ≤ log_ratio_x − log γ
    out[row] = np.searchsorted(z_Z, x_N - np.log(gamma), side="right") / z_Z.size
  out = out.reshape(log_ratio_x.shape)
  return np.where(np.isnan(log_ratio_x), np.nan, out)


def attack_with_references(margin_target_N, margin_refs_RxN, keep_refs_RxN, test_margin_target_Z,
                           test_margin_refs_RxZ, *, a: float, gamma: float = DEFAULT_GAMMA,
                           variants: Sequence[str] = VARIANTS) -> dict[str, np.ndarray]:
  """RMIA scores (N,) of one target model given explicit reference models (rows)."""
  means = reference_means(true_label_prob(margin_refs_RxN), keep_refs_RxN)
  p_z = prob_population(true_label_prob(test_margin_refs_RxZ).mean(0), a)
  log_p_x, log_p_z = log_expit(np.asarray(margin_target_N, np.float64)), log_expit(np.asarray(test_margin_target_Z, np.float64))
  return {v: rmia_scores(log_p_x, prob_x(means, a, v), log_p_z, p_z, gamma) for v in variants}


def tune_offline_a(margin_tuner_N, keep_tuner_N, margin_refs_RxN, keep_refs_RxN, test_margin_tuner_Z,
                   test_margin_refs_RxZ, *, gamma: float = DEFAULT_GAMMA,
                   grid: Sequence[float] = A_GRID) -> tuple[float, dict[float, float]]:
  """The a on ``grid`` with the best AUC of offline RMIA against a tuning model (not a target)
  attacked with the references, and the AUC of every grid value (ties: the smallest a)."""
  means = reference_means(true_label_prob(margin_refs_RxN), keep_refs_RxN)
  mean_out_Z = true_label_prob(test_margin_refs_RxZ).mean(0)
  return tune_a_from_means(margin_tuner_N, keep_tuner_N, means, test_margin_tuner_Z, mean_out_Z, gamma=gamma, grid=grid)


def tune_a_from_means(margin_tuner_N, keep_tuner_N, means: ReferenceMeans, test_margin_tuner_Z, mean_out_Z, *,
                      gamma: float = DEFAULT_GAMMA, grid: Sequence[float] = A_GRID) -> tuple[float, dict[float, float]]:
  """:func:`tune_offline_a` from the references' per-example means (N,) and population mean (Z,)
  (which may be summed block by block over examples)."""
  aucs: dict[float, float] = {}
  log_p_x = log_expit(np.asarray(margin_tuner_N, np.float64))
  log_p_z = log_expit(np.asarray(test_margin_tuner_Z, np.float64))
  for a in grid:
    score = rmia_scores(log_p_x, prob_x(means, a, "rmia_offline"), log_p_z, prob_population(mean_out_Z, a), gamma)
    aucs[float(a)] = attack_metrics(score, keep_tuner_N, fprs=())["auc"]
  finite = {k: v for k, v in aucs.items() if np.isfinite(v)}
  best = max(finite, key=lambda k: (finite[k], -k)) if finite else 0.5
  return float(best), aucs


def leave_one_out_rmia(margin_MxN: np.ndarray, keep_MxN: np.ndarray, test_margin_MxZ: np.ndarray,
                       targets: Sequence[int], *, a: float, gamma: float = DEFAULT_GAMMA,
                       variants: Sequence[str] = VARIANTS, sorted_z_TxZ: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Each target attacked with all other models as references: ``{variant: (T, N)}``. Equal to
  :func:`attack_with_references` with the rows other than t, for every t. ``sorted_z_TxZ``: the
  targets' :func:`leave_one_out_population` when already computed (then ``test_margin_MxZ`` is
  not read), so blocks of examples do not recompute it."""
  targets_T = np.asarray(targets, np.int64)
  if not gamma > 0:
    raise JaxmemError(f"RMIA's gamma must be positive, got {gamma}")
  if sorted_z_TxZ is None:
    sorted_z_TxZ = leave_one_out_population(test_margin_MxZ, targets_T, a=a)
  means = leave_one_out_means(true_label_prob(margin_MxN), keep_MxN, targets_T)
  log_p_x = log_expit(np.asarray(margin_MxN, np.float64)[targets_T])
  return {v: scores_from_sorted(log_p_x, prob_x(means, a, v), sorted_z_TxZ, gamma) for v in variants}


def leave_one_out_population(test_margin_MxZ: np.ndarray, targets_T: np.ndarray, *, a: float,
                             block_values: int = 4_000_000) -> np.ndarray:
  """Sorted population log ratios (T, Z) of each target, P(z) from all other models; computed for
  groups of targets of about ``block_values`` values (each row on its own: the result does not
  depend on it), so only the (T, Z) result is held whole."""
  targets_T = np.asarray(targets_T, np.int64)
  m, z = np.shape(test_margin_MxZ)
  per_group = max(1, block_values // max(z, 1))
  p_MxZ = np.empty((m, z))
  for start in range(0, m, per_group):   # elementwise, by groups of rows: no (M, Z) temporaries
    p_MxZ[start: start + per_group] = true_label_prob(test_margin_MxZ[start: start + per_group])
  total_Z = p_MxZ.sum(0)
  sorted_TxZ = np.empty((targets_T.size, z))
  for start in range(0, targets_T.size, per_group):
    group = targets_T[start: start + per_group]
    mean_out = (total_Z[None] - p_MxZ[group]) / (m - 1)
    log_p_z = log_expit(np.asarray(test_margin_MxZ[group], np.float64))
    sorted_TxZ[start: start + group.size] = sorted_population_ratios(log_p_z, prob_population(mean_out, a))
  return sorted_TxZ


def population_mean_without(test_margin_MxZ: np.ndarray, skip: int, *, block_values: int = 4_000_000) -> np.ndarray:
  """``true_label_prob(test_margin_MxZ[others]).mean(0)``, others = every row but ``skip``, by
  groups of rows: the rows are added one after another in the same order as numpy's reduction
  over axis 0 does, so the result is the same to the bit, without (M, Z) temporaries."""
  m, z = np.shape(test_margin_MxZ)
  per_group = max(1, block_values // max(z, 1))
  total_Z = None
  for start in range(0, m, per_group):
    rows = [r for r in range(start, min(start + per_group, m)) if r != skip]
    if not rows:
      continue
    p_GxZ = true_label_prob(test_margin_MxZ[rows])
    total_Z = p_GxZ.sum(0) if total_Z is None else np.add.reduce(np.concatenate([total_Z[None], p_GxZ]), axis=0)
  return total_Z / (m - 1)


def tune_a_leave_one_out(margin_MxN, keep_MxN, test_margin_MxZ, tuner: int, *, gamma: float = DEFAULT_GAMMA,
                         grid: Sequence[float] = A_GRID) -> tuple[float, dict[float, float]]:
  """:func:`tune_offline_a` with model ``tuner`` attacked by all the other models."""
  others = np.delete(np.arange(np.shape(margin_MxN)[0]), tuner)
  return tune_offline_a(margin_MxN[tuner], keep_MxN[tuner], margin_MxN[others], keep_MxN[others],
                        test_margin_MxZ[tuner], test_margin_MxZ[others], gamma=gamma, grid=grid)


@dataclasses.dataclass
class RmiaAttack:
  """Result of :func:`rmia_attack`, laid out like :class:`jaxmem.scores.lira.LiraAttack`."""
  targets: np.ndarray                   # (T,) model rows attacked
  scores: dict[str, np.ndarray]         # variant -> (T,N)
  members: np.ndarray                   # (T,N) bool ground truth
  evaluated: np.ndarray                 # (T,N) bool: pairs every variant scored
  metrics: dict[str, dict[str, dict[str, float]]]
  curves: dict[str, tuple[np.ndarray, np.ndarray]]
  eps: dict[str, dict[str, float]]      # variant -> ε lower bound and its threshold
  a: float
  a_aucs: dict[float, float]
  tuner: int
  gamma: float
  comparison: Any = None                # LiraAttack on the same targets, if computed


def check_single_ratio(subset_ratio_M, what: str) -> None:
  """Reference means over models of different subset ratios would mix training-set sizes (the
  in/out statistics are never pooled across ratios), so these attacks need a one-ratio run."""
  ratios = np.unique(np.asarray(subset_ratio_M, np.float64))
  if ratios.size > 1:
    raise JaxmemError(f"{what} needs models of one subset ratio; this run has {', '.join(f'{r:g}' for r in ratios)} "
                      "(run it on a run with a single --subset-ratio)")


def pick_tuner(num_models: int, targets_T: np.ndarray, seed: int) -> int:
  """A model that is not a target (if any), drawn with ``seed``."""
  free = np.setdiff1d(np.arange(num_models), targets_T)
  pool = free if free.size else np.arange(num_models)
  return int(np.random.default_rng(seed + 1).choice(pool))


def rmia_attack(margin_MxN, keep_MxN, test_margin_MxZ, *, targets=None, gamma: float = DEFAULT_GAMMA,
                a: float | None = None, num_bootstrap: int = 200, seed: int = 0,
                fprs: Sequence[float] = DEFAULT_FPRS, delta: float = DEFAULT_DELTA,
                confidence: float = DEFAULT_CONFIDENCE) -> RmiaAttack:
  """Leave-one-out RMIA pooled over target models, with bootstrap intervals and ε lower bounds.
  ``a=None`` tunes it on a model that is not a target (:func:`tune_a_leave_one_out`)."""
  margin_MxN = np.asarray(margin_MxN, np.float64)
  keep_MxN = np.asarray(keep_MxN, bool)
  test_margin_MxZ = np.asarray(test_margin_MxZ, np.float64)
  if margin_MxN.ndim != 2 or keep_MxN.shape != margin_MxN.shape:
    raise JaxmemError(f"RMIA needs margins (M,N) with keep (M,N), got {margin_MxN.shape} and {keep_MxN.shape}")
  if test_margin_MxZ.ndim != 2 or test_margin_MxZ.shape[0] != margin_MxN.shape[0] or test_margin_MxZ.shape[1] == 0:
    raise JaxmemError(f"RMIA needs population margins (M,Z) of the same models, got {test_margin_MxZ.shape}")
  if margin_MxN.shape[0] < 3:
    raise JaxmemError(f"an RMIA attack needs at least 3 models (a target, a reference and a tuning model), "
                      f"got {margin_MxN.shape[0]}")
  chosen = choose_targets(margin_MxN.shape[0], targets, seed)
  tuner = pick_tuner(margin_MxN.shape[0], chosen, seed)
  if a is None:
    a, a_aucs = tune_a_leave_one_out(margin_MxN, keep_MxN, test_margin_MxZ, tuner, gamma=gamma)
  else:
    a_aucs = {}
  scores = leave_one_out_rmia(margin_MxN, keep_MxN, test_margin_MxZ, chosen, a=a, gamma=gamma)
  return evaluate_rmia(chosen, scores, keep_MxN[chosen], a=a, a_aucs=a_aucs, tuner=tuner, gamma=gamma,
                       num_bootstrap=num_bootstrap, seed=seed, fprs=fprs, delta=delta, confidence=confidence)


def evaluate_rmia(chosen: np.ndarray, scores: dict[str, np.ndarray], members: np.ndarray, *, a: float,
                  a_aucs: dict[float, float], tuner: int, gamma: float, num_bootstrap: int = 200, seed: int = 0,
                  fprs: Sequence[float] = DEFAULT_FPRS, delta: float = DEFAULT_DELTA,
                  confidence: float = DEFAULT_CONFIDENCE) -> RmiaAttack:
  """Pooled metrics with bootstrap intervals, ε lower bounds and ROC curves of the targets' scores
  ``(T, N)`` on the pairs every variant scored."""
  evaluated = np.all([~np.isnan(s) for s in scores.values()], axis=0)
  metrics, curves, eps = {}, {}, {}
  for name, s in scores.items():
    masked = np.where(evaluated, s, np.nan)
    metrics[name] = bootstrap_attack_metrics(masked, members, num_bootstrap=num_bootstrap, seed=seed, fprs=fprs)
    eps[name] = eps_lower_bound(masked, members, delta=delta, confidence=confidence, seed=seed)
    if evaluated.any() and members[evaluated].any() and (~members[evaluated]).any():
      # a point per distinct score (millions at scale): stored and drawn thinned to exact points
      curves[name] = thin_roc(*roc(s[evaluated], members[evaluated]))
  return RmiaAttack(chosen, scores, members, evaluated, metrics, curves, eps, float(a), a_aucs, tuner, float(gamma))


def per_example_risk(margin_MxN, keep_MxN, test_margin_MxZ, *, a: float, gamma: float = DEFAULT_GAMMA,
                     sorted_z_MxZ: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """``rmia_online`` and ``rmia_offline`` (N,): per-example AUC over all M models as targets.
  ``sorted_z_MxZ``: :func:`leave_one_out_population` of all models, when already computed."""
  keep_MxN = np.asarray(keep_MxN, bool)
  scores = leave_one_out_rmia(margin_MxN, keep_MxN, test_margin_MxZ, np.arange(keep_MxN.shape[0]), a=a, gamma=gamma,
                              sorted_z_TxZ=sorted_z_MxZ)
  return {name: per_example_auc(s, keep_MxN) for name, s in scores.items()}


#: Memory for one block of examples (margins and the float64 working arrays of scoring them for
#: all M targets, :data:`BYTES_PER_VALUE` per model x example); the block size follows from it.
DEFAULT_MEMORY_BUDGET = 256 << 20
#: About 20 float64 arrays of a block's (M, n) size live at once (probabilities, in/out sums and
#: means, P(x) and log ratios of both variants, scores, ranks of the per-example AUC).
BYTES_PER_VALUE = 160


def rmia_report(records, *, memorization=None, targets=None, gamma: float = DEFAULT_GAMMA, a: float | None = None,
                num_bootstrap: int = 200, seed: int = 0, delta: float = DEFAULT_DELTA,
                confidence: float = DEFAULT_CONFIDENCE, compare_lira: bool = True,
                memory_budget: int = DEFAULT_MEMORY_BUDGET, block_size: int | None = None,
                ) -> tuple[dict[str, np.ndarray], dict[str, Any], RmiaAttack]:
  """Everything ``jaxmem scores --estimators rmia`` reports: columns, the ``rmia.json`` summary
  (the layout of ``lira.json``) and the attack (for the ROC curves). With ``compare_lira``, LiRA
  online, online fixed-variance and offline on the same targets join the summary
  (``lira_same_targets``) and the attack's ``comparison`` (for the same plot).

  The training margins are read in blocks of ``block_size`` examples (default: as many as
  ``memory_budget`` bytes allow): one pass for the tuning model's reference means (a is tuned on
  its full (N,) scores), one for the targets' scores and the per-example columns, and LiRA's
  passes for the comparison. Every quantity is a per-example reduction over models, so the
  results do not depend on the block size (LiRA's fixed variances up to float64 summation order).
  Memory: one block, the population margins (M, Z) and the sorted population ratios of every
  model (M, Z) float64, and the targets' scores (T, N) per variant; nothing of size M·N."""
  check_single_ratio(records.subset_ratio, "RMIA")
  num_models, num_train = records.num_models, records.num_train
  test_margin = np.asarray(records.read("test_margin"))   # as stored; made float64 by groups of rows
  if test_margin.ndim == 3:
    test_margin = test_margin[..., 0]
  if test_margin.ndim != 2 or test_margin.shape[0] != num_models or test_margin.shape[1] == 0:
    raise JaxmemError(f"RMIA needs population margins (M,Z) of the same models, got {test_margin.shape}")
  if num_models < 3:
    raise JaxmemError(f"an RMIA attack needs at least 3 models (a target, a reference and a tuning model), "
                      f"got {num_models}")
  if block_size is None:
    if memory_budget <= 0:
      raise JaxmemError(f"RMIA memory budget must be a positive number of bytes, got {memory_budget}")
    block_size = max(1, int(memory_budget) // (BYTES_PER_VALUE * num_models))
  if block_size < 1:
    raise JaxmemError(f"RMIA block size must be a positive number of examples, got {block_size}")
  blocks = list(records.example_blocks(min(int(block_size), max(num_train, 1))))

  def read_block(block):
    margin = np.asarray(records.read("train_margin", examples=block), np.float64)
    if margin.ndim == 3:  # augmented queries: RMIA takes one probability per example, the plain query
      margin = margin[..., 0]
    return margin, np.asarray(records.read("keep", examples=block), bool)

  chosen = choose_targets(num_models, targets, seed)
  tuner = pick_tuner(num_models, chosen, seed)
  if a is None:
    # tune_a_leave_one_out, with the references' per-example means summed block by block
    others = np.delete(np.arange(num_models), tuner)
    parts: dict[str, list[np.ndarray]] = {"margin": [], "keep": [], "mean_in": [], "n_in": [], "mean_out": [],
                                          "n_out": []}
    for block in blocks:
      margin, keep = read_block(block)
      means = reference_means(true_label_prob(margin[others]), keep[others])
      # copies of the tuner's rows: a row view would keep the whole block's (M, n) array alive
      for key, value in (("margin", margin[tuner].copy()), ("keep", keep[tuner].copy()), ("mean_in", means.mean_in),
                         ("n_in", means.n_in), ("mean_out", means.mean_out), ("n_out", means.n_out)):
        parts[key].append(value)
      del margin, keep, means
    whole = {key: np.concatenate(value) for key, value in parts.items()}
    means = ReferenceMeans(whole["mean_in"], whole["n_in"], whole["mean_out"], whole["n_out"])
    a, a_aucs = tune_a_from_means(whole["margin"], whole["keep"], means, test_margin[tuner],
                                  population_mean_without(test_margin, tuner), gamma=gamma)
    del parts, whole, means
  else:
    a_aucs = {}
  sorted_z_MxZ = leave_one_out_population(test_margin, np.arange(num_models), a=a)
  scores_parts: dict[str, list[np.ndarray]] = {v: [] for v in VARIANTS}
  members, risk = [], {v: [] for v in VARIANTS}
  for block in blocks:
    margin, keep = read_block(block)
    for variant, value in leave_one_out_rmia(margin, keep, test_margin, chosen, a=a, gamma=gamma,
                                             sorted_z_TxZ=sorted_z_MxZ[chosen]).items():
      scores_parts[variant].append(value)
    members.append(keep[chosen])
    for variant, value in per_example_risk(margin, keep, test_margin, a=a, gamma=gamma,
                                           sorted_z_MxZ=sorted_z_MxZ).items():
      risk[variant].append(value)
    del margin, keep
  del sorted_z_MxZ
  scores = {v: np.concatenate(p, axis=1) for v, p in scores_parts.items()}
  columns = {v: np.concatenate(p) for v, p in risk.items()}
  attack = evaluate_rmia(chosen, scores, np.concatenate(members, axis=1), a=a, a_aucs=a_aucs, tuner=tuner,
                         gamma=gamma, num_bootstrap=num_bootstrap, seed=seed, delta=delta, confidence=confidence)
  margin_shape = (num_models, num_train)
  summary: dict[str, Any] = {
      "models": int(margin_shape[0]), "examples": int(margin_shape[1]), "population": int(test_margin.shape[1]),
      "population_source": "test split (never trained on)", "gamma": attack.gamma, "a": attack.a,
      "a_tuning": {"tuning_model": attack.tuner, "auc_by_a": {f"{k:g}": v for k, v in attack.a_aucs.items()}},
      "targets": attack.targets.tolist(), "pairs_evaluated": int(attack.evaluated.sum()),
      "member_percent": int(attack.members[attack.evaluated].mean() * 100) if attack.evaluated.any() else 0,
      "num_bootstrap": num_bootstrap, "seed": seed, "attack": attack.metrics,
      "eps_lower_bound": attack.eps, "eps_caveat": POOLED_CAVEAT,
      "per_example_definition": "per-example AUC of the RMIA score over all models as targets (leave-one-out)"}
  if compare_lira:
    # LiRA on the same targets, shadows and pairs, for the comparison the RMIA paper makes.
    # (lira_attack, with the margins read block by block)
    def read_queries(block):
      margin, keep = read_block(block)
      return as_queries(margin), keep

    lira_scores_TxN, lira_members = attack_scores_by_blocks(
        read_queries, blocks, attack.targets, variants=("online", "online_fixed_variance", "offline"),
        block_values=max(1, int(memory_budget) // BYTES_PER_VALUE))
    lira = evaluate_attack(attack.targets, lira_scores_TxN, lira_members, num_bootstrap=num_bootstrap, seed=seed)
    summary["lira_same_targets"] = lira.metrics
    attack.comparison = lira
  if memorization is not None:
    summary["spearman_rmia_online_memorization"] = spearman(columns["rmia_online"], memorization)
  return columns, summary, attack


def rmia_estimator(records, *, context=None, targets=None, gamma: float = DEFAULT_GAMMA, a: float | None = None,
                   num_bootstrap: int = 200, seed: int = 0, delta: float = DEFAULT_DELTA,
                   confidence: float = DEFAULT_CONFIDENCE, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> EstimatorResult:
  """Adapter: ``rmia_online``/``rmia_offline`` columns, the attack summary (``rmia.json``) and the
  table ``rmia_roc``: the ROC curves of RMIA and of LiRA on the same pairs (one plot); opt-in like
  LiRA. Margins are read in blocks of examples sized from ``memory_budget`` (see :func:`rmia_report`)."""
  memorization = None if context is None else context.get("memorization")
  columns, summary, attack = rmia_report(
      records, memorization=memorization, targets=targets, gamma=gamma, a=a, num_bootstrap=num_bootstrap,
      seed=seed, delta=delta, confidence=confidence, memory_budget=memory_budget)
  shown = attack
  if attack.comparison is not None:   # one plot: RMIA and LiRA on the same pairs
    shown = dataclasses.replace(attack, curves={**attack.comparison.curves, **attack.curves})
  return EstimatorResult(columns=columns, summary=summary, tables={"rmia_roc": roc_table(shown)})
