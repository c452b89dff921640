"""Exposure of inserted canaries (Carlini et al. 2019, "The Secret Sharer: Evaluating and Testing
Unintended Memorization in Neural Networks", §4 "Exposure").

A canary s[r] is a format s filled with randomness r from a space R (here: digit strings). A model
ranks every candidate r' ∈ R by the log-perplexity Px of s[r'];

  rank(s[r]) = |{r' ∈ R : Px(s[r']) ≤ Px(s[r])}|,      exposure = log2 |R| − log2 rank(s[r])   (Def. 4)

so exposure is log2 |R| (≈ 13.3 bits for 10^4) when the secret is the model's favourite and, for a
model that never saw it, the rank is uniform on 1..|R| and E[exposure] → 1/ln 2 ≈ 1.44 bits.

**Extrapolated exposure** (§4.3, "Approximating exposure via distribution modeling"): when R is too
large to enumerate, fit a skew-normal distribution to the log-perplexities of candidates (the
paper: a sample of them) and take exposure ≈ −log2 F(Px(s[r])), F the fitted CDF. It continues
past the largest exact value log2 |R| (it needs no candidate to rank below the canary).
``tests/test_text_scores.py`` checks it against the exact exposure within the exact rank's own
sampling noise. (A method-of-moments fit, tried for speed, strays by up to 1.2 bits at rank 100 of
10^4 when fitted to a 2000-candidate sample — the sample's third moment is noisy — so the fit is
maximum likelihood, as the paper's.)

Differences from tensorflow/privacy's ``secret_sharer`` (``compute_exposure_interpolation`` /
``compute_exposure_extrapolation``): that code takes the perplexities of one model and returns one
exposure per canary; here every model of a run gives one, and a canary's score is the mean over the
models that trained on it with its standard error, beside the same mean over the models that did
not (the control, which should sit near 1.44 bits; :func:`fresh_secret_control` gives its exact
chance value and spread under the same models). Ties count against the canary (≤ in the rank), as
the definition and the reference's interpolation do. The skew-normal is fitted to all candidates or
to a seeded sample of them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.stats import rankdata, skewnorm

#: 1 / ln 2: the mean exposure of a secret ranked uniformly at random among many candidates.
CHANCE_EXPOSURE = 1.0 / np.log(2.0)


def _per_secret(candidate_logperp, num_secrets: int) -> np.ndarray:
  """(M, S, C): one candidate space per secret; an (M, C) input is one space shared by all secrets."""
  logperp = np.asarray(candidate_logperp, np.float64)
  if logperp.ndim == 2:
    return np.broadcast_to(logperp[:, None, :], (logperp.shape[0], num_secrets, logperp.shape[1]))
  if logperp.ndim != 3 or logperp.shape[1] != num_secrets:
    raise ValueError(f"candidate log-perplexities {logperp.shape} must be (M, C) or (M, {num_secrets}, C)")
  return logperp


def exposure_exact(candidate_logperp: np.ndarray, secret_index_S: np.ndarray) -> np.ndarray:
  """(M, S) exposure of S secrets under M models. ``candidate_logperp``: (M, S, C), secret s's
  own candidate space, or (M, C) shared by all; ``secret_index_S``: each secret's candidate."""
  secret_index_S = np.asarray(secret_index_S, np.int64)
  logperp_MxSxC = _per_secret(candidate_logperp, len(secret_index_S))
  secret_MxS = np.take_along_axis(logperp_MxSxC, secret_index_S[None, :, None], axis=2)[..., 0]
  rank_MxS = (logperp_MxSxC <= secret_MxS[..., None]).sum(axis=2)
  return np.log2(logperp_MxSxC.shape[2]) - np.log2(rank_MxS)


def exposure_extrapolated(candidate_logperp: np.ndarray, secret_index_S: np.ndarray, *,
                          sample_size: int | None = None, seed: int = 0, models: np.ndarray | None = None) -> np.ndarray:
  """(M, S) extrapolated exposure: −log2 of the skew-normal CDF, fitted by maximum likelihood
  (``scipy.stats.skewnorm.fit``) per model and space to the candidates' log-perplexities (or to
  ``sample_size`` of them drawn without replacement), at each secret's value. ``models`` (M, S)
  bool, optional: fit only these (model, secret) pairs, NaN elsewhere (a fit costs tens of ms)."""
  secret_index_S = np.asarray(secret_index_S, np.int64)
  logperp_MxSxC = _per_secret(candidate_logperp, len(secret_index_S))
  secret_MxS = np.take_along_axis(logperp_MxSxC, secret_index_S[None, :, None], axis=2)[..., 0]
  num_candidates = logperp_MxSxC.shape[2]
  chosen = np.arange(num_candidates)
  if sample_size is not None and sample_size < num_candidates:
    chosen = np.random.default_rng(seed).choice(num_candidates, sample_size, replace=False)
  wanted_MxS = np.ones(secret_MxS.shape, bool) if models is None else np.asarray(models, bool)
  out = np.full(secret_MxS.shape, np.nan)
  for m, s in zip(*np.nonzero(wanted_MxS)):
    shape, loc, scale = skewnorm.fit(logperp_MxSxC[m, s, chosen])
    out[m, s] = -skewnorm.logcdf(secret_MxS[m, s], shape, loc, scale) / np.log(2.0)
  return out


def exposure_of_every_candidate(candidate_logperp_MxC: np.ndarray) -> np.ndarray:
  """(M, C) exposure each candidate of a shared space would have as the secret: log2 C − log2 of
  its rank under each model (ties against it, as :func:`exposure_exact`)."""
  logperp_MxC = np.asarray(candidate_logperp_MxC, np.float64)
  rank_MxC = rankdata(logperp_MxC, method="max", axis=1)  # |{r' : Px(r') <= Px(r)}|
  return np.log2(logperp_MxC.shape[1]) - np.log2(rank_MxC)


class ChanceControl(NamedTuple):
  """What chance gives the out-models of each canary, exactly (see :func:`fresh_secret_control`).

  ``mean`` (S,): the expected out-model mean exposure of a fresh secret drawn uniformly from R (≈
  1/ln 2 less what ties take); ``sd`` (S,): its standard deviation over the draw, i.e. how far one
  canary's out-model mean strays from ``mean`` by chance alone."""
  mean: np.ndarray
  sd: np.ndarray


def fresh_secret_control(keep_MxS: np.ndarray, candidate_logperp_MxC: np.ndarray) -> ChanceControl:
  """The out-models' control for each canary with its honest spread: the distribution of the mean
  exposure, over canary s's out-models, of a *fresh* secret r drawn uniformly from R and never
  inserted, computed exactly by enumerating all r ∈ R (no sampling).

  Why this and not the standard error over out-models: the unit that varies is the canary. Every
  out-model of s trained on most of the same corpus (the other canaries included), so they share
  digit preferences, and s's rank under them depends on how its digits happen to resemble those
  preferences: their exposures of s are strongly correlated, and their mean varies from canary to
  canary by about the spread of one uniform rank (1/ln 2 ≈ 1.44 bits), far beyond its SE over
  models. A fresh secret under the same models has exactly the spread a canary's control has when
  the out-models carry no information about it (the null), so ``(exposure_out − mean) / sd`` says
  whether a control deviates from chance; the mean of S canaries' controls has null standard
  deviation sqrt(Σ sd²) / S (secrets drawn independently). Carlini et al. (2019) use a model that
  never saw the canary as the reference (§4.2, ranks uniform); this enumerates that reference for
  the models at hand instead of assuming it."""
  keep_MxS = np.asarray(keep_MxS, bool)
  exposure_MxC = exposure_of_every_candidate(candidate_logperp_MxC)
  out_MxS = (~keep_MxS).astype(np.float64)
  n_out_S = out_MxS.sum(axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    per_secret_SxC = (out_MxS.T @ exposure_MxC) / n_out_S[:, None]   # out-model mean exposure of each fresh secret
  return ChanceControl(per_secret_SxC.mean(axis=1), per_secret_SxC.std(axis=1))


class CanaryExposure(NamedTuple):
  """Per canary: mean exposure over the models that trained on it (``mean_in``, with ``se_in``) and
  over those that did not (``mean_out``, ``se_out``), and how many of each. NaN where a group is
  empty; the SE is NaN with one model (s / sqrt(n), s the sample standard deviation)."""
  mean_in: np.ndarray
  se_in: np.ndarray
  mean_out: np.ndarray
  se_out: np.ndarray
  n_in: np.ndarray
  n_out: np.ndarray


def canary_exposure(keep_MxS: np.ndarray, exposure_MxS: np.ndarray) -> CanaryExposure:
  """Means and standard errors of per-model exposures, split by membership (``keep_MxS``: the
  membership columns of the canaries)."""
  keep_MxS = np.asarray(keep_MxS, bool)
  exposure_MxS = np.asarray(exposure_MxS, np.float64)

  def group(mask):
    n = mask.sum(axis=0)
    total = np.where(mask, exposure_MxS, 0.0).sum(axis=0)
    mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    var = np.where(mask, (exposure_MxS - mean) ** 2, 0.0).sum(axis=0) / np.maximum(n - 1, 1)
    return mean, np.where(n > 1, np.sqrt(var / np.maximum(n, 1)), np.nan), n

  mean_in, se_in, n_in = group(keep_MxS)
  mean_out, se_out, n_out = group(~keep_MxS)
  return CanaryExposure(mean_in, se_in, mean_out, se_out, n_in.astype(np.int64), n_out.astype(np.int64))
