"""``jaxmem study privacy-forgetting RUN``: (A, α, k)-forgetting (survey def. 11; Jagielski et al.
2023, "Measuring Forgetting of Memorized Training Examples", ICLR).

An example is α-forgotten k steps after it was last seen when a membership attack A distinguishes
models that trained on it from models that did not with advantage at most α. Jagielski et al.
inject a set of examples into the first part of training (each in for a random half of the models,
some repeated), continue training on the rest of the data only, and attack the injected examples
after every further step: the attack's success falls with k; repeated and hard (atypical) examples
are forgotten more slowly.

What this driver does, and what differs from the paper:

* The injected set S (``inject`` examples: a seeded random set, or the run's most memorized by
  ``scores.csv``'s ``memorization``) is split at random into two halves, one seen once per epoch
  (r = 1) and one seen ``repeats`` times per epoch (r = 4 by default): its examples are duplicated
  in the training set (``jaxmem.data.training_subset`` with repeated indices; the duplicates also
  enter the standardization statistics, a shift of at most a few per mille on digits). The paper
  repeats whole-dataset injections; same idea, one run.
* Membership of S is LiRA's balanced design (each injected example, with its copies, is in for
  exactly half of the models, :func:`jaxmem.masks.balanced_masks`); the rest of the data is in for
  every model in both phases. Phase one trains ``first_epochs`` on it; phase two continues (the
  parameters, a fresh optimizer and schedule as in :mod:`jaxmem.studies.ssft`) ``second_epochs`` on
  the rest only. k counts phase-two epochs (the paper counts steps; k = 0 is the end of phase one).
* The attack is LiRA online (:func:`jaxmem.scores.lira.leave_one_out_scores`, every model a target
  with the others as shadows) on the margins of the injected examples after every phase-two epoch;
  AUC and TPR at 0.1% FPR with bootstrap intervals over examples
  (:func:`jaxmem.scores.attack_metrics.bootstrap_attack_metrics`), per group: r = 1, r = 4, and
  the ``quantiles`` rank groups of the run's memorization among S (equal sizes, ties by index).
  RMIA is not used yet.
* Per example, the attack's advantage at k is 2·AUC_i(k) − 1 over target models
  (:func:`jaxmem.scores.attack_metrics.per_example_auc`), and ``forgetting_k_at_alpha`` is the first
  k from which the advantage stays below α (``second_epochs + 1``: not forgotten by the end).
* Text runs (a language model on sequences, Tirumala et al. 2022's forgetting of an injected set):
  the injected set is a set of training sequences, repeated by multiplying their ``copies``; the
  attack is the same LiRA with the per-token log-likelihood as statistic (the LM attacks' LiRA,
  :mod:`jaxmem.scores.lm`) recorded after every phase-two epoch; "margin gap" is then the in−out gap
  of that statistic.
* The decay rate λ of each group is fitted to the mean in−out margin gap, gap(k) ≈ gap(0)·e^{−λk},
  by least squares on log gap over the k where the gap is positive.

Outputs in ``out`` (default ``RUN/privacy_forgetting``): ``forgetting_curve.csv`` (``group, k, auc,
auc_low, auc_high, tpr_at_0.1%_fpr, ..._low, ..._high, margin_gap``), ``forgetting_examples.csv``
(``index, repeats, memorization, forgetting_k_at_alpha, advantage_k0 ...``), ``privacy_forgetting.json``
(settings, decay rates) and ``privacy_forgetting.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxmem.config import RunConfig
from jaxmem.data import load_dataset, training_subset
from jaxmem.engine import Engine
from jaxmem.errors import JaxmemError
from jaxmem.masks import balanced_masks
from jaxmem.scores.attack_metrics import bootstrap_attack_metrics, per_example_auc, tpr_key
from jaxmem.scores.lira import leave_one_out_scores
from jaxmem.scoring import SCORES_CSV, read_scores_csv
from jaxmem.records import RunDir, write_bytes_atomic, write_json_atomic

SELECTIONS = ("random", "memorized")
LOW_FPR = 0.001


@dataclasses.dataclass
class ForgettingCurves:
  """The attack over phase-two epochs k = 0..K for the injected examples (S of them)."""
  scores_MxKxS: np.ndarray      # LiRA online score of every model (as target) on every injected example
  advantage_KxS: np.ndarray     # 2 * per-example AUC - 1
  margin_gap_K: dict[str, np.ndarray]                       # group -> mean in-out margin gap
  metrics: dict[str, list[dict[str, dict[str, float]]]]     # group -> per k: metric -> value/low/high
  decay: dict[str, dict[str, float]]                         # group -> rate, se, num_points


def attack_statistic(records: dict[str, np.ndarray], dataset, *, epochs: bool = False) -> np.ndarray:
  """The statistic the attack sees, from one chunk's records: the margin of an image model
  (``train_margin``, (K, N), or per epoch ``train_margin_epochs``, (K, E, N)); for a language model
  the per-token log-likelihood of the sequence (``train_loglik`` / its predicted tokens, the LM
  attacks' LiRA statistic, :func:`jaxmem.scores.text.loss_signal`)."""
  if not dataset.is_text:
    return records["train_margin_epochs" if epochs else "train_margin"]
  num_targets_N = dataset.example_info()["num_tokens"] - 1  # BOS is never predicted
  loglik = records["train_loglik_epochs" if epochs else "train_loglik"]
  return loglik / np.maximum(num_targets_N, 1)


def margin_gap(margin_MxS: np.ndarray, keep_MxS: np.ndarray) -> np.ndarray:
  """(S,) mean margin of the models that trained on each example minus that of the others."""
  keep = np.asarray(keep_MxS, bool)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_in = np.where(keep, margin_MxS, 0).sum(0) / keep.sum(0)
    mean_out = np.where(~keep, margin_MxS, 0).sum(0) / (~keep).sum(0)
  return mean_in - mean_out


def exponential_decay_rate(gap_K: np.ndarray) -> dict[str, float]:
  """λ of gap(k) ≈ c·e^{−λk} by least squares on log gap over the k with gap > 0, with the slope's
  standard error (rate NaN with fewer than two such k, its se with fewer than three)."""
  k = np.arange(len(gap_K), dtype=np.float64)
  ok = np.isfinite(gap_K) & (gap_K > 0)
  if ok.sum() < 2:
    return {"rate": float("nan"), "se": float("nan"), "num_points": int(ok.sum())}
  x, y = k[ok], np.log(gap_K[ok])
  slope, intercept = np.polyfit(x, y, 1)
  if ok.sum() > 2:
    residual = y - (slope * x + intercept)
    se = float(np.sqrt(residual @ residual / (ok.sum() - 2) / ((x - x.mean()) @ (x - x.mean()))))
  else:
    se = float("nan")
  return {"rate": float(-slope), "se": se, "num_points": int(ok.sum())}


def forgetting_k_at_alpha(advantage_KxS: np.ndarray, alpha: float) -> np.ndarray:
  """(S,) the first k from which the advantage stays below ``alpha`` (NaN advantages count as not
  below); K (= the number of k values, i.e. one past the last) when it never does."""
  below_KxS = np.asarray(advantage_KxS) < alpha
  num_k = below_KxS.shape[0]
  # stays_below[k] = below at every k' >= k: a reversed cumulative AND.
  stays_KxS = np.flip(np.logical_and.accumulate(np.flip(below_KxS, 0), axis=0), 0)
  return np.where(stays_KxS.any(0), np.argmax(stays_KxS, axis=0), num_k)


def memorization_quantile(mem_S: np.ndarray, quantiles: int) -> np.ndarray:
  """(S,) quantile group 0..quantiles-1 of each example by rank of memorization (ties in the order
  of the examples), so that groups have equal sizes even when many values tie (e.g. at 0)."""
  rank_S = np.empty(len(mem_S), np.int64)
  rank_S[np.argsort(mem_S, kind="stable")] = np.arange(len(mem_S))
  return rank_S * quantiles // len(mem_S)


def forgetting_curves(margin_MxKxS: np.ndarray, keep_MxS: np.ndarray, groups: dict[str, np.ndarray], *,
                      num_bootstrap: int = 200, seed: int = 0) -> ForgettingCurves:
  """LiRA online on the injected examples at every k, per group of examples (boolean (S,) masks)."""
  margin_MxKxS = np.asarray(margin_MxKxS, np.float64)
  keep = np.asarray(keep_MxS, bool)
  m, num_k, s = margin_MxKxS.shape
  targets = np.arange(m)
  scores = np.stack([leave_one_out_scores(margin_MxKxS[:, k], keep, targets, variants=("online",))["online"]
                     for k in range(num_k)], axis=1)
  advantage = np.stack([2 * per_example_auc(scores[:, k], keep) - 1 for k in range(num_k)])
  gaps = {name: np.array([np.nanmean(margin_gap(margin_MxKxS[:, k], keep)[mask]) for k in range(num_k)])
          for name, mask in groups.items()}
  metrics = {name: [_metrics(scores[:, k][:, mask], keep[:, mask], num_bootstrap, seed) for k in range(num_k)]
             for name, mask in groups.items()}
  decay = {name: exponential_decay_rate(gap) for name, gap in gaps.items()}
  return ForgettingCurves(scores, advantage, gaps, metrics, decay)


def _metrics(scores_MxS: np.ndarray, keep_MxS: np.ndarray, num_bootstrap: int, seed: int) -> dict[str, dict[str, float]]:
  """Bootstrap attack metrics; all NaN when no pair has a score (too few shadows on each side)."""
  if np.isnan(scores_MxS).all():
    nan = {"value": float("nan"), "low": float("nan"), "high": float("nan")}
    return {"auc": dict(nan), tpr_key(LOW_FPR): dict(nan)}
  return bootstrap_attack_metrics(scores_MxS, keep_MxS, num_bootstrap=num_bootstrap, seed=seed, fprs=(LOW_FPR,))


@dataclasses.dataclass
class PrivacyForgettingResult:
  out: Path
  curves: ForgettingCurves
  examples: dict[str, np.ndarray]
  summary: dict[str, Any]
  lines: list[str]


def privacy_forgetting_study(run_dir: str | Path, out: str | Path | None = None, *, num_models: int = 32,
                             inject: int = 100, repeats: int = 4, selection: str = "random",
                             first_epochs: int | None = None, second_epochs: int | None = None,
                             alpha: float = 0.2, quantiles: int = 2, data_dir: str | None = None,
                             dataset=None, log: Callable[[str], None] = print) -> PrivacyForgettingResult:
  """Runs the study on the run in ``run_dir`` (see the module docstring); ``dataset``: the run's
  data when the caller has it (a corpus made in code), else loaded again from the run's config."""
  run = RunDir.open(run_dir)
  config = RunConfig.from_dict(run.manifest()["config"])
  first_epochs = first_epochs or config.epochs
  second_epochs = second_epochs or config.epochs
  if selection not in SELECTIONS:
    raise JaxmemError(f"unknown selection {selection!r}; choose one of: {', '.join(SELECTIONS)}")
  if num_models < 4 or num_models % 2:
    raise JaxmemError(f"num_models must be even and >= 4 (balanced in/out membership), got {num_models}")
  if repeats < 1 or first_epochs < 1 or second_epochs < 1 or quantiles < 1 or not 0 < alpha <= 1:
    raise JaxmemError(f"repeats, first/second epochs and quantiles must be >= 1 and alpha in (0, 1], got "
                      f"{repeats}, {first_epochs}, {second_epochs}, {quantiles}, {alpha}")
  if dataset is None:
    dataset = load_dataset(config.dataset, data_dir=data_dir or config.data_dir, seed=config.seed,
                           label_noise=config.label_noise)
  if dataset.fingerprint != run.manifest().get("dataset", {}).get("fingerprint", dataset.fingerprint):
    raise JaxmemError(f"the data for {str(run.path)!r} differ from the run's (dataset fingerprint); pass the run's "
                      "dataset or --data-dir")
  n = dataset.num_train
  if not 2 <= inject <= n // 2:
    raise JaxmemError(f"inject must be in 2..{n // 2} (half the training set), got {inject}")
  scores_path = run.path / SCORES_CSV
  memorization_N = (np.asarray(read_scores_csv(scores_path)["memorization"], np.float64)
                    if scores_path.is_file() else np.full(n, np.nan))
  rng = np.random.default_rng([config.seed, 0x5EC1])
  if selection == "memorized":
    if not np.isfinite(memorization_N).any():
      raise JaxmemError(f"selection 'memorized' needs the run's {SCORES_CSV} with memorization; run `jaxmem scores`")
    injected_S = np.argsort(-np.nan_to_num(memorization_N, nan=-np.inf), kind="stable")[:inject]
  else:
    injected_S = np.sort(rng.choice(n, inject, replace=False))
  repeats_S = np.ones(inject, np.int64)
  repeats_S[rng.permutation(inject)[: inject // 2]] = repeats
  keep_in_MxS, _ = balanced_masks(num_models, inject, (0.5,), config.seed + 1)
  rest_N = np.ones(n, bool)
  rest_N[injected_S] = False
  if dataset.is_text:
    # A corpus counts a sequence's occurrences (``copies``, which the engine trains on as many
    # times): a repeated sequence simply has r times its copies.
    copies_N = np.asarray(dataset.copies).copy()
    copies_N[injected_S] *= repeats_S
    extended = dataclasses.replace(dataset, name=f"{dataset.name}+repeats", copies=copies_N)
    first_keep = np.broadcast_to(rest_N, (num_models, n)).copy()
    first_keep[:, injected_S] = keep_in_MxS
    second_keep = np.broadcast_to(rest_N, (num_models, n))
  else:
    # Training set: every example once, then the extra copies of the repeated injected ones.
    copies_of_S = np.repeat(np.arange(inject), repeats_S - 1)
    extended = training_subset(dataset, np.concatenate([np.arange(n), injected_S[copies_of_S]]),
                               f"{dataset.name}+repeats")
    first_keep = np.concatenate([np.broadcast_to(rest_N, (num_models, n)).copy(), keep_in_MxS[:, copies_of_S]], axis=1)
    first_keep[:, injected_S] = keep_in_MxS
    second_keep = np.concatenate([np.broadcast_to(rest_N, (num_models, n)),
                                  np.zeros((num_models, copies_of_S.size), bool)], axis=1)
  base = config.replace(record_epochs=False, record_epoch_margin=False, score_epoch=None, queries=1)
  engines = (Engine(extended, base.replace(epochs=first_epochs), log=log),
             Engine(extended, base.replace(epochs=second_epochs, record_epochs=True, record_epoch_margin=True), log=log))
  margins = []
  for start in range(0, num_models, config.chunk_size):
    ids = np.arange(start, min(start + config.chunk_size, num_models))
    log(f"privacy-forgetting: models {ids[0]}..{ids[-1]}: {first_epochs} epochs with the injected set, "
        f"{second_epochs} without")
    first = engines[0].train_chunk(ids, first_keep[ids])
    second = engines[1].train_chunk(num_models + ids, second_keep[ids], init_params=engines[0].last_state.params)
    margins.append(np.concatenate([attack_statistic(first, dataset)[:, None, injected_S],
                                   attack_statistic(second, dataset, epochs=True)[:, :, injected_S]], axis=1))
  margin_MxKxS = np.concatenate(margins)
  groups = {f"r={r}": repeats_S == r for r in sorted(set(repeats_S.tolist()))}
  mem_S = memorization_N[injected_S]
  if np.isfinite(mem_S).all() and quantiles > 1:
    which = memorization_quantile(mem_S, quantiles)
    groups.update({f"memorization q{q + 1}/{quantiles}": which == q for q in range(quantiles)})
  groups = {name: mask for name, mask in groups.items() if mask.sum() >= 2}
  groups["all"] = np.ones(inject, bool)
  curves = forgetting_curves(margin_MxKxS, keep_in_MxS, groups, seed=config.seed)
  k_alpha = forgetting_k_at_alpha(curves.advantage_KxS, alpha)
  examples = {"index": injected_S, "repeats": repeats_S, "memorization": mem_S,
              "forgetting_k_at_alpha": k_alpha,
              **{f"advantage_k{k}": curves.advantage_KxS[k] for k in range(curves.advantage_KxS.shape[0])}}
  statistic = "per-token log-likelihood" if dataset.is_text else "margin"
  summary = {"run": str(run.path), "num_models": num_models, "inject": inject, "repeats": repeats,
             "selection": selection, "first_epochs": first_epochs, "second_epochs": second_epochs,
             "alpha": alpha, "attack": f"LiRA online on the {statistic} (leave-one-out over the study's models)",
             "statistic": statistic,
             "decay": curves.decay,
             "forgetting_k_at_alpha_mean": {name: float(np.mean(k_alpha[mask])) for name, mask in groups.items()}}
  out = write_outputs(Path(out) if out is not None else run.path / "privacy_forgetting", curves, examples, summary,
                      title=f"{dataset.name}: LiRA on injected examples, k epochs after last seen ({num_models} models)")
  return PrivacyForgettingResult(out, curves, examples, summary, format_forgetting(curves, summary))


def write_outputs(out: Path, curves: ForgettingCurves, examples: dict[str, np.ndarray], summary: dict[str, Any], *,
                  title: str) -> Path:
  """The study's files in ``out`` (the report reads them): ``forgetting_curve.csv``,
  ``forgetting_examples.csv``, ``privacy_forgetting.json`` and ``privacy_forgetting.png``."""
  out.mkdir(parents=True, exist_ok=True)
  write_bytes_atomic(out / "forgetting_curve.csv", curve_csv(curves).encode())
  write_bytes_atomic(out / "forgetting_examples.csv", _table_csv(examples).encode())
  write_json_atomic(out / "privacy_forgetting.json", summary)
  plot_curves(curves, out / "privacy_forgetting.png", title=title)
  return out


def curve_csv(curves: ForgettingCurves) -> str:
  tpr = tpr_key(LOW_FPR)
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(["group", "k", "auc", "auc_low", "auc_high", tpr, f"{tpr}_low", f"{tpr}_high", "margin_gap"])
  for name, per_k in curves.metrics.items():
    for k, metrics in enumerate(per_k):
      writer.writerow([name, k, *(f"{metrics[m][part]:.6g}" for m in ("auc", tpr) for part in ("value", "low", "high")),
                       f"{curves.margin_gap_K[name][k]:.6g}"])
  return buffer.getvalue()


def _table_csv(columns: dict[str, np.ndarray]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(list(columns))
  fmt = lambda v: "" if isinstance(v, float) and not np.isfinite(v) else (f"{v:.6g}" if isinstance(v, float) else str(v))
  for row in zip(*(np.asarray(c).tolist() for c in columns.values())):
    writer.writerow([fmt(v) for v in row])
  return buffer.getvalue()


def format_forgetting(curves: ForgettingCurves, summary: dict[str, Any]) -> list[str]:
  lines = []
  for name, per_k in curves.metrics.items():
    auc = [m["auc"] for m in per_k]
    decay = curves.decay[name]
    lines.append(f"privacy-forgetting {name}: attack AUC {auc[0]['value']:.3f} [{auc[0]['low']:.3f}, {auc[0]['high']:.3f}] "
                 f"at k=0 -> {auc[-1]['value']:.3f} [{auc[-1]['low']:.3f}, {auc[-1]['high']:.3f}] at k={len(auc) - 1}; "
                 f"margin-gap decay rate {decay['rate']:.3f} ± {decay['se']:.3f} per epoch; mean forgetting k at "
                 f"alpha={summary['alpha']}: {summary['forgetting_k_at_alpha_mean'][name]:.2f}")
  return lines


def plot_curves(curves: ForgettingCurves, path: Path, *, title: str = "") -> None:
  """Attack AUC and TPR at 0.1% FPR against k, one line per group, 95% bootstrap bands."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(10, 4), layout="constrained")
  FigureCanvasAgg(fig)
  for i, (metric, label) in enumerate((("auc", "attack AUC"), (tpr_key(LOW_FPR), "TPR at 0.1% FPR"))):
    ax = fig.add_subplot(1, 2, i + 1)
    for name, per_k in curves.metrics.items():
      k = np.arange(len(per_k))
      line, = ax.plot(k, [m[metric]["value"] for m in per_k], marker="o", label=name)
      ax.fill_between(k, [m[metric]["low"] for m in per_k], [m[metric]["high"] for m in per_k],
                      color=line.get_color(), alpha=0.15)
    ax.set_xlabel("phase-two epochs since last seen (k)")
    ax.set_ylabel(label + " (95% bootstrap CI)")
    ax.grid(alpha=0.3)
    if i == 0:
      ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.savefig(path, dpi=110)
