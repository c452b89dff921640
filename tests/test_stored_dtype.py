"""Images in their stored dtype: uint8 on the host and on the devices, scaled and standardized on
the device; training matches the float32 host path."""

import jax
import numpy as np

from jaxmem import RunConfig, make_masks
from jaxmem.data import from_arrays
from jaxmem.engine import Engine
from jaxmem.engine.trainer import image_statistics


def _images(num_train=64, num_test=16, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, num_train + num_test)
  base = rng.integers(0, 200, (num_train + num_test, 6, 6, 2))
  x = np.clip(base + 20 * y[:, None, None, None], 0, 255).astype(np.uint8)
  return x, y


def test_statistics_equal_the_float_reference():
  x, _ = _images()
  mean, std = image_statistics(x, block=7)  # blocks that do not divide N
  scaled = x.astype(np.float64) / 255
  np.testing.assert_allclose(mean.ravel(), scaled.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std.ravel(), scaled.std(axis=(0, 1, 2)) + 1e-6, rtol=1e-5)


def test_uint8_images_stay_uint8_and_train_as_the_float_path():
  x, y = _images()
  stored = from_arrays("u8", x[:64], y[:64], x[64:], y[64:], num_classes=3)
  assert stored.x_train.dtype == np.uint8  # one byte per pixel on the host
  scaled = from_arrays("f32", x[:64].astype(np.float32) / 255, y[:64], x[64:].astype(np.float32) / 255, y[64:],
                       num_classes=3)
  config = RunConfig(model="cnn", model_options={"channels": (4,)}, num_models=3, epochs=1, batch_size=8,
                     strategy="vmap", augment=True, queries=2, learning_rate=1e-2)
  keep, _ = make_masks("subset", 3, 64, (0.5,), 0)
  engine = Engine(stored, config, probe_cache=None)
  assert engine.data.x_train.dtype == np.uint8 and engine.data.x_test.dtype == np.uint8
  a = engine.train_chunk(np.arange(3), keep)
  b = Engine(scaled, config, probe_cache=None).train_chunk(np.arange(3), keep)
  for name in ("train_margin", "test_margin", "train_margin_aug", "epoch_loss"):
    np.testing.assert_allclose(a[name], b[name], rtol=1e-3, atol=1e-3, err_msg=name)
