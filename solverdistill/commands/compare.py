"""`sdistill compare`: solvers side by side across NFEs; the table, JSON/CSV rows, a plot and an image grid."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table

from ..errors import BadInput
from .console import line, out, progress, say


def parse_list(text: str, flag: str, cast=str) -> list:
    """A comma-separated flag value; empty or non-numeric (for numbers) is bad input naming the flag."""
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise BadInput(f"{flag}: give a comma-separated list")
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise BadInput(f"{flag}: expected numbers separated by commas, got {text!r}") from None


def command(
    solvers_: str = typer.Option(
        "ddim,dpm++,dlms",
        "--solvers",
        help="Comma-separated: handcrafted names (+afs), "
        "artifact paths, or student methods (dlms, dode, sfd, plugins).",
    ),
    nfe: str = typer.Option("3,4,5,6,8,10", "--nfe", help="Comma-separated NFEs."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Recipe: model, teacher cache (reference), students."),
    model: Optional[str] = typer.Option(None, "--model", help="Model spec (reference: an RK4 solve run here)."),
    num: int = typer.Option(1000, "--num", help="Number of seeds."),
    seed: Optional[int] = typer.Option(None, "--seed", help="First seed (with --model; default 1000000)."),
    metric: str = typer.Option("rmse", "--metric", help="Comma-separated: rmse, psnr, fd, fid."),
    artifacts_dir: Optional[str] = typer.Option(
        None, "--artifacts", help="Artifact folders, comma-separated (default: out, then solvers)."
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write rows as JSON."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write rows as CSV."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Metric-versus-NFE plot (PNG)."),
    grid_out: Optional[Path] = typer.Option(None, "--grid", help="Image grid, one row per solver (PNG)."),
    inception: Optional[str] = typer.Option(None, "--inception", help="Inception weights for --metric fid."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
):
    """Compare solvers across NFEs on the same seeds: table, JSON/CSV rows, plot and image grid."""
    from ..comparison import run_compare
    from ..recipes import load_recipe

    names = parse_list(solvers_, "--solvers")
    nfes = parse_list(nfe, "--nfe", int)
    metrics = parse_list(metric, "--metric")
    rec = load_recipe(recipe) if recipe else None
    folders = (
        [Path(p) for p in parse_list(artifacts_dir, "--artifacts")] if artifacts_dir else [Path("out"), Path("solvers")]
    )
    began = time.time()
    comp = run_compare(
        names,
        nfes,
        recipe=rec,
        model_spec=model,
        num=num,
        seed=seed,
        metrics=metrics,
        folders=folders,
        say=say,
        progress_factory=progress(quiet),
        inception=inception,
    )
    for m in metrics:
        out.print(table(comp, m, names, nfes))
    for note in comp.notes:
        say(note)
    written = write_outputs(comp, json_out, csv_out, plot_out, grid_out)
    line(f"{comp.samples} seeds; reference: {comp.reference}")
    line(
        f"* best per column; NFE = denoiser calls, (Np) = network passes where they differ. "
        f"{time.time() - began:.1f}s" + (f"; wrote {', '.join(map(str, written))}" if written else "")
    )


def table(comp, metric: str, names: list[str], nfes: list[int]) -> Table:
    """One metric as solver rows x NFE columns, the best per column marked with *."""
    t = Table(title=f"{metric} ({'higher' if metric == 'psnr' else 'lower'} is better)")
    t.add_column("solver")
    for n in nfes:
        t.add_column(f"NFE {n}", justify="right")
    cells = {(r["solver"], r["nfe"]): r for r in comp.rows if r["metric"] == metric}
    best = comp.best(metric)
    for name in names:
        row = [name]
        for n in nfes:
            r = cells.get((name, n))
            if r is None:
                row.append("-")
                continue
            text = f"{r['value']:.4f}" + (f" ({r['network_passes']}p)" if r["network_passes"] != r["nfe"] else "")
            row.append(f"[bold green]{text}*[/]" if r["value"] == best.get(n) else text)
        t.add_row(*row)
    return t


def write_outputs(comp, json_path=None, csv_path=None, plot_path=None, grid_path=None) -> list[Path]:
    """The rows as JSON and CSV, the plot and the image grid, where asked for."""
    from ..images import as_images, image_grid, save_png

    written = []
    try:
        if json_path:
            Path(json_path).write_text(
                json.dumps({"reference": comp.reference, "samples": comp.samples, "rows": comp.rows}, indent=1)
            )
            written.append(Path(json_path))
        if csv_path:
            with open(csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["solver", "nfe", "network_passes", "metric", "value"])
                w.writeheader()
                w.writerows(comp.rows)
            written.append(Path(csv_path))
        if plot_path:
            plot(comp, plot_path)
            written.append(Path(plot_path))
        if grid_path and comp.grid_images:
            rows = [as_images(v) for v in comp.grid_images.values()]
            save_png(image_grid(np.concatenate(rows), cols=rows[0].shape[0]), Path(grid_path))
            written.append(Path(grid_path))
    except OSError as e:
        raise BadInput(f"cannot write an output file: {e}") from None
    return written


def plot(comp, path) -> None:
    """Metric versus NFE, log-log, one line per solver and one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(r["metric"] for r in comp.rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for solver in dict.fromkeys(r["solver"] for r in comp.rows):
            pts = sorted((r["nfe"], r["value"]) for r in comp.rows if r["solver"] == solver and r["metric"] == metric)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=solver)
        ax.set_xscale("log")
        if metric != "psnr":
            ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{comp.samples} seeds; reference: {comp.reference}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
