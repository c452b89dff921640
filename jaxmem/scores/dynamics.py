"""Learning dynamics: forgetting events, first-learned epoch, cumulative accuracy, FSLT/SSFT, EL2N/GraNd.

All functions take per-epoch correctness histories ``correct_MxExN`` (model m, evaluation after
epoch e = 1..E, example i) recorded by the engine with ``record_epochs`` (every training example is
evaluated after each epoch's last update), and aggregate over the models that trained on an example.

* **Forgetting events** (Toneva et al. 2019, "An Empirical Study of Example Forgetting during Deep
  Neural Network Learning", def. 8 of the survey): the number of transitions correct -> incorrect
  between consecutive evaluations. Per model, then averaged over the models that trained on the
  example *and learned it at least once*. A model that never classified the example correctly has
  no finite count (Toneva et al. call such examples "never learned" and sort them as if forgotten
  infinitely often; their code adds the number of epochs). We keep the count finite and honest:
  such models are left out of ``forgetting_events`` and reported in ``never_learned_fraction``; an
  example no model ever learned has ``forgetting_events`` = NaN (an empty cell), never 0.
  Difference from the reference code: Toneva et al. record accuracy when an example is presented in
  its mini-batch (before that step's update); we evaluate all examples after each epoch (as Maini et
  al. do), so the count has at most floor(E/2) events and does not depend on the batch order.
* **First-learned epoch** (def. 9 applied to ordinary training): the earliest epoch after which the
  example stays correct, 1-based: 1 if correct at every evaluation, E + 1 if wrong at the last one
  (not learned by the end: a censored time, as Maini et al.'s code which pads the history with a
  final all-correct row). Averaged over the models that trained on the example, sentinel included.
* **Cumulative accuracy**: mean correctness over all epochs (the learning-speed proxy of Jiang et
  al. 2021, "Characterizing Structural Regularities of Labeled Data", sec. 5), over models that
  trained on the example.
* **FSLT / SSFT** (Maini et al. 2022, "Characterizing Datapoints via Second-Split Forgetting",
  defs. 9-10): on the first split, the first-learned epoch as above; on the second phase (training on
  the other split), the earliest epoch after which the example is never again correct, 1-based:
  E + 1 if it is still correct at the last evaluation (never forgotten), 1 if never correct during
  the second phase. Identical to ``get_first_epoch_where_we_learn_forever`` / ``..._forget_forever``
  in pratyushmaini/ssft, averaged over models (with the sentinels, as their ``masks_to_ssft.py``).
* **EL2N / GraNd** (Paul et al. 2021, "Deep Learning on a Data Diet", eqs. 1-2): per model computed by
  the engine after ``score_epoch`` epochs; here averaged over the models that trained on the example
  (Paul et al. train on the full set; with subset models an example's score is only meaningful in
  the models that saw it).
Every column comes with a standard error over models (``_se``: sample std / sqrt(n)).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxmem.scores._result import EstimatorResult
from jaxmem.scores._stats import MaskedMean, auroc, masked_mean  # noqa: F401  (MaskedMean: the studies' import path)


def forgetting_counts(correct_MxExN: np.ndarray) -> np.ndarray:
  """Number of correct -> incorrect transitions between consecutive evaluations, (M, N) int."""
  c = np.asarray(correct_MxExN, dtype=bool)
  return (c[:, :-1] & ~c[:, 1:]).sum(axis=1)


def learned_forever_epoch(correct_MxExN: np.ndarray) -> np.ndarray:
  """Earliest 1-based epoch from which every evaluation is correct; E + 1 if the last is wrong
  (Maini et al.'s ``get_first_epoch_where_we_learn_forever``). (M, N) int."""
  wrong = ~np.asarray(correct_MxExN, dtype=bool)
  num_epochs = wrong.shape[1]
  last_wrong = num_epochs - 1 - np.argmax(wrong[:, ::-1], axis=1)  # 0-based, valid where any wrong
  return np.where(wrong.any(axis=1), last_wrong + 2, 1)


def forgotten_forever_epoch(correct_MxExN: np.ndarray) -> np.ndarray:
  """Earliest 1-based epoch from which every evaluation is wrong; E + 1 if the last is correct
  (Maini et al.'s ``get_first_epoch_where_we_forget_forever``). (M, N) int."""
  return learned_forever_epoch(~np.asarray(correct_MxExN, dtype=bool))


class DynamicsScores(NamedTuple):
  forgetting_events: np.ndarray       # (N,) NaN where no training model ever learned the example
  forgetting_events_se: np.ndarray
  never_learned_fraction: np.ndarray  # (N,) among models that trained on the example
  first_learned_epoch: np.ndarray     # (N,) 1..E+1 (E+1: not learned by the end)
  first_learned_epoch_se: np.ndarray
  cumulative_accuracy: np.ndarray     # (N,) mean correctness over epochs
  cumulative_accuracy_se: np.ndarray
  n_models: np.ndarray                # (N,) models that trained on the example


def dynamics_scores(keep_MxN: np.ndarray, correct_MxExN: np.ndarray) -> DynamicsScores:
  """Forgetting events, never-learned fraction, first-learned epoch and cumulative accuracy of every
  training example, over the models that trained on it (see the module docstring)."""
  keep = np.asarray(keep_MxN, dtype=bool)
  correct = np.asarray(correct_MxExN, dtype=bool)
  if correct.ndim != 3 or correct.shape[0] != keep.shape[0] or correct.shape[2] != keep.shape[1]:
    raise ValueError(f"correct {correct.shape} must be (M, E, N) for keep {keep.shape}")
  learned = correct.any(axis=1)
  forgetting = masked_mean(forgetting_counts(correct), keep & learned)
  never = masked_mean(~learned, keep)
  first = masked_mean(learned_forever_epoch(correct), keep)
  cumulative = masked_mean(correct.mean(axis=1), keep)
  return DynamicsScores(forgetting.mean, forgetting.se, never.mean, first.mean, first.se,
                        cumulative.mean, cumulative.se, never.n)


def split_learning_times(correct_first_MxExN: np.ndarray, correct_second_MxFxN: np.ndarray):
  """FSLT and SSFT per model, (M, N) each: first-split learning time from the first phase's
  history and second-split forgetting time from the second phase's history of the same examples."""
  return learned_forever_epoch(correct_first_MxExN), forgotten_forever_epoch(correct_second_MxFxN)


def _noisy_summary(name: str, values: np.ndarray, noisy: np.ndarray) -> dict:
  """Mean of a score on flipped vs clean labels, and its AUROC for finding the flipped ones."""
  if not noisy.any() or noisy.all():
    return {}
  return {f"{name}_flipped_mean": float(np.nanmean(values[noisy])), f"{name}_clean_mean": float(np.nanmean(values[~noisy])),
          f"{name}_auroc": auroc(values, noisy)}


def dynamics_columns(records, *, context=None) -> EstimatorResult:
  correct_MxExN = records["train_correct_epochs"]
  scores = dynamics_scores(records.keep, correct_MxExN)
  columns = {name: getattr(scores, name) for name in DynamicsScores._fields if name != "n_models"}
  columns["_epochs"] = np.full(correct_MxExN.shape[2], correct_MxExN.shape[1])  # hidden: for the summary
  return EstimatorResult(columns=columns)


def dynamics_summary(columns, records, **options) -> dict:
  summary = {"epochs_recorded": int(columns["_epochs"][0]) if len(columns["_epochs"]) else 0,
             "never_learned_by_any_model": int(np.sum(columns["never_learned_fraction"] == 1.0)),
             "unforgettable": int(np.sum(columns["forgetting_events"] == 0)),
             "mean_forgetting_events": float(np.nanmean(columns["forgetting_events"]))
             if np.isfinite(columns["forgetting_events"]).any() else float("nan")}
  noisy = np.asarray(records.noisy, dtype=bool)
  for name in ("forgetting_events", "first_learned_epoch"):
    summary.update(_noisy_summary(name, columns[name], noisy))
  return summary


def el2n_grand_columns(records, *, context=None) -> EstimatorResult:
  columns = {}
  for name in ("el2n", "grand"):
    result = masked_mean(records[f"train_{name}"], records.keep)
    columns[name], columns[f"{name}_se"] = result.mean, result.se
  return EstimatorResult(columns=columns)


def el2n_grand_summary(columns, records, **options) -> dict:
  noisy = np.asarray(records.noisy, dtype=bool)
  summary = {}
  for name in ("el2n", "grand"):
    summary.update(_noisy_summary(name, columns[name], noisy))
  return summary
