"""Def. 5 (neural-collapse memorization) against a naive loop and a closed-form fixture."""

import numpy as np

from jaxmem.scores.neural_collapse import neural_collapse_memorization


def test_equals_naive_loop_on_random_inputs():
  rng = np.random.default_rng(3)
  m, n, t, f, c = 4, 30, 25, 5, 3
  train = rng.normal(size=(m, n, f))
  test = rng.normal(size=(m, t, f))
  labels, test_labels = rng.integers(0, c, n), rng.integers(0, c, t)
  test_labels[:c] = np.arange(c)  # every class has test examples
  noisy = rng.random(n) < 0.3
  keep = rng.random((m, n)) < 0.6
  result = neural_collapse_memorization(train, test, labels, test_labels, noisy, c, keep)
  for model in range(m):
    total, count = 0.0, 0
    for k in range(c):
      center = test[model][test_labels == k].mean(axis=0)
      for i in range(n):
        d = np.sqrt(((train[model, i] - center) ** 2).sum())
        assert np.isclose(result.distance_MxN[model, i], d) or labels[i] != k
        if labels[i] == k and noisy[i] and keep[model, i]:
          total += d
          count += 1
    assert np.isclose(result.total_M[model], total)
    assert np.isclose(result.per_example_M[model], total / count)
  for i in range(n):
    values = [result.distance_MxN[model, i] for model in range(m) if keep[model, i]]
    if values:
      assert np.isclose(result.column_N[i], np.mean(values))
    else:
      assert np.isnan(result.column_N[i])
    if len(values) > 1:
      assert np.isclose(result.column_se_N[i], np.std(values, ddof=1) / np.sqrt(len(values)))


def test_closed_form_fixture_and_missing_class():
  # Class means of the test features: class 0 at (0, 0), class 1 at (3, 4); class 2 has no test data.
  test = np.array([[[0.0, 0.0], [3.0, 4.0]]])
  train = np.array([[[3.0, 4.0], [0.0, 0.0], [1.0, 1.0]]])
  labels = np.array([0, 1, 2])
  noisy = np.array([True, True, False])
  result = neural_collapse_memorization(train, test, labels, np.array([0, 1]), noisy, 3)
  np.testing.assert_allclose(result.distance_MxN[0, :2], [5.0, 5.0])
  assert np.isnan(result.distance_MxN[0, 2])
  assert result.total_M[0] == 10.0 and result.per_example_M[0] == 5.0
