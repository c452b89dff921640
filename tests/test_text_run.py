"""Text runs end to end: scores.csv of a language-model run, resuming, the secret-sharer study,
export, CLI errors and defaults, and a SIGKILL-and-resume text run that is bitwise the uninterrupted one."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jaxmem
from jaxmem import JaxmemError, RunConfig
from jaxmem.scoring import read_scores_csv
from jaxmem.records import RunDir, read_events
from jaxmem.studies.secret_sharer import secret_sharer
from jaxmem.text import make_canaries

from conftest import jaxmem_cli

TINY_LM = {"num_layers": 1, "width": 16, "num_heads": 2, "mlp_ratio": 2, "max_len": 16}
TINY_TEXT_RUN = RunConfig(dataset="canaries", model="transformer", model_options=TINY_LM, num_models=6, epochs=4,
                          batch_size=16, learning_rate=1e-2, chunk_size=6, strategy="vmap", subset_ratios=(0.5,))


def test_text_run_scores_resume_study_and_export(tmp_path):
  ds = make_canaries(num_frequent=40, num_rare=8, duplicated=(2, 4), repetitions=(1, 4), canaries_per_repetition=2,
                     secret_length=2, num_test=8)
  out = tmp_path / "run"
  result = jaxmem.run(TINY_TEXT_RUN, out, dataset=ds, progress=False, log=lambda m: None)
  table = read_scores_csv(out / "scores.csv")
  for column in ("index", "copies", "canary", "memorization", "memorization_se", "memorization_loglik",
                 "exposure", "exposure_se", "extractable", "loss_auc", "zlib_auc", "mink_auc",
                 "lira_loglik_online", "lira_loglik_offline"):
    assert column in table, column
  np.testing.assert_array_equal(table["index"], np.arange(ds.num_train))
  np.testing.assert_array_equal(table["copies"], ds.copies)
  np.testing.assert_array_equal(table["canary"], ds.canary.astype(int))
  canary = ds.canary
  assert np.isnan(table["exposure"][~canary]).all() and np.isnan(table["exposure_se"][~canary]).all()
  assert np.isfinite(table["exposure_out"][canary]).all()
  assert (table["exposure_out"][canary] <= np.log2(100) + 1e-9).all()
  assert np.isfinite(table["memorization"]).all() and (np.abs(table["memorization"]) <= 1).all()
  for column in ("loss_auc", "mink_auc", "lira_loglik_online"):
    # empty where a sequence lacks in- or out-models (LiRA: two of each besides the target)
    values = table[column][np.isfinite(table[column])]
    assert len(values) > 10 and ((values >= 0) & (values <= 1)).all(), column
  manifest = RunDir.open(out).manifest()
  assert [c["secret"] for c in manifest["dataset"]["text"]["secrets"]["canaries"]] == \
      [c["secret"] for c in ds.secrets["canaries"]]
  assert "exposure" in result.summary["scores"] and len(result.summary["scores"]["exposure"]["by_copies"]) == 2

  again = jaxmem.run(TINY_TEXT_RUN, out, dataset=ds, progress=False, log=lambda m: None)  # resumes: nothing to train
  assert again.trained_chunks == [] and again.skipped_chunks == [0]
  np.testing.assert_array_equal(read_scores_csv(out / "scores.csv")["memorization"], table["memorization"])

  study = secret_sharer(out, log=lambda m: None)
  assert [r["copies"] for r in study.exposure_rows] == [1, 4]
  assert {(r["kind"], r["copies"]) for r in study.memorization_rows} >= {("sequence", 1), ("sequence", 4), ("canary", 4)}
  for name in ("exposure_vs_copies.png", "memorization_vs_copies.png", "exposure_vs_copies.csv", "secret_sharer.json"):
    assert (study.out / name).stat().st_size > 0

  jaxmem.export_records(RunDir.open(out).load_records(), tmp_path / "records.npz")
  with np.load(tmp_path / "records.npz") as f:
    assert f["train_token_accuracy"].shape == (6, ds.num_train)
    assert f["candidate_logperp"].shape == (6, 100)


def test_text_data_needs_a_text_model_and_the_other_way_round(tmp_path):
  with pytest.raises(JaxmemError, match="text datasets need --model transformer"):
    jaxmem.run(RunConfig(dataset="canaries", model="mlp"), tmp_path / "a", progress=False, log=lambda m: None)
  with pytest.raises(JaxmemError, match="cannot train on dataset 'digits'"):
    jaxmem.run(RunConfig(dataset="digits", model="transformer"), tmp_path / "b", progress=False, log=lambda m: None)
  with pytest.raises(JaxmemError, match="score_epoch is for classification"):  # record_epochs is allowed: per-epoch token accuracy
    jaxmem.run(TINY_TEXT_RUN.replace(score_epoch=1), tmp_path / "d", progress=False, log=lambda m: None)
  with pytest.raises(JaxmemError, match="target_se is for classification"):
    jaxmem.run(TINY_TEXT_RUN.replace(target_se=0.05), tmp_path / "e", progress=False, log=lambda m: None)
  result = jaxmem_cli("run", "--dataset", "canaries", "--out", str(tmp_path / "c"))
  assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--model transformer" in result.stderr


def test_cli_text_defaults_apply_only_where_no_flag_is_given():
  from jaxmem.cli import build_parser, config_from_args
  config = config_from_args(build_parser().parse_args(["run", "--dataset", "canaries", "--model", "transformer"]))
  assert (config.num_models, config.epochs, config.subset_ratios) == (64, 10, (0.5,))
  config = config_from_args(build_parser().parse_args(
      ["run", "--dataset", "canaries", "--model", "transformer", "--num-models", "8", "--epochs", "3"]))
  assert (config.num_models, config.epochs) == (8, 3)


@pytest.mark.slow
def test_sigkill_then_resume_of_a_text_run_is_bitwise(tmp_path):
  config = tmp_path / "text.json"
  config.write_text(json.dumps({**TINY_TEXT_RUN.to_dict(), "num_models": 4, "chunk_size": 2, "epochs": 8,
                                "checkpoint_every": 1}))
  flags = ["--config", str(config), "--no-progress"]

  def export(run_dir, path):
    result = jaxmem_cli("export", str(run_dir), str(path))
    assert result.returncode == 0, result.stderr
    with np.load(path) as f:
      return {k: f[k] for k in f.files}

  reference = tmp_path / "reference"
  assert jaxmem_cli("run", "--out", str(reference), *flags).returncode == 0
  expected = export(reference, tmp_path / "reference.npz")

  out = tmp_path / "killed"
  exe = Path(sys.executable).with_name("jaxmem")
  process = subprocess.Popen([str(exe), "run", "--out", str(out), *flags], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 600
  while time.monotonic() < deadline and process.poll() is None:
    # a save is asynchronous and orbax finishes one before starting the next, so once the save
    # after epoch 4 has started, the one after epoch 2 is complete on disk
    if any(e["event"] == "checkpoint" and e["epoch"] >= 4 for e in read_events(out)):
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert RunDir.open(out).chunk_status(1) != "complete"  # killed mid-run
  final = jaxmem_cli("run", "--out", str(out), *flags)
  assert final.returncode == 0, final.stderr
  got = export(out, tmp_path / "killed.npz")
  assert sorted(got) == sorted(expected)
  for name in expected:
    assert got[name].dtype == expected[name].dtype, name
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
  assert any(e["event"] == "chunk_start" and e["from_epoch"] > 0 for e in read_events(out))


@pytest.mark.slow
def test_bench_text_workload_runs_engine_and_model_loop_side_by_side(monkeypatch):
  from jaxmem import bench
  monkeypatch.setattr(bench, "torch_available", lambda: True)  # reach the baseline's own text check
  result = bench.bench("canaries-transformer", quick=True, repeats=1, strategies=["vmap"],
                       baselines=["jax-model-loop", "jax-step-loop", "torch-loop"], engine_models=2, loop_models=1,
                       epochs=1, peak_size=256)
  assert [r.variant for r in result.rows] == ["engine:vmap", "jax-model-loop"]
  assert "classifiers only" in result.skipped["jax-step-loop"] and "no transformer" in result.skipped["torch-loop"]
  assert result.model_flops > 0 and all(r.median > 0 for r in result.rows)
