"""Solver artifacts (docs/formats.md "Artifacts"): one self-describing file, safe to load.

NPZ: arrays plus a `meta` entry holding a JSON string, read with our own header-first reader (npzfiles.NPZReader:
no pickles, no complex or object arrays, nothing allocated from what a header claims). YAML: the same meta plus
small arrays as nested lists, for people to read and edit, read with a safe loader that also refuses aliases.
Nothing in an artifact ever runs: its meta is checked key by key, its arrays by name, dtype and size, and a
checksum of the arrays (`meta.arrays_sha256`, written by `save`) is verified when present.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import __version__
from .errors import BadInput
from .npzfiles import LazyArrays, NotNPZ, NPZReader, one_line, write_npz
from .recipes import BoundedLoader, shown

FORMAT, FORMAT_VERSION = "sdistill-solver", 1
REQUIRED_META = ("format", "format_version", "method", "nfe", "model_fingerprint")
CHECKSUM = "arrays_sha256"
MAX_NFE = 1000  # distilled solvers take a handful of steps; a larger count only serves to exhaust memory
MAX_YAML_BYTES = 64 << 20
MAX_BYTES_ENV = "SDISTILL_MAX_ARTIFACT_BYTES"
FORCE_HINT = "use --force to use it anyway"  # what a fingerprint mismatch tells to do (commands with --force)
DEFAULT_MAX_BYTES = 4 << 30  # an SFD artifact holds a whole network; 4 GiB covers EDM-sized ones


# The arrays each built-in method reads (docs/formats.md "Arrays by method"); a name ending in "*" stands for every
# name with that prefix. A plugin method declares its own as `Method.arrays`; one that declares none is not limited.
@dataclass
class Artifact:
    meta: dict
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)  # loaded NPZ: read on first use
    path: str = ""

    @property
    def method(self) -> str:
        return self.meta["method"]

    def array(self, name: str, shape: tuple | None = None, ndim: int | None = None) -> np.ndarray:
        """An array the method needs, checked: a missing or mis-shaped one is bad input (exit 2)."""
        if name not in self.arrays:
            raise BadInput(f"{self.path or 'artifact'}: missing array {name!r} needed by method {self.method!r}")
        a = self.arrays[name]
        if (shape is not None and tuple(a.shape) != tuple(shape)) or (ndim is not None and a.ndim != ndim):
            want = shape if shape is not None else f"{ndim} dimensions"
            raise BadInput(f"{self.path or 'artifact'}: array {name!r} has shape {tuple(a.shape)}, expected {want}")
        if a.dtype.kind not in "fiu" or not np.all(np.isfinite(a)):
            raise BadInput(f"{self.path or 'artifact'}: array {name!r} must hold finite real numbers")
        return a


def new_meta(method: str, **fields: Any) -> dict:
    """The meta every artifact starts with (format, version, method, creation time) plus `fields`."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "version": __version__,
        **fields,
    }


def _entry_line(name: str, dtype: np.dtype, shape: tuple[int, ...], fortran: bool = False) -> bytes:
    """What the checksum hashes before an array's bytes: its name, dtype and shape (and Fortran order, which
    `save` never writes, so that such a file cannot match)."""
    return json.dumps([name, dtype.str, list(shape)] + (["fortran"] if fortran else [])).encode() + b"\n"


def canonical(a: Any) -> np.ndarray:
    """An array as `save` writes it: little-endian, C order (the bytes the checksum covers)."""
    a = np.asarray(a)
    return np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")


def arrays_sha256(arrays: Mapping[str, Any]) -> str:
    """sha256 over every array's name, dtype, shape and bytes (little-endian, C order), in name order: what
    `save` stores as meta.arrays_sha256, so damaged, swapped or renamed arrays are noticed at load."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = canonical(arrays[name])
        h.update(_entry_line(name, a.dtype, a.shape))
        h.update(a.tobytes())
    return h.hexdigest()


def save(artifact: Artifact, path: str | os.PathLike) -> Path:
    """Write NPZ (or YAML for a .yaml/.yml path) atomically, with the arrays' checksum in meta.arrays_sha256 (set
    on `artifact.meta` too, so the artifact in hand describes the file); an unwritable path is bad input naming
    --out."""
    p = Path(path)
    as_yaml = p.suffix in (".yaml", ".yml")
    # YAML stores numbers as text and reads them back as float64: the checksum is of what a reader gets.
    arrays = {k: canonical(np.asarray(v, dtype=np.float64) if as_yaml else v) for k, v in artifact.arrays.items()}
    artifact.meta[CHECKSUM] = arrays_sha256(arrays)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        if as_yaml:
            doc = {"meta": artifact.meta, "arrays": {k: v.tolist() for k, v in arrays.items()}}
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120))
            os.replace(tmp, p)
        else:
            write_npz(p, artifact.meta, **arrays)
    except OSError as e:
        raise BadInput(f"--out: cannot write the artifact {str(p)!r}: {e.strerror or e}") from None
    return p


def max_bytes() -> int:
    """The most array bytes one artifact may hold: $SDISTILL_MAX_ARTIFACT_BYTES, else 4 GiB."""
    raw = os.environ.get(MAX_BYTES_ENV, "")
    try:
        return int(raw) if raw.strip() else DEFAULT_MAX_BYTES
    except ValueError:
        raise BadInput(f"{MAX_BYTES_ENV}: expected a number of bytes, got {raw!r}") from None


def load(
    path: str | os.PathLike, fingerprint: str | None = None, force: bool = False, hint: str = FORCE_HINT
) -> Artifact:
    """Read and check an artifact (meta types, array names, dtypes, sizes, checksum). A model fingerprint mismatch
    is bad input unless `force` (`hint`: what the message tells to do). NPZ arrays are read when first used (a
    method checks names before touching any)."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{p}: no such solver artifact; {existing(p.parent)}")
    meta, arrays = _read_yaml(p) if p.suffix in (".yaml", ".yml") else _read_npz(p)
    art = Artifact(meta, arrays, str(p))
    if fingerprint is not None:
        check_model(art, fingerprint, force, hint)
    return art


def existing(folder: Path, limit: int = 8) -> str:
    """What a missing artifact's message adds: the artifacts in its folder (and in out/ and solvers/), or how to
    make one."""
    places = list(dict.fromkeys([folder, Path("out"), Path("solvers")]))
    found = []
    for place in places:
        if place.is_dir():
            found += [str(p) for p in scan([place])]
    make = "make one with: sdistill distill RECIPE --out PATH.npz (e.g. recipes/quickstart.yaml)"
    if not found:
        return f"there are no artifacts in {', '.join(map(str, places))}; {make}"
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return f"artifacts here: {', '.join(found[:limit])}{more}; or {make}"


def _mismatch(p: Path) -> BadInput:
    return BadInput(
        f"{p}: its arrays do not match meta.{CHECKSUM}: the file was damaged, or its arrays changed after it was "
        f"saved (after a deliberate edit of a YAML artifact, delete meta.{CHECKSUM})"
    )


def _read_npz(p: Path) -> tuple[dict, Mapping[str, np.ndarray]]:
    """Headers first, then meta, then the names the method reads, then the checksum (streamed: nothing is held)."""
    what = "solver artifact"
    try:
        with NPZReader(p, what) as r:
            r.check_total(max_bytes(), f" (set {MAX_BYTES_ENV} to allow more)")
            meta = r.meta()
            check_meta(meta, p)
            names = sorted(n for n in r.entries if n != "meta")
            check_names(p, meta["method"], names)
            digests = None
            if CHECKSUM in meta:
                total, digests = hashlib.sha256(), {}
                for name in names:
                    e, one = r.entries[name], hashlib.sha256()
                    total.update(_entry_line(name, e.dtype, e.shape, e.fortran))
                    for piece in r.chunks(name):
                        total.update(piece)
                        one.update(piece)
                    digests[name] = one.hexdigest()
                if total.hexdigest() != meta[CHECKSUM]:
                    raise _mismatch(p)
            return meta, LazyArrays(p, what, r.entries, digests)
    except NotNPZ as e:
        raise BadInput(
            f"{p}: not an NPZ or YAML solver artifact ({e.why}; YAML artifacts end in .yaml or .yml). A solver is "
            "a handcrafted name (see `sdistill solvers`) or an artifact written by `sdistill distill`"
        ) from None


class _ArtifactLoader(BoundedLoader):
    """The recipes' bounded safe loader (no aliases: `*ref` can make a small file expand enormously)."""

    document = "an artifact"


def _read_yaml(p: Path) -> tuple[dict, dict[str, np.ndarray]]:
    if p.stat().st_size > MAX_YAML_BYTES:
        raise BadInput(f"{p}: a YAML artifact of {p.stat().st_size >> 20} MiB; at most {MAX_YAML_BYTES >> 20} MiB")
    try:
        doc = yaml.load(p.read_text(encoding="utf-8"), Loader=_ArtifactLoader)  # a SafeLoader subclass
    except UnicodeDecodeError:
        raise BadInput(f"{p}: not an NPZ or YAML solver artifact (not UTF-8 text)") from None
    except OSError as e:
        raise BadInput(f"{p}: cannot read the artifact: {e.strerror or e}") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise BadInput(f"{p}: malformed YAML artifact: {one_line(e)}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("meta"), dict):
        raise BadInput(f"{p}: a YAML artifact needs a 'meta' mapping and an 'arrays' mapping")
    extra = [k for k in doc if k not in ("meta", "arrays")]
    if extra:
        raise BadInput(f"{p}: unknown top-level key {extra[0]!r}; a YAML artifact holds 'meta' and 'arrays'")
    meta, raw = doc["meta"], doc.get("arrays") or {}
    bad = _not_json(meta, "meta")
    if bad:
        raise BadInput(f"{p}: {bad}")
    check_meta(meta, p)
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise BadInput(f"{p}: 'arrays' must be a mapping of name -> list of numbers")
    check_names(p, meta["method"], list(raw))
    arrays = {}
    for k, v in raw.items():
        try:
            items = np.asarray(v, dtype=object)
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in items.flat):
                raise ValueError("not numbers")
            arrays[k] = items.astype(np.float64)
        except (TypeError, ValueError, OverflowError, RecursionError):
            raise BadInput(f"{p}: array {k!r} must be a (nested) list of numbers") from None
    if CHECKSUM in meta and arrays_sha256(arrays) != meta[CHECKSUM]:
        raise _mismatch(p)
    return meta, arrays


def _not_json(value: Any, where: str, depth: int = 0) -> str | None:
    """Where a YAML value is not plain JSON (dates, sets, binary, non-string keys), as a message; else None."""
    if depth > 100:
        return f"{where}: nested more than 100 levels deep"
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where}: key {k!r} is not a string"
            bad = _not_json(v, f"{where}.{k}", depth + 1)
            if bad:
                return bad
        return None
    if isinstance(value, list):
        for i, v in enumerate(value):
            bad = _not_json(v, f"{where}[{i}]", depth + 1)
            if bad:
                return bad
        return None
    if value is None or isinstance(value, (str, int, float)):
        return None
    return f"{where}: expected strings, numbers, lists or mappings, got {type(value).__name__}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_grid(v: Any) -> bool:
    if not isinstance(v, list) or len(v) < 2:
        return False
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
        return False
    return all(a > b for a, b in zip(v, v[1:])) and v[-1] >= 0


# meta key -> (check, what was expected). Every key an engine reads is here; other keys are free-form.
META_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format": (lambda v: isinstance(v, str), "a string"),
    "format_version": (_is_int, "an integer"),
    "method": (lambda v: isinstance(v, str) and v != "", "a method name (a non-empty string)"),
    "nfe": (lambda v: _is_int(v) and 1 <= v <= MAX_NFE, f"a positive integer (at most {MAX_NFE})"),
    "model_fingerprint": (lambda v: isinstance(v, str), "a string"),
    "model": (lambda v: isinstance(v, str), "a model spec (a string)"),
    "network_passes": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "afs": (lambda v: isinstance(v, bool), "true or false"),
    "grid": (_is_grid, "a list of finite, strictly decreasing, non-negative sigmas"),
    "base_solver": (lambda v: isinstance(v, str), "a solver name (a string)"),
    "schedule": (lambda v: isinstance(v, str), "a string"),
    "created": (lambda v: isinstance(v, str), "a string"),
    "version": (lambda v: isinstance(v, str), "a string"),
    "student": (lambda v: isinstance(v, dict), "a mapping"),
    "options": (lambda v: isinstance(v, dict), "a mapping"),
    "training": (lambda v: isinstance(v, dict), "a mapping"),
    "teacher": (lambda v: isinstance(v, dict), "a mapping"),
    "metrics": (lambda v: isinstance(v, dict), "a mapping"),
    "cost": (lambda v: isinstance(v, dict), "a mapping"),
    CHECKSUM: (
        lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
        "a sha256 hex digest (64 characters)",
    ),
}


def check_meta(meta: Any, p: Path) -> None:
    """The required keys, the format and its version, then the type of every key the engine reads."""
    if not isinstance(meta, dict):
        raise BadInput(f"{p}: 'meta' must be a JSON object")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise BadInput(f"{p}: meta lacks {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise BadInput(f"{p}: meta.format is {shown(meta['format'])}, expected {FORMAT!r}")
    if meta["format_version"] != FORMAT_VERSION or not _is_int(meta["format_version"]):
        raise BadInput(
            f"{p}: unknown format_version {shown(meta['format_version'])}; this sdistill reads version {FORMAT_VERSION}"
        )
    for key, (ok, expected) in META_CHECKS.items():
        if key in meta and not ok(meta[key]):
            raise BadInput(f"{p}: meta.{key}: expected {expected}, got {shown(meta[key])}")
    # meta.student is validated like a recipe section, which expands ${VAR}: a file must not read the environment
    # (DLMS would copy the value into samples.npz). `distill` stores settings expanded, so none holds "${".
    for key, value in (meta.get("student") or {}).items():
        if isinstance(value, str) and "${" in value:
            raise BadInput(f"{p}: meta.student.{key}: ${{...}} is not expanded in an artifact, got {shown(value)}")


def declared_arrays(method: str) -> tuple[str, ...] | None:
    """The array names `method` reads (`*` ends a prefix), or None for a method that declares none."""
    from . import students

    try:
        declared = getattr(students.get(method), "arrays", None)
    except BadInput:  # a plugin that is not installed: `sample` says so; `inspect` still shows the file
        return None
    return tuple(declared) if declared else None


def check_names(p: Path, method: str, names: Iterable[str]) -> None:
    """Refuse arrays the method does not read, before reading them (an unknown array is at best dead weight)."""
    declared = declared_arrays(method)
    if declared is None:
        return
    for name in names:
        if not any(name.startswith(d[:-1]) if d.endswith("*") else name == d for d in declared):
            raise BadInput(
                f"{p}: array {name!r} is not one that method {method!r} reads ({', '.join(declared)}); "
                "refused without reading it"
            )


def check_model(art: Artifact, fingerprint: str, force: bool = False, hint: str = FORCE_HINT) -> None:
    """An artifact made for another model (weights or config) is refused unless `force`; `hint` says what to do
    (commands without --force give their own)."""
    if art.meta["model_fingerprint"] != fingerprint and not force:
        raise BadInput(
            f"{art.path}: made for model {art.meta.get('model', '?')} (fingerprint "
            f"{art.meta['model_fingerprint']}), not this one ({fingerprint}); {hint}"
        )


def scan(folders: Iterable[str | os.PathLike], fingerprint: str | None = None) -> dict[Path, Artifact]:
    """Every readable artifact in these folders (made for `fingerprint`, when given), in folder order."""
    found = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("*.npz")) + sorted(Path(folder).glob("*.yaml")):
            try:
                art = load(path)
            except BadInput:
                continue  # samples.npz, recipes and other files that are not artifacts
            if fingerprint is None or art.meta["model_fingerprint"] == fingerprint:
                found[path] = art
    return found


def find(method: str, nfe: int, fingerprint: str, folders: Iterable[str | os.PathLike]) -> Path | None:
    """The first artifact of `method` at `nfe` for this model in these folders, or None."""
    for path, art in scan(folders, fingerprint).items():
        if art.method == method and int(art.meta["nfe"]) == nfe:
            return path
    return None
