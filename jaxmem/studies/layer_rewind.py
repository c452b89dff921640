"""``jaxmem study layer-rewind RUN``: which layers hold memorized examples (layer localization).

Stephenson et al. 2021 ("On the geometry of generalization and memorization in deep neural
networks") and Maini et al. 2023 ("Can neural network memorization be localized?") rewind one
layer's parameters to an earlier epoch (or to initialization) and measure how accuracy falls on
memorized examples (flipped labels, judged against the label they were trained on) versus clean
training examples and test examples: a layer whose rewinding wipes out the flipped labels while
sparing clean and test accuracy holds that memorization.

What this driver does:

* It retrains the run's first ``num_models`` models with the run's own ids and membership rows
  (``keep`` of the run's design): model m's randomness is ``fold_in(seed, m)``, so these are the
  run's models again, now with their parameters at every epoch (``Engine.train_chunk(on_params=)``).
* A *layer* is one top-level entry of the parameter tree (``Dense_0``, ``Dense_1``, ... for the MLP;
  ``Conv_i`` and ``Dense_0`` for the CNN), kernel and bias together, as in Maini et al.'s
  layer-wise rewinding; the reference rewinds to an epoch of the same run, as here.
* Groups: ``flipped`` (training examples whose label was flipped and that the model trained on,
  correct = predicts the flipped label), ``clean`` (the model's other training examples), ``test``.
  A run without label noise uses its ``top_fraction`` most memorized examples (``scores.csv``'s
  ``memorization``) as the group ``memorized`` instead of ``flipped``.
* Accuracies are per model, then mean, standard error and 95% Student-t interval over models (the
  papers report single runs).

Outputs in ``out`` (default ``RUN/layer_rewind``): ``layer_rewind.csv`` (``rewind_epoch, layer,
group, accuracy, se, ci_low, ci_high``; layer ``none`` is the trained model), ``layer_rewind.json``
and ``layer_rewind.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxmem.config import RunConfig
from jaxmem.data import load_dataset
from jaxmem.engine import Engine
from jaxmem.engine.trainer import standardize
from jaxmem.errors import JaxmemError
from jaxmem.features import logits
from jaxmem.scoring import SCORES_CSV, read_scores_csv, rows_to_csv
from jaxmem.records import RunDir, write_bytes_atomic, write_json_atomic
from jaxmem.studies import StudyTable
from jaxmem.studies.remove_top import interval

TRAINED = "none"  # the layer name of the rows without rewinding


def layers_of(params: Any) -> list[str]:
  """The rewindable layers of a parameter tree: its top-level entries, input to output (flax names
  them ``Kind_i`` in call order per kind; the registry's models call every ``Conv`` before any
  ``Dense``)."""
  def order(name: str) -> tuple[bool, int]:
    kind, _, index = name.rpartition("_")
    return kind == "Dense", int(index) if index.isdigit() else 0
  return sorted(params.keys(), key=order)


def rewind(params: Any, earlier: Any, layer: str) -> Any:
  """``params`` with ``layer``'s parameters (kernel and bias) taken from ``earlier``."""
  if layer not in params:
    raise JaxmemError(f"unknown layer {layer!r}; choose from: {', '.join(layers_of(params))}")
  return {**params, layer: earlier[layer]}


def group_accuracies(correct_KxN: np.ndarray, test_correct_KxT: np.ndarray, groups_KxN: dict[str, np.ndarray]
                     ) -> dict[str, np.ndarray]:
  """Per-model accuracy (K,) on each training group (a per-model boolean mask) and on the test set."""
  out = {name: (correct_KxN & mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1) for name, mask in groups_KxN.items()}
  out["test"] = test_correct_KxT.mean(axis=1)
  return out


def layer_rewind_study(run_dir: str | Path, out: str | Path | None = None, *, num_models: int = 8,
                       rewind_epochs: Sequence[int] = (0,), top_fraction: float = 0.05,
                       data_dir: str | None = None, log: Callable[[str], None] = print) -> StudyTable:
  run = RunDir.open(run_dir)
  config = RunConfig.from_dict(run.manifest()["config"])
  config = config.replace(record_epochs=False, record_epoch_margin=False, score_epoch=None, queries=1)
  rewind_epochs = sorted(set(int(e) for e in rewind_epochs))
  if any(e < 0 or e > config.epochs for e in rewind_epochs):
    raise JaxmemError(f"rewind epochs must be in 0..{config.epochs} (the run's epochs), got {rewind_epochs}")
  keep_MxN = run.read_design()["keep"]
  if not 1 <= num_models <= keep_MxN.shape[0]:
    raise JaxmemError(f"num_models must be in 1..{keep_MxN.shape[0]} (the run's models), got {num_models}")
  if not 0 < top_fraction < 1:
    raise JaxmemError(f"top_fraction must be in (0, 1), got {top_fraction}")
  dataset = load_dataset(config.dataset, data_dir=data_dir or config.data_dir, seed=config.seed,
                         label_noise=config.label_noise)
  noisy_N = dataset.noisy.astype(bool)
  if noisy_N.any():
    memorized_name, memorized_N = "flipped", noisy_N
  else:
    path = run.path / SCORES_CSV
    if not path.is_file():
      raise JaxmemError(f"run {str(run.path)!r} has no label noise and no {SCORES_CSV} to rank memorized examples by")
    mem_N = np.nan_to_num(np.asarray(read_scores_csv(path)["memorization"], np.float64), nan=-np.inf)
    memorized_N = np.zeros(dataset.num_train, bool)
    memorized_N[np.argsort(-mem_N, kind="stable")[: max(1, int(round(top_fraction * dataset.num_train)))]] = True
    memorized_name = "memorized"
  engine = Engine(dataset, config, log=log)
  x_train, x_test = standardize(dataset)
  wanted = set(rewind_epochs) | {config.epochs}
  per_model: dict[tuple[int, str, str], list[np.ndarray]] = {}
  for start in range(0, num_models, config.chunk_size):
    ids = np.arange(start, min(start + config.chunk_size, num_models))
    k = ids.size
    kept: dict[int, Any] = {}

    def on_params(epoch, params_K, kept=kept, k=k):
      if epoch in wanted:
        kept[epoch] = jax.device_get(jax.tree.map(lambda x: x[:k], params_K))
    log(f"layer-rewind: retraining models {ids[0]}..{ids[-1]} with their parameters at epochs {sorted(wanted)}")
    engine.train_chunk(ids, keep_MxN[ids], epochs_per_call=1, on_params=on_params)
    final = kept[config.epochs]
    groups = {memorized_name: keep_MxN[ids] & memorized_N[None], "clean": keep_MxN[ids] & ~memorized_N[None]}

    def accuracies(params_K):
      train_KxN = logits(engine.model, params_K, x_train).argmax(-1) == dataset.y_train[None]
      test_KxT = logits(engine.model, params_K, x_test).argmax(-1) == dataset.y_test[None]
      return group_accuracies(train_KxN, test_KxT, groups)
    variants = [(config.epochs, TRAINED, final)]
    variants += [(e, layer, rewind(final, kept[e], layer)) for e in rewind_epochs for layer in layers_of(final)]
    for epoch, layer, params_K in variants:
      for group, acc_K in accuracies(params_K).items():
        per_model.setdefault((epoch, layer, group), []).append(acc_K)
  rows = []
  for (epoch, layer, group), parts in per_model.items():
    mean, se, low, high = interval(np.concatenate(parts))
    rows.append({"rewind_epoch": epoch, "layer": layer, "group": group, "accuracy": mean, "se": se,
                 "ci_low": low, "ci_high": high})
  summary = {"run": str(run.path), "num_models": num_models, "rewind_epochs": rewind_epochs,
             "memorized_group": memorized_name, "num_memorized": int(memorized_N.sum()), "rows": rows}
  out = Path(out) if out is not None else run.path / "layer_rewind"
  out.mkdir(parents=True, exist_ok=True)
  write_bytes_atomic(out / "layer_rewind.csv", rows_to_csv(rows))
  write_json_atomic(out / "layer_rewind.json", summary)
  plot_rewind(rows, out / "layer_rewind.png", memorized_name,
              title=f"{dataset.name}: layer rewinding, {num_models} models")
  return StudyTable(out, rows, summary, format_rewind(rows, memorized_name))



def format_rewind(rows: list[dict[str, Any]], memorized: str) -> list[str]:
  """One line per (rewind epoch, layer): accuracy on the memorized group, clean and test."""
  lines = []
  keyed = {(r["rewind_epoch"], r["layer"], r["group"]): r for r in rows}
  for epoch, layer in dict.fromkeys((r["rewind_epoch"], r["layer"]) for r in rows):
    parts = [f"{g} {keyed[(epoch, layer, g)]['accuracy']:.3f} ± {keyed[(epoch, layer, g)]['se']:.3f}"
             for g in (memorized, "clean", "test") if (epoch, layer, g) in keyed]
    what = "trained" if layer == TRAINED else f"{layer} rewound to epoch {epoch}"
    lines.append(f"layer-rewind: {what}: " + ", ".join(parts))
  return lines


def plot_rewind(rows: list[dict[str, Any]], path: Path, memorized: str, *, title: str = "") -> None:
  """Accuracy per group with its 95% interval, one cluster of bars per (layer, rewind epoch)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7.5, 4), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  variants = list(dict.fromkeys((r["rewind_epoch"], r["layer"]) for r in rows))
  keyed = {(r["rewind_epoch"], r["layer"], r["group"]): r for r in rows}
  groups = [memorized, "clean", "test"]
  width = 0.8 / len(groups)
  for g_index, group in enumerate(groups):
    x = np.arange(len(variants)) + (g_index - 1) * width
    found = [keyed.get((e, layer, group)) for e, layer in variants]
    acc = np.array([r["accuracy"] if r else np.nan for r in found])
    err = np.array([[r["accuracy"] - r["ci_low"], r["ci_high"] - r["accuracy"]] if r else [0, 0] for r in found]).T
    ax.bar(x, acc, width, yerr=np.nan_to_num(err), label=group, capsize=2)
  ax.set_xticks(np.arange(len(variants)),
                ["trained" if layer == TRAINED else f"{layer}\n@{e}" for e, layer in variants], fontsize=8)
  ax.set_ylabel("accuracy (mean over models, 95% CI)")
  ax.set_title(title, fontsize=9)
  ax.legend()
  ax.grid(alpha=0.3, axis="y")
  fig.savefig(path, dpi=110)
