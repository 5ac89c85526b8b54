"""`python:MODULE:CALLABLE`: a user's denoiser factory, imported from the Python path and called with no args."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
import types

from ..errors import BadInput
from .base import Wrapped

REQUIRED = ("sigma_min", "sigma_max", "shape")


def load(body: str, spec: str) -> Wrapped:
    module_name, sep, attr = body.rpartition(":")
    if not sep or not module_name or not attr:
        raise BadInput(f"--model {spec}: expected python:MODULE:CALLABLE, e.g. python:mypkg.models:make_denoiser")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an import error in the user's module is still their input
        raise BadInput(f"--model {spec}: cannot import module {module_name!r}: {type(e).__name__}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise BadInput(f"--model {spec}: module {module_name!r} has no callable {attr!r}")
    try:
        obj = factory()
    except Exception as e:
        raise BadInput(f"--model {spec}: calling {attr}() failed: {type(e).__name__}: {e}") from None
    missing = [a for a in REQUIRED if not hasattr(obj, a)]
    if not callable(obj) or missing:
        what = "is not callable" if not callable(obj) else f"lacks attribute(s) {', '.join(missing)}"
        raise BadInput(
            f"--model {spec}: the object returned by {attr}() {what}; expected D(x, sigma, cond=None) "
            f"with attributes {', '.join(REQUIRED)}"
        )
    try:
        shape = tuple(int(v) for v in obj.shape)
        smin, smax = float(obj.sigma_min), float(obj.sigma_max)
    except (TypeError, ValueError):
        raise BadInput(f"--model {spec}: shape must be a sequence of ints and sigma_min/sigma_max numbers") from None
    if not shape or not 0 < smin < smax:
        raise BadInput(
            f"--model {spec}: need a non-empty shape and 0 < sigma_min < sigma_max, "
            f"got shape={shape}, sigma_min={smin}, sigma_max={smax}"
        )
    return Wrapped(obj, spec, fingerprint(spec, module))


def fingerprint(spec: str, module: types.ModuleType) -> str:
    """Spec plus a hash of the module's source file: the same in every process (so a cache can resume)."""
    h = hashlib.sha256(spec.encode())
    try:
        with open(inspect.getfile(module), "rb") as f:
            h.update(f.read())
    except (TypeError, OSError):
        pass
    return "python:" + h.hexdigest()[:16]
