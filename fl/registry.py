"""Name -> implementation tables, filled by a decorator where each implementation is defined.

After Opacus's registries (its grad samplers and accountants): a choice
the configuration names (an aggregation rule, an attack, a DP mechanism, a
dataset, ...) is looked up by name in one table instead of being compared
with string literals wherever it matters, so adding one is adding a
decorated definition::

    AGGREGATION_REGISTRY = Registry("aggregation")

    @AGGREGATION_REGISTRY.register("fedavg")
    def _fedavg(updates, context): ...

    AGGREGATION_REGISTRY.get("fedavg")   # the function
    AGGREGATION_REGISTRY.names()         # ("fedavg", ...) in registration order
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A table of implementations of one ``kind`` of choice, by name.

    Names are unique (registering one twice is refused, so two modules
    cannot silently replace each other's entry) and keep their
    registration order, which is the order choices are listed in.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator that files the decorated object under ``name`` and returns it unchanged."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def decorate(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return decorate

    def get(self, name: str) -> T:
        """The entry filed under ``name``; ValueError naming the choices if there is none."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown {self.kind} {name!r} (choices: {', '.join(self._entries)})"
            ) from None

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
