"""Name -> object registries with errors that list the valid names (big_vision style)."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from jaxmem.errors import one_of

T = TypeVar("T")


class Registry(Generic[T]):
  """A small named registry; ``kind`` is used in the error message for unknown names."""

  def __init__(self, kind: str):
    self.kind = kind
    self._items: dict[str, T] = {}

  @classmethod
  def of(cls, kind: str, items: dict[str, T]) -> "Registry[T]":
    """A registry holding exactly ``items`` (an explicit table, no registration side effects)."""
    registry = cls(kind)
    registry._items.update(items)
    return registry

  def register(self, name: str) -> Callable[[T], T]:
    def decorator(item: T) -> T:
      if name in self._items:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._items[name] = item
      return item
    return decorator

  def get(self, name: str) -> T:
    if name not in self._items:
      raise one_of(self.kind, name, self._items)
    return self._items[name]

  def names(self) -> list[str]:
    return sorted(self._items)

  def __contains__(self, name: str) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())
