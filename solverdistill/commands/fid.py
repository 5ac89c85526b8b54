"""`sdistill fid`: the Frechet distance of samples to reference statistics, or reference statistics of images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import BadInput
from .console import line, say


def command(
    samples: Optional[str] = typer.Argument(None, help="samples.npz or a folder of PNG/JPEG images."),
    ref: Optional[str] = typer.Option(
        None,
        "--ref",
        help="Statistics .npz (mu, sigma), image folder, dataset "
        "name with a local statistics file, digits:train or digits:heldout (shipped), or (pixels) a gmm: model spec.",
    ),
    features: Optional[str] = typer.Option(
        None,
        "--features",
        help="inception, pixels or digits (default: digits for toy:unet-digits samples and digits: references, "
        "else inception).",
    ),
    mode: str = typer.Option("legacy_tensorflow", "--mode", help="legacy_tensorflow (papers) or clean."),
    batch: int = typer.Option(64, "--batch", help="Images per batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    inception: Optional[str] = typer.Option(None, "--inception", help="Path to inception-2015-12-05.pt."),
    make_ref: Optional[str] = typer.Option(None, "--make-ref", help="Write reference statistics of these images."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="With --make-ref: the statistics .npz to write."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Frechet distance (FID with Inception features); the distance is the last line on stdout."""
    from ..devices import resolve_device
    from ..fid import default_features, run_fid
    from ..fid import make_ref as write_ref

    dev = resolve_device(device)
    features = features or default_features(samples, ref)
    if make_ref:
        if out_path is None:
            raise BadInput("--out: required with --make-ref (the statistics .npz to write)")
        path, n = write_ref(make_ref, str(out_path), features, mode, batch, dev, inception)
        line(f"wrote {path} ({n} images, {features} features)")
        return
    if samples is None or ref is None:
        raise BadInput("give SAMPLES and --ref (or --make-ref IMAGES --out ref.npz)")
    r = run_fid(samples, ref, features, mode, batch, dev, inception)
    if as_json:
        out = {
            "fid": r.distance,
            "samples": r.samples,
            "features": r.features,
            "mode": r.mode,
            "reference": r.reference,
        }
        if r.classes is not None:
            out["classes"] = r.classes.as_dict()
        print(json.dumps(out))
    else:
        how = "" if r.features == "digits" else f" ({r.mode})"
        say(f"{r.samples} samples, {r.features} features{how}, reference {r.reference}")
        if r.classes is not None:
            say(f"digit classifier: {r.classes.line()}")
        print(f"{r.distance:.6g}")
