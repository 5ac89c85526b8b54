"""The student plugin seam (docs/extending.md "A student method"): a `Method` fits an artifact from a teacher
cache and loads an artifact back as a `Solver`. DLMS, D-ODE and SFD are plugins; a new method is one `register`
call, or an entry point in the group `solverdistill.students`, and touches no engine code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Optional, Protocol

import torch

from ..artifacts import Artifact
from ..errors import BadInput
from ..recipes import build_section
from ..solvers.base import Solver

if TYPE_CHECKING:
    from ..models.base import Denoiser
    from ..teacher.cache import TeacherCache


@dataclass
class TrainSection:
    """The `train` keys every method has; a method's own train dataclass subclasses this."""

    samples: int = field(default=0, metadata={"min": 0})  # fitting trajectories; 0 = all not held out
    heldout: int = field(default=256, metadata={"min": 1})  # trajectories kept back for the reported metrics
    device: str = "auto"


class Fit(Protocol):
    def __call__(
        self,
        cache: TeacherCache,
        model: Denoiser,
        student: Any,
        train: Any,
        progress: Optional[Callable] = None,
    ) -> Artifact: ...


class Load(Protocol):
    def __call__(self, artifact: Artifact, model: Denoiser) -> Solver: ...


@dataclass
class Method:
    """A student method. `student_section` is the dataclass of the recipe's `student` keys (with `method` and
    `nfe`), `train_section` that of its `train` keys (a `TrainSection`); `work(student, train)` is the number
    of progress ticks `fit` makes; `untrained(artifact)` is the same artifact before training (its base solver
    or initial rule), the yardstick `distill` reports beside the student; `serves(artifact)` the NFEs one
    artifact samples at: its own (meta.nfe) by default, which `load` gives, and for a student that serves more
    (SFD-v) the others through the loaded solver's `at_nfe(n)`."""

    name: str
    student_section: type
    train_section: type
    fit: Fit
    load: Load
    untrained: Callable[[Artifact], Artifact]
    summary: str = ""
    work: Callable[[Any, Any], int] = lambda student, train: 1
    arrays: tuple[str, ...] = ()  # the artifact arrays `load` reads (`name.*` is a prefix); others are refused
    # `check(model, student, train)`: settings that depend on the model, refused (BadInput) before the teacher runs
    check: Callable[[Any, Any, Any], None] = lambda model, student, train: None
    serves: Callable[[Artifact], list[int]] = lambda artifact: [int(artifact.meta["nfe"])]

    def check_nfe(self, artifact: Artifact, nfe: int) -> None:
        """Refuse an NFE the artifact does not serve, naming the ones it does (before any model is loaded)."""
        served = self.serves(artifact)
        if nfe not in served:
            raise BadInput(
                f"--nfe: {artifact.path or 'the artifact'} was distilled for NFE "
                f"{', '.join(map(str, served))}, not {nfe}; drop --nfe"
            )

    def solver_at(self, artifact: Artifact, model: Any, nfe: int) -> Solver:
        """The artifact's solver at `nfe`, one of the NFEs it `serves`."""
        self.check_nfe(artifact, nfe)
        solver = self.load(artifact, model)
        return solver if nfe == int(artifact.meta["nfe"]) else solver.at_nfe(nfe)

    def configs(self, student: dict, train: dict) -> tuple[Any, Any]:
        """Validate a recipe's `student` and `train` sections against this method's keys."""
        return (
            build_section(self.student_section, student, "student"),
            build_section(self.train_section, train, "train"),
        )

    def keys(self) -> tuple[set[str], set[str]]:
        """The student and train keys this method knows."""
        return {f.name for f in fields(self.student_section)}, {f.name for f in fields(self.train_section)}


METHODS: dict[str, Method] = {}
_loaded = False


def register(method: Method) -> None:
    """Add a student method under `method.name`."""
    METHODS[method.name] = method


def _load_all() -> None:
    """The built-ins and entry-point plugins, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from ..plugins import load_entry_points
    from . import dlms, dode, sfd  # noqa: F401  (each registers itself)

    load_entry_points("solverdistill.students", METHODS, lambda name, method, where: register(method))


def names() -> list[str]:
    """Every registered method, built-in or plugin."""
    _load_all()
    return sorted(METHODS)


def get(name: str) -> Method:
    """A method by name; unknown names are bad input listing the known ones."""
    if name not in METHODS:
        _load_all()
    if name not in METHODS:
        raise BadInput(f"student.method: unknown method {name!r}; choose one of {', '.join(names())}")
    return METHODS[name]


def stored_settings(artifact: Artifact, cls: type) -> Any:
    """The student settings an artifact stores in `meta.student`, validated like a recipe section."""
    raw = artifact.meta.get("student")
    if not isinstance(raw, dict):
        raise BadInput(f"{artifact.path}: meta.student (the {artifact.method} settings) is missing")
    try:
        return build_section(cls, raw, "meta.student")
    except BadInput as e:
        raise BadInput(f"{artifact.path}: {e}") from None


@torch.no_grad()
def ema_update(average: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    """Move `average`'s parameters towards `live`'s: an exponential moving average with this decay per step."""
    for pa, p in zip(average.parameters(), live.parameters()):
        pa.lerp_(p, 1 - decay)


__all__ = ["METHODS", "Method", "TrainSection", "ema_update", "get", "names", "register", "stored_settings"]
