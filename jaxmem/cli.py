"""``jaxmem`` command line: parses arguments and calls one library function per command.

Errors a user can fix print one line (``jaxmem: error: ...``) and exit 2; ``--debug`` shows the
traceback instead. Library code never reads these flags.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jaxmem.errors import JaxmemError


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line, like every other jaxmem error
    raise JaxmemError(f"{self.prog}: {message}")


def _ratios(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(t) for t in text.split(",") if t.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# CLI flag -> RunConfig field. Flags default to None so that only given flags override a --config.
RUN_FLAGS = {
    "dataset": ("--dataset", str, "digits, synthetic, tfds:NAME or a .npz file"),
    "data_dir": ("--data-dir", str, "TFDS data directory (prepared offline)"),
    "model": ("--model", str, "registered model: mlp, cnn"),
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
}


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
  for field, (flag, kind, help_text) in RUN_FLAGS.items():
    p.add_argument(flag, dest=field, type=kind, default=None, help=help_text)
  p.add_argument("--subset-ratio", dest="subset_ratio", type=float, default=None, help="subset ratio r in (0,1)")
  p.add_argument("--subset-ratios", dest="subset_ratios", type=_ratios, default=None,
                 help="several ratios, e.g. 0.1,0.3,0.5,0.7,0.9 (C-score)")
  p.add_argument("--augment", dest="augment", action=argparse.BooleanOptionalAction, default=None,
                 help="random flip and crop on the device (images)")
  p.add_argument("--config", default=None, help="config file: .py with CONFIG or get_config(), or .json")
  p.add_argument("--out", default=None, help="run directory (default: runs/DATASET-MODEL-sSEED)")
  p.add_argument("--overwrite", action="store_true", help="replace a run directory made with another config")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="jaxmem", description="Measure which training examples deep networks memorize.")
  parser.add_argument("--debug", action="store_true", help="show tracebacks")
  commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  p = commands.add_parser("run", help="train subset models, record predictions, write scores.csv")
  _add_run_arguments(p)
  p.set_defaults(handler=_cmd_run)

  p = commands.add_parser("scores", help="(re)compute scores.csv from a run directory's records")
  p.add_argument("run_dir")
  p.add_argument("--estimators", default=None, help="comma-separated estimator names (default: all available)")
  p.set_defaults(handler=_cmd_scores)

  p = commands.add_parser("export", help="write a run's raw records to one .npz")
  p.add_argument("run_dir")
  p.add_argument("out")
  p.set_defaults(handler=_cmd_export)
  return parser


def config_from_args(args: argparse.Namespace):
  from jaxmem.config import RunConfig, load_config_file
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
  if changes.get("mask_design") == "balanced" and "subset_ratios" not in changes:
    changes["subset_ratios"] = (0.5,)
  return config.replace(**changes).validate()


def _cmd_run(args) -> int:
  from jaxmem.run import format_summary, run
  config = config_from_args(args)
  out = args.out or f"runs/{config.dataset.replace('/', '_').replace(':', '_')}-{config.model}-s{config.seed}"
  result = run(config, out, overwrite=args.overwrite, progress=not args.no_progress,
               log=lambda m: print(m, file=sys.stderr))
  print(format_summary(result.summary))
  return 0


def _cmd_scores(args) -> int:
  from jaxmem.scoring import parse_estimator_names, score_run
  from jaxmem.run import format_summary, summarize
  table, records = score_run(args.run_dir, parse_estimator_names(args.estimators))
  summary = summarize(records, table)
  print(format_summary(summary))
  print(f"wrote {args.run_dir}/scores.csv ({records.num_train} rows, estimators: {', '.join(table.estimators)})")
  return 0


def _cmd_export(args) -> int:
  from jaxmem.store import RunDir, export_records
  records = RunDir.open(args.run_dir).load_records()
  keys = export_records(records, args.out)
  print(f"wrote {args.out}: {records.num_models} models x {records.num_train} examples; keys: {', '.join(keys)}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv
  try:
    args = build_parser().parse_args(argv)
    return args.handler(args)
  except JaxmemError as e:
    if debug:
      raise
    print(f"jaxmem: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    if debug:
      raise
    print("jaxmem: interrupted; finished chunks are saved: rerun the same command to resume", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
