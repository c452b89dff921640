"""``jaxmem bench``: train the same models several ways, side by side, and compare throughput.

Every variant trains the same work — the same models (keys ``fold_in(seed, m)``), the same
membership subsets, epochs and batch size — in one process and one run. Repeats are interleaved
(variant A, B, C, A, B, C, ...) so that load from other processes on a shared machine hits every
variant alike, and the table reports medians. The first call of each variant (compilation, and for
``auto`` its timed probe) is reported separately and never enters the medians.

Variants:

* ``engine:<strategy>``: :class:`jaxmem.engine.Engine` with a fixed lifting strategy (``vmap``,
  ``map``, ``mixed:W``) and with ``auto``; a timed run is one ``train_chunk`` (init, all epochs,
  and the recording of every model on every train and test example, copied to the host).
  ``<strategy>@xla`` forces ``nn.Conv`` in the CNN (the engine's default on CPU is
  :class:`jaxmem.models.ShiftConv`), e.g. ``vmap@xla`` is what a user vmapping flax convs gets.
* ``jax-step-loop``: what a user writes without jaxmem (flax ``nn.Conv`` for the CNN): one jitted train step, called per batch in
  a Python loop, one model after another; data resident on the device and gathered inside the step
  (one dispatch per step, the most favourable form of this baseline), numpy batch order per epoch.
* ``jax-model-loop``: the engine's ``loop`` strategy — a per-model Python loop over one jitted
  program that runs all of a model's epochs (the best case of a loop of single-model programs;
  it uses the engine's convolution, so it is a stronger baseline than a user's loop).
* ``torch-loop``: the same model in PyTorch (CPU, its default thread count unless
  ``torch_threads``), trained per model with ``torch.optim.Adam`` and the same cosine schedule
  (for text, :func:`torch_transformer`, the same batches of sequences and the same records);
  skipped with a message when PyTorch is absent (``pip install 'jaxmem[torch]'``).

Loop baselines train fewer models than the engine (their cost is linear in the model count, so
models/s is comparable); the table says how many each variant trained.

Utilization: model FLOPs per trained model are 3x the forward FLOPs (XLA's cost analysis of one
model's forward pass) per example seen, times examples seen (epochs x subset size); divided by the
machine's peak, measured here with a large matmul in the models' compute dtype in the same process
(on a busy shared machine both shrink together). The table's last line is the ceiling: the models/s
of every FLOP at that peak, and what it would be as a ratio to each baseline.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem.config import RunConfig
from jaxmem.data import Dataset, from_arrays, load_dataset
from jaxmem.errors import JaxmemError
from jaxmem.masks import make_masks
from jaxmem.text import TEXT_RUN_DEFAULTS


@dataclasses.dataclass(frozen=True)
class Workload:
  """One benchmarked job: a dataset, a config, and how many models each kind of variant trains."""
  name: str
  description: str
  config: RunConfig
  dataset: Callable[[], Dataset]
  engine_models: int
  loop_models: int


def _digits_images() -> Dataset:
  ds = load_dataset("digits")
  shape = lambda x: x.reshape((x.shape[0], 8, 8, 1))
  return from_arrays("digits-8x8", shape(ds.x_train), ds.y_train, shape(ds.x_test), ds.y_test, ds.num_classes)


def _random_images(name: str, num_train: int, num_test: int, shape: tuple[int, ...], seed: int = 0) -> Dataset:
  """Random data of a real dataset's shape: timing does not depend on the pixel values."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (num_train + num_test,) + shape, dtype=np.uint8)
  y = rng.integers(0, 10, num_train + num_test)
  return from_arrays(name, x[:num_train], y[:num_train], x[num_train:], y[num_train:], num_classes=10)


def workloads(quick: bool = False) -> dict[str, Workload]:
  """The registered workloads; ``quick`` shrinks the CPU ones so that a full table takes < 2 min."""
  digits_mlp = RunConfig()  # the default run: digits, MLP 64-256-256-10, batch 64, 30 epochs, r=0.7
  digits_cnn = RunConfig(model="cnn", model_options={"channels": (16, 32)})
  text_recipe = {k: v for k, v in TEXT_RUN_DEFAULTS.items() if k not in ("num_models", "chunk_size", "strategy")}
  canaries_lm = RunConfig(dataset="canaries", model="transformer", **text_recipe)
  if quick:
    digits_mlp = digits_mlp.replace(epochs=8)
    digits_cnn = digits_cnn.replace(epochs=2)
  return {
      "digits-mlp": Workload(
          "digits-mlp", "default run: digits, MLP 64-256-256-10, batch 64, 70% subsets",
          digits_mlp, lambda: load_dataset("digits"), 16 if quick else 64, 2 if quick else 4),
      "digits-cnn": Workload(
          "digits-cnn", "digits as 8x8x1 images, CNN 16-16-pool-32-32-pool, batch 64, 70% subsets",
          digits_cnn, _digits_images, 4 if quick else 16, 2 if quick else 4),
      # The Feldman & Zhang MNIST protocol (2,000 models of 784-512-256-10, 10 epochs, 70% subsets)
      # on MNIST-shaped random data: a GPU workload (hours on this CPU).
      "mnist-protocol": Workload(
          "mnist-protocol", "Feldman & Zhang MNIST protocol: MLP 784-512-256-10, 10 epochs, batch 128, 70%",
          RunConfig(model="mlp", model_options={"hidden_sizes": (512, 256)}, epochs=10, batch_size=128,
                    num_models=2000, chunk_size=500),
          lambda: _random_images("mnist-shaped", 60000, 10000, (28, 28)), 500, 2),
      # The language-model run: the embedded canaries corpus and the default small transformer.
      "canaries-transformer": Workload(
          "canaries-transformer", "canaries text corpus, transformer 2x64 (4 heads), batch 32, Adam, 50% subsets",
          canaries_lm.replace(epochs=2) if quick else canaries_lm, lambda: load_dataset("canaries"),
          16 if quick else 64, 2 if quick else 4),
      # An airbench-class CIFAR-10 CNN (widths 64-256-256, augmentation) on CIFAR-shaped random data.
      "cifar-cnn": Workload(
          "cifar-cnn", "airbench-class CNN 64-256-256 on CIFAR-shaped data, 10 epochs, batch 512, flip+crop, bf16 compute",
          RunConfig(model="cnn", model_options={"channels": (64, 256, 256)}, epochs=10, batch_size=512,
                    augment=True, learning_rate=2e-3, num_models=64, chunk_size=16, compute_dtype="bfloat16"),
          lambda: _random_images("cifar-shaped", 50000, 10000, (32, 32, 3)), 16, 1),
  }


@dataclasses.dataclass
class Row:
  variant: str
  models: int
  seconds: list[float]             # steady-state timed repeats
  first_call_seconds: float        # compilation (+ probe for auto) + one run
  record_seconds: list[float] = dataclasses.field(default_factory=list)  # recording, inside seconds
  note: str = ""

  @property
  def median(self) -> float:
    return statistics.median(self.seconds)

  @property
  def models_per_second(self) -> float:
    return self.models / self.median


@dataclasses.dataclass
class BenchResult:
  workload: str
  description: str
  rows: list[Row]
  skipped: dict[str, str]
  peak_flops: float                # measured matmul FLOP/s in the models' compute dtype
  model_flops: float               # training FLOPs of one model
  environment: dict[str, Any]

  def row(self, variant: str) -> Row | None:
    return next((r for r in self.rows if r.variant == variant), None)

  def utilization(self, row: Row) -> float:
    return self.model_flops * row.models_per_second / self.peak_flops

  def to_dict(self) -> dict[str, Any]:
    return {"workload": self.workload, "description": self.description, "skipped": self.skipped,
            "peak_gflops": self.peak_flops / 1e9, "model_gflops": self.model_flops / 1e9,
            "environment": self.environment,
            "rows": [{"variant": r.variant, "models": r.models, "median_seconds": r.median,
                      "seconds": r.seconds, "first_call_seconds": r.first_call_seconds,
                      "models_per_second": r.models_per_second, "utilization": self.utilization(r),
                      "record_seconds": r.record_seconds, "note": r.note} for r in self.rows]}


# ---------------------------------------------------------------------------------------------
# Measurements.

def measure_peak_flops(size: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
  """Matmul FLOP/s of a ``size``x``size`` product in ``dtype`` (best of ``repeats``): the peak that
  utilization is measured against is the one of the dtype the models compute in."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(matmul(a, a))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    times.append(time.perf_counter() - start)
  return 2.0 * size ** 3 / min(times)  # a peak: the best the machine did


def training_flops_per_model(config: RunConfig, dataset: Dataset, subset_size: int) -> float:
  """3x forward FLOPs per example (forward + backward, the usual model-FLOPs convention), from
  XLA's cost analysis of one model's forward pass, times the examples one model sees."""
  from jaxmem.models import build_model
  model = build_model(config.model, dataset.num_classes, config.model_options, dtype=config.compute_dtype)
  batch = 32
  x = jnp.zeros((batch,) + dataset.input_shape, jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:1]))["params"]
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  cost = forward.lower(params, jax.ShapeDtypeStruct(x.shape, x.dtype)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return 3.0 * float(cost["flops"]) / batch * config.epochs * subset_size


def environment() -> dict[str, Any]:
  env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.processor() or platform.machine(),
         "cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
         "jax": jax.__version__, "backend": jax.default_backend(),
         "devices": [str(d.device_kind) for d in jax.devices()]}
  try:
    env["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
  except OSError:
    pass
  import flax, optax
  env["flax"], env["optax"] = flax.__version__, optax.__version__
  if importlib.util.find_spec("torch") is not None:
    import torch
    env["torch"] = torch.__version__
  return env


def _cpu_name() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


# ---------------------------------------------------------------------------------------------
# Variants. Each is ``prepare() -> run``, where ``run()`` trains its models once and returns
# (seconds, recording seconds or None); prepare does nothing expensive.

def _with_conv(config: RunConfig, conv: str) -> RunConfig:
  if config.model != "cnn":
    return config
  return config.replace(model_options={**config.model_options, "conv": conv})


class _EngineVariant:
  """``strategy`` is a lifting strategy, optionally ``@conv`` to force the CNN's convolution
  (``vmap@xla``: what vmapping ``nn.Conv`` gives, grouped convolutions)."""

  def __init__(self, dataset: Dataset, config: RunConfig, keep_KxN: np.ndarray, strategy: str):
    from jaxmem.engine import Engine
    strategy, _, conv = strategy.partition("@")
    if conv:
      config = _with_conv(config, conv)
    self.engine = Engine(dataset, config.replace(strategy=strategy), probe_cache=None)
    self.keep = keep_KxN
    self.ids = np.arange(keep_KxN.shape[0])

  def __call__(self) -> tuple[float, float | None]:
    start = time.perf_counter()
    self.engine.train_chunk(self.ids, self.keep)
    seconds = time.perf_counter() - start
    # Recording = evaluating every model on every train and test example and copying the records
    # to the host; timed again on its own with the same compiled program (train_chunk runs it too).
    programs = [p for (name, *_), p in self.engine._programs.items() if name == str(self.engine.strategy)]
    start = time.perf_counter()
    jax.device_get(programs[-1].evaluate(self.engine.last_state.params, self.engine.data))
    return seconds, time.perf_counter() - start

  @property
  def note(self) -> str:
    return f"auto chose {self.engine.strategy}" if self.engine.config.strategy == "auto" else ""


class _JaxStepLoop:
  """A user's loop: jitted step per batch, Python loops over models and epochs."""

  def __init__(self, dataset: Dataset, config: RunConfig, keep_KxN: np.ndarray):
    import optax
    from jaxmem.engine.step import make_optimizer, margin_and_correct, steps_per_epoch
    from jaxmem.engine.trainer import model_keys, standardize
    from jaxmem.models import build_model
    self.config, self.keep = config, keep_KxN
    if dataset.is_text:
      raise JaxmemError("the JAX step-loop baseline trains classifiers only; jax-model-loop is the text baseline")
    config = _with_conv(config, "xla")  # a user's model: plain nn.Conv
    model = build_model(config.model, dataset.num_classes, config.model_options, dtype=config.compute_dtype)
    x_train, x_test = standardize(dataset)
    self.data = jax.device_put((x_train, dataset.y_train.astype(np.int32), x_test, dataset.y_test.astype(np.int32)))
    self.num_steps = steps_per_epoch(int(keep_KxN.sum(1).max()), config.batch_size)
    tx = make_optimizer(optimizer=config.optimizer, learning_rate=config.learning_rate, schedule=config.schedule,
                        total_steps=config.epochs * self.num_steps, momentum=config.momentum,
                        weight_decay=config.weight_decay)
    self.keys = model_keys(config.seed, range(keep_KxN.shape[0]))

    @jax.jit
    def init(key, x):
      params = model.init(key, x[:1])["params"]
      return params, tx.init(params)

    def loss_fn(params, x, y):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()

    @jax.jit
    def step(params, opt_state, index_B, x_train, y_train):
      loss, grads = jax.value_and_grad(loss_fn)(params, x_train[index_B], y_train[index_B])
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def evaluate(params, x_train, y_train, x_test, y_test):
      out = []
      for x, y in ((x_train, y_train), (x_test, y_test)):
        out.extend(margin_and_correct(model.apply({"params": params}, x), y))
      return out

    self._init, self._step, self._evaluate = init, step, evaluate

  def __call__(self) -> tuple[float, float]:
    x_train, y_train, x_test, y_test = self.data
    batch = self.config.batch_size
    record_seconds = 0.0
    start = time.perf_counter()
    for k, row in enumerate(self.keep):
      members = np.flatnonzero(row)
      rng = np.random.default_rng([self.config.seed, k])
      params, opt_state = self._init(self.keys[k], x_train)
      for _ in range(self.config.epochs):
        order = rng.permutation(members).astype(np.int32)
        for s in range(0, order.size, batch):  # a partial last batch: one extra compiled shape
          params, opt_state, loss = self._step(params, opt_state, order[s: s + batch], x_train, y_train)
      jax.block_until_ready(params)  # steps are dispatched asynchronously: training ends here
      record_start = time.perf_counter()
      jax.device_get(self._evaluate(params, x_train, y_train, x_test, y_test))
      record_seconds += time.perf_counter() - record_start
    return time.perf_counter() - start, record_seconds


class _TorchBaseline:
  """What the PyTorch baselines share: torch, the run's config and keep rows, and the thread count
  their training runs with (set for the call, then restored)."""

  def __init__(self, config: RunConfig, keep_KxN: np.ndarray, threads: int | None):
    import torch
    # PyTorch's own default (one thread per core) unless told: on the idle 2-core machine 2 threads
    # trained the digits MLP 1.24x faster than 1; on a loaded one they ran 30-50x slower
    # (spinning threads), so compare on a quiet machine or pass torch_threads=1.
    threads = threads or torch.get_num_threads()
    self.torch, self.config, self.keep, self.threads = torch, config, keep_KxN, threads
    self.note = f"{threads} torch thread(s)"

  def __call__(self) -> tuple[float, float]:
    threads = self.torch.get_num_threads()
    self.torch.set_num_threads(self.threads)
    try:
      return self._train_all()
    finally:
      self.torch.set_num_threads(threads)

  def _train_all(self) -> tuple[float, float]:
    """Trains each model in turn on its members (seeded per model), then records; returns the
    seconds of the whole loop and of its recording."""
    torch, cfg = self.torch, self.config
    record_seconds = 0.0
    start = time.perf_counter()
    for k, members in enumerate(self._members_per_model()):
      torch.manual_seed(cfg.seed * 100003 + k)
      members = torch.from_numpy(np.asarray(members, np.int64))
      model = self._model()
      opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
      schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.total_steps)
      for _ in range(cfg.epochs):
        order = members[torch.randperm(members.numel())]
        for s in range(0, order.numel(), cfg.batch_size):
          loss = self._loss(model, order[s: s + cfg.batch_size])
          opt.zero_grad(set_to_none=True)
          loss.backward()
          opt.step()
          schedule.step()
      record_start = time.perf_counter()
      with torch.no_grad():
        self._record(model)
      record_seconds += time.perf_counter() - record_start
    return time.perf_counter() - start, record_seconds

  def _members_per_model(self):
    """Each model's training indices (one array per model)."""
    raise NotImplementedError

  def _loss(self, model, index):
    """The training loss of one batch (indices into ``x_train``)."""
    raise NotImplementedError

  def _record(self, model) -> None:
    """Computes the records the engine computes (timed, results discarded)."""
    raise NotImplementedError


class _TorchLoop(_TorchBaseline):
  """The same model in PyTorch, trained per model with the same batches, optimizer and schedule."""

  def __init__(self, dataset: Dataset, config: RunConfig, keep_KxN: np.ndarray, threads: int | None = None):
    from jaxmem.engine.step import steps_per_epoch
    from jaxmem.engine.trainer import standardize
    super().__init__(config, keep_KxN, threads)
    torch = self.torch
    x_train, x_test = standardize(dataset)
    if dataset.is_image:  # torch convolutions want channels first
      x_train, x_test = x_train.transpose(0, 3, 1, 2).copy(), x_test.transpose(0, 3, 1, 2).copy()
    self.x_train, self.x_test = torch.from_numpy(x_train), torch.from_numpy(x_test)
    self.y_train = torch.from_numpy(dataset.y_train.astype(np.int64))
    self.y_test = torch.from_numpy(dataset.y_test.astype(np.int64))
    self.num_classes = dataset.num_classes
    self.total_steps = config.epochs * steps_per_epoch(int(keep_KxN.sum(1).max()), config.batch_size)
    if config.optimizer != "adam" or config.augment or config.compute_dtype != "float32":
      raise JaxmemError("the PyTorch baseline implements float32 adam without augmentation only")

  def _model(self):
    nn = self.torch.nn
    options = self.config.model_options
    if self.config.model == "mlp":
      layers, width = [nn.Flatten()], int(np.prod(self.x_train.shape[1:]))
      for h in options.get("hidden_sizes", (256, 256)):
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
      return nn.Sequential(*layers, nn.Linear(width, self.num_classes))
    if self.config.model == "cnn":
      layers, channels, size = [], self.x_train.shape[1], min(self.x_train.shape[2:])
      for width in options.get("channels", (16, 32)):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        if size > 1:
          layers.append(nn.MaxPool2d(2))
          size //= 2
        channels = width
      return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, self.num_classes))
    raise JaxmemError(f"no PyTorch baseline for model {self.config.model!r}")

  def _members_per_model(self):
    return [np.flatnonzero(row) for row in self.keep]

  def _loss(self, model, index):
    return self.torch.nn.functional.cross_entropy(model(self.x_train[index]), self.y_train[index])

  def _record(self, model) -> None:
    for x, y in ((self.x_train, self.y_train), (self.x_test, self.y_test)):
      logits = model(x)
      label = logits.gather(1, y[:, None])[:, 0]
      others = logits.scatter(1, y[:, None], float("-inf"))
      (label - self.torch.logsumexp(others, 1)).numpy(), (logits.argmax(1) == y).numpy()


def torch_transformer(torch, vocab_size: int, *, num_layers: int = 2, width: int = 64, num_heads: int = 4,
                      mlp_ratio: int = 4, max_len: int = 256, positions: str = "learned"):
  """:class:`jaxmem.models.Transformer` in PyTorch, for the ``torch-loop`` baseline: the same
  layers and widths (pre-norm blocks, LayerNorm eps 1e-6 as flax's, tanh-approximated GELU as
  flax's ``nn.gelu``, biases in every projection, tied embedding logits), the same parameter count
  (``tests/test_text_run.py``) and the same initial scale (embeddings and positions N(0, 0.02),
  projections flax's ``lecun_normal``: truncated normal of variance 1/fan_in, biases 0). Attention
  is ``scaled_dot_product_attention(is_causal=True)``, what a PyTorch user writes."""
  if positions != "learned":
    raise JaxmemError(f"the PyTorch baseline implements learned positions only, not {positions!r}")
  nn, functional = torch.nn, torch.nn.functional

  def lecun_normal_(linear):
    std = (1.0 / linear.in_features) ** 0.5 / 0.87962566103423978  # flax's truncation correction
    nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(linear.bias)
    return linear

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln_attn, self.ln_mlp = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
      self.qkv, self.out = lecun_normal_(nn.Linear(width, 3 * width)), lecun_normal_(nn.Linear(width, width))
      self.mlp_in = lecun_normal_(nn.Linear(width, mlp_ratio * width))
      self.mlp_out = lecun_normal_(nn.Linear(mlp_ratio * width, width))

    def forward(self, x_BxLxW):
      batch, length, _ = x_BxLxW.shape
      qkv = self.qkv(self.ln_attn(x_BxLxW)).view(batch, length, 3, num_heads, width // num_heads)
      q_BxHxLxD, k_BxHxLxD, v_BxHxLxD = qkv.permute(2, 0, 3, 1, 4)
      attended = functional.scaled_dot_product_attention(q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, is_causal=True)
      x_BxLxW = x_BxLxW + self.out(attended.transpose(1, 2).reshape(batch, length, width))
      return x_BxLxW + self.mlp_out(functional.gelu(self.mlp_in(self.ln_mlp(x_BxLxW)), approximate="tanh"))

  class Model(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(vocab_size, width)
      self.position = nn.Parameter(torch.zeros(max_len, width))
      nn.init.normal_(self.embed.weight, std=0.02)
      nn.init.normal_(self.position, std=0.02)
      self.blocks = nn.ModuleList([Block() for _ in range(num_layers)])
      self.ln_final = nn.LayerNorm(width, eps=1e-6)

    def forward(self, tokens_BxL):
      x_BxLxW = self.embed(tokens_BxL) + self.position[: tokens_BxL.shape[1]][None]
      for block in self.blocks:
        x_BxLxW = block(x_BxLxW)
      return self.ln_final(x_BxLxW) @ self.embed.weight.T   # tied embedding: logits (B, L, V)

  return Model()


class _TorchTransformerLoop(_TorchBaseline):
  """The causal transformer in PyTorch, trained per model on the same text work as the engine:
  each member sequence every copy every epoch, batches of the config's size, next-token
  cross-entropy over real targets, Adam with the cosine schedule; then the same records
  (teacher-forced per-token accuracy, log-likelihood and token log-probabilities of every train
  and test sequence, and with canaries the log-perplexity of every candidate secret)."""

  def __init__(self, dataset, config: RunConfig, keep_KxN: np.ndarray, threads: int | None = None):
    from jaxmem.engine.step import steps_per_epoch
    from jaxmem.engine.text import candidate_rows
    from jaxmem.engine.trainer import members_from_keep
    if config.optimizer != "adam" or config.compute_dtype != "float32" or config.weight_decay:
      raise JaxmemError("the PyTorch baseline implements float32 adam without weight decay only")
    super().__init__(config, keep_KxN, threads)
    torch = self.torch
    self.vocab_size = dataset.num_classes
    self.x_train = torch.from_numpy(np.asarray(dataset.x_train, np.int64))
    self.x_test = torch.from_numpy(np.asarray(dataset.x_test, np.int64))
    members_KxS, counts_K = members_from_keep(keep_KxN, dataset.copies)
    self.members = [members_KxS[k, : counts_K[k]] for k in range(len(keep_KxN))]
    self.total_steps = config.epochs * steps_per_epoch(int(counts_K.max()), config.batch_size)
    self.candidates = None
    secrets = dataset.secrets
    if secrets is not None and secrets["canaries"]:
      rows = candidate_rows(secrets["format_tokens"], secrets["symbol_tokens"], int(secrets["length"]))
      self.candidates = (torch.from_numpy(rows.astype(np.int64)), len(secrets["format_tokens"]), int(secrets["length"]),
                         torch.as_tensor(secrets["symbol_tokens"], dtype=torch.int64))
    self._model = lambda: torch_transformer(torch, self.vocab_size, **config.model_options)

  def _members_per_model(self):
    return self.members

  def _loss(self, model, index):
    tokens_BxL = self.x_train[index]
    logits_BxTxV = model(tokens_BxL[:, :-1])
    return self.torch.nn.functional.cross_entropy(logits_BxTxV.reshape(-1, self.vocab_size),
                                                  tokens_BxL[:, 1:].reshape(-1),
                                                  ignore_index=0)  # padding targets (token 0) do not count

  def _record(self, model) -> None:
    functional = self.torch.nn.functional
    for tokens_BxL in (self.x_train, self.x_test):
      logprob_BxTxV = functional.log_softmax(model(tokens_BxL[:, :-1]), dim=-1)
      targets_BxT = tokens_BxL[:, 1:]
      valid_BxT = targets_BxT != 0
      logprob_BxT = logprob_BxTxV.gather(2, targets_BxT[..., None])[..., 0] * valid_BxT
      correct_BxT = (logprob_BxTxV.argmax(-1) == targets_BxT) & valid_BxT
      (correct_BxT.sum(1) / valid_BxT.sum(1).clamp(min=1)).numpy(), logprob_BxT.sum(1).numpy(), logprob_BxT.numpy()
    if self.candidates is not None:
      rows_RxS, format_len, length, symbols_B = self.candidates
      logp = functional.log_softmax(model(rows_RxS[:, :-1])[:, format_len - 1:, :], dim=-1)[..., symbols_B]
      digit_index = (rows_RxS[:, format_len: format_len + length - 1, None] == symbols_B).int().argmax(-1)
      prefix_R = logp[:, : length - 1].gather(2, digit_index[..., None])[..., 0].sum(1)
      (-(prefix_R[:, None] + logp[:, length - 1])).reshape(-1).numpy()


def torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None


# ---------------------------------------------------------------------------------------------
# The harness.

def default_strategies(engine_models: int, quick: bool = False) -> list[str]:
  """auto's candidates and auto itself. ``--strategies vmap@xla,map@xla`` adds the CNN with plain
  ``nn.Conv``; they are not in the default table because they are 10-20x slower (one 30-epoch call
  of 16 digits CNNs with vmap@xla took 5.6 minutes here)."""
  from jaxmem.engine.lift import candidate_strategies
  if quick:  # the two extremes and auto (which still probes all its candidates)
    return ["vmap", "map", "auto"]
  per_device = -(-engine_models // len(jax.devices()))  # the engine shards models over devices
  return [str(s) for s in candidate_strategies(per_device)] + ["auto"]


def bench(workload: Workload | str = "digits-mlp", *, quick: bool = False, repeats: int = 3,
          strategies: Sequence[str] | None = None, baselines: Sequence[str] = ("jax-step-loop", "jax-model-loop", "torch-loop"),
          engine_models: int | None = None, loop_models: int | None = None, epochs: int | None = None,
          compute_dtype: str | None = None,
          peak_size: int = 2048, torch_threads: int | None = None, log: Callable[[str], None] | None = None) -> BenchResult:
  """Train ``workload``'s models with each engine strategy and each baseline, interleaved over
  ``repeats``, and return the timings (see the module docstring for what each variant is)."""
  log = log or (lambda message: None)
  if isinstance(workload, str):
    known = workloads(quick)
    if workload not in known:
      raise JaxmemError(f"unknown workload {workload!r}; choose one of: {', '.join(known)}")
    workload = known[workload]
  if repeats < 1:
    raise JaxmemError(f"repeats must be >= 1, got {repeats}")
  if torch_threads is not None and torch_threads < 1:
    raise JaxmemError(f"torch threads must be >= 1, got {torch_threads}")
  config = workload.config if epochs is None else workload.config.replace(epochs=epochs)
  if compute_dtype is not None:
    config = config.replace(compute_dtype=compute_dtype)
  config.validate()
  engine_models = engine_models or workload.engine_models
  loop_models = min(loop_models or workload.loop_models, engine_models)
  unknown = sorted(set(baselines) - {"jax-step-loop", "jax-model-loop", "torch-loop"})
  if unknown:
    raise JaxmemError(f"unknown baseline(s) {', '.join(unknown)}; choose from: jax-step-loop, jax-model-loop, torch-loop")
  dataset = workload.dataset()
  keep, _ = make_masks(config.mask_design, max(engine_models, 2), dataset.num_train, config.subset_ratios, seed=config.seed)
  keep = keep[:engine_models]

  variants: dict[str, Any] = {}
  models: dict[str, int] = {}
  skipped: dict[str, str] = {}
  for strategy in strategies or default_strategies(engine_models, quick):
    variants[f"engine:{strategy}"], models[f"engine:{strategy}"] = (
        _EngineVariant(dataset, config, keep, strategy), engine_models)
  for name in baselines:
    if name == "torch-loop" and not torch_available():
      skipped[name] = "PyTorch is not installed (pip install 'jaxmem[torch]')"
      continue
    try:
      if name == "jax-step-loop":
        variants[name] = _JaxStepLoop(dataset, config, keep[:loop_models])
      elif name == "jax-model-loop":
        variants[name] = _EngineVariant(dataset, config, keep[:loop_models], "loop")
      else:
        loop = _TorchTransformerLoop if dataset.is_text else _TorchLoop
        variants[name] = loop(dataset, config, keep[:loop_models], torch_threads)
      models[name] = loop_models
    except JaxmemError as e:
      skipped[name] = str(e)
  for name, why in skipped.items():
    log(f"skipping {name}: {why}")

  log(f"measuring the {config.compute_dtype} matmul peak ({peak_size}x{peak_size})")
  peaks = [measure_peak_flops(peak_size, dtype=config.compute_dtype)]
  rows = {name: Row(name, models[name], [], 0.0) for name in variants}
  for name, run in variants.items():  # first calls: compilation (+ auto's probe), not in medians
    start = time.perf_counter()
    run()
    rows[name].first_call_seconds = time.perf_counter() - start
    log(f"  {name}: first call {rows[name].first_call_seconds:.1f} s")
  for r in range(repeats):
    for name, run in variants.items():
      seconds, record = run()
      rows[name].seconds.append(seconds)
      if record is not None:
        rows[name].record_seconds.append(record)
      log(f"  repeat {r + 1}/{repeats} {name}: {seconds:.2f} s ({models[name] / seconds:.2f} models/s)")
    peaks.append(measure_peak_flops(peak_size, dtype=config.compute_dtype))  # the peak is interleaved too
  for name, run in variants.items():
    rows[name].note = getattr(run, "note", "")
  subset_size = int(keep.sum(1).max())
  return BenchResult(workload.name, workload.description, list(rows.values()), skipped,
                     max(peaks), training_flops_per_model(config, dataset, subset_size),
                     {**environment(), "epochs": config.epochs, "batch_size": config.batch_size,
                      "compute_dtype": config.compute_dtype,
                      "repeats": repeats})


def format_table(result: BenchResult) -> str:
  """A plain-text table: models/s, ratios to the baselines, utilization, recording share."""
  loops = [r for r in result.rows if not r.variant.startswith("engine:")]
  vmap = result.row("engine:vmap")
  best_loop_vmap = max([r.models_per_second for r in loops + ([vmap] if vmap else [])], default=float("nan"))
  baseline_names = [r.variant for r in loops]
  head = ["variant", "models", "median s", "models/s", "models/h", "first call s", "util"] + \
         [f"x {n}" for n in baseline_names] + ["x best(loop,vmap)", "recording", "note"]
  lines = []
  for r in result.rows:
    ratios = [f"{r.models_per_second / b.models_per_second:.2f}" for b in loops]
    record = (f"{statistics.median(r.record_seconds) / r.median * 100:.1f}%" if r.record_seconds else "")
    lines.append([r.variant, str(r.models), f"{r.median:.2f}", f"{r.models_per_second:.2f}",
                  f"{r.models_per_second * 3600:.0f}", f"{r.first_call_seconds:.1f}",
                  f"{result.utilization(r) * 100:.1f}%"] + ratios +
                 [f"{r.models_per_second / best_loop_vmap:.2f}", record, r.note])
  widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
  fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  env = result.environment
  out = [f"workload {result.workload}: {result.description}; {env['epochs']} epochs, "
         f"medians of {env['repeats']} interleaved repeats",
         f"{env['cpu']} ({env['cores']} cores, {env['backend']}; the engine shards models over "
         f"{len(env['devices'])} device(s), the loops use one), jax {env['jax']}"
         + (f", torch {env['torch']}" if "torch" in env else "") + (f", load {' '.join(env['loadavg'])}" if "loadavg" in env else ""),
         f"measured {env.get('compute_dtype', 'float32')} matmul peak {result.peak_flops / 1e9:.1f} GFLOP/s; one model = {result.model_flops / 1e9:.2f} GFLOP "
         "(3x forward, examples seen); util = model FLOP/s / peak; recording = evaluating every model on every example, share of the timed run",
         fmt(head), fmt(["-" * w for w in widths])]
  out += [fmt(l) for l in lines]
  # What no implementation can beat here: every FLOP at the measured peak. A target ratio above
  # this bound cannot be met by speed on this machine, only by a slower baseline.
  ceiling = result.peak_flops / result.model_flops
  out.append(f"ceiling at 100% of the peak: {ceiling:.2f} models/s = "
             + ", ".join(f"{ceiling / b.models_per_second:.2f}x {b.variant}" for b in loops))
  out += [f"skipped {name}: {why}" for name, why in result.skipped.items()]
  return "\n".join(out)


def write_results(results: Sequence[BenchResult], path: str | os.PathLike) -> None:
  """Tables as text and the raw numbers as JSON beside them (``path`` and ``path.json``)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n\n".join(format_table(r) for r in results) + "\n")
  path.with_suffix(path.suffix + ".json").write_text(json.dumps([r.to_dict() for r in results], indent=1))


def run_benchmarks(names: Sequence[str] = ("digits-mlp", "digits-cnn"), *, quick: bool = False,
                   out: str | os.PathLike | None = None, log: Callable[[str], None] | None = None,
                   **options) -> list[BenchResult]:
  """:func:`bench` for each named workload (what ``jaxmem bench`` calls); prints nothing itself,
  writes the tables and JSON to ``out`` when given."""
  known = workloads(quick)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise JaxmemError(f"unknown workload(s) {', '.join(unknown)}; choose from: {', '.join(known)}")
  if not names:
    raise JaxmemError(f"no workload given; choose from: {', '.join(known)}")
  for option in ("repeats", "engine_models", "loop_models", "epochs", "torch_threads"):
    value = options.get(option)
    if value is not None and (not isinstance(value, int) or value < 1):
      flag = {"engine_models": "models"}.get(option, option).replace("_", "-")
      raise JaxmemError(f"--{flag} must be a positive integer, got {value!r}")
  if out is not None and (Path(out).is_dir() or not Path(out).parent.is_dir() and Path(out).parent.exists()):
    raise JaxmemError(f"--out {str(out)!r} must be a file path (the tables; the raw numbers go to OUT.json)")
  results = []
  for name in names:
    if log:
      log(f"benchmarking {name}: {known[name].description}")
    results.append(bench(known[name], quick=quick, log=log, **options))
  if out is not None:
    write_results(results, out)
  return results
