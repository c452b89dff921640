"""Privacy onion study (Carlini, Jagielski, Zhang, Papernot, Terzis, Tramèr 2022, "The Privacy Onion
Effect: Memorization is Relative", NeurIPS): remove the examples most exposed to membership
inference, retrain, attack again — a new layer of previously safe examples becomes exposed.

Procedure (their §3, on jaxmem's subset models):

1. Exposure of every training example in the source run: ``lira_online``, the per-example AUC of
   online LiRA over all models as targets (:func:`jaxmem.scores.lira.per_example_risk`).
2. For each k: remove the k most exposed examples (ties at AUC 1 broken by the mean log-ratio gap),
   train a fresh set of subset models with the run's recipe on the rest (``jaxmem.run`` with an
   explicit smaller dataset, in ``OUT/runs/k<k>``; resumable), and compute the exposure again.
3. Report, among the remaining examples, how many were *safe* before (``lira_online < threshold``)
   and are *exposed* after (``>= threshold``), and the reverse.
4. Control (on by default): remove k *random* examples instead and do the same. Retraining alone
   moves per-example AUCs (new masks, new models), so the onion effect is the difference between
   the top-k removal and the random control, not the raw count.

Differences from the paper: the paper trains full-size models on CIFAR-10 with balanced (50%)
membership and measures exposure by TPR at low FPR per example; we reuse the run's own subset
design and ratio and use the per-example AUC over all models, which is resolved with a few hundred
models. The test set is unchanged.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxmem.config import RunConfig
from jaxmem.data import Dataset, load_run_dataset, training_subset
from jaxmem.errors import JaxmemError
from jaxmem.scores.lira import as_queries, per_example_risk, select_margins
from jaxmem.records import RunDir, make_dirs, write_bytes_atomic, write_json_atomic

RANDOM_TAG = 0x0410  # separates the control's draw from the models' seed stream


@dataclasses.dataclass
class OnionPoint:
  removal: str                  # "top" (most exposed) or "random" (control)
  k: int
  num_train: int                # examples left
  safe_before: int              # remaining examples with risk < threshold in the source run
  became_exposed: int           # ... of them with risk >= threshold after retraining
  exposed_before: int
  became_safe: int
  mean_risk_before: float       # over remaining examples with both values
  mean_risk_after: float
  run_dir: str
  undefined_after: int = 0      # remaining examples scored before but with no risk after retraining
                                # (too few retrained models with or without them); not in the counts

  @property
  def became_exposed_fraction(self) -> float:
    return self.became_exposed / self.safe_before if self.safe_before else float("nan")


@dataclasses.dataclass
class OnionResult:
  out: Path
  threshold: float
  points: list[OnionPoint]
  risk_before: np.ndarray       # (N,) source run's lira_online
  risk_after: dict[str, np.ndarray]  # "top-k<k>" / "random-k<k>" -> (N,) with NaN for removed examples
  table: Path


def exposure_order(risk: np.ndarray, gap: np.ndarray) -> np.ndarray:
  """Indices from most to least exposed: risk descending, ties by the log-ratio gap; NaN last."""
  return np.lexsort((-np.nan_to_num(gap, nan=-np.inf), -np.nan_to_num(risk, nan=-np.inf)))


def onion(run_dir: str | Path, out: str | Path, *, ks: Sequence[int] = (50,), num_models: int | None = None,
          epochs: int | None = None, seed: int | None = None, threshold: float = 0.8, control: bool = True,
          dataset: Dataset | None = None, data_dir: str | None = None, center: str = "mean",
          min_models: int = 2, progress: bool = False, log: Callable[[str], None] = print) -> OnionResult:
  """Runs the onion study on the run in ``run_dir``; writes ``onion.csv`` and ``onion.json`` to ``out``.

  Args:
    ks: numbers of most exposed examples to remove (each a separate retraining).
    num_models, epochs, seed: of the retrained models (default: the run's).
    threshold: an example is exposed when its ``lira_online`` (per-example attack AUC) is at least this.
    control: also remove k random examples and retrain (the baseline for retraining noise).
    dataset: the run's dataset if the caller has it; otherwise loaded again from the manifest.
  """
  from jaxmem.run import run as run_models
  source = RunDir.open(run_dir)
  manifest = source.manifest()
  base = RunConfig.from_dict(manifest["config"])
  records = source.load_records()
  n = records.num_train
  ks = sorted({int(k) for k in ks})
  if not ks or ks[0] < 1 or ks[-1] >= n:
    raise JaxmemError(f"k values must be integers in [1, {n - 1}], got {list(ks)}")
  if not 0.5 < threshold <= 1.0:
    raise JaxmemError(f"threshold must be in (0.5, 1] (a per-example attack AUC), got {threshold!r}")
  if dataset is None:
    dataset = load_run_dataset(manifest, data_dir=data_dir)
  elif dataset.fingerprint != manifest["dataset"]["fingerprint"]:
    raise JaxmemError("the dataset given differs from the run's (fingerprint mismatch)")
  margin = as_queries(select_margins(records))
  before = per_example_risk(margin, records.keep, center=center, min_models=min_models, with_gap=True)
  risk_before = before["lira_online"]
  order = exposure_order(risk_before, before["online_gap"])
  seed = base.seed if seed is None else int(seed)
  models = base.num_models if num_models is None else int(num_models)
  config = base.replace(num_models=models, chunk_size=min(base.chunk_size, models), seed=seed,
                        epochs=base.epochs if epochs is None else int(epochs)).validate()
  random_order = np.random.default_rng([seed, RANDOM_TAG]).permutation(n)

  out = make_dirs(Path(out), "study directory")
  (out / "runs").mkdir(exist_ok=True)
  points, risk_after = [], {}
  removals = [("top", order)] + ([("random", random_order)] if control else [])
  for k in ks:
    for removal, ranking in removals:
      removed = np.sort(ranking[:k])
      kept = np.setdiff1d(np.arange(n), removed)
      name = f"{removal}-k{k}"
      smaller = training_subset(dataset, kept, f"{dataset.name} without {k} {'most exposed' if removal == 'top' else 'random'}")
      log(f"onion: removing {k} {'most exposed' if removal == 'top' else 'random'} examples; "
          f"training {config.num_models} models on {smaller.num_train}")
      result = run_models(config, out / "runs" / name, dataset=smaller, progress=progress, log=log,
                          estimators=["memorization"])
      after_small = per_example_risk(as_queries(select_margins(result.records)), result.records.keep,
                                     center=center, min_models=min_models)["lira_online"]
      after = np.full(n, np.nan)
      after[kept] = after_small
      risk_after[name] = after
      points.append(_point(removal, k, kept, risk_before, after, threshold, str(out / "runs" / name)))

  table = out / "onion.csv"
  write_bytes_atomic(table, _table_csv(risk_before, risk_after, dataset).encode())
  write_json_atomic(out / "onion.json", {
      "source_run": str(source.path), "config": config.to_dict(), "ks": ks, "threshold": threshold,
      "control": control, "exposure": "lira_online: per-example online LiRA AUC over all models as targets",
      "points": [{**dataclasses.asdict(p), "became_exposed_fraction": p.became_exposed_fraction} for p in points],
      "removed_top": order[: ks[-1]].tolist()})
  return OnionResult(out, threshold, points, risk_before, risk_after, table)


def _point(removal: str, k: int, kept: np.ndarray, before: np.ndarray, after: np.ndarray, threshold: float,
           run_dir: str) -> OnionPoint:
  b, a = before[kept], after[kept]
  both = ~np.isnan(b) & ~np.isnan(a)
  safe, exposed = both & (b < threshold), both & (b >= threshold)
  return OnionPoint(
      removal, k, int(kept.size), int(safe.sum()), int((safe & (a >= threshold)).sum()), int(exposed.sum()),
      int((exposed & (a < threshold)).sum()), float(b[both].mean()) if both.any() else float("nan"),
      float(a[both].mean()) if both.any() else float("nan"), run_dir,
      undefined_after=int((~np.isnan(b) & np.isnan(a)).sum()))


def _table_csv(before: np.ndarray, after: dict[str, np.ndarray], dataset: Dataset) -> str:
  """One row per original training example: index, label, noisy, risk before, risk after each removal
  (empty where the example was removed or could not be scored)."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(["index", "label", "noisy", "lira_online_before"] + [f"lira_online_{name}" for name in after])
  cell = lambda v: "" if np.isnan(v) else f"{v:.6g}"
  for i in range(before.size):
    writer.writerow([i, int(dataset.y_train[i]), int(dataset.noisy[i]), cell(before[i])]
                    + [cell(values[i]) for values in after.values()])
  return buffer.getvalue()


def format_onion(result: OnionResult) -> list[str]:
  lines = [f"privacy onion: exposed = lira_online >= {result.threshold:g}; counts among the examples left"]
  lines.append("  removal    k   left  safe before  became exposed        exposed before  became safe  mean risk before -> after")
  for p in result.points:
    lines.append(f"  {p.removal:<7} {p.k:>4} {p.num_train:>6} {p.safe_before:>12} {p.became_exposed:>8} "
                 f"({100 * p.became_exposed_fraction:5.1f}%) {p.exposed_before:>15} {p.became_safe:>12}  "
                 f"{p.mean_risk_before:.3f} -> {p.mean_risk_after:.3f}")
  for p in result.points:
    if p.undefined_after:
      lines.append(f"  {p.removal} k={p.k}: {p.undefined_after} of the {p.num_train} examples left have no risk after "
                   f"retraining (too few retrained models with or without them) and are not counted above; "
                   "retrain more models (--num-models) to score them")
  return lines
