"""``jaxmem study neural-collapse RUN``: def. 5 (Nguyen et al. 2023) on a run's kept parameters.

The run must keep parameters (``jaxmem run --keep-params N|all``) and, for the paper's quantity,
have label noise (``--label-noise``). For every kept model, the penultimate features (the embedding
the output layer reads, :func:`jaxmem.features.penultimate_layer`) of all training and test
examples are computed on the device; :func:`jaxmem.scores.neural_collapse.neural_collapse_memorization`
turns them into the per-model sums and the per-example ``nc_distance`` column, averaged over the kept
models that trained on each example. The column (and its ``_se``) is stored as the run's
``neural_collapse`` score table (``scores/neural_collapse.csv``), joined into its ``scores.csv`` and
``correlations.csv`` like every estimator's table, so rescoring keeps it.

Outputs in ``out`` (default ``RUN/neural_collapse``): ``nc_scores.csv`` and ``neural_collapse.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxmem.config import RunConfig
from jaxmem.data import load_dataset
from jaxmem.engine.trainer import standardize
from jaxmem.errors import JaxmemError
from jaxmem.features import embeddings, penultimate_layer, stack_params
from jaxmem.models import build_model
from jaxmem.scores import auroc
from jaxmem.scores.correlations import correlation_table
from jaxmem.scores.neural_collapse import neural_collapse_memorization
from jaxmem.scoring import SCORES_CSV, correlation_lines, read_scores_csv, table_to_csv, write_study_table
from jaxmem.records import RunDir, kept_param_models, load_model_params, write_bytes_atomic, write_json_atomic

NC_COLUMNS = ("nc_distance", "nc_distance_se")


@dataclasses.dataclass
class NeuralCollapseStudy:
  out: Path
  columns: dict[str, np.ndarray]
  summary: dict[str, Any]
  lines: list[str]


#: The study's table among a run's score tables (``scores/neural_collapse.csv``).
STUDY_TABLE = "neural_collapse"


def merge_columns_into_run(run_dir: str | Path, columns: dict[str, np.ndarray], *,
                           dataset_fingerprint: str) -> list[str]:
  """Stores per-example ``columns`` as the run's ``neural_collapse`` score table, which the run's
  joined ``scores.csv`` and ``correlations.csv`` then include (and keep through rescoring). The run
  must have been made on the same dataset content."""
  run = RunDir.open(run_dir)
  if run.manifest().get("dataset", {}).get("fingerprint") != dataset_fingerprint:
    raise JaxmemError(f"run directory {str(run.path)!r} was made on other data (dataset fingerprint differs)")
  n = len(next(iter(columns.values())))
  path = write_study_table(run.path, STUDY_TABLE, {"index": np.arange(n), **columns})
  joined = read_scores_csv(run.path / SCORES_CSV)
  correlations = correlation_table(joined, np.asarray(joined["noisy"], dtype=bool))
  return [f"stored {', '.join(columns)} as {path}; {run.path / SCORES_CSV} and {run.path / 'correlations.csv'} "
          "include them", *correlation_lines(correlations)]


def neural_collapse_study(run_dir: str | Path, out: str | Path | None = None, *, data_dir: str | None = None,
                          log: Callable[[str], None] = print) -> NeuralCollapseStudy:
  run = RunDir.open(run_dir)
  config = RunConfig.from_dict(run.manifest()["config"])
  kept = kept_param_models(run)
  if not kept:
    raise JaxmemError(f"run directory {str(run.path)!r} kept no parameters; rerun it with --keep-params N (or all)")
  dataset = load_dataset(config.dataset, data_dir=data_dir or config.data_dir, seed=config.seed,
                         label_noise=config.label_noise)
  if run.manifest().get("dataset", {}).get("fingerprint") != dataset.fingerprint:
    raise JaxmemError(f"the data loaded for {str(run.path)!r} differ from the run's (dataset fingerprint); "
                      "pass the run's --data-dir")
  ids = sorted(kept)
  log(f"neural-collapse: penultimate features of {len(ids)} kept models")
  params_K = stack_params([load_model_params(run.path, m) for m in ids])
  model = build_model(config.model, dataset.num_classes, config.model_options, dtype=config.compute_dtype)
  x_train, x_test = standardize(dataset)
  layer = penultimate_layer(model, x_train)
  train_K = embeddings(model, params_K, x_train, [layer])[layer]
  test_K = embeddings(model, params_K, x_test, [layer])[layer]
  keep_KxN = run.load_records().keep[np.asarray(ids)]
  noisy_N = dataset.noisy.astype(bool)
  result = neural_collapse_memorization(train_K, test_K, dataset.y_train, dataset.y_test, noisy_N,
                                        dataset.num_classes, keep_KxN)
  columns = {"nc_distance": result.column_N, "nc_distance_se": result.column_se_N}
  summary = {"layer": layer, "model_ids": ids, "mem_total_per_model": result.total_M.tolist(),
             "mem_per_corrupted_example_per_model": result.per_example_M.tolist(),
             "num_flipped": int(noisy_N.sum())}
  lines = [f"neural-collapse ({layer}, {len(ids)} models): "]
  if noisy_N.any() and not noisy_N.all():
    per = result.per_example_M
    summary.update(
        mem_per_corrupted_example_mean=float(np.nanmean(per)),
        mem_per_corrupted_example_se=float(np.nanstd(per, ddof=1) / np.sqrt(np.isfinite(per).sum()))
        if np.isfinite(per).sum() > 1 else None,
        nc_distance_flipped_mean=float(np.nanmean(result.column_N[noisy_N])),
        nc_distance_clean_mean=float(np.nanmean(result.column_N[~noisy_N])),
        nc_distance_auroc_flipped=auroc(result.column_N, noisy_N))
    se = summary["mem_per_corrupted_example_se"]
    lines[0] += (f"mean distance of a flipped example to its label's test mean "
                 f"{summary['mem_per_corrupted_example_mean']:.3f}" + (f" ± {se:.3f}" if se is not None else "")
                 + f"; nc_distance flipped {summary['nc_distance_flipped_mean']:.3f} vs clean "
                 f"{summary['nc_distance_clean_mean']:.3f} (AUROC {summary['nc_distance_auroc_flipped']:.3f})")
  else:
    lines[0] += "the run has no flipped labels (def. 5 sums over them): only nc_distance is written"
  out = Path(out) if out is not None else run.path / "neural_collapse"
  out.mkdir(parents=True, exist_ok=True)
  write_bytes_atomic(out / "nc_scores.csv", table_to_csv({
      "index": np.arange(dataset.num_train), "label": dataset.y_train, "noisy": noisy_N.astype(np.int8), **columns}))
  write_json_atomic(out / "neural_collapse.json", summary)
  lines.extend(merge_columns_into_run(run.path, columns, dataset_fingerprint=dataset.fingerprint))
  return NeuralCollapseStudy(out, columns, summary, lines)
