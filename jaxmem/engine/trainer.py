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


class Engine:
  """Trains models of one config on one dataset, a chunk at a time.

  ``train_chunk(model_ids, keep_KxN)`` returns host numpy records for those models; the caller
  decides what a chunk is and where results go (see :func:`jaxmem.run.run`).
  """

  def __init__(self, dataset: Dataset, config: RunConfig, *, devices: Sequence[jax.Device] | None = None,
               probe_cache: Any = "default", log: Callable[[str], None] | None = None):
    self.dataset = dataset
    self.config = config
    self.devices = list(devices or jax.devices())
    self.mesh = Mesh(np.array(self.devices), (MODEL_AXIS,))
    self.model = build_model(config.model, dataset.num_classes, config.model_options)
    self.probe_cache = lifting.default_cache_path() if probe_cache == "default" else probe_cache
    self.log = log or (lambda message: None)
    self.strategy = lifting.parse_strategy(config.strategy)  # None until auto has probed
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
                               augment=cfg.augment, queries=cfg.queries)  # >1: train/test_margin_aug (K,N,A)
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

    return _Programs(
        init=jax.jit(shard(init_chunk, 1, 1)),
        train=jax.jit(shard(train_chunk, 4, 2), donate_argnums=(0,)),
        evaluate=jax.jit(shard(eval_chunk, 1, 1)))

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
                  on_progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Train and evaluate the given models; returns records with a leading model axis.

    ``epochs_per_call`` splits training into host calls (for progress and checkpoints); it does not
    change results, because each epoch's randomness is keyed by its epoch index.
    """
    model_ids = np.asarray(model_ids, dtype=np.int64)
    keep_KxN = np.asarray(keep_KxN, dtype=bool)
    strategy = self.resolve_strategy(keep_KxN)
    num_steps = steps_per_epoch(int(keep_KxN.sum(axis=1).max()), self.config.batch_size)
    programs = self._build(strategy, num_steps)
    keys_K, members_K, counts_K = self._device_inputs(model_ids, keep_KxN)
    start = time.perf_counter()
    state = programs.init(keys_K, self.data)
    epochs = self.config.epochs
    per_call = epochs_per_call or epochs
    losses = []
    for first in range(0, epochs, per_call):
      epoch_ids = jnp.arange(first, min(first + per_call, epochs), dtype=jnp.int32)
      state, loss_KxE = programs.train(state, keys_K, members_K, counts_K, epoch_ids, self.data)
      losses.append(loss_KxE)
      if on_progress is not None:
        jax.block_until_ready(loss_KxE)
        on_progress(int(epoch_ids[-1]) + 1)
    records = programs.evaluate(state.params, self.data)
    records = {name: np.asarray(value)[: len(model_ids)] for name, value in records.items()}
    records["epoch_loss"] = np.concatenate([np.asarray(l) for l in losses], axis=1)[: len(model_ids)]
    records["model_ids"] = model_ids
    records["keep"] = keep_KxN
    records["train_seconds"] = np.float64(time.perf_counter() - start)
    self.last_state = state
    return records


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
    return stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs])

  def evaluate(params_K, data):
    return stack([eval_one(unstack(params_K, k), data) for k in range(size(params_K))])

  return _Programs(init, train, evaluate)
