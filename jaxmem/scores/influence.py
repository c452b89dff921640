"""Subsampled influence (Feldman & Zhang 2020, "What Neural Networks Memorize and Why", eq. 6).

Definition (survey eq. 6): for training example i and test example j,

  infl(i → j) = P[f(x'_j) = y'_j | i ∈ S] − P[f(x'_j) = y'_j | i ∉ S],

estimated from M models trained on random subsets S_m (keep K, M×N) and their test correctness
(C, M×T) as a difference of two means. With n_in = 1ᵀK, sums_in = Kᵀ C (N×T) and the complements
n_out = M − n_in, sums_out = 1ᵀC − sums_in:

  infl[i, j] = sums_in[i, j] / n_in[i] − sums_out[i, j] / n_out[i].

The N×T matrix is computed in blocks of training examples on the device (one matmul per block,
float32 at full precision so counts stay exact), and only the top-k per test example and per
training example are kept, merged across blocks with ``lax.top_k``: memory is O(block × T), never
N×T, unless the full matrix is asked for (then it is streamed block by block into a ``.npy``).

Standard error: Agresti & Caffo (2000), as for memorization (:mod:`jaxmem.scores.memorization`):
each group gets one pseudo-success and one pseudo-failure, ``p̃ = (s + 1) / (n + 2)`` and
``se = sqrt(p̃_in (1 − p̃_in) / (n_in + 2) + p̃_out (1 − p̃_out) / (n_out + 2))``; the estimate itself
is the plain difference. Pairs whose train example has no in- or no out-model are NaN. With several
subset ratios the difference is taken within each ratio and averaged with equal weight (pooling
would report the accuracy gap between ratios as influence), SE ``sqrt(Σ_r se_r²) / R``.

High-influence pairs (Feldman & Zhang 2020, Sec. 4 and the released CIFAR-100/ImageNet pair lists):
pairs with infl(i → j) ≥ 0.15 whose training example has memorization ≥ 0.25; both thresholds
are options here.

Differences from the reference code (google-research/heldout-influence-estimation,
``mnist_infl_mem.py``): it materializes the dense T×N matrix (10k×60k floats, 2.3 GB for
CIFAR-scale) and gives no error bars; we keep the top-k with standard errors, return NaN instead
of a number computed from an empty group (it divides by max(n, 1e-10)), and store the optional
full matrix as train × test (N, T), i.e. ``infl[i, j]``, the transpose of its ``(T, N)`` array.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem.errors import JaxmemError
from jaxmem.scores._result import EstimatorResult
from jaxmem.scores._stats import block_size_for_budget, in_out_pair_sums, ratio_strata
from jaxmem.scores.memorization import memorization

#: Feldman & Zhang's (2020) thresholds for "high-influence pairs".
HIGH_INFLUENCE = 0.15
HIGH_MEMORIZATION = 0.25

_HIGHEST = jax.lax.Precision.HIGHEST


class InfluenceTopK(NamedTuple):
  """Top-k influence in both directions, with standard errors. Unused slots (k larger than the
  number of candidates, or NaN influence) have index −1 and NaN values."""
  train_for_test_TxK: np.ndarray      # (T, k) train indices most influential on each test example
  influence_for_test_TxK: np.ndarray  # (T, k) their influence, descending
  se_for_test_TxK: np.ndarray
  test_for_train_NxK: np.ndarray      # (N, k) test indices most influenced by each train example
  influence_for_train_NxK: np.ndarray
  se_for_train_NxK: np.ndarray


def _as_float(keep_MxN, correct_MxT):
  keep_MxN, correct_MxT = np.asarray(keep_MxN, bool), np.asarray(correct_MxT)
  if keep_MxN.ndim != 2 or correct_MxT.ndim != 2 or keep_MxN.shape[0] != correct_MxT.shape[0]:
    raise ValueError(f"keep {keep_MxN.shape} and test correct {correct_MxT.shape} must be (M, N) and (M, T)")
  return keep_MxN, correct_MxT.astype(bool)


def _block_influence(keep_MxB: jax.Array, correct_MxT: jax.Array, onehot_MxR: jax.Array):
  """Influence and its Agresti-Caffo SE for a block of B training examples: (B, T) each.

  Per ratio, ``infl_r = (s_in·n_out − s_out·n_in) / (n_in·n_out)``: the numerator is a difference of
  two products of integer counts, so where the two proportions agree it is exactly 0 and so is the
  influence (``s_in/n_in − s_out/n_out`` is not: XLA's CPU division by a broadcast divisor rounds
  61/61 to 0.99999994, and top-k lists would rank that float noise). The ratios' values are then
  averaged with equal weight, SE ``sqrt(Σ_r se_r²) / R``."""
  n_in_RxB, n_out_RxB, s_in_RxBxT, s_out_RxBxT = in_out_pair_sums(keep_MxB, correct_MxT, onehot_MxR)
  n_in, n_out = n_in_RxB[..., None], n_out_RxB[..., None]
  valid_BxT = jnp.all((n_in > 0) & (n_out > 0), axis=0)
  numerator = s_in_RxBxT * n_out - s_out_RxBxT * n_in
  infl_RxBxT = numerator / jnp.maximum(n_in * n_out, 1)
  p_in, p_out = (s_in_RxBxT + 1) / (n_in + 2), (s_out_RxBxT + 1) / (n_out + 2)
  var_RxBxT = p_in * (1 - p_in) / (n_in + 2) + p_out * (1 - p_out) / (n_out + 2)
  r = onehot_MxR.shape[1]
  infl = infl_RxBxT[0] if r == 1 else infl_RxBxT.mean(axis=0)
  se = jnp.sqrt(var_RxBxT[0] if r == 1 else var_RxBxT.sum(axis=0) / r**2)
  return jnp.where(valid_BxT, infl, jnp.nan), jnp.where(valid_BxT, se, jnp.nan)


@jax.jit
def _dense_block(keep_MxB, correct_MxT, onehot_MxR):
  return _block_influence(keep_MxB, correct_MxT, onehot_MxR)


def _top_k(values, k):
  """lax.top_k along the last axis with NaN ranked last (NaN → −inf for the ranking)."""
  return jax.lax.top_k(jnp.where(jnp.isnan(values), -jnp.inf, values), k)


@functools.partial(jax.jit, static_argnames=("k_test", "k_train"))
def _topk_block(carry, keep_MxB, start, num_train, correct_MxT, onehot_MxR, *, k_test, k_train):
  """One block: its influence, the per-train top-k inside it, and the per-test running top-k
  merged with the block's candidates (earlier blocks first, so ties keep the lower index)."""
  best_val_TxK, best_se_TxK, best_idx_TxK = carry
  infl_BxT, se_BxT = _block_influence(keep_MxB, correct_MxT, onehot_MxR)
  b = infl_BxT.shape[0]
  index_B = start + jnp.arange(b)
  # padding rows (past num_train) never win
  infl_BxT = jnp.where((index_B < num_train)[:, None], infl_BxT, jnp.nan)

  # top-k test examples per train example: complete within the block
  _, pos_BxK = _top_k(infl_BxT, k_train)
  val_BxK = jnp.take_along_axis(infl_BxT, pos_BxK, axis=1)
  se_BxK = jnp.take_along_axis(se_BxT, pos_BxK, axis=1)

  # top-k train examples per test example: merge block candidates into the running best
  kb = min(k_test, b)
  _, pos_TxKb = _top_k(infl_BxT.T, kb)
  cand_val = jnp.take_along_axis(infl_BxT.T, pos_TxKb, axis=1)
  cand_se = jnp.take_along_axis(se_BxT.T, pos_TxKb, axis=1)
  cand_idx = index_B[pos_TxKb]
  all_val = jnp.concatenate([best_val_TxK, cand_val], axis=1)
  all_se = jnp.concatenate([best_se_TxK, cand_se], axis=1)
  all_idx = jnp.concatenate([best_idx_TxK, cand_idx], axis=1)
  _, pos = _top_k(all_val, k_test)
  new_carry = (jnp.take_along_axis(all_val, pos, axis=1), jnp.take_along_axis(all_se, pos, axis=1),
               jnp.take_along_axis(all_idx, pos, axis=1))
  return new_carry, (val_BxK, se_BxK, pos_BxK), infl_BxT, se_BxT


class InfluenceComputation:
  """Blocked influence over training examples; each method streams the blocks once.

  Args:
    keep_MxN: bool, model m trained on training example i; or a callable ``read_keep(block) ->
      keep_MxB`` for a slice of training examples (records read block by block, never whole), with
      ``num_train`` given.
    test_correct_MxT: bool, model m classifies test example j correctly.
    ratio_M: subset ratio of every model (None: one ratio); influence is taken within each ratio
      and averaged over ratios, as memorization.
    block_size: training examples per block (memory is O(block_size × R × T) on the device).
  """

  def __init__(self, keep_MxN, test_correct_MxT, *, ratio_M=None, block_size: int = 1024,
               num_train: int | None = None):
    if callable(keep_MxN):
      correct_MxT = np.asarray(test_correct_MxT).astype(bool)
      if num_train is None or correct_MxT.ndim != 2:
        raise ValueError("reading keep by blocks needs num_train and a (M, T) test correctness")
      self._read_keep = keep_MxN
      self.num_models, self.num_train = correct_MxT.shape[0], int(num_train)
    else:
      keep_MxN, correct_MxT = _as_float(keep_MxN, test_correct_MxT)
      self._read_keep = lambda block: keep_MxN[:, block]
      self.num_models, self.num_train = keep_MxN.shape
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
      raise JaxmemError(f"influence block size must be a positive integer, got {block_size!r}")
    self.num_test = correct_MxT.shape[1]
    self.block_size = int(min(block_size, max(self.num_train, 1)))
    self._correct = jnp.asarray(correct_MxT, jnp.float32)
    self.ratios, onehot_MxR = ratio_strata(np.zeros(self.num_models) if ratio_M is None else ratio_M)
    if onehot_MxR.shape[0] != self.num_models:
      raise ValueError(f"subset ratios {onehot_MxR.shape[0]} do not match {self.num_models} models")
    self._onehot = jnp.asarray(onehot_MxR)

  def blocks(self):
    """Yields ``(start, keep_MxB)`` with the last block zero-padded to ``block_size`` (one
    compilation for all blocks; padded columns are masked out)."""
    for start in range(0, self.num_train, self.block_size):
      block = np.asarray(self._read_keep(slice(start, min(start + self.block_size, self.num_train))), bool)
      if block.shape[1] < self.block_size:
        block = np.pad(block, ((0, 0), (0, self.block_size - block.shape[1])))
      yield start, jnp.asarray(block, jnp.float32)

  def dense_blocks(self):
    """Yields ``(start, influence_BxT, se_BxT)`` as numpy, unpadded."""
    for start, keep_MxB in self.blocks():
      infl, se = _dense_block(keep_MxB, self._correct, self._onehot)
      stop = min(start + self.block_size, self.num_train)
      yield start, np.asarray(infl[: stop - start]), np.asarray(se[: stop - start])

  def top_k(self, k: int, *, memorization_N: np.ndarray | None = None,
            pair_influence: float | None = None, pair_memorization: float | None = None):
    """Top-k in both directions and, if ``pair_influence`` is given, the high-influence pairs
    ``(train_index, test_index, influence, se)`` with influence ≥ ``pair_influence`` whose train
    example has memorization ≥ ``pair_memorization`` (needs ``memorization_N``)."""
    if not isinstance(k, (int, np.integer)) or k < 1:
      raise JaxmemError(f"influence top-k must be a positive integer, got {k!r}")
    # NaN compares false with everything, so a NaN threshold silently found no pair at all
    for flag, value in (("--influence-threshold", pair_influence), ("--memorization-threshold", pair_memorization)):
      if value is not None and not (isinstance(value, (int, float, np.number)) and np.isfinite(value)):
        raise JaxmemError(f"{flag} must be a finite number, got {value!r}")
    k_test, k_train = int(min(k, self.num_train)), int(min(k, self.num_test))
    t = self.num_test
    carry = (jnp.full((t, k_test), -jnp.inf, jnp.float32), jnp.full((t, k_test), jnp.nan, jnp.float32),
             jnp.full((t, k_test), -1, jnp.int32))
    per_train_val, per_train_se, per_train_idx, pairs = [], [], [], []
    eligible_N = None
    if pair_influence is not None:
      eligible_N = np.ones(self.num_train, bool)
      if pair_memorization is not None:
        if memorization_N is None:
          raise ValueError("pair_memorization needs memorization_N")
        eligible_N = np.nan_to_num(np.asarray(memorization_N, np.float64), nan=-np.inf) >= pair_memorization
    for start, keep_MxB in self.blocks():
      carry, (val, se, pos), infl_BxT, se_BxT = _topk_block(
          carry, keep_MxB, start, self.num_train, self._correct, self._onehot, k_test=k_test, k_train=k_train)
      stop = min(start + self.block_size, self.num_train)
      per_train_val.append(np.asarray(val[: stop - start]))
      per_train_se.append(np.asarray(se[: stop - start]))
      per_train_idx.append(np.asarray(pos[: stop - start]))
      if eligible_N is not None and eligible_N[start:stop].any():
        # only this block's mask comes to the host, and only for blocks with eligible examples
        hit = np.asarray(jnp.nan_to_num(infl_BxT, nan=-jnp.inf) >= pair_influence)[: stop - start]
        hit = hit & eligible_N[start:stop, None]
        rows, cols = np.nonzero(hit)
        if len(rows):
          pairs.append((start + rows, cols, np.asarray(infl_BxT)[rows, cols], np.asarray(se_BxT)[rows, cols]))
    best_val, best_se, best_idx = (np.asarray(a) for a in carry)
    best_idx = np.where(np.isfinite(best_val), best_idx, -1)
    best_val = np.where(np.isfinite(best_val), best_val, np.nan)
    best_se = np.where(best_idx >= 0, best_se, np.nan)
    val_N = np.concatenate(per_train_val) if per_train_val else np.zeros((0, k_train), np.float32)
    se_N = np.concatenate(per_train_se) if per_train_se else np.zeros((0, k_train), np.float32)
    idx_N = np.concatenate(per_train_idx) if per_train_idx else np.zeros((0, k_train), np.int32)
    idx_N = np.where(np.isnan(val_N), -1, idx_N)
    se_N = np.where(idx_N >= 0, se_N, np.nan)
    topk = InfluenceTopK(best_idx, best_val, best_se, idx_N, val_N, se_N)
    if pair_influence is None:
      return topk, None
    if pairs:
      train_i, test_j, value, se = (np.concatenate(p) for p in zip(*pairs))
      order = np.lexsort((test_j, train_i, -value))
      pair_arrays = (train_i[order], test_j[order], value[order], se[order])
    else:
      pair_arrays = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32))
    return topk, pair_arrays

  @property
  def shape(self) -> tuple[int, int]:
    return (self.num_train, self.num_test)


def influence(keep_MxN, test_correct_MxT, *, ratio_M=None, block_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """The full (N, T) influence matrix and its standard errors (for small problems and tests)."""
  comp = InfluenceComputation(keep_MxN, test_correct_MxT, ratio_M=ratio_M, block_size=block_size)
  infl = np.full((comp.num_train, comp.num_test), np.nan, np.float32)
  se = np.full_like(infl, np.nan)
  for start, block, block_se in comp.dense_blocks():
    infl[start: start + block.shape[0]] = block
    se[start: start + block.shape[0]] = block_se
  return infl, se


def influence_topk(keep_MxN, test_correct_MxT, k: int = 10, *, ratio_M=None, block_size: int = 1024) -> InfluenceTopK:
  """Top-k influence per test example and per training example without the N×T matrix."""
  return InfluenceComputation(keep_MxN, test_correct_MxT, ratio_M=ratio_M, block_size=block_size).top_k(k)[0]


def topk_table(topk: InfluenceTopK, memorization_N: np.ndarray) -> dict[str, np.ndarray]:
  """Columns of ``influence_topk.csv``: direction ``test`` lists the top train examples for each
  test example, then direction ``train`` the top test examples for each train example; rank 1 is
  the largest; unused slots are left out."""
  mem = np.asarray(memorization_N, np.float64)
  parts = []
  for direction, idx, val, se, own_is_test in (
      ("test", topk.train_for_test_TxK, topk.influence_for_test_TxK, topk.se_for_test_TxK, True),
      ("train", topk.test_for_train_NxK, topk.influence_for_train_NxK, topk.se_for_train_NxK, False)):
    own, rank = np.nonzero(idx >= 0)
    other = idx[own, rank].astype(np.int64)
    test_j, train_i = (own, other) if own_is_test else (other, own)
    parts.append({"test_index": test_j, "train_index": train_i,
                  "influence": val[own, rank].astype(np.float64), "influence_se": se[own, rank].astype(np.float64),
                  "memorization": mem[train_i], "direction": np.full(len(own), direction, object),
                  "rank": rank.astype(np.int64) + 1})
  return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def influence_estimator(records, *, context=None, topk: int = 10, full: bool = False, block_size: int = 1024,
                        pair_influence: float = HIGH_INFLUENCE,
                        pair_memorization: float = HIGH_MEMORIZATION) -> EstimatorResult:
  """Adapter: tables ``influence_topk`` and ``influence_pairs`` and, with ``full``, the matrix
  ``influence`` (N, T), produced block by block."""
  context = context or {}
  mem_N = context.get("memorization")
  if mem_N is None:  # not computed in this scoring run: by blocks of training examples, as the influence
    mem_N = np.concatenate([
        memorization(records.read("keep", examples=b), records.read("train_correct", examples=b),
                     records.subset_ratio).estimate
        for b in records.example_blocks(block_size_for_budget(records, ["train_correct"]))])
  # keep is read one block of training examples at a time: only (M, T) test records are whole
  comp = InfluenceComputation(lambda block: records.read("keep", examples=block), records.read("test_correct"),
                              ratio_M=records.subset_ratio, block_size=block_size, num_train=records.num_train)
  topk_result, pairs = comp.top_k(topk, memorization_N=mem_N, pair_influence=pair_influence,
                                  pair_memorization=pair_memorization)
  train_i, test_j, value, se = pairs
  pair_table = {"test_index": test_j.astype(np.int64), "train_index": train_i.astype(np.int64),
                "influence": value.astype(np.float64), "influence_se": se.astype(np.float64),
                "memorization": np.asarray(mem_N, np.float64)[train_i],
                "test_label": np.asarray(records.test_labels)[test_j].astype(np.int64),
                "train_label": np.asarray(records.train_labels)[train_i].astype(np.int64)}
  best = topk_result.influence_for_test_TxK[:, 0]
  summary = {"topk": int(topk), "high_influence_pairs": int(len(value)),
             "pair_influence_threshold": float(pair_influence), "pair_memorization_threshold": float(pair_memorization),
             "train_examples_in_pairs": int(len(np.unique(train_i))), "test_examples_in_pairs": int(len(np.unique(test_j))),
             "median_max_influence_per_test": float(np.nanmedian(best)) if np.isfinite(best).any() else float("nan"),
             "num_models": int(comp.num_models),
             "median_pair_se": float(np.nanmedian(se)) if np.isfinite(se).any() else float("nan"),
             "pairs_within_two_se": int(np.sum(value < 2 * se))}
  return EstimatorResult(summary=summary,
                         tables={"influence_topk": topk_table(topk_result, mem_N), "influence_pairs": pair_table},
                         matrices={"influence": comp} if full else {})
