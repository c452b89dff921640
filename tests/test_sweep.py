"""Sweep: variants parsed from --vary, each an ordinary resumable run equal to a plain run."""

import numpy as np
import pytest

import jaxmem
from jaxmem.errors import JaxmemError
from jaxmem.studies.sweep import bootstrap_memorization, parse_vary, sweep, variants


def test_parse_vary_keeps_brackets_and_json():
  assert parse_vary("model_options.hidden_sizes=[64],[256, 256]") == (
      "model_options.hidden_sizes", [[64], [256, 256]])
  assert parse_vary("augment=false,true") == ("augment", [False, True])
  assert parse_vary("weight_decay=0,5e-4") == ("weight_decay", [0, 5e-4])
  with pytest.raises(JaxmemError, match="FIELD=v1,v2"):
    parse_vary("weight_decay")
  with pytest.raises(JaxmemError, match="unknown field 'widht'"):
    variants(jaxmem.RunConfig(), ["widht=1,2"])
  with pytest.raises(JaxmemError, match="subset ratio must be in"):
    variants(jaxmem.RunConfig(), ["subset_ratio=0.5,1.5"])
  names = [n for n, _ in variants(jaxmem.RunConfig(), ["subset_ratio=0.5,0.7", "augment=false,true"])]
  assert names == ["subset_ratio=0.5__augment=false", "subset_ratio=0.5__augment=true",
                   "subset_ratio=0.7__augment=false", "subset_ratio=0.7__augment=true"]


def test_bootstrap_point_equals_memorization_estimator():
  rng = np.random.default_rng(0)
  keep, correct = rng.random((12, 40)) < 0.5, rng.random((12, 40)) < 0.7
  mem, draws = bootstrap_memorization(keep, correct, num_bootstrap=5, seed=0)
  np.testing.assert_allclose(mem, jaxmem.scores.memorization(keep, correct).estimate, rtol=1e-6, equal_nan=True)
  assert draws.shape == (5, 40)


def test_sweep_variants_are_plain_runs_and_resume(tiny_config, tmp_path):
  base = tiny_config.replace(num_models=4, epochs=2, label_noise=0.1)
  result = sweep(base, ["weight_decay=0,0.01"], tmp_path / "sweep", num_bootstrap=20, log=lambda m: None)
  assert [r["variant"] for r in result.rows] == ["weight_decay=0", "weight_decay=0.01"]
  plain = jaxmem.run(base.replace(weight_decay=0.01), tmp_path / "plain", progress=False, log=lambda m: None)
  swept = result.runs["weight_decay=0.01"].records
  for name in ("keep", "train_correct", "train_margin", "test_margin"):
    np.testing.assert_array_equal(plain.records.read(name), swept.read(name))
  assert result.spearman["pairs"][0]["a"] == "weight_decay=0"
  for row in result.rows:
    assert row["test_accuracy_ci_low"] <= row["test_accuracy"] <= row["test_accuracy_ci_high"]
  again = sweep(base, ["weight_decay=0,0.01"], tmp_path / "sweep", num_bootstrap=20, log=lambda m: None)
  assert all(r.trained_chunks == [] for r in again.runs.values())  # resumed: nothing retrained
  assert again.rows == result.rows
  assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
