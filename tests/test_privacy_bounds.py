"""Empirical ε lower bounds: closed-form fixtures, a naive threshold loop, and a random attack."""

import numpy as np
import pytest
from scipy.stats import beta

from jaxmem.errors import JaxmemError
from jaxmem.scores import privacy_bounds
from jaxmem.scores.privacy_bounds import clopper_pearson_lower, clopper_pearson_upper, eps_lower_bound


def test_perfect_attack_matches_hand_computation():
  # n members all score 1, n non-members all score 0. At threshold 1: TP = n, FP = 0, and the
  # one-sided Clopper-Pearson bounds have closed forms: lower(n of n) = α^(1/n), upper(0 of n) =
  # 1 − α^(1/n), with α = (1 − 0.95)/2 (two bounds, Bonferroni).
  n, delta = 50, 1e-5
  scores = np.r_[np.ones(n), np.zeros(n)]
  members = np.r_[np.ones(n, bool), np.zeros(n, bool)]
  alpha = 0.025
  tpr_low, fpr_high = alpha ** (1 / n), 1 - alpha ** (1 / n)
  expected = np.log((tpr_low - delta) / fpr_high)
  out = eps_lower_bound(scores, members, delta=delta, confidence=0.95, select="same")
  assert out["eps"] == pytest.approx(expected, rel=1e-9)
  assert out["tpr_low"] == pytest.approx(tpr_low) and out["fpr_high"] == pytest.approx(fpr_high)
  assert out["tpr"] == 1.0 and out["fpr"] == 0.0
  assert expected == pytest.approx(2.5696, abs=1e-4)  # 0.025^(1/50) = 0.92888: ε ≥ log(0.92887 / 0.07112)


def test_equals_naive_threshold_loop():
  rng = np.random.default_rng(3)
  members = rng.random(300) < 0.6
  scores = np.round(rng.normal(members * 1.5, 1.0), 1)   # rounded: ties between pairs
  delta, level = 1e-3, 1 - 0.1 / 2
  best = 0.0
  P, N = members.sum(), (~members).sum()
  for t in np.unique(scores):
    for event in (scores >= t, scores < t):
      a, b = (event & members).sum(), (event & ~members).sum()
      for hit, pos, false, neg in ((a, P, b, N), (b, N, a, P)):   # either world in the numerator
        low = beta.ppf(1 - level, hit, pos - hit + 1) if hit > 0 else 0.0
        high = beta.ppf(level, false + 1, neg - false) if false < neg else 1.0
        if low > delta:
          best = max(best, np.log((low - delta) / high))
  out = eps_lower_bound(scores, members, delta=delta, confidence=0.9, select="same")
  assert best > 0.5
  assert out["eps"] == pytest.approx(best, rel=1e-12)


def test_random_attack_gives_zero():
  # 16 targets x 1250 examples, scores independent of membership. Picking the best of ~20,000
  # thresholds on the same pairs overstates ε; the split selection does not.
  rng = np.random.default_rng(0)
  same = []
  for _ in range(4):
    members = rng.random((16, 1250)) < 0.7
    scores = rng.random((16, 1250))
    assert eps_lower_bound(scores, members)["eps"] == 0.0
    same.append(eps_lower_bound(scores, members, select="same")["eps"])
  assert max(same) > 0  # the bias the split removes


def test_split_selection_on_a_strong_attack():
  # Perfect separation: half of the 200 examples (x 4 targets) evaluate the threshold chosen on
  # the other half: TP = all members of that half, FP = 0.
  rng = np.random.default_rng(1)
  members = rng.random((4, 200)) < 0.5
  out = eps_lower_bound(members * 1.0, members, confidence=0.95)
  half = np.random.default_rng(0).permutation(200) < 100
  pos, neg = int(members[:, ~half].sum()), int((~members[:, ~half]).sum())
  tpr_low, fpr_high = 0.025 ** (1 / pos), 1 - 0.025 ** (1 / neg)
  assert (out["positives"], out["negatives"]) == (pos, neg)
  assert out["eps"] == pytest.approx(np.log((tpr_low - 1e-5) / fpr_high), rel=1e-9)


def test_reverse_direction_and_nan():
  # Members score *lower*: only the complementary event gives a bound.
  scores = np.r_[np.zeros(40), np.ones(40), np.nan]
  members = np.r_[np.ones(40, bool), np.zeros(40, bool), True]
  out = eps_lower_bound(scores, members, select="same")
  assert out["direction"] in ("score >= t: non-member vs member", "score < t: member vs non-member")
  low = 0.025 ** (1 / 40)   # 40 of 40 in one world, 0 of 40 in the other, as in the first test
  assert out["eps"] == pytest.approx(np.log((low - 1e-5) / (1 - low)), rel=1e-9)
  assert out["positives"] == 40 and (out["tpr"], out["fpr"]) == (1.0, 0.0)
  assert eps_lower_bound(scores, members)["eps"] > 1.5   # half the examples evaluate


def test_bounds_and_bad_input():
  assert clopper_pearson_lower(0, 10, 0.95) == 0.0 and clopper_pearson_upper(10, 10, 0.95) == 1.0
  assert clopper_pearson_lower(5, 10, 0.95) < 0.5 < clopper_pearson_upper(5, 10, 0.95)
  assert np.isnan(eps_lower_bound(np.ones(3), np.ones(3, bool))["eps"])
  with pytest.raises(JaxmemError, match="delta"):
    eps_lower_bound(np.ones(3), np.ones(3, bool), delta=1.5)
  with pytest.raises(JaxmemError, match="confidence"):
    eps_lower_bound(np.ones(3), np.ones(3, bool), confidence=1.0)


@pytest.mark.parametrize("seed,shift", [(0, 0.0), (1, 0.5), (2, 3.0)])
def test_pruned_threshold_search_equals_every_threshold(monkeypatch, seed, shift):
  """The search computes exact bounds only where the rates' upper bound can still win; in batches
  of 7 (so the pruning acts) it must pick the same threshold and ε as evaluating all of them."""
  rng = np.random.default_rng(seed)
  members = rng.random(2000) < 0.7
  scores = np.round(rng.normal(members * shift, 1.0), 2)
  level, delta = 0.975, 1e-5

  def every_threshold(hit, pos, false, neg, delta, level):
    eps = privacy_bounds._eps(clopper_pearson_lower(hit, pos, level), clopper_pearson_upper(false, neg, level), delta)
    k = int(np.argmax(eps))
    return k, float(eps[k])

  monkeypatch.setattr(privacy_bounds, "_EXACT_BATCH", 7)
  pruned = privacy_bounds._best_threshold(scores, members, delta, level)
  monkeypatch.setattr(privacy_bounds, "_argmax_eps", every_threshold)
  assert pruned == privacy_bounds._best_threshold(scores, members, delta, level)
