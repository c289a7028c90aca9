"""Registries by name (timm's ``register_*`` / ``create_*`` pattern) for what users pick by name.

A ``Registry`` maps names to factories (classes or functions) for one config key or CLI flag:
heads, losses, ensemble methods, loggers, pruners. Adding a choice is one decorated definition
beside the others; the error for an unknown name lists the registered names and the closest one.

    LOSSES = Registry("loss", "loss.name")

    @LOSSES.register("focal")
    def focal(...): ...

    LOSSES.create(cfg.loss.name, ...)      # or LOSSES.get(name) for the factory itself

Why the config does not check these names itself: ``pstage.config`` is a layer below the modules
that fill the registries (models, training, tuning, ensembling), so it cannot import them. Each
command checks the names it uses at its edge, before any work (``check_config``), next to the
other name checks (timm model and optimizer names); ``create``/``get`` check again, so a caller
that skipped the edge still gets the same one-line error rather than a KeyError.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from pstage.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> factories for one choice a user makes (``key``: the config key or CLI flag naming it)."""

    def __init__(self, kind: str, key: str):
        self.kind = kind
        self.key = key
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, a decorator that registers what it decorates."""

        def add(item: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = item
            return item

        return add if obj is None else add(obj)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def check(self, name: str, key: str | None = None) -> str:
        """``name`` if registered, else a one-line ConfigError naming the key, the choices and the closest."""
        if name in self._entries:
            return name
        key = key or self.key
        where = f"{key} {name}" if key.startswith("-") else f"{key}={name}"
        near = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.5)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"{where}: expected one of {', '.join(self.names())}{hint}")

    def get(self, name: str, key: str | None = None) -> T:
        """The factory registered as ``name`` (a ConfigError naming ``key`` if there is none)."""
        return self._entries[self.check(name, key)]

    def create(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call the factory registered as ``name`` with the given arguments."""
        factory: Callable[..., Any] = self.get(name)  # type: ignore[assignment]
        return factory(*args, **kwargs)


def config_value(config: Any, key: str) -> Any:
    """The value at a dotted key (``loss.name``) of a config object."""
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def check_config(config: Any, registries: Iterable[Registry[Any]]) -> None:
    """Check every name a config picks from ``registries`` (each at its key; list values item by item)."""
    for registry in registries:
        value = config_value(config, registry.key)
        for name in value if isinstance(value, (list, tuple)) else [value]:
            registry.check(name)
