"""The run directory: manifest, identity, membership design, per-chunk record files, events,
exports, and the atomic writes they all use.

Layout::

  RUN/manifest.json          config, dataset fingerprint, chunk plan, versions
  RUN/design.npz             keep (M,N), subset_ratio (M,), labels, noisy
  RUN/chunks/chunk_00003.npz records of the models of chunk 3 (leading model axis), incl. their keep
                             rows: an uncompressed .npz, read by blocks (jaxmem.records.store)
  RUN/chunks/chunk_00003.json its sha256 and model ids; written last, so its presence means "complete"
  RUN/events.jsonl           what each process trained (chunk started, checkpointed, done, interrupted)
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
import json
import os
import shutil
import zipfile
from pathlib import Path
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from jaxmem.config import GROWTH_FIELDS, RunConfig
from jaxmem.errors import JaxmemError
from jaxmem.lock import LOCK_FILE
from jaxmem.records.store import DESIGN_KEYS, Records, records_from_chunks

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DESIGN = "design.npz"
CHUNKS = "chunks"
EVENTS = "events.jsonl"
#: Directories of orbax checkpoints and kept parameters (written by :mod:`jaxmem.records.checkpoints`).
CHECKPOINTS = "checkpoints"
PARAMS = "params"


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


def make_dirs(path: Path, what: str) -> Path:
  """``path`` and its parents, or one line saying why not (e.g. ``cannot create study directory
  'x/y': Not a directory``)."""
  path = Path(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise JaxmemError(f"cannot create {what} {str(path)!r}: {e.strerror or e}") from None
  if not os.access(path, os.W_OK):
    raise JaxmemError(f"{what} {str(path)!r} is not writable")
  return path


def first_line(error: BaseException) -> str:
  """Orbax, tensorstore and numpy errors run over many lines; a user sees the first."""
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def write_bytes_atomic(path: Path, data: bytes) -> None:
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)


def write_json_atomic(path: Path, obj: Any) -> None:
  write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n").encode())


class _HashingWriter:
  """A write-only stream that hashes what passes through it. It has no ``tell``/``seek``, so
  ``zipfile`` writes each member followed by a data descriptor instead of seeking back to patch its
  header: the bytes are hashed once, as they are written, and never held whole in memory."""

  def __init__(self, f):
    self._f, self.sha256 = f, hashlib.sha256()

  def write(self, data) -> int:
    self.sha256.update(data)
    return self._f.write(data)

  def flush(self) -> None:
    self._f.flush()


def write_npz_atomic(path: Path, arrays: Mapping[str, Any]) -> str:
  """Writes an uncompressed .npz atomically, one member at a time (``arrays`` may be a lazy
  mapping: each value is read only while it is written); returns the sha256 of the bytes written.

  The members are written as ``np.savez`` writes them (``.npy`` files in a zip, stored, zip64),
  so ``np.load`` reads the file and :func:`jaxmem.records.store.npz_members` finds each member's bytes."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      stream = _HashingWriter(f)
      with zipfile.ZipFile(stream, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name in arrays:
          value = arrays[name]
          with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
            if isinstance(value, RowBlocks):
              value.write_npy(member)
            else:
              np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
  return stream.sha256.hexdigest()


@dataclasses.dataclass(frozen=True)
class RowBlocks:
  """An array too large to hold, given as its shape, dtype and consecutive blocks of leading-axis
  rows; :func:`write_npz_atomic` writes it as a ``.npy`` member block by block."""

  shape: tuple[int, ...]
  dtype: np.dtype
  blocks: Callable[[], Iterator[np.ndarray]]  # each (rows, *shape[1:]), together shape[0] rows

  def write_npy(self, f) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(self.dtype)), "fortran_order": False,
              "shape": tuple(int(d) for d in self.shape)}
    np.lib.format.write_array_header_1_0(f, header)
    rows = 0
    for block in self.blocks():
      block = np.ascontiguousarray(block, dtype=self.dtype)
      if block.shape[1:] != tuple(self.shape[1:]):
        raise ValueError(f"block of shape {block.shape} does not fit an array of shape {self.shape}")
      f.write(block.data)
      rows += block.shape[0]
    if rows != self.shape[0]:
      raise ValueError(f"blocks held {rows} rows, expected {self.shape[0]}")


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


class RunDir:
  """A run directory on disk; see the module docstring for the layout."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self._verified: dict[int, tuple] = {}  # chunk index -> file signature when its checksum matched

  # -- creation and identity ------------------------------------------------------------------
  @classmethod
  def create_or_open(cls, path: str | Path, manifest: dict[str, Any], *, overwrite: bool = False,
                     log: Any = None) -> "RunDir":
    """Opens ``path`` for the run that ``manifest`` describes, creating it if needed.

    An existing run directory made with another config or dataset is refused (its results would
    be mixed with this run's) unless ``overwrite``, which deletes its chunks and scores first; one
    that holds no result at all (a start that failed or was killed before its first chunk or
    checkpoint) is taken over, so the corrected command never needs ``--overwrite``.
    """
    run = cls(path)
    if run.path.exists() and not run.path.is_dir():
      raise JaxmemError(f"output path {str(run.path)!r} exists and is not a directory")
    if run.manifest_path.exists():
      existing = run.manifest()
      differences = identity_differences(existing, manifest)
      if differences and not overwrite and not run.holds_results():
        (log or (lambda m: None))(f"run directory {str(run.path)!r} holds no finished chunk of a run with another "
                                  f"config ({'; '.join(differences)}); starting anew")
        overwrite = True
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
        not (p.name in (CHUNKS, EVENTS) or p.name.startswith((f".{MANIFEST}.tmp-", LOCK_FILE)))
        for p in run.path.iterdir()):
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
    if not run.path.exists():
      raise JaxmemError(f"run directory {str(run.path)!r} does not exist")
    if not run.path.is_dir():
      raise JaxmemError(f"{str(run.path)!r} is a file, not a run directory")
    if not run.manifest_path.is_file():
      raise JaxmemError(f"{str(run.path)!r} is not a jaxmem run directory (no {MANIFEST})")
    run.manifest()  # validates
    return run

  def holds_results(self) -> bool:
    """Whether anything here took training to make: a chunk's records, a checkpoint, kept parameters."""
    chunks = self.path / CHUNKS
    return (any(chunks.glob("chunk_*.json")) if chunks.is_dir() else False) or any(
        (self.path / name).is_dir() and any((self.path / name).iterdir()) for name in (CHECKPOINTS, PARAMS))

  def clear(self) -> None:
    """Removes everything a run wrote (used by ``--overwrite``), but not the lock its writer holds."""
    for child in self.path.iterdir():
      if child.name.startswith(LOCK_FILE):
        continue
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
    chunks = manifest.get("chunks")
    if not (isinstance(chunks, list) and all(isinstance(c, list) and all(isinstance(m, int) for m in c) for c in chunks)):
      raise JaxmemError(f"manifest {str(self.manifest_path)!r} lacks a valid 'chunks' entry (the chunk plan); "
                        "restore it or start a new run directory")
    return manifest

  def update_manifest(self, **fields) -> None:
    write_json_atomic(self.manifest_path, {**self.manifest(), **fields})

  # -- design ----------------------------------------------------------------------------------
  def write_design(self, arrays: dict[str, np.ndarray]) -> None:
    write_npz_atomic(self.path / DESIGN, arrays)

  def read_design(self, *, without: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The membership design, checked; arrays named in ``without`` are not read (``keep`` is (M, N):
    the lazy records read it by blocks instead)."""
    path = self.path / DESIGN
    if not path.is_file():
      raise JaxmemError(f"run directory {str(self.path)!r} has no {DESIGN}; it was never started")
    try:
      with np.load(path, allow_pickle=False) as f:
        design = {k: (None if k in without else f[k]) for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      raise JaxmemError(f"{DESIGN} in {str(self.path)!r} is damaged ({first_line(e)}); rerun the run's "
                        "`jaxmem run` command to write it again (the chunks are kept)") from None
    missing = [k for k in DESIGN_KEYS if k not in design]
    if missing:
      raise JaxmemError(f"{DESIGN} in {str(self.path)!r} lacks {', '.join(missing)}; rerun the run's `jaxmem run` "
                        "command to write it again (the chunks are kept)")
    return {k: v for k, v in design.items() if k not in without}

  # -- chunks ----------------------------------------------------------------------------------
  def chunk_path(self, index: int) -> Path:
    return self.path / CHUNKS / f"chunk_{index:05d}.npz"

  def write_chunk(self, index: int, records: Mapping[str, np.ndarray]) -> None:
    digest = write_npz_atomic(self.chunk_path(index), records)
    write_json_atomic(self.chunk_path(index).with_suffix(".json"), {
        "sha256": digest, "model_ids": np.asarray(records["model_ids"]).tolist(), "written": utc_now()})
    # hashed while written: this process need not read the file again to trust it
    signature = self._signature(index)
    if signature is not None:
      self._verified[index] = signature

  def _signature(self, index: int) -> tuple | None:
    npz, meta = self.chunk_path(index), self.chunk_path(index).with_suffix(".json")
    try:
      stats = (npz.stat(), meta.stat())
    except OSError:
      return None
    return tuple((st.st_size, st.st_mtime_ns, st.st_ino) for st in stats)

  def chunk_status(self, index: int) -> str:
    """'complete', 'missing' or 'corrupt' (checksum or format mismatch).

    The chunk file is hashed in pieces (never held whole in memory); a verified chunk is not hashed
    again while its two files keep their size, modification time and inode (every write replaces a
    file, so any rewrite or edit changes them): a run asks about its chunks several times, and
    process 0 of a multi-process run polls them while it waits."""
    signature = self._signature(index)
    if signature is None:
      return "missing"
    if self._verified.get(index) == signature:
      return "complete"
    try:
      expected = json.loads(self.chunk_path(index).with_suffix(".json").read_text())["sha256"]
      with open(self.chunk_path(index), "rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
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

  def chunk_model_ids(self, index: int) -> np.ndarray:
    """Model ids of a complete chunk (from its checksum file)."""
    return np.asarray(json.loads(self.chunk_path(index).with_suffix(".json").read_text())["model_ids"], np.int64)

  # -- records ---------------------------------------------------------------------------------
  def load_records(self, *, allow_empty: bool = False) -> Records:
    """The records of every complete chunk (anytime: a run still training is fine), lazily: the
    chunk files are verified and their members located, and :meth:`Records.read` reads blocks of them."""
    design = self.read_design(without=("keep",))
    complete = self.completed_chunks()
    if not complete and not allow_empty:
      corrupt = [c for c in range(len(self.chunk_plan())) if self.chunk_status(c) == "corrupt"]
      if corrupt:
        raise JaxmemError(f"chunk {corrupt[0]} of {str(self.path)!r} failed its checksum (tampered or truncated) "
                          "and no other chunk is complete; rerun `jaxmem run` to train it again")
      raise JaxmemError(f"run directory {str(self.path)!r} has no finished chunk yet")
    try:
      chunks = [(self.chunk_path(c), self.chunk_model_ids(c)) for c in complete]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
      raise JaxmemError(f"cannot read the chunk list of {str(self.path)!r}: {e}") from None
    return records_from_chunks(chunks, self.path / DESIGN, design, where=str(self.path))


def identity_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
  """Human-readable differences between two manifests' result-determining parts."""
  # A field that a manifest lacks was added to jaxmem after that run was made: the run used the
  # field's default, so a missing field equals the default (old run directories stay resumable).
  defaults = RunConfig().identity()
  out = []
  config_a, config_b = a.get("identity", {}), b.get("identity", {})
  # Manifests made before runs could grow list num_models in their identity: it is not one.
  for key in sorted((set(config_a) | set(config_b)) - GROWTH_FIELDS):
    value_a, value_b = config_a.get(key, defaults.get(key)), config_b.get(key, defaults.get(key))
    if value_a != value_b:
      out.append(f"{key}: {value_a!r} there, {value_b!r} now")
  fa, fb = a.get("dataset", {}).get("fingerprint"), b.get("dataset", {}).get("fingerprint")
  if fa != fb:
    out.append("dataset content differs (fingerprint)")
  return out


EXPORT_KEYS = ("keep", "train_labels", "test_labels", "noisy", "train_correct", "test_correct",
               "train_margin", "test_margin", "subset_ratio")


#: A text run's records are exported under names that say their shapes (DESIGN.md's axis letters;
#: L is the L − 1 predicted tokens; the candidates of the canaries' space get a word, R being the
#: subset-ratio letter), and its per-sequence facts (``Records.example_info``) beside them.
TEXT_EXPORT_NAMES = {
    "train_token_accuracy": "train_token_accuracy_MxN", "test_token_accuracy": "test_token_accuracy_MxT",
    "train_loglik": "train_loglik_MxN", "test_loglik": "test_loglik_MxT",
    "train_extractable": "train_extractable_MxN", "train_token_logprob": "train_token_logprob_MxNxL",
    "candidate_logperp": "candidate_logperp_Mxcandidates",
}


def export_records(records: Records, out: str | Path) -> list[str]:
  """Writes the raw records to one .npz (contract keys first, then every other record; a text
  run's under :data:`TEXT_EXPORT_NAMES`, with its per-sequence facts as ``copies_N``,
  ``canary_N``, ...). Records are read one at a time while they are written, so memory holds one
  record, not all."""
  out = Path(out)
  if out.suffix != ".npz":
    raise JaxmemError(f"export path {str(out)!r} must end in .npz")
  if out.is_dir():
    raise JaxmemError(f"export path {str(out)!r} is a directory")
  if not out.parent.exists():
    raise JaxmemError(f"directory {str(out.parent)!r} for the export does not exist")
  small = {"train_labels": records.train_labels, "test_labels": records.test_labels, "noisy": records.noisy,
           "subset_ratio": records.subset_ratio.astype(np.float32), "model_ids": records.model_ids,
           "clean_train_labels": records.clean_train_labels}
  stored = {TEXT_EXPORT_NAMES.get(name, name): name for name in records.record_names()}
  if any(name in TEXT_EXPORT_NAMES for name in records.record_names()):
    small.update({f"{key}_N": np.asarray(value) for key, value in records.example_info.items()})
  names = ["keep", "train_labels", "test_labels", "noisy", "subset_ratio", "model_ids", "clean_train_labels",
           *[key for key in small if key.endswith("_N")], *stored]
  write_npz_atomic(out, _LazyArrays(names, lambda name: small[name] if name in small else records.read(stored.get(name, name))))
  return sorted(names)


class _LazyArrays(Mapping):
  """A mapping whose values are read when looked up (one record in memory at a time)."""

  def __init__(self, names, read):
    self._names, self._read = list(names), read

  def __getitem__(self, name):
    if name not in self._names:
      raise KeyError(name)
    return self._read(name)

  def __iter__(self):
    return iter(self._names)

  def __len__(self):
    return len(self._names)


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
