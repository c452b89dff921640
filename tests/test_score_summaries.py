"""Summary lines and intervals that must not mislead: degenerate bootstrap intervals, a single-ratio
C-score by default, float noise ranked as influence, split-half with too few models, noisy pairs."""

import importlib
from fractions import Fraction

import jax
import numpy as np

from jaxmem.scores import memorization
from jaxmem.scores.influence import influence
from jaxmem.scores.uncertainty import bootstrap_interval
from jaxmem.run import subset_accuracies
from jaxmem.scoring import score_records, select_estimators
from test_multi_ratio import make_records


def test_bootstrap_interval_is_never_narrower_than_half_its_se_interval():
  # example 0: 31 in-models all right, 1 out-model wrong: memorization 1 with an SE of ~0.27, and
  # every resample that has the out-model gives exactly 1, so the percentile interval alone is [1, 1]
  rng = np.random.default_rng(0)
  keep = rng.random((32, 200)) < 0.7
  correct = rng.random((32, 200)) < np.where(keep, 0.97, 0.9)
  keep[:, 0] = correct[:, 0] = True
  keep[7, 0] = correct[7, 0] = False
  ci = bootstrap_interval(keep, correct, key=jax.random.PRNGKey(0), num_resamples=200)
  mem = memorization(keep, correct)
  # the SE-based interval, clipped to the range of a difference of proportions
  se_width = np.minimum(mem.estimate + 1.96 * mem.se, 1) - np.maximum(mem.estimate - 1.96 * mem.se, -1)
  assert ci.high[0] - ci.low[0] >= 0.5 * se_width[0] - 1e-9 and ci.low[0] < 0.5
  ok = np.isfinite(mem.se)
  assert np.all(ci.high[ok] - ci.low[ok] >= 0.5 * se_width[ok] - 1e-9)
  assert np.all((ci.low[ok] <= mem.estimate[ok] + 1e-9) & (mem.estimate[ok] <= ci.high[ok] + 1e-9))


def test_cscore_is_a_default_estimator_only_with_several_ratios():
  keep = np.ones((6, 4), bool)
  arrays = {"train_correct": keep}
  single = [e.name for e in select_estimators(None, make_records(keep, np.full(6, 0.7), arrays))]
  several = [e.name for e in select_estimators(None, make_records(keep, np.tile([0.3, 0.7], 3), arrays))]
  assert "cscore" not in single and "memorization" in single
  assert "cscore" in several


def test_influence_is_exactly_zero_where_the_in_and_out_proportions_agree():
  rng = np.random.default_rng(1)
  keep = rng.random((122, 300)) < 0.5
  test_correct = rng.random((122, 40)) < 0.9
  infl, _ = influence(keep, test_correct, block_size=64)
  equal = 0
  for i in range(300):
    inside, outside = keep[:, i], ~keep[:, i]
    for j in range(40):
      if Fraction(int(test_correct[inside, j].sum()), int(inside.sum())) == \
         Fraction(int(test_correct[outside, j].sum()), int(outside.sum())):
        equal += 1
        assert infl[i, j] == 0.0, (i, j, infl[i, j])
  assert equal > 50  # the fixture has such pairs (e.g. 61/61 vs 61/61)


def test_split_half_with_too_few_models_says_so():
  keep = np.array([[True, False, True], [False, True, False]])
  table = score_records(make_records(keep, np.full(2, 0.5), {"train_correct": keep.copy()}), ["uncertainty"],
                        {"uncertainty": {"resamples": 10}})
  line = next(line for line in table.lines if line.startswith("memorization reliability"))
  assert "needs at least 4 models" in line and "nan" not in line


def test_high_influence_pairs_come_with_a_caution_when_they_are_within_noise():
  rng = np.random.default_rng(2)
  keep = rng.random((8, 60)) < 0.5
  train_correct = rng.random((8, 60)) < 0.8
  test_correct = rng.random((8, 30)) < 0.6
  records = make_records(keep, np.full(8, 0.5), {"train_correct": train_correct, "test_correct": test_correct})
  table = score_records(records, ["memorization", "influence"], {"influence": {"pair_memorization": -1.0}})
  assert table.summary["influence"]["high_influence_pairs"] > 0
  assert any("caution" in line and "8 models" in line for line in table.lines)


def test_subset_accuracies_read_blocks_and_equal_the_whole_array_formula(monkeypatch):
  """The run summary's accuracies come from per-model counts summed over blocks of examples (no
  whole (M, N) record): exactly the whole-array formula, for any block size."""
  rng = np.random.default_rng(2)
  keep = rng.random((9, 31)) < 0.6
  correct = rng.random((9, 31)) < np.where(keep, 0.9, 0.6)
  test_correct = rng.random((9, 5)) < 0.7
  records = make_records(keep, np.full(9, 0.6), {"train_correct": correct, "test_correct": test_correct})
  own = ((correct & keep).sum(1) / keep.sum(1)).mean()
  held_out = ((correct & ~keep).sum(1) / (~keep).sum(1)).mean()
  expected = {"train_subset": float(own), "train_held_out": float(held_out), "test": float(test_correct.mean())}
  assert subset_accuracies(records) == expected
  blocks = []
  run_module = importlib.import_module("jaxmem.run")  # jaxmem.run: the function
  monkeypatch.setattr(run_module, "block_size_for_budget", lambda records, names: blocks.append(4) or 4)
  assert subset_accuracies(records) == expected and blocks == [4]
