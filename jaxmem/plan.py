"""``jaxmem plan``: what a run will cost, before it runs.

Sizes come from shapes alone: the records' bytes from the record fields and their dtypes, the
programs' device memory from XLA's analysis of the compiled training and evaluation programs
(compiled on abstract inputs: nothing is trained), so a cluster job can be sized on a laptop.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from jaxmem.config import RunConfig
from jaxmem.data import Dataset, load_dataset
from jaxmem.engine import Engine
from jaxmem.engine.lift import candidate_strategies, parse_strategy
from jaxmem.engine.step import steps_per_epoch
from jaxmem.errors import JaxmemError
from jaxmem.masks import make_masks
from jaxmem.run import check_config_against_dataset, plan_chunks


def shape_dataset(name: str, input_shape, num_train: int, num_test: int, num_classes: int,
                  dtype=np.float32) -> Dataset:
  """A dataset with the given shapes whose arrays take no memory (zero-stride broadcasts of one
  value): enough for an abstract :class:`jaxmem.engine.Engine` to compile and analyze programs.
  ``dtype``: of the inputs (uint8 for images as stored)."""
  shape = tuple(int(d) for d in input_shape)
  zeros = lambda n, dtype, *rest: np.broadcast_to(np.zeros((), dtype), (n,) + rest)
  labels = lambda n: np.broadcast_to(np.zeros((), np.int32), (n,))
  return Dataset(name=name, x_train=zeros(num_train, dtype, *shape), y_train=labels(num_train),
                 x_test=zeros(num_test, dtype, *shape), y_test=labels(num_test), num_classes=int(num_classes),
                 noisy=np.broadcast_to(np.zeros((), bool), (num_train,)), clean_y_train=labels(num_train))


def _tfds_shapes(config: RunConfig, num_train: int | None, num_test: int | None) -> Dataset:
  """A shape-only TFDS dataset: the feature shape and classes from the builder's own code (no
  files), the split sizes from the caller (TFDS knows them only once the data is prepared)."""
  name = config.dataset[len("tfds:"):]
  if num_train is None or num_test is None:
    raise JaxmemError(f"dataset {config.dataset!r} is not prepared in --data-dir {config.data_dir!r}: plan from "
                      "its shapes with --num-train N --num-test T (its split sizes)")
  import tensorflow_datasets as tfds  # here: heavy, and needed only for TFDS configs
  try:
    features = tfds.builder(name, data_dir=config.data_dir, try_gcs=False).info.features
  except Exception as e:  # unknown name, broken install: one line
    raise JaxmemError(f"TFDS has no dataset {name!r} to plan from ({str(e).splitlines()[0]})") from None
  image = next((f for f in features.values() if isinstance(f, tfds.features.Image)), None)
  label = next((f for f in features.values() if isinstance(f, tfds.features.ClassLabel)), None)
  if image is None or label is None:
    raise JaxmemError(f"TFDS dataset {name!r} has no image and class label to plan from")
  return shape_dataset(config.dataset, image.shape, num_train, num_test, label.num_classes,
                       dtype=np.uint8 if np.dtype(image.np_dtype) == np.uint8 else np.float32)


def plan_dataset(config: RunConfig, *, num_train: int | None = None, num_test: int | None = None) -> tuple[Dataset, str]:
  """The run's dataset, or when its files are absent (TFDS), its shapes: (dataset, where from)."""
  try:
    return load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed,
                        label_noise=config.label_noise), "loaded"
  except JaxmemError:
    if not config.dataset.startswith("tfds:"):
      raise
    return _tfds_shapes(config, num_train, num_test), "shapes only (data not prepared)"


def record_bytes(config: RunConfig, num_train: int, num_test: int) -> dict[str, int]:
  """Bytes on disk of one model's records per field, as the engine writes them (uncompressed
  npz: the array bytes; headers are counted in :data:`NPZ_ENTRY_BYTES` per array)."""
  n, t, e, a = num_train, num_test, config.epochs, config.queries
  fields = {"train_correct": n, "test_correct": t, "train_margin": 4 * n, "test_margin": 4 * t,
            "epoch_loss": 4 * e, "model_ids": 8, "keep": n}
  if a > 1:
    fields.update(train_margin_aug=4 * n * a, test_margin_aug=4 * t * a)
  if config.record_epochs:
    fields["train_correct_epochs_packed"] = e * -(-n // 8)
    if config.record_epoch_margin:
      fields["train_margin_epochs"] = 4 * e * n
  if config.score_epoch is not None:
    fields.update(train_el2n=4 * n, train_grand=4 * n)
  return fields


# A zip entry and .npy header per array in an uncompressed .npz: ~128 bytes of npy header plus the
# zip's local and central headers for the name.
NPZ_ENTRY_BYTES = 128 + 2 * 76


def disk_bytes(config: RunConfig, dataset: Dataset, chunks: list[list[int]]) -> dict[str, int]:
  """The run directory's size: chunks (records of every model) and the design (masks, labels)."""
  per_model = record_bytes(config, dataset.num_train, dataset.num_test)
  entries = len(per_model) + 2  # + train_seconds and, with per-epoch records, the example count
  chunk_bytes = sum(len(c) * sum(per_model.values()) + entries * NPZ_ENTRY_BYTES + 160 for c in chunks)
  m, n, t = config.num_models, dataset.num_train, dataset.num_test
  design = m * n + 4 * m + 3 * 4 * n + n + 4 * t + 6 * NPZ_ENTRY_BYTES  # keep, ratios, labels x3, noisy, test labels
  return {"chunks": chunk_bytes, "design": design, "total": chunk_bytes + design}


def host_bytes(config: RunConfig, dataset: Dataset) -> dict[str, int]:
  """Host memory: the dataset as held (its arrays' dtypes) and the records when scored at once."""
  data = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in (dataset.x_train, dataset.x_test))
  records = config.num_models * sum(record_bytes(config, dataset.num_train, dataset.num_test).values())
  if config.record_epochs:  # load_records unpacks the bits to bool: 8x the packed bytes
    records += config.num_models * config.epochs * dataset.num_train * 7 // 8
  return {"dataset": data, "records": records}


def plan(config: RunConfig, *, devices=None, num_train: int | None = None, num_test: int | None = None,
         probe: bool = False, log=print) -> dict[str, Any]:
  """Everything :func:`jaxmem.run.run` would use, without training: sizes, the chunk plan and,
  per candidate strategy, XLA's memory analysis of the training and evaluation programs (per
  device). ``probe``: also train one chunk for a few epochs and extrapolate models/s and an ETA."""
  config.validate()
  for flag, value in (("--num-train", num_train), ("--num-test", num_test)):
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
      raise JaxmemError(f"{flag} must be a positive number of examples, got {value!r}")
  dataset, source = plan_dataset(config, num_train=num_train, num_test=num_test)
  check_config_against_dataset(config, dataset)
  devices = list(devices or jax.devices())
  keep_MxN, _ = make_masks(config.mask_design, config.num_models, dataset.num_train, config.subset_ratios, config.seed)
  chunks = plan_chunks(config.num_models, len(config.subset_ratios), config.chunk_size)
  max_members = int(keep_MxN.sum(axis=1).max())
  engine = Engine(dataset, config, devices=devices, abstract=True, probe_cache=None,
                  chunk_models=config.chunk_size, max_members=max_members)
  per_device = engine.padded_size(config.chunk_size) // engine.num_devices
  fixed = parse_strategy(config.strategy)
  candidates = [fixed] if fixed is not None and fixed.kind != "loop" else candidate_strategies(per_device)
  steps = engine._program_steps(keep_MxN[:1])
  table = []
  for strategy in candidates:
    batch = engine.default_eval_batch
    found = engine.program_memory(strategy, config.chunk_size, steps, batch)
    row = {"strategy": str(strategy), "train": found["train"].to_dict(), "evaluate": found["evaluate"].to_dict(),
           "eval_batch": batch}
    if engine.device_memory is not None:
      fitting = engine.fit_to_memory([strategy], config.chunk_size, steps)
      fitted = engine.memory_table[-1]
      row.update(fits=bool(fitting), fitted_eval_batch=fitted["eval_batch"],
                 fitted_evaluate=fitted["evaluate"])
    table.append(row)
  ratios_steps = {f"{r:g}": steps_per_epoch(int(keep_MxN[i].sum()), config.batch_size)
                  for i, r in enumerate(config.subset_ratios)}
  result = {
      "dataset": {"name": dataset.name, "source": source, "num_train": dataset.num_train, "num_test": dataset.num_test,
                  "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes},
      "devices": {"count": len(devices), "kind": devices[0].device_kind, "platform": devices[0].platform,
                  "memory_bytes": engine.device_memory},
      "chunks": {"count": len(chunks), "models_per_program": engine.padded_size(config.chunk_size),
                 "models_per_device": per_device, "steps_per_epoch": ratios_steps,
                 "epochs_per_call": engine.epochs_per_call},
      "disk_bytes": disk_bytes(config, dataset, chunks), "host_bytes": host_bytes(config, dataset),
      "memory": table}
  if probe:
    result["probe"] = _probe(config, dataset, source, devices, keep_MxN, chunks, max_members)
  return result


def _probe(config: RunConfig, dataset: Dataset, source: str, devices, keep_MxN, chunks, max_members) -> dict[str, Any]:
  """Train the first chunk for a few epochs (after one untimed call that compiles) and extrapolate."""
  if source != "loaded":
    raise JaxmemError("--probe trains a chunk and needs the dataset itself; it is not prepared")
  epochs = min(config.epochs, 2)
  short = config.replace(epochs=epochs, score_epoch=None, record_epochs=False, record_epoch_margin=False)
  engine = Engine(dataset, short, devices=devices, chunk_models=config.chunk_size, max_members=max_members)
  ids = chunks[0]
  engine.train_chunk(ids, keep_MxN[ids])  # compiles (and, for auto, probes the candidates)
  start = time.perf_counter()
  engine.train_chunk(ids, keep_MxN[ids])
  seconds = time.perf_counter() - start
  per_model = seconds / len(ids) * config.epochs / epochs
  return {"strategy": str(engine.strategy), "models_per_second": 1.0 / per_model,
          "eta_seconds": per_model * sum(len(c) for c in chunks), "timed_models": len(ids), "timed_epochs": epochs}


def format_plan(p: dict[str, Any]) -> str:
  mib = lambda b: f"{b / 2**20:,.1f} MiB"
  gib = lambda b: f"{b / 2**30:,.2f} GiB" if b >= 2**30 else mib(b)
  d, c = p["dataset"], p["chunks"]
  lines = [
      f"dataset {d['name']} ({d['source']}): {d['num_train']} train, {d['num_test']} test, input {tuple(d['input_shape'])}, "
      f"{d['num_classes']} classes",
      f"chunks: {c['count']}, {c['models_per_program']} models per program ({c['models_per_device']} per device on "
      f"{p['devices']['count']} {p['devices']['platform']} devices); steps per epoch by ratio: "
      + ", ".join(f"{r}: {s}" for r, s in c["steps_per_epoch"].items()),
      f"records on disk: {mib(p['disk_bytes']['total'])} (chunks {mib(p['disk_bytes']['chunks'])}, design "
      f"{mib(p['disk_bytes']['design'])})",
      f"host memory: dataset {mib(p['host_bytes']['dataset'])}, records when scored {mib(p['host_bytes']['records'])}",
      "device memory per device (XLA memory analysis of the compiled programs"
      + (f"; device has {gib(p['devices']['memory_bytes'])}" if p["devices"]["memory_bytes"] else
         "; device memory unknown: --device-memory-gib to check fits") + "):",
      f"  {'strategy':<10} {'train':>12} {'evaluate':>12} {'eval batch':>10}" + ("  fits (eval batch)" if p["devices"]["memory_bytes"] else "")]
  for row in p["memory"]:
    line = f"  {row['strategy']:<10} {gib(row['train']['peak']):>12} {gib(row['evaluate']['peak']):>12} {row['eval_batch']:>10}"
    if "fits" in row:
      line += f"  {'yes' if row['fits'] else 'no'} ({row['fitted_eval_batch']})"
    lines.append(line)
  if "probe" in p:
    pr = p["probe"]
    lines.append(f"probe: {pr['models_per_second']:.2f} models/s with {pr['strategy']} "
                 f"({pr['timed_models']} models x {pr['timed_epochs']} epochs timed); ETA {pr['eta_seconds'] / 60:.1f} min "
                 "for the whole run on this machine")
  return "\n".join(lines)
