"""Cheap proxies for Feldman-Zhang memorization, computed from a few models.

Each is a per-example number where *higher means more memorized*, averaged over the models that
trained on the example (a proxy describes how a model treats its own training data):

* **Cumulative sample loss** (CSL; Ravikumar et al. 2025, "Towards Memorization Estimation: Fast,
  Formal and Free", eq. 5): CSL_i = Σ_t ℓ(f_t(x_i), y_i) over the training epochs t. The loss is
  cross-entropy, and from the recorded logit-scaled margin φ = log p_y − log Σ_{y'≠y} p_y' it is
  exactly softplus(−φ) = −log p_y (since p_y = sigmoid(φ)). Deviation: the paper sums the loss of
  each mini-batch step as it is trained; jaxmem records every example after each epoch's last
  update, so the sum is over end-of-epoch evaluations (no augmentation, no batch-order effects).
* **Input loss curvature** (Garg, Agarwal and Roy 2024, "Memorization through the Lens of
  Curvature of Loss Function Around Samples", eq. 4 after Moosavi-Dezfooli et al. 2019):
  Curv_i = mean over Rademacher v of ‖∇ₓℓ(x_i + h·v) − ∇ₓℓ(x_i)‖₂, a finite-difference estimate of
  the input Hessian's size along random directions, here on the standardized inputs the model
  sees. Deviations: Garg et al. square the norm and average over training epochs (checkpoints);
  jaxmem uses the norm as defined in its DEFINITIONS page and the final parameters of the models
  whose parameters the run kept, averaged over those models (a proxy from k models costs k
  trainings either way).
* **Learning time** (already recorded by ``--record-epochs``; :mod:`jaxmem.scores.dynamics`): the
  first-learned epoch (late = memorized) and the cumulative error 1 − mean correctness over epochs
  (Jiang et al. 2021's learning-speed proxy, negated so that higher = more memorized).

These are proxies: :mod:`jaxmem.studies.proxies` reports them only with their measured agreement
with memorization (Lukasik et al. 2023 show regimes where such proxies fail).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmem.errors import JaxmemError
from jaxmem.scores._result import EstimatorResult
from jaxmem.scores._stats import auroc, masked_mean_float64, spearman
from jaxmem.scores.dynamics import learned_forever_epoch

DEFAULT_H = 1e-3
DEFAULT_DRAWS = 10


def _check_epochs(keep_MxN: np.ndarray, values_MxExN: np.ndarray, what: str) -> None:
  if values_MxExN.ndim != 3 or values_MxExN.shape[0] != keep_MxN.shape[0] or values_MxExN.shape[2] != keep_MxN.shape[1]:
    raise JaxmemError(f"{what} must be (models, epochs, examples) matching keep {keep_MxN.shape}, got {values_MxExN.shape}")


def cumulative_sample_loss(keep_MxN: np.ndarray, margin_MxExN: np.ndarray) -> np.ndarray:
  """CSL (N,): Σ over epochs of softplus(−margin), mean over the models that trained on the
  example; NaN where none did."""
  keep_MxN = np.asarray(keep_MxN, bool)
  margin_MxExN = np.asarray(margin_MxExN, np.float64)
  _check_epochs(keep_MxN, margin_MxExN, "per-epoch margins")
  loss_MxN = np.logaddexp(0.0, -margin_MxExN).sum(axis=1)    # softplus(−φ) = −log sigmoid(φ)
  return masked_mean_float64(loss_MxN, keep_MxN)


def learning_time(keep_MxN: np.ndarray, correct_MxExN: np.ndarray) -> dict[str, np.ndarray]:
  """``first_learned_epoch`` (1..E+1) and ``cumulative_error`` (1 − mean correctness over epochs),
  each (N,) over the models that trained on the example."""
  keep_MxN = np.asarray(keep_MxN, bool)
  correct_MxExN = np.asarray(correct_MxExN, bool)
  _check_epochs(keep_MxN, correct_MxExN, "per-epoch correctness")
  return {"first_learned_epoch": masked_mean_float64(learned_forever_epoch(correct_MxExN), keep_MxN),
          "cumulative_error": masked_mean_float64(1.0 - correct_MxExN.mean(axis=1), keep_MxN)}


def rademacher(key: jax.Array, num_draws: int, shape: tuple[int, ...]) -> jax.Array:
  """``num_draws`` random ±1 arrays of ``shape``: (num_draws, *shape) float32."""
  return jax.random.rademacher(key, (num_draws,) + tuple(shape), dtype=jnp.float32)


def input_gradients(apply_fn: Callable, params, x_BxD: jax.Array, y_B: jax.Array) -> jax.Array:
  """∇ₓ of the cross-entropy of every example (B, …): the gradient of the summed loss, since the
  models treat examples independently (no batch statistics)."""
  def total_loss(x):
    return optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y_B).sum()
  return jax.grad(total_loss)(x_BxD)


def curvature_with_directions(apply_fn: Callable, params, x_BxD: jax.Array, y_B: jax.Array, v_RxBxD: jax.Array,
                              h: float) -> jax.Array:
  """Curv (B,) = mean over the R directions v of ‖∇ₓℓ(x + h·v) − ∇ₓℓ(x)‖₂ (norm over all input axes)."""
  base = input_gradients(apply_fn, params, x_BxD, y_B)

  def one(v_BxD):
    diff = input_gradients(apply_fn, params, x_BxD + h * v_BxD, y_B) - base
    return jnp.sqrt(jnp.sum(diff.reshape(diff.shape[0], -1) ** 2, axis=1))

  return jax.lax.map(one, v_RxBxD).mean(axis=0)


def input_curvature(apply_fn: Callable, params, x_NxD: np.ndarray, y_N: np.ndarray, key: jax.Array, *,
                    h: float = DEFAULT_H, num_draws: int = DEFAULT_DRAWS, batch: int = 512) -> np.ndarray:
  """Curv of every example under one model's parameters, in batches on the device: (N,) float64.
  Draws are per example and per batch from ``key`` (``fold_in`` by batch index)."""
  if not h > 0:
    raise JaxmemError(f"curvature step h must be positive, got {h}")
  if num_draws < 1:
    raise JaxmemError(f"curvature needs at least one Rademacher draw, got {num_draws}")
  x_NxD, y_N = np.asarray(x_NxD, np.float32), np.asarray(y_N)
  batch = max(1, min(batch, len(x_NxD)))
  out = []
  for b, start in enumerate(range(0, len(x_NxD), batch)):
    x, y = x_NxD[start: start + batch], y_N[start: start + batch]
    real = len(x)
    if real < batch:   # pad the last batch: one compiled shape for every batch and every model
      x = np.concatenate([x, np.zeros((batch - real,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(batch - real, y.dtype)])
    v = rademacher(jax.random.fold_in(key, b), num_draws, x.shape)
    value = _curvature_jit(apply_fn, params, jnp.asarray(x), jnp.asarray(y), v, h)
    out.append(np.asarray(value, np.float64)[:real])
  return np.concatenate(out) if out else np.zeros(0)


# Compiled once per (apply_fn, h, shapes): pass the same apply_fn object for every model.
_curvature_jit = jax.jit(curvature_with_directions, static_argnames=("apply_fn", "h"))


def csl_estimator(records, *, context=None) -> EstimatorResult:
  """Adapter: the ``cumulative_sample_loss`` column from all models, with its Spearman correlation
  to memorization and its flipped-label AUROC in the summary (opt-in: a proxy, reported with its
  agreement)."""
  csl = cumulative_sample_loss(records.read("keep"), records.read("train_margin_epochs"))
  summary: dict[str, float] = {}
  memorization = None if context is None else context.get("memorization")
  if memorization is not None:
    summary["spearman_with_memorization"] = spearman(csl, memorization)
  noisy = np.asarray(records.noisy, bool)
  if noisy.any() and not noisy.all():
    summary["auroc_flipped"] = auroc(csl, noisy)
  return EstimatorResult(columns={"cumulative_sample_loss": csl}, summary=summary)
