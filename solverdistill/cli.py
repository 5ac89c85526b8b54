"""The `sdistill` command line: thin Typer commands that parse, call the engine and print."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from .errors import BadInput, RunFailed

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill and compare fast few-step solvers for diffusion models.")
out = Console()
err = Console(stderr=True, markup=False)  # messages hold user text ([...] is not markup)


def handled(fn):
    """Bad input becomes exit 2 with one message (no traceback); a failed run exits 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BadInput as e:
            err.print(Text("error: ", style="bold red") + Text(str(e)), highlight=False)
            raise typer.Exit(2)
        except RunFailed as e:
            err.print(Text("failed: ", style="bold red") + Text(str(e)), highlight=False)
            raise typer.Exit(1)

    return wrapper


def command(fn):
    return app.command()(handled(fn))


def _version(value: bool):
    if value:
        out.print(f"sdistill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Load EDM pickles (which run code) "
                                            "without an allow-list entry, for this run.")):
    if trust_pickle:
        import os
        os.environ["SDISTILL_TRUST_PICKLE"] = "1"


def progress_bar(quiet: bool, total: int, label: str):
    """A rich progress bar on stderr (rate and ETA), or a no-op with --quiet."""
    from .progress import Bar
    return Bar(total, label, disabled=quiet, console=err)


@command
def sample(
    model: Optional[str] = typer.Option(None, "--model", help="Model spec (gmm:cifar, python:mod:fn, a YAML file)."),
    solver: str = typer.Option("dpm++", "--solver", help="Handcrafted solver name (see `sdistill solvers`) or a "
                               "solver artifact (.npz/.yaml)."),
    nfe: Optional[int] = typer.Option(None, "--nfe", help="Denoiser calls per sample (default 10; an artifact "
                                      "brings its own)."),
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
    force: bool = typer.Option(False, "--force", help="Use an artifact made for another model fingerprint."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text prompt (text-conditioned models)."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Captions file, one per line; caption i for seed i."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance (default 7.5)."),
    precision: str = typer.Option("fp32", "--precision", help="Network precision: fp32, fp16 or bf16."),
    class_label: Optional[int] = typer.Option(None, "--class", help="Class-conditional EDM: this class for every "
                                              "seed (default: drawn per seed)."),
    round_timesteps: bool = typer.Option(False, "--round-timesteps", help="diffusers models: snap t(sigma) to "
                                         "integers (default: fractional)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Sample with a handcrafted solver or a distilled artifact; write samples.npz (+ grid.png/scatter.png)."""
    from .commands.sample import run_sample, with_options
    model = with_options(model, prompt=prompt, prompts=prompts, guidance=guidance,
                         round_timesteps=1 if round_timesteps else None, **{"class": class_label})
    result = run_sample(model=model, solver=solver, nfe=nfe, schedule=schedule, afs=afs,
                        lower_order_final=lower_order_final, num=num, seed=seed, batch=batch, out_dir=out_dir,
                        device=device, dtype=dtype, png=png, force=force, precision=precision,
                        progress=progress_bar(quiet, num, "sampling"))
    out.print(result, highlight=False, markup=False, soft_wrap=True)


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


@command
def teacher(
    recipe: Path = typer.Argument(..., help="Recipe YAML (reads its model and teacher sections)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder (overrides teacher.cache)."),
    num: Optional[int] = typer.Option(None, "--num", help="Number of samples (overrides teacher.num_samples)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Batch size (overrides teacher.batch)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (overrides teacher.device)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache made with another spec."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Integrate the ODE accurately from many seeds and cache the trajectories (resumable, sharded)."""
    from .recipes import load_recipe
    from .teacher.run import run_teacher
    r = load_recipe(recipe, {"teacher.cache": str(cache) if cache else None, "teacher.num_samples": num,
                             "teacher.batch": batch, "teacher.device": device})
    with progress_bar(quiet, r.teacher.num_samples, "teacher") as bar:
        rep = run_teacher(r, overwrite=overwrite, progress=bar)
    out.print(f"{rep.root}: {rep.total} samples ({rep.generated} integrated now, {rep.reused} already cached), "
              f"{rep.nfe_per_sample} NFE per sample, {rep.seconds:.1f}s", highlight=False, markup=False, soft_wrap=True)


@command
def distill(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Artifact path (.npz or .yaml); default: output."),
    method: Optional[str] = typer.Option(None, "--method", help="dlms, dode (overrides student.method)."),
    nfe: Optional[int] = typer.Option(None, "--nfe", help="Student NFE (overrides student.nfe)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Fit a student solver from the recipe's teacher cache and write its artifact."""
    from .commands.distill import run_distill
    from .recipes import load_recipe
    if nfe is not None and nfe < 1:
        raise BadInput(f"--nfe: must be >= 1, got {nfe}")
    r = load_recipe(recipe, {"student.nfe": nfe})
    rep = run_distill(r, str(out_path) if out_path else None, say=lambda m: err.print(m, highlight=False),
                      progress_factory=lambda total, label: progress_bar(quiet, total, label), method_name=method)
    table = Table(title=f"{rep.method} at NFE {rep.nfe}: endpoint RMSE on held-out seeds (lower is better)")
    table.add_column("solver")
    table.add_column("RMSE", justify="right")
    for name, value in rep.rows:
        table.add_row(name, f"{value:.4f}")
    out.print(table)
    out.print(f"wrote {rep.path} ({rep.seconds:.1f}s{', teacher built first' if rep.teacher_built else ''})",
              highlight=False, markup=False, soft_wrap=True)


@command
def inspect(artifact: Path = typer.Argument(..., help="Solver artifact (.npz or .yaml).")):
    """Print an artifact's meta and arrays."""
    import json
    from .artifacts import load
    a = load(artifact)
    out.print_json(json.dumps(a.meta, default=str))
    table = Table(title="arrays")
    for col in ("name", "shape", "dtype", "values"):
        table.add_column(col)
    for name, arr in a.arrays.items():
        preview = ", ".join(f"{v:.4g}" for v in arr.ravel()[:6]) + (" ..." if arr.size > 6 else "")
        table.add_row(name, str(tuple(arr.shape)), str(arr.dtype), preview)
    out.print(table)


@command
def fid(
    samples: Optional[str] = typer.Argument(None, help="samples.npz or a folder of PNG/JPEG images."),
    ref: Optional[str] = typer.Option(None, "--ref", help="Statistics .npz (mu, sigma), image folder, dataset "
                                      "name with a local statistics file, or (pixels) a gmm: model spec."),
    features: str = typer.Option("inception", "--features", help="inception or pixels."),
    mode: str = typer.Option("legacy_tensorflow", "--mode", help="legacy_tensorflow (papers) or clean."),
    batch: int = typer.Option(64, "--batch", help="Images per batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    inception: Optional[str] = typer.Option(None, "--inception", help="Path to inception-2015-12-05.pt."),
    make_ref: Optional[str] = typer.Option(None, "--make-ref", help="Write reference statistics of these images."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="With --make-ref: the statistics .npz to write."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Frechet distance (FID with Inception features); the distance is the last line on stdout."""
    import json
    from .commands.fid import make_ref as write_ref, run_fid
    from .sampling import resolve_device
    dev = resolve_device(device)
    if make_ref:
        if out_path is None:
            raise BadInput("--out: required with --make-ref (the statistics .npz to write)")
        path, n = write_ref(make_ref, str(out_path), features, mode, batch, dev, inception)
        out.print(f"wrote {path} ({n} images, {features} features)", highlight=False, markup=False, soft_wrap=True)
        return
    if samples is None or ref is None:
        raise BadInput("give SAMPLES and --ref (or --make-ref IMAGES --out ref.npz)")
    r = run_fid(samples, ref, features, mode, batch, dev, inception)
    if as_json:
        print(json.dumps({"fid": r.distance, "samples": r.samples, "features": r.features, "mode": r.mode,
                          "reference": r.reference}))
    else:
        err.print(f"{r.samples} samples, {r.features} features ({r.mode}), reference {r.reference}", highlight=False)
        print(f"{r.distance:.6g}")


@command
def compare(
    solvers_: str = typer.Option("ddim,dpm++,dlms", "--solvers", help="Comma-separated: handcrafted names (+afs), "
                                 "artifact paths, or dlms/dode/sfd."),
    nfe: str = typer.Option("3,4,5,6,8,10", "--nfe", help="Comma-separated NFEs."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Recipe: model, teacher cache (reference), students."),
    model: Optional[str] = typer.Option(None, "--model", help="Model spec (reference: an RK4 solve run here)."),
    num: int = typer.Option(1000, "--num", help="Number of seeds."),
    seed: Optional[int] = typer.Option(None, "--seed", help="First seed (with --model; default 1000000)."),
    metric: str = typer.Option("rmse", "--metric", help="Comma-separated: rmse, psnr, fd, fid."),
    artifacts_dir: Optional[str] = typer.Option(None, "--artifacts", help="Artifact folders, comma-separated "
                                                "(default: out, then solvers)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write rows as JSON."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write rows as CSV."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Metric-versus-NFE plot (PNG)."),
    grid_out: Optional[Path] = typer.Option(None, "--grid", help="Image grid, one row per solver (PNG)."),
    inception: Optional[str] = typer.Option(None, "--inception", help="Inception weights for --metric fid."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
):
    """Compare solvers across NFEs on the same seeds: table, JSON/CSV rows, plot and image grid."""
    from .commands.compare import parse_list, run_compare, write_outputs
    from .recipes import load_recipe
    names = parse_list(solvers_, "--solvers")
    nfes = parse_list(nfe, "--nfe", int)
    metrics = parse_list(metric, "--metric")
    rec = load_recipe(recipe) if recipe else None
    folders = [Path(p) for p in parse_list(artifacts_dir, "--artifacts")] if artifacts_dir else [Path("out"), Path("solvers")]
    start = time.time()
    comp = run_compare(names, nfes, recipe=rec, model_spec=model, num=num, seed=seed, metrics=metrics,
                       folders=folders, say=lambda m: err.print(m, highlight=False),
                       progress_factory=lambda total, label: progress_bar(quiet, total, label), inception=inception)
    for m in metrics:
        table = Table(title=f"{m} ({'higher' if m == 'psnr' else 'lower'} is better)")
        table.add_column("solver")
        for n in nfes:
            table.add_column(f"NFE {n}", justify="right")
        cells = {(r["solver"], r["nfe"]): r for r in comp.rows if r["metric"] == m}
        best = {}
        for n in nfes:
            vals = [r["value"] for (s, k), r in cells.items() if k == n]
            if vals:
                best[n] = max(vals) if m == "psnr" else min(vals)
        for name in names:
            row = [name]
            for n in nfes:
                r = cells.get((name, n))
                if r is None:
                    row.append("-")
                    continue
                text = f"{r['value']:.4f}" + (f" ({r['network_passes']}p)" if r["network_passes"] != r["nfe"] else "")
                row.append(f"[bold green]{text}*[/]" if r["value"] == best.get(n) else text)
            table.add_row(*row)
        out.print(table)
    for note in comp.notes:
        err.print(note, highlight=False)
    written = write_outputs(comp, json_out, csv_out, plot_out, grid_out)
    out.print(f"{comp.samples} seeds; reference: {comp.reference}", highlight=False, markup=False, soft_wrap=True)
    out.print(f"* best per column; NFE = denoiser calls, (Np) = network passes where they differ. "
              f"{time.time() - start:.1f}s" + (f"; wrote {', '.join(map(str, written))}" if written else ""),
              highlight=False, markup=False, soft_wrap=True)


@command
def bench(
    recipe: Path = typer.Option(Path("recipes/quickstart.yaml"), "--recipe", help="Built-in model and teacher cache."),
    num: int = typer.Option(256, "--num", help="Held-out seeds for the quality table."),
    out_dir: Path = typer.Option(Path("out/bench"), "--out", help="Where report.md and report.json go."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (larger batches on CUDA)."),
    inception: Optional[str] = typer.Option(None, "--inception", help="Inception weights for the FID throughput."),
    quick: bool = typer.Option(False, "--quick", help="Fewer NFEs and repeats."),
):
    """The reference benchmark: quality, acceleration, distillation cost, overheads; writes out/bench/report.*."""
    from .bench import run_bench, write_report, render
    from .sampling import resolve_device
    report = run_bench(str(recipe), num, resolve_device(device), inception, quick,
                       say=lambda m: err.print(m, highlight=False))
    md, js = write_report(report, out_dir)
    print(render(report))
    out.print(f"wrote {md} and {js}", highlight=False, markup=False)


convert_app = typer.Typer(help="Convert checkpoints into folders sdistill loads.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")


@convert_app.command("ldm")
@handled
def convert_ldm(
    ckpt: Path = typer.Argument(..., help="CompVis LDM checkpoint (model.ckpt)."),
    out_dir: Path = typer.Argument(..., help="diffusers pipeline folder to write."),
    num_head_channels: int = typer.Option(32, "--num-head-channels", help="Attention head width (32 for LSUN)."),
    sample_size: int = typer.Option(64, "--sample-size", help="Latent side (64 for LSUN-Bedroom)."),
    norm_groups: int = typer.Option(32, "--norm-groups", help="GroupNorm groups (32 in LDM)."),
):
    """CompVis latent diffusion checkpoint (UNet + VQ first stage) -> diffusers folder (use as diffusers:OUT)."""
    from .convert import convert_ldm as run
    path = run(str(ckpt), str(out_dir), num_head_channels, sample_size, norm_groups)
    out.print(f"wrote {path} (unet/, vqvae/, scheduler/); sample with --model diffusers:{path}", highlight=False,
              markup=False, soft_wrap=True)


cache_app = typer.Typer(help="Inspect teacher caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
@handled
def cache_info(
    folder: Path = typer.Argument(..., help="Teacher cache folder."),
    verify_sums: bool = typer.Option(False, "--verify", help="Check every checksum; mark bad shards."),
):
    """Print a cache's spec and size; with --verify, check every shard (exit 1 when any is bad)."""
    from .teacher.cache import TeacherCache, verify
    bad = verify(folder) if verify_sums else []
    c = TeacherCache.open(folder)
    spec = c.spec
    table = Table(title=f"teacher cache {folder}")
    table.add_column("field")
    table.add_column("value")
    grid = f"{spec['schedule']}, {c.steps} steps, sigma {c.sigmas[0]:g} -> {c.sigmas[-1]:g}"
    per = c.disk_bytes() / max(c.num_samples, 1)
    for k, v in (("model", f"{spec['model_spec']} ({spec['model']})"), ("solver", spec["solver"]), ("grid", grid),
                 ("dtype", spec["dtype"]), ("shape", "x".join(map(str, spec["shape"]))),
                 ("samples", f"{c.num_samples} (seeds {spec['seed']}..{spec['seed'] + c.num_samples - 1})"),
                 ("shards", f"{len(c.shards)} in use, {sum(s['status'] != 'ok' for s in c.manifest['shards'])} bad"),
                 ("on disk", f"{c.disk_bytes() / 2**20:.1f} MiB, {per / 2**10:.1f} KiB per sample")):
        table.add_row(k, str(v))
    out.print(table)
    if verify_sums:
        for name, why in bad:
            err.print(f"bad shard {name}: {why} (marked; the next `sdistill teacher` run regenerates it)")
        if bad:
            raise typer.Exit(1)
        out.print("all checksums ok")


def main():
    app()


if __name__ == "__main__":
    main()
