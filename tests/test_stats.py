"""The stratified in/out kernel: against naive per-group loops, safe variance, exact block merges."""

import numpy as np
import pytest

from jaxmem.scores._stats import in_out_stats, masked_mean, moments, ratio_strata


def naive_group(keep, values, weights, g, i, inside):
  rows = [m for m in range(keep.shape[0]) if weights[m, g] and keep[m, i] == inside]
  x = values[rows, i].astype(np.float64)
  return len(rows), (x.mean() if rows else np.nan), (x.var(ddof=1) if len(rows) > 1 else np.nan)


@pytest.mark.parametrize("queries", [None, 3])
def test_kernel_equals_naive_loop_per_ratio(queries):
  rng = np.random.default_rng(0)
  ratio = np.tile(np.float32([0.2, 0.5, 0.7]), 9)
  keep = rng.random((27, 11)) < ratio[:, None]
  shape = (27, 11) if queries is None else (27, 11, queries)
  values = rng.normal(size=shape).astype(np.float32)
  ratios, onehot = ratio_strata(ratio)
  assert ratios == (0.2, 0.5, 0.7)
  stats = in_out_stats(keep, values, onehot)
  for side, inside in ((stats.inside, True), (stats.outside, False)):
    got = moments(side)
    for g in range(3):
      for i in range(11):
        for a in range(1 if queries is None else queries):
          v = values if queries is None else values[..., a]
          n, mean, var = naive_group(keep, v, onehot, g, i, inside)
          assert got.n[g, i] == n
          index = (g, i) if queries is None else (g, i, a)
          np.testing.assert_allclose(got.mean[index], mean, rtol=1e-5, atol=1e-6, equal_nan=True)
          np.testing.assert_allclose(got.var[index], var, rtol=1e-4, atol=1e-6, equal_nan=True)


def test_variance_is_safe_for_a_large_mean_in_float32():
  # values 1e4 + noise of SD 0.01: Σx² − n·mean² in float32 loses every digit of the variance
  rng = np.random.default_rng(1)
  values = (1e4 + 0.01 * rng.normal(size=(200, 5))).astype(np.float32)
  keep = np.ones((200, 5), bool)
  got = moments(in_out_stats(keep, values).inside).var[0]
  want = values.astype(np.float64).var(axis=0, ddof=1)
  np.testing.assert_allclose(got, want, rtol=1e-3)
  naive = ((values**2).sum(0, dtype=np.float32) - 200 * values.mean(0, dtype=np.float32) ** 2) / 199
  assert np.max(np.abs(naive / want - 1)) > 0.5  # the formula the kernel avoids


def test_blocks_of_models_merge_to_the_one_pass_result():
  rng = np.random.default_rng(2)
  ratio = np.tile(np.float32([0.3, 0.6]), 25)
  keep = rng.random((50, 13)) < ratio[:, None]
  values = rng.normal(3.0, 2.0, size=(50, 13)).astype(np.float32)
  _, onehot = ratio_strata(ratio)
  whole = in_out_stats(keep, values, onehot)
  for block in (1, 7, 16):
    merged = in_out_stats(keep, values, onehot, model_block=block)
    for a, b in zip(whole, merged):
      np.testing.assert_array_equal(a.n, b.n)
      np.testing.assert_allclose(a.mean, b.mean, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(a.m2, b.m2, rtol=1e-4, atol=1e-5)


def test_masked_mean_matches_numpy():
  rng = np.random.default_rng(3)
  mask = rng.random((9, 6)) < 0.5
  mask[:, 0] = False
  mask[:, 1] = [True] + [False] * 8
  values = rng.normal(size=(9, 6))
  result = masked_mean(values, mask)
  assert np.isnan(result.mean[0]) and np.isnan(result.se[1]) and result.n[1] == 1
  for i in range(2, 6):
    x = values[mask[:, i], i]
    assert result.mean[i] == pytest.approx(x.mean(), rel=1e-5)
    assert result.se[i] == pytest.approx(x.std(ddof=1) / np.sqrt(len(x)), rel=1e-4)


def test_values_of_non_members_are_never_read():
  values = np.array([[np.nan, 1.0], [2.0, np.nan], [4.0, 3.0]])
  mask = np.array([[False, True], [True, False], [True, True]])
  result = masked_mean(values, mask)
  np.testing.assert_allclose(result.mean, [3.0, 2.0])
