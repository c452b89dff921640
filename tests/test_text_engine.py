"""The text task in the engine: vmap == loop for the transformer, records against naive numpy,
extraction against a real greedy decoding loop, candidate log-perplexities against scoring each
candidate sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmem import RunConfig, make_masks
from jaxmem.engine import Engine
from jaxmem.engine.text import candidate_rows, sequence_records
from jaxmem.text import BOS, PAD, make_canaries

TINY_LM = {"num_layers": 1, "width": 16, "num_heads": 2, "mlp_ratio": 2, "max_len": 16}

def tiny_text(num_train=24):
  """A small word-level corpus with canaries of a 2-digit secret (|R| = 100)."""
  ds = make_canaries(num_frequent=num_train, num_rare=4, duplicated=(2,), repetitions=(1, 4),
                     canaries_per_repetition=1, secret_length=2, num_test=8)
  return ds


def _train_text(ds, strategy, num_models=3, epochs=2, optimizer="adam", learning_rate=1e-2):
  config = RunConfig(dataset="canaries", model="transformer", model_options=TINY_LM,
                     num_models=num_models, epochs=epochs, batch_size=8, learning_rate=learning_rate, strategy=strategy,
                     subset_ratios=(0.5,), optimizer=optimizer)
  keep, _ = make_masks("subset", num_models, ds.num_train, (0.5,), seed=0)
  engine = Engine(ds, config, probe_cache=None)
  records = engine.train_chunk(np.arange(num_models), keep)
  return engine, jax.device_get(engine.last_state.params), records


@pytest.mark.parametrize("strategy", ["vmap", pytest.param("map", marks=pytest.mark.slow)])
def test_transformer_strategies_equal_per_model_loop(strategy):
  """SGD, not Adam: Adam divides by the root of the squared gradient, so where a gradient is ~0 (the
  attention projections of a fresh tiny model) float noise of 1e-9 becomes an update of ±lr, and
  two correct programs summing in different orders drift apart by lr per step."""
  ds = tiny_text()
  _, reference, ref_records = _train_text(ds, "loop", optimizer="sgd")
  _, params, records = _train_text(ds, strategy, optimizer="sgd")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), reference, params)
  for name in ("train_loglik", "train_token_logprob", "candidate_logperp", "test_loglik"):
    np.testing.assert_allclose(records[name], ref_records[name], rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(records["epoch_loss"], ref_records["epoch_loss"], rtol=1e-4, atol=1e-5)


def test_text_records_equal_naive_computations():
  """Per-sequence records against plain numpy over the model's logits, extraction against a real
  greedy decoding loop, candidate log-perplexities against scoring every candidate sequence."""
  ds = tiny_text()
  engine, params, records = _train_text(ds, "vmap", num_models=2, epochs=30, learning_rate=3e-2)
  extractable = records["train_extractable"]
  assert extractable.any() and not extractable.all()  # trained enough that both outcomes occur
  model = engine.model
  secrets = ds.secrets
  apply_jit = jax.jit(lambda p, x: model.apply({"params": p}, x))
  for m in range(2):
    p = jax.tree.map(lambda x: x[m], params)
    apply = lambda x: apply_jit(p, x)
    logits = np.asarray(apply(jnp.asarray(ds.x_train[:, :-1])), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    for i in range(ds.num_train):
      tokens = ds.x_train[i]
      n = int((tokens != PAD).sum())
      target_lp = [logp[i, t, tokens[t + 1]] for t in range(n - 1)]
      hits = [np.argmax(logits[i, t]) == tokens[t + 1] for t in range(n - 1)]
      np.testing.assert_allclose(records["train_loglik"][m, i], sum(target_lp), rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(records["train_token_accuracy"][m, i], np.mean(hits), atol=1e-6)
      np.testing.assert_allclose(records["train_token_logprob"][m, i, : n - 1], target_lp, rtol=1e-4, atol=1e-4)
      assert (records["train_token_logprob"][m, i, n - 1:] == 0).all()
      # greedy decoding from the prefix, one token at a time
      k = int(ds.prefix_len[i])
      decoded = list(tokens[:k])
      while len(decoded) < n - 1:  # the text tokens after the prefix (EOS not required)
        step = np.asarray(apply(jnp.asarray([decoded], jnp.int32)))[0, -1]
        decoded.append(int(np.argmax(step)))
      assert bool(records["train_extractable"][m, i]) == (decoded == list(tokens[: n - 1])), i
    # every candidate secret scored as its own sequence
    candidates = np.array([[*secrets["format_tokens"], *(secrets["symbol_tokens"][int(d)] for d in f"{c:02d}")]
                           for c in range(100)], np.int32)
    cand_logits = np.asarray(apply(jnp.asarray(candidates[:, :-1])), np.float64)
    cand_logp = cand_logits - np.log(np.exp(cand_logits).sum(-1, keepdims=True))
    expected = -sum(cand_logp[np.arange(100), 3 + j, candidates[:, 4 + j]] for j in range(2))
    np.testing.assert_allclose(records["candidate_logperp"][m], expected, rtol=1e-4, atol=1e-4)


def test_candidate_rows_cover_the_secret_space_once():
  rows = candidate_rows([BOS, 9], [3, 4, 5], 3)
  assert rows.shape == (9, 5)
  np.testing.assert_array_equal(rows[5], [BOS, 9, 4, 5, 3])  # 5 = "12" in base 3, then a placeholder


def test_sequence_records_extractable_needs_every_suffix_token():
  correct = jnp.array([[True, False, True, True, False]])
  valid = jnp.array([[True, True, True, True, False]])
  eos = jnp.array([[False, False, False, True, False]])
  lp = jnp.zeros((1, 5))
  # prefix of 3 tokens: the suffix is target 2 (right); target 3 is EOS, target 4 padding
  assert bool(sequence_records(lp, correct, valid, jnp.array([3]), eos)["extractable"][0])
  assert not bool(sequence_records(lp, correct, valid, jnp.array([2]), eos)["extractable"][0])


def test_per_epoch_token_accuracy_equals_a_naive_loop_over_each_epochs_parameters():
  """``record_epochs`` on a text run: after every epoch, each training sequence's fraction of next
  tokens predicted by arg-max (and with ``record_epoch_margin`` its log-likelihood), against numpy
  over the logits of the parameters the engine hands out after that epoch."""
  ds = tiny_text(num_train=12)
  epochs = 2
  config = RunConfig(dataset="canaries", model="transformer", model_options=TINY_LM, num_models=2, epochs=epochs,
                     batch_size=8, learning_rate=3e-2, strategy="vmap", subset_ratios=(0.5,), record_epochs=True,
                     record_epoch_margin=True)
  keep, _ = make_masks("subset", 2, ds.num_train, (0.5,), seed=0)
  engine = Engine(ds, config, probe_cache=None)
  kept = {}
  records = engine.train_chunk(np.arange(2), keep, epochs_per_call=1,
                               on_params=lambda e, p: kept.setdefault(e, jax.device_get(jax.tree.map(lambda x: x[:2], p))))
  accuracy_KxExN, loglik_KxExN = records["train_token_accuracy_epochs"], records["train_loglik_epochs"]
  assert accuracy_KxExN.shape == loglik_KxExN.shape == (2, epochs, ds.num_train)
  np.testing.assert_array_equal(accuracy_KxExN[:, -1], records["train_token_accuracy"])
  apply_jit = jax.jit(lambda p, x: engine.model.apply({"params": p}, x))
  for epoch in range(1, epochs + 1):
    for m in range(2):
      logits = np.asarray(apply_jit(jax.tree.map(lambda x: x[m], kept[epoch]), jnp.asarray(ds.x_train[:, :-1])),
                          np.float64)
      top = logits.max(-1, keepdims=True)
      logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
      for i in range(ds.num_train):
        tokens = ds.x_train[i]
        n = int((tokens != PAD).sum())
        hits = [np.argmax(logits[i, t]) == tokens[t + 1] for t in range(n - 1)]
        assert accuracy_KxExN[m, epoch - 1, i] == pytest.approx(np.mean(hits), abs=1e-6)
        assert loglik_KxExN[m, epoch - 1, i] == pytest.approx(sum(logp[i, t, tokens[t + 1]] for t in range(n - 1)),
                                                              rel=1e-4, abs=1e-4)
  assert not np.array_equal(accuracy_KxExN[:, 0], accuracy_KxExN[:, -1])  # the epochs differ: a real curve
