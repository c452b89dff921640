import numpy as np
import pytest

from jaxmem.scores import auroc, counterfactual_memorization, memorization


def naive_memorization(keep, correct):
  """Reference: Feldman & Zhang's estimator as a per-example Python loop."""
  m, n = keep.shape
  out = np.full(n, np.nan)
  for i in range(n):
    inside = [correct[j, i] for j in range(m) if keep[j, i]]
    outside = [correct[j, i] for j in range(m) if not keep[j, i]]
    if inside and outside:
      out[i] = np.mean(inside) - np.mean(outside)
  return out


def naive_welch_se(keep, values):
  out = np.full(keep.shape[1], np.nan)
  for i in range(keep.shape[1]):
    a, b = values[keep[:, i], i], values[~keep[:, i], i]
    if len(a) > 1 and len(b) > 1:
      out[i] = np.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_memorization_equals_naive_loop(seed):
  rng = np.random.default_rng(seed)
  keep = rng.random((37, 53)) < 0.6
  correct = rng.random((37, 53)) < 0.7
  result = memorization(keep, correct)
  np.testing.assert_allclose(result.estimate, naive_memorization(keep, correct), atol=1e-6, equal_nan=True)
  np.testing.assert_array_equal(result.n_in, keep.sum(0))
  np.testing.assert_array_equal(result.n_out, (~keep).sum(0))


def test_memorization_se_is_agresti_caffo():
  rng = np.random.default_rng(5)
  keep = rng.random((30, 20)) < 0.5
  correct = rng.random((30, 20)) < 0.5
  se = memorization(keep, correct).se
  for i in range(20):
    k_in, n_in = correct[keep[:, i], i].sum(), keep[:, i].sum()
    k_out, n_out = correct[~keep[:, i], i].sum(), (~keep[:, i]).sum()
    p1, p2 = (k_in + 1) / (n_in + 2), (k_out + 1) / (n_out + 2)
    assert se[i] == pytest.approx(np.sqrt(p1 * (1 - p1) / (n_in + 2) + p2 * (1 - p2) / (n_out + 2)), rel=1e-9)


def test_hand_built_fixtures_are_exact():
  # Models 0 and 1 train on every example, models 2 and 3 on none. Columns: example 0 is correct
  # only when included (mem 1); 1 always correct (0); 2 always wrong (0); 3 correct when in and in
  # one of the two out models (0.5); 4 correct in one in- and one out-model (0).
  keep = np.array([[1] * 5, [1] * 5, [0] * 5, [0] * 5], bool)
  correct = np.array([
      [1, 1, 0, 1, 1],
      [1, 1, 0, 1, 0],
      [0, 1, 0, 1, 1],
      [0, 1, 0, 0, 0]], bool)
  result = memorization(keep, correct)
  np.testing.assert_array_equal(result.estimate, [1.0, 0.0, 0.0, 0.5, 0.0])
  assert np.all(result.se > 0)  # never claims certainty from a handful of models


def test_no_out_model_gives_nan_not_zero():
  keep = np.ones((3, 2), bool)
  keep[0, 1] = False
  result = memorization(keep, np.ones((3, 2), bool))
  assert np.isnan(result.estimate[0]) and np.isnan(result.se[0])
  assert result.estimate[1] == 0.0


def test_counterfactual_matches_welch_on_continuous_values():
  rng = np.random.default_rng(9)
  keep = rng.random((25, 15)) < 0.5
  values = rng.normal(size=(25, 15)).astype(np.float32)
  result = counterfactual_memorization(keep, values)
  expected = [values[keep[:, i], i].mean() - values[~keep[:, i], i].mean() for i in range(15)]
  np.testing.assert_allclose(result.estimate, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result.se, naive_welch_se(keep, values), rtol=1e-4)


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match="same shape"):
    memorization(np.ones((2, 3), bool), np.ones((3, 2), bool))


def test_auroc_matches_pairwise_definition():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 5, 60).astype(float)  # many ties
  positive = rng.random(60) < 0.3
  pairs = [(1.0 if s > t else 0.5 if s == t else 0.0) for s in scores[positive] for t in scores[~positive]]
  assert auroc(scores, positive) == pytest.approx(np.mean(pairs))
  assert auroc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
  assert np.isnan(auroc(np.array([1.0, 2.0]), np.array([True, True])))
