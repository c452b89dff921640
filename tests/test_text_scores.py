"""Text scores against naive references: exposure (exact rank and skew-normal extrapolation),
counterfactual memorization of text, extraction rates, LOSS / zlib / Min-K% signals, per-sequence AUROC."""

import zlib

import numpy as np
import pytest
from scipy.stats import skewnorm

from jaxmem.scores.exposure import (CHANCE_EXPOSURE, canary_exposure, exposure_exact, exposure_extrapolated,
                                    exposure_of_every_candidate, fresh_secret_control)
from jaxmem.scores.text import (exact_memorization, extraction_rates, loss_signal, min_k_signal, text_memorization,
                                zlib_signal)


def test_exposure_equals_naive_rank_with_ties():
  rng = np.random.default_rng(0)
  logperp = rng.integers(0, 40, size=(5, 300)).astype(np.float32)  # many ties
  secrets = np.array([0, 7, 299, 150])
  got = exposure_exact(logperp, secrets)
  for m in range(5):
    for s, index in enumerate(secrets):
      rank = sum(1 for value in logperp[m] if value <= logperp[m, index])  # Carlini et al. 2019, def. 4
      assert got[m, s] == pytest.approx(np.log2(300) - np.log2(rank))
  # the model's favourite has the full log2 |R|; the worst one 0
  best = exposure_exact(np.array([[3.0, 1.0, 2.0]]), np.array([1, 0]))
  np.testing.assert_allclose(best, [[np.log2(3), 0.0]])


def test_unseen_secrets_have_chance_exposure():
  rng = np.random.default_rng(1)
  logperp = rng.normal(size=(400, 10_000))
  exposure = exposure_exact(logperp, np.arange(0, 10_000, 997))
  assert exposure.mean() == pytest.approx(CHANCE_EXPOSURE, abs=0.08)


def test_fresh_secret_control_equals_a_naive_loop_over_every_secret():
  rng = np.random.default_rng(5)
  logperp = rng.integers(0, 30, size=(9, 60)).astype(np.float64)  # many ties, counted against the secret
  keep = rng.random((9, 3)) < 0.5
  keep[:, 2] = [True] * 8 + [False]  # one out-model
  np.testing.assert_allclose(exposure_of_every_candidate(logperp), exposure_exact(logperp, np.arange(60)))
  got = fresh_secret_control(keep, logperp)
  for s in range(3):
    out = np.flatnonzero(~keep[:, s])
    per_secret = []
    for r in range(60):  # the out-models' mean exposure if r had been the secret
      ranks = [sum(1 for value in logperp[m] if value <= logperp[m, r]) for m in out]
      per_secret.append(np.mean([np.log2(60) - np.log2(rank) for rank in ranks]))
    assert got.mean[s] == pytest.approx(np.mean(per_secret))
    assert got.sd[s] == pytest.approx(np.std(per_secret))


def test_fresh_secret_control_without_ties_is_chance_and_spreads_like_one_rank():
  # Without ties every model's ranks are a permutation of 1..C, so the mean over R is exactly
  # log2 C − log2(C!)/C (→ 1/ln 2); identical models (one shared preference) leave a canary's
  # control the full spread of one uniform rank, independent ones shrink it by sqrt(models).
  rng = np.random.default_rng(6)
  c = 4000
  keep = np.zeros((16, 1), bool)
  exact_chance = np.log2(c) - np.sum(np.log2(np.arange(1, c + 1))) / c
  shared = fresh_secret_control(keep, np.tile(rng.permutation(c).astype(float), (16, 1)))
  independent = fresh_secret_control(keep, np.argsort(rng.random((16, c)), axis=1).astype(float))
  for control in (shared, independent):
    assert control.mean[0] == pytest.approx(exact_chance, abs=1e-9)
  one_rank_sd = np.std(np.log2(c) - np.log2(np.arange(1, c + 1)))
  assert one_rank_sd == pytest.approx(CHANCE_EXPOSURE, rel=0.02)  # exponential: sd = mean
  assert shared.sd[0] == pytest.approx(one_rank_sd, rel=1e-9)
  assert independent.sd[0] == pytest.approx(one_rank_sd / 4, rel=0.1)


def test_extrapolated_exposure_agrees_with_exact_on_an_enumerable_space():
  """Candidates whose log-perplexities are skew-normal (as Carlini et al. found them). The stated
  tolerance is the exact value's own sampling noise: a rank r among |R| draws is a binomial count,
  so log2 r has a standard deviation of about 1 / (ln 2 · sqrt(r)) around the true CDF; the
  extrapolation must agree within 4 of those plus 0.1 bits for the fit (5 and 0.15 for a fit to a
  2000-candidate sample). Four, not three: the test makes 84 comparisons, and at 3 standard
  deviations one of them would stray about one time in five (with this seed the empirical rank 100
  of model 2 sits 3.5 standard deviations from the true skew-normal CDF itself). Past the top
  ranks the exact value is capped at log2 |R| and only the extrapolation keeps going."""
  rng = np.random.default_rng(2)
  logperp = skewnorm.rvs(4.0, loc=20.0, scale=3.0, size=(3, 2, 10_000), random_state=rng)[:, 0]
  order = np.argsort(logperp, axis=1)
  ranks = np.array([10, 30, 100, 300, 1000, 3000, 9000])
  noise = 1 / (np.log(2) * np.sqrt(ranks))
  for m in range(3):
    secrets = order[m, ranks - 1]
    exact = exposure_exact(logperp[m: m + 1], secrets)
    fitted = exposure_extrapolated(logperp[m: m + 1], secrets)
    sampled = exposure_extrapolated(logperp[m: m + 1], secrets, sample_size=2000, seed=m)
    assert (np.abs(fitted - exact) <= 4 * noise + 0.1).all(), (fitted, exact)
    assert (np.abs(sampled - exact) <= 5 * noise + 0.15).all(), (sampled, exact)
    top = exposure_extrapolated(logperp[m: m + 1], order[m, :1])
    assert top[0, 0] > np.log2(10_000) - 1  # the favourite is extrapolated past where ranks run out
  # one space per secret (M, S, C) gives what each space alone gives
  logperp = skewnorm.rvs(4.0, loc=20.0, scale=3.0, size=(3, 2, 10_000), random_state=rng)
  per_secret = logperp.copy()
  only = np.array([[True, False], [False, True], [True, True]])
  partial = exposure_extrapolated(per_secret, np.array([5, 9]), models=only)
  assert np.isnan(partial[~only]).all() and np.isfinite(partial[only]).all()
  np.testing.assert_allclose(exposure_extrapolated(per_secret, np.array([5, 9])),
                             np.stack([exposure_extrapolated(logperp[:, 0], [5])[:, 0],
                                       exposure_extrapolated(logperp[:, 1], [9])[:, 0]], axis=1))
  np.testing.assert_allclose(exposure_exact(per_secret, np.array([5, 9])),
                             np.stack([exposure_exact(logperp[:, 0], [5])[:, 0],
                                       exposure_exact(logperp[:, 1], [9])[:, 0]], axis=1))


def test_canary_exposure_means_and_standard_errors_equal_a_loop():
  rng = np.random.default_rng(3)
  keep = rng.random((12, 4)) < 0.5
  keep[0, 3], keep[:, 2] = True, False
  keep[0, 2] = True  # canary 2: one in-model, SE unknown
  exposure = rng.random((12, 4)) * 10
  got = canary_exposure(keep, exposure)
  for s in range(4):
    for mask, mean, se, n in ((keep[:, s], got.mean_in, got.se_in, got.n_in),
                              (~keep[:, s], got.mean_out, got.se_out, got.n_out)):
      values = exposure[mask, s]
      assert n[s] == len(values) and mean[s] == pytest.approx(values.mean())
      if len(values) > 1:
        assert se[s] == pytest.approx(values.std(ddof=1) / np.sqrt(len(values)))
      else:
        assert np.isnan(se[s])


def test_text_memorization_equals_naive_loop():
  rng = np.random.default_rng(4)
  keep = rng.random((20, 15)) < 0.5
  keep[:, 0] = True  # no out-model: NaN
  accuracy = rng.random((20, 15))
  got = text_memorization(keep, accuracy)
  assert np.isnan(got.estimate[0])
  for i in range(1, 15):
    a, b = accuracy[keep[:, i], i], accuracy[~keep[:, i], i]
    assert got.estimate[i] == pytest.approx(a.mean() - b.mean(), abs=1e-6)
    assert got.se[i] == pytest.approx(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)), rel=1e-4)


def test_exact_memorization_equals_a_loop_over_token_pairs():
  """Def. 2 counted pair by pair: every (context, next token) pair of a model's training sequences,
  each copy of a duplicated sequence its own pairs, from per-token hits drawn at random."""
  rng = np.random.default_rng(7)
  models, epochs, n, length = 5, 3, 12, 9
  keep = rng.random((models, n)) < 0.5
  keep[0] = False  # a model without training sequences: NaN
  keep[1] = True   # one without out-sequences: NaN on the out side
  targets = rng.integers(1, length, n)
  copies = rng.integers(1, 4, n)
  hits = rng.random((models, epochs, n, length)) < 0.4
  hits &= np.arange(length)[None, None, None, :] < targets[None, None, :, None]  # padding never counts
  accuracy = hits.sum(-1) / targets  # the per-epoch record: each sequence's fraction of correct tokens
  got_in, got_out = exact_memorization(keep, accuracy.astype(np.float32), targets, copies)
  for m in range(models):
    for e in range(epochs):
      for side, got in ((True, got_in), (False, got_out)):
        correct = total = 0
        for i in range(n):
          if keep[m, i] != side:
            continue
          for _ in range(copies[i]):
            for t in range(targets[i]):
              correct += hits[m, e, i, t]
              total += 1
        if total == 0:
          assert np.isnan(got[m, e])
        else:
          assert got[m, e] == pytest.approx(correct / total, abs=1e-6)
  plain_in, _ = exact_memorization(keep, accuracy, targets)  # without copies: each sequence once
  m, e = 2, 1
  assert plain_in[m, e] == pytest.approx(hits[m, e][keep[m]].sum() / targets[keep[m]].sum())
  with pytest.raises(ValueError, match="not \\(models, epochs, sequences\\)"):
    exact_memorization(keep, accuracy[:, 0], targets)


def test_extraction_rates_count_in_and_out_models():
  keep = np.array([[1, 0], [1, 1], [0, 1], [0, 1]], bool)
  hit = np.array([[1, 1], [0, 1], [1, 0], [1, 1]], bool)
  rate_in, se_in, rate_out, se_out = extraction_rates(keep, hit)
  np.testing.assert_allclose(rate_in, [0.5, 2 / 3])
  np.testing.assert_allclose(rate_out, [1.0, 1.0])
  np.testing.assert_allclose(se_in[0], np.sqrt(0.5 * 0.5 / 4))  # plus two: (1 + 1) / (2 + 2)


def test_min_k_and_zlib_equal_hand_computed_values():
  token_logprob = np.array([[[-1.0, -4.0, -2.0, -3.0, -0.5, 0.0],       # 5 targets, then padding
                             [-2.0, -0.1, 0.0, 0.0, 0.0, 0.0]]])          # 2 targets
  num_targets = np.array([5, 2])
  # k = 40%: int(0.4 * 5) = 2 lowest of sequence 0: (-4 - 3) / 2; sequence 1: int(0.8) = 0 -> 1 token
  np.testing.assert_allclose(min_k_signal(token_logprob, num_targets, k=0.4), [[-3.5, -2.0]])
  np.testing.assert_allclose(min_k_signal(token_logprob, num_targets, k=1.0), [[-10.5 / 5, -2.1 / 2]])
  loglik = token_logprob.sum(axis=2)
  text = b"the cat sees the cat"
  zbytes = np.array([len(zlib.compress(text, 9)), 10])
  np.testing.assert_allclose(loss_signal(loglik, num_targets), [[-2.1, -1.05]])
  np.testing.assert_allclose(zlib_signal(loglik, num_targets, zbytes), [[-2.1 / (8 * zbytes[0]), -1.05 / 80]])
