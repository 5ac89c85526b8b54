"""Pieces every sampler shares: sigma as a [B] tensor, the analytical first step, and the step callback."""

from __future__ import annotations

import math

import torch


def call(model, x: torch.Tensor, sigma: float, cond=None) -> torch.Tensor:
    """One denoiser call at a scalar sigma; the seam wants sigma as a tensor of shape [B]."""
    return model(x, torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device), cond)


def afs_denoised(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Analytical first step (algorithms.md section 4): d = x / sqrt(1 + sigma^2), i.e. D = x - sigma d.
    Needs no network call; exact when the data are a single point at the origin with unit-ish scale."""
    return x - sigma * x / math.sqrt(1.0 + sigma * sigma)


def denoise(model, x, sigma, cond, afs_now: bool) -> torch.Tensor:
    return afs_denoised(x, sigma) if afs_now else call(model, x, sigma, cond)


def report(callback, i: int, sigma: float, sigma_next: float, x: torch.Tensor, denoised: torch.Tensor) -> None:
    """The per-step callback, k-diffusion style: the state at sigma_i and the denoiser output there."""
    if callback is not None:
        callback({"i": i, "sigma": sigma, "sigma_next": sigma_next, "x": x, "denoised": denoised})
