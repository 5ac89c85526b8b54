"""Solvers side by side across NFEs on the same seeds, against accurate endpoints (the engine of `compare`).

A name is a handcrafted solver (`euler`, `dpm++`, with `+afs` for the analytical first step), an artifact path,
or a registered student method (`dlms`, `dode`, `sfd`, or a plugin's) whose artifact for this model and NFE is
found in the artifact folders, or distilled when missing: from the recipe's teacher cache, or with `--model` from
the recipe the model names as its default (`model.default_recipe`, e.g. toy:unet-digits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from . import artifacts, students
from .errors import BadInput
from .evaluation import acceleration_ratio, inception_fd, pixel_fd, pixel_stats, psnr, reference_endpoints, rmse
from .generate import generate, nfe_notes
from .models import resolve
from .npzfiles import check_output
from .pipeline import (
    ProgressFactory,
    Say,
    Workspace,
    check_split,
    distill,
    method_configs,
    no_progress,
    recipe_model,
    teacher_cache,
)
from .recipes import Recipe, load_recipe, path_notes
from .solvers import get as get_solver
from .solvers import plan
from .solvers.base import Solver

if TYPE_CHECKING:
    from .models.base import Denoiser

# digits: FD in digit-classifier features against the held-out real digits (docs/digits.md), not the reference
METRICS = ("rmse", "psnr", "fd", "fid", "digits")
REFERENCE_SEED = 1_000_000  # far from teacher seeds: held out by construction
ARTIFACT_SUFFIXES = (".npz", ".yaml", ".yml")
# compare has no --force: an artifact made for another model is refused with what to do instead.
FINGERPRINT_HINT = "distill one for this model (sdistill distill RECIPE), or drop it from --solvers"


@dataclass
class Comparison:
    rows: list[dict] = field(default_factory=list)  # {solver, nfe, network_passes, metric, value}
    reference: str = ""
    samples: int = 0
    grid_images: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)  # solver name -> "handcrafted" or "student"
    classes: list[dict] = field(default_factory=list)  # digits: {solver, nfe, confident_share, class_histogram, ...}

    def accelerations(self) -> list[dict]:
        """For every student cell: the NFE at which the best handcrafted solver of this table reaches the
        student's error (log-log interpolated), over the student's NFE (`evaluation.acceleration_ratio`). Read
        from the first error metric measured (rmse, fd, fid); `ratio` is inf when no handcrafted NFE here
        reaches it."""
        metric = next((m for m in ("rmse", "fd", "fid", "digits") if any(r["metric"] == m for r in self.rows)), None)
        if metric is None:
            return []
        curve: dict[int, float] = {}
        for r in self.rows:
            if r["metric"] == metric and self.kinds.get(r["solver"]) == "handcrafted":
                curve[r["nfe"]] = min(curve.get(r["nfe"], r["value"]), r["value"])
        if not curve:
            return []
        out = []
        for r in self.rows:
            if r["metric"] == metric and self.kinds.get(r["solver"]) == "student":
                ratio = acceleration_ratio(r["value"], r["nfe"], curve)
                out.append(
                    {"solver": r["solver"], "nfe": r["nfe"], "metric": metric, "ratio": ratio, "upto": max(curve)}
                )
        return out

    def best(self, metric: str) -> dict[int, float]:
        """The best value per NFE for this metric (highest for PSNR, lowest otherwise)."""
        pick = max if metric == "psnr" else min
        out: dict[int, float] = {}
        for r in self.rows:
            if r["metric"] == metric:
                out[r["nfe"]] = pick(out.get(r["nfe"], r["value"]), r["value"])
        return out


def default_metrics(model: Denoiser) -> list[str]:
    """`--metric` when not given: RMSE, plus the Frechet distance in the features `fid` picks for this model's
    samples where those are measured against real data (digit features for toy:unet-digits: `fid.DIGIT_MODELS`)."""
    from .fid import DIGIT_MODELS

    return ["rmse", "digits"] if model.spec.partition("?")[0] in DIGIT_MODELS else ["rmse"]


def model_recipe(model: Denoiser, device: str = "auto") -> Optional[tuple[Recipe, Denoiser]]:
    """The recipe a model names for distilling its missing students (`model.default_recipe`, a recipe file), with
    the recipe's model resolved, when that is this very model (same fingerprint); None when it names none."""
    path = getattr(model, "default_recipe", None)
    if path is None or not Path(path).is_file():
        return None
    rec = load_recipe(path)
    rec_model = recipe_model(rec, device)
    if rec_model.fingerprint != model.fingerprint:
        return None  # a recipe for another model (other weights or options) cannot make this one's students
    return rec, rec_model


def recipe_summary(rec: Recipe) -> str:
    """`recipes/x.yaml (teacher: dpm++3m, 32 logsnr steps, 384 seeds -> cache/x; student: {...}; train: {...})`."""
    t = rec.teacher
    keys = lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"
    return (
        f"{rec.path} (teacher: {t.solver}, {t.steps} {t.schedule} steps, {t.num_samples} seeds -> "
        f"{rec.cache_dir()}; student: {keys(rec.student)}; train: {keys(rec.train)})"
    )


def split_afs(name: str) -> tuple[str, bool]:
    """`euler+afs` -> ("euler", True); `dpm++` keeps its pluses."""
    return (name[:-4], True) if name.endswith("+afs") else (name, False)


def check_names(names: list[str]) -> None:
    """Every name is a handcrafted solver (+afs), an existing artifact or a registered method: fail before work."""
    methods = students.names()
    for name in names:
        base = split_afs(name)[0]
        if name.endswith(ARTIFACT_SUFFIXES):
            if not Path(name).is_file():
                raise BadInput(f"--solvers: no such artifact {name!r}")
        elif base in methods and name.endswith("+afs"):
            raise BadInput(
                f"--solvers: {name!r}: +afs applies to handcrafted solvers; a student's AFS is set "
                "when it is distilled (student.afs)"
            )
        elif base not in methods:
            try:
                get_solver(base)
            except BadInput:
                raise BadInput(
                    f"--solvers: unknown solver {name!r}; use a handcrafted solver (see `sdistill "
                    f"solvers`, +afs for AFS), an artifact path, or one of {', '.join(methods)}"
                ) from None


@dataclass
class Cell:
    """One (name, NFE) of the table, planned before any work: a handcrafted `Plan`, an artifact to load (given,
    found in the artifact folders, or to be distilled from the recipe's teacher cache), or nothing to run."""

    name: str
    nfe: int
    kind: str  # "handcrafted" or "student" (an artifact, found, given or distilled)
    solver: Optional[Solver] = None  # the handcrafted plan
    path: Optional[Path] = None  # the artifact
    distill: bool = False  # the artifact is made by this run
    method: str = ""


class Resolver:
    """Plans every name and NFE before any work (`plan`), distills what the plan says is missing (`distill`), and
    loads each cell's solver (`solver`)."""

    def __init__(
        self,
        model: Denoiser,
        workspace: Optional[Workspace],
        folders: list[Path],
        say: Say,
        progress_factory: ProgressFactory,
        recipe: Optional[Recipe] = None,
    ) -> None:
        self.model, self.workspace, self.folders = model, workspace, folders
        self.say, self.progress = say, progress_factory
        self.recipe = recipe or (workspace.recipe if workspace else None)
        self._found: Optional[dict[Path, artifacts.Artifact]] = None
        self._given: dict[str, artifacts.Artifact] = {}

    def found(self) -> dict[Path, artifacts.Artifact]:
        """The artifacts made for this model in the artifact folders (read once)."""
        if self._found is None:
            self._found = artifacts.scan(self.folders, self.model.fingerprint)
        return self._found

    def plan(self, name: str, nfe: int) -> Optional[Cell]:
        """What runs in this cell (None: the solver cannot run at this NFE, an empty cell). Nothing is sampled."""
        base, afs = split_afs(name)
        if name.endswith(ARTIFACT_SUFFIXES):
            if name not in self._given:
                self._given[name] = artifacts.load(name, fingerprint=self.model.fingerprint, hint=FINGERPRINT_HINT)
            art = self._given[name]
            if nfe not in students.get(art.method).serves(art):  # SFD-v serves several NFEs
                return None
            return Cell(name, nfe, "student", path=Path(name), method=art.method)
        if base in students.names():
            method = students.get(base)
            found = [(path, art) for path, art in self.found().items() if art.method == base]
            # one distilled for this NFE first, else one that also serves it (SFD-v)
            for path, art in sorted(found, key=lambda pa: int(pa[1].meta["nfe"]) != nfe):
                if nfe in method.serves(art):
                    return Cell(name, nfe, "student", path=path, method=base)
            out = self.folders[0] / f"{self.recipe.name}_{base}_nfe{nfe}.npz" if self.recipe else None
            return Cell(name, nfe, "student", path=out, distill=True, method=base)
        try:
            return Cell(name, nfe, "handcrafted", solver=plan(base, nfe, self.model, afs=afs))
        except BadInput:
            return None  # e.g. heun at an odd NFE without AFS: an empty cell, not an error

    def check(self, cells: list[Cell]) -> None:
        """Every student that must be distilled can be (a recipe, a writable output, valid settings), or one
        message naming them all and what to run; otherwise say up front what will be distilled."""
        for c in cells:  # a method name stands for an artifact found in the folders: say which one
            if c.kind == "student" and not c.distill and c.name == c.method:
                self.say(f"{c.name} at NFE {c.nfe}: {c.path}")
        missing = [c for c in cells if c.distill]
        if not missing:
            return
        by_method: dict[str, list[int]] = {}
        for c in missing:
            by_method.setdefault(c.method, []).append(c.nfe)
        wanted = "; ".join(f"{m} at NFE {', '.join(map(str, n))}" for m, n in by_method.items())
        if self.recipe is None:
            have = sorted(
                f"{art.method} NFE {art.meta['nfe']} ({path})"
                for path, art in self.found().items()
                if art.method in by_method
            )
            method, nfe = missing[0].method, missing[0].nfe
            raise BadInput(
                f"--solvers: no artifact for model {self.model.spec} in {', '.join(map(str, self.folders))}: "
                f"{wanted}"
                + (f" (found: {', '.join(have)})" if have else "")
                + ". Distill them on the way with --recipe RECIPE"
                + (" (recipes/quickstart.yaml is one for gmm:cifar)" if self.model.spec == "gmm:cifar" else "")
                + f", or make one first: sdistill distill RECIPE --method {method} --nfe {nfe} "
                f"--out {self.folders[0] / f'{method}_nfe{nfe}.npz'}; or drop them from --solvers or --nfe"
            )
        for c in missing:  # the settings, their split of the teacher's samples and the output, checked now
            _, _, train = method_configs(self.recipe, c.method, c.nfe, say=lambda m: None)
            check_split(self.recipe, train)
            check_output(c.path, "--artifacts")
        self.say(
            f"no artifact in {', '.join(map(str, self.folders))} for {wanted}: distilling "
            f"{'it' if len(missing) == 1 else f'these {len(missing)}'} from the teacher cache "
            f"{self.recipe.cache_dir()} first ({', '.join(str(c.path) for c in missing)})"
        )

    def distill(self, cell: Cell) -> None:
        """Fit the student a planned cell is missing, through the pipeline, and write its artifact."""
        ws = self.workspace
        assert ws is not None and cell.path is not None, "check() refuses a missing student without a recipe"
        self.say(f"distilling {cell.method} at NFE {cell.nfe} -> {cell.path}")
        distill(
            ws.recipe,
            method_name=cell.method,
            nfe=cell.nfe,
            out=str(cell.path),
            workspace=ws,
            say=self.say,
            progress_factory=self.progress,
        )
        cell.distill = False

    def solver(self, cell: Cell) -> Solver:
        """The cell's solver: its plan, or its artifact loaded for this model."""
        if cell.solver is not None:
            return cell.solver
        art = artifacts.load(cell.path, fingerprint=self.model.fingerprint, hint=FINGERPRINT_HINT)
        return students.get(art.method).solver_at(art, self.model, cell.nfe)

    def __call__(self, name: str, nfe: int) -> Optional[Solver]:
        """Plan, check and load one cell (distilling it first where the plan says so)."""
        cell = self.plan(name, nfe)
        if cell is None:
            return None
        self.check([cell])
        if cell.distill:
            self.distill(cell)
        return self.solver(cell)


def run_compare(
    names: list[str],
    nfes: list[int],
    *,
    recipe: Optional[Recipe] = None,
    model_spec: Optional[str] = None,
    num: int = 1000,
    seed: Optional[int] = None,
    metrics: Optional[Sequence[str]] = None,
    folders: Sequence[Path] = (Path("out"), Path("solvers")),
    batch: int = 250,
    say: Say = print,
    progress_factory: ProgressFactory = no_progress,
    grid_nfe: Optional[int] = None,
    inception: Optional[str] = None,
    comp: Optional[Comparison] = None,
) -> Comparison:
    """Sample every (name, NFE) from the same seeds and measure each metric against the reference endpoints:
    the recipe's held-out teacher trajectories, or an RK4 solve of `model_spec`. Students missing with
    `model_spec` are distilled with the recipe the model names (`model.default_recipe`), if it names one.
    `metrics` None: `default_metrics` of the model.

    Everything that can be checked is checked before any work (names, metrics and their weights, the artifact of
    every student at every NFE and its fingerprint, the settings of those to distill); the students the recipe
    will distill are said up front. Rows go into `comp` (a fresh one by default) as they are measured, so a
    caller keeps what was computed before a later failure."""
    comp = comp if comp is not None else Comparison()
    for m in metrics or ():
        if m not in METRICS:
            raise BadInput(f"--metric: unknown metric {m!r}; choose from {', '.join(METRICS)}")
    if any(n < 1 for n in nfes):
        raise BadInput(f"--nfe: every NFE must be >= 1, got {','.join(map(str, nfes))}")
    if num < 2:
        raise BadInput(f"--num: must be >= 2, got {num}")
    if (recipe is None) == (model_spec is None):
        raise BadInput(
            "give exactly one of --recipe and --model: the reference endpoints come from the recipe's teacher "
            "cache, or from an RK4 solve of the model. E.g. sdistill compare --model gmm:cifar --solvers "
            "ddim,dpm++,ipndm --nfe 3,5,8, or sdistill compare --recipe recipes/quickstart.yaml --solvers "
            "dpm++,dlms --nfe 5"
        )
    check_names(names)
    if "fid" in (metrics or ()):
        from .fid import inception_path

        inception_path(inception)  # the weights file, before any sampling
    for note in nfe_notes(nfes):
        say(note)
    train = None
    if recipe is not None:
        _, _, train = method_configs(recipe, say=say)
        for note in path_notes(recipe):
            say(note)
        model = recipe_model(recipe, train.device)
    else:
        model = resolve(model_spec)
    if metrics is None:
        metrics = default_metrics(model)
        if metrics != ["rmse"]:
            say(f"--metric {','.join(metrics)} (the default for {model.spec})")
    if "digits" in metrics:
        from .fid import digits_fd
    resolver = Resolver(model, None, list(folders), say, progress_factory, recipe)
    cells = [c for name in names for nfe in nfes if (c := resolver.plan(name, nfe)) is not None]
    own = None  # with --model: the model's own recipe, for students that are missing
    if recipe is None and any(c.distill for c in cells) and (own := model_recipe(model)) is not None:
        resolver.recipe = own[0]
        say(f"--model {model.spec}: missing students are distilled with its default recipe {recipe_summary(own[0])}")
        for note in path_notes(own[0]):
            say(note)
        cells = [c for name in names for nfe in nfes if (c := resolver.plan(name, nfe)) is not None]
    resolver.check(cells)
    comp.kinds = {c.name: c.kind for c in cells}
    if "digits" in metrics and tuple(model.shape) != (1, 16, 16):
        raise BadInput(
            f"--metric digits: needs 1x16x16 digit images (toy:unet-digits); {model.spec} makes {model.shape}"
        )

    if recipe is not None:
        cache, built = teacher_cache(recipe, model, say, progress_factory)
        resolver.workspace = Workspace(recipe, model, cache, built)
        heldout = min(train.heldout, cache.num_samples)
        if num > heldout:
            comp.notes.append(f"--num {num} capped at the recipe's {heldout} held-out trajectories")
            num = heldout
        idx = np.arange(cache.num_samples - num, cache.num_samples)
        seeds = [int(s) for s in cache.seeds[idx]]
        ref = cache.endpoints(idx).float()
        comp.reference = f"teacher cache {recipe.cache_dir()} ({cache.spec['solver']}, {cache.steps} steps)"
        if seed is not None:
            comp.notes.append("--seed ignored with --recipe: the held-out seeds of the cache are used")
        for cell in cells:
            if cell.distill:
                resolver.distill(cell)
    else:
        if own is not None:  # the students first: the teacher and the fits are the long, fallible part
            rec, rec_model = own
            cache, built = teacher_cache(rec, rec_model, say, progress_factory)
            resolver.workspace = Workspace(rec, rec_model, cache, built)
            for cell in cells:
                if cell.distill:
                    resolver.distill(cell)
        first = REFERENCE_SEED if seed is None else seed
        seeds = list(range(first, first + num))
        steps = 256
        if set(metrics) <= {"digits"}:  # measured against the held-out real digits: no RK4 solve (minutes) needed
            ref = None
            comp.reference = "none (--metric digits compares with the held-out real digits)"
        else:
            with progress_factory(num, f"reference: RK4 in log sigma, {steps} steps, float64, {num} seeds") as bar:
                ref = reference_endpoints(model, seeds, steps=steps, batch=batch, progress=bar).float()
            comp.reference = f"RK4 in log sigma, {steps} steps, float64 (run by compare)"
    comp.samples = len(seeds)
    exact = (model.data_mean().numpy(), model.data_cov().numpy()) if hasattr(model, "data_cov") else None
    ref_stats = None
    grid_nfe = grid_nfe or sorted(nfes)[len(nfes) // 2]
    show = min(8, len(seeds))
    if ref is not None:
        comp.grid_images["reference"] = ref[:show].numpy()
    with progress_factory(len(cells) * len(seeds), f"sampling {len(cells)} solver x NFE cells") as bar:
        for cell in cells:
            bar(0, info=f"{cell.name} NFE {cell.nfe}")
            res = generate(model, resolver.solver(cell), seeds, batch=batch, progress=bar)
            x = res.x.float()
            for metric in metrics:
                if metric == "rmse":
                    value = rmse(x, ref)
                elif metric == "psnr":
                    value = psnr(x, ref)
                elif metric == "fd":
                    if ref_stats is None:
                        ref_stats = pixel_stats(ref) if exact is None else exact
                    value = pixel_fd(x, ref_stats)
                elif metric == "digits":
                    measured = digits_fd(x)
                    value = measured.distance
                    comp.classes.append({"solver": cell.name, "nfe": res.nfe} | measured.classes.as_dict())
                else:
                    value = inception_fd(x, ref, inception)
                comp.rows.append(
                    {
                        "solver": cell.name,
                        "nfe": res.nfe,
                        "network_passes": res.network_passes,
                        "metric": metric,
                        "value": value,
                    }
                )
            if cell.nfe == grid_nfe:
                shown_name = Path(cell.name).name if cell.name.endswith(ARTIFACT_SUFFIXES) else cell.name
                comp.grid_images[f"{shown_name}, NFE {res.nfe}"] = x[:show].numpy()
    if exact is not None and "fd" in metrics:
        comp.notes.append("fd: pixel Frechet distance to the exact mixture moments")
    return comp
