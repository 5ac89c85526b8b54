"""Pictures of samples: [-1, 1] images to uint8, grids, PNGs, and scatter plots of 2-D points."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def to_uint8_nchw(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 of x * 127.5 + 128, clipped (the convention of EDM and the FID code)."""
    return (x.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def is_image(shape: Sequence[int]) -> bool:
    """Per-sample shape [C, H, W] with 1 or 3 channels and at least 8 pixels a side."""
    return len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 8


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] images, NCHW -> uint8 NHWC (`to_uint8_nchw`, then channels last)."""
    return to_uint8_nchw(torch.from_numpy(np.asarray(x))).numpy().transpose(0, 2, 3, 1)


def image_grid(x: np.ndarray, cols: int | None = None) -> np.ndarray:
    """Images tiled `cols` to a row (default: a square), uint8 HW or HWC."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, k = divmod(i, cols)
        grid[r * h : (r + 1) * h, k * w : (k + 1) * w] = im
    return grid[..., 0] if c == 1 else grid


def _text_strip(lines: list[str], width: int, height: int, channels: int) -> np.ndarray:
    """White text on black, `lines` stacked, as a uint8 HxW(xC) strip (PIL's built-in bitmap font)."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(im)
    for i, text in enumerate(lines):
        draw.text((3, 2 + 11 * i), text, fill=255)
    strip = np.asarray(im)
    return strip if channels == 1 else np.repeat(strip[..., None], channels, axis=2)


def _channels(grid: np.ndarray) -> int:
    return 1 if grid.ndim == 2 else grid.shape[2]


def label_rows(grid: np.ndarray, labels: Sequence[str], width: int = 150) -> np.ndarray:
    """A grid of equal-height rows with each row's label to its left (e.g. "dpm++, NFE 5": one line per part)."""
    h = grid.shape[0] // max(len(labels), 1)
    column = np.concatenate(
        [_text_strip([part[:24] for part in text.split(", ")], width, h, _channels(grid)) for text in labels]
        + ([_text_strip([], width, grid.shape[0] - h * len(labels), _channels(grid))] if grid.shape[0] % h else [])
    )
    return np.concatenate([column, grid], axis=1)


def caption(grid: np.ndarray, text: str) -> np.ndarray:
    """A grid with a few lines of text above it (wrapped at spaces): what the picture shows."""
    chars = max(grid.shape[1] // 6, 10)  # the bitmap font is 6 pixels a character
    lines = textwrap.wrap(text, chars)[:4]
    return np.concatenate([_text_strip(lines, grid.shape[1], 4 + 11 * len(lines), _channels(grid)), grid], axis=0)


def save_png(array: np.ndarray, path: Path) -> None:
    """A uint8 array as a PNG file."""
    from PIL import Image

    Image.fromarray(array).save(path)


def save_pictures(x: np.ndarray, out: Path, png_each: bool = False, title: str = "") -> list[Path]:
    """A grid for image-shaped samples, a scatter plot for 2-D points; nothing for other shapes."""
    written = []
    shape = x.shape[1:]
    if is_image(shape):
        grid = image_grid(x[:64])
        save_png(caption(grid, title) if title else grid, out / "grid.png")
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
        ax.set_xlabel("x[0]")
        ax.set_ylabel("x[1]")
        ax.set_title(title)
        fig.savefig(out / "scatter.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(out / "scatter.png")
    return written


def as_images(x: np.ndarray) -> np.ndarray:
    """Samples as [N, C, H, W] pictures: images as they are, any other shape as a grey square of its values."""
    if is_image(x.shape[1:]):
        return x
    flat = x.reshape(len(x), -1)
    side = math.ceil(math.sqrt(flat.shape[1]))
    padded = np.zeros((len(x), side * side), dtype=np.float32)
    padded[:, : flat.shape[1]] = flat
    return np.kron(padded.reshape(len(x), 1, side, side), np.ones((1, 1, 8, 8), dtype=np.float32))
