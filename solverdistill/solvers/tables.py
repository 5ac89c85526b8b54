"""The handcrafted multistep solvers as coefficient tables (docs/solvers.md), built once per grid in float64.

Each builder reads a grid and returns the `Table` of the update in `multistep.py`; none of them runs a loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import BadInput
from ..grids import VPTime
from .multistep import Table

# Adams-Bashforth weights on equal steps, orders 1-4, newest first: iPNDM uses them on d, and DLMS's "plms"
# initial rule on D (docs/solvers.md "iPNDM").
ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def _steps(sigmas: torch.Tensor | Sequence[float]) -> np.ndarray:
    return np.asarray(sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas, dtype=np.float64)


def _order(i: int, n: int, max_order: int, lower_order_final: bool) -> int:
    return min(max_order, i + 1, n - i) if lower_order_final else min(max_order, i + 1)


def euler_table(sigmas: torch.Tensor | Sequence[float]) -> Table:
    """x' = x + (s' - s) d."""
    s = _steps(sigmas)
    t = Table.empty(len(s) - 1, 1)
    t.a[:] = 1.0
    t.c[:, 0] = s[1:] - s[:-1]
    return t


def dpmpp_table(sigmas: torch.Tensor | Sequence[float], max_order: int = 3, lower_order_final: bool = True) -> Table:
    """DPM-Solver++(2M/3M), data prediction, with phi1 = expm1(-h) (Lu et al. 2022; docs/solvers.md)."""
    s = _steps(sigmas)
    lam = -np.log(s)
    n = len(s) - 1
    t = Table.empty(n, 3)
    for i in range(n):
        h = lam[i + 1] - lam[i]
        phi1 = math.expm1(-h)  # the exponential integrator's first-order weight
        t.a[i] = s[i + 1] / s[i]
        order = _order(i, n, max_order, lower_order_final)
        if order == 1:  # DPM-Solver++(1), i.e. DDIM
            t.b[i, 0] = -phi1
        elif order == 2:  # 2M: D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1} / h_i (as k-diffusion writes it)
            r = (lam[i] - lam[i - 1]) / h
            t.b[i, :2] = -phi1 * (1 + 1 / (2 * r)), phi1 / (2 * r)
        else:  # 3M: first and second divided differences of D in lambda, newest first
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d1_0 = np.array([1.0, -1.0, 0.0]) / r0
            d1_1 = np.array([0.0, 1.0, -1.0]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi2 = phi1 / h + 1
            phi3 = phi2 / h - 0.5
            t.b[i] = -phi1 * np.array([1.0, 0.0, 0.0]) + phi2 * d1 - phi3 * d2
    return t


def unipc_table(sigmas: torch.Tensor | Sequence[float], max_order: int = 3, lower_order_final: bool = True) -> Table:
    """UniPC with B(h) = expm1(-h) ("bh2"), data prediction. Step i predicts x_{i+1} with UniP-p from p past
    outputs; the evaluation at x_{i+1} then corrects it (UniC-p) before step i+1 uses it. No corrector after
    the last step, so NFE = steps."""
    s = _steps(sigmas)
    lam = -np.log(s)
    n = len(s) - 1
    P = max_order
    t = Table.empty(n, P, corrector=True)
    for i in range(n):
        h = lam[i + 1] - lam[i]
        hh = -h
        phi1 = math.expm1(hh)
        b_h = math.expm1(hh)
        order = _order(i, n, max_order, lower_order_final)
        # Differences D1_k = (m_k - m_0) / r_k over the history, m_k k steps back; r_k in units of h.
        rks, d1s = [], []
        for k in range(1, order):
            rk = (lam[i - k] - lam[i]) / h
            vec = np.zeros(P + 1)  # over [m_new, m_0, m_1, ...]: slot 0 is the corrector's new evaluation
            vec[1 + k], vec[1] = 1.0 / rk, -1.0 / rk
            rks.append(rk)
            d1s.append(vec)
        rks.append(1.0)
        rks = np.array(rks)
        R = np.stack([rks ** (k - 1) for k in range(1, order + 1)])
        bvec, h_phi_k, fact = [], phi1 / hh - 1, 1
        for k in range(1, order + 1):
            bvec.append(h_phi_k * fact / b_h)
            fact *= k + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        bvec = np.array(bvec)
        base = np.zeros(P + 1)
        base[1] = -phi1
        pred = base.copy()
        if order == 2:
            pred -= b_h * 0.5 * d1s[0]
        elif order > 2:
            rhos_p = np.linalg.solve(R[:-1, :-1], bvec[:-1])
            pred -= b_h * sum(r * v for r, v in zip(rhos_p, d1s))
        t.a[i] = s[i + 1] / s[i]
        t.b[i] = pred[1:]
        if i + 1 < n:  # corrector for x_{i+1}, applied once D at the predicted x_{i+1} is known
            rhos_c = np.array([0.5]) if order == 1 else np.linalg.solve(R, bvec)
            new = np.zeros(P + 1)
            new[0], new[1] = 1.0, -1.0  # D1_t = m_new - m_0
            corr = base - b_h * (sum(r * v for r, v in zip(rhos_c[:-1], d1s)) + rhos_c[-1] * new)
            t.corrector[i + 1] = corr
    return t


def ipndm_table(sigmas: torch.Tensor | Sequence[float], max_order: int = 4) -> Table:
    """iPNDM: Adams-Bashforth on d with the fixed equal-step coefficients, warm-up orders 1, 2, 3."""
    s = _steps(sigmas)
    n = len(s) - 1
    t = Table.empty(n, max_order)
    t.a[:] = 1.0
    for i in range(n):
        coeffs = ADAMS_BASHFORTH[min(max_order, i + 1) - 1]
        t.c[i, : len(coeffs)] = (s[i + 1] - s[i]) * np.array(coeffs)
    return t


def deis_table(
    sigmas: torch.Tensor | Sequence[float],
    order: int = 3,
    quad_points: int = 64,
    vp_ends: tuple[float, float] | None = None,
    riemann: int = 0,
) -> Table:
    """DEIS tAB-`order` (Zhang and Chen 2023): extrapolate d as a polynomial of degree `order` in the VP time tau
    through the last `order` + 1 nodes (tAB3, the default: cubic through four) and integrate dsigma/dtau times it
    over the step. By parts, C_j = [sigma L_j] - int sigma L_j' dtau, which keeps the Gauss-Legendre quadrature
    smooth near tau_min (sigma ~ sqrt(tau) there) and makes order 0 exactly Euler.

    The diff-sampler protocol computes the coefficients as zju-pi/diff-sampler does instead: tau from the fixed
    EDM range `vp_ends` = (0.002, 80) whatever the model's, and int dsigma/dtau L_j dtau as a plain sum over
    `riemann` equally spaced points of the step (ends included) times (tau_{i+1} - tau_i) / riemann."""
    if not 0 <= order <= 3:
        raise BadInput(f"--solver deis: order must be 0, 1, 2 or 3 (tAB0-tAB3), got {order}")
    s = _steps(sigmas)
    n = len(s) - 1
    vp = VPTime(*(vp_ends or (s[-1], s[0])))
    tau = vp.tau(torch.as_tensor(s)).numpy()
    if vp_ends is None:
        tau[0], tau[-1] = 1.0, vp.tau_min  # the grid's ends map exactly
    nodes, weights = np.polynomial.legendre.leggauss(quad_points)
    t = Table.empty(n, order + 1)
    t.a[:] = 1.0
    for i in range(n):
        k = min(order + 1, i + 1)  # nodes available: warm-up steps use fewer
        ts = tau[i - np.arange(k)]  # nodes, newest first
        lo, hi = tau[i], tau[i + 1]
        if riemann:
            q = np.linspace(lo, hi, riemann)
            slope = vp.dsigma_dtau(torch.as_tensor(q)).numpy()
        else:
            q = 0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)
            sig_q = vp.sigma(torch.as_tensor(q)).numpy()
        if riemann and k == 1:  # diff-sampler's first step is a plain Euler step, not a quadrature
            t.c[i, 0] = s[i + 1] - s[i]
            continue
        for j in range(k):
            others = np.delete(ts, j)
            basis = np.poly1d(np.poly(others)) / np.prod(ts[j] - others) if k > 1 else np.poly1d([1.0])
            if riemann:
                t.c[i, j] = np.sum(slope * basis(q)) * (hi - lo) / riemann
            else:
                boundary = s[i + 1] * basis(hi) - s[i] * basis(lo)
                t.c[i, j] = boundary - 0.5 * (hi - lo) * np.sum(weights * sig_q * basis.deriv()(q))
    return t
