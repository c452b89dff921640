"""Training engine: single-model steps, lifting strategies, sharding, chunk training."""

from jaxmem.engine.lift import Strategy, parse_strategy
from jaxmem.engine.step import margin_and_correct
from jaxmem.engine.trainer import Engine, model_keys

__all__ = ["Engine", "Strategy", "margin_and_correct", "model_keys", "parse_strategy"]
