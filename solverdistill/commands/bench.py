"""`sdistill bench` / `make bench`: the reference benchmark, written to out/bench/report.md and report.json."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .console import out, progress, say


def command(
    recipe: Path = typer.Option(Path("recipes/quickstart.yaml"), "--recipe", help="Built-in model and teacher cache."),
    num: int = typer.Option(256, "--num", help="Held-out seeds for the quality table."),
    out_dir: Path = typer.Option(Path("out/bench"), "--out", help="Where report.md and report.json go."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (larger batches on CUDA)."),
    inception: Optional[str] = typer.Option(None, "--inception", help="Inception weights for the FID throughput."),
    quick: bool = typer.Option(False, "--quick", help="Fewer NFEs and repeats."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
):
    """The reference benchmark: quality, acceleration, distillation cost, overheads; writes out/bench/report.*."""
    from ..bench import render, run_bench, write_report
    from ..devices import resolve_device
    from ..npzfiles import check_output

    check_output(out_dir / "report.md", "--out")  # before minutes of measuring
    report = run_bench(
        str(recipe), num, resolve_device(device), inception, quick, say=say, progress_factory=progress(quiet)
    )
    md, js = write_report(report, out_dir)
    print(render(report))
    out.print(f"wrote {md} and {js}", highlight=False, markup=False)
