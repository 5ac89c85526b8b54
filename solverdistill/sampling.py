"""The sampling loop: seeds -> initial noise -> solver -> samples, batch after batch (like EDM's generate.py).

Seeds are per sample: sample `seed` always starts from the same noise, whatever the batch size or process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from . import grids, solvers
from .errors import BadInput


class CountingDenoiser:
    """Counts denoiser calls per sample (NFE) around any denoiser; forwards everything else."""

    def __init__(self, model, _cell=None):
        self.model = model
        self._cell = _cell if _cell is not None else [0]

    @property
    def calls(self) -> int:
        return self._cell[0]

    def with_model(self, other) -> "CountingDenoiser":
        """The same counter around another denoiser (a student that carries its own fine-tuned network)."""
        return CountingDenoiser(other, self._cell)

    def __call__(self, x, sigma, cond=None):
        self._cell[0] += 1
        return self.model(x, sigma, cond)

    def __getattr__(self, name):
        return getattr(self.model, name)


def initial_noise(seeds: Iterable[int], shape: tuple[int, ...], dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Standard-normal noise, one CPU generator per seed (drawn in float32, then cast), so it never depends
    on batch size, device or dtype."""
    zs = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32) for s in seeds]
    return torch.stack(zs).to(device=device, dtype=dtype)


@dataclass
class Plan:
    """A handcrafted solver, its grid and options, resolved from (solver, NFE, schedule, AFS)."""

    info: solvers.SolverInfo
    nfe: int
    afs: bool
    sigmas: torch.Tensor
    options: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def solve(self, model, x, cond=None, callback=None):
        return self.info.solve(model, x, self.sigmas, cond=cond, afs=self.afs, callback=callback, **self.options)

    def describe(self) -> dict:
        return {"solver": self.info.name, "nfe": self.nfe, "afs": self.afs, "steps": self.steps,
                "grid": self.sigmas.tolist(), **self.options}


def plan(solver: str, nfe: int, sigma_min: float, sigma_max: float, schedule: str | None = None,
         afs: bool = False, **options) -> Plan:
    info = solvers.get(solver)
    steps = info.steps_for(nfe, afs)
    sigmas = grids.make_grid(schedule or info.default_schedule, steps, sigma_min, sigma_max)
    return Plan(info, nfe, afs, sigmas, {k: v for k, v in options.items() if k in info.options})


def resolve_device(device: str | None) -> torch.device:
    device = (device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput("--device: cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise BadInput(f"--device: expected auto, cpu or cuda[:N], got {device!r}")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise BadInput(f"--dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass
class Result:
    x: torch.Tensor
    z: torch.Tensor
    seeds: list[int]
    nfe: int
    network_passes: int
    trajectories: list | None = None


def generate(model, solve: Callable, seeds: list[int], batch: int = 64, sigma_max: float | None = None,
             cond_for: Callable | None = None, callback: Callable | None = None, progress=None) -> Result:
    """Run `solve(model, x, cond, callback)` over `seeds` in batches; returns samples, noise and NFE per sample.

    `progress(n_done)` is called after each batch; `callback(batch_seeds, info)` sees every step.
    """
    if batch < 1:
        raise BadInput(f"--batch: must be >= 1, got {batch}")
    counter = CountingDenoiser(model)
    cond_for = cond_for or getattr(model, "draw_cond", None)  # e.g. class labels drawn per seed
    sigma_max = float(sigma_max if sigma_max is not None else model.sigma_max)
    xs, zs = [], []
    calls_per_sample = None
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        z = initial_noise(chunk, model.shape, model.dtype, model.device)
        cond = cond_for(chunk) if cond_for else None
        before = counter.calls
        step_cb = (lambda info, _c=chunk: callback(_c, info)) if callback else None
        with torch.no_grad():
            x = solve(counter, z * sigma_max, cond, step_cb)
        calls = counter.calls - before
        if calls_per_sample is not None and calls != calls_per_sample:
            raise RuntimeError("solver made a different number of calls on different batches")
        calls_per_sample = calls
        xs.append(x.cpu())
        zs.append(z.cpu())
        if progress:
            progress(len(chunk))
    nfe = calls_per_sample or 0
    return Result(torch.cat(xs), torch.cat(zs), list(seeds), nfe, nfe * int(getattr(model, "passes_per_call", 1)))
