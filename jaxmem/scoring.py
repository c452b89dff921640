"""From a run directory's records to ``scores.csv``: picks estimators, runs them, writes the table.

``scores.csv`` has one row per training example in load order: ``index, label, clean_label, noisy``
and then each estimator's columns. A value that cannot be estimated (e.g. an example no finished
model held out) is an empty cell, never 0.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxmem.errors import JaxmemError
from jaxmem.scores import ESTIMATORS, Estimator, EstimatorResult
from jaxmem.records import Records, RunDir, write_bytes_atomic, write_json_atomic

SCORES_CSV = "scores.csv"
#: Columns that studies merge into a run's scores.csv (``jaxmem study ssft --run``): they come from
#: training the study ran, not from the run's records, so rescoring carries them over.
STUDY_COLUMNS = ("fslt", "fslt_se", "ssft", "ssft_se", "nc_distance", "nc_distance_se")


@dataclasses.dataclass
class ScoreTable:
  columns: dict[str, np.ndarray]     # ordered; first index, label, clean_label, noisy
  summary: dict[str, Any]            # estimator name -> its summary numbers
  lines: list[str]                   # human summary lines from the estimators
  files: dict[str, Any]              # extra output name -> writer(path)
  estimators: list[str]

  def column(self, name: str) -> np.ndarray:
    return self.columns[name]


def parse_estimator_names(text: str | None) -> list[str] | None:
  if text is None or text in ("", "default"):
    return None
  names = [n.strip() for n in text.split(",") if n.strip()]
  for name in names:
    ESTIMATORS.get(name)  # unknown names list the valid ones
  return names


def select_estimators(names: Sequence[str] | None, records: Records) -> list[Estimator]:
  """The named estimators (each must have its records), or every default one whose records exist."""
  chosen = []
  if names is None:
    chosen = [ESTIMATORS.get(n) for n in ESTIMATORS.names()
              if ESTIMATORS.get(n).default and ESTIMATORS.get(n).available(records)]
  for name in names or ():
    estimator = ESTIMATORS.get(name)
    missing = [r for r in estimator.requires if r not in records]
    if missing:
      raise JaxmemError(f"estimator {name!r} needs records {', '.join(missing)} that this run did not record")
    chosen.append(estimator)
  # memorization first: others refer to it in their summaries; correlations last: it correlates
  # every column the others computed (its `context`)
  return sorted(chosen, key=lambda e: (e.name != "memorization", e.name == "correlations"))


def score_records(records: Records, estimators: Sequence[str] | None = None,
                  options: dict[str, dict[str, Any]] | None = None,
                  carried: dict[str, np.ndarray] | None = None) -> ScoreTable:
  """Runs estimators on records. ``options`` maps estimator name -> keyword options; ``carried``
  columns (a study's, see STUDY_COLUMNS) join the table before the correlations are computed."""
  options = options or {}
  carried = carried or {}
  columns: dict[str, np.ndarray] = {
      "index": np.arange(records.num_train), "label": records.train_labels,
      "clean_label": records.clean_train_labels, "noisy": records.noisy.astype(np.int8)}
  summary, lines, files = {}, [], {}
  chosen = select_estimators(estimators, records)
  for estimator in chosen:
    if estimator.name == "correlations":  # last (select_estimators): it correlates every column
      columns.update(carried)
    result: EstimatorResult = estimator.fn(records, context=columns, **options.get(estimator.name, {}))
    for name, values in result.columns.items():
      values = np.asarray(values)
      if values.shape != (records.num_train,):
        raise ValueError(f"estimator {estimator.name} returned column {name} of shape {values.shape}")
      columns[name] = values
    summary[estimator.name] = result.summary
    lines.extend(result.lines)
    files.update(result.files)
  columns.update(carried)
  return ScoreTable(columns, summary, lines, files, [e.name for e in chosen])


def _cell(value) -> str:
  if isinstance(value, (bool, np.bool_)):
    return "1" if value else "0"
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  value = float(value)
  return "" if math.isnan(value) else f"{value:.6g}"


def table_to_csv(columns: dict[str, np.ndarray]) -> bytes:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  names = list(columns)
  writer.writerow(names)
  arrays = [np.asarray(columns[n]) for n in names]
  for row in zip(*arrays):
    writer.writerow([_cell(v) for v in row])
  return out.getvalue().encode()


def read_scores_csv(path: str | Path) -> dict[str, np.ndarray]:
  """Reads ``scores.csv`` (or any CSV jaxmem writes) back as columns: integer columns as int64,
  other numeric columns as float64 with empty cells NaN, anything else as strings."""
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  if not rows:
    return {}
  header, body = rows[0], rows[1:]
  out = {}
  for j, name in enumerate(header):
    cells = [r[j] if j < len(r) else "" for r in body]
    try:
      out[name] = np.array([int(c) for c in cells], dtype=np.int64)
    except ValueError:
      try:
        out[name] = np.array([float(c) if c != "" else np.nan for c in cells], dtype=np.float64)
      except ValueError:
        out[name] = np.array(cells, dtype=object)
  return out


def write_scores(run: RunDir, table: ScoreTable) -> list[Path]:
  """Writes ``scores.csv``, ``scores_summary.json`` and estimator files atomically."""
  written = [run.path / SCORES_CSV]
  write_bytes_atomic(run.path / SCORES_CSV, table_to_csv(table.columns))
  write_json_atomic(run.path / "scores_summary.json", {"estimators": table.estimators, **table.summary})
  written.append(run.path / "scores_summary.json")
  for name, writer in table.files.items():
    writer(run.path / name)
    written.append(run.path / name)
  return written


def score_run(run_dir: str | Path, estimators: Sequence[str] | None = None,
              options: dict[str, dict[str, Any]] | None = None) -> tuple[ScoreTable, Records]:
  """(Re)computes scores from whatever chunks of ``run_dir`` are complete, and writes them."""
  run = RunDir.open(run_dir)
  records = run.load_records()
  table = score_records(records, estimators, options, carried=study_columns(run, records.num_train))
  write_scores(run, table)
  return table, records


def study_columns(run: RunDir, num_train: int) -> dict[str, np.ndarray]:
  """The STUDY_COLUMNS of the run's current scores.csv, so that rescoring does not drop what a
  study computed (only when its rows are this run's training examples in order)."""
  path = run.path / SCORES_CSV
  if not path.is_file():
    return {}
  try:
    old = read_scores_csv(path)
  except (OSError, UnicodeDecodeError, csv.Error):
    return {}  # an unreadable table has nothing to carry; it is rewritten below
  index = old.get("index")
  if index is None or index.dtype.kind != "i" or not np.array_equal(index, np.arange(num_train)):
    return {}
  return {name: old[name] for name in STUDY_COLUMNS if name in old and old[name].dtype.kind == "f"}
