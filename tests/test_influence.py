import csv
import time

import numpy as np
import pytest

from jaxmem.scores.influence import InfluenceComputation, influence, influence_topk
from jaxmem.scoring import score_records, write_outputs
from jaxmem.records import Records


def make_records(keep, train_correct, test_correct, ratio=None, **arrays):
  m, n = keep.shape
  t = test_correct.shape[1]
  return Records(keep=keep, model_ids=np.arange(m), subset_ratio=np.full(m, 0.7, np.float32) if ratio is None else ratio,
                 train_labels=np.arange(n) % 3, clean_train_labels=np.arange(n) % 3, test_labels=np.arange(t) % 3,
                 noisy=np.zeros(n, bool), arrays={"train_correct": train_correct, "test_correct": test_correct, **arrays},
                 num_models_planned=m)


def naive_influence(keep, test_correct):
  """Reference: eq. 6 as a loop over (train, test) pairs, with Agresti-Caffo SE."""
  m, n = keep.shape
  t = test_correct.shape[1]
  infl, se = np.full((n, t), np.nan), np.full((n, t), np.nan)
  for i in range(n):
    inside, outside = keep[:, i], ~keep[:, i]
    if not inside.any() or not outside.any():
      continue
    for j in range(t):
      a, b = test_correct[inside, j], test_correct[outside, j]
      infl[i, j] = a.mean() - b.mean()
      p1, p2 = (a.sum() + 1) / (len(a) + 2), (b.sum() + 1) / (len(b) + 2)
      se[i, j] = np.sqrt(p1 * (1 - p1) / (len(a) + 2) + p2 * (1 - p2) / (len(b) + 2))
  return infl, se


@pytest.mark.parametrize("seed", [0, 1])
def test_influence_equals_naive_loop(seed):
  rng = np.random.default_rng(seed)
  keep = rng.random((23, 17)) < 0.6
  keep[:, 3] = True  # no out-model: NaN, not a number from nothing
  test_correct = rng.random((23, 11)) < 0.7
  infl, se = influence(keep, test_correct, block_size=5)
  ref, ref_se = naive_influence(keep, test_correct)
  np.testing.assert_allclose(infl, ref, atol=1e-6, equal_nan=True)
  np.testing.assert_allclose(se, ref_se, rtol=1e-5, equal_nan=True)
  assert np.isnan(infl[3]).all()


def test_hand_built_influence_is_exact():
  # train example 0 is in models 0,1; test example 0 is right only in those models: influence 1.
  # test example 1 is always right: 0; test example 2 right in model 0 and model 2: 0.5 - 0.5 = 0.
  keep = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], bool)
  test_correct = np.array([[1, 1, 1], [1, 1, 0], [0, 1, 1], [0, 1, 0]], bool)
  infl, se = influence(keep, test_correct)
  np.testing.assert_array_equal(infl[0], [1.0, 0.0, 0.0])
  assert np.all(se > 0)


def dense_topk(infl, k, axis):
  """Reference top-k with ties broken by the lower index (a stable sort of −value)."""
  values = np.where(np.isnan(infl), -np.inf, infl)
  if axis == 0:
    values = values.T
  order = np.argsort(-values, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(values, order, axis=1)


@pytest.mark.parametrize("block_size,k", [(7, 4), (64, 3), (1, 5)])
def test_blocked_topk_equals_dense(block_size, k):
  rng = np.random.default_rng(3)
  keep = rng.random((40, 29)) < 0.5
  test_correct = rng.random((40, 13)) < 0.6
  infl, se = influence(keep, test_correct, block_size=1000)
  topk = influence_topk(keep, test_correct, k, block_size=block_size)
  order, values = dense_topk(infl, k, axis=0)      # per test example, over train examples
  np.testing.assert_array_equal(topk.train_for_test_TxK, order)
  np.testing.assert_allclose(topk.influence_for_test_TxK, values, atol=1e-7)
  np.testing.assert_allclose(topk.se_for_test_TxK, np.take_along_axis(se.T, order, axis=1), rtol=1e-6)
  order, values = dense_topk(infl, k, axis=1)      # per train example, over test examples
  np.testing.assert_array_equal(topk.test_for_train_NxK, order)
  np.testing.assert_allclose(topk.influence_for_train_NxK, values, atol=1e-7)


def test_high_influence_pairs_follow_both_thresholds():
  rng = np.random.default_rng(4)
  keep = rng.random((30, 20)) < 0.5
  test_correct = rng.random((30, 9)) < 0.5
  mem = rng.random(20)
  infl, _ = influence(keep, test_correct)
  comp = InfluenceComputation(keep, test_correct, block_size=6)
  _, (train_i, test_j, value, _) = comp.top_k(2, memorization_N=mem, pair_influence=0.2, pair_memorization=0.4)
  expected = {(i, j) for i, j in zip(*np.nonzero(np.nan_to_num(infl, nan=-1) >= 0.2)) if mem[i] >= 0.4}
  assert set(zip(train_i.tolist(), test_j.tolist())) == expected and expected
  np.testing.assert_allclose(value, infl[train_i, test_j])
  assert np.all(np.diff(value) <= 0)


def test_thousand_models_full_digits_shape_topk_only():
  """1,000 models x the digits train (1347) x test (450) with top-k only, in blocks of 128."""
  rng = np.random.default_rng(0)
  keep = rng.random((1000, 1347)) < 0.7
  test_correct = rng.random((1000, 450)) < 0.9
  start = time.perf_counter()
  topk = influence_topk(keep, test_correct, 10, block_size=128)
  assert time.perf_counter() - start < 60
  assert topk.train_for_test_TxK.shape == (450, 10) and topk.test_for_train_NxK.shape == (1347, 10)
  # spot check against the definition for a few test examples
  for j in (0, 77, 449):
    i = topk.train_for_test_TxK[j, 0]
    value = test_correct[keep[:, i], j].mean() - test_correct[~keep[:, i], j].mean()
    assert topk.influence_for_test_TxK[j, 0] == pytest.approx(value, abs=1e-6)
    column = [test_correct[keep[:, r], j].mean() - test_correct[~keep[:, r], j].mean() for r in range(1347)]
    assert topk.influence_for_test_TxK[j, 0] == pytest.approx(max(column), abs=1e-6)


def test_estimator_writes_topk_pairs_and_full_matrix(tmp_path):
  rng = np.random.default_rng(5)
  keep = rng.random((24, 15)) < 0.5
  train_correct = rng.random((24, 15)) < 0.8
  test_correct = rng.random((24, 6)) < 0.6
  records = make_records(keep, train_correct, test_correct)
  table = score_records(records, ["memorization", "influence"],
                        {"influence": {"topk": 3, "full": True, "block_size": 4, "pair_influence": 0.1,
                                       "pair_memorization": -1.0}})
  write_outputs(tmp_path, table)
  infl, se = influence(keep, test_correct)
  np.testing.assert_allclose(np.load(tmp_path / "influence.npy"), infl, atol=1e-7)
  with open(tmp_path / "influence_topk.csv") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0])[:5] == ["test_index", "train_index", "influence", "influence_se", "memorization"]
  assert len(rows) == 6 * 3 + 15 * 3
  mem = table.columns["memorization"]
  for row in rows[:5] + rows[-5:]:
    i, j = int(row["train_index"]), int(row["test_index"])
    assert float(row["influence"]) == pytest.approx(infl[i, j], abs=1e-5)
    assert float(row["influence_se"]) == pytest.approx(se[i, j], rel=1e-4)
    assert float(row["memorization"]) == pytest.approx(mem[i], abs=1e-5)
  with open(tmp_path / "influence_pairs.csv") as f:
    pairs = list(csv.DictReader(f))
  assert len(pairs) == int((np.nan_to_num(infl, nan=-1) >= 0.1).sum())
  assert table.summary["influence"]["high_influence_pairs"] == len(pairs)
