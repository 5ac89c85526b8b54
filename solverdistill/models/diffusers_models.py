"""`diffusers:DIR`: discrete-time VP models saved by diffusers, wrapped into our sigma convention.

DIR is a pipeline folder (`model_index.json`, `unet/`, `scheduler/`, and `vae/` or `vqvae/`, `text_encoder/`,
`tokenizer/` as the pipeline has them) or a model folder (`config.json`, the weights and `scheduler_config.json` at
its root, like google/ddpm-cifar10-32). Options follow the folder as a query string, so the spec names the whole
denoiser: `diffusers:DIR?guidance=7.5&prompts=captions.txt`, `?prompt=a photo of a cat`, `?round_timesteps=1`.

- pixel UNet2DModel; latent UNet2DModel + VQModel (decoded with scale 1.0: the VQ-f4 LDMs) or AutoencoderKL
  (decoded with 1 / scaling_factor); samples hold the latents the solver integrates, `decode` gives images.
- Stable Diffusion (UNet2DConditionModel + AutoencoderKL + CLIP): prompts as StableDiffusionPipeline encodes them
  (padded to 77 tokens, no attention mask, last hidden state), caption i for seed i (mod the number of captions),
  classifier-free guidance with the empty prompt as unconditional; two network passes per call unless guidance 1.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs

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
            betas = np.linspace(b0**0.5, b1**0.5, n, dtype=np.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])
        else:
            raise BadInput(
                f"scheduler config: beta_schedule {kind!r} is not supported (linear, scaled_linear, "
                "squaredcos_cap_v2 or trained_betas)"
            )
    # diffusers builds the table in float32; follow it so sigmas and t(sigma) match its schedulers exactly.
    return np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32).astype(np.float64)


def table_log_sigmas(cfg: dict) -> torch.Tensor:
    """log sigma_i over the VP table of a scheduler config, i = 0 .. num_train_timesteps - 1 (increasing)."""
    ac = alphas_cumprod(cfg)
    return torch.log(torch.tensor(np.sqrt((1 - ac) / ac), dtype=torch.float64))


def timestep_of(sigma: torch.Tensor, log_sigmas: torch.Tensor, round_timesteps: bool = False) -> torch.Tensor:
    """Fractional timestep: linear interpolation of the index in log sigma (diffusers' `_sigma_to_t`); the one
    sigma -> t mapping of the backend and of the exported scheduler (solverdistill/diffusers_scheduler.py)."""
    ls = torch.log(sigma.to(torch.float64).clamp(min=1e-12)).cpu()
    idx = torch.searchsorted(log_sigmas, ls).clamp(1, len(log_sigmas) - 1)
    lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
    w = ((ls - lo) / (hi - lo)).clamp(0, 1)
    t = (idx - 1).to(torch.float64) + w
    return t.round() if round_timesteps else t


def denoised_from(out: torch.Tensor, x: torch.Tensor, s: torch.Tensor, prediction: str) -> torch.Tensor:
    """The data prediction D from a network output at state x and sigma s (float32, broadcast against x):
    epsilon: x - s eps; v: x / (s^2 + 1) - s / sqrt(s^2 + 1) v; sample: the output itself."""
    if prediction == "epsilon":
        return x - s * out
    if prediction == "v_prediction":
        return x / (s**2 + 1) - s / torch.sqrt(s**2 + 1) * out
    return out


class VPDenoiser(Denoiser):
    def __init__(
        self, unet: torch.nn.Module, sched_cfg: dict, spec: str, fingerprint: str, round_timesteps: bool = False
    ) -> None:
        self.net = unet.eval().requires_grad_(False)
        self.spec, self.fingerprint = spec, fingerprint
        ac = alphas_cumprod(sched_cfg)
        self.log_sigmas = table_log_sigmas(sched_cfg)
        self.table_sigmas = torch.tensor(np.sqrt((1 - ac) / ac), dtype=torch.float64)
        self.sigma_min, self.sigma_max = float(self.table_sigmas[0]), float(self.table_sigmas[-1])
        self.prediction = sched_cfg.get("prediction_type", "epsilon")
        if self.prediction not in ("epsilon", "v_prediction", "sample"):
            raise BadInput(f"scheduler config: prediction_type {self.prediction!r} is not supported")
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.shape = (int(cfg.in_channels), int(size), int(size))
        self.round_timesteps = round_timesteps

    def t_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of each sigma (`timestep_of`)."""
        return timestep_of(sigma, self.log_sigmas, self.round_timesteps)

    def _predict(self, x_vp: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.net(x_vp, t).sample

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        s = sigma.to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        x32 = x.to(torch.float32)
        t = self.t_of(sigma).to(device=x.device, dtype=torch.float32)
        with self.autocast():
            out = self._predict(x32 / torch.sqrt(s**2 + 1), t, cond)[:, : x.shape[1]].to(torch.float32)
        return denoised_from(out, x32, s, self.prediction).to(x.dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VPDenoiser:
        self.device = torch.device(device) if device is not None else self.device
        for part in (self.net, getattr(self, "autoencoder", None), getattr(self, "text_encoder", None)):
            if part is not None:
                part.to(device=self.device)
        self.dtype = dtype or self.dtype
        return self


class LatentDenoiser(VPDenoiser):
    """A UNet2DModel over the latents of a VQModel (scale 1.0) or an AutoencoderKL (1 / scaling_factor)."""

    def __init__(
        self,
        unet: torch.nn.Module,
        autoencoder: torch.nn.Module,
        sched_cfg: dict,
        spec: str,
        fingerprint: str,
        round_timesteps: bool = False,
    ) -> None:
        super().__init__(unet, sched_cfg, spec, fingerprint, round_timesteps)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        is_vq = type(autoencoder).__name__ == "VQModel"
        self.latent_scale = 1.0 if is_vq else float(getattr(autoencoder.config, "scaling_factor", 0.18215))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z.to(torch.float32) / self.latent_scale).sample


class StableDiffusionDenoiser(LatentDenoiser):
    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        sched_cfg: dict,
        spec: str,
        fingerprint: str,
        prompts: list[str],
        guidance: float,
        round_timesteps: bool = False,
    ) -> None:
        super().__init__(unet, vae, sched_cfg, spec, fingerprint, round_timesteps)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer, self.prompts, self.guidance = tokenizer, prompts, float(guidance)
        self.passes_per_call = 1 if self.guidance == 1.0 else 2
        self._embeddings: dict[str, torch.Tensor] = {}

    def draw_cond(self, seeds: Sequence[int]) -> torch.Tensor:
        """Prompt index per seed: caption i for seed i (modulo the number of captions)."""
        return torch.tensor([int(s) % len(self.prompts) for s in seeds])

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(texts) if p not in self._embeddings]
        if missing:
            ids = self.tokenizer(
                missing, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            for p, e in zip(missing, self.text_encoder(ids)[0]):
                self._embeddings[p] = e
        return torch.stack([self._embeddings[p] for p in texts])

    def _predict(self, x_vp: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            raise BadInput(f"--model {self.spec}: Stable Diffusion needs prompt indices (drawn per seed)")
        text = self.embed([self.prompts[int(i)] for i in cond])
        if self.guidance == 1.0:
            return self.net(x_vp, t, encoder_hidden_states=text).sample
        empty = self.embed([""] * len(cond))
        both = self.net(
            torch.cat([x_vp, x_vp]), torch.cat([t, t]), encoder_hidden_states=torch.cat([empty, text])
        ).sample
        eps_u, eps_c = both.chunk(2)
        return eps_u + self.guidance * (eps_c - eps_u)


def parse_options(query: str, spec: str) -> dict:
    known = {"guidance": float, "prompt": str, "prompts": str, "round_timesteps": lambda v: v.lower() in ("1", "true")}
    opts = {}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        if key not in known:
            raise BadInput(f"--model {spec}: unknown option {key!r}; known: {', '.join(known)}")
        try:
            opts[key] = known[key](values[-1])
        except ValueError:
            raise BadInput(f"--model {spec}: option {key} must be a number, got {values[-1]!r}") from None
    return opts


def load_prompts(opts: dict, spec: str) -> list[str]:
    if "prompts" in opts:
        try:
            lines = [ln.strip() for ln in Path(opts["prompts"]).expanduser().read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise BadInput(f"--prompts: cannot read {opts['prompts']} ({e.strerror or e})") from None
        if not lines:
            raise BadInput(f"--prompts: {opts['prompts']} holds no captions (one per line)")
        return lines
    if "prompt" in opts:
        return [opts["prompt"]]
    raise BadInput(f"--model {spec}: a text-conditioned model needs --prompt TEXT or --prompts FILE")


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


def layout(root: Path) -> tuple[dict | None, Callable[[str], Path]]:
    """(the pipeline index or None, the folder of each part). A pipeline folder keeps its parts in subfolders; a
    model folder keeps config.json, the weights and scheduler_config.json at its root, with or without a
    model_index.json beside them (google/ddpm-cifar10-32 ships one): then every part is the root."""
    index_path = root / "model_index.json"
    flat = (root / "config.json").is_file() and not (root / "unet" / "config.json").is_file()
    if index_path.is_file() and not flat:
        return _read_json(index_path, "pipeline index"), lambda name: root / name
    return None, lambda name: root


def scheduler_config(root: Path) -> dict:
    """The scheduler config of a diffusers folder (either layout), read without loading any weights."""
    path = layout(root)[1]("scheduler") / "scheduler_config.json"
    if not path.is_file():
        raise BadInput(f"{root}: missing {path}")
    return _read_json(path, "scheduler config")


def spec_fingerprint(root: Path, query: str = "") -> str:
    """The fingerprint of `diffusers:ROOT?QUERY`: the folder's, plus a digest of the options (which change the
    denoiser: guidance, prompts)."""
    return fingerprint(root) + ("" if not query else "?" + hashlib.sha256(query.encode()).hexdigest()[:8])


def load(body: str, spec: str) -> VPDenoiser:
    path, _, query = body.partition("?")
    opts = parse_options(query, spec)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise BadInput(
            f"--model {spec}: no such folder {root}; expected a diffusers pipeline folder (model_index.json) "
            "or a model folder (config.json + scheduler_config.json), e.g. google/ddpm-cifar10-32 or "
            "stable-diffusion-v1-5 saved with save_pretrained"
        )
    try:
        import diffusers
    except Exception:
        raise BadInput(
            f"--model {spec}: diffusers is not installed; pip install 'solverdistill[diffusers]' "
            "(keep your torch: add -c with torch==<installed version>)"
        ) from None
    fp = spec_fingerprint(root, query)
    rounding = bool(opts.get("round_timesteps", False))
    index, sub = layout(root)
    sched_path = sub("scheduler") / "scheduler_config.json"
    for need in (sub("unet") / "config.json", sched_path):
        if not need.is_file():
            raise BadInput(f"--model {spec}: missing {need}")
    sched = _read_json(sched_path, "scheduler config")

    def part(cls_name: str, name: str, library: ModuleType = diffusers) -> Any:
        folder = sub(name)
        try:
            cls = getattr(library, cls_name)
            kwargs = {"local_files_only": True}
            if library is diffusers:
                kwargs["low_cpu_mem_usage"] = False
            return cls.from_pretrained(str(folder), **kwargs)
        except Exception as e:
            raise BadInput(f"--model {spec}: cannot load {cls_name} from {folder} ({type(e).__name__}: {e})") from None

    if index is not None and "text_encoder" in index:
        import transformers

        prompts = load_prompts(opts, spec)
        return StableDiffusionDenoiser(
            part("UNet2DConditionModel", "unet"),
            part("AutoencoderKL", "vae"),
            part("CLIPTextModel", "text_encoder", transformers),
            part("CLIPTokenizer", "tokenizer", transformers),
            sched,
            spec,
            fp,
            prompts,
            opts.get("guidance", 7.5),
            rounding,
        )
    if "prompt" in opts or "prompts" in opts or "guidance" in opts:
        raise BadInput(f"--model {spec}: prompts and guidance apply to text-conditioned pipelines only")
    unet = part("UNet2DModel", "unet")
    if index is not None and ("vqvae" in index or "vae" in index):
        ae = part("VQModel", "vqvae") if "vqvae" in index else part("AutoencoderKL", "vae")
        return LatentDenoiser(unet, ae, sched, spec, fp, rounding)
    return VPDenoiser(unet, sched, spec, fp, rounding)
