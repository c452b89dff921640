"""``run``: the one library function behind ``jaxmem run`` — data, masks, engine, records, scores.

A rerun of the same config on the same directory resumes: complete chunks are kept (verified by
checksum) and only missing or corrupt ones are trained.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxmem.config import RunConfig
from jaxmem.data import Dataset, load_dataset
from jaxmem.errors import JaxmemError
from jaxmem.masks import make_masks
from jaxmem.scores import auroc
from jaxmem.scoring import ScoreTable, score_records, write_scores
from jaxmem.store import FORMAT_VERSION, Records, RunDir, utc_now, write_json_atomic


@dataclasses.dataclass
class RunResult:
  run_dir: Path
  config: RunConfig
  records: Records
  scores: ScoreTable
  summary: dict[str, Any]
  trained_chunks: list[int]
  skipped_chunks: list[int]


def plan_chunks(num_models: int, num_ratios: int, chunk_size: int) -> list[list[int]]:
  """Groups model ids into chunks of one subset ratio each (so a chunk has one step count), and
  orders chunks round-robin over ratios so an unfinished run already covers every ratio."""
  blocks = [list(range(r, num_models, num_ratios)) for r in range(num_ratios)]
  per_block = [[b[i: i + chunk_size] for i in range(0, len(b), chunk_size)] for b in blocks]
  chunks = []
  for position in range(max(len(p) for p in per_block)):
    chunks.extend(p[position] for p in per_block if position < len(p))
  return chunks


def versions() -> dict[str, str]:
  import flax
  import jax
  import optax
  from jaxmem import __version__
  return {"jaxmem": __version__, "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "numpy": np.__version__, "python": sys.version.split()[0], "platform": platform.platform()}


def check_config_against_dataset(config: RunConfig, dataset: Dataset) -> None:
  smallest = int(round(min(config.subset_ratios) * dataset.num_train))
  if config.mask_design == "balanced":
    smallest = dataset.num_train // 2
  if smallest < 1:
    raise JaxmemError(f"subset ratio {min(config.subset_ratios)} of {dataset.num_train} training examples is empty")
  if config.batch_size > smallest:
    raise JaxmemError(f"batch_size {config.batch_size} is larger than the smallest training subset "
                      f"({smallest} examples); use --batch-size <= {smallest}")
  if config.queries > 1 and not dataset.is_image:
    raise JaxmemError(f"queries {config.queries} (flips and shifts) need image data; dataset "
                      f"{dataset.name!r} has inputs of shape {dataset.input_shape}: use --queries 1")


def build_manifest(config: RunConfig, dataset: Dataset, chunks: list[list[int]]) -> dict[str, Any]:
  return {
      "format": "jaxmem-run", "format_version": FORMAT_VERSION, "config": config.to_dict(),
      "identity": config.identity(),
      "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint, "num_train": dataset.num_train,
                  "num_test": dataset.num_test, "num_classes": dataset.num_classes,
                  "input_shape": list(dataset.input_shape)},
      "chunks": chunks, "versions": versions(), "created": utc_now()}


def run(config: RunConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
        log: Callable[[str], None] = print, devices: Sequence[Any] | None = None,
        dataset: Dataset | None = None, estimators: Sequence[str] | None = None) -> RunResult:
  """Train ``config.num_models`` subset models (resuming what ``out`` already holds), record
  their predictions, score them and write ``scores.csv`` and ``summary.json`` into ``out``."""
  config.validate()
  start = time.perf_counter()
  if dataset is None:
    dataset = load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed,
                           label_noise=config.label_noise)
  check_config_against_dataset(config, dataset)
  keep_MxN, ratio_M = make_masks(config.mask_design, config.num_models, dataset.num_train,
                                 config.subset_ratios, config.seed)
  chunks = plan_chunks(config.num_models, len(config.subset_ratios), config.chunk_size)
  run_dir = RunDir.create_or_open(out, build_manifest(config, dataset, chunks), overwrite=overwrite)
  run_dir.write_design({
      "keep": keep_MxN, "subset_ratio": ratio_M, "train_labels": dataset.y_train,
      "clean_train_labels": dataset.clean_y_train, "test_labels": dataset.y_test, "noisy": dataset.noisy})

  status = {c: run_dir.chunk_status(c) for c in range(len(chunks))}
  for c, s in status.items():
    if s == "corrupt":
      log(f"chunk {c} in {run_dir.path} failed its checksum; training it again")
  todo = [c for c, s in status.items() if s != "complete"]
  skipped = [c for c, s in status.items() if s == "complete"]
  if skipped:
    log(f"resuming {run_dir.path}: {len(skipped)} of {len(chunks)} chunks already complete")

  if todo:
    from jaxmem.engine import Engine  # imported here: scoring an existing run needs no engine
    engine = Engine(dataset, config, devices=devices, log=log)
    _train_chunks(engine, run_dir, chunks, todo, keep_MxN, progress=progress,
                  done_models=sum(len(chunks[c]) for c in skipped))
    run_dir.update_manifest(strategy=str(engine.strategy), probe_seconds=engine.probe_seconds,
                            devices=[str(d) for d in engine.devices])

  records = run_dir.load_records()
  table = score_records(records, estimators)
  write_scores(run_dir, table)
  summary = summarize(records, table, dataset=dataset, seconds=time.perf_counter() - start,
                      trained=len(todo), skipped=len(skipped))
  summary["files"] = {"run_dir": str(run_dir.path), "scores": str(run_dir.path / "scores.csv"),
                      "summary": str(run_dir.path / "summary.json")}
  write_json_atomic(run_dir.path / "summary.json", summary)
  return RunResult(run_dir.path, config, records, table, summary, todo, skipped)


def _train_chunks(engine, run_dir: RunDir, chunks, todo, keep_MxN, *, progress: bool, done_models: int) -> None:
  from tqdm.auto import tqdm
  total = sum(len(c) for c in chunks)
  epochs = engine.config.epochs
  # A few host calls per chunk give a live progress bar; results do not depend on this split.
  per_call = max(d for d in range(1, epochs + 1) if epochs % d == 0 and d <= max(1, -(-epochs // 4)))
  with tqdm(total=total, initial=done_models, unit="model", disable=not progress, dynamic_ncols=True,
            desc="training", smoothing=0.3,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} models [{elapsed}<{remaining}, {rate_fmt}]") as bar:
    for c in todo:
      ids = chunks[c]
      credited = [0.0]

      def on_progress(epochs_done: int, ids=ids, credited=credited):
        target = len(ids) * epochs_done / epochs
        bar.update(target - credited[0])
        credited[0] = target

      records = engine.train_chunk(ids, keep_MxN[ids], epochs_per_call=per_call, on_progress=on_progress)
      run_dir.write_chunk(c, records)


def subset_accuracies(records: Records) -> dict[str, float]:
  """Mean accuracy of the subset models on their own subset, on held-out training examples, and
  on the test set (averaged over models)."""
  correct, keep = records["train_correct"], records.keep
  own = (correct & keep).sum(1) / np.maximum(keep.sum(1), 1)
  held_out = (correct & ~keep).sum(1) / np.maximum((~keep).sum(1), 1)
  return {"train_subset": float(own.mean()), "train_held_out": float(held_out.mean()),
          "test": float(records["test_correct"].mean())}


def summarize(records: Records, table: ScoreTable, *, dataset: Dataset | None = None, seconds: float = 0.0,
              trained: int = 0, skipped: int = 0, top: int = 10) -> dict[str, Any]:
  summary: dict[str, Any] = {
      "models": {"finished": records.num_models, "planned": records.num_models_planned},
      "chunks": {"trained_now": trained, "already_complete": skipped},
      "seconds": round(seconds, 2), "accuracy": subset_accuracies(records), "scores": table.summary}
  if "memorization" in table.columns:
    mem, se = table.columns["memorization"], table.columns["memorization_se"]
    order = np.argsort(-np.nan_to_num(mem, nan=-np.inf), kind="stable")[:top]
    summary["most_memorized"] = [
        {"index": int(i), "label": int(records.train_labels[i]), "noisy": bool(records.noisy[i]),
         "memorization": float(mem[i]), "memorization_se": float(se[i])} for i in order]
    summary["memorization_median_se"] = float(np.nanmedian(se))
    if records.noisy.any():
      summary["noisy_label_auroc"] = auroc(mem, records.noisy)
  if dataset is not None:
    summary["dataset"] = {"name": dataset.name, "num_train": dataset.num_train, "num_test": dataset.num_test,
                          "num_classes": dataset.num_classes, "flipped_labels": int(dataset.noisy.sum())}
  summary["lines"] = table.lines
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """The human summary printed at the end of ``jaxmem run``."""
  acc = summary["accuracy"]
  lines = [
      f"models: {summary['models']['finished']} of {summary['models']['planned']} finished "
      f"({summary['chunks']['trained_now']} chunks trained now, {summary['chunks']['already_complete']} resumed) "
      f"in {summary['seconds']:.1f}s",
      f"accuracy of the subset models: own subset {acc['train_subset']:.3f}, held-out training examples "
      f"{acc['train_held_out']:.3f}, test {acc['test']:.3f}"]
  if "memorization_median_se" in summary:
    lines.append(f"memorization: median standard error {summary['memorization_median_se']:.3f}")
  if "noisy_label_auroc" in summary:
    lines.append(f"flipped labels found by memorization: AUROC {summary['noisy_label_auroc']:.3f} "
                 f"({summary['dataset']['flipped_labels']} flipped)")
  lines.extend(summary.get("lines", []))
  if summary.get("most_memorized"):
    lines.append("most memorized training examples:")
    lines.append("  index  label  noisy  memorization")
    for row in summary["most_memorized"]:
      lines.append(f"  {row['index']:5d}  {row['label']:5d}  {'yes' if row['noisy'] else 'no':>5}  "
                   f"{row['memorization']:.3f} ± {row['memorization_se']:.3f}")
  files = summary.get("files", {})
  if files:
    lines.append(f"files: {files['scores']} (scores), {files['summary']} (summary), run directory {files['run_dir']}")
  return "\n".join(lines)
