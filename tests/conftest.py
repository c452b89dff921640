"""Shared fixtures: tiny configs and one tiny finished run reused by the read-only tests."""

import os
import sys
from pathlib import Path

import pytest

# Tests never write the user's probe cache.
os.environ.setdefault("JAXMEM_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "jaxmem-test-cache"))

from jaxmem import RunConfig  # noqa: E402

TINY = RunConfig(dataset="digits", num_models=8, epochs=3, batch_size=32, chunk_size=4,
                 model_options={"hidden_sizes": (32,)}, strategy="vmap")


@pytest.fixture(scope="session")
def tiny_config() -> RunConfig:
  return TINY


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A finished 8-model digits run (read-only for the tests that use it)."""
  import jaxmem
  out = tmp_path_factory.mktemp("tiny") / "run"
  return jaxmem.run(TINY, out, progress=False, log=lambda m: None)


def jaxmem_cli(*args, cwd=None, env=None, timeout=600):
  """Runs the installed console script in a subprocess (the real CLI, exit codes and streams)."""
  import subprocess
  exe = Path(sys.executable).with_name("jaxmem")
  command = [str(exe)] if exe.exists() else [sys.executable, "-m", "jaxmem.cli"]
  full_env = {**os.environ, **(env or {})}
  return subprocess.run(command + list(args), capture_output=True, text=True, cwd=cwd, env=full_env,
                        timeout=timeout)
