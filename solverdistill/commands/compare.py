"""`sdistill compare`: solvers side by side across NFEs on the same seeds, against accurate endpoints.

A name is a handcrafted solver (`euler`, `dpm++`, with `+afs` for the analytical first step), an artifact path,
or a student method (`dlms`, `dode`, `sfd`) whose artifact for this model and NFE is found in the artifact
folders, or distilled from the recipe's teacher cache when missing.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import artifacts, students
from ..errors import BadInput
from ..evaluate import psnr, reference_endpoints, rmse
from ..fid import FeatureStats, frechet_distance
from ..models import resolve
from ..sampling import generate, plan
from ..solvers import get as get_solver

METRICS = ("rmse", "psnr", "fd", "fid")
METHODS = ("dlms", "dode", "sfd")
REFERENCE_SEED = 1_000_000  # far from teacher seeds: held out by construction


@dataclass
class Comparison:
    rows: list[dict] = field(default_factory=list)      # {solver, nfe, network_passes, metric, value}
    reference: str = ""
    samples: int = 0
    grid_images: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def parse_list(text: str, flag: str, cast=str) -> list:
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise BadInput(f"{flag}: give a comma-separated list")
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise BadInput(f"{flag}: expected numbers separated by commas, got {text!r}") from None


def split_afs(name: str) -> tuple[str, bool]:
    """`euler+afs` -> ("euler", True); `dpm++` keeps its pluses."""
    return (name[:-4], True) if name.endswith("+afs") else (name, False)


def find_artifact(method: str, nfe: int, fingerprint: str, folders: list[Path]) -> Path | None:
    for folder in folders:
        for path in sorted(folder.glob("*.npz")) + sorted(folder.glob("*.yaml")):
            try:
                art = artifacts.load(path)
            except BadInput:
                continue
            m = art.meta
            if m["method"] == method and int(m["nfe"]) == nfe and m["model_fingerprint"] == fingerprint:
                return path
    return None


class Resolver:
    """Turns a name and an NFE into a solver (or a reason it cannot run at that NFE)."""

    def __init__(self, model, recipe, folders, say, progress_factory):
        self.model, self.recipe, self.folders, self.say, self.progress = model, recipe, folders, say, progress_factory

    def __call__(self, name: str, nfe: int):
        base, afs = split_afs(name)
        if name.endswith((".npz", ".yaml", ".yml")):
            art = artifacts.load(name, fingerprint=self.model.fingerprint)
            if int(art.meta["nfe"]) != nfe:
                return None
            return students.get(art.method).load(art, self.model)
        if base in METHODS:
            path = find_artifact(base, nfe, self.model.fingerprint, self.folders)
            if path is None:
                path = self.distill(base, nfe)
            art = artifacts.load(path, fingerprint=self.model.fingerprint)
            return students.get(art.method).load(art, self.model)
        info = get_solver(base)
        try:
            return plan(info.name, nfe, self.model.sigma_min, self.model.sigma_max, afs=afs)
        except BadInput:
            return None  # e.g. heun at an odd NFE without AFS: an empty cell, not an error

    def distill(self, method: str, nfe: int) -> Path:
        if self.recipe is None:
            raise BadInput(f"--solvers: no {method} artifact for this model at NFE {nfe} in "
                           f"{', '.join(map(str, self.folders))}; pass --recipe to distill one")
        from .distill import run_distill
        out = self.folders[0] / f"{self.recipe.name}_{method}_nfe{nfe}.npz"
        self.say(f"no {method} artifact at NFE {nfe}: distilling {out} from the teacher cache")
        rec = self.recipe
        rec.student = {**rec.student, "nfe": nfe}
        run_distill(rec, str(out), self.say, self.progress, method_name=method)
        return out


def run_compare(names: list[str], nfes: list[int], *, recipe=None, model_spec=None, num=1000, seed=None,
                metrics=("rmse",), folders=(Path("out"), Path("solvers")), batch=250, say=print,
                progress_factory=None, grid_nfe: int | None = None, inception=None) -> Comparison:
    for m in metrics:
        if m not in METRICS:
            raise BadInput(f"--metric: unknown metric {m!r}; choose from {', '.join(METRICS)}")
    if any(n < 1 for n in nfes):
        raise BadInput(f"--nfe: every NFE must be >= 1, got {','.join(map(str, nfes))}")
    if num < 2:
        raise BadInput(f"--num: must be >= 2, got {num}")
    if (recipe is None) == (model_spec is None):
        raise BadInput("give exactly one of --recipe and --model")
    for name in names:  # fail fast, before any work
        base = split_afs(name)[0]
        if name.endswith((".npz", ".yaml", ".yml")):
            if not Path(name).is_file():
                raise BadInput(f"--solvers: no such artifact {name!r}")
        elif base in METHODS and name.endswith("+afs"):
            raise BadInput(f"--solvers: {name!r}: +afs applies to handcrafted solvers; a student's AFS is set "
                           "when it is distilled (student.afs)")
        elif base not in METHODS:
            try:
                get_solver(base)
            except BadInput:
                raise BadInput(f"--solvers: unknown solver {name!r}; use a handcrafted solver (see `sdistill "
                               f"solvers`, +afs for AFS), an artifact path, or one of {', '.join(METHODS)}") from None
    comp = Comparison()
    if recipe is not None:
        from ..sampling import resolve_dtype
        from .distill import ensure_cache
        model = resolve(recipe.model.spec, dtype=resolve_dtype(recipe.teacher.compute_dtype))
        cache, _ = ensure_cache(recipe, model, say, progress_factory)
        heldout = min(int(recipe.train.get("heldout", 256)), cache.num_samples)
        if num > heldout:
            comp.notes.append(f"--num {num} capped at the recipe's {heldout} held-out trajectories")
            num = heldout
        idx = np.arange(cache.num_samples - num, cache.num_samples)
        seeds = [int(s) for s in cache.seeds[idx]]
        from ..students.common import endpoints
        ref = endpoints(cache, idx).float()
        comp.reference = f"teacher cache {recipe.cache_dir()} ({cache.spec['solver']}, {cache.steps} steps)"
    else:
        model = resolve(model_spec)
        seeds = list(range(REFERENCE_SEED if seed is None else seed, (REFERENCE_SEED if seed is None else seed) + num))
        say(f"computing accurate endpoints: RK4 in log sigma, 256 steps, float64, {num} seeds")
        ref = reference_endpoints(resolve(model_spec), seeds, steps=256, batch=batch).float()
        comp.reference = "RK4 in log sigma, 256 steps, float64 (run by compare)"
    if seed is not None and recipe is not None:
        comp.notes.append("--seed ignored with --recipe: the held-out seeds of the cache are used")
    comp.samples = len(seeds)
    resolver = Resolver(model, recipe, list(folders), say, progress_factory)
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
            res = generate(model, lambda m, x, c, cb: solver.solve(m, x, c, cb), seeds, batch=batch)
            x = res.x.float()
            for metric in metrics:
                if metric == "rmse":
                    value = rmse(x, ref)
                elif metric == "psnr":
                    value = psnr(x, ref)
                elif metric == "fd":
                    if ref_stats is None:
                        ref_stats = _stats(ref) if exact is None else exact
                    s = _stats(x)
                    value = frechet_distance(s[0], s[1], *ref_stats)
                else:
                    value = _fid(x, ref, inception)
                comp.rows.append({"solver": name, "nfe": res.nfe, "network_passes": res.network_passes,
                                  "metric": metric, "value": value})
            if nfe == grid_nfe:
                comp.grid_images[name] = x[:show].numpy()
    if exact is not None and "fd" in metrics:
        comp.notes.append("fd: pixel Frechet distance to the exact mixture moments")
    return comp


def _stats(x):
    s = FeatureStats()
    s.update(x.flatten(1))
    return s.mean(), s.cov()


def _fid(x, ref, inception):
    from ..fid import InceptionFeatures, inception_path, to_uint8_nchw
    net = InceptionFeatures(inception_path(inception))
    a, b = FeatureStats(), FeatureStats()
    for part in x.split(64):
        a.update(net(to_uint8_nchw(part)))
    for part in ref.split(64):
        b.update(net(to_uint8_nchw(part)))
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())


def write_outputs(comp: Comparison, json_path=None, csv_path=None, plot_path=None, grid_path=None) -> list[Path]:
    written = []
    try:
        if json_path:
            Path(json_path).write_text(json.dumps({"reference": comp.reference, "samples": comp.samples,
                                                   "rows": comp.rows}, indent=1))
            written.append(Path(json_path))
        if csv_path:
            with open(csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["solver", "nfe", "network_passes", "metric", "value"])
                w.writeheader()
                w.writerows(comp.rows)
            written.append(Path(csv_path))
        if plot_path:
            plot(comp, plot_path)
            written.append(Path(plot_path))
        if grid_path and comp.grid_images:
            from ..outputs import image_grid, save_png
            rows = [as_images(v) for v in comp.grid_images.values()]
            save_png(image_grid(np.concatenate(rows), cols=rows[0].shape[0]), Path(grid_path))
            written.append(Path(grid_path))
    except OSError as e:
        raise BadInput(f"cannot write an output file: {e}") from None
    return written


def as_images(x: np.ndarray) -> np.ndarray:
    """Samples as [N, C, H, W] pictures: images as they are, any other shape as a grey square of its values."""
    from ..outputs import is_image
    if is_image(x.shape[1:]):
        return x
    flat = x.reshape(len(x), -1)
    side = math.ceil(math.sqrt(flat.shape[1]))
    padded = np.zeros((len(x), side * side), dtype=np.float32)
    padded[:, :flat.shape[1]] = flat
    big = np.kron(padded.reshape(len(x), 1, side, side), np.ones((1, 1, 8, 8), dtype=np.float32))
    return big


def plot(comp: Comparison, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = list(dict.fromkeys(r["metric"] for r in comp.rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for solver in dict.fromkeys(r["solver"] for r in comp.rows):
            pts = sorted((r["nfe"], r["value"]) for r in comp.rows if r["solver"] == solver and r["metric"] == metric)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=solver)
        ax.set_xscale("log")
        if metric != "psnr":
            ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{comp.samples} seeds; reference: {comp.reference}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
