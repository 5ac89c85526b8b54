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
    batch: int = typer.Option(256, "--batch", help="Training batch for the states_at read throughput."),
):
    """Print a cache's spec and size; with --verify, check every shard (exit 1 when any is bad)."""
    from ..errors import BadInput
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
    if batch < 1:
        raise BadInput(f"--batch: must be >= 1, got {batch}")
    per_s, mib_s = cache.read_rate(batch)
    table.add_row(f"states_at read (batch {batch}, 8 sigmas each)", f"{per_s:,.0f} samples/s, {mib_s:,.1f} MiB/s")
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
