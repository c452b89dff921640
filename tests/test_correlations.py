"""Forgetting-study analysis: Spearman table and flipped-label AUROC against naive references."""

import csv
import io

import numpy as np
import pytest
from scipy.stats import rankdata

from jaxmem.scores import auroc
from jaxmem.scores.correlations import correlation_table, score_column_names
from jaxmem.scoring import correlation_lines as summary_lines
from jaxmem.scoring import correlations_csv


def _naive_spearman(a, b):
  """Pearson correlation of average ranks over the entries where both are defined."""
  valid = ~np.isnan(a) & ~np.isnan(b)
  ra, rb = rankdata(a[valid]), rankdata(b[valid])
  ra, rb = ra - ra.mean(), rb - rb.mean()
  return float((ra * rb).sum() / np.sqrt((ra**2).sum() * (rb**2).sum()))


def _naive_auroc(scores, positive):
  """Probability that a random positive outscores a random negative (ties one half), NaN left out."""
  valid = ~np.isnan(scores)
  pos, neg = scores[valid & positive], scores[valid & ~positive]
  wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
  return wins / (len(pos) * len(neg))


def _columns(n=60, seed=0):
  rng = np.random.default_rng(seed)
  noisy = rng.random(n) < 0.2
  memorization = noisy * 0.8 + rng.random(n) * 0.5
  forgetting = np.round(memorization * 3 + rng.random(n), 0)  # ties
  forgetting[:4] = np.nan                                     # never learned by any model
  ssft = 10 - 8 * noisy + rng.integers(0, 3, n)
  return {"index": np.arange(n), "label": rng.integers(0, 3, n), "clean_label": rng.integers(0, 3, n),
          "noisy": noisy.astype(np.int8), "memorization": memorization, "memorization_se": rng.random(n),
          "n_in": rng.integers(1, 9, n), "forgetting_events": forgetting, "ssft": ssft.astype(float),
          "constant": np.ones(n)}, noisy


def test_score_columns_exclude_identifiers_counts_uncertainty_and_constants():
  columns, _ = _columns()
  assert score_column_names(columns) == ["memorization", "forgetting_events", "ssft"]


def test_table_equals_naive_references():
  columns, noisy = _columns()
  table = correlation_table(columns, noisy)
  names = table["names"]
  for i, a in enumerate(names):
    assert table["auroc_flipped"][i] == pytest.approx(_naive_auroc(columns[a], noisy))
    assert table["auroc_flipped"][i] == pytest.approx(auroc(columns[a], noisy))
    for j, b in enumerate(names):
      expected = 1.0 if i == j else _naive_spearman(columns[a], columns[b])
      assert table["spearman"][i, j] == pytest.approx(expected)
  assert table["n"].tolist() == [60, 56, 60]
  m, f, s = (names.index(k) for k in ("memorization", "forgetting_events", "ssft"))
  assert table["spearman"][m, f] > 0.5 and table["spearman"][m, s] < 0
  assert table["auroc_flipped"][s] < 0.2  # low SSFT flags flipped labels


def test_no_noise_gives_no_auroc_and_csv_round_trip():
  columns, _ = _columns()
  table = correlation_table(columns, np.zeros(60, bool))
  assert np.isnan(table["auroc_flipped"]).all()
  rows = list(csv.reader(io.StringIO(correlations_csv(table).decode())))
  assert rows[0] == ["score", *table["names"], "auroc_flipped", "n"]
  assert [r[0] for r in rows[1:]] == table["names"]
  assert float(rows[1][2]) == pytest.approx(table["spearman"][0, 1], abs=1e-4)
  assert rows[1][-2] == ""  # undefined AUROC is an empty cell, not 0
  assert any("Spearman correlation with memorization" in line for line in summary_lines(table))


def test_estimator_runs_last_and_sees_every_score(tiny_run):
  """In a run, correlations.csv covers every score column of scores.csv (it runs after the others)."""
  from jaxmem.scoring import read_scores_csv
  scores = read_scores_csv(tiny_run.run_dir / "scores.csv")
  header = (tiny_run.run_dir / "correlations.csv").read_text().splitlines()[0].split(",")
  assert header[1:-2] == score_column_names(scores)
  assert tiny_run.scores.estimators[-1] == "correlations"
