import jax
import numpy as np
import pytest
from scipy.special import ndtri
from scipy.stats import binom, spearmanr

import jaxmem
from jaxmem.errors import JaxmemError
from jaxmem.scores import memorization
from jaxmem.scores.uncertainty import (TargetSE, bootstrap_counts, bootstrap_differences, bootstrap_interval,
                                       median_memorization_se, models_needed, newcombe_interval, split_half_reliability,
                                       wilson_interval)
from test_multi_ratio import make_records


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


def _columns(counts):
  """keep/correct matrices (one example per column) with the given (x_in, n_in, x_out, n_out); all
  columns need the same n_in + n_out (every model is in or out for every example)."""
  m = max(n_in + n_out for _, n_in, _, n_out in counts)
  keep = np.zeros((m, len(counts)), bool)
  correct = np.zeros((m, len(counts)), bool)
  for i, (x_in, n_in, x_out, n_out) in enumerate(counts):
    keep[:n_in, i] = True
    correct[:x_in, i] = True
    correct[n_in: n_in + x_out, i] = True
  return keep, correct


def test_newcombe_interval_matches_the_papers_worked_examples():
  # Newcombe (1998) Table II, method 10 (hybrid score, no continuity correction), 95%
  cases = {(56, 70, 48, 80): (0.0524, 0.3339), (9, 10, 3, 10): (0.1705, 0.8090), (5, 56, 0, 29): (-0.0381, 0.1926),
           (0, 10, 0, 20): (-0.1611, 0.2775), (0, 10, 0, 10): (-0.2775, 0.2775), (10, 10, 0, 20): (0.6791, 1.0),
           (10, 10, 0, 10): (0.6075, 1.0)}
  for (x_in, n_in, x_out, n_out), (low, high) in cases.items():  # one run of n_in + n_out models each
    k, c = _columns([(x_in, n_in, x_out, n_out)])
    ci = newcombe_interval(k, c)
    assert ci.low[0] == pytest.approx(low, abs=5e-5) and ci.high[0] == pytest.approx(high, abs=5e-5), (x_in, n_in, x_out, n_out)


def naive_score_interval(keep, correct, ratio, z):
  """Reference: per example and ratio, Wilson limits by the textbook formula in plain Python, then
  MOVER for the equal-weight mean of within-ratio differences (Newcombe's interval for one ratio)."""
  def wilson(x, n):
    centre = (x + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * (x * (n - x) / n + z * z / 4) ** 0.5
    return max(centre - half, 0.0), min(centre + half, 1.0)
  ratios = sorted(set(ratio.tolist()))
  low, high = np.full(keep.shape[1], np.nan), np.full(keep.shape[1], np.nan)
  for i in range(keep.shape[1]):
    d, below, above, ok = 0.0, 0.0, 0.0, True
    for r in ratios:
      rows = ratio == r
      k, c = keep[rows, i], correct[rows, i]
      n_in, n_out = int(k.sum()), int((~k).sum())
      if n_in == 0 or n_out == 0:
        ok = False
        break
      x_in, x_out = int(c[k].sum()), int(c[~k].sum())
      p_in, p_out = x_in / n_in, x_out / n_out
      (l_in, u_in), (l_out, u_out) = wilson(x_in, n_in), wilson(x_out, n_out)
      d += p_in - p_out
      below += (p_in - l_in) ** 2 + (u_out - p_out) ** 2
      above += (u_in - p_in) ** 2 + (p_out - l_out) ** 2
    if ok:
      low[i], high[i] = (d - below ** 0.5) / len(ratios), (d + above ** 0.5) / len(ratios)
  return low, high


@pytest.mark.parametrize("ratios", [(0.5,), (0.3, 0.7)])
def test_score_interval_equals_a_naive_loop_on_random_counts(ratios):
  rng = np.random.default_rng(4)
  m, n = 30, 60
  ratio = np.array([ratios[i % len(ratios)] for i in range(m)])
  keep = rng.random((m, n)) < ratio[:, None]
  p = rng.random(n)
  correct = rng.random((m, n)) < np.where(keep, np.maximum(p, 0.9), p)
  correct[:, :5] = True  # every model agrees on some examples
  keep[:, 5] = True      # an example without out-models: undefined
  ci = newcombe_interval(keep, correct, ratio, confidence=0.9)
  low, high = naive_score_interval(keep, correct, ratio, float(ndtri(0.95)))
  np.testing.assert_allclose(ci.low, low, atol=1e-12, equal_nan=True)
  np.testing.assert_allclose(ci.high, high, atol=1e-12, equal_nan=True)
  mem = memorization(keep, correct, ratio).estimate
  assert np.isnan(ci.low[5]) and np.isnan(mem[5])
  ok = np.isfinite(mem)
  assert np.all((ci.low[ok] <= mem[ok]) & (mem[ok] <= ci.high[ok]))
  assert np.all(ci.high[ok][:5] - ci.low[ok][:5] > 0.1)  # all models agreeing is not certainty


def test_score_interval_has_nominal_exact_coverage_across_p():
  """Exact coverage (sum over all binomial outcomes, no simulation) for the in/out counts of a
  32-model run at subset ratio 0.7, averaged over true accuracies p_in, p_out in [0.05, 0.95]:
  Newcombe's method 10 is near 95% on average and never far below (0.951 mean, 0.926 minimum on
  this grid). A wrong side in either square root moves the mean off 95%."""
  n_in, n_out = 22, 10
  x_in, x_out = np.meshgrid(np.arange(n_in + 1), np.arange(n_out + 1), indexing="ij")
  keep, correct = _columns(list(zip(x_in.ravel(), np.full(x_in.size, n_in), x_out.ravel(), np.full(x_in.size, n_out))))
  ci = newcombe_interval(keep, correct)
  low, high = ci.low.reshape(x_in.shape), ci.high.reshape(x_in.shape)
  coverage = []
  for p_in in np.linspace(0.05, 0.95, 19):
    for p_out in np.linspace(0.05, 0.95, 19):
      weight = binom.pmf(x_in, n_in, p_in) * binom.pmf(x_out, n_out, p_out)
      coverage.append(np.sum(weight * ((low <= p_in - p_out) & (p_in - p_out <= high))))
  assert 0.945 < np.mean(coverage) < 0.96 and min(coverage) > 0.9


def test_score_interval_is_never_narrower_than_half_its_se_interval():
  """Every count with n_in <= 40 and n_out in 1, 4, ..., 40: the score interval is at least 0.77
  times as wide as the Agresti–Caffo interval memorization ± 1.96·se clipped to [−1, 1] (the
  reported SE); with several ratios (MOVER) at least half as wide."""
  z = float(ndtri(0.975))
  worst = np.inf
  for n_in in range(1, 41):
    for n_out in range(1, 41, 3):
      x_in, x_out = np.meshgrid(np.arange(n_in + 1.0), np.arange(n_out + 1.0), indexing="ij")
      l_in, u_in = wilson_interval(x_in, np.full_like(x_in, n_in))
      l_out, u_out = wilson_interval(x_out, np.full_like(x_out, n_out))
      p_in, p_out = x_in / n_in, x_out / n_out
      width = np.hypot(p_in - l_in, u_out - p_out) + np.hypot(u_in - p_in, p_out - l_out)
      plus_in, plus_out = (x_in + 1) / (n_in + 2), (x_out + 1) / (n_out + 2)
      se = np.sqrt(plus_in * (1 - plus_in) / (n_in + 2) + plus_out * (1 - plus_out) / (n_out + 2))
      d = p_in - p_out
      se_width = np.minimum(d + z * se, 1) - np.maximum(d - z * se, -1)
      worst = min(worst, float(np.min(width / se_width)))
  assert 0.77 < worst < 1.0
  rng = np.random.default_rng(5)
  keep = rng.random((48, 300)) < 0.5
  correct = rng.random((48, 300)) < np.where(keep, 0.95, rng.random(300))
  ratio = np.repeat([0.3, 0.5, 0.7], 16)
  ci, mem = newcombe_interval(keep, correct, ratio), memorization(keep, correct, ratio)
  se_width = np.minimum(mem.estimate + z * mem.se, 1) - np.maximum(mem.estimate - z * mem.se, -1)
  ok = np.isfinite(mem.estimate)
  assert ok.sum() > 200 and np.all(ci.high[ok] - ci.low[ok] >= 0.5 * se_width[ok])


def test_default_interval_is_the_score_interval_and_the_summary_names_it():
  from jaxmem.scoring import score_records
  rng = np.random.default_rng(6)
  keep = rng.random((12, 40)) < 0.5
  correct = rng.random((12, 40)) < 0.8
  for ratio, name in ((np.full(12, 0.5), "Newcombe score intervals (in vs out"),
                      (np.tile([0.3, 0.7], 6), "combined over subset ratios by MOVER")):
    table = score_records(make_records(keep, ratio, {"train_correct": correct}), ["uncertainty"])
    ci = newcombe_interval(keep, correct, ratio)
    np.testing.assert_array_equal(table.columns["memorization_ci_low"], ci.low)
    np.testing.assert_array_equal(table.columns["memorization_ci_high"], ci.high)
    assert any(line.startswith("memorization 95% ") and name in line for line in table.lines), table.lines
  boot = score_records(make_records(keep, np.full(12, 0.5), {"train_correct": correct}), ["uncertainty"],
                       {"uncertainty": {"resamples": 20}})
  assert any("bootstrap intervals over models (20 resamples)" in line for line in boot.lines)
