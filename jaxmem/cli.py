"""``jaxmem`` command line: parses arguments and calls one library function per command.

Errors a user can fix print one line (``jaxmem: error: ...``) and exit 2; ``--debug`` shows the
traceback instead. Library code never reads these flags.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Sequence

from jaxmem.config import RunConfig
from jaxmem.errors import JaxmemError
from jaxmem.signals import StopRequest, stop_on_signals


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line, like every other jaxmem error; main() adds the "jaxmem: error:"
    raise JaxmemError(f"{message} (see {self.prog} --help)")


def _ratios(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(t) for t in text.split(",") if t.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _epoch_list(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(t) for t in text.split(",") if t.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated epochs, got {text!r}") from None


# CLI flag -> RunConfig field. Flags default to None so that only given flags override a --config.
RUN_FLAGS = {
    "dataset": ("--dataset", str, "digits, synthetic, canaries (text), tfds:NAME, a .npz or a .txt file"),
    "data_dir": ("--data-dir", str, "TFDS data directory (prepared offline)"),
    "model": ("--model", str, "registered model: mlp, cnn, transformer (text)"),
    "compute_dtype": ("--compute-dtype", str, "float32 or bfloat16 (bf16 compute, fp32 master weights; for GPUs/TPUs)"),
    "num_models": ("--num-models", int, "number of subset models M"),
    "epochs": ("--epochs", int, "training epochs per model"),
    "batch_size": ("--batch-size", int, "batch size"),
    "learning_rate": ("--learning-rate", float, "peak learning rate"),
    "optimizer": ("--optimizer", str, "adam or sgd"),
    "schedule": ("--schedule", str, "constant, cosine, warmup_cosine or linear"),
    "weight_decay": ("--weight-decay", float, "weight decay"),
    "seed": ("--seed", int, "seed for masks, initialization, batch order and label noise"),
    "label_noise": ("--label-noise", float, "fraction of training labels to flip"),
    "mask_design": ("--mask-design", str, "subset (exactly round(r*N) per model) or balanced (LiRA)"),
    "chunk_size": ("--chunk-size", int, "models trained together per chunk"),
    "strategy": ("--strategy", str, "auto, vmap, map, mixed:W or loop"),
    "queries": ("--queries", int, "LiRA queries per example: 1, 2 (+ flip) or 18 (2 flips x 3x3 shifts); images only"),
    "score_epoch": ("--score-epoch", int, "record EL2N and GraNd after this many epochs (0: at initialization)"),
    "checkpoint_every": ("--checkpoint-every", int, "save the chunk in progress every K epochs (0: only on SIGTERM/SIGINT)"),
    "keep_params": ("--keep-params", str, "keep final parameters of none, all or the first N models"),
    "keep_params_epochs": ("--keep-params-epochs", _epoch_list,
                           "also keep those models' parameters after these epochs, e.g. 0,10 (0: initialization)"),
    "target_se": ("--target-se", float, "stop adding chunks once the median memorization standard error is below this"),
    "device_memory_gib": ("--device-memory-gib", float, "memory per device in GiB for sizing strategies and evaluation batches (default: what the device reports; CPUs report none)"),
}


def _add_score_arguments(p: argparse.ArgumentParser) -> None:
  """Estimator options (issue 3); only given flags reach the estimators, see score_options_from_args."""
  p.add_argument("--influence-topk", type=int, default=None, help="top-k influence per test and per training example (default 10)")
  p.add_argument("--influence-full", action="store_true", help="also write the full train x test influence.npy")
  p.add_argument("--influence-threshold", type=float, default=None,
                 help="high-influence pairs: influence >= this (default 0.15, Feldman & Zhang)")
  p.add_argument("--memorization-threshold", type=float, default=None,
                 help="high-influence pairs: memorization of the training example >= this (default 0.25)")
  p.add_argument("--metrics", default=None,
                 help="counterfactual memorization columns: comma-separated margin,logprob,loss")
  p.add_argument("--bootstrap", type=int, default=None,
                 help="memorization_ci_low/high from this many bootstrap resamples over models instead of the "
                 "Newcombe score interval (default: the score interval; 0: no interval)")
  p.add_argument("--bootstrap-seed", type=_seed, default=None, help="seed of the bootstrap and split-half draws")
  p.add_argument("--rmia-gamma", type=float, default=None, help="RMIA: LR(x, z) >= gamma counts (default 1)")
  p.add_argument("--rmia-a", type=float, default=None, help="RMIA: the a of P_IN ~ a*P_OUT + 1 - a, in (0, 1] "
                 "(default: tuned on a model that is not a target)")
  p.add_argument("--delta", type=float, default=None, help="delta of the attacks' epsilon lower bounds (default 1e-5)")
  p.add_argument("--attribution", default=None,
                 help="lds: also score this (training examples, test examples) attribution matrix (.npy)")


def score_options_from_args(args: argparse.Namespace) -> dict:
  """Estimator name -> options from the flags of _add_score_arguments (and ``--target-se``)."""
  options: dict = {"influence": {}, "counterfactual": {}, "uncertainty": {}}
  for flag, estimator, key in (("influence_topk", "influence", "topk"), ("influence_threshold", "influence", "pair_influence"),
                               ("memorization_threshold", "influence", "pair_memorization"),
                               ("metrics", "counterfactual", "metrics"), ("bootstrap", "uncertainty", "resamples"),
                               ("bootstrap_seed", "uncertainty", "seed"), ("target_se", "uncertainty", "target_se")):
    if getattr(args, flag, None) is not None:
      options[estimator][key] = getattr(args, flag)
  for flag, estimator, key in (("rmia_gamma", "rmia", "gamma"), ("rmia_a", "rmia", "a"), ("delta", "rmia", "delta"),
                               ("delta", "lira", "delta")):
    if getattr(args, flag, None) is not None:
      options.setdefault(estimator, {})[key] = getattr(args, flag)
  if getattr(args, "attribution", None) is not None:
    options.setdefault("lds", {})["attribution"] = _load_attribution(args.attribution)
  if getattr(args, "influence_full", False):
    options["influence"]["full"] = True
  if "metrics" in options["counterfactual"]:
    from jaxmem.scores.counterfactual import parse_metrics
    options["counterfactual"]["metrics"] = parse_metrics(options["counterfactual"]["metrics"])
  return {k: v for k, v in options.items() if v}


def _load_attribution(path: str):
  """An (N, T) float matrix from a .npy file, or one line saying what is wrong with it."""
  import numpy as np
  try:
    # memory-mapped: the LDS reads it one block of training examples at a time
    value = np.load(path, allow_pickle=False, mmap_mode="r")
  except (OSError, ValueError) as e:
    raise JaxmemError(f"--attribution {path}: not a readable .npy array ({e})") from None
  if value.ndim != 2 or value.dtype.kind not in "fiub":
    raise JaxmemError(f"--attribution {path}: expected a 2-D numeric (training examples, test examples) array, "
                      f"got shape {value.shape} of {value.dtype}")
  return value


def _with_default(help_text: str, value) -> str:
  """Flags default to None (so that only given flags override a --config); help shows RunConfig's."""
  return help_text if value is None else f"{help_text} (default {value:g})" if isinstance(value, float) \
      else f"{help_text} (default {value})"


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
  defaults = RunConfig()
  for field, (flag, kind, help_text) in RUN_FLAGS.items():
    p.add_argument(flag, dest=field, type=kind, default=None, help=_with_default(help_text, getattr(defaults, field)))
  p.add_argument("--subset-ratio", dest="subset_ratio", type=float, default=None,
                 help=_with_default("subset ratio r in (0,1)", defaults.subset_ratios[0]))
  p.add_argument("--subset-ratios", dest="subset_ratios", type=_ratios, default=None,
                 help="several ratios, e.g. 0.1,0.3,0.5,0.7,0.9 (C-score)")
  p.add_argument("--augment", dest="augment", action=argparse.BooleanOptionalAction, default=None,
                 help="random flip and crop on the device (images)")
  p.add_argument("--record-epochs", dest="record_epochs", action=argparse.BooleanOptionalAction, default=None,
                 help="record every model's correctness on every training example after each epoch (bit-packed; "
                      "forgetting events, first-learned epoch); text runs: each sequence's next-token accuracy "
                      "(exact memorization per epoch)")
  p.add_argument("--record-epoch-margin", dest="record_epoch_margin", action=argparse.BooleanOptionalAction,
                 default=None, help="with --record-epochs, also each epoch's margins (float32, 32x the disk; "
                                    "text runs: log-likelihoods)")
  p.add_argument("--config", default=None, help="config file: .py with CONFIG or get_config(), or .json")
  p.add_argument("--out", default=None, help="run directory (default: runs/DATASET-MODEL-sSEED)")
  p.add_argument("--overwrite", action="store_true", help="replace a run directory made with another config")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--shard", default=None, help="I/K: train only the chunks c with c mod K == I (job arrays)")
  p.add_argument("--coordinator", default=None, help="multi-process: HOST:PORT of process 0 (else SLURM is detected)")
  p.add_argument("--num-processes", type=int, default=None, help="multi-process: number of processes")
  p.add_argument("--process-id", type=int, default=None, help="multi-process: this process's index")


def _add_retrain_arguments(p: argparse.ArgumentParser) -> None:
  """Flags of the studies that retrain models from a run's recipe (remove-top, onion)."""
  p.add_argument("--epochs", type=int, default=None, help="epochs (default: the run's)")
  p.add_argument("--seed", type=_seed, default=None,
                 help="seed of the retrained models and the random control (default: the run's)")
  p.add_argument("--data-dir", default=None, help="TFDS data directory (default: the run's)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="jaxmem", description="Measure which training examples deep networks memorize.")
  parser.add_argument("--debug", action="store_true", help="show tracebacks")
  commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  p = commands.add_parser("run", help="train subset models, record predictions, write scores.csv")
  _add_run_arguments(p)
  _add_score_arguments(p)
  p.set_defaults(handler=_cmd_run)

  p = commands.add_parser("plan", help="what a run will cost, without training: sizes, chunk plan, device memory")
  _add_run_arguments(p)
  p.add_argument("--probe", action="store_true", help="also train one chunk briefly: models/s and an ETA")
  p.add_argument("--num-train", type=int, default=None, help="training examples, to plan a TFDS run whose data is not prepared")
  p.add_argument("--num-test", type=int, default=None, help="test examples, to plan a TFDS run whose data is not prepared")
  p.set_defaults(handler=_cmd_plan)

  p = commands.add_parser("scores", help="(re)compute scores.csv from a run directory's records")
  p.add_argument("run_dir")
  p.add_argument("--estimators", default=None, help="comma-separated estimator names (default: all available)")
  p.add_argument("--target-se", type=float, default=None, help="models-needed estimate for this median memorization SE")
  _add_score_arguments(p)
  p.set_defaults(handler=_cmd_scores)

  p = commands.add_parser("merge", help="check a run's chunks (e.g. from job-array shards), say what is missing, "
                          "and score what is complete")
  p.add_argument("run_dir")
  p.add_argument("--from", dest="sources", nargs="*", default=[],
                 help="other run directories of the same run whose complete chunks are copied in")
  p.add_argument("--estimators", default=None, help="comma-separated estimator names (default: all available)")
  p.set_defaults(handler=_cmd_merge)

  p = commands.add_parser("export", help="write a run's raw records to one .npz")
  p.add_argument("run_dir")
  p.add_argument("out")
  p.set_defaults(handler=_cmd_export)

  p = commands.add_parser("report", help="write RUN_DIR/report/index.html: figures and tables of the run's scores")
  p.add_argument("run_dir")
  p.add_argument("--data-dir", default=None, help="TFDS data directory to reload the images from (default: the run's)")
  p.add_argument("--top", type=int, default=24, help="examples per gallery")
  p.set_defaults(handler=_cmd_report)

  p = commands.add_parser("bench", help="train the same models with each engine strategy, a JAX loop and a "
                          "PyTorch loop, side by side; print models/s, ratios and utilization")
  p.add_argument("--quick", action="store_true", help="small sizes: the whole table in under 2 minutes on 2 CPU cores")
  p.add_argument("--workloads", default="digits-mlp,digits-cnn",
                 help="comma-separated: digits-mlp, digits-cnn, mnist-protocol, cifar-cnn (the last two are GPU-sized)")
  p.add_argument("--repeats", type=int, default=None, help="interleaved timed repeats per variant, medians reported (default 3, 2 with --quick)")
  p.add_argument("--strategies", default=None, help="comma-separated engine strategies (default: auto's candidates and auto)")
  p.add_argument("--baselines", default="jax-step-loop,jax-model-loop,torch-loop", help="comma-separated baselines (or none)")
  p.add_argument("--models", type=int, default=None, help="models the engine trains per variant (default: per workload)")
  p.add_argument("--loop-models", type=int, default=None, help="models each loop baseline trains")
  p.add_argument("--epochs", type=int, default=None, help="override the workload's epochs")
  p.add_argument("--compute-dtype", default=None, help="float32 or bfloat16: override the workloads' compute dtype")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="intra-op threads of the PyTorch baseline (default: PyTorch's, one per core)")
  p.add_argument("--out", default=None, help="also write the tables to this file (and the raw numbers to OUT.json)")
  p.set_defaults(handler=_cmd_bench)
  bench = p.add_subparsers(dest="bench_command", parser_class=_Parser)
  p = bench.add_parser("scoring", help="simulated records of a given size through the record store, scored by "
                       "every applicable estimator: wall time and peak memory per estimator")
  p.add_argument("--num-train", type=int, required=True, help="training examples N")
  p.add_argument("--num-test", type=int, required=True, help="test examples T")
  p.add_argument("--num-models", type=int, required=True, help="models M")
  p.add_argument("--subset-ratios", default="0.5", help="comma-separated subset ratios, interleaved over models")
  p.add_argument("--queries", type=int, default=0, help="augmented queries A per training example (0: none)")
  p.add_argument("--seed", type=_seed, default=0)
  p.add_argument("--out", default=None, help="keep the simulated run directory here (default: a temporary one, "
                 "removed at the end); rerunning with the same sizes reuses its records")
  p.add_argument("--estimators", default=None,
                 help="comma-separated estimator names (default: every applicable one; none: time the store alone)")
  p.set_defaults(handler=_cmd_bench_scoring)

  # `jaxmem study NAME ...`: each study adds its own subparser to `studies` (and a _cmd_study_* handler).
  study = commands.add_parser("study", help="studies that retrain models on modified data: remove-top, ...")
  studies = study.add_subparsers(dest="study", required=True, parser_class=_Parser)

  p = studies.add_parser("remove-top", help="remove the top-k examples by a score, retrain, plot test accuracy vs k "
                         "(Feldman & Zhang's marginal utility)")
  p.add_argument("run_dir")
  p.add_argument("--k", dest="ks", type=_ints, default=(0, 50, 100, 200), help="comma-separated k values (default 0,50,100,200)")
  p.add_argument("--by", default="memorization,random",
                 help="comma-separated rankings: score columns of scores.csv, or random (default memorization,random)")
  p.add_argument("--num-models", type=int, default=64, help="models per point (default 64)")
  p.add_argument("--subset-ratio", type=float, default=None, help="training ratio of the retrained models (default: the run's)")
  _add_retrain_arguments(p)
  p.add_argument("--out", default=None, help="study directory (default: RUN_DIR/remove_top)")
  p.set_defaults(handler=_cmd_study_remove_top)

  p = studies.add_parser("onion", help="privacy onion: remove the k examples most exposed to LiRA, retrain, "
                         "count previously safe examples that become exposed (Carlini et al. 2022b)")
  p.add_argument("run_dir")
  p.add_argument("--remove", dest="ks", type=_ints, default=(50,), help="comma-separated k values (default 50)")
  p.add_argument("--num-models", type=int, default=None, help="retrained models per k (default: the run's)")
  _add_retrain_arguments(p)
  p.add_argument("--threshold", type=float, default=0.8, help="exposed: per-example LiRA AUC >= this (default 0.8)")
  p.add_argument("--no-control", action="store_true", help="skip the random-removal control (halves the cost)")
  p.add_argument("--out", default=None, help="study directory (default: RUN_DIR/onion)")
  p.set_defaults(handler=_cmd_study_onion)

  p = studies.add_parser("secret-sharer", help="exposure of canaries vs their repetitions and counterfactual "
                         "memorization vs duplication, from a text run (Carlini et al. 2019)")
  p.add_argument("run_dir")
  p.add_argument("--out", default=None, help="study directory (default: RUN_DIR/secret_sharer)")
  p.set_defaults(handler=_cmd_study_secret_sharer)

  p = studies.add_parser("ssft", help="two-phase study: train on half A, then on half B; first-split learning time "
                         "and second-split forgetting time of every example (Maini et al. 2022)")
  p.add_argument("--run", dest="run_dir", default=None,
                 help="take the recipe from this run directory and merge fslt/ssft into its scores.csv")
  p.add_argument("--out", default=None, help="study directory (default: RUN/ssft with --run; required otherwise)")
  p.add_argument("--num-models", type=int, default=8, help="models (seeds) per split order (default 8)")
  p.add_argument("--first-epochs", type=int, default=None, help="phase-one epochs on the first half (default: --epochs)")
  p.add_argument("--second-epochs", type=int, default=None, help="phase-two epochs on the other half (default: --epochs)")
  for field in ("dataset", "data_dir", "model", "epochs", "batch_size", "learning_rate", "optimizer", "schedule",
                "weight_decay", "seed", "label_noise", "chunk_size", "strategy"):
    flag, kind, help_text = RUN_FLAGS[field]
    p.add_argument(flag, dest=field, type=kind, default=None, help=help_text)
  p.add_argument("--config", default=None, help="config file (.py or .json) for the recipe")
  p.set_defaults(handler=_cmd_study_ssft)

  p = studies.add_parser("attack-refs", help="LiRA and RMIA attack power against the number of reference models "
                         "(AUC, TPR at low FPR, eps lower bound)")
  p.add_argument("run_dir")
  p.add_argument("--refs", default="1,2,4,8,16,64,all", help="comma-separated reference counts or all (default 1,2,4,8,16,64,all)")
  p.add_argument("--targets", type=int, default=None, help="target models (default 16)")
  p.add_argument("--seed", type=_seed, default=0, help="seed of the targets, reference orders and bootstrap")
  p.add_argument("--bootstrap", type=_resamples, default=200, help="bootstrap resamples over examples (default 200)")
  p.add_argument("--rmia-gamma", type=float, default=1.0, help="RMIA's gamma (default 1)")
  p.add_argument("--delta", type=float, default=1e-5, help="delta of the eps lower bounds (default 1e-5)")
  p.add_argument("--out", default=None, help="study directory (default: RUN_DIR/attack_refs)")
  p.set_defaults(handler=_cmd_study_attack_refs)

  p = studies.add_parser("proxies", help="cheap memorization proxies (cumulative sample loss, input-loss curvature, "
                         "learning time) from a few models vs the run's memorization, with cost")
  p.add_argument("run_dir")
  p.add_argument("--models", dest="ks", type=_ints, default=(1, 4, 16), help="comma-separated model counts (default 1,4,16)")
  p.add_argument("--h", type=float, default=1e-3, help="curvature: finite-difference step in standardized input units (default 1e-3)")
  p.add_argument("--draws", type=int, default=10, help="curvature: Rademacher directions per example (default 10)")
  p.add_argument("--curvature-epochs", type=_ints, default=None,
                 help="curvature: train the models again and average over these epochs, e.g. 10,20,30 "
                      "(default: the kept final parameters)")
  p.add_argument("--seed", type=_seed, default=0, help="seed of the model choice, directions and bootstrap")
  p.add_argument("--bootstrap", type=_resamples, default=200, help="bootstrap resamples over examples (default 200)")
  p.add_argument("--data-dir", default=None, help="TFDS data directory (default: the run's)")
  p.add_argument("--out", default=None, help="study directory (default: RUN_DIR/proxies)")
  p.set_defaults(handler=_cmd_study_proxies)
  _add_model_level_studies(studies)
  return parser


def _cmd_study_proxies(args) -> int:
  from jaxmem.studies.proxies import format_rows, proxies_study
  result = proxies_study(args.run_dir, args.out, ks=args.ks, h=args.h, draws=args.draws,
                         curvature_epochs=args.curvature_epochs, seed=args.seed,
                         num_bootstrap=args.bootstrap, data_dir=args.data_dir, log=lambda m: print(m, file=sys.stderr))
  print("\n".join(format_rows(result.rows)))
  for note in result.notes:
    print(f"note: {note}")
  print(f"wrote {result.table}")
  return 0


def _cmd_study_attack_refs(args) -> int:
  from jaxmem.studies.attack_refs import attack_refs_study, format_rows
  result = attack_refs_study(args.run_dir, args.out, refs=args.refs, targets=args.targets, seed=args.seed,
                             num_bootstrap=args.bootstrap, gamma=args.rmia_gamma, delta=args.delta,
                             log=lambda m: print(m, file=sys.stderr))
  print("\n".join(format_rows(result.rows)))
  print(f"wrote {result.table}, {result.plot}")
  return 0


def _cmd_study_secret_sharer(args) -> int:
  from jaxmem.studies.secret_sharer import secret_sharer
  result = secret_sharer(args.run_dir, args.out, log=lambda m: print(m, file=sys.stderr))
  print("\n".join(result.lines))
  print(f"wrote {result.out}/exposure_vs_copies.csv, memorization_vs_copies.csv, their .png plots and secret_sharer.json")
  return 0


def _add_model_level_studies(studies) -> None:
  """Model-level memorization: neural collapse (def. 5), layer rewinding, privacy forgetting (def. 11),
  benign memorization (def. 4), and sweeps over config fields."""
  def run_study(name: str, summary: str, handler, directory: str) -> argparse.ArgumentParser:
    """A study of a finished run: RUN_DIR, where its data moved to, and the study directory."""
    p = studies.add_parser(name, help=summary)
    p.add_argument("run_dir")
    p.add_argument("--data-dir", default=None, help="the run's data directory, if it moved")
    p.add_argument("--out", default=None, help=f"study directory (default: RUN_DIR/{directory})")
    p.set_defaults(handler=handler)
    return p

  run_study("neural-collapse", "def. 5: distance of flipped examples' penultimate features to their label's test mean, "
            "from a run's kept parameters (Nguyen et al. 2023)", _cmd_study_neural_collapse, "neural_collapse")

  p = run_study("layer-rewind", "rewind each layer to an earlier epoch; accuracy on flipped-label (or most memorized) "
                "vs clean vs test examples (Stephenson 2021, Maini 2023)", _cmd_study_layer_rewind, "layer_rewind")
  p.add_argument("--num-models", type=int, default=8, help="the run's first N models are retrained (default 8)")
  p.add_argument("--rewind-epochs", type=_ints, default=(0,), help="comma-separated epochs to rewind to (default 0: init)")
  p.add_argument("--top-fraction", type=float, default=0.05,
                 help="without label noise: the most memorized fraction is the memorized group (default 0.05)")

  p = run_study("privacy-forgetting", "def. 11: LiRA on an injected set k epochs after it was last seen, repeated vs "
                "single, by memorization (Jagielski et al. 2023); on a text run the injected set is sequences, "
                "attacked on the per-token log-likelihood", _cmd_study_privacy_forgetting, "privacy_forgetting")
  p.add_argument("--num-models", type=int, default=32, help="models, even (default 32)")
  p.add_argument("--inject", type=int, default=100, help="injected examples (default 100)")
  p.add_argument("--repeats", type=int, default=4, help="copies per epoch of the repeated half (default 4)")
  p.add_argument("--selection", default="random", help="random, or memorized (the run's most memorized)")
  p.add_argument("--first-epochs", type=int, default=None, help="epochs with the injected set (default: the run's)")
  p.add_argument("--second-epochs", type=int, default=None, help="epochs without it, k = 1..this (default: the run's)")
  p.add_argument("--alpha", type=float, default=0.2, help="forgotten: advantage 2*AUC-1 stays below this (default 0.2)")
  p.add_argument("--quantiles", type=int, default=2, help="memorization quantile groups of the injected set (default 2)")

  p = run_study("benign", "def. 4: kNN probe of each layer on clean labels, init vs trained, for a run with random "
                "labels (--label-noise 0.9 on digits), with and without augmentation (Anagnostidis et al. 2023)",
                _cmd_study_benign, "benign")
  p.add_argument("--num-models", type=int, default=8, help="the run's first N models are retrained (default 8)")
  p.add_argument("--k", type=int, default=20, help="neighbours of the kNN probe (default 20)")
  p.add_argument("--no-augment-variant", action="store_true",
                 help="only the run's own augment setting (default: also with augment toggled)")

  p = studies.add_parser("sweep", help="the same run recipe over variants of one or two config fields, compared "
                         "with intervals (e.g. --vary model_options.hidden_sizes=[64],[256])")
  p.add_argument("--vary", action="append", required=True, metavar="FIELD=v1,v2",
                 help="a config field (or model_options.NAME, subset_ratio) and its values; once or twice")
  p.add_argument("--out", required=True, help="sweep directory (one run directory per variant inside)")
  p.add_argument("--config", default=None, help="config file (.py or .json) for the base recipe")
  for field in ("dataset", "data_dir", "model", "num_models", "epochs", "batch_size", "learning_rate", "optimizer",
                "schedule", "weight_decay", "seed", "label_noise", "chunk_size", "strategy"):
    flag, kind, help_text = RUN_FLAGS[field]
    p.add_argument(flag, dest=field, type=kind, default=None, help=help_text)
  p.set_defaults(handler=_cmd_study_sweep)


def _cmd_study_neural_collapse(args) -> int:
  from jaxmem.studies.neural_collapse import neural_collapse_study
  result = neural_collapse_study(args.run_dir, args.out, data_dir=args.data_dir, log=lambda m: print(m, file=sys.stderr))
  print("\n".join(result.lines))
  print(f"wrote {result.out / 'nc_scores.csv'}, {result.out / 'neural_collapse.json'}")
  return 0


def _cmd_study_privacy_forgetting(args) -> int:
  from jaxmem.studies.privacy_forgetting import privacy_forgetting_study
  result = privacy_forgetting_study(
      args.run_dir, args.out, num_models=args.num_models, inject=args.inject, repeats=args.repeats,
      selection=args.selection, first_epochs=args.first_epochs, second_epochs=args.second_epochs, alpha=args.alpha,
      quantiles=args.quantiles, data_dir=args.data_dir, log=lambda m: print(m, file=sys.stderr))
  print("\n".join(result.lines))
  print(f"wrote {result.out / 'forgetting_curve.csv'}, {result.out / 'forgetting_examples.csv'}, "
        f"{result.out / 'privacy_forgetting.png'}")
  return 0


def _cmd_study_benign(args) -> int:
  from jaxmem.studies.benign import benign_study
  result = benign_study(args.run_dir, args.out, num_models=args.num_models, k=args.k,
                        augment_variants=not args.no_augment_variant, data_dir=args.data_dir,
                        log=lambda m: print(m, file=sys.stderr))
  print("\n".join(result.lines))
  print(f"wrote {result.out / 'benign.csv'}, {result.out / 'benign.png'}")
  return 0


def _cmd_study_sweep(args) -> int:
  from jaxmem.config import RunConfig, load_config_file
  from jaxmem.studies.sweep import sweep
  fields = ("dataset", "data_dir", "model", "num_models", "epochs", "batch_size", "learning_rate", "optimizer",
            "schedule", "weight_decay", "seed", "label_noise", "chunk_size", "strategy")
  base = load_config_file(args.config) if args.config else RunConfig()
  base = base.replace(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None}).validate()
  result = sweep(base, args.vary, args.out, log=lambda m: print(m, file=sys.stderr))
  print("\n".join(result.lines))
  print(f"wrote {result.out / 'sweep.csv'}, {result.out / 'sweep.png'}")
  return 0


def _cmd_study_layer_rewind(args) -> int:
  from jaxmem.studies.layer_rewind import layer_rewind_study
  result = layer_rewind_study(args.run_dir, args.out, num_models=args.num_models, rewind_epochs=args.rewind_epochs,
                              top_fraction=args.top_fraction, data_dir=args.data_dir,
                              log=lambda m: print(m, file=sys.stderr))
  print("\n".join(result.lines))
  print(f"wrote {result.out / 'layer_rewind.csv'}, {result.out / 'layer_rewind.png'}")
  return 0


def _cmd_study_ssft(args) -> int:
  from pathlib import Path
  from jaxmem.config import RunConfig, load_config_file
  from jaxmem.studies.ssft import config_from_run, ssft_study
  if args.run_dir is None and args.out is None:
    raise JaxmemError("jaxmem study ssft needs --out DIR (or --run RUN_DIR)")
  config = (config_from_run(args.run_dir) if args.run_dir else
            load_config_file(args.config) if args.config else RunConfig())
  fields = ("dataset", "data_dir", "model", "epochs", "batch_size", "learning_rate", "optimizer", "schedule",
            "weight_decay", "seed", "label_noise", "chunk_size", "strategy")
  config = config.replace(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None}).validate()
  out = args.out or str(Path(args.run_dir) / "ssft")
  result = ssft_study(config, out, num_models=args.num_models, first_epochs=args.first_epochs,
                      second_epochs=args.second_epochs, run_dir=args.run_dir, log=lambda m: print(m, file=sys.stderr))
  print("\n".join(result.lines))
  print(f"wrote {result.out / 'ssft_scores.csv'}, {result.out / 'ssft.json'}")
  return 0


def _seed(text: str) -> int:
  """A seed flag: numpy's and JAX's seeds are unsigned 32-bit (a negative one was a traceback)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
  if not 0 <= value < 2**32:
    raise argparse.ArgumentTypeError(f"a seed must be an integer in [0, 2**32), got {value}")
  return value


def _resamples(text: str) -> int:
  """A study's --bootstrap: a percentile interval needs at least 2 resamples (a negative count was
  a numpy traceback, 0 silently gave [nan, nan])."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
  if value < 2:
    raise argparse.ArgumentTypeError(f"bootstrap resamples must be an integer >= 2, got {value}")
  return value


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(t) for t in text.split(",") if t.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _cmd_report(args) -> int:
  from jaxmem.report import write_report
  report = write_report(args.run_dir, data_dir=args.data_dir, top=args.top, log=lambda m: print(m, file=sys.stderr))
  print(f"wrote {report.path} ({len(report.images)} figures; sections: {', '.join(report.sections)})")
  return 0


def _cmd_study_onion(args) -> int:
  from pathlib import Path
  from jaxmem.studies.onion import format_onion, onion
  out = args.out or str(Path(args.run_dir) / "onion")
  result = onion(args.run_dir, out, ks=args.ks, num_models=args.num_models, epochs=args.epochs, seed=args.seed,
                 threshold=args.threshold, control=not args.no_control, data_dir=args.data_dir,
                 progress=not args.no_progress, log=lambda m: print(m, file=sys.stderr))
  print("\n".join(format_onion(result)))
  print(f"wrote {result.table}, {result.out / 'onion.json'}")
  return 0


def _cmd_study_remove_top(args) -> int:
  from pathlib import Path
  from jaxmem.studies.remove_top import remove_top
  out = args.out or str(Path(args.run_dir) / "remove_top")
  result = remove_top(args.run_dir, out, ks=args.ks, by=[b.strip() for b in args.by.split(",") if b.strip()],
                      num_models=args.num_models, subset_ratio=args.subset_ratio, epochs=args.epochs, seed=args.seed,
                      data_dir=args.data_dir, progress=not args.no_progress, log=lambda m: print(m, file=sys.stderr))
  print("removed by       k  train  models  test accuracy [95% CI]")
  for p in result.points:
    print(f"{p.by:<14} {p.k:>4} {p.num_train:>6} {p.num_models:>7}  {p.test_accuracy:.4f} [{p.ci_low:.4f}, {p.ci_high:.4f}]")
  print(f"wrote {result.table}, {result.plot}")
  return 0


def config_from_args(args: argparse.Namespace):
  from jaxmem.config import RunConfig, load_config_file
  from jaxmem.models import TEXT_MODELS
  from jaxmem.text import TEXT_RUN_DEFAULTS
  config = load_config_file(args.config) if args.config else RunConfig()
  changes = {f: getattr(args, f) for f in RUN_FLAGS if getattr(args, f) is not None}
  if args.subset_ratio is not None and args.subset_ratios is not None:
    raise JaxmemError("give either --subset-ratio or --subset-ratios, not both")
  if args.subset_ratio is not None:
    changes["subset_ratios"] = (args.subset_ratio,)
  if args.subset_ratios is not None:
    changes["subset_ratios"] = args.subset_ratios
  if args.augment is not None:
    changes["augment"] = args.augment
  for flag in ("record_epochs", "record_epoch_margin"):
    if getattr(args, flag, None) is not None:
      changes[flag] = getattr(args, flag)
  if not args.config and changes.get("model") in TEXT_MODELS:
    # A language model's recipe is not the image defaults of RunConfig: flags given still win.
    changes = {**TEXT_RUN_DEFAULTS, **changes}
  if changes.get("mask_design") == "balanced" and "subset_ratios" not in changes:
    changes["subset_ratios"] = (0.5,)
  return config.replace(**changes).validate()


def _cmd_run(args) -> int:
  import os
  from jaxmem.distributed import detect_cluster, initialize
  from jaxmem.run import RunInterrupted, format_summary, parse_shard, run
  config = config_from_args(args)
  shard = parse_shard(args.shard) if args.shard is not None else None
  initialize(detect_cluster(os.environ, coordinator=args.coordinator, num_processes=args.num_processes,
                            process_id=args.process_id))
  if args.out is not None and not args.out.strip():
    raise JaxmemError("--out must name a directory, got an empty string")
  out = args.out or f"runs/{config.dataset.replace('/', '_').replace(':', '_')}-{config.model}-s{config.seed}"
  log = lambda m: print(m, file=sys.stderr)
  resume = "resume with: jaxmem " + shlex.join([a for a in args.argv if a != "--overwrite"])
  try:
    result = run(config, out, overwrite=args.overwrite, progress=not args.no_progress, log=log,
                 score_options=score_options_from_args(args),
                 shard=shard, should_stop=args.stop)
  except RunInterrupted as e:
    raise RunInterrupted(f"{e}; {resume}", exit_code=e.exit_code) from None
  args.stop.finish(0)  # all is written: a signal while the summary prints (or after) stops nothing
  if result.summary["process"]["index"] == 0:  # other processes of a multi-process run said their line
    print(format_summary(result.summary))
  return 0


def _cmd_plan(args) -> int:
  from jaxmem.plan import format_plan, plan
  config = config_from_args(args)
  print(format_plan(plan(config, num_train=args.num_train, num_test=args.num_test, probe=args.probe)))
  return 0


def _cmd_merge(args) -> int:
  from jaxmem.run import format_summary, merge
  summary = merge(args.run_dir, args.sources, estimators=args.estimators,
                  log=lambda m: print(m, file=sys.stderr))
  args.stop.finish(0)  # all is written: a signal while the summary prints (or after) stops nothing
  print(format_summary(summary))
  return 0


def _say_what_is_missing(run_dir: str) -> None:
  """Chunks that failed their checksum or are missing: `scores` and `export` use the complete ones."""
  from jaxmem.run import missing_chunks_line
  from jaxmem.records import RunDir
  run = RunDir.open(run_dir)
  status = [run.chunk_status(c) for c in range(len(run.chunk_plan()))]
  if "complete" not in status:
    return  # nothing to use: reading the records says so in one line
  for c, s in enumerate(status):
    if s == "corrupt":
      print(f"chunk {c} in {run.path} failed its checksum; left out (rerun `jaxmem run` to train it again)",
            file=sys.stderr)
  missing = missing_chunks_line(run)
  if missing:
    print(f"{missing}; using the complete ones", file=sys.stderr)


def _cmd_scores(args) -> int:
  from jaxmem.scoring import parse_estimator_names, score_run
  from jaxmem.run import format_summary, summarize
  names, options = parse_estimator_names(args.estimators), score_options_from_args(args)
  _say_what_is_missing(args.run_dir)
  table, records = score_run(args.run_dir, names, options)
  summary = summarize(records, table)
  args.stop.finish(0)  # all is written: a signal while the summary prints (or after) stops nothing
  print(format_summary(summary))
  print(f"wrote {args.run_dir}/scores.csv ({records.num_train} rows, estimators: {', '.join(table.estimators)})")
  return 0


def _cmd_export(args) -> int:
  from jaxmem.records import RunDir, export_records
  _say_what_is_missing(args.run_dir)
  records = RunDir.open(args.run_dir).load_records()
  keys = export_records(records, args.out)
  print(f"wrote {args.out}: {records.num_models} models x {records.num_train} examples; keys: {', '.join(keys)}")
  return 0


def _cmd_bench(args) -> int:
  from jaxmem.bench import format_table, run_benchmarks
  names = lambda text: [t.strip() for t in text.split(",") if t.strip() and t.strip() != "none"]
  results = run_benchmarks(
      names(args.workloads), quick=args.quick, out=args.out, log=lambda m: print(m, file=sys.stderr),
      repeats=args.repeats if args.repeats is not None else (2 if args.quick else 3), strategies=names(args.strategies) if args.strategies else None,
      baselines=names(args.baselines), engine_models=args.models, loop_models=args.loop_models, epochs=args.epochs,
      torch_threads=args.torch_threads, compute_dtype=args.compute_dtype)
  print("\n\n".join(format_table(r) for r in results))
  return 0


def _cmd_bench_scoring(args) -> int:
  from jaxmem.bench_scoring import Simulation, bench_scoring, format_rows, parse_ratios
  simulation = Simulation(num_train=args.num_train, num_test=args.num_test, num_models=args.num_models,
                          subset_ratios=parse_ratios(args.subset_ratios), queries=args.queries, seed=args.seed)
  names = [t.strip() for t in args.estimators.split(",") if t.strip() not in ("", "none")] if args.estimators else None
  rows = bench_scoring(simulation, out=args.out, estimators=names, log=lambda m: print(m, file=sys.stderr))
  print(format_rows(rows))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The ``jaxmem`` command (``argv`` None: the process's own arguments, and the process ends here)."""
  as_process = argv is None
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv
  with stop_on_signals() as stop:  # first, so that no phase of any command dies by a signal
    try:
      code = _main(argv, stop, debug)
    except KeyboardInterrupt as e:  # e.g. --debug's own Ctrl-C; the handlers (jaxmem.signals) exit themselves
      if debug:
        raise
      print(f"jaxmem: error: {_interrupted_line(getattr(e, 'command', 'jaxmem'))}", file=sys.stderr)
      code = 130
    stop.finish(code)  # from here a signal neither reports a stop nor changes the code
    if as_process:
      _end_process(code)
    return code


def _end_process(code: int) -> None:
  """Ends the process with ``code`` while the signal handlers are still installed.

  Why not return to the interpreter: its shutdown (tearing down XLA's and orbax's threads and
  caches, most of a second) first puts Python's default SIGINT handler back, then the default
  action, so a Ctrl-C there printed a KeyboardInterrupt traceback or killed the finished command by
  the signal (exit -2). Nothing is lost by skipping it: every file is already written, atomically,
  and checkpoints are saved synchronously."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # e.g. a closed pipe (`jaxmem ... | head`): nothing more can be said
      pass
  os._exit(code)


def _main(argv: list[str], stop: StopRequest, debug: bool) -> int:
  command = "jaxmem"
  try:
    # --debug is accepted anywhere (e.g. after the command), not only before it.
    args, unknown = build_parser().parse_known_args([a for a in argv if a != "--debug"])
    command = " ".join(["jaxmem", args.command] + ([args.study] if getattr(args, "study", None) else []))
    if unknown:
      raise JaxmemError(f"unrecognized arguments: {' '.join(unknown)} (see {command} --help)")
    # Before JAX runs anything: on a CPU, one device per core (each trains its own models).
    from jaxmem.devices import use_one_cpu_device_per_core
    use_one_cpu_device_per_core()
    args.argv = [a for a in argv if a != "--debug"]  # for the resume command printed after an interruption
    args.stop = stop
    stop.abort_line = _interrupted_line(command)
    return args.handler(args)
  except JaxmemError as e:
    if debug:
      raise
    print(f"jaxmem: error: {e}", file=sys.stderr)
    return getattr(e, "exit_code", 2)
  except MemoryError as e:  # a size no check foresaw; files are written atomically, so none is half-written
    if debug:
      raise
    print(f"jaxmem: error: out of memory ({str(e).strip().splitlines()[0] if str(e).strip() else 'MemoryError'}); "
          "use fewer models or examples, or a smaller --chunk-size", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    e.command = command  # main() says what the interruption left, per command
    raise


def _interrupted_line(command: str) -> str:
  """What an interruption outside training left behind, per command (files are written atomically,
  so nothing is half-written whatever the command)."""
  if command in ("jaxmem run", "jaxmem merge") or command.startswith("jaxmem study"):
    return "stopped; finished chunks are saved: rerun the same command to resume"
  if command == "jaxmem scores":
    return "stopped; the records and the previous scores.csv are intact: rerun the same command to score"
  return f"stopped; nothing was half-written: rerun {command} when ready"


if __name__ == "__main__":
  sys.exit(main())
