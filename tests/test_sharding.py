"""Layouts that must not change results: job-array shards of one run directory, 8 simulated
devices vs 1 through the CLI, and cluster detection for multi-process runs.

tests/test_engine.py::test_eight_simulated_devices_match_one_device compares the engine's records
for one chunk; here the whole CLI run (chunk plan, padding of a chunk over devices, records,
export) is compared."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxmem.distributed import ClusterSpec, detect_cluster, first_host
from jaxmem.errors import JaxmemError
from jaxmem.run import missing_chunks_line, parse_shard, shard_of
from jaxmem.records import RunDir, read_events

from conftest import jaxmem_cli

# 5 chunks of 2 models (6 models per ratio would not split evenly: chunk plans alternate ratios).
FLAGS = ["--num-models", "10", "--chunk-size", "2", "--epochs", "2", "--batch-size", "64",
         "--strategy", "vmap", "--no-progress"]


def _export(run_dir, path) -> dict[str, np.ndarray]:
  result = jaxmem_cli("export", str(run_dir), str(path))
  assert result.returncode == 0, result.stderr
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def assert_same_within_layout_tolerance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
  """Two exports of one run on different device layouts: the design is identical; margins equal
  within 1e-4 (a sharded program may fuse float reductions differently); correctness may flip
  only where a margin is within that tolerance of 0."""
  for k in ("keep", "train_labels", "test_labels", "model_ids", "subset_ratio"):
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  for k in ("train_margin", "test_margin", "epoch_loss"):
    np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-4, err_msg=k)
  for split in ("train", "test"):
    flips = a[f"{split}_correct"] != b[f"{split}_correct"]
    assert np.all(np.abs(b[f"{split}_margin"][flips]) < 1e-3)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  out = tmp_path_factory.mktemp("one") / "run"
  result = jaxmem_cli("run", "--out", str(out), *FLAGS)
  assert result.returncode == 0, result.stderr
  return out, _export(out, out.parent / "one.npz")


def test_shard_assignment_is_round_robin():
  assert parse_shard("1/4") == (1, 4)
  assert [shard_of(c, 3) for c in range(7)] == [0, 1, 2, 0, 1, 2, 0]
  for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
    with pytest.raises(JaxmemError, match="shard must be I/K with 0 <= I < K"):
      parse_shard(bad)


@pytest.mark.slow
def test_two_shard_processes_equal_one_process(one_process, tmp_path):
  """`--shard 0/2` and `--shard 1/2` run at the same time into one directory; each trains only
  its chunks, the first to finish reports what is missing, and `merge` gives the same export as
  a single process (bit for bit: the same models in the same programs)."""
  exe = Path(sys.executable).with_name("jaxmem")
  out = tmp_path / "run"
  shards = [subprocess.Popen([str(exe), "run", "--out", str(out), "--shard", f"{i}/2", *FLAGS],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in shards]
  for p, (_, err) in zip(shards, outputs):
    assert p.returncode == 0, err
  trained = {}
  for e in read_events(out):
    if e["event"] == "chunk_done":
      trained.setdefault(e["pid"], []).append(e["chunk"])
  assert sorted(sorted(v) for v in trained.values()) == [[0, 2, 4], [1, 3]]

  merged = jaxmem_cli("merge", str(out))
  assert merged.returncode == 0, merged.stderr
  assert "all 5 chunks of" in merged.stderr
  a, b = _export(out, tmp_path / "two.npz"), one_process[1]
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_merge_and_scores_say_what_is_missing(one_process, tmp_path):
  import shutil
  out = tmp_path / "partial"
  shutil.copytree(one_process[0], out)
  run = RunDir.open(out)
  run.chunk_path(3).unlink()
  run.chunk_path(1).with_suffix(".json").unlink()
  assert missing_chunks_line(run, 2) == "2 of 5 chunks (4 models) are not complete yet: chunks 1, 3 (shards 1/2)"
  result = jaxmem_cli("merge", str(out))
  assert result.returncode == 0, result.stderr
  assert "2 of 5 chunks (4 models) are not complete yet: chunks 1, 3; scoring the complete ones" in result.stderr
  assert "models: 6 of 10 finished" in result.stdout
  # Copy the missing chunks in from another directory of the same run.
  result = jaxmem_cli("merge", str(out), "--from", str(one_process[0]))
  assert result.returncode == 0, result.stderr
  assert "merged 2 chunks from" in result.stderr and "all 5 chunks of" in result.stderr
  # A directory of another run is refused.
  other = tmp_path / "other"
  assert jaxmem_cli("run", "--out", str(other), *FLAGS[:-1], "--seed", "1", "--epochs", "1",
                    "--num-models", "2", "--no-progress").returncode == 0
  result = jaxmem_cli("merge", str(out), "--from", str(other))
  assert result.returncode == 2 and "holds another run" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


EIGHT_DEVICES_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


@pytest.mark.slow
def test_eight_simulated_devices_cli_export_matches_one_device(one_process, tmp_path):
  """The same run on 8 simulated CPU devices (chunks of 2 padded to 8 models, 1 per device):
  margins equal within 1e-4 (a sharded program may fuse float reductions differently),
  correctness may flip only where a margin is within that tolerance of 0."""
  out = tmp_path / "eight"
  result = jaxmem_cli("run", "--out", str(out), *FLAGS, env=EIGHT_DEVICES_ENV)
  assert result.returncode == 0, result.stderr
  manifest = RunDir.open(out).manifest()
  assert len(manifest["devices"]) == 8
  a, b = _export(out, tmp_path / "eight.npz"), one_process[1]
  assert_same_within_layout_tolerance(a, b)


# -- cluster detection (no real cluster here: the logic on recorded environments) ------------------

def test_first_host_of_slurm_nodelists():
  assert first_host("gpu[07-09,12],cpu1") == "gpu07"
  assert first_host("node3") == "node3"
  assert first_host("a100-[1,4]") == "a100-1"


def test_detect_cluster_from_slurm_and_flags():
  slurm = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
           "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[01-08]"}
  spec = detect_cluster(slurm)
  assert spec == ClusterSpec("gpu07:" + str(20000 + 123456 % 20000), 4, 2, "slurm")
  # A job-array task (one task per job) is a single process: it uses --shard, not a coordinator.
  assert detect_cluster({"SLURM_JOB_ID": "9", "SLURM_NTASKS": "1", "SLURM_ARRAY_TASK_ID": "3"}) is None
  assert detect_cluster({}) is None
  # Explicit flags win over SLURM.
  assert detect_cluster(slurm, coordinator="host0", num_processes=2, process_id=1) == ClusterSpec(
      "host0:12355", 2, 1, "flags")
  with pytest.raises(JaxmemError, match="go together"):
    detect_cluster({}, coordinator="host0:1")
  with pytest.raises(JaxmemError, match="process-id must be in"):
    detect_cluster({}, coordinator="h:1", num_processes=2, process_id=2)
  with pytest.raises(JaxmemError, match="SLURM_PROCID"):
    detect_cluster({**slurm, "SLURM_PROCID": "x"})


def test_two_jax_distributed_processes_equal_one_process(one_process, tmp_path):
  """A real multi-process run: two processes joined by jax.distributed.initialize (coordinator on
  loopback), each with 2 simulated local devices. Each trains its own chunks (c % 2 == its index)
  on its own devices, checkpoints them itself (orbax per process), and process 0 waits for the
  other's chunks and writes the scores. The export equals one single-device process within the
  cross-layout tolerance (2 local devices hold 1 model each instead of 2 vmapped on one device)."""
  import socket
  exe = Path(sys.executable).with_name("jaxmem")
  with socket.socket() as s:  # a free loopback port for the coordinator
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = tmp_path / "run"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = [subprocess.Popen([str(exe), "run", "--out", str(out), *FLAGS, "--checkpoint-every", "1",
                             "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "most memorized" in outputs[0][0] and outputs[1][0].strip() == ""  # only process 0 reports
  assert "process 1 of 2: its chunks are done" in outputs[1][1]
  done = {}
  for e in read_events(out):
    if e["event"] == "chunk_done":
      done.setdefault(e["pid"], []).append(e["chunk"])
  assert sorted(sorted(v) for v in done.values()) == [[0, 2, 4], [1, 3]]
  assert any(e["event"] == "checkpoint" for e in read_events(out))
  pids = {e["pid"] for e in read_events(out) if e["event"] == "chunk_done"}
  scoring = [e for e in read_events(out) if e["event"] == "scoring"]
  assert len(pids) == 2 and len(scoring) == 1 and scoring[0]["process"] == 0  # only process 0 ran estimators
  a, b = _export(out, tmp_path / "multi.npz"), one_process[1]
  assert sorted(a) == sorted(b)
  assert_same_within_layout_tolerance(a, b)
