"""Runs that grow: a rerun with a larger num_models trains only the new models, and its records
equal, bitwise, those of a fresh run with that many models."""

import numpy as np
import pytest

import jaxmem
from jaxmem import RunConfig
from jaxmem.errors import JaxmemError
from jaxmem.run import grow_chunk_plan, plan_chunks

from conftest import jaxmem_cli

# A small MLP on the default data; the slow test below runs the CLI commands on the default model.
BASE = RunConfig(epochs=2, strategy="vmap", chunk_size=8, model_options={"hidden_sizes": (32,)})


def _quiet(config, out, **kwargs):
  return jaxmem.run(config, out, progress=False, log=lambda m: None, **kwargs)


def _export(run_dir, path):
  from jaxmem.records import RunDir, export_records
  export_records(RunDir.open(run_dir).load_records(), path)
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.parametrize("design", ["subset", "balanced"])
def test_grown_run_equals_fresh_run_bitwise(design, tmp_path):
  config = BASE.replace(mask_design=design, subset_ratios=(0.5,) if design == "balanced" else (0.7,))
  first = _quiet(config.replace(num_models=6), tmp_path / "grown")
  assert len(first.trained_chunks) == 1
  grown = _quiet(config.replace(num_models=12), tmp_path / "grown")
  models_trained_now = sum(len(jaxmem.records.RunDir.open(tmp_path / "grown").chunk_plan()[c])
                           for c in grown.trained_chunks)
  assert models_trained_now == 6 and grown.skipped_chunks == [0]
  fresh = _quiet(config.replace(num_models=12), tmp_path / "fresh")
  a = _export(tmp_path / "grown", tmp_path / "grown.npz")
  b = _export(tmp_path / "fresh", tmp_path / "fresh.npz")
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert a["train_margin"].shape == (12, fresh.records.num_train)


def test_shrinking_is_refused_in_one_line(tmp_path):
  config = BASE.replace(num_models=6, epochs=1)
  _quiet(config, tmp_path / "run")
  with pytest.raises(JaxmemError, match=r"^run directory .* holds 6 models; --num-models 4 would shrink it"):
    _quiet(config.replace(num_models=4), tmp_path / "run")


def test_grown_plan_keeps_old_chunks_and_covers_new_models_round_robin():
  old = plan_chunks(10, 2, 4)
  grown = grow_chunk_plan(old, 10, 22, 2, 4)
  assert grown[: len(old)] == old
  new = grown[len(old):]
  assert sorted(m for c in new for m in c) == list(range(10, 22))
  assert all(len({m % 2 for m in c}) == 1 and len(c) <= 4 for c in new)  # one ratio per chunk
  assert [c[0] % 2 for c in new[:2]] == [0, 1]  # round-robin over ratios
  assert grow_chunk_plan(old, 10, 10, 2, 4) == old


@pytest.mark.slow
@pytest.mark.parametrize("design", ["subset", "balanced"])
def test_cli_grow_8_to_16_equals_fresh_16(design, tmp_path):
  """The user's commands: run 8 models, rerun with 16 (trains 8 new ones), export == a fresh 16."""
  flags = ["--epochs", "2", "--mask-design", design, "--no-progress"]
  if design == "balanced":
    flags += ["--subset-ratio", "0.5"]
  for models, out in (("8", "grown"), ("16", "grown"), ("16", "fresh")):
    result = jaxmem_cli("run", "--num-models", models, "--out", str(tmp_path / out), *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    if out == "grown" and models == "16":
      assert "growing" in result.stdout + result.stderr and "1 of 2 chunks already complete" in result.stdout + result.stderr
  for out in ("grown", "fresh"):
    assert jaxmem_cli("export", str(tmp_path / out), str(tmp_path / f"{out}.npz")).returncode == 0
  with np.load(tmp_path / "grown.npz") as a, np.load(tmp_path / "fresh.npz") as b:
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
