"""Plug-ins: modules outside raysvc that register tasks, output adapters or detectors when imported.

A plug-in is named either by a Python entry point in the group `raysvc.plugins` (an installed package) or in the
environment variable RAYSVC_PLUGINS (comma-separated module names, importable from the process's path). Every
registry loads them the first time it is asked for a name, not at import, so a plug-in may import any part of
raysvc; Ray workers, Serve replicas and command-line children inherit the variable, so they load the same ones.
"""

from __future__ import annotations

import importlib
import os
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
