"""Smoke tests of the benchmark harness at a tiny size (timings themselves are not asserted)."""

import numpy as np
import pytest

from jaxmem import RunConfig, bench
from jaxmem.cli import main
from jaxmem.data import load_dataset
from jaxmem.errors import JaxmemError


def test_model_flops_match_the_closed_form_for_an_mlp():
  """3 x (2 x multiply-adds of the three dense layers) per example seen, plus the small
  elementwise work XLA also counts (bias adds, ReLU): within 3% of the matmul count."""
  dataset = load_dataset("digits")
  config = RunConfig(epochs=5)
  matmul_flops = 2 * (64 * 256 + 256 * 256 + 256 * 10)
  expected = 3 * matmul_flops * 5 * 100
  counted = bench.training_flops_per_model(config, dataset, subset_size=100)
  assert expected <= counted <= 1.03 * expected


def test_bench_runs_every_variant_side_by_side(monkeypatch):
  monkeypatch.setattr(bench, "torch_available", lambda: False)  # CI has no torch: skipped, said so
  result = bench.bench("digits-mlp", quick=True, repeats=2, strategies=["vmap", "auto"],
                       baselines=["jax-step-loop", "torch-loop"], engine_models=3, loop_models=1, epochs=1,
                       peak_size=256)
  assert [r.variant for r in result.rows] == ["engine:vmap", "engine:auto", "jax-step-loop"]
  assert [r.models for r in result.rows] == [3, 3, 1]
  assert "PyTorch is not installed" in result.skipped["torch-loop"]
  for row in result.rows:
    assert len(row.seconds) == 2 and row.median > 0 and row.first_call_seconds > 0
    assert len(row.record_seconds) == 2 and 0 < np.median(row.record_seconds) < row.median
  assert result.row("engine:auto").note.startswith("auto chose ")
  assert result.peak_flops > 0 and result.model_flops > 0
  table = bench.format_table(result)
  assert "engine:auto" in table and "x jax-step-loop" in table and "skipped torch-loop" in table
  ceiling = result.peak_flops / result.model_flops  # every FLOP at the measured peak
  step_loop = result.row("jax-step-loop").models_per_second
  assert f"ceiling at 100% of the peak: {ceiling:.2f} models/s = {ceiling / step_loop:.2f}x jax-step-loop" in table


def test_cli_bench_prints_the_table(capsys, tmp_path):
  code = main(["bench", "--quick", "--workloads", "digits-cnn", "--models", "2", "--loop-models", "1",
               "--epochs", "1", "--repeats", "1", "--strategies", "map", "--baselines", "jax-model-loop",
               "--out", str(tmp_path / "bench.txt")])
  assert code == 0
  out = capsys.readouterr().out
  assert "workload digits-cnn" in out and "engine:map" in out and "jax-model-loop" in out
  assert (tmp_path / "bench.txt").read_text().strip() == out.strip()
  assert (tmp_path / "bench.txt.json").is_file()


def test_unknown_workload_and_baseline_are_one_line_errors():
  with pytest.raises(JaxmemError, match="unknown workload 'nope'; choose one of: digits-mlp"):
    bench.bench("nope")
  with pytest.raises(JaxmemError, match="unknown baseline"):
    bench.bench("digits-mlp", baselines=["numpy-loop"])


def test_shift_conv_is_nn_conv_with_the_same_parameters():
  """The CNN's matmul convolution (the engine's default on CPU) has nn.Conv's parameter tree and
  initial values and computes the same function, also on 1-pixel-high 'images' of vectors."""
  import jax
  import jax.numpy as jnp
  from jaxmem.models import CNN
  for shape in ((3, 7, 6, 2), (3, 20)):
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    plain, shift = CNN(10, (4, 8), conv="xla"), CNN(10, (4, 8), conv="shift")
    params = plain.init(jax.random.PRNGKey(0), x)
    jax.tree.map(np.testing.assert_array_equal, params, shift.init(jax.random.PRNGKey(0), x))
    np.testing.assert_allclose(shift.apply(params, x), plain.apply(params, x), rtol=1e-5, atol=1e-5)
    grad = lambda model: jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grad(shift), grad(plain))
