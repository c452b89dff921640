"""The kNN probe equals scikit-learn's KNeighborsClassifier on fixed embeddings."""

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from jaxmem.errors import JaxmemError
from jaxmem.scores.knn_probe import knn_predict, knn_probe_accuracy


@pytest.mark.parametrize("k", [1, 4, 5, 20])
def test_knn_equals_sklearn(k):
  rng = np.random.default_rng(k)
  train, test = rng.normal(size=(300, 7)), rng.normal(size=(2100, 7))  # more queries than one block
  labels = rng.integers(0, 4, 300)
  expected = KNeighborsClassifier(n_neighbors=k).fit(train, labels).predict(test)
  np.testing.assert_array_equal(knn_predict(train, labels, test, k, 4), expected)


def test_probe_accuracy_per_model_and_bad_k():
  rng = np.random.default_rng(0)
  train, test = rng.normal(size=(3, 50, 4)), rng.normal(size=(3, 20, 4))
  labels, test_labels = rng.integers(0, 3, 50), rng.integers(0, 3, 20)
  acc = knn_probe_accuracy(train, labels, test, test_labels, 3, 3)
  for m in range(3):
    assert acc[m] == (KNeighborsClassifier(3).fit(train[m], labels).predict(test[m]) == test_labels).mean()
  with pytest.raises(JaxmemError, match="k must be in 1..50"):
    knn_predict(train[0], labels, test[0], 51, 3)
