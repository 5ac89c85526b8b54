"""`python:MODULE:CALLABLE` or `python:path/to/file.py:CALLABLE`: a user's denoiser factory, called with no args.

MODULE is imported from the normal Python path (installed packages, PYTHONPATH); the current folder is not added to
it, so a file that merely sits where sdistill runs is never imported. A file is imported only when its path is
given (it ends in .py or holds a path separator)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import types
from pathlib import Path

from ..errors import BadInput
from .base import Wrapped

REQUIRED = ("sigma_min", "sigma_max", "shape")


def is_file_target(target: str) -> bool:
    """`path/to/file.py` (or any path) rather than a dotted module name."""
    return target.endswith(".py") or "/" in target or os.sep in target


def import_module(name: str, attr: str, spec: str) -> types.ModuleType:
    """An installed module (or one on PYTHONPATH); a missing one names the alternatives."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise BadInput(
                f"--model {spec}: cannot import module {name!r}: it is not on the Python path. sdistill imports "
                "installed modules and those on PYTHONPATH, not files in the current folder; to use a file, give "
                f"its path: python:path/to/{name.rpartition('.')[2]}.py:{attr}"
            ) from None
        raise BadInput(f"--model {spec}: cannot import module {name!r}: {type(e).__name__}: {e}") from None
    except Exception as e:  # an import error in the user's module is still their input
        raise BadInput(f"--model {spec}: cannot import module {name!r}: {type(e).__name__}: {e}") from None


def import_file(target: str, spec: str) -> types.ModuleType:
    """The .py file the user named, imported once per process and content under a private name (its folder is not
    added to the Python path, so it imports only what is installed)."""
    path = Path(target).expanduser()
    try:
        path = path.resolve()
        source = path.read_bytes()
    except OSError as e:
        raise BadInput(f"--model {spec}: cannot read the Python file {str(path)!r}: {e.strerror or e}") from None
    digest = hashlib.sha256(str(path).encode() + b"\0" + source).hexdigest()
    name = f"_sdistill_user_{digest[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    found = importlib.util.spec_from_file_location(name, path)
    if found is None or found.loader is None:
        raise BadInput(f"--model {spec}: {str(path)!r} is not an importable Python file")
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module  # dataclasses and pickling look classes up by module name
    try:
        found.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise BadInput(f"--model {spec}: cannot import {str(path)!r}: {type(e).__name__}: {e}") from None
    return module


def load(body: str, spec: str) -> Wrapped:
    """Import the module (or file), call the factory and check what it returns."""
    target, sep, attr = body.rpartition(":")
    if not sep or not target or not attr:
        raise BadInput(
            f"--model {spec}: expected python:MODULE:CALLABLE or python:path/to/file.py:CALLABLE, "
            "e.g. python:mypkg.models:make_denoiser"
        )
    module = import_file(target, spec) if is_file_target(target) else import_module(target, attr, spec)
    module_name = target
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
