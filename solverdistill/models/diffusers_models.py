"""`diffusers:DIR`: discrete-time VP models saved by diffusers, wrapped into our sigma convention.

DIR is a pipeline folder (`model_index.json`, `unet/`, `scheduler/`, ...) or a model folder (`config.json`, the
weights and `scheduler_config.json` at its root, like google/ddpm-cifar10-32). Pixel UNet2DModel only for now.
The VP table comes from the scheduler config (`alphas_cumprod`, sigma_i = sqrt((1 - abar_i) / abar_i)); the
scheduler's own `timestep_spacing` is not applied: our grids decide the sigmas. With x_vp = x / sqrt(sigma^2 + 1)
and t(sigma) interpolated linearly in log sigma over the table (fractional t, as diffusers' `_sigma_to_t`):

    epsilon: D = x - sigma * eps;   v: D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v;   sample: D = out

diffusers is an optional extra (`pip install .[diffusers]`), imported only when such a model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInput
from .base import Denoiser


def alphas_cumprod(cfg: dict) -> np.ndarray:
    """The VP table from a scheduler config (the beta schedules diffusers' DDPM-family schedulers know)."""
    n = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
    else:
        kind = cfg.get("beta_schedule", "linear")
        b0, b1 = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
        if kind == "linear":
            betas = np.linspace(b0, b1, n, dtype=np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=np.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])
        else:
            raise BadInput(f"scheduler config: beta_schedule {kind!r} is not supported (linear, scaled_linear, "
                           "squaredcos_cap_v2 or trained_betas)")
    # diffusers builds the table in float32; follow it so sigmas and t(sigma) match its schedulers exactly.
    return np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32).astype(np.float64)


class VPDenoiser(Denoiser):
    def __init__(self, unet, sched_cfg: dict, spec: str, fingerprint: str, round_timesteps: bool = False):
        self.net = unet.eval().requires_grad_(False)
        self.spec, self.fingerprint = spec, fingerprint
        ac = alphas_cumprod(sched_cfg)
        self.table_sigmas = torch.tensor(np.sqrt((1 - ac) / ac), dtype=torch.float64)
        self.log_sigmas = torch.log(self.table_sigmas)
        self.sigma_min, self.sigma_max = float(self.table_sigmas[0]), float(self.table_sigmas[-1])
        self.prediction = sched_cfg.get("prediction_type", "epsilon")
        if self.prediction not in ("epsilon", "v_prediction", "sample"):
            raise BadInput(f"scheduler config: prediction_type {self.prediction!r} is not supported")
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.shape = (int(cfg.in_channels), int(size), int(size))
        self.round_timesteps = round_timesteps

    def t_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep: linear interpolation of the index in log sigma (diffusers' `_sigma_to_t`)."""
        ls = torch.log(sigma.to(torch.float64).clamp(min=1e-12)).cpu()
        idx = torch.searchsorted(self.log_sigmas, ls).clamp(1, len(self.log_sigmas) - 1)
        lo, hi = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        w = ((ls - lo) / (hi - lo)).clamp(0, 1)
        t = (idx - 1).to(torch.float64) + w
        return t.round() if self.round_timesteps else t

    def __call__(self, x, sigma, cond=None):
        s = sigma.to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        x32 = x.to(torch.float32)
        t = self.t_of(sigma).to(device=x.device, dtype=torch.float32)
        out = self.net(x32 / torch.sqrt(s**2 + 1), t).sample[:, : x.shape[1]]
        if self.prediction == "epsilon":
            d = x32 - s * out
        elif self.prediction == "v_prediction":
            d = x32 / (s**2 + 1) - s / torch.sqrt(s**2 + 1) * out
        else:
            d = out
        return d.to(x.dtype)

    def to(self, device=None, dtype=None):
        self.device = torch.device(device) if device is not None else self.device
        self.net.to(device=self.device)
        self.dtype = dtype or self.dtype
        return self


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: cannot read the {what} ({e})") from None


def fingerprint(folder: Path) -> str:
    """Configs plus weight-file sizes and their first MiB: cheap, and changes when the weights do."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt"):
            h.update(str(p.relative_to(folder)).encode())
            h.update(str(p.stat().st_size).encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
    return "diffusers:" + h.hexdigest()[:16]


def load(body: str, spec: str) -> VPDenoiser:
    root = Path(body).expanduser()
    if not root.is_dir():
        raise BadInput(f"--model {spec}: no such folder {root}; expected a diffusers pipeline folder (model_index.json) "
                       "or a model folder (config.json + scheduler_config.json), e.g. google/ddpm-cifar10-32 "
                       "downloaded with save_pretrained")
    try:
        import diffusers  # noqa: F401  (the optional extra)
    except Exception:
        raise BadInput(f"--model {spec}: diffusers is not installed; pip install 'solverdistill[diffusers]' "
                       "(keep your torch: add -c with torch==<installed version>)") from None
    from diffusers import UNet2DModel
    if (root / "model_index.json").is_file():
        index = _read_json(root / "model_index.json", "pipeline index")
        if any(k in index for k in ("vae", "vqvae", "text_encoder")):
            raise BadInput(f"--model {spec}: latent and text-conditioned pipelines are not supported yet "
                           "(pixel UNet2DModel pipelines only)")
        unet_dir, sched_path = root / "unet", root / "scheduler" / "scheduler_config.json"
    else:
        unet_dir, sched_path = root, root / "scheduler_config.json"
    for need in (unet_dir / "config.json", sched_path):
        if not need.is_file():
            raise BadInput(f"--model {spec}: missing {need}")
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, low_cpu_mem_usage=False)
    except Exception as e:
        raise BadInput(f"--model {spec}: cannot load the UNet from {unet_dir} ({type(e).__name__}: {e})") from None
    return VPDenoiser(unet, _read_json(sched_path, "scheduler config"), spec, fingerprint(root))
