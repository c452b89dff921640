"""Per-layer embeddings and per-epoch parameters (jaxmem.features, Engine.train_chunk(on_params=))."""

import jax
import numpy as np
import pytest

from jaxmem import features
from jaxmem.data import load_dataset
from jaxmem.engine import Engine
from jaxmem.engine.trainer import standardize
from jaxmem.errors import JaxmemError
from jaxmem.models import build_model


def _params_K(model, x, num_models):
  return features.stack_params([model.init(jax.random.PRNGKey(k), x[:1])["params"] for k in range(num_models)])


def test_mlp_embeddings_equal_hand_computed_relu_layers():
  rng = np.random.default_rng(0)
  x_NxD = rng.normal(size=(37, 10)).astype(np.float32)
  model = build_model("mlp", 4, {"hidden_sizes": (8, 6)})
  params_K = _params_K(model, x_NxD, 3)
  assert features.layer_names(model, x_NxD) == ["hidden_0", "hidden_1"]
  assert features.penultimate_layer(model, x_NxD) == "hidden_1"
  out = features.embeddings(model, params_K, x_NxD, ["hidden_0", "hidden_1"], batch=16)
  for k in range(3):
    p = jax.tree.map(lambda leaf: np.asarray(leaf[k], np.float64), params_K)
    h0 = np.maximum(x_NxD @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
    h1 = np.maximum(h0 @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], 0)
    np.testing.assert_allclose(out["hidden_0"][k], h0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["hidden_1"][k], h1, rtol=1e-5, atol=1e-5)
    logits = features.logits(model, params_K, x_NxD, batch=16)[k]
    np.testing.assert_allclose(logits, h1 @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"], rtol=1e-5, atol=1e-5)


def test_cnn_names_its_blocks_and_pooled_features():
  x = np.random.default_rng(1).normal(size=(5, 8, 8, 1)).astype(np.float32)
  model = build_model("cnn", 3, {"channels": (4, 6)})
  assert features.layer_names(model, x) == ["block_0", "block_1", "pooled"]
  out = features.embeddings(model, _params_K(model, x, 2), x, ["block_0", "pooled"])
  assert out["block_0"].shape == (2, 5, 4 * 4 * 4) and out["pooled"].shape == (2, 5, 6)


def test_unknown_layer_is_one_clear_error():
  x = np.zeros((2, 4), np.float32)
  model = build_model("mlp", 2, {"hidden_sizes": (3,)})
  with pytest.raises(JaxmemError, match="unknown layer.*'fc9'.*hidden_0"):
    features.embeddings(model, _params_K(model, x, 1), x, ["fc9"])


def test_on_params_gives_every_epoch_and_the_final_parameters(tiny_config):
  config = tiny_config.replace(epochs=3)
  dataset = load_dataset("digits")
  engine = Engine(dataset, config)
  seen = {}
  keep = np.ones((2, dataset.num_train), bool)
  engine.train_chunk([0, 1], keep, epochs_per_call=1,
                     on_params=lambda epoch, params: seen.setdefault(epoch, jax.device_get(params)))
  assert sorted(seen) == [0, 1, 2, 3]
  final = jax.device_get(engine.last_state.params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), seen[3], final)
  # The features of the final parameters predict what the engine recorded.
  x_train, _ = standardize(dataset)
  model = engine.model
  predicted = features.logits(model, jax.tree.map(lambda x: x[:2], seen[3]), x_train).argmax(-1)
  records = engine.train_chunk([0, 1], keep)
  np.testing.assert_array_equal(predicted == dataset.y_train[None], records["train_correct"])


def test_keep_params_epochs_saves_the_parameters_after_those_epochs(tiny_config, tmp_path):
  import jaxmem
  from jaxmem.records import RunDir, load_model_params
  config = tiny_config.replace(num_models=2, chunk_size=2, epochs=3, keep_params="2", keep_params_epochs=(0, 1))
  run = jaxmem.run(config, tmp_path / "run", progress=False, log=lambda m: None).run_dir
  dataset = load_dataset("digits")
  seen = {}
  keep = RunDir.open(run).read_design()["keep"]
  Engine(dataset, config).train_chunk([0, 1], keep, epochs_per_call=1,
                                      on_params=lambda e, p: seen.setdefault(e, jax.device_get(p)))
  for epoch in (0, 1, None):
    for m in (0, 1):
      stored = load_model_params(run, m, epoch=epoch)
      expected = jax.tree.map(lambda x: np.asarray(x[m]), seen[3 if epoch is None else epoch])
      jax.tree.map(np.testing.assert_array_equal, stored, expected)
  with pytest.raises(JaxmemError, match="model 0 after epoch 2 were not kept"):
    load_model_params(run, 0, epoch=2)
  with pytest.raises(JaxmemError, match="keep_params_epochs must be epochs in 0..2"):
    config.replace(keep_params_epochs=(3,)).validate()
  with pytest.raises(JaxmemError, match="keep_params_epochs needs keep_params"):
    config.replace(keep_params="none").validate()
