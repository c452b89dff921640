"""The chunk trainer: trains a chunk of models, lifted over the model axis and sharded over devices,
and evaluates every model on every train and test example.

Sharding: the model axis of every per-model array is split over a one-axis ``Mesh`` named
``models`` with ``shard_map``; each device runs the chosen lifting strategy on its own models, and
the dataset is replicated. Models never communicate, so there are no collectives at all.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmem.config import RunConfig
from jaxmem.data import Dataset
from jaxmem.engine import lift as lifting
from jaxmem.engine.step import DeviceData, make_model_functions, make_optimizer, steps_per_epoch
from jaxmem.models import build_model

MODEL_AXIS = "models"
PROBE_STEPS = 8   # steps per probe epoch: long enough that dispatch overhead does not decide
PROBE_EPOCHS = 2
# Examples per evaluation batch when recording. On a CPU, batches whose activations stay in cache
# were faster: the digits CNN evaluated 2-2.5x faster with 256 than with 4096 (the MLP the same);
# accelerators want large batches.
EVAL_BATCH = {"cpu": 256}
DEFAULT_EVAL_BATCH = 4096


def model_keys(seed: int, model_ids: Sequence[int]) -> jax.Array:
  """Model m's key is ``fold_in(PRNGKey(seed), m)``, whatever chunk or device it lands on."""
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda m: jax.random.fold_in(base, m))(jnp.asarray(model_ids, dtype=jnp.uint32))


def members_from_keep(keep_KxN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-model member indices padded to a common length, and the true counts."""
  counts_K = keep_KxN.sum(axis=1).astype(np.int32)
  members_KxS = np.zeros((keep_KxN.shape[0], max(int(counts_K.max()), 1)), dtype=np.int32)
  for k, row in enumerate(keep_KxN):
    idx = np.flatnonzero(row)
    members_KxS[k, : idx.size] = idx
  return members_KxS, counts_K


def standardize(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel standardization with train statistics (last axis = channels/features)."""
  axes = tuple(range(dataset.x_train.ndim - 1))
  mean = dataset.x_train.mean(axis=axes, keepdims=True)
  std = dataset.x_train.std(axis=axes, keepdims=True) + 1e-6
  return ((dataset.x_train - mean) / std).astype(np.float32), ((dataset.x_test - mean) / std).astype(np.float32)


@dataclasses.dataclass
class _Programs:
  init: Callable
  train: Callable
  evaluate: Callable
  from_params: Callable | None = None   # params_K -> state_K with a fresh optimizer (two-phase studies)
  early_scores: Callable | None = None  # params_K, data -> {"train_el2n", "train_grand"} (K, N)


class Engine:
  """Trains models of one config on one dataset, a chunk at a time.

  ``train_chunk(model_ids, keep_KxN)`` returns host numpy records for those models; the caller
  decides what a chunk is and where results go (see :func:`jaxmem.run.run`).
  """

  def __init__(self, dataset: Dataset, config: RunConfig, *, devices: Sequence[jax.Device] | None = None,
               probe_cache: Any = "default", log: Callable[[str], None] | None = None):
    self.dataset = dataset
    self.config = config
    self.strategy = lifting.parse_strategy(config.strategy)  # None until auto has probed
    self.devices = list(devices or jax.devices())
    if self.strategy is not None and self.strategy.kind == "loop":
      # The reference loop runs one model at a time on one device: per-model slices of arrays
      # sharded over several devices would only add transfers to every call.
      self.devices = self.devices[:1]
    self.mesh = Mesh(np.array(self.devices), (MODEL_AXIS,))
    self.model = build_model(config.model, dataset.num_classes, config.model_options, dtype=config.compute_dtype)
    self.probe_cache = lifting.default_cache_path() if probe_cache == "default" else probe_cache
    self.log = log or (lambda message: None)
    self.probe_seconds: dict[str, float] = {}
    x_train, x_test = standardize(dataset)
    replicated = NamedSharding(self.mesh, P())
    self.data = jax.device_put(
        DeviceData(x_train, dataset.y_train.astype(np.int32), x_test, dataset.y_test.astype(np.int32)), replicated)
    self._programs: dict[tuple[str, int], _Programs] = {}

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def padded_size(self, num_models: int) -> int:
    """Chunks are padded to a multiple of the device count (padding models are discarded)."""
    return -(-num_models // self.num_devices) * self.num_devices

  def _grad_batch(self, strategy: lifting.Strategy, budget_bytes: int = 256 << 20) -> int:
    """GraNd's per-example gradients per batch: as many as fit ``budget_bytes`` (float32) for the
    models that run at once on a device under ``strategy``."""
    shapes = jax.eval_shape(lambda: self.model.init(jax.random.PRNGKey(0), self.data.x_train[:1]))
    num_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    at_once = {"vmap": self.padded_size(self.config.chunk_size) // self.num_devices,
               "mixed": strategy.width}.get(strategy.kind, 1)
    return int(np.clip(budget_bytes // (4 * max(num_params, 1) * max(at_once, 1)), 1, 256))

  def _build(self, strategy: lifting.Strategy, num_steps: int) -> _Programs:
    key = (str(strategy), num_steps)
    if key in self._programs:
      return self._programs[key]
    cfg = self.config
    tx = make_optimizer(
        optimizer=cfg.optimizer, learning_rate=cfg.learning_rate, schedule=cfg.schedule,
        total_steps=cfg.epochs * num_steps, warmup_steps=cfg.warmup_epochs * num_steps,
        momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    fns = make_model_functions(self.model, tx, batch_size=cfg.batch_size, num_steps=num_steps,
                               augment=cfg.augment, record_epochs=cfg.record_epochs,
                               eval_batch=EVAL_BATCH.get(self.devices[0].platform, DEFAULT_EVAL_BATCH),
                               record_epoch_margin=cfg.record_epoch_margin,
                               grad_batch=self._grad_batch(strategy),
                               queries=cfg.queries)  # >1: train/test_margin_aug (K,N,A)
    if strategy.kind == "loop":
      programs = _loop_programs(fns)
    else:
      programs = self._sharded_programs(fns, strategy)
    self._programs[key] = programs
    return programs

  def _sharded_programs(self, fns, strategy: lifting.Strategy) -> _Programs:
    per_model = P(MODEL_AXIS)
    shard = lambda f, n_model_args, n_shared: jax.shard_map(
        f, mesh=self.mesh, in_specs=(per_model,) * n_model_args + (P(),) * n_shared, out_specs=per_model)

    def init_chunk(keys_K, data):
      return lifting.lift(lambda k: fns.init(k, data), strategy)(keys_K)

    def train_chunk(state_K, keys_K, members_K, counts_K, epoch_ids, data):
      one = lambda s, k, m, c: fns.train(s, k, m, c, epoch_ids, data)
      return lifting.lift(one, strategy)(state_K, keys_K, members_K, counts_K)

    def eval_chunk(params_K, data):
      return lifting.lift(lambda p: fns.evaluate(p, data), strategy)(params_K)

    def from_params_chunk(params_K):
      return lifting.lift(fns.from_params, strategy)(params_K)

    def early_scores_chunk(params_K, data):
      return lifting.lift(lambda p: fns.early_scores(p, data), strategy)(params_K)

    return _Programs(
        init=jax.jit(shard(init_chunk, 1, 1)),
        train=jax.jit(shard(train_chunk, 4, 2), donate_argnums=(0,)),
        evaluate=jax.jit(shard(eval_chunk, 1, 1)),
        from_params=jax.jit(shard(from_params_chunk, 1, 0)),
        early_scores=jax.jit(shard(early_scores_chunk, 1, 1)))

  def resolve_strategy(self, keep_KxN: np.ndarray) -> lifting.Strategy:
    """The configured strategy, or for ``auto`` the fastest candidate on a short timed probe."""
    if self.strategy is not None:
      return self.strategy
    per_device = self.padded_size(keep_KxN.shape[0]) // self.num_devices
    cfg = self.config
    key_parts = {
        "model": repr(self.model), "input": list(self.dataset.input_shape),
        "classes": self.dataset.num_classes, "batch": cfg.batch_size, "augment": cfg.augment,
        "models_per_device": per_device, "devices": self.num_devices,
        "device_kind": self.devices[0].device_kind, "platform": self.devices[0].platform,
        "jax": jax.__version__}
    keys_K, members_K, counts_K = self._device_inputs(np.arange(keep_KxN.shape[0]), keep_KxN)
    num_steps = min(PROBE_STEPS, steps_per_epoch(int(keep_KxN.sum(axis=1).max()), cfg.batch_size))

    def time_candidate(strategy: lifting.Strategy) -> float:
      programs = self._build(strategy, num_steps)
      epochs = jnp.arange(PROBE_EPOCHS, dtype=jnp.int32)
      train = lambda state: jax.block_until_ready(
          programs.train(state, keys_K, members_K, counts_K, epochs, self.data))
      train(programs.init(keys_K, self.data))  # compile and warm up, excluded from the timing
      times = []
      for _ in range(3):  # init is outside the timing: only training steps are compared
        state = jax.block_until_ready(programs.init(keys_K, self.data))
        start = time.perf_counter()
        train(state)
        times.append(time.perf_counter() - start)
      return float(np.median(times))

    best, seconds = lifting.choose_strategy(
        lifting.candidate_strategies(per_device), time_candidate, key_parts=key_parts,
        cache_path=self.probe_cache)
    self.strategy, self.probe_seconds = best, seconds
    self.log(f"strategy auto -> {best} (probe, {PROBE_EPOCHS}x{num_steps} steps: "
             + ", ".join(f"{k}={v * 1e3:.1f}ms" for k, v in seconds.items()) + ")")
    return best

  def _device_inputs(self, model_ids: np.ndarray, keep_KxN: np.ndarray):
    padded = self.padded_size(len(model_ids))
    pad = padded - len(model_ids)
    ids = np.concatenate([model_ids, np.repeat(model_ids[-1:], pad)])
    keep = np.concatenate([keep_KxN, np.repeat(keep_KxN[-1:], pad, axis=0)])
    members_K, counts_K = members_from_keep(keep)
    sharded = NamedSharding(self.mesh, P(MODEL_AXIS))
    keys_K = jax.device_put(model_keys(self.config.seed, ids), sharded)
    return keys_K, jax.device_put(members_K, sharded), jax.device_put(counts_K, sharded)

  def train_chunk(self, model_ids: Sequence[int], keep_KxN: np.ndarray, *,
                  epochs_per_call: int | None = None,
                  on_progress: Callable[[int], None] | None = None,
                  init_params: Any | None = None, checkpoint: Any | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  on_params: Callable[[int, Any], None] | None = None,
                  stops: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Train and evaluate the given models; returns records with a leading model axis.

    ``checkpoint`` (a :class:`jaxmem.store.ChunkCheckpoint`): training continues from its latest
    save if any, and saves when due at host-call boundaries. ``should_stop`` is polled after each
    host call: when it turns true, the state is saved (waiting for the write) and
    :class:`TrainingStopped` is raised. A resumed chunk runs the same host calls with the same
    compiled program on a state of the same dtypes and shardings, so its result is bitwise the
    uninterrupted one.

    ``epochs_per_call`` splits training into host calls (for progress and checkpoints); it does not
    change results, because each epoch's randomness is keyed by its epoch index.

    ``on_params(epochs_done, params_K)`` (optional) is called with the initial parameters (0) and
    after every host call (``epochs_per_call=1``: every epoch) with the chunk's parameters (leading
    axis: the padded chunk; slice ``[:K]``), for studies that need parameters at chosen epochs. The arrays are donated to
    the next training call: the callback must copy what it keeps (``jax.device_get``) before returning.
    ``stops``: extra host-call boundaries (epochs), e.g. where ``on_params`` must see the parameters.

    ``init_params`` (optional): per-model parameters to start from instead of initializing (leading
    axis: the K models, or K padded to the device count, e.g. ``last_state.params`` of an earlier
    call), with a fresh optimizer state and schedule. With ``keep_KxN`` naming another membership
    this is the second phase of a two-phase study (SSFT, :mod:`jaxmem.studies.ssft`).

    With ``config.record_epochs`` the records add ``train_correct_epochs_packed`` (K, E, ceil(N/8))
    uint8, the per-epoch correctness bit-packed along N (``RunDir.load_records`` unpacks it to
    ``train_correct_epochs`` (M, E, N) bool); with ``record_epoch_margin`` also
    ``train_margin_epochs`` (K, E, N) float32; with ``config.score_epoch`` set, ``train_el2n`` and
    ``train_grand`` (K, N) after that many epochs (0: at initialization).
    """
    model_ids = np.asarray(model_ids, dtype=np.int64)
    keep_KxN = np.asarray(keep_KxN, dtype=bool)
    strategy = self.resolve_strategy(keep_KxN)
    num_steps = steps_per_epoch(int(keep_KxN.sum(axis=1).max()), self.config.batch_size)
    programs = self._build(strategy, num_steps)
    keys_K, members_K, counts_K = self._device_inputs(model_ids, keep_KxN)
    start = time.perf_counter()
    if init_params is None:
      state = programs.init(keys_K, self.data)
    else:
      state = programs.from_params(self._pad_models(init_params, len(model_ids)))
    epochs = self.config.epochs
    per_call = epochs_per_call or epochs
    score_epoch = self.config.score_epoch
    early = programs.early_scores(state.params, self.data) if score_epoch == 0 else None
    outputs = []
    done = 0
    restored = checkpoint.restore(state) if checkpoint is not None else None
    if restored is not None:  # the per-epoch outputs and early scores so far come with the state
      done, state, history = restored
      outputs.append(history["per_epoch"])
      early = history.get("early", early)
      if on_progress is not None:
        on_progress(done)
    self.resumed_from_epoch = done
    if on_params is not None:
      on_params(done, state.params)
    for first, stop in _call_ranges(epochs, per_call, score_epoch, stops):
      if stop <= done:
        continue
      epoch_ids = jnp.arange(max(first, done), stop, dtype=jnp.int32)
      state, per_epoch_K = programs.train(state, keys_K, members_K, counts_K, epoch_ids, self.data)
      outputs.append(per_epoch_K)
      if on_params is not None:
        on_params(stop, state.params)
      if stop == score_epoch:
        early = programs.early_scores(state.params, self.data)
      if on_progress is not None:
        jax.block_until_ready(per_epoch_K["loss"])
        on_progress(stop)
      stopping = should_stop is not None and should_stop() and stop < epochs
      if checkpoint is not None and stop < epochs and (stopping or checkpoint.due(stop)):
        history = {"per_epoch": _concat_epochs(outputs)}
        if early is not None:
          history["early"] = jax.device_get(early)
        checkpoint.save(stop, state, history, wait=stopping)
      if stopping:
        raise TrainingStopped(stop, saved=checkpoint is not None)
    records = programs.evaluate(state.params, self.data)
    records = {name: np.asarray(value)[: len(model_ids)] for name, value in records.items()}
    per_epoch = {name: value[: len(model_ids)] for name, value in _concat_epochs(outputs).items()}
    records["epoch_loss"] = per_epoch.pop("loss")
    records.update(pack_epoch_records(per_epoch))
    if early is not None:
      records.update({name: np.asarray(value)[: len(model_ids)] for name, value in early.items()})
    records["model_ids"] = model_ids
    records["keep"] = keep_KxN
    records["train_seconds"] = np.float64(time.perf_counter() - start)
    self.last_state = state
    return records

  def _pad_models(self, tree: Any, num_models: int) -> Any:
    """Per-model arrays of K rows padded (repeating the last) to the chunk's padded size."""
    padded = self.padded_size(num_models)

    def pad(x):
      if x.shape[0] == padded:
        return x
      if x.shape[0] != num_models:
        raise ValueError(f"init_params has {x.shape[0]} models; expected {num_models} or {padded}")
      return jnp.concatenate([jnp.asarray(x), jnp.repeat(jnp.asarray(x)[-1:], padded - num_models, axis=0)])
    return jax.tree.map(pad, tree)


class TrainingStopped(Exception):
  """Training of a chunk stopped early on request (a signal) after ``epochs_done`` epochs."""

  def __init__(self, epochs_done: int, *, saved: bool):
    super().__init__(f"stopped after {epochs_done} epochs")
    self.epochs_done, self.saved = epochs_done, saved


def _concat_epochs(outputs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """The per-epoch outputs of successive host calls ({name: (K, E_call, ...)}) joined along epochs."""
  return {name: np.concatenate([np.asarray(o[name]) for o in outputs], axis=1) for name in outputs[0]}


def _call_ranges(epochs: int, per_call: int, score_epoch: int | None,
                 extra_stops: Sequence[int] = ()) -> list[tuple[int, int]]:
  """Epoch ranges [first, stop) of the host calls: every ``per_call`` epochs, and a boundary at
  ``score_epoch`` so EL2N/GraNd see the model after exactly that many epochs (and at ``extra_stops``)."""
  stops = set(range(per_call, epochs, per_call)) | {epochs} | {e for e in extra_stops if 0 < e < epochs}
  if score_epoch is not None and 0 < score_epoch < epochs:
    stops.add(score_epoch)
  stops = sorted(stops)
  return list(zip([0] + stops[:-1], stops))


def pack_epoch_records(per_epoch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Chunk records from the per-epoch outputs (K, E, N): correctness bit-packed along N (8x
  smaller than bool; ``RunDir.load_records`` unpacks it), margins as float32."""
  out = {}
  if "train_correct" in per_epoch:
    correct_KxExN = np.asarray(per_epoch["train_correct"], dtype=bool)
    out["train_correct_epochs_packed"] = np.packbits(correct_KxExN, axis=-1)
    out["train_correct_epochs_num_examples"] = np.int64(correct_KxExN.shape[-1])  # 0-d: not per model
  if "train_margin" in per_epoch:
    out["train_margin_epochs"] = np.asarray(per_epoch["train_margin"], dtype=np.float32)
  return out


def _loop_programs(fns) -> _Programs:
  """The reference: one jitted single-model program, called in a Python loop over models."""
  init_one = jax.jit(fns.init)
  train_one = jax.jit(fns.train)
  eval_one = jax.jit(fns.evaluate)
  stack = lambda items: jax.tree.map(lambda *xs: jnp.stack(xs), *items)
  unstack = lambda tree, k: jax.tree.map(lambda x: x[k], tree)
  size = lambda tree: jax.tree.leaves(tree)[0].shape[0]

  def init(keys_K, data):
    return stack([init_one(keys_K[k], data) for k in range(keys_K.shape[0])])

  def train(state_K, keys_K, members_K, counts_K, epoch_ids, data):
    outs = [train_one(unstack(state_K, k), keys_K[k], members_K[k], counts_K[k], epoch_ids, data)
            for k in range(size(state_K))]
    return stack([o[0] for o in outs]), stack([o[1] for o in outs])

  def evaluate(params_K, data):
    return stack([eval_one(unstack(params_K, k), data) for k in range(size(params_K))])

  from_params_one, early_one = jax.jit(fns.from_params), jax.jit(fns.early_scores)

  def from_params(params_K):
    return stack([from_params_one(unstack(params_K, k)) for k in range(size(params_K))])

  def early_scores(params_K, data):
    return stack([early_one(unstack(params_K, k), data) for k in range(size(params_K))])

  return _Programs(init, train, evaluate, from_params, early_scores)
