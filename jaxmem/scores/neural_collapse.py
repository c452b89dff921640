"""Memorization under neural collapse (survey def. 5; Nguyen et al. 2023, "Memorization-Dilation:
Modeling Neural Collapse Under Label Noise", eq. for mem(N)).

With label noise, K classes and penultimate features h_i of a trained network, let Ĩ^k be the
corrupted training examples whose (noisy) training label is k and h*_k the mean penultimate feature
of the unseen test examples of class k. The paper's memorization of a network is

    mem = Σ_k Σ_{i ∈ Ĩ^k} || h_i − h*_k ||_2 .

A network that "memorizes" a flipped label pulls its feature towards the class it was told (small
distance); one that keeps the feature where its true class lies leaves it far from h*_k.

What jaxmem adds, and where it differs from the paper:

* Per model, the sum (``total_M``) and the sum divided by the number of corrupted examples the
  model trained on (``per_example_M``), so runs of different sizes and subset ratios compare.
* Per example, the distance ``||h_i − h*_{y_i}||`` to the test mean of its *training* label is
  defined for every training example (clean ones too), and averaged over the models that trained on
  it (``keep_MxN``): the ``nc_distance`` column with its standard error over models. The paper sums
  only over corrupted examples of one network; the column restricted to flipped examples and
  summed is the paper's quantity averaged over models.
* A class with no test example has no h*_k: its examples get NaN (the paper assumes test data of
  every class).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from jaxmem.errors import JaxmemError


@dataclasses.dataclass
class NeuralCollapseResult:
  distance_MxN: np.ndarray   # ||h_i - h*_{y_i}|| per model and training example
  total_M: np.ndarray        # Σ over the corrupted examples each model trained on (the paper's mem)
  per_example_M: np.ndarray  # total_M / number of those examples (NaN for a model with none)
  column_N: np.ndarray       # mean distance over the models that trained on i (NaN: none did)
  column_se_N: np.ndarray    # its standard error over those models (NaN with fewer than two)


def class_test_means(test_features_MxTxF: np.ndarray, test_labels_T: np.ndarray, num_classes: int) -> np.ndarray:
  """(M, C, F) mean test feature of each class per model (NaN rows for a class without test data)."""
  one_hot_TxC = (np.asarray(test_labels_T)[:, None] == np.arange(num_classes)[None]).astype(np.float64)
  counts_C = one_hot_TxC.sum(axis=0)
  sums_MxCxF = np.einsum("tc,mtf->mcf", one_hot_TxC, np.asarray(test_features_MxTxF, np.float64))
  with np.errstate(invalid="ignore", divide="ignore"):
    return sums_MxCxF / np.where(counts_C > 0, counts_C, np.nan)[None, :, None]


def neural_collapse_memorization(train_features_MxNxF: np.ndarray, test_features_MxTxF: np.ndarray,
                                 train_labels_N: np.ndarray, test_labels_T: np.ndarray, noisy_N: np.ndarray,
                                 num_classes: int, keep_MxN: np.ndarray | None = None) -> NeuralCollapseResult:
  """Def. 5 for M models at once; ``train_labels_N`` are the labels trained on (after corruption),
  ``noisy_N`` marks the corrupted ones, ``keep_MxN`` which examples each model trained on (default:
  all)."""
  h_MxNxF = np.asarray(train_features_MxNxF, np.float64)
  m, n, _ = h_MxNxF.shape
  labels_N = np.asarray(train_labels_N)
  noisy_N = np.asarray(noisy_N, bool)
  if labels_N.shape != (n,) or noisy_N.shape != (n,):
    raise JaxmemError(f"train labels {labels_N.shape} and noisy {noisy_N.shape} must both be ({n},)")
  keep_MxN = np.ones((m, n), bool) if keep_MxN is None else np.asarray(keep_MxN, bool)
  means_MxCxF = class_test_means(test_features_MxTxF, test_labels_T, num_classes)
  distance_MxN = np.linalg.norm(h_MxNxF - means_MxCxF[:, labels_N, :], axis=-1)
  counted_MxN = keep_MxN & noisy_N[None]
  total_M = np.where(counted_MxN, distance_MxN, 0.0).sum(axis=1)
  num_M = counted_MxN.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    per_example_M = np.where(num_M > 0, total_M / np.maximum(num_M, 1), np.nan)
  in_N = keep_MxN.sum(axis=0)
  masked = np.where(keep_MxN, distance_MxN, np.nan)
  with warnings.catch_warnings():  # all-NaN columns (never trained on) are NaN by design
    warnings.simplefilter("ignore", RuntimeWarning)
    column_N = np.nanmean(masked, axis=0)
    column_se_N = np.where(in_N > 1, np.nanstd(masked, axis=0, ddof=1) / np.sqrt(np.maximum(in_N, 1)), np.nan)
  return NeuralCollapseResult(distance_MxN, total_M, per_example_M, column_N, column_se_N)

