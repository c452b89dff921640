"""Benign-memorization study (def. 4) on a tiny random-label digits run."""

import pytest

import jaxmem
from jaxmem.errors import JaxmemError
from jaxmem.studies.benign import benign_study, verdict


def test_verdict_reads_the_interval():
  assert verdict(0.01, 0.2) == "benign"
  assert verdict(-0.2, -0.01) == "malign"
  assert verdict(-0.01, 0.2) == "undecided"


@pytest.mark.slow  # two variants x (train + probe every layer); knn == sklearn is in test_knn_probe
def test_benign_study_tables_every_layer_and_variant(tiny_config, tmp_path):
  config = tiny_config.replace(num_models=3, chunk_size=4, label_noise=0.9, epochs=2,
                               model_options={"hidden_sizes": (16, 8)})
  run = jaxmem.run(config, tmp_path / "run", progress=False, log=lambda m: None).run_dir
  result = benign_study(run, tmp_path / "benign", num_models=3, k=5, log=lambda m: None)
  assert [(r["variant"], r["layer"]) for r in result.rows] == [
      ("augment=false", "hidden_0"), ("augment=false", "hidden_1"),
      ("augment=true", "hidden_0"), ("augment=true", "hidden_1")]
  for row in result.rows:
    assert row["difference"] == pytest.approx(row["trained_accuracy"] - row["init_accuracy"])
    assert row["verdict"] == verdict(row["difference_ci_low"], row["difference_ci_high"])
    assert 0 <= row["init_accuracy"] <= 1
  # Initialization does not depend on augmentation: the same models start from the same parameters.
  by = {(r["variant"], r["layer"]): r for r in result.rows}
  assert by[("augment=false", "hidden_0")]["init_accuracy"] == by[("augment=true", "hidden_0")]["init_accuracy"]
  assert (tmp_path / "benign" / "benign.png").stat().st_size > 0
  with pytest.raises(JaxmemError, match="k must be in"):
    benign_study(run, tmp_path / "bad", num_models=2, k=0, log=lambda m: None)
