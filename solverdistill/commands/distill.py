"""`sdistill distill`: fit a student from the recipe's teacher cache, evaluate it on held-out seeds, write the
artifact, and compare it with its initial solver and the best handcrafted solver at the same NFE."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from pathlib import Path

from .. import artifacts, students
from ..errors import BadInput
from ..models import resolve
from ..recipes import Recipe
from ..sampling import resolve_device, resolve_dtype
from ..solvers import get as get_solver
from ..students.common import handcrafted_baselines, heldout_rmse, split
from ..teacher import TeacherCache
from ..teacher.cache import read_manifest, spec_differences
from ..teacher.run import run_teacher, teacher_spec


@dataclass
class DistillReport:
    path: Path
    method: str
    nfe: int
    rows: list[tuple[str, float]]     # (solver, held-out RMSE), student first
    seconds: float
    teacher_built: bool


def ensure_cache(recipe: Recipe, model, say, progress_factory) -> tuple[TeacherCache, bool]:
    """The recipe's teacher cache, built (or finished) first when it is missing or short."""
    root = recipe.cache_dir()
    manifest = read_manifest(root) if root.exists() else None
    if manifest is not None:
        diffs = spec_differences(manifest["spec"], teacher_spec(recipe, model))
        if diffs:
            raise BadInput(f"{root}: the teacher cache does not match the recipe ({', '.join(diffs)}); "
                           "run `sdistill teacher RECIPE --overwrite` or point teacher.cache elsewhere")
        if TeacherCache.open(root).num_samples >= recipe.teacher.num_samples:
            return TeacherCache.open(root), False
    say(f"teacher cache {root} missing or incomplete: building it first ({recipe.teacher.num_samples} samples)")
    with progress_factory(recipe.teacher.num_samples, "teacher") as bar:
        run_teacher(recipe, progress=bar)
    return TeacherCache.open(root), True


def run_distill(recipe: Recipe, out: str | None, say, progress_factory, method_name: str | None = None) -> DistillReport:
    start = time.time()
    own = str(recipe.student.get("method", "dlms"))
    method = students.get(method_name or own)
    student, train = recipe.student, recipe.train
    if method.name != own:
        # --method switched methods: the recipe's keys for its own method do not apply; keep the shared ones.
        keep = lambda section, cls: {k: v for k, v in section.items() if k in {f.name for f in fields(cls)}}
        student = {**keep(student, method.student_section), "method": method.name}
        train = keep(train, method.train_section)
        say(f"--method {method.name}: using the recipe's keys that {method.name} knows "
            f"({', '.join(sorted(set(student) | set(train)))})")
    s_cfg, t_cfg = students.configs(method, student, train)
    device = resolve_device(getattr(t_cfg, "device", "auto"))
    model = resolve(recipe.model.spec, device=device, dtype=resolve_dtype(recipe.teacher.compute_dtype))
    cache, built = ensure_cache(recipe, model, say, progress_factory)
    _, held = split(cache, getattr(t_cfg, "samples", 0), t_cfg.heldout)
    iterations = getattr(t_cfg, "iterations", s_cfg.nfe) * getattr(t_cfg, "restarts", 1)
    with progress_factory(iterations, f"distill {method.name}") as bar:
        artifact = method.fit(cache, model, s_cfg, t_cfg, progress=bar)
    solver = method.load(artifact, model)
    student_rmse = heldout_rmse(solver, model, cache, held)
    base = handcrafted_baselines(model, cache, held, s_cfg.nfe)
    best = min(base, key=base.get)
    initial = _initial_rmse(method, artifact, model, cache, held)
    artifact.meta["teacher"] = {k: v for k, v in cache.spec.items() if k != "grid"} | {"steps": cache.steps}
    artifact.meta["metrics"] = {"heldout_rmse": student_rmse, "initial_rmse": initial, "best_handcrafted": best,
                                "best_handcrafted_rmse": base[best], "handcrafted_rmse": base,
                                "heldout_samples": len(held)}
    teacher_nfe = cache.steps * get_solver(cache.spec["solver"]).calls_per_step + 1
    artifact.meta["cost"] = {"wall_seconds": time.time() - start, "teacher_nfe_per_sample": teacher_nfe,
                             "teacher_samples": cache.num_samples, "student_nfe": s_cfg.nfe}
    path = artifacts.save(artifact, out or recipe.output or f"out/{recipe.name}_{method.name}.npz")
    rows = [(f"{method.name} (this artifact)", student_rmse), ("initial / base solver", initial),
            (f"best handcrafted: {best}", base[best])]
    return DistillReport(path, method.name, s_cfg.nfe, rows, time.time() - start, built)


def _initial_rmse(method, artifact, model, cache, held) -> float:
    """The student before training (D-ODE: its base solver; DLMS: its initial rule)."""
    return heldout_rmse(method.load(method.untrained(artifact), model), model, cache, held)
