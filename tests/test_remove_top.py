"""The remove-top long-tail study: rankings, the reduced datasets, intervals, and the CLI end to end."""

import json

import numpy as np
import pytest

from jaxmem import JaxmemError, load_dataset
from jaxmem.cli import main as cli_main
from jaxmem.scoring import read_scores_csv
from jaxmem.studies.remove_top import interval, removal_order, without


def test_removal_order_directions_nan_last_and_random_control():
  scores = {"index": np.arange(5), "label": np.zeros(5, int),
            "memorization": np.array([0.1, np.nan, 0.9, 0.5, 0.9]),
            "cscore": np.array([0.8, 0.2, np.nan, 0.5, 0.1])}
  assert removal_order(scores, "memorization", 0).tolist() == [2, 4, 3, 0, 1]  # high first, ties by index
  assert removal_order(scores, "cscore", 0).tolist() == [4, 1, 3, 0, 2]  # low C-score = atypical first
  random = removal_order(scores, "random", 3)
  assert sorted(random.tolist()) == list(range(5)) and np.array_equal(random, removal_order(scores, "random", 3))
  with pytest.raises(JaxmemError, match="unknown ranking 'label'.*cscore, memorization"):
    removal_order(scores, "label", 0)


def test_without_keeps_the_order_of_the_rest_and_the_test_set():
  ds = load_dataset("digits", label_noise=0.1)
  removed = np.array([5, 0, 100])
  smaller = without(ds, removed, "smaller")
  rest = np.setdiff1d(np.arange(ds.num_train), removed)
  assert smaller.num_train == ds.num_train - 3 and smaller.name == "smaller"
  assert np.array_equal(smaller.x_train, ds.x_train[rest]) and np.array_equal(smaller.noisy, ds.noisy[rest])
  assert np.array_equal(smaller.y_train, ds.y_train[rest]) and np.array_equal(smaller.x_test, ds.x_test)


def test_interval_is_the_student_t_interval_over_models():
  from scipy import stats
  values = np.random.default_rng(0).uniform(0.9, 1.0, 10)
  mean, se, low, high = interval(values)
  reference = stats.t.interval(0.95, 9, loc=values.mean(), scale=stats.sem(values))
  np.testing.assert_allclose([mean, se, low, high], [values.mean(), stats.sem(values), *reference], rtol=1e-12)


def test_remove_top_end_to_end_through_the_cli(tiny_run, tmp_path, capsys):
  out = tmp_path / "study"
  code = cli_main(["study", "remove-top", str(tiny_run.run_dir), "--k", "0,40", "--by", "memorization,random",
                   "--num-models", "2", "--epochs", "1", "--out", str(out), "--no-progress"])
  assert code == 0
  printed = capsys.readouterr().out
  assert "memorization     40   1307       2" in printed and "random           40   1307       2" in printed
  assert (out / "remove_top.png").stat().st_size > 10_000
  result = json.loads((out / "remove_top.json").read_text())
  points = {(p["by"], p["k"]): p for p in result["points"]}
  assert set(points) == {("memorization", 0), ("random", 0), ("memorization", 40), ("random", 40)}
  assert points["memorization", 0] == {**points["random", 0], "by": "memorization"}  # one shared baseline
  for p in result["points"]:
    assert p["num_models"] == 2 and p["ci_low"] <= p["test_accuracy"] <= p["ci_high"]
  # the removed examples are the 40 most memorized of the source run, and the retrained run saw the rest
  mem = read_scores_csv(tiny_run.run_dir / "scores.csv")["memorization"]
  removed = np.array(result["removal_order"]["memorization"])
  assert len(removed) == 40 and np.nanmin(mem[removed]) >= np.nanmax(np.delete(mem, removed))
  design = np.load(out / "runs" / "memorization-k40" / "design.npz")
  assert np.array_equal(design["train_labels"], np.delete(tiny_run.records.train_labels, removed))
  assert len(set(result["removal_order"]["random"]) & set(removed.tolist())) < 40


def test_remove_top_bad_inputs_are_one_line_errors(tiny_run, tmp_path, capsys):
  base = ["study", "remove-top", str(tiny_run.run_dir), "--out", str(tmp_path / "s")]
  assert cli_main(base + ["--by", "nonsense"]) == 2
  assert "unknown ranking 'nonsense'" in capsys.readouterr().err
  assert cli_main(base + ["--k", "0,5000"]) == 2
  assert "k=5000 removes the whole training set" in capsys.readouterr().err
