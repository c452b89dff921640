"""jaxmem: measure how deep networks memorize their training data, with error bars.

The public API, flat::

  import jaxmem
  result = jaxmem.run(jaxmem.RunConfig(num_models=64, epochs=10), "runs/demo")
  result.scores.columns["memorization"]
"""

__version__ = "0.1.0"

from jaxmem.config import RunConfig, load_config_file
from jaxmem.data import Dataset, load_dataset
from jaxmem.errors import JaxmemError
from jaxmem.masks import make_masks
from jaxmem.text import TextDataset  # registers the text datasets (canaries, .txt, TFDS text)
from jaxmem.run import RunInterrupted, RunResult, format_summary, merge, run
from jaxmem.scores import auroc, counterfactual_memorization, memorization
from jaxmem.scoring import read_scores_csv, score_records, score_run
from jaxmem.store import Records, RunDir, export_records, load_model_params

__all__ = [
    "Dataset", "JaxmemError", "Records", "RunConfig", "RunDir", "RunResult", "TextDataset", "auroc",
    "counterfactual_memorization", "export_records", "format_summary", "load_config_file", "load_dataset",
    "make_masks", "memorization", "read_scores_csv", "run", "score_records", "score_run",
    "RunInterrupted", "load_model_params", "merge",
]
