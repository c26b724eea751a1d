"""Explicit `kind -> (config class, factory)` registries for the polymorphic config slots.

A slot (regularizer, conditioner, prediction, attention, data, stage) is one `Registry`. A config
field that holds one of its configs is declared with `polymorphic(registry, default_kind)`; the
loader reads the node's `kind` first, picks that config class, and only then checks the other keys,
so an unknown kind is reported with the valid kinds and never as a confusing missing field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Entry:
    config_cls: type
    factory: Callable[..., Any] | None


class Registry:
    """Maps `kind` strings of one slot to their config dataclass and builder."""

    def __init__(self, slot: str, kind_field: bool = True):
        """`kind_field=False` for slots whose kind is named by a sibling field (`polymorphic(kind_from=...)`)."""
        self.slot = slot
        self.kind_field = kind_field
        self._entries: dict[str, Entry] = {}

    def register(self, kind: str, config_cls: type, factory: Callable[..., Any] | None = None) -> None:
        if kind in self._entries:
            raise KeyError(f"{self.slot} kind {kind!r} is registered twice")
        fields = {f.name: f for f in dataclasses.fields(config_cls)}
        if self.kind_field and ("kind" not in fields or fields["kind"].default != kind):
            raise TypeError(f"{config_cls.__name__} must declare `kind: str = {kind!r}`")
        self._entries[kind] = Entry(config_cls, factory)

    @property
    def kinds(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, kind: str, key: str = "kind") -> Entry:
        if kind not in self._entries:
            raise ValueError(f"{key}: unknown {self.slot} kind {kind!r}; valid kinds: {', '.join(self.kinds)}")
        return self._entries[kind]

    def config_class(self, kind: str, key: str = "kind") -> type:
        return self.entry(kind, key).config_cls

    def build(self, cfg: Any, **runtime: Any) -> Any:
        """Builds the object for `cfg` (whose `kind` selects the factory); runtime objects are keywords."""
        factory = self.entry(cfg.kind).factory
        if factory is None:
            raise TypeError(f"{self.slot} kind {cfg.kind!r} has no factory")
        return factory(cfg, **runtime)


def polymorphic(registry: Registry, default_kind: str, kind_from: str | None = None) -> Any:
    """A dataclass field holding the config of one `kind` of `registry`.

    `kind_from` names a sibling field that selects the kind instead of a `kind` key inside the node
    (the run's `stage` selects the class of its `task` section).
    """

    def default() -> Any:
        return registry.config_class(default_kind)()

    return dataclasses.field(default_factory=default, metadata={"registry": registry, "kind_from": kind_from})
