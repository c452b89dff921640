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
from jaxmem.report import write_report
from jaxmem.studies.secret_sharer import secret_sharer
from jaxmem.text import make_canaries

from conftest import jaxmem_cli
from test_report import CHROMIUM, browser_image_check

TINY_LM = {"num_layers": 1, "width": 16, "num_heads": 2, "mlp_ratio": 2, "max_len": 16}
TINY_TEXT_RUN = RunConfig(dataset="canaries", model="transformer", model_options=TINY_LM, num_models=6, epochs=4,
                          batch_size=16, learning_rate=1e-2, chunk_size=6, strategy="vmap", subset_ratios=(0.5,))


@pytest.fixture(scope="module")
def tiny_text_run(tmp_path_factory):
  ds = make_canaries(num_frequent=40, num_rare=8, duplicated=(2, 4), repetitions=(1, 4), canaries_per_repetition=2,
                     secret_length=2, num_test=8)
  out = tmp_path_factory.mktemp("text") / "run"
  return ds, out, jaxmem.run(TINY_TEXT_RUN, out, dataset=ds, progress=False, log=lambda m: None)


def test_text_run_scores_resume_study_and_export(tiny_text_run, tmp_path):
  ds, out, result = tiny_text_run
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
  # the control's chance value (ties only lower it below the uniform rank's; the CSV keeps 6 digits) and spread
  uniform_rank = np.log2(100) - np.log2(np.arange(1, 101)).mean()
  assert (table["exposure_chance"][canary] <= uniform_rank + 1e-5).all() and (table["exposure_chance"][canary] > 0).all()
  assert (table["exposure_out_se"][canary] > 0).all() and np.isnan(table["exposure_chance"][~canary]).all()
  header = (out / "correlations.csv").read_text().splitlines()[0].split(",")
  assert "exposure_out" in header and "exposure_chance" not in header  # a reference value, not a score
  assert np.isfinite(table["memorization"]).all() and (np.abs(table["memorization"]) <= 1).all()
  for column in ("loss_auc", "mink_auc", "lira_loglik_online"):
    # empty where a sequence lacks in- or out-models (LiRA: two of each besides the target)
    values = table[column][np.isfinite(table[column])]
    assert len(values) > 10 and ((values >= 0) & (values <= 1)).all(), column
  manifest = RunDir.open(out).manifest()
  assert [c["secret"] for c in manifest["dataset"]["text"]["secrets"]["canaries"]] == \
      [c["secret"] for c in ds.secrets["canaries"]]
  assert "exposure" in result.summary["scores"] and len(result.summary["scores"]["exposure"]["by_copies"]) == 2
  for count, entry in result.summary["scores"]["exposure"]["by_copies"].items():  # the canary as the unit
    values = table["exposure"][canary & (ds.copies == int(count))]
    assert entry["exposure_se_between_canaries"] == pytest.approx(values.std(ddof=1) / np.sqrt(len(values)), rel=1e-4)

  again = jaxmem.run(TINY_TEXT_RUN, out, dataset=ds, progress=False, log=lambda m: None)  # resumes: nothing to train
  assert again.trained_chunks == [] and again.skipped_chunks == [0]
  np.testing.assert_array_equal(read_scores_csv(out / "scores.csv")["memorization"], table["memorization"])

  study = secret_sharer(out, log=lambda m: None)
  assert [r["copies"] for r in study.exposure_rows] == [1, 4]
  assert {(r["kind"], r["copies"]) for r in study.memorization_rows} >= {("sequence", 1), ("sequence", 4), ("canary", 4)}
  for name in ("exposure_vs_copies.png", "memorization_vs_copies.png", "exposure_vs_copies.csv", "secret_sharer.json"):
    assert (study.out / name).stat().st_size > 0

  jaxmem.export_records(RunDir.open(out).load_records(), tmp_path / "records.npz")
  # every text record and per-sequence fact is exported under a name whose axis letters are its shape
  sizes = {"M": 6, "N": ds.num_train, "T": len(ds.x_test), "L": ds.seq_len - 1, "candidates": 100}
  contract = {"keep", "train_labels", "test_labels", "noisy", "subset_ratio", "model_ids", "clean_train_labels",
              "epoch_loss"}  # named as in image runs
  with np.load(tmp_path / "records.npz") as f:
    text_keys = sorted(set(f.files) - contract)
    assert text_keys == sorted(["train_token_accuracy_MxN", "test_token_accuracy_MxT", "train_loglik_MxN",
                                "test_loglik_MxT", "train_extractable_MxN", "train_token_logprob_MxNxL",
                                "candidate_logperp_Mxcandidates", "copies_N", "canary_N", "prefix_len_N",
                                "zlib_bytes_N", "num_tokens_N", "secret_index_N"])
    for key in text_keys:
      axes = key.rsplit("_", 1)[1].split("x")
      assert f[key].shape == tuple(sizes[a] for a in axes), key
    np.testing.assert_array_equal(f["copies_N"], ds.copies)
    np.testing.assert_array_equal(f["secret_index_N"], ds.secret_index())
    np.testing.assert_array_equal(f["train_loglik_MxN"], RunDir.open(out).load_records()["train_loglik"])


def test_text_run_report_shows_sequences_and_no_label_or_image_parts(tiny_text_run, tmp_path):
  ds, out, _ = tiny_text_run
  report = write_report(out, dataset=ds)
  page = report.path.read_text()
  assert report.sections == ["facts", "memorization", "text", "correlations"]  # no image gallery
  assert sorted(report.images) == ["memorization_hist.png", "text_exposure.png"]  # no per-class figure
  for absent in ("Per class", "flipped", "auroc_flipped", "classes", "label", "Feldman"):
    assert absent not in page, absent
  assert f"{ds.num_train} distinct training sequences, {int(ds.copies.sum())} with their copies" in page
  assert "Zhang et al. 2021" in page and "per-token accuracy (mean over models)" in page
  for entry in ds.secrets["canaries"]:  # each canary's row in the exposure table, as text
    assert "my pin is " + " ".join(entry["secret"]) in page
  if CHROMIUM is not None:  # the page loads in a real browser with every figure
    count, broken = browser_image_check(report.path, tmp_path)
    assert broken == [] and count == 2


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
def test_bench_text_workload_runs_engine_and_model_loop_side_by_side():
  from jaxmem import bench
  result = bench.bench("canaries-transformer", quick=True, repeats=1, strategies=["vmap"],
                       baselines=["jax-model-loop", "jax-step-loop", "torch-loop"], engine_models=2, loop_models=1,
                       epochs=1, peak_size=256)
  torch_row = ["torch-loop"] if bench.torch_available() else []
  assert [r.variant for r in result.rows] == ["engine:vmap", "jax-model-loop"] + torch_row
  assert "classifiers only" in result.skipped["jax-step-loop"]
  assert torch_row or "PyTorch is not installed" in result.skipped["torch-loop"]
  assert result.model_flops > 0 and all(r.median > 0 for r in result.rows)


def test_torch_transformer_is_the_flax_transformer():
  """The PyTorch baseline's model has the flax model's parameter count and, given the flax
  parameters, the same logits (layout, LayerNorm eps, GELU form, tied logits all agree)."""
  torch = pytest.importorskip("torch")
  import jax
  from jaxmem.bench import torch_transformer
  from jaxmem.models import build_model
  options = {"num_layers": 2, "width": 32, "num_heads": 4, "mlp_ratio": 4, "max_len": 24}
  vocab, width = 40, 32
  model = build_model("transformer", vocab, options)
  tokens_BxL = np.random.default_rng(0).integers(0, vocab, (3, 20)).astype(np.int32)
  params = model.init(jax.random.PRNGKey(0), tokens_BxL)["params"]
  torch_model = torch_transformer(torch, vocab, **options)
  assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == sum(p.numel() for p in torch_model.parameters())
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  state = {"embed.weight": t(params["embed"]["embedding"]), "position": t(params["position"]),
           "ln_final.weight": t(params["ln_final"]["scale"]), "ln_final.bias": t(params["ln_final"]["bias"])}
  for layer in range(2):
    attn, b = params[f"attn_{layer}"], f"blocks.{layer}."
    for name in ("ln_attn", "ln_mlp"):
      state[b + name + ".weight"] = t(params[f"{name}_{layer}"]["scale"])
      state[b + name + ".bias"] = t(params[f"{name}_{layer}"]["bias"])
    state[b + "qkv.weight"] = t(np.asarray(attn["qkv"]["kernel"]).reshape(width, 3 * width).T)
    state[b + "qkv.bias"] = t(np.asarray(attn["qkv"]["bias"]).reshape(-1))
    state[b + "out.weight"] = t(np.asarray(attn["out"]["kernel"]).reshape(width, width).T)
    state[b + "out.bias"] = t(attn["out"]["bias"])
    for name in ("mlp_in", "mlp_out"):
      state[b + name + ".weight"] = t(np.asarray(params[f"{name}_{layer}"]["kernel"]).T)
      state[b + name + ".bias"] = t(params[f"{name}_{layer}"]["bias"])
  fresh = torch_model.state_dict()
  for name, value in state.items():  # the same initial scale (different draws): std within 10%
    if float(value.std()) > 0:  # random: 768 or more entries each, so the std is known to a few %
      assert value.numel() >= 768 and float(fresh[name].std()) == pytest.approx(float(value.std()), rel=0.1), name
    else:  # LayerNorm scales and biases start at 1 and 0, projection biases at 0
      np.testing.assert_array_equal(fresh[name].numpy(), value.numpy(), err_msg=name)
  torch_model.load_state_dict(state)  # strict: every torch parameter is set from a flax one
  with torch.no_grad():
    got = torch_model(torch.from_numpy(tokens_BxL.astype(np.int64))).numpy()
  np.testing.assert_allclose(got, np.asarray(model.apply({"params": params}, tokens_BxL)), atol=2e-5, rtol=1e-4)
