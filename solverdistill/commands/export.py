"""`sdistill export`: a solver artifact as a diffusers scheduler, a diffusers sigmas list or ComfyUI SIGMAS."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .console import line


def command(
    artifact: str = typer.Argument(..., help="A solver artifact (.npz or .yaml) made by `sdistill distill`."),
    to: str = typer.Option(..., "--to", help="diffusers-scheduler, diffusers-sigmas or comfyui."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Where to write (default: beside the artifact, named for the format)."
    ),
    model: Optional[str] = typer.Option(
        None, "--model", help="diffusers:DIR whose VP table maps sigma to timesteps (default: the artifact's model)."
    ),
    force: bool = typer.Option(False, "--force", help="Use --model even if the artifact was made for another model."),
):
    """Export a solver where people sample: diffusers (a scheduler, or sigmas=) and ComfyUI (SIGMAS)."""
    from ..export import run_export

    line(run_export(artifact, to, out, model, force))
