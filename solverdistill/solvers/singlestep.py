"""Two-call-per-step solvers (algorithms.md section 3), written out like k-diffusion's sampling.py.
The grid ends at sigma_min, so every step takes its second evaluation (no final Euler step)."""

from __future__ import annotations

import math

from .common import call, denoise, report


def sample_heun(model, x, sigmas, *, cond=None, afs=False, callback=None):
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


def sample_dpm2(model, x, sigmas, *, cond=None, afs=False, callback=None):
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
