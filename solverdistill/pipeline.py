"""The distillation pipeline: make or reuse the teacher cache -> fit a student -> evaluate it on held-out seeds
-> save its artifact. `distill`, `compare`, `bench` and the benchmarks all go through here, so a recipe's model is
resolved once and its cache opened once per command."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from . import artifacts, distributed, students
from .devices import resolve_device, resolve_dtype
from .errors import BadInput
from .evaluation import acceleration_ratio, heldout_rmse
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
        with progress_factory(job.missing, f"teacher ({job.missing} of {recipe.teacher.num_samples} left)") as bar:
            job.run(progress=bar)
    return TeacherCache.open(job.root), bool(job.missing)


def recipe_model(recipe: Recipe, device: str = "auto") -> Denoiser:
    """The recipe's model on `device` in teacher.compute_dtype. Errors name the recipe's model.spec (the user gave
    no --model), and a missing diffusers folder names the command that makes one from a CompVis checkpoint."""
    spec = recipe.model.spec
    try:
        return resolve(spec, device=resolve_device(device), dtype=resolve_dtype(recipe.teacher.compute_dtype))
    except BadInput as e:
        message = str(e)
        for prefix in (f"--model {spec}: ", f"--model {spec.strip()}: ", "--model: ", "--model "):
            if message.startswith(prefix):
                message = message[len(prefix) :]
                break
        if spec.startswith("diffusers:") and "no such folder" in message:
            folder = spec.removeprefix("diffusers:").partition("?")[0]
            message += (
                f". A CompVis latent diffusion checkpoint becomes that folder with: sdistill convert ldm "
                f"CHECKPOINT.ckpt {folder} (see the recipe's comments)"
            )
        where = f"{recipe.path}: " if recipe.path else ""
        raise BadInput(f"{where}model.spec {spec!r}: {message}") from None


def open_workspace(
    recipe: Recipe, device: str = "auto", say: Say = print, progress_factory: ProgressFactory = no_progress
) -> Workspace:
    """Resolve the recipe's model on `device` (in teacher.compute_dtype) and open (or build) its cache."""
    for note in path_notes(recipe):
        say(note)
    model = recipe_model(recipe, device)
    cache, built = teacher_cache(recipe, model, say, progress_factory)
    return Workspace(recipe, model, cache, built)


def method_configs(
    recipe: Recipe, method_name: Optional[str] = None, nfe: Optional[int] = None, say: Say = print
) -> tuple[students.Method, Any, Any]:
    """The student method and its validated `student` / `train` settings for this recipe, without changing the
    recipe. `method_name` switches methods (keeping the recipe keys the other method knows); `nfe` overrides
    student.nfe."""
    if method_name is not None and method_name not in students.names():
        raise BadInput(f"--method: unknown method {method_name!r}; choose one of {', '.join(students.names())}")
    try:
        return _method_configs(recipe, method_name, nfe, say)
    except BadInput as e:
        # Name the file like teacher.* errors do (load_recipe), unless the message already starts with it.
        where = f"{recipe.path}: " if recipe.path else ""
        if not where or str(e).startswith(where):
            raise
        raise BadInput(where + str(e)) from None


def _method_configs(
    recipe: Recipe, method_name: Optional[str], nfe: Optional[int], say: Say
) -> tuple[students.Method, Any, Any]:
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
    if recipe.teacher.mode == "online":
        # The method computes its targets while training: it says how through its own `train.teacher` key.
        if "teacher" not in method.keys()[1]:
            raise BadInput(
                f"teacher.mode: online: {method.name} fits from cached trajectories; only methods with a "
                f"train.teacher key ({', '.join(n for n in students.names() if 'teacher' in students.get(n).keys()[1])}) "
                "compute them while training"
            )
        if train.get("teacher", "online") != "online":
            raise BadInput(f"train.teacher: {train['teacher']!r} contradicts teacher.mode: online")
        train = {"teacher": "online", "teacher_solver": recipe.teacher.solver} | train
    s_cfg, t_cfg = method.configs(student, train)
    return method, s_cfg, t_cfg


def check_split(recipe: Recipe, train: Any) -> None:
    """The training / validation / held-out split fits in teacher.num_samples: said before the teacher runs (the
    cache checks it again, against what it holds)."""
    n, heldout = recipe.teacher.num_samples, train.heldout
    samples = train.samples or n - heldout
    where = f"{recipe.path}: " if recipe.path else ""
    if samples < 1 or samples + heldout > n:
        raise BadInput(
            f"{where}train.samples + train.heldout = {samples} + {heldout} exceeds teacher.num_samples {n}; "
            "raise teacher.num_samples or lower them"
        )
    validation = getattr(train, "validation", 0)
    if validation >= samples:
        raise BadInput(
            f"{where}train.validation: {validation} leaves no training trajectories out of {samples} "
            f"(teacher.num_samples {n} - train.heldout {heldout}); lower it or raise teacher.num_samples"
        )


def handcrafted_curve(
    nfe: int,
    base: dict[str, float],
    model: Any,
    cache: TeacherCache,
    held: Any,
    target: float,
    upto: int = 4,
    progress: Callable[..., Any] | None = None,
    protocol: str = "default",
) -> dict[int, float]:
    """The best handcrafted held-out RMSE by NFE (every handcrafted solver, with and without AFS), from `nfe`
    (`base`: their errors there) upwards until it reaches `target` (the student's error) or `upto` times `nfe`."""
    curve = {nfe: min(base.values())}
    for m in curve_nfes(nfe, upto):
        if curve[max(curve)] <= target:
            break
        curve[m] = min(heldout_rmse(p, model, cache, held) for p in sweep(m, model, protocol).values())
        if progress:
            progress(1, info=f"NFE {m}")
    return curve


def curve_nfes(nfe: int, upto: int = 4) -> list[int]:
    """The NFEs above `nfe` at which `handcrafted_curve` looks: nfe+1 .. 2 nfe, then 3 nfe .. `upto` nfe."""
    return sorted(set(range(nfe + 1, 2 * nfe + 1)) | {k * nfe for k in range(3, upto + 1)})


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
    if workspace is None:
        check_split(recipe, t_cfg)
        for line in path_notes(recipe):
            say(line)
        model = recipe_model(recipe, t_cfg.device)
        method.check(model, s_cfg, t_cfg)  # e.g. a feature loss the model has no network for: before the teacher
        cache, built = teacher_cache(recipe, model, say, progress_factory)
        ws = Workspace(recipe, model, cache, built)
    else:
        method.check(workspace.model, s_cfg, t_cfg)
        ws = workspace
    model, cache = ws.model, ws.cache
    _, held = cache.split(t_cfg.samples, t_cfg.heldout)
    with progress_factory(method.work(s_cfg, t_cfg), f"distill {method.name}") as bar:
        artifact = method.fit(cache, model, s_cfg, t_cfg, progress=bar)
    artifact.meta["teacher"] = {k: v for k, v in cache.spec.items() if k != "grid"} | {"steps": cache.steps}
    try:
        plans = sweep(s_cfg.nfe, model, recipe.protocol)  # baselines run as the recipe's protocol says
        others = [n for n in method.serves(artifact) if n != s_cfg.nfe]  # SFD-v: the rest of its nfe_set
        # On a real network the evaluation is minutes of its own: every handcrafted solver on the held-out seeds.
        with progress_factory(2 + len(plans) + len(others), f"held-out evaluation ({len(held)} trajectories)") as bar:
            student = method.load(artifact, model)
            student_rmse = heldout_rmse(student, model, cache, held)
            bar(1, info="student")
            by_nfe = {s_cfg.nfe: student_rmse}
            for n in others:  # the loaded network at its other NFEs (Method.serves), not a fresh copy for each
                by_nfe[n] = heldout_rmse(student.at_nfe(n), model, cache, held)
                bar(1, info=f"student at NFE {n}")
            initial = heldout_rmse(method.load(method.untrained(artifact), model), model, cache, held)
            bar(1, info="initial rule")
            base = {}
            for name, p in plans.items():
                base[name] = heldout_rmse(p, model, cache, held)
                bar(1, info=name)
        best = min(base, key=base.get)
        larger = curve_nfes(s_cfg.nfe)
        with progress_factory(len(larger), "acceleration: every handcrafted solver at larger NFEs") as bar:
            curve = handcrafted_curve(
                s_cfg.nfe, base, model, cache, held, student_rmse, progress=bar, protocol=recipe.protocol
            )
        ratio = acceleration_ratio(student_rmse, s_cfg.nfe, curve)
    except BaseException:  # Ctrl-C or a failure while measuring: the fitted student is kept
        if distributed.is_main():
            path = artifacts.save(artifact, path)
        say(f"the held-out evaluation did not finish; the fitted student is saved without its metrics: {path}")
        raise
    artifact.meta["metrics"] = {
        "heldout_rmse": student_rmse,
        "initial_rmse": initial,
        "best_handcrafted": best,
        "best_handcrafted_rmse": base[best],
        "handcrafted_rmse": base,
        "heldout_samples": len(held),
        # NFE at which the best handcrafted solver reaches the student's error, over the student's NFE
        # (docs/evaluation.md); None: not reached by the largest NFE measured (best_handcrafted_by_nfe).
        "acceleration": None if math.isinf(ratio) else ratio,
        "best_handcrafted_by_nfe": {str(k): v for k, v in curve.items()},
        "protocol": recipe.protocol,  # how the handcrafted baselines ran
    }
    if others:  # a student that serves several NFEs: its held-out RMSE at each (no handcrafted sweep there)
        artifact.meta["metrics"]["heldout_rmse_by_nfe"] = {str(n): by_nfe[n] for n in sorted(by_nfe)}
    teacher_nfe = cache.steps * get_solver(cache.spec["solver"]).calls_per_step + 1
    artifact.meta["cost"] = {
        "wall_seconds": time.time() - began,
        "teacher_nfe_per_sample": teacher_nfe,
        "teacher_samples": cache.num_samples,
        "student_nfe": s_cfg.nfe,
    }
    if distributed.is_main():  # under torchrun every rank holds the same artifact; rank 0 writes it
        path = artifacts.save(artifact, path)
    rows = [
        (f"{method.name} (this artifact)", student_rmse),
        ("initial / base solver", initial),
        (f"best handcrafted: {best}", base[best]),
    ] + [(f"{method.name} (this artifact) at NFE {n}", by_nfe[n]) for n in others]
    return DistillReport(
        path, method.name, s_cfg.nfe, rows, time.time() - began, ws.teacher_built, artifact.meta["metrics"]
    )
