"""`sdistill inspect`: an artifact's meta and arrays."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .console import out


def command(artifact: Path = typer.Argument(..., help="Solver artifact (.npz or .yaml).")):
    """Print an artifact's meta and arrays."""
    from ..artifacts import load

    a = load(artifact)
    out.print_json(json.dumps(a.meta, default=str))
    table = Table(title="arrays")
    for col in ("name", "shape", "dtype", "values"):
        table.add_column(col)
    for name, arr in a.arrays.items():
        preview = ", ".join(f"{v:.4g}" for v in arr.ravel()[:6]) + (" ..." if arr.size > 6 else "")
        table.add_row(name, str(tuple(arr.shape)), str(arr.dtype), preview)
    out.print(table)
