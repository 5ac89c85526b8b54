"""One-step solvers, written out like k-diffusion's sampling.py (docs/solvers.md): Heun and DPM-Solver-2 (two
calls per step), and RK4 in log sigma, the accurate reference that `compare --model` measures against.

The grid ends at sigma_min, so every two-call step takes its second evaluation (no final Euler step).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import Callback, call, denoise, report


def sample_heun(
    model: Any,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: torch.Tensor | None = None,
    afs: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun's 2nd-order method (EDM): Euler predictor, trapezoidal corrector."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoise(model, x, s[i], cond, afs and i == 0)
        report(callback, i, s[i], s[i + 1], x, denoised)
        d = (x - denoised) / s[i]
        x_pred = x + (s[i + 1] - s[i]) * d
        d_pred = (x_pred - call(model, x_pred, s[i + 1], cond)) / s[i + 1]
        x = x + (s[i + 1] - s[i]) * (d + d_pred) / 2
    return x


def sample_dpm2(
    model: Any,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: torch.Tensor | None = None,
    afs: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver-2: a half step to the log-sigma midpoint, then the full step with the midpoint direction."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoise(model, x, s[i], cond, afs and i == 0)
        report(callback, i, s[i], s[i + 1], x, denoised)
        d = (x - denoised) / s[i]
        s_mid = math.sqrt(s[i] * s[i + 1])
        x_mid = x + (s_mid - s[i]) * d
        d_mid = (x_mid - call(model, x_mid, s_mid, cond)) / s_mid
        x = x + (s[i + 1] - s[i]) * d_mid
    return x


def rk4_logsigma(
    model: Any,
    x: torch.Tensor,
    sigma_max: float,
    sigma_min: float,
    steps: int = 1024,
    cond: torch.Tensor | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Classic RK4 on dx/du = x - D(x, e^u), u = log sigma, `steps` equal steps (4 calls each). A one-step method
    keeps its full order from the first step (a multistep one starts at first order): error ~ steps^-4."""
    u0, u1 = math.log(sigma_max), math.log(sigma_min)
    h = (u1 - u0) / steps

    def f(x: torch.Tensor, u: float) -> torch.Tensor:
        return x - call(model, x, math.exp(u), cond)

    for i in range(steps):
        u = u0 + i * h
        k1 = f(x, u)
        report(callback, i, math.exp(u), math.exp(u + h), x, x - k1)
        k2 = f(x + h / 2 * k1, u + h / 2)
        k3 = f(x + h / 2 * k2, u + h / 2)
        k4 = f(x + h * k3, u + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


class RK4Reference:
    """RK4 in log sigma from the model's sigma_max to its sigma_min: a `Solver`, used as the accurate reference."""

    afs = False

    def __init__(self, model: Any, steps: int = 256) -> None:
        self.sigma_max, self.sigma_min, self.steps = float(model.sigma_max), float(model.sigma_min), steps
        self.nfe = 4 * steps
        self.network_passes = self.nfe * int(getattr(model, "passes_per_call", 1))

    def solve(
        self, model: Any, x: torch.Tensor, cond: torch.Tensor | None = None, callback: Callback | None = None
    ) -> torch.Tensor:
        return rk4_logsigma(model, x, self.sigma_max, self.sigma_min, self.steps, cond=cond, callback=callback)

    def describe(self) -> dict:
        return {"solver": "rk4-logsigma", "nfe": self.nfe, "afs": False, "steps": self.steps}
