"""Solvers side by side across NFEs on the same seeds, against accurate endpoints (the engine of `compare`).

A name is a handcrafted solver (`euler`, `dpm++`, with `+afs` for the analytical first step), an artifact path,
or a registered student method (`dlms`, `dode`, `sfd`, or a plugin's) whose artifact for this model and NFE is
found in the artifact folders, or distilled from the recipe's teacher cache when missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from . import artifacts, students
from .errors import BadInput
from .evaluation import inception_fd, pixel_fd, pixel_stats, psnr, reference_endpoints, rmse
from .generate import generate
from .models import resolve
from .pipeline import ProgressFactory, Say, Workspace, distill, method_configs, no_progress, open_workspace
from .recipes import Recipe
from .solvers import get as get_solver
from .solvers import plan
from .solvers.base import Solver

if TYPE_CHECKING:
    from .models.base import Denoiser

METRICS = ("rmse", "psnr", "fd", "fid")
REFERENCE_SEED = 1_000_000  # far from teacher seeds: held out by construction
ARTIFACT_SUFFIXES = (".npz", ".yaml", ".yml")


@dataclass
class Comparison:
    rows: list[dict] = field(default_factory=list)  # {solver, nfe, network_passes, metric, value}
    reference: str = ""
    samples: int = 0
    grid_images: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def best(self, metric: str) -> dict[int, float]:
        """The best value per NFE for this metric (highest for PSNR, lowest otherwise)."""
        pick = max if metric == "psnr" else min
        out: dict[int, float] = {}
        for r in self.rows:
            if r["metric"] == metric:
                out[r["nfe"]] = pick(out.get(r["nfe"], r["value"]), r["value"])
        return out


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


class Resolver:
    """Turns a name and an NFE into a solver (or None: it cannot run at that NFE)."""

    def __init__(
        self,
        model: Denoiser,
        workspace: Optional[Workspace],
        folders: list[Path],
        say: Say,
        progress_factory: ProgressFactory,
    ) -> None:
        self.model, self.workspace, self.folders = model, workspace, folders
        self.say, self.progress = say, progress_factory

    def __call__(self, name: str, nfe: int) -> Optional[Solver]:
        base, afs = split_afs(name)
        if name.endswith(ARTIFACT_SUFFIXES):
            art = artifacts.load(name, fingerprint=self.model.fingerprint)
            if int(art.meta["nfe"]) != nfe:
                return None
            return students.get(art.method).load(art, self.model)
        if base in students.names():
            path = artifacts.find(base, nfe, self.model.fingerprint, self.folders) or self.distill(base, nfe)
            art = artifacts.load(path, fingerprint=self.model.fingerprint)
            return students.get(art.method).load(art, self.model)
        try:
            return plan(base, nfe, self.model, afs=afs)
        except BadInput:
            return None  # e.g. heun at an odd NFE without AFS: an empty cell, not an error

    def distill(self, method: str, nfe: int) -> Path:
        ws = self.workspace
        if ws is None:
            raise BadInput(
                f"--solvers: no {method} artifact for this model at NFE {nfe} in "
                f"{', '.join(map(str, self.folders))}; pass --recipe to distill one"
            )
        out = self.folders[0] / f"{ws.recipe.name}_{method}_nfe{nfe}.npz"
        self.say(f"no {method} artifact at NFE {nfe}: distilling {out} from the teacher cache")
        distill(
            ws.recipe,
            method_name=method,
            nfe=nfe,
            out=str(out),
            workspace=ws,
            say=self.say,
            progress_factory=self.progress,
        )
        return out


def run_compare(
    names: list[str],
    nfes: list[int],
    *,
    recipe: Optional[Recipe] = None,
    model_spec: Optional[str] = None,
    num: int = 1000,
    seed: Optional[int] = None,
    metrics: Sequence[str] = ("rmse",),
    folders: Sequence[Path] = (Path("out"), Path("solvers")),
    batch: int = 250,
    say: Say = print,
    progress_factory: ProgressFactory = no_progress,
    grid_nfe: Optional[int] = None,
    inception: Optional[str] = None,
) -> Comparison:
    """Sample every (name, NFE) from the same seeds and measure each metric against the reference endpoints:
    the recipe's held-out teacher trajectories, or an RK4 solve of `model_spec`."""
    for m in metrics:
        if m not in METRICS:
            raise BadInput(f"--metric: unknown metric {m!r}; choose from {', '.join(METRICS)}")
    if any(n < 1 for n in nfes):
        raise BadInput(f"--nfe: every NFE must be >= 1, got {','.join(map(str, nfes))}")
    if num < 2:
        raise BadInput(f"--num: must be >= 2, got {num}")
    if (recipe is None) == (model_spec is None):
        raise BadInput("give exactly one of --recipe and --model")
    check_names(names)
    comp = Comparison()
    workspace = None
    if recipe is not None:
        _, _, train = method_configs(recipe, say=say)
        workspace = open_workspace(recipe, train.device, say, progress_factory)
        model, cache = workspace.model, workspace.cache
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
    else:
        model = resolve(model_spec)
        first = REFERENCE_SEED if seed is None else seed
        seeds = list(range(first, first + num))
        say(f"computing accurate endpoints: RK4 in log sigma, 256 steps, float64, {num} seeds")
        ref = reference_endpoints(model, seeds, steps=256, batch=batch).float()
        comp.reference = "RK4 in log sigma, 256 steps, float64 (run by compare)"
    comp.samples = len(seeds)
    resolver = Resolver(model, workspace, list(folders), say, progress_factory)
    exact = (model.data_mean().numpy(), model.data_cov().numpy()) if hasattr(model, "data_cov") else None
    ref_stats = None
    grid_nfe = grid_nfe or sorted(nfes)[len(nfes) // 2]
    show = min(8, len(seeds))
    comp.grid_images["reference"] = ref[:show].numpy()
    for name in names:
        for nfe in nfes:
            solver = resolver(name, nfe)
            if solver is None:
                continue
            res = generate(model, solver, seeds, batch=batch)
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
                else:
                    value = inception_fd(x, ref, inception)
                comp.rows.append(
                    {
                        "solver": name,
                        "nfe": res.nfe,
                        "network_passes": res.network_passes,
                        "metric": metric,
                        "value": value,
                    }
                )
            if nfe == grid_nfe:
                comp.grid_images[name] = x[:show].numpy()
    if exact is not None and "fd" in metrics:
        comp.notes.append("fd: pixel Frechet distance to the exact mixture moments")
    return comp
