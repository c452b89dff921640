"""jaxmem: measure how deep networks memorize their training data, with error bars.

The public API, flat::

  import jaxmem
  result = jaxmem.run(jaxmem.RunConfig(num_models=64, epochs=10), "runs/demo")
  result.scores.columns["memorization"]
"""

__version__ = "0.1.0"

import importlib
import sys
import types

# Imported on first use (PEP 562), so that `jaxmem ...` on the command line reaches its signal
# handlers and its argument errors before JAX is imported (seconds); `import jaxmem` is unchanged
# for users: every name below is an attribute of the package.
_EXPORTS = {
    "RunConfig": "jaxmem.config", "load_config_file": "jaxmem.config",
    "Dataset": "jaxmem.data", "load_dataset": "jaxmem.data",
    "JaxmemError": "jaxmem.errors",
    "make_masks": "jaxmem.masks",
    "TextDataset": "jaxmem.text",
    "RunInterrupted": "jaxmem.run", "RunResult": "jaxmem.run", "format_summary": "jaxmem.run", "merge": "jaxmem.run",
    "run": "jaxmem.run",
    "auroc": "jaxmem.scores", "counterfactual_memorization": "jaxmem.scores", "memorization": "jaxmem.scores",
    "read_scores_csv": "jaxmem.scoring", "score_records": "jaxmem.scoring", "score_run": "jaxmem.scoring",
    "Records": "jaxmem.records", "RunDir": "jaxmem.records", "export_records": "jaxmem.records",
    "load_model_params": "jaxmem.records",
}


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'jaxmem' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_EXPORTS))


class _Package(types.ModuleType):
  """``jaxmem.run`` is the function, also once the submodule ``jaxmem.run`` is imported (importing a
  submodule sets the package attribute of its name to the module; a data descriptor on the
  package's class keeps the function; see the Python reference, "Customizing module attribute
  access")."""

  @property
  def run(self):
    return importlib.import_module("jaxmem.run").run

  @run.setter
  def run(self, value):  # the import system binding the submodule: the function stays
    pass


sys.modules[__name__].__class__ = _Package


__all__ = [
    "Dataset", "JaxmemError", "Records", "RunConfig", "RunDir", "RunResult", "TextDataset", "auroc",
    "counterfactual_memorization", "export_records", "format_summary", "load_config_file", "load_dataset",
    "make_masks", "memorization", "read_scores_csv", "run", "score_records", "score_run",
    "RunInterrupted", "load_model_params", "merge",
]
