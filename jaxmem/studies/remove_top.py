"""Long-tail study: remove the top-k training examples by a score, retrain, measure test accuracy.

Feldman & Zhang (2020, "What Neural Networks Memorize and Why", Sec. 3.3 and Fig. 3) remove the
training examples whose memorization estimate exceeds a threshold, retrain on the rest, and compare
the test accuracy with removing the same number of random examples: if memorized examples carried
no information about the test distribution (only noise and outliers), removing them would cost
nothing; they found it costs more than removing random ones — the long tail is useful.

What this implementation does, and what differs from the paper:

* Rankings: any per-example column of the run's ``scores.csv`` or ``random`` (the control). "Top"
  means most memorized / least typical: descending for memorization, forgetting events and most
  scores; ascending for ``cscore`` (and ``cscore_at_*``, ``learning_speed``), where a low value
  marks the hard, atypical examples (Jiang et al. 2021). NaN ranks last. Removal sets are nested
  prefixes of one ranking. ``random`` is one permutation drawn from ``seed`` (one draw per k, also
  nested).
* Retraining: every point (score, k) is a fresh :func:`jaxmem.run` on the remaining examples, with
  the source run's model and training recipe, ``num_models`` models, trained on random subsets of
  ratio ``subset_ratio`` of what remains (default: the source run's ratio). The paper trains on the
  whole remaining set; we keep subset models because they are the algorithm A whose memorization
  was estimated (mem is defined for A at ratio r), and because it reuses the resumable, sharded
  engine. Pass ``subset_ratio=0.99`` to approximate full-data training. With r < 1 each model sees
  only a fraction r of the removed examples' neighbours, so effects are somewhat attenuated
  compared with full-data training.
* Intervals: per point, the mean over models of each model's test accuracy, with a 95% Student-t
  interval over models. All points use the same ``seed``, so model m has the same initialization
  key everywhere (common random numbers make the differences between points less noisy). The
  interval covers training randomness (subset, initialization, batch order) for the removed set
  actually drawn; it does not include the variability of the random control's draw.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxmem.config import RunConfig
from jaxmem.data import Dataset, load_run_dataset, training_subset
from jaxmem.errors import JaxmemError
from jaxmem.scoring import SCORES_CSV, read_scores_csv
from jaxmem.records import RunDir, make_dirs, write_bytes_atomic, write_json_atomic

# Scores for which a LOW value marks the examples to remove first (hard / atypical).
ASCENDING = ("cscore", "learning_speed", "cumulative_accuracy")
# Not scores: bookkeeping columns of scores.csv that make no sense as a ranking.
NOT_SCORES = ("index", "label", "clean_label", "n_in", "n_out")
RANDOM_SEED_TAG = 0x7E30


@dataclasses.dataclass
class Point:
  by: str
  k: int
  num_train: int
  num_models: int
  test_accuracy: float          # mean over models of the per-model test accuracy
  test_accuracy_se: float       # standard error over models
  ci_low: float                 # 95% Student-t interval over models
  ci_high: float
  removed_noisy: int            # how many removed examples had flipped labels
  run_dir: str


@dataclasses.dataclass
class RemoveTopResult:
  out: Path
  points: list[Point]
  plot: Path
  table: Path


def removal_order(scores: dict[str, np.ndarray], by: str, seed: int) -> np.ndarray:
  """Training indices in removal order (first = removed first) for ranking ``by``."""
  n = len(scores["index"])
  if by == "random":
    return np.random.default_rng([int(seed), RANDOM_SEED_TAG]).permutation(n)
  usable = sorted(c for c in scores if c not in NOT_SCORES and not c.endswith(("_se", "_ci_low", "_ci_high")))
  if by not in scores or by in NOT_SCORES:
    raise JaxmemError(f"unknown ranking {by!r}; choose random or a score column of {SCORES_CSV}: {', '.join(usable)}")
  values = scores[by].astype(float)
  if not np.isfinite(values).any():
    raise JaxmemError(f"score {by!r} has no values in {SCORES_CSV}; choose one of: random, {', '.join(usable)}")
  ascending = by in ASCENDING or by.startswith("cscore_at_")
  key = np.where(np.isnan(values), np.inf, values if ascending else -values)
  return np.argsort(key, kind="stable")


def without(dataset: Dataset, removed: np.ndarray, name: str) -> Dataset:
  """``dataset`` without the training examples ``removed`` (order of the rest kept; test set intact)."""
  keep = np.ones(dataset.num_train, bool)
  keep[removed] = False
  return training_subset(dataset, np.flatnonzero(keep), name)


def interval(per_model: np.ndarray) -> tuple[float, float, float, float]:
  """Mean, standard error and 95% Student-t interval of per-model values."""
  from scipy.stats import t
  m = len(per_model)
  mean = float(np.mean(per_model))
  se = float(np.std(per_model, ddof=1) / math.sqrt(m)) if m > 1 else float("nan")
  half = float(t.ppf(0.975, m - 1)) * se if m > 1 else float("nan")
  return mean, se, mean - half, mean + half


def remove_top(run_dir: str | Path, out: str | Path, *, ks: Sequence[int], by: Sequence[str] = ("memorization", "random"),
               num_models: int = 64, subset_ratio: float | None = None, epochs: int | None = None,
               seed: int | None = None, dataset: Dataset | None = None, data_dir: str | None = None,
               progress: bool = False, log: Callable[[str], None] = print) -> RemoveTopResult:
  """Runs the remove-top-k study on the run in ``run_dir``; writes its table, json and plot to ``out``.

  Every (score, k) point trains in its own run directory ``out/runs/<score>-k<k>`` (``k0`` is
  shared), so an interrupted study resumes where it stopped.

  Args:
    run_dir: a scored run; its ``scores.csv`` gives the rankings and its manifest the recipe.
    out: study directory.
    ks: numbers of examples to remove (0 adds the baseline).
    by: rankings: score columns of ``scores.csv`` and/or ``random``.
    num_models: models per point.
    subset_ratio: training ratio of the retrained models (default: the run's ratio; 0.7 when the
      run had several).
    epochs, seed: override the run's (the seed also draws the random control).
    dataset: the run's dataset, if the caller has it; otherwise reloaded from the manifest and
      checked against its fingerprint.
  """
  from jaxmem.run import run as run_models
  source = RunDir.open(run_dir)
  manifest = source.manifest()
  if not (source.path / SCORES_CSV).is_file():
    raise JaxmemError(f"run directory {str(source.path)!r} has no {SCORES_CSV}; run `jaxmem scores {source.path}` first")
  scores = read_scores_csv(source.path / SCORES_CSV)
  base = RunConfig.from_dict(manifest["config"])
  ks = sorted({int(k) for k in ks})
  by = list(dict.fromkeys(by))
  if not ks or ks[0] < 0:
    raise JaxmemError(f"k values must be non-negative integers, got {ks}")
  if not by:
    raise JaxmemError("name at least one ranking (e.g. memorization,random)")
  n = len(scores["index"])
  if ks[-1] >= n:
    raise JaxmemError(f"k={ks[-1]} removes the whole training set of {n} examples; use k < {n}")
  seed = base.seed if seed is None else seed
  orders = {b: removal_order(scores, b, seed) for b in by}
  if dataset is None:
    dataset = load_run_dataset(manifest, data_dir=data_dir)
  elif dataset.fingerprint != manifest["dataset"]["fingerprint"]:
    raise JaxmemError("the dataset given differs from the run's (fingerprint mismatch)")
  if subset_ratio is None:
    subset_ratio = base.subset_ratios[0] if len(base.subset_ratios) == 1 else 0.7
  config = base.replace(num_models=int(num_models), subset_ratios=(float(subset_ratio),), mask_design="subset",
                        chunk_size=min(base.chunk_size, int(num_models)), seed=int(seed),
                        epochs=base.epochs if epochs is None else int(epochs)).validate()

  out = make_dirs(Path(out), "study directory")
  (out / "runs").mkdir(exist_ok=True)
  cache: dict[int, Point] = {}  # k=0 is one run whatever the ranking
  points = []
  for b in by:
    for k in ks:
      if k == 0 and 0 in cache:
        points.append(dataclasses.replace(cache[0], by=b))
        continue
      removed = orders[b][:k]
      name = "k0" if k == 0 else f"{b}-k{k}"
      smaller = without(dataset, removed, f"{dataset.name} without top {k} by {b}")
      log(f"remove-top: {b}, k={k}: training {config.num_models} models on {smaller.num_train} examples")
      result = run_models(config, out / "runs" / name, dataset=smaller, progress=progress, log=log,
                          estimators=["memorization"])
      per_model = result.records["test_correct"].mean(axis=1)
      mean, se, low, high = interval(per_model)
      point = Point(b, k, smaller.num_train, len(per_model), mean, se, low, high,
                    int(dataset.noisy[removed].sum()), str(out / "runs" / name))
      if k == 0:
        cache[0] = point
      points.append(point)

  table = out / "remove_top.csv"
  write_bytes_atomic(table, points_csv(points).encode())
  write_json_atomic(out / "remove_top.json", {
      "source_run": str(source.path), "config": config.to_dict(), "ks": ks, "by": by,
      "points": [dataclasses.asdict(p) for p in points],
      "removal_order": {b: orders[b][: ks[-1]].tolist() for b in by}})
  plot = out / "remove_top.png"
  plot_points(points, plot, title=f"{manifest['dataset']['name']}: remove the top k, retrain {config.num_models} "
                                  f"models per point (ratio {subset_ratio:g})")
  return RemoveTopResult(out, points, plot, table)


def points_csv(points: Sequence[Point]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  fields = [f.name for f in dataclasses.fields(Point)]
  writer.writerow(fields)
  for p in points:
    writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in dataclasses.astuple(p)])
  return buffer.getvalue()


def plot_points(points: Sequence[Point], path: Path, *, title: str = "") -> None:
  """Test accuracy against k, one line per ranking, with the 95% interval over models as a band."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6.5, 4), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for b in dict.fromkeys(p.by for p in points):
    mine = sorted((p for p in points if p.by == b), key=lambda p: p.k)
    k = np.array([p.k for p in mine])
    acc = np.array([p.test_accuracy for p in mine])
    line, = ax.plot(k, acc, marker="o", label=b)
    ax.fill_between(k, [p.ci_low for p in mine], [p.ci_high for p in mine], color=line.get_color(), alpha=0.2)
  ax.set_xlabel("training examples removed (k)")
  ax.set_ylabel("test accuracy (mean over models, 95% CI)")
  ax.set_title(title, fontsize=9)
  ax.legend(title="removed by")
  ax.grid(alpha=0.3)
  fig.savefig(path, dpi=110)


def load_points(out: str | Path) -> list[dict[str, Any]]:
  """The points of a finished study, from its ``remove_top.json``."""
  return json.loads((Path(out) / "remove_top.json").read_text())["points"]
