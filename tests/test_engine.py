import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmem import RunConfig, load_dataset, make_masks
from jaxmem.data import from_arrays
from jaxmem.engine import Engine, margin_and_correct
from jaxmem.engine.step import epoch_batches


def _small_images(num_train=48, num_test=16, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, num_train + num_test)
  x = (rng.normal(size=(num_train + num_test, 6, 6, 1)) + y[:, None, None, None]).astype(np.float32)
  return from_arrays("small", x[:num_train], y[:num_train], x[num_train:], y[num_train:], num_classes=3)


def _train(dataset, config, model_ids, keep):
  engine = Engine(dataset, config, probe_cache=None)
  records = engine.train_chunk(model_ids, keep[model_ids])
  return jax.device_get(engine.last_state.params), records


CASES = {
    "mlp": dict(model="mlp", model_options={"hidden_sizes": (16,)}),
    "cnn": dict(model="cnn", model_options={"channels": (4,)}),
}


@pytest.mark.parametrize("arch", sorted(CASES))
@pytest.mark.parametrize("strategy", ["vmap", "map", "mixed:2"])
def test_strategies_equal_per_model_loop(arch, strategy):
  """Every lifting strategy trains the same models as a plain loop of single-model programs."""
  dataset = _small_images()
  base = RunConfig(num_models=5, epochs=2, batch_size=8, learning_rate=1e-2, augment=True, **CASES[arch])
  keep, _ = make_masks("subset", 5, dataset.num_train, (0.5,), seed=0)
  ids = np.arange(5)
  reference, ref_records = _train(dataset, base.replace(strategy="loop"), ids, keep)
  params, records = _train(dataset, base.replace(strategy=strategy), ids, keep)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), reference, params)
  np.testing.assert_allclose(records["train_margin"], ref_records["train_margin"], rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(records["epoch_loss"], ref_records["epoch_loss"], rtol=1e-4, atol=1e-5)


def test_model_result_does_not_depend_on_its_chunk():
  """Model m's randomness comes from fold_in(seed, m): same model, different chunk mates."""
  dataset = _small_images()
  config = RunConfig(num_models=6, epochs=2, batch_size=8, strategy="vmap", model_options={"hidden_sizes": (8,)})
  keep, _ = make_masks("subset", 6, dataset.num_train, (0.5,), seed=0)
  params_a, rec_a = _train(dataset, config, np.array([0, 1, 2]), keep)
  params_b, rec_b = _train(dataset, config, np.array([4, 2]), keep)
  a2 = jax.tree.map(lambda x: x[2], params_a)
  b2 = jax.tree.map(lambda x: x[1], params_b)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), a2, b2)
  np.testing.assert_array_equal(rec_a["model_ids"], [0, 1, 2])


def test_default_mlp_fits_its_subsets():
  """The default estimator presumes models that fit their training subset."""
  config = RunConfig(num_models=4, strategy="vmap")
  dataset = load_dataset("digits")
  keep, _ = make_masks("subset", 4, dataset.num_train, (0.7,), seed=0)
  _, records = _train(dataset, config, np.arange(4), keep)
  own = (records["train_correct"] & records["keep"]).sum(1) / records["keep"].sum(1)
  assert own.min() >= 0.995


def test_margin_is_stable_and_matches_log_odds():
  logits = jnp.array([[2.0, 0.5, -1.0], [1000.0, 0.0, -5.0], [0.0, 0.0, 0.0]])
  labels = jnp.array([0, 0, 2])
  margin, correct = margin_and_correct(logits, labels)
  p = jax.nn.softmax(logits[0])
  assert float(margin[0]) == pytest.approx(float(jnp.log(p[0]) - jnp.log(1 - p[0])), rel=1e-5)
  # p_y rounds to 1 in float32, yet φ = 1000 − log(1 + e^−5) stays finite and exact.
  assert float(margin[1]) == pytest.approx(1000.0 - np.log1p(np.exp(-5.0)), rel=1e-6)
  assert float(margin[2]) == pytest.approx(-np.log(2), rel=1e-5)
  np.testing.assert_array_equal(correct, [True, True, False])


def test_each_member_seen_once_per_epoch_with_masked_partial_batch():
  members = jnp.array([5, 7, 11, 13, 17, 19, 23, 29, 31, 0])  # 9 real members, padded to 10
  key = jax.random.PRNGKey(0)
  orders = []
  for epoch in range(3):
    index, weight = epoch_batches(key, members, jnp.array(9), jnp.array(epoch), num_steps=3, batch_size=4)
    assert index.shape == (3, 4) and float(weight.sum()) == 9.0
    visited = np.asarray(index)[np.asarray(weight) > 0]
    assert sorted(visited.tolist()) == [5, 7, 11, 13, 17, 19, 23, 29, 31]
    orders.append(visited.tolist())
  assert orders[0] != orders[1]  # a fresh order every epoch


EIGHT_DEVICES = textwrap.dedent("""
  import os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  import jax, numpy as np
  from jaxmem import RunConfig, load_dataset, make_masks
  from jaxmem.engine import Engine
  assert len(jax.devices()) == 8, jax.devices()
  ds = load_dataset("digits")
  keep, _ = make_masks("subset", 13, ds.num_train, (0.7,), 0)
  cfg = RunConfig(num_models=13, epochs=2, batch_size=64, strategy="vmap", model_options={"hidden_sizes": (16,)})
  ids = np.arange(13)
  many = Engine(ds, cfg, probe_cache=None).train_chunk(ids, keep)      # 13 models padded to 16 over 8 devices
  one = Engine(ds, cfg, devices=jax.devices()[:1], probe_cache=None).train_chunk(ids, keep)
  for k in ("train_margin", "test_margin", "epoch_loss"):
    np.testing.assert_allclose(many[k], one[k], rtol=1e-4, atol=1e-4)
  assert (many["train_correct"] != one["train_correct"]).mean() < 1e-3
  print("OK", many["train_margin"].shape)
""")


def test_eight_simulated_devices_match_one_device():
  result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK (13, 1347)" in result.stdout
