"""`jaxmem report` sections for the model-level studies (neural collapse, benign, layer rewinding,
privacy forgetting, sweep): the studies' own writers make the files, the page shows their numbers."""

import html
import re
import shutil

import numpy as np
import pytest

from jaxmem.masks import balanced_masks
from jaxmem.records import RunDir, write_json_atomic
from jaxmem.report import write_report
from jaxmem.scores._stats import spearman
from jaxmem.scores.lm import exact_memorization_estimator
from jaxmem.scoring import read_scores_csv, rows_to_csv, table_to_csv
from jaxmem.studies import benign, layer_rewind, privacy_forgetting, sweep
from jaxmem.studies.neural_collapse import merge_columns_into_run

class TextRecords:
  """The part of a text run's records the exact-memorization estimator reads."""

  def __init__(self, keep, token_accuracy_epochs, example_info):
    self.keep, self.example_info = keep, example_info
    self.arrays = {"train_token_accuracy_epochs": token_accuracy_epochs}

  def __getitem__(self, name):
    return self.arrays[name]


STUDY_SECTIONS = ["exact_memorization", "neural_collapse", "benign", "layer_rewind", "privacy_forgetting", "sweep"]


def text_of(page: str) -> str:
  """The page's text with tags removed and entities decoded, for searching numbers in cells."""
  return html.unescape(re.sub(r"<[^>]+>", " ", page))


def cell(value, low, high) -> str:
  return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def benign_rows():
  rows = []
  for variant, shift in (("augment=false", -0.05), ("augment=true", 0.2)):
    for layer, init in (("hidden_0", 0.6), ("hidden_1", 0.5)):
      d = shift + (0.01 if layer == "hidden_1" else 0.0)
      rows.append({"variant": variant, "layer": layer, "init_accuracy": init, "init_ci_low": init - 0.02,
                   "init_ci_high": init + 0.02, "trained_accuracy": init + d, "trained_ci_low": init + d - 0.03,
                   "trained_ci_high": init + d + 0.03, "difference": d, "difference_ci_low": d - 0.03,
                   "difference_ci_high": d + 0.03, "verdict": benign.verdict(d - 0.03, d + 0.03)})
  return rows


def rewind_rows():
  acc = {("none", "flipped"): 0.9, ("none", "clean"): 0.95, ("none", "test"): 0.85,
         ("Dense_0", "flipped"): 0.8, ("Dense_0", "clean"): 0.9, ("Dense_0", "test"): 0.8,
         ("Dense_1", "flipped"): 0.2, ("Dense_1", "clean"): 0.93, ("Dense_1", "test"): 0.84}
  return [{"rewind_epoch": 3 if layer == "none" else 0, "layer": layer, "group": group, "accuracy": a, "se": 0.01,
           "ci_low": a - 0.02, "ci_high": a + 0.02} for (layer, group), a in acc.items()]


def planted_forgetting():
  """Margins whose in−out gap decays as e^{−0.25 k} (r=4) and e^{−0.6 k} (r=1)."""
  rng = np.random.default_rng(1)
  models, num_k, s = 16, 4, 40
  keep, _ = balanced_masks(models, s, (0.5,), 0)
  repeats = np.where(np.arange(s) < s // 2, 4, 1)
  rates = np.where(repeats == 4, 0.25, 0.6)
  k = np.arange(num_k)
  margin = (rng.normal(0, 1, s)[None, None] + rng.normal(0, 0.3, (models, num_k, s))
            + keep[:, None, :] * 4.0 * np.exp(-rates[None, None, :] * k[None, :, None]))
  groups = {"r=1": repeats == 1, "r=4": repeats == 4, "all": np.ones(s, bool)}
  curves = privacy_forgetting.forgetting_curves(margin, keep, groups, num_bootstrap=20)
  k_alpha = privacy_forgetting.forgetting_k_at_alpha(curves.advantage_KxS, 0.2)
  summary = {"num_models": models, "inject": s, "repeats": 4, "selection": "random", "first_epochs": 3,
             "second_epochs": num_k - 1, "alpha": 0.2, "attack": "LiRA online", "decay": curves.decay,
             "forgetting_k_at_alpha_mean": {g: float(np.mean(k_alpha[m])) for g, m in groups.items()}}
  examples = {"index": np.arange(s), "repeats": repeats, "memorization": np.full(s, np.nan),
              "forgetting_k_at_alpha": k_alpha}
  return curves, examples, summary


def sweep_rows(names):
  rows = []
  for i, name in enumerate(names):
    row = {"variant": name, "num_models": 8}
    for j, metric in enumerate(("test_accuracy", *sweep.BOOTSTRAP_METRICS)):
      value = 0.1 * (j + 1) + 0.01 * i
      row.update({metric: value, f"{metric}_ci_low": value - 0.05, f"{metric}_ci_high": value + 0.05})
    rows.append(row)
  return rows


@pytest.fixture(scope="module")
def study_run(tiny_run, tmp_path_factory):
  """A copy of the tiny run as one variant of a sweep, with every model-level study's files."""
  path = tmp_path_factory.mktemp("studies") / "sweep" / "weight_decay=0"
  shutil.copytree(tiny_run.run_dir, path)
  n = tiny_run.records.keep.shape[1]
  mem = read_scores_csv(path / "scores.csv")["memorization"]
  nc = 2.0 * np.nan_to_num(mem) + np.random.default_rng(0).normal(0, 0.5, n)
  merge_columns_into_run(path, {"nc_distance": nc, "nc_distance_se": np.full(n, 0.1)},
                         dataset_fingerprint=RunDir.open(path).manifest()["dataset"]["fingerprint"])
  (path / "neural_collapse").mkdir()
  write_json_atomic(path / "neural_collapse" / "neural_collapse.json",
                    {"layer": "hidden_0", "model_ids": [0, 1, 2], "num_flipped": 0})

  rows = benign_rows()
  (path / "benign").mkdir()
  (path / "benign" / "benign.csv").write_bytes(rows_to_csv(rows))
  write_json_atomic(path / "benign" / "benign.json", {"num_models": 8, "k": 20, "label_noise": 0.9, "rows": rows})
  benign.plot_benign(rows, path / "benign" / "benign.png")

  rows = rewind_rows()
  (path / "layer_rewind").mkdir()
  (path / "layer_rewind" / "layer_rewind.csv").write_bytes(rows_to_csv(rows))
  write_json_atomic(path / "layer_rewind" / "layer_rewind.json",
                    {"num_models": 8, "memorized_group": "flipped", "num_memorized": 90, "rows": rows})
  layer_rewind.plot_rewind(rows, path / "layer_rewind" / "layer_rewind.png", "flipped")

  curves, examples, summary = planted_forgetting()
  privacy_forgetting.write_outputs(path / "privacy_forgetting", curves, examples, summary, title="planted")

  # A text run's def. 2 table (here beside an image run's scores: the report shows what the run has).
  rng = np.random.default_rng(3)
  text_records = TextRecords(rng.random((4, n)) < 0.5, rng.random((4, 3, n)).astype(np.float32),
                             {"num_tokens": rng.integers(3, 9, n), "copies": rng.integers(1, 3, n)})
  result = exact_memorization_estimator(text_records)
  (path / "exact_memorization.csv").write_bytes(table_to_csv(result.tables["exact_memorization"]))

  names = ["weight_decay=0", "weight_decay=0.01"]
  rows = sweep_rows(names)
  pairs = [{"a": names[0], "b": names[1], "spearman": 0.7, "ci_low": 0.6, "ci_high": 0.8}]
  (path.parent / "sweep.csv").write_text(sweep._csv(rows))
  write_json_atomic(path.parent / "sweep.json", {"rows": rows, "spearman_memorization": {"variants": names,
                                                                                         "pairs": pairs}})
  sweep.plot_sweep(rows, path.parent / "sweep.png")
  return path, curves, summary, result.tables["exact_memorization"]


def test_each_study_gets_its_section_with_its_numbers(study_run):
  path, curves, pf_summary, exact = study_run
  lines = []
  report = write_report(path, log=lines.append)
  assert not [line for line in lines if "leaving out" in line]
  assert [s for s in report.sections if s in STUDY_SECTIONS] == STUDY_SECTIONS
  for name in ("exact_memorization.png", "benign.png", "layer_rewind.png", "privacy_forgetting.png", "sweep.png",
               "nc_distance_vs_memorization.png"):
    assert name in report.images and (report.path.parent / name).stat().st_size > 0
  text = text_of(report.path.read_text())

  for e in range(3):
    assert (f"{e + 1} {cell(*(exact[f'exact_memorization_in{s}'][e] for s in ('', '_ci_low', '_ci_high')))} "
            f"{cell(*(exact[f'exact_memorization_out{s}'][e] for s in ('', '_ci_low', '_ci_high')))}") \
        in re.sub(r"\s+", " ", text)

  scores = read_scores_csv(path / "scores.csv")
  assert f"{spearman(scores['nc_distance'], scores['memorization']):.3f} [" in text

  for row in benign_rows():
    assert (f"{row['variant']} {row['layer']} {cell(row['init_accuracy'], row['init_ci_low'], row['init_ci_high'])} "
            f"{cell(row['trained_accuracy'], row['trained_ci_low'], row['trained_ci_high'])} "
            f"{cell(row['difference'], row['difference_ci_low'], row['difference_ci_high'])} {row['verdict']}") \
        in re.sub(r"\s+", " ", text)
  assert {r["verdict"] for r in benign_rows()} == {"benign", "malign"}

  # Dense_1 rewound: flipped drops 0.9 - 0.2 = 0.7, clean 0.95 - 0.93 = 0.02: difference 0.680.
  flat = re.sub(r"\s+", " ", text)
  assert f"Dense_1 0 {cell(0.2, 0.18, 0.22)} {cell(0.93, 0.91, 0.95)} {cell(0.84, 0.82, 0.86)} 0.680" in flat
  assert f"Dense_0 0 {cell(0.8, 0.78, 0.82)} {cell(0.9, 0.88, 0.92)} {cell(0.8, 0.78, 0.82)} 0.050" in flat

  for group in ("r=1", "r=4", "all"):
    first, last = curves.metrics[group][0]["auc"], curves.metrics[group][-1]["auc"]
    decay = curves.decay[group]
    assert (f"{group} {cell(first['value'], first['low'], first['high'])} "
            f"{cell(last['value'], last['low'], last['high'])}") in flat
    assert f"{decay['rate']:.3f} ± {decay['se']:.3f} {pf_summary['forgetting_k_at_alpha_mean'][group]:.3f}" in flat
  assert "k=3" in flat and "AUC at every k" in flat

  assert f"▶ weight_decay=0 8 {cell(0.1, 0.05, 0.15)}" in flat
  assert f"weight_decay=0 weight_decay=0.01 {cell(0.7, 0.6, 0.8)}" in flat


def test_incomplete_tables_are_left_out_with_a_line(study_run, tmp_path):
  source = study_run[0]
  path = tmp_path / "sweep" / "other"  # a run the sweep does not list
  shutil.copytree(source, path)
  shutil.copyfile(source.parent / "sweep.csv", path.parent / "sweep.csv")
  curve = path / "privacy_forgetting" / "forgetting_curve.csv"
  lines = [line.split(",") for line in curve.read_text().splitlines()]
  curve.write_text("".join(",".join(c for j, c in enumerate(line) if j != 4) + "\n" for line in lines))  # auc_high lost
  (path / "benign" / "benign.csv").write_text("variant,layer\n")  # a study stopped after the header
  lines = []
  report = write_report(path, log=lines.append)
  assert [s for s in report.sections if s in STUDY_SECTIONS] == ["exact_memorization", "neural_collapse",
                                                                 "layer_rewind"]
  assert any(str(curve) in line and "auc_high" in line for line in lines)
  assert any("benign.csv" in line for line in lines)
  assert any("'other'" in line and "sweep.csv" in line for line in lines)
  assert not {"benign.png", "privacy_forgetting.png", "sweep.png"} & set(report.images)


@pytest.mark.slow  # four studies on a 4-model digits run, then the report: ~2 min on 2 cores
def test_real_study_outputs_on_a_tiny_noisy_run(tiny_config, tmp_path):
  import jaxmem
  from jaxmem.studies.neural_collapse import neural_collapse_study
  config = tiny_config.replace(num_models=4, chunk_size=4, label_noise=0.2, keep_params="all",
                               model_options={"hidden_sizes": (32, 16)})
  run = tmp_path / "run"
  jaxmem.run(config, run, progress=False, log=lambda m: None)
  quiet = {"log": lambda m: None}
  neural_collapse_study(run, **quiet)
  benign.benign_study(run, num_models=2, k=5, augment_variants=False, **quiet)
  rewound = layer_rewind.layer_rewind_study(run, num_models=2, rewind_epochs=(0,), **quiet)
  forgetting = privacy_forgetting.privacy_forgetting_study(run, num_models=6, inject=20, first_epochs=2,
                                                           second_epochs=2, **quiet)
  lines = []
  report = write_report(run, log=lines.append)
  assert [s for s in report.sections if s in STUDY_SECTIONS] == ["neural_collapse", "benign", "layer_rewind",
                                                                 "privacy_forgetting"]
  assert not [line for line in lines if "leaving out" in line]
  flat = re.sub(r"\s+", " ", text_of(report.path.read_text()))
  trained = {r["group"]: r for r in rewound.rows if r["layer"] == "none"}
  assert f"trained {cell(trained['flipped']['accuracy'], trained['flipped']['ci_low'], trained['flipped']['ci_high'])}" in flat
  auc = forgetting.curves.metrics["all"][0]["auc"]
  assert f"all {cell(auc['value'], auc['low'], auc['high'])}" in flat
