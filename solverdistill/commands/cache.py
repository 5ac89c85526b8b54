"""`sdistill cache info`: a teacher cache's spec and size, and with --verify its checksums."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .console import out, say


def info(
    folder: Path = typer.Argument(..., help="Teacher cache folder."),
    verify_sums: bool = typer.Option(False, "--verify", help="Check every checksum; mark bad shards."),
):
    """Print a cache's spec and size; with --verify, check every shard (exit 1 when any is bad)."""
    from ..teacher.cache import TeacherCache, verify

    bad = verify(folder) if verify_sums else []
    table = Table(title=f"teacher cache {folder}")
    table.add_column("field")
    table.add_column("value")
    for k, v in TeacherCache.open(folder).summary():
        table.add_row(k, v)
    out.print(table)
    if verify_sums:
        for name, why in bad:
            say(f"bad shard {name}: {why} (marked; the next `sdistill teacher` run regenerates it)")
        if bad:
            raise typer.Exit(1)
        out.print("all checksums ok")
