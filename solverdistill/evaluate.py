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


def acceleration_ratio(student_error: float, student_nfe: int, best_curve: dict[int, float]) -> float:
    """algorithms.md section 7: the smallest NFE m (log-log interpolated) at which the best handcrafted solver
    reaches the student's error, divided by the student's NFE. `best_curve` maps NFE -> best handcrafted error.
    Returns inf when no NFE in the curve reaches it (the ratio is then at least max(curve) / student_nfe)."""
    nfes = sorted(best_curve)
    for lo, hi in zip(nfes, nfes[1:]):
        e_lo, e_hi = best_curve[lo], best_curve[hi]
        if e_lo <= student_error:
            return lo / student_nfe
        if e_hi <= student_error:
            f = (math.log(e_lo) - math.log(student_error)) / (math.log(e_lo) - math.log(e_hi))
            return math.exp(math.log(lo) + f * (math.log(hi) - math.log(lo))) / student_nfe
    return nfes[0] / student_nfe if best_curve[nfes[0]] <= student_error else math.inf
