"""`sdistill convert ldm`: a CompVis latent-diffusion checkpoint into a diffusers folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .console import line


def ldm(
    ckpt: Path = typer.Argument(..., help="CompVis LDM checkpoint (model.ckpt)."),
    out_dir: Path = typer.Argument(..., help="diffusers pipeline folder to write."),
    num_head_channels: Optional[int] = typer.Option(
        None,
        "--num-head-channels",
        help="Attention head width; default: the model config in the checkpoint or config.yaml beside it, else 32.",
    ),
    sample_size: int = typer.Option(64, "--sample-size", help="Latent side (64 for LSUN-Bedroom)."),
    norm_groups: int = typer.Option(32, "--norm-groups", help="GroupNorm groups (32 in LDM)."),
):
    """CompVis latent diffusion checkpoint (UNet + VQ first stage) -> diffusers folder (use as diffusers:OUT)."""
    from ..convert import convert_ldm

    path, notes = convert_ldm(str(ckpt), str(out_dir), num_head_channels, sample_size, norm_groups)
    for note in notes:
        line(note)
    line(f"wrote {path} (unet/, vqvae/, scheduler/); sample with --model diffusers:{path}")
