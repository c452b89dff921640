"""Layer rewinding and the neural-collapse study on a small digits run with label noise."""

import jax
import numpy as np
import pytest

import jaxmem
from jaxmem.data import load_dataset
from jaxmem.engine import Engine
from jaxmem.engine.trainer import standardize
from jaxmem.errors import JaxmemError
from jaxmem.features import logits
from jaxmem.scoring import read_scores_csv, score_run
from jaxmem.studies.layer_rewind import layer_rewind_study, layers_of, rewind
from jaxmem.studies.neural_collapse import neural_collapse_study


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory, tiny_config):
  config = tiny_config.replace(num_models=4, chunk_size=4, label_noise=0.2, keep_params="all",
                               model_options={"hidden_sizes": (32, 16)})
  out = tmp_path_factory.mktemp("noisy") / "run"
  jaxmem.run(config, out, progress=False, log=lambda m: None)
  return out, config


def test_rewinding_to_the_same_epoch_changes_nothing_bitwise(tiny_config):
  config = tiny_config.replace(epochs=2, model_options={"hidden_sizes": (16, 8)})
  dataset = load_dataset("digits")
  engine = Engine(dataset, config)
  kept = {}
  keep = np.random.default_rng(0).random((2, dataset.num_train)) < 0.5
  records = engine.train_chunk([0, 1], keep, epochs_per_call=1,
                               on_params=lambda e, p: kept.setdefault(e, jax.device_get(jax.tree.map(lambda x: x[:2], p))))
  final = kept[2]
  assert layers_of(final) == ["Dense_0", "Dense_1", "Dense_2"]
  x_train, _ = standardize(dataset)
  reference = logits(engine.model, final, x_train)
  np.testing.assert_array_equal(reference.argmax(-1) == dataset.y_train[None], records["train_correct"])
  for layer in layers_of(final):
    same = rewind(final, kept[2], layer)
    np.testing.assert_array_equal(logits(engine.model, same, x_train), reference)
    changed = rewind(final, kept[0], layer)
    assert not np.array_equal(logits(engine.model, changed, x_train), reference)
  with pytest.raises(JaxmemError, match="unknown layer 'Dense_9'"):
    rewind(final, kept[0], "Dense_9")


def test_layer_rewind_study_writes_table_and_plot(noisy_run, tmp_path):
  run, config = noisy_run
  result = layer_rewind_study(run, tmp_path / "lr", num_models=2, rewind_epochs=(0, 3), log=lambda m: None)
  keyed = {(r["rewind_epoch"], r["layer"], r["group"]): r for r in result.rows}
  assert {g for _, _, g in keyed} == {"flipped", "clean", "test"}
  # Rewinding to the final epoch is the trained model.
  for layer in ("Dense_0", "Dense_1", "Dense_2"):
    for group in ("flipped", "clean", "test"):
      assert keyed[(3, layer, group)]["accuracy"] == keyed[(3, "none", group)]["accuracy"]
  # The retrained models are the run's own: their accuracy matches the run's records.
  records = jaxmem.records.RunDir.open(run).load_records()
  noisy = load_dataset("digits", label_noise=0.2).noisy.astype(bool)
  flipped_in = records.keep[:2] & noisy[None]
  expected = ((records["train_correct"][:2] & flipped_in).sum(1) / flipped_in.sum(1)).mean()
  assert keyed[(3, "none", "flipped")]["accuracy"] == pytest.approx(expected, abs=1e-12)
  assert keyed[(3, "none", "test")]["accuracy"] == pytest.approx(records["test_correct"][:2].mean(), abs=1e-12)
  assert (tmp_path / "lr" / "layer_rewind.png").stat().st_size > 0
  assert (tmp_path / "lr" / "layer_rewind.csv").read_text().startswith("rewind_epoch,layer,group,accuracy")
  with pytest.raises(JaxmemError, match="rewind epochs must be in 0..3"):
    layer_rewind_study(run, tmp_path / "bad", rewind_epochs=(9,), log=lambda m: None)


def test_neural_collapse_study_merges_nc_distance(noisy_run, tmp_path):
  run, _ = noisy_run
  result = neural_collapse_study(run, tmp_path / "nc", log=lambda m: None)
  table = read_scores_csv(run / "scores.csv")
  np.testing.assert_allclose(table["nc_distance"], result.columns["nc_distance"], rtol=1e-5, equal_nan=True)
  assert "nc_distance" in (run / "correlations.csv").read_text()
  assert len(result.summary["mem_total_per_model"]) == 4
  # Rescoring the run from its records keeps the study's column.
  score_run(run)
  np.testing.assert_array_equal(read_scores_csv(run / "scores.csv")["nc_distance"], table["nc_distance"])
