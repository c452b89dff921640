"""Studies: small drivers over the engine that retrain models on modified datasets (long-tail
remove-top, privacy onion, SSFT two-phase). Each lives in its own module."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class StudyTable:
  """What a one-table study returns: its directory, the table's rows (also in its CSV), the summary
  written beside them and the lines the CLI prints."""
  out: Path
  rows: list[dict[str, Any]]
  summary: dict[str, Any]
  lines: list[str]
