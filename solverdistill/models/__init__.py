"""Model specs resolved to denoisers. Backends register a scheme (`gmm`, `python`, ...); a new backend is one
`register_backend` call (or an entry point in the group `solverdistill.backends`) and touches no engine code.

Each backend declares whether resolving a spec can run code (`runs_code`): a spec read from a file rather than the
command line (an artifact's meta.model) is resolved only when it cannot; otherwise the user must name it (--model)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..errors import BadInput
from .base import Denoiser, Wrapped

if TYPE_CHECKING:
    import torch


# (body after "scheme:") -> why resolving it could run code (import, unpickle, exec), or None when it cannot
RunsCode = Callable[[str], str | None]


def never(body: str) -> str | None:
    """A backend whose specs only read data (numbers, safetensors, JSON): resolving one runs no code."""
    return None


def always(why: str) -> RunsCode:
    """A backend whose specs can always run code, for this reason."""
    return lambda body: why


@dataclass
class Backend:
    scheme: str
    load: Callable[[str, str], Denoiser]  # (body after "scheme:", full spec) -> denoiser
    help: str
    examples: tuple[str, ...] = ()
    runs_code: RunsCode = always("its backend does not declare that loading a model runs no code")


BACKENDS: dict[str, Backend] = {}


def register_backend(
    scheme: str,
    load: Callable[[str, str], Denoiser],
    help: str,
    examples: Iterable[str] = (),
    runs_code: bool | RunsCode = True,
) -> None:
    """Add a backend. `runs_code`: whether resolving its specs can run code (True, the safe default for a backend
    that does not say), False when they only read data, or a function of the spec's body giving the reason or
    None. Specs read from files (an artifact's meta.model) are resolved only when this says no."""
    if runs_code is True:
        check = always(f"the {scheme}: backend does not declare that loading a model runs no code")
    elif runs_code is False:
        check = never
    else:
        check = runs_code
    BACKENDS[scheme] = Backend(scheme, load, help, tuple(examples), check)


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
    runs_code=always("an EDM checkpoint is a pickle that runs the code stored inside it when loaded"),
)


def _diffusers(body: str, spec: str) -> Denoiser:
    from . import diffusers_models

    return diffusers_models.load(body, spec)


# Weight files diffusers and transformers may read with torch.load, an unpickler; safetensors files are plain tensors.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _diffusers_runs_code(body: str) -> str | None:
    """diffusers and transformers load `.safetensors` weights as plain tensors; a folder that also holds pickle
    weights (.bin, ...) may be loaded through torch.load, a restricted unpickler but an unpickler, so such a folder
    counts as running code. Configs and tokenizers are JSON and text; no custom code is loaded."""
    root = Path(body.partition("?")[0]).expanduser()
    if not root.is_dir():
        return None  # nothing to load: the backend reports the missing folder
    for p in sorted(root.rglob("*")):
        if p.suffix in PICKLE_SUFFIXES and p.is_file():
            return f"the diffusers folder holds {p.relative_to(root)}, pickled weights that loading may unpickle"
    return None


register_backend(
    "diffusers",
    _diffusers,
    "diffusers folder (save_pretrained) with its scheduler config: pixel UNet2DModel, latent diffusion (VQ or KL "
    "first stage; `sdistill convert ldm` makes one from a CompVis checkpoint) or Stable Diffusion "
    "(?prompt=, ?prompts=FILE, ?guidance=)",
    ("diffusers:/models/ddpm-cifar10-32",),
    runs_code=_diffusers_runs_code,
)


def _toy(body: str, spec: str) -> Denoiser:
    from . import toy

    return toy.load(body, spec)


register_backend(
    "toy",
    _toy,
    "small EDM-preconditioned UNets shipped with the package: unet-gmm (trained on gmm:cifar), unet-digits "
    "(class-conditional, trained on real handwritten digits; ?class=K, ?guidance=W)",
    ("toy:unet-gmm", "toy:unet-digits", "toy:unet-digits?guidance=2"),
    runs_code=False,  # package safetensors weights
)
register_backend(
    "gmm",
    _gmm,
    "analytic Gaussian mixture with an exact denoiser",
    ("gmm:tiny", "gmm:ring2d", "gmm:cifar", "gmm:shape=3x16x16,components=6,rank=8,seed=3"),
    runs_code=False,  # numbers drawn from a seed
)
register_backend(
    "python",
    _python,
    "your own factory returning D(x, sigma, cond) with sigma_min, sigma_max, shape (python:MODULE:CALLABLE with "
    "an installed module, or python:path/to/file.py:CALLABLE)",
    ("python:mypkg.models:make_denoiser", "python:./my_model.py:make"),
    runs_code=always("a python: spec imports a module and calls a function in it"),
)


def _entry_point_backends() -> None:
    from ..plugins import load_entry_points

    load_entry_points(
        "solverdistill.backends",
        BACKENDS,
        # A plugin says its specs only read data with `load.runs_code = False` (or a function of the body).
        lambda name, load, where: register_backend(
            name, load, f"plugin {where}", runs_code=getattr(load, "runs_code", True)
        ),
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


def resolve(
    spec: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    source: str | None = None,
) -> Denoiser:
    """Turn `scheme:body` (or a YAML file naming one) into a denoiser on the given device and dtype.

    `source` names the file a spec was read from (e.g. "ART.npz: meta.model") when the user did not name the model
    on the command line: such a spec is refused, before anything is imported or unpickled, when its backend says
    resolving it can run code."""
    named = spec.strip()
    spec = named
    if spec.endswith((".yaml", ".yml")) and os.path.isfile(spec):
        spec = spec_from_yaml(spec)
    scheme, sep, body = spec.partition(":")
    if scheme not in BACKENDS:
        _entry_point_backends()
    if not sep or scheme not in BACKENDS:
        raise BadInput(
            f"{source or '--model'}: unknown model spec {spec!r}; schemes are "
            f"{', '.join(s + ':' for s in BACKENDS)} or a YAML file with a model block "
            "(see `sdistill models`)"
        )
    if source is not None:
        why = BACKENDS[scheme].runs_code(body)
        if why:
            raise BadInput(
                f"{source}: not loading {spec!r} named by a file: {why}, and a file may only name models that "
                f"load without running code. If you trust it, name it yourself: --model {named}"
            )
    model = BACKENDS[scheme].load(body, spec)
    return model.to(device, dtype) if (device is not None or dtype is not None) else model


__all__ = ["BACKENDS", "Backend", "Denoiser", "Wrapped", "register_backend", "resolve"]
