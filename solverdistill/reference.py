"""Accurate reference solutions of the probability-flow ODE, for measuring solvers.

Classic RK4 in log sigma: dx/dlog(sigma) = x - D(x, sigma). A one-step method keeps its full order from the
first step (a multistep method started at first order does not), so its error shrinks as steps^-4.
"""

from __future__ import annotations

import math

import torch

from .solvers.common import call


def rk4_logsigma(model, x: torch.Tensor, sigma_max: float, sigma_min: float, steps: int = 1024, cond=None,
                 callback=None) -> torch.Tensor:
    """Integrate from sigma_max to sigma_min with `steps` equal steps in log sigma (4 calls per step)."""
    u0, u1 = math.log(sigma_max), math.log(sigma_min)
    h = (u1 - u0) / steps

    def f(x, u):
        return x - call(model, x, math.exp(u), cond)

    for i in range(steps):
        u = u0 + i * h
        k1 = f(x, u)
        k2 = f(x + h / 2 * k1, u + h / 2)
        k3 = f(x + h / 2 * k2, u + h / 2)
        k4 = f(x + h * k3, u + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if callback is not None:
            callback(i, x)
    return x
