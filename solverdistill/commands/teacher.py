"""`sdistill teacher`: fill a recipe's teacher cache (resumable, sharded)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .console import line, progress, say


def command(
    # readable=False: load_recipe says what is wrong with the file (one line), not a usage box.
    recipe: Path = typer.Argument(..., help="Recipe YAML (reads its model and teacher sections).", readable=False),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder (overrides teacher.cache)."),
    num: Optional[int] = typer.Option(None, "--num", help="Number of samples (overrides teacher.num_samples)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Batch size (overrides teacher.batch)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (overrides teacher.device)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache made with another spec."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    force: bool = typer.Option(False, "--force", help="Start even when the disk lacks the space the cache needs."),
):
    """Integrate the ODE accurately from many seeds and cache the trajectories (resumable, sharded)."""
    from ..recipes import load_recipe, path_notes
    from ..teacher.run import prepare_teacher

    r = load_recipe(
        recipe,
        {
            "teacher.cache": str(cache) if cache else None,
            "teacher.num_samples": num,
            "teacher.batch": batch,
            "teacher.device": device,
        },
    )
    for note in path_notes(r):
        say(note)
    # The one command whose job is the cache: it also checks every finished shard's checksums (readers check
    # only what they map), so a damaged shard is regenerated here rather than found by a later distill.
    with prepare_teacher(r, overwrite=overwrite, verify=True, progress_factory=progress(quiet), force=force) as job:
        say(job.size_note())
        label = f"teacher ({job.missing} of {r.teacher.num_samples} left)"
        with progress(quiet)(job.missing, label) as bar:
            rep = job.run(progress=bar)
    line(
        f"{rep.root}: {rep.total} samples ({rep.generated} integrated now, {rep.reused} already cached), "
        f"{rep.nfe_per_sample} NFE per sample, {rep.seconds:.1f}s"
    )
