"""The scoring driver: estimators over record blocks -> one score table per estimator -> the join.

Layout under a run directory:

* ``scores/<estimator>.csv``: ``index`` and that estimator's per-example columns; ``scores/examples.csv``
  the base columns ``index, label, clean_label, noisy``; a study's table ``scores/<study>.csv``.
* ``scores/index.json``: which tables exist, for each the records it came from (a signature of the
  finished models), its options and when it was written, and whether it is an estimator's or a study's.
* ``scores.csv``: the join of all tables on ``index``, base columns first, then the estimators' in
  registry order, then the studies'. Rebuilt whenever a table changes, so recomputing one estimator
  replaces only its own columns, and a column disappears only when its table is removed on purpose.
* Extra outputs beside them as before: ``influence_topk.csv``, ``influence_pairs.csv``,
  ``influence.npy``, ``lira.json``, ``lira_roc.csv``/``.png``, ``rmia.json``, ``rmia_roc.csv``/``.png``,
  ``lds.json``, ``lds_per_test.csv``, ``correlations.csv`` (the correlations of the joined table,
  recomputed with every join), ``scores_summary.json``.

Per-example estimators run block by block over ``records.example_blocks(block_size)`` with the block
size from a memory budget, reading only the records they need for that block
(``records.read(name, examples=block)``); their summaries see the concatenated (N,) columns only.
Results do not depend on the block size (each example's statistics are reduced over models only).
A value that cannot be estimated is an empty cell, never 0.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxmem.errors import JaxmemError
from jaxmem.scores import ESTIMATOR_LIST, ESTIMATORS, Estimator, EstimatorResult
from jaxmem.scores._stats import DEFAULT_MEMORY_BUDGET, block_size_for_budget
from jaxmem.scores.attack_metrics import DEFAULT_FPRS, tpr_key
from jaxmem.scores.correlations import correlations_result
from jaxmem.scores.lira import VARIANT_LABELS
from jaxmem.records import Records, RunDir, atomic_path, utc_now, write_bytes_atomic, write_json_atomic

SCORES_CSV = "scores.csv"
TABLES = "scores"
INDEX = "index.json"
BASE_TABLE = "examples"
BASE_COLUMNS = ("index", "label", "clean_label", "noisy")
@dataclasses.dataclass
class ScoreTable:
  columns: dict[str, np.ndarray]     # ordered; first index, label, clean_label, noisy; then estimators'
  summary: dict[str, Any]            # estimator name -> its summary numbers
  lines: list[str]                   # human summary lines
  estimators: list[str]
  results: dict[str, EstimatorResult] = dataclasses.field(default_factory=dict)
  owners: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # estimator -> its column names
  options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  signature: str = ""                # of the records scored

  def column(self, name: str) -> np.ndarray:
    return self.columns[name]


# -- choosing estimators -------------------------------------------------------------------------

def parse_estimator_names(text: str | None) -> list[str] | None:
  if text is None or text in ("", "default"):
    return None
  names = [n.strip() for n in text.split(",") if n.strip()]
  for name in names:
    ESTIMATORS.get(name)  # unknown names list the valid ones
  return names


def select_estimators(names: Sequence[str] | None, records: Records) -> list[Estimator]:
  """The named estimators (each must have its records), or every default one whose records exist,
  in registry order (memorization first, correlations last)."""
  if names is None:
    return [e for e in ESTIMATOR_LIST if e.is_default(records) and e.available(records)]
  for name in names:
    estimator = ESTIMATORS.get(name)
    missing = [r for r in estimator.requires if r not in records]
    if missing:
      raise JaxmemError(f"estimator {name!r} needs records {', '.join(missing)} that this run did not record")
  return [e for e in ESTIMATOR_LIST if e.name in names]


# -- blocks --------------------------------------------------------------------------------------

def block_size_for(records: Records, names: Sequence[str], budget_bytes: int = DEFAULT_MEMORY_BUDGET, *,
                   extra_bytes_per_example: int = 0) -> int:
  """Examples per block so that ``keep`` and the named records of one block, the estimators'
  working copies of them (float32 on the host, the device's arguments and temporaries) and
  ``extra_bytes_per_example`` fit in ``budget_bytes``
  (:func:`jaxmem.scores._stats.block_size_for_budget`)."""
  return block_size_for_budget(records, list(names), budget_bytes, extra_bytes_per_example=extra_bytes_per_example)


def block_records(records: Records, block: slice, names: Sequence[str]) -> Records:
  """The records of one block of training examples, with only the named record arrays read."""
  arrays = {name: records.read(name, examples=block) for name in names if name in records}
  return Records(keep=records.read("keep", examples=block), model_ids=records.model_ids,
                 subset_ratio=records.subset_ratio, train_labels=records.train_labels[block],
                 clean_train_labels=records.clean_train_labels[block], test_labels=records.test_labels,
                 noisy=records.noisy[block], arrays=arrays, num_models_planned=records.num_models_planned)


def records_signature(records: Records) -> str:
  """Which records a table came from: the finished models and the training-set size."""
  return _signature(np.asarray(records.model_ids, np.int64), records.num_train)


def _signature(model_ids: np.ndarray, num_train: int) -> str:
  digest = hashlib.sha256(np.sort(np.asarray(model_ids, np.int64)).tobytes())
  digest.update(str(int(num_train)).encode())
  return digest.hexdigest()[:16]


def run_records_signature(run: RunDir) -> str | None:
  """The signature of the run's finished records now, from the chunks' metadata (without reading
  the records); None if it cannot be told."""
  try:
    ids = []
    for c in range(len(run.chunk_plan())):
      meta = run.chunk_path(c).with_suffix(".json")
      if run.chunk_path(c).is_file() and meta.is_file():
        ids.extend(json.loads(meta.read_text())["model_ids"])
    return _signature(np.asarray(ids, np.int64), int(run.read_design()["keep"].shape[1]))
  except (OSError, KeyError, ValueError, TypeError):
    return None


# -- running estimators --------------------------------------------------------------------------

def _run_estimator(estimator: Estimator, records: Records, context: dict[str, np.ndarray],
                   options: dict[str, Any], block_size: int) -> tuple[dict[str, np.ndarray], EstimatorResult, dict]:
  """All columns (hidden ones included), the result, and the summary of one estimator."""
  if not estimator.per_example:
    result = estimator.fn(records, context=context, **options)
    columns = dict(result.columns)
  else:
    parts: dict[str, list[np.ndarray]] = {}
    result = EstimatorResult()
    for block in records.example_blocks(block_size):
      view = block_records(records, block, estimator.requires)
      part = estimator.fn(view, context={k: v[block] for k, v in context.items()}, **options)
      for name, values in part.columns.items():
        parts.setdefault(name, []).append(np.asarray(values))
    columns = {name: np.concatenate(values) for name, values in parts.items()}
    result.columns = columns
  for name, values in columns.items():
    if np.shape(values) != (records.num_train,):
      raise ValueError(f"estimator {estimator.name} returned column {name} of shape {np.shape(values)}")
  summary = estimator.summarize(columns, records, **options) if estimator.summarize else result.summary
  return columns, result, summary


def score_records(records: Records, estimators: Sequence[str] | None = None,
                  options: dict[str, dict[str, Any]] | None = None, *,
                  memory_budget: int = DEFAULT_MEMORY_BUDGET, block_size: int | None = None) -> ScoreTable:
  """Runs estimators on records. ``options`` maps estimator name -> keyword options. Per-example
  estimators run over blocks of ``block_size`` examples (default: from ``memory_budget``)."""
  options = options or {}
  base = {"index": np.arange(records.num_train), "label": records.train_labels,
          "clean_label": records.clean_train_labels, "noisy": records.noisy.astype(np.int8)}
  columns: dict[str, np.ndarray] = dict(base)
  summary, lines, results, owners = {}, [], {}, {}
  chosen = select_estimators(estimators, records)
  for estimator in chosen:
    opts = options.get(estimator.name, {})
    size = block_size or 0  # estimators that are not per-example stream on their own terms
    if estimator.per_example and not block_size:
      extra = int(estimator.block_bytes(records, **opts)) if estimator.block_bytes else 0
      size = block_size_for(records, estimator.requires, memory_budget, extra_bytes_per_example=extra)
    if estimator.per_example and size < 1:
      raise JaxmemError(f"block size must be a positive integer, got {size}")
    new, result, est_summary = _run_estimator(estimator, records, columns, opts, size)
    visible = {k: v for k, v in new.items() if not k.startswith("_")}
    columns.update(visible)
    owners[estimator.name] = list(visible)
    results[estimator.name] = result
    summary[estimator.name] = est_summary
    lines.extend(format_lines(estimator.name, est_summary, opts))
  return ScoreTable(columns, summary, lines, [e.name for e in chosen], results, owners,
                    {e.name: options.get(e.name, {}) for e in chosen}, records_signature(records))


# -- text ----------------------------------------------------------------------------------------

def _f(value, spec=".3f") -> str:
  return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _noisy_lines(summary: dict, names: Sequence[str], spec: str) -> list[str]:
  return [f"{name}: flipped labels {_f(summary[f'{name}_flipped_mean'], spec)}, clean "
          f"{_f(summary[f'{name}_clean_mean'], spec)} (AUROC for finding flipped labels {_f(summary[f'{name}_auroc'])})"
          for name in names if f"{name}_auroc" in summary]


def lira_lines(summary: dict, fprs: Sequence[float] = DEFAULT_FPRS) -> list[str]:
  """The attack x metric table and the most exposed examples of a LiRA summary."""
  lines = [f"LiRA attack: {len(summary['targets'])} target models, each attacked with the other models as "
           f"shadows; {summary['pairs_evaluated']} (target, example) pairs ({summary.get('member_percent', 0)}% members), "
           "95% bootstrap intervals over examples"]
  header = f"  {'attack':<36} {'AUC':>22}"
  for alpha in fprs:
    header += f" {'TPR@' + f'{100 * alpha:g}' + '%FPR':>22}"
  header += f" {'balanced acc':>22}"
  lines.append(header)
  fmt = lambda m: f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"
  for name, metrics in summary["attack"].items():
    row = f"  {VARIANT_LABELS.get(name, name):<36} {fmt(metrics['auc']):>22}"
    for alpha in fprs:
      row += f" {fmt(metrics[tpr_key(alpha)]):>22}"
    row += f" {fmt(metrics['balanced_accuracy']):>22}"
    lines.append(row)
  if summary.get("unscored_attack_examples"):
    lines.append(f"  warning: {summary['unscored_attack_examples']} examples lack enough in or out shadow models for "
                 "some target and were left out of these metrics")
  lines.extend(eps_lines(summary))
  if summary.get("unscored_examples"):
    lines.append(f"  warning: {summary['unscored_examples']} examples have fewer than {summary['min_models']} in or out "
                 "shadow models; their lira_online is empty")
  with_mem = any("memorization" in row for row in summary["most_exposed"])
  lines.append(f"most exposed training examples (lira_online = per-example attack AUC over {summary['models']} target "
               f"models; {summary['fully_exposed_examples']} examples at 1.0):")
  lines.append("  index  label  noisy  lira_online  lira_offline" + ("  memorization" if with_mem else ""))
  for row in summary["most_exposed"]:
    text = (f"  {row['index']:5d}  {row['label']:5d}  {'yes' if row['noisy'] else 'no':>5}  "
            f"{row['lira_online']:11.3f}  {row['lira_offline']:12.3f}")
    if with_mem:
      text += f"  {row['memorization']:12.3f}"
    lines.append(text)
  if "spearman_lira_online_memorization" in summary:
    lines.append(f"Spearman rank correlation of lira_online with memorization: "
                 f"{summary['spearman_lira_online_memorization']:.3f} ({summary['spearman_examples']} examples)")
  return lines


def eps_lines(summary: dict) -> list[str]:
  """The empirical ε lower bound of each attack variant in an attack summary, with its caveat."""
  bounds = summary.get("eps_lower_bound") or {}
  if not bounds:
    return []
  first = next(iter(bounds.values()))
  return [f"  eps lower bound (delta {first.get('delta', float('nan')):g}, "
          f"{100 * first.get('confidence', 0.95):g}% one-sided Clopper-Pearson): "
          + ", ".join(f"{name} {bound['eps']:.2f}" for name, bound in bounds.items()),
          f"  ({summary.get('eps_caveat', '')})"]


def rmia_lines(summary: dict, fprs: Sequence[float] = DEFAULT_FPRS) -> list[str]:
  """The RMIA attack rows (with ε lower bounds), LiRA on the same targets, and the correlation."""
  lines = [f"RMIA attack: {len(summary['targets'])} target models, each attacked with the other models as references; "
           f"population: {summary['population']} test examples; a = {summary['a']:g} (tuned on model "
           f"{summary['a_tuning']['tuning_model']}), gamma = {summary['gamma']:g}; 95% bootstrap intervals over examples"]
  fmt = lambda m: f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"
  for name, metric in summary["attack"].items():
    row = f"  {name:<28} AUC {fmt(metric['auc'])}"
    for alpha in fprs:
      row += f"  TPR@{100 * alpha:g}%FPR {fmt(metric[tpr_key(alpha)])}"
    bound = summary["eps_lower_bound"][name]
    row += f"  eps >= {bound['eps']:.2f} (delta {bound['delta']:g}, {100 * bound['confidence']:g}% one-sided)"
    lines.append(row)
  lines.append(f"  ({summary['eps_caveat']})")
  for name, metric in summary.get("lira_same_targets", {}).items():
    lines.append(f"  {'lira_' + name:<28} AUC {fmt(metric['auc'])}  TPR@0.1%FPR {fmt(metric[tpr_key(0.001)])}  "
                 f"TPR@1%FPR {fmt(metric[tpr_key(0.01)])}  (same targets)")
  if "spearman_rmia_online_memorization" in summary:
    lines.append(f"Spearman rank correlation of rmia_online with memorization: "
                 f"{summary['spearman_rmia_online_memorization']:.3f}")
  return lines


def lds_lines(summary: dict) -> list[str]:
  """Each attribution method's LDS with its interval."""
  settings = summary["settings"]
  lines = [f"LDS (Spearman over {settings['evaluation_models']} held-out models of the summed attribution vs the test "
           f"margin; attributions from the other {settings['estimation_models']}; 95% bootstrap over test examples):"]
  for method, entry in ((k, v) for k, v in summary.items() if k != "settings"):
    lines.append(f"  {method:<22} {entry['lds']:.3f} [{entry['lds_low']:.3f}, {entry['lds_high']:.3f}]  "
                 f"({entry['test_examples_used']} of {entry['test_examples']} test examples)")
  return lines


def correlation_lines(table: dict[str, Any], anchor: str = "memorization") -> list[str]:
  """Summary lines of a correlations summary (or :func:`jaxmem.scores.correlations.correlation_table`)."""
  names, matrix = table.get("names", []), table.get("spearman", [])
  lines = []
  if anchor in names and len(names) > 1:
    a = names.index(anchor)
    pairs = ", ".join(f"{n} {float(matrix[a][j]):+.2f}" for j, n in enumerate(names) if j != a)
    lines.append(f"Spearman correlation with {anchor}: {pairs}")
  areas = table.get("auroc_flipped", [])
  if any(_defined(v) for v in areas):
    pairs = ", ".join(f"{n} {float(v):.3f}" for n, v in zip(names, areas) if _defined(v))
    lines.append(f"AUROC for flipped labels (high = flipped; < 0.5: low values flag them): {pairs}")
  return lines


def format_lines(name: str, summary: dict, options: dict | None = None) -> list[str]:
  """The printed summary lines of one estimator's summary."""
  options = options or {}
  if name == "cscore":
    models = summary["models_per_ratio"]
    return [f"C-score: ratios {', '.join(f'{k} ({v} models)' for k, v in models.items())}; "
            f"median {_f(summary['median'])}, median standard error {_f(summary['median_se'])}"
            + (f"; {summary['undefined']} examples undefined (a ratio without held-out models)"
               if summary["undefined"] else "")]
  if name == "learning_speed":
    return [f"learning-speed proxy: Spearman {_f(summary['spearman_with_cscore'])} with the C-score"]
  if name == "uncertainty":
    return uncertainty_lines(summary)
  if name == "dynamics":
    return ([f"forgetting events over {summary['epochs_recorded']} recorded epochs: mean "
             f"{_f(summary['mean_forgetting_events'], '.2f')}, {summary['unforgettable']} unforgettable examples, "
             f"{summary['never_learned_by_any_model']} never learned by any model"]
            + _noisy_lines(summary, ("forgetting_events", "first_learned_epoch"), ".2f"))
  if name == "el2n_grand":
    return _noisy_lines(summary, ("el2n", "grand"), ".3f")
  if name == "influence":
    return influence_lines(summary)
  if name == "lira":
    return lira_lines(summary)
  if name == "rmia":
    return rmia_lines(summary)
  if name == "lds":
    return lds_lines(summary)
  if name == "csl" and summary:
    return ["cumulative sample loss (a proxy): " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items())]
  if name == "text_memorization":
    return [f"text memorization (per-token accuracy in−out): median {_f(summary['median_memorization'])}, "
            f"median standard error {_f(summary['median_memorization_se'])}",
            f"extractable (greedy from the prefix): {_f(summary['extractable_in'])} of sequences by models that "
            f"trained on them, {_f(summary['extractable_out'])} by models that did not"]
  if name == "exposure":
    # the out-models' control is compared with chance ± its spread over the canaries' random secrets
    return ([f"canary exposure (bits, of log2|R| = {summary['space_bits']:.2f}; models that did not train on a "
             f"canary: mean {_f(summary['out_mean'], '.2f')}, chance {_f(summary.get('out_chance', summary['chance']), '.2f')}"
             f" ± {_f(summary.get('out_mean_se'), '.2f')} over the draw of {summary.get('canaries', '')} secrets):"]
            + [f"  {count:>3} copies: {_f(v['exposure'], '.2f')} ± {_f(v['exposure_se'], '.2f')} over models, ± "
               f"{_f(v.get('exposure_se_between_canaries'), '.2f')} over canaries (not trained on: "
               f"{_f(v['exposure_out'], '.2f')}; chance {_f(v.get('chance'), '.2f')} ± {_f(v['exposure_out_se'], '.2f')})"
               for count, v in summary["by_copies"].items()])
  if name == "lm_attacks":
    lines = ["membership attacks on sequences, AUROC over all (model, sequence) pairs: "
             + ", ".join(f"{signal} {_f(value)}" for signal, value in summary["pooled_auroc"].items())]
    if "lira_loglik_median" in summary:
      lines.append("LiRA on the per-token log-likelihood, per-sequence AUROC over models: median online "
                   f"{_f(summary['lira_loglik_median']['online'])}, offline {_f(summary['lira_loglik_median']['offline'])}")
    return lines
  if name == "exact_memorization":
    last, ci = summary["last_epoch"], lambda key: f"{_f(last[key])} [{_f(last[key + '_ci_low'])}, {_f(last[key + '_ci_high'])}]"
    return [f"exact memorization (def. 2, next tokens predicted by arg-max) after epoch {summary['epochs']}: "
            f"{ci('exact_memorization_in')} on the models' own training sequences, {ci('exact_memorization_out')} on "
            f"the others ({summary['confidence']:.0%} intervals over {summary['models']} models; per epoch in "
            "exact_memorization.csv)"]
  if name == "correlations":
    return correlation_lines(summary)
  return []


def influence_lines(summary: dict) -> list[str]:
  lines = [f"influence: {summary['high_influence_pairs']} high-influence pairs (influence >= "
           f"{summary['pair_influence_threshold']:g}, memorization >= {summary['pair_memorization_threshold']:g}) over "
           f"{summary['train_examples_in_pairs']} training and {summary['test_examples_in_pairs']} test examples; "
           f"top-{summary['topk']} per example in influence_topk.csv"]
  within = summary.get("pairs_within_two_se", 0)
  if summary["high_influence_pairs"] and within:
    # A pair whose influence is under two of its standard errors is not told apart from 0: with few
    # models (SE ~0.1-0.3) most pairs above the threshold are noise.
    lines.append(f"  caution: {within} of these pairs have an influence below two standard errors (median SE "
                 f"{_f(summary.get('median_pair_se'))} with {summary.get('num_models', '?')} models); they are not "
                 "distinguishable from 0 — train more models before reading them as influence")
  return lines


def uncertainty_lines(summary: dict) -> list[str]:
  lines = []
  half = summary["split_half"]
  m = summary["models_needed"]["num_models"]
  if not half["splits"]:
    lines.append(f"memorization reliability: split-half needs at least 4 models (two halves with in- and "
                 f"out-models); this run has {m}")
  elif not any(r == r for r in half["splits"]):
    lines.append(f"memorization reliability: split-half undefined ({half['half_models']} vs {half['half_models']} "
                 "models: too few for the halves to estimate and rank examples); train more models")
  else:
    lines.append(f"memorization reliability: split-half Spearman {_f(half['spearman'])} ({half['half_models']} vs "
                 f"{half['half_models']} models, {len(half['splits'])} splits); {_f(half['spearman_brown'])} predicted "
                 f"for all {m} models (Spearman-Brown)")
  interval = summary.get("interval")
  if interval and interval["median_width"] is not None:
    if interval["method"] == "bootstrap":
      kind = f"bootstrap intervals over models ({interval['resamples']} resamples)"
    else:
      kind = ("Newcombe score intervals (in vs out accuracy over models)" if interval["method"] == "newcombe" else
              "Newcombe score intervals combined over subset ratios by MOVER (in vs out accuracy over models)")
    lines.append(f"memorization {interval['confidence']:.0%} {kind}: median width {interval['median_width']:.3f}")
  needed = summary["models_needed"]
  estimates = ", ".join(f"<= {t}: ~{n:,} models" if n is not None else f"<= {t}: unknown"
                        for t, n in needed["targets"].items())
  lines.append(f"models needed for median memorization SE {estimates} (now {m} models, median SE "
               f"{_f(needed['median_se'])})")
  return lines


# -- CSV -----------------------------------------------------------------------------------------

def _cell(value) -> str:
  if isinstance(value, (bool, np.bool_)):
    return "1" if value else "0"
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  if isinstance(value, str):
    return value
  value = float(value)
  return "" if math.isnan(value) else f"{value:.6g}"


def table_to_csv(columns: dict[str, np.ndarray]) -> bytes:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  names = list(columns)
  writer.writerow(names)
  arrays = [np.asarray(columns[n]) for n in names]
  for row in zip(*arrays):
    writer.writerow([_cell(v) for v in row])
  return out.getvalue().encode()


def rows_to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> bytes:
  """A study's rows (dicts) as CSV, cells written as in ``scores.csv`` (NaN an empty cell, floats
  to 6 significant digits); ``columns`` default to the first row's keys."""
  names = list(columns if columns is not None else (rows[0] if rows else ()))
  return table_to_csv({name: [row[name] for row in rows] for name in names})


def _defined(value) -> bool:
  return value is not None and bool(np.isfinite(float(value)))


def correlations_csv(table: dict[str, Any]) -> bytes:
  """``correlations.csv``: one row per score with its Spearman correlation to every score, then
  ``auroc_flipped`` and ``n``; ``table`` has ``names``, ``spearman``, ``auroc_flipped``, ``n`` (a
  correlations summary or :func:`jaxmem.scores.correlations.correlation_table`)."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["score", *table["names"], "auroc_flipped", "n"])
  fmt = lambda v: f"{float(v):.4f}" if _defined(v) else ""
  for i, name in enumerate(table["names"]):
    writer.writerow([name, *[fmt(v) for v in table["spearman"][i]], fmt(table["auroc_flipped"][i]), int(table["n"][i])])
  return out.getvalue().encode()


def read_scores_csv(path: str | Path) -> dict[str, np.ndarray]:
  """Reads ``scores.csv`` (or any CSV jaxmem writes) back as columns: integer columns as int64,
  other numeric columns as float64 with empty cells NaN, anything else as strings."""
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  if not rows:
    return {}
  header, body = rows[0], rows[1:]
  out = {}
  for j, name in enumerate(header):
    cells = [r[j] if j < len(r) else "" for r in body]
    try:
      out[name] = np.array([int(c) for c in cells], dtype=np.int64)
    except ValueError:
      try:
        out[name] = np.array([float(c) if c != "" else np.nan for c in cells], dtype=np.float64)
      except ValueError:
        out[name] = np.array(cells, dtype=object)
  return out


# -- tables under a run --------------------------------------------------------------------------

def read_index(run_path: Path) -> dict[str, Any]:
  """``scores/index.json`` (empty for runs scored before tables existed, or if unreadable)."""
  try:
    index = json.loads((run_path / TABLES / INDEX).read_text())
    return index if isinstance(index, dict) and isinstance(index.get("tables"), dict) else {"tables": {}}
  except (OSError, ValueError):
    return {"tables": {}}


def _write_matrix(path: Path, matrix) -> None:
  with atomic_path(path) as tmp:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=tuple(matrix.shape))
    for start, block, _ in matrix.dense_blocks():
      out[start: start + block.shape[0]] = block
    out.flush()
    del out


def write_outputs(path: Path, table: ScoreTable) -> list[Path]:
  """The estimators' extra outputs in ``path``: their tables as ``<name>.csv``, matrices as
  ``<name>.npy``, the summaries of :data:`SUMMARY_FILES` as ``<name>.json`` and the ROC plots of
  :data:`ROC_PLOTS`."""
  written = []
  for result in table.results.values():
    for name, columns in result.tables.items():
      write_bytes_atomic(path / f"{name}.csv", table_to_csv(columns))
      written.append(path / f"{name}.csv")
    for name, matrix in result.matrices.items():
      _write_matrix(path / f"{name}.npy", matrix)
      written.append(path / f"{name}.npy")
  for name in SUMMARY_FILES:
    if name in table.summary and name in table.estimators:
      write_json_atomic(path / f"{name}.json", table.summary[name])
      written.append(path / f"{name}.json")
  for name, title in ROC_PLOTS.items():
    result = table.results.get(name)
    if result is not None and f"{name}_roc" in result.tables:
      with atomic_path(path / f"{name}_roc.png") as tmp:
        plot_roc(result.tables[f"{name}_roc"], table.summary[name], tmp, title=title)
      written.append(path / f"{name}_roc.png")
  return written


def output_names(table: ScoreTable) -> list[str]:
  """The names of the extra files :func:`write_outputs` writes for ``table``."""
  names = [f"{name}.csv" for r in table.results.values() for name in r.tables]
  names += [f"{name}.npy" for r in table.results.values() for name in r.matrices]
  names += [f"{name}.json" for name in SUMMARY_FILES if name in table.summary]
  names += [f"{name}_roc.png" for name in ROC_PLOTS if f"{name}_roc" in getattr(table.results.get(name), "tables", {})]
  return names


#: Estimators whose summary is also written whole as ``<name>.json`` beside the tables.
SUMMARY_FILES = ("lira", "rmia", "lds")
#: Estimators whose ``<name>_roc`` table is drawn as ``<name>_roc.png``, with the plot's title.
ROC_PLOTS = {"lira": "LiRA on jaxmem subset models", "rmia": "RMIA and LiRA on the same jaxmem targets"}


def plot_roc(roc: dict[str, np.ndarray], summary: dict[str, Any], path, *,
             title: str = "LiRA on jaxmem subset models") -> None:
  """Log-log ROC curves of every variant in ``roc`` (PNG, matplotlib's Agg canvas, never pyplot);
  legend numbers from the summary's ``attack`` metrics (and ``lira_same_targets``, RMIA's LiRA
  comparison on the same pairs)."""
  # matplotlib takes about a second to import; only runs that score LiRA pay for it.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(5.5, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  pairs = max(int(summary.get("pairs_evaluated", 1)), 1)
  negatives = max(int(round(pairs * (1 - summary.get("member_percent", 0) / 100))), 1)
  floor = 1.0 / negatives
  styles = {"global_threshold": dict(color="gray", ls="--"), "offline_pdf": dict(color="C4", ls=":")}
  variants = list(dict.fromkeys(np.asarray(roc["variant"]).tolist()))
  for name in variants:
    rows = np.asarray(roc["variant"]) == name
    fpr, tpr = np.asarray(roc["fpr"])[rows], np.asarray(roc["tpr"])[rows]
    metrics = {**summary.get("lira_same_targets", {}), **summary["attack"]}[name]
    low = metrics[tpr_key(0.01)]["value"] if tpr_key(0.01) in metrics else float("nan")
    ax.plot(np.maximum(fpr, floor / 2), np.maximum(tpr, floor / 2),
            label=f"{VARIANT_LABELS.get(name, name)} (AUC {metrics['auc']['value']:.3f}, TPR@1% {low:.3f})",
            **styles.get(name, {}))
  ax.plot([floor / 2, 1], [floor / 2, 1], color="black", lw=0.5)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlim(floor / 2, 1)
  ax.set_ylim(floor / 2, 1)
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=6, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120, format="png")  # path may be a temporary name


def write_scores(run: RunDir, table: ScoreTable) -> list[Path]:
  """Stores each estimator's columns as its own table, then rebuilds the join ``scores.csv``,
  ``correlations.csv`` and ``scores_summary.json``; tables of estimators not run now are kept."""
  tables = run.path / TABLES
  tables.mkdir(exist_ok=True)
  index = read_index(run.path)
  if not index["tables"]:
    index["tables"].update(_adopt_study_columns(run, table.columns["index"]))
  base = {name: table.columns[name] for name in BASE_COLUMNS}
  write_bytes_atomic(tables / f"{BASE_TABLE}.csv", table_to_csv(base))
  written = [tables / f"{BASE_TABLE}.csv"]
  for name in table.estimators:
    if name == "correlations":
      continue
    owned = table.owners.get(name, [])
    path = tables / f"{name}.csv"
    if owned:
      write_bytes_atomic(path, table_to_csv({"index": table.columns["index"], **{c: table.columns[c] for c in owned}}))
      written.append(path)
    elif path.exists():
      path.unlink()  # this estimator has no columns now (e.g. counterfactual without metrics)
    index["tables"][name] = {"kind": "estimator", "records": table.signature, "columns": owned,
                             "options": _jsonable(table.options.get(name, {})), "written": utc_now()}
  index["records"] = table.signature
  write_json_atomic(tables / INDEX, index)
  written += write_outputs(run.path, table)
  old_summary = _read_json(run.path / "scores_summary.json")
  summary = {**{k: v for k, v in old_summary.items() if k != "estimators"}, **table.summary}
  summary["estimators"] = [n for n in index["tables"] if index["tables"][n].get("kind") == "estimator"]
  joined, correlations = rebuild_join(run)
  if correlations is not None:
    summary["correlations"] = correlations
    if "correlations" in table.estimators:
      table.summary["correlations"] = correlations
      table.lines = [line for line in table.lines if not line.startswith(("Spearman correlation with", "AUROC for flipped"))]
      table.lines.extend(correlation_lines(correlations))
  write_json_atomic(run.path / "scores_summary.json", summary)
  return written + [run.path / SCORES_CSV, run.path / "scores_summary.json"]


#: Columns the SSFT study merged into ``scores.csv`` before studies had their own tables.
_OLD_STUDY_COLUMNS = {"ssft": ("fslt", "fslt_se", "ssft", "ssft_se")}


def _adopt_study_columns(run: RunDir, index_N: np.ndarray) -> dict[str, dict[str, Any]]:
  """For a run scored before score tables existed: the study columns of its ``scores.csv`` become
  study tables, so the first rescoring does not drop them (only when its rows are this run's)."""
  path = run.path / SCORES_CSV
  try:
    old = read_scores_csv(path) if path.is_file() else {}
  except (OSError, UnicodeDecodeError, csv.Error):
    return {}
  if "index" not in old or not np.array_equal(old["index"], index_N):
    return {}
  adopted = {}
  for name, columns in _OLD_STUDY_COLUMNS.items():
    present = [c for c in columns if c in old and old[c].dtype.kind == "f"]
    if present:
      write_bytes_atomic(run.path / TABLES / f"{name}.csv", table_to_csv({"index": index_N, **{c: old[c] for c in present}}))
      adopted[name] = {"kind": "study", "columns": present, "info": {"adopted_from": SCORES_CSV}, "written": utc_now()}
  return adopted


def write_study_table(run_dir: str | Path, name: str, columns: dict[str, np.ndarray], *,
                      info: dict[str, Any] | None = None) -> Path:
  """Stores a study's per-example columns (``index`` plus its own) as ``scores/<name>.csv`` under a
  run and rebuilds the join; the run's other tables and files are untouched."""
  run = RunDir.open(run_dir)
  if name in ESTIMATORS or name == BASE_TABLE:
    raise ValueError(f"study table name {name!r} is taken by an estimator")
  tables = run.path / TABLES
  if not (tables / f"{BASE_TABLE}.csv").is_file():
    raise JaxmemError(f"run directory {str(run.path)!r} has no score tables yet; run `jaxmem scores {run.path}` first")
  base = read_scores_csv(tables / f"{BASE_TABLE}.csv")
  index_column = np.asarray(columns["index"], np.int64)
  if not np.array_equal(index_column, base["index"]):
    raise JaxmemError(f"the {name} table's rows are not the run's {len(base['index'])} training examples in order")
  write_bytes_atomic(tables / f"{name}.csv", table_to_csv(columns))
  index = read_index(run.path)
  index["tables"][name] = {"kind": "study", "columns": [c for c in columns if c != "index"],
                           "info": _jsonable(info or {}), "written": utc_now()}
  write_json_atomic(tables / INDEX, index)
  rebuild_join(run)
  return tables / f"{name}.csv"


def rebuild_join(run: RunDir) -> tuple[dict[str, np.ndarray], dict | None]:
  """``scores.csv`` = the base table joined with every table of ``scores/index.json`` (estimators in
  registry order, then studies), and ``correlations.csv`` of it. Returns the join and the
  correlations summary (None when fewer than two scores exist)."""
  tables = run.path / TABLES
  base = read_scores_csv(tables / f"{BASE_TABLE}.csv")
  index = read_index(run.path)
  order = [e.name for e in ESTIMATOR_LIST if e.name in index["tables"]]
  order += sorted(n for n, meta in index["tables"].items() if meta.get("kind") == "study")
  joined = dict(base)
  for name in order:
    path = tables / f"{name}.csv"
    if not path.is_file():
      continue
    part = read_scores_csv(path)
    if not np.array_equal(part.get("index"), base["index"]):
      continue  # rows of another training set: not joinable (the index entry says what it was)
    joined.update({k: v for k, v in part.items() if k != "index"})
  write_bytes_atomic(run.path / SCORES_CSV, table_to_csv(joined))
  correlations = correlations_result(joined, np.asarray(joined["noisy"], bool)).summary
  if correlations:
    write_bytes_atomic(run.path / "correlations.csv", correlations_csv(correlations))
    return joined, correlations
  return joined, None


#: Files an estimator writes beside the tables, so that a stale one can be recognized.
ESTIMATOR_FILES = {"influence": ("influence_topk.csv", "influence_pairs.csv", "influence.npy"),
                   "lira": ("lira.json", "lira_roc.png", "lira_roc.csv"),
                   "rmia": ("rmia.json", "rmia_roc.png", "rmia_roc.csv"),
                   "lds": ("lds.json", "lds_per_test.csv")}


def stale_tables(run_path: str | Path) -> dict[str, str]:
  """Estimator tables (and files) of a run that no longer describe its records, with the reason:
  the records changed since the table was computed (its signature in ``scores/index.json``), or,
  for an estimator's files that no index entry describes (runs scored before score tables existed),
  a file older than the newest finished chunk."""
  run = RunDir(run_path)
  index = read_index(run.path)
  now = run_records_signature(run) if index["tables"] else None
  stale = {}
  for name, meta in index["tables"].items():
    if meta.get("kind") == "estimator" and now is not None and meta.get("records") != now:
      stale[name] = "computed from other records than the run holds now (rerun `jaxmem scores`)"
  newest_chunk = _newest_chunk_time(run)
  for name, files in ESTIMATOR_FILES.items():
    if name in index["tables"] or newest_chunk is None:
      continue
    times = [(run.path / f).stat().st_mtime_ns for f in files if (run.path / f).is_file()]
    if times and min(times) < newest_chunk:
      stale[name] = "older than the run's newest records (rerun `jaxmem scores` with it)"
  return stale


def _newest_chunk_time(run: RunDir) -> int | None:
  try:
    times = [p.stat().st_mtime_ns for p in (run.path / "chunks").glob("*.npz")]
  except OSError:
    return None
  return max(times) if times else None


def _read_json(path: Path) -> dict:
  try:
    value = json.loads(path.read_text())
    return value if isinstance(value, dict) else {}
  except (OSError, ValueError):
    return {}


def _jsonable(value):
  return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def score_run(run_dir: str | Path, estimators: Sequence[str] | None = None,
              options: dict[str, dict[str, Any]] | None = None) -> tuple[ScoreTable, Records]:
  """(Re)computes the chosen estimators' tables from whatever chunks of ``run_dir`` are complete,
  and rebuilds the joined ``scores.csv``."""
  run = RunDir.open(run_dir)
  records = run.load_records()
  table = score_records(records, estimators, options)
  write_scores(run, table)
  return table, records
