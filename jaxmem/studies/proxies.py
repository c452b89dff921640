"""How well cheap proxies track memorization, and at what cost: ``jaxmem study proxies RUN``.

For each k in ``--models`` (default 1, 4, 16), every proxy of :mod:`jaxmem.scores.proxies` is
computed from k of the run's models (the same k for every proxy: a seeded order that puts the
models whose parameters were kept first, since curvature needs parameters) and compared, over the
training examples it covers, with the run's memorization estimated from all M models:

* Spearman and Pearson correlation with memorization, with 95% percentile bootstrap intervals over
  examples;
* AUROC for finding the flipped labels (``--label-noise`` runs; the ground truth of memorization);
* cost in model-epochs: k·E (k models trained for E epochs; a proxy needs the models it is computed
  from) against M·E for the full estimate. Curvature also needs (1 + draws) input-gradient passes
  over the training set per model, a small fraction of an epoch's training for these models.

``memorization_k`` (the subsampled estimator itself from the same k models, NaN where an example
has no IN or no OUT model among them) is reported beside the proxies as the baseline that costs
the same. Caveat: the k models are also part of the M behind the reference memorization, so
correlations at small k are slightly optimistic for every row alike.

Curvature needs parameters. By default it uses the final parameters of the models the run kept
(``--keep-params``), averaged over the kept ones among the k (``models_used`` says how many). With
``curvature_epochs`` (``--curvature-epochs 10,20,30``), or when the run kept none, the k models are
trained again with the run's recipe — the same model ids, masks and keys, so the same models — and
curvature is taken after each of those epochs and averaged, as Garg et al. average over training
checkpoints (:class:`EpochParams` captures the parameters through the engine's checkpoint hooks,
without writing anything).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from scipy.stats import pearsonr, rankdata

from jaxmem.config import RunConfig
from jaxmem.data import load_run_dataset
from jaxmem.engine.trainer import Engine, standardize
from jaxmem.errors import JaxmemError
from jaxmem.models import build_model
from jaxmem.scores._stats import auroc
from jaxmem.scores.memorization import memorization
from jaxmem.scores.proxies import DEFAULT_DRAWS, DEFAULT_H, cumulative_sample_loss, input_curvature, learning_time
from jaxmem.records import RunDir, kept_param_models, load_model_params, write_bytes_atomic, write_json_atomic
from jaxmem.scoring import rows_to_csv

COLUMNS = ("models", "proxy", "models_used", "examples_used", "spearman", "spearman_low", "spearman_high",
           "pearson", "pearson_low", "pearson_high", "auroc_flipped", "auroc_flipped_low", "auroc_flipped_high",
           "cost_model_epochs", "full_cost_model_epochs", "cost_ratio")
ORDER_TAG = 0x9C5


class EpochParams:
  """Collects the parameters of a chunk in training after chosen epochs, through the hooks
  :meth:`jaxmem.engine.trainer.Engine.train_chunk` calls on a checkpoint (``restore``, ``due``,
  ``save``): nothing is restored and nothing is written; ``params[epoch]`` is a host pytree with
  the chunk's (padded) model axis first."""

  def __init__(self, epochs: Sequence[int]):
    self.epochs = set(int(e) for e in epochs)
    self.params: dict[int, Any] = {}

  def restore(self, state_like):
    return None

  def due(self, epochs_done: int) -> bool:
    return epochs_done in self.epochs

  def save(self, epochs_done: int, state, history, *, wait: bool = False) -> None:
    self.params[int(epochs_done)] = jax.device_get(state.params)


def retrained_params(dataset, config: RunConfig, model_ids: Sequence[int], keep_KxN: np.ndarray,
                     epochs: Sequence[int], *, log: Callable[[str], None] = lambda m: None) -> dict[int, list[Any]]:
  """The run's recipe trained again for these models (same ids and masks: the same models):
  ``{epoch: [params of model k]}`` after each epoch in ``epochs`` (1..E)."""
  wanted = sorted(set(int(e) for e in epochs))
  if not wanted or wanted[0] < 1 or wanted[-1] > config.epochs:
    raise JaxmemError(f"curvature epochs must be between 1 and the run's {config.epochs} epochs, got {list(epochs)}")
  engine = Engine(dataset, config.replace(record_epochs=False, record_epoch_margin=False, score_epoch=None,
                                          queries=1, keep_params="none"), log=log)
  capture = EpochParams([e for e in wanted if e < config.epochs])
  engine.train_chunk(np.asarray(model_ids), np.asarray(keep_KxN, bool), epochs_per_call=1, checkpoint=capture)
  capture.params[config.epochs] = jax.device_get(engine.last_state.params)
  k = len(model_ids)
  return {e: [jax.tree.map(lambda leaf, i=i: np.asarray(leaf[i]), capture.params[e]) for i in range(k)] for e in wanted}


def model_order(num_models: int, kept_rows: Sequence[int], seed: int) -> np.ndarray:
  """All model rows, the kept-parameter ones first, each group in a seeded random order."""
  rng = np.random.default_rng([seed, ORDER_TAG])
  kept = np.asarray(sorted(kept_rows), np.int64)
  rest = np.setdiff1d(np.arange(num_models), kept)
  return np.concatenate([rng.permutation(kept), rng.permutation(rest)]).astype(np.int64)


def _pearson(a, b) -> float:
  if np.ptp(a) == 0 or np.ptp(b) == 0:
    return float("nan")
  return float(pearsonr(a, b).statistic)


def _spearman(a, b) -> float:
  return _pearson(rankdata(a), rankdata(b))


def agreement(proxy_N: np.ndarray, memorization_N: np.ndarray, noisy_N: np.ndarray, *, num_bootstrap: int = 200,
              seed: int = 0) -> dict[str, float]:
  """Spearman, Pearson (vs memorization) and AUROC (vs flipped labels) over the examples where
  both the proxy and memorization are finite, each with a 95% percentile bootstrap interval."""
  valid = np.isfinite(proxy_N) & np.isfinite(memorization_N)
  p, m, noisy = proxy_N[valid], memorization_N[valid], np.asarray(noisy_N, bool)[valid]
  stats = {"spearman": lambda i: _spearman(p[i], m[i]), "pearson": lambda i: _pearson(p[i], m[i]),
           "auroc_flipped": lambda i: auroc(p[i], noisy[i])}
  out: dict[str, float] = {"examples_used": int(valid.sum())}
  everything = np.arange(p.size)
  rng = np.random.default_rng([seed, 0xB0])
  draws = [rng.integers(0, p.size, p.size) for _ in range(num_bootstrap)] if p.size >= 3 else []
  for name, fn in stats.items():
    out[name] = fn(everything) if p.size >= 3 else float("nan")
    values = np.array([fn(d) for d in draws], float)
    values = values[np.isfinite(values)]
    out[f"{name}_low"], out[f"{name}_high"] = (
        (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))) if values.size else (np.nan, np.nan))
  return out


@dataclasses.dataclass
class ProxiesResult:
  rows: list[dict[str, Any]]
  proxies: dict[int, dict[str, np.ndarray]]   # k -> proxy -> (N,)
  notes: list[str]
  out: Path | None = None
  table: Path | None = None


def proxies_from_records(records, ks: Sequence[int], *, epochs: int, curvature_fn: Callable[[int], np.ndarray] | None = None,
                         kept_rows: Sequence[int] = (), seed: int = 0, num_bootstrap: int = 200,
                         log: Callable[[str], None] = lambda m: None) -> ProxiesResult:
  """The study on records of models trained ``epochs`` epochs; ``curvature_fn(row)`` gives one
  model's curvature (N,) for the rows in ``kept_rows`` (None: no curvature)."""
  keep = np.asarray(records.read("keep"), bool)
  num_models = keep.shape[0]
  for k in ks:
    if not 1 <= k <= num_models:
      raise JaxmemError(f"--models {k}: choose 1 to {num_models} (the run's models)")
  if "train_correct" not in records:
    raise JaxmemError("the proxies study needs train_correct records")
  reference = memorization(keep, records.read("train_correct")).estimate
  noisy = np.asarray(records.noisy, bool)
  has_correct = "train_correct_epochs" in records
  has_margin = "train_margin_epochs" in records
  notes = []
  if not has_correct:
    notes.append("no per-epoch records (--record-epochs): no learning-time proxies")
  if not has_margin:
    notes.append("no per-epoch margins (--record-epoch-margin): no cumulative sample loss")
  if curvature_fn is None or not len(kept_rows):
    notes.append("no kept model parameters (--keep-params): no curvature")
  order = model_order(num_models, kept_rows if curvature_fn is not None else (), seed)
  curvature_cache: dict[int, np.ndarray] = {}
  rows, proxies = [], {}
  for k in ks:
    chosen = np.sort(order[:k])
    keep_k = keep[chosen]
    values: dict[str, np.ndarray] = {}
    used: dict[str, int] = {}
    if has_margin:
      values["cumulative_sample_loss"] = cumulative_sample_loss(keep_k, records.read("train_margin_epochs", models=chosen))
    if has_correct:
      values.update(learning_time(keep_k, records.read("train_correct_epochs", models=chosen)))
    if curvature_fn is not None:
      rows_kept = [r for r in chosen if r in set(kept_rows)]
      if rows_kept:
        for r in rows_kept:
          if r not in curvature_cache:
            curvature_cache[r] = curvature_fn(int(r))
        curv_MxN = np.stack([curvature_cache[r] for r in rows_kept])
        in_MxN = keep[rows_kept]
        with np.errstate(invalid="ignore", divide="ignore"):
          values["curvature"] = np.where(in_MxN.any(0), np.where(in_MxN, curv_MxN, 0).sum(0) / in_MxN.sum(0), np.nan)
        used["curvature"] = len(rows_kept)
    values["memorization_k"] = memorization(keep_k, records.read("train_correct", models=chosen)).estimate
    proxies[k] = values
    for name, proxy in values.items():
      stats = agreement(proxy, reference, noisy, num_bootstrap=num_bootstrap, seed=seed)
      models_used = used.get(name, k)
      rows.append({"models": int(k), "proxy": name, "models_used": models_used, **stats,
                   "cost_model_epochs": models_used * epochs, "full_cost_model_epochs": num_models * epochs,
                   "cost_ratio": models_used / num_models})
    log(f"models {k}: " + ", ".join(f"{r['proxy']} {r['spearman']:.3f}" for r in rows if r["models"] == k))
  return ProxiesResult(rows, proxies, notes)



def proxies_study(run_dir: str | Path, out: str | Path | None = None, *, ks: Sequence[int] = (1, 4, 16),
                  h: float = DEFAULT_H, draws: int = DEFAULT_DRAWS, curvature_epochs: Sequence[int] | None = None,
                  seed: int = 0, num_bootstrap: int = 200, data_dir: str | None = None,
                  log: Callable[[str], None] = lambda m: None) -> ProxiesResult:
  """Runs :func:`proxies_from_records` on a run and writes ``proxies.csv`` and ``proxies.json``
  into ``out`` (default RUN_DIR/proxies). Curvature, on the device: from the kept final
  parameters, or (``curvature_epochs``, or no kept parameters) from the max(ks) models trained
  again, averaged over those epochs."""
  # the options first: they used to be checked only after the models were trained again
  if not h > 0:
    raise JaxmemError(f"curvature step h must be positive, got {h}")
  if not isinstance(draws, (int, np.integer)) or draws < 1:
    raise JaxmemError(f"curvature needs at least one Rademacher draw, got {draws}")
  if not isinstance(num_bootstrap, (int, np.integer)) or num_bootstrap < 2:
    raise JaxmemError(f"bootstrap resamples must be an integer >= 2, got {num_bootstrap!r}")
  run = RunDir.open(run_dir)
  records = run.load_records()
  manifest = run.manifest()
  config = RunConfig.from_dict(manifest["config"])
  kept_ids = kept_param_models(run)
  row_of_id = {int(m): r for r, m in enumerate(records.model_ids)}
  kept_rows = sorted(row_of_id[m] for m in kept_ids if m in row_of_id)
  for k in ks:
    if not 1 <= k <= records.num_models:
      raise JaxmemError(f"--models {k}: choose 1 to {records.num_models} (the run's models)")
  retrain = curvature_epochs is not None or not kept_rows
  if retrain:   # the models to train again: the first max(ks) of the study's order
    kept_rows = sorted(model_order(records.num_models, (), seed)[: max(ks)].tolist())
  dataset = load_run_dataset(manifest, data_dir=data_dir)
  x_train, _ = standardize(dataset)
  model = build_model(config.model, dataset.num_classes, config.model_options, dtype=config.compute_dtype)
  apply_fn = model_apply(model)
  labels = np.asarray(records.train_labels)
  base_key = jax.random.key(seed)
  epochs_used = sorted(set(curvature_epochs or (config.epochs,)))
  params_by_row: dict[int, list[Any]] = {}
  if retrain:
    log(f"proxies: training {len(kept_rows)} models again for curvature after epochs {epochs_used}")
    trained = retrained_params(dataset, config, records.model_ids[kept_rows], records.keep[kept_rows], epochs_used, log=log)
    params_by_row = {row: [trained[e][i] for e in epochs_used] for i, row in enumerate(kept_rows)}

  def curvature_fn(row: int) -> np.ndarray:
    model_id = int(records.model_ids[row])
    checkpoints = params_by_row.get(row) or [load_model_params(run.path, model_id)]
    key = jax.random.fold_in(base_key, model_id)
    return np.mean([input_curvature(apply_fn, params, x_train, labels, jax.random.fold_in(key, e), h=h, num_draws=draws)
                    for e, params in zip(epochs_used, checkpoints)], axis=0)

  result = proxies_from_records(records, ks, epochs=config.epochs, curvature_fn=curvature_fn, kept_rows=kept_rows,
                                seed=seed, num_bootstrap=num_bootstrap, log=log)
  out = Path(out) if out is not None else run.path / "proxies"
  out.mkdir(parents=True, exist_ok=True)
  result.out, result.table = out, out / "proxies.csv"
  write_bytes_atomic(result.table, rows_to_csv(result.rows, COLUMNS))
  write_json_atomic(out / "proxies.json", {
      "run": str(run.path), "models": records.num_models, "epochs": config.epochs, "ks": list(ks), "seed": seed,
      "curvature": {"h": h, "draws": draws, "models": len(kept_rows), "epochs": epochs_used,
                    "parameters": "retrained" if retrain else "kept (final)"},
      "reference": "memorization from all models", "notes": result.notes, "rows": result.rows})
  return result


def model_apply(model):
  """``(params, x) -> logits`` of a flax module; one object per study, so curvature compiles once."""
  return lambda params, x: model.apply({"params": params}, x)


def format_rows(rows: Sequence[dict[str, Any]]) -> list[str]:
  lines = [f"{'k':>4} {'proxy':<24} {'Spearman [95% CI]':>24} {'Pearson [95% CI]':>24} {'AUROC flipped':>24} {'cost':>7}"]
  ci = lambda r, key: f"{r[key]:.3f} [{r[key + '_low']:.3f}, {r[key + '_high']:.3f}]"
  for r in rows:
    lines.append(f"{r['models']:>4} {r['proxy']:<24} {ci(r, 'spearman'):>24} {ci(r, 'pearson'):>24} "
                 f"{ci(r, 'auroc_flipped'):>24} {r['cost_ratio']:>7.3f}")
  return lines
