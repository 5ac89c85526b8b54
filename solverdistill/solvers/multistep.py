"""The linear multistep family, implemented once (algorithms.md section 3).

Every multistep solver is a table of per-step coefficients for

    x_{i+1} = a_i x_i + sum_j b_ij D_{i-j} + sum_j c_ij d_{i-j}          (j = 0 is the newest)

over the history of denoiser outputs D and directions d = (x - D) / sigma, plus, for UniPC, a corrector
that refines x_i once D_i (evaluated at the predicted x_i) is known:

    x_i <- a_{i-1} x_{i-1} + sum_j e_ij D_{i-j}

Each solver below only builds its table from the grid (once per grid, in float64); `sample_multistep` is the
one loop that runs them all. Learned students (D-ODE, DLMS) reuse the same loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..grids import VPTime
from .common import denoise, report


@dataclass
class Table:
    a: np.ndarray                      # [N]      weight on the current state
    b: np.ndarray                      # [N, P]   weights on D history, newest first
    c: np.ndarray                      # [N, P]   weights on d history, newest first
    corrector: np.ndarray | None = None  # [N, P+1] weights e_ij on D when refining x_i (row 0 unused)

    @classmethod
    def empty(cls, n: int, p: int, corrector: bool = False) -> "Table":
        return cls(np.zeros(n), np.zeros((n, p)), np.zeros((n, p)), np.zeros((n, p + 1)) if corrector else None)


def _combine(weights, history, out=None):
    """out (+)= sum_j w_j h_j, accumulated in place: one allocation at most (this runs every step)."""
    for w, h in zip(weights, history):
        if w != 0.0:
            out = w * h if out is None else out.add_(h, alpha=w)
    return out


def sample_multistep(model, x, sigmas, table: Table, *, cond=None, afs=False, callback=None):
    s = sigmas.tolist()
    n, p = table.b.shape
    # Plain Python floats: numpy scalars times torch tensors would take the slow (or wrong) path.
    a, b, c = table.a.tolist(), table.b.tolist(), table.c.tolist()
    e = table.corrector.tolist() if table.corrector is not None else None
    uses_d = bool(np.any(table.c))
    hist_D, hist_d = [], []
    x_prev = None
    for i in range(n):
        denoised = denoise(model, x, s[i], cond, afs and i == 0)
        hist_D = [denoised] + hist_D[: p]
        if uses_d:
            hist_d = [(x - denoised) / s[i]] + hist_d[: p - 1]
        if e is not None and i > 0 and any(e[i]):
            x = _combine(e[i], hist_D, a[i - 1] * x_prev)
        report(callback, i, s[i], s[i + 1], x, denoised)
        x_prev = x
        x = _combine(c[i], hist_d, _combine(b[i], hist_D, a[i] * x))
    return x


def _steps(sigmas) -> np.ndarray:
    return np.asarray(sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas, dtype=np.float64)


def _order(i: int, n: int, max_order: int, lower_order_final: bool) -> int:
    return min(max_order, i + 1, n - i) if lower_order_final else min(max_order, i + 1)


def euler_table(sigmas) -> Table:
    """x' = x + (s' - s) d."""
    s = _steps(sigmas)
    t = Table.empty(len(s) - 1, 1)
    t.a[:] = 1.0
    t.c[:, 0] = s[1:] - s[:-1]
    return t


def dpmpp_table(sigmas, max_order: int = 3, lower_order_final: bool = True) -> Table:
    """DPM-Solver++(2M/3M), data prediction, with phi1 = expm1(-h) (algorithms.md section 3)."""
    s = _steps(sigmas)
    lam = -np.log(s)
    n = len(s) - 1
    t = Table.empty(n, 3)
    for i in range(n):
        h = lam[i + 1] - lam[i]
        phi1 = math.expm1(-h)
        t.a[i] = s[i + 1] / s[i]
        m0 = np.array([1.0, 0.0, 0.0])
        order = _order(i, n, max_order, lower_order_final)
        coef = -phi1 * m0
        if order >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = np.array([1.0, -1.0, 0.0]) / r0
        if order == 2:
            coef = coef - phi1 / 2 * d1_0
        elif order == 3:
            r1 = (lam[i - 1] - lam[i - 2]) / h
            d1_1 = np.array([0.0, 1.0, -1.0]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi2 = phi1 / h + 1
            phi3 = phi2 / h - 0.5
            coef = coef + phi2 * d1 - phi3 * d2
        t.b[i] = coef
    return t


def unipc_table(sigmas, max_order: int = 3, lower_order_final: bool = True) -> Table:
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


IPNDM_COEFFS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def ipndm_table(sigmas, max_order: int = 4) -> Table:
    """iPNDM: Adams-Bashforth on d with the fixed equal-step coefficients, warm-up orders 1, 2, 3."""
    s = _steps(sigmas)
    n = len(s) - 1
    t = Table.empty(n, max_order)
    t.a[:] = 1.0
    for i in range(n):
        coeffs = IPNDM_COEFFS[min(max_order, i + 1) - 1]
        t.c[i, : len(coeffs)] = (s[i + 1] - s[i]) * np.array(coeffs)
    return t


def deis_table(sigmas, max_order: int = 3, quad_points: int = 64) -> Table:
    """DEIS tAB: extrapolate d as a polynomial in the VP time tau through the last `order` nodes and
    integrate dsigma/dtau times it over the step. By parts, C_j = [sigma L_j] - int sigma L_j' dtau, which keeps
    the quadrature smooth near tau_min (sigma ~ sqrt(tau) there) and makes order 1 exactly Euler."""
    s = _steps(sigmas)
    n = len(s) - 1
    vp = VPTime(s[-1], s[0])
    tau = vp.tau(torch.as_tensor(s)).numpy()
    tau[0], tau[-1] = 1.0, vp.tau_min  # the grid's ends map exactly
    nodes, weights = np.polynomial.legendre.leggauss(quad_points)
    t = Table.empty(n, max_order)
    t.a[:] = 1.0
    for i in range(n):
        order = min(max_order, i + 1)
        ts = tau[i - np.arange(order)]          # nodes, newest first
        lo, hi = tau[i], tau[i + 1]
        q = 0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)
        sig_q = vp.sigma(torch.as_tensor(q)).numpy()
        for j in range(order):
            others = np.delete(ts, j)
            basis = np.poly1d(np.poly(others)) / np.prod(ts[j] - others) if order > 1 else np.poly1d([1.0])
            boundary = s[i + 1] * basis(hi) - s[i] * basis(lo)
            t.c[i, j] = boundary - 0.5 * (hi - lo) * np.sum(weights * sig_q * basis.deriv()(q))
    return t
