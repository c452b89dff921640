import jax
import numpy as np
import pytest
from scipy.stats import spearmanr

import jaxmem
from jaxmem.errors import JaxmemError
from jaxmem.scores import memorization
from jaxmem.scores.uncertainty import (TargetSE, bootstrap_counts, bootstrap_differences, bootstrap_interval,
                                       median_memorization_se, models_needed, split_half_reliability)


def naive_bootstrap(keep, values, counts):
  """Reference: expand each resample into its list of models and take the in−out difference."""
  b, m = counts.shape
  out = np.full((b, keep.shape[1]), np.nan)
  for r in range(b):
    rows = np.repeat(np.arange(m), counts[r].astype(int))
    for i in range(keep.shape[1]):
      k = keep[rows, i]
      if k.any() and (~k).any():
        out[r, i] = values[rows, i][k].mean() - values[rows, i][~k].mean()
  return out


def test_bootstrap_equals_naive_resampling():
  rng = np.random.default_rng(0)
  keep = rng.random((12, 9)) < 0.5
  values = (rng.random((12, 9)) < 0.6).astype(np.float32)
  counts = np.asarray(bootstrap_counts(jax.random.PRNGKey(3), 25, 12))
  assert counts.shape == (25, 12) and np.all(counts.sum(1) == 12)
  np.testing.assert_allclose(bootstrap_differences(keep, values, counts, block_size=4),
                             naive_bootstrap(keep, values, counts), atol=1e-6, equal_nan=True)


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
  rng = np.random.default_rng(1)
  keep = rng.random((60, 30)) < 0.7
  correct = rng.random((60, 30)) < np.where(keep, 0.9, 0.5)
  a = bootstrap_interval(keep, correct, key=jax.random.PRNGKey(0), num_resamples=300)
  b = bootstrap_interval(keep, correct, key=jax.random.PRNGKey(0), num_resamples=300)
  c = bootstrap_interval(keep, correct, key=jax.random.PRNGKey(1), num_resamples=300)
  np.testing.assert_array_equal(a.low, b.low)
  assert not np.array_equal(a.low, c.low)
  mem = memorization(keep, correct).estimate
  assert np.all(a.low <= mem + 1e-6) and np.all(mem <= a.high + 1e-6)
  # the percentile interval is about ±1.96 bootstrap SDs, close to the Welch SE of the difference
  welch = jaxmem.counterfactual_memorization(keep, correct.astype(np.float32)).se
  assert np.median((a.high - a.low) / (2 * 1.96 * welch)) == pytest.approx(1.0, abs=0.15)


def test_split_half_reliability_matches_manual_halves():
  rng = np.random.default_rng(2)
  p = rng.random(40)
  keep = rng.random((50, 40)) < 0.5
  correct = rng.random((50, 40)) < np.where(keep, 0.95, p)
  half = split_half_reliability(keep, correct, seed=7, num_splits=3)
  rhos = []
  for s in range(3):
    order = np.random.default_rng([7, 0x5B117, s]).permutation(50)
    a, b = np.sort(order[:25]), np.sort(order[25:])
    rhos.append(spearmanr(memorization(keep[a], correct[a]).estimate, memorization(keep[b], correct[b]).estimate).statistic)
  np.testing.assert_allclose(half.per_split, rhos, rtol=1e-9)
  assert half.spearman == pytest.approx(np.mean(rhos))
  assert half.spearman_brown == pytest.approx(2 * half.spearman / (1 + half.spearman))
  assert half.spearman > 0.5  # memorization differs a lot between examples here


def test_models_needed_scales_with_inverse_square():
  assert models_needed(0.04, 100, 0.02) == 400
  assert models_needed(0.01, 256, 0.02) == 64
  assert models_needed(float("nan"), 100, 0.02) is None


def test_target_se_rule():
  rng = np.random.default_rng(3)
  rule = TargetSE(0.2)
  keep = rng.random((40, 30)) < 0.5
  correct = rng.random((40, 30)) < 0.5
  assert not rule.add(keep[:4], correct[:4])
  reached = [rule.add(keep[i: i + 4], correct[i: i + 4]) for i in range(4, 40, 4)]
  assert reached[-1] and rule.median_se < 0.2
  assert rule.median_se == pytest.approx(np.nanmedian(memorization(keep, correct).se))


def test_bad_options_are_one_line_errors():
  with pytest.raises(JaxmemError, match="resamples"):
    bootstrap_interval(np.ones((3, 2), bool), np.ones((3, 2)), key=jax.random.PRNGKey(0), num_resamples=1)
  with pytest.raises(JaxmemError, match="target_se"):
    jaxmem.RunConfig(target_se=0.0).validate()


def test_run_summary_shows_reliability_and_models_needed(tiny_run):
  text = jaxmem.format_summary(tiny_run.summary)
  assert "split-half Spearman" in text and "models needed for median memorization SE <= 0.02" in text
  scores = tiny_run.summary["scores"]["uncertainty"]
  se = np.nanmedian(tiny_run.scores.columns["memorization_se"])
  assert scores["models_needed"]["targets"]["0.01"] == models_needed(se, 8, 0.01)
  assert {"memorization_ci_low", "memorization_ci_high"} <= set(tiny_run.scores.columns)
  # one subset ratio: the C-score (that ratio's held-out accuracy) is not a default estimator
  assert "cscore" not in tiny_run.scores.columns


def test_target_se_rule_keeps_counts_and_equals_the_median_se_of_all_rows():
  """The stopping rule adds each chunk's counts instead of keeping its records; after every chunk
  its median SE is exactly the one computed on all the rows so far."""
  rng = np.random.default_rng(3)
  keep = rng.random((23, 70)) < 0.6
  correct = rng.random((23, 70)) < np.where(keep, 0.8, 0.5)
  rule = TargetSE(0.01)
  assert not rule.reached() and np.isnan(rule.median_se)
  for stop in (5, 23):
    start = rule.num_models
    rule.add(keep[start:stop], correct[start:stop])
    assert rule.num_models == stop
    expected = median_memorization_se(keep[:stop], correct[:stop])
    assert rule.median_se == expected or (np.isnan(expected) and np.isnan(rule.median_se)), stop
  assert np.isfinite(rule.median_se) and not rule.reached()
  assert TargetSE(rule.median_se + 1e-9).add(keep, correct)


def test_run_stops_at_target_se(tmp_path, tiny_config):
  """--target-se: the 8-model tiny run stops after its first 4-model chunk (median SE ~0.3)."""
  logs = []
  result = jaxmem.run(tiny_config.replace(target_se=0.45), tmp_path / "run", progress=False, log=logs.append)
  assert result.records.num_models == 4 and len(result.trained_chunks) == 1
  assert any("target-se 0.45 reached" in line for line in logs)
  assert "models needed for median memorization SE <= 0.45" in jaxmem.format_summary(result.summary)


@pytest.mark.slow
def test_target_se_is_execution_only_and_resumes(tmp_path, tiny_config):
  first = jaxmem.run(tiny_config.replace(target_se=0.45), tmp_path / "run", progress=False, log=lambda m: None)
  assert first.records.num_models == 4
  again = jaxmem.run(tiny_config, tmp_path / "run", progress=False, log=lambda m: None)
  assert again.records.num_models == 8 and again.skipped_chunks == [0]
