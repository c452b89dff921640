"""Attack power against the number of reference models: ``jaxmem study attack-refs RUN``.

RMIA (Zarifzadeh et al. 2024) claims to beat LiRA (Carlini et al. 2022) with 1-4 reference models;
its users could not reproduce that because they trained too few models. A jaxmem run already holds
hundreds, so the whole curve can be measured on the same targets:

* targets: the run's models chosen as LiRA's pooled attack chooses them (seeded, 16 by default);
* a tuning model (RMIA's a), neither target nor reference, drawn once
  (:func:`jaxmem.scores.rmia.pick_tuner`);
* for each target, the other models in a seeded random order; the K references are the first K of
  that order (nested: the 4 references include the 2), "all" is every model but the target and
  the tuning model;
* attacks, each from the same K references: LiRA online, online with fixed variance, offline
  (one-sided, eq. 4) and offline with fixed variance, RMIA online and offline (a tuned per target
  and K on the tuning model with the same references), and the global threshold (needs no
  reference; the same at every K).

With random subsets an example may have too few IN or OUT references among K for some attack:
LiRA's per-example Gaussians need 2 of each group it uses, the fixed-variance variants need 1 (the
pooled σ needs some example with 2), RMIA fills a missing group from its a-relation. Each attack is
evaluated on the (target, example) pairs it can score, and ``coverage`` says which fraction that
is, so a number at small K is never silently about a different set of examples.

All attacks use the plain query's margin (a run with ``--queries 2|18`` also records augmented
copies; LiRA's own estimator averages over them, this comparison does not, since RMIA takes one
probability per example).

Metrics: AUC and TPR at 0.1% and 1% FPR with 95% bootstrap intervals over examples
(:func:`jaxmem.scores.attack_metrics.bootstrap_attack_metrics`) and the ε lower bound
(:mod:`jaxmem.scores.privacy_bounds`, δ = 1e-5 by default).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxmem.errors import JaxmemError
from jaxmem.scores.attack_metrics import bootstrap_attack_metrics, tpr_key
from jaxmem.scores.lira import GaussianFits, choose_targets, fit_gaussians, lira_scores
from jaxmem.scores.privacy_bounds import DEFAULT_DELTA, POOLED_CAVEAT, eps_lower_bound
from jaxmem.scores.rmia import DEFAULT_GAMMA, attack_with_references, check_single_ratio, pick_tuner, tune_offline_a
from jaxmem.records import RunDir, atomic_path, write_bytes_atomic, write_json_atomic
from jaxmem.scoring import rows_to_csv

ATTACKS = ("lira_online", "lira_online_fixed_variance", "lira_offline", "lira_offline_fixed_variance",
           "rmia_online", "rmia_offline", "global_threshold")
COLUMNS = ("refs", "attack", "auc", "auc_low", "auc_high", "tpr_at_0.1pct_fpr", "tpr_at_1pct_fpr",
           "eps_lower_bound", "tpr_at_0.1pct_fpr_low", "tpr_at_0.1pct_fpr_high", "pairs", "coverage", "rmia_a_median")
DEFAULT_REFS = "1,2,4,8,16,64,all"
ORDER_TAG = 0xA77  # separates the reference orders from other seeded draws


def parse_refs(text: str, num_models: int) -> list[int]:
  """"1,2,4,all" → sorted distinct counts; "all" is every model but a target and the tuning model."""
  available = num_models - 2
  if available < 1:
    raise JaxmemError(f"attack-refs needs at least 3 models (target, reference, tuning model), the run has {num_models}")
  counts = []
  for token in (t.strip() for t in str(text).split(",")):
    if not token:
      continue
    if token == "all":
      counts.append(available)
      continue
    try:
      k = int(token)
    except ValueError:
      raise JaxmemError(f"--refs takes comma-separated counts or 'all', got {token!r}") from None
    if not 1 <= k <= available:
      raise JaxmemError(f"--refs {k}: this run has {num_models} models, so 1 to {available} references "
                        "(all but the target and the tuning model)")
    counts.append(k)
  if not counts:
    raise JaxmemError("--refs is empty; give counts such as 1,2,4,all")
  return sorted(set(counts))


def _lira_reference_scores(target_N: np.ndarray, refs_KxN: np.ndarray, keep_KxN: np.ndarray) -> dict[str, np.ndarray]:
  """LiRA variants of one target from K references. Per-example variants: :func:`fit_gaussians`
  (2 models per group). Fixed-variance variants: the means need only one model per group, the
  pooled σ comes from the examples with 2 or more (NaN if there are none)."""
  fits = fit_gaussians(refs_KxN, keep_KxN, min_models=2)
  out = lira_scores(target_N, fits, variants=("online", "offline"))
  n_in, n_out = keep_KxN.sum(0), (~keep_KxN).sum(0)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_in = np.where(n_in > 0, np.where(keep_KxN, refs_KxN, 0).sum(0) / np.maximum(n_in, 1), np.nan)[:, None]
    mean_out = np.where(n_out > 0, np.where(keep_KxN, 0, refs_KxN).sum(0) / np.maximum(n_out, 1), np.nan)[:, None]
  loose = GaussianFits(mean_in, np.full_like(mean_in, np.nan), n_in, mean_out, np.full_like(mean_out, np.nan), n_out,
                       fits.fixed_std_in, fits.fixed_std_out)
  fixed = lira_scores(target_N, loose, variants=("online_fixed_variance", "offline_fixed_variance"))
  return {"lira_online": out["online"], "lira_offline": out["offline"],
          "lira_online_fixed_variance": fixed["online_fixed_variance"],
          "lira_offline_fixed_variance": fixed["offline_fixed_variance"]}


@dataclasses.dataclass
class AttackRefsResult:
  rows: list[dict[str, Any]]
  targets: np.ndarray
  tuner: int
  scores: dict[tuple[int, str], np.ndarray] = dataclasses.field(default_factory=dict)  # (K, attack) -> (targets, N)
  members: np.ndarray | None = None   # (targets, N)
  out: Path | None = None
  table: Path | None = None
  plot: Path | None = None


def attack_refs(margin_MxN: np.ndarray, keep_MxN: np.ndarray, test_margin_MxZ: np.ndarray, *,
                refs: Sequence[int], targets: int | str | Sequence[int] | None = None, seed: int = 0,
                num_bootstrap: int = 200, gamma: float = DEFAULT_GAMMA, delta: float = DEFAULT_DELTA,
                log: Callable[[str], None] = lambda m: None) -> AttackRefsResult:
  """The table of :data:`COLUMNS` for every K in ``refs`` and every attack in :data:`ATTACKS`."""
  margin_MxN = np.asarray(margin_MxN, np.float64)
  keep_MxN = np.asarray(keep_MxN, bool)
  test_margin_MxZ = np.asarray(test_margin_MxZ, np.float64)
  m, n = margin_MxN.shape
  chosen = choose_targets(m, targets, seed)
  if len(chosen) >= m - 1:
    raise JaxmemError(f"attack-refs needs a model that is neither target nor reference to tune RMIA's a: "
                      f"use fewer than {m - 1} targets")
  tuner = pick_tuner(m, chosen, seed)
  orders = []
  for t in chosen:
    others = np.setdiff1d(np.arange(m), [t, tuner])
    orders.append(np.random.default_rng([seed, ORDER_TAG, int(t)]).permutation(others))
  members = keep_MxN[chosen]
  rows, all_scores = [], {}
  for k in refs:
    scores = {name: np.full((len(chosen), n), np.nan) for name in ATTACKS}
    a_values = []
    for row, (t, order) in enumerate(zip(chosen, orders)):
      ref = order[:k]
      for name, value in _lira_reference_scores(margin_MxN[t], margin_MxN[ref], keep_MxN[ref]).items():
        scores[name][row] = value
      a, _ = tune_offline_a(margin_MxN[tuner], keep_MxN[tuner], margin_MxN[ref], keep_MxN[ref],
                            test_margin_MxZ[tuner], test_margin_MxZ[ref], gamma=gamma)
      a_values.append(a)
      for name, value in attack_with_references(margin_MxN[t], margin_MxN[ref], keep_MxN[ref], test_margin_MxZ[t],
                                                test_margin_MxZ[ref], a=a, gamma=gamma).items():
        scores[name][row] = value
      scores["global_threshold"][row] = margin_MxN[t]
    for name in ATTACKS:
      s = all_scores[(int(k), name)] = scores[name]
      scored = ~np.isnan(s)
      if scored.any():
        metrics = bootstrap_attack_metrics(s, members, num_bootstrap=num_bootstrap, seed=seed)
        eps = eps_lower_bound(s, members, delta=delta, seed=seed)
      else:   # no pair has enough references of each group for this attack at this K
        metrics = {key: {"value": np.nan, "low": np.nan, "high": np.nan}
                   for key in ("auc", tpr_key(0.001), tpr_key(0.01))}
        eps = {"eps": np.nan}
      rows.append({
          "refs": int(k), "attack": name, "auc": metrics["auc"]["value"], "auc_low": metrics["auc"]["low"],
          "auc_high": metrics["auc"]["high"], "tpr_at_0.1pct_fpr": metrics[tpr_key(0.001)]["value"],
          "tpr_at_1pct_fpr": metrics[tpr_key(0.01)]["value"], "eps_lower_bound": eps["eps"],
          "tpr_at_0.1pct_fpr_low": metrics[tpr_key(0.001)]["low"],
          "tpr_at_0.1pct_fpr_high": metrics[tpr_key(0.001)]["high"],
          "pairs": int(scored.sum()), "coverage": float(scored.mean()),
          "rmia_a_median": float(np.median(a_values)) if name.startswith("rmia") else float("nan")})
    log(f"refs {k}: " + ", ".join(f"{r['attack']} {r['auc']:.3f}" for r in rows[-len(ATTACKS):]))
  return AttackRefsResult(rows, chosen, tuner, all_scores, members)



def plot_attack_refs(rows: Sequence[dict[str, Any]], path, *, all_label: int | None = None) -> None:
  """AUC and TPR@0.1%FPR against K with bootstrap intervals, one line per attack."""
  fig = Figure(figsize=(10, 4))
  FigureCanvasAgg(fig)
  panels = (("auc", "auc_low", "auc_high", "AUC"),
            ("tpr_at_0.1pct_fpr", "tpr_at_0.1pct_fpr_low", "tpr_at_0.1pct_fpr_high", "TPR at 0.1% FPR"))
  for col, (key, low, high, label) in enumerate(panels):
    ax = fig.add_subplot(1, 2, col + 1)
    for i, attack in enumerate(ATTACKS):
      pts = [r for r in rows if r["attack"] == attack and np.isfinite(r[key])]
      if not pts:
        continue
      k = np.array([r["refs"] for r in pts], float)
      y = np.array([r[key] for r in pts])
      err = np.array([[max(r[key] - r[low], 0) for r in pts], [max(r[high] - r[key], 0) for r in pts]])
      err = np.nan_to_num(err)
      ax.errorbar(k * (1 + 0.03 * (i - 3)), y, yerr=err, marker="o", ms=3, capsize=2, lw=1,
                  ls="--" if attack == "global_threshold" else "-", label=attack.replace("_", " "))
    ax.set_xscale("log")
    ax.set_xlabel("reference models K" + (f" (all = {all_label})" if all_label else ""))
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  fig.axes[0].legend(fontsize=7)
  fig.suptitle("Attack power vs reference models (95% bootstrap intervals over examples)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110, format="png")


def attack_refs_study(run_dir: str | Path, out: str | Path | None = None, *, refs: str = DEFAULT_REFS,
                      targets: int | str | None = None, seed: int = 0, num_bootstrap: int = 200,
                      gamma: float = DEFAULT_GAMMA, delta: float = DEFAULT_DELTA,
                      log: Callable[[str], None] = lambda m: None) -> AttackRefsResult:
  """Reads the run's margins, runs :func:`attack_refs`, writes ``attack_refs.csv``,
  ``attack_refs.png`` and ``attack_refs.json`` into ``out`` (default RUN_DIR/attack_refs)."""
  run = RunDir.open(run_dir)
  records = run.load_records()
  check_single_ratio(records.subset_ratio, "attack-refs")
  for name in ("train_margin", "test_margin"):
    if name not in records:
      raise JaxmemError(f"attack-refs needs the record {name}, which {run_dir} did not record")
  margin = np.asarray(records.read("train_margin"), np.float64)
  if margin.ndim == 3:
    margin = margin[..., 0]   # the plain query: RMIA uses one probability per example
  counts = parse_refs(refs, records.num_models)
  result = attack_refs(margin, records.read("keep"), records.read("test_margin"), refs=counts, targets=targets,
                       seed=seed, num_bootstrap=num_bootstrap, gamma=gamma, delta=delta, log=log)
  out = Path(out) if out is not None else run.path / "attack_refs"
  out.mkdir(parents=True, exist_ok=True)
  result.out, result.table, result.plot = out, out / "attack_refs.csv", out / "attack_refs.png"
  write_bytes_atomic(result.table, rows_to_csv(result.rows, COLUMNS))
  with atomic_path(result.plot) as tmp:
    plot_attack_refs(result.rows, tmp, all_label=records.num_models - 2)
  write_json_atomic(out / "attack_refs.json", {
      "run": str(run.path), "models": records.num_models, "targets": result.targets.tolist(),
      "tuning_model": result.tuner, "refs": counts, "seed": seed, "num_bootstrap": num_bootstrap, "gamma": gamma,
      "delta": delta, "eps_caveat": POOLED_CAVEAT, "rows": result.rows})
  return result


def format_rows(rows: Sequence[dict[str, Any]]) -> list[str]:
  lines = [f"{'refs':>5} {'attack':<28} {'AUC [95% CI]':>22} {'TPR@0.1%FPR':>12} {'TPR@1%FPR':>10} {'eps>=':>6} {'coverage':>9}"]
  for r in rows:
    lines.append(f"{r['refs']:>5} {r['attack']:<28} {r['auc']:.3f} [{r['auc_low']:.3f}, {r['auc_high']:.3f}] "
                 f"{r['tpr_at_0.1pct_fpr']:>12.3f} {r['tpr_at_1pct_fpr']:>10.3f} {r['eps_lower_bound']:>6.2f} "
                 f"{r['coverage']:>9.2f}")
  return lines
