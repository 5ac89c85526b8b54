"""`sdistill fid`: Frechet distance of samples (or an image folder) to reference statistics, a reference
folder, a dataset's local statistics file, or (pixel features) an analytic model's exact moments."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..fid import (FeatureStats, InceptionFeatures, frechet_distance, inception_path, iter_images, iter_pixels,
                   load_stats, prefetch, stats_dir)

FEATURES = ("inception", "pixels")


@dataclass
class FIDResult:
    distance: float
    samples: int
    features: str
    mode: str
    reference: str


def compute_stats(source: str, features: str, mode: str, batch: int, device, inception: str | None,
                  progress=None) -> FeatureStats:
    stats = FeatureStats()
    if features == "pixels":
        batches = prefetch(iter_pixels(source, batch))
        for f in batches:
            stats.update(f)
            if progress:
                progress(f.shape[0])
        return stats
    net = InceptionFeatures(inception_path(inception), mode, device)
    for u8 in prefetch(iter_images(source, batch)):
        stats.update(net(u8))
        if progress:
            progress(u8.shape[0])
    return stats


def reference_stats(ref: str, features: str, mode: str, batch, device, inception) -> tuple[np.ndarray, np.ndarray, str]:
    p = Path(ref)
    if p.is_file() and p.suffix == ".npz" and not _is_samples(p):
        mu, sigma = load_stats(p)
        return mu, sigma, str(p)
    if p.is_dir() or (p.is_file() and p.suffix == ".npz"):
        s = compute_stats(ref, features, mode, batch, device, inception)
        return s.mean(), s.cov(), str(p)
    if ":" in ref:  # a model spec: exact moments of an analytic model, pixel features only
        from ..models import resolve
        model = resolve(ref)
        if not hasattr(model, "data_cov"):
            raise BadInput(f"--ref {ref}: this model has no exact data moments; give a statistics file or images")
        if features != "pixels":
            raise BadInput(f"--ref {ref}: exact moments are in pixel space; add --features pixels")
        return model.data_mean().numpy(), model.data_cov().numpy(), f"{ref} (exact mixture moments)"
    found = sorted(stats_dir().glob(f"{ref}.npz")) + sorted(stats_dir().glob(f"{ref}-*.npz"))
    if not found:
        raise BadInput(f"--ref: {ref!r} is not a file, a folder, a model spec, or a dataset with a statistics file "
                       f"in {stats_dir()} (expected {ref}.npz or {ref}-*.npz with 'mu' and 'sigma'; set "
                       "SDISTILL_STATS to another folder)")
    mu, sigma = load_stats(found[0])
    return mu, sigma, str(found[0])


def _is_samples(p: Path) -> bool:
    with np.load(p, allow_pickle=False) as f:
        return "mu" not in f.files and ("x" in f.files or "images" in f.files)


def run_fid(samples: str, ref: str, features: str, mode: str, batch: int, device, inception, progress=None):
    if features not in FEATURES:
        raise BadInput(f"--features: expected one of {', '.join(FEATURES)}, got {features!r}")
    if mode not in ("legacy_tensorflow", "clean"):
        raise BadInput(f"--mode: expected legacy_tensorflow or clean, got {mode!r}")
    if batch < 1:
        raise BadInput(f"--batch: must be >= 1, got {batch}")
    mu_r, sig_r, where = reference_stats(ref, features, mode, batch, device, inception)
    s = compute_stats(samples, features, mode, batch, device, inception, progress)
    return FIDResult(frechet_distance(s.mean(), s.cov(), mu_r, sig_r), s.n, features, mode, where)


def make_ref(images: str, out: str, features: str, mode: str, batch: int, device, inception) -> tuple[Path, int]:
    s = compute_stats(images, features, mode, batch, device, inception)
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, mu=s.mean(), sigma=s.cov())
    except OSError as e:
        raise BadInput(f"--out: cannot write {str(path)!r}: {e.strerror or e}") from None
    return path, s.n
