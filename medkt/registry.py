"""One registry mechanism for every pluggable kind of component.

Backends, inversion objectives, fine-tuning losses, M2IB vision splits, prompt generators,
dataset preparers and phantom findings are each a `Registry`: a name -> object table
with optional metadata per entry. medkt registers its own components exactly the way a research
script does:

    from medkt.inversion import INVERSION_OBJECTIVES

    @INVERSION_OBJECTIVES.register("mine", uses_text_embeddings=True)
    def my_objective(backend, x, ctx): ...

Entries may be *lazy*: ``registry.register_lazy("vilt", "medkt.backends.vilt:create")`` imports
the module only when the name is first looked up, so ``import medkt`` stays light and optional
model libraries stay optional.

Plug-ins that live in another package (or in a sub-package that imports the engine, such as
`medkt.natural`, whose ViLT/CoCa objectives and losses register themselves on import) are
declared as Python entry points of the registry's ``group`` (e.g. ``medkt.finetune_losses`` in
``pyproject.toml``), each naming a module to import; a registry loads its group once, on its
first miss or listing. Declaring the dependency in the package metadata rather than as an
import keeps the engine's import graph free of cycles, and a third-party package plugs in the
same way.

Import light: no torch here.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator
from importlib import metadata
from typing import Any, Generic, TypeVar

from medkt.errors import ConfigError, unknown_name

T = TypeVar("T")

def load_entry_points(group: str) -> list[str]:
    """Import the modules declared under entry-point ``group`` (each registers components when
    imported); returns the entry-point names loaded. A plug-in whose *optional dependency* is
    missing is skipped (its components stay unregistered); a missing plug-in module is an error."""
    loaded = []
    for ep in metadata.entry_points(group=group):
        try:
            ep.load()
        except ModuleNotFoundError as exc:
            if exc.name and ep.value.split(":")[0].startswith(exc.name):
                raise
            continue
        loaded.append(ep.name)
    return loaded


class Registry(Generic[T]):
    """Named components of one kind (``kind`` is used in error messages, e.g. "backend family").

    Args:
        kind: what an entry is, for messages ("inversion objective").
        group: entry-point group of plug-in modules loaded once, on the first miss or listing
            (`load_entry_points`); None = no plug-ins.
    """

    def __init__(self, kind: str, group: str | None = None):
        self.kind = kind
        self.group = group
        self._entries: dict[str, T | str] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._loaded = False

    # -- registering -------------------------------------------------------------------------
    def register(self, name: str, obj: T | None = None, *, overwrite: bool = True, **meta: Any) -> Any:
        """Register ``obj`` as ``name`` with metadata ``meta``; without ``obj`` a decorator.

        ``overwrite=False`` refuses a name that is already taken (a `ConfigError`)."""
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def add(o: T) -> T:
            if not overwrite and name in self:  # plug-ins loaded first: their names count as taken
                raise ConfigError(f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it")
            self._entries[name] = o
            self._meta[name] = dict(meta)
            return o

        return add if obj is None else add(obj)

    def register_lazy(self, name: str, target: str, **meta: Any) -> None:
        """Register ``"module:attribute"``, imported on the first `get` of ``name``."""
        if ":" not in target:
            raise ConfigError(f"lazy {self.kind} {name!r}: expected 'module:attribute', got {target!r}")
        self._entries[name] = target
        self._meta[name] = dict(meta)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (no error when absent; tests use this to clean up)."""
        self._entries.pop(name, None)
        self._meta.pop(name, None)

    # -- looking up --------------------------------------------------------------------------
    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.group:
            load_entry_points(self.group)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name not in self._entries:
            self._load()
        return name in self._entries

    def get(self, name: str) -> T:
        """The component registered as ``name``; an unknown name is an
        `UnknownNameError` with a "did you mean" and the known names."""
        if name not in self:
            raise unknown_name(self.kind, name, self.names())
        entry = self._entries[name]
        if isinstance(entry, str):  # lazy "module:attribute"
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        return entry  # type: ignore[return-value]

    def meta(self, name: str, key: str, default: Any = None) -> Any:
        """Metadata ``key`` given when ``name`` was registered (``default`` when not given)."""
        if name not in self:
            raise unknown_name(self.kind, name, self.names())
        return self._meta[name].get(key, default)

    def names(self) -> list[str]:
        """Registered names in registration order (entry-point plug-ins loaded first)."""
        self._load()
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        """``(name, component)`` pairs, lazy entries imported."""
        for name in self.names():
            yield name, self.get(name)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


__all__ = ["Registry", "load_entry_points"]
