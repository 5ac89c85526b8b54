"""The `sdistill` command line: thin Typer commands that parse, call the engine and print."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import BadInput, RunFailed

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill and compare fast few-step solvers for diffusion models.")
out = Console()
err = Console(stderr=True)


def command(fn):
    """Register a command whose bad input becomes exit 2 with one message (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BadInput as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True)
            raise typer.Exit(2)
        except RunFailed as e:
            err.print(f"[bold red]failed:[/] {e}", highlight=False)
            raise typer.Exit(1)

    return app.command()(wrapper)


def _version(value: bool):
    if value:
        out.print(f"sdistill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


def progress_bar(quiet: bool, total: int, label: str):
    """A rich progress bar on stderr (rate and ETA), or a no-op with --quiet."""
    from .progress import Bar
    return Bar(total, label, disabled=quiet, console=err)


@command
def sample(
    model: Optional[str] = typer.Option(None, "--model", help="Model spec (gmm:cifar, python:mod:fn, a YAML file)."),
    solver: str = typer.Option("dpm++", "--solver", help="Handcrafted solver name (see `sdistill solvers`)."),
    nfe: int = typer.Option(10, "--nfe", help="Denoiser calls per sample."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="polynomial[:rho], logsnr, time_uniform[:rho], "
                                           "or comma-separated sigmas; default: the solver's own."),
    afs: bool = typer.Option(False, "--afs/--no-afs", help="Analytical first step (saves one NFE)."),
    lower_order_final: bool = typer.Option(True, "--lower-order-final/--no-lower-order-final",
                                           help="Multistep solvers drop to lower order on the last steps."),
    num: int = typer.Option(64, "--num", help="Number of samples."),
    seed: int = typer.Option(0, "--seed", help="First seed; samples use seeds S..S+num-1."),
    batch: int = typer.Option(64, "--batch", help="Samples per batch (results do not depend on it)."),
    out_dir: Path = typer.Option(Path("out/samples"), "--out", help="Output folder."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64."),
    png: bool = typer.Option(False, "--png", help="Also write one PNG per sample (image models)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Sample with a handcrafted solver and write samples.npz (+ grid.png or scatter.png)."""
    from .commands.sample import run_sample
    result = run_sample(model=model, solver=solver, nfe=nfe, schedule=schedule, afs=afs,
                        lower_order_final=lower_order_final, num=num, seed=seed, batch=batch, out_dir=out_dir,
                        device=device, dtype=dtype, png=png, progress=progress_bar(quiet, num, "sampling"))
    out.print(result, highlight=False, soft_wrap=True)


@command
def solvers():
    """List the handcrafted solvers: order, calls per step, default grid."""
    from . import solvers as registry
    aliases = {}
    for alias, name in registry.ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    table = Table(title="handcrafted solvers")
    for col in ("name", "aliases", "order", "calls/step", "default grid", "what"):
        table.add_column(col)
    for name, info in registry.SOLVERS.items():
        table.add_row(name, ", ".join(aliases.get(name, [])), str(info.order), str(info.calls_per_step),
                      info.default_schedule, info.summary)
    out.print(table)


@command
def models():
    """List the model backends and the built-in presets."""
    from .models import BACKENDS
    from .models.gmm import PRESET_HELP
    table = Table(title="model specs")
    for col in ("spec", "what"):
        table.add_column(col)
    for backend in BACKENDS.values():
        table.add_row(f"{backend.scheme}:...", backend.help)
    for name, what in PRESET_HELP.items():
        table.add_row(f"gmm:{name}", what)
    out.print(table)


def main():
    app()


if __name__ == "__main__":
    main()
