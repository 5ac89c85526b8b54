"""Solver artifacts (docs/formats.md "Artifacts"): one self-describing file, safe to load.

NPZ: arrays plus a `meta` entry holding a JSON string, read with allow_pickle=False (an object array is refused,
nothing in the file runs). YAML: the same meta plus small arrays as nested lists, for people to read and edit.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import __version__
from .errors import BadInput
from .npzfiles import read_npz, write_npz

FORMAT, FORMAT_VERSION = "sdistill-solver", 1
REQUIRED_META = ("format", "format_version", "method", "nfe", "model_fingerprint")


@dataclass
class Artifact:
    meta: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
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
        if not np.issubdtype(a.dtype, np.number) or not np.all(np.isfinite(a)):
            raise BadInput(f"{self.path or 'artifact'}: array {name!r} must hold finite numbers")
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


def save(artifact: Artifact, path: str | os.PathLike) -> Path:
    """Write NPZ (or YAML for a .yaml/.yml path) atomically; an unwritable path is bad input naming --out."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix in (".yaml", ".yml"):
            doc = {"meta": artifact.meta, "arrays": {k: np.asarray(v).tolist() for k, v in artifact.arrays.items()}}
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120))
            os.replace(tmp, p)
        else:
            write_npz(p, artifact.meta, **artifact.arrays)
    except OSError as e:
        raise BadInput(f"--out: cannot write the artifact {str(p)!r}: {e.strerror or e}") from None
    return p


def load(path: str | os.PathLike, fingerprint: str | None = None, force: bool = False) -> Artifact:
    """Read and check an artifact. A model fingerprint mismatch is bad input unless `force`."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{p}: no such solver artifact")
    if p.suffix in (".yaml", ".yml"):
        try:
            doc = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise BadInput(f"{p}: malformed YAML artifact: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("meta"), dict):
            raise BadInput(f"{p}: a YAML artifact needs a 'meta' mapping and an 'arrays' mapping")
        meta, raw = doc["meta"], doc.get("arrays") or {}
        if not isinstance(raw, dict):
            raise BadInput(f"{p}: 'arrays' must be a mapping of name -> list of numbers")
        arrays = {}
        for k, v in raw.items():
            try:
                arrays[k] = np.asarray(v, dtype=np.float64)
            except (TypeError, ValueError):
                raise BadInput(f"{p}: array {k!r} must be a (nested) list of numbers") from None
    else:
        arrays, meta = read_npz(p, "artifact")
    if not isinstance(meta, dict):
        raise BadInput(f"{p}: 'meta' must be a JSON object")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise BadInput(f"{p}: meta lacks {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise BadInput(f"{p}: meta.format is {meta['format']!r}, expected {FORMAT!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise BadInput(
            f"{p}: unknown format_version {meta['format_version']!r}; this sdistill reads version {FORMAT_VERSION}"
        )
    art = Artifact(meta, arrays, str(p))
    if fingerprint is not None:
        check_model(art, fingerprint, force)
    return art


def check_model(art: Artifact, fingerprint: str, force: bool = False) -> None:
    """An artifact made for another model (weights or config) is refused unless `force`."""
    if art.meta["model_fingerprint"] != fingerprint and not force:
        raise BadInput(
            f"{art.path}: made for model {art.meta.get('model', '?')} (fingerprint "
            f"{art.meta['model_fingerprint']}), not this one ({fingerprint}); use --force to use it anyway"
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
