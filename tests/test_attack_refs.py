"""attack-refs study: each row's scores come from exactly K nested references, and the table's layout."""

import csv

import numpy as np
import pytest

from jaxmem.errors import JaxmemError
from jaxmem.scores.attack_metrics import attack_metrics
from jaxmem.scores.lira import lira_offline, lira_online
from jaxmem.scores.rmia import attack_with_references, tune_offline_a
from jaxmem.studies import attack_refs as study


def records(seed, m=14, n=40, z=12):
  rng = np.random.default_rng(seed)
  keep = rng.random((m, n)) < 0.7
  margin = rng.normal(0, 2, (1, n)) + rng.normal(0, 1, (m, n)) + 2 * keep
  return margin, keep, rng.normal(1, 2, (m, z))


def test_parse_refs():
  assert study.parse_refs("4,1,all,4", 10) == [1, 4, 8]
  with pytest.raises(JaxmemError, match="1 to 8"):
    study.parse_refs("9", 10)
  with pytest.raises(JaxmemError, match="counts or 'all'"):
    study.parse_refs("two", 10)


def test_rows_equal_direct_attacks_with_the_first_k_references():
  margin, keep, test_margin = records(0)
  result = study.attack_refs(margin, keep, test_margin, refs=[3, 12], targets=2, seed=4, num_bootstrap=5)
  assert [r["refs"] for r in result.rows] == [3] * 7 + [12] * 7
  assert [r["attack"] for r in result.rows[:7]] == list(study.ATTACKS)
  for block, k in enumerate([3, 12]):
    scores = {name: (result.scores[(k, name)], result.members) for name in study.ATTACKS}
    for row, t in enumerate(result.targets):
      others = np.setdiff1d(np.arange(14), [t, result.tuner])
      ref = np.random.default_rng([4, study.ORDER_TAG, int(t)]).permutation(others)[:k]
      assert t not in ref and result.tuner not in ref and len(ref) == k
      np.testing.assert_allclose(scores["lira_online"][0][row], lira_online(margin[t], margin[ref], keep[ref]))
      # lira's own fits need 2 models per group for the means too; where they have them, the same
      own = lira_offline(margin[t], margin[ref], keep[ref], fixed_variance=True)
      ours = scores["lira_offline_fixed_variance"][0][row]
      np.testing.assert_allclose(ours[~np.isnan(own)], own[~np.isnan(own)])
      assert np.isnan(ours).sum() <= np.isnan(own).sum()
      a, _ = tune_offline_a(margin[result.tuner], keep[result.tuner], margin[ref], keep[ref],
                            test_margin[result.tuner], test_margin[ref])
      direct = attack_with_references(margin[t], margin[ref], keep[ref], test_margin[t], test_margin[ref], a=a)
      np.testing.assert_allclose(scores["rmia_offline"][0][row], direct["rmia_offline"])
      np.testing.assert_allclose(scores["global_threshold"][0][row], margin[t])
    auc = attack_metrics(scores["rmia_online"][0], scores["rmia_online"][1])["auc"]
    assert result.rows[7 * block + 4]["auc"] == pytest.approx(auc)
  # with 3 references, per-example LiRA cannot score examples lacking 2 IN and 2 OUT references
  assert result.rows[0]["coverage"] < 1 and result.rows[4]["coverage"] == 1


def test_fixed_variance_means_need_one_reference_per_group():
  margin, keep, _ = records(1)
  ref = np.arange(1, 4)
  scores = study._lira_reference_scores(margin[0], margin[ref], keep[ref])
  both = (keep[ref].sum(0) >= 1) & ((~keep[ref]).sum(0) >= 1)
  assert np.array_equal(~np.isnan(scores["lira_online_fixed_variance"]), both)


def test_study_writes_table_and_plot_and_the_report_shows_them(tiny_run, tmp_path):
  import shutil
  from jaxmem.report import write_report
  from jaxmem.scoring import score_run
  run = tmp_path / "run"
  shutil.copytree(tiny_run.run_dir, run)
  result = study.attack_refs_study(run, refs="1,2,all", targets=2, num_bootstrap=5)
  with open(result.table) as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0])[:8] == ["refs", "attack", "auc", "auc_low", "auc_high", "tpr_at_0.1pct_fpr",
                               "tpr_at_1pct_fpr", "eps_lower_bound"]
  assert len(rows) == 3 * len(study.ATTACKS) and rows[-1]["refs"] == "6"
  assert result.plot.stat().st_size > 0 and (run / "attack_refs" / "attack_refs.json").is_file()
  score_run(run, ["memorization", "rmia", "lds"], {"rmia": {"num_bootstrap": 5}, "lds": {"num_bootstrap": 20}})
  report = write_report(run, log=lambda m: None)
  assert {"rmia", "attack_refs", "lds"} <= set(report.sections)
  page = report.path.read_text()
  assert "rmia_online" in page and "influence_margin" in page and "attack_refs.png" in page
