"""SFD and SFD-v: fine-tune the network itself for few-step sampling (docs/students.md "SFD").

The student is a copy of the denoiser's network sampled with euler + AFS on a polynomial (rho 7) grid over
[0.006, 80] (clipped to the model's range). For every student step: one euler step from the student's own detached
state, L1 (or, with `train.distance: l2`, squared) distance to the teacher state at the next sigma (summed over
elements, averaged over the batch), NaN/inf gradients zeroed, one Adam step; then continue from the student's
output. lr x0.1 at half of training; optional EMA. `train.loss: endpoint` instead takes one distance after the last
step, back through the whole student run.
SFD-v trains one network for several NFEs, telling it the number of steps through a step condition (only for
networks that accept one) and, with `student.adapters`, per-NFE low-rank adapters (students/step_adapters.py).
Teacher states come from the teacher cache (Hermite between its grid points), or, with `train.teacher: online` as
the paper trains, from the frozen network solved by `train.teacher_solver` on the student grid with `train.refine`
points inside each interval, from fresh noise every iteration. NFE 1 is the
paper's second stage: it starts from an NFE-2 student (`student.init`, or trained first).
Training and sampling both run euler through the stepping core (solvers/multistep.py); training takes its
optimiser step in the core's per-step hook and cuts the graph after every step; the online teacher is a Plan.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import artifacts, distributed, grids
from ..artifacts import Artifact, new_meta
from ..errors import BadInput
from ..generate import initial_noise
from ..solvers import Plan
from ..solvers import get as get_solver
from ..solvers.base import Callback, Step
from ..teacher.run import draw_cond
from . import Method, TrainSection, ema_update, register, step_adapters, stored_settings

if TYPE_CHECKING:
    from ..models.base import Denoiser
    from ..teacher.cache import TeacherCache


@dataclass
class SFDStudent:
    method: str = "sfd"
    nfe: int = field(default=2, metadata={"min": 1})
    afs: bool = True
    sigma_min: float = field(default=0.006, metadata={"min": 0.0})
    sigma_max: float = field(default=80.0, metadata={"min": 0.0})
    rho: float = field(default=7.0, metadata={"min": 0.0})
    variable: bool = False  # SFD-v: one network for every NFE in nfe_set
    nfe_set: str = "2,3,4,5"
    # SFD-v: rank of per-NFE low-rank adapters on the network's convolutions or linear layers (0: the step condition
    # alone, the paper's). Not in the paper: the NFEs then stop pulling shared weights apart (docs/students.md "SFD
    # and SFD-v").
    adapters: int = field(default=0, metadata={"min": 0, "max": 4096})
    # An SFD artifact whose weights training starts from; "" = the model's own (NFE 1: an NFE-2 stage first).
    init: str = ""


@dataclass
class SFDTrain(TrainSection):
    lr: float = field(default=5e-5, metadata={"min": 0.0})
    batch: int = field(default=32, metadata={"min": 1})
    iterations: int = field(default=200, metadata={"min": 1})
    ema: float = field(default=0.0, metadata={"min": 0.0, "max": 0.9999})  # EMA decay of the weights; 0 = off
    seed: int = 0
    # Where targets come from: the cache (Hermite between its points), or the frozen network solved alongside.
    teacher: str = field(default="cache", metadata={"choices": ("cache", "online")})
    teacher_solver: str = field(default="dpm++3m", metadata={"max_len": 100})  # online: the teacher's solver
    refine: int = field(default=3, metadata={"min": 0, "max": 1000})  # online: M points inside each interval
    lr_schedule: str = field(default="step", metadata={"choices": ("step", "cosine")})  # step: x0.1 at half
    # SFD-v: the step-condition parameters' lr as a multiple of `lr`. They start at zero (no condition = the
    # original network) and stay small at the fine-tuning lr (docs/students.md "SFD and SFD-v"; x50 measured no
    # better on toy:unet-gmm, README "Results").
    step_lr_scale: float = field(default=1.0, metadata={"min": 0.0})
    # The per-step distance to the teacher: `l1`, the paper's (summed absolute error), or `l2` (summed squared
    # error), which weighs the rare large misses the way an RMSE does (docs/students.md "SFD and SFD-v").
    distance: str = field(default="l1", metadata={"choices": ("l1", "l2")})
    # SFD-v: `nfe` divides each NFE's distance by a running mean of its own, so Adam's shared gradient scale is not
    # set by the few-step NFEs' larger errors alone (docs/students.md "SFD and SFD-v"); `none`: the paper's sum.
    balance: str = field(default="none", metadata={"choices": ("none", "nfe")})
    # `steps`: the paper's loss, one distance and one Adam step after every student step; `endpoint`: one distance
    # to the teacher's output after the last step, back through every student step, which is what the endpoint
    # RMSE measures (docs/students.md "SFD and SFD-v"; not in the paper). Either teacher mode, any NFE.
    loss: str = field(default="steps", metadata={"choices": ("steps", "endpoint")})


def student_grid(s: SFDStudent, model: Denoiser, nfe: int) -> torch.Tensor:
    lo, hi = max(s.sigma_min, model.sigma_min), min(s.sigma_max, model.sigma_max)
    return grids.polynomial(nfe + (1 if s.afs else 0), lo, hi, s.rho)


def refined(grid: torch.Tensor, m: int, rho: float) -> torch.Tensor:
    """The student grid with `m` points inside each interval, uniform in sigma^(1/rho) like the grid itself (on a
    polynomial grid: the polynomial grid with (m + 1) times the intervals, the student's points every (m + 1)-th)."""
    r = grid.to(torch.float64) ** (1 / rho)
    u = torch.arange(m + 1, dtype=torch.float64) / (m + 1)
    inner = (r[:-1, None] + (r[1:] - r[:-1])[:, None] * u).reshape(-1)
    return torch.cat([inner, r[-1:]]) ** rho


def teacher_plan(t: SFDTrain, model: Denoiser, grid: torch.Tensor, rho: float) -> Plan:
    """The online teacher: `train.teacher_solver` (no AFS) on the refined student grid."""
    try:
        info = get_solver(t.teacher_solver)
    except BadInput as e:
        raise BadInput(f"train.teacher_solver: {e}") from None
    fine = refined(grid, t.refine, rho)
    steps = len(fine) - 1
    return Plan(info, steps * info.calls_per_step, False, fine, {}, int(model.passes_per_call))


def online_targets(model: Denoiser, plan: Plan, x: torch.Tensor, cond: torch.Tensor | None, every: int) -> torch.Tensor:
    """The teacher's states at the student's grid points after its first ([B, K, ...]): every `every`-th state of
    the plan's run from x, the last being its output."""
    states: list[torch.Tensor] = []

    def keep(step: Step) -> None:
        if step.i and step.i % every == 0:
            states.append(step.x)

    with torch.no_grad():
        final = plan.solve(model, x, cond, keep)
    return torch.stack([*states, final], 1)


def fresh_seeds(rng: np.random.Generator, n: int) -> np.ndarray:
    """Per-sample seeds for one online batch, drawn from the train seed's generator in [2^52, 2^53): recipe seeds
    stay below 10^15 < 2^52, so cached (held-out) seeds and any evaluation seed below 2^52 are never trained on."""
    return 2**52 + rng.integers(0, 2**52, size=n)


def nfes_of(s: SFDStudent) -> list[int]:
    if not s.variable:
        return [s.nfe]
    try:
        values = sorted({int(v) for v in s.nfe_set.split(",") if v.strip()})
    except ValueError:
        raise BadInput(f"student.nfe_set: expected NFEs separated by commas, got {s.nfe_set!r}") from None
    if not values or min(values) < 1:
        raise BadInput(f"student.nfe_set: NFEs must be >= 1, got {s.nfe_set!r}")
    return values


def euler_plan(s: SFDStudent, grid: torch.Tensor, nfe: int, passes_per_call: int = 1) -> Plan:
    """The student's sampler: euler (+ AFS) on its grid."""
    return Plan(get_solver("euler"), nfe, s.afs, grid, {}, passes_per_call)


def set_step(den: Denoiser, steps: int | None) -> None:
    """The step condition SFD-v feeds the network (on a wrapped user object too), and its adapters' NFE."""
    for target in (den, getattr(den, "obj", None)):
        if target is not None:
            target.step_condition = steps
    step_adapters.select(den.net, steps)


class SFDSolver:
    """Euler (+ AFS) on the stored grid with the fine-tuned network; counts calls on the caller's counter."""

    def __init__(
        self, den: Denoiser, settings: SFDStudent, grid: torch.Tensor, nfe: int, step_condition: int | None
    ) -> None:
        self.den, self.settings, self.step_condition = den, settings, step_condition
        self.plan = euler_plan(settings, grid, nfe, int(den.passes_per_call))
        self.nfe, self.afs = nfe, settings.afs

    @property
    def network_passes(self) -> int:
        return self.plan.network_passes

    def at_nfe(self, nfe: int) -> SFDSolver:
        """SFD-v: the same network at another NFE (its own grid, told the number of steps)."""
        if not self.settings.variable:
            raise BadInput(f"an SFD student is tuned for NFE {self.nfe}; only SFD-v (student.variable) takes another")
        step_adapters.check(self.den.net, nfe)  # with adapters: only the NFEs that have a pair
        return SFDSolver(self.den, self.settings, student_grid(self.settings, self.den, nfe), nfe, nfe)

    def solve(
        self, model: Any, x: torch.Tensor, cond: torch.Tensor | None = None, callback: Callback | None = None
    ) -> torch.Tensor:
        den = model.with_model(self.den) if hasattr(model, "with_model") else self.den
        set_step(self.den, self.step_condition)
        with torch.no_grad():
            return self.plan.solve(den, x, cond, callback)

    def describe(self) -> dict:
        return {
            "solver": "sfd",
            "nfe": self.nfe,
            "afs": self.afs,
            "steps": self.plan.steps,
            "grid": self.plan.sigmas.tolist(),
        }


def init_weights(s: SFDStudent, model: Denoiser) -> dict[str, torch.Tensor]:
    """The weights of the SFD artifact `student.init` (checked against the model like any SFD artifact)."""
    try:
        art = artifacts.load(s.init, model.fingerprint)
    except BadInput as e:
        raise BadInput(f"student.init: {e}") from None
    if art.method != "sfd":
        raise BadInput(f"student.init: {s.init} is a {art.method} artifact; expected an SFD one")
    return load(art, model).den.net.state_dict()


def fit(
    cache: TeacherCache, model: Denoiser, s: SFDStudent, t: SFDTrain, progress: Callable[..., Any] | None = None
) -> Artifact:
    began = time.time()
    if model.net is None or not isinstance(model.net, torch.nn.Module):
        raise BadInput(f"student.method: sfd fine-tunes a network, and {model.spec} has none")
    if s.adapters and not s.variable:
        raise BadInput("student.adapters: per-NFE adapters are for SFD-v; expected student.variable: true")
    if s.variable and not s.adapters and not getattr(model, "accepts_step_condition", False):
        raise BadInput(
            f"student.variable: SFD-v needs a network that accepts a step condition, or student.adapters > 0; "
            f"{model.spec} does not"
        )
    if t.teacher == "online":
        teacher_plan(t, model, student_grid(s, model, max(nfes_of(s))), s.rho)  # a bad solver name: before any work
    stages = []
    weights = init_weights(s, model) if s.init else None
    if weights is None and s.nfe == 1 and not s.variable:
        # The paper's second stage: one step is fine-tuned from the NFE-2 student, trained here first.
        weights, first = tune(cache, model, replace(s, nfe=2), t, None, progress)
        stages.append({"nfe": 2, **first})
    final, last = tune(cache, model, s, t, weights, progress)
    stages.append({"nfe": s.nfe, **last})
    arrays = {f"net.{k}": v.detach().cpu().float().numpy() for k, v in final.items()}
    arrays["grid"] = student_grid(s, model, s.nfe).numpy()
    meta = new_meta(
        "sfd",
        base_solver="euler+afs" if s.afs else "euler",
        nfe=s.nfe,
        network_passes=s.nfe * model.passes_per_call,
        afs=s.afs,
        grid=arrays["grid"].tolist(),
        student=asdict(s),
        model=model.spec,
        model_fingerprint=model.fingerprint,
        training={
            "seconds": time.time() - began,
            "iterations": t.iterations,
            "teacher": t.teacher,
            **({"teacher_solver": t.teacher_solver, "refine": t.refine} if t.teacher == "online" else {}),
            **{k: last[k] for k in ("samples", "first_loss", "final_loss")},
            "cleaned_gradients": sum(st["cleaned_gradients"] for st in stages),
            "stages": stages,  # NFE 1 from scratch: the NFE-2 stage, then the one-step stage
            "train": asdict(t),
        },
    )
    return Artifact(meta, arrays)


class NFEBalance:
    """SFD-v's `train.balance: nfe`: a running mean of each NFE's per-step distance (decay 0.9; an NFE's first value
    as it is), what that NFE's loss is divided by."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.means: dict[int, float] = {}

    def update(self, nfe: int, value: float) -> float:
        """Fold one step's distance into its NFE's mean and return that mean."""
        old = self.means.get(nfe)
        self.means[nfe] = value if old is None else self.decay * old + (1 - self.decay) * value
        return self.means[nfe]


def step_condition_parameters(net: Any) -> list[torch.nn.Parameter]:
    """The parameters that carry the network's step condition (SFD-v): what its `step_condition_parameters()`
    returns (none without one), and its per-NFE adapters (`student.adapters`)."""
    found = getattr(net, "step_condition_parameters", None)
    adapters = step_adapters.check(net, None)
    return (list(found()) if callable(found) else []) + (list(adapters.parameters()) if adapters is not None else [])


def tune(
    cache: TeacherCache,
    model: Denoiser,
    s: SFDStudent,
    t: SFDTrain,
    weights: dict[str, torch.Tensor] | None,
    progress: Callable[..., Any] | None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """One SFD fine-tuning run from `weights` (None: the model's own); the final (or EMA) weights and a summary."""
    began = time.time()
    nfes = nfes_of(s)
    student = copy.deepcopy(model)
    if s.adapters:
        torch.manual_seed(t.seed)  # the adapters' random A_n: the same on every rank and in every rerun
        step_adapters.attach(student.net, nfes, s.adapters)
    if weights is not None:
        own = student.net.state_dict()
        extra = sorted(set(weights) - set(own))
        if extra:
            raise BadInput(
                f"student.init: its weights hold parameters this student lacks (adapters of another "
                f"student.adapters or nfe_set?): {extra[:3]}"
            )
        student.net.load_state_dict({**own, **weights})  # adapters the init lacks start at their zero effect
    net = student.net.train().requires_grad_(True)
    ema = copy.deepcopy(net).requires_grad_(False) if t.ema else None
    conditioned = step_condition_parameters(net) if s.variable else []
    if t.step_lr_scale != 1.0 and not conditioned:
        raise BadInput(
            "train.step_lr_scale: applies to SFD-v (student.variable: true) on a network with "
            f"step_condition_parameters(); {model.spec} has none here"
        )
    if t.balance != "none" and len(nfes) < 2:
        raise BadInput(
            f"train.balance: {t.balance} weighs the NFEs of SFD-v against each other; expected student.variable: "
            f"true with two or more NFEs in student.nfe_set, got NFE {nfes}"
        )
    balance = NFEBalance()
    rest = [p for p in net.parameters() if all(p is not q for q in conditioned)]
    groups = [{"params": rest, "scale": 1.0}] + (
        [{"params": conditioned, "scale": t.step_lr_scale}] if conditioned else []
    )
    opt = torch.optim.Adam(groups, lr=t.lr, betas=(0.9, 0.999))
    # Under torchrun the network runs wrapped in DistributedDataParallel, which averages its gradients over the
    # ranks during backward; the student calls the wrapper and still reads the network's attributes. One
    # process: no wrapper, the network as is.
    wrapped = distributed.data_parallel(net)
    if wrapped is not net:
        student.route_calls(wrapped)
    train_idx, _ = cache.split(t.samples, t.heldout)
    online = t.teacher == "online"
    rows_per_batch = t.batch if online else min(t.batch, len(train_idx))
    size = distributed.rank_size()[1]
    if rows_per_batch < size:
        raise BadInput(
            f"train.batch: the global batch ({rows_per_batch} rows) is split over {size} ranks; "
            f"expected at least one row per rank"
        )
    rng = np.random.default_rng(t.seed)
    torch.manual_seed(t.seed)
    losses, cleaned = [], 0
    for it in range(1, t.iterations + 1):
        if t.lr_schedule == "cosine":  # a measured alternative to the paper's step (docs/students.md "SFD")
            decay = 0.5 * (1 + np.cos(np.pi * (it - 1) / t.iterations))
        else:
            decay = 1.0 if it <= t.iterations // 2 else 0.1
        for g in opt.param_groups:
            g["lr"] = t.lr * g["scale"] * decay
        nfe = int(rng.choice(nfes))
        set_step(student, nfe if s.variable else None)
        grid = student_grid(s, model, nfe)
        if online:
            # Fresh noise every iteration (per-sample seeds); the frozen original network is the teacher.
            seeds = distributed.shard(fresh_seeds(rng, rows_per_batch))
            share = rows_per_batch
            x = initial_noise(seeds, model.shape, model.dtype, model.device) * float(grid[0])
            cond = draw_cond(model, seeds)
            cond = None if cond is None else cond.to(model.device)
            targets = online_targets(model, teacher_plan(t, model, grid, s.rho), x, cond, t.refine + 1)
            rows = len(seeds)
        else:
            idx = np.sort(rng.choice(train_idx, size=rows_per_batch, replace=False))
            # Under torchrun the global batch is split over the ranks, a block per rank (docs/distributed.md).
            idx, share = distributed.shard(idx), len(idx)
            x, cond = cache.start(idx, model)
            targets = cache.states_at(idx, grid[1:].numpy(), dtype=x.dtype, device=x.device)
            rows = len(idx)
        total = 0.0

        def train_step(
            k: int,
            sigma_next: float,
            out: torch.Tensor,
            targets: torch.Tensor = targets,
            rows: int = rows,
            share: int = share,
            nfe: int = nfe,
        ) -> bool:
            """After student step k: the distance to the teacher, one Adam step; always cut the graph (the next step
            starts from the student's own detached state). With `train.loss: endpoint` only the last step does
            this, and the graph runs back through every step before it."""
            nonlocal total, cleaned
            if t.loss == "endpoint" and k < targets.shape[1] - 1:
                return False
            if s.afs and k == 0:  # no network in the AFS step: nothing to train
                return True
            diff = (out - targets[:, k]).flatten(1)
            per_row = (diff.abs() if t.distance == "l1" else diff.pow(2)).sum(1)
            loss = per_row.mean()
            if t.balance == "nfe":
                # the global batch's mean (every rank divides by the same number), in float64 against overflow
                rowsum = per_row.detach().double().sum()
                seen = distributed.all_sum(torch.stack([rowsum, torch.full_like(rowsum, float(rows))]))
                loss = loss / max(balance.update(nfe, float(seen[0] / seen[1])), 1e-12)
            if size > 1:
                # DDP averages the ranks' gradients equally; weighting this rank's mean by rows * size / global
                # rows makes that average the gradient of the mean over the global batch (unequal shares too).
                loss = loss * (rows * size / share)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in net.parameters():
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    cleaned += 1
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
            opt.step()
            if ema is not None:
                ema_update(ema, net, t.ema)
            total += float(per_row.detach().mean())  # this rank's own mean (rank 0 reports it)
            return True

        euler = euler_plan(s, grid, nfe)
        euler.info.solve(student, x, euler.sigmas, cond=cond, afs=s.afs, on_step=train_step)
        losses.append(total)
        if progress:
            progress(1, info=f"{t.distance.upper()} {total:.3e} (NFE {nfe})")
    final = ema if ema is not None else net
    summary = {
        "seconds": time.time() - began,
        "samples": t.iterations * rows_per_batch if online else len(train_idx),
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-10:])),
        "cleaned_gradients": cleaned,
    }
    return {k: v.detach().clone() for k, v in final.state_dict().items()}, summary


def load(artifact: Artifact, model: Denoiser | None) -> SFDSolver:
    """The fine-tuned network (a copy of the model's, with its adapters if any, and the stored weights) and its grid,
    every stored value checked against the settings and that copy before any is loaded."""
    s = stored_settings(artifact, SFDStudent)
    where = artifact.path
    if s.nfe != int(artifact.meta["nfe"]):
        raise BadInput(f"{where}: meta.student.nfe ({s.nfe}) differs from meta.nfe ({artifact.meta['nfe']})")
    if model is None or model.net is None:
        raise BadInput(f"{where}: an SFD artifact needs its model ({artifact.meta.get('model')})")
    names = {k[4:] for k in artifact.arrays if k.startswith("net.")}  # none: the untrained student
    if s.adapters:
        if not s.variable:
            raise BadInput(f"{where}: meta.student.adapters ({s.adapters}) needs meta.student.variable: true")
        claimed, saved = nfes_of(s), step_adapters.stored_nfes(names)
        if names and saved != set(claimed):
            # checked on the names before copying the network and building a pair per claimed NFE, which a forged
            # nfe_set could make huge
            listed = ", ".join(map(str, claimed[:6])) + (f", ... ({len(claimed)} in all)" if len(claimed) > 6 else "")
            raise BadInput(
                f"{where}: meta.student.nfe_set names NFE {listed}, but its adapter weights are for NFE {sorted(saved)}"
            )
    den = copy.deepcopy(model)
    if s.adapters:
        with torch.random.fork_rng(devices=[]):  # the adapters' random start must not move the caller's generator
            step_adapters.attach(den.net, claimed, s.adapters)
    state = den.net.state_dict()
    if names and names != set(state):  # none: the model's own weights
        raise BadInput(
            f"{where}: its weights are for another network than {model.spec} "
            f"({len(names ^ set(state))} parameter names differ)"
        )
    weights = {name: artifact.array(f"net.{name}", shape=tuple(ref.shape)) for name, ref in state.items() if names}
    if s.variable:
        lo, hi = max(s.sigma_min, model.sigma_min), min(s.sigma_max, model.sigma_max)
        if not (0 < lo < hi and s.rho > 0):
            raise BadInput(
                f"{where}: meta.student: need 0 < sigma_min < sigma_max (within the model's range) and rho > 0, "
                f"got sigma_min={s.sigma_min}, sigma_max={s.sigma_max}, rho={s.rho}"
            )
        grid = student_grid(s, model, s.nfe)
    else:
        stored = artifact.array("grid", ndim=1)
        steps = s.nfe + (1 if s.afs else 0)
        if len(stored) != steps + 1 or np.any(np.diff(stored) >= 0) or stored[-1] <= 0:
            raise BadInput(f"{where}: array 'grid' must hold {steps + 1} decreasing positive sigmas (NFE {s.nfe})")
        grid = torch.tensor(stored)
    if weights:
        den.net.load_state_dict({k: torch.from_numpy(v).to(state[k].dtype) for k, v in weights.items()})
    den.net.eval().requires_grad_(False)
    return SFDSolver(den, s, grid, s.nfe, s.nfe if s.variable else None)


def serves(artifact: Artifact) -> list[int]:
    """SFD-v samples at every NFE of its `nfe_set` (the ones its step condition and adapters were trained on), SFD
    at its own."""
    return sorted(set(nfes_of(stored_settings(artifact, SFDStudent))) | {int(artifact.meta["nfe"])})


def untrained(artifact: Artifact) -> Artifact:
    """The original network: no weights in the artifact means the model's own (load() keeps them)."""
    return Artifact(
        artifact.meta, {k: v for k, v in artifact.arrays.items() if not k.startswith("net.")}, artifact.path
    )


register(
    Method(
        "sfd",
        SFDStudent,
        SFDTrain,
        fit,
        load,
        untrained,
        "fine-tunes the network for few steps (SFD, SFD-v)",
        work=lambda s, t: t.iterations * (2 if s.nfe == 1 and not s.init and not s.variable else 1),
        arrays=("net.*", "grid"),
        serves=serves,
    )
)
