"""compute_dtype="bfloat16": bf16 inputs, activations and matmuls with float32 master weights.

Parameters, gradients, optimizer state, logits, margins and the loss stay float32; the parameter
tree is the same for both dtypes, so checkpoints are interchangeable.
"""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmem
from jaxmem import RunConfig, load_dataset, make_masks
from jaxmem.data import from_arrays
from jaxmem.engine import Engine
from jaxmem.errors import JaxmemError
from jaxmem.models import build_model
from jaxmem.records import RunDir

MODELS = {
    "mlp": ("mlp", {"hidden_sizes": (32,)}),
    "cnn-shift": ("cnn", {"channels": (4,), "conv": "shift"}),
    "cnn-xla": ("cnn", {"channels": (4,), "conv": "xla"}),
}


def _images(num=16, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (num, 8, 8, 1))


def _float_dtypes(tree) -> set:
  return {leaf.dtype for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}


def _bf16_ops(fn, *args) -> list[str]:
  """The matmuls and convolutions in ``fn``'s jaxpr whose result is bf16 (so their inputs are too)."""
  text = str(jax.make_jaxpr(fn)(*args))
  return re.findall(r":bf16\[[\d,]*\] = (dot_general|conv_general_dilated)", text)


@pytest.mark.parametrize("case", sorted(MODELS))
def test_bf16_model_has_the_float32_parameter_tree_and_float32_logits_and_gradients(case):
  name, options = MODELS[case]
  full, half = build_model(name, 10, options), build_model(name, 10, options, dtype="bfloat16")
  x = _images()
  params = full.init(jax.random.PRNGKey(0), x)["params"]
  half_params = half.init(jax.random.PRNGKey(0), x)["params"]
  # Same names, shapes, float32 dtype and initial values: a checkpoint of one loads into the other.
  assert jax.tree.structure(params) == jax.tree.structure(half_params)
  jax.tree.map(np.testing.assert_array_equal, params, half_params)
  assert _float_dtypes(half_params) == {np.dtype(np.float32)}

  apply_full = lambda p, x: full.apply({"params": p}, x)
  apply_half = lambda p, x: half.apply({"params": p}, x)
  logits, half_logits = apply_full(params, x), apply_half(params, x)
  assert half_logits.dtype == jnp.float32
  # bf16 keeps 8 bits of mantissa: a few roundings per layer leave logits within ~1% of their scale.
  scale = float(jnp.abs(logits).max())
  np.testing.assert_allclose(half_logits, logits, rtol=0.02, atol=0.02 * scale)
  assert not np.array_equal(half_logits, logits)  # bf16 really was used...
  assert _bf16_ops(apply_half, params, x) and not _bf16_ops(apply_full, params, x)  # ...in the matmuls

  labels = jnp.arange(x.shape[0]) % 10
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply_half(p, x), labels).mean()
  grads = jax.grad(loss)(params)
  assert _float_dtypes(grads) == {np.dtype(np.float32)}
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_shift_and_xla_convolutions_agree_in_bf16():
  """ShiftConv casts its kernel, bias and input to bf16 as nn.Conv does: same function, same tree."""
  x = _images()
  shift = build_model("cnn", 10, MODELS["cnn-shift"][1], dtype="bfloat16")
  xla = build_model("cnn", 10, MODELS["cnn-xla"][1], dtype="bfloat16")
  params = shift.init(jax.random.PRNGKey(0), x)["params"]
  jax.tree.map(np.testing.assert_array_equal, params, xla.init(jax.random.PRNGKey(0), x)["params"])
  a, b = shift.apply({"params": params}, x), xla.apply({"params": params}, x)
  np.testing.assert_allclose(a, b, rtol=0.02, atol=0.02 * float(jnp.abs(a).max()))


def test_bf16_engine_fits_digits_with_float32_state_and_records():
  dataset = load_dataset("digits")
  config = RunConfig(num_models=2, subset_ratios=(0.5,), epochs=8, batch_size=32, learning_rate=1e-2,
                     model_options={"hidden_sizes": (64,)}, strategy="vmap", compute_dtype="bfloat16")
  keep, _ = make_masks("subset", 2, dataset.num_train, (0.5,), seed=0)
  engine = Engine(dataset, config, probe_cache=None)
  records = engine.train_chunk(np.arange(2), keep)
  # Both dtypes reach 0.994-0.996 here; chance is 0.1.
  own = (records["train_correct"] & records["keep"]).sum(1) / records["keep"].sum(1)
  assert own.min() >= 0.95, own
  assert records["test_correct"].mean() >= 0.9
  for name in ("train_margin", "test_margin", "epoch_loss"):
    assert records[name].dtype == np.float32 and np.isfinite(records[name]).all(), name
  # Master weights and the optimizer's moments stay float32 (its step count is an integer).
  assert _float_dtypes(engine.last_state.params) == {np.dtype(np.float32)}
  assert _float_dtypes(engine.last_state.opt_state) == {np.dtype(np.float32)}


def _small_images(num_train=48, num_test=16, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, num_train + num_test)
  x = (rng.normal(size=(num_train + num_test, 6, 6, 1)) + y[:, None, None, None]).astype(np.float32)
  return from_arrays("small", x[:num_train], y[:num_train], x[num_train:], y[num_train:], num_classes=3)


def _train(dataset, config, keep):
  engine = Engine(dataset, config, probe_cache=None)
  records = engine.train_chunk(np.arange(config.num_models), keep)
  return jax.device_get(engine.last_state.params), records


# cnn-xla (a vmapped nn.Conv is a grouped convolution) is slow to compile on a CPU: with -m slow; the
# default tests run its bf16 forward and gradient, and check that it agrees with ShiftConv.
@pytest.mark.parametrize("case", ["mlp", "cnn-shift", pytest.param("cnn-xla", marks=pytest.mark.slow)])
def test_bf16_vmap_equals_the_per_model_loop(case):
  name, options = MODELS[case]
  dataset = _small_images()
  config = RunConfig(num_models=3, epochs=2, batch_size=8, learning_rate=1e-2, model=name, model_options=options,
                     compute_dtype="bfloat16")
  keep, _ = make_masks("subset", 3, dataset.num_train, (0.5,), seed=0)
  reference, ref_records = _train(dataset, config.replace(strategy="loop"), keep)
  params, records = _train(dataset, config.replace(strategy="vmap"), keep)
  # Loose for bf16: a batched (vmapped) convolution may round its sums in another order.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3), reference, params)
  np.testing.assert_allclose(records["train_margin"], ref_records["train_margin"], rtol=0.02, atol=0.05)
  np.testing.assert_allclose(records["epoch_loss"], ref_records["epoch_loss"], rtol=1e-2, atol=1e-3)
  assert _float_dtypes(params) == {np.dtype(np.float32)} and records["train_margin"].dtype == np.float32


@pytest.mark.parametrize("value", ["float16", "bf16", "fp32"])
def test_unknown_compute_dtype_is_a_one_line_error(value):
  with pytest.raises(JaxmemError) as info:
    RunConfig(compute_dtype=value).validate()
  assert str(info.value) == f"unknown compute_dtype {value!r}; choose one of: float32, bfloat16"
  with pytest.raises(JaxmemError, match=f"unknown compute_dtype {value!r}"):
    build_model("mlp", 10, dtype=value)


def test_compute_dtype_is_part_of_the_run_identity():
  assert RunConfig().compute_dtype == "float32"
  assert RunConfig(compute_dtype="bfloat16").identity() != RunConfig().identity()
  with pytest.raises(JaxmemError, match="computation dtype is set by compute_dtype"):
    build_model("mlp", 10, {"dtype": "bfloat16"})


def test_run_made_before_compute_dtype_existed_resumes_as_float32(tiny_run, tiny_config, tmp_path):
  """A manifest without compute_dtype (written before the field existed) is a float32 run."""
  shutil.copytree(tiny_run.run_dir, tmp_path / "run")
  run = RunDir.open(tmp_path / "run")
  manifest = run.manifest()
  assert manifest["identity"]["compute_dtype"] == "float32"
  del manifest["identity"]["compute_dtype"], manifest["config"]["compute_dtype"]
  run.manifest_path.write_text(json.dumps(manifest))
  assert RunConfig.from_dict(run.manifest()["config"]).compute_dtype == "float32"
  again = jaxmem.run(tiny_config, run.path, progress=False, log=lambda m: None)
  assert again.trained_chunks == []
  with pytest.raises(JaxmemError, match="compute_dtype: 'float32' there, 'bfloat16' now"):
    jaxmem.run(tiny_config.replace(compute_dtype="bfloat16"), run.path, progress=False, log=lambda m: None)
