"""`toy:unet-gmm`: a small EDM-preconditioned UNet shipped with the package, trained (by `python -m
solverdistill.models.toy train`) to regress the exact `gmm:cifar` denoiser over EDM's noise distribution.

It gives the built-in benchmarks a real network: SFD fine-tunes its weights, DLMS reads its 8x8 bottleneck
(`last_features`), and SFD-v feeds it a step condition. Weights are a safetensors file in package data.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInput
from .base import Denoiser

WEIGHTS = Path(__file__).resolve().parent.parent / "data" / "toy_unet_gmm.safetensors"
SIGMA_DATA = 0.5


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int) -> None:
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.n2, self.c2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x))) + self.emb(e)[:, :, None, None]
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class ToyUNet(nn.Module):
    """32x32 -> 16x16 -> 8x8 and back, one residual block per level and two at the bottleneck; the noise level
    (c_noise = log(sigma) / 4) and an optional step condition (SFD-v: the number of sampling steps) are embedded."""

    def __init__(
        self, channels: tuple[int, int, int] = (32, 64, 96), emb: int = 128, img_channels: int = 3, steps_embed: int = 8
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.emb = emb
        self.t_mlp = nn.Sequential(nn.Linear(32, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.step_embed = nn.Embedding(steps_embed, emb)
        nn.init.zeros_(self.step_embed.weight)  # no step condition = no change
        self.inp = nn.Conv2d(img_channels, c1, 3, padding=1)
        self.d1, self.d2 = ResBlock(c1, c1, emb), ResBlock(c2, c2, emb)
        self.down1, self.down2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.mid1, self.mid2 = ResBlock(c3, c3, emb), ResBlock(c3, c3, emb)
        self.up2, self.u2 = nn.Conv2d(c3, c2, 3, padding=1), ResBlock(2 * c2, c2, emb)
        self.up1, self.u1 = nn.Conv2d(c2, c1, 3, padding=1), ResBlock(2 * c1, c1, emb)
        self.out = nn.Sequential(nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, img_channels, 3, padding=1))
        self.bottleneck = None

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, step: torch.Tensor | None = None) -> torch.Tensor:
        freqs = torch.exp(torch.linspace(0, math.log(1000), 16, device=x.device))
        e = self.t_mlp(torch.cat([torch.sin(c_noise[:, None] * freqs), torch.cos(c_noise[:, None] * freqs)], 1))
        if step is not None:
            e = e + self.step_embed(step)
        h1 = self.d1(self.inp(x), e)
        h2 = self.d2(self.down1(h1), e)
        m = self.mid2(self.mid1(self.down2(h2), e), e)
        self.bottleneck = m
        u2 = self.u2(torch.cat([self.up2(F.interpolate(m, scale_factor=2)), h2], 1), e)
        u1 = self.u1(torch.cat([self.up1(F.interpolate(u2, scale_factor=2)), h1], 1), e)
        return self.out(u1)


class ToyDenoiser(Denoiser):
    """EDM preconditioning around ToyUNet: D = c_skip x + c_out F(c_in x, log(sigma) / 4)."""

    accepts_step_condition = True

    def __init__(self, net: ToyUNet, spec: str = "toy:unet-gmm", fingerprint: str = "") -> None:
        self.net, self.spec, self.fingerprint = net, spec, fingerprint
        self.shape, self.sigma_min, self.sigma_max = (3, 32, 32), 0.002, 80.0
        self.step_condition = None  # SFD-v sets the number of sampling steps here
        self.last_features = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        s = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
        c_out = s * SIGMA_DATA / torch.sqrt(s**2 + SIGMA_DATA**2)
        c_in = 1 / torch.sqrt(s**2 + SIGMA_DATA**2)
        step = None
        if self.step_condition is not None:
            step = torch.full((x.shape[0],), int(self.step_condition), device=x.device, dtype=torch.long)
        x32 = x.to(torch.float32)
        with self.autocast():
            f = self.net(c_in * x32, torch.log(s.flatten()) / 4, step).to(torch.float32)
        self.last_features = self.net.bottleneck.mean(1).flatten(1)
        return (c_skip * x32 + c_out * f).to(x.dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ToyDenoiser:
        self.device = torch.device(device) if device is not None else self.device
        self.net.to(device=self.device)
        self.dtype = dtype or self.dtype
        return self


def weights_fingerprint(path: Path) -> str:
    import hashlib

    return "toy:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load(body: str, spec: str) -> ToyDenoiser:
    if body != "unet-gmm":
        raise BadInput(f"--model {spec}: unknown toy model {body!r}; the built-in one is toy:unet-gmm")
    if not WEIGHTS.is_file():
        raise BadInput(
            f"--model {spec}: the weights {WEIGHTS} are missing; retrain with "
            "`python -m solverdistill.models.toy train`"
        )
    from safetensors.torch import load_file

    net = ToyUNet()
    net.load_state_dict(load_file(str(WEIGHTS)))
    return ToyDenoiser(net.eval(), spec, weights_fingerprint(WEIGHTS))


def train(
    minutes: float = 25.0, batch: int = 32, lr: float = 2e-3, seed: int = 0, out: Path = WEIGHTS, log_every: int = 50
) -> None:
    """Regress the exact gmm:cifar denoiser over EDM's training noise distribution (ln sigma ~ N(-1.2, 1.2^2)),
    with EDM's loss weight; Adam with cosine decay over a wall-clock budget; saves safetensors."""
    from safetensors.torch import save_file

    from .gmm import PRESETS, GaussianMixture

    torch.manual_seed(seed)
    gmm = GaussianMixture(PRESETS["cifar"], spec="gmm:cifar")
    net = ToyUNet()
    print(f"ToyUNet: {sum(p.numel() for p in net.parameters()):,} parameters", flush=True)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    den = ToyDenoiser(net)
    g = torch.Generator().manual_seed(seed)
    start, it, budget = time.time(), 0, minutes * 60
    while time.time() - start < budget:
        frac = (time.time() - start) / budget
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))
        x0 = gmm.sample_data(batch, g).float()
        sigma = torch.exp(torch.randn(batch, generator=g) * 1.2 - 1.2)
        x = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            target = gmm(x, sigma)
        w = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
        loss = (w[:, None, None, None] * (den(x, sigma) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        if it % log_every == 0:
            print(f"it {it}  {time.time() - start:.0f}s  loss {loss.item():.4f}", flush=True)
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    print(f"saved {out} after {it} iterations", flush=True)


if __name__ == "__main__":
    import sys

    if len(sys.argv) >= 2 and sys.argv[1] == "train":
        train(minutes=float(sys.argv[2]) if len(sys.argv) > 2 else 25.0)
    else:
        print("usage: python -m solverdistill.models.toy train [MINUTES]")
