"""The small causal transformer of the model registry (language models)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmem import JaxmemError
from jaxmem.models import build_model

TINY_LM = {"num_layers": 2, "width": 16, "num_heads": 2, "mlp_ratio": 2, "max_len": 16}

@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_transformer_is_causal_with_tied_embeddings(positions):
  model = build_model("transformer", 11, {**TINY_LM, "positions": positions})
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 11, (3, 7)), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  assert "embed" in params and not any("head" in k for k in params)  # logits come from the embedding
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (3, 7, 11) and logits.dtype == jnp.float32
  changed = tokens.at[:, 4].set((tokens[:, 4] % 10) + 1)  # a later token cannot change earlier outputs
  other = model.apply({"params": params}, changed)
  np.testing.assert_allclose(other[:, :4], logits[:, :4], atol=1e-6)
  assert not np.allclose(other[:, 4:], logits[:, 4:])


def test_transformer_bf16_keeps_float32_parameters_and_logits():
  f32 = build_model("transformer", 11, TINY_LM)
  bf16 = build_model("transformer", 11, TINY_LM, dtype="bfloat16")
  tokens = jnp.ones((2, 5), jnp.int32)
  params = f32.init(jax.random.PRNGKey(0), tokens)["params"]
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), bf16.init(jax.random.PRNGKey(0), tokens)["params"])
  assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), params)
  a, b = f32.apply({"params": params}, tokens), bf16.apply({"params": params}, tokens)
  assert b.dtype == jnp.float32
  np.testing.assert_allclose(a, b, atol=0.1)


def test_transformer_bad_options_are_one_line_errors():
  with pytest.raises(JaxmemError, match="positions"):
    build_model("transformer", 11, {"positions": "sinusoidal"})
  with pytest.raises(JaxmemError, match="heads"):
    build_model("transformer", 11, {"width": 10, "num_heads": 4})
