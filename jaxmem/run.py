"""``run``: the one library function behind ``jaxmem run`` — data, masks, engine, records, scores.

A rerun of the same config on the same directory resumes: complete chunks are kept (verified by
checksum) and only missing or corrupt ones are trained.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxmem.config import RunConfig
from jaxmem.data import Dataset, load_dataset
from jaxmem.errors import JaxmemError
from jaxmem.lock import RunLock
from jaxmem.masks import make_masks
from jaxmem.models import TEXT_MODELS
from jaxmem.scores import auroc
from jaxmem.scores._stats import block_size_for_budget
from jaxmem.scoring import ScoreTable, score_records, write_scores
from jaxmem.records import (ChunkCheckpoint, FORMAT_VERSION, Records, RunDir, append_event, atomic_path,
                            identity_differences, save_params, utc_now, write_bytes_atomic, write_json_atomic)
from jaxmem.signals import StopRequest, stop_on_signals, training_phase  # noqa: F401 (stop_on_signals: re-exported)


@dataclasses.dataclass
class RunResult:
  run_dir: Path
  config: RunConfig
  records: Records | None  # None in processes other than 0 of a multi-process run (they do not score)
  scores: ScoreTable | None
  summary: dict[str, Any]
  trained_chunks: list[int]
  skipped_chunks: list[int]


class RunInterrupted(JaxmemError):
  """Training stopped on a signal after saving the chunk in progress; rerun the same command."""

  def __init__(self, message: str, *, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


def _process_layout() -> tuple[int, int]:
  """(this process's index, number of processes): (0, 1) unless jax.distributed was initialized."""
  import jax
  return jax.process_index(), jax.process_count()


def _wait_for_chunks(run_dir: "RunDir", num_chunks: int, *, log: Callable[[str], None],
                     should_stop: Callable[[], bool] | None, poll_seconds: float = 1.0) -> None:
  """Process 0 of a multi-process run waits until the other processes' chunks are complete (they
  share the run directory); a stop request ends the wait and the scores use what is complete."""
  told = False
  while True:
    missing = [c for c in range(num_chunks) if run_dir.chunk_status(c) != "complete"]
    if not missing or (should_stop is not None and should_stop()):
      return
    if not told:
      log(f"waiting for {len(missing)} chunks of the other processes")
      told = True
    time.sleep(poll_seconds)


def parse_shard(text: str) -> tuple[int, int]:
  """``'i/k'`` -> (i, k) with 0 <= i < k: this process trains the chunks c with c % k == i."""
  try:
    i, k = (int(t) for t in text.split("/"))
  except ValueError:
    i, k = -1, 0
  if not 0 <= i < k:
    raise JaxmemError(f"shard must be I/K with 0 <= I < K (e.g. 0/4), got {text!r}")
  return i, k


def shard_of(chunk: int, num_shards: int) -> int:
  """Chunks are dealt round-robin: chunk c belongs to shard c mod k (the plan orders chunks
  round-robin over subset ratios, so every shard gets every ratio)."""
  return chunk % num_shards


def missing_chunks_line(run_dir: RunDir, num_shards: int | None = None) -> str | None:
  """One line naming the chunks that are not complete (and their shards), or None."""
  plan = run_dir.chunk_plan()
  missing = [c for c in range(len(plan)) if run_dir.chunk_status(c) != "complete"]
  if not missing:
    return None
  models = sum(len(plan[c]) for c in missing)
  shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
  line = f"{len(missing)} of {len(plan)} chunks ({models} models) are not complete yet: chunks {shown}"
  if num_shards:
    shards = sorted({shard_of(c, num_shards) for c in missing})
    line += f" (shards {', '.join(f'{s}/{num_shards}' for s in shards)})"
  return line


def plan_chunks(num_models: int, num_ratios: int, chunk_size: int, first_model: int = 0) -> list[list[int]]:
  """Groups model ids ``first_model .. num_models - 1`` into chunks of one subset ratio each (so a
  chunk has one step count), and orders chunks round-robin over ratios so an unfinished run
  already covers every ratio."""
  blocks = [[m for m in range(first_model, num_models) if m % num_ratios == r] for r in range(num_ratios)]
  blocks = [b for b in blocks if b]
  if not blocks:
    return []
  per_block = [[b[i: i + chunk_size] for i in range(0, len(b), chunk_size)] for b in blocks]
  chunks = []
  for position in range(max(len(p) for p in per_block)):
    chunks.extend(p[position] for p in per_block if position < len(p))
  return chunks


def grow_chunk_plan(plan: list[list[int]], old_num_models: int, num_models: int, num_ratios: int,
                    chunk_size: int) -> list[list[int]]:
  """A grown run's chunk plan: the old chunks unchanged (their files stay valid), then chunks of
  the new models ``old_num_models .. num_models - 1`` planned like a fresh run's. Model m's result
  does not depend on its chunk (every chunk is padded to one program size), so the grown run's
  records equal a fresh run's with ``num_models`` models."""
  return [list(c) for c in plan] + plan_chunks(num_models, num_ratios, chunk_size, first_model=old_num_models)


def _previous_run(out: str | Path, manifest: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
  """The manifest of the same run (same identity) already in ``out``, or None."""
  existing_dir = RunDir(out)
  if overwrite or not existing_dir.manifest_path.is_file():
    return None
  existing = existing_dir.manifest()
  if identity_differences(existing, manifest):
    return None  # RunDir.create_or_open refuses it with the differences
  return existing


def versions() -> dict[str, str]:
  import flax
  import jax
  import optax
  from jaxmem import __version__
  return {"jaxmem": __version__, "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "numpy": np.__version__, "python": sys.version.split()[0], "platform": platform.platform()}


def epoch_record_estimate(config: RunConfig, num_train: int, *, text: bool = False) -> str:
  """What ``record_epochs`` costs: bit-packed correctness on disk (M x E x ceil(N/8) bytes), the
  bool array ``load_records`` unpacks (M x E x N bytes), and per-epoch margins (4 bytes each); for
  a text run float32 token accuracies (and with ``record_epoch_margin`` log-likelihoods)."""
  m, e, n = config.num_models, config.epochs, num_train
  mib = lambda b: f"{b / 2**20:,.1f} MiB"
  if text:
    per_record = 4 * m * e * n
    return (f"per-epoch records: {m} models x {e} epochs x {n} sequences: token accuracy {mib(per_record)}"
            + (f", log-likelihood {mib(per_record)}" if config.record_epoch_margin else "")
            + " on disk and in memory")
  text = (f"per-epoch records: {m} models x {e} epochs x {n} examples: correctness {mib(m * e * -(-n // 8))} "
          f"on disk (bit-packed), {mib(m * e * n)} in memory when loaded; "
          f"{mib(config.chunk_size * e * n)} per chunk on the device")
  if config.record_epoch_margin:
    text += f"; margins {mib(4 * m * e * n)} on disk and in memory"
  return text


def check_config_against_dataset(config: RunConfig, dataset: Dataset) -> None:
  smallest = int(round(min(config.subset_ratios) * dataset.num_train))
  if config.mask_design == "balanced":
    smallest = dataset.num_train // 2
  if smallest < 1:
    raise JaxmemError(f"subset ratio {min(config.subset_ratios)} of {dataset.num_train} training examples is empty")
  if config.batch_size > smallest:
    raise JaxmemError(f"batch_size {config.batch_size} is larger than the smallest training subset "
                      f"({smallest} examples); use --batch-size <= {smallest}")
  mask_bytes = config.num_models * dataset.num_train  # keep (M, N) bool, held whole on the host
  memory = _host_memory_bytes()
  if memory and mask_bytes > memory // 2:
    raise JaxmemError(f"num_models {config.num_models} x {dataset.num_train} training examples needs a "
                      f"{mask_bytes / 2**30:.1f} GiB membership mask, more than half of this machine's "
                      f"{memory / 2**30:.0f} GiB; use fewer models (or --shard the run over machines)")
  if dataset.is_text != (config.model in TEXT_MODELS):
    raise JaxmemError(f"model {config.model!r} cannot train on dataset {dataset.name!r}: text datasets need "
                      f"--model {' or '.join(TEXT_MODELS)}, which trains on text only")
  if dataset.is_text:
    for field, off in (("score_epoch", None), ("augment", False), ("label_noise", 0.0), ("target_se", None)):
      if getattr(config, field) != off:
        raise JaxmemError(f"{field} is for classification; text dataset {dataset.name!r} needs {field}={off!r}")
  check_model_builds(config, dataset)
  if config.augment and not dataset.is_image:
    raise JaxmemError(f"--augment (random flips and crops) needs image data; dataset {dataset.name!r} has inputs "
                      f"of shape {dataset.input_shape}: drop --augment")
  if config.queries > 1 and not dataset.is_image:
    raise JaxmemError(f"queries {config.queries} (flips and shifts) need image data; dataset "
                      f"{dataset.name!r} has inputs of shape {dataset.input_shape}: use --queries 1")


def _host_memory_bytes() -> int | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def check_model_builds(config: RunConfig, dataset: Dataset) -> None:
  """Builds the model and its parameter shapes for one example (``jax.eval_shape``: nothing is
  computed or allocated) before anything is written: bad model options (e.g. ``hidden_sizes``
  given as a string) fail here in one line, not inside the first training step after the run
  directory exists."""
  import jax
  from jaxmem.models import build_model
  model = build_model(config.model, dataset.num_classes, config.model_options, dtype=config.compute_dtype)
  x = jax.ShapeDtypeStruct((1, *dataset.input_shape), np.float32)
  try:
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  except Exception as e:  # flax and JAX raise TypeError, ValueError, ScopeParamShapeError, ...
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise JaxmemError(f"model {config.model!r} with options {config.model_options!r} cannot be built for inputs of "
                      f"shape {dataset.input_shape}: {first}") from None


def build_manifest(config: RunConfig, dataset: Dataset, chunks: list[list[int]]) -> dict[str, Any]:
  return {
      "format": "jaxmem-run", "format_version": FORMAT_VERSION, "config": config.to_dict(),
      "identity": config.identity(),
      "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint, "num_train": dataset.num_train,
                  "num_test": dataset.num_test, "num_classes": dataset.num_classes,
                  "input_shape": list(dataset.input_shape),
                  **({"text": dataset.describe()} if dataset.is_text else {})},
      "chunks": chunks, "versions": versions(), "created": utc_now()}


def run(config: RunConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
        log: Callable[[str], None] = print, devices: Sequence[Any] | None = None,
        dataset: Dataset | None = None, estimators: Sequence[str] | None = None,
        shard: tuple[int, int] | None = None, should_stop: Callable[[], bool] | None = None,
        score_options: dict[str, dict[str, Any]] | None = None) -> RunResult:
  """Train ``config.num_models`` subset models (resuming what ``out`` already holds), record
  their predictions, score them and write ``scores.csv`` and ``summary.json`` into ``out``.

  ``shard=(i, k)`` trains only the chunks c with c % k == i (job arrays sharing ``out``; scores
  then cover whatever is complete, see :func:`merge`). ``should_stop`` (e.g. a
  :class:`StopRequest`) is polled between host calls: the chunk in progress is checkpointed and
  :class:`RunInterrupted` raised. A chunk interrupted before (signal or kill) resumes from its last
  checkpoint, bitwise as if never interrupted. ``out`` is locked while the run holds it (see
  :class:`jaxmem.lock.RunLock`): a second run on it raises a :class:`JaxmemError` naming the holder.
  """
  process, num_processes = _process_layout()
  # One writer per directory (a shard per shard): a second run on it is refused in one line.
  with RunLock(out, shard=(process, num_processes) if num_processes > 1 else shard, log=log):
    return _run(config, out, overwrite=overwrite, progress=progress, log=log, devices=devices, dataset=dataset,
                estimators=estimators, shard=shard, should_stop=should_stop, score_options=score_options)


def _run(config: RunConfig, out: str | Path, *, overwrite: bool, progress: bool, log: Callable[[str], None],
         devices: Sequence[Any] | None, dataset: Dataset | None, estimators: Sequence[str] | None,
         shard: tuple[int, int] | None, should_stop: Callable[[], bool] | None,
         score_options: dict[str, dict[str, Any]] | None) -> RunResult:
  config.validate()
  start = time.perf_counter()
  process, num_processes = _process_layout()
  if num_processes > 1:
    # Models never communicate, so a multi-process run (after jax.distributed.initialize) needs no
    # global mesh: each process trains the chunks c with c % P == its index on its own devices and
    # writes only those chunks; process 0 waits for the others' chunks and writes the scores.
    if shard is not None:
      raise JaxmemError("--shard splits a run over independent jobs, and a multi-process run already splits "
                        "its chunks over processes: use one or the other")
    import jax
    shard = (process, num_processes)
    devices = devices if devices is not None else jax.local_devices()
  if dataset is None:
    dataset = load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed,
                           label_noise=config.label_noise)
  check_config_against_dataset(config, dataset)
  keep_MxN, ratio_M = make_masks(config.mask_design, config.num_models, dataset.num_train,
                                 config.subset_ratios, config.seed)
  chunks = plan_chunks(config.num_models, len(config.subset_ratios), config.chunk_size)
  previous = _previous_run(out, build_manifest(config, dataset, chunks), overwrite)
  if previous is not None:
    old_num_models, old_chunks = int(previous["config"]["num_models"]), previous["chunks"]
    if config.num_models < old_num_models:
      raise JaxmemError(f"run directory {str(out)!r} holds {old_num_models} models; --num-models "
                        f"{config.num_models} would shrink it (runs only grow): use --num-models >= "
                        f"{old_num_models}, or score a subset of models another way")
    chunks = grow_chunk_plan(old_chunks, old_num_models, config.num_models, len(config.subset_ratios),
                             config.chunk_size)
    if config.num_models > old_num_models:
      log(f"growing {out}: {old_num_models} -> {config.num_models} models "
          f"({len(chunks) - len(old_chunks)} new chunks)")
  run_dir = RunDir.create_or_open(out, build_manifest(config, dataset, chunks), overwrite=overwrite, log=log)
  run_dir.write_design({
      "keep": keep_MxN, "subset_ratio": ratio_M, "train_labels": dataset.y_train,
      "clean_train_labels": dataset.clean_y_train, "test_labels": dataset.y_test, "noisy": dataset.noisy,
      **(dataset.example_info() if dataset.is_text else {})})

  status = {c: run_dir.chunk_status(c) for c in range(len(chunks))}
  for c, s in status.items():
    if s == "corrupt":
      log(f"chunk {c} in {run_dir.path} failed its checksum; training it again")
  todo = [c for c, s in status.items() if s != "complete"]
  skipped = [c for c, s in status.items() if s == "complete"]
  if skipped:
    log(f"resuming {run_dir.path}: {len(skipped)} of {len(chunks)} chunks already complete")
  if shard is not None:
    todo = [c for c in todo if shard_of(c, shard[1]) == shard[0]]

  target = _target_se_rule(config, run_dir, skipped, log) if todo else None
  if target is not None and target.reached():
    todo = []
  if todo and config.record_epochs:
    log(epoch_record_estimate(config, dataset.num_train, text=dataset.is_text))
  compiles: dict[str, int] = {}
  if todo:
    from jaxmem.engine import Engine  # imported here: scoring an existing run needs no engine
    started_with = (previous or {}).get("strategy")
    if config.strategy == "auto" and started_with:
      # A resumed or grown run keeps the strategy it started with, so its chunks are bitwise the same.
      config = config.replace(strategy=started_with)
    # Every chunk runs in one program of chunk_size models (short chunks padded): one compile, and
    # model m's result is the same in whichever chunk it lands, so a grown run equals a fresh one.
    # Member lists padded to the largest subset: one program serves every subset ratio.
    copies_N = np.asarray(dataset.copies) if dataset.is_text else 1  # a model trains on every copy of a sequence
    engine = Engine(dataset, config, devices=devices, log=log, chunk_models=config.chunk_size,
                    max_members=int((keep_MxN * copies_N).sum(axis=1).max()))
    run_dir.update_manifest(strategy=str(engine.resolve_strategy(keep_MxN[chunks[todo[0]]])),
                            probe_seconds=engine.probe_seconds, devices=[str(d) for d in engine.devices])
    with training_phase(should_stop):
      _train_chunks(engine, run_dir, chunks, todo, keep_MxN, progress=progress,
                    done_models=sum(len(chunks[c]) for c in skipped), should_stop=should_stop,
                    after_chunk=None if target is None else (lambda c, r: target.add(r["keep"], r["train_correct"])))
    # Programs compiled by this process (the probe's candidates included): the training program
    # should be compiled once per strategy, whatever the ratios, chunks and epoch segments.
    compiles = {name: n for name, n in engine.compile_counts().items() if n}
    append_event(run_dir, event="compiles", **compiles)
    if isinstance(should_stop, StopRequest) and should_stop():  # the signal came after the last poll
      name = should_stop.signal_name
      raise RunInterrupted(f"interrupted by {name} after training: all chunks are saved, scores not written",
                           exit_code=128 + int(signal.Signals[name]) if name in signal.Signals.__members__ else 130)
    if target is not None and target.reached():
      todo = [c for c in todo if run_dir.chunk_status(c) == "complete"]
      log(f"--target-se {target.target:g} reached: median memorization standard error {target.median_se:.4f} "
          f"with {target.num_models} models; stopped adding chunks (rerun with a smaller target or none to add more)")

  if num_processes > 1 and process != 0:
    # Only process 0 reads the records and runs the estimators: the others would throw it away.
    log(f"process {process} of {num_processes}: its chunks are done; process 0 writes the scores")
    summary = {"process": {"index": process, "count": num_processes}, "compiles": compiles,
               "chunks": {"trained_now": len(todo), "already_complete": len(skipped)},
               "seconds": round(time.perf_counter() - start, 2)}
    return RunResult(run_dir.path, config, None, None, summary, todo, skipped)
  elif num_processes > 1:
    _wait_for_chunks(run_dir, len(chunks), log=log, should_stop=should_stop)
  missing = missing_chunks_line(run_dir, shard[1] if shard else None) if process == 0 else None
  if missing:
    log(f"{missing}; scores use the complete ones (`jaxmem merge {run_dir.path}` once all shards finished)")
  records = run_dir.load_records()
  options = {"uncertainty": {"target_se": config.target_se, "seed": config.seed}}
  for name, values in (score_options or {}).items():
    options[name] = {**options.get(name, {}), **values}
  append_event(run_dir, event="scoring", process=process, models=records.num_models)
  table = score_records(records, estimators, options)
  summary = summarize(records, table, dataset=dataset, seconds=time.perf_counter() - start,
                      trained=len(todo), skipped=len(skipped))
  summary["files"] = output_files(run_dir.path)
  summary["process"] = {"index": process, "count": num_processes}
  summary["compiles"] = compiles
  if process == 0:  # in a multi-process run only process 0 writes shared files
    write_scores(run_dir, table)
    write_json_atomic(run_dir.path / "summary.json", summary)
  return RunResult(run_dir.path, config, records, table, summary, todo, skipped)


def merge(run_dir: str | Path, sources: Sequence[str | Path] = (), *, estimators: str | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
  """Gathers a run's chunks and scores whatever is complete, saying what is missing.

  Job-array shards writing into one shared run directory need nothing copied; ``sources`` are
  other directories of the same run (same identity, dataset and chunk plan, e.g. shards that ran
  without a shared filesystem) whose complete, checksum-verified chunks are copied in atomically.
  Writes ``scores.csv`` and ``summary.json`` and returns the summary.
  """
  from jaxmem.scoring import parse_estimator_names, score_run
  names = parse_estimator_names(estimators)  # before anything is copied: an unknown name changes nothing
  run = RunDir.open(run_dir)
  for source in sources:
    other = RunDir.open(source)
    differences = identity_differences(other.manifest(), run.manifest())
    if other.chunk_plan() != run.chunk_plan():
      differences.append("chunk plan differs")
    if differences:
      raise JaxmemError(f"{str(source)!r} holds another run ({'; '.join(differences)}); cannot merge it into "
                        f"{str(run.path)!r}")
    copied = [c for c in other.completed_chunks() if run.chunk_status(c) != "complete"]
    for c in copied:
      with atomic_path(run.chunk_path(c)) as tmp:  # copied by the OS, not through memory
        shutil.copyfile(other.chunk_path(c), tmp)
      write_bytes_atomic(run.chunk_path(c).with_suffix(".json"), other.chunk_path(c).with_suffix(".json").read_bytes())
    log(f"merged {len(copied)} chunks from {source}")
  for c in range(len(run.chunk_plan())):
    if run.chunk_status(c) == "corrupt":
      log(f"chunk {c} in {run.path} failed its checksum; left out (rerun `jaxmem run` to train it again)")
  missing = missing_chunks_line(run)
  log(f"{missing}; scoring the complete ones" if missing else
      f"all {len(run.chunk_plan())} chunks of {run.path} are complete")
  table, records = score_run(run.path, names)
  summary = summarize(records, table)
  summary["files"] = output_files(run.path)
  write_json_atomic(run.path / "summary.json", summary)
  return summary


def kept_param_ids(keep_params: str, num_models: int) -> set[int]:
  """Model ids whose final parameters ``keep_params`` keeps: none, all, or the first N ids (model
  ids interleave subset ratios, so the first N cover every ratio)."""
  if keep_params == "none":
    return set()
  if keep_params == "all":
    return set(range(num_models))
  return set(range(min(int(keep_params), num_models)))


def _target_se_rule(config: RunConfig, run_dir: RunDir, complete: list[int], log):
  """``--target-se``: a stopping rule primed with the chunks already complete (None without one)."""
  if config.target_se is None:
    return None
  from jaxmem.scores.uncertainty import TargetSE
  rule = TargetSE(config.target_se)
  for c in complete:
    chunk = run_dir.read_chunk(c)
    rule.add(chunk["keep"], chunk["train_correct"])
  if rule.reached():
    log(f"--target-se {rule.target:g} already reached by the {rule.num_models} finished models "
        f"(median memorization standard error {rule.median_se:.4f}); training nothing more")
  return rule


def _train_chunks(engine, run_dir: RunDir, chunks, todo, keep_MxN, *, progress: bool, done_models: int,
                  should_stop: Callable[[], bool] | None = None,
                  after_chunk: Callable[[int, dict], bool] | None = None) -> None:
  from tqdm.auto import tqdm
  from jaxmem.engine.trainer import TrainingStopped
  keep_ids = kept_param_ids(str(engine.config.keep_params), engine.config.num_models)
  total = sum(len(c) for c in chunks)
  epochs = engine.config.epochs
  # A few host calls per chunk give a live progress bar; results do not depend on this split.
  per_call = engine.epochs_per_call
  with tqdm(total=total, initial=done_models, unit="model", disable=not progress, dynamic_ncols=True,
            desc="training", smoothing=0.3,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} models [{elapsed}<{remaining}, {rate_fmt}]") as bar:
    for c in todo:
      ids = chunks[c]
      credited = [0]

      def on_progress(epochs_done: int, ids=ids, credited=credited):
        # Whole models only: fractional updates accumulate float error and overrun the bar's total.
        target = len(ids) * epochs_done // epochs
        bar.update(target - credited[0])
        credited[0] = target

      kept = [k for k, m in enumerate(ids) if m in keep_ids]
      param_epochs = set(engine.config.keep_params_epochs) if kept else set()

      def on_params(epoch: int, params_K, ids=ids, kept=kept, c=c):
        if epoch in param_epochs:  # parameters after an earlier epoch (--keep-params-epochs)
          import jax
          save_params(run_dir, c, np.asarray(ids)[kept], jax.tree.map(lambda x: x[np.asarray(kept)], params_K),
                      epoch=epoch)

      with ChunkCheckpoint(run_dir, c, engine.config.checkpoint_every, log=engine.log) as checkpoint:
        append_event(run_dir, event="chunk_start", chunk=c, from_epoch=checkpoint.latest_epoch() or 0)
        try:
          records = engine.train_chunk(ids, keep_MxN[ids], epochs_per_call=per_call, on_progress=on_progress,
                                       checkpoint=checkpoint, should_stop=should_stop,
                                       on_params=on_params if param_epochs else None, stops=sorted(param_epochs))
        except TrainingStopped as stopped:
          append_event(run_dir, event="interrupted", chunk=c, epoch=stopped.epochs_done)
          name = getattr(should_stop, "signal_name", None) or "a stop request"
          signum = signal.Signals[name] if name in signal.Signals.__members__ else signal.SIGINT
          raise RunInterrupted(
              f"interrupted by {name}: chunk {c} saved after epoch {stopped.epochs_done} of {epochs}, "
              "finished chunks are intact", exit_code=128 + int(signum)) from None
        if kept:  # before the records: a chunk is complete only with its parameters
          import jax
          save_params(run_dir, c, np.asarray(ids)[kept],
                      jax.tree.map(lambda x: x[np.asarray(kept)], engine.last_state.params))
        run_dir.write_chunk(c, records)
        checkpoint.remove()
      append_event(run_dir, event="chunk_done", chunk=c, resumed_from_epoch=engine.resumed_from_epoch)
      if after_chunk is not None and after_chunk(c, records):
        break  # e.g. --target-se reached: the remaining chunks stay missing, a rerun can add them


def output_files(run_path: Path) -> dict[str, str]:
  """Where a run's results are, for the summary."""
  return {"run_dir": str(run_path), "scores": str(run_path / "scores.csv"), "summary": str(run_path / "summary.json")}


def subset_accuracies(records: Records) -> dict[str, float]:
  """Mean accuracy of the subset models on their own subset, on held-out training examples, and
  on the test set (averaged over models). Training records are read by blocks of examples sized
  from the scoring budget (per-model sums, exact counts for correctness), never whole."""
  text = "train_token_accuracy" in records  # a language model: next-token accuracy per sequence
  name = "train_token_accuracy" if text else "train_correct"
  sums_own_M, sums_held_M = np.zeros(records.num_models), np.zeros(records.num_models)
  n_own_M = np.zeros(records.num_models, np.int64)
  for block in records.example_blocks(block_size_for_budget(records, [name])):
    keep_MxB, values_MxB = records.read("keep", examples=block), records.read(name, examples=block)
    if text:
      sums_own_M += np.where(keep_MxB, values_MxB, 0).sum(axis=1, dtype=np.float64)
      sums_held_M += np.where(keep_MxB, 0, values_MxB).sum(axis=1, dtype=np.float64)
    else:
      sums_own_M += (values_MxB & keep_MxB).sum(axis=1)
      sums_held_M += (values_MxB & ~keep_MxB).sum(axis=1)
    n_own_M += keep_MxB.sum(axis=1)
  own = sums_own_M / np.maximum(n_own_M, 1)
  held_out = sums_held_M / np.maximum(records.num_train - n_own_M, 1)
  test = records.read("test_token_accuracy" if text else "test_correct")
  return {"train_subset": float(own.mean()), "train_held_out": float(held_out.mean()), "test": float(test.mean())}


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
    if "copies" in table.columns:  # a text run: the sequence, its copies, whether it is a canary
      for row in summary["most_memorized"]:
        i = row["index"]
        row.update(copies=int(table.columns["copies"][i]), canary=bool(table.columns["canary"][i]))
        if dataset is not None and dataset.is_text:
          row["text"] = dataset.decode(dataset.x_train[i])
    summary["memorization_median_se"] = float(np.nanmedian(se))
    if records.noisy.any():
      summary["noisy_label_auroc"] = auroc(mem, records.noisy)
      summary["flipped_labels"] = int(records.noisy.sum())  # also known without the dataset (jaxmem scores)
  if dataset is not None:
    summary["dataset"] = {"name": dataset.name, "num_train": dataset.num_train, "num_test": dataset.num_test,
                          "num_classes": dataset.num_classes, "flipped_labels": int(dataset.noisy.sum())}
  summary["lines"] = table.lines
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """The human summary printed at the end of ``jaxmem run``."""
  acc = summary["accuracy"]
  models = f"models: {summary['models']['finished']} of {summary['models']['planned']} finished"
  chunks = summary["chunks"]
  if chunks["trained_now"] or chunks["already_complete"]:  # a run; `jaxmem scores` and `merge` train nothing
    models += (f" ({chunks['trained_now']} chunks trained now, {chunks['already_complete']} resumed) "
               f"in {summary['seconds']:.1f}s")
  lines = [
      models,
      f"accuracy of the subset models: own subset {acc['train_subset']:.3f}, held-out training examples "
      f"{acc['train_held_out']:.3f}, test {acc['test']:.3f}"]
  if "memorization_median_se" in summary:
    lines.append(f"memorization: median standard error {summary['memorization_median_se']:.3f}")
  if "noisy_label_auroc" in summary:
    lines.append(f"flipped labels found by memorization: AUROC {summary['noisy_label_auroc']:.3f} "
                 f"({summary['flipped_labels']} flipped)")
  if summary.get("compiles"):
    lines.append("compiled programs: " + ", ".join(f"{name} {n}" for name, n in summary["compiles"].items()))
  lines.extend(summary.get("lines", []))
  if summary.get("most_memorized") and "copies" in summary["most_memorized"][0]:
    lines.append("most memorized training sequences (per-token accuracy, in−out):")
    lines.append("  index  copies  canary  memorization    text")
    for row in summary["most_memorized"]:
      lines.append(f"  {row['index']:5d}  {row['copies']:6d}  {'yes' if row['canary'] else 'no':>6}  "
                   f"{row['memorization']:.3f} ± {row['memorization_se']:.3f}  {row.get('text', '')}")
  elif summary.get("most_memorized"):
    lines.append("most memorized training examples:")
    lines.append("  index  label  noisy  memorization")
    for row in summary["most_memorized"]:
      lines.append(f"  {row['index']:5d}  {row['label']:5d}  {'yes' if row['noisy'] else 'no':>5}  "
                   f"{row['memorization']:.3f} ± {row['memorization_se']:.3f}")
  files = summary.get("files", {})
  if files:
    lines.append(f"files: {files['scores']} (scores), {files['summary']} (summary), run directory {files['run_dir']}")
  return "\n".join(lines)
