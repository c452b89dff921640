"""Memory-aware strategies: programs are compiled on abstract inputs (no data, no training) and
XLA's memory analysis decides which strategies and evaluation batches fit a device."""

import numpy as np
import pytest

import jaxmem
from jaxmem import RunConfig
from jaxmem.config import load_config_file
from jaxmem.engine import Engine, memory
from jaxmem.engine import lift as lifting
from jaxmem.errors import JaxmemError
from jaxmem.plan import shape_dataset

GPU_EVAL_BATCH = 4096  # what an accelerator evaluates with; CPUs use smaller batches


def _abstract_engine(config, dataset, max_members):
  engine = Engine(dataset, config, abstract=True, probe_cache=None, chunk_models=config.chunk_size,
                  max_members=max_members)
  engine.default_eval_batch = GPU_EVAL_BATCH
  return engine


def _check_auto_respects(engine, num_models, monkeypatch):
  """auto times only candidates that fit: every one it may pick fits training and evaluation."""
  offered = []

  def choose(candidates, time_candidate, **kwargs):
    offered.extend(candidates)
    return candidates[-1], {}
  monkeypatch.setattr(lifting, "choose_strategy", choose)
  picked = engine.resolve_strategy(np.ones((num_models, engine.max_members), bool))
  budget = memory.USABLE_FRACTION * engine.device_memory
  rows = {row["strategy"]: row for row in engine.memory_table}
  assert offered and picked in offered
  for strategy in offered:
    row = rows[str(strategy)]
    assert row["fits"] and row["train"]["peak"] <= budget and row["evaluate"]["peak"] <= budget
  for name, row in rows.items():
    if name not in map(str, offered):
      assert not row["fits"] and max(row["train"]["peak"], (row["evaluate"] or {"peak": 0})["peak"]) > budget
  return offered, rows


def test_auto_keeps_only_strategies_that_fit_and_shrinks_evaluation(monkeypatch):
  config = RunConfig(model_options={"hidden_sizes": (256, 256)}, batch_size=64, chunk_size=16, num_models=16)
  dataset = shape_dataset("wide", (512,), 20000, 4000, 10)
  engine = _abstract_engine(config, dataset, max_members=14000)
  steps = engine._program_steps(np.ones((1, 14000), bool))
  candidates = lifting.candidate_strategies(16)
  train = {str(s): engine.program_memory(s, 16, steps, GPU_EVAL_BATCH, ("train",))["train"].peak for s in candidates}
  ranked = sorted(train, key=train.get)
  # A device that fits the leanest strategy's training but not the others', and not its
  # evaluation at the accelerator's batch (XLA's numbers for these shapes; checked, not assumed).
  usable = (train[ranked[0]] + train[ranked[1]]) / 2
  leanest = lifting.parse_strategy(ranked[0])
  assert train[ranked[0]] < usable < train[ranked[1]]
  assert engine.program_memory(leanest, 16, steps, GPU_EVAL_BATCH, ("evaluate",))["evaluate"].peak > usable
  assert engine.program_memory(leanest, 16, steps, 16, ("evaluate",))["evaluate"].peak <= usable
  engine.device_memory = int(usable / memory.USABLE_FRACTION)
  offered, rows = _check_auto_respects(engine, 16, monkeypatch)
  assert offered == [leanest]
  assert 16 <= rows[ranked[0]]["eval_batch"] < GPU_EVAL_BATCH  # evaluation batches shrank to fit
  assert engine.eval_batches[ranked[0]] == rows[ranked[0]]["eval_batch"]
  # the largest batch that fits: twice it would not
  double = engine.program_memory(leanest, 16, steps, 2 * rows[ranked[0]]["eval_batch"], ("evaluate",))["evaluate"]
  assert double.peak > usable


def test_nothing_fits_is_one_line():
  config = RunConfig(model_options={"hidden_sizes": (64,)}, chunk_size=4, num_models=4, strategy="map",
                     device_memory_gib=1e-6)
  engine = _abstract_engine(config, shape_dataset("tiny", (32,), 500, 100, 10), max_members=350)
  with pytest.raises(JaxmemError, match=r"^no strategy of map fits 0.00 GiB of device memory .* use a smaller --chunk-size"):
    engine.resolve_strategy(np.ones((4, 350), bool))


@pytest.mark.slow
def test_cifar_cnn_at_experiment_size_fits_16_gib(monkeypatch):
  """The CIFAR-10 memorization experiment's CNN, 50 models a chunk, on 50,000 images (shapes
  only): auto never picks a strategy whose training or evaluation exceeds 16 GiB, and the
  accelerator's evaluation batch of 4096 shrinks where it must."""
  full = load_config_file("experiments/cifar10_memorization.py").replace(device_memory_gib=16.0)
  members = int(round(max(full.subset_ratios) * 50000))
  engine = _abstract_engine(full, shape_dataset("cifar10", (32, 32, 3), 50000, 10000, 10, dtype=np.uint8), members)
  offered, rows = _check_auto_respects(engine, full.chunk_size, monkeypatch)
  assert "vmap" not in map(str, offered)  # 50 vmapped CNNs need more than 16 GiB to train
  assert any(row["fits"] and row["eval_batch"] < GPU_EVAL_BATCH for row in rows.values())


class _RecordingCheckpoint:
  def __init__(self):
    self.saved = []

  def restore(self, state):
    return None

  def due(self, epochs_done):
    return False

  def save(self, epochs_done, state, history, *, wait=False):
    self.saved.append((epochs_done, wait, sorted(history)))


def test_evaluation_out_of_memory_saves_the_trained_state_and_retries_with_half_the_batch():
  dataset = jaxmem.load_dataset("digits")
  config = RunConfig(num_models=2, epochs=2, chunk_size=2, strategy="vmap", model_options={"hidden_sizes": (8,)})
  keep, _ = jaxmem.make_masks("subset", 2, dataset.num_train, (0.7,), 0)
  engine = Engine(dataset, config, probe_cache=None)
  reference = Engine(dataset, config, probe_cache=None).train_chunk(np.arange(2), keep)
  build, failed = engine._build, []

  def build_failing_once(strategy, num_steps, eval_batch=None):
    programs = build(strategy, num_steps, eval_batch)
    if not failed:
      def evaluate(*args):
        failed.append(engine.eval_batches.get("vmap", engine.default_eval_batch))
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
      programs.evaluate = evaluate
    return programs
  engine._build = build_failing_once
  checkpoint = _RecordingCheckpoint()
  records = engine.train_chunk(np.arange(2), keep, checkpoint=checkpoint)
  assert checkpoint.saved == [(2, True, ["per_epoch"])]  # the trained state, before any retry
  assert engine.eval_batches["vmap"] == failed[0] // 2
  np.testing.assert_array_equal(records["train_margin"], reference["train_margin"])
