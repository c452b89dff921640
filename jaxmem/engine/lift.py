"""Lifting single-model functions over the model axis.

* ``vmap``: all models of a device in one batched program. Best for small dense layers; a vmapped
  convolution becomes a grouped convolution, which XLA runs several times slower than a loop on CPU.
* ``map``: ``lax.map`` — a compiled loop over models, one model at a time, no grouped convolutions.
* ``mixed:W``: ``lax.map`` over groups of W models, vmapped inside a group.
* ``loop``: a Python loop calling the jitted single-model function per model. This is the plain
  reference the other strategies are tested against (and a benchmark baseline), never chosen by auto.
* ``auto``: time a short probe of the candidates on the real shapes and keep the fastest, cached
  per architecture, shapes and device kind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from jaxmem.errors import JaxmemError

STRATEGY_KINDS = ("vmap", "map", "mixed", "loop")


@dataclasses.dataclass(frozen=True)
class Strategy:
  kind: str
  width: int = 0

  def __str__(self) -> str:
    return f"mixed:{self.width}" if self.kind == "mixed" else self.kind


def parse_strategy(text: str) -> Strategy | None:
  """``'auto'`` → None; ``'vmap'``, ``'map'``, ``'loop'``, ``'mixed:W'`` → a Strategy."""
  allowed = "auto, vmap, map, loop, mixed:W (W >= 1)"
  if text == "auto":
    return None
  if text in ("vmap", "map", "loop"):
    return Strategy(text)
  if text.startswith("mixed:"):
    try:
      width = int(text.split(":", 1)[1])
    except ValueError:
      width = 0
    if width >= 1:
      return Strategy("mixed", width)
  raise JaxmemError(f"unknown strategy {text!r}; choose one of: {allowed}")


def lift(fn: Callable[..., Any], strategy: Strategy) -> Callable[..., Any]:
  """``fn`` maps one model's arguments to outputs; the result maps stacked arguments (leading
  model axis on every leaf) to stacked outputs. Shared inputs are closed over by ``fn``."""
  if strategy.kind == "vmap":
    return jax.vmap(fn)
  if strategy.kind == "map":
    return lambda *args: jax.lax.map(lambda a: fn(*a), args)
  if strategy.kind == "mixed":
    return lambda *args: jax.lax.map(lambda a: fn(*a), args, batch_size=strategy.width)
  raise ValueError(f"strategy {strategy} cannot be lifted inside a compiled program")


def candidate_strategies(models_per_device: int) -> list[Strategy]:
  """What ``auto`` tries: both extremes and vmap groups of a few widths in between."""
  candidates = [Strategy("vmap"), Strategy("map")]
  for width in (4, 16):
    if 1 < width < models_per_device:
      candidates.append(Strategy("mixed", width))
  return candidates


def default_cache_path() -> Path:
  base = os.environ.get("JAXMEM_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxmem")
  return Path(base) / "strategy_probe.json"


def probe_key(parts: dict[str, Any]) -> str:
  text = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def choose_strategy(candidates: Sequence[Strategy], time_candidate: Callable[[Strategy], float], *,
                    key_parts: dict[str, Any], cache_path: Path | None) -> tuple[Strategy, dict[str, float]]:
  """Pick the fastest candidate by ``time_candidate`` (seconds per probe, compile excluded),
  reusing a cached verdict for the same ``key_parts`` when there is one."""
  key = probe_key(key_parts)
  cache: dict[str, Any] = {}
  if cache_path is not None and cache_path.is_file():
    try:
      cache = json.loads(cache_path.read_text())
    except (OSError, json.JSONDecodeError):
      cache = {}  # a broken cache only costs a new probe
  if key in cache:
    return parse_strategy(cache[key]["strategy"]), cache[key]["seconds"]
  seconds = {str(s): time_candidate(s) for s in candidates}
  best = min(candidates, key=lambda s: seconds[str(s)])
  if cache_path is not None:
    cache[key] = {"strategy": str(best), "seconds": seconds, "parts": key_parts}
    try:
      cache_path.parent.mkdir(parents=True, exist_ok=True)
      tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
      tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
      os.replace(tmp, cache_path)
    except OSError:
      pass  # read-only home: probing again next time is the only cost
  return best, seconds
