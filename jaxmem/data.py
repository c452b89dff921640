"""Datasets: in-memory host arrays with a content fingerprint, and the loaders that make them.

Everything downstream (masks, engine, scores) works on one :class:`Dataset`: numpy arrays on the
host, labels as trained on (after optional label noise), the clean labels, and which ones were
flipped. The engine moves the arrays to the device itself; nothing here imports JAX.

Sources, picked by :func:`load_dataset`:

* ``digits``: scikit-learn's bundled 8x8 digits (offline), a fixed stratified 75/25 split.
* ``synthetic``: a long-tailed mixture with known rare sub-populations (:func:`make_synthetic`),
  the ground truth the memorization tests rely on.
* ``tfds:NAME`` (or a bare TFDS builder name): read through ``tfds.data_source`` from array_record
  files, so TensorFlow is not needed. ``download=False`` by default because an offline download
  attempt hangs for minutes before failing.
* ``PATH.npz``: arrays ``x_train, y_train, x_test, y_test`` and optionally ``num_classes``.

Every user-facing problem raises :class:`~jaxmem.errors.JaxmemError` with one line, before any
training starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import numbers
import os
import zipfile
from typing import Callable

import numpy as np

from jaxmem.errors import JaxmemError, one_of

# Stream tags for np.random.default_rng([seed, tag]): the same user seed drives independent,
# reproducible streams for data generation and label noise.
_SYNTHETIC_TAG = 0x5E7D
_LABEL_NOISE_TAG = 0x9015E

# How many TFDS records to decode per request; bounds the list of decoded dicts held at once.
_TFDS_CHUNK = 4096


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A classification dataset held in host memory.

  Arrays are made read-only on construction so that the cached :attr:`fingerprint` keeps
  describing the content (the caller's own arrays are not touched: the dataset holds read-only
  views). Build one with :func:`from_arrays` or :func:`load_dataset`, which convert dtypes and
  validate; constructing it directly skips both.
  """

  name: str
  x_train: np.ndarray  # (N, H, W, C) images, uint8 as stored (0-255), or float32; or float32 (N, D) vectors
  y_train: np.ndarray  # int32 (N,), the labels trained on (after label noise)
  x_test: np.ndarray  # (T, ...), the dtype of x_train
  y_test: np.ndarray  # int32 (T,)
  num_classes: int
  noisy: np.ndarray  # bool (N,), which train labels label noise flipped
  clean_y_train: np.ndarray  # int32 (N,), the labels before label noise
  group: np.ndarray | None = None  # int (N,), sub-population id (synthetic ground truth)
  group_size: np.ndarray | None = None  # int (N,), train size of example i's sub-population

  def __post_init__(self):
    for field in ("x_train", "y_train", "x_test", "y_test", "noisy", "clean_y_train", "group",
                  "group_size"):
      value = getattr(self, field)
      if value is not None:
        view = np.asarray(value).view()
        view.flags.writeable = False
        object.__setattr__(self, field, view)

  @property
  def num_train(self) -> int:
    return int(self.x_train.shape[0])

  @property
  def num_test(self) -> int:
    return int(self.x_test.shape[0])

  @property
  def is_text(self) -> bool:
    """Token sequences (:class:`jaxmem.text.TextDataset`) rather than features with labels."""
    return False

  @property
  def is_image(self) -> bool:
    return self.x_train.ndim == 4

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.x_train.shape[1:])

  @functools.cached_property
  def fingerprint(self) -> str:
    """Hex sha256 of the content, independent of the name.

    Covers shapes, dtypes and bytes of ``x_train, y_train, x_test, y_test, noisy`` and
    ``num_classes`` (same arrays with a different class count train different models), so a run
    directory can tell whether it is being resumed on the same data. Cached: the arrays are
    read-only. (``functools.cached_property`` writes to the instance ``__dict__`` directly, which a
    frozen dataclass without slots allows.)
    """
    h = hashlib.sha256()
    h.update(f"num_classes={int(self.num_classes)};".encode())
    for key in ("x_train", "y_train", "x_test", "y_test", "noisy"):
      a = np.ascontiguousarray(getattr(self, key))
      h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
      h.update(memoryview(a).cast("B"))
    return h.hexdigest()

  def __repr__(self) -> str:
    return (f"Dataset(name={self.name!r}, x_train={self.x_train.shape}, "
            f"x_test={self.x_test.shape}, num_classes={self.num_classes}, "
            f"noisy={int(np.count_nonzero(self.noisy))})")


# ---------------------------------------------------------------------------------------------
# Registry and entry point.

_REGISTRY: dict[str, Callable[..., Dataset]] = {}
# File suffix -> loader(path) for formats other than .npz (text files: jaxmem.text registers .txt).
_FILE_LOADERS: dict[str, Callable[[str], Dataset]] = {}
# Loader of TFDS datasets whose features are text, not images (jaxmem.text registers it).
_TFDS_TEXT_LOADERS: list[Callable[..., Dataset]] = []


def register_file_loader(suffix: str, loader: Callable[[str], Dataset]) -> None:
  """Files whose name ends in ``suffix`` are read by ``loader(path)`` in :func:`load_dataset`."""
  _FILE_LOADERS[suffix] = loader


def register_tfds_text_loader(loader: Callable[..., Dataset]) -> None:
  """``loader(source_of, *, name, text_key, splits)`` reads TFDS datasets with a text feature."""
  _TFDS_TEXT_LOADERS[:] = [loader]


def register_dataset(name: str):
  """Registers ``fn(*, seed, data_dir, download) -> Dataset`` under ``name``.

  Registered names win over TFDS names and file paths in :func:`load_dataset`.
  """

  def decorator(fn):
    if name in _REGISTRY:
      raise JaxmemError(f"dataset {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn

  return decorator


def dataset_names() -> list[str]:
  """The registered dataset names (TFDS names and .npz paths are accepted too)."""
  return sorted(_REGISTRY)


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
                 seed: int = 0, label_noise: float = 0.0) -> Dataset:
  """Loads a dataset by name, optionally flips labels, and validates it.

  Resolution order: a registered name (``digits``, ``synthetic``); a path ending in ``.npz`` or an
  existing file; ``tfds:NAME``; a bare name that TFDS knows (a builder in the TFDS catalogue, or a
  folder prepared in ``data_dir``). ``seed`` drives generated data (``synthetic``) and label
  noise, through independent streams; it never changes a fixed split such as ``digits``'.

  Args:
    name: what to load; the returned dataset carries it, so it can be loaded again from a record.
    data_dir: TFDS data directory; ``None`` means TFDS's default (``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    download: let TFDS download and prepare a missing dataset. Off by default: offline it hangs
      for minutes before failing.
    seed: non-negative integer.
    label_noise: fraction in [0, 1) of training labels to flip (see :func:`with_label_noise`).
  """
  if not isinstance(name, str) or not name:
    raise JaxmemError(f"dataset name must be a non-empty string, got {name!r}")
  _check_seed(seed)
  _check_fraction(label_noise)
  suffix = os.path.splitext(name)[1]
  if name in _REGISTRY:
    ds = _REGISTRY[name](seed=seed, data_dir=data_dir, download=download)
  elif suffix in _FILE_LOADERS:
    if not os.path.isfile(name):
      raise JaxmemError(f"dataset file {name!r} does not exist")
    ds = _FILE_LOADERS[suffix](name)
  elif name.endswith(".npz") or os.path.isfile(name):
    ds = _load_npz(name)
  elif name.startswith("tfds:"):
    ds = _load_tfds(name[len("tfds:"):], name=name, data_dir=data_dir, download=download)
  elif _is_tfds_name(name, data_dir):
    ds = _load_tfds(name, name=name, data_dir=data_dir, download=download)
  else:
    raise one_of("dataset", name, dataset_names() + ["tfds:<name>", "<file>.npz"] + [f"<file>{x}" for x in _FILE_LOADERS])
  if label_noise > 0:
    if ds.is_text:
      raise JaxmemError(f"label noise needs labels; text dataset {name!r} has none (use label_noise 0)")
    ds = with_label_noise(ds, label_noise, seed)
  validate_dataset(ds)
  return ds


def from_arrays(name: str, x_train, y_train, x_test, y_test,
                num_classes: int | None = None) -> Dataset:
  """Builds a validated dataset from array-likes, converting to the library's dtypes.

  ``uint8`` images ((N, H, W) or (N, H, W, C)) stay uint8, as stored: the engine scales them to
  [0, 1] and standardizes them on the device (one 1-byte copy on the host and per device, not a
  4-byte one); other ``uint8`` features are scaled to [0, 1] as float32, others become float32. A 3-D ``x`` (N, H, W) gains a channel axis. Labels must be integers and
  become int32. ``num_classes`` defaults to the largest label (train or test) plus one.
  """
  x_train, x_test = _as_features(x_train, "x_train"), _as_features(x_test, "x_test")
  y_train, y_test = _as_labels(y_train, "y_train"), _as_labels(y_test, "y_test")
  if num_classes is None:
    labels = np.concatenate([y_train, y_test])
    num_classes = int(labels.max()) + 1 if labels.size else 0
    _check_inferred_classes(labels, num_classes, "y_train" if y_train.size and y_train.max() + 1 == num_classes
                            else "y_test")
  elif not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool):
    raise JaxmemError(f"num_classes must be an integer, got {num_classes!r}")
  ds = Dataset(name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
               num_classes=int(num_classes), noisy=np.zeros(y_train.shape, bool),
               clean_y_train=y_train.copy())
  validate_dataset(ds)
  return ds


# ---------------------------------------------------------------------------------------------
# Validation and label noise.


def validate_dataset(ds: Dataset) -> None:
  """Raises :class:`JaxmemError` (one line) if ``ds`` cannot be trained on.

  Checked here rather than mid-training so a bad file fails in a second, not after an hour: class
  count, dtypes, split sizes and lengths, feature shapes, non-finite features, label ranges. A text
  dataset checks its own tokens (``TextDataset.validate``).
  """
  if ds.is_text:
    ds.validate()
    return
  for split in ("train", "test"):
    x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
    if x.ndim < 1 or y.ndim != 1:
      raise JaxmemError(f"x_{split} and y_{split} must be arrays over examples, got shapes "
                        f"{x.shape} and {y.shape}")
    if len(x) != len(y):
      raise JaxmemError(f"{split} split has {len(x)} examples in x_{split} but {len(y)} labels "
                        f"in y_{split}")
    if len(x) == 0:
      raise JaxmemError(f"{split} split is empty (x_{split} has 0 examples)")
    if x.ndim < 2:
      raise JaxmemError(f"x_{split} must have shape (num_examples, ...), got {x.shape}")
    if x.dtype != np.float32 and not (x.dtype == np.uint8 and x.ndim == 4):
      raise JaxmemError(f"x_{split} must be float32 (or uint8 images), got {x.dtype} (from_arrays converts)")
    if not np.issubdtype(y.dtype, np.integer):
      raise JaxmemError(f"y_{split} must hold integer labels, got dtype {y.dtype}")
  k = ds.num_classes
  if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 2:
    raise JaxmemError(f"num_classes must be an integer >= 2, got {k!r}")
  _check_label_range(ds.y_train, k, "y_train")
  _check_label_range(ds.y_test, k, "y_test")
  if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
    raise JaxmemError(f"train and test features differ in shape: x_train examples are "
                      f"{ds.x_train.shape[1:]}, x_test examples are {ds.x_test.shape[1:]}")
  n = ds.num_train
  for field in ("noisy", "clean_y_train", "group", "group_size"):
    value = getattr(ds, field)
    if value is not None and value.shape != (n,):
      raise JaxmemError(f"{field} must have shape ({n},) like y_train, got {value.shape}")
  if ds.noisy.dtype != np.bool_:
    raise JaxmemError(f"noisy must be a bool array, got {ds.noisy.dtype}")
  _check_label_range(ds.clean_y_train, k, "clean_y_train")
  # Non-finite values last: the count is the one O(size) pass worth avoiding on obvious errors.
  for split in ("train", "test"):
    x = getattr(ds, f"x_{split}")
    bad = x.size - int(np.count_nonzero(np.isfinite(x))) if x.dtype.kind == "f" else 0
    if bad:
      raise JaxmemError(f"x_{split} has {bad} non-finite values (NaN or inf); all features must "
                        f"be finite")
    _check_feature_scale(x, f"x_{split}")


def training_subset(ds: Dataset, indices: np.ndarray, name: str) -> Dataset:
  """The training examples ``indices`` (in that order) with the test set unchanged, for studies
  that retrain on part of the data. Label-noise bookkeeping (``noisy``, ``clean_y_train``) and the
  synthetic ground truth (``group``, ``group_size``) follow the examples."""
  indices = np.asarray(indices)
  optional = {f: (getattr(ds, f)[indices] if getattr(ds, f) is not None else None) for f in ("group", "group_size")}
  subset = dataclasses.replace(ds, name=name, x_train=ds.x_train[indices], y_train=ds.y_train[indices],
                               noisy=ds.noisy[indices], clean_y_train=ds.clean_y_train[indices], **optional)
  validate_dataset(subset)
  return subset


def load_run_dataset(manifest: dict, *, data_dir: str | os.PathLike | None = None) -> Dataset:
  """The dataset a run trained on, loaded again from its manifest (name, data dir, seed, label
  noise). A dataset whose content differs from the run's (another TFDS version, an edited .npz)
  would silently mix two datasets, so a fingerprint mismatch is an error."""
  config = manifest.get("config", {})
  if "dataset" not in config:
    raise JaxmemError("the run's manifest names no dataset; pass the dataset explicitly")
  ds = load_dataset(config["dataset"], data_dir=data_dir or config.get("data_dir"),
                    seed=int(config.get("seed", 0)), label_noise=float(config.get("label_noise", 0.0)))
  expected = manifest.get("dataset", {}).get("fingerprint")
  if expected and ds.fingerprint != expected:
    raise JaxmemError("the dataset loaded again differs from the one the run trained on (fingerprint mismatch); "
                      "pass the run's dataset explicitly")
  return ds


def with_label_noise(ds: Dataset, fraction: float, seed: int) -> Dataset:
  """Flips exactly ``round(fraction * N)`` training labels, each to a different random class.

  Which examples flip is uniform without replacement; each new label is uniform over the other
  ``num_classes - 1`` classes. Deterministic from ``seed`` (its own stream, so adding noise does
  not perturb anything else the seed drives). ``noisy`` marks labels that now differ from
  ``clean_y_train``; the clean labels are kept so estimators can be checked against the truth.
  """
  _check_fraction(fraction)
  _check_seed(seed)
  n = ds.num_train
  count = round(fraction * n)
  if count == 0:
    return ds
  rng = np.random.default_rng([int(seed), _LABEL_NOISE_TAG])
  flip = rng.choice(n, size=count, replace=False)
  shift = rng.integers(1, ds.num_classes, size=count)
  y = np.array(ds.y_train, dtype=np.int32)
  y[flip] = (y[flip] + shift) % ds.num_classes
  return dataclasses.replace(ds, y_train=y, noisy=y != ds.clean_y_train)


def _check_label_range(y: np.ndarray, num_classes: int, what: str) -> None:
  bad = (y < 0) | (y >= num_classes)
  if bad.any():
    raise JaxmemError(f"{what} contains label {int(y[bad][0])} outside [0, {num_classes}) "
                      f"({int(bad.sum())} such labels)")


def _check_inferred_classes(labels: np.ndarray, num_classes: int, where: str) -> None:
  """A class count inferred from the largest label is refused when most classes never occur: one
  stray label (e.g. 50,000,000) would otherwise give the models that many outputs and exhaust the
  memory. A dataset that means to have unused classes states ``num_classes``."""
  if num_classes <= 2:
    return
  distinct = len(np.unique(labels))
  if num_classes > 2 * distinct:
    raise JaxmemError(f"{where}'s largest label {num_classes - 1} would make {num_classes} classes, but only "
                      f"{distinct} distinct labels occur; labels must be 0 .. num_classes-1 (relabel them, or "
                      f"store num_classes in the .npz if the classes are really unused)")


#: Features beyond this magnitude are refused: networks initialized for inputs of order 1 overflow or
#: saturate on them and train at chance without any error (standardize them first).
MAX_FEATURE_MAGNITUDE = 1e6


def _check_feature_scale(x: np.ndarray, what: str) -> None:
  largest = max(float(x.max()), -float(x.min())) if x.size else 0.0  # no |x| copy
  if largest > MAX_FEATURE_MAGNITUDE:
    raise JaxmemError(f"{what} has features as large as {largest:.2g} in magnitude; networks train at chance on "
                      f"features beyond {MAX_FEATURE_MAGNITUDE:g}: standardize them (e.g. (x - mean) / std)")


def _check_fraction(fraction) -> None:
  if (not isinstance(fraction, numbers.Real) or isinstance(fraction, bool)
      or not 0 <= fraction < 1):
    raise JaxmemError(f"label noise must be a fraction in [0, 1), got {fraction!r}")


def _check_seed(seed) -> None:
  if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
    raise JaxmemError(f"seed must be a non-negative integer, got {seed!r}")


def _as_features(x, what: str) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype == np.uint8 and x.ndim in (3, 4):
    pass  # images stay in their stored dtype (4x smaller); the engine scales them on the device
  elif x.dtype == np.uint8:
    x = x.astype(np.float32) / np.float32(255)
  elif x.dtype.kind in "biuf":
    x = x.astype(np.float32)
  else:
    raise JaxmemError(f"{what} must be numeric, got dtype {x.dtype}")
  if x.ndim == 3:  # (N, H, W) grayscale images
    x = x[..., None]
  return x


def _as_labels(y, what: str) -> np.ndarray:
  y = np.asarray(y)
  if not np.issubdtype(y.dtype, np.integer):
    raise JaxmemError(f"{what} must hold integer class labels, got dtype {y.dtype}")
  if y.ndim != 1:
    raise JaxmemError(f"{what} must be 1-D, got shape {y.shape}")
  # Checked before the cast, which would wrap such a label into range and quote a value not in the file.
  info = np.iinfo(np.int32)
  outside = (y < info.min) | (y > info.max) if y.size and np.iinfo(y.dtype).max > info.max else None
  if outside is not None and outside.any():
    raise JaxmemError(f"{what} contains label {int(y[outside][0])}, outside the int32 range of class labels "
                      f"({int(outside.sum())} such labels); labels must be 0 .. num_classes-1")
  return y.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# digits and synthetic.


@register_dataset("digits")
def _load_digits(*, seed: int, data_dir=None, download: bool = False) -> Dataset:
  """scikit-learn's 1797 8x8 digits: N=1347 train, T=450 test.

  The stratified split uses a fixed ``random_state``, not ``seed``: the split is part of what
  "digits" means, so runs with different seeds compare memorization of the same examples.
  """
  del seed, data_dir, download  # bundled with scikit-learn; fixed split
  from sklearn.datasets import load_digits  # lazy: importing sklearn takes about a second
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=0.25, stratify=y, random_state=0)
  return from_arrays("digits", x_train, y_train, x_test, y_test, num_classes=10)


def zipf_group_sizes(per_class: int, *, zipf_exponent: float, max_group_size: int) -> np.ndarray:
  """Sizes of one class's sub-populations: ``max(1, floor(max_group_size / rank**a))``.

  Ranks are added until the sizes sum to ``per_class`` (the last one is trimmed to fit), so a
  class has a few frequent groups and a tail of singletons. With the defaults (100, a=1.3, 40):
  40, 16, 9, 6, 4, 3, 3, 2, 2, 2, then 13 singletons.
  """
  sizes, total, rank = [], 0, 1
  while total < per_class:
    size = max(1, int(np.floor(max_group_size / rank**zipf_exponent)))
    size = min(size, per_class - total)
    sizes.append(size)
    total += size
    rank += 1
  return np.asarray(sizes, dtype=np.int64)


def make_synthetic(*, seed: int = 0, num_classes: int = 10, dim: int = 32, num_train: int = 1000,
                   num_test: int = 500, zipf_exponent: float = 1.3, max_group_size: int = 40,
                   center_scale: float = 1.0, noise_scale: float = 0.3,
                   name: str = "synthetic") -> Dataset:
  """A long-tailed mixture whose rare sub-populations are the ground truth for memorization.

  Each class is a mixture of sub-populations (Feldman 2020, "Does learning require
  memorization?") with Zipf-like train sizes (:func:`zipf_group_sizes`). Every sub-population has
  its own center drawn from N(0, center_scale^2 I), independent of its class, and its examples are
  center + N(0, noise_scale^2 I). With the defaults, centers are ~8 apart and a group's spread is
  ~1.7, so a network fits every group easily when it sees it, but a singleton that is held out
  has nothing of its class nearby: it is right only by chance. Examples of frequent groups are
  predicted from their siblings. Hence memorization is high for singletons and near zero for the
  head, which is what the end-to-end tests assert.

  The test set is ``num_test`` draws from the same mixture (group probabilities proportional to
  train sizes), so a singleton's group gets Poisson(~num_test/num_train) test points. ``group``
  (unique across classes) and ``group_size`` (train count of the group) are recorded per train
  example. Train and test order is shuffled. Deterministic from ``seed``.
  """
  _check_seed(seed)
  for key, value, low in (("num_classes", num_classes, 2), ("dim", dim, 1),
                          ("num_test", num_test, 1), ("max_group_size", max_group_size, 1),
                          ("num_train", num_train, num_classes)):
    if not isinstance(value, numbers.Integral) or value < low:
      raise JaxmemError(f"synthetic {key} must be an integer >= {low}, got {value!r}")
  for key, value in (("zipf_exponent", zipf_exponent), ("center_scale", center_scale),
                     ("noise_scale", noise_scale)):
    if not isinstance(value, numbers.Real) or not np.isfinite(value) or value < 0:
      raise JaxmemError(f"synthetic {key} must be a finite number >= 0, got {value!r}")
  rng = np.random.default_rng([int(seed), _SYNTHETIC_TAG])
  sizes = zipf_group_sizes(num_train // num_classes, zipf_exponent=zipf_exponent,
                           max_group_size=max_group_size)
  group_sizes = np.tile(sizes, num_classes)  # (G,), class-major
  group_labels = np.repeat(np.arange(num_classes, dtype=np.int32), len(sizes))
  centers = rng.normal(0.0, center_scale, size=(len(group_sizes), dim))

  def draw(group: np.ndarray) -> np.ndarray:
    noise = rng.normal(0.0, noise_scale, size=(len(group), dim))
    return (centers[group] + noise).astype(np.float32)

  train_group = rng.permutation(np.repeat(np.arange(len(group_sizes)), group_sizes))
  test_counts = rng.multinomial(num_test, group_sizes / group_sizes.sum())
  test_group = rng.permutation(np.repeat(np.arange(len(group_sizes)), test_counts))
  x_train, x_test = draw(train_group), draw(test_group)
  y_train, y_test = group_labels[train_group], group_labels[test_group]
  ds = Dataset(name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
               num_classes=num_classes, noisy=np.zeros(len(y_train), bool),
               clean_y_train=y_train.copy(), group=train_group,
               group_size=group_sizes[train_group])
  validate_dataset(ds)
  return ds


@register_dataset("synthetic")
def _load_synthetic(*, seed: int, data_dir=None, download: bool = False) -> Dataset:
  del data_dir, download  # generated
  return make_synthetic(seed=seed)


# ---------------------------------------------------------------------------------------------
# .npz files.

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _load_npz(path: str) -> Dataset:
  """Reads ``x_train, y_train, x_test, y_test`` (and optional ``num_classes``) from an .npz."""
  if not os.path.isfile(path):
    raise JaxmemError(f"dataset file {path!r} does not exist")
  # np.load takes anything that is not a zip for a pickle, and says so: name the real problem.
  if os.path.getsize(path) == 0:
    raise JaxmemError(f"dataset file {path!r} is empty (0 bytes); an .npz dataset is a zip of "
                      f"{', '.join(_NPZ_KEYS)}")
  if not zipfile.is_zipfile(path):
    raise JaxmemError(f"dataset file {path!r} is not an .npz file (not a zip archive); save one with "
                      f"numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
  try:
    with np.load(path, allow_pickle=False) as npz:
      missing = [k for k in _NPZ_KEYS if k not in npz.files]
      if missing:
        raise JaxmemError(f"{path!r} lacks {', '.join(missing)}; an .npz dataset needs keys "
                          f"{', '.join(_NPZ_KEYS)} (and optionally num_classes)")
      arrays = {k: npz[k] for k in _NPZ_KEYS}
      num_classes = npz["num_classes"] if "num_classes" in npz.files else None
  except JaxmemError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # pickled objects, truncated file
    raise JaxmemError(f"cannot read {path!r} as .npz: {_one_line(e)}") from e
  if num_classes is not None:
    if num_classes.shape != () or not np.issubdtype(num_classes.dtype, np.integer):
      raise JaxmemError(f"num_classes in {path!r} must be an integer scalar, got "
                        f"{num_classes.dtype} {num_classes.shape}")
    num_classes = int(num_classes)
  return from_arrays(path, num_classes=num_classes, **arrays)


# ---------------------------------------------------------------------------------------------
# TFDS through array_record data sources (no TensorFlow).


def _tfds_data_dir(data_dir) -> str:
  """The directory TFDS will read: ``data_dir``, else ``$TFDS_DATA_DIR``, else its default."""
  if data_dir is not None:
    return os.path.expanduser(os.fspath(data_dir))
  return os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"),
                                                      "tensorflow_datasets"))


def _is_tfds_name(name: str, data_dir) -> bool:
  """Whether a bare ``name`` means a TFDS dataset: in the catalogue, or prepared in data_dir.

  Only reached for names that are not registered, so the TFDS import (slow) is paid only then.
  Community datasets are excluded: listing them refreshes an index over the network.
  """
  base = name.split(":")[0].split("/")[0]
  if os.path.isdir(os.path.join(_tfds_data_dir(data_dir), base)):
    return True
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return base in tfds.list_builders(with_community_datasets=False)


def _load_tfds(tfds_name: str, *, name: str, data_dir, download: bool) -> Dataset:
  """Loads the train and test splits of a TFDS image-classification dataset into memory.

  Uses ``tfds.data_source`` (random access over array_record files, decoded with numpy/PIL)
  because ``tfds.load`` needs TensorFlow. Checks ``is_prepared`` first: without it, a missing
  dataset surfaces as a confusing file-format error, or, with ``download=True`` offline, a hang.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise JaxmemError(f"dataset {name!r} needs tensorflow_datasets: pip install "
                      f"tensorflow-datasets array_record") from e
  root = _tfds_data_dir(data_dir)
  try:
    with _quiet_absl():  # TFDS logs a WARNING for a missing folder before the error said below
      builder = tfds.builder(tfds_name, data_dir=root)
  except Exception as e:  # DatasetNotFoundError and friends; TFDS messages are multi-line.
    raise JaxmemError(f"unknown TFDS dataset {tfds_name!r} (not a TFDS builder and not prepared "
                      f"in {root}): {_one_line(e)}") from e
  if not builder.is_prepared():
    if not download:
      raise JaxmemError(
          f"dataset {tfds_name!r} is not prepared in {root}; prepare it on a machine with "
          f"internet: python -c \"import tensorflow_datasets as tfds; "
          f"tfds.data_source('{tfds_name}', data_dir='{root}', download=True)\" and copy the "
          f"folder here (or pass its location with --data-dir)")
    try:
      tfds.data_source(tfds_name, split="train", data_dir=root, download=True)
    except Exception as e:
      raise JaxmemError(f"downloading TFDS dataset {tfds_name!r} into {root} failed: "
                        f"{_one_line(e)}") from e
    builder = tfds.builder(tfds_name, data_dir=root)
  file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if "array_record" not in file_format and "parquet" not in file_format:
    raise JaxmemError(f"dataset {tfds_name!r} in {builder.data_dir} is stored as {file_format}, "
                      f"which needs TensorFlow to read; prepare it again with "
                      f"file_format='array_record' (tfds.data_source does) in another data_dir")
  splits = sorted(builder.info.splits.keys())
  if "train" not in splits or not {"test", "validation"} & set(splits):
    raise JaxmemError(f"dataset {tfds_name!r} needs a 'train' and a 'test' (or 'validation') "
                      f"split; it has: {', '.join(splits)}")
  test_split = "test" if "test" in splits else "validation"
  features = builder.info.features
  text_keys = [k for k, f in features.items() if type(f).__name__ == "Text"]
  if text_keys and "image" not in features and _TFDS_TEXT_LOADERS:
    source_of = lambda split: tfds.data_source(tfds_name, split=split, data_dir=root, download=False)
    return _TFDS_TEXT_LOADERS[0](source_of, name=name, text_key=text_keys[0], splits=("train", test_split))
  image_key, label_key = builder.info.supervised_keys or ("image", "label")
  if not isinstance(image_key, str) or image_key not in features or label_key not in features:
    raise JaxmemError(f"dataset {tfds_name!r} needs features 'image' and 'label' (or supervised "
                      f"keys); it has: {', '.join(sorted(features.keys()))}")
  arrays = {}
  for split, tag in (("train", "train"), (test_split, "test")):
    source = tfds.data_source(tfds_name, split=split, data_dir=root, download=False)
    arrays[f"x_{tag}"], arrays[f"y_{tag}"] = _read_source(source, image_key, label_key,
                                                          f"{tfds_name}/{split}")
  num_classes = getattr(features[label_key], "num_classes", None)
  return from_arrays(name, num_classes=num_classes, **arrays)


@contextlib.contextmanager
def _quiet_absl():
  """Within the block, absl (TFDS's logger) says only errors; its level is restored after."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _read_source(source, image_key: str, label_key: str, what: str):
  """Decodes every record of a data source into stacked (x, y) numpy arrays, in chunks."""
  n = len(source)
  get_many = getattr(source, "__getitems__", None)
  xs, ys = [], []
  for start in range(0, n, _TFDS_CHUNK):
    keys = list(range(start, min(n, start + _TFDS_CHUNK)))
    records = get_many(keys) if get_many else [source[k] for k in keys]
    try:
      xs.append(np.stack([np.asarray(r[image_key]) for r in records]))
    except ValueError as e:
      raise JaxmemError(f"images of {what} differ in shape; resize them to one shape first "
                        f"({_one_line(e)})") from e
    ys.append(np.asarray([r[label_key] for r in records]))
  if not xs:
    return np.zeros((0,), np.float32), np.zeros((0,), np.int32)
  return np.concatenate(xs), np.concatenate(ys)


def _one_line(e: BaseException) -> str:
  """First line of an exception message, for errors that must fit on one line."""
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


# The text datasets (the embedded canary corpus, .txt files, TFDS text) live in jaxmem.text, which
# builds on this module and registers its loaders here; importing it last makes every load_dataset
# caller see them, however jaxmem was imported.
from jaxmem import text as _text  # noqa: E402,F401
