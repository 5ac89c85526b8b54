"""The denoiser seam (docs/extending.md "A model backend"): every backend becomes `D(x, sigma, cond=None) -> x0_hat`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ..errors import BadInput

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class Denoiser:
    """Base class for our own backends.

    `sigma` is always a tensor of shape [B]. Attributes: `sigma_min`, `sigma_max`, `shape` (per sample),
    `fingerprint` (identity of weights and config, stored in caches and artifacts), `spec` (how it was named),
    `passes_per_call` (network passes per denoiser call, 2 with classifier-free guidance).
    Optional: `features(x, sigma, cond)` (designer inputs), `decode(x)` (latents to images), `net` (the module),
    `default_recipe` (the recipe `compare --model` distills missing students with; docs/extending.md).
    """

    spec: str = ""
    fingerprint: str = ""
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    shape: tuple[int, ...] = ()
    passes_per_call: int = 1
    net: torch.nn.Module | None = None
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    precision: str = "fp32"

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Denoiser:
        return self

    def set_precision(self, precision: str) -> Denoiser:
        """Mixed precision for the network (`--precision fp16|bf16|fp32`); the solver state stays in its own
        dtype. On CUDA the network also goes channels-last."""
        if precision not in PRECISIONS:
            raise BadInput(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision != "fp32" and self.net is None:
            raise BadInput(f"--precision {precision}: {self.spec} has no network to run in reduced precision")
        self.precision = precision
        if self.net is not None and self.device.type == "cuda":
            self.net.to(memory_format=torch.channels_last)
        return self

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the network runs in: autocast to fp16/bf16, or nothing for fp32."""
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def route_calls(self, call: Callable[..., Any]) -> None:
        """Calls of `self.net` go through `call` from now on (SFD under torchrun: the network's
        DistributedDataParallel wrapper), reads and writes of its attributes still reach the network. Used on a
        fine-tuning copy only (docs/distributed.md "SFD and DistributedDataParallel")."""
        if self.net is not None:
            self.net = RoutedNet(self.net, call)


class RoutedNet:
    """A network whose calls go through another callable (its DistributedDataParallel wrapper, which runs the
    network's own forward) while every attribute (`bottleneck`, `num_classes`, `step_condition`, submodules) is
    the network's: DDP itself forwards only calls, not attributes."""

    def __init__(self, module: torch.nn.Module, call: Callable[..., Any]) -> None:
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "_call", call)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.module, name, value)


class Wrapped(Denoiser):
    """A user's object (a `python:` factory's result, a torch module) with the seam's metadata beside it."""

    def __init__(self, obj: Any, spec: str, fingerprint: str) -> None:
        self.obj = obj
        self.spec, self.fingerprint = spec, fingerprint
        self.sigma_min, self.sigma_max = float(obj.sigma_min), float(obj.sigma_max)
        self.shape = tuple(int(v) for v in obj.shape)
        self.passes_per_call = int(getattr(obj, "passes_per_call", 1))
        self.accepts_step_condition = bool(getattr(obj, "accepts_step_condition", False))
        self.net = obj if isinstance(obj, torch.nn.Module) else getattr(obj, "net", None)
        for name in ("features", "decode", "draw_cond"):
            if callable(getattr(obj, name, None)):
                setattr(self, name, getattr(obj, name))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        with self.autocast():
            return self.obj(x, sigma, cond)

    def __getattr__(self, name: str) -> Any:
        """Anything else the user's object offers (a bottleneck's `last_features`, ...)."""
        if name == "obj":
            raise AttributeError(name)
        return getattr(self.obj, name)

    def route_calls(self, call: Callable[..., Any]) -> None:
        """As Denoiser.route_calls, where the user's object calls its network: the object itself when it is the
        torch module, else its own `net`."""
        if self.net is None:
            return
        routed = RoutedNet(self.net, call)
        if self.obj is self.net:
            self.obj = routed
        else:
            self.obj.net = routed
        self.net = routed

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Wrapped:
        if isinstance(self.obj, torch.nn.Module):
            self.obj.to(device=device, dtype=dtype)
        elif callable(getattr(self.obj, "to", None)):
            self.obj.to(device=device, dtype=dtype)
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        return self
