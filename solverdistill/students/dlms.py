"""DLMS: a learned linear multistep solver (docs/students.md "DLMS"). The reference implementation.

Step n (from t_{n-1} to t_n), data form of the first-order exponential integrator:

    D_{n-1} = D(x_{n-1}, k_{n-1} t_{n-1})                 pushed into a buffer of the last p outputs
    (a_n, t_n, k_n) = g(features_{n-1}, t_{n-1}, n-1)       the designer
    x_n = (t_n / t_{n-1}) x_{n-1} + (1 - t_n / t_{n-1}) sum_j a_{n,j} D_{n-j}

Coefficients are offsets from an initial rule with sum_j a_{n,j} = 1 by construction; t_n is a learned fraction
of the remaining log-sigma interval (monotone by construction, the last step lands on t_min); k_n in
[1 - r, 1 + r] (or any k_n > 0 with `query: free`) scales the time the model is queried at. Heads start at zero, so the untrained student is the
initial rule on the initial grid exactly. Every part can be switched off for ablations.

The student is a coefficient source for the stepping core (solvers/multistep.py): in its terms
a_n = t_n / t_{n-1} and b_{n,j} = (1 - a_n) a_{n,j}, per sample.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed, grids
from ..artifacts import Artifact, new_meta
from ..errors import BadInput
from ..evaluation import cache_endpoints, rmse
from ..solvers.base import Callback
from ..solvers.multistep import CoefficientSource, Weights, run_multistep
from ..solvers.tables import ADAMS_BASHFORTH, dpmpp_table
from . import Method, TrainSection, ema_update, register, stored_settings
from .feature_loss import FeatureNet, feature_network

if TYPE_CHECKING:
    from ..models.base import Denoiser
    from ..teacher.cache import TeacherCache

FEATURES = 64


@dataclass
class DLMSStudent:
    method: str = "dlms"
    nfe: int = field(default=5, metadata={"min": 1})
    order: int = field(default=4, metadata={"min": 1})
    afs: bool = True
    init: str = field(default="dpm++", metadata={"choices": ("plms", "dpm++")})
    designer: str = field(default="network", metadata={"choices": ("network", "global", "hybrid")})
    # The initial grid; `auto`: the one of AUTO_SCHEDULES whose rule has the lowest validation RMSE, untrained or
    # after `train.probe` iterations.
    schedule: str = "polynomial:7"
    learn_grid: bool = True
    time_scaling: bool = True
    scale_range: float = field(default=0.2, metadata={"min": 0.0, "max": 0.9})  # k = 1 +- r stays > 0
    # `scaled`: the paper's k in [1 - r, 1 + r]; `free`: k = exp(output), any positive factor, so the time the
    # network is queried at is learned on its own (LD3's decoupled times, Tong et al. 2025).
    query: str = field(default="scaled", metadata={"choices": ("scaled", "free")})
    features: str = field(default="auto", metadata={"choices": ("auto", "denoised", "bottleneck")})


@dataclass
class DLMSTrain(TrainSection):
    lr: float = field(default=5e-3, metadata={"min": 0.0})
    lr_decay: str = field(default="none", metadata={"choices": ("cosine", "none")})
    clip: float = field(default=0.0, metadata={"min": 0.0})  # gradient-norm clipping; 0 = off
    # Decay of an exponential moving average of the designer's weights; when set, validation, the kept state and
    # the artifact use the average (0 = off; 0.99 measured no better on the mixtures, README "Results").
    ema: float = field(default=0.0, metadata={"min": 0.0, "max": 0.9999})
    restarts: int = field(default=1, metadata={"min": 1})  # independent runs; the best by validation is kept
    # `schedule: auto` scores each candidate grid after this many iterations of training (0: untrained), since the
    # best start is not always the one that trains best (README "Results").
    probe: int = field(default=0, metadata={"min": 0})
    batch: int = field(default=64, metadata={"min": 1})
    iterations: int = field(default=300, metadata={"min": 0})
    validation: int = field(default=64, metadata={"min": 1})  # taken from the training pool, for early stopping
    loss: str = field(default="both", metadata={"choices": ("trajectory", "endpoint", "both")})
    final_weight: float = field(default=3.0, metadata={"min": 0.0})
    # `absolute`: each step's squared error as it is (the paper), so the noisy early steps, whose states are tens of
    # times larger, outweigh the endpoint; `relative`: each step's error divided by the teacher state's mean square
    # there (detached), so every step counts in the same units (docs/students.md "DLMS").
    step_scale: str = field(default="absolute", metadata={"choices": ("absolute", "relative")})
    # The paper's final-step term in the feature network of the model's FD (students/feature_loss.py), added to
    # the L2 terms with this weight; the distance is divided by the features' variance over the validation
    # endpoints, so the weight carries over between feature networks.
    final_loss: str = field(default="l2", metadata={"choices": ("l2", "features")})
    feature_weight: float = field(default=1.0, metadata={"min": 0.0})
    window: int = field(default=0, metadata={"min": 0})  # steps per gradient window; 0 = whole trajectory
    eval_every: int = field(default=25, metadata={"min": 1})
    patience: int = field(default=0, metadata={"min": 0})  # evaluations without improvement before stopping
    seed: int = 0


def initial_coefficients(grid: torch.Tensor, order: int, init: str, afs: bool) -> torch.Tensor:
    """[N, p] data-space weights, newest first, summing to 1 per step (warm-up rows use fewer entries)."""
    n = len(grid) - 1
    a = torch.zeros(n, order, dtype=torch.float64)
    if init == "plms":
        for i in range(n):
            row = ADAMS_BASHFORTH[min(i + 1, order, 4) - 1]
            a[i, : len(row)] = torch.tensor(row)
    else:
        # dpm++3m's update is x' = (t'/t) x + sum_j b_j D_j with sum_j b_j = 1 - t'/t: divide to get weights.
        b = torch.as_tensor(dpmpp_table(grid, min(3, order), lower_order_final=True).b)[:, :order]
        a[:, : b.shape[1]] = b / (1 - grid[1:] / grid[:-1])[:, None]
    return a


def sinusoidal(v: torch.Tensor, dim: int = 8) -> torch.Tensor:
    freqs = torch.exp(torch.linspace(0, math.log(100.0), dim // 2, dtype=v.dtype, device=v.device))
    return torch.cat([torch.sin(v[:, None] * freqs), torch.cos(v[:, None] * freqs)], 1)


def pooled(d: torch.Tensor) -> torch.Tensor:
    """64 numbers per sample: an image averaged to 8x8 and over channels, any other shape pooled (or padded)."""
    if d.ndim == 4:
        return F.adaptive_avg_pool2d(d, 8).mean(1).flatten(1)
    flat = d.flatten(1)
    if flat.shape[1] >= FEATURES:
        return F.adaptive_avg_pool1d(flat[:, None], FEATURES)[:, 0]
    return F.pad(flat, (0, FEATURES - flat.shape[1]))


def sigmoid(v: torch.Tensor) -> torch.Tensor:
    """The logistic function through tanh. torch.sigmoid and F.silu round differently in their vectorised loop and
    its scalar tail, so a sample's value depended on its place in the batch; tanh (like exp and log) runs one
    vectorised routine over the whole tensor, and the rest is single IEEE operations."""
    return 0.5 * torch.tanh(0.5 * v) + 0.5


def silu(v: torch.Tensor) -> torch.Tensor:
    """F.silu through `sigmoid`, for the same reason."""
    return v * sigmoid(v)


def rowwise(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` computed as one small matmul per row (batched), so a sample's result never depends on the batch
    around it: a plain Linear's matmul kernel blocks rows by batch size, which moved DLMS samples by up to 5e-6
    between batch sizes (and a designer feeds its outputs back into the grid, which amplifies that)."""
    b = x.shape[0]
    return torch.baddbmm(layer.bias.expand(b, 1, -1), x[:, None], layer.weight.T.expand(b, -1, -1))[:, 0]


class NetworkDesigner(nn.Module):
    """~9k parameters: features -> Linear(64,128), SiLU, Linear(128,4), with embeddings of t and the step index;
    one zero-initialised head gives p-1 coefficient offsets, a time logit and a scale logit. Every layer runs
    through `rowwise`, so sampling does not depend on the batch size."""

    def __init__(self, order: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, 128), nn.SiLU(), nn.Linear(128, 4))
        self.t_embed = nn.Sequential(nn.Linear(8, 8), nn.SiLU())
        self.n_embed = nn.Sequential(nn.Linear(8, 8), nn.SiLU())
        self.head = nn.Linear(4 + 8 + 8, order + 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, feats: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        step_v = torch.full_like(t, float(step))
        body = rowwise(self.body[2], silu(rowwise(self.body[0], feats)))
        t_emb = silu(rowwise(self.t_embed[0], sinusoidal(torch.log(t))))
        n_emb = silu(rowwise(self.n_embed[0], sinusoidal(step_v)))
        return rowwise(self.head, torch.cat([body, t_emb, n_emb], 1))


class GlobalDesigner(nn.Module):
    """No network: per-step parameters shared by every sample (a sample-independent grid)."""

    def __init__(self, order: int, steps: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(steps, order + 1))

    def forward(self, feats: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return self.table[step].expand(t.shape[0], -1)


class HybridDesigner(NetworkDesigner):
    """The network designer plus a per-step table (as `global`): the table carries what every sample shares, so the
    network only learns each sample's departure from it."""

    def __init__(self, order: int, steps: int) -> None:
        super().__init__(order)
        self.table = nn.Parameter(torch.zeros(steps, order + 1))

    def forward(self, feats: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return super().forward(feats, t, step) + self.table[step]


DESIGNERS: dict[str, Callable[[int, int], nn.Module]] = {
    "network": lambda order, steps: NetworkDesigner(order),
    "global": GlobalDesigner,
    "hybrid": HybridDesigner,
}

# `schedule: auto` tries these initial grids (what the handcrafted solvers use by default, README "Solvers").
AUTO_SCHEDULES = ("polynomial:7", "logsnr", "time_uniform:2", "time_uniform")


def initial_grid(cfg: DLMSStudent, sigma_min: float, sigma_max: float) -> torch.Tensor:
    if cfg.schedule == "auto":
        raise BadInput("student.schedule: auto is resolved when fitting; a stored student names its grid")
    return grids.make_grid(cfg.schedule, cfg.nfe + (1 if cfg.afs else 0), sigma_min, sigma_max)


class DLMS(nn.Module):
    def __init__(self, cfg: DLMSStudent, grid: torch.Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        steps = len(grid) - 1
        self.steps, self.order = steps, cfg.order
        self.register_buffer("init_grid", grid)
        self.register_buffer("init_coefs", initial_coefficients(grid, cfg.order, cfg.init, cfg.afs))
        # Offsets that make the untrained fraction f_n reproduce the initial grid: logit of
        # (log t_n - log t_{n-1}) / (log t_min - log t_{n-1}); the last step is forced to t_min.
        lg = torch.log(grid)
        frac = ((lg[1:] - lg[:-1]) / (lg[-1] - lg[:-1])).clamp(1e-6, 1 - 1e-6)
        self.register_buffer("time_offset", torch.log(frac) - torch.log1p(-frac))
        mask = torch.zeros(steps, cfg.order)  # which history slots exist at each step
        for i in range(steps):
            mask[i, : min(i + 1, cfg.order)] = 1
        self.register_buffer("mask", mask)
        self.designer = DESIGNERS[cfg.designer](cfg.order, steps)

    per_sample_grid = True  # the callback's sigmas differ per sample: `sample` stores them
    passes_per_call = 1  # set by `load` from the model

    @property
    def nfe(self) -> int:
        return self.cfg.nfe

    @property
    def network_passes(self) -> int:
        return self.nfe * self.passes_per_call

    @property
    def afs(self) -> bool:
        return self.cfg.afs

    def features(self, model: Any, denoised: torch.Tensor, called: bool = True) -> torch.Tensor:
        """Designer input. `called` is False on the AFS step: no network ran, so a backend's bottleneck hook
        would hold another batch's activations; the pooled AFS estimate is used there."""
        if called and self.cfg.features in ("auto", "bottleneck"):
            hook = getattr(model, "last_features", None)
            if hook is not None:
                return hook.detach().flatten(1)[:, :FEATURES].to(denoised.dtype)
            if self.cfg.features == "bottleneck":
                raise BadInput("student.features: bottleneck asked for, but this model exposes no bottleneck")
        return pooled(denoised.detach())

    def rule(self, raw: torch.Tensor, t: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The designer's raw outputs -> (coefficients [B, p], next time [B], next scale [B])."""
        p, dt = self.order, t.dtype
        offsets = raw[:, : p - 1] * self.mask[step, 1:].to(dt)
        rest = self.init_coefs[step, 1:].to(dt) + offsets
        coefs = torch.cat([1 - rest.sum(1, keepdim=True), rest], 1) * self.mask[step].to(dt)
        t_min = self.init_grid[-1].to(dt)
        if step == self.steps - 1:
            t_next = torch.full_like(t, float(self.init_grid[-1]))
        else:
            logit = self.time_offset[step].to(dt) + (raw[:, p - 1] if self.cfg.learn_grid else 0.0)
            f = sigmoid(logit)
            t_next = torch.exp(torch.log(t) + f * (torch.log(t_min) - torch.log(t))).clamp(min=float(t_min))
        if self.cfg.time_scaling and self.cfg.query == "free":
            k_next = torch.exp(raw[:, p])
        elif self.cfg.time_scaling:
            k_next = 1 + self.cfg.scale_range * (2 * sigmoid(raw[:, p]) - 1)
        else:
            k_next = torch.ones_like(t)
        return coefs, t_next, k_next

    def solve(
        self, model: Any, x: torch.Tensor, cond: torch.Tensor | None = None, callback: Callback | None = None
    ) -> torch.Tensor:
        """Sample: the stepping core fed by this student's rule. Returns x at t_min; the callback sees each
        sample's own times."""
        return run_multistep(model, x, Rule(self, model, x), cond=cond, afs=self.cfg.afs, callback=callback)

    def train_pass(
        self,
        model: Any,
        x: torch.Tensor,
        cond: torch.Tensor | None,
        step_loss: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None],
        window: int = 0,
    ) -> float:
        """One training trajectory: `step_loss(n, t_n, x_n)` (a scalar or None) after each step, backward once
        per window of `window` steps (0: the whole trajectory), the graph cut between windows. Returns the loss."""
        pending, total = None, 0.0

        def on_step(n: int, t_next: torch.Tensor, x_next: torch.Tensor) -> bool:
            nonlocal pending, total
            term = step_loss(n, t_next, x_next)
            if term is not None:
                pending = term if pending is None else pending + term
            if not ((window and (n + 1) % window == 0) or n == self.steps - 1):
                return False
            if pending is not None:
                if pending.requires_grad:
                    pending.backward()
                total += float(pending.detach())
            pending = None
            return True

        run_multistep(model, x, Rule(self, model, x), cond=cond, afs=self.cfg.afs, on_step=on_step)
        return total

    def describe(self) -> dict:
        return {
            "solver": "dlms",
            "nfe": self.nfe,
            "afs": self.afs,
            "steps": self.steps,
            "grid": self.init_grid.tolist(),
            **{k: v for k, v in asdict(self.cfg).items() if k != "method"},
        }


class Rule(CoefficientSource):
    """DLMS as a coefficient source for one batch: each sample's time t and time scale k, advanced by the
    designer after every denoiser output."""

    def __init__(self, student: DLMS, model: Any, x: torch.Tensor) -> None:
        self.student, self.model = student, model
        self.steps, self.history = student.steps, student.order
        self.t = torch.full((x.shape[0],), float(student.init_grid[0]), dtype=x.dtype, device=x.device)
        self.k = torch.ones_like(self.t)

    def first_sigma(self) -> float:
        return float(self.student.init_grid[0])

    def sigma(self, i: int) -> torch.Tensor:
        return self.t

    def query(self, i: int) -> torch.Tensor:
        return self.k * self.t

    def weights(self, i: int, denoised: torch.Tensor, called: bool) -> Weights:
        s, t = self.student, self.t
        raw = s.designer(s.features(self.model, denoised, called=called).to(t.dtype), t, i)
        coefs, t_next, k_next = s.rule(raw, t, i)
        ratio = t_next / t
        self.t, self.k = t_next, k_next
        return Weights(ratio, [(1 - ratio) * coefs[:, j] for j in range(coefs.shape[1])], [], t_next)

    def detach(self) -> None:
        self.t, self.k = self.t.detach(), self.k.detach()


@dataclass
class FeatureTerm:
    """The final-step feature distance: the network, the features' variance it is divided by, and its weight."""

    net: FeatureNet
    scale: float
    weight: float

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            want = self.net(target)
        return self.weight * (self.net(x) - want).pow(2).mean() / self.scale


def feature_term(t: DLMSTrain, model: Any, cache: TeacherCache, val_idx: np.ndarray) -> FeatureTerm | None:
    """None for final_loss: l2; otherwise the model's feature network (or BadInput naming train.final_loss)."""
    if t.final_loss != "features":
        return None
    net = feature_network(model)
    with torch.no_grad():
        f = net(cache.endpoints(val_idx).to(device=model.device, dtype=model.dtype))
    return FeatureTerm(net, max(float(f.double().var(0).mean()), 1e-12), t.feature_weight)


def check(model: Any, s: DLMSStudent, t: DLMSTrain) -> None:
    """Before the teacher runs: a feature loss needs a feature network for this model (BadInput otherwise)."""
    if t.final_loss == "features":
        feature_network(model)


def _loss_fn(
    cache: TeacherCache, idx: np.ndarray, s: DLMSStudent, t: DLMSTrain, steps: int, feats: FeatureTerm | None = None
) -> Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None]:
    weights = np.zeros(steps)
    if t.loss in ("trajectory", "both"):
        weights[:] = 1.0
    if t.loss in ("endpoint", "both"):
        weights[-1] += t.final_weight
    if weights.sum() == 0 and not (feats and feats.weight > 0):
        raise BadInput("train.final_weight: must be > 0 with train.loss: endpoint (nothing would be trained)")
    weights /= max(weights.sum(), 1.0e-300)
    last = steps - 1

    def step_loss(n: int, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        if weights[n] == 0 and not (n == last and feats):
            return None
        if not bool(torch.isfinite(sigma).all()):
            return x.sum() * float("nan")  # the NaN guard skips this step
        # Differentiable in sigma: the target moves with a learned time.
        target = cache.states_at(idx, sigma[:, None].double(), dtype=x.dtype, device=x.device)[:, 0]
        loss = weights[n] * (x - target).pow(2).mean()
        if t.step_scale == "relative":
            loss = loss / target.detach().pow(2).mean().clamp_min(1e-12)
        if n == last and feats:
            loss = loss + feats(x, target.detach())
        return loss

    return step_loss


@dataclass
class Run:
    """One training run: the best state by validation RMSE and how it got there."""

    best: float
    state: dict
    history: list
    skipped: int
    iterations: int


def train_once(
    student: DLMS,
    model: Denoiser,
    cache: TeacherCache,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    s: DLMSStudent,
    t: DLMSTrain,
    seed: int,
    progress: Callable[..., Any] | None = None,
    feats: FeatureTerm | None = None,
) -> Run:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(student.designer.parameters(), lr=t.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(t.iterations, 1)) if t.lr_decay == "cosine" else None
    target_end = cache.endpoints(val_idx)

    # What is validated and kept: the live student, or its moving average with `train.ema`.
    kept = copy.deepcopy(student).requires_grad_(False) if t.ema else student

    def evaluate() -> float:
        return rmse(cache_endpoints(kept, model, cache, val_idx), target_end)

    history = [(0, evaluate())]
    best, best_state, stale, skipped, it = history[0][1], copy.deepcopy(kept.state_dict()), 0, 0, 0
    for it in range(1, t.iterations + 1):
        idx = np.sort(rng.choice(train_idx, size=min(t.batch, len(train_idx)), replace=False))
        # Under torchrun every rank draws the same global batch and trains on its contiguous share; gradients
        # (and the loss) are averaged with each share's weight, so every rank takes the one-process step.
        idx, share = distributed.shard(idx), len(idx)
        opt.zero_grad(set_to_none=True)
        x, cond = cache.start(idx, model)
        loss = student.train_pass(model, x, cond, _loss_fn(cache, idx, s, t, student.steps, feats), window=t.window)
        grads = [p.grad for p in student.designer.parameters() if p.grad is not None]
        if distributed.active():
            distributed.average_gradients(grads, len(idx), share)
            loss = float(distributed.all_sum(torch.tensor(loss * len(idx) / share, dtype=torch.float64)))
        if not math.isfinite(loss) or any(not torch.isfinite(g).all() for g in grads):
            skipped += 1  # NaN guard: skip the step, count it, report it
        else:
            if t.clip:
                torch.nn.utils.clip_grad_norm_(student.designer.parameters(), t.clip)
            opt.step()
            if t.ema:
                ema_update(kept, student, t.ema)
        if sched:
            sched.step()
        if it % t.eval_every == 0 or it == t.iterations:
            rm = evaluate()
            history.append((it, rm))
            if rm < best:
                best, best_state, stale = rm, copy.deepcopy(kept.state_dict()), 0
            else:
                stale += 1
            if t.patience and stale >= t.patience:
                break
        if progress:
            progress(1, info=f"loss {loss:.3e}  validation rmse {history[-1][1]:.4f} (best {best:.4f}, kept)")
    return Run(best, best_state, history, skipped, it)


def choose_schedule(
    s: DLMSStudent,
    t: DLMSTrain,
    model: Denoiser,
    cache: TeacherCache,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    progress: Callable[..., Any] | None = None,
    feats: FeatureTerm | None = None,
) -> tuple[DLMSStudent, dict[str, float], dict[str, float]]:
    """`schedule: auto`: the settings with the initial grid (of AUTO_SCHEDULES) whose rule has the lowest validation
    RMSE, with every candidate's untrained RMSE and (with `train.probe`) its best RMSE over a short fit. Training
    only moves the rule from there, so the start matters: the best handcrafted grid differs between models and
    NFEs, and the best untrained start is not always the one that trains best (README "Results")."""
    if s.schedule != "auto":
        return s, {}, {}
    target, initial, probed = cache.endpoints(val_idx), {}, {}
    for name in AUTO_SCHEDULES:
        cand = replace(s, schedule=name)
        # The designer's initial weights draw from the global RNG: seeded as the fit seeds them, and the caller's
        # random state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed)
            student = DLMS(cand, initial_grid(cand, model.sigma_min, model.sigma_max))
            student = student.to(device=model.device, dtype=model.dtype)
            initial[name] = rmse(cache_endpoints(student, model, cache, val_idx), target)
            if t.probe:
                short = replace(t, iterations=t.probe, eval_every=min(t.eval_every, t.probe), patience=0)
                probed[name] = train_once(
                    student, model, cache, train_idx, val_idx, cand, short, t.seed, progress, feats
                ).best
    scores = probed or initial
    return replace(s, schedule=min(scores, key=scores.__getitem__)), initial, probed


def fit(
    cache: TeacherCache, model: Denoiser, s: DLMSStudent, t: DLMSTrain, progress: Callable[..., Any] | None = None
) -> Artifact:
    began = time.time()
    if s.order > 4 and s.init == "plms":
        raise BadInput(f"student.order: plms init has coefficients up to order 4, got {s.order}")
    train_idx, _ = cache.split(t.samples, t.heldout)
    if t.validation >= len(train_idx):
        raise BadInput(f"train.validation: {t.validation} leaves no training trajectories out of {len(train_idx)}")
    # Model selection uses its own validation trajectories, never the held-out ones the metrics report.
    train_idx, val_idx = train_idx[: -t.validation], train_idx[-t.validation :]
    ranks = distributed.rank_size()[1]
    if min(t.batch, len(train_idx)) < ranks:
        raise BadInput(f"train.batch: {min(t.batch, len(train_idx))} rows cannot be split over {ranks} processes")
    feats = feature_term(t, model, cache, val_idx)  # before any work: a model without features is refused here
    s, schedule_scores, probe_scores = choose_schedule(s, t, model, cache, train_idx, val_idx, progress, feats)
    grid = initial_grid(s, model.sigma_min, model.sigma_max)
    # Training on a few trajectories is high-variance: independent restarts, the best by validation is kept.
    runs = []
    for r in range(t.restarts):
        # The designer's initial weights are drawn here: seed them per restart, or two identical runs differ.
        # fork_rng leaves the caller's global random state as it was (train_once seeds it too).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed + r)
            student = DLMS(s, grid).to(device=model.device, dtype=model.dtype)
            runs.append(train_once(student, model, cache, train_idx, val_idx, s, t, t.seed + r, progress, feats))
    best = min(runs, key=lambda run: run.best)
    student.load_state_dict(best.state)
    arrays = {f"designer.{k}": v.detach().cpu().double().numpy() for k, v in student.designer.state_dict().items()}
    arrays["init_grid"] = student.init_grid.cpu().numpy()
    meta = new_meta(
        "dlms",
        base_solver=f"dlms[{s.init}]",
        nfe=s.nfe,
        network_passes=s.nfe * model.passes_per_call,
        afs=s.afs,
        grid=student.init_grid.tolist(),
        student=asdict(s),
        model=model.spec,
        model_fingerprint=model.fingerprint,
        training={
            "seconds": time.time() - began,
            "iterations": sum(r.iterations for r in runs),
            "restarts": t.restarts,
            "validation_rmse_by_restart": [r.best for r in runs],
            "samples": len(train_idx),
            "skipped_steps": sum(r.skipped for r in runs),
            "validation": len(val_idx),
            "validation_rmse_history": best.history,
            "initial_rmse_by_schedule": schedule_scores,  # `schedule: auto` only
            "probe_rmse_by_schedule": probe_scores,  # `schedule: auto` with `train.probe` only
            "train": asdict(t),
        },
    )
    return Artifact(meta, arrays)


def load(artifact: Artifact, model: Denoiser) -> DLMS:
    """The stored rule: settings from meta.student, the initial grid and the designer's parameters, each checked
    against the settings before anything is built from them."""
    cfg = stored_settings(artifact, DLMSStudent)
    where = artifact.path
    if cfg.nfe != int(artifact.meta["nfe"]):
        raise BadInput(f"{where}: meta.student.nfe ({cfg.nfe}) differs from meta.nfe ({artifact.meta['nfe']})")
    if cfg.order > 64:  # the designer and its tables grow with the order: a forged one must not exhaust memory
        raise BadInput(f"{where}: meta.student.order: expected at most 64, got {cfg.order}")
    grid = artifact.array("init_grid", ndim=1)
    steps = cfg.nfe + (1 if cfg.afs else 0)
    if len(grid) != steps + 1:
        raise BadInput(f"{where}: array 'init_grid' must hold {steps + 1} sigmas, has {len(grid)}")
    if np.any(np.diff(grid) >= 0) or grid[-1] <= 0:
        raise BadInput(f"{where}: array 'init_grid' must be strictly decreasing positive sigmas")
    student = DLMS(cfg, torch.tensor(grid, dtype=torch.float64))
    state = student.designer.state_dict()
    unexpected = sorted(
        {k.removeprefix("designer.") for k in artifact.arrays if k.startswith("designer.")} - set(state)
    )
    if unexpected:  # missing ones are reported by artifact.array below
        raise BadInput(
            f"{where}: array 'designer.{unexpected[0]}' is not a parameter of the designer meta.student describes "
            f"(designer {cfg.designer!r}, order {cfg.order})"
        )
    for name, ref in state.items():
        arr = artifact.array(f"designer.{name}", shape=tuple(ref.shape))
        state[name] = torch.from_numpy(arr).to(ref.dtype)
    student.designer.load_state_dict(state)
    student.passes_per_call = int(model.passes_per_call)
    return student.to(device=model.device, dtype=model.dtype)


def untrained(artifact: Artifact) -> Artifact:
    """Zero heads (or the global table): the initial rule on the initial grid."""
    arrays = {
        k: (np.zeros_like(v) if k.startswith(("designer.head.", "designer.table")) else v)  # hybrid: both
        for k, v in artifact.arrays.items()
    }
    return Artifact(artifact.meta, arrays, artifact.path)


register(
    Method(
        "dlms",
        DLMSStudent,
        DLMSTrain,
        fit,
        load,
        untrained,
        "learned multistep coefficients, grid and time scaling",
        work=lambda s, t: t.iterations * t.restarts + (t.probe * len(AUTO_SCHEDULES) if s.schedule == "auto" else 0),
        arrays=("designer.*", "init_grid"),
        check=check,
    )
)
