"""`sdistill distill`: fit a student from the recipe's teacher cache and write its artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import BadInput
from .console import line, out, progress, say


def command(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Artifact path (.npz or .yaml); default: output."),
    method: Optional[str] = typer.Option(
        None, "--method", help="A registered student method, e.g. dlms, dode, sfd (overrides student.method)."
    ),
    nfe: Optional[int] = typer.Option(None, "--nfe", help="Student NFE (overrides student.nfe)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Fit a student solver from the recipe's teacher cache and write its artifact."""
    from ..pipeline import distill
    from ..recipes import load_recipe

    if nfe is not None and nfe < 1:
        raise BadInput(f"--nfe: must be >= 1, got {nfe}")
    rep = distill(
        load_recipe(recipe),
        method_name=method,
        nfe=nfe,
        out=str(out_path) if out_path else None,
        say=say,
        progress_factory=progress(quiet),
    )
    table = Table(title=f"{rep.method} at NFE {rep.nfe}: endpoint RMSE on held-out seeds (lower is better)")
    table.add_column("solver")
    table.add_column("RMSE", justify="right")
    for name, value in rep.rows:
        table.add_row(name, f"{value:.4f}")
    out.print(table)
    line(f"wrote {rep.path} ({rep.seconds:.1f}s{', teacher built first' if rep.teacher_built else ''})")
