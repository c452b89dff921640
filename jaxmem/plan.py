"""``jaxmem plan``: what a run will cost, before it runs.

Sizes come from shapes alone: the records' bytes from the record fields and their dtypes, the
programs' device memory from XLA's analysis of the compiled training and evaluation programs
(compiled on abstract inputs: nothing is trained), so a cluster job can be sized on a laptop.
"""

from __future__ import annotations

import numpy as np

from jaxmem.data import Dataset


def shape_dataset(name: str, input_shape, num_train: int, num_test: int, num_classes: int) -> Dataset:
  """A dataset with the given shapes whose arrays take no memory (zero-stride broadcasts of one
  value): enough for an abstract :class:`jaxmem.engine.Engine` to compile and analyze programs."""
  shape = tuple(int(d) for d in input_shape)
  zeros = lambda n, dtype, *rest: np.broadcast_to(np.zeros((), dtype), (n,) + rest)
  labels = lambda n: np.broadcast_to(np.zeros((), np.int32), (n,))
  return Dataset(name=name, x_train=zeros(num_train, np.float32, *shape), y_train=labels(num_train),
                 x_test=zeros(num_test, np.float32, *shape), y_test=labels(num_test), num_classes=int(num_classes),
                 noisy=np.broadcast_to(np.zeros((), bool), (num_train,)), clean_y_train=labels(num_train))
