"""Our NPZ files (samples.npz, artifacts): arrays plus a JSON `meta` string, written atomically, read without
pickles (docs/formats.md). Also the output-folder check every writing command makes first."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInput


def ensure_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create the output folder, or fail with exit 2 before any work is done."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".sdistill-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BadInput(f"{flag}: cannot write to {str(p)!r}: {e.strerror or e}") from None
    return p


def write_npz(path: Path, meta: dict, **arrays: Any) -> None:
    """Write `meta` (as JSON) and the arrays atomically: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)


def read_meta(npz: Mapping[str, np.ndarray]) -> dict:
    """The JSON `meta` of an opened NPZ file."""
    return json.loads(str(npz["meta"][()]))


def read_npz(path: str | os.PathLike, what: str = "file") -> tuple[dict, dict]:
    """Read our NPZ files (samples, artifacts) safely: plain arrays plus a JSON `meta`; an object array is
    refused, so nothing in a file is ever executed. Returns (arrays, meta)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise BadInput(
                f"{path}: holds a pickled object array; a {what} holds plain numbers only, "
                "and nothing in it is ever executed"
            ) from None
        raise BadInput(f"{path}: not a readable NPZ {what} ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # a damaged zip is unreadable too, not a crash
        raise BadInput(f"{path}: not a readable NPZ {what} ({e})") from None
    if "meta" not in arrays:
        raise BadInput(f"{path}: missing the 'meta' entry (a JSON string)")
    try:
        meta = json.loads(str(arrays.pop("meta")[()]))
    except (json.JSONDecodeError, TypeError) as e:
        raise BadInput(f"{path}: 'meta' is not valid JSON ({e})") from None
    return arrays, meta
