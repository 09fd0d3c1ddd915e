"""A name → item table filled by the modules that define the items (benchmarks, evaluation methods)."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar


class _Named(Protocol):
    name: str


T = TypeVar("T", bound=_Named)


class Registry(dict[str, T], Generic[T]):
    def __init__(self, what: str):
        super().__init__()
        self.what = what  # "benchmark", "evaluation method": how errors name an entry

    def register(self, item: T) -> T:
        """Add `item` under its name; another item under a taken name is an error (the same one again is not)."""
        if self.get(item.name, item) is not item:
            raise ValueError(f"{self.what} {item.name!r} is registered twice")
        self[item.name] = item
        return item

    def find(self, name: str) -> T:
        if name not in self:
            raise KeyError(f"unknown {self.what} {name!r}; known: {', '.join(sorted(self))}")
        return self[name]
