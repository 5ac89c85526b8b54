"""Recipes: one YAML file = model + teacher + student + training + output (docs/formats.md "Recipes").

Loading is shared by every command: `${ENV_VAR}` expansion, CLI overrides, and validation that names the key
path (`teacher.num_samples: must be >= 1, got -3`). Each command reads only the sections it needs.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .errors import BadInput


def _check(**limits: Any) -> dict[str, Any]:
    return limits


@dataclass
class ModelSection:
    spec: str = ""


@dataclass
class TeacherSection:
    solver: str = "dpm++3m"
    schedule: str = "logsnr"
    steps: int = field(default=256, metadata=_check(min=1))
    num_samples: int = field(default=1024, metadata=_check(min=1))
    batch: int = field(default=64, metadata=_check(min=1))
    seed: int = field(default=0, metadata=_check(min=0))
    cache: str = ""
    dtype: str = field(default="float32", metadata=_check(choices=("float32", "float16")))
    compute_dtype: str = field(default="float32", metadata=_check(choices=("float32", "float64")))
    shard_size: int = field(default=256, metadata=_check(min=1))
    device: str = "auto"
    precision: str = field(default="fp32", metadata=_check(choices=("fp32", "fp16", "bf16")))


@dataclass
class Recipe:
    name: str = "recipe"
    model: ModelSection = field(default_factory=ModelSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    # Validated by the student method that reads them (`sdistill distill`), so a new method adds its own keys.
    student: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    output: str = ""
    path: str = field(default="", metadata=_check(internal=True))

    def cache_dir(self) -> Path:
        return Path(self.teacher.cache or f"cache/{self.name}")


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: str, where: str) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in os.environ:
            raise BadInput(f"{where}: environment variable {m.group(1)} is not set")
        return os.environ[m.group(1)]

    return _ENV.sub(sub, value)


def build_section(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise BadInput(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise BadInput(f"{where}.{unknown[0]}: unknown key; known keys: {', '.join(known)}".lstrip("."))
    values = {}
    for name, value in data.items():
        f, key = known[name], f"{where}.{name}".lstrip(".")
        values[name] = _coerce(hints[name], value, key, f.metadata)
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str, limits: Mapping[str, Any]) -> Any:
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value if value is not None else {}, key)
    if tp is dict:
        if not isinstance(value, dict):
            raise BadInput(f"{key}: expected a mapping, got {type(value).__name__}")
        return value
    ok = {
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[tp]
    if not ok(value):
        raise BadInput(f"{key}: expected {tp.__name__}, got {value!r}")
    if tp is str:
        value = _expand(value, key)
    if "min" in limits and value < limits["min"]:
        raise BadInput(f"{key}: must be >= {limits['min']}, got {value}")
    if "choices" in limits and value not in limits["choices"]:
        raise BadInput(f"{key}: must be one of {', '.join(limits['choices'])}, got {value!r}")
    return float(value) if tp is float else value


def load_recipe(path: str | os.PathLike, overrides: dict[str, Any] | None = None, require_model: bool = True) -> Recipe:
    """Read, expand, override (`{"teacher.num_samples": 10}`; None values are ignored) and validate."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise BadInput(f"{p}: cannot read the recipe: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BadInput(f"{p}: malformed YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadInput(f"{p}: a recipe is a mapping of sections (name, model, teacher, student, train, output)")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for k in parents:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
        if isinstance(node, dict):  # otherwise validation names the section that is not a mapping
            node[leaf] = value
    try:
        recipe = build_section(Recipe, data, "")
    except BadInput as e:
        raise BadInput(f"{p}: {e}") from None
    if require_model and not recipe.model.spec:
        raise BadInput(f"{p}: model.spec: missing; name the model, e.g. model: {{spec: gmm:cifar}}")
    recipe.path = str(p)
    return recipe
