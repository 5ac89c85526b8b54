"""`sdistill teacher`: integrate the ODE accurately from seeds [seed, seed+N) and fill the cache, resumably.

The solver runs on the main thread while a background thread streams finished batches to disk, so writing
costs (almost) nothing next to the integration. One writer at a time: the cache's writer lock is taken before
anything in the folder changes and released however the run ends.
"""

from __future__ import annotations

import contextlib
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

from .. import __version__, distributed
from ..errors import BadInput, RunFailed
from ..generate import initial_noise
from ..grids import make_grid
from ..recipes import Recipe
from ..solvers import get as get_solver
from ..solvers.base import Step, call
from .cache import (
    FORMAT,
    FORMAT_VERSION,
    SHARD_NAME,
    CacheLock,
    CacheUnwritable,
    LockHeld,
    ShardWriter,
    coverage_gaps,
    read_manifest,
    reason,
    shard_bytes,
    shard_problem,
    shown,
    spec_differences,
    write_json_atomic,
)

if TYPE_CHECKING:
    from ..models.base import Denoiser

STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


def sized(n: float) -> str:
    """Bytes for people: KiB, MiB, GiB or TiB."""
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def stored_points(steps: int, every: int) -> list[int]:
    """Indices of the grid points a cache keeps with teacher.store_every = `every`: 0, K, 2K, ... and the last."""
    keep = list(range(0, steps + 1, every))
    return keep if keep[-1] == steps else [*keep, steps]


def teacher_grid(recipe: Recipe, model: Denoiser) -> torch.Tensor:
    """The grid the teacher integrates on (every point; the cache may store a sub-grid of it)."""
    t = recipe.teacher
    return make_grid(t.schedule, t.steps, model.sigma_min, model.sigma_max)


def teacher_spec(recipe: Recipe, model: Denoiser) -> dict:
    """The manifest's `spec` for this recipe and model: what a cache must match to be reused. `grid` holds the
    stored points only (every teacher.store_every-th and the last), the grid readers interpolate on."""
    t = recipe.teacher
    info = get_solver(t.solver)
    grid = teacher_grid(recipe, model)[stored_points(t.steps, t.store_every)]
    cond = draw_cond(model, [t.seed])
    return {
        "model": model.fingerprint,
        "model_spec": model.spec,
        "solver": info.name,
        "schedule": t.schedule,
        "store_every": t.store_every,
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
        self.cancelled = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is None and not self.cancelled:
                try:
                    job()
                except BaseException as e:  # reported by submit/close on the main thread
                    self.error = e

    def submit(self, job: Callable[[], Any]) -> None:
        """Queue a job (blocks while the queue is full); raises the first error of an earlier job."""
        if self.error:
            raise self.error
        self.jobs.put(job)

    def wait(self) -> None:
        """Block until every job queued so far has run; raises the first error of any job."""
        ran = threading.Event()
        self.submit(ran.set)
        while not ran.wait(0.1):
            if self.error or not self.thread.is_alive():
                break
        if self.error:
            raise self.error

    def close(self) -> None:
        """Run what is queued, stop the thread, and raise the first error of any job."""
        self.jobs.put(None)
        self.thread.join()
        if self.error:
            raise self.error

    def abandon(self) -> None:
        """Skip what is still queued and wait for the job in progress (a second interrupt while closing)."""
        self.cancelled = True
        with contextlib.suppress(queue.Full):
            self.jobs.put_nowait(None)
        self.thread.join(timeout=60)


@dataclass
class TeacherReport:
    """What a teacher run did: samples in total, integrated now and reused, seconds, NFE per sample."""

    root: Path
    total: int
    generated: int
    reused: int
    seconds: float
    nfe_per_sample: int


def plan_shards(manifest: dict, num: int, shard_size: int) -> list[tuple[str, int, int]]:
    """Shards still to write for samples [0, num): bad ones again over their range (cut at `num`), then new ones
    for every gap in coverage and from the end of coverage. New shards get names after the highest in use."""
    todo = []
    shards = []
    for s in manifest["shards"]:
        if s["status"] != "ok" and s["start"] < num:
            count = min(s["count"], num - s["start"])
            todo.append((s["name"], s["start"], count))
            shards.append({**s, "count": count})
        else:
            shards.append(s)
    index = 1 + max((int(s["name"][len("shard-") :]) for s in shards), default=-1)
    for start, count in coverage_gaps(shards, upto=num):
        for b in range(start, start + count, shard_size):
            todo.append((f"shard-{index:06d}", b, min(shard_size, start + count - b)))
            index += 1
    return sorted(todo, key=lambda t: t[1])


@dataclass
class TeacherJob:
    """A teacher run with its spec checked against the cache and what is left to integrate planned. While there
    is something to write it holds the cache's writer lock; `run` (or `release`) gives it back."""

    recipe: Recipe
    model: object
    spec: dict
    root: Path
    manifest: dict
    todo: list[tuple[str, int, int]]
    lock: CacheLock | None = None
    ran: bool = False
    grid: torch.Tensor | None = None  # the grid integrated on (spec["grid"] is the stored sub-grid of it)
    bytes_total: int = 0  # the whole cache on disk once the job is done
    bytes_todo: int = 0  # what the job writes
    bytes_free: int | None = None  # free space on the cache's disk when planned (None: unknown)

    def size_note(self) -> str:
        """The size the cache will take, for the user before a long run."""
        text = f"{shown(self.root)}: the cache takes {sized(self.bytes_total)}"
        if self.todo:
            free = f", {sized(self.bytes_free)} free" if self.bytes_free is not None else ""
            text += f" ({sized(self.bytes_todo)} to write{free})"
        return text + f", {self.bytes_total / max(self.recipe.teacher.num_samples, 1):,.0f} bytes per sample"

    @property
    def missing(self) -> int:
        """Samples still to integrate."""
        return sum(count for _, _, count in self.todo)

    def run(self, progress: Callable[..., Any] | None = None, write: bool = True) -> TeacherReport:
        """Integrate what is missing (the recipe's teacher.precision for the network), writing shard by shard;
        the lock is released however this ends."""
        if self.ran:
            raise RuntimeError("a TeacherJob runs once: plan again with prepare_teacher")
        self.ran = True
        previous = self.model.precision
        try:
            self.model.set_precision(self.recipe.teacher.precision)
            return _integrate(self, progress, write)
        finally:
            self.model.set_precision(previous)
            self.release()

    def release(self) -> None:
        """Give back the writer lock without running (safe to call more than once)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> TeacherJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def make_cache_folder(root: Path) -> None:
    """Create the cache folder (and its parents); BadInput with the path and the reason when that fails."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise BadInput(f"teacher.cache: {shown(root)} exists and is not a folder") from None
    except OSError as e:
        raise BadInput(f"teacher.cache: cannot create the cache folder {shown(root)}: {reason(e)}") from None


def _clear_cache(root: Path) -> None:
    """--overwrite: remove what a cache consists of, nothing else (the folder may hold the user's other files)."""
    for p in root.iterdir():
        if p.name in ("manifest.json", "manifest.json.tmp") or SHARD_NAME.fullmatch(p.name.removesuffix(".tmp")):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def prepare_teacher(
    recipe: Recipe,
    model: Denoiser | None = None,
    overwrite: bool = False,
    verify: bool = False,
    progress_factory: Callable[[int, str], Any] | None = None,
    force: bool = False,
) -> TeacherJob:
    """Open (or create) the recipe's cache and plan what is left to write (`_prepare`). Under torchrun rank 0
    does that alone, holding the writer lock for the whole group, and hands its plan to the other ranks, which
    never touch the manifest (docs/distributed.md). Every rank must call this."""
    if distributed.active() and not distributed.is_main():
        if model is None:
            from ..pipeline import recipe_model  # (the pipeline imports this module)

            model = recipe_model(recipe, recipe.teacher.device)
        spec = teacher_spec(recipe, model)
        plan = distributed.broadcast_object(None)
        todo = [tuple(t) for t in plan["todo"]]
        return TeacherJob(
            recipe, model, spec, recipe.cache_dir(), plan["manifest"], todo, None, grid=plan_grid(recipe, model)
        )
    job = _prepare(recipe, model, overwrite, verify, progress_factory, force)
    if distributed.active():
        distributed.broadcast_object({"manifest": job.manifest, "todo": job.todo})
    return job


def plan_grid(recipe: Recipe, model: Denoiser) -> torch.Tensor:
    """The teacher's full integration grid (float64)."""
    return teacher_grid(recipe, model).to(torch.float64)


def _size_check(job: TeacherJob, force: bool) -> None:
    """Fill in the job's sizes; refuse (BadInput) when what it writes exceeds the free space, unless `force`."""
    spec, t = job.spec, job.recipe.teacher
    steps, store = len(spec["grid"]) - 1, STORE_DTYPES[spec["dtype"]]

    def size(n: int) -> int:
        return shard_bytes(n, steps, spec["shape"], store, spec["cond_shape"])

    todo_names = {name for name, _, _ in job.todo}
    kept = sum(
        sum(s["bytes"].values())
        for s in job.manifest["shards"]
        if s["name"] not in todo_names and s["start"] < t.num_samples
    )
    job.bytes_todo = sum(size(count) for _, _, count in job.todo)
    job.bytes_total = kept + job.bytes_todo
    try:
        job.bytes_free = shutil.disk_usage(job.root).free
    except OSError:
        job.bytes_free = None
    if job.bytes_free is not None and job.bytes_todo > job.bytes_free and not force:
        raise BadInput(
            f"{shown(job.root)}: the teacher cache needs {sized(job.bytes_todo)} more but its disk has "
            f"{sized(job.bytes_free)} free; free space, use another teacher.cache, lower teacher.num_samples "
            "or raise teacher.store_every, or pass --force (sdistill teacher) to start anyway"
        )


def _prepare(
    recipe: Recipe,
    model: Denoiser | None,
    overwrite: bool,
    verify: bool,
    progress_factory: Callable[[int, str], Any] | None,
    force: bool,
) -> TeacherJob:
    """Open (or create) the recipe's cache and plan the shards left to write. `model`: the recipe's model
    already resolved by the caller (else resolved here on teacher.device in teacher.compute_dtype). `verify`:
    also check the CRC-32 of every finished shard (`sdistill teacher` does; readers check what they map).

    The cache's writer lock is taken before anything in the folder changes and kept by the job while it has
    something to write. Another live writer (or a folder that cannot be written) makes this BadInput naming the
    lock and its owner (or the folder and the reason), unless nothing is left to write: then the job only reads,
    which is safe while another run adds shards. `progress_factory(total, label)`: progress while finished shards
    are checked."""
    t = recipe.teacher
    root = recipe.cache_dir()
    make_cache_folder(root)
    # Without the lock (another live writer, or a folder we cannot write, e.g. a read-only copy) the job may
    # still read a cache that has everything it needs; anything to write re-raises why it could not lock.
    held: LockHeld | CacheUnwritable | None = None
    lock: CacheLock | None = None
    try:
        lock = CacheLock.acquire(root)
    except (LockHeld, CacheUnwritable) as e:
        if overwrite:
            raise
        held = e
    try:
        if model is None:
            from ..pipeline import recipe_model  # (the pipeline imports this module)

            model = recipe_model(recipe, t.device)
        spec = teacher_spec(recipe, model)
        manifest = None if overwrite else read_manifest(root)
        if manifest is not None:
            diffs = spec_differences(manifest["spec"], spec)
            if diffs:
                raise BadInput(
                    f"{shown(root)}: the cache was made with another spec; differs in: {', '.join(diffs)}. "
                    "Use another teacher.cache folder, or --overwrite to replace it"
                )
        if held is not None and manifest is None:
            raise held
        try:
            if manifest is None:
                if overwrite:
                    _clear_cache(root)
                manifest = {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "version": __version__,
                    "spec": spec,
                    "shards": [],
                }
                write_json_atomic(root / "manifest.json", manifest)
            if lock is not None:  # only the lock holder may touch another run's leftovers
                for leftover in root.glob("shard-*.tmp"):  # a shard in progress when a previous run died
                    shutil.rmtree(leftover)
        except OSError as e:
            raise BadInput(f"{shown(e.filename or root)}: cannot write the teacher cache: {reason(e)}") from None
        finished = [shard for shard in manifest["shards"] if shard["status"] == "ok"]
        # Checksums of a large cache take minutes of reading: shown as progress (`progress_factory(total, label)`).
        what = "checking the finished shards" + (" (CRC-32 of every file)" if verify else "")
        with (progress_factory or (lambda n, label: contextlib.nullcontext(lambda k=1: None)))(
            len(finished), what
        ) as bar:
            for shard in finished:
                if shard_problem(root, shard, spec, checksums=verify):
                    shard["status"] = "bad"
                bar(1)
        todo = plan_shards(manifest, t.num_samples, t.shard_size)
        if held is not None and todo:
            raise held
        job = TeacherJob(
            recipe, model, spec, root, manifest, todo, lock if todo else None, grid=plan_grid(recipe, model)
        )
        _size_check(job, force)
        if not todo and lock is not None:
            lock.release()
        return job
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def run_teacher(
    recipe: Recipe,
    overwrite: bool = False,
    progress: Callable[..., Any] | None = None,
    write: bool = True,
    model: Denoiser | None = None,
    verify: bool = False,
) -> TeacherReport:
    """`sdistill teacher`: fill the recipe's cache, resuming where a previous run stopped."""
    return prepare_teacher(recipe, model, overwrite, verify).run(progress, write)


def _check_finite(x: torch.Tensor, den: torch.Tensor, store: type, seeds: Sequence[int], recipe: Recipe) -> None:
    """Refuse to cache states or denoiser outputs that are not finite in the storage dtype (they would poison
    every student trained on them)."""
    limit = float(np.finfo(store).max)
    for name, a in (("states", x), ("denoiser outputs", den)):
        if not bool(torch.isfinite(a).all()) or bool((a.abs() > limit).any()):
            t = recipe.teacher
            tries = [
                f"teacher.{k} {v}"
                for k, v, now in (
                    ("precision", "fp32", t.precision),
                    ("compute_dtype", "float64", t.compute_dtype),
                    ("dtype", "float32", t.dtype),
                )
                if now != v
            ]
            raise RunFailed(
                f"the teacher's {name} for seeds {seeds[0]}..{seeds[-1]} are not finite in teacher.dtype {t.dtype} "
                f"(teacher.precision {t.precision}, compute_dtype {t.compute_dtype}); nothing of this shard was "
                f"recorded{'. Try ' + ' or '.join(tries) if tries else ''}"
            )


def _integrate(job: TeacherJob, progress: Callable[..., Any] | None, write: bool) -> TeacherReport:
    """Integrate the planned shards. One process does them in order; under torchrun the shards go round-robin
    to the ranks in rounds, and after each round rank 0 records the round's finished shards in the manifest
    (a killed run loses at most the round in progress). Each shard is integrated in the same batches whatever
    the world size, so the shards are bit for bit those of one process."""
    t, model, spec, root, manifest = job.recipe.teacher, job.model, job.spec, job.root, job.manifest
    grid = job.grid if job.grid is not None else plan_grid(job.recipe, model)
    keep = stored_points(t.steps, t.store_every)
    steps = len(keep) - 1
    store = STORE_DTYPES[t.dtype]
    rank, size = distributed.rank_size()
    lock = threading.Lock()

    def commit(entries: list[dict]) -> None:
        if not entries or not distributed.is_main():
            return
        with lock:
            names = {e["name"] for e in entries}
            manifest["shards"] = [s for s in manifest["shards"] if s["name"] not in names] + entries
            manifest["shards"].sort(key=lambda s: s["start"])
            try:
                write_json_atomic(root / "manifest.json", manifest)
            except OSError as e:
                raise BadInput(
                    f"{shown(root / 'manifest.json')}: cannot write: {reason(e)}; finished shards on disk are "
                    "redone by the next run"
                ) from None

    generated, start_time = 0, time.time()
    writer = BackgroundWriter() if write else None
    shards: list[ShardWriter] = []  # every shard started, so a failure can remove the unfinished ones
    rounds = [job.todo[r : r + size] for r in range(0, len(job.todo), size)]
    try:
        for work in rounds:
            finished: list[dict] = []
            mine = work[rank : rank + 1]  # this rank's shard of the round (none in a short last round)
            for name, start, count in mine:
                shard = None
                if write:
                    shard = ShardWriter(
                        root, name, start, count, steps, model.shape, store, spec["grid"], spec["cond_shape"]
                    )
                    shards.append(shard)
                for b0 in range(start, start + count, t.batch):
                    seeds = list(range(t.seed + b0, t.seed + min(b0 + t.batch, start + count)))
                    z = initial_noise(seeds, model.shape, model.dtype, model.device)
                    cond = draw_cond(model, seeds)
                    x, den = integrate_batch(model, spec["solver"], grid, z, cond)
                    x, den = x[:, keep], den[:, keep]  # teacher.store_every: the stored sub-grid
                    _check_finite(x, den, store, seeds, job.recipe)
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
                    if progress and size == 1:
                        progress(len(seeds))
                if writer:
                    if size == 1:
                        writer.submit(lambda s=shard: commit([s.finish()]))
                    else:
                        writer.submit(lambda s=shard, f=finished: f.append(s.finish()))
            if size > 1:
                if writer:
                    writer.wait()  # this rank's shard is on disk (or its error raised here)
                commit([e for got in distributed.gather_objects(finished) for e in got])
                if progress:
                    progress(sum(count for _, _, count in work))
        if writer:
            done, writer = writer, None
            done.close()  # the last shard's errors surface here, still inside this try
    except BaseException:
        if writer:
            try:
                writer.close()  # let queued writes of earlier shards land; their commits are already queued
            except BaseException:  # the first error is the one to report
                writer.abandon()
            writer = None
        for shard in shards:
            shard.abort()  # no-op for finished shards; removes the .tmp of the others
        raise
    generated = int(distributed.all_sum(torch.tensor(float(generated))).item())
    nfe = t.steps * get_solver(spec["solver"]).calls_per_step + 1
    return TeacherReport(root, t.num_samples, generated, t.num_samples - generated, time.time() - start_time, nfe)
