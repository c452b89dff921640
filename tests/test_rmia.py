"""RMIA: the vectorized attack equals a naive per-example loop of the paper's formula."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from jaxmem.errors import JaxmemError
from jaxmem.records import Records
from jaxmem.scores.attack_metrics import per_example_auc
from jaxmem.scores.rmia import (
    A_GRID, BYTES_PER_VALUE, attack_with_references, leave_one_out_population, leave_one_out_rmia, per_example_risk,
    population_mean_without, rmia_attack, rmia_report, true_label_prob, tune_offline_a)


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def random_records(seed, m=14, n=19, z=11):
  rng = np.random.default_rng(seed)
  keep = rng.random((m, n)) < 0.7
  keep[:, 0] = True        # example 0: every model trained on it (no OUT reference)
  keep[:, 1] = False       # example 1: no model trained on it (no IN reference)
  margin = rng.normal(0, 2, (1, n)) + rng.normal(0, 1.5, (m, n)) + 2.5 * keep
  test_margin = rng.normal(1, 2, (m, z))
  return margin, keep, test_margin


def naive_rmia(target, refs, margin, keep, test_margin, a, gamma, variant):
  """The paper's formula, one example and one population point at a time, in probability space."""
  p, pz = sigmoid(margin), sigmoid(test_margin)
  scores = []
  for x in range(margin.shape[1]):
    p_in = [p[r, x] for r in refs if keep[r, x]]
    p_out = [p[r, x] for r in refs if not keep[r, x]]
    if p_out:
      out_mean = np.mean(p_out)
    else:   # P_IN = a P_OUT + 1 - a, inverted and clipped
      out_mean = min(max((np.mean(p_in) - 1 + a) / a, 0.0), 1.0)
    if variant == "rmia_offline":
      px = 0.5 * ((1 + a) * out_mean + 1 - a)
    else:
      in_mean = np.mean(p_in) if p_in else a * np.mean(p_out) + 1 - a
      px = 0.5 * (in_mean + out_mean)
    count = 0
    for zi in range(test_margin.shape[1]):
      pz_ref = 0.5 * ((1 + a) * np.mean([pz[r, zi] for r in refs]) + 1 - a)
      lr = (p[target, x] / px) / (pz[target, zi] / pz_ref)
      count += lr >= gamma
    scores.append(count / test_margin.shape[1])
  return np.array(scores)


@pytest.mark.parametrize("variant", ["rmia_online", "rmia_offline"])
@pytest.mark.parametrize("a,gamma", [(0.3, 1.0), (1.0, 2.0), (0.7, 0.5)])
def test_leave_one_out_equals_naive_loop(variant, a, gamma):
  margin, keep, test_margin = random_records(0)
  targets = [0, 5, 13]
  fast = leave_one_out_rmia(margin, keep, test_margin, targets, a=a, gamma=gamma)[variant]
  for row, t in enumerate(targets):
    refs = [r for r in range(margin.shape[0]) if r != t]
    expected = naive_rmia(t, refs, margin, keep, test_margin, a, gamma, variant)
    np.testing.assert_allclose(fast[row], expected, atol=1e-12)
  assert fast[:, 0].min() >= 0 and np.ptp(fast) > 0.5   # not a constant


@pytest.mark.parametrize("num_refs", [1, 2, 5])
def test_explicit_references_equal_naive_loop(num_refs):
  # Few references: many examples have no IN or no OUT reference (the a-relation fills in).
  margin, keep, test_margin = random_records(1)
  refs = list(range(3, 3 + num_refs))
  for variant in ("rmia_online", "rmia_offline"):
    fast = attack_with_references(margin[0], margin[refs], keep[refs], test_margin[0], test_margin[refs],
                                  a=0.4, gamma=1.0)[variant]
    np.testing.assert_allclose(fast, naive_rmia(0, refs, margin, keep, test_margin, 0.4, 1.0, variant), atol=1e-12)


def test_tuning_picks_the_best_auc_on_the_tuning_model():
  margin, keep, test_margin = random_records(2, m=20, n=60)
  refs = list(range(2, 20))
  a, aucs = tune_offline_a(margin[1], keep[1], margin[refs], keep[refs], test_margin[1], test_margin[refs])
  expected = {g: roc_auc_score(keep[1], naive_rmia(1, refs, margin, keep, test_margin, g, 1.0, "rmia_offline"))
              for g in A_GRID}
  assert aucs == pytest.approx(expected)
  assert a == max(A_GRID, key=lambda g: (expected[g], -g))


def test_per_example_column_and_pooled_attack():
  margin, keep, test_margin = random_records(3, m=16, n=40)
  risk = per_example_risk(margin, keep, test_margin, a=0.5)
  scores = leave_one_out_rmia(margin, keep, test_margin, np.arange(16), a=0.5)
  np.testing.assert_allclose(risk["rmia_online"], per_example_auc(scores["rmia_online"], keep), equal_nan=True)
  assert np.isnan(risk["rmia_online"][0]) and np.isnan(risk["rmia_online"][1])  # no non-member / member model
  attack = rmia_attack(margin, keep, test_margin, targets=4, num_bootstrap=20, seed=1)
  assert attack.tuner not in attack.targets and attack.a in A_GRID
  assert attack.metrics["rmia_online"]["auc"]["value"] > 0.6   # members get +2.5 margin
  assert attack.eps["rmia_online"]["eps"] >= 0


def test_bad_inputs():
  margin, keep, test_margin = random_records(4)
  with pytest.raises(JaxmemError, match="a must be"):
    leave_one_out_rmia(margin, keep, test_margin, [0], a=0.0)
  with pytest.raises(JaxmemError, match="gamma"):
    leave_one_out_rmia(margin, keep, test_margin, [0], a=0.5, gamma=0)
  with pytest.raises(JaxmemError, match="population"):
    rmia_attack(margin, keep, test_margin[:3])


def test_several_subset_ratios_are_refused():
  from jaxmem.scores.rmia import check_single_ratio
  check_single_ratio(np.full(4, 0.7, np.float32), "RMIA")
  with pytest.raises(JaxmemError, match="one subset ratio; this run has 0.3, 0.7"):
    check_single_ratio(np.array([0.3, 0.7, 0.7], np.float32), "RMIA")


def test_scores_cli_writes_rmia_json(tiny_run, tmp_path):
  import shutil
  from jaxmem.scoring import score_run
  run = tmp_path / "run"
  shutil.copytree(tiny_run.run_dir, run)
  table, _ = score_run(run, ["memorization", "rmia"], {"rmia": {"num_bootstrap": 10}})
  assert {"rmia_online", "rmia_offline"} <= set(table.columns)
  summary = json.loads((run / "rmia.json").read_text())
  assert set(summary["attack"]) == {"rmia_online", "rmia_offline"}
  assert {"auc", "tpr_at_0.1%_fpr", "tpr_at_1%_fpr"} <= set(summary["attack"]["rmia_online"])
  assert summary["eps_lower_bound"]["rmia_offline"]["delta"] == 1e-5
  assert summary["targets"] and set(summary["lira_same_targets"]) == {"online", "online_fixed_variance", "offline"}
  assert (run / "rmia_roc.png").stat().st_size > 0


def test_report_by_blocks_of_examples_equals_one_block():
  """rmia_report reads the margins by blocks: the per-example columns, the targets' scores and the
  RMIA metrics are bitwise those of one block (per-example reductions over models); the LiRA
  comparison's equal up to float64 summation order of its pooled variances."""
  margin, keep, test_margin = random_records(6, m=15, n=29, z=13)
  m, n = keep.shape
  records = Records(keep=keep, model_ids=np.arange(m), subset_ratio=np.full(m, 0.7, np.float32),
                    train_labels=np.zeros(n, int), clean_train_labels=np.zeros(n, int), test_labels=np.zeros(13, int),
                    noisy=np.zeros(n, bool), arrays={"train_margin": margin.astype(np.float32),
                                                     "test_margin": test_margin.astype(np.float32)},
                    num_models_planned=m)
  whole_columns, whole, whole_attack = rmia_report(records, targets=4, num_bootstrap=20)
  for kwargs in ({"block_size": 1}, {"block_size": 7}, {"memory_budget": 4 * BYTES_PER_VALUE * m}):
    columns, summary, attack = rmia_report(records, targets=4, num_bootstrap=20, **kwargs)
    for name in whole_columns:
      np.testing.assert_array_equal(columns[name], whole_columns[name], err_msg=f"{kwargs} {name}")
    for name in whole_attack.scores:
      np.testing.assert_array_equal(attack.scores[name], whole_attack.scores[name], err_msg=f"{kwargs} {name}")
    assert (summary["attack"], summary["a"], summary["a_tuning"], summary["eps_lower_bound"]) == \
        (whole["attack"], whole["a"], whole["a_tuning"], whole["eps_lower_bound"])
    for variant, metrics in whole["lira_same_targets"].items():
      for metric, value in metrics.items():
        for key in ("value", "low", "high"):
          np.testing.assert_allclose(summary["lira_same_targets"][variant][metric][key], value[key], rtol=1e-9)
  # the population ratios by groups of 2 targets equal all at once
  np.testing.assert_array_equal(leave_one_out_population(test_margin, np.arange(m), a=0.4, block_values=26),
                                leave_one_out_population(test_margin, np.arange(m), a=0.4))
  # the tuning model's population mean by groups of 3 rows is numpy's mean over the other rows, bitwise
  for skip in (0, 5, m - 1):
    np.testing.assert_array_equal(population_mean_without(test_margin, skip, block_values=3 * 13),
                                  true_label_prob(np.delete(test_margin, skip, axis=0)).mean(0))
  # and the columns are the whole-array functions' (tuning included)
  attack = rmia_attack(margin.astype(np.float32), keep, test_margin.astype(np.float32), targets=4, num_bootstrap=20)
  assert attack.a == whole_attack.a and attack.metrics == whole_attack.metrics
  np.testing.assert_array_equal(
      per_example_risk(margin.astype(np.float32), keep, test_margin.astype(np.float32), a=attack.a)["rmia_online"],
      whole_columns["rmia_online"])
