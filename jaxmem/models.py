"""Flax model registry.

A model is a plain ``flax.linen`` module mapping a batch of inputs to logits. The engine never looks
inside: it only calls ``init`` and ``apply``. No model here keeps batch statistics, so training and
evaluation modes compute the same function (LiRA's queries and the records need no "eval mode"
switch that could silently differ from training, a known defect of the reference LiRA code).

Every model takes a computation ``dtype`` (``RunConfig.compute_dtype``): with ``bfloat16`` the
inputs, activations and matmuls are bf16 while the parameters stay float32 (flax's ``param_dtype``),
so gradients and optimizer state are float32 too ("master weights") and the parameter tree is the
same for both dtypes. Logits are returned as float32, so the loss, margins and softmax never run in
bf16 (a bf16 margin would have only 8 bits of mantissa).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax.nn import softmax as jax_softmax
from flax.linen.dtypes import promote_dtype

from jaxmem.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

#: Models that read token sequences (text datasets) instead of features.
TEXT_MODELS = ("transformer",)

#: ``RunConfig.compute_dtype`` values: the dtype models compute in (parameters are always float32).
COMPUTE_DTYPES = ("float32", "bfloat16")


class MLP(nn.Module):
  """Fully connected ReLU network on flattened inputs (Feldman & Zhang's MNIST model is 512-256)."""

  num_classes: int
  hidden_sizes: Sequence[int] = (256, 256)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxD: jnp.ndarray) -> jnp.ndarray:
    x = x_BxD.reshape((x_BxD.shape[0], -1))
    for i, width in enumerate(self.hidden_sizes):
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
      # Named embeddings for jaxmem.features; a no-op unless "intermediates" is mutable.
      self.sow("intermediates", f"hidden_{i}", x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class ShiftConv(nn.Module):
  """A stride-1 'SAME' convolution as one matmul over shifted copies of the input (im2col by
  padding and slicing), with exactly ``nn.Conv``'s parameters (``kernel`` HWIO, ``bias``) and
  initializers, so the two are interchangeable in a trained parameter tree.

  Why: XLA's CPU convolution is slow for small images and channel counts, and a vmapped one becomes
  a grouped convolution that is slower still; as a matmul, a vmapped layer is a batched matmul.
  Measured on a 2-core CPU (16 models, 64x8x8x16 -> 16 channels, forward + backward): lax.map of
  XLA convs 2.7 s, vmap (grouped conv) 10.2 s, lax.map of ShiftConv 0.16 s, vmap 0.35 s.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
    kh, kw = self.kernel_size
    channels = x_BxHxWxC.shape[-1]
    kernel = self.param("kernel", nn.linear.default_kernel_init, (kh, kw, channels, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    # As nn.Conv does: the float32 parameters and the input are cast to the computation dtype.
    x_BxHxWxC, kernel, bias = promote_dtype(x_BxHxWxC, kernel, bias, dtype=self.dtype)
    _, height, width, _ = x_BxHxWxC.shape
    top, left = (kh - 1) // 2, (kw - 1) // 2  # lax's 'SAME' puts the odd pixel at the end
    padded = jnp.pad(x_BxHxWxC, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
    patches_BxHxWxP = jnp.concatenate(
        [padded[:, i: i + height, j: j + width, :] for i in range(kh) for j in range(kw)], axis=-1)
    return patches_BxHxWxP @ kernel.reshape(kh * kw * channels, self.features) + bias


CONV_IMPLS = ("auto", "xla", "shift")


class CNN(nn.Module):
  """Small convolutional network: conv blocks (conv-relu-conv-relu-pool), global average pool, dense.

  Sized for 8x8 digits up to 32x32 CIFAR; ``channels`` sets one block per entry. ``conv`` picks how
  a convolution is computed, not what: ``xla`` (``nn.Conv``), ``shift`` (:class:`ShiftConv`, same
  parameters), or ``auto``: ``shift`` on CPU, where it measured 10-30x faster, ``xla`` elsewhere
  (cuDNN's convolutions are fast and ShiftConv's 9x larger activations cost memory).
  """

  num_classes: int
  channels: Sequence[int] = (16, 32)
  conv: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
    import jax
    impl = self.conv if self.conv != "auto" else ("shift" if jax.default_backend() == "cpu" else "xla")
    # Explicit names keep the parameter tree the same for both implementations.
    make_conv = lambda width, i: (ShiftConv(width, (3, 3), dtype=self.dtype, name=f"Conv_{i}") if impl == "shift"
                                  else nn.Conv(width, (3, 3), dtype=self.dtype, name=f"Conv_{i}"))
    x = x_BxHxWxC
    if x.ndim == 2:  # vectors: treat as a 1-pixel-high image so the registry stays total
      x = x[:, None, :, None]
    for b, width in enumerate(self.channels):
      x = nn.relu(make_conv(width, 2 * b)(x))
      x = nn.relu(make_conv(width, 2 * b + 1)(x))
      if x.shape[1] > 1 and x.shape[2] > 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      self.sow("intermediates", f"block_{b}", x)  # embeddings for jaxmem.features (no-op otherwise)
    x = x.mean(axis=(1, 2))
    self.sow("intermediates", "pooled", x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


POSITIONS = ("learned", "rotary")


def rotary(x_BxLxHxD: jnp.ndarray, base: float = 10000.0) -> jnp.ndarray:
  """Rotary position embedding (Su et al. 2021, "RoFormer", eq. 34): consecutive feature pairs of
  each head rotated by position-dependent angles, so q·k depends on the relative position. Here the
  pairs are the two halves of a head (the GPT-NeoX layout, same function up to a permutation)."""
  length, head_dim = x_BxLxHxD.shape[1], x_BxLxHxD.shape[-1]
  half = head_dim // 2
  inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle_LxF = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  cos, sin = jnp.cos(angle_LxF)[None, :, None, :], jnp.sin(angle_LxF)[None, :, None, :]
  x1, x2 = x_BxLxHxD[..., :half].astype(jnp.float32), x_BxLxHxD[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxD.dtype)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention; softmax in float32 whatever the computation dtype."""

  num_heads: int
  positions: str = "learned"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxW: jnp.ndarray) -> jnp.ndarray:
    batch, length, width = x_BxLxW.shape
    head_dim = width // self.num_heads
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype, name="qkv")(x_BxLxW)
    q_BxLxHxD, k_BxLxHxD, v_BxLxHxD = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.positions == "rotary":
      q_BxLxHxD, k_BxLxHxD = rotary(q_BxLxHxD), rotary(k_BxLxHxD)
    logits_BxHxLxL = jnp.einsum("bqhd,bkhd->bhqk", q_BxLxHxD, k_BxLxHxD).astype(jnp.float32)
    logits_BxHxLxL = logits_BxHxLxL / jnp.sqrt(jnp.float32(head_dim))
    causal_LxL = jnp.tril(jnp.ones((length, length), dtype=bool))
    logits_BxHxLxL = jnp.where(causal_LxL, logits_BxHxLxL, jnp.finfo(jnp.float32).min)
    weights = jax_softmax(logits_BxHxLxL).astype(self.dtype)
    out_BxLxHxD = jnp.einsum("bhqk,bkhd->bqhd", weights, v_BxLxHxD)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(out_BxLxHxD)


class Transformer(nn.Module):
  """A small decoder-only (causal) language model: token embedding, pre-norm blocks (LayerNorm,
  attention, residual; LayerNorm, GELU MLP, residual), a final LayerNorm and logits from the tied
  embedding (``Embed.attend``), as GPT-2 (Radford et al. 2019) at toy size.

  Input: token ids (B, L) int; output: next-token logits (B, L, V) float32, position t predicting
  token t+1. Padding is at the end of a sequence (right padding, token 0), so causal attention
  alone keeps real positions from seeing it; the loss masks padded targets. ``positions``:
  ``learned`` (a (max_len, width) table, sequences up to ``max_len``) or ``rotary`` (no table, any
  length). ``num_classes`` of the registry is the vocabulary size.
  """

  vocab_size: int
  num_layers: int = 2
  width: int = 64
  num_heads: int = 4
  mlp_ratio: int = 4
  max_len: int = 256
  positions: str = "learned"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens_BxL: jnp.ndarray) -> jnp.ndarray:
    length = tokens_BxL.shape[1]
    embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="embed",
                     embedding_init=nn.initializers.normal(0.02))
    x_BxLxW = embed(tokens_BxL.astype(jnp.int32))
    if self.positions == "learned":
      table = self.param("position", nn.initializers.normal(0.02), (self.max_len, self.width))
      x_BxLxW = x_BxLxW + table[:length].astype(self.dtype)[None]
    for layer in range(self.num_layers):
      h = nn.LayerNorm(dtype=self.dtype, name=f"ln_attn_{layer}")(x_BxLxW)
      x_BxLxW = x_BxLxW + CausalSelfAttention(self.num_heads, self.positions, dtype=self.dtype,
                                              name=f"attn_{layer}")(h)
      h = nn.LayerNorm(dtype=self.dtype, name=f"ln_mlp_{layer}")(x_BxLxW)
      h = nn.gelu(nn.Dense(self.mlp_ratio * self.width, dtype=self.dtype, name=f"mlp_in_{layer}")(h))
      x_BxLxW = x_BxLxW + nn.Dense(self.width, dtype=self.dtype, name=f"mlp_out_{layer}")(h)
    x_BxLxW = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x_BxLxW)
    return embed.attend(x_BxLxW).astype(jnp.float32)


# Factories take the computation dtype as a keyword (build_model always passes it), apart from the
# user's model options, so that model_options cannot change it behind the config's compute_dtype.
@MODELS.register("mlp")
def _mlp(num_classes: int, hidden_sizes: Sequence[int] = (256, 256), *, dtype: Any = jnp.float32) -> nn.Module:
  return MLP(num_classes=num_classes, hidden_sizes=tuple(hidden_sizes), dtype=dtype)


@MODELS.register("cnn")
def _cnn(num_classes: int, channels: Sequence[int] = (16, 32), conv: str = "auto", *,
         dtype: Any = jnp.float32) -> nn.Module:
  if conv not in CONV_IMPLS:
    raise TypeError(f"conv must be one of {', '.join(CONV_IMPLS)}, got {conv!r}")
  return CNN(num_classes=num_classes, channels=tuple(channels), conv=conv, dtype=dtype)


@MODELS.register("transformer")
def _transformer(num_classes: int, num_layers: int = 2, width: int = 64, num_heads: int = 4, mlp_ratio: int = 4,
                 max_len: int = 256, positions: str = "learned", *, dtype: Any = jnp.float32) -> nn.Module:
  if positions not in POSITIONS:
    raise TypeError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
  if width % num_heads or (positions == "rotary" and (width // num_heads) % 2):
    raise TypeError(f"width {width} must split into {num_heads} heads (of even size for rotary positions)")
  return Transformer(vocab_size=num_classes, num_layers=num_layers, width=width, num_heads=num_heads,
                     mlp_ratio=mlp_ratio, max_len=max_len, positions=positions, dtype=dtype)


def check_compute_dtype(dtype: str) -> None:
  """A one-line error for a computation dtype other than COMPUTE_DTYPES."""
  from jaxmem.errors import JaxmemError
  if dtype not in COMPUTE_DTYPES:
    raise JaxmemError(f"unknown compute_dtype {dtype!r}; choose one of: {', '.join(COMPUTE_DTYPES)}")


def build_model(name: str, num_classes: int, options: dict[str, Any] | None = None, *,
                dtype: str = "float32") -> nn.Module:
  """Instantiate a registered model computing in ``dtype`` (one of COMPUTE_DTYPES; parameters are
  float32 either way); unknown names, options and dtypes give a one-line error."""
  from jaxmem.errors import JaxmemError
  factory = MODELS.get(name)
  check_compute_dtype(dtype)
  options = dict(options or {})
  if "dtype" in options:
    raise JaxmemError(f"bad options {options!r} for model {name!r}: the computation dtype is set by "
                      "compute_dtype, not by a model option")
  try:
    return factory(num_classes, **options, dtype=jnp.dtype(dtype))
  except TypeError as e:
    raise JaxmemError(f"bad options {options!r} for model {name!r}: {e}") from None
