"""Score tables: one per estimator under RUN/scores/, scores.csv their join; nothing loses a column."""

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import jaxmem
from jaxmem.records import Records
from jaxmem.report import write_report
from jaxmem.scores._stats import WORKING_BYTES_PER_VALUE
from jaxmem.scores.uncertainty import BYTES_PER_RESAMPLE
from jaxmem.scoring import read_scores_csv, score_records, score_run, stale_tables, write_study_table
from conftest import jaxmem_cli
from test_multi_ratio import make_records, ratio_only_records


@pytest.fixture
def run(tiny_run, tmp_path):
  path = tmp_path / "run"
  shutil.copytree(tiny_run.run_dir, path)
  return path


def test_rescoring_one_estimator_keeps_every_other_column(run):
  first = jaxmem_cli("scores", str(run), "--estimators", "memorization,lira", "--bootstrap", "0")
  assert first.returncode == 0, first.stderr
  after_first = read_scores_csv(run / "scores.csv")
  assert {"memorization", "memorization_se", "lira_online", "lira_offline"} <= set(after_first)
  second = jaxmem_cli("scores", str(run), "--estimators", "cscore")
  assert second.returncode == 0, second.stderr
  joined = read_scores_csv(run / "scores.csv")
  assert set(after_first) | {"cscore", "cscore_se", "cscore_at_0.7"} <= set(joined)
  assert list(joined)[:4] == ["index", "label", "clean_label", "noisy"]
  for name in after_first:  # untouched columns are the same cells
    np.testing.assert_array_equal(joined[name], after_first[name], err_msg=name)
  index = json.loads((run / "scores" / "index.json").read_text())
  assert {"memorization", "lira", "cscore"} <= set(index["tables"])
  assert (run / "scores" / "lira.csv").is_file() and (run / "scores" / "cscore.csv").is_file()
  assert stale_tables(run) == {}


def test_a_study_table_survives_a_rescore_and_joins_the_correlations(run):
  n = len(read_scores_csv(run / "scores.csv")["index"])
  rng = np.random.default_rng(0)
  study = {"index": np.arange(n), "ssft": rng.random(n), "ssft_se": rng.random(n)}
  write_study_table(run, "ssft", study)
  score_run(run, ["memorization"])
  joined = read_scores_csv(run / "scores.csv")
  np.testing.assert_allclose(joined["ssft"], study["ssft"], rtol=1e-5)
  assert "ssft" in (run / "correlations.csv").read_text().splitlines()[0].split(",")
  with pytest.raises(jaxmem.JaxmemError, match="not the run's"):
    write_study_table(run, "other", {"index": np.arange(n - 1), "x": np.zeros(n - 1)})


def test_report_leaves_out_a_table_computed_from_other_records(run):
  score_run(run, ["memorization", "lira"], {"lira": {"num_bootstrap": 10, "targets": 3}})
  assert "lira" in write_report(run).sections
  # the run loses a chunk (as if it were rebuilt): every table describes records it no longer holds
  for path in sorted((run / "chunks").glob("chunk_00001.*")):
    path.unlink()
  assert {"memorization", "lira"} <= set(stale_tables(run))
  score_run(run, ["memorization"])
  stale = stale_tables(run)
  assert "lira" in stale and "memorization" not in stale
  assert "lira_online" in read_scores_csv(run / "scores.csv")  # kept in the join, never silently dropped
  assert "lira" not in write_report(run).sections


def test_per_example_estimators_do_not_depend_on_the_block_size():
  """Bitwise: each example's statistics are reductions over models only, with the same
  association for any block of examples (XLA reduces each column's models in the same order)."""
  keep, ratio, arrays = ratio_only_records(models_per_ratio=12, n=53)
  records = make_records(keep, ratio, arrays)
  names = ["memorization", "counterfactual", "cscore", "uncertainty"]
  options = {"counterfactual": {"metrics": "margin,loss"}, "uncertainty": {"resamples": 20}}
  whole = score_records(records, names, options, block_size=53)
  for block_size in (5, 32):
    blocked = score_records(records, names, options, block_size=block_size)
    assert list(blocked.columns) == list(whole.columns)
    for name, values in whole.columns.items():
      np.testing.assert_array_equal(blocked.columns[name], values, err_msg=f"{name} at block size {block_size}")
    assert json.dumps(blocked.summary, sort_keys=True) == json.dumps(whole.summary, sort_keys=True)


def test_blocks_are_sized_for_keep_working_copies_and_resamples(monkeypatch):
  """The driver's block of examples holds keep and the estimator's records plus their working
  copies (a float32 copy, the device's arguments and the kernel's temporaries: 32 bytes per value),
  and the bootstrap's (resamples, block) arrays, within the memory budget. Counting the stored
  bytes alone (one per bool) let memorization take all 200,000 examples of a 500-model run in one
  block and peak at 2.5 GiB."""
  keep, ratio, arrays = ratio_only_records(models_per_ratio=2, n=100)
  records = make_records(keep, ratio, arrays)
  m = records.num_models
  sizes = []
  real = Records.example_blocks
  monkeypatch.setattr(Records, "example_blocks", lambda self, size: sizes.append(size) or real(self, size))
  budget = 50_000
  options = {"uncertainty": {"resamples": 20, "splits": 0}}
  for name in ("memorization", "uncertainty"):
    sizes.clear()
    score_records(records, [name], options, memory_budget=budget)
    per_example = 2 * m * (1 + WORKING_BYTES_PER_VALUE)  # keep and train_correct: bool
    if name == "uncertainty":
      per_example += 20 * BYTES_PER_RESAMPLE
    assert sizes[0] * per_example <= budget < (sizes[0] + 1) * per_example, (name, sizes[0])
  with pytest.raises(jaxmem.JaxmemError, match="memory budget 1,000 bytes is too small"):
    score_records(records, ["memorization"], memory_budget=1000)


def test_estimator_modules_do_no_io_plotting_or_formatting():
  forbidden = {"jaxmem.store", "jaxmem.records", "matplotlib", "csv", "jaxmem.scoring", "jaxmem.report"}
  for path in sorted(Path(jaxmem.__file__).parent.joinpath("scores").glob("*.py")):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or ""]
      else:
        continue
      assert node.col_offset == 0, f"{path.name}:{node.lineno}: import inside a function"
      for name in names:
        assert not any(name == f or name.startswith(f + ".") for f in forbidden), f"{path.name} imports {name}"


class CountingRecords:
  """Records that count what is read: every read of a training-set record must be a block."""

  def __init__(self, records):
    self._records, self.whole_reads = records, []

  def __getattr__(self, name):
    return getattr(self._records, name)

  def __contains__(self, name):
    return name in self._records

  def __getitem__(self, name):
    self.whole_reads.append(name)
    return self._records[name]

  @property
  def keep(self):
    self.whole_reads.append("keep")
    return self._records.keep

  def read(self, name, *, examples=None, models=None):
    if examples is None and "N" in (self._records.axes(name) if name != "keep" else "MN"):
      self.whole_reads.append(name)
    return self._records.read(name, examples=examples, models=models)


def test_streaming_estimators_read_training_records_only_by_blocks():
  keep, ratio, arrays = ratio_only_records(models_per_ratio=6, n=40)
  records = CountingRecords(make_records(keep, ratio, arrays))
  names = ["memorization", "counterfactual", "cscore", "influence"]
  options = {"counterfactual": {"metrics": "margin"}, "influence": {"block_size": 16}}
  streamed = score_records(records, names, options, block_size=16)
  assert records.whole_reads == []
  whole = score_records(make_records(keep, ratio, arrays), names, options, block_size=40)
  for name, values in whole.columns.items():
    np.testing.assert_array_equal(streamed.columns[name], values, err_msg=name)


def test_lira_by_blocks_of_examples_equals_one_pass():
  """Two passes over blocks (pooled residuals for the fixed variances, then scores): per-example
  columns and attack metrics equal the one-block result to float64 summation order (the pooled
  variance is a sum over examples, added block by block)."""
  from jaxmem.scores.lira import lira_report
  rng = np.random.default_rng(4)
  m, n = 24, 37
  keep = rng.random((m, n)) < 0.5
  margin = (rng.normal(size=(m, n, 2)) + 1.5 * keep[..., None]).astype(np.float32)
  records = make_records(keep, np.full(m, 0.5), {"train_margin": margin[..., 0], "train_margin_aug": margin,
                                                  "train_correct": margin[..., 0] > 0})
  whole_columns, whole, _ = lira_report(records, targets=6, num_bootstrap=20)
  for block_size in (5, 16):
    columns, summary, _ = lira_report(records, targets=6, num_bootstrap=20, block_size=block_size)
    for name in whole_columns:
      np.testing.assert_allclose(columns[name], whole_columns[name], rtol=1e-12, err_msg=name)
    for variant, metrics in whole["attack"].items():
      for metric, value in metrics.items():
        for key in ("value", "low", "high"):
          np.testing.assert_allclose(summary["attack"][variant][metric][key], value[key], rtol=1e-9,
                                     err_msg=f"{variant} {metric} {key}")


def test_an_old_run_keeps_its_merged_study_columns_through_the_first_rescore(run):
  """Runs scored before score tables existed had fslt/ssft merged into scores.csv itself."""
  shutil.rmtree(run / "scores")
  table = read_scores_csv(run / "scores.csv")
  n = len(table["index"])
  table["ssft"] = np.linspace(1, 5, n)
  from jaxmem.scoring import table_to_csv
  (run / "scores.csv").write_bytes(table_to_csv(table))
  score_run(run, ["memorization"])
  np.testing.assert_allclose(read_scores_csv(run / "scores.csv")["ssft"], table["ssft"], rtol=1e-5)
  assert (run / "scores" / "ssft.csv").is_file()
