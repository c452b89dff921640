"""The hostile-input table of the README, walked through the real CLI: each case exits non-zero
with one line naming the problem (no traceback) and leaves no partial files.

tests/test_cli.py covers unknown model, ratio 1.5, one model, zero epochs, a too-large batch,
label noise 2, a non-integer flag and an unknown command; the rows here add the rest."""

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxmem.store import RunDir

from conftest import jaxmem_cli

TINY = ["--num-models", "4", "--chunk-size", "2", "--epochs", "1", "--batch-size", "32", "--strategy", "vmap",
        "--no-progress"]


def _npz(path: Path, **changes) -> str:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 5)).astype(np.float32)
  y = np.arange(40) % 3
  arrays = {"x_train": x, "y_train": y, "x_test": x[:10], "y_test": y[:10]}
  for name, change in changes.items():
    arrays[name] = change(arrays[name].copy())
  np.savez(path, **arrays)
  return str(path)


def _set(index, value):
  def change(a):
    a[index] = value
    return a
  return change


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("hostile") / "run"
  result = jaxmem_cli("run", "--out", str(out), *TINY)
  assert result.returncode == 0, result.stderr
  return out


def _listing(path: Path) -> list[str]:
  return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _main(capsys, *args):
  """``jaxmem.cli.main`` in-process (the console script's function), as a finished process."""
  from types import SimpleNamespace
  from jaxmem.cli import main
  code = main(list(args))
  captured = capsys.readouterr()
  return SimpleNamespace(returncode=code, stderr=captured.err, stdout=captured.out)


def _assert_one_line_error(result, needle, code=2):
  assert result.returncode == code, (result.returncode, result.stderr)
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("jaxmem: error: ") and needle in lines[0], lines[0]


# (name, args builder(tmp) -> CLI args, expected message); the output directory must not appear.
INPUT_CASES = [
    ("unknown dataset", lambda t: ["--dataset", "imagenet-9"],
     "unknown dataset 'imagenet-9'; choose one of: <file>.npz, <file>.txt, canaries, digits, synthetic, tfds:<name>"),
    ("unknown estimator", None, "unknown estimator 'foo'; choose one of: "),
    ("labels and features differ in length", lambda t: ["--dataset", _npz(t / "d.npz", y_train=lambda a: a[:30])],
     "train split has 40 examples in x_train but 30 labels in y_train"),
    ("train and test feature shapes differ", lambda t: ["--dataset", _npz(t / "d.npz", x_test=lambda a: a[:, :4])],
     "train and test features differ in shape: x_train examples are (5,), x_test examples are (4,)"),
    ("NaN feature", lambda t: ["--dataset", _npz(t / "d.npz", x_train=_set((3, 2), np.nan))],
     "x_train has 1 non-finite values (NaN or inf); all features must be finite"),
    ("inf feature", lambda t: ["--dataset", _npz(t / "d.npz", x_train=_set((5, 0), np.inf))],
     "x_train has 1 non-finite values (NaN or inf); all features must be finite"),
    ("label out of range", lambda t: ["--dataset", _npz(t / "d.npz", y_train=_set(0, -1))],
     "y_train contains label -1 outside [0, 3) (1 such labels)"),
    ("subset ratio 0", lambda t: ["--subset-ratio", "0"], "subset ratio must be in (0, 1), got 0.0"),
    ("subset ratio 1", lambda t: ["--subset-ratio", "1"], "subset ratio must be in (0, 1), got 1.0"),
    ("negative epochs", lambda t: ["--epochs", "-3"], "epochs must be a positive integer, got -3"),
    ("batch size 0", lambda t: ["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    ("batch larger than the subset", lambda t: ["--dataset", _npz(t / "d.npz"), "--batch-size", "30"],
     "batch_size 30 is larger than the smallest training subset (28 examples); use --batch-size <= 28"),
    ("bad shard", lambda t: ["--shard", "2/2"], "shard must be I/K with 0 <= I < K (e.g. 0/4), got '2/2'"),
    ("bad keep-params", lambda t: ["--keep-params", "some"], "keep_params must be 'none', 'all' or a number of models"),
    ("negative checkpoint interval", lambda t: ["--checkpoint-every", "-1"], "checkpoint_every must be an integer >= 0"),
    ("unknown compute dtype", lambda t: ["--compute-dtype", "float16"],
     "unknown compute_dtype 'float16'; choose one of: float32, bfloat16"),
]


@pytest.mark.parametrize("name,make_args,needle", INPUT_CASES, ids=[c[0] for c in INPUT_CASES])
def test_bad_input_is_one_line_and_writes_nothing(name, make_args, needle, tmp_path, capsys):
  """In-process through ``jaxmem.cli.main`` (the console script's function: same parsing, exit
  code and stderr, without a process start per case; the subprocess path is tested below)."""
  from types import SimpleNamespace
  from jaxmem.cli import main
  out = tmp_path / "out"
  if make_args is None:
    code = main(["scores", str(out), "--estimators", "foo"])
  else:
    code = main(["run", "--out", str(out), *TINY, *make_args(tmp_path)])
  captured = capsys.readouterr()
  _assert_one_line_error(SimpleNamespace(returncode=code, stderr=captured.err), needle)
  assert captured.out == ""
  assert not out.exists()


def test_bad_input_through_the_console_script(tmp_path):
  result = jaxmem_cli("run", "--out", str(tmp_path / "out"), *TINY, "--subset-ratio", "1")
  _assert_one_line_error(result, "subset ratio must be in (0, 1), got 1.0")
  assert not (tmp_path / "out").exists()


def test_output_path_is_unwritable(tmp_path, capsys):
  (tmp_path / "file").write_text("x")
  result = _main(capsys, "run", "--out", str(tmp_path / "file" / "sub"), *TINY)
  _assert_one_line_error(result, f"cannot create run directory '{tmp_path / 'file' / 'sub'}': Not a directory")
  result = _main(capsys, "run", "--out", "/sys/jaxmem-test-run", *TINY)  # unwritable even for root
  _assert_one_line_error(result, "cannot create run directory '/sys/jaxmem-test-run'")


def test_debug_shows_the_traceback(tmp_path):
  result = jaxmem_cli("--debug", "run", "--out", str(tmp_path / "o"), *TINY, "--subset-ratio", "0")
  assert result.returncode != 0 and "Traceback" in result.stderr and "JaxmemError" in result.stderr


def test_run_dir_with_another_config_is_refused_unless_overwrite(finished_run, tmp_path, capsys):
  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
  result = _main(capsys, "run", "--out", str(out), *TINY, "--epochs", "2")
  _assert_one_line_error(result, "holds a run with another config (epochs: 1 there, 2 now); use another --out "
                                 "or pass --overwrite to replace it")
  assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # untouched


def test_invalid_manifest(finished_run, tmp_path, capsys):
  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  (out / "manifest.json").write_text("{\"format\": \"jaxmem-run\", ")
  for command in (["scores", str(out)], ["export", str(out), str(tmp_path / "e.npz")], ["merge", str(out)]):
    _assert_one_line_error(_main(capsys, *command), "is not valid JSON")
  assert not (tmp_path / "e.npz").exists()


def test_tampered_records_file(finished_run, tmp_path, capsys):
  """A flipped byte in a chunk file: `scores` leaves that chunk out and says so when nothing else
  is left; `run` trains it again (tests/test_resume.py)."""
  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  run = RunDir.open(out)
  for c in (0, 1):
    data = bytearray(run.chunk_path(c).read_bytes())
    data[len(data) // 2] ^= 0x01
    run.chunk_path(c).write_bytes(bytes(data))
  _assert_one_line_error(_main(capsys, "scores", str(out)),
                         "chunk 0 of '" + str(out) + "' failed its checksum (tampered or truncated)")


def _limit_file_size(limit: int):
  def apply():
    # A full disk, simulated: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored), the way
    # they fail with ENOSPC on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return apply


def test_disk_full_while_writing_keeps_finished_chunks(tmp_path):
  """Chunks (~21 KB) fit, the score files (~100 KB) do not: a one-line error, the finished chunks
  intact, no temporary file left; the rerun without the limit completes from those chunks."""
  out = tmp_path / "run"
  exe = Path(sys.executable).with_name("jaxmem")
  env = {**os.environ}
  result = subprocess.run([str(exe), "run", "--out", str(out), *TINY], capture_output=True, text=True,
                          env=env, preexec_fn=_limit_file_size(60_000), timeout=600)
  _assert_one_line_error(result, "could not write " + str(out) + "/")  # scores.csv or an estimator's file
  assert result.stderr.strip().endswith(": File too large; files written before are intact")
  run = RunDir.open(out)
  assert run.completed_chunks() == [0, 1]
  assert not [p for p in out.rglob("*") if ".tmp" in p.name]
  again = jaxmem_cli("run", "--out", str(out), *TINY)
  assert again.returncode == 0 and "2 of 2 chunks already complete" in again.stderr


def test_checkpoint_write_failure_is_a_clean_error(tmp_path, monkeypatch):
  """orbax failing mid-save (e.g. ENOSPC from tensorstore) becomes one JaxmemError line."""
  import errno
  import orbax.checkpoint as ocp
  from jaxmem.errors import JaxmemError
  from jaxmem.store import ChunkCheckpoint

  def no_space(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)
  (tmp_path / "chunks").mkdir()
  with ChunkCheckpoint(RunDir(tmp_path), 0, every_epochs=1) as checkpoint:
    with pytest.raises(JaxmemError, match=r"could not write checkpoint .*chunk_00000: \[Errno 28\] No space left "
                                          r"on device; finished chunks are intact"):
      checkpoint.save(1, {"w": np.zeros((2, 3), np.float32)}, {"loss": np.zeros((2, 1), np.float32)})


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resume_works(tmp_path):
  from jaxmem.store import read_events
  out = tmp_path / "run"
  exe = Path(sys.executable).with_name("jaxmem")
  flags = ["--num-models", "4", "--chunk-size", "2", "--epochs", "8", "--batch-size", "64", "--strategy", "vmap",
           "--no-progress", "--checkpoint-every", "0"]
  process = subprocess.Popen([str(exe), "run", "--out", str(out), *flags], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  import time
  while not any(e["event"] == "chunk_start" for e in read_events(out)) and process.poll() is None:
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=600)
  assert process.returncode == 130 and "Traceback" not in stderr, stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("jaxmem: error: interrupted by SIGINT: chunk 0 saved after epoch ")
  assert last.endswith(f"resume with: jaxmem run --out {out} {' '.join(flags)}")
  again = jaxmem_cli("run", "--out", str(out), *flags)
  assert again.returncode == 0, again.stderr
  assert [e["from_epoch"] for e in read_events(out) if e["event"] == "chunk_start"][:2][-1] > 0
