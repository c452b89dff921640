"""Forgetting-study analysis: how the per-example scores of a run agree, and which find flipped labels.

The survey's §VI relates memorization to forgetting: atypical and mislabeled examples are learned
late and forgotten often (Toneva et al. 2019), and forgotten fast once training moves to other data
(Maini et al. 2022). This estimator takes every per-example score column computed before it in a
run (memorization, C-score, LiRA, forgetting events, first-learned epoch, SSFT, EL2N, ...) and reports

* the Spearman rank correlation of every pair, over the examples where both are defined (pairwise
  complete: e.g. forgetting events are NaN for examples no model ever learned), and
* when labels were flipped (``--label-noise``), each score's AUROC for finding the flipped labels,
  taking high values as "flipped" (an AUROC below 0.5 means low values flag them, e.g. SSFT).

Written to ``correlations.csv``: one row per score with its correlation to every score, then
``auroc_flipped`` and ``n`` (examples where the score is defined). The scoring driver computes it on
the joined score table each time the join is rebuilt, so it covers every estimator's and study's
columns.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxmem.scores._result import EstimatorResult
from jaxmem.scores._stats import auroc, spearman

#: Columns that describe an example or a count, not a score (``exposure_chance``: what chance gives
#: a canary's control, a reference value).
NOT_SCORES = frozenset({"index", "label", "clean_label", "noisy", "n_in", "n_out", "split", "exposure_chance"})
NOT_SCORE_SUFFIXES = ("_se", "_ci_low", "_ci_high", "_n")


def score_column_names(columns: dict[str, np.ndarray]) -> list[str]:
  """The per-example score columns of a table, in table order: numeric, not an identifier, count or
  uncertainty column, and not constant (a constant has no ranks to correlate)."""
  names = []
  for name, values in columns.items():
    values = np.asarray(values)
    if (name in NOT_SCORES or name.startswith("n_") or name.endswith(NOT_SCORE_SUFFIXES)
        or values.ndim != 1 or not np.issubdtype(values.dtype, np.number)):
      continue
    finite = values[np.isfinite(values.astype(np.float64))]
    if finite.size >= 3 and np.ptp(finite) > 0:
      names.append(name)
  return names


def correlation_table(columns: dict[str, np.ndarray], noisy: np.ndarray | None = None,
                      names: list[str] | None = None) -> dict[str, Any]:
  """Spearman matrix (K, K) of the score columns and, if ``noisy`` has both classes, each score's
  AUROC for the flipped labels (K,). Returns ``{"names", "spearman", "auroc_flipped", "n"}``."""
  names = score_column_names(columns) if names is None else list(names)
  k = len(names)
  matrix = np.eye(k)
  for i in range(k):
    for j in range(i + 1, k):
      matrix[i, j] = matrix[j, i] = spearman(columns[names[i]], columns[names[j]])
  has_noise = noisy is not None and np.any(noisy) and not np.all(noisy)
  areas = np.array([auroc(columns[n], noisy) if has_noise else np.nan for n in names], dtype=np.float64)
  counts = np.array([int(np.isfinite(np.asarray(columns[n], np.float64)).sum()) for n in names])
  return {"names": names, "spearman": matrix, "auroc_flipped": areas, "n": counts}


def correlations_result(columns: dict[str, np.ndarray], noisy: np.ndarray) -> EstimatorResult:
  """The correlations of a joined score table as a summary: ``names``, the Spearman matrix,
  ``auroc_flipped`` (None where undefined) and ``n``. Empty when the table has no score."""
  table = correlation_table(columns, np.asarray(noisy, dtype=bool))
  if not table["names"]:
    return EstimatorResult()
  return EstimatorResult(summary={
      "names": table["names"], "spearman": table["spearman"].round(4).tolist(),
      "auroc_flipped": [None if not np.isfinite(v) else round(float(v), 4) for v in table["auroc_flipped"]],
      "n": [int(v) for v in table["n"]]})
