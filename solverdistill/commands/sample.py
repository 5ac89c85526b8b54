"""`sdistill sample`: sample with a handcrafted solver or a distilled artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .console import line, progress, say


def command(
    model: Optional[str] = typer.Option(None, "--model", help="Model spec (gmm:cifar, python:mod:fn, a YAML file)."),
    solver: str = typer.Option(
        "dpm++", "--solver", help="Handcrafted solver name (see `sdistill solvers`) or a solver artifact (.npz/.yaml)."
    ),
    nfe: Optional[int] = typer.Option(
        None,
        "--nfe",
        help="Denoiser calls per sample (default 10; an artifact brings its own, an SFD-v one takes any of its NFEs).",
    ),
    schedule: Optional[str] = typer.Option(
        None,
        "--schedule",
        help="polynomial[:rho], logsnr, time_uniform[:rho], or comma-separated sigmas; default: the solver's own.",
    ),
    afs: bool = typer.Option(False, "--afs/--no-afs", help="Analytical first step (saves one NFE)."),
    lower_order_final: bool = typer.Option(
        True,
        "--lower-order-final/--no-lower-order-final",
        help="Multistep solvers drop to lower order on the last steps.",
    ),
    num: int = typer.Option(64, "--num", help="Number of samples."),
    seed: int = typer.Option(0, "--seed", help="First seed; samples use seeds S..S+num-1."),
    batch: int = typer.Option(64, "--batch", help="Samples per batch (results do not depend on it)."),
    out_dir: Path = typer.Option(Path("out/samples"), "--out", help="Output folder."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64."),
    png: bool = typer.Option(False, "--png", help="Also write one PNG per sample (image models)."),
    force: bool = typer.Option(False, "--force", help="Use an artifact made for another model fingerprint."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text prompt (text-conditioned models)."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Captions file, one per line; caption i for seed i."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance (default 7.5)."),
    precision: str = typer.Option("fp32", "--precision", help="Network precision: fp32, fp16 or bf16."),
    class_label: Optional[int] = typer.Option(
        None, "--class", help="Class-conditional EDM: this class for every seed (default: drawn per seed)."
    ),
    round_timesteps: bool = typer.Option(
        False, "--round-timesteps", help="diffusers models: snap t(sigma) to integers (default: fractional)."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    protocol: str = typer.Option(
        "default", "--protocol", help="Run the handcrafted solver as a code base does: default or diff-sampler."
    ),
):
    """Sample with a handcrafted solver or a distilled artifact; write samples.npz (+ grid.png/scatter.png)."""
    from ..errors import BadInput
    from ..samples import run_sample, with_options
    from ..solvers import with_protocol

    if with_protocol(solver, protocol) == solver and protocol != "default":
        raise BadInput(f"--protocol: applies to handcrafted solvers, not {solver!r}")
    solver = with_protocol(solver, protocol)

    model = with_options(
        model,
        prompt=prompt,
        prompts=prompts,
        guidance=guidance,
        round_timesteps=1 if round_timesteps else None,
        **{"class": class_label},
    )
    line(
        run_sample(
            model=model,
            solver=solver,
            nfe=nfe,
            schedule=schedule,
            afs=afs,
            lower_order_final=lower_order_final,
            num=num,
            seed=seed,
            batch=batch,
            out_dir=out_dir,
            device=device,
            dtype=dtype,
            png=png,
            force=force,
            precision=precision,
            progress=progress(quiet)(num, f"sampling {num} seeds"),
            say=say,
        )
    )
