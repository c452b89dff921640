"""Orbax checkpoints: mid-chunk train states and the kept final parameters of models. The only
module of jaxmem that imports orbax.

Layout::

  RUN/checkpoints/chunk_00003/<epochs_done>/  the chunk's stacked TrainState and per-epoch outputs
  RUN/params/chunk_00003/                     final parameters of the chunk's kept models
  RUN/params/chunk_00003.json                 their model ids; written last ("complete")

Every array is stored with one storage chunk per model (orbax ``SaveArgs(shard_axes=(0,))`` makes
the zarr chunk shape (1, ...)), so one model's slice is read without reading the others.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from jaxmem.errors import JaxmemError
from jaxmem.records.rundir import CHECKPOINTS, PARAMS, RunDir, append_event, first_line, utc_now, write_json_atomic


def _per_model_save_args(tree: Any) -> Any:
  return jax.tree.map(lambda x: ocp.SaveArgs(shard_axes=(0,) if np.ndim(x) >= 1 else ()), tree)


def _storage_error(what: str, error: BaseException) -> JaxmemError:
  return JaxmemError(f"could not write {what}: {first_line(error)}; finished chunks are intact")


def _this_process_only():
  """Orbax options for a checkpoint that one process writes alone. In a multi-process run every
  process trains its own chunks on its own devices (see :func:`jaxmem.run.run`), so checkpoints
  are per process: orbax must neither wait at barriers for the others nor leave writing to process 0."""
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                            barrier_sync_key_prefix=f"jaxmem-p{me}")


def _host_if_multiprocess(tree: Any) -> Any:
  """Orbax serializes only global arrays in a multi-process job, but a process's chunk lives on its
  own devices; such arrays are saved as host numpy arrays (the same bytes)."""
  return jax.device_get(tree) if jax.process_count() > 1 else tree


class ChunkCheckpoint:
  """Mid-chunk checkpoints of one chunk (orbax ``CheckpointManager``: asynchronous, atomic — a
  step directory appears under its final name only once complete — keeping only the latest).

  ``state`` is the stacked, sharded TrainState; ``history`` a nested dict of host arrays (per-epoch
  outputs so far), so that resuming restores exactly what an uninterrupted run holds at that epoch.
  A save is due when ``every_epochs`` epochs passed since the last one (0: only when forced, e.g. on
  SIGTERM). Used as a context manager so its background writes are always finished or closed.
  """

  def __init__(self, run_dir: RunDir, index: int, every_epochs: int, *, log: Any = None):
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
      self.log(f"checkpoint of chunk {self.index} at epoch {epoch} cannot be read ({first_line(e)[:200]}); "
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


def _params_dir(run_dir: RunDir, epoch: int | None) -> Path:
  """Final parameters in ``params/``; those after epoch e (``keep_params_epochs``) in ``params/epoch_EEEEE/``."""
  return run_dir.path / PARAMS if epoch is None else run_dir.path / PARAMS / f"epoch_{epoch:05d}"


def save_params(run_dir: RunDir, index: int, model_ids: np.ndarray, params_K: Any, *, epoch: int | None = None) -> None:
  """Saves the final parameters (or those after ``epoch``) of some models of chunk ``index``
  (leading axis: those models), one storage chunk per model, then a JSON of their ids (its
  presence means complete)."""
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
  leaves = [{"path": [str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path], "name": leaf.name}
            for key_path, leaf in jax.tree_util.tree_leaves_with_path(
                metadata.tree, is_leaf=lambda x: hasattr(x, "storage"))]
  write_json_atomic(meta, {"model_ids": np.asarray(model_ids).tolist(), "arrays": leaves,
                           "use_zarr3": bool(metadata.use_zarr3), "written": utc_now()})


def kept_param_models(run_dir: RunDir, *, epoch: int | None = None) -> dict[int, tuple[int, int]]:
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


