"""Tests for jaxmem.data: sources, label noise, validation, fingerprints. Offline and fast."""

import dataclasses
import io
import time

import numpy as np
import pytest

from jaxmem import data
from jaxmem.errors import JaxmemError


def one_line_error(fn, *args, **kwargs) -> str:
  """Calls fn, expects a JaxmemError, checks its message is one line, returns it."""
  with pytest.raises(JaxmemError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert message and "\n" not in message, message
  return message


@pytest.fixture(scope="module")
def digits():
  return data.load_dataset("digits")


@pytest.fixture(scope="module")
def synthetic():
  return data.load_dataset("synthetic", seed=0)


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_and_split(digits):
  assert (digits.num_train, digits.num_test) == (1347, 450)
  assert digits.x_train.shape == (1347, 8, 8, 1) and digits.x_test.shape == (450, 8, 8, 1)
  assert digits.is_image and digits.input_shape == (8, 8, 1)
  assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int32
  assert 0.0 == digits.x_train.min() and digits.x_train.max() == 1.0
  assert digits.num_classes == 10 and digits.name == "digits"
  assert not digits.noisy.any() and np.array_equal(digits.clean_y_train, digits.y_train)
  assert digits.group is None and digits.group_size is None


def test_digits_split_is_stratified(digits):
  total = np.bincount(digits.y_train, minlength=10) + np.bincount(digits.y_test, minlength=10)
  expected = total * 0.25
  assert np.all(np.abs(np.bincount(digits.y_test, minlength=10) - expected) <= 1)


def test_digits_split_is_fixed_and_independent_of_seed(digits):
  again = data.load_dataset("digits", seed=7)
  assert again.fingerprint == digits.fingerprint
  assert np.array_equal(again.x_test, digits.x_test)


# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_is_deterministic_from_seed(synthetic):
  again = data.load_dataset("synthetic", seed=0)
  assert again.fingerprint == synthetic.fingerprint
  assert np.array_equal(again.group, synthetic.group)
  other = data.load_dataset("synthetic", seed=1)
  assert other.fingerprint != synthetic.fingerprint
  assert not np.allclose(other.x_train[:10], synthetic.x_train[:10])


def test_synthetic_defaults(synthetic):
  assert synthetic.x_train.shape == (1000, 32) and synthetic.x_test.shape == (500, 32)
  assert not synthetic.is_image and synthetic.num_classes == 10
  assert np.array_equal(np.bincount(synthetic.y_train), np.full(10, 100))


def test_synthetic_has_a_long_tail(synthetic):
  groups, counts = np.unique(synthetic.group, return_counts=True)
  size_of = dict(zip(groups.tolist(), counts.tolist()))
  assert [size_of[g] for g in synthetic.group.tolist()] == synthetic.group_size.tolist()
  assert (synthetic.group_size == 1).sum() >= 50  # a tail of singletons
  assert synthetic.group_size.max() >= 20  # and frequent sub-populations
  for g in groups:  # a sub-population belongs to one class; ids are unique across classes
    assert len(np.unique(synthetic.y_train[synthetic.group == g])) == 1


def test_make_synthetic_parameters():
  ds = data.make_synthetic(seed=3, num_classes=3, dim=5, num_train=60, num_test=20,
                           zipf_exponent=1.0, max_group_size=10)
  assert ds.x_train.shape == (60, 5) and ds.x_test.shape == (20, 5) and ds.num_classes == 3
  sizes = data.zipf_group_sizes(20, zipf_exponent=1.0, max_group_size=8)
  assert sizes.tolist() == [8, 4, 2, 2, 1, 1, 1, 1]
  assert one_line_error(data.make_synthetic, num_classes=1).count("1")


# ---------------------------------------------------------------------------------------------
# label noise


def test_label_noise_flips_exact_count_to_other_classes(digits):
  noisy = data.with_label_noise(digits, 0.1, seed=3)
  assert noisy.noisy.sum() == round(0.1 * 1347) == 135
  assert np.array_equal(noisy.clean_y_train, digits.y_train)
  assert np.array_equal(noisy.noisy, noisy.y_train != noisy.clean_y_train)
  assert np.all(noisy.y_train[noisy.noisy] != digits.y_train[noisy.noisy])
  assert np.array_equal(noisy.y_train[~noisy.noisy], digits.y_train[~noisy.noisy])
  assert np.shares_memory(noisy.x_train, digits.x_train)  # features are not copied
  assert np.array_equal(noisy.y_test, digits.y_test)
  assert noisy.fingerprint != digits.fingerprint


def test_label_noise_is_deterministic(digits):
  a = data.load_dataset("digits", seed=5, label_noise=0.2)
  b = data.load_dataset("digits", seed=5, label_noise=0.2)
  c = data.load_dataset("digits", seed=6, label_noise=0.2)
  assert np.array_equal(a.y_train, b.y_train) and a.fingerprint == b.fingerprint
  assert not np.array_equal(a.noisy, c.noisy)
  new_labels = a.y_train[a.noisy]
  assert set(np.unique(new_labels).tolist()) == set(range(10))  # targets spread over classes


def test_label_noise_zero_is_identity(digits):
  assert data.with_label_noise(digits, 0.0, seed=0) is digits


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan")])
def test_label_noise_out_of_range(fraction):
  message = one_line_error(data.load_dataset, "synthetic", label_noise=fraction)
  assert str(fraction) in message


def test_negative_seed_is_rejected():
  assert "-1" in one_line_error(data.load_dataset, "synthetic", seed=-1)


# ---------------------------------------------------------------------------------------------
# .npz


def test_npz_round_trip_float(tmp_path, synthetic):
  path = str(tmp_path / "vectors.npz")
  np.savez(path, x_train=synthetic.x_train, y_train=synthetic.y_train,
           x_test=synthetic.x_test, y_test=synthetic.y_test, num_classes=12)
  ds = data.load_dataset(path)
  assert ds.name == path and ds.num_classes == 12
  assert np.array_equal(ds.x_train, synthetic.x_train)
  assert np.array_equal(ds.y_test, synthetic.y_test)


def test_npz_uint8_images_stay_uint8_and_get_a_channel(tmp_path):
  rng = np.random.default_rng(0)
  x_train = rng.integers(0, 256, (12, 5, 5), dtype=np.uint8)
  x_test = rng.integers(0, 256, (4, 5, 5), dtype=np.uint8)
  path = tmp_path / "images.bin"  # an existing file is read as .npz whatever its extension
  with open(path, "wb") as f:
    np.savez(f, x_train=x_train, y_train=np.arange(12) % 4, x_test=x_test,
             y_test=np.array([0, 1, 2, 5]))
  ds = data.load_dataset(str(path))
  # Images keep their stored dtype (the engine scales them on the device).
  assert ds.x_train.shape == (12, 5, 5, 1) and ds.x_train.dtype == np.uint8
  np.testing.assert_array_equal(ds.x_train[..., 0], x_train)
  assert ds.num_classes == 6 and ds.y_train.dtype == np.int32


def test_npz_missing_key_lists_required_keys(tmp_path):
  path = str(tmp_path / "partial.npz")
  np.savez(path, x_train=np.zeros((3, 2)), y_train=np.zeros(3, int))
  message = one_line_error(data.load_dataset, path)
  assert "x_test" in message and "y_test" in message and "y_train" in message


def test_npz_missing_file(tmp_path):
  path = str(tmp_path / "absent.npz")
  assert path in one_line_error(data.load_dataset, path)


# ---------------------------------------------------------------------------------------------
# TFDS, offline: a tiny array_record dataset prepared into a temporary data_dir.


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """Prepares 'jaxmem_test_tiny' (8x8x1 images, 3 classes, 20 train / 10 test) offline.

  The builder skips TFDS registration, so loading it goes through the read-only path a user gets
  after copying a prepared folder. Images are PNG bytes made with PIL: encoding numpy arrays
  would need TensorFlow. Every pixel of an image equals 40 * label + index-in-split, which lets
  the test check labels and pixels stay paired.
  """
  tfds = pytest.importorskip("tensorflow_datasets")
  from PIL import Image

  def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buf, format="png")
    return buf.getvalue()

  class JaxmemTestTiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(8, 8, 1)),
              "label": tfds.features.ClassLabel(num_classes=3),
          }),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(20), "test": self._generate_examples(10)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": png(40 * (i % 3) + i), "label": i % 3}

  root = tmp_path_factory.mktemp("tfds")
  builder = JaxmemTestTiny(data_dir=str(root), file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return root


def check_tiny(ds):
  assert ds.x_train.shape == (20, 8, 8, 1) and ds.x_test.shape == (10, 8, 8, 1)
  assert ds.x_train.dtype == np.uint8 and ds.num_classes == 3  # images as stored
  for x, y, n in ((ds.x_train, ds.y_train, 20), (ds.x_test, ds.y_test, 10)):
    pixel = x[:, 0, 0, 0].astype(int)
    assert np.all(x == x[:, :1, :1, :1])  # constant images
    index = pixel - 40 * y
    assert sorted(index.tolist()) == list(range(n)) and np.all(index % 3 == y)


def test_tfds_prepared_dataset(tfds_dir):
  ds = data.load_dataset("tfds:jaxmem_test_tiny", data_dir=tfds_dir)
  assert ds.name == "tfds:jaxmem_test_tiny"
  check_tiny(ds)


def test_tfds_bare_name_and_env_data_dir(tfds_dir, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
  check_tiny(data.load_dataset("jaxmem_test_tiny"))


@pytest.mark.parametrize("name", ["tfds:mnist", "mnist"])
def test_tfds_missing_dataset_fails_fast(tmp_path, name):
  pytest.importorskip("tensorflow_datasets")
  start = time.monotonic()
  message = one_line_error(data.load_dataset, name, data_dir=tmp_path)
  assert time.monotonic() - start < 20
  assert "not prepared" in message and str(tmp_path) in message and "download=True" in message


def test_tfds_unknown_builder(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  message = one_line_error(data.load_dataset, "tfds:no_such_dataset_xyz", data_dir=tmp_path)
  assert "no_such_dataset_xyz" in message


# ---------------------------------------------------------------------------------------------
# names and registry


def test_unknown_dataset_lists_valid_names(tmp_path):
  message = one_line_error(data.load_dataset, "no_such_dataset_xyz", data_dir=tmp_path)
  for expected in ("no_such_dataset_xyz", "digits", "synthetic", "tfds:<name>", "<file>.npz"):
    assert expected in message


def test_register_dataset(monkeypatch, synthetic):
  monkeypatch.setattr(data, "_REGISTRY", dict(data._REGISTRY))

  @data.register_dataset("jaxmem_test_registered")
  def _load(*, seed, data_dir, download):
    del data_dir, download
    return data.make_synthetic(seed=seed, name="jaxmem_test_registered")

  assert "jaxmem_test_registered" in data.dataset_names()
  ds = data.load_dataset("jaxmem_test_registered", seed=0)
  assert ds.fingerprint == synthetic.fingerprint  # the name is not part of the content
  one_line_error(data.register_dataset("jaxmem_test_registered"), _load)


# ---------------------------------------------------------------------------------------------
# validation


def tiny(**changes) -> data.Dataset:
  """A valid 3-class dataset with 6 train and 3 test examples, with fields overridden."""
  fields = dict(name="tiny", x_train=np.zeros((6, 4), np.float32),
                y_train=np.array([0, 1, 2, 0, 1, 2], np.int32),
                x_test=np.zeros((3, 4), np.float32), y_test=np.array([0, 1, 2], np.int32),
                num_classes=3, noisy=np.zeros(6, bool),
                clean_y_train=np.array([0, 1, 2, 0, 1, 2], np.int32))
  fields.update(changes)
  return data.Dataset(**fields)


def with_nan(shape, count, value=np.nan):
  x = np.zeros(shape, np.float32)
  x.flat[:count] = value
  return x


@pytest.mark.parametrize("changes, expected", [
    (dict(x_train=with_nan((6, 4), 3)), ["x_train", "3 non-finite"]),
    (dict(x_test=with_nan((3, 4), 2, np.inf)), ["x_test", "2 non-finite"]),
    (dict(y_train=np.array([0, 1, 7, 0, 1, 2], np.int32)), ["y_train", "7"]),
    (dict(y_test=np.array([0, -1, 2], np.int32)), ["y_test", "-1"]),
    (dict(y_train=np.array([0, 1, 2, 0, 1], np.int32)), ["6", "5"]),
    (dict(x_test=np.zeros((4, 4), np.float32)), ["4", "3", "test"]),
    (dict(x_train=np.zeros((0, 4), np.float32), y_train=np.zeros(0, np.int32)), ["train", "empty"]),
    (dict(x_test=np.zeros((0, 4), np.float32), y_test=np.zeros(0, np.int32)), ["test", "empty"]),
    (dict(x_test=np.zeros((3, 5), np.float32)), ["(4,)", "(5,)"]),
    (dict(num_classes=1, y_train=np.zeros(6, np.int32), y_test=np.zeros(3, np.int32),
          clean_y_train=np.zeros(6, np.int32)), ["num_classes", "1"]),
    (dict(x_train=np.zeros((6, 4), np.float64)), ["x_train", "float64"]),
    (dict(y_test=np.array([0.0, 1.0, 2.0])), ["y_test", "float64"]),
    (dict(noisy=np.zeros(5, bool)), ["noisy", "(5,)"]),
])
def test_validation_errors(changes, expected):
  data.validate_dataset(tiny())  # the base is valid
  message = one_line_error(data.validate_dataset, tiny(**changes))
  for part in expected:
    assert part in message, (part, message)


def test_from_arrays_validates_and_converts():
  ds = data.from_arrays("v", np.zeros((4, 2)), [0, 1, 0, 1], np.zeros((2, 2)), [1, 0])
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32 and ds.num_classes == 2
  assert "nan" in one_line_error(data.from_arrays, "v", with_nan((4, 2), 1), [0, 1, 0, 1],
                                 np.zeros((2, 2)), [1, 0]).lower()
  assert "float" in one_line_error(data.from_arrays, "v", np.zeros((2, 2)), [0.5, 1.0],
                                   np.zeros((2, 2)), [1, 0])


# ---------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_is_stable_and_sensitive(digits):
  fp = digits.fingerprint
  assert len(fp) == 64 and int(fp, 16) >= 0
  assert dataclasses.replace(digits, name="renamed").fingerprint == fp
  y = np.array(digits.y_train)
  y[0] = (y[0] + 1) % 10
  assert dataclasses.replace(digits, y_train=y).fingerprint != fp
  assert tiny().fingerprint == tiny().fingerprint


def test_arrays_are_read_only(digits):
  with pytest.raises(ValueError):
    digits.y_train[0] = 3
  caller = np.zeros((6, 4), np.float32)
  tiny(x_train=caller)
  caller[0, 0] = 1.0  # the caller's own array stays writable
