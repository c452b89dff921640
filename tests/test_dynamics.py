"""Learning-dynamics scores against naive loops; EL2N/GraNd against per-example jax.grad; bit-packed
per-epoch records; the label-noise direction on digits."""

import math
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmem
from jaxmem.data import from_arrays
from jaxmem.engine.step import DeviceData, make_model_functions
from jaxmem.models import build_model
from jaxmem.scores.dynamics import (dynamics_scores, forgetting_counts, forgotten_forever_epoch,
                                    learned_forever_epoch)


def _histories(seed=0, m=7, e=9, n=40):
  """Random correctness histories with the edge cases planted: never correct, always correct,
  correct only at the last epoch, correct only at the first, and an example no model trained on."""
  rng = np.random.default_rng(seed)
  correct = rng.random((m, e, n)) < rng.random((1, 1, n))
  correct[:, :, 0] = False
  correct[:, :, 1] = True
  correct[:, :, 2] = False
  correct[:, -1, 2] = True
  correct[:, :, 3] = False
  correct[:, 0, 3] = True
  correct[:, -1, 4] = True
  correct[2, :, 4] = False  # never learned in one model only
  keep = rng.random((m, n)) < 0.6
  keep[:, 5] = False
  keep[:, :5] = True
  return keep, correct


def _naive_one(history):
  """Reference for one (model, example) history, by the definitions (1-based epochs)."""
  e = len(history)
  forgets = sum(1 for t in range(e - 1) if history[t] and not history[t + 1])
  learned_at = e + 1
  for t in range(e, 0, -1):  # earliest t with history[t-1:] all correct
    if all(history[t - 1:]):
      learned_at = t
    else:
      break
  forgotten_at = e + 1
  for t in range(e, 0, -1):
    if not any(history[t - 1:]):
      forgotten_at = t
    else:
      break
  return forgets, learned_at, forgotten_at, any(history), float(np.mean(history))


def test_per_model_times_equal_naive_loops():
  _, correct = _histories()
  m, _, n = correct.shape
  counts, learned, forgotten = forgetting_counts(correct), learned_forever_epoch(correct), forgotten_forever_epoch(correct)
  for i in range(m):
    for j in range(n):
      f, l, g, _, _ = _naive_one(list(correct[i, :, j]))
      assert (counts[i, j], learned[i, j], forgotten[i, j]) == (f, l, g), (i, j)
  e = correct.shape[1]
  assert (learned[:, 0] == e + 1).all() and (learned[:, 1] == 1).all() and (learned[:, 2] == e).all()
  assert (forgotten[:, 1] == e + 1).all() and (forgotten[:, 0] == 1).all() and (forgotten[:, 3] == 2).all()


def test_maini_reference_convention():
  """The examples in pratyushmaini/ssft utils.py: [0,0,1,1,0,1,1,1,1] is learned for good at epoch 6
  (1-based); [1,1,0,0,1,1,0,0,0,0] is forgotten for good at epoch 7."""
  learn = np.array([0, 0, 1, 1, 0, 1, 1, 1, 1], bool)[None, :, None]
  forget = np.array([1, 1, 0, 0, 1, 1, 0, 0, 0, 0], bool)[None, :, None]
  assert learned_forever_epoch(learn)[0, 0] == 6
  assert forgotten_forever_epoch(forget)[0, 0] == 7
  assert forgetting_counts(forget)[0, 0] == 2


def test_aggregates_equal_naive_loops():
  keep, correct = _histories(seed=1)
  m, e, n = correct.shape
  scores = dynamics_scores(keep, correct)
  for j in range(n):
    per_model = [_naive_one(list(correct[i, :, j])) for i in range(m) if keep[i, j]]
    if not per_model:
      for column in (scores.forgetting_events, scores.never_learned_fraction, scores.first_learned_epoch,
                     scores.cumulative_accuracy):
        assert math.isnan(column[j])
      continue
    learned_models = [p for p in per_model if p[3]]
    if learned_models:
      counts = [p[0] for p in learned_models]
      assert scores.forgetting_events[j] == pytest.approx(np.mean(counts))
      if len(counts) > 1:
        assert scores.forgetting_events_se[j] == pytest.approx(np.std(counts, ddof=1) / math.sqrt(len(counts)))
    else:  # never learned by any model: flagged, not silently 0
      assert math.isnan(scores.forgetting_events[j])
    assert scores.never_learned_fraction[j] == pytest.approx(np.mean([not p[3] for p in per_model]))
    assert scores.first_learned_epoch[j] == pytest.approx(np.mean([p[1] for p in per_model]))
    assert scores.cumulative_accuracy[j] == pytest.approx(np.mean([p[4] for p in per_model]))
  assert math.isnan(scores.forgetting_events[0]) and scores.never_learned_fraction[0] == 1.0
  assert scores.first_learned_epoch[0] == e + 1
  assert scores.forgetting_events[1] == 0 and scores.first_learned_epoch[1] == 1 and scores.cumulative_accuracy[1] == 1
  assert scores.never_learned_fraction[4] == pytest.approx(1 / m)


def test_el2n_and_grand_equal_per_example_reference():
  """GraNd from vmap(grad) in batches (with a partial last batch) equals the norm of jax.grad of
  each example's own loss; EL2N equals ||softmax - onehot||."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(11, 5)).astype(np.float32)
  y = rng.integers(0, 3, 11).astype(np.int32)
  data = DeviceData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(x[:2]), jnp.asarray(y[:2]))
  model = build_model("mlp", 3, {"hidden_sizes": (6,)})
  fns = make_model_functions(model, optax.sgd(0.1), batch_size=4, num_steps=1, grad_batch=4, eval_batch=4)
  params = fns.init(jax.random.PRNGKey(3), data).params
  got = jax.jit(fns.early_scores)(params, data)

  def loss(p, xi, yi):
    logits = model.apply({"params": p}, xi[None])
    return optax.softmax_cross_entropy_with_integer_labels(logits, yi[None])[0]

  grad = jax.jit(jax.grad(loss))
  for i in range(11):
    g = grad(params, data.x_train[i], data.y_train[i])
    norm = math.sqrt(sum(float(jnp.sum(leaf**2)) for leaf in jax.tree.leaves(g)))
    assert float(got["train_grand"][i]) == pytest.approx(norm, rel=1e-4)
    p = jax.nn.softmax(model.apply({"params": params}, data.x_train[i:i + 1]))[0]
    assert float(got["train_el2n"][i]) == pytest.approx(float(jnp.linalg.norm(p - jax.nn.one_hot(y[i], 3))), rel=1e-5)


def _small_dataset(n=45, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n + 12)
  x = (rng.normal(size=(n + 12, 6)) + y[:, None]).astype(np.float32)
  return from_arrays("small", x[:n], y[:n], x[n:], y[n:], num_classes=3)


def test_per_epoch_records_are_bit_packed_on_disk(tmp_path):
  dataset = _small_dataset()
  config = jaxmem.RunConfig(dataset="small", num_models=4, epochs=5, batch_size=8, chunk_size=4, strategy="vmap",
                            model_options={"hidden_sizes": (8,)}, record_epochs=True, score_epoch=2)
  result = jaxmem.run(config, tmp_path / "run", dataset=dataset, progress=False, log=lambda m: None,
                      estimators=["memorization", "dynamics", "el2n_grand"])
  n, e, k = dataset.num_train, 5, 4
  with zipfile.ZipFile(tmp_path / "run" / "chunks" / "chunk_00000.npz") as f:
    info = {i.filename: i.file_size for i in f.infolist()}
  header = 256  # generous bound on a .npy header
  assert info["train_correct_epochs_packed.npy"] <= k * e * math.ceil(n / 8) + header
  assert info["train_correct_epochs_packed.npy"] < k * e * n  # 8x smaller than one byte per bool
  records = result.records
  correct = records["train_correct_epochs"]
  assert correct.shape == (k, e, n) and correct.dtype == bool
  assert "train_correct_epochs_packed" not in records
  np.testing.assert_array_equal(correct[:, -1], records["train_correct"])  # last epoch == final evaluation
  assert records["train_el2n"].shape == (k, n) and records["train_grand"].shape == (k, n)
  for column in ("forgetting_events", "first_learned_epoch", "never_learned_fraction", "cumulative_accuracy",
                 "el2n", "grand"):
    assert column in result.scores.columns
  exported = jaxmem.export_records(records, tmp_path / "out.npz")
  assert "train_correct_epochs" in exported
  with np.load(tmp_path / "out.npz") as f:
    np.testing.assert_array_equal(f["train_correct_epochs"], correct)


def test_score_epoch_zero_is_at_initialization():
  """EL2N after 0 epochs is the initialized model's; the call split around score_epoch does not
  change training."""
  dataset = _small_dataset()
  base = jaxmem.RunConfig(dataset="small", num_models=2, epochs=3, batch_size=8, strategy="vmap",
                          model_options={"hidden_sizes": (8,)})
  keep = np.ones((2, dataset.num_train), bool)
  from jaxmem.engine import Engine, model_keys
  engine = Engine(dataset, base.replace(score_epoch=0), probe_cache=None)
  at0 = engine.train_chunk([0, 1], keep)  # one host call
  fns = make_model_functions(engine.model, optax.sgd(0.1), batch_size=8, num_steps=1)
  initial = [jax.jit(fns.early_scores)(fns.init(k, engine.data).params, engine.data) for k in model_keys(0, [0, 1])]
  np.testing.assert_allclose(at0["train_el2n"], np.stack([r["train_el2n"] for r in initial]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(at0["train_grand"], np.stack([r["train_grand"] for r in initial]), rtol=1e-4, atol=1e-5)
  at1 = Engine(dataset, base.replace(score_epoch=1), probe_cache=None).train_chunk([0, 1], keep)  # split at 1
  np.testing.assert_allclose(at0["train_margin"], at1["train_margin"], rtol=1e-5, atol=1e-5)
  assert not np.allclose(at0["train_el2n"], at1["train_el2n"])


def test_flipped_labels_are_forgotten_more_on_digits(tmp_path):
  """Done-when direction, at small size: on digits with 10% flipped labels, flipped examples have
  more forgetting events (among models that learned them) than clean ones, and are learned later."""
  config = jaxmem.RunConfig(dataset="digits", label_noise=0.1, num_models=4, epochs=8, batch_size=64, chunk_size=4,
                            model_options={"hidden_sizes": (64,)}, strategy="vmap", record_epochs=True)
  result = jaxmem.run(config, tmp_path / "run", progress=False, log=lambda m: None, estimators=["dynamics"])
  noisy = result.records.noisy
  forgetting = result.scores.columns["forgetting_events"]
  first = result.scores.columns["first_learned_epoch"]
  assert np.nanmean(forgetting[noisy]) > np.nanmean(forgetting[~noisy])
  assert np.nanmean(first[noisy]) > np.nanmean(first[~noisy])
