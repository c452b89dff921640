"""Memorization proxies: curvature vs finite differences, CSL and learning time vs naive loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmem.errors import JaxmemError
from jaxmem.scores.proxies import (
    cumulative_sample_loss, curvature_with_directions, input_curvature, learning_time, rademacher)


def tiny_apply(params, x_BxD):
  return jnp.tanh(x_BxD @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def tiny_params(seed, d=4, hidden=5, classes=3):
  rng = np.random.default_rng(seed)
  return {"w1": rng.normal(0, 1, (d, hidden)).astype(np.float32), "b1": rng.normal(0, 0.5, hidden).astype(np.float32),
          "w2": rng.normal(0, 1, (hidden, classes)).astype(np.float32), "b2": np.zeros(classes, np.float32)}


def numpy_loss(params, x_D, y):
  p = {k: v.astype(np.float64) for k, v in params.items()}
  logits = np.tanh(x_D @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  return np.logaddexp.reduce(logits) - logits[y]


def fd_gradient(params, x_D, y, step=1e-5):
  grad = np.zeros_like(x_D)
  for k in range(x_D.size):
    e = np.zeros_like(x_D)
    e[k] = step
    grad[k] = (numpy_loss(params, x_D + e, y) - numpy_loss(params, x_D - e, y)) / (2 * step)
  return grad


def test_curvature_equals_finite_difference_reference():
  params = tiny_params(0)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, 4))
  y = rng.integers(0, 3, 6)
  h = 0.05
  v = np.asarray(rademacher(jax.random.key(3), 7, x.shape))
  assert set(np.unique(v)) == {-1.0, 1.0}
  ours = np.asarray(curvature_with_directions(tiny_apply, jax.tree.map(jnp.asarray, params), jnp.asarray(x, jnp.float32),
                                              jnp.asarray(y), jnp.asarray(v), h))
  expected = [np.mean([np.linalg.norm(fd_gradient(params, x[i] + h * v[r, i], y[i]) - fd_gradient(params, x[i], y[i]))
                       for r in range(7)]) for i in range(6)]
  np.testing.assert_allclose(ours, expected, rtol=2e-3)
  assert np.ptp(expected) > 0.01


def test_input_curvature_batches_and_padding():
  params = jax.tree.map(jnp.asarray, tiny_params(2))
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(10, 4)).astype(np.float32), rng.integers(0, 3, 10)
  key = jax.random.key(0)
  out = input_curvature(tiny_apply, params, x, y, key, h=0.05, num_draws=3, batch=4)
  for b, start in enumerate(range(0, 10, 4)):
    xb = np.concatenate([x[start: start + 4], np.zeros((max(0, start + 4 - 10), 4), np.float32)])
    yb = np.concatenate([y[start: start + 4], np.zeros(max(0, start + 4 - 10), y.dtype)])
    v = rademacher(jax.random.fold_in(key, b), 3, xb.shape)
    direct = jax.jit(curvature_with_directions, static_argnames=("apply_fn", "h"))(
        tiny_apply, params, jnp.asarray(xb), jnp.asarray(yb), v, 0.05)   # the same compiled computation
    np.testing.assert_array_equal(out[start: start + 4], np.asarray(direct, np.float64)[: len(x[start: start + 4])])
  with pytest.raises(JaxmemError, match="h must be positive"):
    input_curvature(tiny_apply, params, x, y, key, h=0.0)


def test_csl_and_learning_time_equal_naive_loops():
  rng = np.random.default_rng(5)
  m, e, n = 6, 4, 7
  keep = rng.random((m, n)) < 0.6
  keep[:, 0] = False
  margin = rng.normal(0, 3, (m, e, n))
  correct = margin > 0
  csl = cumulative_sample_loss(keep, margin)
  times = learning_time(keep, correct)
  assert np.isnan(csl[0]) and np.isnan(times["first_learned_epoch"][0])
  for i in range(1, n):
    rows = [k for k in range(m) if keep[k, i]]
    if not rows:
      continue
    # cross-entropy from the margin: −log p_y with p_y = sigmoid(margin)
    losses = [sum(-np.log(1 / (1 + np.exp(-margin[k, t, i]))) for t in range(e)) for k in rows]
    assert csl[i] == pytest.approx(np.mean(losses), rel=1e-10)
    first = []
    for k in rows:
      wrong = [t for t in range(e) if not correct[k, t, i]]
      first.append(wrong[-1] + 2 if wrong else 1)
    assert times["first_learned_epoch"][i] == pytest.approx(np.mean(first))
    assert times["cumulative_error"][i] == pytest.approx(np.mean([1 - correct[k, :, i].mean() for k in rows]))
  with pytest.raises(JaxmemError, match="models, epochs, examples"):
    cumulative_sample_loss(keep, margin[:, :, :3])


def test_agreement_matches_scipy_and_drops_missing():
  from scipy.stats import pearsonr, spearmanr
  from jaxmem.scores import auroc
  from jaxmem.studies.proxies import agreement
  rng = np.random.default_rng(6)
  mem = rng.random(80)
  proxy = mem + rng.normal(0, 0.3, 80)
  proxy[:5] = np.nan
  noisy = rng.random(80) < 0.2
  out = agreement(proxy, mem, noisy, num_bootstrap=50)
  ok = ~np.isnan(proxy)
  assert out["examples_used"] == 75
  assert out["spearman"] == pytest.approx(spearmanr(proxy[ok], mem[ok]).statistic)
  assert out["pearson"] == pytest.approx(pearsonr(proxy[ok], mem[ok]).statistic)
  assert out["auroc_flipped"] == pytest.approx(auroc(proxy[ok], noisy[ok]))
  assert out["spearman_low"] < out["spearman"] < out["spearman_high"]


@pytest.mark.slow   # trains its own 8-model run with per-epoch records and kept parameters
def test_study_on_a_run_with_kept_parameters(tiny_config, tmp_path):
  import csv
  import jaxmem
  from jaxmem.data import load_run_dataset
  from jaxmem.engine.trainer import standardize
  from jaxmem.models import build_model
  from jaxmem.studies.proxies import COLUMNS, model_apply, model_order, proxies_study
  from jaxmem.records import RunDir, load_model_params
  config = tiny_config.replace(record_epochs=True, record_epoch_margin=True, keep_params="2")
  run = jaxmem.run(config, tmp_path / "run", progress=False, log=lambda m: None)
  result = proxies_study(run.run_dir, ks=(1, 4), draws=2, h=0.01, num_bootstrap=20)
  with open(result.table) as f:
    rows = list(csv.DictReader(f))
  assert tuple(rows[0]) == COLUMNS
  by = {(int(r["models"]), r["proxy"]): r for r in rows}
  assert int(by[(4, "curvature")]["models_used"]) == 2 and int(by[(4, "cumulative_sample_loss")]["models_used"]) == 4
  assert float(by[(4, "cumulative_sample_loss")]["cost_ratio"]) == pytest.approx(4 / 8)
  # k = 1: the first model of the order is a kept one; its curvature on its own training examples
  first = int(model_order(8, [0, 1], 0)[0])
  assert first in (0, 1)
  manifest = RunDir.open(run.run_dir).manifest()
  dataset = load_run_dataset(manifest)
  model = build_model(config.model, dataset.num_classes, config.model_options)
  x, _ = standardize(dataset)
  labels = np.asarray(run.records.train_labels)
  direct = input_curvature(model_apply(model), load_model_params(run.run_dir, int(run.records.model_ids[first])), x,
                           labels, jax.random.fold_in(jax.random.fold_in(jax.random.key(0), int(run.records.model_ids[first])),
                                                      config.epochs), h=0.01, num_draws=2)
  keep = run.records.keep[first]
  np.testing.assert_allclose(result.proxies[1]["curvature"][keep], direct[keep], rtol=1e-6)
  assert np.isnan(result.proxies[1]["curvature"][~keep]).all()


@pytest.mark.slow   # trains an 8-model run, then 2 of its models again
def test_retraining_reproduces_the_kept_models_and_captures_epochs(tiny_config, tmp_path):
  import jaxmem
  from jaxmem.config import RunConfig
  from jaxmem.data import load_run_dataset
  from jaxmem.records import RunDir, load_model_params
  from jaxmem.studies.proxies import retrained_params
  config = tiny_config.replace(keep_params="2")
  run = jaxmem.run(config, tmp_path / "run", progress=False, log=lambda m: None)
  manifest = RunDir.open(run.run_dir).manifest()
  ids = run.records.model_ids[:2]
  trained = retrained_params(load_run_dataset(manifest), RunConfig.from_dict(manifest["config"]), ids,
                             run.records.keep[:2], [1, config.epochs])
  assert sorted(trained) == [1, config.epochs] and len(trained[1]) == 2
  for i, model_id in enumerate(ids):
    kept = load_model_params(run.run_dir, int(model_id))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), trained[config.epochs][i], kept)
    changed = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), trained[1][i], kept)
    assert max(jax.tree.leaves(changed)) > 1e-3      # after one epoch the parameters are not the final ones
  with pytest.raises(JaxmemError, match="between 1 and the run's 3 epochs"):
    retrained_params(load_run_dataset(manifest), RunConfig.from_dict(manifest["config"]), ids, run.records.keep[:2], [4])


def test_csl_estimator_column():
  from jaxmem.scoring import score_records
  from jaxmem.records import Records
  rng = np.random.default_rng(8)
  m, e, n = 10, 3, 12
  keep = rng.random((m, n)) < 0.7
  margin = rng.normal(0, 2, (m, e, n)).astype(np.float32)
  noisy = np.arange(n) < 3
  records = Records(keep=keep, model_ids=np.arange(m), subset_ratio=np.full(m, 0.7, np.float32),
                    train_labels=np.zeros(n, np.int64), clean_train_labels=np.zeros(n, np.int64),
                    test_labels=np.zeros(2, np.int64), noisy=noisy,
                    arrays={"train_margin_epochs": margin, "train_correct": margin[:, -1] > 0}, num_models_planned=m)
  table = score_records(records, ["memorization", "csl"])
  np.testing.assert_allclose(table.columns["cumulative_sample_loss"], cumulative_sample_loss(keep, margin))
  assert 0 <= table.summary["csl"]["auroc_flipped"] <= 1
