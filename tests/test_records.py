"""The record store: lazy Records read by blocks of examples and of models, old run directories,
chunk files written in one pass, exports, and the simulated records of `jaxmem bench scoring`."""

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest

from jaxmem import cli
from jaxmem.bench_scoring import Simulation, bench_scoring, write_simulated_run
from jaxmem.errors import JaxmemError
from jaxmem.records import (FORMAT_VERSION, Records, RowBlocks, RunDir, export_records, npz_member, npz_members,
                            utc_now, write_npz_atomic)

# Model ids of each chunk: not in id order, chunks of unequal size.
PLAN = [[3, 0, 5], [1, 4], [2, 6, 7, 8]]
M, N, T, E, A = 9, 45, 11, 3, 2


def _arrays(seed=0):
  """Records of M models over N examples, indexed by model id (rows 0..M-1)."""
  rng = np.random.default_rng(seed)
  keep_MxN = rng.random((M, N)) < 0.5
  return keep_MxN, {
      "train_correct": rng.random((M, N)) < 0.7,
      "train_margin": rng.normal(size=(M, N)).astype(np.float32),
      "train_margin_aug": rng.normal(size=(M, N, A)).astype(np.float32),
      "test_margin_aug": rng.normal(size=(M, T, A)).astype(np.float32),
      "test_correct": rng.random((M, T)) < 0.6,
      "test_margin": rng.normal(size=(M, T)).astype(np.float32),
      "epoch_loss": rng.random((M, E)).astype(np.float32),
      "train_correct_epochs": rng.random((M, E, N)) < 0.5,
      "train_el2n": rng.random((M, N)).astype(np.float32)}


def _design(keep_MxN):
  labels = np.arange(N) % 4
  return {"keep": keep_MxN, "subset_ratio": np.full(M, 0.5, np.float32), "train_labels": labels,
          "clean_train_labels": labels, "test_labels": np.arange(T) % 4, "noisy": np.zeros(N, bool)}


def _chunk(keep_MxN, arrays, ids):
  ids = np.asarray(ids)
  chunk = {"model_ids": ids, "keep": keep_MxN[ids], "num_epochs": np.int64(E)}  # a scalar is not a record
  for name, value in arrays.items():
    if name == "train_correct_epochs":  # as the engine writes it: bits packed along N
      chunk[f"{name}_packed"] = np.packbits(value[ids], axis=-1)
    else:
      chunk[name] = value[ids]
  return chunk


def _make_run(path, keep_MxN, arrays, *, old_format=False):
  """A run directory of PLAN's chunks. ``old_format``: files made the way jaxmem wrote them before
  the record store streamed (np.savez into memory, sha256 of those bytes)."""
  path.mkdir(parents=True)
  (path / "chunks").mkdir()
  manifest = {"format": "jaxmem-run", "format_version": FORMAT_VERSION, "identity": {}, "config": {},
              "chunks": PLAN, "created": utc_now(), "dataset": {"fingerprint": "test"}}
  (path / "manifest.json").write_text(json.dumps(manifest))
  run = RunDir.open(path)
  if not old_format:
    write_npz_atomic(path / "design.npz", _design(keep_MxN))
    for c, ids in enumerate(PLAN):
      run.write_chunk(c, _chunk(keep_MxN, arrays, ids))
    return run
  np.savez(path / "design.npz", **_design(keep_MxN))
  for c, ids in enumerate(PLAN):
    buffer = io.BytesIO()
    np.savez(buffer, **_chunk(keep_MxN, arrays, ids))
    run.chunk_path(c).write_bytes(buffer.getvalue())
    run.chunk_path(c).with_suffix(".json").write_text(json.dumps(
        {"sha256": hashlib.sha256(buffer.getvalue()).hexdigest(), "model_ids": ids, "written": utc_now()}))
  return RunDir.open(path)


@pytest.fixture(params=["new", "old"])
def on_disk(request, tmp_path):
  keep_MxN, arrays = _arrays()
  run = _make_run(tmp_path / "run", keep_MxN, arrays, old_format=request.param == "old")
  return run.load_records(), Records.from_arrays(keep=keep_MxN, arrays=arrays)


def test_whole_records_equal_the_arrays_written(on_disk):
  lazy, memory = on_disk
  assert lazy.record_names() == memory.record_names() == sorted(_arrays()[1])
  np.testing.assert_array_equal(lazy.model_ids, np.arange(M))
  np.testing.assert_array_equal(lazy.keep, memory.keep)
  for name in memory.record_names():
    assert lazy[name].dtype == memory[name].dtype and lazy.axes(name) == memory.axes(name), name
    np.testing.assert_array_equal(lazy[name], memory[name], err_msg=name)
  assert lazy.axes("train_correct_epochs") == "MEN" and lazy.axes("train_margin_aug") == "MNA"
  assert lazy.axes("test_margin_aug") == "MTA" and lazy["test_margin_aug"].shape == (M, T, A)
  assert lazy.axes("test_margin") == "MT" and lazy.axes("keep") == "MN"
  assert "train_correct_epochs" in lazy and "train_correct_epochs_packed" not in lazy and "keep" not in lazy


@pytest.mark.parametrize("block", [1, 3, 7, 8, 9, 16, 44, 45, 100])
def test_blocks_of_any_size_give_the_same_bits(on_disk, block):
  lazy, memory = on_disk
  for name in ["keep", *memory.record_names()]:
    axes = memory.axes(name)
    parts = [lazy.read(name, examples=b) for b in lazy.example_blocks(block)]
    if "N" in axes:
      got = np.concatenate(parts, axis=axes.index("N"))
    else:  # test and per-epoch records come whole with every block
      got = parts[0]
      for part in parts[1:]:
        np.testing.assert_array_equal(part, got)
    assert got.dtype == (bool if name == "keep" else memory[name].dtype)
    np.testing.assert_array_equal(got, memory.read(name), err_msg=f"{name}, block {block}")


@pytest.mark.parametrize("models", [[7, 0, 3], slice(2, 7), slice(None, None, 2), np.arange(M) % 3 == 0, [4]])
def test_reading_by_model_rows(on_disk, models):
  lazy, memory = on_disk
  for name in ["keep", *memory.record_names()]:
    np.testing.assert_array_equal(lazy.read(name, models=models), memory.read(name)[models], err_msg=name)
    np.testing.assert_array_equal(lazy.read(name, models=models, examples=slice(5, 30)),
                                  memory.read(name, models=models, examples=slice(5, 30)), err_msg=name)
  rows = np.arange(M)[models]
  subset = lazy.select_models(models)
  np.testing.assert_array_equal(subset.model_ids, rows)
  np.testing.assert_array_equal(subset["train_correct_epochs"], memory["train_correct_epochs"][rows])
  np.testing.assert_array_equal(subset.read("train_margin_aug", models=[0], examples=slice(1, 9)),
                                memory["train_margin_aug"][rows[:1], 1:9])
  assert subset.num_models == len(rows) and subset.num_train == N


def test_an_old_run_directory_loads_lazily(tmp_path):
  keep_MxN, arrays = _arrays(seed=3)
  run = _make_run(tmp_path / "old", keep_MxN, arrays, old_format=True)
  with zipfile.ZipFile(run.chunk_path(0)) as f:  # really the old layout: sizes in the local headers
    assert not any(i.flag_bits & 0x08 for i in f.infolist())
  assert run.completed_chunks() == [0, 1, 2]
  records = run.load_records()
  np.testing.assert_array_equal(records.read("train_correct_epochs", examples=slice(8, 17)),
                                arrays["train_correct_epochs"][:, :, 8:17])


def test_chunk_file_is_an_npz_and_its_checksum_is_of_its_bytes(tmp_path):
  keep_MxN, arrays = _arrays()
  run = _make_run(tmp_path / "run", keep_MxN, arrays)
  data = run.chunk_path(1).read_bytes()
  meta = json.loads(run.chunk_path(1).with_suffix(".json").read_text())
  assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["model_ids"] == PLAN[1]
  with np.load(run.chunk_path(1)) as f:
    np.testing.assert_array_equal(f["train_margin_aug"], arrays["train_margin_aug"][PLAN[1]])
    assert f["num_epochs"] == E
  member = npz_member(run.chunk_path(1), "train_margin_aug")
  assert isinstance(member, np.memmap) and member.shape == (2, N, A)


def test_a_chunk_written_here_is_not_hashed_again(tmp_path, monkeypatch):
  keep_MxN, arrays = _arrays()
  run = _make_run(tmp_path / "run", keep_MxN, arrays)

  def no_rereading(*args, **kwargs):
    raise AssertionError("the chunk was read again to verify it")

  monkeypatch.setattr(hashlib, "file_digest", no_rereading)
  assert run.completed_chunks() == [0, 1, 2]
  monkeypatch.undo()
  again = RunDir.open(run.path)  # another process (no memory of the write) verifies by reading
  assert again.completed_chunks() == [0, 1, 2]


def test_chunks_that_disagree_with_the_design_are_refused(tmp_path):
  keep_MxN, arrays = _arrays()
  run = _make_run(tmp_path / "run", keep_MxN, arrays)
  other = keep_MxN.copy()
  other[4, 10] = ~other[4, 10]
  write_npz_atomic(run.path / "design.npz", _design(other))
  with pytest.raises(JaxmemError, match="do not match its membership design"):
    run.load_records()


def test_export_is_what_the_in_memory_export_wrote(tmp_path):
  """The export of lazy records equals, key by key and in key order, the .npz the former export
  wrote (np.savez of every record in memory, contract keys first)."""
  keep_MxN, arrays = _arrays()
  run = _make_run(tmp_path / "run", keep_MxN, arrays)
  records = run.load_records()
  keys = export_records(records, tmp_path / "lazy.npz")
  design = _design(keep_MxN)
  np.savez(tmp_path / "former.npz", keep=keep_MxN, train_labels=design["train_labels"],
           test_labels=design["test_labels"], noisy=design["noisy"], subset_ratio=design["subset_ratio"],
           model_ids=np.arange(M), clean_train_labels=design["clean_train_labels"],
           **{name: arrays[name] for name in sorted(arrays)})
  with np.load(tmp_path / "lazy.npz") as got, np.load(tmp_path / "former.npz") as expected:
    assert got.files == expected.files and keys == sorted(expected.files)
    for name in expected.files:
      assert got[name].dtype == expected[name].dtype, name
      np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_row_blocks_write_the_array_np_save_writes(tmp_path):
  rng = np.random.default_rng(1)
  value = rng.normal(size=(10, 3, 4)).astype(np.float32)
  blocks = RowBlocks(value.shape, value.dtype, lambda: (value[i: i + 4] for i in range(0, 10, 4)))
  write_npz_atomic(tmp_path / "a.npz", {"value": blocks, "small": np.arange(3)})
  with np.load(tmp_path / "a.npz") as f:
    np.testing.assert_array_equal(f["value"], value)
    np.testing.assert_array_equal(f["small"], np.arange(3))
  np.testing.assert_array_equal(npz_member(tmp_path / "a.npz", "value"), value)
  short = RowBlocks((11, 3, 4), value.dtype, lambda: iter([value]))
  with pytest.raises(ValueError, match="10 rows, expected 11"):
    write_npz_atomic(tmp_path / "b.npz", {"value": short})
  assert not (tmp_path / "b.npz").exists()


def test_compressed_and_empty_members(tmp_path):
  np.savez_compressed(tmp_path / "c.npz", a=np.arange(6).reshape(2, 3), e=np.zeros((0, 4), np.float32))
  np.testing.assert_array_equal(npz_member(tmp_path / "c.npz", "a"), np.arange(6).reshape(2, 3))
  np.savez(tmp_path / "u.npz", e=np.zeros((0, 4), np.float32))
  assert npz_member(tmp_path / "u.npz", "e").shape == (0, 4)


def test_block_size_for_a_memory_budget():
  keep_MxN, arrays = _arrays()
  records = Records.from_arrays(keep=keep_MxN, arrays=arrays)
  # per example: keep M bytes + train_margin M*A*4 + per-epoch M*E bools; test_margin M*T*4 whole
  per_example = M + M * A * 4 + M * E
  fixed = M * T * 4
  names = ["keep", "train_margin_aug", "train_correct_epochs", "test_margin"]
  assert records.block_size_for(fixed + 7 * per_example, names) == 7
  assert records.block_size_for(fixed + 7 * per_example + per_example - 1, names) == 7
  assert records.block_size_for(10**9, names) == N
  assert records.block_size_for(1, ["test_margin"]) == N  # nothing grows with the block
  with pytest.raises(JaxmemError, match="too small"):
    records.block_size_for(fixed + per_example - 1, names)
  block = records.block_size_for(fixed + 7 * per_example, names)
  first = next(records.example_blocks(block))
  assert sum(records.read(n, examples=first).nbytes for n in names) <= fixed + 7 * per_example


def test_simulated_records_are_deterministic_and_depend_on_membership(tmp_path):
  simulation = Simulation(num_train=300, num_test=40, num_models=12, subset_ratios=(0.3, 0.7), queries=2, seed=5)
  first = simulation.chunk_records([4, 9])
  again = simulation.chunk_records([4, 9])
  for name in first:
    np.testing.assert_array_equal(first[name], again[name], err_msg=name)
  other = Simulation(num_train=300, num_test=40, num_models=12, subset_ratios=(0.3, 0.7), queries=2, seed=6)
  assert not np.array_equal(other.chunk_records([4, 9])["train_margin_aug"], first["train_margin_aug"])
  np.testing.assert_array_equal(first["train_margin_aug"][..., 0], first["train_margin"])
  np.testing.assert_array_equal(first["test_margin_aug"][..., 0], first["test_margin"])
  a = write_simulated_run(simulation, tmp_path / "a", log=lambda m: None)
  b = write_simulated_run(simulation, tmp_path / "b", log=lambda m: None)
  for c in range(len(simulation.chunks())):
    assert a.chunk_path(c).read_bytes() == b.chunk_path(c).read_bytes()
  assert (a.path / "design.npz").read_bytes() == (b.path / "design.npz").read_bytes()
  records = a.load_records()
  keep, correct = records.keep, records["train_correct"]
  np.testing.assert_array_equal(records.read("keep", models=[4, 9]), first["keep"])
  np.testing.assert_array_equal(records.subset_ratio, np.tile(np.float32([0.3, 0.7]), 6))
  assert records.axes("train_margin_aug") == "MNA" and records.shape("train_margin_aug") == (12, 300, 2)
  assert records.axes("test_margin_aug") == "MTA" and records.shape("test_margin_aug") == (12, 40, 2)
  assert correct[keep].mean() > correct[~keep].mean() + 0.1  # membership raises accuracy
  messages = []
  write_simulated_run(simulation, tmp_path / "a", log=messages.append)
  assert messages == [f"all {len(simulation.chunks())} chunks were already written in {tmp_path / 'a'}"]


def test_bench_scoring_times_each_estimator(tmp_path, capsys):
  simulation = Simulation(num_train=200, num_test=30, num_models=8)
  rows = bench_scoring(simulation, estimators=["memorization", "cscore"], log=lambda m: None)
  assert [r["step"] for r in rows] == ["write records", "load (verify checksums)", "read every record by blocks",
                                      "memorization", "cscore"]
  assert all(r["seconds"] >= 0 and r["peak_rss"] > 0 for r in rows)
  assert cli.main(["bench", "scoring", "--num-train", "200", "--num-test", "30", "--num-models", "8",
                   "--estimators", "memorization", "--out", str(tmp_path / "sim")]) == 0
  out = capsys.readouterr().out
  assert "memorization" in out and "peak RSS" in out
  assert RunDir.open(tmp_path / "sim").load_records().num_models == 8
  assert cli.main(["bench", "scoring", "--num-train", "200", "--num-test", "30", "--num-models", "8",
                   "--estimators", "none", "--out", str(tmp_path / "sim")]) == 0
  out = capsys.readouterr().out
  assert "read every record by blocks" in out and "memorization" not in out
  assert cli.main(["bench", "scoring", "--num-train", "0", "--num-test", "30", "--num-models", "8"]) == 2
  assert "--num-train must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("examples", [slice(2, 40, 3), slice(40, 2, -5), slice(30, 30), slice(-9, None)])
def test_blocks_with_a_step_or_empty(on_disk, examples):
  lazy, memory = on_disk
  for name in ["keep", *memory.record_names()]:
    np.testing.assert_array_equal(lazy.read(name, examples=examples, models=[5, 1, 2]),
                                  memory.read(name, examples=examples, models=[5, 1, 2]), err_msg=name)


def test_member_reads_equal_numpy_indexing(tmp_path):
  """NpzMember.read (pread of the block's bytes) against numpy indexing, on random shapes."""
  rng = np.random.default_rng(7)
  for trial in range(20):
    shape = tuple(rng.integers(1, 6, rng.integers(2, 5)))
    value = rng.normal(size=shape).astype(rng.choice([np.float32, np.float64, np.int16]))
    np.savez(tmp_path / "a.npz", value=value)
    member = npz_members(tmp_path / "a.npz")["value"]
    rows = rng.choice(shape[0], rng.integers(1, shape[0] + 1))
    axis = int(rng.integers(1, len(shape)))
    start = int(rng.integers(0, shape[axis]))
    stop = int(rng.integers(start, shape[axis] + 1))
    index = [rows] + [slice(None)] * (len(shape) - 1)
    index[axis] = slice(start, stop)
    got = member.read(rows, axis, start, stop)
    assert type(got) is np.ndarray and got.flags.owndata
    np.testing.assert_array_equal(got, value[tuple(index)], err_msg=f"trial {trial}")
    np.testing.assert_array_equal(member.read(np.sort(rows)), value[np.sort(rows)])
