"""Per-layer embeddings and predictions of many models, for model-level memorization studies.

The registry's models ``sow`` their named embeddings into the ``intermediates`` collection
(:class:`jaxmem.models.MLP`: ``hidden_i`` after each ReLU; :class:`jaxmem.models.CNN`: ``block_i``
after each block, ``pooled`` after global average pooling), which flax only collects when the
collection is mutable, so training never computes or stores them. Here one model's function
(``model.apply(..., mutable=["intermediates"])``) is lifted over the model axis with ``vmap`` and
evaluated over examples in batches, on the device, one chunk of models at a time.

Inputs must already be standardized as the engine standardizes them
(:func:`jaxmem.engine.trainer.standardize`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmem.errors import JaxmemError

# Examples per evaluation batch: bounds activation memory (models x batch x width floats).
FEATURE_BATCH = 512


def layer_names(model: nn.Module, x_example: np.ndarray) -> list[str]:
  """The names of the embeddings ``model`` sows, in order from input to output."""
  x = jnp.asarray(x_example[:1])

  def sown():
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    return model.apply({"params": params}, x, mutable=["intermediates"])[1]
  return list(jax.eval_shape(sown).get("intermediates", {}).keys())


def penultimate_layer(model: nn.Module, x_example: np.ndarray) -> str:
  """The embedding the output layer reads (def. 5's penultimate features)."""
  names = layer_names(model, x_example)
  if not names:
    raise JaxmemError(f"model {type(model).__name__} exposes no named embeddings")
  return names[-1]


def _check_layers(model: nn.Module, x: np.ndarray, layers: Sequence[str]) -> None:
  known = layer_names(model, x)
  unknown = [name for name in layers if name not in known]
  if unknown:
    raise JaxmemError(f"unknown layer(s) {', '.join(map(repr, unknown))} for {type(model).__name__}; "
                      f"choose from: {', '.join(known)}")


def embeddings(model: nn.Module, params_K: Any, x_NxD: np.ndarray, layers: Sequence[str], *,
               batch: int = FEATURE_BATCH) -> dict[str, np.ndarray]:
  """``{layer: (K, N, F) float32}``: each model's embedding of each example at each named layer
  (spatial embeddings of a CNN block are flattened to F = H * W * C). ``params_K`` is a parameter
  tree with a leading model axis (the ``params`` collection, as the engine keeps it)."""
  layers = list(layers)
  _check_layers(model, x_NxD, layers)

  def one_model(params, x_B):
    _, state = model.apply({"params": params}, x_B, mutable=["intermediates"])
    inter = state["intermediates"]
    # sow appends to a tuple; each layer is sown once per call.
    return {name: inter[name][0].reshape(x_B.shape[0], -1).astype(jnp.float32) for name in layers}

  program = jax.jit(jax.vmap(one_model, in_axes=(0, None)))
  blocks = [program(params_K, jnp.asarray(x_NxD[start: start + batch]))
            for start in range(0, x_NxD.shape[0], batch)]
  return {name: np.concatenate([np.asarray(b[name]) for b in blocks], axis=1) for name in layers}


def logits(model: nn.Module, params_K: Any, x_NxD: np.ndarray, *, batch: int = FEATURE_BATCH) -> np.ndarray:
  """(K, N, C) float32 logits of every model on every example."""
  program = jax.jit(jax.vmap(lambda p, x_B: model.apply({"params": p}, x_B), in_axes=(0, None)))
  return np.concatenate([np.asarray(program(params_K, jnp.asarray(x_NxD[start: start + batch])))
                         for start in range(0, x_NxD.shape[0], batch)], axis=1)


def stack_params(params_list: Sequence[Any]) -> Any:
  """Per-model parameter trees (e.g. from :func:`jaxmem.records.load_model_params`) stacked along a
  new leading model axis."""
  return jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *params_list)
