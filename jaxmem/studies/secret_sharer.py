"""Secret-sharer study of a text run: how memorization grows with repetition.

Carlini et al. (2019, "The Secret Sharer", §5, Fig. 3) insert a canary 1 to 10^4 times and plot its
exposure against the number of insertions; Zhang et al. (2021, §4) and Kandpal et al. (2022,
"Deduplicating Training Data Mitigates Privacy Risks in Language Models") relate memorization to
how often a sequence is duplicated. This driver reads a finished text run (its records, through the
same estimators as ``scores.csv``; nothing is retrained) and writes

* ``exposure_vs_copies.csv`` / ``.png``: per repetition count, the mean exposure of the canaries
  repeated that often, over the models that trained on them and (control) those that did not,
  with 95% intervals (± 1.96 SE of the mean over canaries: for the trained-on models each canary's
  SE over models from :func:`jaxmem.scores.exposure.canary_exposure`; for the control each
  canary's spread under chance from :func:`jaxmem.scores.exposure.fresh_secret_control`, since
  out-models share their data and their SE over models ignores the canary-to-canary variation),
  and ``chance``, the control's exact value for these models;
* ``memorization_vs_copies.csv`` / ``.png``: per duplication count in the corpus, the mean
  counterfactual memorization (per-token accuracy, in−out) of the ordinary sequences (canaries
  apart) and of the canaries, with 95% intervals: between-sequence standard errors where a group
  has several sequences, the sequence's own SE where it has one;
* ``secret_sharer.json``: the same numbers.

The interval of a group mean combines the per-item SEs as sqrt(Σ se²) / n — the items are different
canaries with independent estimates, so their errors add in quadrature.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxmem.errors import JaxmemError
from jaxmem.scores.exposure import CHANCE_EXPOSURE, canary_exposure, exposure_exact, fresh_secret_control
from jaxmem.scores.text import text_memorization
from jaxmem.records import RunDir, write_bytes_atomic, write_json_atomic

Z95 = 1.96


@dataclasses.dataclass
class SecretSharerResult:
  out: Path
  exposure_rows: list[dict[str, Any]]
  memorization_rows: list[dict[str, Any]]
  lines: list[str]


def _group_mean(values: np.ndarray, se: np.ndarray) -> tuple[float, float]:
  """Mean of independent estimates and its standard error sqrt(Σ se²) / n (NaN estimates left out)."""
  ok = np.isfinite(values)
  if not ok.any():
    return float("nan"), float("nan")
  return float(values[ok].mean()), float(np.sqrt(np.nansum(se[ok] ** 2)) / ok.sum())


def exposure_by_copies(keep_MxN: np.ndarray, candidate_logperp_MxC: np.ndarray, secret_index_N: np.ndarray,
                       copies_N: np.ndarray) -> list[dict[str, Any]]:
  """One row per repetition count of the canaries: mean exposure in and out with SEs."""
  index_S = np.flatnonzero(secret_index_N >= 0)
  stats = canary_exposure(keep_MxN[:, index_S], exposure_exact(candidate_logperp_MxC, secret_index_N[index_S]))
  chance = fresh_secret_control(keep_MxN[:, index_S], candidate_logperp_MxC)
  rows = []
  for count in sorted(set(copies_N[index_S].tolist())):
    chosen = copies_N[index_S] == count
    mean_in, se_in = _group_mean(stats.mean_in[chosen], stats.se_in[chosen])
    mean_out, se_out = _group_mean(stats.mean_out[chosen], chance.sd[chosen])
    between = stats.mean_in[chosen][np.isfinite(stats.mean_in[chosen])]
    rows.append({"copies": int(count), "canaries": int(chosen.sum()), "exposure": mean_in, "exposure_se": se_in,
                 # with the canary as the unit: the canaries of a count differ by more than their models do
                 "exposure_se_between_canaries": float(between.std(ddof=1) / np.sqrt(len(between)))
                 if len(between) > 1 else float("nan"),
                 "exposure_out": mean_out, "exposure_out_se": se_out,
                 "chance": float(np.nanmean(chance.mean[chosen]))})
  return rows


def memorization_by_copies(keep_MxN: np.ndarray, token_accuracy_MxN: np.ndarray, copies_N: np.ndarray,
                           canary_N: np.ndarray) -> list[dict[str, Any]]:
  """One row per (kind, duplication count): mean counterfactual memorization with its SE."""
  mem = text_memorization(keep_MxN, token_accuracy_MxN)
  rows = []
  for kind, members in (("sequence", ~canary_N), ("canary", canary_N)):
    for count in sorted(set(copies_N[members].tolist())):
      chosen = members & (copies_N == count) & np.isfinite(mem.estimate)
      values = mem.estimate[chosen]
      if len(values) >= 2:
        mean, se = float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))
      else:
        mean, se = _group_mean(values, mem.se[chosen])
      rows.append({"kind": kind, "copies": int(count), "sequences": int(chosen.sum()), "memorization": mean,
                   "memorization_se": se})
  return rows


def secret_sharer(run_dir: str | Path, out: str | Path | None = None, *,
                  log: Callable[[str], None] = print) -> SecretSharerResult:
  """Runs the study on a finished text run (see the module docstring); writes into ``out``
  (default ``RUN/secret_sharer``)."""
  run = RunDir.open(run_dir)
  records = run.load_records()
  info = records.example_info
  if "train_token_accuracy" not in records or "copies" not in info:
    raise JaxmemError(f"{str(run.path)!r} is not a text run (no token accuracy records); the secret-sharer study "
                      "needs a run of a text dataset with --model transformer")
  if "candidate_logperp" not in records or not (info["secret_index"] >= 0).any():
    raise JaxmemError(f"text run {str(run.path)!r} has no canaries; the secret-sharer study needs a dataset with "
                      "inserted canaries (e.g. --dataset canaries)")
  out = Path(out) if out is not None else run.path / "secret_sharer"
  out.mkdir(parents=True, exist_ok=True)
  copies, canary = info["copies"], info["canary"].astype(bool)
  exposure_rows = exposure_by_copies(records.keep, records["candidate_logperp"], info["secret_index"], copies)
  memorization_rows = memorization_by_copies(records.keep, records["train_token_accuracy"], copies, canary)
  write_bytes_atomic(out / "exposure_vs_copies.csv", _csv(exposure_rows))
  write_bytes_atomic(out / "memorization_vs_copies.csv", _csv(memorization_rows))
  space_bits = float(np.log2(records["candidate_logperp"].shape[-1]))
  _plot_exposure(out / "exposure_vs_copies.png", exposure_rows, space_bits)
  _plot_memorization(out / "memorization_vs_copies.png", memorization_rows)
  write_json_atomic(out / "secret_sharer.json", {
      "run": str(run.path), "models": records.num_models, "space_bits": space_bits, "chance": CHANCE_EXPOSURE,
      "exposure_vs_copies": exposure_rows, "memorization_vs_copies": memorization_rows})
  lines = [f"exposure vs repetitions ({records.num_models} models; log2|R| = {space_bits:.2f}, chance "
           f"{CHANCE_EXPOSURE:.2f}):",
           "  copies  canaries  exposure (trained on)  exposure (not trained on)  chance for those models ± spread"]
  lines += [f"  {r['copies']:>6}  {r['canaries']:>8}  {r['exposure']:>8.2f} ± {r['exposure_se']:.2f}"
            f"        {r['exposure_out']:>8.2f}                   {r['chance']:.2f} ± {r['exposure_out_se']:.2f}"
            for r in exposure_rows]
  lines += ["memorization vs duplication:", "  kind      copies  sequences  memorization"]
  lines += [f"  {r['kind']:<8}  {r['copies']:>6}  {r['sequences']:>9}  {r['memorization']:.3f} ± {r['memorization_se']:.3f}"
            for r in memorization_rows]
  return SecretSharerResult(out, exposure_rows, memorization_rows, lines)


def _csv(rows: list[dict[str, Any]]) -> bytes:
  names = list(rows[0]) if rows else []
  cell = lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)
  return ("\n".join([",".join(names)] + [",".join(cell(r[n]) for n in names) for r in rows]) + "\n").encode()


def _save(path: Path, figure) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  FigureCanvasAgg(figure)
  tmp = path.with_name(f".{path.name}.tmp")
  figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
  tmp.replace(path)


def _plot_exposure(path: Path, rows: list[dict[str, Any]], space_bits: float) -> None:
  from matplotlib.figure import Figure
  figure = Figure(figsize=(5.2, 3.6))
  ax = figure.add_subplot()
  copies = [r["copies"] for r in rows]
  for key, label, marker in (("exposure", "models trained on the canary", "o"),
                             ("exposure_out", "models not trained on it (interval: chance's spread)", "s")):
    ax.errorbar(copies, [r[key] for r in rows], yerr=[Z95 * r[f"{key}_se"] for r in rows], marker=marker,
                capsize=3, label=label)
  ax.axhline(CHANCE_EXPOSURE, color="gray", linestyle=":", label="chance (1/ln 2)")
  ax.axhline(space_bits, color="gray", linestyle="--", label="log2 |R| (maximum)")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("canary repetitions in the corpus")
  ax.set_ylabel("exposure (bits), 95% interval")
  ax.legend(fontsize=7)
  _save(path, figure)


def _plot_memorization(path: Path, rows: list[dict[str, Any]]) -> None:
  from matplotlib.figure import Figure
  figure = Figure(figsize=(5.2, 3.6))
  ax = figure.add_subplot()
  for kind, marker in (("sequence", "o"), ("canary", "s")):
    chosen = [r for r in rows if r["kind"] == kind]
    if chosen:
      ax.errorbar([r["copies"] for r in chosen], [r["memorization"] for r in chosen],
                  yerr=[Z95 * r["memorization_se"] for r in chosen], marker=marker, capsize=3,
                  label="canaries" if kind == "canary" else "corpus sequences")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("copies in the training corpus")
  ax.set_ylabel("counterfactual memorization\n(per-token accuracy in−out), 95% interval")
  ax.legend(fontsize=7)
  _save(path, figure)
