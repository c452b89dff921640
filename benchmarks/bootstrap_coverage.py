"""Coverage of the bootstrap 95% memorization intervals against a much larger run.

Trains one digits run of ``--num-models`` models, splits it into disjoint groups of ``--small``
models, and for each group computes its bootstrap interval (``jaxmem.scores.uncertainty``: the
percentile interval, or the SE-based one where the percentile interval is narrower than half of
it) and,
for comparison, the normal interval ``estimate ± 1.96·se`` with the Agresti–Caffo SE. The "truth" for
a group is the memorization estimated from all the *other* models (``num_models − small`` of
them), so the reference is independent of the interval being checked. Coverage is the fraction of
examples (with a defined estimate) whose reference lies inside the interval, averaged over groups.
The reference itself has noise (its SE is reported), which lowers the measured coverage a little.

  python benchmarks/bootstrap_coverage.py --out runs/coverage --write benchmarks/bootstrap_coverage.md

Cost: about 2–4 minutes on a 2-core CPU (640 small MLPs on digits).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax
import numpy as np

import jaxmem
from jaxmem.scores import memorization
from jaxmem.scores.uncertainty import bootstrap_interval


def coverage_table(keep, correct, small: int, resamples: int, seed: int) -> dict:
  m = keep.shape[0]
  groups = m // small
  rows = []
  for g in range(groups):
    inside = np.zeros(m, bool)
    inside[g * small: (g + 1) * small] = True
    est = memorization(keep[inside], correct[inside])
    ref = memorization(keep[~inside], correct[~inside])
    ci = bootstrap_interval(keep[inside], correct[inside], key=jax.random.PRNGKey(seed + g), num_resamples=resamples)
    ok = np.isfinite(est.estimate) & np.isfinite(ref.estimate) & np.isfinite(ci.low)
    truth = ref.estimate[ok]
    boot = (ci.low[ok] - 1e-9 <= truth) & (truth <= ci.high[ok] + 1e-9)
    normal = np.abs(truth - est.estimate[ok]) <= 1.96 * est.se[ok]
    fallback = ci.fallback[ok]
    se_width = (np.minimum(est.estimate[ok] + 1.96 * est.se[ok], 1)
                - np.maximum(est.estimate[ok] - 1.96 * est.se[ok], -1))
    width = ci.high[ok] - ci.low[ok]
    rows.append({"boot": boot.mean(), "normal": normal.mean(), "fallback": fallback.mean(),
                 "boot_percentile": boot[~fallback].mean() if (~fallback).any() else np.nan,
                 "boot_fallback": boot[fallback].mean() if fallback.any() else np.nan,
                 "narrow": float(np.sum(width < 0.5 * se_width - 1e-9)),
                 "width": np.median(width), "examples": int(ok.sum()),
                 "ref_se": float(np.nanmedian(ref.se))})
  return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]} | {"groups": groups}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/coverage")
  parser.add_argument("--num-models", type=int, default=640)
  parser.add_argument("--small", type=int, nargs="+", default=[32, 64])
  parser.add_argument("--epochs", type=int, default=12)
  parser.add_argument("--resamples", type=int, default=400)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--label-noise", type=float, default=0.0)
  parser.add_argument("--write", default=None, help="write the result as markdown here")
  args = parser.parse_args()
  config = jaxmem.RunConfig(dataset="digits", num_models=args.num_models, epochs=args.epochs, chunk_size=64,
                            model_options={"hidden_sizes": (128,)}, strategy="vmap", seed=args.seed,
                            label_noise=args.label_noise)
  start = time.perf_counter()
  result = jaxmem.run(config, args.out, progress=False, log=print, estimators=["memorization"])
  seconds = time.perf_counter() - start
  keep, correct = result.records.keep, result.records["train_correct"]
  lines = [
      "# Bootstrap coverage of memorization intervals",
      "",
      f"Command: `python benchmarks/bootstrap_coverage.py --num-models {args.num_models} --small "
      f"{' '.join(map(str, args.small))} --epochs {args.epochs} --resamples {args.resamples} "
      f"--label-noise {args.label_noise}` "
      f"({platform.machine()}, jax {jax.__version__}, run {seconds:.0f}s). Digits, MLP 128, "
      f"subset ratio 0.7; accuracy {result.summary['accuracy']}.",
      "",
      "| models per interval | groups | interval 95% coverage | normal (Agresti–Caffo) 95% coverage | "
      "SE-based fallback used | coverage, percentile intervals kept | coverage, fallback intervals | "
      "intervals narrower than half their SE-based one | median width | reference median SE |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for small in args.small:
    t = coverage_table(keep, correct, small, args.resamples, args.seed)
    lines.append(f"| {small} | {t['groups']} | {t['boot']:.3f} | {t['normal']:.3f} | {t['fallback']:.3f} | "
                 f"{t['boot_percentile']:.3f} | {t['boot_fallback']:.3f} | {t['narrow']:.0f} | {t['width']:.3f} | "
                 f"{t['ref_se']:.3f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.write:
    Path(args.write).write_text(text)


if __name__ == "__main__":
  main()
