"""Small EDM-preconditioned UNets shipped with the package (safetensors in package data).

`toy:unet-gmm` regresses the exact `gmm:cifar` denoiser (`python -m solverdistill.models.toy train`);
`toy:unet-digits` is class-conditional and trained on real images, the handwritten digits of docs/digits.md
(`python -m solverdistill.models.toy train-digits`), with options `?class=K` and `?guidance=W`.
They give the benchmarks real networks: SFD fine-tunes their weights, DLMS reads their last 8x8 encoder block
(`last_features`), and SFD-v feeds them a step condition.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import parse_qs

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInput
from .base import Denoiser

WEIGHTS = Path(__file__).resolve().parent.parent / "data" / "toy_unet_gmm.safetensors"
DIGITS_WEIGHTS = WEIGHTS.with_name("toy_unet_digits.safetensors")
SIGMA_DATA = 0.5
# toy:unet-digits: 16x16 grey digits, ten classes and a null class (index 10) for the unconditional model
DIGITS_NET = {"channels": (32, 64, 128), "img_channels": 1, "num_classes": 10, "steps_embed": 16}
# The recipe `compare --model toy:unet-digits` distills missing students with (the demo's; docs/evaluation.md).
# recipes/ is not in the wheel: package data holds a link to recipes/digits_demo.yaml, which a wheel stores as a file.
DIGITS_RECIPE = WEIGHTS.with_name("digits_demo.yaml")


def followed(path: Path) -> Path:
    """`path`, or the file it names when it is a symbolic link checked out as text: git writes a link's target as a
    one-line file where symlinks are off (core.symlinks=false, e.g. Windows), so the package-data link above would
    read as a recipe holding only a path."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1024:
            return path
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return path
    if "\n" in text or ":" in text or not text.endswith((".yaml", ".yml")):
        return path
    target = (path.parent / text).resolve()
    return target if target.is_file() else path


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
    """Two downsamplings (32x32 -> 8x8, or 16x16 -> 4x4) and back, one residual block per level and two at the
    bottleneck; the noise level (c_noise = log(sigma) / 4), an optional class label (`num_classes` > 0: index
    `num_classes` is the null label of classifier-free guidance) and an optional step condition (SFD-v: the
    number of sampling steps) are embedded."""

    def __init__(
        self,
        channels: tuple[int, int, int] = (32, 64, 96),
        emb: int = 128,
        img_channels: int = 3,
        steps_embed: int = 8,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.emb, self.num_classes = emb, num_classes
        self.t_mlp = nn.Sequential(nn.Linear(32, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.step_embed = nn.Embedding(steps_embed, emb)
        nn.init.zeros_(self.step_embed.weight)  # no step condition = no change
        self.class_embed = nn.Embedding(num_classes + 1, emb) if num_classes else None
        self.inp = nn.Conv2d(img_channels, c1, 3, padding=1)
        self.d1, self.d2 = ResBlock(c1, c1, emb), ResBlock(c2, c2, emb)
        self.down1, self.down2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.mid1, self.mid2 = ResBlock(c3, c3, emb), ResBlock(c3, c3, emb)
        self.up2, self.u2 = nn.Conv2d(c3, c2, 3, padding=1), ResBlock(2 * c2, c2, emb)
        self.up1, self.u1 = nn.Conv2d(c2, c1, 3, padding=1), ResBlock(2 * c1, c1, emb)
        self.out = nn.Sequential(nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, img_channels, 3, padding=1))
        self.bottleneck = None

    def step_condition_parameters(self) -> Iterator[nn.Parameter]:
        """What SFD-v's step condition adds to the noise embedding (zero at the start: no change)."""
        return self.step_embed.parameters()

    def step_adapter_targets(self) -> list[str]:
        """Where SFD-v's per-NFE adapters go (`student.adapters`): both convolutions of every residual block."""
        return [f"{b}.{c}" for b in ("d1", "d2", "mid1", "mid2", "u2", "u1") for c in ("c1", "c2")]

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        step: torch.Tensor | None = None,
        label: torch.Tensor | None = None,
    ) -> torch.Tensor:
        freqs = torch.exp(torch.linspace(0, math.log(1000), 16, device=x.device))
        e = self.t_mlp(torch.cat([torch.sin(c_noise[:, None] * freqs), torch.cos(c_noise[:, None] * freqs)], 1))
        if step is not None:
            e = e + self.step_embed(step)
        if self.class_embed is not None:
            if label is None:
                label = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            e = e + self.class_embed(label)
        h1 = self.d1(self.inp(x), e)
        h2 = self.d2(self.down1(h1), e)
        m = self.mid2(self.mid1(self.down2(h2), e), e)
        # DLMS's designer input: the last encoder block at 8x8 (as for EDM networks), 64 numbers once channel-averaged
        self.bottleneck = m if m.shape[-1] >= 8 else h2
        u2 = self.u2(torch.cat([self.up2(F.interpolate(m, scale_factor=2)), h2], 1), e)
        u1 = self.u1(torch.cat([self.up1(F.interpolate(u2, scale_factor=2)), h1], 1), e)
        return self.out(u1)


class ToyDenoiser(Denoiser):
    """EDM preconditioning around ToyUNet: D = c_skip x + c_out F(c_in x, log(sigma) / 4).

    Class-conditional networks take `cond` = class indices per sample (None: the null label, the unconditional
    model). With `guidance` W != 1 each call runs both the unconditional and the conditional pass and returns
    D_u + W (D_c - D_u) (classifier-free guidance, Ho & Salimans 2022; linear, so the same as on epsilon), so
    `passes_per_call` is 2."""

    accepts_step_condition = True

    def __init__(
        self,
        net: ToyUNet,
        spec: str = "toy:unet-gmm",
        fingerprint: str = "",
        shape: tuple[int, int, int] = (3, 32, 32),
        guidance: float | None = None,
        fixed_class: int | None = None,
    ) -> None:
        self.net, self.spec, self.fingerprint = net, spec, fingerprint
        self.shape, self.sigma_min, self.sigma_max = tuple(shape), 0.002, 80.0
        self.guidance, self.fixed_class = guidance, fixed_class
        self.passes_per_call = 2 if guidance is not None and guidance != 1.0 else 1
        self.step_condition = None  # SFD-v sets the number of sampling steps here
        self.last_features = None
        self.default_recipe: Path | None = None  # `compare --model` distills missing students with it

    @property
    def conditional(self) -> bool:
        """Labels are drawn per seed (or fixed) when a class or a guidance weight is given."""
        return bool(self.net.num_classes) and (self.guidance is not None or self.fixed_class is not None)

    def draw_cond(self, seeds: Sequence[int]) -> torch.Tensor | None:
        """One class per seed from its own generator (seed + 2^31, as the EDM backend), or the fixed class;
        None for the unconditional model."""
        if not self.conditional:
            return None
        seeds = list(seeds)
        if self.fixed_class is not None:
            return torch.full((len(seeds),), self.fixed_class, dtype=torch.long)
        draw = lambda s: torch.randint(self.net.num_classes, (1,), generator=torch.Generator().manual_seed(s))
        return torch.tensor([int(draw(int(s) + (1 << 31))) for s in seeds], dtype=torch.long)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        s = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
        c_out = s * SIGMA_DATA / torch.sqrt(s**2 + SIGMA_DATA**2)
        c_in = 1 / torch.sqrt(s**2 + SIGMA_DATA**2)
        b = x.shape[0]
        step = None
        if self.step_condition is not None:
            step = torch.full((b,), int(self.step_condition), device=x.device, dtype=torch.long)
        label = None
        if self.net.num_classes:
            if cond is None and self.conditional:
                raise BadInput(f"--model {self.spec}: a class or guidance was asked for, but no labels came")
            label = None if cond is None else torch.as_tensor(cond, device=x.device).long().reshape(b)
        x32, c_noise = x.to(torch.float32), torch.log(s.flatten()) / 4
        guided = self.passes_per_call == 2 and label is not None
        if guided:  # one batch of 2B: the null label first, then the sample's own
            null = torch.full_like(label, self.net.num_classes)
            x32, c_noise, label = torch.cat([x32, x32]), torch.cat([c_noise, c_noise]), torch.cat([null, label])
            step = None if step is None else torch.cat([step, step])
        with self.autocast():
            f = self.net(torch.cat([c_in, c_in]) * x32 if guided else c_in * x32, c_noise, step, label)
        f = f.to(torch.float32)
        feats = self.net.bottleneck
        if guided:
            f_u, f = f.chunk(2)
            f = f_u + self.guidance * (f - f_u)
            feats = feats[b:]  # the conditional pass's block
        self.last_features = feats.mean(1).flatten(1)
        return (c_skip * x[:b].to(torch.float32) + c_out * f).to(x.dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ToyDenoiser:
        self.device = torch.device(device) if device is not None else self.device
        self.net.to(device=self.device)
        self.dtype = dtype or self.dtype
        return self


def weights_fingerprint(path: Path) -> str:
    import hashlib

    return "toy:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def digits_options(query: str, spec: str) -> tuple[float | None, int | None]:
    """`?guidance=W&class=K` of toy:unet-digits: (guidance weight or None, fixed class or None)."""
    guidance, fixed = None, None
    for key, values in parse_qs(query, keep_blank_values=True).items():
        value = values[-1]
        if key == "guidance":
            try:
                guidance = float(value)
            except ValueError:
                guidance = float("nan")
            if not math.isfinite(guidance) or guidance < 0:
                raise BadInput(f"--guidance: expected a finite number >= 0 for {spec}, got {value!r}")
        elif key == "class":
            if not value.isdigit() or not 0 <= int(value) < DIGITS_NET["num_classes"]:
                raise BadInput(f"--class: expected a digit class 0..9 for {spec}, got {value!r}")
            fixed = int(value)
        else:
            raise BadInput(f"--model {spec}: unknown option {key!r}; toy:unet-digits takes class and guidance")
    return guidance, fixed


def load(body: str, spec: str) -> ToyDenoiser:
    name, _, query = body.partition("?")
    if name not in ("unet-gmm", "unet-digits"):
        raise BadInput(
            f"--model {spec}: unknown toy model {name!r}; the built-in ones are toy:unet-gmm, toy:unet-digits"
        )
    if name == "unet-gmm" and query:
        raise BadInput(f"--model {spec}: toy:unet-gmm takes no options (class and guidance are for toy:unet-digits)")
    path = WEIGHTS if name == "unet-gmm" else DIGITS_WEIGHTS
    retrain = "train" if name == "unet-gmm" else "train-digits"
    if not path.is_file():
        raise BadInput(
            f"--model {spec}: the weights {path} are missing; retrain with `python -m solverdistill.models.toy {retrain}`"
        )
    from safetensors.torch import load_file

    if name == "unet-gmm":
        net = ToyUNet()
        net.load_state_dict(load_file(str(path)))
        return ToyDenoiser(net.eval(), spec, weights_fingerprint(path))
    guidance, fixed = digits_options(query, spec)
    net = ToyUNet(**DIGITS_NET)
    net.load_state_dict(load_file(str(path)))
    fp = weights_fingerprint(path)
    if guidance is not None or fixed is not None:  # another denoiser: caches and artifacts must tell them apart
        fp += f"?guidance={guidance}&class={fixed}"
    den = ToyDenoiser(net.eval(), spec, fp, (1, 16, 16), guidance, fixed)
    if guidance is None and fixed is None and DIGITS_RECIPE.is_file():
        den.default_recipe = followed(DIGITS_RECIPE)  # its teacher is the unconditional model's
    return den


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


def train_digits(
    iterations: int = 3000,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    out: Path = DIGITS_WEIGHTS,
    label_dropout: float = 0.1,
    ema_halflife: float = 200.0,
    log_every: int = 100,
) -> dict:
    """toy:unet-digits with EDM's loss (ln sigma ~ N(-1.2, 1.2^2), weight (s^2 + sd^2) / (s sd)^2) on the training
    split of the digits; labels dropped to the null class with probability `label_dropout` so one network is both
    the conditional and the unconditional model (classifier-free guidance). Adam with cosine decay over a fixed
    number of iterations (so the result depends on the seed alone, not on the machine's speed); the EMA of the
    weights (half-life in iterations) is what is saved. Needs scikit-learn."""
    from safetensors.torch import save_file

    from ..digits import load_split

    torch.manual_seed(seed)
    data = load_split("train")
    net = ToyUNet(**DIGITS_NET)
    ema = ToyUNet(**DIGITS_NET)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    params = sum(p.numel() for p in net.parameters())
    print(f"ToyUNet (digits): {params:,} parameters, {len(data.x)} training images", flush=True)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    den = ToyDenoiser(net, "toy:unet-digits", shape=(1, 16, 16))
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    null = DIGITS_NET["num_classes"]

    def save() -> None:
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(out))

    for it in range(1, iterations + 1):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (it - 1) / iterations))
        idx = torch.randint(len(data.x), (batch,), generator=g)
        x0, y = data.x[idx], data.y[idx].clone()
        y[torch.rand(batch, generator=g) < label_dropout] = null
        sigma = torch.exp(torch.randn(batch, generator=g) * 1.2 - 1.2)
        x = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=g)
        w = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
        loss = (w[:, None, None, None] * (den(x, sigma, y) - x0) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = 0.5 ** (1 / ema_halflife) if it > ema_halflife else it / (it + 1)
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        if it % log_every == 0:
            print(f"it {it}  {time.time() - start:.0f}s  loss {loss.item():.4f}", flush=True)
        if it % (10 * log_every) == 0:
            save()
    save()
    seconds = time.time() - start
    print(f"saved {out} after {iterations} iterations, {seconds / 60:.1f} min", flush=True)
    return {"iterations": iterations, "seconds": seconds, "parameters": params}


if __name__ == "__main__":
    import sys

    if len(sys.argv) >= 2 and sys.argv[1] == "train":
        train(minutes=float(sys.argv[2]) if len(sys.argv) > 2 else 25.0)
    elif len(sys.argv) >= 2 and sys.argv[1] == "train-digits":
        train_digits(iterations=int(sys.argv[2]) if len(sys.argv) > 2 else 3000)
    else:
        print("usage: python -m solverdistill.models.toy train [MINUTES] | train-digits [ITERATIONS]")
