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
        "ddim,dpm++,ipndm",
        "--solvers",
        help="Comma-separated: handcrafted names (+afs), artifact paths, or student methods (dlms, dode, sfd, "
        "plugins; found in --artifacts, or distilled from --recipe's teacher cache).",
    ),
    nfe: str = typer.Option("3,4,5,6,8,10", "--nfe", help="Comma-separated NFEs."),
    recipe: Optional[Path] = typer.Option(
        None, "--recipe", help="Recipe: model, teacher cache (reference), students. One of --recipe/--model."
    ),
    model: Optional[str] = typer.Option(
        None, "--model", help="Model spec; the reference is an RK4 solve run here. One of --recipe/--model."
    ),
    num: int = typer.Option(1000, "--num", help="Number of seeds."),
    seed: Optional[int] = typer.Option(None, "--seed", help="First seed (with --model; default 1000000)."),
    metric: Optional[str] = typer.Option(
        None,
        "--metric",
        help="Comma-separated: rmse, psnr, fd, fid, digits (FD in digit features against the held-out digits, with the classifier's class report). Default: rmse, plus the model's FD features where they are real-data ones (digits for toy:unet-digits).",
    ),
    artifacts_dir: Optional[str] = typer.Option(
        None, "--artifacts", help="Artifact folders, comma-separated (default: out, then solvers)."
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write rows as JSON."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write rows as CSV."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Metric-versus-NFE plot (PNG)."),
    grid_out: Optional[Path] = typer.Option(
        None, "--grid", help="Image grid (PNG): the reference, then one row per solver at the middle NFE."
    ),
    inception: Optional[str] = typer.Option(None, "--inception", help="Inception weights for --metric fid."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    protocol: Optional[str] = typer.Option(
        None,
        "--protocol",
        help="Run the handcrafted solvers as a code base does: default or diff-sampler (default: the recipe's).",
    ),
):
    """Compare solvers across NFEs on the same seeds (needs --recipe or --model): tables, acceleration ratios, plots.

    The reference endpoints are --recipe's teacher cache (students missing from --artifacts are distilled from it) or an RK4 solve of --model (missing students are distilled with the model's default recipe where it names one, e.g. toy:unet-digits).

    Example: sdistill compare --model gmm:cifar --solvers ddim,dpm++,ipndm,solvers/gmm_cifar_dlms_nfe5.npz --nfe 3,5,8
    """
    from ..comparison import Comparison, run_compare
    from ..npzfiles import check_output
    from ..recipes import load_recipe
    from ..solvers import with_protocol

    names = parse_list(solvers_, "--solvers")
    nfes = parse_list(nfe, "--nfe", int)
    metrics = parse_list(metric, "--metric") if metric is not None else None  # None: the model's default
    rec = load_recipe(recipe) if recipe else None
    # Handcrafted names become NAME@PROTOCOL: their rows say which protocol ran them.
    chosen = protocol or (rec.protocol if rec is not None else "default")
    names = [with_protocol(name, chosen) for name in names]
    folders = (
        [Path(p) for p in parse_list(artifacts_dir, "--artifacts")] if artifacts_dir else [Path("out"), Path("solvers")]
    )
    outputs = {"--json": json_out, "--csv": csv_out, "--plot": plot_out, "--grid": grid_out}
    for flag, path in outputs.items():
        if path is not None:
            check_output(path, flag)  # before any work: a bad path must not cost the run
    began = time.time()
    comp = Comparison()
    try:
        run_compare(
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
            comp=comp,
        )
    except BaseException:
        if comp.rows:  # keep what was measured before the failure: print it and write the files asked for
            try:
                report(comp, names, nfes, outputs, began)
                say(f"kept the {len(comp.rows)} results measured before the failure (above)")
            except Exception as e:  # the failure being reported matters more
                say(f"could not keep the {len(comp.rows)} results measured before the failure: {e}")
        raise
    report(comp, names, nfes, outputs, began)


def report(comp, names: list[str], nfes: list[int], outputs: dict, began: float) -> None:
    """The tables (one per metric measured), the acceleration ratios and the files asked for."""
    for m in dict.fromkeys(r["metric"] for r in comp.rows):
        out.print(table(comp, m, names, nfes))
    for c in comp.classes:  # --metric digits: what the digit classifier reads (docs/digits.md)
        line(
            f"digits: {c['solver']} at NFE {c['nfe']}: {c['confident_share']:.1%} read with p >= "
            f"{c['confident_threshold']}; classes seen {c['classes_seen']}/10; histogram {c['class_histogram']}"
        )
    for a in comp.accelerations():
        line(acceleration_line(a))
    for note in comp.notes:
        say(note)
    written = write_outputs(comp, outputs["--json"], outputs["--csv"], outputs["--plot"], outputs["--grid"])
    line(f"{comp.samples} seeds; reference: {comp.reference}")
    line(
        f"* best per column; NFE = denoiser calls, (Np) = network passes where they differ. "
        f"{time.time() - began:.1f}s" + (f"; wrote {', '.join(map(str, written))}" if written else "")
    )


def acceleration_line(a: dict) -> str:
    """`dlms at NFE 5: 2.31x (the best handcrafted solver needs NFE 11.6 for its rmse)`."""
    if a["ratio"] == float("inf"):
        return (
            f"acceleration: {a['solver']} at NFE {a['nfe']}: more than {a['upto'] / a['nfe']:.2f}x (no handcrafted "
            f"solver here reaches its {a['metric']} by NFE {a['upto']}; add larger NFEs to --nfe)"
        )
    return (
        f"acceleration: {a['solver']} at NFE {a['nfe']}: {a['ratio']:.2f}x (the best handcrafted solver here "
        f"needs NFE {a['ratio'] * a['nfe']:.1f} for the same {a['metric']})"
    )


def table(comp, metric: str, names: list[str], nfes: list[int]) -> Table:
    """One metric as solver rows x NFE columns, the best per column marked with *."""
    t = Table(title=f"{metric} ({'higher' if metric == 'psnr' else 'lower'} is better)")
    t.add_column("solver", overflow="fold")  # an artifact path stays whole (folded), never cut to "out/quick…"
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
    """The rows as JSON and CSV, the plot and the image grid, where asked for (by rank 0 under torchrun)."""
    from .. import distributed
    from ..images import as_images, image_grid, label_rows, save_png

    if not distributed.is_main():
        return []

    written = []
    try:
        if json_path:
            accel = [a | {"ratio": None if a["ratio"] == float("inf") else a["ratio"]} for a in comp.accelerations()]
            doc = {"reference": comp.reference, "samples": comp.samples, "rows": comp.rows, "acceleration": accel}
            if comp.classes:
                doc["classes"] = comp.classes  # --metric digits: what the digit classifier reads in each cell
            Path(json_path).write_text(json.dumps(doc, indent=1))
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
            k = -(-32 // rows[0].shape[2])  # small images (16x16 digits) enlarged: each row's label needs 32 pixels
            rows = [np.kron(r, np.ones((1, 1, k, k), dtype=r.dtype)) for r in rows] if k > 1 else rows
            grid = image_grid(np.concatenate(rows), cols=rows[0].shape[0])
            save_png(label_rows(grid, list(comp.grid_images)), Path(grid_path))
            written.append(Path(grid_path))
    except OSError as e:
        raise BadInput(f"cannot write an output file: {e}") from None
    return written


def plot(comp, path) -> None:
    """Metric versus NFE, log-log, one line per solver and one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    metrics = list(dict.fromkeys(r["metric"] for r in comp.rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for solver in dict.fromkeys(r["solver"] for r in comp.rows):
            pts = sorted((r["nfe"], r["value"]) for r in comp.rows if r["solver"] == solver and r["metric"] == metric)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=solver)
        ax.set_xscale("log")
        nfes = sorted({r["nfe"] for r in comp.rows if r["metric"] == metric})
        ax.set_xticks(nfes, [str(n) for n in nfes])  # the NFEs measured, as plain numbers
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if metric != "psnr":
            ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"{metric} ({'higher' if metric == 'psnr' else 'lower'} is better)", fontsize=9)
    # The legend sits beside the panels, never over the points.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(f"{comp.samples} seeds; reference: {comp.reference}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
