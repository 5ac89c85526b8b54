"""Handcrafted solvers by name: what each one is (order, calls per step, default grid) and how NFE maps to steps.

Every solver has the signature `solve(model, x, sigmas, *, cond=None, afs=False, callback=None) -> x` and
integrates from sigmas[0] to sigmas[-1] (algorithms.md section 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Callable

import torch

from ..errors import BadInput
from .multistep import (Table, deis_table, dpmpp_table, euler_table, ipndm_table, sample_multistep,
                        unipc_table)
from .singlestep import sample_dpm2, sample_heun


@dataclass(frozen=True)
class SolverInfo:
    name: str
    order: int
    calls_per_step: int
    default_schedule: str
    summary: str
    table: Callable | None = None        # multistep: sigmas (+ options) -> Table
    run: Callable | None = None          # single-step solvers: their own loop
    aliases: tuple[str, ...] = ()
    options: tuple[str, ...] = field(default=())  # keyword options the table builder takes

    def solve(self, model, x, sigmas, *, cond=None, afs=False, callback=None, **options):
        if self.table is not None:
            return sample_multistep(model, x, sigmas, self.make_table(sigmas, **options),
                                    cond=cond, afs=afs, callback=callback)
        return self.run(model, x, sigmas, cond=cond, afs=afs, callback=callback)

    def make_table(self, sigmas, **options) -> Table:
        """Coefficients depend only on the grid: built once per grid and options, not per batch."""
        kept = tuple(sorted((k, v) for k, v in options.items() if k in self.options))
        return _cached_table(self.name, tuple(float(s) for s in sigmas), kept)

    def steps_for(self, nfe: int, afs: bool) -> int:
        """Grid intervals for a budget of `nfe` real denoiser calls (AFS saves the first call)."""
        if nfe < 1:
            raise BadInput(f"--nfe: must be >= 1, got {nfe}")
        calls = nfe + (1 if afs else 0)
        if calls % self.calls_per_step:
            hint = "use an even NFE without --afs" if afs else "use an even NFE, or an odd one with --afs"
            raise BadInput(f"--nfe: {self.name} makes {self.calls_per_step} calls per step, so NFE {nfe} "
                           f"{'with' if afs else 'without'} AFS is impossible; {hint}")
        return calls // self.calls_per_step


@lru_cache(maxsize=256)
def _cached_table(name: str, sigmas: tuple, options: tuple) -> Table:
    table = SOLVERS[name].table(torch.tensor(sigmas, dtype=torch.float64), **dict(options))
    for arr in (table.a, table.b, table.c, table.corrector):
        if arr is not None:
            arr.flags.writeable = False  # shared by every batch on this grid
    return table


SOLVERS: dict[str, SolverInfo] = {}
ALIASES: dict[str, str] = {}


def register(info: SolverInfo) -> None:
    SOLVERS[info.name] = info
    for alias in info.aliases:
        ALIASES[alias] = info.name


register(SolverInfo("euler", 1, 1, "polynomial:7", "Euler / DDIM (first order)", table=euler_table, aliases=("ddim",)))
register(SolverInfo("heun", 2, 2, "polynomial:7", "Heun's 2nd-order method (EDM)", run=sample_heun))
register(SolverInfo("dpm2", 2, 2, "polynomial:7", "DPM-Solver-2 (log-sigma midpoint)", run=sample_dpm2))
register(SolverInfo("dpm++2m", 2, 1, "logsnr", "DPM-Solver++(2M), data prediction",
                    table=partial(dpmpp_table, max_order=2), options=("lower_order_final",)))
register(SolverInfo("dpm++3m", 3, 1, "logsnr", "DPM-Solver++(3M), data prediction",
                    table=partial(dpmpp_table, max_order=3), options=("lower_order_final",), aliases=("dpm++",)))
register(SolverInfo("unipc", 3, 1, "logsnr", "UniPC bh2, order 3, free corrector",
                    table=unipc_table, options=("lower_order_final",)))
register(SolverInfo("ipndm", 4, 1, "polynomial:7", "improved PNDM (fixed Adams-Bashforth coefficients)",
                    table=ipndm_table))
register(SolverInfo("deis", 3, 1, "time_uniform:2", "DEIS tAB-3 (polynomial in VP time)", table=deis_table))


def get(name: str) -> SolverInfo:
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in SOLVERS:
        names = sorted(set(SOLVERS) | set(ALIASES))
        raise BadInput(f"--solver: unknown solver {name!r}; choose one of {', '.join(names)} or an artifact path")
    return SOLVERS[key]


__all__ = ["SOLVERS", "SolverInfo", "Table", "get", "register", "sample_multistep"]
