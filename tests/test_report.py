"""`jaxmem report`: sections follow the scores a run has, and the page loads in headless Chromium
with every image present."""

import csv
import re
import shutil
import subprocess

import numpy as np
import pytest

from jaxmem import RunConfig
from jaxmem.cli import main as cli_main
from jaxmem.report import write_report
from jaxmem.scoring import read_scores_csv, table_to_csv

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
NEEDS_CHROMIUM = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed: the browser check needs Debian's `chromium` "
    "(.ci/run installs it with `apt-get install -y chromium` when it runs as root with apt available)")

# Appended to a copy of the page: after `load`, lists every <img> that did not decode.
CHECK_SCRIPT = """<script>window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var out = document.createElement('pre'); out.id = 'jaxmem-check';
  out.textContent = 'images=' + imgs.length + ' broken=' + bad.map(function (i) { return i.getAttribute('src'); }).join(',');
  document.body.appendChild(out);
});</script>"""


def browser_image_check(index_html, tmp_path) -> tuple[int, list[str]]:
  """Loads the page in headless Chromium (offline, file://); returns (#images, broken image srcs)."""
  page = index_html.with_name("_browser_check.html")  # beside index.html so relative paths resolve
  page.write_text(index_html.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
  command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000", "--dump-dom",
             page.as_uri()]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
  finally:
    page.unlink()
  found = re.search(r'<pre id="jaxmem-check">images=(\d+) broken=([^<]*)</pre>', done.stdout)
  assert found, f"the check did not run in Chromium (rc {done.returncode}): {done.stderr[-1500:]}"
  return int(found.group(1)), [s for s in found.group(2).split(",") if s]


ESTIMATOR_FILES = ("influence_topk.csv", "influence_pairs.csv", "influence.npy", "lira.json", "lira_roc.png",
                   "correlations.csv")


def copy_run(run, tmp_path):
  """A copy of a run reduced to what the memorization estimator alone writes (other estimators'
  columns and files removed), whatever estimators are registered by default."""
  path = shutil.copytree(run.run_dir, tmp_path / "run")
  scores = read_scores_csv(path / "scores.csv")
  base = ("index", "label", "clean_label", "noisy", "memorization", "memorization_se", "n_in", "n_out")
  (path / "scores.csv").write_bytes(table_to_csv({k: v for k, v in scores.items() if k in base}))
  for name in ESTIMATOR_FILES:
    (path / name).unlink(missing_ok=True)
  return path


def add_estimator_outputs(path, records):
  """Writes the other estimators' outputs under their fixed names, computed naively from the records,
  so every section of the report has something to show."""
  keep, correct, test_correct = records.keep, records["train_correct"], records["test_correct"]
  scores = read_scores_csv(path / "scores.csv")
  held_out = np.where((~keep).sum(0) > 0, (correct & ~keep).sum(0) / np.maximum((~keep).sum(0), 1), np.nan)
  scores["cscore_at_0.5"] = scores["cscore_at_0.7"] = held_out  # two ratios: the per-ratio plot
  scores["cscore"] = held_out
  scores["forgetting_events"] = np.random.default_rng(0).integers(0, 4, keep.shape[1])
  (path / "scores.csv").write_bytes(table_to_csv(scores))
  with open(path / "influence_topk.csv", "w", newline="") as f:  # naive in-out difference, best train per test
    w = csv.writer(f)
    w.writerow(["test_index", "train_index", "influence", "influence_se", "memorization"])
    for j in range(0, test_correct.shape[1], 30):
      infl = np.array([test_correct[keep[:, i], j].mean() - test_correct[~keep[:, i], j].mean()
                       if 0 < keep[:, i].sum() < len(keep) else -np.inf for i in range(keep.shape[1])])
      i = int(np.argmax(infl))
      w.writerow([j, i, infl[i], 0.1, scores["memorization"][i]])
  shutil.copyfile(path / "influence_topk.csv", path / "influence_pairs.csv")
  (path / "lira.json").write_text('{"online": {"auc": 0.61, "tpr_at_fpr": {"0.001": 0.0, "0.01": 0.02}}}')
  from matplotlib.figure import Figure
  fig = Figure(figsize=(2, 2))
  fig.add_subplot().loglog([1e-3, 1], [1e-3, 1])
  fig.savefig(path / "lira_roc.png")
  (path / "correlations.csv").write_text(",memorization,cscore\nmemorization,1,-0.8\ncscore,-0.8,1\n")


def test_sections_follow_the_scores_the_run_has(tiny_run, tmp_path):
  path = copy_run(tiny_run, tmp_path)
  report = write_report(path)
  assert report.sections == ["facts", "memorization", "gallery"]
  assert report.dataset_note == ""  # digits reloaded, fingerprint matched: galleries are images
  assert report.images == ["memorization_hist.png", "memorization_per_class.png", "gallery_most.png",
                           "gallery_least.png"]
  add_estimator_outputs(path, tiny_run.records)
  report = write_report(path)
  assert report.sections == ["facts", "memorization", "gallery", "influence", "cscore", "lira", "dynamics",
                             "correlations"]
  page = report.path.read_text()
  for name in report.images:
    assert (report.path.parent / name).is_file() and f'src="{name}"' in page
  assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from the network
  assert "0.61" in page and "Forgetting vs memorization" in page


@NEEDS_CHROMIUM
def test_report_loads_in_headless_chromium_with_no_missing_image(tiny_run, tmp_path):
  path = copy_run(tiny_run, tmp_path)
  add_estimator_outputs(path, tiny_run.records)
  assert cli_main(["report", str(path)]) == 0
  index = path / "report" / "index.html"
  count, broken = browser_image_check(index, tmp_path)
  assert broken == [] and count == len(list((path / "report").glob("*.png"))) == 9
  (path / "report" / "gallery_least.png").unlink()  # the check can fail: a missing figure is caught
  count, broken = browser_image_check(index, tmp_path)
  assert broken == ["gallery_least.png"] and count == 9


def test_flipped_labels_are_marked_and_get_a_clean_gallery(tiny_run, tmp_path):
  path = copy_run(tiny_run, tmp_path)
  scores = read_scores_csv(path / "scores.csv")
  top = np.argsort(-np.nan_to_num(scores["memorization"], nan=-9), kind="stable")[:3]
  scores["noisy"][top] = 1  # as if these labels had been flipped
  (path / "scores.csv").write_bytes(table_to_csv(scores))
  report = write_report(path, top=6)
  assert report.images[2:5] == ["gallery_most.png", "gallery_most_clean.png", "gallery_least.png"]
  assert "3 most memorized training examples with clean labels" not in report.path.read_text()  # figure title, not text
  assert 'alt="6 most memorized training examples with clean labels"' in report.path.read_text()


def test_non_image_data_and_fingerprint_mismatch_get_tables(tmp_path):
  import json
  import jaxmem
  config = RunConfig(dataset="synthetic", num_models=4, epochs=2, batch_size=64, chunk_size=4,
                     model_options={"hidden_sizes": (16,)}, strategy="vmap")
  run = jaxmem.run(config, tmp_path / "synthetic", progress=False, log=lambda m: None)
  report = write_report(run.run_dir, top=5)
  assert report.sections[:3] == ["facts", "memorization", "gallery"] and "not images" in report.dataset_note
  assert not any(name.startswith("gallery") for name in report.images)
  page = report.path.read_text()
  assert "5 most memorized</h3><table" in page and "5 least memorized</h3><table" in page

  manifest = json.loads((run.run_dir / "manifest.json").read_text())
  manifest["dataset"]["fingerprint"] = "0" * 64
  (run.run_dir / "manifest.json").write_text(json.dumps(manifest))
  report = write_report(run.run_dir)
  assert "fingerprint mismatch" in report.dataset_note and "fingerprint mismatch" in report.path.read_text()


def test_report_of_a_run_without_scores_is_a_one_line_error(tiny_run, tmp_path):
  path = copy_run(tiny_run, tmp_path)
  (path / "scores.csv").unlink()
  assert cli_main(["report", str(path)]) == 2


def _capture_figures(monkeypatch) -> dict:
  """name -> matplotlib Figure of every image the report saves."""
  from jaxmem import report
  figures = {}
  save = report._Context.save

  def capture(self, fig, name, alt, width=None):
    figures[name] = fig
    return save(self, fig, name, alt, width)
  monkeypatch.setattr(report._Context, "save", capture)
  return figures


def test_report_presentation(tiny_run, tmp_path, monkeypatch):
  """What a reader needs: LiRA as the attack x metric table the CLI prints (not a flattened dump),
  histograms with a y-axis label, a warning for a run with very few models, the influence value
  under the pair it belongs to."""
  from jaxmem.scores.lira import VARIANT_LABELS, lira_report
  from jaxmem.records import write_json_atomic
  path = copy_run(tiny_run, tmp_path)
  add_estimator_outputs(path, tiny_run.records)
  _, summary, _ = lira_report(tiny_run.records, num_bootstrap=20)
  write_json_atomic(path / "lira.json", summary)
  scores = read_scores_csv(path / "scores.csv")
  scores["lira_online"] = scores["lira_offline"] = np.linspace(0, 1, len(scores["index"]))
  (path / "scores.csv").write_bytes(table_to_csv(scores))
  figures = _capture_figures(monkeypatch)
  html = write_report(path, log=lambda m: None).path.read_text()
  lira = html[html.index('id="lira"'):]
  assert "attack.online" not in lira and "auc.high" not in lira
  assert "<th>AUC</th>" in lira and "<th>TPR@1%FPR</th>" in lira and "<th>balanced acc</th>" in lira
  for name in summary["attack"]:
    value = summary["attack"][name]["auc"]
    assert f"<td>{VARIANT_LABELS.get(name, name)}</td><td>{value['value']:.3f} [{value['low']:.3f}, {value['high']:.3f}]</td>" in lira
  # A histogram without a y-axis label: either its axes or its figure (small multiples) names it.
  for name, fig in figures.items():
    for ax in fig.axes:
      if ax.get_visible() and ax.patches and "hist" in name or name in ("memorization_per_class.png", "lira_scores.png"):
        assert ax.get_ylabel() or (fig._supylabel is not None and fig._supylabel.get_text()), name
  assert "only 8 models" in html and "standard errors" in html
  fig = figures["influence_pairs.png"]
  labelled = [ax for ax in fig.axes if ax.get_xlabel().startswith("infl")]
  images = [ax for ax in fig.axes if ax.images]
  assert labelled and len(images) == 2 * len(labelled)
  for label, (train, test) in zip(labelled, zip(images[0::2], images[1::2])):
    centre = (label.get_position().x0 + label.get_position().x1) / 2
    assert train.get_position().x1 <= centre <= test.get_position().x0 + 1e-9 or \
        abs(centre - (train.get_position().x0 + test.get_position().x1) / 2) < 1e-6, name


def test_least_memorized_gallery_samples_a_tie(tiny_run, tmp_path, monkeypatch):
  """Hundreds of examples tie at the minimum: the gallery says so and draws from the whole tie,
  not indices 0..k-1."""
  path = copy_run(tiny_run, tmp_path)
  scores = read_scores_csv(path / "scores.csv")
  n = len(scores["index"])
  scores["memorization"] = np.where(np.arange(n) % 3 == 0, 0.5, 0.0)
  (path / "scores.csv").write_bytes(table_to_csv(scores))
  report = write_report(path, top=8, log=lambda m: None)
  html = report.path.read_text()
  tied = int(np.sum(scores["memorization"] == 0))
  assert f"8 of the {tied} examples tied at the minimum 0.00, drawn at random" in html
  shown = [int(i) for i in re.findall(r"#(\d+) y=", html)] if "#" in html else []
  from jaxmem.report import tie_sample
  sample = tie_sample(scores["memorization"], 8)
  assert len(sample) == 8 and (scores["memorization"][sample] == 0).all()
  assert sample.max() > 8 * 3  # drawn from across the tie, not the first indices
