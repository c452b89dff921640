"""``jaxmem study benign RUN``: benign vs malign memorization (survey def. 4; Anagnostidis et al.
2023, "The Curious Case of Benign Memorization", ICLR).

A network trained on randomly labelled data fits the random labels, yet with data augmentation its encoder may still learn features that
are useful for the *true* labels: the memorization is *benign* when a kNN probe on a layer's
embeddings, fitted on the training examples with their clean labels and evaluated on the test set,
is more accurate than the same probe at initialization; *malign* when it is less accurate.

Random labels in jaxmem: ``--label-noise (C-1)/C`` (0.9 for digits' 10 classes). Label noise flips a
fraction of labels, each to a uniformly drawn *other* class, so at (C-1)/C every label is correct
with probability 1/C and each wrong class also has 1/C: exactly the paper's uniformly random labels
(up to the fixed count of flips). The noise level is the user's; the study warns below it.

What this driver does:

* It retrains the run's first ``num_models`` models (their own ids and membership rows) under the
  run's recipe and, unless ``augment_variants`` is off, under the same recipe with ``augment``
  toggled, so that the with/without augmentation comparison of the paper comes from one command.
  Each model's parameters at initialization and after training come from
  ``Engine.train_chunk(on_params=)``.
* Probe: :func:`jaxmem.scores.knn_probe.knn_probe_accuracy` (== scikit-learn's
  ``KNeighborsClassifier``) with ``k`` neighbours, fitted on all training examples' embeddings of a
  layer (:mod:`jaxmem.features`; the MLP's ``hidden_i``, the CNN's ``block_i``/``pooled``) with
  their clean labels. The paper probes the encoder of a ResNet with k = 20 after training with
  heavy augmentation; here every named layer is probed.
* Verdict per variant and layer from the per-model difference trained − init: mean with a 95%
  Student-t interval over models; ``benign`` when the interval lies above 0, ``malign`` below 0,
  ``undecided`` otherwise (the paper reports single runs).

Outputs in ``out`` (default ``RUN/benign``): ``benign.csv`` (``variant, layer, init_accuracy,
init_ci_low, init_ci_high, trained_accuracy, ..., difference, difference_ci_low,
difference_ci_high, verdict``), ``benign.json`` and ``benign.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxmem.config import RunConfig
from jaxmem.data import load_dataset
from jaxmem.engine import Engine
from jaxmem.engine.trainer import standardize
from jaxmem.errors import JaxmemError
from jaxmem.features import embeddings, layer_names
from jaxmem.scores.knn_probe import knn_probe_accuracy
from jaxmem.records import RunDir, write_bytes_atomic, write_json_atomic
from jaxmem.scoring import rows_to_csv
from jaxmem.studies import StudyTable
from jaxmem.studies.remove_top import interval


def verdict(low: float, high: float) -> str:
  """``benign`` / ``malign`` when the interval of trained − init probe accuracy excludes 0."""
  if low > 0:
    return "benign"
  if high < 0:
    return "malign"
  return "undecided"


def benign_study(run_dir: str | Path, out: str | Path | None = None, *, num_models: int = 8, k: int = 20,
                 augment_variants: bool = True, data_dir: str | None = None,
                 log: Callable[[str], None] = print) -> StudyTable:
  run = RunDir.open(run_dir)
  config = RunConfig.from_dict(run.manifest()["config"])
  config = config.replace(record_epochs=False, record_epoch_margin=False, score_epoch=None, queries=1)
  keep_MxN = run.read_design()["keep"]
  if not 2 <= num_models <= keep_MxN.shape[0]:
    raise JaxmemError(f"num_models must be in 2..{keep_MxN.shape[0]} (the run's models), got {num_models}")
  dataset = load_dataset(config.dataset, data_dir=data_dir or config.data_dir, seed=config.seed,
                         label_noise=config.label_noise)
  if not 1 <= k <= dataset.num_train:
    raise JaxmemError(f"k must be in 1..{dataset.num_train} (the training examples), got {k}")
  random_labels = (dataset.num_classes - 1) / dataset.num_classes
  if config.label_noise < random_labels - 1e-9:
    log(f"benign: the run's label noise is {config.label_noise:g}; random labels (the paper's setting) are "
        f"--label-noise {random_labels:g} for {dataset.num_classes} classes")
  x_train, x_test = standardize(dataset)
  augments = [config.augment, not config.augment] if augment_variants else [config.augment]
  rows = []
  for augment in augments:
    variant = f"augment={str(augment).lower()}"
    engine = Engine(dataset, config.replace(augment=augment), log=log)
    layers = layer_names(engine.model, x_train)
    probe: dict[tuple[str, str], list[np.ndarray]] = {}
    for start in range(0, num_models, config.chunk_size):
      ids = np.arange(start, min(start + config.chunk_size, num_models))
      kept: dict[int, Any] = {}

      def on_params(epoch, params_K, kept=kept, n=ids.size):
        if epoch in (0, config.epochs):
          kept[epoch] = jax.device_get(jax.tree.map(lambda x: x[:n], params_K))
      log(f"benign: {variant}, models {ids[0]}..{ids[-1]}")
      engine.train_chunk(ids, keep_MxN[ids], epochs_per_call=config.epochs, on_params=on_params)
      for when, epoch in (("init", 0), ("trained", config.epochs)):
        train_emb = embeddings(engine.model, kept[epoch], x_train, layers)
        test_emb = embeddings(engine.model, kept[epoch], x_test, layers)
        for layer in layers:
          probe.setdefault((when, layer), []).append(knn_probe_accuracy(
              train_emb[layer], dataset.clean_y_train, test_emb[layer], dataset.y_test, k, dataset.num_classes))
    for layer in layers:
      init_M, trained_M = np.concatenate(probe[("init", layer)]), np.concatenate(probe[("trained", layer)])
      row: dict[str, Any] = {"variant": variant, "layer": layer}
      for name, values in (("init", init_M), ("trained", trained_M), ("difference", trained_M - init_M)):
        mean, _, low, high = interval(values)
        row.update({f"{name}_accuracy" if name != "difference" else name: mean,
                    f"{name}_ci_low": low, f"{name}_ci_high": high})
      row["verdict"] = verdict(row["difference_ci_low"], row["difference_ci_high"])
      rows.append(row)
  summary = {"run": str(run.path), "num_models": num_models, "k": k, "label_noise": config.label_noise,
             "rows": rows}
  out = Path(out) if out is not None else run.path / "benign"
  out.mkdir(parents=True, exist_ok=True)
  write_bytes_atomic(out / "benign.csv", rows_to_csv(rows))
  write_json_atomic(out / "benign.json", summary)
  plot_benign(rows, out / "benign.png", title=f"{dataset.name}, label noise {config.label_noise:g}: "
              f"kNN probe (k={k}) on clean labels, {num_models} models")
  lines = [f"benign {r['variant']} {r['layer']}: probe {r['init_accuracy']:.3f} at init -> {r['trained_accuracy']:.3f} "
           f"trained, difference {r['difference']:+.3f} [{r['difference_ci_low']:+.3f}, {r['difference_ci_high']:+.3f}]: "
           f"{r['verdict']}" for r in rows]
  return StudyTable(out, rows, summary, lines)



def plot_benign(rows: list[dict[str, Any]], path: Path, *, title: str = "") -> None:
  """Probe accuracy by layer, init vs trained, one panel per variant, 95% intervals over models."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  variants = list(dict.fromkeys(r["variant"] for r in rows))
  fig = Figure(figsize=(4.5 * len(variants), 3.8), layout="constrained")
  FigureCanvasAgg(fig)
  for i, variant in enumerate(variants):
    ax = fig.add_subplot(1, len(variants), i + 1)
    mine = [r for r in rows if r["variant"] == variant]
    x = np.arange(len(mine))
    for offset, when in ((-0.2, "init"), (0.2, "trained")):
      acc = np.array([r[f"{when}_accuracy"] for r in mine])
      err = np.array([[r[f"{when}_accuracy"] - r[f"{when}_ci_low"], r[f"{when}_ci_high"] - r[f"{when}_accuracy"]]
                      for r in mine]).T
      ax.bar(x + offset, acc, 0.4, yerr=np.nan_to_num(err), capsize=2, label=when)
    ax.set_xticks(x, [f"{r['layer']}\n{r['verdict']}" for r in mine], fontsize=8)
    ax.set_title(variant, fontsize=9)
    ax.set_ylabel("kNN probe test accuracy (clean labels)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.savefig(path, dpi=110)
