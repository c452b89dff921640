"""``jaxmem study sweep --vary FIELD=v1,v2 ...``: one run recipe over variants of one or two config
fields, compared (survey section IV: how memorization changes with capacity, augmentation,
regularization, learning rate and data size).

Each variant (the product of the ``--vary`` lists) is an ordinary run (:func:`jaxmem.run.run`) in
its own directory under ``out``: resumable, and equal to ``jaxmem run`` with that config. The
comparison reads each run's records and reports, per variant, with 95% intervals:

* ``test_accuracy``: mean over models of test accuracy (Student-t interval over models);
* ``mean_memorization``, ``num_memorization_over_0.5`` and ``flipped_auroc`` (memorization's AUROC
  for finding the flipped labels, runs with label noise): percentile bootstrap over models (models
  resampled with replacement, memorization recomputed as the in−out difference of the resample);
* ``spearman_memorization``: the rank correlation of memorization between every pair of variants,
  with a percentile bootstrap over examples (resampling models instead adds estimation noise to
  both sides and biases the correlation towards 0, so its interval can miss the point estimate).

Field syntax: any :class:`jaxmem.config.RunConfig` field, ``model_options.NAME`` for a model option,
and ``subset_ratio`` for a one-ratio ``subset_ratios``. Values are JSON where they parse
(``0.5``, ``true``, ``[64,64]``) and strings otherwise; commas inside brackets do not split.

Outputs in ``out``: one run directory per variant, ``sweep.csv``, ``sweep_spearman.csv``,
``sweep.json`` and ``sweep.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxmem.config import RunConfig
from jaxmem.data import load_dataset
from jaxmem.errors import JaxmemError
from jaxmem.run import run as run_one
from jaxmem.scores import auroc
from jaxmem.scores._stats import spearman
from jaxmem.records import write_bytes_atomic, write_json_atomic
from jaxmem.studies.remove_top import interval

BOOTSTRAP_METRICS = ("mean_memorization", "num_memorization_over_0.5", "flipped_auroc")


def split_top_level(text: str) -> list[str]:
  """``"[64],[256, 256],x"`` -> ``["[64]", "[256, 256]", "x"]``: commas inside brackets do not split."""
  parts, depth, current = [], 0, ""
  for char in text:
    depth += char in "[{("
    depth -= char in "]})"
    if char == "," and depth == 0:
      parts.append(current)
      current = ""
    else:
      current += char
  parts.append(current)
  return [p.strip() for p in parts]


def parse_vary(text: str) -> tuple[str, list[Any]]:
  """``"FIELD=v1,v2"`` -> ``(FIELD, [v1, v2])``; one-line error on a malformed value."""
  field, sep, values = text.partition("=")
  field = field.strip()
  if not sep or not field or not values.strip():
    raise JaxmemError(f"--vary expects FIELD=v1,v2,... (e.g. weight_decay=0,5e-4), got {text!r}")
  parsed = []
  for value in split_top_level(values):
    if not value:
      raise JaxmemError(f"--vary {field}: empty value in {values!r}")
    try:
      parsed.append(json.loads(value))
    except json.JSONDecodeError:
      parsed.append(value)
  return field, parsed


def apply_field(config: RunConfig, field: str, value: Any) -> RunConfig:
  """``config`` with ``field`` (a RunConfig field, ``model_options.NAME`` or ``subset_ratio``) set."""
  names = {f.name for f in dataclasses.fields(RunConfig)}
  if field.startswith("model_options."):
    return config.replace(model_options={**config.model_options, field.split(".", 1)[1]: value})
  if field == "subset_ratio":
    return config.replace(subset_ratios=(value,))
  if field not in names:
    raise JaxmemError(f"--vary: unknown field {field!r}; choose a config field ({', '.join(sorted(names))}), "
                      "model_options.NAME or subset_ratio")
  return config.replace(**{field: value})


def variant_name(assignment: Sequence[tuple[str, Any]]) -> str:
  """A directory name for one variant, e.g. ``model_options.hidden_sizes=64-64__augment=true``."""
  def text(value):
    if isinstance(value, (list, tuple)):
      return "-".join(text(v) for v in value)
    return json.dumps(value) if not isinstance(value, str) else value
  return "__".join(re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{field}={text(value)}") for field, value in assignment)


def variants(base: RunConfig, vary: Sequence[str]) -> list[tuple[str, RunConfig]]:
  """(name, config) for every combination of the ``--vary`` lists (one or two fields)."""
  if not 1 <= len(vary) <= 2:
    raise JaxmemError(f"give one or two --vary FIELD=v1,v2,..., got {len(vary)}")
  parsed = [parse_vary(v) for v in vary]
  if len({field for field, _ in parsed}) != len(parsed):
    raise JaxmemError("--vary names the same field twice")
  out = []
  for values in itertools.product(*(vals for _, vals in parsed)):
    assignment = [(field, value) for (field, _), value in zip(parsed, values)]
    config = base
    for field, value in assignment:
      config = apply_field(config, field, value)
    try:
      config = RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))).validate()
    except (TypeError, ValueError) as e:
      raise JaxmemError(f"--vary {variant_name(assignment)}: {e}") from None
    out.append((variant_name(assignment), config))
  return out


def bootstrap_memorization(keep_MxN: np.ndarray, correct_MxN: np.ndarray, *, num_bootstrap: int, seed: int
                           ) -> tuple[np.ndarray, np.ndarray]:
  """Memorization (N,) and ``num_bootstrap`` resamples over models (B, N): each resample draws M
  models with replacement and takes the in−out difference of correctness over the drawn models."""
  keep = np.asarray(keep_MxN, np.float64)
  correct = np.asarray(correct_MxN, np.float64)
  m = keep.shape[0]
  weights_BxM = np.concatenate([np.ones((1, m)), np.stack(
      [np.bincount(r, minlength=m) for r in np.random.default_rng(seed).integers(0, m, (num_bootstrap, m))])
      if num_bootstrap else np.zeros((0, m))])
  with np.errstate(invalid="ignore", divide="ignore"):
    mem_BxN = (weights_BxM @ (keep * correct)) / (weights_BxM @ keep) \
        - (weights_BxM @ ((1 - keep) * correct)) / (weights_BxM @ (1 - keep))
  return mem_BxN[0], mem_BxN[1:]


def _memorization_metrics(mem_N: np.ndarray, noisy_N: np.ndarray) -> dict[str, float]:
  has_noise = noisy_N.any() and not noisy_N.all()
  return {"mean_memorization": float(np.nanmean(mem_N)),
          "num_memorization_over_0.5": float(np.sum(mem_N > 0.5)),
          "flipped_auroc": auroc(mem_N, noisy_N) if has_noise else float("nan")}


@dataclasses.dataclass
class SweepResult:
  out: Path
  rows: list[dict[str, Any]]
  spearman: dict[str, Any]
  runs: dict[str, Any]   # variant name -> RunResult
  lines: list[str]


def sweep(base: RunConfig, vary: Sequence[str], out: str | Path, *, num_bootstrap: int = 200,
          progress: bool = False, log: Callable[[str], None] = print) -> SweepResult:
  out = Path(out)
  planned = variants(base, vary)
  out.mkdir(parents=True, exist_ok=True)
  runs, rows, mems = {}, [], {}
  for name, config in planned:
    log(f"sweep: variant {name}")
    dataset = load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed, label_noise=config.label_noise)
    result = run_one(config, out / name, progress=progress, log=log, dataset=dataset)
    runs[name] = result
    records = result.records
    keep, correct = records.keep, records["train_correct"]
    noisy = dataset.noisy.astype(bool)
    mem_N, mem_BxN = bootstrap_memorization(keep, correct, num_bootstrap=num_bootstrap, seed=config.seed)
    mems[name] = (mem_N, mem_BxN)
    test_mean, _, test_low, test_high = interval(records["test_correct"].mean(axis=1))
    row: dict[str, Any] = {"variant": name, "num_models": int(keep.shape[0]), "test_accuracy": test_mean,
                           "test_accuracy_ci_low": test_low, "test_accuracy_ci_high": test_high}
    point = _memorization_metrics(mem_N, noisy)
    draws = [_memorization_metrics(mem_BxN[b], noisy) for b in range(mem_BxN.shape[0])]
    for metric in BOOTSTRAP_METRICS:
      values = np.array([d[metric] for d in draws])
      values = values[np.isfinite(values)]
      low, high = np.percentile(values, [2.5, 97.5]) if values.size else (np.nan, np.nan)
      row.update({metric: point[metric], f"{metric}_ci_low": float(low), f"{metric}_ci_high": float(high)})
    rows.append(row)
  names = [name for name, _ in planned]
  pairs = []
  for a, b in itertools.combinations(names, 2):
    mem_a, mem_b = mems[a][0], mems[b][0]
    rng = np.random.default_rng([base.seed, len(pairs)])
    draws = np.array([spearman(mem_a[idx], mem_b[idx])
                      for idx in rng.integers(0, mem_a.size, (num_bootstrap, mem_a.size))])
    draws = draws[np.isfinite(draws)]
    low, high = np.percentile(draws, [2.5, 97.5]) if draws.size else (np.nan, np.nan)
    pairs.append({"a": a, "b": b, "spearman": spearman(mems[a][0], mems[b][0]), "ci_low": float(low),
                  "ci_high": float(high)})
  correlations = {"variants": names, "pairs": pairs}
  write_bytes_atomic(out / "sweep.csv", _csv(rows).encode())
  if pairs:
    write_bytes_atomic(out / "sweep_spearman.csv", _csv(pairs).encode())
  write_json_atomic(out / "sweep.json", {"vary": list(vary), "base": base.identity(), "rows": rows,
                                         "spearman_memorization": correlations})
  plot_sweep(rows, out / "sweep.png", title=f"sweep over {', '.join(v.split('=')[0] for v in vary)}")
  return SweepResult(out, rows, correlations, runs, format_sweep(rows, pairs))


def _csv(rows: list[dict[str, Any]]) -> str:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ("" if isinstance(v, float) and not np.isfinite(v) else f"{v:.6g}" if isinstance(v, float) else v)
                     for k, v in row.items()})
  return buffer.getvalue()


def format_sweep(rows: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> list[str]:
  ci = lambda r, m, f: f"{f.format(r[m])} [{f.format(r[m + '_ci_low'])}, {f.format(r[m + '_ci_high'])}]"
  lines = [f"sweep {r['variant']}: test accuracy {ci(r, 'test_accuracy', '{:.3f}')}, mean memorization "
           f"{ci(r, 'mean_memorization', '{:.4f}')}, memorization > 0.5: {ci(r, 'num_memorization_over_0.5', '{:.0f}')}"
           + (f", flipped AUROC {ci(r, 'flipped_auroc', '{:.3f}')}" if np.isfinite(r["flipped_auroc"]) else "")
           for r in rows]
  lines += [f"sweep spearman(memorization) {p['a']} vs {p['b']}: {p['spearman']:.3f} [{p['ci_low']:.3f}, {p['ci_high']:.3f}]"
            for p in pairs]
  return lines


def plot_sweep(rows: list[dict[str, Any]], path: Path, *, title: str = "") -> None:
  """One panel per metric, one bar per variant, 95% intervals."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  metrics = ["test_accuracy", *BOOTSTRAP_METRICS]
  fig = Figure(figsize=(3.2 * len(metrics), 3.8), layout="constrained")
  FigureCanvasAgg(fig)
  x = np.arange(len(rows))
  for i, metric in enumerate(metrics):
    ax = fig.add_subplot(1, len(metrics), i + 1)
    value = np.array([r[metric] for r in rows], np.float64)
    err = np.array([[r[metric] - r[f"{metric}_ci_low"], r[f"{metric}_ci_high"] - r[metric]] for r in rows]).T
    # A percentile bootstrap interval need not contain the point estimate (a count over a skewed
    # resample distribution); the bar then shows the interval's near end at the point.
    ax.bar(x, np.nan_to_num(value), yerr=np.maximum(np.nan_to_num(err), 0), capsize=3)
    ax.set_xticks(x, [r["variant"].replace("__", "\n") for r in rows], fontsize=7, rotation=20)
    ax.set_title(metric, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
  fig.suptitle(title, fontsize=9)
  fig.savefig(path, dpi=110)
