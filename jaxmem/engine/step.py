"""One model's training and evaluation as pure functions.

The engine lifts these over the model axis (see :mod:`jaxmem.engine.lift`); nothing here knows that
other models exist. All randomness of model m comes from its own key (``fold_in(seed, m)``), split by
purpose and by epoch/step with ``fold_in``, so a model's result does not depend on which chunk,
strategy or device it is computed in, and training can stop and resume at any epoch boundary.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# Purposes of a model's key; fixed forever so that results stay reproducible across versions.
_INIT, _SHUFFLE, _AUGMENT = 0, 1, 2


class TrainState(NamedTuple):
  params: Any
  opt_state: Any


class DeviceData(NamedTuple):
  """The whole dataset, resident on every device; batches are gathered from it by index.

  Inputs are either ready for the model (float, ``mean``/``std`` None) or uint8 images as stored,
  with per-channel ``mean`` and ``std`` of the [0, 1]-scaled training images: :func:`features`
  scales and standardizes each gathered batch on the device, so a device holds one byte per pixel.
  """
  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  y_test: jax.Array
  mean: jax.Array | None = None
  std: jax.Array | None = None


def features(data: DeviceData, x: jax.Array) -> jax.Array:
  """Model inputs from stored inputs gathered from ``data``: uint8 images become float32
  ``(x / 255 - mean) / std`` (float32 whatever the compute dtype: the model casts its inputs, and
  standardizing in bf16 would round pixels the float32 host path kept); other inputs as they are."""
  if data.mean is None:
    return x
  return (x.astype(jnp.float32) / jnp.float32(255) - data.mean) / data.std


class Task(NamedTuple):
  """What a model is trained for, apart from classification (the default when no task is given).

  ``loss(apply, x_B, y_B, weight_B) -> scalar``: the training loss of a batch, ``apply`` mapping
  inputs to the model's outputs under the current parameters. ``evaluate(apply, data, eval_batch)
  -> {record name: per-example array}``: the records of one model (leading axis: the examples).
  ``epoch_records(apply, data, eval_batch, with_margin) -> {name: per-example array}`` (optional):
  what ``record_epochs`` records after every epoch instead of classification's correctness (and,
  ``with_margin``, margin). See :mod:`jaxmem.engine.text` for next-token prediction.
  """
  loss: Callable[..., jax.Array]
  evaluate: Callable[..., dict[str, jax.Array]]
  epoch_records: Callable[..., dict[str, jax.Array]] | None = None


class ModelFunctions(NamedTuple):
  """Pure single-model functions; ``data`` is passed explicitly so it is an argument of the
  compiled program rather than a constant baked into it.

  ``train`` returns ``(state, per_epoch)`` with ``per_epoch["loss"]`` (E,) and, when per-epoch
  recording is on, ``per_epoch["train_correct"]`` (E, N) bool (and ``"train_margin"`` (E, N)).
  ``from_params`` starts training from given parameters with a fresh optimizer state (second
  phase of a two-phase study); ``early_scores`` gives EL2N and GraNd of every training example.
  """
  init: Callable[[jax.Array, DeviceData], TrainState]
  train: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
  evaluate: Callable[[Any, DeviceData], dict[str, jax.Array]]
  from_params: Callable[[Any], TrainState] | None = None
  early_scores: Callable[[Any, DeviceData], dict[str, jax.Array]] | None = None


def steps_per_epoch(subset_size: int, batch_size: int) -> int:
  """One pass over the subset; the last batch is partial (masked), never dropped."""
  return max(1, math.ceil(subset_size / batch_size))


def make_optimizer(*, optimizer: str, learning_rate: float, schedule: str, total_steps: int,
                   warmup_steps: int = 0, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
  """An optax optimizer with a learning-rate schedule over ``total_steps``."""
  if schedule == "constant":
    lr = learning_rate
  elif schedule == "cosine":
    lr = optax.cosine_decay_schedule(learning_rate, decay_steps=total_steps)
  elif schedule == "warmup_cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1), total_steps)
  elif schedule == "linear":
    lr = optax.linear_schedule(learning_rate, 0.0, total_steps)
  else:
    raise ValueError(f"unknown schedule {schedule!r}")
  if optimizer == "adam":
    return optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)
  if optimizer == "sgd":
    sgd = optax.sgd(lr, momentum=momentum or None, nesterov=bool(momentum))
    return optax.chain(optax.add_decayed_weights(weight_decay), sgd) if weight_decay else sgd
  raise ValueError(f"unknown optimizer {optimizer!r}")


def _epoch_schedule(schedule: str, learning_rate: float, epochs: int,
                    warmup_epochs: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The learning rate at update ``count`` for a model making ``steps`` updates per epoch
  (``steps`` may be traced: one compiled program serves every subset ratio). The formulas and
  their float operations are optax's (``cosine_decay_schedule``, ``warmup_cosine_decay_schedule``,
  ``linear_schedule``), whose constructors need the step counts as Python numbers; with the same
  step counts the values are bitwise optax's."""
  if schedule == "constant":
    return lambda count, steps: learning_rate

  def cosine(count, decay_steps, init_value):
    count = jnp.minimum(count, decay_steps)
    cosine_decay = 0.5 * (1 + jnp.cos(jnp.pi * count / decay_steps))
    return init_value * ((1 - 0.0) * cosine_decay ** 1.0 + 0.0)

  def linear(count, transition_steps, init_value, end_value):
    count = jnp.clip(count, 0, transition_steps)
    frac = 1 - count / transition_steps
    return (init_value - end_value) * (frac ** 1) + end_value

  def rate(count, steps):
    steps = jnp.asarray(steps, jnp.float32)
    total = epochs * steps
    if schedule == "cosine":
      return cosine(count, total, learning_rate)
    if schedule == "linear":
      return linear(count, total, learning_rate, 0.0)
    # warmup_cosine: optax joins a linear warmup from 0 (at least one step) and a cosine decay.
    warmup = jnp.maximum(warmup_epochs * steps, 1.0)
    return jnp.where(count < warmup, linear(count, warmup, 0.0, learning_rate),
                     cosine(count - warmup, total - warmup, learning_rate))
  if schedule not in ("cosine", "linear", "warmup_cosine"):
    raise ValueError(f"unknown schedule {schedule!r}")
  return rate


def make_epoch_optimizer(*, optimizer: str, learning_rate: float, schedule: str, epochs: int,
                         warmup_epochs: int = 0, momentum: float = 0.9,
                         weight_decay: float = 0.0) -> optax.GradientTransformationExtraArgs:
  """:func:`make_optimizer` with the schedule over ``epochs`` epochs of ``steps_per_epoch`` updates,
  an extra argument of ``update`` rather than a constant: one program trains every subset ratio.
  The transformations and their state are optax's (``adam``/``adamw``/``sgd``: the direction, then
  ``scale_by_schedule`` of minus the rate), so updates are bitwise those of :func:`make_optimizer`."""
  rate = _epoch_schedule(schedule, learning_rate, epochs, warmup_epochs)

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, *, steps_per_epoch, **extra_args):
    del params, extra_args
    step_size = -1 * rate(state.count, steps_per_epoch)
    updates = jax.tree.map(lambda g: jnp.array(step_size, dtype=g.dtype) * g, updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  scale = optax.GradientTransformationExtraArgs(init, update)
  if optimizer == "adam":
    direction = [optax.scale_by_adam()]
    if weight_decay:  # optax.adamw: decoupled weight decay after the Adam direction
      direction.append(optax.add_decayed_weights(weight_decay))
  elif optimizer == "sgd":
    direction = [optax.trace(decay=momentum, nesterov=bool(momentum))] if momentum else []
    if weight_decay:  # as make_optimizer: decay added to the gradient before SGD
      direction.insert(0, optax.add_decayed_weights(weight_decay))
  else:
    raise ValueError(f"unknown optimizer {optimizer!r}")
  return optax.chain(*direction, scale)


def margin_and_correct(logits_BxC: jax.Array, labels_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """LiRA's statistic φ = log p_y − log Σ_{y'≠y} p_y' (Carlini et al. 2022, eq. 3), computed
  stably as z_y − logsumexp_{y'≠y} z_y' (no probability is ever formed, so φ stays finite and
  exact where p_y rounds to 1), and whether the arg-max class is the label."""
  num_classes = logits_BxC.shape[-1]
  is_label_BxC = jax.nn.one_hot(labels_B, num_classes, dtype=bool)
  z_label = jnp.take_along_axis(logits_BxC, labels_B[:, None], axis=-1)[:, 0]
  others = jnp.where(is_label_BxC, -jnp.inf, logits_BxC)
  margin = z_label - jax.nn.logsumexp(others, axis=-1)
  correct = jnp.argmax(logits_BxC, axis=-1) == labels_B
  return margin.astype(jnp.float32), correct


def augment_images(key: jax.Array, x_BxHxWxC: jax.Array, pad: int) -> jax.Array:
  """Random horizontal flip and random translation by up to ``pad`` pixels (zero padding)."""
  flip_key, shift_key = jax.random.split(key)
  batch, height, width, _ = x_BxHxWxC.shape
  flip_B = jax.random.bernoulli(flip_key, 0.5, (batch,))
  x = jnp.where(flip_B[:, None, None, None], x_BxHxWxC[:, :, ::-1, :], x_BxHxWxC)
  if pad <= 0:
    return x
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets_Bx2 = jax.random.randint(shift_key, (batch, 2), 0, 2 * pad + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))
  return jax.vmap(crop)(padded, offsets_Bx2)


#: LiRA query sets (Carlini et al. 2022, §VI-A "augmented queries"): 1 = the example itself;
#: 2 = itself and its horizontal flip; 18 = 2 flips x 3x3 shifts by one pixel (reflect padding, as
#: the reference ``mi_lira_2021/inference.py``). Query 0 is always the identity; with 18, query 9 is
#: the flip, so the 2-query set is queries (0, 9) of the 18.
QUERY_COUNTS = (1, 2, 18)
_QUERY_SHIFTS = ((0, 0), (-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def query_views(x_BxHxWxC: jax.Array, queries: int) -> jax.Array:
  """The augmented copies (A, B, H, W, C) of a batch of images for ``queries`` in QUERY_COUNTS."""
  if queries not in QUERY_COUNTS:
    raise ValueError(f"queries must be one of {QUERY_COUNTS}, got {queries}")
  if queries > 1 and x_BxHxWxC.ndim != 4:
    raise ValueError(f"augmented queries need images (B, H, W, C), got shape {x_BxHxWxC.shape}")
  if queries == 1:
    return x_BxHxWxC[None]
  flips = (x_BxHxWxC, x_BxHxWxC[:, :, ::-1, :])
  if queries == 2:
    return jnp.stack(flips)
  _, height, width, _ = x_BxHxWxC.shape
  views = []
  for image in flips:
    padded = jnp.pad(image, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    views.extend(padded[:, 1 + dy: 1 + dy + height, 1 + dx: 1 + dx + width, :] for dy, dx in _QUERY_SHIFTS)
  return jnp.stack(views)


def apply_in_batches(apply_fn: Callable[[jax.Array], jax.Array], x: jax.Array, batch: int) -> jax.Array:
  """``apply_fn`` over ``x`` in example batches, so evaluation memory is bounded by ``batch``."""
  n = x.shape[0]
  if n <= batch:
    return apply_fn(x)
  num_batches = -(-n // batch)
  batch = -(-n // num_batches)  # equal batches, at most num_batches - 1 padding rows
  padded = jnp.pad(x, ((0, num_batches * batch - n),) + ((0, 0),) * (x.ndim - 1))
  out = jax.lax.map(apply_fn, padded.reshape((num_batches, batch) + x.shape[1:]))
  return jax.tree.map(lambda o: o.reshape((num_batches * batch,) + o.shape[2:])[:n], out)


def epoch_batches(key: jax.Array, members: jax.Array, count: jax.Array, epoch: jax.Array,
                  num_steps: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """One epoch's batches for one model: indices (S, B) and loss weights (S, B).

  ``members`` holds the model's example indices padded to a common length, ``count`` how many are
  real. They are sorted by a random key drawn from (model key, epoch), padding last, and cut into
  ``num_steps`` batches; positions past ``count`` get weight 0.
  """
  n_max = members.shape[0]
  order_key = jax.random.fold_in(jax.random.fold_in(key, _SHUFFLE), epoch)
  sort_key = jnp.where(jnp.arange(n_max) < count, jax.random.uniform(order_key, (n_max,)), 2.0)
  order = members[jnp.argsort(sort_key)]
  position_SxB = jnp.arange(num_steps * batch_size).reshape(num_steps, batch_size)
  return order[position_SxB % count], (position_SxB < count).astype(jnp.float32)


def make_model_functions(model: nn.Module, tx: optax.GradientTransformation, *, batch_size: int,
                         num_steps: int, augment: bool = False, augment_pad: int = 2,
                         eval_batch: int = 4096, record_epochs: bool = False,
                         record_epoch_margin: bool = False, grad_batch: int = 32,
                         queries: int = 1, task: Task | None = None) -> ModelFunctions:
  """Single-model ``init``, ``train`` (a ``lax.scan`` over epochs of ``steps <= num_steps`` steps,
  ``steps`` an argument) and ``evaluate``. ``tx`` is :func:`make_epoch_optimizer`'s (its schedule
  takes the steps per epoch as data) or any optax transformation.

  An epoch visits the model's members in a fresh random order: members are padded to a common
  length ``n_max`` across the chunk (``count`` is the real number), sorted by a random key, and cut
  into ``num_steps`` batches; positions past ``count`` have loss weight 0, so every model makes the
  same number of steps yet sees each of its examples exactly once per epoch.

  ``record_epochs``: after every epoch, evaluate the model on all training examples and output
  its correctness (and with ``record_epoch_margin`` its margin) for the learning-dynamics scores
  (:mod:`jaxmem.scores.dynamics`). ``grad_batch`` bounds GraNd's per-example gradients in memory
  (``grad_batch`` x parameters per model at a time).

  ``task``: another loss and other records than classification's (e.g. next-token prediction,
  :func:`jaxmem.engine.text.make_text_task`); batching, optimizer and randomness stay the same.
  """

  # A plain optax transformation ignores the extra argument (``steps_per_epoch``) the steps pass.
  tx = optax.with_extra_args_support(tx)

  def init(key: jax.Array, data: DeviceData) -> TrainState:
    params = model.init(jax.random.fold_in(key, _INIT), features(data, data.x_train[:1]))["params"]
    return TrainState(params, tx.init(params))

  def loss_fn(params, x, y, weight_B):
    if task is not None:
      return task.loss(lambda inputs: model.apply({"params": params}, inputs), x, y, weight_B)
    logits = model.apply({"params": params}, x)
    loss_B = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(loss_B * weight_B) / jnp.maximum(jnp.sum(weight_B), 1.0)

  def train(state: TrainState, key: jax.Array, members: jax.Array, count: jax.Array,
            epoch_ids: jax.Array, steps: jax.Array, data: DeviceData) -> tuple[TrainState, dict[str, jax.Array]]:
    # ``steps`` (this chunk's updates per epoch, at most ``num_steps``) and the epochs are data, not
    # shapes: one compiled program trains every subset ratio and every epoch segment. Epoch ids
    # below 0 are padding (a short segment in a program made for longer ones) and leave the state.
    def real_epoch(state, epoch):
      index_SxB, weight_SxB = epoch_batches(key, members, count, epoch, num_steps, batch_size)
      augment_key = jax.random.fold_in(jax.random.fold_in(key, _AUGMENT), epoch)

      def one_step(step, carry):
        state, losses_S = carry
        index_B, weight_B = index_SxB[step], weight_SxB[step]
        x = features(data, data.x_train[index_B])
        if augment:
          x = augment_images(jax.random.fold_in(augment_key, step), x, augment_pad)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x, data.y_train[index_B], weight_B)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, steps_per_epoch=steps)
        state = TrainState(optax.apply_updates(state.params, updates), opt_state)
        return state, losses_S.at[step].set(loss)

      # A while loop of ``steps`` iterations (the bound is shared by the chunk's models, so under
      # vmap it stays a plain loop): a small ratio's program does not run the largest one's steps.
      losses_S = jnp.zeros_like(weight_SxB[:, 0])  # from per-model data: varies over shard_map's models axis
      state, losses_S = jax.lax.fori_loop(0, steps, one_step, (state, losses_S))
      per_epoch = {"loss": jnp.sum(losses_S) / steps.astype(jnp.float32)}
      if record_epochs and task is not None and task.epoch_records is not None:
        apply = lambda x: model.apply({"params": state.params}, features(data, x))
        per_epoch.update(task.epoch_records(apply, data, eval_batch, record_epoch_margin))
      elif record_epochs:  # every training example after the epoch's last update (as Maini et al.)
        apply = lambda x: model.apply({"params": state.params}, features(data, x))
        margin, correct = margin_and_correct(apply_in_batches(apply, data.x_train, eval_batch), data.y_train)
        per_epoch["train_correct"] = correct
        if record_epoch_margin:
          per_epoch["train_margin"] = margin
      return state, per_epoch

    def one_epoch(state, epoch):
      skipped = jax.eval_shape(real_epoch, state, epoch)[1]
      # Zeros made from per-model data, so that they vary over shard_map's models axis as the
      # real epoch's outputs do (cond needs both branches' types equal).
      zero = count * 0
      no_epoch = lambda state, epoch: (
          state, jax.tree.map(lambda a: jnp.broadcast_to(zero.astype(a.dtype), a.shape), skipped))
      return jax.lax.cond(epoch >= 0, real_epoch, no_epoch, state, epoch)

    return jax.lax.scan(one_epoch, state, epoch_ids)

  def from_params(params) -> TrainState:
    return TrainState(params, tx.init(params))

  def early_scores(params, data: DeviceData) -> dict[str, jax.Array]:
    """EL2N and GraNd (Paul et al. 2021, "Deep Learning on a Data Diet", eqs. 1-2) of every
    training example under these parameters: ‖softmax(f(x)) − onehot(y)‖₂ and the L2 norm of the
    per-example loss gradient over all parameters. Per-example gradients come from ``vmap`` of
    ``jax.grad`` over ``grad_batch`` examples at a time; each batch is reduced to its norms at once,
    so at most ``grad_batch`` x parameters floats live per model (no N x parameters Jacobian)."""

    def el2n_of(x_B, y_B):
      logits = model.apply({"params": params}, x_B)
      onehot = jax.nn.one_hot(y_B, logits.shape[-1], dtype=logits.dtype)
      return jnp.linalg.norm(jax.nn.softmax(logits, axis=-1) - onehot, axis=-1)

    def example_loss(p, x, y):
      logits = model.apply({"params": p}, x[None])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y[None])[0]

    def grand_of(x_B, y_B):
      grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x_B, y_B)
      squares = [jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree.leaves(grads)]
      return jnp.sqrt(sum(squares))

    index_N = jnp.arange(data.x_train.shape[0])
    by_index = lambda fn: lambda i_B: fn(features(data, data.x_train[i_B]), data.y_train[i_B])
    return {"train_el2n": apply_in_batches(by_index(el2n_of), index_N, eval_batch),
            "train_grand": apply_in_batches(by_index(grand_of), index_N, grad_batch)}

  def evaluate(params, data: DeviceData) -> dict[str, jax.Array]:
    apply = lambda x: model.apply({"params": params}, features(data, x))
    if task is not None:
      return task.evaluate(apply, data, eval_batch)
    out = {}
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
      margin, correct = margin_and_correct(apply_in_batches(apply, x, eval_batch), y)
      out[f"{split}_margin"], out[f"{split}_correct"] = margin, correct
    if queries > 1:
      # LiRA's augmented queries (``train_margin_aug`` (N, A)). The models keep no batch
      # statistics, so this is the same eval-mode function as above; views are built per batch of
      # indices so memory is bounded by ``eval_batch`` images, not A copies of the dataset.
      for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        def margins_of(index_B, x=x, y=y):
          views = query_views(features(data, x[index_B]), queries)
          logits = model.apply({"params": params}, views.reshape((-1,) + views.shape[2:]))
          margin, _ = margin_and_correct(logits, jnp.tile(y[index_B], queries))
          return margin.reshape(queries, -1).T
        out[f"{split}_margin_aug"] = apply_in_batches(
            margins_of, jnp.arange(x.shape[0]), max(1, eval_batch // queries))
    return out

  return ModelFunctions(init, train, evaluate, from_params=from_params, early_scores=early_scores)
