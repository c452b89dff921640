"""Two-phase study: first-split learning time (FSLT) and second-split forgetting time (SSFT).

Maini et al. 2022, "Characterizing Datapoints via Second-Split Forgetting" (survey defs. 9-10):
split the training set into halves A and B; train on A until it is fit, recording after every
epoch which examples of A are classified correctly (FSLT_i: the earliest epoch after which i stays
correct); then continue training the same network on B only, still recording correctness on A
after every epoch (SSFT_i: the earliest epoch after which i is never again correct). Mislabeled
and rare examples are forgotten fast (small SSFT); hard but typical ones are learned late (large
FSLT) yet forgotten slowly. Both split orders (A then B, B then A) are run so that every example
gets both scores.

What this driver does, and what differs from the reference code (pratyushmaini/ssft):

* The split is a seeded random half (``config.seed``); models are vectorized over seeds with the
  engine: phase-one models have ids ``order * M + m``, their phase-two continuations ids
  ``(2 + order) * M + m`` (fresh batch-order randomness; parameters come from phase one through
  ``Engine.train_chunk(init_params=...)``, with a fresh optimizer state and learning-rate
  schedule, as the reference code builds a new optimizer for the second split).
* Phase one trains a fixed ``first_epochs`` (the reference trains until 100% training accuracy with
  a patience of 5 epochs); the fraction of the first split fit at its end is reported, and a
  warning is logged below 99%.
* Correctness is evaluated on every example after each epoch (the reference's ``eval_every``
  masks); FSLT/SSFT per model use exactly the reference's ``get_first_epoch_where_we_learn_forever``
  / ``..._forget_forever`` conventions (1-based epochs; E + 1 for "not learned by the end" or
  "never forgotten"), see :mod:`jaxmem.scores.dynamics`, and are averaged over models with a
  standard error (the reference averages over runs, no error bar).

Outputs in ``out``: ``ssft_scores.csv`` (``index, label, clean_label, noisy, split, fslt, fslt_se,
ssft, ssft_se``), ``ssft.json`` (settings, fit fractions, flipped-vs-clean means), and
``ssft_records.npz`` (the bit-packed correctness histories). A rerun with the same settings reuses
``ssft_scores.csv`` without training. Given a run directory (same dataset), ``fslt``/``ssft`` (and
their ``_se``) are stored as the run's ``ssft`` score table (``scores/ssft.csv``), joined into its
``scores.csv`` and ``correlations.csv`` like every estimator's table, so rescoring keeps them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxmem.config import RunConfig
from jaxmem.data import Dataset, load_dataset
from jaxmem.errors import JaxmemError
from jaxmem.scores.correlations import correlation_table
from jaxmem.scores.dynamics import forgotten_forever_epoch, learned_forever_epoch, masked_mean
from jaxmem.scoring import SCORES_CSV, read_scores_csv, table_to_csv, write_study_table
from jaxmem.records import RunDir, make_dirs, write_bytes_atomic, write_json_atomic, write_npz_atomic


@dataclasses.dataclass
class SsftResult:
  out: Path
  columns: dict[str, np.ndarray]   # index, label, clean_label, noisy, split, fslt(_se), ssft(_se)
  summary: dict[str, Any]
  lines: list[str]


#: The study's per-example columns in a run's score tables.
SSFT_COLUMNS = ("fslt", "fslt_se", "ssft", "ssft_se")


def split_halves(num_train: int, seed: int) -> np.ndarray:
  """(N,) int8: 0 for split A, 1 for split B; a seeded random half (A gets floor(N/2))."""
  order = np.random.default_rng([seed, 0x55F7]).permutation(num_train)
  split = np.ones(num_train, dtype=np.int8)
  split[order[: num_train // 2]] = 0
  return split


def two_phase_times(correct_first_MxExN: np.ndarray, correct_second_MxFxN: np.ndarray,
                    first_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """FSLT and SSFT (M, N) of the first-split examples (``first_N``); NaN elsewhere."""
  fslt = learned_forever_epoch(correct_first_MxExN).astype(np.float64)
  ssft = forgotten_forever_epoch(correct_second_MxFxN).astype(np.float64)
  return np.where(first_N[None], fslt, np.nan), np.where(first_N[None], ssft, np.nan)


def ssft_study(config: RunConfig, out: str | Path, *, num_models: int = 8, first_epochs: int | None = None,
               second_epochs: int | None = None, dataset: Dataset | None = None,
               run_dir: str | Path | None = None, log: Callable[[str], None] = print) -> SsftResult:
  """Runs both split orders with ``num_models`` models each and writes the outputs listed in the
  module docstring. ``config`` gives the dataset, model and training recipe (its ``epochs`` is the
  default for both phases; its ``num_models`` and per-epoch/EL2N settings are ignored)."""
  first_epochs = first_epochs or config.epochs
  second_epochs = second_epochs or config.epochs
  if num_models < 1 or first_epochs < 1 or second_epochs < 1:
    raise JaxmemError(f"num_models, first_epochs and second_epochs must be >= 1, got "
                      f"{num_models}, {first_epochs}, {second_epochs}")
  config.validate()
  if dataset is None:
    dataset = load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed, label_noise=config.label_noise)
  out = make_dirs(Path(out), "study directory")
  settings = {"config": config.identity(), "dataset_fingerprint": dataset.fingerprint, "num_models": num_models,
              "first_epochs": first_epochs, "second_epochs": second_epochs}
  columns, summary = _reuse(out, settings)
  if columns is None:
    columns, summary = _train(config, dataset, settings, out, log)
  lines = format_ssft(summary)
  if run_dir is not None:
    lines.extend(merge_into_run(run_dir, columns, dataset_fingerprint=dataset.fingerprint))
  return SsftResult(out, columns, summary, lines)


def _reuse(out: Path, settings: dict[str, Any]):
  """The scores of an earlier study with the same settings in ``out``, if complete."""
  meta, table = out / "ssft.json", out / "ssft_scores.csv"
  if not (meta.is_file() and table.is_file()):
    return None, None
  try:
    summary = json.loads(meta.read_text())
  except json.JSONDecodeError:
    return None, None
  if summary.get("settings") != json.loads(json.dumps(settings)):
    return None, None
  return read_scores_csv(table), summary


def _train(config: RunConfig, dataset: Dataset, settings: dict[str, Any], out: Path, log) -> tuple[dict, dict]:
  from jaxmem.engine import Engine
  n = dataset.num_train
  split = split_halves(n, config.seed)
  base = config.replace(record_epochs=True, record_epoch_margin=False, score_epoch=None)
  engines = (Engine(dataset, base.replace(epochs=settings["first_epochs"]), log=log),
             Engine(dataset, base.replace(epochs=settings["second_epochs"]), log=log))
  m = settings["num_models"]
  fslt_MxN = np.full((2 * m, n), np.nan)
  ssft_MxN = np.full((2 * m, n), np.nan)
  packed: dict[str, list[np.ndarray]] = {"first": [], "second": []}
  fit, forgotten = [], []
  for order in (0, 1):
    first_N = split == order
    for start in range(0, m, config.chunk_size):
      local = np.arange(start, min(start + config.chunk_size, m))
      k = local.size
      log(f"ssft: split order {order}, models {start}..{start + k - 1}: phase one on {first_N.sum()} examples")
      rec1 = engines[0].train_chunk(order * m + local, np.tile(first_N, (k, 1)))
      rec2 = engines[1].train_chunk((2 + order) * m + local, np.tile(~first_N, (k, 1)),
                                    init_params=engines[0].last_state.params)
      correct1 = np.unpackbits(rec1["train_correct_epochs_packed"], axis=-1, count=n).astype(bool)
      correct2 = np.unpackbits(rec2["train_correct_epochs_packed"], axis=-1, count=n).astype(bool)
      rows = order * m + local
      fslt_MxN[rows], ssft_MxN[rows] = two_phase_times(correct1, correct2, first_N)
      fit.append(correct1[:, -1][:, first_N].mean(axis=1))
      forgotten.append(1.0 - correct2[:, -1][:, first_N].mean(axis=1))
      packed["first"].append(rec1["train_correct_epochs_packed"])
      packed["second"].append(rec2["train_correct_epochs_packed"])
  valid = np.isfinite(fslt_MxN)
  fslt, ssft = masked_mean(fslt_MxN, valid), masked_mean(ssft_MxN, valid)
  columns = {"index": np.arange(n), "label": dataset.y_train, "clean_label": dataset.clean_y_train,
             "noisy": dataset.noisy.astype(np.int8), "split": split,
             "fslt": fslt.mean, "fslt_se": fslt.se, "ssft": ssft.mean, "ssft_se": ssft.se}
  fit_fraction = float(np.concatenate(fit).mean())
  summary = {"settings": settings, "first_split_fit_fraction": fit_fraction,
             "first_split_forgotten_fraction": float(np.concatenate(forgotten).mean())}
  noisy = dataset.noisy.astype(bool)
  if noisy.any() and not noisy.all():
    from jaxmem.scores import auroc
    for name in ("fslt", "ssft"):
      summary[f"{name}_flipped_mean"] = float(np.nanmean(columns[name][noisy]))
      summary[f"{name}_clean_mean"] = float(np.nanmean(columns[name][~noisy]))
      summary[f"{name}_auroc"] = auroc(columns[name], noisy)
  if fit_fraction < 0.99:
    log(f"ssft: phase one fit only {fit_fraction:.1%} of its split; FSLT is censored at "
        f"{settings['first_epochs'] + 1} for the rest (more --first-epochs fits more)")
  write_npz_atomic(out / "ssft_records.npz", {
      "split": split, "model_order": np.repeat([0, 1], m),
      "first_phase_correct_packed": np.concatenate(packed["first"]),
      "second_phase_correct_packed": np.concatenate(packed["second"]), "num_train": np.int64(n)})
  write_bytes_atomic(out / "ssft_scores.csv", table_to_csv(columns))
  write_json_atomic(out / "ssft.json", summary)
  return columns, summary


def merge_into_run(run_dir: str | Path, columns: dict[str, np.ndarray], *, dataset_fingerprint: str) -> list[str]:
  """Stores ``fslt``/``ssft`` and their ``_se`` as the run's ``ssft`` score table (``scores/ssft.csv``),
  which the run's joined ``scores.csv`` and ``correlations.csv`` then include (and keep through
  rescoring). The run must have been made on the same dataset content."""
  run = RunDir.open(run_dir)
  if run.manifest().get("dataset", {}).get("fingerprint") != dataset_fingerprint:
    raise JaxmemError(f"run directory {str(run.path)!r} was made on other data (dataset fingerprint differs); "
                      "run the study with the run's dataset, label noise and seed")
  n = len(columns["fslt"])
  path = write_study_table(run.path, "ssft", {"index": np.arange(n), **{name: columns[name] for name in SSFT_COLUMNS if name in columns}})
  joined = read_scores_csv(run.path / SCORES_CSV)
  correlations = correlation_table(joined, np.asarray(joined["noisy"], dtype=bool))
  lines = [f"stored {', '.join(n for n in SSFT_COLUMNS if n in columns)} as {path}; {run.path / SCORES_CSV} and {run.path / 'correlations.csv'} "
           "include them"]
  if "memorization" in correlations["names"] and len(correlations["names"]) > 1:
    a = correlations["names"].index("memorization")
    lines.append("Spearman correlation with memorization: " + ", ".join(
        f"{name} {correlations['spearman'][a, j]:+.2f}" for j, name in enumerate(correlations["names"]) if j != a))
  return lines


def config_from_run(run_dir: str | Path) -> RunConfig:
  """The recipe (dataset, model, optimizer, seed, label noise) of an existing run."""
  return RunConfig.from_dict(RunDir.open(run_dir).manifest()["config"])


def format_ssft(summary: dict[str, Any]) -> list[str]:
  s = summary["settings"]
  lines = [f"ssft: {s['num_models']} models per split order, {s['first_epochs']} + {s['second_epochs']} epochs; "
           f"phase one fit {summary['first_split_fit_fraction']:.1%} of its split, phase two forgot "
           f"{summary['first_split_forgotten_fraction']:.1%} of it"]
  for name in ("fslt", "ssft"):
    if f"{name}_auroc" in summary:
      lines.append(f"{name}: flipped labels {summary[f'{name}_flipped_mean']:.2f}, clean {summary[f'{name}_clean_mean']:.2f} "
                   f"(AUROC for finding flipped labels {summary[f'{name}_auroc']:.3f})")
  return lines
