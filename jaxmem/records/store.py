"""The record store: per-chunk record files read by blocks of examples and of models, and
:class:`Records`, the typed, lazy view over them that every estimator reads.

On disk each chunk's records are one uncompressed ``.npz`` (``RUN/chunks/chunk_00003.npz``, written
by :mod:`jaxmem.records.rundir`): a zip whose members are ``.npy`` files stored as they are. Where
each member lies in the file is read once (:func:`npz_members`); a block of examples is then read
from those bytes directly (:meth:`NpzMember.read`), without loading the chunk. Old run directories
are the same format and stream the same way. ``benchmarks/RESULTS.md`` ("Record store") compares this
with one ``.npy`` per record per chunk and with zarr v3 arrays through TensorStore.

Records hold, per finished model (rows sorted by model id):

========================  ======  ===========================================================
record                    axes    meaning
========================  ======  ===========================================================
``keep``                  MN      bool, the model trained on the example (the design's row)
``train_correct``         MN      bool, the final model classifies the training example right
``train_margin``          MN/MNA  float32 logit margin (A: augmented queries, when recorded)
``test_correct``          MT      bool, on the test set
``test_margin``           MT      float32
``epoch_loss``            ME      mean training loss per epoch
``train_correct_epochs``  MEN     bool per epoch; stored bit-packed along N (``..._packed``)
``train_margin_epochs``   MEN     float32 per epoch
``train_el2n``            MN      EL2N at ``score_epoch``
``train_grand``           MN      GraNd at ``score_epoch``
========================  ======  ===========================================================

Axis letters (DESIGN.md): M models, N training examples, T test examples, K models in a chunk,
E epochs, A augmented queries, R subset ratios, L sequence length, C classes, B batch.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jaxmem.errors import JaxmemError

#: Axis letters of each record (see the module docstring). A record not listed is per model over
#: test examples when its name starts with ``test_`` (``MT``, ``MTA``), else over training examples
#: (``MN``, ``MNA``); an axis that does not have N entries is not the N axis (``?``).
RECORD_AXES = {
    "keep": "MN", "train_correct": "MN", "train_margin": "MN", "test_correct": "MT", "test_margin": "MT",
    "train_margin_aug": "MNA", "test_margin_aug": "MTA",
    "epoch_loss": "ME", "train_correct_epochs": "MEN", "train_margin_epochs": "MEN",
    "train_el2n": "MN", "train_grand": "MN", "train_margin_aug": "MNA", "test_margin_aug": "MTA",
    # language models (jaxmem.engine.text); L here is the L − 1 predicted tokens of a sequence;
    # candidate_logperp is (models, candidates of the canaries' space R): no letter
    "train_token_accuracy": "MN", "test_token_accuracy": "MT", "train_loglik": "MN", "test_loglik": "MT",
    "train_extractable": "MN", "train_token_logprob": "MNL", "candidate_logperp": "M?",
    "train_token_accuracy_epochs": "MEN", "train_loglik_epochs": "MEN",
}
#: The design's arrays that every run has; any other per-example array in the design (text runs:
#: copies, canary, prefix_len, ...) is the dataset's :attr:`Records.example_info`.
DESIGN_KEYS = ("keep", "subset_ratio", "train_labels", "clean_train_labels", "test_labels", "noisy")
#: Suffix of a record stored with its N axis bit-packed (``np.packbits`` along the last axis).
PACKED = "_packed"


def record_axes(name: str, ndim: int) -> str:
  """Axis letters of record ``name`` with ``ndim`` dimensions (``train_margin`` is ``MNA`` when it
  holds augmented queries)."""
  axes = RECORD_AXES.get(name)
  if name == "train_margin" and ndim == 3:
    return "MNA"
  if axes is not None and len(axes) == ndim:
    return axes
  # An unlisted record: its second axis is over test examples when its name says so.
  example = "T" if name.startswith("test_") else "N"
  return {1: "M", 2: f"M{example}", 3: f"M{example}A"}.get(ndim, "M" + "?" * (ndim - 1))


def _checked_axes(name: str, shape: Sequence[int], num_train: int) -> str:
  """:func:`record_axes`, where an ``N`` axis must have ``num_train`` entries (else it is ``?``)."""
  axes = record_axes(name, len(shape))
  if "N" in axes and shape[axes.index("N")] != num_train:
    return axes.replace("N", "?")
  return axes


@dataclasses.dataclass(frozen=True)
class NpzMember:
  """Where an array stored in an uncompressed ``.npz`` lies in the file.

  :meth:`read` copies a block of it straight into a new array with ``os.preadv`` (one call per
  contiguous run of bytes), not through a memory map: pages read through a live mapping count in
  the process's resident memory until it is unmapped, so scanning a run's records through maps
  shows the whole record set as resident (reclaimable page cache, but what ``ru_maxrss`` reports),
  and a fresh map per read pays a page fault per page (``benchmarks/RESULTS.md``, "Record store").
  """

  path: Path
  offset: int
  shape: tuple[int, ...]
  dtype: np.dtype
  fortran_order: bool

  def map(self) -> np.ndarray:
    """The whole array as a read-only memory map."""
    if int(np.prod(self.shape)) == 0:
      return np.zeros(self.shape, self.dtype)  # mmap cannot map zero bytes
    return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape,
                     order="F" if self.fortran_order else "C")

  def read(self, rows: np.ndarray, axis: int | None = None, start: int = 0, stop: int | None = None) -> np.ndarray:
    """``array[rows]`` restricted to ``start:stop`` along ``axis`` (None: whole rows)."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    shape = self.shape
    if axis is not None and (start, stop) == (0, shape[axis]):
      axis = None if axis == 1 else axis  # whole rows are one run of bytes each
    if self.fortran_order or axis == 0:
      index = [rows] + [slice(None)] * (len(shape) - 1)
      if axis is not None:
        index[axis] = slice(start, stop)
      return np.array(self.map()[tuple(index)])
    out_shape = [len(rows), *shape[1:]]
    if axis is not None:
      out_shape[axis] = stop - start
    out = np.empty(out_shape, self.dtype)
    if out.size == 0:
      return out
    item = self.dtype.itemsize
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * item
    if axis is None:
      # runs of consecutive rows are one run of bytes each
      breaks = np.flatnonzero(np.diff(rows) != 1) + 1
      firsts, lasts = np.r_[0, breaks], np.r_[breaks, len(rows)]
      pieces = [out[first:last] for first, last in zip(firsts, lasts)]
      offsets = self.offset + rows[firsts] * row_bytes
    else:
      # one run of bytes per row and index of the axes between the rows and ``axis``
      run_bytes = int(np.prod(shape[axis:], dtype=np.int64)) * item
      tail_bytes = int(np.prod(shape[axis + 1:], dtype=np.int64)) * item
      between = int(np.prod(shape[1:axis], dtype=np.int64))
      pieces = out.reshape(len(rows) * between, -1)
      offsets = (self.offset + start * tail_bytes + rows[:, None] * row_bytes
                 + np.arange(between)[None, :] * run_bytes).reshape(-1)
    fd = os.open(self.path, os.O_RDONLY)
    try:
      for piece, offset in zip(pieces, offsets.tolist()):
        if os.preadv(fd, [piece], offset) != piece.nbytes:  # a short read: finish it
          _pread_into(fd, piece, offset)
      return out
    finally:
      os.close(fd)


def npz_members(path: str | Path) -> dict[str, NpzMember | np.ndarray]:
  """Every array of an ``.npz``: where it lies in the file (:class:`NpzMember`), read from the zip's
  central directory and the arrays' headers only; a compressed member (never written by jaxmem)
  is read whole instead.

  ``np.savez`` stores each array as a ``.npy`` file inside an uncompressed zip, so the array's
  bytes lie contiguously in the file: the central directory gives the member's local header, whose
  fixed 30-byte layout (zip specification, ``zipfile.structFileHeader``) gives where the ``.npy``
  starts; numpy's own header reader gives shape, dtype and order. ``np.load`` ignores
  ``mmap_mode`` for ``.npz`` files, hence this. Raises ``OSError``/``ValueError``/
  ``zipfile.BadZipFile`` for a file that is not such an ``.npz``.
  """
  path = Path(path)
  out: dict[str, NpzMember | np.ndarray] = {}
  with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
    for info in archive.infolist():
      if not info.filename.endswith(".npy"):
        continue
      name = info.filename[: -len(".npy")]
      if info.compress_type != zipfile.ZIP_STORED:
        with archive.open(info) as member:
          out[name] = np.lib.format.read_array(member, allow_pickle=False)
        continue
      f.seek(info.header_offset)
      header = struct.unpack(zipfile.structFileHeader, f.read(zipfile.sizeFileHeader))
      if header[0] != zipfile.stringFileHeader:
        raise ValueError(f"bad zip local header for {name}")
      name_length, extra_length = header[10], header[11]  # file name and extra field lengths
      f.seek(info.header_offset + zipfile.sizeFileHeader + name_length + extra_length)
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
      else:
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
      if dtype.hasobject:
        raise ValueError(f"member {name} holds Python objects")
      out[name] = NpzMember(path, f.tell(), tuple(shape), dtype, bool(fortran_order))
  return out


def npz_member(path: str | Path, name: str) -> np.ndarray:
  """Member ``name`` of an ``.npz`` as a read-only memory map (see :func:`npz_members`)."""
  member = npz_members(path)[name]
  return member.map() if isinstance(member, NpzMember) else member


def _read(member: NpzMember | np.ndarray, rows: np.ndarray, axis: int | None = None, start: int = 0,
          stop: int | None = None) -> np.ndarray:
  """``member[rows]``, restricted to ``start:stop`` along ``axis``, of a stored or loaded array."""
  if isinstance(member, NpzMember):
    return member.read(rows, axis, start, stop)
  index = [np.asarray(rows)] + [slice(None)] * (member.ndim - 1)
  if axis is not None:
    index[axis] = slice(start, stop)
  return member[tuple(index)]


def _pread_into(fd: int, out: np.ndarray, offset: int) -> None:
  """Fills the contiguous array ``out`` with the file's bytes from ``offset``."""
  view = memoryview(out.reshape(-1).view(np.uint8))
  while len(view):
    count = os.preadv(fd, [view], offset)
    if count <= 0:
      raise OSError(f"file ends before byte {offset + len(view)} (truncated?)")
    view, offset = view[count:], offset + count


def _as_positions(models: Any, count: int) -> np.ndarray:
  """Model rows (a slice, an index array or a boolean mask over ``count`` models) as indices."""
  return np.arange(count)[models].reshape(-1)


def _example_range(examples: slice | None, num_train: int) -> tuple[int, int, int]:
  if examples is None:
    return 0, num_train, 1
  if not isinstance(examples, slice):
    raise TypeError(f"examples must be a slice of training examples, got {type(examples).__name__}")
  return examples.indices(num_train)


class _ArraySource:
  """Records held in memory (built from arrays by tests, estimators and simulations)."""

  def __init__(self, keep: np.ndarray, arrays: Mapping[str, np.ndarray]):
    self.keep, self.arrays = keep, dict(arrays)
    self.num_models, self.num_train = int(keep.shape[0]), int(keep.shape[1])

  def names(self) -> list[str]:
    return sorted(self.arrays)

  def shape_dtype(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
    value = self.keep if name == "keep" else self.arrays[name]
    return tuple(np.shape(value)), np.asarray(value).dtype

  def axes(self, name: str) -> str:
    return "MN" if name == "keep" else _checked_axes(name, np.shape(self.arrays[name]), self.num_train)

  def read(self, name: str, examples: slice | None, positions: np.ndarray | None) -> np.ndarray:
    value = self.keep if name == "keep" else self.arrays[name]
    axes = self.axes(name)
    if positions is not None:
      value = value[positions]
    if examples is not None and "N" in axes:
      index = [slice(None)] * value.ndim
      index[axes.index("N")] = examples
      value = value[tuple(index)]
    return value


class _ChunkSource:
  """Records in chunk files on disk; a read copies only the block asked for from each chunk.

  ``chunks`` lists ``(path, model_ids_K)`` of complete chunks; the models' order is by id. ``keep``
  is read from the design (``design_keep``, the design's (M_planned, N) member), whose rows the
  chunks' own ``keep`` rows were checked against when the run was loaded.
  """

  def __init__(self, chunks: Sequence[tuple[Path, np.ndarray]], design_keep: NpzMember | np.ndarray):
    self.paths = [Path(p) for p, _ in chunks]
    ids = np.concatenate([np.asarray(i, np.int64) for _, i in chunks]) if chunks else np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    self.model_ids = ids[order]
    # position (in id order) -> chunk and row in it
    self.chunk_of = np.concatenate([np.full(len(i), c) for c, (_, i) in enumerate(chunks)] or [np.zeros(0, int)])[order]
    self.row_of = np.concatenate([np.arange(len(i)) for _, i in chunks] or [np.zeros(0, int)])[order]
    self.design_keep = design_keep
    self.num_models, self.num_train = len(self.model_ids), int(design_keep.shape[1])
    self.members: list[dict[str, NpzMember | np.ndarray]] = [self._open(c) for c in range(len(self.paths))]
    self._stored: dict[str, str] = {}  # record name -> member name (``NAME_packed`` for bit-packed)
    self._shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for c, members in enumerate(self.members):
      names = {}
      for member, value in members.items():
        if member in ("model_ids", "keep") or len(value.shape) == 0:
          continue
        packed = member.endswith(PACKED) and value.dtype == np.uint8
        name = member[: -len(PACKED)] if packed else member
        tail = (*value.shape[1:-1], self.num_train) if packed else tuple(value.shape[1:])
        names[name] = (member, tail, np.dtype(bool) if packed else value.dtype)
      if c == 0:
        self._stored = {n: m for n, (m, _, _) in names.items()}
        self._shapes = {n: ((self.num_models, *tail), dtype) for n, (_, tail, dtype) in names.items()}
      elif names != {n: (self._stored[n], self._shapes[n][0][1:], self._shapes[n][1]) for n in self._stored}:
        raise JaxmemError(f"chunk file {str(self.paths[c])!r} holds other records than {str(self.paths[0])!r} "
                          "(names, shapes or dtypes differ); the run directory was mixed with another run")

  def _open(self, c: int) -> dict[str, NpzMember | np.ndarray]:
    path = self.paths[c]
    try:
      return npz_members(path)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise JaxmemError(f"cannot read chunk file {str(path)!r}: {e}") from None

  def names(self) -> list[str]:
    return sorted(self._stored)

  def shape_dtype(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
    if name == "keep":
      return (self.num_models, self.num_train), np.dtype(bool)
    return self._shapes[name]

  def axes(self, name: str) -> str:
    return "MN" if name == "keep" else _checked_axes(name, self._shapes[name][0], self.num_train)

  def read(self, name: str, examples: slice | None, positions: np.ndarray | None) -> np.ndarray:
    wanted = np.arange(*_example_range(examples, self.num_train))
    # the smallest run of examples holding the block, then its step (a slice with a step is rare)
    start, stop = (int(wanted.min()), int(wanted.max()) + 1) if len(wanted) else (0, 0)
    pick = None if len(wanted) == stop - start and (len(wanted) < 2 or wanted[1] > wanted[0]) else wanted - start
    if positions is None:
      positions = np.arange(self.num_models)
    if name == "keep":
      block = _read(self.design_keep, self.model_ids[positions], 1, start, stop)
      return block if pick is None else block[:, pick]
    shape, dtype = self._shapes[name]
    member = self._stored[name]
    axes = self.axes(name)
    n_axis = axes.index("N") if "N" in axes and examples is not None else None  # None: whole rows
    packed = member != name
    out_shape = list(shape)
    out_shape[0] = len(positions)
    if n_axis is not None:
      out_shape[n_axis] = len(wanted)
    out = np.empty(out_shape, dtype)
    chunk_of = self.chunk_of[positions]
    for c in np.unique(chunk_of):
      where = np.flatnonzero(chunk_of == c)
      rows = self.row_of[positions[where]]
      stored = self.members[c][member]
      if n_axis is None and packed:
        block = np.unpackbits(_read(stored, rows), axis=-1, count=self.num_train).astype(bool)
      elif n_axis is None:
        block = _read(stored, rows)
      elif packed:  # bits packed along N, the last axis: whole bytes, then unpacked
        block = _read(stored, rows, n_axis, start // 8, -(-stop // 8))
        first = start - 8 * (start // 8)
        block = np.unpackbits(block, axis=-1)[..., first: first + stop - start].astype(bool)
      else:
        block = _read(stored, rows, n_axis, start, stop)
      if n_axis is not None and pick is not None:
        block = np.take(block, pick, axis=n_axis)
      out[where] = block
    return out


class Records:
  """The records of a run's finished models, rows sorted by model id; typed and lazy.

  Two ways to build one: :meth:`from_arrays` (or the constructor) from arrays in memory, as tests
  and estimators do, and ``RunDir.load_records()`` from a run directory, which verifies the chunk
  files and finds where each record lies in them, reading no record until asked.

  The bounded path is the block interface: :meth:`record_names`, :meth:`axes`,
  :meth:`read` (``examples=`` a block of training examples, ``models=`` some rows),
  :meth:`example_blocks` and :meth:`block_size_for`. ``records["name"]``, :attr:`keep` and
  :attr:`arrays` read a whole record (all models, all examples) into memory on every access: fine
  at the scale of a laptop run, not for an ImageNet-sized one (M = 2,000, N = 1.28 million is
  2.5 GB per bool record), where estimators read blocks instead.
  """

  def __init__(self, *, keep: np.ndarray | None = None, model_ids: np.ndarray, subset_ratio: np.ndarray,
               train_labels: np.ndarray, clean_train_labels: np.ndarray, test_labels: np.ndarray,
               noisy: np.ndarray, arrays: Mapping[str, np.ndarray] | None = None, num_models_planned: int,
               source: Any = None, rows: np.ndarray | None = None,
               example_info: Mapping[str, np.ndarray] | None = None):
    if source is None:
      if keep is None:
        raise ValueError("Records needs keep (and arrays) or a source")
      source = _ArraySource(np.asarray(keep), arrays or {})
    self._source = source
    self._rows = rows  # positions into the source's models (None: all of them)
    self.model_ids = np.asarray(model_ids)             # (M,)
    self.subset_ratio = np.asarray(subset_ratio)       # (M,) float32
    self.train_labels = np.asarray(train_labels)       # (N,) labels trained on
    self.clean_train_labels = np.asarray(clean_train_labels)  # (N,)
    self.test_labels = np.asarray(test_labels)         # (T,)
    self.noisy = np.asarray(noisy)                     # (N,) bool
    self.num_models_planned = int(num_models_planned)
    # Per-training-example facts of the dataset beyond labels, kept in the design (text: copies,
    # canary, prefix_len, zlib_bytes, num_tokens, secret_index); empty for classification.
    self.example_info = dict(example_info or {})

  @classmethod
  def from_arrays(cls, *, keep: np.ndarray, arrays: Mapping[str, np.ndarray], model_ids: np.ndarray | None = None,
                  subset_ratio: np.ndarray | float = 0.5, train_labels: np.ndarray | None = None,
                  clean_train_labels: np.ndarray | None = None, test_labels: np.ndarray | None = None,
                  noisy: np.ndarray | None = None, num_models_planned: int | None = None,
                  example_info: Mapping[str, np.ndarray] | None = None) -> "Records":
    """Records in memory. ``keep`` (M, N) bool and per-model ``arrays`` (leading axis M); the rest
    defaults to ids 0..M-1, one subset ratio, labels 0 and no noisy labels."""
    keep = np.asarray(keep, bool)
    m, n = keep.shape
    test = next((np.shape(v)[1] for k, v in arrays.items() if "T" in record_axes(k, np.ndim(v))), 0)
    train_labels = np.zeros(n, np.int64) if train_labels is None else train_labels
    return cls(keep=keep, arrays=arrays, model_ids=np.arange(m) if model_ids is None else model_ids,
               subset_ratio=np.broadcast_to(np.asarray(subset_ratio, np.float32), (m,)).copy(),
               train_labels=train_labels,
               clean_train_labels=train_labels if clean_train_labels is None else clean_train_labels,
               test_labels=np.zeros(test, np.int64) if test_labels is None else test_labels,
               noisy=np.zeros(n, bool) if noisy is None else noisy,
               num_models_planned=m if num_models_planned is None else num_models_planned,
               example_info=example_info)

  # -- whole records (unbounded; see the class docstring) -------------------------------------
  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self:
      raise KeyError(name)
    return self.read(name)

  def __contains__(self, name: str) -> bool:
    return name in self._source.names()

  @property
  def keep(self) -> np.ndarray:
    """(M, N) bool: which training examples each model trained on."""
    return self.read("keep")

  @property
  def arrays(self) -> dict[str, np.ndarray]:
    """Every per-model record, read whole."""
    return {name: self.read(name) for name in self.record_names()}

  @property
  def num_models(self) -> int:
    return len(self.model_ids)

  @property
  def num_train(self) -> int:
    return self._source.num_train

  # -- the block-reading interface every consumer uses -----------------------------------------
  def record_names(self) -> list[str]:
    """Names of the per-model records this run holds (``keep`` not included)."""
    return self._source.names()

  def shape(self, name: str) -> tuple[int, ...]:
    """Shape of a whole record (leading axis: this object's models)."""
    shape, _ = self._source.shape_dtype(name)
    return (self.num_models, *shape[1:])

  def dtype(self, name: str) -> np.dtype:
    return self._source.shape_dtype(name)[1]

  def axes(self, name: str) -> str:
    """Axis letters of a record (see :data:`RECORD_AXES`), e.g. ``"MN"`` or ``"MEN"``."""
    return self._source.axes(name)

  def read(self, name: str, *, examples: slice | None = None, models: Any = None) -> np.ndarray:
    """One record, optionally restricted to a block of training examples (the ``N`` axis, where the
    record has one; test records are returned whole) and to some models (rows: a slice, an index
    array or a boolean mask). ``name`` may be ``"keep"``. Only that block is read from disk."""
    if name != "keep" and name not in self:
      raise KeyError(name)
    positions = None
    if models is not None:
      positions = _as_positions(models, self.num_models)
    if self._rows is not None:
      positions = self._rows if positions is None else self._rows[positions]
    return self._source.read(name, examples, positions)

  def example_blocks(self, block_size: int) -> Iterator[slice]:
    """Consecutive blocks of at most ``block_size`` training examples covering all N."""
    if block_size <= 0:
      raise ValueError(f"block_size must be positive, got {block_size}")
    for start in range(0, self.num_train, block_size):
      yield slice(start, min(start + block_size, self.num_train))

  def block_size_for(self, budget_bytes: int, names: Sequence[str], *, working_bytes_per_value: int = 0,
                     extra_bytes_per_example: int = 0) -> int:
    """Examples per block so that one block of the named records (all models, as read by
    :meth:`read`; records without an N axis count whole), with ``working_bytes_per_value`` more for
    each of their values (a reader's working copies) and ``extra_bytes_per_example``, fits in
    ``budget_bytes``; at most N."""
    per_example, fixed = int(extra_bytes_per_example), 0
    for name in names:
      shape, axes = self.shape(name), self.axes(name)
      values = int(np.prod(shape, dtype=np.int64))
      bytes_per_value = self.dtype(name).itemsize + int(working_bytes_per_value)
      if "N" in axes:
        per_example += values // max(shape[axes.index("N")], 1) * bytes_per_value
      else:
        fixed += values * bytes_per_value
    if per_example == 0:
      return max(self.num_train, 1)
    block = (int(budget_bytes) - fixed) // per_example
    if block < 1:
      raise JaxmemError(f"memory budget {int(budget_bytes):,} bytes is too small for records {', '.join(names)}: "
                        f"one example of them needs {fixed + per_example:,} bytes"
                        + (" with working copies" if working_bytes_per_value else ""))
    return min(block, max(self.num_train, 1))

  def select_models(self, rows: Any) -> "Records":
    """The same records restricted to some models (e.g. one subset ratio, or half the models);
    nothing is read."""
    positions = _as_positions(rows, self.num_models)
    return Records(model_ids=self.model_ids[positions], subset_ratio=self.subset_ratio[positions],
                   train_labels=self.train_labels, clean_train_labels=self.clean_train_labels,
                   test_labels=self.test_labels, noisy=self.noisy, num_models_planned=self.num_models_planned,
                   source=self._source, rows=positions if self._rows is None else self._rows[positions],
                   example_info=self.example_info)


def records_from_chunks(chunks: Sequence[tuple[Path, np.ndarray]], design_path: Path,
                        design: Mapping[str, np.ndarray], *, where: str) -> Records:
  """Lazy :class:`Records` over complete chunk files ``(path, model_ids_K)``.

  ``design`` holds the design's small arrays (``subset_ratio``, labels, ``noisy``); its ``keep`` is
  read from ``design_path`` when asked. Each chunk's own ``keep`` rows are compared with the
  design's, a group of rows at a time (memory stays bounded): a mismatch means two runs were
  mixed, and is refused with a message naming ``where``.
  """
  try:
    design_keep = npz_members(design_path)["keep"]
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    raise JaxmemError(f"cannot read the membership design {str(design_path)!r}: {e}") from None
  source = _ChunkSource(chunks, design_keep)
  planned, num_train = design_keep.shape
  rows_at_once = max(1, 2**26 // max(num_train, 1))
  for c, (_, ids) in enumerate(chunks):
    ids = np.asarray(ids, np.int64)
    chunk_keep = source.members[c].get("keep")
    matches = chunk_keep is not None and tuple(chunk_keep.shape) == (len(ids), num_train) and (
        ids.size == 0 or (ids.min() >= 0 and ids.max() < planned))
    for first in range(0, len(ids), rows_at_once):
      if not matches:
        break
      group = slice(first, first + rows_at_once)
      matches = np.array_equal(_read(chunk_keep, np.arange(len(ids))[group]), _read(design_keep, ids[group]))
    if not matches:
      raise JaxmemError(f"chunks in {where!r} do not match its membership design; "
                        "the run directory was mixed with another run")
  ids = source.model_ids
  return Records(model_ids=ids, subset_ratio=np.asarray(design["subset_ratio"])[ids],
                 train_labels=design["train_labels"], clean_train_labels=design["clean_train_labels"],
                 test_labels=design["test_labels"], noisy=design["noisy"],
                 num_models_planned=int(planned), source=source,
                 example_info={k: v for k, v in design.items() if k not in DESIGN_KEYS})


def unpack_bit_records(arrays: Mapping[str, np.ndarray], *, num_examples: int) -> dict[str, np.ndarray]:
  """Every ``NAME_packed`` record (bits packed along the last axis by ``np.packbits``, as the
  engine writes per-epoch correctness) becomes ``NAME`` as bool with ``num_examples`` entries."""
  out = {}
  for name, value in arrays.items():
    if name.endswith(PACKED) and value.dtype == np.uint8:
      out[name[: -len(PACKED)]] = np.unpackbits(value, axis=-1, count=num_examples).astype(bool)
    else:
      out[name] = value
  return out
