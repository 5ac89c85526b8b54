"""`sdistill bench` / `make bench`: the reference benchmark on the built-in models, measured side by side in one
run. Reports machine and settings, and writes out/bench/report.md and report.json.

- solver quality: every handcrafted solver (its grid, with and without AFS) and every student artifact found for
  the model, NFE 2-10, endpoint RMSE on held-out seeds of the quickstart teacher cache, acceleration ratios;
- distillation cost (from the artifacts' meta);
- sampling overhead: a full sampling run / the same number of bare denoiser calls on the same batches;
- teacher cache write overhead: `teacher` with writing / the same integration without;
- FID feature throughput against the bare Inception forward (when the Inception weights are present).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import __version__, artifacts, distributed, students
from .evaluation import acceleration_ratio, cache_endpoints, rmse
from .generate import generate, initial_noise
from .pipeline import ProgressFactory, Say, no_progress, open_workspace
from .solvers import SOLVERS, plan, sweep

if TYPE_CHECKING:
    from .models.base import Denoiser
    from .solvers.base import Solver
    from .teacher.cache import TeacherCache


def machine(device: torch.device) -> dict:
    """Platform, Python, torch, CPU count and threads, the GPU's name on CUDA, and the number of torchrun ranks."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "processes": distributed.rank_size()[1],  # torchrun ranks: the timings are of the split runs
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def heldout_rmse(solver: Solver, model: Denoiser, cache: TeacherCache, held: np.ndarray) -> float:
    """Endpoint RMSE on the held-out seeds (evaluation.heldout_rmse); under torchrun each rank solves its block
    of the seeds and the endpoints are gathered in seed order, so the figure is one process's."""
    mine = np.asarray(distributed.shard(held), dtype=held.dtype) if distributed.active() else held
    ends = (
        cache_endpoints(solver, model, cache, mine)
        if len(mine)
        else torch.empty((0, *model.shape), dtype=torch.float64)
    )
    return rmse(distributed.gather_rows(ends), cache.endpoints(held))


def sampling_overhead(model: Denoiser, solver: Solver, nfe: int, batch: int, batches: int, repeats: int = 5) -> dict:
    """Median over alternating repeats of (full sampling run) / (the same number of bare denoiser calls).
    Under torchrun `generate` runs this rank's block of the seeds, so the bare calls run on the same block (in
    the same batch sizes); both timings end when every rank is done."""
    seeds = list(range(batch * batches))
    mine = distributed.shard(seeds)
    sizes = [len(mine[i : i + batch]) for i in range(0, len(mine), batch)]
    z = initial_noise(seeds[:batch], model.shape, model.dtype, model.device) * model.sigma_max
    sig = torch.full((batch,), 1.0, dtype=model.dtype, device=model.device)
    full, bare = [], []
    for _ in range(repeats):
        _sync(model.device)
        distributed.barrier()
        t0 = time.perf_counter()
        generate(model, solver, seeds, batch=batch)
        _sync(model.device)
        full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            for n in sizes:
                for _ in range(nfe):
                    model(z[:n], sig[:n])
        _sync(model.device)
        distributed.barrier()
        bare.append(time.perf_counter() - t0)
    return {
        "full_s": statistics.median(full),
        "bare_s": statistics.median(bare),
        "ratio": statistics.median(f / b for f, b in zip(full, bare)),
    }


def teacher_overhead(spec: str, num: int, steps: int, repeats: int = 3) -> dict:
    """Median `teacher` wall time with writing / without, on a fresh cache each repeat."""
    from .recipes import load_recipe
    from .teacher.run import run_teacher

    # Under torchrun the ranks share one cache folder (rank 0's), as `sdistill teacher` does.
    tmp = distributed.broadcast_object(tempfile.mkdtemp() if distributed.is_main() else None)
    try:
        path = Path(tmp) / "r.yaml"
        if distributed.is_main():  # one writer: another rank reading a half-written recipe would fail
            path.write_text(
                f"name: bench\nmodel: {{spec: '{spec}'}}\nteacher: {{steps: {steps}, num_samples: {num}, "
                f"batch: 64, shard_size: 128, cache: '{tmp}/cache'}}\n"
            )
        distributed.barrier()
        recipe = load_recipe(path)
        times = {"write": [], "no_write": []}
        for _ in range(repeats):
            for mode in ("no_write", "write"):
                if distributed.is_main():
                    shutil.rmtree(f"{tmp}/cache", ignore_errors=True)
                distributed.barrier()
                t0 = time.perf_counter()
                run_teacher(recipe, write=(mode == "write"))
                times[mode].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        distributed.barrier()  # every rank done with the folder before rank 0 removes it
        return {"model": spec, "samples": num, "steps": steps, "median_s": med, "ratio": med["write"] / med["no_write"]}
    finally:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)


def fid_throughput(inception: str | None, device: torch.device, batch: int, batches: int = 8) -> dict:
    """The `fid` feature path (quantise, network, statistics) against the bare Inception forward."""
    from .errors import BadInput
    from .fid import FeatureStats, InceptionFeatures, inception_path
    from .images import to_uint8_nchw

    try:
        net = InceptionFeatures(inception_path(inception), device=device)
    except BadInput as e:
        return {"skipped": str(e)}
    x = torch.rand(batches, batch, 3, 32, 32) * 2 - 1
    u8 = [to_uint8_nchw(b) for b in x]
    t0 = time.perf_counter()
    for b in u8:
        net(b)
    _sync(device)
    bare = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = FeatureStats()
    for b in x:  # decode/quantise + network + statistics, as `fid` does
        stats.update(net(to_uint8_nchw(b)))
    _sync(device)
    full = time.perf_counter() - t0
    return {"bare_s": bare, "full_s": full, "ratio": full / bare, "images": batch * batches}


def run_bench(
    recipe_path: str = "recipes/quickstart.yaml",
    num: int = 256,
    device: torch.device | None = None,
    inception: str | None = None,
    quick: bool = False,
    say: Say = print,
    progress_factory: ProgressFactory = no_progress,
) -> dict:
    """Measure everything in the module docstring; returns the report (see `render`)."""
    from .recipes import load_recipe

    device = device or torch.device("cpu")
    recipe = load_recipe(recipe_path)
    ws = open_workspace(recipe, str(device), say, progress_factory)
    model, cache = ws.model, ws.cache
    held = np.arange(cache.num_samples - min(num, cache.num_samples // 2), cache.num_samples)
    report = {
        "version": __version__,
        "machine": machine(device),
        "model": model.spec,
        "settings": {
            "recipe": recipe_path,
            "heldout_seeds": len(held),
            "quick": quick,
            "teacher": f"{cache.spec['solver']} {cache.steps} steps",
        },
    }
    nfes = list(range(2, 11)) if not quick else [3, 5, 8]
    say("solver quality ...")
    quality, curve = {}, {}
    for name in SOLVERS:
        for afs in (False, True):
            quality[f"{name}{'+afs' if afs else ''}"] = {}
    with progress_factory(len(nfes), f"quality: every handcrafted solver, {len(held)} held-out seeds") as bar:
        for nfe in nfes:
            for key, p in sweep(nfe, model).items():
                quality[key][nfe] = heldout_rmse(p, model, cache, held)
                curve[nfe] = min(curve.get(nfe, np.inf), quality[key][nfe])
            bar(1, info=f"NFE {nfe}")
    arts = {str(path): art for path, art in artifacts.scan((Path("solvers"), Path("out")), model.fingerprint).items()}
    students_rows = []
    for path, art in arts.items():
        solver = students.get(art.method).load(art, model)
        err = heldout_rmse(solver, model, cache, held)
        nfe = int(art.meta["nfe"])
        students_rows.append(
            {
                "artifact": path,
                "method": art.method,
                "nfe": nfe,
                "rmse": err,
                "acceleration": acceleration_ratio(err, nfe, curve),
                "distill_seconds": art.meta.get("training", {}).get("seconds"),
                "teacher_nfe_per_sample": art.meta.get("cost", {}).get("teacher_nfe_per_sample"),
                "teacher_samples": art.meta.get("cost", {}).get("teacher_samples"),
            }
        )
    report["quality"] = {"handcrafted": quality, "best_by_nfe": curve, "students": students_rows}
    say("sampling overhead ...")
    batch = 256 if device.type == "cuda" else 64
    over = {}
    for name in SOLVERS:
        info = SOLVERS[name]
        p = plan(name, 5, model, afs=info.calls_per_step == 2)
        over[name] = sampling_overhead(model, p, 5, batch, 16 if not quick else 4)
    for path, art in arts.items():
        if int(art.meta["nfe"]) == 5:
            over[path] = sampling_overhead(
                model, students.get(art.method).load(art, model), 5, batch, 16 if not quick else 4
            )
    report["sampling_overhead_nfe5"] = {"batch": batch, "by_solver": over}
    say("teacher write overhead ...")
    report["teacher_write_overhead"] = teacher_overhead(recipe.model.spec, 128 if quick else 256, 64 if quick else 128)
    report["fid_feature_throughput"] = fid_throughput(inception, device, batch)
    return report


def render(report: dict) -> str:
    """The report as Markdown."""
    m = report["machine"]
    ranks = f", {m['processes']} processes (torchrun)" if m.get("processes", 1) > 1 else ""
    lines = [
        f"# sdistill bench ({report['version']})",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']} ({m['threads']} threads), "
        f"device {m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}"
        f"{ranks}.",
        f"Model {report['model']}; {report['settings']['heldout_seeds']} held-out seeds; teacher "
        f"{report['settings']['teacher']}.",
        "",
        "## Endpoint RMSE, handcrafted",
        "",
    ]
    q = report["quality"]
    nfes = sorted({n for row in q["handcrafted"].values() for n in row})
    lines += ["| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for name, row in q["handcrafted"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[n]:.4f}" if n in row else "-" for n in nfes) + " |")
    lines += [
        "",
        "## Students",
        "",
        "| artifact | method | NFE | RMSE | acceleration | distill s | teacher NFE x samples |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in q["students"]:
        cost = f"{s['teacher_nfe_per_sample']} x {s['teacher_samples']}" if s["teacher_samples"] else "-"
        secs = f"{s['distill_seconds']:.1f}" if s["distill_seconds"] else "-"
        lines.append(
            f"| {s['artifact']} | {s['method']} | {s['nfe']} | {s['rmse']:.4f} | {s['acceleration']:.2f}x | "
            f"{secs} | {cost} |"
        )
    o = report["sampling_overhead_nfe5"]
    lines += [
        "",
        f"## Sampling overhead at NFE 5, batch {o['batch']} (full run / bare denoiser calls)",
        "",
        "| solver | full s | bare s | ratio |",
        "|---|---|---|---|",
    ]
    for name, r in o["by_solver"].items():
        lines.append(f"| {name} | {r['full_s']:.3f} | {r['bare_s']:.3f} | {r['ratio']:.3f} |")
    t = report["teacher_write_overhead"]
    lines += [
        "",
        f"## Teacher cache write overhead: {t['ratio']:.3f} ({t['model']}, {t['samples']} samples, "
        f"{t['steps']} steps; median s {t['median_s']})",
    ]
    f = report["fid_feature_throughput"]
    lines += [
        "",
        "## FID features: "
        + (
            "skipped: no Inception weights (pass --inception PATH)"
            if "skipped" in f
            else f"{f['ratio']:.3f} of the bare Inception forward ({f['images']} images)"
        ),
    ]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """report.md and report.json in `out_dir` (by rank 0 alone under torchrun)."""
    if not distributed.is_main():
        return out_dir / "report.md", out_dir / "report.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "report.md").write_text(render(report))
    return out_dir / "report.md", out_dir / "report.json"
