"""Estimator adapters for language-model runs: they read a text run's records and its per-sequence
facts (``Records.example_info``: copies, canary, prefix_len, zlib_bytes, num_tokens, secret_index)
and call the pure functions of :mod:`jaxmem.scores.text` and :mod:`jaxmem.scores.exposure`.

``text_memorization`` writes the columns every text run's scores.csv has (``copies, canary,
memorization, memorization_se, memorization_loglik(_se), extractable(_se), extractable_out``);
``exposure`` the canaries' (``exposure, exposure_se, exposure_out, exposure_out_se, exposure_chance,
exposure_extrapolated(_se)``, empty for other sequences; ``exposure_out_se`` is the control's
spread with the canary as unit and ``exposure_chance`` its exact value under chance, both from
:func:`jaxmem.scores.exposure.fresh_secret_control`); ``lm_attacks`` the membership signals'
per-sequence AUROCs over models (``loss_auc, zlib_auc, mink_auc``) and their pooled AUROCs, and
LiRA's per-sequence AUROCs with the per-token log-likelihood as statistic
(``lira_loglik_online, lira_loglik_offline``, :func:`jaxmem.scores.lira.per_example_risk`);
``exact_memorization`` the per-epoch table of def. 2 (runs with ``record_epochs``). Per
sequence, ``zlib_auc`` equals ``loss_auc`` (zlib divides every model's score of a sequence by the
same length); the two differ where sequences are pooled, as an attack on a corpus pools them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import t as student_t

from jaxmem.scores._result import EstimatorResult
from jaxmem.scores._stats import auroc
from jaxmem.scores.exposure import (CHANCE_EXPOSURE, canary_exposure, exposure_exact, exposure_extrapolated,
                                    fresh_secret_control)
from jaxmem.scores.attack_metrics import per_example_auc
from jaxmem.scores.lira import per_example_risk
from jaxmem.scores.text import (exact_memorization, extraction_rates, loss_signal, min_k_signal, per_token_loglik, text_memorization,
                                zlib_signal)

#: Candidates the extrapolated exposure's skew-normal is fitted to, per model and canary (Carlini et
#: al. fit a sample; a larger enumerable R is subsampled the same way).
EXTRAPOLATION_SAMPLE = 2000


def _num_targets(records) -> np.ndarray:
  return records.example_info["num_tokens"] - 1  # BOS is never predicted


def text_memorization_estimator(records, *, context=None, **options) -> EstimatorResult:
  """Adapter: the columns every text run's scores.csv has, and their medians and rates."""
  info, keep = records.example_info, records.keep
  accuracy = text_memorization(keep, records["train_token_accuracy"])
  loglik = text_memorization(keep, per_token_loglik(records["train_loglik"], _num_targets(records)))
  rate_in, se_in, rate_out, _ = extraction_rates(keep, records["train_extractable"])
  columns = {"copies": info["copies"], "canary": info["canary"].astype(np.int8),
             "memorization": accuracy.estimate, "memorization_se": accuracy.se,
             "memorization_loglik": loglik.estimate, "memorization_loglik_se": loglik.se,
             "extractable": rate_in, "extractable_se": se_in, "extractable_out": rate_out,
             "n_in": accuracy.n_in, "n_out": accuracy.n_out}
  ranked = np.argsort(-np.nan_to_num(accuracy.estimate, nan=-np.inf), kind="stable")
  summary = {"median_memorization": float(np.nanmedian(accuracy.estimate)),
             "median_memorization_se": float(np.nanmedian(accuracy.se)),
             "extractable_in": float(np.nanmean(rate_in)), "extractable_out": float(np.nanmean(rate_out)),
             "top_memorized": ranked[:10].tolist()}
  return EstimatorResult(columns=columns, summary=summary)


def exact_memorization_estimator(records, *, context=None, confidence: float = 0.95, **options) -> EstimatorResult:
  """Adapter: def. 2 exact memorization per recorded epoch (runs with ``record_epochs``), in-models
  on their training sequences and out-models on the others, as the table ``exact_memorization``
  (one row per epoch: mean over models with a Student-t interval) and its last epoch in the summary."""
  in_MxE, out_MxE = exact_memorization(records.keep, records["train_token_accuracy_epochs"], _num_targets(records),
                                       records.example_info["copies"])
  table: dict[str, np.ndarray] = {"epoch": np.arange(1, in_MxE.shape[1] + 1)}
  for side, values_MxE in (("in", in_MxE), ("out", out_MxE)):
    finite_E = np.isfinite(values_MxE).sum(axis=0)
    mean_E = np.nanmean(values_MxE, axis=0) if values_MxE.size else np.zeros(0)
    with np.errstate(invalid="ignore", divide="ignore"):
      se_E = np.nanstd(values_MxE, axis=0, ddof=1) / np.sqrt(finite_E)
    half_E = student_t.ppf(0.5 + confidence / 2, np.maximum(finite_E - 1, 1)) * np.where(finite_E > 1, se_E, np.nan)
    table.update({f"exact_memorization_{side}": mean_E, f"exact_memorization_{side}_ci_low": mean_E - half_E,
                  f"exact_memorization_{side}_ci_high": mean_E + half_E})
  table["models"] = np.full(in_MxE.shape[1], in_MxE.shape[0])
  last = {key: (float(values[-1]) if len(values) and np.isfinite(values[-1]) else None)
          for key, values in table.items() if key.startswith("exact_memorization")}
  summary = {"epochs": int(in_MxE.shape[1]), "models": int(in_MxE.shape[0]), "confidence": confidence,
             "last_epoch": last}
  return EstimatorResult(summary=summary, tables={"exact_memorization": table})


def exposure_estimator(records, *, context=None, sample_size: int = EXTRAPOLATION_SAMPLE, seed: int = 0,
                       **options) -> EstimatorResult:
  """Adapter: the canaries' exposure columns (empty for other sequences) and the means by copies."""
  info = records.example_info
  index_S = np.flatnonzero(info["secret_index"] >= 0)
  secret_S = info["secret_index"][index_S]
  candidates = records["candidate_logperp"]
  exact = canary_exposure(records.keep[:, index_S], exposure_exact(candidates, secret_S))
  # fitted only where a model trained on the canary: the column is the in-model mean
  keep_MxS = records.keep[:, index_S]
  extrapolated = canary_exposure(keep_MxS, exposure_extrapolated(candidates, secret_S, sample_size=sample_size,
                                                                 seed=seed, models=keep_MxS))
  n = records.num_train
  column = lambda values: _scatter(n, index_S, values)
  # The control's uncertainty has the canary as its unit: a fresh secret under the same out-models
  # (enumerated over all of R) gives its exact null mean and spread (fresh_secret_control).
  chance = fresh_secret_control(keep_MxS, candidates)
  columns = {"exposure": column(exact.mean_in), "exposure_se": column(exact.se_in),
             "exposure_out": column(exact.mean_out), "exposure_out_se": column(chance.sd),
             "exposure_chance": column(chance.mean),
             "exposure_extrapolated": column(extrapolated.mean_in),
             "exposure_extrapolated_se": column(extrapolated.se_in)}
  copies_S = info["copies"][index_S]
  by_copies = {}
  for count in sorted(set(copies_S.tolist())):
    chosen = copies_S == count
    by_copies[int(count)] = {
        "exposure": float(np.nanmean(exact.mean_in[chosen])),
        "exposure_se": float(np.sqrt(np.nansum(exact.se_in[chosen] ** 2)) / chosen.sum()),
        # the canaries differ by more than their models do: the SE with the canary as the unit
        "exposure_se_between_canaries": _between_se(exact.mean_in[chosen]),
        "exposure_out": float(np.nanmean(exact.mean_out[chosen])),
        "exposure_out_se": float(np.sqrt(np.nansum(chance.sd[chosen] ** 2)) / chosen.sum()),
        "chance": float(np.nanmean(chance.mean[chosen])),
        "canaries": int(chosen.sum())}
  log2_space = float(np.log2(candidates.shape[-1]))
  out_S = np.isfinite(exact.mean_out)
  summary = {"space_bits": log2_space, "chance": CHANCE_EXPOSURE, "by_copies": by_copies,
             "canaries": int(out_S.sum()), "out_mean": float(np.nanmean(exact.mean_out)),
             # the null spread of a mean of out_S.sum() independent canaries' controls
             "out_mean_se": float(np.sqrt(np.sum(chance.sd[out_S] ** 2)) / max(out_S.sum(), 1)),
             "out_chance": float(np.nanmean(chance.mean[out_S])) if out_S.any() else float("nan"),
             # the same from the canaries' own spread (no model of the null; noisy with few canaries)
             "out_mean_se_between_canaries": _between_se(exact.mean_out)}
  return EstimatorResult(columns=columns, summary=summary)


def lm_attacks_estimator(records, *, context=None, k: float = 0.2, **options) -> EstimatorResult:
  """Adapter: per-sequence AUROCs of the membership signals (and LiRA on the log-likelihood), with
  the pooled AUROCs in the summary."""
  info, keep = records.example_info, records.keep
  targets = _num_targets(records)
  signals = {"loss": loss_signal(records["train_loglik"], targets),
             "zlib": zlib_signal(records["train_loglik"], targets, info["zlib_bytes"]),
             "mink": min_k_signal(records["train_token_logprob"], targets, k)}
  columns = {f"{name}_auc": per_example_auc(score, keep) for name, score in signals.items()}
  pooled = {name: auroc(score.ravel(), keep.ravel()) for name, score in signals.items()}
  summary: dict[str, Any] = {"pooled_auroc": pooled, "mink_k": k}
  if keep.shape[0] >= 3:  # LiRA needs a target and two shadow models
    # LiRA (Carlini et al. 2022) with the per-token log-likelihood as its statistic, through the
    # image attack's code: every model in turn the target, the others its shadows.
    risk = per_example_risk(signals["loss"][..., None], keep)
    columns["lira_loglik_online"], columns["lira_loglik_offline"] = risk["lira_online"], risk["lira_offline"]
    summary["lira_loglik_median"] = {"online": float(np.nanmedian(risk["lira_online"])),
                                     "offline": float(np.nanmedian(risk["lira_offline"]))}
  return EstimatorResult(columns=columns, summary=summary)


def _between_se(values: np.ndarray) -> float:
  """Standard error of a mean over canaries from their own spread (NaN with fewer than two)."""
  values = values[np.isfinite(values)]
  return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def _scatter(n: int, index: np.ndarray, values: Any) -> np.ndarray:
  out = np.full(n, np.nan)
  out[index] = values
  return out
