"""`sdistill inspect`: an artifact's meta and arrays."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .console import out

PREVIEW_BYTES = 64 << 20  # larger arrays (network weights) are listed, not read, to preview six numbers


def command(artifact: Path = typer.Argument(..., help="Solver artifact (.npz or .yaml).")):
    """Print an artifact's meta and arrays."""
    from ..artifacts import CHECKSUM, load

    a = load(artifact)
    out.print_json(json.dumps(a.meta, default=str))
    table = Table(title="arrays")
    for col in ("name", "shape", "dtype", "values"):
        table.add_column(col)
    headers = getattr(a.arrays, "entries", {})  # an NPZ's arrays: shapes known without reading the data
    for name in a.arrays:
        head = headers.get(name)
        if head is not None and head.nbytes > PREVIEW_BYTES:
            shape, dtype, preview = head.shape, head.dtype, f"(not read: {head.nbytes / 2**20:.0f} MiB)"
        else:
            arr = a.arrays[name]
            shape, dtype = tuple(arr.shape), arr.dtype
            preview = ", ".join(f"{v:.4g}" for v in arr.ravel()[:6]) + (" ..." if arr.size > 6 else "")
        table.add_row(name, str(tuple(shape)), str(dtype), preview)
    out.print(table)
    # load() has verified the checksum when there is one; older artifacts were saved without it
    if CHECKSUM in a.meta:
        out.print(f"arrays verified against meta.{CHECKSUM}", highlight=False)
    else:
        out.print(f"no meta.{CHECKSUM} (saved before checksums): arrays not verified", highlight=False)
