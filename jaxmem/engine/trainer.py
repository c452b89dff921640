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
from jaxmem.errors import JaxmemError
from jaxmem.engine import lift as lifting
from jaxmem.engine import memory
from jaxmem.engine.step import DeviceData, make_epoch_optimizer, make_model_functions, steps_per_epoch
from jaxmem.engine.text import make_text_task
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


def members_from_keep(keep_KxN: np.ndarray, copies_N: np.ndarray | None = None, *,
                      length: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Per-model member indices padded to a common length (at least ``length``), and the true counts.
  With ``copies_N`` (a text corpus's duplicates) example i appears ``copies_N[i]`` times among a
  model's members: membership is per unique example, and a member is trained on every copy, every
  epoch."""
  rows = [np.flatnonzero(row) for row in keep_KxN]
  if copies_N is not None:
    rows = [np.repeat(idx, np.asarray(copies_N)[idx]) for idx in rows]
  counts_K = np.asarray([idx.size for idx in rows], dtype=np.int32)
  members_KxS = np.zeros((keep_KxN.shape[0], max(int(counts_K.max()), length, 1)), dtype=np.int32)
  for k, idx in enumerate(rows):
    members_KxS[k, : idx.size] = idx
  return members_KxS, counts_K


def image_statistics(x_uint8: np.ndarray, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation (+1e-6) of uint8 images scaled to [0, 1], with
  float64 sums over blocks of examples: no float copy of the dataset on the host."""
  channels = x_uint8.shape[-1]
  total, squares, count = np.zeros(channels), np.zeros(channels), 0
  for start in range(0, x_uint8.shape[0], block):
    part = x_uint8[start: start + block].reshape(-1, channels).astype(np.float64) / 255
    total += part.sum(axis=0)
    squares += np.square(part).sum(axis=0)
    count += part.shape[0]
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - mean ** 2, 0)) + 1e-6
  shape = (1,) * (x_uint8.ndim - 1) + (channels,)
  return mean.astype(np.float32).reshape(shape), std.astype(np.float32).reshape(shape)


def standardize(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel standardization with train statistics (last axis = channels/features), as
  float32 host arrays (uint8 images are scaled to [0, 1] first; the engine itself keeps them
  uint8 and standardizes on the device, see :func:`jaxmem.engine.step.features`)."""
  if dataset.x_train.dtype == np.uint8:
    mean, std = image_statistics(dataset.x_train)
    scale = lambda x: ((x.astype(np.float32) / np.float32(255) - mean) / std).astype(np.float32)
    return scale(dataset.x_train), scale(dataset.x_test)
  axes = tuple(range(dataset.x_train.ndim - 1))
  mean = dataset.x_train.mean(axis=axes, keepdims=True)
  std = dataset.x_train.std(axis=axes, keepdims=True) + 1e-6
  return ((dataset.x_train - mean) / std).astype(np.float32), ((dataset.x_test - mean) / std).astype(np.float32)


def default_epochs_per_call(epochs: int) -> int:
  """Epochs per host call: a few calls per chunk give live progress and checkpoints; results do
  not depend on this split. The largest divisor of ``epochs`` up to a quarter of them (so every
  call but a ``score_epoch`` split has the same length)."""
  return max(d for d in range(1, epochs + 1) if epochs % d == 0 and d <= max(1, -(-epochs // 4)))


def epoch_segment(first: int, stop: int, length: int) -> jax.Array:
  """Epoch ids ``first .. stop - 1`` padded with -1 (no epoch) to ``length``: every host call
  passes the same shape, so one program runs segments of any length up to ``length``."""
  if stop - first > length:
    raise ValueError(f"epoch segment [{first}, {stop}) is longer than {length}")
  return jnp.asarray(np.concatenate([np.arange(first, stop), np.full(length - (stop - first), -1)]).astype(np.int32))


@dataclasses.dataclass
class _Programs:
  init: Callable
  train: Callable
  evaluate: Callable
  from_params: Callable | None = None   # params_K -> state_K with a fresh optimizer (two-phase studies)
  early_scores: Callable | None = None  # params_K, data -> {"train_el2n", "train_grand"} (K, N)
  jitted: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> jitted function (compile counts)


class Engine:
  """Trains models of one config on one dataset, a chunk at a time.

  ``train_chunk(model_ids, keep_KxN)`` returns host numpy records for those models; the caller
  decides what a chunk is and where results go (see :func:`jaxmem.run.run`).
  """

  def __init__(self, dataset: Dataset, config: RunConfig, *, devices: Sequence[jax.Device] | None = None,
               probe_cache: Any = "default", log: Callable[[str], None] | None = None,
               chunk_models: int | None = None, max_members: int | None = None, abstract: bool = False):
    """``chunk_models``: compile programs for at least this many models and pad shorter chunks up
    to it (padding models are discarded). A vmapped program's floating-point results depend on its
    model count (XLA picks kernels by shape) but not on a model's position in it, so with a fixed
    count model m's result is bitwise the same in whichever chunk it lands (a run that grows
    equals a fresh one) and a run compiles one training program. None: each chunk's own size.

    ``max_members``: the largest training subset of any model this engine will train (e.g. the
    largest subset ratio's). Member lists are padded to it and programs made for its steps per
    epoch, with each chunk's own step count as data, so one program serves every subset ratio.
    A model's batches do not depend on this padding (its shuffle keys are drawn per position).
    None: each chunk's own largest subset.

    ``abstract``: only the dataset's shapes reach the engine (no data is standardized or put on a
    device): its programs can be compiled and their memory read (:meth:`program_memory`), nothing
    trained. For planning a run before its data or its devices are at hand."""
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
    self.chunk_models = chunk_models or 0
    self.max_members = max_members or 0
    replicated = NamedSharding(self.mesh, P())
    if dataset.is_text:  # tokens as they are; per sequence, the task needs its extraction prefix
      self.task = make_text_task(dataset.secrets)
      self.copies = np.asarray(dataset.copies)
    else:
      self.task, self.copies = None, None
    stored = dataset.x_train.dtype == np.uint8 and not dataset.is_text  # images stay uint8 on the devices
    if dataset.is_text:
      data = DeviceData(dataset.x_train, dataset.prefix_len, dataset.x_test, np.ones(dataset.num_test, np.int32))
      self.data = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=replicated),
                               data) if abstract else jax.device_put(data, replicated)
    elif abstract:
      spec = lambda x, dtype: jax.ShapeDtypeStruct(x.shape, dtype, sharding=replicated)
      x_dtype = np.uint8 if stored else jnp.float32
      channel = jax.ShapeDtypeStruct((1,) * (dataset.x_train.ndim - 1) + dataset.x_train.shape[-1:], jnp.float32,
                                     sharding=replicated) if stored else None
      self.data = DeviceData(spec(dataset.x_train, x_dtype), spec(dataset.y_train, jnp.int32),
                             spec(dataset.x_test, x_dtype), spec(dataset.y_test, jnp.int32), channel, channel)
    elif stored:
      mean, std = image_statistics(dataset.x_train)
      self.data = jax.device_put(
          DeviceData(dataset.x_train, dataset.y_train.astype(np.int32), dataset.x_test,
                     dataset.y_test.astype(np.int32), mean, std), replicated)
    else:
      x_train, x_test = standardize(dataset)
      self.data = jax.device_put(
          DeviceData(x_train, dataset.y_train.astype(np.int32), x_test, dataset.y_test.astype(np.int32)), replicated)
    self._programs: dict[tuple[str, int], _Programs] = {}
    self.epochs_per_call = default_epochs_per_call(config.epochs)
    # Bytes a program may use per device (None: unknown, e.g. a CPU without --device-memory-gib:
    # then nothing is compiled just to measure memory). Evaluation batch per strategy, sized to fit.
    self.device_memory = memory.device_memory_bytes(self.devices[0], config.device_memory_gib)
    self.default_eval_batch = EVAL_BATCH.get(self.devices[0].platform, DEFAULT_EVAL_BATCH)
    self.eval_batches: dict[str, int] = {}
    self.memory_table: list[dict[str, Any]] = []
    self._memory: dict[tuple, memory.ProgramMemory] = {}  # analyses so far (each costs a compile)

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def padded_size(self, num_models: int) -> int:
    """Chunks are padded to ``chunk_models`` and to a multiple of the device count (padding models
    are discarded)."""
    num_models = max(num_models, self.chunk_models)
    return -(-num_models // self.num_devices) * self.num_devices

  def max_subset_size(self, keep_KxN: np.ndarray) -> int:
    """The most training examples (copies counted) any of these models sees per epoch."""
    if self.copies is None:
      return int(keep_KxN.sum(axis=1).max())
    return int((keep_KxN * self.copies[None, :]).sum(axis=1).max())

  def _grad_batch(self, strategy: lifting.Strategy, budget_bytes: int = 256 << 20) -> int:
    """GraNd's per-example gradients per batch: as many as fit ``budget_bytes`` (float32) for the
    models that run at once on a device under ``strategy``."""
    one_example = jax.ShapeDtypeStruct((1,) + tuple(self.data.x_train.shape[1:]), jnp.float32)
    shapes = jax.eval_shape(lambda x: self.model.init(jax.random.PRNGKey(0), x), one_example)
    num_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    at_once = {"vmap": self.padded_size(self.config.chunk_size) // self.num_devices,
               "mixed": strategy.width}.get(strategy.kind, 1)
    return int(np.clip(budget_bytes // (4 * max(num_params, 1) * max(at_once, 1)), 1, 256))

  def _build(self, strategy: lifting.Strategy, num_steps: int, eval_batch: int | None = None) -> _Programs:
    """The programs for ``strategy`` with room for ``num_steps`` steps per epoch (the largest
    subset's); a chunk's own step count, epochs and padding are arguments of the same program.
    ``eval_batch``: examples per evaluation batch (default: the one sized for ``strategy``)."""
    eval_batch = eval_batch or self.eval_batches.get(str(strategy), self.default_eval_batch)
    key = (str(strategy), num_steps, eval_batch)
    if key in self._programs:
      return self._programs[key]
    cfg = self.config
    tx = make_epoch_optimizer(
        optimizer=cfg.optimizer, learning_rate=cfg.learning_rate, schedule=cfg.schedule, epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    fns = make_model_functions(self.model, tx, batch_size=cfg.batch_size, num_steps=num_steps,
                               augment=cfg.augment, record_epochs=cfg.record_epochs,
                               eval_batch=eval_batch,
                               record_epoch_margin=cfg.record_epoch_margin,
                               grad_batch=self._grad_batch(strategy),
                               queries=cfg.queries,  # >1: train/test_margin_aug (K,N,A)
                               task=self.task)
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

    def train_chunk(state_K, keys_K, members_K, counts_K, epoch_ids, steps, data):
      one = lambda s, k, m, c: fns.train(s, k, m, c, epoch_ids, steps, data)
      return lifting.lift(one, strategy)(state_K, keys_K, members_K, counts_K)

    def eval_chunk(params_K, data):
      return lifting.lift(lambda p: fns.evaluate(p, data), strategy)(params_K)

    def from_params_chunk(params_K):
      return lifting.lift(fns.from_params, strategy)(params_K)

    def early_scores_chunk(params_K, data):
      return lifting.lift(lambda p: fns.early_scores(p, data), strategy)(params_K)

    programs = _Programs(
        init=jax.jit(shard(init_chunk, 1, 1)),
        train=jax.jit(shard(train_chunk, 4, 3), donate_argnums=(0,)),
        evaluate=jax.jit(shard(eval_chunk, 1, 1)),
        from_params=jax.jit(shard(from_params_chunk, 1, 0)),
        early_scores=jax.jit(shard(early_scores_chunk, 1, 1)))
    programs.jitted = {name: getattr(programs, name) for name in ("init", "train", "evaluate", "from_params", "early_scores")}
    return programs

  def abstract_inputs(self, num_models: int, strategy: lifting.Strategy, num_steps: int,
                      eval_batch: int) -> dict[str, tuple]:
    """Shapes, dtypes and shardings (no data) of the arguments of the train and evaluate programs
    for a chunk of ``num_models`` models: enough to compile them and read their memory."""
    programs = self._build(strategy, num_steps, eval_batch)
    padded = self.padded_size(num_models)
    sharded, replicated = NamedSharding(self.mesh, P(MODEL_AXIS)), NamedSharding(self.mesh, P())
    spec = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    like = lambda tree, sharding: jax.tree.map(lambda a: spec(a.shape, a.dtype, sharding), tree)
    data = like(self.data, replicated)
    keys_K = like(jax.eval_shape(lambda: model_keys(0, np.arange(padded))), sharded)
    state_K = like(jax.eval_shape(programs.init, keys_K, data), sharded)
    members = max(self.max_members, 1)
    return {"train": (state_K, keys_K, spec((padded, members), jnp.int32, sharded), spec((padded,), jnp.int32, sharded),
                      spec((self.epochs_per_call,), jnp.int32, replicated), spec((), jnp.int32, replicated), data),
            "evaluate": (state_K.params, data)}

  def program_memory(self, strategy: lifting.Strategy, num_models: int, num_steps: int,
                     eval_batch: int, which: Sequence[str] = ("train", "evaluate")) -> dict[str, memory.ProgramMemory]:
    """XLA's memory analysis (bytes per device) of the programs for a chunk of ``num_models``,
    compiled ahead of time on abstract inputs: nothing is trained or evaluated."""
    programs = self._build(strategy, num_steps, eval_batch)
    inputs = self.abstract_inputs(num_models, strategy, num_steps, eval_batch)
    out = {}
    for name in which:
      key = (str(strategy), self.padded_size(num_models), num_steps, eval_batch, name)
      if key not in self._memory:
        self._memory[key] = memory.ProgramMemory.of(getattr(programs, name).lower(*inputs[name]).compile())
      out[name] = self._memory[key]
    return out

  def fit_to_memory(self, candidates: Sequence[lifting.Strategy], num_models: int,
                    num_steps: int) -> list[lifting.Strategy]:
    """The candidates whose training fits ``device_memory`` with an evaluation batch that fits
    too; records each one's largest fitting evaluation batch (``eval_batches``) and the analysis
    (``memory_table``). Without a known device memory, every candidate (nothing is compiled)."""
    if self.device_memory is None:
      return list(candidates)
    kept = []
    for strategy in candidates:
      if strategy.kind == "loop":
        kept.append(strategy)
        continue
      ladder = memory.eval_batch_ladder(self.default_eval_batch)
      train = self.program_memory(strategy, num_models, num_steps, ladder[0], ("train",))["train"]
      row = {"strategy": str(strategy), "train": train.to_dict(), "evaluate": None, "eval_batch": None,
             "fits": False}
      if memory.fits(train, self.device_memory):
        evaluate_at = lambda b: self.program_memory(strategy, num_models, num_steps, b, ("evaluate",))["evaluate"]
        eval_batch = memory.largest_fitting_batch(ladder, evaluate_at, self.device_memory)
        if eval_batch is not None:
          row.update(evaluate=evaluate_at(eval_batch).to_dict(), eval_batch=eval_batch, fits=True)
          self.eval_batches[str(strategy)] = eval_batch
          kept.append(strategy)
        else:
          row.update(evaluate=evaluate_at(ladder[-1]).to_dict(), eval_batch=ladder[-1])
      self.memory_table.append(row)
    return kept

  def _check_fits(self, candidates: Sequence[lifting.Strategy], kept: Sequence[lifting.Strategy]) -> None:
    if kept:
      return
    need = min(max(r["train"]["peak"], (r["evaluate"] or {}).get("peak", 0)) for r in self.memory_table)
    raise JaxmemError(
        f"no strategy of {', '.join(map(str, candidates))} fits {memory.gib(self.device_memory)} of device "
        f"memory (the smallest needs {memory.gib(need)} per device for chunk_size {self.config.chunk_size}); "
        "use a smaller --chunk-size or more devices")

  def resolve_strategy(self, keep_KxN: np.ndarray) -> lifting.Strategy:
    """The configured strategy, or for ``auto`` the fastest candidate on a short timed probe among
    those whose training and evaluation fit the device memory (when it is known)."""
    num_models = keep_KxN.shape[0]
    if self.strategy is not None:
      if self.device_memory is not None and str(self.strategy) not in self.eval_batches:
        self._check_fits([self.strategy], self.fit_to_memory([self.strategy], num_models, self._program_steps(keep_KxN)))
      return self.strategy
    per_device = self.padded_size(keep_KxN.shape[0]) // self.num_devices
    cfg = self.config
    candidates = lifting.candidate_strategies(per_device)
    fitting = self.fit_to_memory(candidates, num_models, self._program_steps(keep_KxN))
    self._check_fits(candidates, fitting)
    key_parts = {
        "device_memory": self.device_memory, "candidates": [str(c) for c in fitting],
        "model": repr(self.model), "input": list(self.dataset.input_shape),
        "classes": self.dataset.num_classes, "batch": cfg.batch_size, "augment": cfg.augment,
        "models_per_device": per_device, "devices": self.num_devices,
        "device_kind": self.devices[0].device_kind, "platform": self.devices[0].platform,
        "jax": jax.__version__}
    keys_K, members_K, counts_K = self._device_inputs(np.arange(keep_KxN.shape[0]), keep_KxN)
    # The probe runs the very program the run trains with (a short step count and few epochs are
    # its data), so the winner is compiled once.
    num_steps = min(PROBE_STEPS, steps_per_epoch(self.max_subset_size(keep_KxN), cfg.batch_size))
    steps = jnp.asarray(num_steps, jnp.int32)
    probe_epochs = min(PROBE_EPOCHS, self.epochs_per_call)
    epochs = epoch_segment(0, probe_epochs, self.epochs_per_call)

    def time_candidate(strategy: lifting.Strategy) -> float:
      programs = self._build(strategy, self._program_steps(keep_KxN))
      train = lambda state: jax.block_until_ready(
          programs.train(state, keys_K, members_K, counts_K, epochs, steps, self.data))
      train(programs.init(keys_K, self.data))  # compile and warm up, excluded from the timing
      times = []
      for _ in range(3):  # init is outside the timing: only training steps are compared
        state = jax.block_until_ready(programs.init(keys_K, self.data))
        start = time.perf_counter()
        train(state)
        times.append(time.perf_counter() - start)
      return float(np.median(times))

    best, seconds = lifting.choose_strategy(
        fitting, time_candidate, key_parts=key_parts,
        cache_path=self.probe_cache)
    self.strategy, self.probe_seconds = best, seconds
    self.log(f"strategy auto -> {best} (probe, {probe_epochs}x{num_steps} steps: "
             + ", ".join(f"{k}={v * 1e3:.1f}ms" for k, v in seconds.items()) + ")")
    return best

  def _program_steps(self, keep_KxN: np.ndarray) -> int:
    """Steps per epoch the programs make room for: the largest subset's (see ``max_members``)."""
    return steps_per_epoch(max(self.max_subset_size(keep_KxN), self.max_members), self.config.batch_size)

  def compile_counts(self) -> dict[str, int]:
    """How many times each program was compiled (over strategies and shapes) so far."""
    counts: dict[str, int] = {}
    for programs in self._programs.values():
      for name, fn in programs.jitted.items():
        counts[name] = counts.get(name, 0) + fn._cache_size()
    return counts

  def _device_inputs(self, model_ids: np.ndarray, keep_KxN: np.ndarray):
    padded = self.padded_size(len(model_ids))
    pad = padded - len(model_ids)
    ids = np.concatenate([model_ids, np.repeat(model_ids[-1:], pad)])
    keep = np.concatenate([keep_KxN, np.repeat(keep_KxN[-1:], pad, axis=0)])
    members_K, counts_K = members_from_keep(keep, self.copies, length=self.max_members)
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

    ``checkpoint`` (a :class:`jaxmem.records.ChunkCheckpoint`): training continues from its latest
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
    ``train_margin_epochs`` (K, E, N) float32 (text runs: ``train_token_accuracy_epochs`` and with
    ``record_epoch_margin`` ``train_loglik_epochs``, (K, E, N) float32); with ``config.score_epoch`` set, ``train_el2n`` and
    ``train_grand`` (K, N) after that many epochs (0: at initialization).
    """
    model_ids = np.asarray(model_ids, dtype=np.int64)
    keep_KxN = np.asarray(keep_KxN, dtype=bool)
    strategy = self.resolve_strategy(keep_KxN)
    steps = jnp.asarray(steps_per_epoch(self.max_subset_size(keep_KxN), self.config.batch_size), jnp.int32)
    programs = self._build(strategy, self._program_steps(keep_KxN))
    keys_K, members_K, counts_K = self._device_inputs(model_ids, keep_KxN)
    start = time.perf_counter()
    if init_params is None:
      state = programs.init(keys_K, self.data)
    else:
      state = programs.from_params(self._pad_models(init_params, len(model_ids)))
    epochs = self.config.epochs
    per_call = epochs_per_call or self.epochs_per_call
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
      epoch_ids = epoch_segment(max(first, done), stop, per_call)
      state, per_epoch_K = programs.train(state, keys_K, members_K, counts_K, epoch_ids, steps, self.data)
      # Only the segment's real epochs (padding epochs output zeros).
      per_epoch_K = {name: np.asarray(value)[:, : stop - max(first, done)] for name, value in per_epoch_K.items()}
      outputs.append(per_epoch_K)
      if on_params is not None:
        on_params(stop, state.params)
      if stop == score_epoch:
        early = programs.early_scores(state.params, self.data)
      if on_progress is not None:
        on_progress(stop)
      stopping = should_stop is not None and should_stop() and stop < epochs
      if checkpoint is not None and stop < epochs and (stopping or checkpoint.due(stop)):
        history = {"per_epoch": _concat_epochs(outputs)}
        if early is not None:
          history["early"] = jax.device_get(early)
        checkpoint.save(stop, state, history, wait=stopping)
      if stopping:
        raise TrainingStopped(stop, saved=checkpoint is not None)
    records = self._evaluate(strategy, programs, state, outputs, early, checkpoint, keep_KxN)
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

  def _evaluate(self, strategy, programs: _Programs, state, outputs, early, checkpoint, keep_KxN) -> dict[str, Any]:
    """Evaluation of the trained chunk. When it runs out of device memory, the trained state is
    saved first (so a rerun never trains the chunk again), then evaluation is retried with half
    the evaluation batch, down to the smallest of :func:`memory.eval_batch_ladder`."""
    saved = False
    while True:
      try:
        return jax.device_get(programs.evaluate(state.params, self.data))
      except Exception as error:  # XlaRuntimeError; its type is not public API
        batch = self.eval_batches.get(str(strategy), self.default_eval_batch)
        if "RESOURCE_EXHAUSTED" not in str(error) or strategy.kind == "loop":
          raise
        if checkpoint is not None and not saved:
          history = {"per_epoch": _concat_epochs(outputs)}
          if early is not None:
            history["early"] = jax.device_get(early)
          checkpoint.save(self.config.epochs, state, history, wait=True)
          saved = True
        smaller = [b for b in memory.eval_batch_ladder(self.default_eval_batch) if b < batch]
        if not smaller:
          raise
        self.log(f"evaluation ran out of device memory with batches of {batch}; trying {smaller[0]}")
        self.eval_batches[str(strategy)] = smaller[0]
        programs = self._build(strategy, self._program_steps(keep_KxN))

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
  for name in ("train_token_accuracy", "train_loglik"):  # text runs (jaxmem.engine.text)
    if name in per_epoch:
      out[f"{name}_epochs"] = np.asarray(per_epoch[name], dtype=np.float32)
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

  def train(state_K, keys_K, members_K, counts_K, epoch_ids, steps, data):
    outs = [train_one(unstack(state_K, k), keys_K[k], members_K[k], counts_K[k], epoch_ids, steps, data)
            for k in range(size(state_K))]
    return stack([o[0] for o in outs]), stack([o[1] for o in outs])

  def evaluate(params_K, data):
    return stack([eval_one(unstack(params_K, k), data) for k in range(size(params_K))])

  from_params_one, early_one = jax.jit(fns.from_params), jax.jit(fns.early_scores)

  def from_params(params_K):
    return stack([from_params_one(unstack(params_K, k)) for k in range(size(params_K))])

  def early_scores(params_K, data):
    return stack([early_one(unstack(params_K, k), data) for k in range(size(params_K))])

  return _Programs(init, train, evaluate, from_params, early_scores,
                   jitted={"init": init_one, "train": train_one, "evaluate": eval_one,
                           "from_params": from_params_one, "early_scores": early_one})
