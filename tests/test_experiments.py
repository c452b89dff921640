"""Every config in experiments/ runs end to end at a tiny size on mock TFDS data prepared offline.

The mock datasets carry the real builders' names, versions and feature structure (the builder
classes are the catalogue's own, with only the example generators replaced), so a config that
names ``tfds:cifar100`` is loaded exactly as on a cluster with the real data prepared.
"""

import io
from pathlib import Path

import numpy as np
import pytest

import jaxmem
from jaxmem.config import load_config_file

EXPERIMENTS = sorted(p for p in (Path(__file__).parent.parent / "experiments").glob("*.py") if p.name != "__init__.py")
NUM_TRAIN, NUM_TEST = 40, 12  # the smallest C-score subset (ratio 0.1) holds 4 examples: one batch


def mock_tfds(name: str, root: Path, num_train: int, num_test: int) -> None:
  """Prepares TFDS dataset ``name`` in ``root`` with random examples of the real feature structure."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from PIL import Image

  def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="png")
    return buf.getvalue()

  class Mock(tfds.builder_cls(name), skip_registration=True):
    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(num_train, 0), "test": self._generate_examples(num_test, 1)}

    def _generate_examples(self, n, split_tag):
      rng = np.random.default_rng(split_tag)
      for i in range(n):
        example = {}
        for key, feature in self.info.features.items():
          if isinstance(feature, tfds.features.Image):
            example[key] = png(rng.integers(0, 256, feature.shape, dtype=np.uint8))
          elif isinstance(feature, tfds.features.ClassLabel):
            example[key] = i % feature.num_classes
          else:  # e.g. cifar100's text id, tiny_shakespeare's text
            example[key] = f"{split_tag}_{i}"
        yield i, example

  Mock.name = name  # the catalogue's name and version: loaded as the real prepared dataset would be
  Mock(data_dir=str(root), file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  names = {load_config_file(p).dataset for p in EXPERIMENTS}
  for name in sorted(n[len("tfds:"):] for n in names if n.startswith("tfds:")):
    mock_tfds(name, root, NUM_TRAIN, NUM_TEST)
  return root


def shrink(config: jaxmem.RunConfig, data_dir: Path, *, all_ratios: bool = True) -> jaxmem.RunConfig:
  """The same experiment at a tiny size: 2 models per ratio, 1 epoch, a tiny network. Without
  ``all_ratios``, a many-ratio experiment keeps only its smallest and largest ratio (each ratio is a
  chunk with its own step count, hence its own compilation: 9 of them cost minutes on 2 cores)."""
  if not all_ratios and len(config.subset_ratios) > 2:
    config = config.replace(subset_ratios=(min(config.subset_ratios), max(config.subset_ratios)))
  options = {"mlp": {"hidden_sizes": (8,)},
             "transformer": {"num_layers": 1, "width": 16, "num_heads": 2, "max_len": 64}}.get(config.model, {"channels": (4,)})
  num_models = 2 * len(config.subset_ratios)
  return config.replace(num_models=num_models, chunk_size=num_models, epochs=1, batch_size=4, model_options=options,
                        data_dir=str(data_dir), strategy="map", warmup_epochs=0,
                        score_epoch=None if config.score_epoch is None else 1)


def test_every_experiment_documents_run_command_cost_and_what_it_shows():
  assert len(EXPERIMENTS) >= 7
  for path in EXPERIMENTS:
    text = path.read_text()
    for needle in ("Run:", "Cost:", "Shows:", f"--config experiments/{path.name}"):
      assert needle in text, (path.name, needle)
    assert "CPU" in text and "GPU" in text, path.name


def check_tiny_run(full: jaxmem.RunConfig, config: jaxmem.RunConfig, out: Path) -> None:
  result = jaxmem.run(config, out, progress=False, log=lambda m: None)
  n = NUM_TRAIN if full.dataset.startswith("tfds:") else 1347
  assert result.records.keep.shape == (config.num_models, n)
  assert np.isfinite(result.scores.columns["memorization"]).any()
  for r in config.subset_ratios if len(full.subset_ratios) > 1 else ():  # C-score: one column per ratio
    assert f"cscore_at_{r:g}" in result.scores.columns, list(result.scores.columns)
  if full.record_epochs:
    assert "forgetting_events" in result.scores.columns
  if full.mask_design == "balanced":
    assert (result.records.keep.sum(0) == config.num_models // 2).all()


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_runs_at_a_tiny_size(path, tfds_dir, tmp_path):
  full = load_config_file(path).validate()
  check_tiny_run(full, shrink(full, tfds_dir, all_ratios=False), tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if len(load_config_file(p).subset_ratios) > 2],
                         ids=lambda p: p.stem)
def test_many_ratio_experiment_runs_with_all_its_ratios(path, tfds_dir, tmp_path):
  full = load_config_file(path).validate()
  config = shrink(full, tfds_dir)
  assert config.subset_ratios == full.subset_ratios
  check_tiny_run(full, config, tmp_path / "run")
