"""What commands write: samples.npz (arrays plus a JSON `meta` string, safe to load) and pictures of samples."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

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


def write_npz(path: Path, meta: dict, **arrays) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)


def read_meta(npz) -> dict:
    return json.loads(str(npz["meta"][()]))


def is_image(shape) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 8


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] images, NCHW -> uint8 NHWC, the convention of EDM and the FID code (x * 127.5 + 128, clipped)."""
    return np.clip(x * 127.5 + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def image_grid(x: np.ndarray, cols: int | None = None) -> np.ndarray:
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = im
    return grid[..., 0] if c == 1 else grid


def save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image
    Image.fromarray(array).save(path)


def save_pictures(x: np.ndarray, out: Path, png_each: bool = False, title: str = "") -> list[Path]:
    """A grid for image-shaped samples, a scatter plot for 2-D points; nothing for other shapes."""
    written = []
    shape = x.shape[1:]
    if is_image(shape):
        save_png(image_grid(x[:64]), out / "grid.png")
        written.append(out / "grid.png")
        if png_each:
            (out / "png").mkdir(exist_ok=True)
            for i, im in enumerate(to_uint8(x)):
                save_png(im[..., 0] if im.shape[-1] == 1 else im, out / "png" / f"{i:06d}.png")
    elif shape == (2,):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(x[:, 0], x[:, 1], s=4, alpha=0.6)
        ax.set_aspect("equal")
        ax.set_title(title)
        fig.savefig(out / "scatter.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(out / "scatter.png")
    return written


def read_npz(path, what: str = "file") -> tuple[dict, dict]:
    """Read our NPZ files (samples, artifacts) safely: plain arrays plus a JSON `meta`; an object array is
    refused, so nothing in a file is ever executed. Returns (arrays, meta)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise BadInput(f"{path}: holds a pickled object array; a {what} holds plain numbers only, "
                           "and nothing in it is ever executed") from None
        raise BadInput(f"{path}: not a readable NPZ {what} ({e})") from None
    except (OSError, EOFError) as e:
        raise BadInput(f"{path}: not a readable NPZ {what} ({e})") from None
    if "meta" not in arrays:
        raise BadInput(f"{path}: missing the 'meta' entry (a JSON string)")
    try:
        meta = json.loads(str(arrays.pop("meta")[()]))
    except (json.JSONDecodeError, TypeError) as e:
        raise BadInput(f"{path}: 'meta' is not valid JSON ({e})") from None
    return arrays, meta
