"""Privacy onion study end to end at a tiny size."""

import json

import numpy as np
import pytest

import jaxmem
from jaxmem.data import load_dataset
from jaxmem.errors import JaxmemError
from jaxmem.data import training_subset
from jaxmem.studies.onion import exposure_order, format_onion, onion


def test_training_subset_keeps_noise_bookkeeping():
  ds = load_dataset("digits", label_noise=0.1, seed=0)
  kept = np.array([3, 0, 7, 100])
  small = training_subset(ds, kept, "small")
  np.testing.assert_array_equal(small.x_train, ds.x_train[kept])
  np.testing.assert_array_equal(small.y_train, ds.y_train[kept])
  np.testing.assert_array_equal(small.noisy, ds.noisy[kept])
  np.testing.assert_array_equal(small.clean_y_train, ds.clean_y_train[kept])
  assert small.num_test == ds.num_test


def test_exposure_order_breaks_ties_by_gap_and_puts_nan_last():
  risk = np.array([0.5, 1.0, np.nan, 1.0, 0.9])
  gap = np.array([0.0, 1.0, 9.0, 3.0, 0.0])
  np.testing.assert_array_equal(exposure_order(risk, gap), [3, 1, 4, 0, 2])


def _tiny_source(tmp_path, tiny_config):
  # 300 digits (10% labels flipped) and 16 small models: seconds per retraining (plus compilation).
  digits = load_dataset("digits", label_noise=0.1, seed=0)
  data = training_subset(digits, np.arange(300), "digits[:300]")
  config = tiny_config.replace(num_models=16, chunk_size=16, subset_ratios=(0.5,), epochs=3)
  source = tmp_path / "run"
  jaxmem.run(config, source, dataset=data, progress=False, log=lambda m: None, estimators=["memorization"])
  return source, data


def test_onion_study_end_to_end(tmp_path, tiny_config):
  """Without the control: one source run and one retraining (each compiles its programs)."""
  source, data = _tiny_source(tmp_path, tiny_config)
  result = onion(source, tmp_path / "onion", ks=[30], threshold=0.8, control=False, dataset=data, log=lambda m: None)
  assert [(p.removal, p.k) for p in result.points] == [("top", 30)]
  p = result.points[0]
  n = result.risk_before.size
  assert p.num_train == n - 30
  assert 0 <= p.became_exposed <= p.safe_before and 0 <= p.became_safe <= p.exposed_before
  assert 0 < p.safe_before + p.exposed_before <= n - 30
  top = json.loads((tmp_path / "onion" / "onion.json").read_text())["removed_top"]
  assert len(top) == 30
  # The removed examples are the most exposed ones, and they are missing after retraining.
  assert np.nanmin(result.risk_before[top]) >= np.nanmax(np.delete(result.risk_before, top)) - 1e-12
  assert np.isnan(result.risk_after["top-k30"][top]).all()
  assert np.isfinite(result.risk_after["top-k30"]).sum() > 0
  rows = (tmp_path / "onion" / "onion.csv").read_text().splitlines()
  assert rows[0] == "index,label,noisy,lira_online_before,lira_online_top-k30" and len(rows) == n + 1
  assert any("became exposed" in line for line in format_onion(result))
  with pytest.raises(JaxmemError, match="k values"):
    onion(source, tmp_path / "bad", ks=[n], dataset=data, log=lambda m: None)


@pytest.mark.slow
def test_onion_study_with_random_control(tmp_path, tiny_config):
  source, data = _tiny_source(tmp_path, tiny_config)
  result = onion(source, tmp_path / "onion", ks=[30], threshold=0.8, dataset=data, log=lambda m: None)
  assert [(p.removal, p.k) for p in result.points] == [("top", 30), ("random", 30)]
  n = result.risk_before.size
  for p in result.points:
    assert p.num_train == n - 30
    assert 0 <= p.became_exposed <= p.safe_before and 0 <= p.became_safe <= p.exposed_before
    assert p.safe_before + p.exposed_before <= n - 30
  report = json.loads((tmp_path / "onion" / "onion.json").read_text())
  top = report["removed_top"]
  assert len(top) == 30
  # The removed examples are the most exposed ones, and they are missing after retraining.
  assert np.nanmin(result.risk_before[top]) >= np.nanmax(np.delete(result.risk_before, top)) - 1e-12
  assert np.isnan(result.risk_after["top-k30"][top]).all()
  assert np.isfinite(result.risk_after["top-k30"]).sum() > 0
  rows = (tmp_path / "onion" / "onion.csv").read_text().splitlines()
  assert rows[0] == "index,label,noisy,lira_online_before,lira_online_top-k30,lira_online_random-k30"
  assert len(rows) == n + 1
  assert any("became exposed" in line for line in format_onion(result))
  with pytest.raises(JaxmemError, match="k values"):
    onion(source, tmp_path / "bad", ks=[n], dataset=data, log=lambda m: None)
