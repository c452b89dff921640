"""The run directory: manifest, membership design, per-chunk records, exports.

Layout::

  RUN/manifest.json          config, dataset fingerprint, chunk plan, versions
  RUN/design.npz             keep (M,N), subset_ratio (M,), labels, noisy
  RUN/chunks/chunk_00003.npz records of the models of chunk 3 (leading model axis), incl. their keep rows
  RUN/chunks/chunk_00003.json its sha256 and model ids; written last, so its presence means "complete"
  RUN/scores.csv, RUN/summary.json

Every file is written to a temporary name in the same directory and renamed into place, so a kill
or a full disk never leaves a half-written file under a final name. A chunk whose checksum does not
match is treated as missing (and retrained by ``run``), never silently used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jaxmem.errors import JaxmemError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DESIGN = "design.npz"
CHUNKS = "chunks"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
  """Yields a temporary path beside ``path``; renames it onto ``path`` only if the block succeeds.
  Errors from the file system (e.g. a full disk) become a one-line :class:`JaxmemError`."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    raise JaxmemError(f"could not write {path}: {e.strerror or e}; files written before are intact") from None
  finally:
    if tmp.exists():
      tmp.unlink()


def write_bytes_atomic(path: Path, data: bytes) -> None:
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)


def write_json_atomic(path: Path, obj: Any) -> None:
  write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n").encode())


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> str:
  """Writes an uncompressed .npz atomically; returns the sha256 of the bytes written."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  data = buffer.getvalue()
  write_bytes_atomic(path, data)
  return hashlib.sha256(data).hexdigest()


def _json_default(obj):
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, Path):
    return str(obj)
  raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


#: Axis letters of each record (DESIGN.md: M models, N training examples, T test examples, E epochs,
#: A augmented queries). Records not listed are per model over training examples when 2-D.
RECORD_AXES = {
    "keep": "MN", "train_correct": "MN", "train_margin": "MN", "test_correct": "MT", "test_margin": "MT",
    "epoch_loss": "ME", "train_correct_epochs": "MEN", "train_margin_epochs": "MEN",
    "train_el2n": "MN", "train_grand": "MN",
}


def record_axes(name: str, ndim: int) -> str:
  """Axis letters of record ``name`` with ``ndim`` dimensions (``train_margin`` is ``MNA`` when it
  holds augmented queries)."""
  axes = RECORD_AXES.get(name)
  if name == "train_margin" and ndim == 3:
    return "MNA"
  if axes is not None and len(axes) == ndim:
    return axes
  return {1: "M", 2: "MN", 3: "MNA"}.get(ndim, "M" + "?" * (ndim - 1))


@dataclasses.dataclass
class Records:
  """All finished models' records, rows sorted by model id.

  ``arrays`` holds every per-model record with a leading model axis (``train_correct`` (M,N) bool,
  ``train_margin`` (M,N) float32, ``test_correct``, ``test_margin``, ``epoch_loss`` (M,E), and
  whatever later record types add); the rest describes the training set and the design.
  """

  keep: np.ndarray             # (M, N) bool, finished models only
  model_ids: np.ndarray        # (M,)
  subset_ratio: np.ndarray     # (M,) float32
  train_labels: np.ndarray     # (N,) labels trained on
  clean_train_labels: np.ndarray
  test_labels: np.ndarray      # (T,)
  noisy: np.ndarray            # (N,) bool
  arrays: dict[str, np.ndarray]
  num_models_planned: int

  def __getitem__(self, name: str) -> np.ndarray:
    return self.arrays[name]

  def __contains__(self, name: str) -> bool:
    return name in self.arrays

  @property
  def num_models(self) -> int:
    return int(self.keep.shape[0])

  @property
  def num_train(self) -> int:
    return int(self.keep.shape[1])

  # -- the block-reading interface every consumer uses (a streaming store implements the same) --
  def record_names(self) -> list[str]:
    """Names of the per-model records this run holds (``keep`` not included)."""
    return sorted(self.arrays)

  def axes(self, name: str) -> str:
    """Axis letters of a record (see :data:`RECORD_AXES`), e.g. ``"MN"`` or ``"MEN"``."""
    return record_axes(name, np.ndim(self.arrays[name]) if name != "keep" else 2)

  def read(self, name: str, *, examples: slice | None = None, models: Any = None) -> np.ndarray:
    """One record, optionally restricted to a block of training examples (the ``N`` axis, where the
    record has one; test records are returned whole) and to some models (rows, an index array or
    slice). ``name`` may be ``"keep"``. Nothing else is read."""
    value = self.keep if name == "keep" else self.arrays[name]
    axes = "MN" if name == "keep" else self.axes(name)
    if models is not None:
      value = value[models]
    if examples is not None and "N" in axes:
      index = [slice(None)] * value.ndim
      index[axes.index("N")] = examples
      value = value[tuple(index)]
    return value

  def example_blocks(self, block_size: int) -> Iterator[slice]:
    """Consecutive blocks of at most ``block_size`` training examples covering all N."""
    if block_size <= 0:
      raise ValueError(f"block_size must be positive, got {block_size}")
    for start in range(0, self.num_train, block_size):
      yield slice(start, min(start + block_size, self.num_train))

  def select_models(self, rows: np.ndarray) -> "Records":
    """The same records restricted to some models (e.g. one subset ratio, or half the models)."""
    return dataclasses.replace(
        self, keep=self.keep[rows], model_ids=self.model_ids[rows], subset_ratio=self.subset_ratio[rows],
        arrays={k: v[rows] for k, v in self.arrays.items()})


class RunDir:
  """A run directory on disk; see the module docstring for the layout."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self._verified: dict[int, tuple] = {}  # chunk index -> file signature when its checksum matched

  # -- creation and identity ------------------------------------------------------------------
  @classmethod
  def create_or_open(cls, path: str | Path, manifest: dict[str, Any], *, overwrite: bool = False) -> "RunDir":
    """Opens ``path`` for the run that ``manifest`` describes, creating it if needed.

    An existing run directory made with another config or dataset is refused (its results would
    be mixed with this run's) unless ``overwrite``, which deletes its chunks and scores first.
    """
    run = cls(path)
    if run.path.exists() and not run.path.is_dir():
      raise JaxmemError(f"output path {str(run.path)!r} exists and is not a directory")
    if run.manifest_path.exists():
      existing = run.manifest()
      differences = identity_differences(existing, manifest)
      if differences and not overwrite:
        raise JaxmemError(
            f"run directory {str(run.path)!r} holds a run with another config ({'; '.join(differences)}); "
            "use another --out or pass --overwrite to replace it")
      if differences:
        run.clear()
      else:
        manifest = {**manifest, "created": existing.get("created", manifest.get("created"))}
    elif run.path.is_dir() and not overwrite and any(
        # A job-array shard starting at the same moment may have made only these so far.
        not (p.name in (CHUNKS, EVENTS) or p.name.startswith(f".{MANIFEST}.tmp-")) for p in run.path.iterdir()):
      raise JaxmemError(f"output directory {str(run.path)!r} is not empty and is not a jaxmem run; "
                        "choose an empty or new directory")
    try:
      (run.path / CHUNKS).mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise JaxmemError(f"cannot create run directory {str(run.path)!r}: {e.strerror or e}") from None
    if not os.access(run.path, os.W_OK):
      raise JaxmemError(f"run directory {str(run.path)!r} is not writable")
    write_json_atomic(run.manifest_path, manifest)
    return run

  @classmethod
  def open(cls, path: str | Path) -> "RunDir":
    run = cls(path)
    if not run.manifest_path.is_file():
      raise JaxmemError(f"{str(run.path)!r} is not a jaxmem run directory (no {MANIFEST})")
    run.manifest()  # validates
    return run

  def clear(self) -> None:
    """Removes everything a run wrote (used by ``--overwrite``)."""
    for child in self.path.iterdir():
      if child.is_dir():
        shutil.rmtree(child)
      else:
        child.unlink()

  @property
  def manifest_path(self) -> Path:
    return self.path / MANIFEST

  def manifest(self) -> dict[str, Any]:
    try:
      manifest = json.loads(self.manifest_path.read_text())
    except json.JSONDecodeError as e:
      raise JaxmemError(f"manifest {str(self.manifest_path)!r} is not valid JSON ({e}); "
                        "restore it or start a new run directory") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "jaxmem-run":
      raise JaxmemError(f"manifest {str(self.manifest_path)!r} is not a jaxmem run manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
      raise JaxmemError(f"run directory format {manifest.get('format_version')!r} is not supported "
                        f"(this jaxmem reads format {FORMAT_VERSION})")
    return manifest

  def update_manifest(self, **fields) -> None:
    write_json_atomic(self.manifest_path, {**self.manifest(), **fields})

  # -- design ----------------------------------------------------------------------------------
  def write_design(self, arrays: dict[str, np.ndarray]) -> None:
    write_npz_atomic(self.path / DESIGN, arrays)

  def read_design(self) -> dict[str, np.ndarray]:
    path = self.path / DESIGN
    if not path.is_file():
      raise JaxmemError(f"run directory {str(self.path)!r} has no {DESIGN}; it was never started")
    with np.load(path) as f:
      return {k: f[k] for k in f.files}

  # -- chunks ----------------------------------------------------------------------------------
  def chunk_path(self, index: int) -> Path:
    return self.path / CHUNKS / f"chunk_{index:05d}.npz"

  def write_chunk(self, index: int, records: dict[str, np.ndarray]) -> None:
    digest = write_npz_atomic(self.chunk_path(index), records)
    write_json_atomic(self.chunk_path(index).with_suffix(".json"), {
        "sha256": digest, "model_ids": np.asarray(records["model_ids"]).tolist(), "written": utc_now()})

  def chunk_status(self, index: int) -> str:
    """'complete', 'missing' or 'corrupt' (checksum or format mismatch).

    A verified chunk is not hashed again while its two files keep their size and modification
    time (every write replaces a file, so any rewrite or edit changes them): a run asks about its
    chunks several times, and process 0 of a multi-process run polls them while it waits."""
    npz, meta = self.chunk_path(index), self.chunk_path(index).with_suffix(".json")
    try:
      stats = (npz.stat(), meta.stat())
    except OSError:
      return "missing"
    signature = tuple((st.st_size, st.st_mtime_ns, st.st_ino) for st in stats)
    if self._verified.get(index) == signature:
      return "complete"
    try:
      expected = json.loads(meta.read_text())["sha256"]
      actual = hashlib.sha256(npz.read_bytes()).hexdigest()
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
      return "corrupt"
    if actual != expected:
      return "corrupt"
    self._verified[index] = signature
    return "complete"

  def read_chunk(self, index: int) -> dict[str, np.ndarray]:
    with np.load(self.chunk_path(index)) as f:
      return {k: f[k] for k in f.files}

  def chunk_plan(self) -> list[list[int]]:
    return self.manifest()["chunks"]

  def completed_chunks(self) -> list[int]:
    return [c for c in range(len(self.chunk_plan())) if self.chunk_status(c) == "complete"]

  # -- records ---------------------------------------------------------------------------------
  def load_records(self, *, allow_empty: bool = False) -> Records:
    """Assembles the records of every complete chunk (anytime: a run still training is fine)."""
    design = self.read_design()
    chunks = [self.read_chunk(c) for c in self.completed_chunks()]
    if not chunks and not allow_empty:
      corrupt = [c for c in range(len(self.chunk_plan())) if self.chunk_status(c) == "corrupt"]
      if corrupt:
        raise JaxmemError(f"chunk {corrupt[0]} of {str(self.path)!r} failed its checksum (tampered or truncated) "
                          "and no other chunk is complete; rerun `jaxmem run` to train it again")
      raise JaxmemError(f"run directory {str(self.path)!r} has no finished chunk yet")
    per_model: dict[str, list[np.ndarray]] = {}
    for chunk in chunks:
      for name, value in chunk.items():
        if name in ("model_ids", "keep") or np.ndim(value) == 0:
          continue
        per_model.setdefault(name, []).append(value)
    if chunks:
      ids = np.concatenate([c["model_ids"] for c in chunks])
      keep = np.concatenate([c["keep"] for c in chunks])
    else:
      ids, keep = np.zeros(0, np.int64), np.zeros((0, design["keep"].shape[1]), bool)
    order = np.argsort(ids, kind="stable")
    if not np.array_equal(keep[order], design["keep"][ids[order]]):
      raise JaxmemError(f"chunks in {str(self.path)!r} do not match its membership design; "
                        "the run directory was mixed with another run")
    arrays = {name: np.concatenate(parts)[order] for name, parts in per_model.items()}
    arrays = unpack_bit_records(arrays, num_examples=int(design["keep"].shape[1]))
    return Records(
        keep=keep[order], model_ids=ids[order], subset_ratio=design["subset_ratio"][ids[order]],
        train_labels=design["train_labels"], clean_train_labels=design["clean_train_labels"],
        test_labels=design["test_labels"], noisy=design["noisy"], arrays=arrays,
        num_models_planned=int(design["keep"].shape[0]))


def unpack_bit_records(arrays: dict[str, np.ndarray], *, num_examples: int) -> dict[str, np.ndarray]:
  """Every ``NAME_packed`` record (bits packed along the last axis by ``np.packbits``, as the
  engine writes per-epoch correctness) becomes ``NAME`` as bool with ``num_examples`` entries."""
  out = {}
  for name, value in arrays.items():
    if name.endswith("_packed") and value.dtype == np.uint8:
      out[name[: -len("_packed")]] = np.unpackbits(value, axis=-1, count=num_examples).astype(bool)
    else:
      out[name] = value
  return out


def identity_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
  """Human-readable differences between two manifests' result-determining parts."""
  from jaxmem.config import RunConfig
  # A field that a manifest lacks was added to jaxmem after that run was made: the run used the
  # field's default, so a missing field equals the default (old run directories stay resumable).
  defaults = RunConfig().identity()
  out = []
  config_a, config_b = a.get("identity", {}), b.get("identity", {})
  for key in sorted(set(config_a) | set(config_b)):
    value_a, value_b = config_a.get(key, defaults.get(key)), config_b.get(key, defaults.get(key))
    if value_a != value_b:
      out.append(f"{key}: {value_a!r} there, {value_b!r} now")
  fa, fb = a.get("dataset", {}).get("fingerprint"), b.get("dataset", {}).get("fingerprint")
  if fa != fb:
    out.append("dataset content differs (fingerprint)")
  return out


EXPORT_KEYS = ("keep", "train_labels", "test_labels", "noisy", "train_correct", "test_correct",
               "train_margin", "test_margin", "subset_ratio")


def export_records(records: Records, out: str | Path) -> list[str]:
  """Writes the raw records to one .npz (contract keys first, then every other record)."""
  arrays = {
      "keep": records.keep, "train_labels": records.train_labels, "test_labels": records.test_labels,
      "noisy": records.noisy, "subset_ratio": records.subset_ratio.astype(np.float32),
      "model_ids": records.model_ids, "clean_train_labels": records.clean_train_labels,
      **records.arrays}
  out = Path(out)
  if out.suffix != ".npz":
    raise JaxmemError(f"export path {str(out)!r} must end in .npz")
  if out.is_dir():
    raise JaxmemError(f"export path {str(out)!r} is a directory")
  if not out.parent.exists():
    raise JaxmemError(f"directory {str(out.parent)!r} for the export does not exist")
  write_npz_atomic(out, arrays)
  return sorted(arrays)


# -- orbax checkpoints: mid-chunk train states and kept final parameters -------------------------
# This is the only module that imports orbax (imported lazily: reading records needs none of it).
#
#   RUN/checkpoints/chunk_00003/<epochs_done>/  the chunk's stacked TrainState and per-epoch outputs
#   RUN/params/chunk_00003/                     final parameters of the chunk's kept models
#   RUN/params/chunk_00003.json                 their model ids; written last ("complete")
#
# Every array is stored with one storage chunk per model (orbax ``SaveArgs(shard_axes=(0,))`` makes
# the zarr chunk shape (1, ...)), so one model's slice is read without reading the others.

CHECKPOINTS = "checkpoints"
PARAMS = "params"
EVENTS = "events.jsonl"


def _per_model_save_args(tree: Any) -> Any:
  import jax
  import orbax.checkpoint as ocp
  return jax.tree.map(lambda x: ocp.SaveArgs(shard_axes=(0,) if np.ndim(x) >= 1 else ()), tree)


def _first_line(error: BaseException) -> str:
  """Orbax and tensorstore errors run over many lines; a user sees the first."""
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _storage_error(what: str, error: BaseException) -> JaxmemError:
  return JaxmemError(f"could not write {what}: {_first_line(error)}; finished chunks are intact")


def _this_process_only():
  """Orbax options for a checkpoint that one process writes alone. In a multi-process run every
  process trains its own chunks on its own devices (see :func:`jaxmem.run.run`), so checkpoints
  are per process: orbax must neither wait at barriers for the others nor leave writing to process 0."""
  import jax
  import orbax.checkpoint as ocp
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                            barrier_sync_key_prefix=f"jaxmem-p{me}")


def _host_if_multiprocess(tree: Any) -> Any:
  """Orbax serializes only global arrays in a multi-process job, but a process's chunk lives on its
  own devices; such arrays are saved as host numpy arrays (the same bytes)."""
  import jax
  return jax.device_get(tree) if jax.process_count() > 1 else tree


class ChunkCheckpoint:
  """Mid-chunk checkpoints of one chunk (orbax ``CheckpointManager``: asynchronous, atomic — a
  step directory appears under its final name only once complete — keeping only the latest).

  ``state`` is the stacked, sharded TrainState; ``history`` a nested dict of host arrays (per-epoch
  outputs so far), so that resuming restores exactly what an uninterrupted run holds at that epoch.
  A save is due when ``every_epochs`` epochs passed since the last one (0: only when forced, e.g. on
  SIGTERM). Used as a context manager so its background writes are always finished or closed.
  """

  def __init__(self, run_dir: "RunDir", index: int, every_epochs: int, *, log: Any = None):
    import jax
    import orbax.checkpoint as ocp
    from etils import epath
    self.path = run_dir.path / CHECKPOINTS / f"chunk_{index:05d}"
    self.run_dir = run_dir
    self.index, self.every_epochs, self.log = index, every_epochs, log or (lambda message: None)
    self.last_saved = 0
    # Asynchronous saves finalize through orbax's cross-process barriers, which a process saving on
    # its own must not enter; in a multi-process run each process therefore saves synchronously.
    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=jax.process_count() == 1,
                                           create=False,
                                           cleanup_tmp_directories=True,
                                           multiprocessing_options=_this_process_only())
    self._manager = None
    self._options, self._epath = options, epath
    if self.path.is_dir():
      self._open()

  def _open(self):
    import orbax.checkpoint as ocp
    if self._manager is None:
      self._manager = ocp.CheckpointManager(self._epath.Path(self.path.absolute()), options=self._options)
    return self._manager

  def __enter__(self) -> "ChunkCheckpoint":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def latest_epoch(self) -> int | None:
    return None if self._manager is None else self._manager.latest_step()

  def due(self, epochs_done: int) -> bool:
    return self.every_epochs > 0 and epochs_done - self.last_saved >= self.every_epochs

  def save(self, epochs_done: int, state: Any, history: dict[str, Any], *, wait: bool = False) -> None:
    """Starts an asynchronous save (``wait``: block until it is on disk, e.g. before exiting)."""
    import orbax.checkpoint as ocp
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self.path.mkdir(exist_ok=True)
      manager = self._open()
      state = _host_if_multiprocess(state)
      manager.save(epochs_done, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state, save_args=_per_model_save_args(state)),
          history=ocp.args.StandardSave(history, save_args=_per_model_save_args(history))))
      if wait:
        manager.wait_until_finished()
    except Exception as e:  # orbax/tensorstore raise many types for a full or unwritable disk
      raise _storage_error(f"checkpoint {self.path}", e) from e
    self.last_saved = epochs_done
    append_event(self.run_dir, event="checkpoint", chunk=self.index, epoch=epochs_done, waited=wait)

  def restore(self, state_like: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """The latest checkpoint as ``(epochs_done, state, history)``, with ``state`` restored to the
    shapes, dtypes and shardings of ``state_like`` (so the compiled program that continues from it
    is the one an uninterrupted run uses); None when there is none or it cannot be read."""
    import jax
    import orbax.checkpoint as ocp
    epoch = self.latest_epoch()
    if epoch is None:
      return None
    multiprocess = jax.process_count() > 1
    if multiprocess:  # saved as host arrays (see _host_if_multiprocess): restore them as such
      abstract = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state_like)
    else:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    try:
      restored = self._manager.restore(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), history=ocp.args.StandardRestore()))
      if multiprocess:
        restored["state"] = jax.tree.map(lambda r, like: jax.device_put(r, like.sharding), restored["state"], state_like)
    except Exception as e:  # a damaged checkpoint only costs retraining this chunk from its start
      self.log(f"checkpoint of chunk {self.index} at epoch {epoch} cannot be read ({_first_line(e)[:200]}); "
               "training the chunk from its start")
      return None
    self.last_saved = epoch
    return epoch, restored["state"], dict(restored["history"])

  def wait(self) -> None:
    if self._manager is not None:
      try:
        self._manager.wait_until_finished()
      except Exception as e:
        raise _storage_error(f"checkpoint {self.path}", e) from e

  def close(self) -> None:
    if self._manager is not None:
      try:
        self._manager.close()
      finally:
        self._manager = None

  def remove(self) -> None:
    """Deletes the chunk's checkpoints (once its records are written they are not needed)."""
    self.close()
    shutil.rmtree(self.path, ignore_errors=True)


def _params_dir(run_dir: "RunDir", epoch: int | None) -> Path:
  """Final parameters in ``params/``; those after epoch e (``keep_params_epochs``) in ``params/epoch_EEEEE/``."""
  return run_dir.path / PARAMS if epoch is None else run_dir.path / PARAMS / f"epoch_{epoch:05d}"


def save_params(run_dir: "RunDir", index: int, model_ids: np.ndarray, params_K: Any, *, epoch: int | None = None) -> None:
  """Saves the final parameters (or those after ``epoch``) of some models of chunk ``index``
  (leading axis: those models), one storage chunk per model, then a JSON of their ids (its
  presence means complete)."""
  import orbax.checkpoint as ocp
  from etils import epath
  path = _params_dir(run_dir, epoch) / f"chunk_{index:05d}"
  meta = path.with_suffix(".json")
  try:
    meta.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    params_K = _host_if_multiprocess(params_K)
    with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as checkpointer:
      checkpointer.save(epath.Path(path.absolute()), params_K, save_args=_per_model_save_args(params_K))
      checkpointer.wait_until_finished()
      metadata = checkpointer.metadata(epath.Path(path.absolute())).item_metadata
  except Exception as e:
    shutil.rmtree(path, ignore_errors=True)
    raise _storage_error(f"parameters {path}", e) from e
  # Orbax's names of the stored arrays, kept beside the ids so that loading one model needs no
  # pass over orbax's tree metadata (which reads the whole OCDBT index once more).
  import jax
  leaves = [{"path": [str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path], "name": leaf.name}
            for key_path, leaf in jax.tree_util.tree_leaves_with_path(
                metadata.tree, is_leaf=lambda x: hasattr(x, "storage"))]
  write_json_atomic(meta, {"model_ids": np.asarray(model_ids).tolist(), "arrays": leaves,
                           "use_zarr3": bool(metadata.use_zarr3), "written": utc_now()})


def kept_param_models(run_dir: "RunDir", *, epoch: int | None = None) -> dict[int, tuple[int, int]]:
  """model id -> (chunk index, row) for every model whose final parameters (or those after
  ``epoch``) were kept."""
  out = {}
  for meta in sorted(_params_dir(run_dir, epoch).glob("chunk_*.json")):
    ids = json.loads(meta.read_text())["model_ids"]
    chunk = int(meta.stem.split("_")[1])
    out.update({int(m): (chunk, row) for row, m in enumerate(ids)})
  return out


def load_model_params(run_dir: str | Path, model_id: int, *, epoch: int | None = None) -> Any:
  """The final parameters (or those after ``epoch``) of one model (a pytree of numpy arrays), reading only that model's
  storage chunks: each array is opened with tensorstore through orbax's read spec and sliced at
  the model's row, instead of restoring the chunk's stacked arrays."""
  import orbax.checkpoint as ocp
  import tensorstore as ts
  from etils import epath
  run = RunDir.open(run_dir)
  where = kept_param_models(run, epoch=epoch)
  if model_id not in where:
    kept = sorted(where)
    shown = f"{kept[:10]}{' ...' if len(kept) > 10 else ''}" if kept else (
        "none (run with --keep-params)" if epoch is None else "none (run with --keep-params and --keep-params-epochs)")
    when = "" if epoch is None else f" after epoch {epoch}"
    raise JaxmemError(f"parameters of model {model_id}{when} were not kept in {str(run.path)!r}; kept: {shown}")
  chunk, row = where[model_id]
  base = _params_dir(run, epoch)
  path = epath.Path((base / f"chunk_{chunk:05d}").absolute())
  meta = json.loads((base / f"chunk_{chunk:05d}.json").read_text())
  context = ocp.type_handlers.get_ts_context(use_ocdbt=True)
  database = None  # one OCDBT key-value store for all arrays: its B-tree index is read once
  params: dict[str, Any] = {}
  for leaf in meta["arrays"]:
    info = ocp.type_handlers.ParamInfo(name=leaf["name"], parent_dir=path, use_zarr3=meta["use_zarr3"],
                                       ts_context=context)
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=True)
    if database is None:
      database = ts.KvStore.open({k: v for k, v in spec["kvstore"].items() if k != "path"},
                                 context=context).result()
    store = ts.open({k: v for k, v in spec.items() if k != "kvstore"}, kvstore=database / f"{leaf['name']}/",
                    context=context).result()
    node = params
    for key in leaf["path"][:-1]:
      node = node.setdefault(key, {})
    node[leaf["path"][-1]] = store[row].read().result()
  return params


def append_event(run_dir: "RunDir", **fields) -> None:
  """Appends one line to ``RUN/events.jsonl`` (chunk started/resumed, checkpointed, finished,
  interrupted): a log of what each process trained, small appends are atomic on POSIX."""
  line = json.dumps({"time": utc_now(), "pid": os.getpid(), **fields}, default=_json_default) + "\n"
  try:
    with open(run_dir.path / EVENTS, "a") as f:
      f.write(line)
  except OSError as e:
    raise JaxmemError(f"could not write {run_dir.path / EVENTS}: {e.strerror or e}") from None


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
  path = Path(run_dir) / EVENTS
  if not path.is_file():
    return []
  events = []
  for line in path.read_text().splitlines():
    try:
      events.append(json.loads(line))
    except json.JSONDecodeError:
      continue  # a line cut by a kill mid-write is not an event
  return events
