"""Exact resume: mid-chunk orbax checkpoints, stop requests, SIGKILL/SIGTERM, damaged files, and
restoring one model's kept parameters by reading only its slice."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxmem
from jaxmem.run import RunInterrupted
from jaxmem.records import ChunkCheckpoint, RunDir, load_model_params, read_events, save_params

from conftest import jaxmem_cli


def _arrays(run_dir) -> dict[str, np.ndarray]:
  records = RunDir.open(run_dir).load_records()
  return {"keep": records.keep, "model_ids": records.model_ids, **records.arrays}


def _assert_bitwise_equal(a: dict, b: dict) -> None:
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _stop_after(calls: int):
  count = [0]

  def should_stop() -> bool:
    count[0] += 1
    return count[0] >= calls
  return should_stop


def test_stop_request_checkpoints_and_resume_is_bitwise(tiny_run, tiny_config, tmp_path):
  """Stopped after epoch 2 of chunk 0 (a forced orbax save), the rerun continues from that
  checkpoint and reproduces the uninterrupted run bit for bit."""
  out = tmp_path / "run"
  with pytest.raises(RunInterrupted, match="chunk 0 saved after epoch 2 of 3") as stopped:
    jaxmem.run(tiny_config, out, progress=False, log=lambda m: None, should_stop=_stop_after(2))
  assert stopped.value.exit_code == 128 + signal.SIGINT
  run = RunDir.open(out)
  assert run.chunk_status(0) == "missing"
  with ChunkCheckpoint(run, 0, every_epochs=0) as checkpoint:
    assert checkpoint.latest_epoch() == 2
  result = jaxmem.run(tiny_config, out, progress=False, log=lambda m: None)
  assert result.trained_chunks == [0, 1]
  starts = [e for e in read_events(out) if e["event"] == "chunk_start"]
  assert [(e["chunk"], e["from_epoch"]) for e in starts] == [(0, 0), (0, 2), (1, 0)]
  done = [e for e in read_events(out) if e["event"] == "chunk_done"]
  assert [(e["chunk"], e["resumed_from_epoch"]) for e in done] == [(0, 2), (1, 0)]
  assert not any((out / "checkpoints").iterdir())  # a finished chunk's checkpoints are removed
  _assert_bitwise_equal(_arrays(out), _arrays(tiny_run.run_dir))


def test_checkpoint_every_and_host_calls_do_not_change_results(tiny_run, tiny_config, tmp_path):
  """Saving every epoch (asynchronously, while training continues) changes nothing."""
  out = tmp_path / "run"
  jaxmem.run(tiny_config.replace(checkpoint_every=1), out, progress=False, log=lambda m: None)
  _assert_bitwise_equal(_arrays(out), _arrays(tiny_run.run_dir))


def test_damaged_checkpoint_is_reported_and_chunk_retrained(tiny_run, tiny_config, tmp_path):
  out = tmp_path / "run"
  with pytest.raises(RunInterrupted):
    jaxmem.run(tiny_config, out, progress=False, log=lambda m: None, should_stop=_stop_after(1))
  step = out / "checkpoints" / "chunk_00000" / "1"
  for f in step.rglob("*"):  # truncate every data file of the saved state
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
  messages = []
  jaxmem.run(tiny_config, out, progress=False, log=messages.append)
  assert any("checkpoint of chunk 0 at epoch 1 cannot be read" in m and "from its start" in m for m in messages), messages
  done = [e for e in read_events(out) if e["event"] == "chunk_done"]
  assert done[0]["chunk"] == 0 and done[0]["resumed_from_epoch"] == 0
  _assert_bitwise_equal(_arrays(out), _arrays(tiny_run.run_dir))


@pytest.mark.slow  # the same checksum path as tests/test_store.py's flipped byte
def test_truncated_chunk_is_detected_and_redone(tiny_run, tiny_config, tmp_path):
  import shutil
  out = tmp_path / "run"
  shutil.copytree(tiny_run.run_dir, out)
  run = RunDir.open(out)
  data = run.chunk_path(0).read_bytes()
  run.chunk_path(0).write_bytes(data[: len(data) // 2])
  assert run.chunk_status(0) == "corrupt"
  messages = []
  result = jaxmem.run(tiny_config, out, progress=False, log=messages.append)
  assert result.trained_chunks == [0] and result.skipped_chunks == [1]
  assert any("chunk 0" in m and "failed its checksum; training it again" in m for m in messages)
  _assert_bitwise_equal(_arrays(out), _arrays(tiny_run.run_dir))  # retrained bit for bit


@pytest.mark.slow
def test_kept_params_restore_one_model(tiny_config, tmp_path):
  """--keep-params N keeps the first N models' final parameters; each loads alone and equals the
  parameters the engine ended with."""
  from jaxmem.engine import Engine
  config = tiny_config.replace(keep_params="3")
  out = tmp_path / "run"
  jaxmem.run(config, out, progress=False, log=lambda m: None)
  assert sorted(p.name for p in (out / "params").iterdir()) == ["chunk_00000", "chunk_00000.json"]
  design = RunDir.open(out).read_design()
  engine = Engine(jaxmem.load_dataset("digits"), config, probe_cache=None)
  engine.train_chunk([0, 1, 2, 3], design["keep"][:4], epochs_per_call=1)
  for m in range(3):
    expected = jax.tree.map(lambda x: np.asarray(x[m]), engine.last_state.params)
    got = load_model_params(out, m)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
  with pytest.raises(jaxmem.JaxmemError, match=r"parameters of model 5 were not kept.*kept: \[0, 1, 2\]"):
    load_model_params(out, 5)


def _file_bytes_read() -> int:
  import tensorstore as ts
  metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
  return sum(v["value"] for m in metrics for v in m["values"])


def test_one_model_of_a_thousand_reads_only_its_slice(tmp_path):
  """Final parameters of 1,000 models (a synthetic stacked MLP tree, 1.7 MB each of random
  float32, no training): restoring one model reads about one model's bytes, not the checkpoint."""
  rng = np.random.default_rng(0)
  M = 1000
  params = {"Dense_0": {"kernel": rng.normal(size=(M, 64, 64)).astype(np.float32),
                        "bias": rng.normal(size=(M, 64)).astype(np.float32)},
            "Dense_1": {"kernel": rng.normal(size=(M, 64, 10)).astype(np.float32),
                        "bias": rng.normal(size=(M, 10)).astype(np.float32)}}
  out = tmp_path / "run"
  (out / "chunks").mkdir(parents=True)
  (out / "manifest.json").write_text(json.dumps({"format": "jaxmem-run", "format_version": 1, "chunks": [list(range(M))]}))
  rundir = RunDir(out)
  save_params(rundir, 0, np.arange(M), jax.tree.map(jax.numpy.asarray, params))
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  one_model = total // M
  before = _file_bytes_read()
  got = load_model_params(out, 737)
  read = _file_bytes_read() - before
  jax.tree.map(lambda g, p: np.testing.assert_array_equal(g, p[737]), got, params)
  # What is read: the model's own chunks plus the OCDBT manifest and B-tree root, once (orbax keeps
  # one root node, which also inlines values under 1 KB such as every model's biases).
  index = sum(f.stat().st_size for f in (out / "params" / "chunk_00000").rglob("*")
              if f.is_file() and (f.parent.name == "d" and f.parent.parent.name == "chunk_00000"
                                  or f.name == "manifest.ocdbt"))
  assert read <= one_model + index + 16 * 1024, (read, one_model, index, total)
  assert read < total / 40


# -- real processes: SIGTERM and SIGKILL at random moments ----------------------------------------

FLAGS = ["--num-models", "6", "--chunk-size", "2", "--epochs", "6", "--batch-size", "64",
         "--strategy", "vmap", "--checkpoint-every", "1", "--no-progress"]


def _export(run_dir, path) -> dict[str, np.ndarray]:
  result = jaxmem_cli("export", str(run_dir), str(path))
  assert result.returncode == 0, result.stderr
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _start(out) -> subprocess.Popen:
  exe = Path(sys.executable).with_name("jaxmem")
  return subprocess.Popen([str(exe), "run", "--out", str(out), *FLAGS], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_event(out, predicate, process, timeout=300.0) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if any(predicate(e) for e in read_events(out)) or process.poll() is not None:
      return
    time.sleep(0.05)
  raise AssertionError("no progress")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
  reference = tmp_path / "reference"
  assert jaxmem_cli("run", "--out", str(reference), *FLAGS).returncode == 0
  expected = _export(reference, tmp_path / "reference.npz")

  out = tmp_path / "killed"
  rng = random.Random(6)
  complete_at_kill: list[set[int]] = []
  for attempt in range(4):
    process = _start(out)
    # Let it get somewhere (1-3 more chunk starts, checkpoints or chunk ends), then kill it at a
    # random moment: during training, an asynchronous save, or writing records.
    target = len(read_events(out)) + rng.randint(1, 3)
    _wait_for_event(out, lambda e: len(read_events(out)) >= target, process)
    time.sleep(rng.uniform(0.0, 1.0))
    process.send_signal(signal.SIGKILL)
    process.wait()
    run = RunDir.open(out)
    complete_at_kill.append({c for c in range(3) if run.chunk_status(c) == "complete"})
    if len(complete_at_kill[-1]) == 3:
      break
  final = jaxmem_cli("run", "--out", str(out), *FLAGS)
  assert final.returncode == 0, final.stderr
  _assert_bitwise_equal(_export(out, tmp_path / "killed.npz"), expected)

  # No chunk complete at a kill was trained again afterwards.
  events = read_events(out)
  pids = list(dict.fromkeys(e["pid"] for e in events))
  for kill, complete in enumerate(complete_at_kill):
    later = {e["chunk"] for e in events if e["event"] == "chunk_start" and e["pid"] in pids[kill + 1:]}
    assert not (later & complete), (kill, complete, later)
  # No chunk finished twice (a kill between writing a chunk and logging it may drop its event),
  # every chunk is complete, and at least one chunk resumed mid-way from a checkpoint.
  done = [e["chunk"] for e in events if e["event"] == "chunk_done"]
  assert len(done) == len(set(done))
  assert RunDir.open(out).completed_chunks() == [0, 1, 2]
  assert any(e["from_epoch"] > 0 for e in events if e["event"] == "chunk_start") or len(complete_at_kill) == 1


@pytest.mark.slow
def test_sigterm_saves_prints_resume_command_and_resumes_exactly(tmp_path):
  reference = tmp_path / "reference"
  assert jaxmem_cli("run", "--out", str(reference), *FLAGS).returncode == 0
  out = tmp_path / "run"
  process = _start(out)
  _wait_for_event(out, lambda e: e["event"] == "chunk_start" and e["chunk"] == 1, process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 128 + signal.SIGTERM, stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("jaxmem: error: interrupted by SIGTERM: chunk 1 saved after epoch")
  assert f"resume with: jaxmem run --out {out}" in last and "Traceback" not in stderr
  assert RunDir.open(out).chunk_status(0) == "complete"
  final = jaxmem_cli("run", "--out", str(out), *FLAGS)
  assert final.returncode == 0, final.stderr
  resumed = [e for e in read_events(out) if e["event"] == "chunk_start" and e["chunk"] == 1]
  assert resumed[-1]["from_epoch"] > 0
  _assert_bitwise_equal(_export(out, tmp_path / "a.npz"), _export(reference, tmp_path / "b.npz"))
