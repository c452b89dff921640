"""Flax model registry.

A model is a plain ``flax.linen`` module mapping a batch of inputs to logits. The engine never looks
inside: it only calls ``init`` and ``apply``. No model here keeps batch statistics, so training and
evaluation modes compute the same function (LiRA's queries and the records need no "eval mode"
switch that could silently differ from training, a known defect of the reference LiRA code).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxmem.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


class MLP(nn.Module):
  """Fully connected ReLU network on flattened inputs (Feldman & Zhang's MNIST model is 512-256)."""

  num_classes: int
  hidden_sizes: Sequence[int] = (256, 256)

  @nn.compact
  def __call__(self, x_BxD: jnp.ndarray) -> jnp.ndarray:
    x = x_BxD.reshape((x_BxD.shape[0], -1))
    for width in self.hidden_sizes:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """Small convolutional network: conv blocks (conv-relu-conv-relu-pool), global average pool, dense.

  Sized for 8x8 digits up to 32x32 CIFAR; ``channels`` sets one block per entry.
  """

  num_classes: int
  channels: Sequence[int] = (16, 32)

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
    x = x_BxHxWxC
    if x.ndim == 2:  # vectors: treat as a 1-pixel-high image so the registry stays total
      x = x[:, None, :, None]
    for width in self.channels:
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      if x.shape[1] > 1 and x.shape[2] > 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


@MODELS.register("mlp")
def _mlp(num_classes: int, hidden_sizes: Sequence[int] = (256, 256)) -> nn.Module:
  return MLP(num_classes=num_classes, hidden_sizes=tuple(hidden_sizes))


@MODELS.register("cnn")
def _cnn(num_classes: int, channels: Sequence[int] = (16, 32)) -> nn.Module:
  return CNN(num_classes=num_classes, channels=tuple(channels))


def build_model(name: str, num_classes: int, options: dict[str, Any] | None = None) -> nn.Module:
  """Instantiate a registered model; unknown names and options give a one-line error."""
  from jaxmem.errors import JaxmemError
  factory = MODELS.get(name)
  try:
    return factory(num_classes, **(options or {}))
  except TypeError as e:
    raise JaxmemError(f"bad options {options!r} for model {name!r}: {e}") from None
