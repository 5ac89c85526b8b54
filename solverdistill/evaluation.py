"""Measuring solvers (docs/evaluation.md): endpoint RMSE and PSNR against accurate endpoints (a teacher cache's
held-out trajectories, or an RK4 solve), Frechet distances of sample sets, and the acceleration ratio.
The Frechet machinery itself (feature statistics, Inception) is in fid.py."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from .fid import FeatureStats, frechet_distance
from .generate import generate
from .solvers.base import Solver
from .solvers.singlestep import RK4Reference

if TYPE_CHECKING:
    from .models.base import Denoiser
    from .teacher.cache import TeacherCache


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Root mean square error over all elements of all samples."""
    return (x.double() - ref.double()).pow(2).mean().sqrt().item()


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR for data in [-1, 1] (peak-to-peak 2)."""
    return 20 * math.log10(data_range / max(rmse(x, ref), 1e-300))


def reference_endpoints(
    model: Denoiser,
    seeds: list[int],
    steps: int = 256,
    batch: int = 250,
    progress: Callable[..., Any] | None = None,
) -> torch.Tensor:
    """Accurate endpoints: RK4 in log sigma, float64, from the same per-seed noise the samplers use. Runs on a
    float64 copy: the caller's model keeps its dtype. `progress(n)` counts seeds, a fraction after every step (one
    batch of a slow model can take minutes)."""
    model = copy.deepcopy(model).to(dtype=torch.float64)
    tick = (lambda chunk, step: progress(len(chunk) / steps)) if progress else None
    return generate(model, RK4Reference(model, steps), seeds, batch=batch, callback=tick).x


def cache_endpoints(
    solver: Solver, model: Any, cache: TeacherCache, indices: np.ndarray | Sequence[int], batch: int = 256
) -> torch.Tensor:
    """`solver`'s endpoints from the cached noise (and conditioning) of these samples, float64 on the CPU."""
    outs = []
    with torch.no_grad():
        for b in range(0, len(indices), batch):
            outs.append(solver.solve(model, *cache.start(indices[b : b + batch], model)).double().cpu())
    return torch.cat(outs)


def heldout_rmse(
    solver: Solver, model: Any, cache: TeacherCache, indices: np.ndarray | Sequence[int], batch: int = 256
) -> float:
    """Endpoint RMSE of `solver` against the teacher on these cached samples."""
    return rmse(cache_endpoints(solver, model, cache, indices, batch), cache.endpoints(indices))


def sample_errors(
    solver: Solver, model: Any, cache: TeacherCache, indices: np.ndarray | Sequence[int], batch: int = 256
) -> torch.Tensor:
    """Each sample's endpoint RMS error against the teacher, float64 [n]. The RMSE over many seeds can rest on a
    few trajectories that end in another mode; the spread of these shows it (docs/evaluation.md "Tails")."""
    d = cache_endpoints(solver, model, cache, indices, batch) - cache.endpoints(indices).double()
    return d.pow(2).flatten(1).mean(1).sqrt()


def tail_share(errors: torch.Tensor, fraction: float = 0.02) -> float:
    """The share of the total squared error that the worst `fraction` of samples carry (at least one sample)."""
    sq = errors.double().pow(2).sort(descending=True).values
    return (sq[: max(1, round(fraction * len(sq)))].sum() / sq.sum().clamp_min(1e-300)).item()


def acceleration_ratio(student_error: float, student_nfe: int, best_curve: dict[int, float]) -> float:
    """The smallest NFE m (log-log interpolated) at which the best handcrafted solver reaches the student's error,
    divided by the student's NFE (docs/evaluation.md "Acceleration ratio"). `best_curve` maps NFE -> best
    handcrafted error. Returns inf when no NFE in the curve reaches it."""
    nfes = sorted(best_curve)
    for lo, hi in zip(nfes, nfes[1:]):
        e_lo, e_hi = best_curve[lo], best_curve[hi]
        if e_lo <= student_error:
            return lo / student_nfe
        if e_hi <= student_error:
            f = (math.log(e_lo) - math.log(student_error)) / (math.log(e_lo) - math.log(e_hi))
            return math.exp(math.log(lo) + f * (math.log(hi) - math.log(lo))) / student_nfe
    return nfes[0] / student_nfe if best_curve[nfes[0]] <= student_error else math.inf


def pixel_stats(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of samples flattened to vectors (float64)."""
    s = FeatureStats()
    s.update(x.flatten(1))
    return s.mean(), s.cov()


def pixel_fd(x: torch.Tensor, ref_stats: tuple[np.ndarray, np.ndarray]) -> float:
    """Frechet distance of samples to reference moments, in pixel space."""
    return frechet_distance(*pixel_stats(x), *ref_stats)


def inception_fd(x: torch.Tensor, ref: torch.Tensor, inception: Optional[str] = None, batch: int = 64) -> float:
    """FID between two sets of [-1, 1] images through the Inception network (legacy_tensorflow mode)."""
    from .fid import InceptionFeatures, inception_path
    from .images import to_uint8_nchw

    net = InceptionFeatures(inception_path(inception))
    a, b = FeatureStats(), FeatureStats()
    for part in x.split(batch):
        a.update(net(to_uint8_nchw(part)))
    for part in ref.split(batch):
        b.update(net(to_uint8_nchw(part)))
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())
