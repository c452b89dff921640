"""``jaxmem report``: one self-contained HTML page with PNG figures for a run directory.

The report reads only what a run wrote (``manifest.json``, ``summary.json``, ``scores.csv`` and the
estimators' files ``influence_topk.csv``, ``lira.json``, ``lira_roc.png``, ``correlations.csv``)
and writes ``RUN/report/index.html`` plus its PNGs beside it, referenced by relative paths, so the
folder opens offline and can be copied as a whole. A section appears only when the run has the
scores it shows; the model-level studies (``jaxmem study neural-collapse|benign|layer-rewind|
privacy-forgetting``, in their default folders under the run, and ``sweep`` for a run that is one of
its variants) and a text run's per-epoch ``exact_memorization.csv`` get a section each, drawn from
their own files by one helper (:func:`_study_section`). Galleries need the images: the dataset is
loaded again from the manifest's config (:func:`jaxmem.load_dataset`) and used only if its
fingerprint equals the manifest's; otherwise, and for non-image data, the report shows tables
instead of pictures.

Figures mirror Feldman & Zhang (2020, "What Neural Networks Memorize and Why"): the distribution of
memorization overall and per class (their Fig. 2), galleries of the most and least memorized
training examples (Fig. 1 / Fig. 9-11), and train → test pairs with high influence (Fig. 4).
Figures are drawn with matplotlib's object-oriented API on a ``Figure`` (Agg canvas), never
through pyplot, so the report neither changes nor depends on the process's matplotlib backend.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxmem.errors import JaxmemError
from jaxmem.scores._stats import spearman
from jaxmem.scores.lira import VARIANT_LABELS
from jaxmem.scoring import SCORES_CSV, read_index, read_scores_csv, stale_tables
from jaxmem.records import RunDir, make_dirs, write_bytes_atomic

REPORT_DIR = "report"

# Per-example score columns the report knows how to show; anything else in scores.csv is listed
# in the correlation fallback only if it is one of these (bookkeeping columns such as n_in are not
# scores).
SCORE_COLUMNS = ("memorization", "memorization_margin", "memorization_logprob", "memorization_loss",
                 "cscore", "learning_speed", "lira_online", "lira_offline", "forgetting_events",
                 "never_learned_fraction", "first_learned_epoch", "cumulative_accuracy", "el2n", "grand",
                 "fslt", "ssft")
DYNAMICS_COLUMNS = ("forgetting_events", "first_learned_epoch", "cumulative_accuracy", "el2n", "grand",
                    "fslt", "ssft", "learning_speed")


@dataclasses.dataclass
class Report:
  path: Path                    # RUN/report/index.html
  sections: list[str]           # section ids written, in order
  images: list[str]             # image files the page references (relative to the report folder)
  dataset_note: str             # why images are (not) shown


@dataclasses.dataclass
class _Section:
  id: str
  title: str
  body: str


def write_report(run_dir: str | Path, *, dataset=None, data_dir: str | None = None, top: int = 24,
                 log: Callable[[str], None] = lambda message: None) -> Report:
  """Writes ``RUN/report/index.html`` and its figures; returns what was written.

  Args:
    run_dir: a run directory with ``scores.csv`` (``jaxmem run`` or ``jaxmem scores`` wrote it).
    dataset: the run's :class:`~jaxmem.Dataset`, if the caller has it (e.g. a study that built it);
      otherwise it is loaded again from the manifest's config.
    data_dir: TFDS data directory to reload from, overriding the one in the manifest's config.
    top: how many examples each gallery shows.
  """
  if not isinstance(top, int) or top < 1:
    raise JaxmemError(f"top must be a positive number of examples per gallery, got {top!r}")
  run = RunDir.open(run_dir)
  manifest = run.manifest()
  if not (run.path / SCORES_CSV).is_file():
    raise JaxmemError(f"run directory {str(run.path)!r} has no {SCORES_CSV} yet; run `jaxmem scores "
                      f"{run.path}` first")
  try:
    scores = read_scores_csv(run.path / SCORES_CSV)
  except (UnicodeDecodeError, csv.Error):  # binary garbage: refused below like a truncated file
    scores = {}
  num_train = manifest.get("dataset", {}).get("num_train")
  if "index" not in scores or not np.array_equal(scores["index"], np.arange(num_train if num_train is not None else -1)):
    rows = len(scores["index"]) if "index" in scores else 0
    raise JaxmemError(f"{SCORES_CSV} in {str(run.path)!r} is damaged or from another run ({rows} rows, the run has "
                      f"{num_train} training examples); rerun `jaxmem scores {run.path}`")
  # A table computed from other records than the run holds now (or a file an earlier scoring left)
  # is not shown: its columns are dropped here and its sections check ``ctx.stale``.
  stale = stale_tables(run.path)
  for name, reason in stale.items():
    log(f"report: leaving out {name}: {reason}")
    for column in read_index(run.path)["tables"].get(name, {}).get("columns", []):
      scores.pop(column, None)
  summary = _read_json(run.path / "summary.json")
  out = make_dirs(run.path / REPORT_DIR, "report directory")
  if dataset is None:
    dataset, note = reload_dataset(manifest, data_dir=data_dir)
  else:
    note = _check_fingerprint(dataset, manifest)
    dataset = dataset if not note else None
  images_ok = dataset is not None and dataset.is_image and dataset.num_train == len(scores["index"])
  if dataset is not None and not dataset.is_image:
    note = "the inputs are not images; examples are listed in tables"
  log(f"report: {note}" if note else "report: images from the reloaded dataset")

  ctx = _Context(run.path, out, manifest, summary, scores, dataset if images_ok else None, top,
                 stale=frozenset(stale), log=log)
  sections = [s for s in (
      _facts_section(ctx, note),
      _memorization_section(ctx),
      _gallery_section(ctx),
      _text_section(ctx, dataset if dataset is not None and dataset.is_text else None),
      _influence_section(ctx),
      _cscore_section(ctx),
      _lira_section(ctx),
      _rmia_section(ctx),
      _attack_refs_section(ctx),
      _lds_section(ctx),
      _proxies_section(ctx),
      _dynamics_section(ctx),
      _exact_memorization_section(ctx),
      _neural_collapse_section(ctx),
      _benign_section(ctx),
      _layer_rewind_section(ctx),
      _privacy_forgetting_section(ctx),
      _sweep_section(ctx),
      _correlation_section(ctx),
  ) if s is not None]
  page = _page(manifest, sections)
  write_bytes_atomic(out / "index.html", page.encode())
  return Report(out / "index.html", [s.id for s in sections], list(ctx.images), note)


def reload_dataset(manifest: dict[str, Any], *, data_dir: str | None = None):
  """The run's dataset loaded again from its manifest (only if its fingerprint matches: wrong
  pictures under the scores would mislead), or ``(None, reason)`` when it cannot be."""
  from jaxmem.data import load_run_dataset
  try:
    return load_run_dataset(manifest, data_dir=data_dir), ""
  except JaxmemError as e:
    return None, f"{e}; examples are listed in tables"


def _check_fingerprint(dataset, manifest) -> str:
  expected = manifest.get("dataset", {}).get("fingerprint")
  if expected and dataset.fingerprint != expected:
    return ("the dataset loaded again differs from the one the run trained on (fingerprint mismatch); "
            "examples are listed in tables")
  return ""


# ---------------------------------------------------------------------------------------------
# Context and small helpers.


@dataclasses.dataclass
class _Context:
  run_path: Path
  out: Path
  manifest: dict[str, Any]
  summary: dict[str, Any]
  scores: dict[str, np.ndarray]
  dataset: Any  # Dataset with images, or None
  top: int
  images: list[str] = dataclasses.field(default_factory=list)
  stale: frozenset = frozenset()  # estimators whose tables and files no longer describe the records
  log: Callable[[str], None] = lambda message: None

  @property
  def is_text(self) -> bool:
    """A language-model run (its manifest describes text): no labels, classes or images, so the
    label-based parts (per-class figures, label noise, image galleries) have nothing to show."""
    return "text" in self.manifest.get("dataset", {})

  def has(self, column: str) -> bool:
    return column in self.scores and bool(np.isfinite(self.scores[column].astype(float)).any())

  def save(self, fig, name: str, alt: str, width: int | None = None) -> str:
    """Saves a matplotlib Figure as ``name`` in the report folder; returns the <img> tag."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    fig.savefig(self.out / name, dpi=100)
    self.images.append(name)
    style = f' style="max-width:{width}px"' if width else ""
    return f'<img src="{html.escape(name)}" alt="{html.escape(alt)}"{style}>'


def _read_json(path: Path) -> dict[str, Any]:
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise JaxmemError(f"{str(path)!r} is not valid JSON ({e})") from None


def _figure(width: float, height: float):
  from matplotlib.figure import Figure
  return Figure(figsize=(width, height), layout="constrained")


def _fmt(value, digits: int = 3) -> str:
  if isinstance(value, (bool, np.bool_)):
    return "yes" if value else "no"
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  if isinstance(value, (float, np.floating)):
    if math.isnan(value):
      return ""
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"
  return str(value)


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], cls: str = "") -> str:
  head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header or ())
  head = f"<thead><tr>{head}</tr></thead>" if header else ""
  body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
  return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


def _show_image(ax, x: np.ndarray) -> None:
  """Draws one image; values outside [0, 1] (standardized or arbitrary floats) are min-max scaled."""
  x = np.asarray(x, np.float32)
  if x.min() < 0 or x.max() > 1:
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
  if x.shape[-1] == 1:
    ax.imshow(x[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
  else:
    ax.imshow(x[..., :3], interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])


def _mark(ax, color: str) -> None:
  for spine in ax.spines.values():
    spine.set_edgecolor(color)
    spine.set_linewidth(3)


def _order(values: np.ndarray, descending: bool) -> np.ndarray:
  """Indices sorted by value, NaN last, ties by index (stable)."""
  v = values.astype(float)
  key = np.where(np.isnan(v), np.inf, -v if descending else v)
  return np.argsort(key, kind="stable")


# ---------------------------------------------------------------------------------------------
# Sections.


def _facts_section(ctx: _Context, note: str) -> _Section:
  m, s = ctx.manifest, ctx.summary
  config, ds = m.get("config", {}), m.get("dataset", {})
  rows = [("dataset", f"{ds.get('name')} ({ds.get('num_train')} train, {ds.get('num_test')} test, "
                      f"{ds.get('num_classes')} classes, input {tuple(ds.get('input_shape', ()))})")]
  if ctx.is_text:
    text = ds["text"]
    rows = [("dataset", f"{ds.get('name')} ({ds.get('num_train')} distinct training sequences, "
                        f"{text.get('corpus_size')} with their copies; {ds.get('num_test')} test sequences; "
                        f"{text.get('tokenizer')}-level tokens, vocabulary {text.get('vocab_size')}, "
                        f"context {text.get('seq_len')})")]
  if config.get("label_noise"):
    flipped = int(np.sum(ctx.scores["noisy"])) if "noisy" in ctx.scores else "?"
    rows.append(("label noise", f"{config['label_noise']} ({flipped} labels flipped)"))
  models = s.get("models", {})
  rows.append(("models", f"{models.get('finished', '?')} of {models.get('planned', config.get('num_models'))} "
                         f"finished; {config.get('model')} {config.get('model_options') or ''}".rstrip()))
  rows.append(("training", f"subset ratios {config.get('subset_ratios')}, mask design {config.get('mask_design')}, "
                           f"{config.get('epochs')} epochs, batch {config.get('batch_size')}, "
                           f"{config.get('optimizer')} lr {config.get('learning_rate')} ({config.get('schedule')})"
                           f"{', augmented' if config.get('augment') else ''}, seed {config.get('seed')}"))
  acc = s.get("accuracy")
  if acc:
    rows.append(("per-token accuracy (mean over models)" if ctx.is_text else "accuracy (mean over models)",
                 f"own subset {acc['train_subset']:.3f}, held-out training examples "
                                                f"{acc['train_held_out']:.3f}, test {acc['test']:.3f}"))
  if "seconds" in s:
    rows.append(("time (last jaxmem run of this directory)", f"{s['seconds']:.1f} s"))
  if "strategy" in m:
    rows.append(("engine", f"strategy {m['strategy']} on {', '.join(m.get('devices', []))}"))
  if "memorization_median_se" in s:
    rows.append(("memorization median standard error", f"{s['memorization_median_se']:.3f}"))
  if "noisy_label_auroc" in s:
    rows.append(("flipped labels found by memorization (AUROC)", f"{s['noisy_label_auroc']:.3f}"))
  versions = m.get("versions", {})
  if versions:
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
  rows.append(("created", m.get("created", "")))
  if note and not ctx.is_text:
    rows.append(("images", note))
  body = _few_models_warning(models.get("finished"), s.get("memorization_median_se")) + _table(None, rows, "facts")
  return _Section("facts", "Run", body)


#: Below this many finished models a report opens with a warning: each example then has only a
#: handful of models with and without it, and every per-example estimate is mostly noise.
FEW_MODELS = 16


def _few_models_warning(finished, median_se) -> str:
  if not isinstance(finished, int) or finished >= FEW_MODELS:
    return ""
  se = f" (median memorization standard error ±{median_se:.2f})" if isinstance(median_se, float) else ""
  return (f'<p class="warning"><strong>Warning: only {finished} models.</strong> Each example was held in and out '
          f"by only a few of them, so the standard errors are wide{se}: rankings, galleries and pairs below are "
          f"mostly noise. Grow the run (same command, larger --num-models) to at least {FEW_MODELS * 4} models.</p>")


def _memorization_section(ctx: _Context) -> _Section | None:
  if not ctx.has("memorization"):
    return None
  mem = ctx.scores["memorization"].astype(float)
  labels = ctx.scores["label"]
  noisy = ctx.scores.get("noisy", np.zeros_like(labels)).astype(bool)
  finite = np.isfinite(mem)
  low = min(0.0, math.floor(float(np.nanmin(mem)) * 10) / 10)  # memorization can be negative
  bins = np.linspace(low, 1.0, int(round((1.0 - low) * 30)) + 1)

  fig = _figure(7, 3.2)
  ax = fig.add_subplot()
  if noisy.any():
    ax.hist([mem[finite & ~noisy], mem[finite & noisy]], bins=bins, stacked=True,
            label=["clean label", "flipped label"], color=["#4c72b0", "#dd5555"])
    ax.legend()
  else:
    ax.hist(mem[finite], bins=bins, color="#4c72b0")
  ax.set_yscale("log")
  ax.set_xlabel("memorization estimate")
  ax.set_ylabel("training examples (log scale)")
  ax.set_title(f"memorization of {int(finite.sum())} training {'sequences' if ctx.is_text else 'examples'}")
  overall = ctx.save(fig, "memorization_hist.png", "memorization histogram")

  q = np.nanquantile(mem, [0.5, 0.9, 0.99])
  if ctx.is_text:  # no labels: no per-class figure; the text definition (Zhang et al. 2021)
    text = (f"<p>Counterfactual memorization of a sequence mem<sub>i</sub> = E[per-token accuracy on i | i in "
            f"subset] − E[per-token accuracy on i | i held out] (Zhang et al. 2021, eq. 1), all copies of a sequence "
            f"held in or out together. Median {q[0]:.3f}, 90th percentile {q[1]:.3f}, 99th percentile "
            f"{q[2]:.3f}.</p>")
    return _Section("memorization", "Memorization", text + overall)
  classes = np.unique(labels)
  if len(classes) <= 20:
    cols = min(5, len(classes))
    rows = -(-len(classes) // cols)
    fig = _figure(2.4 * cols, 1.9 * rows)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    for a in axes.flat[len(classes):]:
      a.set_visible(False)
    for a, c in zip(axes.flat, classes):
      in_class = finite & (labels == c)
      a.hist(mem[in_class], bins=bins, color="#4c72b0")
      a.set_yscale("log")
      a.set_title(f"label {c}: mean {np.mean(mem[in_class]):.2f}", fontsize=9)
      a.tick_params(labelsize=7)
    fig.supxlabel("memorization (training label as trained on)", fontsize=9)
    fig.supylabel("training examples (log scale)", fontsize=9)
  else:  # many classes: one bar per class, sorted, instead of unreadable small multiples
    means = np.array([np.nanmean(mem[labels == c]) for c in classes])
    order = np.argsort(means)
    fig = _figure(9, 3)
    ax = fig.add_subplot()
    ax.bar(np.arange(len(classes)), means[order], color="#4c72b0")
    ax.set_xlabel("class (sorted by mean memorization)")
    ax.set_ylabel("mean memorization")
  per_class = ctx.save(fig, "memorization_per_class.png", "memorization per class")
  text = (f"<p>Memorization mem<sub>i</sub> = P[correct on i | i in subset] − P[correct on i | i held out] "
          f"(Feldman &amp; Zhang 2020, eq. 3). Median {q[0]:.3f}, 90th percentile {q[1]:.3f}, 99th "
          f"percentile {q[2]:.3f}; {int(np.sum(mem[finite] > 0.5))} examples above 0.5.</p>")
  return _Section("memorization", "Memorization", text + overall + "<h3>Per class</h3>" + per_class)


def _example_caption(ctx: _Context, i: int, value_column: str) -> tuple[str, bool]:
  s = ctx.scores
  label, noisy = int(s["label"][i]), bool(s["noisy"][i]) if "noisy" in s else False
  value = float(s[value_column][i])
  se_name = f"{value_column}_se"
  se = f"±{float(s[se_name][i]):.2f}" if se_name in s and np.isfinite(s[se_name][i]) else ""
  clean = f" (was {int(s['clean_label'][i])})" if noisy and "clean_label" in s else ""
  short = "mem" if value_column == "memorization" else value_column
  return f"#{i} y={label}{clean}\n{short} {value:.2f}{se}", noisy


def _gallery(ctx: _Context, indices: np.ndarray, column: str, title: str, name: str) -> str:
  cols = 8
  rows = -(-len(indices) // cols)
  fig = _figure(1.35 * cols, 1.6 * rows + 0.4)
  axes = fig.subplots(rows, cols, squeeze=False)
  for a in axes.flat[len(indices):]:
    a.set_visible(False)
  for a, i in zip(axes.flat, indices):
    _show_image(a, ctx.dataset.x_train[i])
    caption, noisy = _example_caption(ctx, int(i), column)
    a.set_title(caption, fontsize=7, color="#c00000" if noisy else "black")
    if noisy:
      _mark(a, "#c00000")
  fig.suptitle(title, fontsize=10)
  return ctx.save(fig, name, title)


def tie_sample(values: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
  """The k smallest values' indices; when more than k examples tie at the minimum (often hundreds
  at memorization 0), k of the tie drawn at random (fixed seed, so reports are stable) in index
  order, instead of the first k indices, which say nothing about the tie."""
  v = values.astype(float)
  finite = np.isfinite(v)
  if not finite.any():
    return _order(v, False)[:k]
  tie = np.flatnonzero(finite & (v == np.nanmin(v)))
  if tie.size <= k:
    return _order(v, False)[:k]
  return np.sort(np.random.default_rng(seed).choice(tie, size=k, replace=False))


def _tie_note(values: np.ndarray, k: int) -> str:
  v = values.astype(float)
  ties = int(np.sum(v == np.nanmin(v))) if np.isfinite(v).any() else 0
  return (f" ({k} of the {ties} examples tied at the minimum {np.nanmin(v):.2f}, drawn at random)"
          if ties > k else "")


def _gallery_section(ctx: _Context) -> _Section | None:
  if not ctx.has("memorization") or ctx.is_text:  # the text section lists sequences as text
    return None
  mem = ctx.scores["memorization"]
  finite = np.flatnonzero(np.isfinite(mem.astype(float)))
  k = min(ctx.top, len(finite))
  most, least = _order(mem, True)[:k], tie_sample(mem, k)
  legend = ("<p>Each image: training index, label trained on (a flipped label in red, with the original), "
            "memorization ± standard error.</p>")
  noisy = ctx.scores["noisy"].astype(bool) if "noisy" in ctx.scores else np.zeros(len(mem), bool)
  # With label noise the top of the ranking is flipped labels; the examples Feldman & Zhang show
  # (atypical but correctly labelled) are the most memorized among the clean labels.
  most_clean = [i for i in _order(mem, True) if not noisy[i] and np.isfinite(mem[i])][:k] if noisy.any() else []
  if ctx.dataset is not None:
    body = legend + _gallery(ctx, most, "memorization", f"{k} most memorized training examples", "gallery_most.png")
    if most_clean:
      body += _gallery(ctx, np.asarray(most_clean), "memorization",
                       f"{len(most_clean)} most memorized training examples with clean labels", "gallery_most_clean.png")
    body += _gallery(ctx, least, "memorization", f"{k} least memorized training examples{_tie_note(mem, k)}",
                     "gallery_least.png")
  else:
    s = ctx.scores
    header = ("index", "label", "clean label", "flipped", "memorization", "standard error")

    def rows(indices):
      return [(int(i), int(s["label"][i]), int(s["clean_label"][i]) if "clean_label" in s else "",
               bool(s["noisy"][i]) if "noisy" in s else False, float(mem[i]),
               float(s["memorization_se"][i]) if "memorization_se" in s else float("nan")) for i in indices]
    body = f"<h3>{k} most memorized</h3>" + _table(header, rows(most))
    if most_clean:
      body += f"<h3>{len(most_clean)} most memorized with clean labels</h3>" + _table(header, rows(most_clean))
    note = _tie_note(mem, k)
    body += (f"<p>Least memorized:{html.escape(note[1:-1])}.</p>" if note else "")
    body += f"<h3>{k} least memorized</h3>" + _table(header, rows(least))
  return _Section("gallery", "Most and least memorized training examples", body)


def _text_section(ctx: _Context, dataset) -> _Section | None:
  """A language-model run: canary exposure by repetitions, and the most memorized sequences as text."""
  if dataset is None or not ctx.has("memorization"):
    return None
  s, body = ctx.scores, ""
  by_copies = ctx.summary.get("scores", {}).get("exposure", {}).get("by_copies")
  if by_copies:
    counts = sorted(by_copies, key=int)
    fig = _figure(5, 3.2)
    ax = fig.add_subplot()
    for key, label in (("exposure", "trained on the canary"),
                       ("exposure_out", "not trained on it (interval: chance's spread)")):
      ax.errorbar([int(c) for c in counts], [by_copies[c][key] for c in counts],
                  yerr=[1.96 * by_copies[c][f"{key}_se"] for c in counts], marker="o", capsize=3, label=label)
    ax.axhline(1 / np.log(2), color="gray", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="canary repetitions", ylabel="exposure (bits), 95% interval")
    ax.legend(fontsize=7)
    body += "<h3>Canary exposure by repetitions</h3>" + ctx.save(fig, "text_exposure.png", "exposure by repetitions")
  if ctx.has("exposure") and ctx.has("exposure_chance"):
    canaries = np.flatnonzero(np.isfinite(s["exposure"].astype(float)))
    canaries = canaries[np.argsort(s["copies"][canaries], kind="stable")]
    rows = [(int(i), int(s["copies"][i]), dataset.decode(dataset.x_train[i]), float(s["exposure"][i]),
             float(s["exposure_se"][i]), float(s["exposure_out"][i]), float(s["exposure_chance"][i]),
             float(s["exposure_out_se"][i])) for i in canaries]
    body += ("<p>Each canary's exposure over the models that trained on it (± its standard error over them), "
             "and over those that did not, beside what chance gives those models: the mean exposure of a fresh "
             "secret never inserted, enumerated over all candidates, ± its spread over the secret's draw (the "
             "canary, not the model, is the unit that varies: out-models share most of their data).</p>"
             + _table(("index", "copies", "canary", "exposure", "± SE", "not trained on", "chance", "± spread"), rows))
  mem = s["memorization"]
  most = _order(mem, True)[: ctx.top]
  header = ("index", "copies", "canary", "memorization", "standard error", "extractable", "exposure", "text")
  cell = lambda name, i: float(s[name][i]) if name in s else float("nan")
  rows = [(int(i), int(s["copies"][i]) if "copies" in s else "", "yes" if cell("canary", i) == 1 else "",
           float(mem[i]), cell("memorization_se", i), cell("extractable", i), cell("exposure", i),
           dataset.decode(dataset.x_train[i])) for i in most]
  body += (f"<h3>{len(most)} most memorized sequences (per-token accuracy, in−out)</h3>" + _table(header, rows))
  return _Section("text", "Language model: memorized sequences and canaries", body)


def _influence_section(ctx: _Context) -> _Section | None:
  # influence_pairs.csv holds Feldman & Zhang's high-influence pairs (high influence and high
  # memorization, their Fig. 4); influence_topk.csv the top pairs per example, listed once per
  # direction: fall back to it, deduplicated, when there are no high pairs.
  if "influence" in ctx.stale:
    return None
  table, damaged = None, []
  for name in ("influence_pairs.csv", "influence_topk.csv"):
    if (ctx.run_path / name).is_file():
      try:
        candidate = read_scores_csv(ctx.run_path / name)
      except (UnicodeDecodeError, csv.Error):
        candidate = {}
      columns = ("train_index", "test_index", "influence")
      if not set(columns) <= set(candidate) or any(candidate[c].dtype.kind not in "if" for c in columns):
        damaged.append(name)  # a damaged file used to be a traceback here, or silently no section
        continue
      if len(candidate["influence"]):
        table, source = candidate, name
        break
  if table is None:
    if damaged:
      return _Section("influence", "Influence: training → test pairs",
                      f"<p>{' and '.join(damaged)} in this run {'is' if len(damaged) == 1 else 'are'} damaged (not "
                      f"the table <code>jaxmem scores</code> writes): rerun <code>jaxmem scores {ctx.run_path}</code> "
                      "to write it again.</p>")
    return None
  order, seen = [], set()
  for r in _order(table["influence"], True):
    pair = (int(table["train_index"][r]), int(table["test_index"][r]))
    if pair not in seen:
      seen.add(pair)
      order.append(int(r))
    if len(order) == min(ctx.top // 2, 12):
      break
  test_labels = ctx.dataset.y_test if ctx.dataset is not None else None
  body = ("<p>Influence infl(i → j) = P[f(x'<sub>j</sub>) = y'<sub>j</sub> | i ∈ S] − "
          "P[f(x'<sub>j</sub>) = y'<sub>j</sub> | i ∉ S] (Feldman &amp; Zhang 2020, eq. 6): the training "
          "examples whose presence most changes a test prediction.</p>")
  if ctx.dataset is not None:
    n = len(order)
    cols = min(4, n)
    rows = -(-n // cols)
    fig = _figure(3.2 * cols, 1.9 * rows + 0.3)
    # Each pair gets two image columns and a narrow gap column, and its value is the x-label of a
    # frameless axes spanning both images: centred under its own pair, not between two pairs.
    grid = fig.add_gridspec(rows, 3 * cols - 1, width_ratios=([1, 1, 0.35] * cols)[:-1])
    for p, r in enumerate(order):
      i, j = int(table["train_index"][r]), int(table["test_index"][r])
      row, col = divmod(p, cols)
      a_pair = fig.add_subplot(grid[row, 3 * col: 3 * col + 2], frameon=False)
      a_pair.set_xticks([])
      a_pair.set_yticks([])
      a_pair.set_xlabel(f"infl {float(table['influence'][r]):.2f}", fontsize=8)
      a_train, a_test = fig.add_subplot(grid[row, 3 * col]), fig.add_subplot(grid[row, 3 * col + 1])
      _show_image(a_train, ctx.dataset.x_train[i])
      _show_image(a_test, ctx.dataset.x_test[j])
      a_train.set_title(f"train #{i} y={int(ctx.scores['label'][i])}", fontsize=7)
      a_test.set_title(f"→ test #{j} y={int(test_labels[j])}", fontsize=7)
    fig.suptitle("highest-influence pairs: training image → test image", fontsize=10)
    body += ctx.save(fig, "influence_pairs.png", "influence pairs")
  columns = [c for c in ("train_index", "test_index", "influence", "influence_se", "memorization") if c in table]
  body += f"<p>From <code>{source}</code>.</p>" + _table(columns, [[table[c][r] for c in columns] for r in order])
  return _Section("influence", "Influence: training → test pairs", body)


def _cscore_section(ctx: _Context) -> _Section | None:
  ratio_columns = sorted((float(c[len("cscore_at_"):]), c) for c in ctx.scores
                         if c.startswith("cscore_at_") and ctx.has(c))
  if not ratio_columns and not ctx.has("cscore"):
    return None
  body = ("<p>C-score C<sub>i</sub> = E<sub>n</sub> P[f<sub>S</sub>(x<sub>i</sub>) = y<sub>i</sub>], the "
          "expected accuracy on i of models trained on random subsets S without i (Jiang et al. 2021), "
          "per subset ratio and averaged over ratios.</p>")
  if len(ratio_columns) > 1:  # with one ratio the C-score histogram below shows the same
    fig = _figure(max(5, 0.8 * len(ratio_columns) + 2), 3.2)
    ax = fig.add_subplot()
    data = [ctx.scores[c][np.isfinite(ctx.scores[c])] for _, c in ratio_columns]
    ax.violinplot(data, showmedians=True)
    ax.set_xticks(np.arange(1, len(data) + 1), [f"{r:g}" for r, _ in ratio_columns])
    ax.set_xlabel("subset ratio")
    ax.set_ylabel("held-out accuracy on the example")
    ax.set_title("C-score per subset ratio")
    body += ctx.save(fig, "cscore_per_ratio.png", "C-score per ratio")
  if ctx.has("cscore"):
    fig = _figure(7, 3)
    ax = fig.add_subplot()
    c = ctx.scores["cscore"]
    ax.hist(c[np.isfinite(c)], bins=30, color="#55a868")
    ax.set_yscale("log")
    ax.set_xlabel("C-score")
    ax.set_ylabel("training examples (log scale)")
    body += ctx.save(fig, "cscore_hist.png", "C-score histogram")
  return _Section("cscore", "C-score", body)


#: The attack metrics' TPR keys (jaxmem.scores.attack_metrics.tpr_key): ``tpr_at_0.1%_fpr``.
TPR_KEY = r"tpr_at_([0-9.e+-]+)%_fpr"


def _lira_tables(summary: dict[str, Any]) -> str:
  """``lira.json`` as the CLI prints it: one row per attack, one column per metric (value and 95%
  bootstrap interval), then the facts of the evaluation and the most exposed examples."""
  body = ""
  attacks = summary.get("attack")
  if not isinstance(attacks, dict):  # an older or hand-written file: its top-level entries with an AUC
    attacks = {k: v for k, v in summary.items() if isinstance(v, dict) and "auc" in v}
  if attacks:
    first = next(iter(attacks.values()))
    tprs = [k for k in first if re.fullmatch(TPR_KEY, k)]
    tprs.sort(key=lambda k: float(re.fullmatch(TPR_KEY, k).group(1)))
    metrics = ([("auc", "AUC")] + [(k, f"TPR@{re.fullmatch(TPR_KEY, k).group(1)}%FPR") for k in tprs]
               + [("balanced_accuracy", "balanced acc")])
    metrics = [(key, header) for key, header in metrics if key in first]

    def cell(metric) -> str:
      if isinstance(metric, dict) and "value" in metric:
        interval = f" [{metric['low']:.3f}, {metric['high']:.3f}]" if "low" in metric and "high" in metric else ""
        return f"{metric['value']:.3f}{interval}"
      return _fmt(metric)
    rows = [[VARIANT_LABELS.get(name, name)] + [cell(values.get(key, float("nan"))) for key, _ in metrics]
            for name, values in attacks.items() if isinstance(values, dict)]
    body += ("<p>Attack metrics, 95% bootstrap intervals over examples.</p>"
             + _table(["attack"] + [header for _, header in metrics], rows))
  facts = [(label, summary[key]) for key, label in (
      ("models", "models"), ("pairs_evaluated", "(target, example) pairs evaluated"), ("queries", "queries per example"),
      ("center", "center"), ("unscored_examples", "examples without enough in or out shadow models"),
      ("fully_exposed_examples", "examples with per-example AUC 1.0"),
      ("spearman_lira_online_memorization", "Spearman of lira_online with memorization")) if key in summary]
  if "targets" in summary and isinstance(summary["targets"], list):
    facts.insert(1, ("target models", len(summary["targets"])))
  if facts:
    body += _table(None, facts, "facts")
  exposed = summary.get("most_exposed")
  if isinstance(exposed, list) and exposed and isinstance(exposed[0], dict):
    columns = [c for c in ("index", "label", "noisy", "lira_online", "lira_offline", "memorization") if c in exposed[0]]
    body += "<h3>Most exposed training examples</h3>" + _table(columns, [[row.get(c) for c in columns] for row in exposed])
  return body


def _lira_section(ctx: _Context) -> _Section | None:
  if "lira" in ctx.stale:
    return None
  lira_json, roc = ctx.run_path / "lira.json", ctx.run_path / "lira_roc.png"
  columns = [c for c in ("lira_online", "lira_offline") if ctx.has(c)]
  if not (lira_json.is_file() or roc.is_file() or columns):
    return None
  body = ("<p>LiRA (Carlini et al. 2022): per-example Gaussians of the statistic φ = log p<sub>y</sub> − "
          "log Σ<sub>y'≠y</sub> p<sub>y'</sub> on shadow models with and without the example; ROC on "
          "log-log axes, TPR at low FPR.</p>")
  if roc.is_file():
    shutil.copyfile(roc, ctx.out / "lira_roc.png")
    ctx.images.append("lira_roc.png")
    body += '<img src="lira_roc.png" alt="LiRA ROC" style="max-width:640px">'
  if lira_json.is_file():
    body += _lira_tables(_read_json(lira_json))
  if columns:
    fig = _figure(7, 3)
    ax = fig.add_subplot()
    for c in columns:
      v = ctx.scores[c]
      ax.hist(v[np.isfinite(v)], bins=40, histtype="step", label=c, linewidth=1.5)
    ax.set_yscale("log")
    ax.legend()
    ax.set_xlabel("LiRA score per training example")
    ax.set_ylabel("training examples (log scale)")
    body += ctx.save(fig, "lira_scores.png", "LiRA score histogram")
  return _Section("lira", "Membership inference (LiRA)", body)


def _interval(entry: dict[str, Any], value: str = "value", low: str = "low", high: str = "high") -> str:
  """"value [low, high]", or an empty cell when the value is missing."""
  return _with_interval(*(entry.get(k, float("nan")) for k in (value, low, high)))


def _with_interval(value, low, high) -> str:
  if not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
    return ""
  return f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]"


def _copy_image(ctx: _Context, source: Path, name: str, alt: str) -> str:
  shutil.copyfile(source, ctx.out / name)
  ctx.images.append(name)
  return f'<img src="{name}" alt="{html.escape(alt)}" style="max-width:900px">'


def _rmia_section(ctx: _Context) -> _Section | None:
  if "rmia" in ctx.stale:
    return None
  summary = _read_json(ctx.run_path / "rmia.json")
  if not summary:
    return None
  body = (f"<p>RMIA (Zarifzadeh et al. 2024): score(x) = Pr<sub>z</sub>[LR(x, z) ≥ γ] over "
          f"{summary.get('population')} test examples as population; a = {_fmt(summary.get('a'))} (tuned), "
          f"γ = {_fmt(summary.get('gamma'))}; {len(summary.get('targets', []))} targets, all other models as "
          f"references; 95% bootstrap intervals over examples.</p>")
  if (ctx.run_path / "rmia_roc.png").is_file():
    body += _copy_image(ctx, ctx.run_path / "rmia_roc.png", "rmia_roc.png", "RMIA ROC")
  eps = summary.get("eps_lower_bound", {})
  rows = [(name, _interval(m.get("auc", {})), _interval(m.get("tpr_at_0.1%_fpr", {})), _interval(m.get("tpr_at_1%_fpr", {})),
           eps.get(name, {}).get("eps", float("nan"))) for name, m in summary.get("attack", {}).items()]
  body += _table(("attack", "AUC", "TPR@0.1%FPR", "TPR@1%FPR", "ε lower bound"), rows)
  if summary.get("eps_caveat"):
    body += f"<p><small>{html.escape(summary['eps_caveat'])}</small></p>"
  return _Section("rmia", "Membership inference (RMIA)", body)


def _attack_refs_section(ctx: _Context) -> _Section | None:
  table, plot = ctx.run_path / "attack_refs" / "attack_refs.csv", ctx.run_path / "attack_refs" / "attack_refs.png"
  if not table.is_file():
    return None
  body = ("<p>Attack power against the number K of reference models per target "
          "(<code>jaxmem study attack-refs</code>); each attack on the pairs it can score (coverage).</p>")
  if plot.is_file():
    body += _copy_image(ctx, plot, "attack_refs.png", "attack power vs reference models")
  data = read_scores_csv(table)
  rows = [(int(k), a, _with_interval(auc, lo, hi), t1, t2, e, c) for k, a, auc, lo, hi, t1, t2, e, c in zip(
      data["refs"], data["attack"], data["auc"], data["auc_low"], data["auc_high"], data["tpr_at_0.1pct_fpr"],
      data["tpr_at_1pct_fpr"], data["eps_lower_bound"], data["coverage"])]
  body += _table(("K", "attack", "AUC", "TPR@0.1%FPR", "TPR@1%FPR", "ε lower bound", "coverage"), rows)
  return _Section("attack_refs", "Attack power vs reference models", body)


def _lds_section(ctx: _Context) -> _Section | None:
  if "lds" in ctx.stale:
    return None
  summary = _read_json(ctx.run_path / "lds.json")
  if not summary:
    return None
  settings = summary.get("settings", {})
  body = (f"<p>Linear datamodeling score (Park et al. 2023): Spearman correlation over "
          f"{settings.get('evaluation_models')} held-out models between the summed attribution of each model's "
          f"subset and its test margin, averaged over test examples; attributions from the other "
          f"{settings.get('estimation_models')} models. 95% bootstrap intervals over test examples.</p>")
  rows = [(name, _interval(e, "lds", "lds_low", "lds_high"), f"{e.get('test_examples_used')} of {e.get('test_examples')}")
          for name, e in summary.items() if name != "settings"]
  body += _table(("attribution", "LDS", "test examples used"), rows)
  return _Section("lds", "Data attribution: linear datamodeling score", body)


def _proxies_section(ctx: _Context) -> _Section | None:
  table = ctx.run_path / "proxies" / "proxies.csv"
  if not table.is_file():
    return None
  data = read_scores_csv(table)
  body = ("<p>Cheap memorization proxies from k models (<code>jaxmem study proxies</code>) against the run's "
          "memorization from all models; 95% bootstrap intervals over examples; cost relative to the full "
          "estimate in model-epochs. Proxies, not memorization.</p>")
  rows = [(int(k), name, _with_interval(sp, lo, hi), pe, au, int(n), c)
          for k, name, sp, lo, hi, pe, au, n, c in zip(
              data["models"], data["proxy"], data["spearman"], data["spearman_low"], data["spearman_high"],
              data["pearson"], data["auroc_flipped"], data["examples_used"], data["cost_ratio"])]
  body += _table(("k", "proxy", "Spearman", "Pearson", "AUROC flipped", "examples", "cost ratio"), rows)
  return _Section("proxies", "Memorization proxies", body)


def _dynamics_section(ctx: _Context) -> _Section | None:
  present = [c for c in DYNAMICS_COLUMNS if ctx.has(c)]
  if not present or not ctx.has("memorization"):
    return None
  mem = ctx.scores["memorization"].astype(float)
  noisy = ctx.scores.get("noisy", np.zeros(len(mem))).astype(bool)
  cols = min(3, len(present))
  rows = -(-len(present) // cols)
  fig = _figure(3.4 * cols, 3.0 * rows)
  axes = fig.subplots(rows, cols, squeeze=False)
  for a in axes.flat[len(present):]:
    a.set_visible(False)
  rng = np.random.default_rng(0)  # jitter only, for integer-valued scores; fixed so reports are stable
  for a, c in zip(axes.flat, present):
    v = ctx.scores[c].astype(float)
    ok = np.isfinite(v) & np.isfinite(mem)
    integer = np.all(v[ok] == np.round(v[ok]))
    x = v + (rng.uniform(-0.25, 0.25, len(v)) if integer else 0)
    a.scatter(x[ok & ~noisy], mem[ok & ~noisy], s=4, alpha=0.4, color="#4c72b0", label="clean")
    if noisy.any():
      a.scatter(x[ok & noisy], mem[ok & noisy], s=6, alpha=0.7, color="#dd5555", label="flipped")
      a.legend(fontsize=7, markerscale=2)
    a.set_xlabel(c + (" (jittered)" if integer else ""), fontsize=8)
    a.set_ylabel("memorization", fontsize=8)
    a.tick_params(labelsize=7)
  body = ("<p>Training dynamics against memorization: forgetting events (Toneva et al. 2019) and the other "
          "per-example dynamics scores this run recorded.</p>")
  body += ctx.save(fig, "dynamics_vs_memorization.png", "dynamics vs memorization")
  title = "Forgetting vs memorization" if "forgetting_events" in present else "Training dynamics vs memorization"
  return _Section("dynamics", title, body)


# ---------------------------------------------------------------------------------------------
# Model-level studies (``jaxmem study neural-collapse|benign|layer-rewind|privacy-forgetting|sweep``):
# each writes a table, a JSON summary and a plot in its own folder; the report shows them as they are.


def _study_section(ctx: _Context, section_id: str, title: str, folder: Path, table: str, summary: str | None,
                   plot: str | None, intro: str, render: Callable[[dict[str, np.ndarray], dict[str, Any]], str]
                   ) -> _Section | None:
  """A study's section: ``intro``, its plot (``folder/plot``, copied beside the page as
  ``<section_id>.png``) and ``render(table columns, JSON summary)``; None when the study has not run
  here. A table that cannot be read or lacks a column ``render`` needs (a study stopped while
  writing, a file from another version) is left out with a log line: half a table would mislead."""
  path = folder / table
  if not path.is_file():
    return None
  try:
    columns = read_scores_csv(path)
    if not columns or not len(next(iter(columns.values()))):
      raise ValueError("the table has no rows")
    body = render(columns, _read_json(folder / summary) if summary else {})
  except (KeyError, IndexError, TypeError, ValueError, JaxmemError) as e:
    ctx.log(f"report: leaving out {path}: unreadable or incomplete ({type(e).__name__}: {e})")
    return None
  image = _copy_image(ctx, folder / plot, f"{section_id}.png", title) if plot and (folder / plot).is_file() else ""
  return _Section(section_id, title, f"<p>{intro}</p>" + image + body)


def _ci(columns: dict[str, np.ndarray], name: str, row: int, low: str | None = None, high: str | None = None,
        digits: int = 3) -> str:
  """Row ``row`` of a study table's column ``name`` with its interval (columns ``low`` and ``high``,
  by default ``name_ci_low`` and ``name_ci_high``), ``digits`` decimals."""
  value, lo, hi = (float(columns[c][row]) for c in (name, low or name + "_ci_low", high or name + "_ci_high"))
  return f"{_fmt(value, digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]" if np.isfinite(value) else ""


def _exact_memorization_section(ctx: _Context) -> _Section | None:
  """Def. 2 per epoch for a text run recorded with ``--record-epochs`` (the ``exact_memorization``
  estimator's table at the run's top level)."""
  if "exact_memorization" in ctx.stale:
    return None

  def render(t, summary):
    rows = [(int(e), _ci(t, "exact_memorization_in", r), _ci(t, "exact_memorization_out", r))
            for r, e in enumerate(t["epoch"])]
    fig = _figure(6, 3.2)
    ax = fig.add_subplot()
    for side, label in (("in", "own training sequences"), ("out", "sequences not trained on")):
      key = f"exact_memorization_{side}"
      line, = ax.plot(t["epoch"], t[key], marker="o", label=label)
      ax.fill_between(t["epoch"], t[key + "_ci_low"], t[key + "_ci_high"], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("next tokens predicted (arg-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return (ctx.save(fig, "exact_memorization.png", "exact memorization per epoch")
            + _table(("epoch", "own training sequences", "sequences not trained on"), rows))
  return _study_section(
      ctx, "exact_memorization", "Exact memorization per epoch", ctx.run_path, "exact_memorization.csv", None, None,
      "Def. 2 (Tirumala et al. 2022): the fraction of next tokens of a model's training sequences (duplicates "
      "counted) that its arg-max predicts under teacher forcing, after every epoch, against the same fraction on "
      "the sequences it did not train on; mean over models with 95% Student-t intervals.", render)


def _neural_collapse_section(ctx: _Context) -> _Section | None:
  if not ctx.has("nc_distance") or not ctx.has("memorization"):
    return None
  nc, mem = ctx.scores["nc_distance"].astype(float), ctx.scores["memorization"].astype(float)
  noisy = ctx.scores.get("noisy", np.zeros(len(mem))).astype(bool)
  ok = np.isfinite(nc) & np.isfinite(mem)
  fig = _figure(6, 3.4)
  ax = fig.add_subplot()
  ax.scatter(nc[ok & ~noisy], mem[ok & ~noisy], s=4, alpha=0.4, color="#4c72b0", label="clean label")
  if noisy.any():
    ax.scatter(nc[ok & noisy], mem[ok & noisy], s=6, alpha=0.7, color="#dd5555", label="flipped label")
    ax.legend(fontsize=8, markerscale=2)
  ax.set_xlabel("nc_distance: penultimate feature to its label's mean test feature")
  ax.set_ylabel("memorization")
  body = ("<p>Memorization under neural collapse (def. 5, Nguyen et al. 2023): the distance of an example's "
          "penultimate features to the mean feature of unseen test examples of its training label, averaged over "
          "the kept models that trained on it (<code>jaxmem study neural-collapse</code>). The paper's quantity is "
          "its sum over the flipped examples.</p>" + ctx.save(fig, "nc_distance_vs_memorization.png",
                                                               "nc_distance vs memorization"))
  rng = np.random.default_rng(0)  # fixed: the same report for the same scores
  index = np.flatnonzero(ok)
  draws = np.array([spearman(nc[pick], mem[pick]) for pick in rng.choice(index, (200, index.size))]) \
      if index.size > 2 else np.array([np.nan])
  draws = draws[np.isfinite(draws)]
  low, high = np.percentile(draws, [2.5, 97.5]) if draws.size else (np.nan, np.nan)
  rows = [("Spearman of nc_distance with memorization (95% bootstrap over examples)",
           _with_interval(spearman(nc, mem), low, high)), ("examples with both", int(ok.sum()))]
  facts = _read_json(ctx.run_path / "neural_collapse" / "neural_collapse.json")
  for key, label in (("layer", "layer"), ("num_flipped", "flipped labels"),
                     ("nc_distance_flipped_mean", "mean nc_distance, flipped"),
                     ("nc_distance_clean_mean", "mean nc_distance, clean"),
                     ("nc_distance_auroc_flipped", "nc_distance's AUROC for the flipped labels")):
    if facts.get(key) is not None:
      rows.append((label, facts[key]))
  if facts.get("mem_per_corrupted_example_mean") is not None:
    se = facts.get("mem_per_corrupted_example_se")
    rows.append(("def. 5 per flipped example, mean over models",
                 _fmt(facts["mem_per_corrupted_example_mean"]) + (f" ± {_fmt(se)} (se)" if se is not None else "")))
  if facts.get("model_ids") is not None:
    rows.append(("kept models", len(facts["model_ids"])))
  return _Section("neural_collapse", "Neural-collapse memorization", body + _table(None, rows, "facts"))


def _benign_section(ctx: _Context) -> _Section | None:
  def render(t, summary):
    rows = [(t["variant"][r], t["layer"][r], _ci(t, "init_accuracy", r, "init_ci_low", "init_ci_high"),
             _ci(t, "trained_accuracy", r, "trained_ci_low", "trained_ci_high"), _ci(t, "difference", r),
             t["verdict"][r]) for r in range(len(t["layer"]))]
    return (f"<p>{summary.get('num_models', '?')} models, k = {summary.get('k', '?')} neighbours, label noise "
            f"{_fmt(summary.get('label_noise', float('nan')))}; 95% Student-t intervals over models.</p>"
            + _table(("variant", "layer", "probe at init", "probe trained", "trained − init", "verdict"), rows))
  return _study_section(
      ctx, "benign", "Benign vs malign memorization", ctx.run_path / "benign", "benign.csv", "benign.json",
      "benign.png", "Def. 4 (Anagnostidis et al. 2023): a kNN probe on each layer's embeddings, fitted on the "
      "training examples with their clean labels and tested on the test set, after training on the run's labels "
      "and at initialization (<code>jaxmem study benign</code>). Benign: the trained probe beats the one at "
      "initialization (the interval of the difference lies above 0); malign: below; undecided otherwise.", render)


def _layer_rewind_section(ctx: _Context) -> _Section | None:
  def render(t, summary):
    memorized = summary.get("memorized_group", "flipped")
    groups = [g for g in (memorized, "clean", "test") if g in set(t["group"])]
    cells = {(int(e), layer, g): r for r, (e, layer, g) in enumerate(zip(t["rewind_epoch"], t["layer"], t["group"]))}
    variants = list(dict.fromkeys((int(e), layer) for e, layer in zip(t["rewind_epoch"], t["layer"])))
    trained = {g: t["accuracy"][r] for (e, layer, g), r in cells.items() if layer == "none"}
    rows = []
    for epoch, layer in variants:
      found = [cells.get((epoch, layer, g)) for g in groups]
      drop = lambda g: trained.get(g, np.nan) - t["accuracy"][cells[(epoch, layer, g)]] \
          if (epoch, layer, g) in cells else np.nan
      rows.append(["trained" if layer == "none" else layer, "" if layer == "none" else epoch,
                   *(_ci(t, "accuracy", r, "ci_low", "ci_high") if r is not None else "" for r in found),
                   "" if layer == "none" else drop(memorized) - drop("clean")])
    return (f"<p>{summary.get('num_models', '?')} models, {summary.get('num_memorized', '?')} examples in the "
            f"{html.escape(memorized)} group; accuracy with 95% Student-t intervals over models. The last column is "
            f"how much more the {html.escape(memorized)} group loses than the clean one when the layer is rewound: "
            "the layers with the largest values hold the memorization.</p>"
            + _table(("layer", "rewound to epoch", *groups, f"{memorized} drop − clean drop"), rows))
  return _study_section(
      ctx, "layer_rewind", "Where memorization lives: layer rewinding", ctx.run_path / "layer_rewind",
      "layer_rewind.csv", "layer_rewind.json", "layer_rewind.png",
      "Stephenson et al. 2021; Maini et al. 2023: one layer's parameters (kernel and bias) rewound to an earlier "
      "epoch of the same training, accuracy on memorized (flipped-label, judged by the label trained on) vs clean "
      "training examples vs test examples (<code>jaxmem study layer-rewind</code>).", render)


def _privacy_forgetting_section(ctx: _Context) -> _Section | None:
  def render(t, summary):
    tpr = "tpr_at_0.1%_fpr"
    groups = list(dict.fromkeys(t["group"]))
    ks = sorted(set(int(k) for k in t["k"]))
    at = {(g, int(k)): r for r, (g, k) in enumerate(zip(t["group"], t["k"]))}
    decay, k_alpha = summary.get("decay", {}), summary.get("forgetting_k_at_alpha_mean", {})
    first, last = ks[0], ks[-1]
    rows = [(g, _ci(t, "auc", at[(g, first)], "auc_low", "auc_high"), _ci(t, "auc", at[(g, last)], "auc_low", "auc_high"),
             _ci(t, tpr, at[(g, first)], tpr + "_low", tpr + "_high"), _ci(t, tpr, at[(g, last)], tpr + "_low", tpr + "_high"),
             (f"{_fmt(decay[g]['rate'])} ± {_fmt(decay[g]['se'])}" if g in decay else ""), k_alpha.get(g, float("nan")))
            for g in groups]
    alpha = summary.get("alpha", "α")
    body = (f"<p>{summary.get('num_models', '?')} models, {summary.get('inject', '?')} injected examples (half of them "
            f"repeated {summary.get('repeats', '?')} times per epoch, selection {summary.get('selection', '?')}), "
            f"{summary.get('first_epochs', '?')} epochs with them, then {summary.get('second_epochs', '?')} without; "
            f"attack: {html.escape(str(summary.get('attack', 'LiRA')))}. 95% bootstrap intervals over examples; the "
            "decay rate is that of the mean in−out margin gap (± its standard error).</p>"
            + _table(("group", f"AUC at k={first}", f"AUC at k={last}", f"TPR@0.1%FPR at k={first}",
                      f"TPR@0.1%FPR at k={last}", "decay rate per epoch", f"mean first k with advantage < {alpha}"),
                     rows)
            + "<h3>Attack AUC at every k</h3>"
            + _table(("group", *(f"k={k}" for k in ks)),
                     [(g, *(_ci(t, "auc", at[(g, k)], "auc_low", "auc_high") if (g, k) in at else "" for k in ks))
                      for g in groups]))
    return body
  return _study_section(
      ctx, "privacy_forgetting", "Privacy forgetting", ctx.run_path / "privacy_forgetting", "forgetting_curve.csv",
      "privacy_forgetting.json", "privacy_forgetting.png",
      "(A, α, k)-forgetting (def. 11, Jagielski et al. 2023): a membership attack on an injected set k epochs after "
      "it was last trained on (<code>jaxmem study privacy-forgetting</code>), per group: seen once (r=1) or "
      "repeated (r&gt;1) per epoch, and by the run's memorization.", render)


def _sweep_section(ctx: _Context) -> _Section | None:
  """The comparison of the sweep this run is a variant of (its parent folder holds ``sweep.csv``
  and names this run's folder among the variants)."""
  folder = ctx.run_path.parent
  if not (folder / "sweep.csv").is_file():
    return None
  this = ctx.run_path.name

  def render(t, summary):
    if this not in set(t["variant"]):
      raise JaxmemError(f"the sweep there does not list {this!r} among its variants")
    headers = {"test_accuracy": "test accuracy", "mean_memorization": "mean memorization",
               "num_memorization_over_0.5": "examples with memorization > 0.5", "flipped_auroc": "flipped-label AUROC"}
    metrics = [m for m in headers if m in t]
    rows = [(("▶ " if v == this else "") + v, int(t["num_models"][r]),
             *(_ci(t, m, r, digits=0 if m.startswith("num_") else 3) for m in metrics))
            for r, v in enumerate(t["variant"])]
    body = _table(("variant", "models", *(headers[m] for m in metrics)), rows)
    pairs = summary.get("spearman_memorization", {}).get("pairs", [])
    if pairs:
      body += ("<h3>Rank correlation of memorization between variants</h3>"
               + _table(("variant", "variant", "Spearman"), [(p["a"], p["b"], _with_interval(
                   p["spearman"], p["ci_low"], p["ci_high"])) for p in pairs]))
    return body
  return _study_section(
      ctx, "sweep", "Sweep over training settings", folder, "sweep.csv", "sweep.json", "sweep.png",
      f"This run (▶) is one variant of a sweep (<code>jaxmem study sweep</code>, {html.escape(str(folder))}): the "
      "same recipe with the fields varied. Test accuracy with a Student-t interval over models; memorization "
      "metrics with a percentile bootstrap over models; the Spearman correlations with a bootstrap over "
      "examples; all 95%.", render)


def _correlation_section(ctx: _Context) -> _Section | None:
  path = ctx.run_path / "correlations.csv"
  if path.is_file():
    try:
      with open(path, newline="") as f:
        rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error):  # was a traceback that lost the whole report
      return _Section("correlations", "Score correlations",
                      f"<p>The run's <code>correlations.csv</code> is damaged: rerun <code>jaxmem scores "
                      f"{ctx.run_path}</code> to write it again.</p>")
    if len(rows) < 2:
      return None
    if ctx.is_text:  # a label-noise column has no meaning without labels
      keep = [j for j, name in enumerate(rows[0]) if name != "auroc_flipped"]
      rows = [[row[j] for j in keep if j < len(row)] for row in rows]
    body_rows = [[_number_or_text(cell) for cell in row] for row in rows[1:]]
    return _Section("correlations", "Score correlations",
                    "<p>From the run's <code>correlations.csv</code>.</p>" + _table(rows[0], body_rows))
  present = [c for c in SCORE_COLUMNS if ctx.has(c)]
  if len(present) < 2:
    return None
  from jaxmem.scores._stats import spearman
  rows = [[a] + [spearman(ctx.scores[a], ctx.scores[b]) for b in present] for a in present]
  return _Section("correlations", "Score correlations",
                  "<p>Spearman rank correlations between the per-example scores in <code>scores.csv</code> "
                  "(pairwise complete examples), computed for this report.</p>" + _table(["", *present], rows))


def _number_or_text(cell: str):
  try:
    return float(cell)
  except ValueError:
    return cell


# ---------------------------------------------------------------------------------------------
# The page.

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:0.2em} h2{border-bottom:1px solid #ccc;padding-bottom:0.2em;margin-top:2em}
nav a{margin-right:1em} img{max-width:100%;height:auto;display:block;margin:0.8em 0}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em} td,th{border:1px solid #ddd;padding:0.25em 0.6em;text-align:right}
table.facts td{text-align:left} table.facts td:first-child{font-weight:600;white-space:nowrap}
th{background:#f4f4f4} code{background:#f4f4f4;padding:0 0.2em}
p.warning{background:#fff4e5;border-left:4px solid #e69500;padding:0.5em 0.8em}
"""


def _page(manifest: dict[str, Any], sections: list[_Section]) -> str:
  ds = manifest.get("dataset", {}).get("name", "?")
  title = f"jaxmem report: {ds}, {manifest.get('config', {}).get('num_models', '?')} models"
  nav = " ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
  parts = [f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>{s.body}</section>' for s in sections]
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
          f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
          f'<body><h1>{html.escape(title)}</h1><nav>{nav}</nav>\n' + "\n".join(parts) + "\n</body></html>\n")
