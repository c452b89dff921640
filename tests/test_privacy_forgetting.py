"""(A, α, k)-forgetting: planted fixtures with known decay, naive loops, and tiny end-to-end studies on
digits and on a text run."""

import numpy as np
import pytest

import jaxmem
from jaxmem import RunConfig
from jaxmem.errors import JaxmemError
from jaxmem.masks import balanced_masks
from jaxmem.scores.text import loss_signal
from jaxmem.scoring import read_scores_csv
from jaxmem.studies.privacy_forgetting import (attack_statistic, exponential_decay_rate, forgetting_curves,
                                               forgetting_k_at_alpha, memorization_quantile, privacy_forgetting_study)
from jaxmem.text import PAD, make_canaries

TINY_LM = {"num_layers": 1, "width": 16, "num_heads": 2, "mlp_ratio": 2, "max_len": 16}


def test_decay_rate_is_exact_on_a_noiseless_exponential():
  gap = 3.0 * np.exp(-0.37 * np.arange(9))
  fit = exponential_decay_rate(gap)
  assert fit["rate"] == pytest.approx(0.37, abs=1e-12) and fit["se"] == pytest.approx(0.0, abs=1e-9)
  assert np.isnan(exponential_decay_rate(np.array([1.0, -1.0, 0.0]))["rate"])


def test_forgetting_k_at_alpha_equals_naive_loop():
  rng = np.random.default_rng(0)
  advantage = rng.uniform(-0.2, 0.6, size=(7, 50))
  advantage[rng.random((7, 50)) < 0.05] = np.nan
  got = forgetting_k_at_alpha(advantage, 0.3)
  for i in range(50):
    expected = 7
    for k in range(7):
      if all(advantage[j, i] < 0.3 for j in range(k, 7)):
        expected = k
        break
    assert got[i] == expected


def test_memorization_quantiles_have_equal_sizes_despite_ties():
  mem = np.array([0, 0, 0, 0, 0, 0, 0.2, 0.9])
  np.testing.assert_array_equal(memorization_quantile(mem, 2), [0, 0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(memorization_quantile(np.array([0.5, 0.1, 0.9, 0.3]), 4), [2, 0, 3, 1])


def test_planted_exponential_forgetting_is_recovered():
  # Members' margins sit gap0 * exp(-rate * k) above non-members', with per-example offsets and noise.
  rng = np.random.default_rng(1)
  models, num_k, s = 32, 8, 60
  keep, _ = balanced_masks(models, s, (0.5,), 0)
  rates = np.where(np.arange(s) < s // 2, 0.25, 0.6)  # slow half, fast half
  offsets = rng.normal(0, 1, s)
  k = np.arange(num_k)
  margin = (offsets[None, None] + rng.normal(0, 0.3, (models, num_k, s))
            + keep[:, None, :] * 4.0 * np.exp(-rates[None, None, :] * k[None, :, None]))
  groups = {"slow": rates == 0.25, "fast": rates == 0.6}
  curves = forgetting_curves(margin, keep, groups, num_bootstrap=50)
  # Tolerances from the spread over fixture seeds 0-5 (slow 0.247-0.253, fast 0.571-0.637): the
  # fast group's late gaps are within a few noise SEs of zero, so its log-linear fit is noisier.
  assert curves.decay["slow"]["rate"] == pytest.approx(0.25, abs=0.02)
  assert curves.decay["fast"]["rate"] == pytest.approx(0.6, abs=0.08)
  for name in groups:
    auc = np.array([m["auc"]["value"] for m in curves.metrics[name]])
    assert auc[0] > 0.99 and auc[-1] < auc[0]
  # The slow group stays distinguishable longer: its attack AUC at the end exceeds the fast group's.
  assert curves.metrics["slow"][-1]["auc"]["value"] > curves.metrics["fast"][-1]["auc"]["value"]
  k_alpha = forgetting_k_at_alpha(curves.advantage_KxS, 0.5)
  assert k_alpha[groups["slow"]].mean() > k_alpha[groups["fast"]].mean()


@pytest.mark.slow  # trains twice per model on digits; the fixtures above pin the math
def test_tiny_study_on_digits(tiny_run, tmp_path):
  result = privacy_forgetting_study(tiny_run.run_dir, tmp_path / "pf",
                                    num_models=6, inject=20, first_epochs=2, second_epochs=2, log=lambda m: None)
  assert set(result.curves.metrics) >= {"r=1", "r=4", "all"}
  assert result.curves.scores_MxKxS.shape == (6, 3, 20)
  assert result.examples["forgetting_k_at_alpha"].max() <= 3
  assert (tmp_path / "pf" / "privacy_forgetting.png").stat().st_size > 0
  assert (tmp_path / "pf" / "forgetting_curve.csv").read_text().startswith("group,k,auc")
  with pytest.raises(JaxmemError, match="num_models must be even"):
    privacy_forgetting_study(tiny_run.run_dir, tmp_path / "x", num_models=5)


def test_attack_statistic_is_the_margin_or_the_per_token_loglik():
  ds = make_canaries(num_frequent=12, num_rare=2, duplicated=(2,), repetitions=(1,), canaries_per_repetition=1,
                     secret_length=2, num_test=4)
  rng = np.random.default_rng(0)
  loglik_KxExN = -rng.random((2, 3, ds.num_train)) * 20
  per_token = attack_statistic({"train_loglik_epochs": loglik_KxExN}, ds, epochs=True)
  for i in range(ds.num_train):  # predicted tokens: the sequence's non-padding tokens after BOS
    targets = int((ds.x_train[i] != PAD).sum()) - 1
    np.testing.assert_allclose(per_token[:, :, i], loglik_KxExN[:, :, i] / targets)
  image = type("Images", (), {"is_text": False})()
  margin_KxN = rng.normal(size=(2, 5))
  assert attack_statistic({"train_margin": margin_KxN}, image) is margin_KxN


@pytest.mark.slow  # a text run and the study's two phases: ~1 min on 2 cores; the math is pinned above
def test_tiny_study_on_a_text_run(tmp_path):
  """Sequences injected into a language model's training, attacked with LiRA on the per-token
  log-likelihood; the run itself records def. 2 exact memorization per epoch."""
  ds = make_canaries(num_frequent=40, num_rare=8, duplicated=(2, 4), repetitions=(1, 4), canaries_per_repetition=2,
                     secret_length=2, num_test=8)
  config = RunConfig(dataset="canaries", model="transformer", model_options=TINY_LM, num_models=4, epochs=2,
                     batch_size=16, learning_rate=1e-2, chunk_size=4, strategy="vmap", subset_ratios=(0.5,),
                     record_epochs=True)
  run = jaxmem.run(config, tmp_path / "run", dataset=ds, progress=False, log=lambda m: None)
  table = read_scores_csv(tmp_path / "run" / "exact_memorization.csv")
  np.testing.assert_array_equal(table["epoch"], [1, 2])
  records = run.records
  targets = ds.example_info()["num_tokens"] - 1
  pairs = targets * ds.copies
  final_in = [(records["train_token_accuracy"][m] * pairs)[records.keep[m]].sum() / pairs[records.keep[m]].sum()
              for m in range(4)]  # the last epoch is the trained model the run evaluated
  assert table["exact_memorization_in"][-1] == pytest.approx(np.mean(final_in), abs=1e-6)
  assert table["exact_memorization_in_ci_low"][-1] < table["exact_memorization_in"][-1]

  statistic = attack_statistic({"train_loglik": records["train_loglik"]}, ds)
  np.testing.assert_allclose(statistic, loss_signal(records["train_loglik"], targets))
  result = privacy_forgetting_study(tmp_path / "run", tmp_path / "pf", num_models=4, inject=6, first_epochs=2,
                                    second_epochs=2, dataset=ds, log=lambda m: None)
  assert result.curves.scores_MxKxS.shape == (4, 3, 6)
  assert {"r=1", "r=4", "all"} <= set(result.curves.metrics)
  assert result.summary["statistic"] == "per-token log-likelihood"
  assert np.isfinite(result.curves.margin_gap_K["all"]).all()
  assert (tmp_path / "pf" / "forgetting_curve.csv").read_text().startswith("group,k,auc")
  with pytest.raises(JaxmemError, match="fingerprint"):
    privacy_forgetting_study(tmp_path / "run", tmp_path / "x", num_models=4, inject=6, log=lambda m: None)
