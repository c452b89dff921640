"""Runs with several subset ratios: in/out differences are taken within each ratio, never pooled.

Pooling in- and out-models over ratios biases every in/out estimator by the accuracy gap between
ratios (in-models are mostly high-ratio, more accurate models). The fixture below has that gap and
no membership effect at all, so every in/out estimate must be 0 within its standard error.
"""

import numpy as np
import pytest

from jaxmem.errors import JaxmemError
from jaxmem.scores import memorization
from jaxmem.scores._stats import ratio_name
from jaxmem.scores.influence import influence
from jaxmem.scoring import score_records
from jaxmem.records import Records

RATIOS = tuple(round(0.1 * k, 1) for k in range(1, 10))


def make_records(keep, ratio, arrays):
  m, n = keep.shape
  t = arrays["test_correct"].shape[1] if "test_correct" in arrays else 3
  return Records(keep=keep, model_ids=np.arange(m), subset_ratio=np.asarray(ratio, np.float32),
                 train_labels=np.arange(n) % 3, clean_train_labels=np.arange(n) % 3, test_labels=np.arange(t) % 3,
                 noisy=np.zeros(n, bool), arrays=arrays, num_models_planned=m)


def ratio_only_records(seed=0, models_per_ratio=100, n=150, t=30):
  """9 ratios interleaved over model ids; accuracy and margins depend on the ratio only, so the
  true memorization (and influence) of every example is exactly 0."""
  rng = np.random.default_rng(seed)
  ratio = np.tile(np.asarray(RATIOS, np.float32), models_per_ratio)
  m = len(ratio)
  keep = rng.random((m, n)) < ratio[:, None]
  accuracy = 0.3 + 0.6 * ratio[:, None]
  arrays = {"train_correct": rng.random((m, n)) < accuracy,
            "train_margin": (4 * ratio[:, None] - 2 + rng.normal(size=(m, n))).astype(np.float32),
            "test_correct": rng.random((m, t)) < accuracy}
  return keep, ratio, arrays


def assert_zero_within_se(estimate, se, units):
  """The mean of ``estimate`` over ``units`` independent examples is 0 within 4 of its SEs (over
  the entries with an SE: a Welch SE is unknown where a ratio has a single in- or out-model)."""
  estimate, se = np.asarray(estimate, np.float64).ravel(), np.asarray(se, np.float64).ravel()
  assert np.isfinite(estimate).all() and np.isfinite(se).mean() > 0.95
  estimate, se = estimate[np.isfinite(se)], se[np.isfinite(se)]
  tolerance = 4 * np.sqrt(np.mean(se**2) / units)
  assert abs(estimate.mean()) < tolerance, (estimate.mean(), tolerance)
  # no single example is far from 0 either (150 examples: |z| > 5 has probability ~1e-4)
  assert np.max(np.abs(estimate / se)) < 5


def test_ratio_only_accuracy_gives_zero_memorization_counterfactual_and_influence():
  keep, ratio, arrays = ratio_only_records()
  n = keep.shape[1]
  table = score_records(make_records(keep, ratio, arrays), ["memorization", "counterfactual"],
                        {"counterfactual": {"metrics": "margin,logprob,loss"}})
  for name in ("memorization", "memorization_margin", "memorization_logprob", "memorization_loss"):
    assert_zero_within_se(table.columns[name], table.columns[f"{name}_se"], n)
  infl_NxT, se_NxT = influence(keep, arrays["test_correct"], ratio_M=ratio)
  assert_zero_within_se(infl_NxT, se_NxT, n)


def naive_memorization_at(keep, correct, ratio, r):
  """Reference: Feldman & Zhang's estimator and Agresti-Caffo SE per example, over the models of
  ratio ``r`` only, as a Python loop."""
  rows = np.flatnonzero(np.round(ratio, 6) == r)
  n = keep.shape[1]
  estimate, se = np.full(n, np.nan), np.full(n, np.nan)
  for i in range(n):
    inside = [correct[m, i] for m in rows if keep[m, i]]
    outside = [correct[m, i] for m in rows if not keep[m, i]]
    if inside and outside:
      estimate[i] = np.mean(inside) - np.mean(outside)
      p1, p2 = (np.sum(inside) + 1) / (len(inside) + 2), (np.sum(outside) + 1) / (len(outside) + 2)
      se[i] = np.sqrt(p1 * (1 - p1) / (len(inside) + 2) + p2 * (1 - p2) / (len(outside) + 2))
  return estimate, se


@pytest.mark.parametrize("seed", [0, 1])
def test_memorization_at_each_ratio_equals_naive_per_ratio_loop(seed):
  rng = np.random.default_rng(seed)
  ratio = np.tile(np.asarray([0.3, 0.5, 0.8], np.float32), 6)
  keep = rng.random((len(ratio), 40)) < ratio[:, None]
  keep[ratio == np.float32(0.8), 0] = True  # example 0: no out-model at ratio 0.8
  correct = rng.random(keep.shape) < 0.4 + 0.5 * keep
  table = score_records(make_records(keep, ratio, {"train_correct": correct}), ["memorization"])
  per, per_se = [], []
  for r in (0.3, 0.5, 0.8):
    estimate, se = naive_memorization_at(keep, correct, ratio, r)
    np.testing.assert_allclose(table.columns[f"memorization_at_{ratio_name(r)}"], estimate, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(table.columns[f"memorization_at_{ratio_name(r)}_se"], se, rtol=1e-6, equal_nan=True)
    per.append(estimate)
    per_se.append(se)
  # headline: equal-weight mean over ratios, empty where some ratio lacks in- or out-models
  np.testing.assert_allclose(table.columns["memorization"], np.mean(per, axis=0), atol=1e-6, equal_nan=True)
  np.testing.assert_allclose(table.columns["memorization_se"], np.sqrt(np.sum(np.square(per_se), axis=0)) / 3,
                             rtol=1e-6, equal_nan=True)
  assert np.isnan(table.columns["memorization"][0]) and np.isnan(table.columns["memorization_se"][0])
  assert np.isfinite(table.columns["memorization_at_0.3"][0])


def test_single_ratio_has_no_per_ratio_columns_and_matches_the_plain_estimator():
  rng = np.random.default_rng(3)
  keep = rng.random((20, 30)) < 0.7
  correct = rng.random((20, 30)) < 0.8
  table = score_records(make_records(keep, np.full(20, 0.7), {"train_correct": correct}), ["memorization"])
  assert not any(c.startswith("memorization_at_") for c in table.columns)
  np.testing.assert_array_equal(table.columns["memorization"], memorization(keep, correct).estimate)


def test_lira_refuses_a_multi_ratio_run_in_one_line():
  keep, ratio, arrays = ratio_only_records(models_per_ratio=4, n=10)
  with pytest.raises(JaxmemError, match=r"^LiRA needs a run with one subset ratio .*0\.1, 0\.2.*0\.9\)") as info:
    score_records(make_records(keep, ratio, arrays), ["lira"])
  assert "\n" not in str(info.value)
