"""Model specs resolved to denoisers. Backends register a scheme (`gmm`, `python`, ...); a new backend is one
`register_backend` call (or an entry point in the group `solverdistill.backends`) and touches no engine code."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import yaml

from ..errors import BadInput
from .base import Denoiser, Wrapped

if TYPE_CHECKING:
    import torch


@dataclass
class Backend:
    scheme: str
    load: Callable[[str, str], Denoiser]  # (body after "scheme:", full spec) -> denoiser
    help: str
    examples: tuple[str, ...] = ()


BACKENDS: dict[str, Backend] = {}


def register_backend(
    scheme: str, load: Callable[[str, str], Denoiser], help: str, examples: Iterable[str] = ()
) -> None:
    BACKENDS[scheme] = Backend(scheme, load, help, tuple(examples))


def _gmm(body: str, spec: str) -> Denoiser:
    from . import gmm

    return gmm.load(body, spec)


def _python(body: str, spec: str) -> Denoiser:
    from . import python_factory

    return python_factory.load(body, spec)


def _edm(body: str, spec: str) -> Denoiser:
    from . import edm

    return edm.load(body, spec)


register_backend(
    "edm",
    _edm,
    "EDM checkpoint (.pkl with an 'ema' network); loads only vouched-for files",
    ("edm:/models/edm-cifar10-32x32-uncond-vp.pkl",),
)


def _diffusers(body: str, spec: str) -> Denoiser:
    from . import diffusers_models

    return diffusers_models.load(body, spec)


register_backend(
    "diffusers",
    _diffusers,
    "diffusers folder (pixel UNet2DModel with its DDPM scheduler config)",
    ("diffusers:/models/ddpm-cifar10-32",),
)


def _toy(body: str, spec: str) -> Denoiser:
    from . import toy

    return toy.load(body, spec)


register_backend(
    "toy", _toy, "small EDM-preconditioned UNet shipped with the package (trained on gmm:cifar)", ("toy:unet-gmm",)
)
register_backend(
    "gmm",
    _gmm,
    "analytic Gaussian mixture with an exact denoiser",
    ("gmm:tiny", "gmm:ring2d", "gmm:cifar", "gmm:shape=3x16x16,components=6,rank=8,seed=3"),
)
register_backend(
    "python",
    _python,
    "your own factory returning D(x, sigma, cond) with sigma_min, sigma_max, shape",
    ("python:mypkg.models:make_denoiser",),
)


def _entry_point_backends() -> None:
    from ..plugins import load_entry_points

    load_entry_points(
        "solverdistill.backends", BACKENDS, lambda name, load, where: register_backend(name, load, f"plugin {where}")
    )


def spec_from_yaml(path: str) -> str:
    """A YAML file holding one model block: `spec: ...` or `model: {spec: ...}`."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise BadInput(f"--model {path}: cannot read the YAML model file: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not isinstance(data.get("spec"), str):
        raise BadInput(f"--model {path}: expected a mapping with a string key 'spec' (or model: {{spec: ...}})")
    return os.path.expandvars(data["spec"])


def resolve(spec: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Denoiser:
    """Turn `scheme:body` (or a YAML file naming one) into a denoiser on the given device and dtype."""
    spec = spec.strip()
    if spec.endswith((".yaml", ".yml")) and os.path.isfile(spec):
        spec = spec_from_yaml(spec)
    scheme, sep, body = spec.partition(":")
    if scheme not in BACKENDS:
        _entry_point_backends()
    if not sep or scheme not in BACKENDS:
        raise BadInput(
            f"--model: unknown model spec {spec!r}; schemes are "
            f"{', '.join(s + ':' for s in BACKENDS)} or a YAML file with a model block "
            "(see `sdistill models`)"
        )
    model = BACKENDS[scheme].load(body, spec)
    return model.to(device, dtype) if (device is not None or dtype is not None) else model


__all__ = ["BACKENDS", "Backend", "Denoiser", "Wrapped", "register_backend", "resolve"]
