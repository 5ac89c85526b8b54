"""`sdistill cache info`: a teacher cache's spec and size, and with --verify its checksums."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .console import out, say


def info(
    # readable=False: the engine says what is wrong with the folder (one line), not a usage box.
    folder: Path = typer.Argument(..., help="Teacher cache folder.", readable=False),
    verify_sums: bool = typer.Option(False, "--verify", help="Check every checksum; mark bad shards."),
):
    """Print a cache's spec and size; with --verify, check every shard (exit 1 when any is bad)."""
    from ..teacher.cache import TeacherCache, verify

    if verify_sums:
        report = verify(folder)
        cache = TeacherCache(folder, report.manifest)  # bad shards marked, even where the marks were not written
    else:
        cache = TeacherCache.open(folder)
    table = Table(title=f"teacher cache {folder}")
    table.add_column("field")
    table.add_column("value")
    for k, v in cache.summary():
        table.add_row(k, v)
    out.print(table)
    if verify_sums:
        then = "the next `sdistill teacher` run regenerates it"
        for name, why in report.problems:
            if name.startswith("samples"):
                say(f"{name}: {why}; the next `sdistill teacher` run fills them")
            elif report.marked:
                say(f"bad shard {name}: {why} (marked; {then})")
            else:
                say(f"bad shard {name}: {why} (not marked: {folder} cannot be written)")
        if report.problems:
            raise typer.Exit(1)
        out.print("all checksums ok")
