"""Coverage of the 95% memorization intervals against a much larger run, stratified.

Trains one digits run of ``--num-models`` models, splits it into disjoint groups of ``--small``
models, and for each group computes, per example, three 95% intervals for memorization:

- **score**: the default ``memorization_ci_low/high`` (``jaxmem.scores.uncertainty.newcombe_interval``,
  Newcombe's hybrid score interval for the in−out difference of accuracies);
- **bootstrap**: the percentile bootstrap over models (``--bootstrap N``; where it is narrower than
  half the SE-based interval the SE-based one is used, ``bootstrap_interval``);
- **normal**: ``estimate ± 1.96·se`` with the Agresti–Caffo SE.

The "truth" for a group is the memorization estimated from all the *other* models (``num_models −
small`` of them), so the reference is independent of the interval being checked; it has noise of
its own (its SE is reported), which lowers the measured coverage a little. A second measure takes
the reference's in- and out-accuracies as the true ones and computes the score interval's *exact*
coverage for the group's n_in and n_out (a sum over all binomial outcomes): the coverage the method
would have if the reference were the truth, free of the reference's noise.

Coverage is reported overall and by stratum: examples on which every model of the group agreed
(all right or all wrong, in and out) vs the rest, and by the reference memorization's magnitude.

  python benchmarks/bootstrap_coverage.py --out runs/coverage --write benchmarks/bootstrap_coverage.md

Cost: about 2–5 minutes on a 2-core CPU (640 small MLPs on digits).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax
import numpy as np
from scipy.stats import binom

import jaxmem
from jaxmem.scores import memorization
from jaxmem.scores.uncertainty import bootstrap_interval, newcombe_interval, wilson_interval

Z95 = 1.959963984540054
#: (name, selector on (agree, |reference|)) of the strata reported.
STRATA = (("all", lambda agree, ref: np.ones_like(agree)),
          ("every model agreed", lambda agree, ref: agree),
          ("models disagreed", lambda agree, ref: ~agree),
          ("|ref| < 0.02", lambda agree, ref: ref < 0.02),
          ("0.02 <= |ref| < 0.1", lambda agree, ref: (ref >= 0.02) & (ref < 0.1)),
          ("0.1 <= |ref| < 0.3", lambda agree, ref: (ref >= 0.1) & (ref < 0.3)),
          ("|ref| >= 0.3", lambda agree, ref: ref >= 0.3))


def exact_score_coverage(n_in, n_out, p_in, p_out) -> np.ndarray:
  """Per example, P(score interval ∋ p_in − p_out) when x_in ~ Bin(n_in, p_in), x_out ~ Bin(n_out, p_out)."""
  out = np.empty(len(n_in))
  for a, b in set(zip(n_in.tolist(), n_out.tolist())):
    rows = (n_in == a) & (n_out == b)
    x_in, x_out = np.meshgrid(np.arange(a + 1.0), np.arange(b + 1.0), indexing="ij")
    l_in, u_in = wilson_interval(x_in, np.full_like(x_in, a))
    l_out, u_out = wilson_interval(x_out, np.full_like(x_out, b))
    d = x_in / a - x_out / b
    low = d - np.hypot(x_in / a - l_in, u_out - x_out / b)
    high = d + np.hypot(u_in - x_in / a, x_out / b - l_out)
    truth = (p_in[rows] - p_out[rows])[:, None, None]
    weight = binom.pmf(x_in[None], a, p_in[rows][:, None, None]) * binom.pmf(x_out[None], b, p_out[rows][:, None, None])
    out[rows] = np.sum(weight * ((low[None] <= truth + 1e-12) & (truth - 1e-12 <= high[None])), axis=(1, 2))
  return out


def coverage_table(keep, correct, small: int, resamples: int, seed: int) -> list[dict]:
  """One row per stratum: share of examples and coverage of each interval, pooled over groups."""
  m = keep.shape[0]
  groups = m // small
  pooled: dict[str, list] = {k: [] for k in ("agree", "ref", "score", "exact", "boot", "normal", "width",
                                             "narrow", "floor", "ref_se")}
  for g in range(groups):
    inside = np.zeros(m, bool)
    inside[g * small: (g + 1) * small] = True
    k, c = keep[inside], correct[inside]
    est, ref = memorization(k, c), memorization(keep[~inside], correct[~inside])
    score = newcombe_interval(k, c)
    boot = bootstrap_interval(k, c, key=jax.random.PRNGKey(seed + g), num_resamples=resamples)
    ok = np.isfinite(est.estimate) & np.isfinite(ref.estimate)
    truth = ref.estimate[ok]
    se_width = (np.minimum(est.estimate[ok] + Z95 * est.se[ok], 1) - np.maximum(est.estimate[ok] - Z95 * est.se[ok], -1))
    width = score.high[ok] - score.low[ok]
    pooled["agree"].append(np.all(c == c[:1], axis=0)[ok])
    pooled["ref"].append(np.abs(truth))
    pooled["score"].append((score.low[ok] - 1e-9 <= truth) & (truth <= score.high[ok] + 1e-9))
    pooled["exact"].append(exact_score_coverage(est.n_in[ok], est.n_out[ok], ref.mean_in[ok], ref.mean_out[ok]))
    pooled["boot"].append((boot.low[ok] - 1e-9 <= truth) & (truth <= boot.high[ok] + 1e-9))
    pooled["normal"].append(np.abs(truth - est.estimate[ok]) <= Z95 * est.se[ok])
    pooled["width"].append(width)
    pooled["narrow"].append(width < 0.5 * se_width - 1e-9)
    # covered by every interval centred on the estimate that respects the floor (half-width >= 0.98·se)
    pooled["floor"].append(np.abs(truth - est.estimate[ok]) <= 0.5 * Z95 * est.se[ok])
    pooled["ref_se"].append(ref.se[ok])
  x = {k: np.concatenate(v) for k, v in pooled.items()}
  rows = []
  for name, select in STRATA:
    s = select(x["agree"], x["ref"])
    rows.append({"stratum": name, "groups": groups, "share": s.mean(), "examples": int(s.sum()),
                 **{k: float(x[k][s].mean()) if s.any() else np.nan for k in ("score", "exact", "boot", "normal", "floor")},
                 "width": float(np.median(x["width"][s])) if s.any() else np.nan,
                 "narrow": int(x["narrow"][s].sum()),
                 "ref_se": float(np.median(x["ref_se"][s])) if s.any() else np.nan})
  return rows


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
      f"Command: `python benchmarks/bootstrap_coverage.py --num-models {args.num_models} --small "
      f"{' '.join(map(str, args.small))} --epochs {args.epochs} --resamples {args.resamples} "
      f"--label-noise {args.label_noise}` "
      f"({platform.machine()}, jax {jax.__version__}, run or resume {seconds:.0f}s). Digits, MLP 128, "
      f"subset ratio 0.7; accuracy {result.summary['accuracy']}.",
      "",
      "| models per interval | stratum | share of examples | examples (all groups) | score interval coverage | "
      "score interval, exact coverage at the reference accuracies | bootstrap (percentile + SE floor) coverage | "
      "normal (Agresti–Caffo) coverage | reference within ±0.98·se (covered by any centred interval at the "
      "width floor) | score interval median width | score intervals narrower than half "
      "their SE-based one | reference median SE |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for small in args.small:
    for t in coverage_table(keep, correct, small, args.resamples, args.seed):
      lines.append(f"| {small} ({t['groups']} groups) | {t['stratum']} | {t['share']:.3f} | {t['examples']} | "
                   f"{t['score']:.3f} | {t['exact']:.3f} | {t['boot']:.3f} | {t['normal']:.3f} | {t['floor']:.3f} | {t['width']:.3f} | "
                   f"{t['narrow']} | {t['ref_se']:.3f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.write:
    Path(args.write).write_text(text)


if __name__ == "__main__":
  main()
