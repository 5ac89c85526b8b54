"""The distillation pipeline: make or reuse the teacher cache -> fit a student -> evaluate it on held-out seeds
-> save its artifact. `distill`, `compare`, `bench` and the benchmarks all go through here, so a recipe's model is
resolved once and its cache opened once per command."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from . import artifacts, students
from .devices import resolve_device, resolve_dtype
from .errors import BadInput
from .evaluation import heldout_rmse
from .models import resolve
from .npzfiles import check_output
from .recipes import Recipe, outside_note, path_notes, shown
from .solvers import get as get_solver
from .solvers import sweep
from .teacher import TeacherCache
from .teacher.run import prepare_teacher

if TYPE_CHECKING:
    from .models.base import Denoiser

Say = Callable[[str], None]
ProgressFactory = Callable[[int, str], Any]  # (total, label) -> a context manager that is called with n done


def no_progress(total: int, label: str) -> contextlib.AbstractContextManager[Callable[..., None]]:
    return contextlib.nullcontext(lambda n=1, info=None: None)


@dataclass
class Workspace:
    """A recipe's model (resolved once) and its teacher cache (built or finished first when short)."""

    recipe: Recipe
    model: Any
    cache: TeacherCache
    teacher_built: bool = False


def teacher_cache(
    recipe: Recipe, model: Denoiser, say: Say = print, progress_factory: ProgressFactory = no_progress
) -> tuple[TeacherCache, bool]:
    """The recipe's teacher cache, integrating what is missing first (with `model`, already resolved).
    Returns the cache and whether anything was integrated."""
    job = prepare_teacher(recipe, model)
    if job.missing:
        say(
            f"teacher cache {job.root} missing or incomplete: building it first ({job.missing} of "
            f"{recipe.teacher.num_samples} samples to integrate)"
        )
        with progress_factory(job.missing, "teacher") as bar:
            job.run(progress=bar)
    return TeacherCache.open(job.root), bool(job.missing)


def open_workspace(
    recipe: Recipe, device: str = "auto", say: Say = print, progress_factory: ProgressFactory = no_progress
) -> Workspace:
    """Resolve the recipe's model on `device` (in teacher.compute_dtype) and open (or build) its cache."""
    for note in path_notes(recipe):
        say(note)
    model = resolve(recipe.model.spec, device=resolve_device(device), dtype=resolve_dtype(recipe.teacher.compute_dtype))
    cache, built = teacher_cache(recipe, model, say, progress_factory)
    return Workspace(recipe, model, cache, built)


def method_configs(
    recipe: Recipe, method_name: Optional[str] = None, nfe: Optional[int] = None, say: Say = print
) -> tuple[students.Method, Any, Any]:
    """The student method and its validated `student` / `train` settings for this recipe, without changing the
    recipe. `method_name` switches methods (keeping the recipe keys the other method knows); `nfe` overrides
    student.nfe."""
    own = recipe.student.get("method", "dlms")
    if not isinstance(own, str) or len(own) > 100:
        raise BadInput(f"student.method: expected a method name, got {shown(own)}")
    method = students.get(method_name or own)
    student, train = dict(recipe.student), dict(recipe.train)
    if method.name != own:
        known_s, known_t = method.keys()
        student = {k: v for k, v in student.items() if k in known_s} | {"method": method.name}
        train = {k: v for k, v in train.items() if k in known_t}
        say(
            f"--method {method.name}: using the recipe's keys that {method.name} knows "
            f"({', '.join(sorted(set(student) | set(train)))})"
        )
    if nfe is not None:
        student["nfe"] = nfe
    s_cfg, t_cfg = method.configs(student, train)
    return method, s_cfg, t_cfg


@dataclass
class DistillReport:
    path: Path
    method: str
    nfe: int
    rows: list[tuple[str, float]]  # (solver, held-out RMSE), student first
    seconds: float
    teacher_built: bool
    metrics: dict = field(default_factory=dict)


def distill(
    recipe: Recipe,
    *,
    method_name: Optional[str] = None,
    nfe: Optional[int] = None,
    out: Optional[str] = None,
    workspace: Optional[Workspace] = None,
    say: Say = print,
    progress_factory: ProgressFactory = no_progress,
) -> DistillReport:
    """Fit the recipe's student (or `method_name`'s, at `nfe`), measure it, its untrained self and every
    handcrafted solver at its NFE on the held-out seeds, and save the artifact with those metrics."""
    began = time.time()
    method, s_cfg, t_cfg = method_configs(recipe, method_name, nfe, say)
    # The output place is checked before the teacher and the training, which can take hours.
    flag = "--out" if out else "output"  # an empty output is out/NAME_METHOD.npz
    path = check_output(Path(out or recipe.output or f"out/{recipe.name}_{method.name}.npz"), flag)
    note = outside_note(recipe, flag, path)
    if note:
        say(note)
    ws = workspace or open_workspace(recipe, t_cfg.device, say, progress_factory)
    model, cache = ws.model, ws.cache
    _, held = cache.split(t_cfg.samples, t_cfg.heldout)
    with progress_factory(method.work(s_cfg, t_cfg), f"distill {method.name}") as bar:
        artifact = method.fit(cache, model, s_cfg, t_cfg, progress=bar)
    student_rmse = heldout_rmse(method.load(artifact, model), model, cache, held)
    initial = heldout_rmse(method.load(method.untrained(artifact), model), model, cache, held)
    base = {name: heldout_rmse(p, model, cache, held) for name, p in sweep(s_cfg.nfe, model).items()}
    best = min(base, key=base.get)
    artifact.meta["teacher"] = {k: v for k, v in cache.spec.items() if k != "grid"} | {"steps": cache.steps}
    artifact.meta["metrics"] = {
        "heldout_rmse": student_rmse,
        "initial_rmse": initial,
        "best_handcrafted": best,
        "best_handcrafted_rmse": base[best],
        "handcrafted_rmse": base,
        "heldout_samples": len(held),
    }
    teacher_nfe = cache.steps * get_solver(cache.spec["solver"]).calls_per_step + 1
    artifact.meta["cost"] = {
        "wall_seconds": time.time() - began,
        "teacher_nfe_per_sample": teacher_nfe,
        "teacher_samples": cache.num_samples,
        "student_nfe": s_cfg.nfe,
    }
    path = artifacts.save(artifact, path)
    rows = [
        (f"{method.name} (this artifact)", student_rmse),
        ("initial / base solver", initial),
        (f"best handcrafted: {best}", base[best]),
    ]
    return DistillReport(
        path, method.name, s_cfg.nfe, rows, time.time() - began, ws.teacher_built, artifact.meta["metrics"]
    )
