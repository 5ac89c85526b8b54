"""Analytic Gaussian-mixture models with an exact denoiser (`gmm:` specs).

Component k: x0 ~ N(mu_k, Q_k diag(lam_k) Q_k^T + s_k^2 I), Q_k orthonormal (d x r). The noisy marginal at
sigma is the same mixture with every covariance plus sigma^2 I, so E[x0 | x] is exact and costs O(K d r) per
sample through the Woodbury identity; posterior weights use log-sum-exp. Parameters are generated from a seed
with numpy's PCG64, so a spec names the same model on every machine.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from ..errors import BadInput
from .base import Denoiser


@dataclass(frozen=True)
class GMMParams:
    shape: tuple[int, ...] = (2, 4, 4)
    components: int = 4
    rank: int = 3
    seed: int = 0
    std: float = 0.02  # isotropic std s_k around each component
    spread: float = 0.2  # per-pixel std of the low-rank part (sqrt(sum lam / d))
    layout: str = "smooth"  # means and directions: "smooth" images, "random" vectors, "ring" (2-D circle)

    def __post_init__(self) -> None:
        d = math.prod(self.shape)
        if not self.shape or any(n < 1 for n in self.shape):
            raise BadInput(f"gmm shape: every dimension must be >= 1, got {self.shape}")
        if self.components < 1:
            raise BadInput(f"gmm components: must be >= 1, got {self.components}")
        if not 0 <= self.rank <= d:
            raise BadInput(f"gmm rank: must be between 0 and the dimension {d}, got {self.rank}")
        if not self.std > 0 or not self.spread >= 0:
            raise BadInput(f"gmm std must be > 0 and spread >= 0, got std={self.std}, spread={self.spread}")
        if self.layout not in ("smooth", "random", "ring"):
            raise BadInput(f"gmm layout: choose smooth, random or ring, got {self.layout!r}")


PRESETS = {
    "tiny": GMMParams(shape=(2, 4, 4), components=4, rank=3, seed=0, std=0.1, spread=0.1),
    "ring2d": GMMParams(shape=(2,), components=8, rank=0, seed=0, std=0.05, layout="ring"),
    "cifar": GMMParams(shape=(3, 32, 32), components=10, rank=16, seed=1, std=0.02, spread=0.12),
}
PRESET_HELP = {
    "tiny": "2x4x4, 4 components, rank 3: for tests",
    "ring2d": "2-D, 8 modes on the unit circle",
    "cifar": "3x32x32, 10 components, rank 16, smooth image-like means",
}


def parse_params(body: str) -> GMMParams:
    """`tiny` | `cifar` | `ring2d` | `key=value,...` (a preset name may come first: `cifar,seed=4`)."""
    parts = [p.strip() for p in body.split(",") if p.strip()]
    base = GMMParams()
    if parts and "=" not in parts[0]:
        if parts[0] not in PRESETS:
            raise BadInput(f"--model gmm:{body}: unknown preset {parts[0]!r}; presets are {', '.join(PRESETS)}")
        base = PRESETS[parts.pop(0)]
    values = asdict(base)
    types = {f.name: f.type for f in fields(GMMParams)}
    for part in parts:
        key, eq, val = part.partition("=")
        key = key.strip()
        if not eq or key not in values:
            raise BadInput(f"--model gmm:{body}: unknown parameter {key!r}; known: {', '.join(values)}")
        try:
            if key == "shape":
                values[key] = tuple(int(v) for v in val.lower().split("x"))
            elif key == "layout":
                values[key] = val.strip()
            else:
                values[key] = (int if "int" in str(types[key]) else float)(val)
        except ValueError:
            raise BadInput(
                f"--model gmm:{body}: {key} must be {'like 3x16x16' if key == 'shape' else 'a number'}, got {val!r}"
            ) from None
    return GMMParams(**values)


def _smooth_fields(rng: np.random.Generator, n: int, shape: tuple[int, ...], max_freq: int = 3) -> np.ndarray:
    """n random low-frequency patterns of `shape` (C,H,W or H,W), unit RMS; plain noise for other shapes."""
    if len(shape) < 2 or min(shape[-2:]) < 4:
        return rng.standard_normal((n, math.prod(shape)))
    h, w = shape[-2:]
    c = math.prod(shape[:-2])
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    out = np.zeros((n, c, h, w))
    for fy in range(max_freq + 1):
        for fx in range(max_freq + 1):
            amp = 1.0 / (1 + fy * fy + fx * fx)
            phase = rng.uniform(0, 2 * np.pi, size=(n, c, 1, 1))
            coef = rng.standard_normal((n, c, 1, 1)) * amp
            out += coef * np.cos(np.pi * (fy * yy + fx * xx)[None, None] + phase)
    out = out.reshape(n, -1)
    return out / np.sqrt((out**2).mean(axis=1, keepdims=True))


def build_arrays(p: GMMParams) -> dict[str, np.ndarray]:
    """Means [K,d], orthonormal directions Q [K,d,r], variances lam [K,r], isotropic s^2 [K], log-weights [K]."""
    rng = np.random.default_rng(p.seed)
    k, d, r = p.components, math.prod(p.shape), p.rank
    if p.layout == "ring":
        ang = 2 * np.pi * np.arange(k) / k
        base = np.stack([np.cos(ang), np.sin(ang)], 1)
        means = np.zeros((k, d))
        means[:, : min(2, d)] = base[:, : min(2, d)]
    elif p.layout == "smooth":
        # A shared-channel pattern (shape) plus a weaker per-channel field (colour): image-like classes.
        luminance = _smooth_fields(rng, k, (1, *p.shape[1:])) if len(p.shape) == 3 else 0
        colour = _smooth_fields(rng, k, p.shape)
        if len(p.shape) == 3:
            luminance = np.repeat(luminance.reshape(k, 1, -1), p.shape[0], axis=1).reshape(k, d)
        means = 0.8 * np.tanh(luminance + 0.6 * colour)
    else:
        means = 0.5 * rng.standard_normal((k, d))
    q = np.zeros((k, d, r))
    lam = np.zeros((k, r))
    for i in range(k):
        if r:
            raw = _smooth_fields(rng, r, p.shape, max_freq=5) if p.layout == "smooth" else rng.standard_normal((r, d))
            q[i] = np.linalg.qr(raw.T)[0]
            decay = 0.75 ** np.arange(r)
            lam[i] = decay / decay.sum() * (p.spread**2) * d
    s2 = np.full(k, p.std**2)
    logw = np.log(np.full(k, 1.0 / k))
    return {"means": means, "q": q, "lam": lam, "s2": s2, "logw": logw}


class GaussianMixture(Denoiser):
    def __init__(self, params: GMMParams, spec: str | None = None) -> None:
        self.params = params
        self.shape = tuple(params.shape)
        self.spec = spec or "gmm:" + ",".join(f"{k}={_fmt(v)}" for k, v in asdict(params).items())
        canon = json.dumps(asdict(params), sort_keys=True)
        self.fingerprint = "gmm:" + hashlib.sha256(canon.encode()).hexdigest()[:16]
        self.sigma_min, self.sigma_max = 0.002, 80.0
        self.arrays = build_arrays(params)
        self.to("cpu", torch.float32)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GaussianMixture:
        """Parameters live in float64 on `device`: the mixture's logits cancel large terms at small sigma, so
        the denoiser computes in float64 whatever the state's dtype, and returns the state's dtype."""
        self.device = torch.device(device or self.device)
        self.dtype = dtype or self.dtype
        for name, arr in self.arrays.items():
            setattr(self, name, torch.as_tensor(arr, dtype=torch.float64, device=self.device))
        k, d, r = self.q.shape
        self.q_flat = self.q.permute(1, 0, 2).reshape(d, k * r)  # [d, K*r]
        self.mu_q = torch.einsum("kd,kdr->kr", self.means, self.q)  # Q_k^T mu_k
        self.mu2 = (self.means**2).sum(1)  # |mu_k|^2
        return self

    def _logits(
        self, xf: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posterior log-weights per (sample, component) with the pieces the posterior mean reuses.
        All matrix products are [B,d] x [d,K*r]: nothing of size B*K*d is formed, O(K d r) per sample."""
        b = xf.shape[0]
        k, d, r = self.q.shape
        proj = (xf @ self.q_flat).view(b, k, r) - self.mu_q[None]  # Q_k^T (x - mu_k)
        v2 = (xf * xf).sum(1, keepdim=True) - 2 * xf @ self.means.T + self.mu2[None]  # |x - mu_k|^2
        c = self.s2[None] + sigma.reshape(b, 1) ** 2  # isotropic variance of x given k
        lc = self.lam[None] + c[..., None]  # variances along Q_k
        perp2 = (v2 - (proj**2).sum(-1)).clamp_min(0)  # |v|^2 outside span(Q_k)
        quad = perp2 / c + (proj**2 / lc).sum(-1)  # v^T (Sigma_k + sigma^2 I)^-1 v
        logdet = (d - r) * torch.log(c) + torch.log(lc).sum(-1)
        return self.logw[None] - 0.5 * (quad + logdet), proj, c, lc

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        xf = x.reshape(b, -1).to(torch.float64)
        logp, proj, c, lc = self._logits(xf, sigma.to(torch.float64))
        w = torch.softmax(logp, dim=1)
        # E[x0|x,k] = mu_k + (s_k^2/c)(x - mu_k) + Q_k [((lam + s_k^2)/lc - s_k^2/c) Q_k^T (x - mu_k)],
        # summed over k with the posterior weights w.
        shrink = w * self.s2[None] / c  # weight on (x - mu_k)
        along = w[..., None] * proj * ((self.lam[None] + self.s2[None, :, None]) / lc - (self.s2[None] / c)[..., None])
        out = shrink.sum(1, keepdim=True) * xf + (w - shrink) @ self.means + along.reshape(b, -1) @ self.q_flat.T
        return out.reshape(x.shape).to(x.dtype)

    def log_density(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log p(x; sigma) of the noisy marginal (for tests and diagnostics)."""
        logp = self._logits(x.reshape(x.shape[0], -1).to(torch.float64), sigma.to(torch.float64))[0]
        return torch.logsumexp(logp, dim=1) - 0.5 * math.prod(self.shape) * math.log(2 * math.pi)

    # Exact facts about the clean data, for evaluation.
    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        g = generator or torch.Generator().manual_seed(0)
        k = torch.multinomial(torch.exp(self.logw.double().cpu()), n, replacement=True, generator=g)
        r = self.q.shape[-1]
        zr = torch.randn(n, r, generator=g, dtype=torch.float64)
        zd = torch.randn(n, math.prod(self.shape), generator=g, dtype=torch.float64)
        q, lam = self.q.double().cpu()[k], self.lam.double().cpu()[k]
        x = (
            self.means.double().cpu()[k]
            + torch.einsum("ndr,nr->nd", q, zr * lam.sqrt())
            + self.s2.double().cpu()[k].sqrt()[:, None] * zd
        )
        return x.reshape(n, *self.shape).to(self.dtype)

    def data_mean(self) -> torch.Tensor:
        w = torch.exp(torch.as_tensor(self.arrays["logw"]))
        return (w[:, None] * torch.as_tensor(self.arrays["means"])).sum(0)

    def data_cov(self) -> torch.Tensor:
        """Dense float64 covariance of the mixture (d x d)."""
        a = {k: torch.as_tensor(v) for k, v in self.arrays.items()}
        w = torch.exp(a["logw"])
        mean = self.data_mean()
        d = mean.numel()
        cov = torch.zeros(d, d, dtype=torch.float64)
        for k in range(w.numel()):
            qk = a["q"][k] * a["lam"][k].sqrt()
            cov += w[k] * (qk @ qk.T + torch.outer(a["means"][k], a["means"][k]))
            cov.diagonal().add_(w[k] * a["s2"][k])
        return cov - torch.outer(mean, mean)


def _fmt(v: object) -> str:
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def load(body: str, spec: str) -> GaussianMixture:
    return GaussianMixture(parse_params(body), spec=spec)
