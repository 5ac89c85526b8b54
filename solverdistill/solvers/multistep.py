"""The one stepping core: the linear multistep update and the loop that runs it, fed by a coefficient source.

Every multistep sampler, handcrafted or learned, takes steps of the form (docs/solvers.md "The stepping core")

    x_{i+1} = a_i x_i + sum_j b_ij D_{i-j} + sum_j c_ij d_{i-j}          (j = 0 is the newest)

over the history of denoiser outputs D and directions d = (x - D) / sigma, plus, for UniPC, a corrector that
refines x_i once D_i (evaluated at the predicted x_i) is known:

    x_i <- a_{i-1} x_{i-1} + sum_j e_ij D_{i-j}

The weights come from a `CoefficientSource`: a fixed `Table` built from the grid (euler, dpm++, unipc, ipndm,
deis, and so D-ODE's base solver and SFD's euler) or a learned rule that picks the next time and the weights per
sample (DLMS). `run_multistep` is the only loop: it owns the analytical first step, the history, the callback
and the gradient windows of training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from .base import Callback, Sigma, afs_denoised, call, per_sample, report


@dataclass
class Table:
    """Per-step weights of a handcrafted multistep solver, computed once per grid."""

    a: np.ndarray  # [N]      weight on the current state
    b: np.ndarray  # [N, P]   weights on D history, newest first
    c: np.ndarray  # [N, P]   weights on d history, newest first
    corrector: np.ndarray | None = None  # [N, P+1] weights e_ij on D when refining x_i (row 0 unused)

    @classmethod
    def empty(cls, n: int, p: int, corrector: bool = False) -> Table:
        return cls(np.zeros(n), np.zeros((n, p)), np.zeros((n, p)), np.zeros((n, p + 1)) if corrector else None)


@dataclass
class Weights:
    """One step's coefficients: floats for a shared grid, [B] tensors for per-sample rules."""

    a: Sigma
    b: Sequence[Sigma]
    c: Sequence[Sigma]
    sigma_next: Sigma


class CoefficientSource(ABC):
    """Where a step's weights come from. `steps` steps over a history of `history` outputs; `uses_d` says whether
    any weight falls on the directions d (so the loop keeps them)."""

    steps: int
    history: int
    uses_d: bool = False

    @abstractmethod
    def sigma(self, i: int) -> Sigma:
        """The time of x_i (a float, or [B] for a per-sample grid)."""

    def first_sigma(self) -> float:
        """The time every sample starts at (where an analytical first step is taken)."""
        s = self.sigma(0)
        return float(s.reshape(-1)[0]) if isinstance(s, torch.Tensor) else float(s)  # a [B] grid starts as one

    def query(self, i: int) -> Sigma:
        """The time the network is asked at for x_i (DLMS's time scaling moves it); the state's own by default."""
        return self.sigma(i)

    @abstractmethod
    def weights(self, i: int, denoised: torch.Tensor, called: bool) -> Weights:
        """Step i's weights, once D_i is known (`called` is False on an analytical first step)."""

    def corrector(self, i: int) -> Optional[Sequence[float]]:
        """Weights e_i refining x_i with D_i, or None."""
        return None

    def output(self, denoised: torch.Tensor) -> torch.Tensor:
        """D_i as the update uses it: as it is, or thresholded under a published protocol (docs/solvers.md
        "Protocols")."""
        return denoised

    def detach(self) -> None:
        """Cut the autograd graph of any per-sample state (a gradient window ended); stateless sources have none."""
        return None


class TableSource(CoefficientSource):
    """A fixed table on a fixed grid: the handcrafted solvers (and a global DLMS rule exported as a table, whose
    network is asked at `queries` rather than at the state's own times). `threshold`, when set, transforms every
    D before the update reads it (a protocol's dynamic thresholding)."""

    def __init__(
        self,
        table: Table,
        sigmas: torch.Tensor | Sequence[float],
        queries: Optional[Sequence[float]] = None,
        threshold: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        self.s = sigmas.tolist() if isinstance(sigmas, torch.Tensor) else [float(v) for v in sigmas]
        self.steps, self.history = table.b.shape
        # Plain Python floats: numpy scalars times torch tensors would take the slow (or wrong) path.
        self.a, self.b, self.c = table.a.tolist(), table.b.tolist(), table.c.tolist()
        self.e = table.corrector.tolist() if table.corrector is not None else None
        self.uses_d = bool(np.any(table.c))
        self.q = [float(v) for v in queries] if queries is not None else None
        self.threshold = threshold

    def sigma(self, i: int) -> float:
        return self.s[i]

    def query(self, i: int) -> float:
        return self.s[i] if self.q is None else self.q[i]

    def output(self, denoised: torch.Tensor) -> torch.Tensor:
        return denoised if self.threshold is None else self.threshold(denoised)

    def weights(self, i: int, denoised: torch.Tensor, called: bool) -> Weights:
        return Weights(self.a[i], self.b[i], self.c[i], self.s[i + 1])

    def corrector(self, i: int) -> Optional[list]:
        if self.e is None or i == 0 or not any(self.e[i]):
            return None
        return self.e[i]


def combine(
    weights: Sequence[Sigma], history: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None
) -> Optional[torch.Tensor]:
    """out (+)= sum_j w_j h_j. Float weights accumulate in place (one allocation at most: this runs every step);
    per-sample weights broadcast over each sample."""
    for w, h in zip(weights, history):
        if isinstance(w, torch.Tensor):
            term = per_sample(w, h) * h
            out = term if out is None else out + term
        elif w != 0.0:
            out = w * h if out is None else out.add_(h, alpha=w)
    return out


class Stepper:
    """One trajectory's place in the stepping core: the histories of D and d and the previous state (the corrector
    refines it). `run_multistep` drives it with denoiser calls; a diffusers scheduler drives the same object with
    the network outputs a pipeline hands it (solverdistill/diffusers_scheduler.py)."""

    def __init__(self, source: CoefficientSource) -> None:
        self.source = source
        self.keep = source.history + 1  # one more than the update reads: the corrector needs it
        self.hist_D: list[torch.Tensor] = []
        self.hist_d: list[torch.Tensor] = []
        self.x_prev: Optional[torch.Tensor] = None
        self.a_prev: Optional[Sigma] = None

    def step(
        self, i: int, x: torch.Tensor, denoised: torch.Tensor, called: bool, callback: Optional[Callback] = None
    ) -> tuple[torch.Tensor, Weights]:
        """Step i from x at source.sigma(i), with D_i = `denoised` (the AFS estimate when not `called`); returns
        x_{i+1} and the step's weights."""
        source, keep = self.source, self.keep
        sigma = source.sigma(i)
        denoised = source.output(denoised)
        self.hist_D = [denoised] + self.hist_D[: keep - 1]
        if source.uses_d:
            self.hist_d = [(x - denoised) / per_sample(sigma, x)] + self.hist_d[: keep - 1]
        e = source.corrector(i)
        if e is not None:
            x = combine(e, self.hist_D, per_sample(self.a_prev, self.x_prev) * self.x_prev)
        w = source.weights(i, denoised, called)
        report(callback, i, sigma, w.sigma_next, x, denoised)
        self.x_prev, self.a_prev = x, w.a
        return combine(w.c, self.hist_d, combine(w.b, self.hist_D, per_sample(w.a, x) * x)), w

    def detach(self) -> None:
        """Cut the graph: histories and the source's per-sample state (a training window ended)."""
        self.hist_D = [h.detach() for h in self.hist_D]
        self.hist_d = [h.detach() for h in self.hist_d]
        self.source.detach()


def run_multistep(
    model: Any,
    x: torch.Tensor,
    source: CoefficientSource,
    *,
    cond: torch.Tensor | None = None,
    afs: bool = False,
    callback: Optional[Callback] = None,
    on_step: Optional[Callable[[int, Sigma, torch.Tensor], bool]] = None,
) -> torch.Tensor:
    """Integrate x from source.sigma(0) over source.steps steps.

    `on_step(i, sigma_next, x_next)` runs after each step (training computes its loss there); when it returns
    True the graph is cut: state and history are detached, so gradients stay within a window of steps.
    """
    stepper = Stepper(source)
    for i in range(source.steps):
        called = not (afs and i == 0)
        denoised = call(model, x, source.query(i), cond) if called else afs_denoised(x, source.first_sigma())
        x, w = stepper.step(i, x, denoised, called, callback)
        if on_step is not None and on_step(i, w.sigma_next, x):
            x = x.detach()
            stepper.detach()
    return x
