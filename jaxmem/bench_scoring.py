"""``jaxmem bench scoring``: simulated records of a given size, written through the real record
store and scored by every applicable estimator through the real scoring driver, with wall time
and the process's peak resident memory per estimator.

The records are simulated, not trained, so that ImageNet-sized record sets (N = 1.28 million,
M = 2,000) can be made in minutes. They are generated chunk by chunk and never held whole: each
chunk's keep rows and records come from generators keyed by ``(seed, model id)``, so the same
arguments give the same bytes on disk. Each model's logit margin on training example n is::

  margin[m, n] = difficulty[n] + memorization[n] * keep[m, n] + ratio_effect * (r_m - 0.5) + noise[m, n]

with ``difficulty ~ Normal(1, 1.5)``, ``memorization ~ Exponential(1)`` (membership raises the
margin, so memorization and membership scores are non-trivial), accuracy rising with the model's
subset ratio ``r_m`` and ``noise ~ Normal(0, 1)``; ``correct = margin > 0``. Test examples get
the same model without the membership term. With ``queries`` A >= 2, ``train_margin_aug`` (M, N, A)
and ``test_margin_aug`` (M, T, A) hold augmented queries as the engine records them: query 0 is
the plain margin, the others add Normal(0, 0.3). Keep rows are
Bernoulli(r_m) per example. Results and commands: ``benchmarks/RESULTS.md`` ("Scoring at scale").
"""

from __future__ import annotations

import dataclasses
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxmem.errors import JaxmemError
from jaxmem.records import FORMAT_VERSION, Records, RowBlocks, RunDir, utc_now, write_npz_atomic
from jaxmem.scores import ESTIMATORS
from jaxmem.scores.counterfactual import METRICS
from jaxmem.scoring import output_names, score_records

#: Estimators the bench leaves out unless named: ``correlations`` correlates the columns of the
#: estimators that ran before it in one table, and each estimator here is timed on its own.
NOT_TIMED_ALONE = ("correlations",)
#: Memory for one block of every record when the bench reads the store alone.
STREAM_BUDGET = 256 << 20
RATIO_EFFECT = 1.0
QUERY_NOISE = 0.3
_EXAMPLES_TAG, _TEST_TAG, _MODEL_TAG = 0xE7A, 0x7E57, 0x30DE


@dataclasses.dataclass(frozen=True)
class Simulation:
  """Sizes and seed of a simulated record set (see the module docstring for the model)."""

  num_train: int
  num_test: int
  num_models: int
  subset_ratios: tuple[float, ...] = (0.5,)
  queries: int = 0
  seed: int = 0

  def validate(self) -> None:
    for name in ("num_train", "num_test", "num_models"):
      if getattr(self, name) < 1:
        raise JaxmemError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
    if self.queries < 0:
      raise JaxmemError(f"--queries must be 0 or 1 (no augmented queries) or more, got {self.queries}")
    bad = [r for r in self.subset_ratios if not 0 < r < 1]
    if bad or not self.subset_ratios:
      raise JaxmemError(f"--subset-ratios must be numbers strictly between 0 and 1, got {bad or 'none'}")

  def ratio_M(self) -> np.ndarray:
    """Subset ratio of every model, interleaved over model ids as ``jaxmem run`` does."""
    return np.asarray(self.subset_ratios, np.float32)[np.arange(self.num_models) % len(self.subset_ratios)]

  def chunk_size(self) -> int:
    """Models per chunk: at most 64, and about 256 MiB of generated records per chunk."""
    per_model = (self.num_train * (4 * self.queries + 4 + 4 + 3) + self.num_test * (4 * self.queries + 9))
    return int(max(1, min(64, self.num_models, (256 << 20) // per_model)))

  def chunks(self) -> list[list[int]]:
    k = self.chunk_size()
    return [list(range(s, min(s + k, self.num_models))) for s in range(0, self.num_models, k)]

  def manifest(self) -> dict[str, Any]:
    # ratios as a list: the manifest's JSON reads them back as one, and identities must compare equal
    identity = {"simulation": {**dataclasses.asdict(self), "subset_ratios": list(self.subset_ratios)}}
    return {"format": "jaxmem-run", "format_version": FORMAT_VERSION, "identity": identity,
            "config": identity, "chunks": self.chunks(), "created": utc_now(),
            "dataset": {"name": "simulated", "num_train": self.num_train, "num_test": self.num_test,
                        "fingerprint": f"simulated-{self.num_train}-{self.num_test}-{self.seed}"}}

  def _examples(self, tag: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, tag])
    difficulty = rng.normal(1.0, 1.5, size).astype(np.float32)
    memorization = rng.exponential(1.0, size).astype(np.float32)
    return difficulty, memorization

  def keep_rows(self, model_ids: Sequence[int]) -> np.ndarray:
    """keep (K, N) bool of some models: Bernoulli(r_m), from each model's own generator."""
    ratio_M = self.ratio_M()
    keep_KxN = np.empty((len(model_ids), self.num_train), bool)
    for row, m in enumerate(model_ids):
      rng = np.random.default_rng([self.seed, _MODEL_TAG, m, 0])
      keep_KxN[row] = rng.random(self.num_train, dtype=np.float32) < ratio_M[m]
    return keep_KxN

  def chunk_records(self, model_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """The records of some models, as the engine writes a chunk (leading axis K: these models)."""
    difficulty_N, memorization_N = self._examples(_EXAMPLES_TAG, self.num_train)
    difficulty_T, _ = self._examples(_TEST_TAG, self.num_test)
    ratio_M = self.ratio_M()
    keep_KxN = self.keep_rows(model_ids)
    k = len(model_ids)
    margin_KxN = np.empty((k, self.num_train), np.float32)
    test_margin_KxT = np.empty((k, self.num_test), np.float32)
    for row, m in enumerate(model_ids):
      rng = np.random.default_rng([self.seed, _MODEL_TAG, m, 1])
      shift = np.float32(RATIO_EFFECT * (ratio_M[m] - 0.5))
      margin_KxN[row] = rng.standard_normal(self.num_train, dtype=np.float32)
      margin_KxN[row] += difficulty_N + shift
      margin_KxN[row] += memorization_N * keep_KxN[row]
      test_margin_KxT[row] = rng.standard_normal(self.num_test, dtype=np.float32) + difficulty_T + shift
    records = {"model_ids": np.asarray(model_ids, np.int64), "keep": keep_KxN,
               "train_correct": margin_KxN > 0, "test_correct": test_margin_KxT > 0,
               "train_margin": margin_KxN, "test_margin": test_margin_KxT}
    if self.queries >= 2:
      for split, margin in (("train", margin_KxN), ("test", test_margin_KxT)):
        aug = np.empty((*margin.shape, self.queries), np.float32)
        for row, m in enumerate(model_ids):
          rng = np.random.default_rng([self.seed, _MODEL_TAG, m, 2 if split == "train" else 3])
          aug[row] = rng.standard_normal((margin.shape[1], self.queries), dtype=np.float32)
        aug *= np.float32(QUERY_NOISE)
        aug[..., 0] = 0
        aug += margin[..., None]
        records[f"{split}_margin_aug"] = aug
    return records

  def design(self) -> dict[str, Any]:
    """The run's design.npz: keep (M, N) written in blocks of models, never held whole."""
    labels_N = np.random.default_rng([self.seed, _EXAMPLES_TAG, 1]).integers(0, 10, self.num_train)
    labels_T = np.random.default_rng([self.seed, _TEST_TAG, 1]).integers(0, 10, self.num_test)
    blocks = lambda: (self.keep_rows(ids) for ids in self.chunks())
    return {"keep": RowBlocks((self.num_models, self.num_train), np.dtype(bool), blocks),
            "subset_ratio": self.ratio_M(), "train_labels": labels_N, "clean_train_labels": labels_N,
            "test_labels": labels_T, "noisy": np.zeros(self.num_train, bool)}


def write_simulated_run(simulation: Simulation, out: str | Path, *, log: Callable[[str], None] = print) -> RunDir:
  """Writes (or completes) a run directory of simulated records; complete chunks are kept."""
  simulation.validate()
  run = RunDir.create_or_open(out, simulation.manifest())
  if not (run.path / "design.npz").is_file():
    write_npz_atomic(run.path / "design.npz", simulation.design())
  chunks = simulation.chunks()
  todo = [c for c in range(len(chunks)) if run.chunk_status(c) != "complete"]
  start = time.perf_counter()
  for c in todo:
    run.write_chunk(c, simulation.chunk_records(chunks[c]))
  if todo:
    log(f"wrote {len(todo)} of {len(chunks)} chunks ({simulation.chunk_size()} models each) in "
        f"{time.perf_counter() - start:.1f}s")
  else:
    log(f"all {len(chunks)} chunks were already written in {run.path}")
  return run


def peak_rss_bytes() -> int:
  """Peak resident memory of this process so far (Linux reports kibibytes, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024


def applicable_estimators(records: Records, names: Sequence[str] | None = None) -> list[str]:
  """The named estimators (none: the store alone), or every registered one whose records exist
  (but NOT_TIMED_ALONE)."""
  if names is not None:
    for name in names:
      ESTIMATORS.get(name)  # an unknown name lists the valid ones
    return list(names)
  names = [n for n in ESTIMATORS.names() if n not in NOT_TIMED_ALONE and ESTIMATORS.get(n).available(records)]
  return sorted(names, key=lambda n: n != "memorization")  # first, as the scoring driver orders it


def bench_scoring(simulation: Simulation, *, out: str | Path | None = None, estimators: Sequence[str] | None = None,
                  options: dict[str, dict[str, Any]] | None = None,
                  log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Writes the simulated records (into ``out``, or a temporary directory removed afterwards) and
  scores them with each estimator in turn; returns one row per step with its seconds and the
  process's peak RSS after it (peak so far: a step's own peak is the largest of these up to it)."""
  simulation.validate()
  # every counterfactual metric (by default it computes none)
  options = {"counterfactual": {"metrics": tuple(METRICS)}, **(options or {})}
  keep_dir = out is not None
  path = Path(out) if keep_dir else Path(tempfile.mkdtemp(prefix="jaxmem-bench-scoring-")) / "run"
  rows = []
  try:
    start = time.perf_counter()
    existed = (path / "manifest.json").is_file()
    run = write_simulated_run(simulation, path, log=log)
    on_disk = sum(p.stat().st_size for p in (run.path / "chunks").glob("chunk_*.npz"))
    rows.append({"step": "write records" + (" (or verify them)" if existed else ""),
                 "seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes(),
                 "note": f"{on_disk / 2**20:,.0f} MiB of chunk files"})
    start = time.perf_counter()
    records = run.load_records()
    rows.append({"step": "load (verify checksums)", "seconds": time.perf_counter() - start,
                 "peak_rss": peak_rss_bytes(), "note": f"{records.num_models} models x {records.num_train} examples"})
    # the store alone: every record read once; those over training examples by blocks sized for
    # STREAM_BUDGET, the others (test records) whole, one at a time
    names = ["keep", *records.record_names()]
    by_block = [name for name in names if "N" in records.axes(name)]
    block = records.block_size_for(STREAM_BUDGET, by_block)
    start = time.perf_counter()
    for name in names:
      if name not in by_block:
        records.read(name)
    for examples in records.example_blocks(block):
      for name in by_block:
        records.read(name, examples=examples)
    rows.append({"step": "read every record by blocks", "seconds": time.perf_counter() - start,
                 "peak_rss": peak_rss_bytes(), "note": f"{block} examples per block ({STREAM_BUDGET >> 20} MiB)"})
    for name in applicable_estimators(records, estimators):
      start = time.perf_counter()
      table = score_records(records, [name], options)
      rows.append({"step": name, "seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes(),
                   "note": ", ".join([f"{len(table.columns) - 4} columns", *output_names(table)])})
      log(format_rows(rows[-1:], header=False))
  finally:
    if not keep_dir:
      shutil.rmtree(path.parent, ignore_errors=True)
  return rows


def format_rows(rows: Sequence[dict[str, Any]], *, header: bool = True) -> str:
  lines = [f"{'step':32s} {'seconds':>9s} {'peak RSS so far':>16s}  note"] if header else []
  for row in rows:
    lines.append(f"{row['step']:32s} {row['seconds']:9.2f} {row['peak_rss'] / 2**30:12.2f} GiB  {row['note']}")
  return "\n".join(lines)


def parse_ratios(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(t) for t in text.split(",") if t.strip())
  except ValueError:
    raise JaxmemError(f"--subset-ratios must be comma-separated numbers between 0 and 1, got {text!r}") from None

