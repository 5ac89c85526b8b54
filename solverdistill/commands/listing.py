"""`sdistill solvers`, `sdistill students` and `sdistill models`: what can be named on the command line."""

from __future__ import annotations

from rich.table import Table

from .console import out


def solvers():
    """List the handcrafted solvers: order, calls per step, default grid."""
    from .. import solvers as registry

    registry.load_plugins()
    aliases: dict[str, list[str]] = {}
    for alias, name in registry.ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    table = Table(title="handcrafted solvers")
    for col in ("name", "aliases", "order", "calls/step", "default grid", "what"):
        table.add_column(col)
    for name, info in registry.SOLVERS.items():
        table.add_row(
            name,
            ", ".join(aliases.get(name, [])),
            str(info.order),
            str(info.calls_per_step),
            info.default_schedule,
            info.summary,
        )
    out.print(table)


def students():
    """List the student methods, built-in and from plugins."""
    from .. import students as registry

    table = Table(title="student methods")
    for col in ("method", "what"):
        table.add_column(col)
    for name in registry.names():
        table.add_row(name, registry.get(name).summary)
    out.print(table)


def models():
    """List the model backends and the built-in presets."""
    from ..models import BACKENDS
    from ..models.gmm import PRESET_HELP

    table = Table(title="model specs")
    for col in ("spec", "what"):
        table.add_column(col)
    for backend in BACKENDS.values():
        table.add_row(f"{backend.scheme}:...", backend.help)
    for name, what in PRESET_HELP.items():
        table.add_row(f"gmm:{name}", what)
    out.print(table)
