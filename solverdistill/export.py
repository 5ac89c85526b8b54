"""`sdistill export`: a solver artifact where people sample: a diffusers scheduler, a `sigmas=` list for diffusers
pipelines, a ComfyUI SIGMAS list (docs/export.md).

Everything exported comes from the engine's own coefficient sources: a D-ODE artifact's base-solver table and
lambdas, a global DLMS rule run once through its `Rule` (the designer ignores the sample, so the rule is one
table). A per-sample rule, a one-step base solver or a fine-tuned network (SFD) cannot be a table.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional
from urllib.parse import parse_qs

import numpy as np
import torch

from . import artifacts, students
from .errors import BadInput
from .solvers.multistep import Table

FORMATS = ("diffusers-scheduler", "diffusers-sigmas", "comfyui")
GLOBAL_HINT = "distill with `student.designer: global` for export"


@dataclass
class Exported:
    """A solver as plain numbers: N steps, the grid (N + 1 sigmas), the sigma the network is asked at on each step,
    the coefficient table, AFS and D-ODE's lambdas (empty for none)."""

    name: str
    nfe: int
    sigmas: list[float]
    queries: list[float]
    table: Table
    afs: bool
    lambdas: list[float] = field(default_factory=list)


def host() -> Any:
    """What `Method.load` (and a DLMS rule's feature hook) reads of a model, for building an exported solver on the
    CPU in float64 without a network. A global designer ignores the features, so zeros serve."""
    return SimpleNamespace(
        device=torch.device("cpu"),
        dtype=torch.float64,
        passes_per_call=1,
        last_features=torch.zeros(1, 64, dtype=torch.float64),
    )


def dlms_table(art: artifacts.Artifact) -> Exported:
    """A global DLMS rule as a table: its `Rule` run once; the grid, query times and weights it produces are the
    ones every sample gets (tests/test_export.py checks the table samples as the student does)."""
    from .students import dlms

    cfg = students.stored_settings(art, dlms.DLMSStudent)
    if cfg.designer != "global":
        raise BadInput(
            f"{art.path}: meta.student.designer is {cfg.designer!r}: its network picks each sample's next time and "
            "weights from that sample's denoiser output, but a diffusers pipeline asks the network at one timestep "
            f"per step for the whole batch, fixed before sampling; {GLOBAL_HINT}"
        )
    model = host()
    student = dlms.load(art, model)
    rule = dlms.Rule(student, model, torch.zeros(1, 1, dtype=torch.float64))
    table = Table.empty(student.steps, student.order)
    sigmas, queries = [rule.first_sigma()], []
    with torch.no_grad():
        for i in range(student.steps):
            queries.append(float(rule.query(i)[0]))
            w = rule.weights(i, torch.zeros(1, 1, dtype=torch.float64), called=not (cfg.afs and i == 0))
            table.a[i] = float(w.a[0])
            table.b[i, : len(w.b)] = [float(v[0]) for v in w.b]
            sigmas.append(float(w.sigma_next[0]))
    return Exported(f"dlms[{cfg.init}]", cfg.nfe, sigmas, queries, table, cfg.afs)


def dode_table(art: artifacts.Artifact) -> Exported:
    """D-ODE: the base solver's table on the stored grid, and the lambdas."""
    from .students import dode

    solver = dode.load(art, host())
    base = solver.base
    if base.info.table is None:
        raise BadInput(
            f"{art.path}: meta.base_solver {base.info.name!r} takes {base.info.calls_per_step} network calls per "
            "step in its own loop; a scheduler here holds multistep solvers (euler, dpm++2m, dpm++3m, unipc, "
            "ipndm, deis): distill D-ODE over one of those for export"
        )
    sigmas = base.sigmas.tolist()
    table = base.info.make_table(base.sigmas, **base.options)
    return Exported(f"dode[{base.info.name}]", base.nfe, sigmas, sigmas[:-1], table, base.afs, list(solver.lams))


def exported(art: artifacts.Artifact) -> Exported:
    """The artifact as a table, or bad input saying why it cannot be one."""
    if art.method == "dlms":
        return dlms_table(art)
    if art.method == "dode":
        return dode_table(art)
    why = (
        "SFD fine-tunes the network itself, which a scheduler cannot carry"
        if art.method == "sfd"
        else f"method {art.method!r} has no table export"
    )
    raise BadInput(f"{art.path}: meta.method {art.method!r}: not expressible as a diffusers scheduler ({why})")


def grid_of(art: artifacts.Artifact) -> tuple[list[float], str]:
    """The sigmas an artifact samples on (a global DLMS rule's learned grid; any other artifact's stored grid) and
    what a sigmas list leaves out of the solver."""
    if art.method == "dlms":
        ex = dlms_table(art)
        return ex.sigmas, "the learned coefficients and time scaling (use --to diffusers-scheduler for those)"
    grid = art.arrays["grid"] if "grid" in art.arrays else art.meta.get("grid")
    values = np.asarray(grid if grid is not None else [], dtype=np.float64).reshape(-1)
    if len(values) < 2 or not np.all(np.isfinite(values)) or np.any(np.diff(values) >= 0) or values[-1] <= 0:
        raise BadInput(f"{art.path}: holds no grid of decreasing positive sigmas (array 'grid' or meta.grid)")
    left_out = {
        "dode": "the lambdas and the base solver (use --to diffusers-scheduler for those)",
        "sfd": "the fine-tuned network: this grid only helps with the SFD network itself",
    }.get(art.method, f"whatever else method {art.method!r} does")
    return values.tolist(), left_out


def model_folder(art: artifacts.Artifact, model: Optional[str], force: bool = False) -> tuple[Path, dict]:
    """The diffusers folder the solver was distilled for (`--model`, else meta.model) and its spec options."""
    spec = model or art.meta.get("model") or ""
    if not spec.startswith("diffusers:"):
        where = "--model" if model else f"{art.path}: meta.model"
        raise BadInput(
            f"{where}: {spec!r} is not a diffusers model; a diffusers scheduler maps sigma to the timesteps of the "
            "model's VP table: pass --model diffusers:DIR"
        )
    body, _, query = spec.removeprefix("diffusers:").partition("?")
    root = Path(body).expanduser()
    if not root.is_dir():
        raise BadInput(f"--model: no such diffusers folder {root} (from {spec!r}); pass --model diffusers:DIR")
    if model:  # a model named by hand must be the one the solver was distilled for
        from .models.diffusers_models import spec_fingerprint

        artifacts.check_model(art, spec_fingerprint(root, query), force, artifacts.FORCE_HINT)
    return root, {k: v[-1] for k, v in parse_qs(query).items()}


def scheduler_of(art: artifacts.Artifact, model: Optional[str], force: bool = False) -> Any:
    """A `SolverDistillScheduler` carrying the artifact, with the VP table of its model's scheduler config."""
    try:
        from .diffusers_scheduler import SolverDistillScheduler
    except ImportError:
        raise BadInput(
            "--to diffusers-scheduler: diffusers is not installed; pip install 'solverdistill[diffusers]'"
        ) from None
    from .models.diffusers_models import scheduler_config

    ex = exported(art)
    root, opts = model_folder(art, model, force)
    cfg = scheduler_config(root)
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    t = ex.table
    return SolverDistillScheduler(
        sigmas=ex.sigmas,
        queries=ex.queries,
        a=t.a.tolist(),
        b=t.b.tolist(),
        c=t.c.tolist(),
        corrector=None if t.corrector is None else t.corrector.tolist(),
        afs=ex.afs,
        lambdas=ex.lambdas or None,
        solver=ex.name,
        round_timesteps=opts.get("round_timesteps", "").lower() in ("1", "true"),
        **{k: cfg[k] for k in keys if k in cfg},
    ), ex


def write_json(path: Path, doc: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise BadInput(f"--out: cannot write {path}: {e.strerror or e}") from None


def run_export(
    artifact: str, to: str, out: Optional[Path] = None, model: Optional[str] = None, force: bool = False
) -> str:
    """Write the artifact in format `to`; returns what to print (the file, the conventions and an example call)."""
    if to not in FORMATS:
        raise BadInput(f"--to: unknown format {to!r}; choose one of {', '.join(FORMATS)}")
    art = artifacts.load(artifact)
    stem = Path(artifact).with_suffix("")
    if to == "diffusers-scheduler":
        sched, ex = scheduler_of(art, model, force)
        dest = Path(out) if out else stem.with_name(stem.name + "_scheduler")
        try:
            sched.save_pretrained(str(dest))
        except OSError as e:
            raise BadInput(f"--out: cannot write {dest}: {e.strerror or e}") from None
        steps = len(ex.queries)
        afs = (
            " The first step is the analytical one: the pipeline's network output there is not used." if ex.afs else ""
        )
        return (
            f"{ex.name}, NFE {ex.nfe} ({steps} steps) -> {dest}/scheduler_config.json\n"
            f"Same samples as `sdistill sample --solver {artifact}` from the same noise.{afs}\n"
            "Use it:\n"
            "    from solverdistill.diffusers_scheduler import SolverDistillScheduler\n"
            f'    pipe.scheduler = SolverDistillScheduler.from_pretrained("{dest}")\n'
            f"    images = pipe(..., num_inference_steps={steps}).images"
        )
    sigmas, left_out = grid_of(art)
    n = len(sigmas) - 1
    if to == "diffusers-sigmas":
        dest = Path(out) if out else stem.with_name(stem.name + "_sigmas.json")
        convention = (
            f"{n + 1} sigmas, sigma_max first, ending at sigma_min = {sigmas[-1]:.6g} (our grids stop there: "
            "no final denoising step). diffusers' EulerDiscreteScheduler takes them as they are (sigmas=...: "
            f"{n} steps, the last landing on sigma_min); its own schedules append 0, a last step that returns the "
            "denoised estimate: append 0 to the list for that (one more network call). Start from sigma_max * z: "
            'use timestep_spacing="linspace" (or "trailing"), whose init_noise_sigma is sigma_max.'
        )
        write_json(dest, {"format": "sdistill-diffusers-sigmas", "sigmas": sigmas, "convention": convention})
        return (
            f"{art.method} grid, {n} steps -> {dest}\n{convention}\nLeft out: {left_out}.\nUse it:\n"
            "    import json\n"
            "    from diffusers import EulerDiscreteScheduler\n"
            "    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, "
            'timestep_spacing="linspace")\n'
            f'    sigmas = json.load(open("{dest}"))["sigmas"]\n'
            "    images = pipe(..., sigmas=sigmas).images"
        )
    dest = Path(out) if out else stem.with_name(stem.name + "_comfyui_sigmas.json")
    convention = (
        f"ComfyUI SIGMAS: {n + 1} values in the same sigma (x = x0 + sigma eps) as ours, sigma_max first; a "
        f"sampler takes {n} steps between consecutive values and stops at sigma_min = {sigmas[-1]:.6g}. ComfyUI's "
        "own schedulers end with 0 (a last denoising step): append 0 for that. Its discrete (VP) models ask the "
        "network at the nearest integer timestep (our --round-timesteps) and, at full denoise, start from "
        "sqrt(1 + sigma_max^2) z where we start from sigma_max z."
    )
    write_json(dest, sigmas)
    return (
        f"{art.method} grid, {n} steps -> {dest}\n{convention}\nLeft out: {left_out}.\n"
        f"Paste into a custom-sigmas node (a list of floats): {', '.join(repr(v) for v in sigmas)}"
    )
