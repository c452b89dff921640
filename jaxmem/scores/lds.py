"""Linear datamodeling score (LDS; Park et al. 2023, "TRAK: Attributing Model Behavior at Scale",
§2 eq. 3-4) of data attributions, measured on the run's own subset models.

Definition: an attribution matrix τ (N training × T test examples) predicts the output of a model
trained on subset S as g_S(j) = Σ_{i∈S} τ[i, j]. For held-out models m with masks S_m and outputs
f_m(x_j) (the test margin),

  LDS_j = Spearman_m( g_{S_m}(j), f_m(x_j) ),   LDS = mean_j LDS_j.

TRAK's quickstart retrains 10,000 models to measure it and dattri's ``retrain_lds`` 100; a jaxmem
run already has hundreds of subset models. They are split in two with a seed: attributions are
computed on the *estimation* half and the LDS on the *evaluation* half, so no model both fits and
judges an attribution.

Attribution methods built in:

* ``influence_correctness``: Feldman & Zhang (2020) eq. 6 on the estimation half, infl(i → j) =
  P[f(x_j) = y_j | i ∈ S] − P[f(x_j) = y_j | i ∉ S] (the ``influence`` estimator's quantity);
* ``influence_margin``: the same in−out difference of the test margin (eq. 7 with M = margin);
* ``datamodels`` (Ilyas et al. 2022, "Datamodels: Predicting Predictions from Training Data"):
  per test example a regularized linear regression of f_m(x_j) on the mask row S_m. Deviation:
  Ilyas et al. fit ℓ1 (lasso) with a cross-validated penalty on 300,000 models; with a few hundred
  models jaxmem fits ridge (ℓ2), whose solution for all T test examples is one eigendecomposition
  of the M×M Gram matrix of the centred masks, on the device; the penalty λ is shared by all test
  examples and picked on a grid by the exact leave-one-out error of ridge (the hat-matrix identity),
  so no model of the evaluation half is used to choose it;
* ``random``: Gaussian scores (seeded), the baseline that should give LDS ≈ 0;
* any (N, T) matrix a user brings (``--attribution FILE.npy``).

A test example whose prediction g or output f is constant over the evaluation models has no rank
correlation (e.g. influence on correctness is exactly 0 for a test example every estimation model
gets right); it is left out, and ``test_examples_used`` says how many remain. The interval is a
percentile bootstrap over test examples (resampled with replacement, seeded).

Differences from TRAK's / dattri's LDS code: they correlate over models the *sum over the subset*
with outputs of models retrained for the purpose, usually at one subset ratio (50%); here the
subsets are the run's (70% by default) and the outputs its recorded test margins, so numbers are
comparable across methods on one run but not directly with TRAK's tables.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import rankdata

from jaxmem.errors import JaxmemError
from jaxmem.scores._result import EstimatorResult
from jaxmem.scores._stats import DEFAULT_MEMORY_BUDGET, WORKING_BYTES_PER_VALUE

METHODS = ("influence_correctness", "influence_margin", "datamodels", "random")
RIDGE_GRID: tuple[float, ...] = tuple(10.0 ** k for k in range(-2, 5))
_HIGHEST = jax.lax.Precision.HIGHEST


def split_models(num_models: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Seeded halves of the model rows: (estimation, evaluation), each sorted."""
  if num_models < 4:
    raise JaxmemError(f"LDS needs at least 4 models (two to estimate, two to evaluate), got {num_models}")
  order = np.random.default_rng([seed, 0x1D5]).permutation(num_models)
  half = num_models // 2
  return np.sort(order[:half]), np.sort(order[half:])


@jax.jit
def _in_out_difference_NxT(keep_MxN, values_MxT):
  """mean over models with i of values[:, j] − mean over models without i: (N, T); NaN where a
  group is empty."""
  keep = keep_MxN.astype(jnp.float32)
  n_in = keep.sum(0)[:, None]
  n_out = keep.shape[0] - n_in
  sums_in = jnp.matmul(keep.T, values_MxT, precision=_HIGHEST)
  sums_out = values_MxT.sum(0)[None, :] - sums_in
  # One division of an exact numerator: for 0/1 values the numerator is an integer, so equal in
  # and out rates give exactly 0 (XLA may turn a/b into a·(1/b), and 1 − 1 would then be ±ulp).
  diff = (sums_in * n_out - sums_out * n_in) / jnp.maximum(n_in * n_out, 1)
  return jnp.where((n_in > 0) & (n_out > 0), diff, jnp.nan)


def influence_attribution(keep_MxN: np.ndarray, values_MxT: np.ndarray) -> np.ndarray:
  """Feldman & Zhang in−out influence of every training example on every test value: (N, T)."""
  return np.asarray(_in_out_difference_NxT(jnp.asarray(keep_MxN, bool), jnp.asarray(values_MxT, jnp.float32)),
                    np.float64)


@jax.jit
def _gram(keep_MxB):
  """X Xᵀ of the centred masks of a block of training examples (centring is per example, so the
  Gram matrix of all N is the sum of the blocks')."""
  x = keep_MxB.astype(jnp.float32)
  x = x - x.mean(0, keepdims=True)
  return jnp.matmul(x, x.T, precision=_HIGHEST)


@jax.jit
def _ridge_dual(gram_MxM, outputs_MxT, lambdas_L):
  """Exact leave-one-out errors of ridge (with an unpenalized intercept) for every λ, and the dual
  coefficients α = (X Xᵀ + λ I)⁻¹ Y of the λ with the least error (only that one: all of them
  would be an (L, M, T) array), from the M×M Gram matrix of the centred masks.

  With centred masks X (M, N) and centred outputs Y (M, T), W(λ) = Xᵀ α(λ) (the dual form: M ≪ N in
  a run). X Xᵀ = U diag(s) Uᵀ gives every λ from one eigendecomposition. The hat matrix is
  H = 11ᵀ/M + U diag(s/(s + λ)) Uᵀ (the first term: the intercept), so with w_k = λ/(s_k + λ) (1 on
  the null space of X Xᵀ, which holds the 1 direction): y − ŷ = U diag(w) Uᵀ Y and
  1 − H_mm = Σ_k U_mk² w_k − 1/M. Both are computed from w, not as 1 − (something close to 1),
  which float32 would round away at small λ; the leave-one-out residual is (y − ŷ)_m / (1 − H_mm).
  Returns ``(alpha_MxT, loo_L, best)``; ``best`` is the first λ of least error (NaN errors skipped).
  """
  m = gram_MxM.shape[0]
  y = outputs_MxT - outputs_MxT.mean(0, keepdims=True)
  s, u = jnp.linalg.eigh(gram_MxM)
  live = s > 1e-5 * jnp.max(s)                    # the rest is the null space (rounding noise around 0)
  s = jnp.where(live, s, 0.0)
  uty = jnp.matmul(u.T, y, precision=_HIGHEST)

  def loo_error(lam):
    w = jnp.where(live, lam / (s + lam), 1.0)
    residual = jnp.matmul(u, w[:, None] * uty, precision=_HIGHEST)
    one_minus_hat = jnp.sum(u * u * w[None, :], axis=1) - 1.0 / m
    loo = residual / one_minus_hat[:, None]
    return jnp.mean(loo ** 2)

  loo_L = jax.lax.map(loo_error, lambdas_L)
  best = jnp.nanargmin(loo_L)
  alpha = jnp.matmul(u, jnp.where(live, 1.0 / (s + lambdas_L[best]), 0.0)[:, None] * uty, precision=_HIGHEST)
  return alpha, loo_L, best


@jax.jit
def _dual_weights(keep_MxB, alpha_MxT):
  """Ridge weights Xᵀ α of a block of training examples: (B, T)."""
  x = keep_MxB.astype(jnp.float32)
  x = x - x.mean(0, keepdims=True)
  return jnp.matmul(x.T, alpha_MxT, precision=_HIGHEST)


def ridge_fit(gram_MxM: np.ndarray, outputs_MxT: np.ndarray, *, lambdas=RIDGE_GRID) -> tuple[np.ndarray, dict[str, Any]]:
  """The dual coefficients α (M, T) of the λ in ``lambdas`` with the least leave-one-out error, and
  ``{"lambda", "loo_mse_by_lambda"}``; weights of a block of examples are ``_dual_weights(keep, α)``."""
  grid = jnp.asarray(np.asarray(lambdas, np.float32))
  alpha_MxT, loo_L, best = _ridge_dual(jnp.asarray(gram_MxM, jnp.float32), jnp.asarray(outputs_MxT, jnp.float32), grid)
  loo = np.asarray(loo_L, np.float64)
  best = int(best)
  return (np.asarray(alpha_MxT),
          {"lambda": float(lambdas[best]), "loo_mse_by_lambda": {f"{lam:g}": float(v) for lam, v in zip(lambdas, loo)}})


def datamodels(keep_MxN: np.ndarray, outputs_MxT: np.ndarray, *, lambdas=RIDGE_GRID) -> tuple[np.ndarray, dict[str, Any]]:
  """Ridge datamodels: weights (N, T) of each test output on the training masks (intercept not
  returned; it does not change rank correlations over models), with λ chosen by leave-one-out
  error over ``lambdas``. Returns the weights and ``{"lambda", "loo_mse_by_lambda"}``."""
  keep_MxN = np.asarray(keep_MxN, bool)
  outputs = np.asarray(outputs_MxT, np.float32)
  if keep_MxN.shape[0] != outputs.shape[0]:
    raise JaxmemError(f"datamodels: {keep_MxN.shape[0]} mask rows but {outputs.shape[0]} output rows")
  alpha_MxT, info = ridge_fit(_gram(jnp.asarray(keep_MxN)), outputs, lambdas=lambdas)
  return np.asarray(_dual_weights(jnp.asarray(keep_MxN), jnp.asarray(alpha_MxT)), np.float64), info


def _column_spearman(a_MxT: np.ndarray, b_MxT: np.ndarray) -> np.ndarray:
  """Spearman correlation of every column pair over rows (average ranks for ties); NaN where a
  column is constant or has a NaN."""
  bad = np.isnan(a_MxT).any(0) | np.isnan(b_MxT).any(0)
  ra = rankdata(np.nan_to_num(a_MxT), axis=0)
  rb = rankdata(np.nan_to_num(b_MxT), axis=0)
  ra, rb = ra - ra.mean(0), rb - rb.mean(0)
  den = np.sqrt((ra ** 2).sum(0) * (rb ** 2).sum(0))
  with np.errstate(invalid="ignore", divide="ignore"):
    rho = (ra * rb).sum(0) / den
  return np.where(bad | (den == 0), np.nan, rho)


def lds_per_test(attribution_NxT: np.ndarray, keep_MxN: np.ndarray, outputs_MxT: np.ndarray) -> np.ndarray:
  """LDS_j for every test example j: (T,), NaN where undefined (see the module docstring)."""
  attribution_NxT = np.asarray(attribution_NxT, np.float64)
  keep_MxN = np.asarray(keep_MxN, bool)
  outputs_MxT = np.asarray(outputs_MxT, np.float64)
  n, t = keep_MxN.shape[1], outputs_MxT.shape[1]
  if attribution_NxT.shape != (n, t):
    raise JaxmemError(f"an attribution matrix must be (training examples, test examples) = ({n}, {t}), "
                      f"got {attribution_NxT.shape}")
  # NaN attributions (an example no estimation model held out) count as 0: they predict nothing.
  predicted_MxT = keep_MxN.astype(np.float64) @ np.nan_to_num(attribution_NxT)
  return _column_spearman(predicted_MxT, outputs_MxT)


def summarize_lds(per_test_T: np.ndarray, *, num_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
  """Mean LDS over the test examples where it is defined, with a percentile bootstrap interval."""
  values = per_test_T[np.isfinite(per_test_T)]
  out = {"lds": float("nan"), "lds_low": float("nan"), "lds_high": float("nan"),
         "test_examples_used": int(values.size), "test_examples": int(per_test_T.size)}
  if values.size == 0:
    return out
  rng = np.random.default_rng([seed, 0xB007])
  draws = values[rng.integers(0, values.size, (num_bootstrap, values.size))].mean(1) if num_bootstrap else np.zeros(0)
  tail = 100 * (1 - level) / 2
  out["lds"] = float(values.mean())
  if draws.size:
    out["lds_low"], out["lds_high"] = (float(v) for v in np.percentile(draws, [tail, 100 - tail]))
  return out


def lds_report(keep_MxN, test_correct_MxT, test_margin_MxT, *, attribution_NxT=None, seed: int = 0,
               num_bootstrap: int = 1000, methods=METHODS, num_train: int | None = None,
               block_size: int | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Every method's LDS on the evaluation half, attributions from the estimation half: the summary
  ``{method: {lds, lds_low, lds_high, test_examples_used, test_examples, ...}, "settings": {...}}``
  (``external`` for ``attribution_NxT``) and each method's LDS per test example (T,).

  No (N, T) attribution is ever held whole: for each block of training examples every method's
  block of attributions is computed and its contribution ``keep_eval[:, block] @ τ[block]`` added
  to the evaluation models' predictions (M/2, T) in float64; the datamodels' ridge fit needs only
  the M×M Gram matrix of the masks, summed over blocks first. ``keep_MxN`` is an array or a
  callable ``read_keep(block) -> keep_MxB`` (with ``num_train``); ``block_size`` defaults to what
  fits :data:`jaxmem.scores._stats.DEFAULT_MEMORY_BUDGET`. The random baseline's Gaussians are
  drawn block after block from one seeded generator, the same numbers as one (N, T) draw."""
  for method in methods:
    if method not in METHODS:
      raise JaxmemError(f"unknown attribution method {method!r}; choose from: {', '.join(METHODS)}")
  if callable(keep_MxN):
    read_keep, n = keep_MxN, int(num_train)
  else:
    keep_whole = np.asarray(keep_MxN, bool)
    read_keep, n = (lambda block: keep_whole[:, block]), keep_whole.shape[1]
  test_margin_MxT = np.asarray(test_margin_MxT)
  m, t = test_margin_MxT.shape
  if attribution_NxT is not None and np.shape(attribution_NxT) != (n, t):
    raise JaxmemError(f"an attribution matrix must be (training examples, test examples) = ({n}, {t}), "
                      f"got {np.shape(attribution_NxT)}")
  estimate, evaluate = split_models(m, seed)
  margin_est = test_margin_MxT[estimate].astype(np.float32)
  correct_est = np.asarray(test_correct_MxT, np.float32)[estimate]
  if block_size is None:
    # per example: every method's (T,) attributions as float32 on the device and float64 on the
    # host, the kernel's temporaries, and the masks with their working copies
    per_example = t * (len(methods) + 1) * (4 + 8 + 12) + m * (1 + WORKING_BYTES_PER_VALUE)
    block_size = max(1, DEFAULT_MEMORY_BUDGET // per_example)
  blocks = [slice(start, min(start + int(block_size), n)) for start in range(0, n, int(block_size))]
  details: dict[str, Any] = {}
  alpha_MxT = None
  if "datamodels" in methods:
    gram_MxM = None
    for block in blocks:
      part = np.asarray(_gram(jnp.asarray(np.asarray(read_keep(block), bool)[estimate])), np.float64)
      gram_MxM = part if gram_MxM is None else gram_MxM + part
    alpha_MxT, details["datamodels"] = ridge_fit(gram_MxM.astype(np.float32), margin_est)
  rng = np.random.default_rng([seed, 0x5A4D])
  names = [*methods, *(["external"] if attribution_NxT is not None else [])]
  predicted = {name: np.zeros((len(evaluate), t), np.float64) for name in names}
  for block in blocks:
    keep_MxB = np.asarray(read_keep(block), bool)
    keep_est = jnp.asarray(keep_MxB[estimate])
    keep_eval = keep_MxB[evaluate].astype(np.float64)
    for name in names:
      if name == "influence_correctness":
        tau_BxT = np.asarray(_in_out_difference_NxT(keep_est, jnp.asarray(correct_est)), np.float64)
      elif name == "influence_margin":
        tau_BxT = np.asarray(_in_out_difference_NxT(keep_est, jnp.asarray(margin_est)), np.float64)
      elif name == "datamodels":
        tau_BxT = np.asarray(_dual_weights(keep_est, jnp.asarray(alpha_MxT)), np.float64)
      elif name == "random":
        tau_BxT = rng.normal(size=(block.stop - block.start, t))
      else:
        tau_BxT = np.asarray(attribution_NxT[block], np.float64)
      # NaN attributions (an example no estimation model held out) count as 0: they predict nothing.
      predicted[name] += keep_eval @ np.nan_to_num(tau_BxT)
  out: dict[str, Any] = {"settings": {"estimation_models": int(estimate.size), "evaluation_models": int(evaluate.size),
                                      "seed": seed, "output": "test margin", "num_bootstrap": num_bootstrap}}
  per_test: dict[str, np.ndarray] = {}
  outputs_eval = test_margin_MxT[evaluate].astype(np.float64)
  columns = max(1, int(block_size))  # rank correlations of a block of test columns at a time: each is its own
  for name in names:
    per_test[name] = np.concatenate([_column_spearman(predicted[name][:, j: j + columns], outputs_eval[:, j: j + columns])
                                     for j in range(0, t, columns)]) if t else np.zeros(0)
    del predicted[name]
    out[name] = {**summarize_lds(per_test[name], num_bootstrap=num_bootstrap, seed=seed), **details.get(name, {})}
  return out, per_test


def per_test_table(per_test: dict[str, np.ndarray], test_labels_T: np.ndarray) -> dict[str, np.ndarray]:
  """Columns of ``lds_per_test.csv``: ``test_index, test_label`` and one LDS column per method
  (NaN where undefined: an empty cell)."""
  labels = np.asarray(test_labels_T, np.int64)
  return {"test_index": np.arange(len(labels), dtype=np.int64), "test_label": labels,
          **{method: np.asarray(v, np.float64) for method, v in per_test.items()}}


def lds_estimator(records, *, context=None, attribution=None, seed: int = 0, num_bootstrap: int = 1000) -> EstimatorResult:
  """Adapter: the summary (each method's LDS with its interval, written as ``lds.json``) and the
  table ``lds_per_test`` (LDS of every test example) of the built-in attributions and of
  ``attribution``, an (N, T) array."""
  # keep is read one block of training examples at a time; only the (M, T) test records are whole
  summary, per_test = lds_report(lambda block: records.read("keep", examples=block), records.read("test_correct"),
                                 records.read("test_margin"), attribution_NxT=attribution, seed=seed,
                                 num_bootstrap=num_bootstrap, num_train=records.num_train)
  return EstimatorResult(summary=summary, tables={"lds_per_test": per_test_table(per_test, records.test_labels)})
