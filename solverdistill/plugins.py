"""Third-party plugins: entry points that add handcrafted solvers, student methods and model backends."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Container
from typing import Any


def load_entry_points(group: str, known: Container[str], add: Callable[[str, Any, str], None]) -> None:
    """`add(name, loaded_object, "module:attr")` for each entry point of `group` not already `known`. A plugin
    that fails to import is reported as a warning: it must not take the built-ins down with it."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        if ep.name in known:
            continue
        try:
            obj = ep.load()
        except Exception as e:
            warnings.warn(f"{group} plugin {ep.name!r} ({ep.value}) failed to load: {e}", stacklevel=2)
            continue
        add(ep.name, obj, ep.value)
