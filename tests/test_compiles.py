"""One training program per strategy for a whole run: subset ratios, chunks (short ones padded) and
epoch segments are data of the same compiled program, and auto's probe compiles the program the
run then uses."""

import json

import numpy as np
import pytest

import jaxmem
from jaxmem import RunConfig
from jaxmem.config import load_config_file
from jaxmem.engine import Engine
from jaxmem.engine.lift import candidate_strategies

from test_experiments import EXPERIMENTS, NUM_TEST, NUM_TRAIN, mock_tfds, shrink

CSCORE = next(p for p in EXPERIMENTS if p.name == "cscore_cifar10.py")


def _compile_events(run_dir):
  events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
  return [e for e in events if e["event"] == "compiles"]


def test_nine_ratio_cscore_config_compiles_its_training_program_once(tmp_path):
  full = load_config_file(CSCORE).validate()
  assert len(full.subset_ratios) == 9
  mock_tfds("cifar10", tmp_path / "tfds", NUM_TRAIN, NUM_TEST)
  config = shrink(full, tmp_path / "tfds").replace(chunk_size=2)  # all 9 ratios, 2 models each: 9 chunks, 9 step counts
  assert config.subset_ratios == full.subset_ratios
  result = jaxmem.run(config, tmp_path / "run", progress=False, log=lambda m: None)
  assert len(result.trained_chunks) == 9
  assert result.summary["compiles"]["train"] == 1
  assert result.summary["compiles"]["evaluate"] == 1
  assert _compile_events(tmp_path / "run")[-1]["train"] == 1


def test_ratios_short_chunks_and_epoch_segments_share_one_program(tmp_path):
  """Two ratios (two step counts), a short last chunk, and a score_epoch split giving host calls of
  2, 1, 1, 2 and 2 epochs: one training program, and the same records as one call per chunk."""
  config = RunConfig(num_models=10, subset_ratios=(0.3, 0.7), epochs=8, score_epoch=3, batch_size=64,
                     chunk_size=3, strategy="vmap", model_options={"hidden_sizes": (8,)})
  result = jaxmem.run(config, tmp_path / "run", progress=False, log=lambda m: None)
  assert len(result.trained_chunks) == 4  # per ratio: 3 + 2 models
  assert result.summary["compiles"]["train"] == 1
  from jaxmem.run import format_summary
  assert "compiled programs: " in format_summary(result.summary)


def test_auto_reuses_its_probe_compile():
  dataset = jaxmem.load_dataset("digits")
  config = RunConfig(num_models=4, epochs=2, chunk_size=4, model_options={"hidden_sizes": (8,)})
  keep, _ = jaxmem.make_masks("subset", 4, dataset.num_train, (0.7,), 0)
  engine = Engine(dataset, config, probe_cache=None, chunk_models=4)
  engine.train_chunk(np.arange(4), keep)
  candidates = candidate_strategies(engine.padded_size(4) // engine.num_devices)
  assert engine.compile_counts()["train"] == len(candidates)  # the winner is not compiled again
