"""The hostile-input table of the README, walked through the real CLI: each case exits non-zero
with one line naming the problem (no traceback) and leaves no partial files.

tests/test_cli.py covers unknown model, ratio 1.5, one model, zero epochs, a too-large batch,
label noise 2, a non-integer flag and an unknown command; the rows here add the rest."""

import importlib
import os
import re
import resource
import shutil
import signal
import subprocess
import time
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from jaxmem.records import RunDir

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
  from jaxmem.records import ChunkCheckpoint

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
  from jaxmem.records import read_events
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


# --- What a new user hit: each case below failed with a traceback, wrote files, or said the wrong thing.

def _vector_npz(path: Path, n=80, dim=5, scale=1.0, **arrays_given) -> str:
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(n, dim)) * scale).astype(np.float32)
  x[3, 1] = -10 * scale  # the largest magnitude (normal draws of 80 x 5 stay below 5)
  y = np.arange(n) % 3
  arrays = {"x_train": x, "y_train": y, "x_test": x[:10], "y_test": y[:10]}
  arrays.update(arrays_given)
  np.savez(path, **arrays)
  return str(path)


def _config_file(tmp: Path, name: str, text: str) -> str:
  (tmp / name).write_text(text)
  return str(tmp / name)


def _stray_label(t: Path, value, dtype=np.int64) -> str:
  y = (np.arange(80) % 3).astype(dtype)
  y[7] = value
  return _vector_npz(t / "stray.npz", y_train=y)


# (name, args builder(tmp) -> CLI args after `run --out OUT TINY`, expected message): each used to
# print a traceback, or to leave a partial run directory behind.
START_CASES = [
    ("config get_config raises", lambda t: ["--config", _config_file(t, "c.py", "def get_config():\n  raise RuntimeError('boom')\n")],
     "running config file '{t}/c.py' failed: RuntimeError: boom (line 2)"),
    ("config syntax error", lambda t: ["--config", _config_file(t, "c.py", "def get_config( :\n")],
     "config file '{t}/c.py' has a syntax error at line 1: invalid syntax"),
    ("config JSON is a list", lambda t: ["--config", _config_file(t, "c.json", "[1, 2]")],
     "config file '{t}/c.json' must hold a JSON object of RunConfig fields, got a list"),
    ("config JSON with a bad field type", lambda t: ["--config", _config_file(t, "c.json", '{"label_noise": "lots"}')],
     "label_noise must be a number, got 'lots'"),
    ("empty .npz file", lambda t: ["--dataset", _config_file(t, "e.npz", "")],
     "dataset file '{t}/e.npz' is empty (0 bytes); an .npz dataset is a zip of x_train, y_train, x_test, y_test"),
    ("text file named .npz", lambda t: ["--dataset", _config_file(t, "e.npz", "hello\n")],
     "dataset file '{t}/e.npz' is not an .npz file (not a zip archive)"),
    ("--augment on vector data", lambda t: ["--dataset", _vector_npz(t / "v.npz"), "--augment"],
     "--augment (random flips and crops) needs image data; dataset '{t}/v.npz' has inputs of shape (5,): drop --augment"),
    ("stray huge label", lambda t: ["--dataset", _stray_label(t, 50_000_000)],
     "y_train's largest label 50000000 would make 50000001 classes, but only 4 distinct labels occur"),
    ("label above the int32 range", lambda t: ["--dataset", _stray_label(t, 2**32 + 1)],
     "y_train contains label 4294967297, outside the int32 range of class labels"),
    ("huge features", lambda t: ["--dataset", _vector_npz(t / "v.npz", scale=1e30)],
     "x_train has features as large as 1e+31 in magnitude"),
    ("empty --out", lambda t: ["--out", ""], "--out must name a directory, got an empty string"),
]


@pytest.mark.parametrize("name,make_args,needle", START_CASES, ids=[c[0] for c in START_CASES])
def test_start_failures_are_one_line_and_write_nothing(name, make_args, needle, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)  # `--out ""` used to write runs/... into the working directory
  out = tmp_path / "out"
  result = _main(capsys, "run", "--out", str(out), *TINY, *make_args(tmp_path))
  _assert_one_line_error(result, needle.format(t=tmp_path))
  assert not out.exists() and not (tmp_path / "runs").exists()


def test_failed_start_never_blocks_the_corrected_command(tmp_path, capsys):
  """A run directory whose start failed after its manifest was written (a crash, a kill) holds
  nothing of value: the corrected command takes it over instead of asking for --overwrite."""
  from jaxmem.config import RunConfig
  from jaxmem.data import load_dataset
  from jaxmem.run import build_manifest, plan_chunks
  out = tmp_path / "out"
  config = RunConfig(num_models=4, chunk_size=2, epochs=1, batch_size=32, augment=True)
  RunDir.create_or_open(out, build_manifest(config, load_dataset("digits"), plan_chunks(4, 1, 2)))
  result = _main(capsys, "run", "--out", str(out), *TINY)
  assert result.returncode == 0, result.stderr
  assert "holds no finished chunk of a run with another config (augment: True there, False now); starting anew" \
      in result.stderr
  assert RunDir.open(out).completed_chunks() == [0, 1]


def test_debug_after_the_command(tmp_path):
  result = jaxmem_cli("run", "--debug", "--out", str(tmp_path / "o"), *TINY, "--subset-ratio", "0")
  assert result.returncode != 0 and "Traceback" in result.stderr
  assert "JaxmemError: subset ratio must be in (0, 1), got 0.0" in result.stderr


MESSAGE_CASES = [
    (["run", *TINY, "--epochs", "1.5"],
     "argument --epochs: invalid int value: '1.5' (see jaxmem run --help)"),
    (["run", *TINY, "--bogus"], "unrecognized arguments: --bogus (see jaxmem run --help)"),
    (["scores", "/nonexistent-jaxmem-dir"], "run directory '/nonexistent-jaxmem-dir' does not exist"),
]


@pytest.mark.parametrize("args,needle", MESSAGE_CASES, ids=[c[1][:30] for c in MESSAGE_CASES])
def test_messages_say_it_once(args, needle, capsys):
  result = _main(capsys, *args)
  _assert_one_line_error(result, needle)
  assert result.stderr.count("jaxmem") == 1 + needle.count("jaxmem"), result.stderr


def test_tfds_message_offers_only_what_the_cli_has(tmp_path, capsys):
  result = _main(capsys, "run", "--out", str(tmp_path / "o"), *TINY, "--dataset", "tfds:mnist",
                 "--data-dir", str(tmp_path))
  _assert_one_line_error(result, f"dataset 'mnist' is not prepared in {tmp_path}")
  assert "pass download=True" not in result.stderr and "WARNING" not in result.stderr


def test_scores_summary_says_no_training(finished_run, tmp_path, capsys):
  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  result = _main(capsys, "scores", str(out))
  assert result.returncode == 0, result.stderr
  first = result.stdout.splitlines()[0]
  assert first == "models: 4 of 4 finished", first


def test_help_shows_defaults(capsys):
  from jaxmem.cli import main
  for command, expected in ((["run"], {"--num-models": "(default 256)", "--epochs": "(default 30)",
                                       "--batch-size": "(default 64)", "--seed": "(default 0)",
                                       "--subset-ratio": "(default 0.7)"}),
                            (["study", "remove-top"], {"--by": "(default memorization,random)"})):
    with pytest.raises(SystemExit):
      main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    text = text[text.index("options:"):]
    for option, needle in expected.items():
      start = text.index(option + " ")
      help_text = text[start: text.index(" --", start + len(option))]
      assert needle in help_text, (option, help_text)


# --- Two processes on one run directory; signals at every phase.

def _popen_run(out: Path, *flags):
  exe = Path(sys.executable).with_name("jaxmem")
  return subprocess.Popen([str(exe), "run", "--out", str(out), *flags], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_a_held_run_directory_is_refused_and_a_stale_lock_replaced(tmp_path, capsys):
  """In-process: a lock held (here by this test, as another process would) refuses a second run
  with one line naming the holder and writes nothing. A holder killed with SIGKILL leaves its pid
  file but no lock (the kernel drops it): the next run says so and proceeds."""
  from jaxmem.lock import RunLock
  out = tmp_path / "run"
  with RunLock(out):
    result = _main(capsys, "run", "--out", str(out), *TINY)
    _assert_one_line_error(result, f"run directory '{out}' is in use by jaxmem process {os.getpid()} on ")
    assert result.stderr.rstrip().endswith("wait for it to finish or stop it (Ctrl-C saves its chunk in progress)")
    assert sorted(p.name for p in out.iterdir()) == [".jaxmem-lock"]  # nothing else written
  assert not out.exists()  # the lock made the directory, and took it away again
  out.mkdir()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (out / ".jaxmem-lock").write_text(f'{{"pid": {dead.pid}, "host": "{os.uname().nodename}", "since": "earlier"}}\n')
  result = _main(capsys, "run", "--out", str(out), *TINY)
  assert result.returncode == 0, result.stderr
  assert f"removed a stale lock of process {dead.pid} (no longer holds it)" in result.stderr
  assert not (out / ".jaxmem-lock").exists()


def test_a_failed_start_leaves_no_lock_and_no_directory(tmp_path, capsys):
  out = tmp_path / "run"
  result = _main(capsys, "run", "--out", str(out), *TINY, "--dataset", _vector_npz(tmp_path / "v.npz"), "--augment")
  assert result.returncode == 2 and not out.exists()


def test_shards_share_a_directory_but_not_a_shard(tmp_path):
  from jaxmem.errors import JaxmemError
  from jaxmem.lock import RunLock
  out = tmp_path / "run"
  with RunLock(out, shard=(0, 2)), RunLock(out, shard=(1, 2)):
    with pytest.raises(JaxmemError, match=r"is in use by jaxmem process \d+ .*\(shard 0/2\)"):
      RunLock(out, shard=(0, 2)).acquire()
    with pytest.raises(JaxmemError, match=r"is in use by jaxmem process \d+ .*\(shard [01]/2\)"):
      RunLock(out).acquire()
  with RunLock(out):
    with pytest.raises(JaxmemError, match=r"is in use by jaxmem process \d+ on "):
      RunLock(out, shard=(1, 2)).acquire()


@pytest.mark.slow
def test_two_runs_started_at_once(tmp_path):
  """Both processes start together: one trains, the other refuses with one line; the result equals
  an uninterrupted run's export bitwise."""
  flags = ["--num-models", "8", "--chunk-size", "2", "--epochs", "4", "--batch-size", "64", "--strategy", "vmap",
           "--no-progress"]
  out = tmp_path / "conc"
  processes = [_popen_run(out, *flags) for _ in range(2)]
  results = [(p.wait(timeout=600), *p.communicate()) for p in processes]
  codes = sorted(code for code, _, _ in results)
  assert codes == [0, 2], [(c, e[-2000:]) for c, _, e in results]
  refusal = next(err for code, _, err in results if code == 2)
  _assert_one_line_error(SimpleNamespace(returncode=2, stderr=refusal), f"run directory '{out}' is in use by jaxmem process ")
  reference = tmp_path / "ref"
  assert jaxmem_cli("run", "--out", str(reference), *flags).returncode == 0
  for run in (out, reference):
    assert jaxmem_cli("export", str(run), str(run) + ".npz").returncode == 0
  with np.load(str(out) + ".npz") as a, np.load(str(reference) + ".npz") as b:
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _double_interrupt(tmp_path: Path, trial: int) -> tuple[int, str]:
  """A tiny run hit by two SIGINTs at a random moment (start-up, training, scoring or writing) and a
  random gap: the process must exit 130 with one line, never die by a signal."""
  rng = np.random.default_rng(trial)
  flags = ["--num-models", "4", "--chunk-size", "2", "--epochs", "3", "--batch-size", "64", "--strategy", "vmap",
           "--no-progress", "--checkpoint-every", "1"]
  process = _popen_run(tmp_path / f"run{trial}", *flags)
  time.sleep(float(rng.uniform(0.5, 9.0)))
  process.send_signal(signal.SIGINT)
  time.sleep(float(rng.uniform(0.0, 0.3)))
  if process.poll() is None:
    process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=600)
  return process.returncode, stderr


def _check_double_interrupt(code: int, stderr: str) -> None:
  assert code in (0, 130), (code, stderr[-3000:])  # 0: the run had finished before the first signal
  assert "Traceback" not in stderr and "Segmentation" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
  if code == 130:
    assert stderr.strip().splitlines()[-1].startswith("jaxmem: "), stderr[-3000:]


@pytest.mark.parametrize("trial", [0, 1])
def test_a_second_ctrl_c_exits_130_not_by_a_signal(tmp_path, trial):
  _check_double_interrupt(*_double_interrupt(tmp_path, trial))


def test_ctrl_c_while_the_interpreter_shuts_down_is_not_a_death_by_signal(tmp_path):
  """The window the random-moment test above hit in CI (exit -2, nothing on stderr): the command has
  printed its last line and Python is tearing down (XLA, orbax threads), where the interpreter puts
  the default SIGINT action back. Signals sent from then until the exit must not kill the process."""
  flags = ["--num-models", "2", "--chunk-size", "2", "--epochs", "1", "--batch-size", "64", "--strategy", "vmap",
           "--no-progress"]
  process = subprocess.Popen([str(Path(sys.executable).with_name("jaxmem")), "run", "--out", str(tmp_path / "run"),
                              *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in process.stdout:
    if line.startswith("files: "):  # the run's last line: everything is written
      break
  while process.poll() is None:
    process.send_signal(signal.SIGINT)
    time.sleep(0.005)
  stderr = process.stderr.read()
  assert process.returncode == 0, (process.returncode, stderr[-3000:])
  assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]


def test_a_signal_after_the_command_finished_keeps_its_code_and_output():
  """Root cause of the test above failing under load (exit 130 and "stopped; ... rerun" after the
  run had written everything, 5 of 6 tries at load ~9 with PYTHONUNBUFFERED=1): the reader sees the
  last line as soon as it is printed, and its SIGINT reached the handler while the command was still
  returning (freeing its results, flushing), which took it for an interruption. Once a command has
  done its work (``StopRequest.finish``; run, merge and scores call it before printing their
  summary), a first signal lets it end with its own code; a second ends it at once, same code."""
  script = ("import os, signal, sys, time\n"
            "from jaxmem.signals import stop_on_signals\n"
            "with stop_on_signals() as stop:\n"
            "  stop.finish(3)\n"
            "  os.kill(os.getpid(), signal.SIGINT)\n"
            "  time.sleep(0.2)\n"
            "  print('flushed', flush=True)\n"
            "  os.kill(os.getpid(), signal.SIGTERM)\n"
            "  time.sleep(5)\n"
            "  print('not reached', flush=True)\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
  assert (result.returncode, result.stdout, result.stderr) == (3, "flushed\n", "")


def test_a_signal_line_under_a_progress_bar_starts_on_its_own_line(capfd):
  """test_signals_during_other_commands (slow) failed: the onion study's stop line was glued to its
  progress bar ('training:   0%| ... ]jaxmem: SIGINT: stopped ...'), so it was not a line of its own."""
  from tqdm.std import tqdm
  from jaxmem.signals import _say
  with tqdm(total=3, file=sys.stderr) as bar:
    bar.update(1)
    _say("jaxmem: SIGINT: stopped")
  err = capfd.readouterr().err
  assert "\njaxmem: SIGINT: stopped\n" in err, err
  _say("jaxmem: SIGINT: stopped")  # no bar open: no blank line
  assert capfd.readouterr().err == "jaxmem: SIGINT: stopped\n"


@pytest.mark.slow
def test_a_second_ctrl_c_exits_130_not_by_a_signal_20_times(tmp_path):
  for trial in range(100, 120):
    _check_double_interrupt(*_double_interrupt(tmp_path, trial))


def test_onion_says_how_many_rows_are_undefined():
  """Examples left without a risk after retraining (too few in or out models) are counted and said."""
  from jaxmem.studies.onion import OnionResult, _point, format_onion
  before = np.array([0.9, 0.5, 0.2, 0.85, 0.3, 0.7])
  after = np.array([np.nan, 0.9, np.nan, 0.5, np.nan, 0.6])
  kept = np.arange(1, 6)  # example 0 removed
  point = _point("top", 1, kept, before, after, 0.8, "runs/top-k1")
  assert point.undefined_after == 2  # examples 2 and 4: scored before, not after
  lines = format_onion(OnionResult(Path("o"), 0.8, [point], before, {"top-k1": after}, Path("o/onion.csv")))
  assert any("2 of the 5 examples left have no risk after retraining" in line for line in lines), lines


def test_study_output_on_an_unwritable_path(finished_run, tmp_path, capsys):
  (tmp_path / "file").write_text("x")
  for study in (["onion", str(finished_run), "--remove", "5"], ["remove-top", str(finished_run), "--k", "0,5"]):
    result = _main(capsys, "study", *study, "--out", str(tmp_path / "file" / "sub"))
    _assert_one_line_error(result, f"cannot create study directory '{tmp_path / 'file' / 'sub'}': Not a directory")


# --- Bad inputs and faults found by trying every command as a new user (README, hostile-input table).

def _damage(out: Path, what: str) -> None:
  run = RunDir.open(out)
  if what == "truncated scores.csv":
    (out / "scores.csv").write_bytes((out / "scores.csv").read_bytes()[:100])
  elif what == "truncated design.npz":
    (out / "design.npz").write_bytes((out / "design.npz").read_bytes()[:200])
  elif what == "manifest without a chunk plan":
    import json
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["chunks"]
    (out / "manifest.json").write_text(json.dumps(manifest))
  elif what == "checksum file garbage":
    run.chunk_path(0).with_suffix(".json").write_text("{not json")
  elif what == "chunk records deleted":
    run.chunk_path(0).unlink()
  else:
    raise AssertionError(what)


# (name, damage, command builder(out, tmp), expected: ("error", message) or ("warning", stderr line))
DAMAGE_CASES = [
    ("truncated scores.csv", lambda o, t: ["report", str(o)],
     ("error", "scores.csv in '{o}' is damaged or from another run (0 rows, the run has 1347 training examples); "
               "rerun `jaxmem scores {o}`")),
    ("truncated design.npz", lambda o, t: ["scores", str(o)],
     ("error", "design.npz in '{o}' is damaged (File is not a zip file); rerun the run's `jaxmem run` command")),
    ("truncated design.npz", lambda o, t: ["export", str(o), str(t / "e.npz")],
     ("error", "design.npz in '{o}' is damaged (File is not a zip file)")),
    ("manifest without a chunk plan", lambda o, t: ["merge", str(o)],
     ("error", "manifest '{o}/manifest.json' lacks a valid 'chunks' entry (the chunk plan)")),
    ("checksum file garbage", lambda o, t: ["scores", str(o)],
     ("warning", "chunk 0 in {o} failed its checksum; left out (rerun `jaxmem run` to train it again)")),
    ("chunk records deleted", lambda o, t: ["export", str(o), str(t / "e.npz")],
     ("warning", "1 of 2 chunks (2 models) are not complete yet: chunks 0; using the complete ones")),
]


@pytest.mark.parametrize("damage,command,expected", DAMAGE_CASES,
                         ids=[f"{c[0]} ({c[1](Path('o'), Path('t'))[0]})" for c in DAMAGE_CASES])
def test_damaged_run_files(damage, command, expected, finished_run, tmp_path, capsys):
  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  _damage(out, damage)
  result = _main(capsys, *command(out, tmp_path))
  kind, message = expected
  if kind == "error":
    _assert_one_line_error(result, message.format(o=out))
    assert not (tmp_path / "e.npz").exists()
  else:
    assert result.returncode == 0, result.stderr
    assert message.format(o=out) in result.stderr.splitlines(), result.stderr


# (name, CLI args, expected message): checked before any work, nothing written.
OWN_INPUT_CASES = [
    ("report --top 0", lambda o, t: ["report", str(o), "--top", "0"],
     "top must be a positive number of examples per gallery, got 0"),
    ("bench --repeats 0", lambda o, t: ["bench", "--quick", "--workloads", "digits-mlp", "--repeats", "0"],
     "--repeats must be a positive integer, got 0"),
    ("bench --models -1", lambda o, t: ["bench", "--quick", "--workloads", "digits-mlp", "--models", "-1"],
     "--models must be a positive integer, got -1"),
    ("scores on a file", lambda o, t: ["scores", str(o / "manifest.json")], "'{o}/manifest.json' is a file, not a run directory"),
    ("merge --from a missing directory", lambda o, t: ["merge", str(o), "--from", str(t / "nope")],
     "run directory '{t}/nope' does not exist"),
    ("seed beyond 2**32", lambda o, t: ["run", "--out", str(t / "new"), *TINY, "--seed", str(10**23)],
     "seed must be an integer in [0, 2**32), got 100000000000000000000000"),
    ("model options that cannot build", lambda o, t: ["run", "--out", str(t / "new"), *TINY, "--config",
                                                      _config_file(t, "m.json", '{"model_options": {"hidden_sizes": "big"}}')],
     "model 'mlp' with options {{'hidden_sizes': 'big'}} cannot be built for inputs of shape (8, 8, 1): "),
    ("unknown model option", lambda o, t: ["run", "--out", str(t / "new"), *TINY, "--config",
                                           _config_file(t, "m.json", '{"model_options": {"nonsense": 1}}')],
     "bad options {{'nonsense': 1}} for model 'mlp'"),
    ("remove-top by a column scores.csv lacks", lambda o, t: ["study", "remove-top", str(o), "--by", "nope"],
     "unknown ranking 'nope'; choose random or a score column of scores.csv"),
    ("onion threshold 2", lambda o, t: ["study", "onion", str(o), "--threshold", "2"],
     "threshold must be in (0.5, 1] (a per-example attack AUC), got 2.0"),
    ("ssft with 0 models", lambda o, t: ["study", "ssft", "--out", str(t / "new"), "--num-models", "0"],
     "num_models, first_epochs and second_epochs must be >= 1, got 0"),
    ("an existing file that is not an .npz", lambda o, t: ["run", "--out", str(t / "new"), *TINY, "--dataset",
                                                           _config_file(t, "passwd", "root:x:0:0\n")],
     "dataset file '{t}/passwd' is not an .npz file (not a zip archive)"),
    ("string features in an .npz", lambda o, t: ["run", "--out", str(t / "new"), *TINY, "--dataset",
                                                 _vector_npz(t / "s.npz", x_train=np.full((80, 5), "a"))],
     "x_train must be numeric, got dtype <U1"),
    ("float labels in an .npz", lambda o, t: ["run", "--out", str(t / "new"), *TINY, "--dataset",
                                              _vector_npz(t / "s.npz", y_train=np.arange(80) % 3 + 0.5)],
     "y_train must hold integer class labels, got dtype float64"),
    ("a single class", lambda o, t: ["run", "--out", str(t / "new"), *TINY, "--dataset",
                                     _vector_npz(t / "s.npz", y_train=np.zeros(80, int), y_test=np.zeros(10, int))],
     "num_classes must be an integer >= 2, got 1"),
    ("empty --subset-ratios", lambda o, t: ["run", "--out", str(t / "new"), *TINY, "--subset-ratios", ""],
     "subset_ratios must name at least one ratio"),
]


@pytest.mark.parametrize("name,command,needle", OWN_INPUT_CASES, ids=[c[0] for c in OWN_INPUT_CASES])
def test_own_bad_inputs(name, command, needle, finished_run, tmp_path, capsys):
  before = _listing(finished_run)
  result = _main(capsys, *command(finished_run, tmp_path))
  _assert_one_line_error(result, needle.format(o=finished_run, t=tmp_path))
  assert not (tmp_path / "new").exists() and _listing(finished_run) == before


def test_a_membership_mask_larger_than_memory_is_refused(tmp_path, capsys, monkeypatch):
  """Twenty million models used to die allocating a 25 GiB mask with a traceback (here: a 1 GiB
  machine and a million models, 1.3 GiB)."""
  monkeypatch.setattr(importlib.import_module("jaxmem.run"), "_host_memory_bytes", lambda: 2**30)  # jaxmem.run: the function
  result = _main(capsys, "run", "--out", str(tmp_path / "new"), *TINY, "--num-models", "1000000")
  _assert_one_line_error(result, "num_models 1000000 x 1347 training examples needs a 1.3 GiB membership mask, "
                                 "more than half of this machine's 1 GiB")
  assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_signals_during_other_commands(finished_run, tmp_path):
  """SIGINT or SIGTERM while `scores`, `report`, `export` or a study works: one line naming what is
  intact, exit 128 + signal number, never a traceback or a signal death."""
  exe = Path(sys.executable).with_name("jaxmem")
  for command, sig, delay in ((["scores", str(finished_run)], signal.SIGINT, 3.0),
                              (["report", str(finished_run)], signal.SIGTERM, 3.0),
                              (["export", str(finished_run), str(tmp_path / "e.npz")], signal.SIGINT, 0.3),
                              (["study", "onion", str(finished_run), "--remove", "5", "--no-control", "--out",
                                str(tmp_path / "onion")], signal.SIGINT, 5.0)):
    process = subprocess.Popen([str(exe), *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=600)
    if process.returncode == 0:
      continue  # it finished first
    assert process.returncode == 128 + sig, (command, process.returncode, stderr[-2000:])
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith(f"jaxmem: {sig.name}: stopped")


def _readme_python_example() -> str:
  readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
  section = readme[readme.index("## Python API"):]
  return section[section.index("```python") + len("```python"): section.index("```", section.index("```python") + 9)]


def test_readme_python_example_sets_up_devices_and_fits():
  """The example calls the one-device-per-core setup, trains long enough to fit (the default 30
  epochs: 10 found flipped labels at AUROC 0.61 only) and the README says how long the tests take."""
  code = _readme_python_example()
  assert "use_one_cpu_device_per_core()" in code and "epochs=10" not in code and "label_noise=0.1" in code
  readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
  stated = re.search(r"The default suite \((\d+) tests\) took (\d+) minutes of tests, (\d+) minutes with the install",
                     readme)
  assert stated, "the README must say how many tests the default suite has and how long it takes"
  collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", str(Path(__file__).parent)],
                             capture_output=True, text=True, timeout=300).stdout
  count = int(re.search(r"(\d+)(?:/\d+)? tests collected", collected).group(1))
  assert abs(int(stated.group(1)) - count) <= 0.15 * count, (stated.group(0), count)  # kept roughly current


@pytest.mark.slow
def test_readme_python_example_finds_flipped_labels(tmp_path, capsys):
  code = _readme_python_example().replace('"runs/api-demo"', repr(str(tmp_path / "api-demo")))
  exec(compile(code, "README.md", "exec"), {})
  auroc = float(capsys.readouterr().out.strip().splitlines()[-1])
  assert auroc >= 0.95, auroc


# --- More bad inputs to the other commands (each was a traceback, a silent no-op or a change
# made before the refusal).

@pytest.mark.parametrize("args, needle", [
    (["plan", "--dataset", "tfds:mnist", "--num-train", "-5", "--num-test", "10"],
     "--num-train must be a positive number of examples, got -5"),
    (["plan", "--num-test", "0"], "--num-test must be a positive number of examples, got 0"),
    (["scores", "RUN", "--bootstrap-seed", "-1"],
     "argument --bootstrap-seed: a seed must be an integer in [0, 2**32), got -1"),
    (["study", "remove-top", "RUN", "--seed", "-1", "--k", "0"],
     "argument --seed: a seed must be an integer in [0, 2**32), got -1"),
    (["study", "attack-refs", "RUN", "--seed", "4294967296"],
     "argument --seed: a seed must be an integer in [0, 2**32), got 4294967296"),
    (["bench", "scoring", "--num-train", "10", "--num-test", "5", "--num-models", "4", "--seed", "-2"],
     "argument --seed: a seed must be an integer in [0, 2**32), got -2"),
    (["study", "attack-refs", "RUN", "--refs", "1,2", "--targets", "1", "--bootstrap", "-5"],
     "argument --bootstrap: bootstrap resamples must be an integer >= 2, got -5"),
    (["study", "proxies", "RUN", "--models", "1", "--bootstrap", "0"],
     "argument --bootstrap: bootstrap resamples must be an integer >= 2, got 0"),
    # checked before the models are trained again (it used to say "training 1 models again" first)
    (["study", "proxies", "RUN", "--models", "1", "--h", "-1"], "curvature step h must be positive, got -1.0"),
    (["study", "proxies", "RUN", "--models", "1", "--draws", "0"], "curvature needs at least one Rademacher draw, got 0"),
])
def test_bad_sizes_and_seeds_of_other_commands(capsys, finished_run, args, needle):
  """`plan --num-train -5` (TFDS shapes) was a numpy traceback; a negative seed of a study or of the
  bootstrap was one from numpy's SeedSequence."""
  result = _main(capsys, *[str(finished_run) if a == "RUN" else a for a in args])
  _assert_one_line_error(result, needle)


def test_attack_metrics_refuse_fewer_than_two_resamples():
  from jaxmem.errors import JaxmemError
  from jaxmem.scores.attack_metrics import bootstrap_attack_metrics
  with pytest.raises(JaxmemError, match="bootstrap resamples must be an integer >= 2, got 0"):
    bootstrap_attack_metrics(np.zeros((1, 4)), np.array([[True, False, True, False]]), num_bootstrap=0)


@pytest.mark.parametrize("flag, value", [("--influence-threshold", "nan"), ("--memorization-threshold", "inf")])
def test_a_non_finite_pair_threshold_is_refused(capsys, finished_run, tmp_path, flag, value):
  """A NaN threshold compares false with every influence: it used to find no pair and exit 0."""
  run = tmp_path / "run"
  shutil.copytree(finished_run, run)
  before = (run / "scores.csv").read_bytes()
  result = _main(capsys, "scores", str(run), "--estimators", "memorization,influence", flag, value)
  _assert_one_line_error(result, f"{flag} must be a finite number, got {value}")
  assert (run / "scores.csv").read_bytes() == before


def test_merge_with_an_unknown_estimator_copies_nothing(capsys, finished_run, tmp_path):
  """`merge --from SRC --estimators nope` used to copy SRC's chunks in and only then refuse."""
  run = tmp_path / "run"
  shutil.copytree(finished_run, run)
  for path in (run / "chunks").glob("chunk_00001.*"):
    path.unlink()
  listing = _listing(run)
  result = _main(capsys, "merge", str(run), "--from", str(finished_run), "--estimators", "nope")
  _assert_one_line_error(result, "unknown estimator 'nope'; choose one of: ")
  assert _listing(run) == listing


@pytest.mark.parametrize("damage", ["binary", "text cells"])
def test_report_survives_damaged_optional_tables(capsys, finished_run, tmp_path, damage):
  """A damaged influence table or correlations.csv used to be a traceback (UnicodeDecodeError,
  or a ValueError converting a text cell) that lost the whole report; now its section says what is
  damaged and how to write it again. A binary scores.csv is the one-line refusal of a truncated one."""
  run = tmp_path / "run"
  shutil.copytree(finished_run, run)
  for name in ("influence_pairs.csv", "influence_topk.csv", "correlations.csv"):
    if damage == "binary":
      (run / name).write_bytes(b"\x00\xff\xfe")
    else:
      header = (run / name).read_text().splitlines()[0]
      (run / name).write_text(header + "\n" + ",".join("x" * 3 for _ in header.split(",")) + "\n")
  result = _main(capsys, "report", str(run))
  assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
  html = (run / "report" / "index.html").read_text()
  assert "influence_pairs.csv and influence_topk.csv in this run are damaged" in html
  if damage == "binary":
    assert "<code>correlations.csv</code> is damaged" in html
    (run / "scores.csv").write_bytes(b"\x00\xff\xfe")
    _assert_one_line_error(_main(capsys, "report", str(run)), "scores.csv in ")
