"""Run configuration: one frozen dataclass, configs as code.

A :class:`RunConfig` fully determines a run's results (with the dataset content, whose fingerprint
the manifest stores). Fields listed in :data:`EXECUTION_FIELDS` change only how a run executes, not
what it computes, so a run directory may be resumed with different values for them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import traceback
from pathlib import Path
from typing import Any

from jaxmem.errors import JaxmemError

#: Fields that do not change results (up to float tolerance): allowed to differ on resume.
EXECUTION_FIELDS = frozenset({"strategy", "data_dir", "checkpoint_every", "keep_params", "keep_params_epochs",
                              "target_se", "device_memory_gib"})
#: Fields that say how far a run goes, not what each model is: model m depends only on (seed, m)
#: (its mask row and its key), so a run directory may be rerun with a larger ``num_models`` to add
#: models (never a smaller one; see :func:`jaxmem.run.run`).
GROWTH_FIELDS = frozenset({"num_models"})

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "linear")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything that defines a memorization run.

  Defaults: the embedded digits data and an MLP that fits each 70% subset to 100% training
  accuracy (the Feldman & Zhang estimator presumes models that fit their training set: a model
  that cannot fit a flipped label cannot memorize it; a 128-128 MLP fits only half of 10% flipped
  digits labels in 30 epochs, 256-256 fits 97%+), with 256 models (about 77 held-out models per
  example, so a standard error of at most ~0.06), in about 1-1.5 minutes on a 2-core CPU.
  """

  dataset: str = "digits"
  data_dir: str | None = None
  label_noise: float = 0.0
  model: str = "mlp"
  model_options: dict[str, Any] = dataclasses.field(default_factory=dict)
  # The dtype models compute in: "float32", or "bfloat16" (bf16 inputs, activations and matmuls with
  # float32 parameters, gradients and optimizer state, and float32 logits, margins and loss; for
  # GPUs and TPUs). It changes results, so it is part of a run's identity.
  compute_dtype: str = "float32"
  num_models: int = 256
  subset_ratios: tuple[float, ...] = (0.7,)
  mask_design: str = "subset"
  epochs: int = 30
  batch_size: int = 64
  optimizer: str = "adam"
  learning_rate: float = 3e-3
  schedule: str = "cosine"
  warmup_epochs: int = 0
  momentum: float = 0.9
  weight_decay: float = 0.0
  augment: bool = False
  # LiRA queries recorded per example (1, 2 = with horizontal flip, 18 = 2 flips x 3x3 shifts;
  # images only): train_margin_aug / test_margin_aug (M, N, A) when > 1.
  queries: int = 1
  seed: int = 0
  chunk_size: int = 64
  strategy: str = "auto"
  # Anytime stopping (execution only: model m is the same whenever training stops, so a run may be
  # resumed with another target or none to add chunks): stop adding chunks once the median
  # standard error of memorization over the finished models is below this (None: train all).
  target_se: float | None = None
  # Learning dynamics (jaxmem.scores.dynamics): per-epoch correctness on every training example
  # (bit-packed), optionally per-epoch margins, and EL2N/GraNd after `score_epoch` epochs (None: off).
  record_epochs: bool = False
  record_epoch_margin: bool = False
  score_epoch: int | None = None
  # Execution only (results do not depend on them): save the chunk in progress with orbax at the
  # first host-call boundary `checkpoint_every` epochs after the last save (0: only on SIGTERM/
  # SIGINT); keep final parameters of "none", "all" or the first N model ids (a string, e.g. "8").
  checkpoint_every: int = 10
  keep_params: str = "none"
  # Execution only: memory per device in GiB that programs may use, for devices that do not report
  # it (CPUs); None: the device's own limit where it reports one. With a known memory, ``auto``
  # keeps only strategies whose training and evaluation fit, and evaluation batches shrink to fit.
  device_memory_gib: float | None = None
  # Also keep the parameters of those models after these epochs (0: at initialization), e.g. for
  # layer rewinding; the final epoch's are the kept parameters themselves.
  keep_params_epochs: tuple[int, ...] = ()

  def __post_init__(self):
    # Normalize containers so that configs from JSON (lists) and from code (tuples) compare equal.
    # Values of the wrong kind (e.g. from a JSON file) are left for validate() to name.
    ratios = self.subset_ratios
    if isinstance(ratios, (list, tuple)) and all(_is_number(r) for r in ratios):
      object.__setattr__(self, "subset_ratios", tuple(float(r) for r in ratios))
    if isinstance(self.keep_params_epochs, (list, tuple)):
      object.__setattr__(self, "keep_params_epochs", tuple(self.keep_params_epochs))
    if isinstance(self.model_options, dict):
      object.__setattr__(self, "model_options", dict(self.model_options))

  def replace(self, **changes) -> "RunConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["subset_ratios"] = list(self.subset_ratios)
    d["keep_params_epochs"] = list(self.keep_params_epochs)
    return d

  def identity(self) -> dict[str, Any]:
    """The fields that determine each model's results, in JSON form (tuples as lists) so that a
    config compares equal to the one stored in a manifest: a run directory is tied to these. The
    number of models is not among them (a run may grow)."""
    return json.loads(json.dumps({k: v for k, v in self.to_dict().items()
                                  if k not in EXECUTION_FIELDS | GROWTH_FIELDS}))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(d) - names))
    if unknown:
      raise JaxmemError(f"unknown config field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(names))}")
    return cls(**d)

  def validate(self) -> "RunConfig":
    """Checks that need no dataset; raises a one-line :class:`JaxmemError`."""
    self._check_kinds()
    from jaxmem.masks import MASK_DESIGNS
    from jaxmem.models import MODELS, check_compute_dtype
    MODELS.get(self.model)
    check_compute_dtype(self.compute_dtype)
    MASK_DESIGNS.get(self.mask_design)
    _check(isinstance(self.num_models, int) and self.num_models >= 2,
           f"num_models must be an integer >= 2, got {self.num_models!r}")
    _check(0 <= self.seed < 2**32, f"seed must be an integer in [0, 2**32), got {self.seed!r}")
    _check(len(self.subset_ratios) >= 1, "subset_ratios must name at least one ratio")
    for r in self.subset_ratios:
      _check(0.0 < r < 1.0 and math.isfinite(r), f"subset ratio must be in (0, 1), got {r!r}")
    _check(len(set(self.subset_ratios)) == len(self.subset_ratios),
           f"subset_ratios has duplicates: {list(self.subset_ratios)}")
    _check(self.num_models >= 2 * len(self.subset_ratios),
           f"num_models={self.num_models} is too few for {len(self.subset_ratios)} subset ratios; "
           "need at least 2 models per ratio")
    if self.mask_design == "balanced":
      _check(self.subset_ratios == (0.5,),
             f"mask design 'balanced' puts each example in half the models; subset ratio must be 0.5, got {list(self.subset_ratios)}")
      _check(self.num_models % 2 == 0, f"mask design 'balanced' needs an even num_models, got {self.num_models}")
    _check(isinstance(self.epochs, int) and self.epochs > 0, f"epochs must be a positive integer, got {self.epochs!r}")
    _check(isinstance(self.batch_size, int) and self.batch_size > 0,
           f"batch_size must be a positive integer, got {self.batch_size!r}")
    _check(isinstance(self.chunk_size, int) and self.chunk_size > 0,
           f"chunk_size must be a positive integer, got {self.chunk_size!r}")
    _check(0.0 <= self.label_noise < 1.0, f"label_noise must be in [0, 1), got {self.label_noise!r}")
    _check(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    _check(self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    _check(self.learning_rate > 0 and math.isfinite(self.learning_rate),
           f"learning_rate must be positive, got {self.learning_rate!r}")
    _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
    _check(0 <= self.warmup_epochs < self.epochs,
           f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs!r}")
    _check(self.score_epoch is None or (isinstance(self.score_epoch, int) and 0 <= self.score_epoch <= self.epochs),
           f"score_epoch must be an integer in [0, epochs={self.epochs}] (0: at initialization), got {self.score_epoch!r}")
    _check(self.record_epochs or not self.record_epoch_margin,
           "record_epoch_margin needs record_epochs (per-epoch margins are recorded with per-epoch correctness)")
    _check(self.queries in (1, 2, 18) and not isinstance(self.queries, bool),
           f"queries must be 1, 2 (with horizontal flip) or 18 (2 flips x 3x3 shifts), got {self.queries!r}")
    from jaxmem.engine.lift import parse_strategy
    parse_strategy(self.strategy)
    _check(self.target_se is None or (isinstance(self.target_se, (int, float)) and 0 < self.target_se < 1),
           f"target_se must be in (0, 1) (a standard error of memorization), got {self.target_se!r}")
    _check(isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0,
           f"checkpoint_every must be an integer >= 0 (epochs; 0: only on a signal), got {self.checkpoint_every!r}")
    _check(str(self.keep_params) in ("none", "all") or str(self.keep_params).isdigit(),
           f"keep_params must be 'none', 'all' or a number of models, got {self.keep_params!r}")
    _check(self.device_memory_gib is None or (isinstance(self.device_memory_gib, (int, float))
                                              and 0 < self.device_memory_gib < math.inf),
           f"device_memory_gib must be a positive number of GiB, got {self.device_memory_gib!r}")
    _check(all(isinstance(e, int) and 0 <= e < self.epochs for e in self.keep_params_epochs),
           f"keep_params_epochs must be epochs in 0..{self.epochs - 1} (the final parameters are kept by "
           f"keep_params), got {list(self.keep_params_epochs)}")
    _check(not self.keep_params_epochs or str(self.keep_params) != "none",
           "keep_params_epochs needs keep_params (all or a number of models) to say whose parameters to keep")
    return self

  def _check_kinds(self) -> None:
    """Each field holds the kind of value its default has (a JSON or Python config file may give a
    string where a number belongs), before any check compares values."""
    optional = {"score_epoch": int, "target_se": float, "data_dir": str, "device_memory_gib": float}  # may be None
    positive = ("epochs", "batch_size", "chunk_size", "num_models")
    for field in dataclasses.fields(self):
      name, value = field.name, getattr(self, field.name)
      kind = optional.get(name, type(field.default))
      if name == "subset_ratios":
        ok, wanted = isinstance(value, tuple) and all(_is_number(r) for r in value), "a list of numbers"
      elif name == "model_options":
        ok, wanted = isinstance(value, dict), "a dict of model options"
      elif name == "keep_params_epochs":
        ok, wanted = isinstance(value, tuple) and all(isinstance(e, int) and not isinstance(e, bool) for e in value), (
            "a list of epochs")
      elif name == "keep_params":
        ok, wanted = isinstance(value, (str, int)) and not isinstance(value, bool), "'none', 'all' or a number of models"
      elif name in optional and value is None:
        ok, wanted = True, ""
      elif kind is bool:
        ok, wanted = isinstance(value, bool), "true or false"
      elif kind is int:
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), (
            "a positive integer" if name in positive else "an integer")
      elif kind is float:
        ok, wanted = _is_number(value), "a number"
      else:
        ok, wanted = isinstance(value, str), "a string"
      _check(ok, f"{name} must be {wanted}, got {value!r}")


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_kind(value: Any) -> str:
  return {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
          type(None): "null"}.get(type(value), type(value).__name__)


def _run_config_module(path: Path) -> Any:
  """Executes a Python config file and returns its ``get_config()`` or ``CONFIG``. The file is the
  user's code: whatever it raises becomes one line naming the file, the error and its line."""
  spec = importlib.util.spec_from_file_location(f"jaxmem_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if hasattr(module, "get_config"):
      return module.get_config()
    if hasattr(module, "CONFIG"):
      return module.CONFIG
  except SyntaxError as e:
    raise JaxmemError(f"config file {str(path)!r} has a syntax error at line {e.lineno}: {e.msg}") from None
  except JaxmemError:
    raise
  except Exception as e:  # the user's code may raise anything; the line in their file says where
    frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == path]
    where = f" (line {frames[-1].lineno})" if frames else ""
    first = (str(e).strip().splitlines() or [""])[0]
    raise JaxmemError(f"running config file {str(path)!r} failed: {type(e).__name__}: {first}{where}") from None
  raise JaxmemError(f"config file {str(path)!r} defines neither get_config() nor CONFIG")


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise JaxmemError(message)


def load_config_file(path: str | Path) -> RunConfig:
  """Read a config: a Python file (configs as code) defining ``CONFIG`` or ``get_config()``,
  or a JSON file of RunConfig fields."""
  path = Path(path)
  if not path.is_file():
    raise JaxmemError(f"config file {str(path)!r} does not exist")
  if path.suffix == ".json":
    try:
      loaded = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise JaxmemError(f"config file {str(path)!r} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
      raise JaxmemError(f"cannot read config file {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(loaded, dict):
      raise JaxmemError(f"config file {str(path)!r} must hold a JSON object of RunConfig fields, "
                        f"got a {_json_kind(loaded)}")
    return RunConfig.from_dict(loaded)
  if path.suffix != ".py":
    raise JaxmemError(f"config file {str(path)!r} must end in .py or .json")
  config = _run_config_module(path)
  if isinstance(config, dict):
    config = RunConfig.from_dict(config)
  if not isinstance(config, RunConfig):
    raise JaxmemError(f"config file {str(path)!r} must produce a RunConfig, got {type(config).__name__}")
  return config
