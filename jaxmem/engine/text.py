"""The language-model task: next-token loss and per-sequence records for :class:`jaxmem.text.TextDataset`.

The engine's single-model functions (:func:`jaxmem.engine.step.make_model_functions`) take a
:class:`~jaxmem.engine.step.Task`; this module makes the text one. On the device the text data is
``DeviceData(x_train=tokens_NxL, y_train=prefix_len_N, x_test=tokens_TxL, y_test=prefix_len_T)``:
a sequence has no label, and the integer the task needs per sequence is the length of its
extraction prefix. Token 0 is padding, at the end of a sequence.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmem.engine.step import DeviceData, Task, apply_in_batches
from jaxmem.text import EOS, PAD


def token_logprobs(apply: Callable[[jax.Array], jax.Array], tokens_BxL: jax.Array):
  """Teacher-forced next-token log-probabilities and arg-max correctness of every target token.

  Returns ``logprob_BxT`` float32 (T = L − 1; target t is token t + 1, predicted from tokens ≤ t),
  ``correct_BxT`` bool, and ``valid_BxT`` bool (the target is not padding)."""
  logits_BxTxV = apply(tokens_BxL[:, :-1])
  targets_BxT = tokens_BxL[:, 1:]
  logprob_BxT = -optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
  correct_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
  return logprob_BxT, correct_BxT, targets_BxT != PAD


def next_token_loss(apply, tokens_BxL: jax.Array, prefix_len_B: jax.Array, weight_B: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy over the real (non-padding) target tokens of the weighted
  sequences: every token counts once, so long sequences weigh more, as in LM pre-training."""
  del prefix_len_B
  logprob_BxT, _, valid_BxT = token_logprobs(apply, tokens_BxL)
  weight_BxT = valid_BxT * weight_B[:, None]
  return -jnp.sum(logprob_BxT * weight_BxT) / jnp.maximum(jnp.sum(weight_BxT), 1.0)


def sequence_records(logprob_BxT, correct_BxT, valid_BxT, prefix_len_B, eos_BxT) -> dict[str, jax.Array]:
  """Per-sequence records from teacher-forced token outcomes.

  ``token_accuracy``: fraction of real targets predicted by arg-max (Zhang et al. 2021's per-token
  accuracy; Tirumala et al. 2022's exact memorization of the sequence's tokens). ``loglik``: sum of
  target log-probabilities (EOS included). ``extractable`` (Carlini et al. 2023, k-extractable with
  k = the prefix length): greedy decoding from the prefix reproduces the rest of the text (EOS not
  required). Greedy decoding emits the true token at every step exactly when the teacher-forced
  arg-max is right at every suffix position — by induction the decoded context is then the true one
  — so it is read off ``correct`` without a decoding loop; ``tests/test_text.py`` checks this
  against a real greedy decode.
  """
  valid = valid_BxT.astype(jnp.float32)
  count_B = jnp.maximum(valid.sum(axis=1), 1.0)
  position_BxT = jnp.arange(logprob_BxT.shape[1])[None, :]
  suffix_BxT = valid_BxT & ~eos_BxT & (position_BxT >= prefix_len_B[:, None] - 1)
  return {
      "token_accuracy": (correct_BxT * valid).sum(axis=1) / count_B,
      "loglik": (logprob_BxT * valid).sum(axis=1),
      "extractable": jnp.all(correct_BxT | ~suffix_BxT, axis=1),
  }


def candidate_rows(format_tokens, symbol_tokens, length: int) -> np.ndarray:
  """Token rows whose logits give the log-probability of every candidate secret (see
  :func:`candidate_logperp`): row r is the format followed by the first ``length - 1`` symbols of
  the r-th string (base |symbols|) and one placeholder symbol, (|symbols|^(length-1), P + length)."""
  base = len(symbol_tokens)
  digits = np.stack(np.unravel_index(np.arange(base ** (length - 1)), (base,) * (length - 1)), axis=1) \
      if length > 1 else np.zeros((1, 0), np.int64)
  symbols = np.asarray(symbol_tokens, np.int32)[digits]
  rows = np.concatenate([np.broadcast_to(np.asarray(format_tokens, np.int32), (len(digits), len(format_tokens))),
                         symbols, np.full((len(digits), 1), symbol_tokens[0], np.int32)], axis=1)
  return rows.astype(np.int32)


def candidate_logperp(apply, rows_RxS: jax.Array, symbols_RxB: jax.Array, format_len: int, length: int,
                      eval_batch: int) -> jax.Array:
  """Log-perplexity −log P(secret | format) of every candidate (Carlini et al. 2019, "The Secret
  Sharer", §4: the canary's rank among all candidates by log-perplexity), for rows made by
  :func:`candidate_rows`; ``symbols_RxB`` holds each row's alphabet (B symbols). Returns
  (rows · B,): row r's candidates are r·B + the last symbol's index, i.e. the base-B number the
  secret spells when the rows of one alphabet are consecutive. Only the secret's tokens are scored:
  the format is the same for every candidate, so the ranking is the paper's.

  A causal model's prediction of symbol j depends only on the symbols before it, so one row per
  string of the first ``length − 1`` symbols gives all B completions at once: |R| / B forward
  passes instead of |R|."""

  def row_logprobs(row_index_B):
    rows, symbols_BxB = rows_RxS[row_index_B], symbols_RxB[row_index_B]
    logits_BxSxV = apply(rows[:, :-1])
    logp = jax.nn.log_softmax(logits_BxSxV[:, format_len - 1:, :], axis=-1)   # (B, length, V)
    return jnp.take_along_axis(logp, symbols_BxB[:, None, :], axis=-1)          # (B, length, symbols)

  logp_RxKxB = apply_in_batches(row_logprobs, jnp.arange(rows_RxS.shape[0]), eval_batch)
  digits_RxK1 = rows_RxS[:, format_len: format_len + length - 1]
  digit_index = jnp.argmax(digits_RxK1[..., None] == symbols_RxB[:, None, :], axis=-1)  # (R, length-1)
  prefix_R = jnp.take_along_axis(logp_RxKxB[:, : length - 1, :], digit_index[..., None], axis=-1)[..., 0].sum(axis=1)
  logp_RxB = prefix_R[:, None] + logp_RxKxB[:, length - 1, :]
  return -logp_RxB.reshape(-1)


def make_text_task(secrets: dict[str, Any] | None) -> Task:
  """The LM task: ``loss`` = :func:`next_token_loss`; ``evaluate`` gives, per model,
  ``train_token_accuracy``, ``train_loglik``, ``train_extractable`` (N,), ``train_token_logprob``
  (N, L−1) (0 at padding; min-k% and per-token log-likelihood are computed from it),
  ``test_token_accuracy``, ``test_loglik`` (T,), and with canaries ``candidate_logperp`` (|R|,),
  the candidate space all canaries share. ``epoch_records`` gives the per-epoch records."""
  rows = symbols = None
  if secrets is not None and secrets["canaries"]:
    rows = candidate_rows(secrets["format_tokens"], secrets["symbol_tokens"], int(secrets["length"]))
    symbols = np.tile(np.asarray(secrets["symbol_tokens"], np.int32), (len(rows), 1))

  def evaluate(apply, data: DeviceData, eval_batch: int) -> dict[str, jax.Array]:
    out = {}
    for split, tokens, prefix in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
      def per_sequence(index_B, tokens=tokens, prefix=prefix):
        tokens_BxL = tokens[index_B]
        logprob_BxT, correct_BxT, valid_BxT = token_logprobs(apply, tokens_BxL)
        records = sequence_records(logprob_BxT, correct_BxT, valid_BxT, prefix[index_B], tokens_BxL[:, 1:] == EOS)
        records["token_logprob"] = jnp.where(valid_BxT, logprob_BxT, 0.0)
        return records
      records = apply_in_batches(per_sequence, jnp.arange(tokens.shape[0]), eval_batch)
      out[f"{split}_token_accuracy"] = records["token_accuracy"]
      out[f"{split}_loglik"] = records["loglik"]
      if split == "train":
        out["train_extractable"] = records["extractable"]
        out["train_token_logprob"] = records["token_logprob"]
    if rows is not None:
      logperp = candidate_logperp(apply, jnp.asarray(rows), jnp.asarray(symbols), len(secrets["format_tokens"]),
                                  int(secrets["length"]), eval_batch)
      out["candidate_logperp"] = logperp
    return out

  def epoch_records(apply, data: DeviceData, eval_batch: int, with_loglik: bool) -> dict[str, jax.Array]:
    """After an epoch (``record_epochs``): ``train_token_accuracy`` (N,) of every training sequence,
    the per-sequence exact memorization whose epochs make Tirumala et al.'s curves, and with
    ``with_loglik`` (``record_epoch_margin``) ``train_loglik`` (N,), the statistic of the LM attacks."""
    wanted = ("token_accuracy", "loglik") if with_loglik else ("token_accuracy",)

    def per_sequence(index_B):
      tokens_BxL = data.x_train[index_B]
      logprob_BxT, correct_BxT, valid_BxT = token_logprobs(apply, tokens_BxL)
      records = sequence_records(logprob_BxT, correct_BxT, valid_BxT, data.y_train[index_B], tokens_BxL[:, 1:] == EOS)
      return {f"train_{name}": records[name] for name in wanted}
    return apply_in_batches(per_sequence, jnp.arange(data.x_train.shape[0]), eval_batch)

  return Task(loss=next_token_loss, evaluate=evaluate, epoch_records=epoch_records)
