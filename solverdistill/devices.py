"""Device and dtype names from flags and recipes, resolved to torch objects (bad names are bad input)."""

from __future__ import annotations

import torch

from .errors import BadInput

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device: str | None) -> torch.device:
    """`auto` (CUDA when torch sees it), `cpu` or `cuda[:N]`."""
    device = (device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput("--device: cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise BadInput(f"--device: expected auto, cpu or cuda[:N], got {device!r}")
    return torch.device(device)


def resolve_dtype(name: str) -> torch.dtype:
    """`float32` or `float64`: the dtype the solver state is kept in."""
    if name not in DTYPES:
        raise BadInput(f"--dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
