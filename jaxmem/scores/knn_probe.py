"""k-nearest-neighbour probe of fixed embeddings (Anagnostidis et al. 2023, "The Curious Case of
Benign Memorization", ICLR; survey def. 4).

The probe is the paper's measure of how useful a layer's features are: a kNN classifier fitted on
the training examples' embeddings with their *clean* labels and evaluated on the test examples.
It is exactly scikit-learn's ``KNeighborsClassifier(n_neighbors=k)`` with its defaults (uniform
weights, Euclidean distance): the k nearest training embeddings vote and a tied vote goes to the
smallest class index. (Neighbours at exactly equal distances may be taken in another order than
scikit-learn's; with continuous embeddings this does not arise.) The paper uses k = 20 on the
full training set; k is the caller's.
"""

from __future__ import annotations

import numpy as np

from jaxmem.errors import JaxmemError

# Test examples per distance block: bounds memory at block x N float64 values.
_BLOCK = 1024


def knn_predict(train_NxF: np.ndarray, train_labels_N: np.ndarray, query_TxF: np.ndarray, k: int,
                num_classes: int) -> np.ndarray:
  """(T,) predicted class of each query by a majority vote of its k nearest training embeddings."""
  train = np.asarray(train_NxF, np.float64)
  query = np.asarray(query_TxF, np.float64)
  labels_N = np.asarray(train_labels_N, np.int64)
  if not 1 <= k <= train.shape[0]:
    raise JaxmemError(f"k must be in 1..{train.shape[0]} (the training examples), got {k}")
  train_sq_N = (train ** 2).sum(axis=1)
  out = np.empty(query.shape[0], np.int64)
  for start in range(0, query.shape[0], _BLOCK):
    q = query[start: start + _BLOCK]
    # Squared distances up to the per-query constant |q|^2, which does not change the ranking.
    d_BxN = train_sq_N[None] - 2 * q @ train.T
    nearest_BxK = np.argpartition(d_BxN, k - 1, axis=1)[:, :k]
    votes_BxC = np.zeros((q.shape[0], num_classes), np.int64)
    np.add.at(votes_BxC, (np.repeat(np.arange(q.shape[0]), k), labels_N[nearest_BxK].ravel()), 1)
    out[start: start + q.shape[0]] = votes_BxC.argmax(axis=1)  # first maximum: the smallest class
  return out


def knn_probe_accuracy(train_MxNxF: np.ndarray, train_labels_N: np.ndarray, test_MxTxF: np.ndarray,
                       test_labels_T: np.ndarray, k: int, num_classes: int) -> np.ndarray:
  """(M,) test accuracy of the kNN probe of each model's embeddings."""
  test_labels_T = np.asarray(test_labels_T)
  return np.array([(knn_predict(train_MxNxF[m], train_labels_N, test_MxTxF[m], k, num_classes) == test_labels_T).mean()
                   for m in range(np.shape(train_MxNxF)[0])])
