"""Recipes: one YAML file = model + teacher + student + training + output (docs/formats.md "Recipes").

Loading is shared by every command: `${ENV_VAR}` expansion, CLI overrides, and validation that names the key
path (`teacher.num_samples: must be >= 1, got -3`). Each command reads only the sections it needs.
Everything is bounded, so no recipe can exhaust memory or time: the file size, YAML nesting (and no aliases),
string lengths, the values echoed in messages, and numbers (CEILINGS; floats must be finite).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .errors import BadInput


def _check(**limits: Any) -> dict[str, Any]:
    """Field metadata: `min`, `max`, `choices`, `max_len` (strings), `simple` (a file-name-safe name)."""
    return limits


# Ceilings no real run reaches. Above them a value is a typo that would allocate terabytes (steps, nfe, batch) or
# run for years (iterations, restarts), so it is refused with the bound in the message. They apply by key name in
# every section (plugins' included, and artifacts' stored settings) unless a field sets its own `max`.
CEILINGS = {
    "steps": 100_000,
    "nfe": 1000,
    "num_samples": 100_000_000,
    "samples": 100_000_000,
    "heldout": 100_000_000,
    "validation": 100_000_000,
    "batch": 100_000,
    "shard_size": 100_000,
    "iterations": 10_000_000,
    "restarts": 1000,
    "order": 64,
}
# String keys with a fixed shape, by key name like CEILINGS: checked here, so the message names the key.
PATTERNS = {"device": (re.compile(r"auto|cpu|cuda(:\d{1,3})?", re.IGNORECASE), "auto, cpu or cuda[:N]")}
INT_CEILING = 10**15  # every other integer (seeds, windows, patience); seed + num_samples stays a valid torch seed
MAX_STR = 4096  # characters in any string value (a path at most PATH_MAX)
MAX_RECIPE_BYTES = 256 * 1024  # shipped recipes are under 1 KiB
MAX_DEPTH = 20  # nesting levels in a recipe (sections are two deep; student settings a few more)
SHOWN = 80  # characters of a value echoed in a message


@dataclass
class ModelSection:
    spec: str = ""


@dataclass
class TeacherSection:
    solver: str = field(default="dpm++3m", metadata=_check(max_len=100))
    schedule: str = "logsnr"
    steps: int = field(default=256, metadata=_check(min=1, max=CEILINGS["steps"]))
    num_samples: int = field(default=1024, metadata=_check(min=1, max=CEILINGS["num_samples"]))
    batch: int = field(default=64, metadata=_check(min=1, max=CEILINGS["batch"]))
    seed: int = field(default=0, metadata=_check(min=0, max=INT_CEILING))
    cache: str = ""
    dtype: str = field(default="float32", metadata=_check(choices=("float32", "float16")))
    compute_dtype: str = field(default="float32", metadata=_check(choices=("float32", "float64")))
    shard_size: int = field(default=256, metadata=_check(min=1, max=CEILINGS["shard_size"]))
    device: str = "auto"
    precision: str = field(default="fp32", metadata=_check(choices=("fp32", "fp16", "bf16")))
    # Keep every K-th grid point (and the last) in the cache; states_at interpolates across the gaps.
    store_every: int = field(default=1, metadata=_check(min=1, max=CEILINGS["steps"]))
    # cache: students fit from the cached trajectories; online: the method solves the teacher while it trains
    # (SFD as its paper trains it, docs/students.md "SFD"); the cache then only serves the held-out evaluation.
    mode: str = field(default="cache", metadata=_check(choices=("cache", "online")))


@dataclass
class Recipe:
    name: str = field(default="recipe", metadata=_check(simple=True))  # in file names: cache/NAME, out/NAME_*.npz
    model: ModelSection = field(default_factory=ModelSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    # Validated by the student method that reads them (`sdistill distill`), so a new method adds its own keys.
    student: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    output: str = ""
    # How handcrafted baselines run (docs/solvers.md "Protocols"): default or diff-sampler.
    protocol: str = field(default="default", metadata=_check(choices=("default", "diff-sampler")))
    path: str = field(default="", metadata=_check(internal=True))

    def cache_dir(self) -> Path:
        return Path(self.teacher.cache or f"cache/{self.name}")


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A name that is safe in a file name: word characters, then also '.', '-', '+'; so no '/', no '..' alone.
_SIMPLE = re.compile(r"\w[\w.+-]{0,99}")

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlong = 2, SHOWN, SHOWN, SHOWN
_repr.maxlist = _repr.maxdict = _repr.maxtuple = _repr.maxset = 6


def shown(value: Any) -> str:
    """`repr(value)` cut to about SHOWN characters, without building the whole repr of a huge value first."""
    text = _repr.repr(value)
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


def _expand(value: str, where: str) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in os.environ:
            name = m.group(1) if len(m.group(1)) <= SHOWN else m.group(1)[:SHOWN] + "..."
            raise BadInput(
                f"{where}: environment variable {name} is not set; set it to what the recipe expects there, "
                f"e.g. export {name}=/path/to/models (the recipe's comments say which files)"
            )
        return os.environ[m.group(1)]

    return _ENV.sub(sub, value)


def build_section(cls: type, data: Any, where: str) -> Any:
    """Validate a mapping against a dataclass section; errors name the key path (`where.key`)."""
    if not isinstance(data, dict):
        raise BadInput(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    unknown = [k for k in data if k not in known]
    if unknown:
        key = unknown[0] if isinstance(unknown[0], str) and len(unknown[0]) <= SHOWN else shown(unknown[0])
        raise BadInput(f"{where}.{key}: unknown key; known keys: {', '.join(known)}".lstrip("."))
    values = {}
    for name, value in data.items():
        f, key = known[name], f"{where}.{name}".lstrip(".")
        values[name] = _coerce(hints[name], value, key, f.metadata)
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str, limits: Mapping[str, Any]) -> Any:
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value if value is not None else {}, key)
    if tp is dict:
        if value is None:  # an empty section, like an empty dataclass section: the method's defaults
            return {}
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
        raise BadInput(f"{key}: expected {tp.__name__}, got {shown(value)}")
    if tp is str:
        value = _check_str(value, key, limits)
    if tp is float and not math.isfinite(value):
        raise BadInput(f"{key}: must be a finite number, got {value}")
    if tp in (int, float):
        leaf = key.rsplit(".", 1)[-1]
        top = limits.get("max", CEILINGS.get(leaf, INT_CEILING) if tp is int else None)
        if "min" in limits and value < limits["min"]:
            raise BadInput(f"{key}: must be >= {limits['min']}, got {shown(value)}")
        if top is not None and value > top:
            raise BadInput(f"{key}: must be <= {top}, got {shown(value)}")
    if "choices" in limits and value not in limits["choices"]:
        raise BadInput(f"{key}: must be one of {', '.join(limits['choices'])}, got {shown(value)}")
    return float(value) if tp is float else value


def _check_str(value: str, key: str, limits: Mapping[str, Any]) -> str:
    """Length (before and after ${ENV} expansion), no NUL (the OS refuses it in paths), simple names."""
    top = limits.get("max_len", MAX_STR)
    if len(value) <= top:
        value = _expand(value, key)
    if len(value) > top:
        raise BadInput(f"{key}: too long ({len(value)} characters, at most {top}): {shown(value)}")
    if "\0" in value:
        raise BadInput(f"{key}: contains a NUL character: {shown(value)}")
    pattern, expected = PATTERNS.get(key.rsplit(".", 1)[-1], (None, ""))
    if pattern is not None and not pattern.fullmatch(value):
        raise BadInput(f"{key}: expected {expected}, got {shown(value)}")
    if limits.get("simple") and not _SIMPLE.fullmatch(value):
        raise BadInput(
            f"{key}: must be a simple name (it names files: a letter or digit, then letters, digits, _ . - +; "
            f"at most 100), got {shown(value)}"
        )
    return value


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader with bounds, for every YAML file we read (recipes, YAML artifacts). Aliases (`*name`) are refused altogether: recipes never need them, and a few
    nested ones make a value that is gigabytes once anything walks it (repr, JSON, a deep copy). Nesting is at
    most MAX_DEPTH levels (the composer recurses), duplicate keys are an error (YAML would keep the last one
    silently), and integers are at most 40 characters (bigger ones are refused anyway, and base-60 `1:2:...`
    integers of thousands of parts take minutes to build)."""

    document = "recipes"  # what the alias message names

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None,
                None,
                f"aliases (*name) are not allowed in {self.document}; write the value out",
                self.peek_event().start_mark,
            )
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark
            )
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen = set()
        for key, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {shown(key.value)}", key.start_mark
                    )
                seen.add((key.tag, key.value))
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: Any) -> Any:
        if len(str(node.value)) > 40:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(str(node.value))} characters", node.start_mark
            )
        return super().construct_yaml_int(node)


# The table holds plain functions, so the override must be registered to be used.
BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)
# YAML 1.1 (PyYAML) reads `5e-5` as a string: its floats need a dot. YAML 1.2 and every other tool read it as a
# number, and learning rates are written that way, so exponent forms without a dot are floats here too.
BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_value(text: str) -> Any:
    """One `key=value` override's value as a recipe file would read it (benchmarks' --set: `2e-3` is a float)."""
    return yaml.load(text, Loader=BoundedLoader)


def _parse_yaml(raw: bytes, p: Path) -> Any:
    """A recipe file's bytes -> plain data through BoundedLoader; anything malformed is one line of bad input."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInput(
            f"{p}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); a recipe is YAML"
        ) from None
    try:
        return yaml.load(text, Loader=BoundedLoader)  # a SafeLoader: nothing in a recipe runs
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if isinstance(e, yaml.reader.ReaderError):
            where, problem = f" at offset {e.position}", f"character #x{e.character:04x} is not allowed"
        else:
            parts = [getattr(e, "context", None), getattr(e, "problem", None)]
            problem = ", ".join(str(part) for part in parts if part) or str(e)
        problem = " ".join(str(problem).split())
        problem = problem if len(problem) <= 2 * SHOWN else problem[: 2 * SHOWN - 3] + "..."
        raise BadInput(f"{p}: malformed YAML{where}: {problem}") from None
    except RecursionError:  # a safety net: MAX_DEPTH stops nesting long before Python's limit
        raise BadInput(f"{p}: malformed YAML: nested too deeply") from None


def load_recipe(path: str | os.PathLike, overrides: dict[str, Any] | None = None, require_model: bool = True) -> Recipe:
    """Read, expand, override (`{"teacher.num_samples": 10}`; None values are ignored) and validate."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)  # bounded: a recipe path may be a huge file or /dev/zero
    except OSError as e:
        raise BadInput(f"{p}: cannot read the recipe: {e.strerror or e}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise BadInput(f"{p}: larger than {MAX_RECIPE_BYTES // 1024} KiB; a recipe is a short YAML file")
    data = _parse_yaml(raw, p)
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


def outside_note(recipe: Recipe, key: str, path: str | os.PathLike) -> str | None:
    """A one-line note when a relative `path` (from `key`) resolves outside both the recipe's folder and the
    current directory, e.g. through `../`; None otherwise. Absolute paths are the user's deliberate choice."""
    p = Path(path)
    if p.is_absolute():
        return None
    try:
        where = p.resolve()
    except (OSError, RuntimeError):  # a symlink loop: whatever is wrong is reported where the path is used
        return None
    homes = [Path.cwd().resolve()] + ([Path(recipe.path).resolve().parent] if recipe.path else [])
    if any(where == h or h in where.parents for h in homes):
        return None
    return f"note: {key} {shown(str(path))} resolves to {where}, outside the recipe's folder and the current directory"


def path_notes(recipe: Recipe) -> list[str]:
    """Notes for the recipe's own paths (teacher.cache) that land outside; `distill` adds its output."""
    note = outside_note(recipe, "teacher.cache", recipe.teacher.cache) if recipe.teacher.cache else None
    return [note] if note else []
