"""Plug-ins: modules outside raysvc that register tasks, output adapters or detectors when imported.

A plug-in is named either by a Python entry point in the group `raysvc.plugins` (an installed package) or in the
environment variable RAYSVC_PLUGINS (comma-separated module names, importable from the process's path). Every
registry loads them the first time it is asked for a name, not at import, so a plug-in may import any part of
raysvc; Ray workers, Serve replicas and command-line children inherit the variable, so they load the same ones.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from importlib.metadata import entry_points

ENV = "RAYSVC_PLUGINS"
GROUP = "raysvc.plugins"
_loaded: set[str] = set()


def load_plugins() -> None:
    """Import every plug-in named by the entry point group and RAYSVC_PLUGINS not imported yet; a plug-in that fails
    to import is an error naming it and where it was named."""
    named = [(ep.value, ep.load, f"entry point {ep.name!r} ({GROUP})") for ep in entry_points(group=GROUP)]
    for module in (m.strip() for m in os.environ.get(ENV, "").split(",")):
        if module:
            named.append((module, lambda m=module: importlib.import_module(m), f"{ENV}"))
    for key, load, where in named:
        if key in _loaded:
            continue
        _loaded.add(key)
        try:
            load()
        except Exception as e:  # any failure in someone else's module: say which plug-in, keep the cause
            _loaded.discard(key)
            raise ImportError(f"raysvc plug-in {key!r} (from {where}) failed to import: {e}") from e


class Registry:
    """Named classes or values of one kind (tasks, output adapters, detectors): raysvc's own as "module:attr"
    strings, imported when first asked for, or as values, and those plug-ins register. An unknown name runs `load`
    (the plug-ins; a kind may name more places to look) once more before it is an error listing the known names and
    `hint`, where such a plug-in is named."""

    def __init__(
        self,
        kind: str,
        entries: dict[str, object],
        load: Callable[[], None] = load_plugins,
        hint: str = f"a plug-in's: is it in {ENV}?",
    ):
        self.kind, self.entries, self.load, self.hint = kind, dict(entries), load, hint

    def register(self, name: str, value: object) -> None:
        """Add `value` as `name`. The same value again (or one equal to it, or the class a "module:attr" entry
        names) is a no-op; another value under a taken name is an error."""
        known = self.entries.get(name)
        path = f"{getattr(value, '__module__', '')}:{getattr(value, '__qualname__', '')}"
        if known is not None and known not in (value, path):
            raise ValueError(f"another {self.kind} is registered as {name!r} already{_holder(known)}")
        self.entries[name] = value

    def get(self, name: str):
        if name not in self.entries:
            self.load()
        if name not in self.entries:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {sorted(self.entries)} ({self.hint})")
        entry = self.entries[name]
        if isinstance(entry, str):
            module, attr = entry.split(":")
            entry = self.entries[name] = getattr(importlib.import_module(module), attr)
        return entry

    def names(self) -> list[str]:
        """Every registered name, plug-ins included."""
        self.load()
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.names()


def _holder(entry: object) -> str:
    """What holds a taken name, for the error: a class or "module:attr" as its path; a record (a detector's, long)
    is not repeated."""
    if isinstance(entry, type):
        return f" ({entry.__module__}:{entry.__qualname__})"
    return f" ({entry})" if isinstance(entry, str) else ""
