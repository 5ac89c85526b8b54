"""The sampling loop: seeds -> initial noise -> solver -> samples, batch after batch (like EDM's generate.py).

Seeds are per sample: sample `seed` always starts from the same noise, whatever the batch size or process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import distributed
from .errors import BadInput
from .solvers.base import Solver, Step


class CountingDenoiser:
    """Counts denoiser calls per sample (NFE) around any denoiser; forwards everything else."""

    def __init__(self, model: Any, _cell: list[int] | None = None) -> None:
        self.model = model
        self._cell = _cell if _cell is not None else [0]

    @property
    def calls(self) -> int:
        return self._cell[0]

    def with_model(self, other: Any) -> CountingDenoiser:
        """The same counter around another denoiser (a student that carries its own fine-tuned network)."""
        return CountingDenoiser(other, self._cell)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self._cell[0] += 1
        return self.model(x, sigma, cond)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def initial_noise(
    seeds: Iterable[int],
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard-normal noise, one CPU generator per seed (drawn in float32, then cast), so it never depends
    on batch size, device or dtype."""
    zs = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32) for s in seeds]
    return torch.stack(zs).to(device=device, dtype=dtype)


@dataclass
class Result:
    x: torch.Tensor
    z: torch.Tensor
    seeds: list[int]
    nfe: int
    network_passes: int


def generate(
    model: Any,
    solver: Solver,
    seeds: list[int],
    batch: int = 64,
    cond_for: Optional[Callable] = None,
    callback: Optional[Callable[[list[int], Step], None]] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> Result:
    """Run `solver` from sigma_max * noise(seed) for every seed, in batches; returns samples, noise and the
    measured NFE per sample. `progress(n_done)` is called after each batch; `callback(batch_seeds, step)` sees
    every step. Under torchrun each rank runs its contiguous share of the seeds and every rank gets all samples
    back in seed order (per-seed noise makes them those of one process); the callback sees this rank's share."""
    if batch < 1:
        raise BadInput(f"--batch: must be >= 1, got {batch}")
    everyone = list(seeds)
    _, size = distributed.rank_size()
    seeds = distributed.shard(everyone)
    counter = CountingDenoiser(model)
    cond_for = cond_for or getattr(model, "draw_cond", None)  # e.g. class labels drawn per seed
    sigma_max = float(model.sigma_max)
    xs, zs = [], []
    calls_per_sample = None
    for start in range(0, len(seeds), batch):
        chunk = seeds[start : start + batch]
        z = initial_noise(chunk, model.shape, model.dtype, model.device)
        cond = cond_for(chunk) if cond_for else None
        before = counter.calls
        step_cb = (lambda step, _c=chunk: callback(_c, step)) if callback else None
        with torch.no_grad():
            x = solver.solve(counter, z * sigma_max, cond, step_cb)
        calls = counter.calls - before
        if calls_per_sample is not None and calls != calls_per_sample:
            raise RuntimeError("solver made a different number of calls on different batches")
        calls_per_sample = calls
        xs.append(x.cpu())
        zs.append(z.cpu())
        if progress:
            progress(len(chunk) * len(everyone) / len(seeds))  # rank 0's bar stands for every rank's share
    if size > 1:
        counts = {c for c in distributed.gather_objects(calls_per_sample) if c is not None}
        if len(counts) > 1:
            raise RuntimeError("solver made a different number of calls on different ranks")
        calls_per_sample = counts.pop() if counts else None
        empty = torch.empty((0, *model.shape))
        xs = [distributed.gather_rows(torch.cat(xs) if xs else empty.to(dtype=model.dtype))]
        zs = [distributed.gather_rows(torch.cat(zs) if zs else empty.to(dtype=model.dtype))]
    nfe = calls_per_sample or 0
    return Result(torch.cat(xs), torch.cat(zs), everyone, nfe, nfe * int(getattr(model, "passes_per_call", 1)))


NFE_WARN = 1000  # few-step solvers live far below this; above it a run is almost surely a typo


def nfe_notes(nfes: Iterable[int], flag: str = "--nfe") -> list[str]:
    """A warning for every NFE above NFE_WARN: such a run makes that many network calls per sample."""
    return [
        f"warning: {flag} {n} is far above the few-step range (more than {NFE_WARN} denoiser calls per sample); "
        "this can run for a very long time"
        for n in nfes
        if n > NFE_WARN
    ]
