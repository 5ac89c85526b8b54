"""The student plugin seam (design.md "Student method"): `fit(cache, denoiser, config) -> Artifact` and
`load(artifact, denoiser) -> solver`. DLMS, D-ODE and SFD are plugins; a new method is one `register` call
(or an entry point in the group `solverdistill.students`) and touches no engine code.

A loaded solver, like a handcrafted `sampling.Plan`, has `nfe`, `afs`, `describe()` and
`solve(model, x, cond=None, callback=None)`, so `sample` and `compare` never special-case a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import BadInput
from ..recipes import build_section


@dataclass
class Method:
    name: str
    student_section: type      # dataclass of the recipe's `student` keys (method, nfe, ...)
    train_section: type        # dataclass of the recipe's `train` keys
    fit: Callable              # (cache, model, student_cfg, train_cfg, progress) -> Artifact
    load: Callable             # (artifact, model) -> solver
    untrained: Callable        # artifact -> the same artifact before training (base solver / initial rule)
    summary: str = ""


METHODS: dict[str, Method] = {}


def register(method: Method) -> None:
    METHODS[method.name] = method


def _builtins() -> None:
    from . import dlms, dode, sfd  # noqa: F401  (each registers itself)
    try:
        from importlib.metadata import entry_points
        for ep in entry_points(group="solverdistill.students"):
            if ep.name not in METHODS:
                register(ep.load())
    except Exception:  # a broken third-party plugin must not break the built-in methods
        pass


def get(name: str) -> Method:
    if name not in METHODS:  # load the built-ins and plugins once, whatever was imported before
        _builtins()
    if name not in METHODS:
        raise BadInput(f"student.method: unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def configs(method: Method, student: dict, train: dict):
    """Validate the recipe's `student` and `train` sections against the method's own keys."""
    return build_section(method.student_section, student, "student"), build_section(method.train_section, train, "train")
