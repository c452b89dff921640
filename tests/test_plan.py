"""``jaxmem plan``: sizes and device memory before a run, without training."""

from pathlib import Path

import pytest

from jaxmem.plan import format_plan, plan

from conftest import jaxmem_cli


def _records_on_disk(run_dir: Path) -> int:
  return sum(p.stat().st_size for p in (run_dir / "chunks").glob("*.npz")) + (run_dir / "design.npz").stat().st_size


def test_plan_predicts_the_records_a_run_writes(tiny_run, tiny_config):
  planned = plan(tiny_config)
  written = _records_on_disk(tiny_run.run_dir)
  assert abs(planned["disk_bytes"]["total"] - written) <= 0.1 * written, (planned["disk_bytes"], written)
  assert planned["chunks"]["count"] == 2 and [r["strategy"] for r in planned["memory"]] == ["vmap"]
  assert planned["memory"][0]["train"]["peak"] > 0 and planned["memory"][0]["evaluate"]["peak"] > 0
  assert "records on disk" in format_plan(planned)


def test_plan_of_the_cifar_experiment_from_shapes_prints_the_memory_table(tmp_path):
  """No CIFAR-10 files here: the plan comes from the TFDS builder's feature shapes and the given
  split sizes (small ones, so that the CNN programs compile quickly on a CPU)."""
  result = jaxmem_cli("plan", "--config", "experiments/cifar10_memorization.py", "--data-dir", str(tmp_path),
                      "--num-train", "200", "--num-test", "50", "--chunk-size", "4", "--device-memory-gib", "16",
                      "--strategy", "map",
                      cwd=Path(__file__).parent.parent)
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout
  assert "dataset tfds:cifar10 (shapes only (data not prepared)): 200 train, 50 test, input (32, 32, 3)" in out
  assert "strategy" in out and "fits (eval batch)" in out
  row = next(line for line in out.splitlines() if line.strip().startswith("map "))
  assert row.split()[-2:] == ["yes", "(256)"]  # CPU evaluation batch, fits 16 GiB


def test_plan_without_data_or_sizes_is_one_line(tmp_path):
  result = jaxmem_cli("plan", "--config", "experiments/cifar10_memorization.py", "--data-dir", str(tmp_path),
                      cwd=Path(__file__).parent.parent)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"jaxmem: error: dataset 'tfds:cifar10' is not prepared in --data-dir {str(tmp_path)!r}: plan from its "
      "shapes with --num-train N --num-test T (its split sizes)")


@pytest.mark.slow
def test_plan_of_the_default_run_within_10_percent(tmp_path):
  import re
  planned = jaxmem_cli("plan")
  assert planned.returncode == 0, planned.stderr[-2000:]
  mib = float(re.search(r"records on disk: ([\d.,]+) MiB", planned.stdout).group(1).replace(",", ""))
  assert jaxmem_cli("run", "--out", str(tmp_path / "run"), "--no-progress").returncode == 0
  written = _records_on_disk(tmp_path / "run") / 2**20
  assert abs(mib - written) <= 0.1 * written, (mib, written)
