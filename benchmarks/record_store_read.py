"""Reading one block of training examples across every chunk of a CIFAR-sized run, three ways.

The question: which on-disk form of the per-chunk records lets the scoring driver read a block of
examples (all models, ``examples=slice(n0, n0 + block)``) without holding all records? Each form
holds the same records (``train_margin`` float32 and ``train_correct`` bool, (K, N) per chunk):

  zarr3   one zarr v3 array per record per chunk through TensorStore, storage chunks (K, block)
  npy     one ``.npy`` per record per chunk, read with ``np.load(mmap_mode="r")``
  npz     today's per-chunk uncompressed ``.npz``: its members are ``.npy`` files stored as they
          are, so each is memory-mapped at its offset in the zip (jaxmem.records.npz_members)

The ``.npy`` bytes are read three ways: ``kept``, maps opened once and kept (pages read stay in the
process's resident set until unmapped); ``per read``, a fresh ``np.load(mmap_mode="r")`` per block
read (resident memory stays at one block, but every page faults again); ``pread``, the block's bytes
copied with ``os.preadv`` into the output array (``NpzMember.read``, what jaxmem does).

Usage (results in benchmarks/RESULTS.md)::

  python benchmarks/record_store_read.py --dir /tmp/store_bench [--chunks 64 --models 64 --num-train 50000]
"""

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import tensorstore as ts

from jaxmem.records import npz_members

NAMES = ("train_margin", "train_correct")


def chunk_records(c: int, models: int, num_train: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(c)
  margin_KxN = rng.normal(size=(models, num_train)).astype(np.float32)
  return {"train_margin": margin_KxN, "train_correct": margin_KxN > 0}


def write_all(root: Path, chunks: int, models: int, num_train: int, block: int) -> dict[str, float]:
  seconds = {}
  for form in ("zarr3", "npy", "npz"):
    shutil.rmtree(root / form, ignore_errors=True)
    (root / form).mkdir(parents=True)
  for form in ("zarr3", "npy", "npz"):
    start = time.perf_counter()
    for c in range(chunks):
      records = chunk_records(c, models, num_train)
      if form == "npz":
        np.savez(root / form / f"chunk_{c:05d}.npz", **records)
      elif form == "npy":
        (root / form / f"chunk_{c:05d}").mkdir()
        for name, value in records.items():
          np.save(root / form / f"chunk_{c:05d}" / f"{name}.npy", value)
      else:
        for name, value in records.items():
          store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / form / f"chunk_{c:05d}" / name)},
                           "metadata": {"shape": list(value.shape), "data_type": value.dtype.name,
                                        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [models, block]}}}},
                          create=True).result()
          store.write(value).result()
    seconds[form] = time.perf_counter() - start
  return seconds


FORMS = ("zarr3", "npy kept", "npy per read", "npz kept", "npz pread")


def open_all(root: Path, form: str, chunks: int):
  """Per chunk, per record: what a block read starts from (a map, a path or a member's place)."""
  if form == "npz kept":
    return [{n: npz_members(root / "npz" / f"chunk_{c:05d}.npz")[n].map() for n in NAMES} for c in range(chunks)]
  if form == "npz pread":
    return [{n: npz_members(root / "npz" / f"chunk_{c:05d}.npz")[n] for n in NAMES} for c in range(chunks)]
  if form == "npy kept":
    return [{n: np.load(root / "npy" / f"chunk_{c:05d}" / f"{n}.npy", mmap_mode="r") for n in NAMES} for c in range(chunks)]
  if form == "npy per read":
    return [{n: root / "npy" / f"chunk_{c:05d}" / f"{n}.npy" for n in NAMES} for c in range(chunks)]
  return [{n: ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / "zarr3" / f"chunk_{c:05d}" / n)}}).result()
           for n in NAMES} for c in range(chunks)]


def read_block(opened, form: str, start: int, block: int) -> dict[str, np.ndarray]:
  out = {}
  for name in NAMES:
    if form == "zarr3":
      stop = min(start + block, opened[0][name].shape[1])  # TensorStore refuses reading past the end
      futures = [chunk[name][:, start:stop].read() for chunk in opened]  # issued together
      out[name] = np.concatenate([f.result() for f in futures])
    elif form == "npz pread":
      out[name] = np.concatenate([chunk[name].read(np.arange(chunk[name].shape[0]), 1, start,
                                                   min(start + block, chunk[name].shape[1])) for chunk in opened])
    elif form == "npy per read":
      out[name] = np.concatenate([np.asarray(np.load(chunk[name], mmap_mode="r")[:, start:start + block])
                                  for chunk in opened])
    else:
      out[name] = np.concatenate([np.asarray(chunk[name][:, start:start + block]) for chunk in opened])
  return out


def resident_bytes() -> int:
  """This process's resident memory now (Linux), file-backed mapped pages included."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) * 1024
  return 0


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--dir", required=True)
  parser.add_argument("--chunks", type=int, default=64)
  parser.add_argument("--models", type=int, default=64)
  parser.add_argument("--num-train", type=int, default=50_000)
  parser.add_argument("--block", type=int, default=4096)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--reuse", action="store_true", help="read the files a previous call wrote")
  parser.add_argument("--forms", default=",".join(FORMS), help="comma-separated, from: " + ", ".join(FORMS))
  args = parser.parse_args()
  root = Path(args.dir)
  written = (dict.fromkeys(("zarr3", "npy", "npz"), float("nan")) if args.reuse
             else write_all(root, args.chunks, args.models, args.num_train, args.block))
  reference = None
  for form in args.forms.split(","):
    start = time.perf_counter()
    opened = open_all(root, form, args.chunks)
    opening = time.perf_counter() - start
    times = {}
    for where, first in (("first block", 0), ("middle block, unaligned", args.num_train // 2 + 1000)):
      runs = []
      for _ in range(args.repeats):
        start = time.perf_counter()
        block = read_block(opened, form, first, args.block)
        runs.append(time.perf_counter() - start)
      times[where] = statistics.median(runs)
      if where == "first block":
        reference = reference or block
        for name in NAMES:
          np.testing.assert_array_equal(block[name], reference[name])
    start = time.perf_counter()
    for first in range(0, args.num_train, args.block):  # a full pass over every block
      read_block(opened, form, first, args.block)
    times["full pass"] = time.perf_counter() - start
    times["RSS after"] = resident_bytes() / 2**20  # MiB, maps still open
    del opened
    stored = form.split()[0]
    full = sum(p.stat().st_size for p in (root / stored).rglob("*") if p.is_file())
    print(f"{form:12s} write {written[stored]:6.2f}s  {full / 2**20:7.1f} MiB  open {opening * 1e3:7.1f} ms  " +
          "  ".join(f"{k} {v * 1e3:7.1f} ms" for k, v in times.items() if k not in ("full pass", "RSS after")) +
          f"  full pass {times['full pass']:6.2f}s  RSS after it {times['RSS after']:6.0f} MiB")


if __name__ == "__main__":
  main()
