"""LDS and datamodels: naive Spearman loop, planted linear datamodel, exact zeros, CLI wiring."""

import json
import shutil

import numpy as np
import pytest
from scipy.stats import spearmanr

from jaxmem.errors import JaxmemError
from jaxmem.scores.influence import InfluenceComputation
from jaxmem.scores.lds import (datamodels, influence_attribution, lds_per_test, lds_report, split_models,
                               summarize_lds)


def test_lds_equals_naive_spearman_loop():
  rng = np.random.default_rng(0)
  m, n, t = 40, 25, 9
  keep = rng.random((m, n)) < 0.7
  tau = rng.normal(size=(n, t))
  outputs = keep @ tau * 0.3 + rng.normal(size=(m, t))
  outputs[:, 2] = np.round(outputs[:, 2])     # ties in the outputs
  outputs[:, 3] = 1.5                          # constant output: undefined
  tau[:, 4] = 0.0                              # constant prediction: undefined
  fast = lds_per_test(tau, keep, outputs)
  for j in range(t):
    predicted = [sum(tau[i, j] for i in range(n) if keep[mm, i]) for mm in range(m)]
    if j in (3, 4):
      assert np.isnan(fast[j])
    else:
      assert fast[j] == pytest.approx(spearmanr(predicted, outputs[:, j]).statistic, abs=1e-12)
  summary = summarize_lds(fast, num_bootstrap=200)
  assert summary["test_examples_used"] == t - 2
  assert summary["lds"] == pytest.approx(np.nanmean(fast))
  assert summary["lds_low"] < summary["lds"] < summary["lds_high"]


def test_lds_report_streams_blocks_of_examples_with_the_whole_matrix_results():
  """The report never holds an (N, T) attribution: per block of training examples it adds
  ``keep_eval @ τ[block]`` to the predictions. Its LDS per test example equals the definition on
  whole matrices (each method's (N, T) attribution from the estimation half, ``lds_per_test`` on
  the evaluation half), for blocks that do and do not divide N, with keep read by a callable."""
  rng = np.random.default_rng(5)
  m, n, t = 30, 61, 12
  keep = rng.random((m, n)) < 0.7
  correct = rng.random((m, t)) < 0.6
  correct[:, 0] = True                        # every model right: influence is exactly 0, LDS undefined
  margin = rng.normal(size=(m, t)) + (keep[:, :t] * 0.8)
  external = rng.normal(size=(n, t))
  est, ev = split_models(m, 0)
  whole = {"influence_correctness": influence_attribution(keep[est], correct[est].astype(np.float32)),
           "influence_margin": influence_attribution(keep[est], margin[est].astype(np.float32)),
           "datamodels": datamodels(keep[est], margin[est])[0],
           "random": np.random.default_rng([0, 0x5A4D]).normal(size=(n, t)), "external": external}
  expected = {name: lds_per_test(tau, keep[ev], margin[ev]) for name, tau in whole.items()}
  assert np.isnan(expected["influence_correctness"][0])
  for block_size in (7, 61, None):
    summary, per_test = lds_report(lambda block: keep[:, block], correct, margin, attribution_NxT=external,
                                   num_bootstrap=20, num_train=n, block_size=block_size)
    assert set(per_test) == set(expected)
    for name, values in expected.items():
      np.testing.assert_allclose(per_test[name], values, atol=1e-12, err_msg=f"{name} at block size {block_size}")
    assert summary["datamodels"]["lambda"] == datamodels(keep[est], margin[est])[1]["lambda"]
  with pytest.raises(JaxmemError, match=r"\(61, 12\), got \(3, 2\)"):
    lds_report(keep, correct, margin, attribution_NxT=np.zeros((3, 2)))


def test_planted_datamodel_is_recovered():
  rng = np.random.default_rng(1)
  m, n, t = 200, 12, 4
  keep = rng.random((m, n)) < 0.7
  theta = rng.normal(size=(n, t))
  outputs = 3.0 + keep @ theta + 0.05 * rng.normal(size=(m, t))
  weights, info = datamodels(keep, outputs)
  np.testing.assert_allclose(weights, theta, atol=0.03)
  assert info["lambda"] <= 1.0          # little noise: the leave-one-out error wants little shrinkage


@pytest.mark.parametrize("m,n", [(24, 40), (40, 12)])
def test_ridge_leave_one_out_error_equals_refitting(m, n):
  # The closed-form leave-one-out error (hat-matrix identity, intercept unpenalized) equals refitting
  # ridge without each model in turn, with fewer models than examples (a run's regime) and more.
  rng = np.random.default_rng(5)
  t = 3
  keep = rng.random((m, n)) < 0.7
  outputs = keep @ rng.normal(size=(n, t)) * 0.2 + rng.normal(size=(m, t))
  weights, info = datamodels(keep, outputs, lambdas=(0.5, 5.0, 50.0))
  x = keep.astype(np.float64)
  for lam in (0.5, 5.0, 50.0):
    errors = []
    for left in range(m):
      rows = np.arange(m) != left
      xm, ym = x[rows].mean(0), outputs[rows].mean(0)
      w = np.linalg.solve((x[rows] - xm).T @ (x[rows] - xm) + lam * np.eye(n), (x[rows] - xm).T @ (outputs[rows] - ym))
      errors.append((outputs[left] - ym - (x[left] - xm) @ w) ** 2)
    assert info["loo_mse_by_lambda"][f"{lam:g}"] == pytest.approx(np.mean(errors), rel=1e-4)
  lam = info["lambda"]
  xc = x - x.mean(0)
  w_full = np.linalg.solve(xc.T @ xc + lam * np.eye(n), xc.T @ (outputs - outputs.mean(0)))
  np.testing.assert_allclose(weights, w_full, atol=1e-4)


def test_influence_attribution_matches_influence_estimator_with_exact_zeros():
  rng = np.random.default_rng(2)
  keep = rng.random((37, 50)) < 0.7
  correct = rng.random((37, 20)) < 0.8
  correct[:, 0] = True                         # every model right: influence exactly 0
  ours = influence_attribution(keep, correct.astype(np.float32))
  theirs = np.concatenate([block for _, block, _ in InfluenceComputation(keep, correct, block_size=16).dense_blocks()])
  np.testing.assert_allclose(ours, theirs, atol=1e-6)
  assert np.all(ours[:, 0] == 0.0)
  assert np.isnan(lds_per_test(ours, keep, rng.normal(size=(37, 20)))[0])


def test_split_and_bad_shapes():
  est, ev = split_models(11, 3)
  assert len(est) == 5 and len(ev) == 6 and not set(est) & set(ev)
  assert np.array_equal(split_models(11, 3)[0], est) and not np.array_equal(split_models(11, 4)[0], est)
  with pytest.raises(JaxmemError, match="at least 4 models"):
    split_models(3, 0)
  with pytest.raises(JaxmemError, match=r"\(training examples, test examples\) = \(5, 2\)"):
    lds_per_test(np.zeros((2, 5)), np.ones((4, 5), bool), np.zeros((4, 2)))


def test_cli_writes_lds_json_with_external_attribution(tiny_run, tmp_path, capsys):
  from jaxmem.cli import main   # in-process: the console script's function, same parsing and exit codes
  run = tmp_path / "run"
  shutil.copytree(tiny_run.run_dir, run)
  n, t = tiny_run.records.num_train, tiny_run.records["test_margin"].shape[1]
  np.save(tmp_path / "attr.npy", np.random.default_rng(0).normal(size=(n, t)))
  assert main(["scores", str(run), "--estimators", "memorization,lds", "--attribution", str(tmp_path / "attr.npy")]) == 0
  summary = json.loads((run / "lds.json").read_text())
  for method in ("influence_correctness", "influence_margin", "datamodels", "random", "external"):
    assert {"lds", "lds_low", "lds_high", "test_examples_used"} <= set(summary[method])
  per_test = (run / "lds_per_test.csv").read_text().splitlines()
  assert per_test[0] == "test_index,test_label,influence_correctness,influence_margin,datamodels,random,external"
  assert len(per_test) == t + 1
  capsys.readouterr()
  np.save(tmp_path / "bad.npy", np.zeros((3, 2)))
  before = (run / "lds.json").read_bytes()
  assert main(["scores", str(run), "--estimators", "lds", "--attribution", str(tmp_path / "bad.npy")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("jaxmem: error: ") and "(3, 2)" in err
  assert (run / "lds.json").read_bytes() == before      # nothing half-written
  (tmp_path / "junk.npy").write_text("not numpy")
  assert main(["scores", str(run), "--estimators", "lds", "--attribution", str(tmp_path / "junk.npy")]) == 2
  assert "not a readable .npy" in capsys.readouterr().err
