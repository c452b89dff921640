"""Memorization of text by language models: counterfactual memorization, verbatim extraction and
sequence-level membership signals. Pure functions of record arrays.

* **Counterfactual memorization** (Zhang et al. 2021, "Counterfactual Memorization in Neural
  Language Models", eq. 1 / survey def. 3): mem_i = E[M(f, x_i) | x_i ∈ S] − E[M(f, x_i) | x_i ∉ S]
  with M the per-token accuracy of sequence x_i under teacher forcing (their choice), estimated over
  the run's subset models; and the same difference of the per-token log-likelihood
  (``memorization_loglik``). The paper trains on random halves and takes the plain difference of
  means; here the subset ratio is the run's and the standard error is Welch's. Copies of a sequence
  share its membership, so this is the memorization of a sequence with all its duplicates.
* **Exact memorization** (Tirumala et al. 2022, survey def. 2): per model and epoch, the fraction of
  the next tokens of its training sequences that arg-max predicts, from the per-epoch records.
* **k-extractable** (Carlini et al. 2023, "Quantifying Memorization Across Neural Language Models",
  §2): a training sequence p‖q is extractable when greedy decoding from the prefix p (here: each
  sequence's ``prefix_len`` tokens) emits q. Per sequence: the fraction of models that trained on
  it and extract it, with a plus-two standard error; the same among models that did not is the
  control (a sequence predictable from the rest of the corpus is extractable without being seen).
* **Membership signals** (higher = more likely a member): LOSS (Yeom et al. 2018: −mean token
  loss), zlib (Carlini et al. 2021, "Extracting Training Data from Large Language Models", §5.1:
  −(log-perplexity / zlib entropy), zlib entropy the bits of the zlib-compressed text), and Min-K%
  Prob (Shi et al. 2024, "Detecting Pretraining Data from Large Language Models", eq. 1: the mean
  of the k% lowest token log-probabilities). Shi et al.'s code takes ``int(k·n)`` tokens, which is
  0 for short sequences (a NaN mean); here at least one token is taken.
"""

from __future__ import annotations

import numpy as np
from jaxmem.scores._stats import InOutDifference, in_out_difference, plus_two_se


def per_token_loglik(loglik_MxN: np.ndarray, num_targets_N: np.ndarray) -> np.ndarray:
  """Sequence log-likelihood divided by its number of predicted tokens."""
  return np.asarray(loglik_MxN, np.float64) / np.maximum(np.asarray(num_targets_N, np.float64), 1.0)[None, :]


def text_memorization(keep_MxN: np.ndarray, token_accuracy_MxN: np.ndarray) -> InOutDifference:
  """Zhang et al. (2021) counterfactual memorization with M = per-token accuracy."""
  keep_MxN = np.asarray(keep_MxN, bool)
  if keep_MxN.shape != np.shape(token_accuracy_MxN):
    raise ValueError(f"keep {keep_MxN.shape} and token accuracy {np.shape(token_accuracy_MxN)} differ in shape")
  return in_out_difference(keep_MxN, token_accuracy_MxN)


def exact_memorization(keep_MxN: np.ndarray, token_accuracy_MxExN: np.ndarray, num_targets_N: np.ndarray,
                       copies_N: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Exact memorization (survey def. 2; Tirumala et al. 2022, "Memorization Without Overfitting",
  §2.1) of every model after every recorded epoch: mem(f) = |{(s, y) ∈ C : argmax f(s) = y}| / |C|,
  C the (context, next token) pairs of the model's own training sequences; and the same fraction
  over the sequences it did not train on (the contrast: tokens predictable without having seen them).

  ``token_accuracy_MxExN`` is each sequence's fraction of correct next tokens under teacher forcing
  (the per-epoch record), ``num_targets_N`` its number of predicted tokens, so a sequence adds
  accuracy · targets correct pairs. ``copies_N``: a sequence occurring c times in the corpus adds its
  pairs c times, as C is the training data (Tirumala et al. deduplicate nothing). Returns
  ``(in_MxE, out_MxE)``; NaN where a model has no such sequence.
  """
  keep_MxN = np.asarray(keep_MxN, bool)
  accuracy_MxExN = np.asarray(token_accuracy_MxExN, np.float64)
  if accuracy_MxExN.ndim != 3 or accuracy_MxExN.shape[::2] != keep_MxN.shape:
    raise ValueError(f"token accuracy {accuracy_MxExN.shape} is not (models, epochs, sequences) for keep {keep_MxN.shape}")
  pairs_N = np.asarray(num_targets_N, np.float64) * (1.0 if copies_N is None else np.asarray(copies_N, np.float64))
  correct_MxExN = accuracy_MxExN * pairs_N  # correct pairs per sequence

  def fraction(member_MxN):
    weight_MxN = member_MxN * 1.0
    total_M = weight_MxN @ pairs_N
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.einsum("men,mn->me", correct_MxExN, weight_MxN) / total_M[:, None]
  return fraction(keep_MxN), fraction(~keep_MxN)


def extraction_rates(keep_MxN: np.ndarray, extractable_MxN: np.ndarray):
  """(rate_in, se_in, rate_out, se_out) per sequence: the fraction of in-models (out-models) that
  extract it, NaN without such models, plus-two standard errors."""
  keep_MxN, hit_MxN = np.asarray(keep_MxN, bool), np.asarray(extractable_MxN, bool)
  n_in, n_out = keep_MxN.sum(0), (~keep_MxN).sum(0)
  hits_in, hits_out = (hit_MxN & keep_MxN).sum(0), (hit_MxN & ~keep_MxN).sum(0)
  rate = lambda hits, n: np.where(n > 0, hits / np.maximum(n, 1), np.nan)
  return rate(hits_in, n_in), plus_two_se(hits_in, n_in), rate(hits_out, n_out), plus_two_se(hits_out, n_out)


def loss_signal(loglik_MxN: np.ndarray, num_targets_N: np.ndarray) -> np.ndarray:
  """LOSS attack score: the per-token log-likelihood (−mean loss)."""
  return per_token_loglik(loglik_MxN, num_targets_N)


def zlib_signal(loglik_MxN: np.ndarray, num_targets_N: np.ndarray, zlib_bytes_N: np.ndarray) -> np.ndarray:
  """zlib attack score: −(mean token loss in nats) / (zlib-compressed length in bits)."""
  bits_N = 8.0 * np.maximum(np.asarray(zlib_bytes_N, np.float64), 1.0)
  return per_token_loglik(loglik_MxN, num_targets_N) / bits_N[None, :]


def min_k_signal(token_logprob_MxNxL: np.ndarray, num_targets_N: np.ndarray, k: float = 0.2) -> np.ndarray:
  """Min-K% Prob: mean of the ``max(1, int(k·n))`` lowest of the n token log-probabilities."""
  if not 0 < k <= 1:
    raise ValueError(f"k must be in (0, 1], got {k}")
  logprob = np.asarray(token_logprob_MxNxL, np.float64)
  n_N = np.asarray(num_targets_N, np.int64)
  valid_NxL = np.arange(logprob.shape[2])[None, :] < n_N[:, None]
  ordered = np.sort(np.where(valid_NxL[None], logprob, np.inf), axis=2)  # padding sorts last
  take_N = np.maximum(1, (k * n_N).astype(np.int64))
  chosen_NxL = np.arange(logprob.shape[2])[None, :] < take_N[:, None]
  return np.where(chosen_NxL[None], ordered, 0.0).sum(axis=2) / take_N[None, :]
