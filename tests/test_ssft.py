"""FSLT/SSFT two-phase study: per-model times equal naive loops; flipped labels are forgotten first;
merging into a run's scores."""

import math
import shutil

import numpy as np

import jaxmem
from jaxmem.scoring import read_scores_csv
from jaxmem.studies.ssft import merge_into_run, split_halves, ssft_study, two_phase_times


def _naive_fslt(history):
  """Earliest 1-based epoch after which always correct; E + 1 if wrong at the last epoch."""
  e = len(history)
  for t in range(1, e + 1):
    if all(history[t - 1:]):
      return t
  return e + 1


def _naive_ssft(history):
  """Earliest 1-based epoch after which never correct again; E + 1 if correct at the last epoch."""
  e = len(history)
  for t in range(1, e + 1):
    if not any(history[t - 1:]):
      return t
  return e + 1


def test_two_phase_times_equal_naive_loops():
  rng = np.random.default_rng(0)
  m, e1, e2, n = 5, 7, 6, 30
  first = rng.random((m, e1, n)) < rng.random((1, 1, n))
  second = rng.random((m, e2, n)) < rng.random((1, 1, n))
  first[:, :, 0], second[:, :, 0] = True, True     # always correct: FSLT 1, never forgotten (E2 + 1)
  first[:, :, 1], second[:, :, 1] = False, False   # never learned: FSLT E1 + 1, forgotten at once (1)
  first_N = rng.random(n) < 0.5
  first_N[:2] = True
  fslt, ssft = two_phase_times(first, second, first_N)
  for i in range(m):
    for j in range(n):
      if not first_N[j]:
        assert math.isnan(fslt[i, j]) and math.isnan(ssft[i, j])
        continue
      assert fslt[i, j] == _naive_fslt(list(first[i, :, j]))
      assert ssft[i, j] == _naive_ssft(list(second[i, :, j]))
  assert (fslt[:, 0] == 1).all() and (ssft[:, 0] == e2 + 1).all()
  assert (fslt[:, 1] == e1 + 1).all() and (ssft[:, 1] == 1).all()


def test_split_halves_is_seeded_and_balanced():
  a, b = split_halves(101, 3), split_halves(101, 3)
  np.testing.assert_array_equal(a, b)
  assert (a == 0).sum() == 50 and (a == 1).sum() == 51
  assert not np.array_equal(a, split_halves(101, 4))


def test_flipped_labels_have_shorter_ssft_on_digits(tmp_path):
  """Done-when direction at small size: on digits with 10% flipped labels, flipped examples are
  forgotten sooner in the second phase (and learned later in the first) than clean ones."""
  config = jaxmem.RunConfig(dataset="digits", label_noise=0.1, batch_size=64, chunk_size=4, strategy="vmap",
                            model_options={"hidden_sizes": (128,)})
  result = ssft_study(config, tmp_path / "ssft", num_models=2, first_epochs=12, second_epochs=6, log=lambda m: None)
  noisy = result.columns["noisy"].astype(bool)
  assert np.isfinite(result.columns["ssft"]).all() and np.isfinite(result.columns["fslt"]).all()
  assert np.mean(result.columns["ssft"][noisy]) < np.mean(result.columns["ssft"][~noisy])
  assert np.mean(result.columns["fslt"][noisy]) > np.mean(result.columns["fslt"][~noisy])
  table = read_scores_csv(tmp_path / "ssft" / "ssft_scores.csv")
  np.testing.assert_allclose(table["ssft"], result.columns["ssft"], rtol=1e-5)
  # a rerun with the same settings reuses the scores without training
  again = ssft_study(config, tmp_path / "ssft", num_models=2, first_epochs=12, second_epochs=6,
                     log=lambda m: (_ for _ in ()).throw(AssertionError(f"retrained: {m}")))
  np.testing.assert_allclose(again.columns["fslt"], result.columns["fslt"], rtol=1e-5)


def test_merge_into_run_adds_columns_and_correlations(tiny_run, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(tiny_run.run_dir, run)
  n = tiny_run.records.num_train
  rng = np.random.default_rng(0)
  columns = {"fslt": rng.random(n), "fslt_se": rng.random(n), "ssft": rng.random(n), "ssft_se": rng.random(n)}
  fingerprint = jaxmem.RunDir.open(run).manifest()["dataset"]["fingerprint"]
  merge_into_run(run, columns, dataset_fingerprint=fingerprint)
  table = read_scores_csv(run / "scores.csv")
  np.testing.assert_allclose(table["ssft"], columns["ssft"], rtol=1e-5)
  np.testing.assert_allclose(table["memorization"], read_scores_csv(tiny_run.run_dir / "scores.csv")["memorization"])
  header = (run / "correlations.csv").read_text().splitlines()[0].split(",")
  assert "fslt" in header and "ssft" in header and "memorization" in header
  # Rescoring rebuilds scores.csv from the records and keeps what the study computed.
  jaxmem.score_run(run)
  rescored = read_scores_csv(run / "scores.csv")
  for name in columns:
    np.testing.assert_allclose(rescored[name], table[name], err_msg=name)
  np.testing.assert_allclose(rescored["memorization"], table["memorization"])
  assert "ssft" in (run / "correlations.csv").read_text().splitlines()[0].split(",")
  try:
    merge_into_run(run, columns, dataset_fingerprint="other")
  except jaxmem.JaxmemError as e:
    assert "fingerprint" in str(e)
  else:
    raise AssertionError("merging scores of other data must be refused")
