import json

import numpy as np
import pytest

import jaxmem
from jaxmem.errors import JaxmemError
from jaxmem.records import EXPORT_KEYS, RunDir, atomic_path, export_records


def test_tiny_run_layout_and_records(tiny_run, tiny_config):
  run = RunDir.open(tiny_run.run_dir)
  manifest = run.manifest()
  assert manifest["config"]["num_models"] == 8 and len(manifest["chunks"]) == 2
  assert manifest["dataset"]["num_train"] == 1347
  assert set(manifest["versions"]) >= {"jax", "flax", "optax", "jaxmem"}
  records = run.load_records()
  assert records.keep.shape == (8, 1347)
  assert records["train_correct"].dtype == bool and records["train_margin"].dtype == np.float32
  assert records["test_margin"].shape == (8, 450)
  np.testing.assert_array_equal(records.model_ids, np.arange(8))
  # chunks carry the keep rows that explain their predictions
  chunk = run.read_chunk(0)
  np.testing.assert_array_equal(chunk["keep"], records.keep[chunk["model_ids"]])


def test_export_has_contract_keys(tiny_run, tmp_path):
  out = tmp_path / "export.npz"
  export_records(RunDir.open(tiny_run.run_dir).load_records(), out)
  with np.load(out) as f:
    assert set(EXPORT_KEYS) <= set(f.files)
    assert f["keep"].shape == (8, 1347) and f["keep"].dtype == bool
    assert f["train_correct"].shape == (8, 1347) and f["test_correct"].shape == (8, 450)
    assert f["train_margin"].dtype == np.float32 and f["subset_ratio"].dtype == np.float32
    assert f["noisy"].dtype == bool and not f["noisy"].any()
    assert f["train_labels"].shape == (1347,) and f["test_labels"].shape == (450,)


def _copy_run(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return RunDir.open(dst)


def test_resume_skips_complete_chunks_and_redoes_corrupt_ones(tiny_run, tiny_config, tmp_path):
  run = _copy_run(tiny_run.run_dir, tmp_path / "run")
  before = run.chunk_path(0).read_bytes()
  again = jaxmem.run(tiny_config, run.path, progress=False, log=lambda m: None)
  assert again.trained_chunks == [] and again.skipped_chunks == [0, 1]
  assert run.chunk_path(0).read_bytes() == before
  # Tamper with chunk 1: the checksum catches it, and only that chunk is retrained.
  data = bytearray(run.chunk_path(1).read_bytes())
  data[len(data) // 2] ^= 0xFF
  run.chunk_path(1).write_bytes(bytes(data))
  assert run.chunk_status(1) == "corrupt"
  messages = []
  again = jaxmem.run(tiny_config, run.path, progress=False, log=messages.append)
  assert again.trained_chunks == [1] and again.skipped_chunks == [0]
  assert any("chunk 1" in m and "checksum" in m for m in messages)
  # Retraining reproduces the same records as the original (same keys, same batch order).
  original = RunDir.open(tiny_run.run_dir).load_records()
  np.testing.assert_allclose(again.records["train_margin"], original["train_margin"], rtol=1e-5, atol=1e-5)


def test_other_config_on_existing_run_is_refused(tiny_run, tiny_config, tmp_path):
  run = _copy_run(tiny_run.run_dir, tmp_path / "run")
  with pytest.raises(JaxmemError, match="another config.*epochs: 3 there, 4 now.*--overwrite"):
    jaxmem.run(tiny_config.replace(epochs=4), run.path, progress=False, log=lambda m: None)


def test_partial_run_scores_with_finished_chunks(tiny_run, tmp_path):
  run = _copy_run(tiny_run.run_dir, tmp_path / "run")
  run.chunk_path(1).with_suffix(".json").unlink()  # chunk 1 "still training"
  table, records = jaxmem.score_run(run.path)
  assert records.num_models == 4 and records.num_models_planned == 8
  scores = jaxmem.read_scores_csv(run.path / "scores.csv")
  assert len(scores["index"]) == 1347


def test_invalid_manifest_is_a_clear_error(tmp_path):
  (tmp_path / "manifest.json").write_text("{not json")
  with pytest.raises(JaxmemError, match="not valid JSON"):
    RunDir.open(tmp_path)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
  target = tmp_path / "file.bin"
  with pytest.raises(RuntimeError):
    with atomic_path(target) as tmp:
      tmp.write_bytes(b"half")
      raise RuntimeError("killed")
  assert list(tmp_path.iterdir()) == []


def test_scores_csv_contract(tiny_run):
  scores = jaxmem.read_scores_csv(tiny_run.run_dir / "scores.csv")
  header = (tiny_run.run_dir / "scores.csv").read_text().splitlines()[0].split(",")
  assert header[:3] == ["index", "label", "clean_label"]
  assert {"noisy", "memorization", "memorization_se"} <= set(header)
  np.testing.assert_array_equal(scores["index"], np.arange(1347))
  direct = jaxmem.memorization(tiny_run.records.keep, tiny_run.records["train_correct"])
  np.testing.assert_allclose(scores["memorization"], direct.estimate, atol=1e-5, equal_nan=True)
  summary = json.loads((tiny_run.run_dir / "summary.json").read_text())
  assert summary["models"]["finished"] == 8


def test_manifest_from_before_a_new_field_still_resumes(tiny_run, tiny_config, tmp_path):
  """A config field added to jaxmem later takes its default for runs made before it existed."""
  run = _copy_run(tiny_run.run_dir, tmp_path / "run")
  manifest = run.manifest()
  field = next(k for k in manifest["identity"] if k not in ("dataset", "num_models", "epochs"))
  del manifest["identity"][field]
  run.manifest_path.write_text(json.dumps(manifest))
  again = jaxmem.run(tiny_config, run.path, progress=False, log=lambda m: None)
  assert again.trained_chunks == []
  manifest["identity"]["epochs"] = 99  # a real difference is still refused
  run.manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(JaxmemError, match="epochs: 99 there"):
    jaxmem.run(tiny_config, run.path, progress=False, log=lambda m: None)


def test_verified_chunk_is_checked_again_after_an_edit(tiny_run, tmp_path):
  """chunk_status remembers a verified chunk by its files' size, mtime and inode; editing the file
  afterwards (same RunDir object, same size) is still caught."""
  run = _copy_run(tiny_run.run_dir, tmp_path / "run")
  assert run.chunk_status(0) == "complete" and run.chunk_status(0) == "complete"
  data = bytearray(run.chunk_path(0).read_bytes())
  data[len(data) // 2] ^= 0xFF
  run.chunk_path(0).write_bytes(bytes(data))
  assert run.chunk_status(0) == "corrupt"
