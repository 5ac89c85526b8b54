"""Handcrafted solvers by name (what each is: order, calls per step, default grid), and `Plan`, the `Solver` a
name becomes once its NFE, grid and options are fixed (docs/solvers.md).

A multistep solver is a table builder run by the stepping core (`multistep.py`); a one-step solver has its own
short loop (`singlestep.py`). Both integrate from sigmas[0] to sigmas[-1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, Optional

import torch

from .. import grids
from ..errors import BadInput
from .base import Callback, Solver, Step, dynamic_threshold
from .multistep import Table, TableSource, run_multistep
from .singlestep import sample_dpm2, sample_heun
from .tables import deis_table, dpmpp_table, euler_table, ipndm_table, unipc_table


@dataclass(frozen=True)
class SolverInfo:
    name: str
    order: int
    calls_per_step: int
    default_schedule: str
    summary: str
    table: Callable | None = None  # multistep: sigmas (+ options) -> Table
    run: Callable | None = None  # one-step solvers: their own loop
    aliases: tuple[str, ...] = ()
    options: tuple[str, ...] = field(default=())  # keyword options the table builder takes
    data_prediction: bool = False  # the update reads D only: a protocol's thresholding applies to it

    def solve(
        self,
        model: Any,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        *,
        cond: torch.Tensor | None = None,
        afs: bool = False,
        callback: Optional[Callback] = None,
        on_step: Optional[Callable] = None,
        protocol: str = "default",
        **options: Any,
    ) -> torch.Tensor:
        """Integrate x over the grid `sigmas` (the teacher calls this directly; samplers go through a Plan).
        `on_step` is the stepping core's training hook (multistep solvers only)."""
        if self.table is not None:
            return run_multistep(
                model,
                x,
                self.source(sigmas, protocol, **options),
                cond=cond,
                afs=afs,
                callback=callback,
                on_step=on_step,
            )
        if on_step is not None:
            raise TypeError(f"{self.name} has its own loop: no on_step hook")
        return self.run(model, x, sigmas, cond=cond, afs=afs, callback=callback)

    def source(self, sigmas: torch.Tensor, protocol: str = "default", **options: Any) -> TableSource:
        """The coefficient source of this multistep solver on `sigmas` under `protocol` (docs/solvers.md
        "Protocols"): its table, with the protocol's table options and thresholding."""
        rules = protocol_rules(protocol)
        table = self.make_table(sigmas, **{**options, **rules.table_options.get(self.name, {})})
        return TableSource(table, sigmas, threshold=rules.threshold if self.data_prediction else None)

    def make_table(self, sigmas: torch.Tensor, **options: Any) -> Table:
        """Coefficients depend only on the grid: built once per grid and options, not per batch."""
        known = self.options + PROTOCOL_TABLE_OPTIONS
        kept = tuple(sorted((k, v) for k, v in options.items() if k in known))
        return _cached_table(self.name, tuple(float(s) for s in sigmas), kept)

    def steps_for(self, nfe: int, afs: bool) -> int:
        """Grid intervals for a budget of `nfe` real denoiser calls (AFS saves the first call)."""
        if nfe < 1:
            raise BadInput(f"--nfe: must be >= 1, got {nfe}")
        calls = nfe + (1 if afs else 0)
        if calls % self.calls_per_step:
            hint = "use an even NFE without --afs" if afs else "use an even NFE, or an odd one with --afs"
            raise BadInput(
                f"--nfe: {self.name} makes {self.calls_per_step} calls per step, so NFE {nfe} "
                f"{'with' if afs else 'without'} AFS is impossible; {hint}"
            )
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
    """Add a handcrafted solver (docs/extending.md "A handcrafted solver")."""
    SOLVERS[info.name] = info
    for alias in info.aliases:
        ALIASES[alias] = info.name


register(SolverInfo("euler", 1, 1, "polynomial:7", "Euler / DDIM (first order)", table=euler_table, aliases=("ddim",)))
register(SolverInfo("heun", 2, 2, "polynomial:7", "Heun's 2nd-order method (EDM)", run=sample_heun))
register(SolverInfo("dpm2", 2, 2, "polynomial:7", "DPM-Solver-2 (log-sigma midpoint)", run=sample_dpm2))
register(
    SolverInfo(
        "dpm++2m",
        2,
        1,
        "logsnr",
        "DPM-Solver++(2M), data prediction",
        table=partial(dpmpp_table, max_order=2),
        options=("lower_order_final",),
        data_prediction=True,
    )
)
register(
    SolverInfo(
        "dpm++3m",
        3,
        1,
        "logsnr",
        "DPM-Solver++(3M), data prediction",
        table=partial(dpmpp_table, max_order=3),
        options=("lower_order_final",),
        aliases=("dpm++",),
        data_prediction=True,
    )
)
register(
    SolverInfo(
        "unipc",
        3,
        1,
        "logsnr",
        "UniPC bh2, order 3, free corrector",
        table=unipc_table,
        options=("lower_order_final",),
        data_prediction=True,
    )
)
register(
    SolverInfo("ipndm", 4, 1, "polynomial:7", "improved PNDM (fixed Adams-Bashforth coefficients)", table=ipndm_table)
)
register(
    SolverInfo(
        "deis",
        4,
        1,
        "time_uniform:2",
        "DEIS tAB3: cubic in VP time through four nodes (deis:order=R for tAB-R)",
        table=deis_table,
        options=("order",),
    )
)


@dataclass(frozen=True)
class Protocol:
    """How a published code base runs the same algorithms (docs/solvers.md "Protocols"): a transform of every D
    that data-prediction solvers read, and table options per solver."""

    name: str
    threshold: Callable | None = None
    table_options: dict = field(default_factory=dict)


PROTOCOLS = {
    "default": Protocol("default"),
    # zju-pi/diff-sampler, whose baselines the DLMS, AMED, GITS and SFD tables quote: dynamic thresholding
    # (quantile 0.995, floor 1) of D in DPM-Solver++ and UniPC; DEIS tAB3 with its tau range and Riemann sum.
    "diff-sampler": Protocol("diff-sampler", dynamic_threshold, {"deis": {"vp_ends": (0.002, 80.0), "riemann": 10000}}),
}
PROTOCOL_TABLE_OPTIONS = ("vp_ends", "riemann")


def protocol_rules(name: str) -> Protocol:
    """A protocol by name; unknown names are bad input naming --protocol."""
    if name not in PROTOCOLS:
        raise BadInput(f"--protocol: unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def split_protocol(name: str) -> tuple[str, str | None]:
    """`dpm++3m@diff-sampler` -> ("dpm++3m", "diff-sampler"): a protocol named after `@` (how `--protocol` reaches
    handcrafted names in `sample` and `compare`), or None."""
    base, at, protocol = name.strip().partition("@")
    if at:
        protocol_rules(protocol)
        return base, protocol
    return base, None


def with_protocol(name: str, protocol: str) -> str:
    """`NAME@PROTOCOL` for a handcrafted solver name (a trailing `+afs` kept last); an artifact path, a student
    method or any other name comes back as it is. How `--protocol` reaches the names `sample` and `compare` take."""
    protocol_rules(protocol)
    if protocol == "default":
        return name
    base, afs = (name[:-4], "+afs") if name.endswith("+afs") else (name, "")
    try:
        get(base)
    except BadInput:
        return name
    return f"{split_protocol(base)[0]}@{protocol}{afs}"


def split_options(name: str) -> tuple[str, dict]:
    """`deis:order=2` -> ("deis", {"order": 2}): a solver name with table options after colons (numbers, or
    true/false), and any `@protocol` left off."""
    base, *parts = split_protocol(name)[0].split(":")
    options: dict = {}
    for part in parts:
        key, eq, raw = part.partition("=")
        if not eq or not key:
            raise BadInput(f"--solver {name}: expected NAME:KEY=VALUE (e.g. deis:order=2), got {part!r}")
        low = raw.strip().lower()
        try:
            value: Any = (
                low == "true" if low in ("true", "false") else int(raw) if raw.strip().isdigit() else float(raw)
            )
        except ValueError:
            raise BadInput(f"--solver {name}: option {key} must be a number or true/false, got {raw!r}") from None
        options[key.strip()] = value
    return base, options


def load_plugins() -> None:
    """Solvers other packages publish in the entry-point group `solverdistill.solvers` (each a `SolverInfo`)."""
    from ..plugins import load_entry_points

    load_entry_points("solverdistill.solvers", SOLVERS, lambda name, info, where: register(info))


def get(name: str) -> SolverInfo:
    """A solver by name or alias (built-in, registered, or from an entry point), options after a colon allowed
    (`deis:order=2`); unknown names or options are bad input."""
    name, options = split_options(name)
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in SOLVERS:
        load_plugins()
        key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in SOLVERS:
        names = sorted(set(SOLVERS) | set(ALIASES))
        raise BadInput(f"--solver: unknown solver {name!r}; choose one of {', '.join(names)} or an artifact path")
    unknown = sorted(set(options) - set(SOLVERS[key].options))
    if unknown:
        known = ", ".join(SOLVERS[key].options) or "none"
        raise BadInput(f"--solver {name}: {key} has no option {unknown[0]!r} (its options: {known})")
    return SOLVERS[key]


@dataclass
class Plan:
    """A handcrafted solver with its NFE, grid and options fixed: the `Solver` that samplers run."""

    info: SolverInfo
    nfe: int
    afs: bool
    sigmas: torch.Tensor
    options: dict = field(default_factory=dict)
    passes_per_call: int = 1
    protocol: str = "default"

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def network_passes(self) -> int:
        return self.nfe * self.passes_per_call

    def solve(
        self, model: Any, x: torch.Tensor, cond: torch.Tensor | None = None, callback: Optional[Callback] = None
    ) -> torch.Tensor:
        return self.info.solve(
            model, x, self.sigmas, cond=cond, afs=self.afs, callback=callback, protocol=self.protocol, **self.options
        )

    def describe(self) -> dict:
        return {
            "solver": self.info.name,
            "nfe": self.nfe,
            "afs": self.afs,
            "steps": self.steps,
            "grid": self.sigmas.tolist(),
            **self.options,
            **({"protocol": self.protocol} if self.protocol != "default" else {}),
        }


def plan(
    solver: str,
    nfe: int,
    model: Any,
    schedule: str | None = None,
    afs: bool = False,
    protocol: str = "default",
    **options: Any,
) -> Plan:
    """Solver `solver` (options after a colon: `deis:order=2`) at `nfe` denoiser calls on `model`'s sigma range:
    its default grid unless `schedule`, run as `protocol` (or an `@protocol` after the name) runs it
    (docs/solvers.md "Protocols")."""
    info = get(solver)
    protocol_rules(protocol)
    named = split_options(solver)[1]
    in_name = split_protocol(solver)[1]
    if in_name is not None and protocol not in ("default", in_name):
        raise BadInput(f"--protocol: {protocol!r} given, but the solver name {solver!r} names {in_name!r}")
    protocol = in_name or protocol
    steps = info.steps_for(nfe, afs)
    sigmas = grids.make_grid(schedule or info.default_schedule, steps, model.sigma_min, model.sigma_max)
    if named and info.table is not None:
        info.make_table(sigmas, **named)  # a bad value fails here, not in the middle of a run
    return Plan(
        info,
        nfe,
        afs,
        sigmas,
        {k: v for k, v in {**options, **named}.items() if k in info.options},
        int(getattr(model, "passes_per_call", 1)),
        protocol,
    )


def sweep(nfe: int, model: Any, protocol: str = "default") -> dict[str, Plan]:
    """Every handcrafted solver on its default grid, with and without AFS, that can run at this NFE: the
    baselines a student is measured against, keyed `name` or `name+afs` (run as `protocol` runs them)."""
    out = {}
    for name in SOLVERS:
        for afs in (False, True):
            try:
                out[f"{name}{'+afs' if afs else ''}"] = plan(name, nfe, model, afs=afs, protocol=protocol)
            except BadInput:
                continue  # e.g. heun at an odd NFE without AFS
    return out


__all__ = [
    "ALIASES",
    "PROTOCOLS",
    "SOLVERS",
    "Plan",
    "Solver",
    "SolverInfo",
    "Step",
    "Table",
    "get",
    "plan",
    "register",
    "sweep",
    "with_protocol",
]
