"""D-ODE: one scalar per denoiser call, fitted in closed form (docs/students.md "D-ODE").

Call k's output becomes D~_k = D_k + lam_k (D_k - D_{k-1}); lam = 0 is the base solver. The correction is a
denoiser wrapper, so it works over every handcrafted solver without touching them. The state that the next
call sees (or the final state, after the last call) is linear in lam_k, so running the base solver twice, with
lam_k = 0 and 1, gives the correction direction e exactly; lam_k = <e, r> / <e, e> against the teacher state at
that sigma, summed in float64 over all elements of all fitting samples. Then lam_k is frozen and k+1 is fitted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import distributed
from ..artifacts import Artifact, new_meta
from ..errors import BadInput
from ..solvers import Plan, plan
from ..solvers import get as get_solver
from ..solvers.base import Callback
from . import Method, TrainSection, register

if TYPE_CHECKING:
    from ..models.base import Denoiser
    from ..teacher.cache import TeacherCache


@dataclass
class DODEStudent:
    method: str = "dode"
    nfe: int = field(default=5, metadata={"min": 1})
    base: str = "dpm++3m"
    schedule: str = ""  # default: the base solver's own grid
    afs: bool = False
    lower_order_final: bool = True


@dataclass
class DODETrain(TrainSection):
    samples: int = field(default=100, metadata={"min": 1})  # fitting trajectories (100 is enough)
    batch: int = field(default=100, metadata={"min": 1})


class Landed(Exception):
    """Raised when the call after the one being fitted is about to run: carries the state it would see."""

    def __init__(self, x: torch.Tensor, sigma: torch.Tensor) -> None:
        self.x, self.sigma = x, sigma


class Extrapolated:
    """The D-ODE denoiser: D~_k = D_k + lam_k (D_k - D_{k-1}) on the k-th real call."""

    def __init__(self, model: Any, lams: Sequence[float], stop_at: int | None = None) -> None:
        self.model, self.lams, self.stop_at = model, lams, stop_at
        self.prev, self.k = None, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.k == self.stop_at:
            raise Landed(x, sigma)
        out = self.model(x, sigma, cond)
        lam = self.lams[self.k] if self.k < len(self.lams) else 0.0
        corrected = out if self.prev is None or lam == 0.0 else out + lam * (out - self.prev)
        self.prev, self.k = out, self.k + 1
        return corrected

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


class DODESolver:
    """The base solver run on the extrapolated denoiser: a `Solver`."""

    def __init__(self, base: Plan, lams: Iterable[float]) -> None:
        self.base, self.lams = base, [float(v) for v in lams]
        self.nfe, self.afs = base.nfe, base.afs

    @property
    def network_passes(self) -> int:
        return self.base.network_passes

    def solve(
        self, model: Any, x: torch.Tensor, cond: torch.Tensor | None = None, callback: Callback | None = None
    ) -> torch.Tensor:
        return self.base.solve(Extrapolated(model, self.lams), x, cond, callback)

    def describe(self) -> dict:
        return {**self.base.describe(), "solver": f"dode[{self.base.info.name}]", "lambdas": self.lams}


def landing(
    base: Plan, model: Any, x: torch.Tensor, lams: Sequence[float], k: int, cond: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The state the call after call k sees (and its sigma), or the final state at sigma_min."""
    try:
        out = base.solve(Extrapolated(model, lams, stop_at=k + 1), x, cond)
        return out, torch.full((x.shape[0],), float(base.sigmas[-1]), dtype=torch.float64)
    except Landed as hit:
        return hit.x, hit.sigma.to(torch.float64)


def closed_form(
    base: Plan, model: Any, cache: TeacherCache, batches: Iterable[np.ndarray], fixed: list[float], k: int
) -> float:
    """lam_k = <e, r> / <e, e> over all fitting samples, with lams before k fixed (float64 sums)."""
    er = ee = 0.0
    for idx in batches:
        x, cond = cache.start(idx, model)
        x0, sig = landing(base, model, x, fixed + [0.0], k, cond)
        x1, _ = landing(base, model, x, fixed + [1.0], k, cond)
        target = cache.states_at(idx, sig[:, None].cpu(), dtype=torch.float64)[:, 0]
        e = (x1 - x0).double().cpu()
        r = target - x0.double().cpu()
        er += float((e * r).sum())
        ee += float((e * e).sum())
    er, ee = distributed.all_sum(torch.tensor([er, ee], dtype=torch.float64)).tolist()  # torchrun: every rank's
    return er / ee if ee > 0 else 0.0


def fit(
    cache: TeacherCache, model: Denoiser, s: DODEStudent, t: DODETrain, progress: Callable[..., Any] | None = None
) -> Artifact:
    began = time.time()
    base = plan(s.base, s.nfe, model, s.schedule or None, s.afs, lower_order_final=s.lower_order_final)
    train_idx, _ = cache.split(t.samples, t.heldout)
    # Under torchrun each rank takes a contiguous share of the batches and the float64 sums are reduced over
    # ranks, so every rank fits the same lambdas (docs/distributed.md).
    batches = distributed.shard([train_idx[b : b + t.batch] for b in range(0, len(train_idx), t.batch)])
    final = [cache.endpoints(idx) for idx in batches]

    def endpoint_error(lams: Sequence[float]) -> float:
        mine = sum(
            float((base.solve(Extrapolated(model, lams), *cache.start(idx, model)).double().cpu() - f).pow(2).sum())
            for idx, f in zip(batches, final)
        )
        return float(distributed.all_sum(torch.tensor(float(mine), dtype=torch.float64)))

    lams, rejected = [0.0] * s.nfe, 0
    with torch.no_grad():
        current = endpoint_error(lams)
        for k in range(1, s.nfe):  # the first call has no predecessor: lam_0 = 0
            trial = lams[:k] + [closed_form(base, model, cache, batches, lams[:k], k)] + lams[k + 1 :]
            # Greedy per-call targets can pull the end state away (an intermediate landing, e.g. dpm2's
            # midpoint, is not the goal): keep lam_k only if the fitting samples' endpoint error does not grow.
            err = endpoint_error(trial)
            if err <= current:
                lams, current = trial, err
            else:
                rejected += 1
            if progress:
                progress(1, info=f"lam_{k} = {lams[k]:+.4f}")
    meta = new_meta(
        "dode",
        base_solver=base.info.name,
        nfe=s.nfe,
        network_passes=s.nfe * model.passes_per_call,
        afs=s.afs,
        grid=base.sigmas.tolist(),
        schedule=s.schedule or base.info.default_schedule,
        options={"lower_order_final": s.lower_order_final},
        model=model.spec,
        model_fingerprint=model.fingerprint,
        training={"seconds": time.time() - began, "samples": len(train_idx), "rejected_lambdas": rejected},
    )
    return Artifact(meta, {"lambdas": np.array(lams), "grid": base.sigmas.numpy()})


def load(artifact: Artifact, model: Denoiser) -> DODESolver:
    """The base solver on the stored grid with the stored lambdas; every meta key and array it reads is checked
    (types came checked from artifacts.load)."""
    meta, where = artifact.meta, artifact.path
    nfe = int(meta["nfe"])
    lams = artifact.array("lambdas", shape=(nfe,))
    afs = bool(meta.get("afs", False))
    try:
        info = get_solver(meta.get("base_solver", ""))
        steps = info.steps_for(nfe, afs)
    except BadInput as e:  # the solver registry words its messages for flags; here the values come from meta
        text = str(e).removeprefix("--solver: ").removeprefix("--nfe: ")
        raise BadInput(f"{where}: meta.base_solver / meta.nfe / meta.afs: {text}") from None
    grid = artifact.array("grid", ndim=1)
    if len(grid) != steps + 1 or np.any(np.diff(grid) >= 0) or grid[-1] < 0:
        raise BadInput(f"{where}: array 'grid' must hold {steps + 1} decreasing sigmas for {info.name} at NFE {nfe}")
    options = {k: v for k, v in (meta.get("options") or {}).items() if k in info.options}
    for k, v in options.items():
        if not isinstance(v, bool):
            raise BadInput(f"{where}: meta.options.{k}: expected true or false, got {repr(v)[:60]}")
    base = Plan(info, nfe, afs, torch.tensor(grid, dtype=torch.float64), options, int(model.passes_per_call))
    return DODESolver(base, lams)


def untrained(artifact: Artifact) -> Artifact:
    return Artifact(
        artifact.meta, {**artifact.arrays, "lambdas": np.zeros_like(artifact.arrays["lambdas"])}, artifact.path
    )


register(
    Method(
        "dode",
        DODEStudent,
        DODETrain,
        fit,
        load,
        untrained,
        "one scalar per denoiser call, closed form",
        work=lambda s, t: s.nfe,
        arrays=("lambdas", "grid"),
    )
)
