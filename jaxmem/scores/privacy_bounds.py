"""Empirical lower bounds on the differential-privacy ε from a membership attack (Jagielski, Ullman
and Oprea 2020, "Auditing Differentially Private Machine Learning: How Private is Private SGD?";
Nasr et al. 2021, "Adversary Instantiation: Lower Bounds for Differentially Private Machine
Learning").

If training is (ε, δ)-DP, every test that tells "trained with x" from "trained without x" obeys
TPR ≤ e^ε·FPR + δ, so an observed attack gives ε ≥ log((TPR − δ) / FPR). The rates are estimates,
so the bound uses a one-sided Clopper-Pearson lower bound on TPR and an upper bound on FPR
(Jagielski et al. §3). DP bounds any event both ways between neighbouring datasets, so at every
threshold t four tests are tried (:data:`DIRECTIONS`): TPR ≤ e^ε·FPR + δ, FPR ≤ e^ε·TPR + δ, and
the same for the event score < t (TNR ≤ e^ε·FNR + δ, FNR ≤ e^ε·TNR + δ); the best is kept, with
the threshold and direction that gave it.

Confidence: the two Clopper-Pearson bounds of one threshold are each taken at level
1 − (1 − confidence)/2, so that both hold together with probability ``confidence`` (Bonferroni).

Threshold selection: the best of many thresholds, picked and evaluated on the same trials, is
biased upward (a random attack on 20,000 pairs gets ε ≈ 0.015). As Jagielski et al. do with
separate trials, the default picks the threshold on half of the examples and bounds ε on the other
half.

What this is not (said in every output that carries it, :data:`POOLED_CAVEAT`): pooled (target
model, natural example) pairs are not independent trials — the same example is attacked under every
target model and examples differ in how exposed they are — so the binomial intervals are too
narrow. Canaries inserted independently into each model (one trial per model) are the design where
they are valid.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import beta

from jaxmem.errors import JaxmemError

DEFAULT_DELTA = 1e-5
DEFAULT_CONFIDENCE = 0.95
#: The four tests tried at every threshold t: an event (score >= t or score < t) and which world's
#: rate is bounded by e^ε times the other's (DP bounds both ways between neighbouring datasets).
DIRECTIONS = ("score >= t: member vs non-member", "score >= t: non-member vs member",
              "score < t: non-member vs member", "score < t: member vs non-member")
POOLED_CAVEAT = ("eps lower bound from pooled (target, example) pairs, threshold chosen on half of the examples "
                 "and evaluated on the other half; pooled natural examples are not independent trials, so "
                 "this is indicative, not a certified audit (independent canaries are)")


def clopper_pearson_lower(successes, trials, level: float) -> np.ndarray:
  """One-sided lower bound on a binomial proportion at ``level`` (0 where successes = 0)."""
  k, n = np.asarray(successes, np.float64), np.asarray(trials, np.float64)
  with np.errstate(invalid="ignore"):
    bound = beta.ppf(1 - level, np.maximum(k, 1), np.maximum(n - k + 1, 1))
  return np.where(k > 0, bound, 0.0)


def clopper_pearson_upper(successes, trials, level: float) -> np.ndarray:
  """One-sided upper bound on a binomial proportion at ``level`` (1 where successes = trials)."""
  k, n = np.asarray(successes, np.float64), np.asarray(trials, np.float64)
  with np.errstate(invalid="ignore"):
    bound = beta.ppf(level, k + 1, np.maximum(n - k, 1))
  return np.where(k < n, bound, 1.0)


def _eps(tp_low, fp_high, delta):
  with np.errstate(divide="ignore", invalid="ignore"):
    value = np.log((tp_low - delta) / fp_high)
  return np.where(tp_low > delta, value, -np.inf)


def _best_threshold(scores: np.ndarray, members: np.ndarray, delta: float, level: float):
  """Every threshold and both directions on these pairs: (eps, threshold, direction) of the best,
  or None without members or non-members."""
  positives, negatives = int(members.sum()), int((~members).sum())
  if positives == 0 or negatives == 0:
    return None
  order = np.argsort(-scores, kind="stable")
  sorted_scores, sorted_members = scores[order], members[order]
  last_of_run = np.append(np.diff(sorted_scores) != 0, True)
  tp = np.cumsum(sorted_members)[last_of_run]          # predicted member: score >= threshold
  fp = np.cumsum(~sorted_members)[last_of_run]
  thresholds = sorted_scores[last_of_run]
  fn, tn = positives - tp, negatives - fp
  # The complementary event, score < thresholds[k], holds for the pairs after run k (counted by tn[k]
  # and fn[k]; the last run's complement, below the lowest score, is empty and dropped).
  best = (-np.inf, float("nan"), DIRECTIONS[0])
  for direction, (hit, pos, false, neg, thr) in zip(DIRECTIONS, (
      (tp, positives, fp, negatives, thresholds), (fp, negatives, tp, positives, thresholds),
      (tn[:-1], negatives, fn[:-1], positives, thresholds[:-1]), (fn[:-1], positives, tn[:-1], negatives, thresholds[:-1]))):
    if hit.size == 0:
      continue
    k, eps_k = _argmax_eps(hit, pos, false, neg, delta, level)
    if eps_k > best[0]:
      best = (eps_k, float(thr[k]), direction)
  return best


#: Thresholds whose exact bound is computed in one call (each Clopper-Pearson bound is a beta
#: quantile, ~1 µs): bounds the time of one C call, so a signal is handled between them.
_EXACT_BATCH = 1 << 16


def _argmax_eps(hit, pos: int, false, neg: int, delta: float, level: float) -> tuple[int, float]:
  """``k = argmax(eps)`` (the first on ties) and ``eps[k]`` of
  ``_eps(clopper_pearson_lower(hit, pos), clopper_pearson_upper(false, neg), delta)``, without
  computing the beta quantiles of every threshold.

  The one-sided Clopper-Pearson bounds at level >= 1/2 bracket the observed rates (lower <=
  hit/pos, upper >= false/neg: the binomial median at p = k/n is k), so ``log((hit/pos − δ) /
  (false/neg))`` bounds each threshold's ε from above. Exact bounds are computed for the
  thresholds in decreasing order of that upper bound until it falls below the best exact value
  found; the rest cannot reach it. Same result as evaluating every threshold (the tests compare)."""
  hit, false = np.asarray(hit, np.float64), np.asarray(false, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    upper = np.where(hit / pos > delta, np.log((hit / pos - delta) / (false / neg)), -np.inf)
  # a relative slack for the rounding of the quantiles (the bound holds exactly in real numbers)
  upper = upper + 1e-9 * (1 + np.abs(np.nan_to_num(upper, posinf=0.0, neginf=0.0)))
  order = np.argsort(-upper, kind="stable")
  exact = np.full(hit.shape, -np.inf)
  best = -np.inf
  for start in range(0, order.size, _EXACT_BATCH):
    batch = order[start: start + _EXACT_BATCH]
    if start and upper[batch[0]] < best:
      break
    exact[batch] = _eps(clopper_pearson_lower(hit[batch], pos, level),
                        clopper_pearson_upper(false[batch], neg, level), delta)
    best = max(best, float(exact[batch].max()))
  k = int(np.argmax(exact))
  return k, float(exact[k])


def _bound_at(scores, members, threshold: float, direction: str, delta: float, level: float) -> dict[str, float]:
  """The ε bound of one fixed test on these pairs, with its rates and their bounds."""
  event = scores >= threshold if direction.startswith("score >=") else scores < threshold
  in_rate, out_rate = (event & members).sum(), (event & ~members).sum()
  positives, negatives = int(members.sum()), int((~members).sum())
  if direction.endswith(": member vs non-member"):
    hit, pos, false, neg = int(in_rate), positives, int(out_rate), negatives
  else:
    hit, pos, false, neg = int(out_rate), negatives, int(in_rate), positives
  low = float(clopper_pearson_lower(hit, pos, level))
  high = float(clopper_pearson_upper(false, neg, level))
  return {"eps": max(float(_eps(low, high, delta)), 0.0), "tpr": hit / pos, "fpr": false / neg,
          "tpr_low": low, "fpr_high": high}


def eps_lower_bound(scores, members, *, delta: float = DEFAULT_DELTA, confidence: float = DEFAULT_CONFIDENCE,
                    select: str = "split", seed: int = 0) -> dict[str, Any]:
  """ε lower bound of an attack from its scores (T,N) or (N,) and ground truth (NaN scores dropped).

  ``select="split"`` (default): the examples (columns; all of an example's pairs together) are
  split in two halves with ``seed``; the best threshold and direction are chosen on one half and
  the bound is computed on the other, so choosing among many thresholds does not inflate it (a
  random attack gets 0 with probability ``confidence``). ``select="same"``: the best threshold on
  all pairs, with the bound on the same pairs (larger, optimistic: a random attack on 20,000
  pairs reaches ε ≈ 0.01-0.02 this way).

  Returns ``eps`` (0 when no threshold gives a positive bound), the ``threshold`` and
  ``direction`` (one of :data:`DIRECTIONS`), the two observed rates there as ``tpr`` (the rate
  bounded from below, e.g. TNR for "score < t: non-member vs member") and ``fpr`` (the other), with
  their bounds ``tpr_low``/``fpr_high``, ``positives``, ``negatives`` (of the pairs the bound is computed
  on), ``delta``, ``confidence`` and ``select``.
  """
  if not 0 <= delta < 1:
    raise JaxmemError(f"delta must be in [0, 1), got {delta}")
  if not 0 < confidence < 1:
    raise JaxmemError(f"confidence must be in (0, 1), got {confidence}")
  if select not in ("split", "same"):
    raise JaxmemError(f"threshold selection must be split or same, got {select!r}")
  scores = np.asarray(scores, np.float64)
  members = np.asarray(members, bool)
  if scores.ndim == 1:
    scores, members = scores[None], members[None]
  if scores.shape != members.shape:
    raise JaxmemError(f"scores {scores.shape} and members {members.shape} differ in shape")
  level = 1 - (1 - confidence) / 2
  if select == "split":
    half = np.random.default_rng(seed).permutation(scores.shape[1]) < scores.shape[1] // 2
    choose, evaluate = half, ~half
  else:
    choose = evaluate = np.ones(scores.shape[1], bool)

  def pairs(columns):
    s, m = scores[:, columns].ravel(), members[:, columns].ravel()
    valid = ~np.isnan(s)
    return s[valid], m[valid]

  eval_scores, eval_members = pairs(evaluate)
  out: dict[str, Any] = {"eps": float("nan"), "threshold": float("nan"), "direction": "", "tpr": float("nan"),
                         "fpr": float("nan"), "tpr_low": float("nan"), "fpr_high": float("nan"),
                         "positives": int(eval_members.sum()), "negatives": int((~eval_members).sum()),
                         "delta": delta, "confidence": confidence, "select": select}
  best = _best_threshold(*pairs(choose), delta, level)
  if best is None or out["positives"] == 0 or out["negatives"] == 0:
    return out
  _, threshold, direction = best
  out.update(threshold=threshold, direction=direction,
             **_bound_at(eval_scores, eval_members, threshold, direction, delta, level))
  return out
