import numpy as np
import pytest
from scipy.stats import spearmanr

import jaxmem
from jaxmem.errors import JaxmemError
from jaxmem.scores.counterfactual import counterfactual_from_margin, measure_from_margin, parse_metrics
from jaxmem.scores.cscore import cscore, learning_speed
from jaxmem.scoring import score_records
from jaxmem.records import Records


def make_records(keep, train_correct, ratio, **arrays):
  m, n = keep.shape
  return Records(keep=keep, model_ids=np.arange(m), subset_ratio=np.asarray(ratio, np.float32),
                 train_labels=np.zeros(n, int), clean_train_labels=np.zeros(n, int), test_labels=np.zeros(3, int),
                 noisy=np.zeros(n, bool), arrays={"train_correct": train_correct, **arrays}, num_models_planned=m)


def naive_cscore(keep, correct, ratio):
  """Reference: per example, per ratio, a loop over held-out models; then the mean over ratios."""
  ratios = sorted(set(np.round(ratio, 6).tolist()))
  per = np.full((len(ratios), keep.shape[1]), np.nan)
  se = np.full_like(per, np.nan)
  for a, r in enumerate(ratios):
    for i in range(keep.shape[1]):
      votes = [correct[m, i] for m in range(keep.shape[0]) if np.round(ratio[m], 6) == r and not keep[m, i]]
      if votes:
        per[a, i] = np.mean(votes)
        p = (np.sum(votes) + 1) / (len(votes) + 2)
        se[a, i] = np.sqrt(p * (1 - p) / (len(votes) + 2))
  return per.mean(0), np.sqrt((se**2).sum(0)) / len(ratios), per


@pytest.mark.parametrize("seed", [0, 1])
def test_cscore_equals_naive_loop(seed):
  rng = np.random.default_rng(seed)
  ratio = np.array([0.1, 0.5, 0.9] * 12, np.float32)
  keep = rng.random((36, 25)) < ratio[:, None]
  correct = rng.random((36, 25)) < 0.6
  result = cscore(keep, correct, ratio)
  expected, expected_se, per = naive_cscore(keep, correct, ratio)
  assert result.ratios == (0.1, 0.5, 0.9)
  np.testing.assert_allclose(result.per_ratio, per, equal_nan=True)
  np.testing.assert_allclose(result.estimate, expected, equal_nan=True)
  np.testing.assert_allclose(result.se, expected_se, equal_nan=True)
  assert np.isnan(result.estimate).any()  # some example is in every 0.9 model: C undefined, not a number


def test_cscore_hand_built_fixture():
  # ratio 0.5 models 0,1; ratio 0.7 models 2,3. Example 0 is held out by models 1 and 3 and right
  # only in model 3: C(0.5) = 0, C(0.7) = 1, C = 0.5. Example 1 is held out by all, always right: 1.
  keep = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], bool)
  correct = np.array([[1, 1], [0, 1], [1, 1], [1, 1]], bool)
  result = cscore(keep, correct, [0.5, 0.5, 0.7, 0.7])
  np.testing.assert_array_equal(result.per_ratio, [[0.0, 1.0], [1.0, 1.0]])
  np.testing.assert_array_equal(result.estimate, [0.5, 1.0])
  assert np.all(result.se > 0)


def test_estimator_columns_per_ratio():
  rng = np.random.default_rng(2)
  ratio = np.array([0.3, 0.7] * 10, np.float32)
  keep = rng.random((20, 12)) < ratio[:, None]
  correct = rng.random((20, 12)) < 0.7
  table = score_records(make_records(keep, correct, ratio), ["cscore"])
  assert {"cscore", "cscore_se", "cscore_at_0.3", "cscore_at_0.7"} <= set(table.columns)
  np.testing.assert_allclose(table.columns["cscore_at_0.3"], naive_cscore(keep, correct, ratio)[2][0], equal_nan=True)


def test_learning_speed_equals_naive_loop_and_reports_spearman():
  rng = np.random.default_rng(3)
  ratio = np.full(15, 0.5, np.float32)
  keep = rng.random((15, 10)) < 0.5
  epochs = rng.random((15, 6, 10)) < np.linspace(0.1, 0.9, 10)
  speed = learning_speed(keep, epochs)
  for i in range(10):
    rows = [m for m in range(15) if keep[m, i]]
    assert speed[i] == pytest.approx(np.mean([epochs[m, :, i].mean() for m in rows]))
  correct = epochs[:, -1, :]
  table = score_records(make_records(keep, correct, ratio, train_correct_epochs=epochs), ["cscore", "learning_speed"])
  c = table.columns["cscore"]
  ok = np.isfinite(c)
  assert table.summary["learning_speed"]["spearman_with_cscore"] == pytest.approx(spearmanr(speed[ok], c[ok]).statistic)
  assert any("Spearman" in line and "C-score" in line for line in table.lines)


def test_counterfactual_metrics_from_margin():
  rng = np.random.default_rng(4)
  keep = rng.random((20, 8)) < 0.5
  margin = rng.normal(0, 3, (20, 8)).astype(np.float32)
  p = 1 / (1 + np.exp(-margin.astype(np.float64)))  # margin = log p - log(1 - p)
  np.testing.assert_allclose(measure_from_margin("logprob", margin), np.log(p), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(measure_from_margin("loss", margin), -np.log(p), rtol=1e-5, atol=1e-6)
  for metric, values in (("margin", margin), ("logprob", np.log(p)), ("loss", -np.log(p))):
    result = counterfactual_from_margin(keep, margin, metric)
    expected = [values[keep[:, i], i].mean() - values[~keep[:, i], i].mean() for i in range(8)]
    np.testing.assert_allclose(result.estimate, expected, rtol=1e-4, atol=1e-5)
  assert parse_metrics("accuracy,loss,margin") == ("loss", "margin")
  with pytest.raises(JaxmemError, match="choose one of"):
    parse_metrics("entropy")
  table = score_records(make_records(keep, margin > 0, np.full(20, 0.5), train_margin=margin),
                        ["memorization", "counterfactual"], {"counterfactual": {"metrics": ("loss",)}})
  assert {"memorization_loss", "memorization_loss_se"} <= set(table.columns)
  assert "memorization_margin" not in table.columns


def test_synthetic_singletons_memorized_and_atypical():
  """Rare-subpopulation singletons: high memorization and low C-score; frequent groups: the reverse."""
  config = jaxmem.RunConfig(dataset="synthetic", num_models=16, subset_ratios=(0.3, 0.7), epochs=15, batch_size=32,
                            chunk_size=8, model_options={"hidden_sizes": (64,)}, strategy="vmap")
  dataset = jaxmem.load_dataset("synthetic", seed=0)
  import tempfile
  with tempfile.TemporaryDirectory() as out:
    result = jaxmem.run(config, out, progress=False, log=lambda m: None, dataset=dataset)
  columns = result.scores.columns
  single, head = dataset.group_size == 1, dataset.group_size >= 20
  assert single.sum() >= 50 and head.sum() >= 200
  mem_single, mem_head = np.nanmean(columns["memorization"][single]), np.nanmean(columns["memorization"][head])
  c_single, c_head = np.nanmean(columns["cscore"][single]), np.nanmean(columns["cscore"][head])
  assert mem_single > mem_head + 0.2, (mem_single, mem_head)
  assert c_head > c_single + 0.5, (c_single, c_head)
  for r in ("0.3", "0.7"):
    assert np.nanmean(columns[f"cscore_at_{r}"][head]) > np.nanmean(columns[f"cscore_at_{r}"][single]) + 0.5
