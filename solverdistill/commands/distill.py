"""`sdistill distill`: fit a student from the recipe's teacher cache and write its artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import BadInput
from .console import line, out, progress, say


def command(
    # readable=False: load_recipe says what is wrong with the file (one line), not a usage box.
    recipe: Path = typer.Argument(..., help="Recipe YAML.", readable=False),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Artifact path (.npz or .yaml); default: output."),
    method: Optional[str] = typer.Option(
        None, "--method", help="A registered student method, e.g. dlms, dode, sfd (overrides student.method)."
    ),
    nfe: Optional[int] = typer.Option(None, "--nfe", help="Student NFE (overrides student.nfe)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Fit a student solver from the recipe's teacher cache and write its artifact."""
    from ..pipeline import distill
    from ..recipes import CEILINGS, load_recipe

    if nfe is not None and not 1 <= nfe <= CEILINGS["nfe"]:
        raise BadInput(f"--nfe: must be between 1 and {CEILINGS['nfe']}, got {nfe}")
    rep = distill(
        load_recipe(recipe),
        method_name=method,
        nfe=nfe,
        out=str(out_path) if out_path else None,
        say=say,
        progress_factory=progress(quiet),
    )
    held = rep.metrics.get("heldout_samples", "?")
    table = Table(
        title=f"{rep.method} at NFE {rep.nfe}: endpoint RMSE", caption=f"{held} held-out seeds; lower is better"
    )
    table.add_column("solver")
    table.add_column("RMSE", justify="right")
    for name, value in rep.rows:
        table.add_row(name, f"{value:.4f}")
    out.print(table)
    m = rep.metrics
    ratio, curve = m.get("acceleration"), m.get("best_handcrafted_by_nfe", {})
    if ratio is not None:
        line(
            f"acceleration: {ratio:.2f}x (the best handcrafted solver needs NFE {ratio * rep.nfe:.1f} for the "
            f"student's held-out RMSE at NFE {rep.nfe})"
        )
    elif curve:
        line(
            f"acceleration: more than {max(map(int, curve)) / rep.nfe:.2f}x (no handcrafted solver reaches the "
            f"student's held-out RMSE by NFE {max(map(int, curve))})"
        )
    line(f"wrote {rep.path} ({rep.seconds:.1f}s{', teacher built first' if rep.teacher_built else ''})")
