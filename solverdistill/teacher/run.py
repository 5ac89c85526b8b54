"""`sdistill teacher`: integrate the ODE accurately from seeds [seed, seed+N) and fill the cache, resumably.

The solver runs on the main thread while a background thread streams finished batches to disk, so writing
costs (almost) nothing next to the integration.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import __version__
from ..devices import resolve_device, resolve_dtype
from ..errors import BadInput
from ..generate import initial_noise
from ..grids import make_grid
from ..models import resolve
from ..recipes import Recipe
from ..solvers import get as get_solver
from ..solvers.base import Step, call
from .cache import (
    FORMAT,
    FORMAT_VERSION,
    ShardWriter,
    check_shard_files,
    read_manifest,
    spec_differences,
    write_json_atomic,
)

if TYPE_CHECKING:
    from ..models.base import Denoiser

STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


def teacher_spec(recipe: Recipe, model: Denoiser) -> dict:
    t = recipe.teacher
    info = get_solver(t.solver)
    grid = make_grid(t.schedule, t.steps, model.sigma_min, model.sigma_max)
    cond = draw_cond(model, [t.seed])
    return {
        "model": model.fingerprint,
        "model_spec": model.spec,
        "solver": info.name,
        "schedule": t.schedule,
        "grid": grid.tolist(),
        "dtype": t.dtype,
        "shape": list(model.shape),
        "seed": t.seed,
        "precision": t.precision,
        "cond_shape": None if cond is None else list(cond.shape[1:]),
    }


def draw_cond(model: Any, seeds: Sequence[int]) -> torch.Tensor | None:
    """Per-seed conditioning from the backend (class labels, prompt indices), or None."""
    fn = getattr(model, "draw_cond", None)
    return fn(seeds) if callable(fn) else None


def integrate_batch(
    model: Any, solver: str, grid: torch.Tensor, z: torch.Tensor, cond: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """States and denoiser outputs at every grid point, the last one included (one extra call at sigma_min)."""
    xs, ds = [], []

    def keep(step: Step) -> None:
        xs.append(step.x)
        ds.append(step.denoised)

    with torch.no_grad():
        x = get_solver(solver).solve(model, z * float(grid[0]), grid, cond=cond, callback=keep)
        xs.append(x)
        ds.append(call(model, x, float(grid[-1]), cond))
    return torch.stack(xs, 1), torch.stack(ds, 1)


class BackgroundWriter:
    """One thread that runs write jobs in order; errors surface on the main thread."""

    def __init__(self, depth: int = 2) -> None:
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is None:
                try:
                    job()
                except BaseException as e:  # reported by submit/close on the main thread
                    self.error = e

    def submit(self, job: Callable[[], Any]) -> None:
        if self.error:
            raise self.error
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        if self.error:
            raise self.error


@dataclass
class TeacherReport:
    root: Path
    total: int
    generated: int
    reused: int
    seconds: float
    nfe_per_sample: int


def plan_shards(manifest: dict, num: int, shard_size: int) -> list[tuple[str, int, int]]:
    """Shards still to write: bad ones again over their exact range, then new ones from the end of coverage."""
    todo = [(s["name"], s["start"], s["count"]) for s in manifest["shards"] if s["status"] != "ok"]
    covered = max((s["start"] + s["count"] for s in manifest["shards"]), default=0)
    index = len(manifest["shards"])
    while covered < num:
        count = min(shard_size, num - covered)
        todo.append((f"shard-{index:06d}", covered, count))
        covered += count
        index += 1
    return todo


@dataclass
class TeacherJob:
    """A teacher run with its spec checked against the cache and what is left to integrate planned."""

    recipe: Recipe
    model: object
    spec: dict
    root: Path
    manifest: dict
    todo: list[tuple[str, int, int]]

    @property
    def missing(self) -> int:
        """Samples still to integrate."""
        return sum(count for _, _, count in self.todo)

    def run(self, progress: Callable[..., Any] | None = None, write: bool = True) -> TeacherReport:
        """Integrate what is missing (the recipe's teacher.precision for the network), writing shard by shard."""
        previous = self.model.precision
        self.model.set_precision(self.recipe.teacher.precision)
        try:
            return _integrate(self, progress, write)
        finally:
            self.model.set_precision(previous)


def prepare_teacher(recipe: Recipe, model: Denoiser | None = None, overwrite: bool = False) -> TeacherJob:
    """Open (or create) the recipe's cache and plan the shards left to write. `model`: the recipe's model
    already resolved by the caller (else resolved here on teacher.device in teacher.compute_dtype)."""
    t = recipe.teacher
    if model is None:
        model = resolve(recipe.model.spec, device=resolve_device(t.device), dtype=resolve_dtype(t.compute_dtype))
    spec = teacher_spec(recipe, model)
    root = recipe.cache_dir()
    manifest = read_manifest(root) if root.exists() else None
    if manifest is not None and not overwrite:
        diffs = spec_differences(manifest["spec"], spec)
        if diffs:
            raise BadInput(
                f"{root}: the cache was made with another spec; differs in: {', '.join(diffs)}. "
                "Use another teacher.cache folder, or --overwrite to replace it"
            )
    if manifest is None or overwrite:
        if overwrite and root.exists():
            shutil.rmtree(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInput(f"teacher.cache: cannot create {str(root)!r}: {e.strerror or e}") from None
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": __version__,
            "spec": spec,
            "shards": [],
        }
        write_json_atomic(root / "manifest.json", manifest)
    for leftover in root.glob("shard-*.tmp"):  # a shard in progress when a previous run died
        shutil.rmtree(leftover, ignore_errors=True)
    for shard in manifest["shards"]:
        if shard["status"] == "ok" and check_shard_files(root, shard, t.steps, model.shape, spec["cond_shape"]):
            shard["status"] = "bad"
    return TeacherJob(recipe, model, spec, root, manifest, plan_shards(manifest, t.num_samples, t.shard_size))


def run_teacher(
    recipe: Recipe,
    overwrite: bool = False,
    progress: Callable[..., Any] | None = None,
    write: bool = True,
    model: Denoiser | None = None,
) -> TeacherReport:
    """`sdistill teacher`: fill the recipe's cache, resuming where a previous run stopped."""
    return prepare_teacher(recipe, model, overwrite).run(progress, write)


def _integrate(job: TeacherJob, progress: Callable[..., Any] | None, write: bool) -> TeacherReport:
    t, model, spec, root, manifest = job.recipe.teacher, job.model, job.spec, job.root, job.manifest
    todo = job.todo
    grid = torch.tensor(spec["grid"], dtype=torch.float64)
    store = STORE_DTYPES[t.dtype]
    lock = threading.Lock()

    def commit(entry: dict) -> None:
        with lock:
            manifest["shards"] = [s for s in manifest["shards"] if s["name"] != entry["name"]] + [entry]
            manifest["shards"].sort(key=lambda s: s["start"])
            write_json_atomic(root / "manifest.json", manifest)

    generated, start_time = 0, time.time()
    writer = BackgroundWriter() if write else None
    shard = None
    try:
        for name, start, count in todo:
            shard = (
                ShardWriter(root, name, start, count, t.steps, model.shape, store, spec["grid"], spec["cond_shape"])
                if write
                else None
            )
            for b0 in range(start, start + count, t.batch):
                seeds = list(range(t.seed + b0, t.seed + min(b0 + t.batch, start + count)))
                z = initial_noise(seeds, model.shape, model.dtype, model.device)
                cond = draw_cond(model, seeds)
                x, den = integrate_batch(model, spec["solver"], grid, z, cond)
                arrays = (
                    np.asarray(seeds),
                    z.cpu().float().numpy(),
                    x.cpu().numpy(),
                    den.cpu().numpy(),
                    None if cond is None else cond.cpu().numpy(),
                )
                if writer:
                    writer.submit(lambda s=shard, a=arrays: s.append(*a))
                generated += len(seeds)
                if progress:
                    progress(len(seeds))
            if writer:
                writer.submit(lambda s=shard: commit(s.finish()))
                shard = None
    except BaseException:
        if writer:
            try:
                writer.close()  # let queued writes of earlier shards land; their commits are already queued
            except BaseException:
                pass  # the first error is the one to report
            writer = None
        if shard is not None:
            shard.abort()
        raise
    finally:
        if writer:
            writer.close()
    nfe = t.steps * get_solver(spec["solver"]).calls_per_step + 1
    return TeacherReport(root, t.num_samples, generated, t.num_samples - generated, time.time() - start_time, nfe)
