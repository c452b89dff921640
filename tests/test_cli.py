"""The CLI end to end at a tiny size, through the installed console script."""

import numpy as np
import pytest

from conftest import jaxmem_cli

TINY_FLAGS = ["--num-models", "4", "--epochs", "2", "--chunk-size", "2", "--batch-size", "32",
              "--strategy", "vmap", "--no-progress"]


def test_run_scores_export_end_to_end(tmp_path):
  out = tmp_path / "run"
  result = jaxmem_cli("run", "--out", str(out), *TINY_FLAGS)
  assert result.returncode == 0, result.stderr
  assert "most memorized training examples" in result.stdout and "accuracy of the subset models" in result.stdout
  lines = (out / "scores.csv").read_text().splitlines()
  assert len(lines) == 1 + 1347
  again = jaxmem_cli("run", "--out", str(out), *TINY_FLAGS)
  assert again.returncode == 0 and "2 of 2 chunks already complete" in again.stderr

  result = jaxmem_cli("scores", str(out))
  assert result.returncode == 0, result.stderr
  assert "wrote" in result.stdout
  result = jaxmem_cli("export", str(out), str(tmp_path / "e.npz"))
  assert result.returncode == 0, result.stderr
  with np.load(tmp_path / "e.npz") as f:
    assert f["keep"].shape == (4, 1347)


@pytest.mark.parametrize("args,needle", [
    (["run", "--dataset", "imagenet-9"], "dataset"),
    (["run", "--model", "resnet"], "unknown model 'resnet'; choose one of: cnn, mlp, transformer"),
    (["run", "--subset-ratio", "1.5"], "subset ratio must be in (0, 1), got 1.5"),
    (["run", "--num-models", "1"], "num_models must be an integer >= 2, got 1"),
    (["run", "--epochs", "0"], "epochs must be a positive integer, got 0"),
    (["run", "--batch-size", "5000"], "batch_size 5000 is larger than the smallest training subset"),
    (["run", "--label-noise", "2"], "label_noise must be in [0, 1), got 2.0"),
    (["run", "--epochs", "three"], "invalid int value: 'three'"),
    (["scores", "/nonexistent/run"], "run directory '/nonexistent/run' does not exist"),
    (["export", "/nonexistent/run", "x.npz"], "run directory '/nonexistent/run' does not exist"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_one_line_error_no_traceback(args, needle, tmp_path):
  result = jaxmem_cli(*args, "--out", str(tmp_path / "o")) if args[0] == "run" else jaxmem_cli(*args)
  assert result.returncode == 2
  assert needle in result.stderr, result.stderr
  assert "Traceback" not in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert not (tmp_path / "o").exists()  # nothing written before the input was checked


def test_output_path_that_is_a_file_is_refused(tmp_path):
  target = tmp_path / "file"
  target.write_text("x")
  result = jaxmem_cli("run", "--out", str(target), *TINY_FLAGS)
  assert result.returncode == 2 and "is not a directory" in result.stderr
  assert "Traceback" not in result.stderr


def test_label_noise_is_found_by_memorization(tmp_path):
  """At a small size, memorization separates flipped labels from clean ones (AUROC >= 0.9)."""
  import jaxmem
  config = jaxmem.RunConfig(label_noise=0.1, num_models=48, chunk_size=48, epochs=30, strategy="map")
  result = jaxmem.run(config, tmp_path / "noisy", progress=False, log=lambda m: None)
  assert result.summary["dataset"]["flipped_labels"] == 135
  assert result.summary["noisy_label_auroc"] >= 0.9
  assert "AUROC" in jaxmem.format_summary(result.summary)
