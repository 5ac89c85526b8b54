"""Endpoint error against an accurate reference (algorithms.md section 7): RMSE and PSNR per solver and NFE."""

from __future__ import annotations

import math

import torch

from .reference import rk4_logsigma
from .sampling import generate, plan


def reference_endpoints(model, seeds: list[int], steps: int = 256, batch: int = 250, progress=None) -> torch.Tensor:
    """RK4 in log sigma, float64, from the same per-seed noise the samplers use."""
    model = model.to(dtype=torch.float64)
    solve = lambda m, x, c, cb: rk4_logsigma(m, x, model.sigma_max, model.sigma_min, steps, cond=c)
    return generate(model, solve, seeds, batch=batch, progress=progress).x


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Root mean square error over all elements of all samples."""
    return (x.double() - ref.double()).pow(2).mean().sqrt().item()


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR for data in [-1, 1] (peak-to-peak 2)."""
    return 20 * math.log10(data_range / max(rmse(x, ref), 1e-300))


def solver_endpoints(model, solver: str, nfe: int, seeds: list[int], *, schedule=None, afs=False, batch=250,
                     **options) -> torch.Tensor:
    p = plan(solver, nfe, model.sigma_min, model.sigma_max, schedule, afs, **options)
    return generate(model, lambda m, x, c, cb: p.solve(m, x, c, cb), seeds, batch=batch).x
