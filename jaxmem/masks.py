"""Membership designs: which models train on which examples.

``keep_MxN[m, i]`` is True when model m trains on example i. Every design is deterministic from the
seed, and row m depends only on (seed, m) — or on (seed, pair) for complementary pairs — so a run
with more models extends, rather than reshuffles, a smaller one.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from jaxmem.registry import Registry

MaskDesign = Callable[[int, int, Sequence[float], int], "tuple[np.ndarray, np.ndarray]"]
MASK_DESIGNS: Registry[MaskDesign] = Registry("mask design")

_SUBSET_TAG = 0x5B5E7
_BALANCED_TAG = 0xBA1A
_RATIO_TAG = 0x7A710


def ratio_of_models(num_models: int, subset_ratios: Sequence[float]) -> np.ndarray:
  """Subset ratio of every model: ratios are interleaved (model m gets ratio m mod R), so the
  first models of a run cover every ratio — partial runs can already be scored per ratio."""
  ratios = np.asarray(subset_ratios, dtype=np.float64)
  return ratios[np.arange(num_models) % len(ratios)]


@MASK_DESIGNS.register("subset")
def subset_masks(num_models: int, num_train: int, subset_ratios: Sequence[float], seed: int):
  """Feldman & Zhang (2020): model m trains on a uniformly random subset of exactly
  round(r_m * N) examples, drawn without replacement."""
  ratio_M = ratio_of_models(num_models, subset_ratios)
  keep_MxN = np.zeros((num_models, num_train), dtype=bool)
  for m in range(num_models):
    rng = np.random.default_rng([seed, _SUBSET_TAG, m])
    size = int(round(ratio_M[m] * num_train))
    keep_MxN[m, rng.choice(num_train, size=size, replace=False)] = True
  return keep_MxN, ratio_M.astype(np.float32)


@MASK_DESIGNS.register("balanced")
def balanced_masks(num_models: int, num_train: int, subset_ratios: Sequence[float], seed: int):
  """LiRA-style (Carlini et al. 2022): every example is in exactly half of the models. Models come
  in complementary pairs (2k, 2k+1): a random half of the data and the other half."""
  if num_models % 2:
    raise ValueError(f"balanced masks need an even number of models, got {num_models}")
  keep_MxN = np.zeros((num_models, num_train), dtype=bool)
  for pair in range(num_models // 2):
    rng = np.random.default_rng([seed, _BALANCED_TAG, pair])
    first = rng.permutation(num_train)[: num_train // 2]
    keep_MxN[2 * pair, first] = True
    keep_MxN[2 * pair + 1] = ~keep_MxN[2 * pair]
  return keep_MxN, np.full(num_models, 0.5, dtype=np.float32)


def make_masks(design: str, num_models: int, num_train: int, subset_ratios: Sequence[float], seed: int):
  """Returns ``(keep_MxN bool, subset_ratio_M float32)`` for a registered design."""
  return MASK_DESIGNS.get(design)(num_models, num_train, tuple(subset_ratios), seed)
