"""What every solver is: the `Solver` protocol, the per-step `Step` payload, and the first step all loops share."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import torch

Sigma = float | torch.Tensor  # one time for the whole batch, or a [B] tensor (learned per-sample grids)


@dataclass
class Step:
    """What a solver reports once per step, before it moves x (docs/extending.md "The callback").

    `sigma` and `sigma_next` are always float64 tensors of shape [B] on x's device, one value per sample, whether
    the solver's grid is shared (handcrafted) or per sample (DLMS). `denoised` is D(x, sigma), or the AFS estimate
    on an analytical first step.
    """

    i: int
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    x: torch.Tensor
    denoised: torch.Tensor


Callback = Callable[[Step], None]


@runtime_checkable
class Solver(Protocol):
    """A ready-to-run sampler: a handcrafted plan, or a student loaded from its artifact (docs/extending.md).

    `nfe` counts denoiser calls per sample, `network_passes` network evaluations per sample (2 per call with
    classifier-free guidance), `afs` whether the first call is the analytical one. `solve` integrates from x at
    the solver's first sigma to its last and returns the final state.
    """

    nfe: int
    afs: bool

    @property
    def network_passes(self) -> int: ...

    def describe(self) -> dict: ...

    def solve(
        self, model: Any, x: torch.Tensor, cond: torch.Tensor | None = None, callback: Optional[Callback] = None
    ) -> torch.Tensor: ...


def per_sample(v: Sigma, x: torch.Tensor) -> Sigma:
    """A float as it is, a [B] tensor shaped to broadcast against x (and in x's dtype)."""
    if isinstance(v, torch.Tensor):
        return v.to(x.dtype).view((x.shape[0],) + (1,) * (x.ndim - 1))
    return v


def call(model: Any, x: torch.Tensor, sigma: Sigma, cond: torch.Tensor | None = None) -> torch.Tensor:
    """One denoiser call; the model seam wants sigma as a tensor of shape [B] (docs/conventions.md)."""
    if isinstance(sigma, torch.Tensor):
        return model(x, sigma.to(x.dtype), cond)
    return model(x, torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device), cond)


def afs_denoised(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Analytical first step (docs/conventions.md "Analytical first step"): d = x / sqrt(1 + sigma^2), so
    D = x - sigma d. No network call; exact when the data are one point at the origin."""
    return x - sigma * x / math.sqrt(1.0 + sigma * sigma)


def denoise(model: Any, x: torch.Tensor, sigma: float, cond: torch.Tensor | None, afs_now: bool) -> torch.Tensor:
    """The denoiser output at (x, sigma): the AFS estimate on an analytical first step, else a real call."""
    return afs_denoised(x, sigma) if afs_now else call(model, x, sigma, cond)


def dynamic_threshold(denoised: torch.Tensor, quantile: float = 0.995, floor: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding of a data prediction (Saharia et al. 2022, "Imagen"): per sample, s is the `quantile`
    of |D| but at least `floor`; D is clipped to [-s, s] and divided by s. zju-pi/diff-sampler applies it to every
    D its DPM-Solver++ and UniPC read (docs/solvers.md "Protocols")."""
    flat = denoised.abs().reshape(denoised.shape[0], -1)
    s = torch.quantile(flat, quantile, dim=1).clamp(min=floor)
    s = s.view((-1,) + (1,) * (denoised.ndim - 1))
    return torch.maximum(torch.minimum(denoised, s), -s) / s


def _as_batch(v: Sigma, x: torch.Tensor) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().to(dtype=torch.float64).reshape(-1).expand(x.shape[0])
    return torch.full((x.shape[0],), float(v), dtype=torch.float64, device=x.device)


def report(
    callback: Optional[Callback], i: int, sigma: Sigma, sigma_next: Sigma, x: torch.Tensor, denoised: torch.Tensor
) -> None:
    """Send one `Step` to the callback (k-diffusion style: the state at sigma_i and the denoiser output there)."""
    if callback is not None:
        callback(Step(i, _as_batch(sigma, x), _as_batch(sigma_next, x), x, denoised))
