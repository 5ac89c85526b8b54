"""Frechet distances (docs/evaluation.md): streaming float64 feature statistics, the distance itself, and
the features: raw pixels, Inception-v3 pool features through the TorchScript network the papers use, or the
shipped digit classifier's penultimate layer for 16x16 handwritten digits (docs/digits.md).

The Inception weights are never downloaded: `inception-2015-12-05.pt` (published by NVIDIA with the
StyleGAN2-ADA metrics; clean-fid's `InceptionV3W` wraps the same file) is read from `--inception PATH`,
`$SDISTILL_INCEPTION`, or `~/.cache/sdistill/inception-2015-12-05.pt`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from .errors import BadInput
from .images import to_uint8_nchw

if TYPE_CHECKING:
    from .digits import ClassReport

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


class FeatureStats:
    """Sums of f and f f^T in float64, so parts (batches, processes) add up to the whole exactly."""

    def __init__(self, dim: int | None = None) -> None:
        self.n, self.s1, self.s2 = 0, None, None
        if dim is not None:
            self._alloc(dim)

    def _alloc(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.s1 = torch.zeros(dim, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, f: torch.Tensor) -> None:
        """Accumulate on the features' own device (no copy back per batch)."""
        f = f.detach().to(torch.float64).reshape(f.shape[0], -1)
        if self.s1 is None:
            self._alloc(f.shape[1], f.device)
        self.n += f.shape[0]
        self.s1 += f.sum(0)
        self.s2 += f.T @ f

    def reduced(self) -> FeatureStats:
        """The sums over every torchrun rank (this object itself in one process): docs/distributed.md."""
        from . import distributed

        if not distributed.active():
            return self
        dims = [d for d in distributed.gather_objects(None if self.s1 is None else len(self.s1)) if d is not None]
        if not dims:
            return self
        if self.s1 is None:  # a rank that got no batch adds zeros
            self._alloc(dims[0])
        out = FeatureStats()
        out.n = int(distributed.all_sum(torch.tensor(float(self.n))).item())
        out.s1, out.s2 = distributed.all_sum(self.s1), distributed.all_sum(self.s2)
        return out

    def merge(self, other: FeatureStats) -> FeatureStats:
        out = FeatureStats()
        out.n, out.s1, out.s2 = self.n + other.n, self.s1 + other.s1, self.s2 + other.s2
        return out

    def mean(self) -> np.ndarray:
        return (self.s1 / self.n).cpu().numpy()

    def cov(self) -> np.ndarray:
        """Unbiased (1/(N-1)), as EDM and clean-fid compute it."""
        if self.n < 2:
            raise BadInput("FID needs at least 2 samples")
        mu = self.s1 / self.n
        return ((self.s2 - self.n * torch.outer(mu, mu)) / (self.n - 1)).cpu().numpy()


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), with tr sqrt(S1 S2) = sum sqrt(max(Re eig(S1 S2), 0))."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise BadInput(f"feature dimensions differ: samples {mu1.shape[0]}, reference {mu2.shape[0]}")
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def inception_path(explicit: str | None) -> Path:
    candidates = (
        [explicit]
        if explicit
        else [os.environ.get("SDISTILL_INCEPTION"), str(Path.home() / ".cache" / "sdistill" / INCEPTION_FILE)]
    )
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    where = explicit or candidates[-1]
    raise BadInput(
        f"--inception: the Inception-v3 TorchScript weights are not at {where}. Expected the file "
        f"{INCEPTION_FILE} (sha256 {INCEPTION_SHA256}), published by NVIDIA with the StyleGAN2-ADA metrics at "
        f"{INCEPTION_URL}; pass "
        "--inception PATH or set SDISTILL_INCEPTION. Nothing is downloaded."
    )


class InceptionFeatures:
    """2048-d pool features. `legacy_tensorflow`: uint8 images go in as they are and the TF-compatible network
    resizes inside (the papers' numbers). `clean`: PIL bicubic resize to 299 outside, then the network's layers
    on (x - 128) / 128, as clean-fid's clean mode does."""

    def __init__(self, path: Path, mode: str = "legacy_tensorflow", device: torch.device | str = "cpu") -> None:
        if mode not in ("legacy_tensorflow", "clean"):
            raise BadInput(f"--mode: expected legacy_tensorflow or clean, got {mode!r}")
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream, but it is the published format
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location=device).eval()
        except Exception as e:
            raise BadInput(
                f"--inception: {path} is not a loadable TorchScript file ({type(e).__name__}: {e})"
            ) from None
        self.mode, self.device = mode, torch.device(device)

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float64 [B, D]."""
        x = images_uint8.to(self.device)
        if self.mode == "legacy_tensorflow":
            f = self.net(x.to(torch.float32), return_features=True)
        else:
            x = clean_resize(x.cpu()).to(self.device)
            f = self.net.layers.forward((x.to(torch.float32) - 128) / 128)
        return f.reshape(f.shape[0], -1).to(torch.float64)


def clean_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    from PIL import Image

    out = []
    for im in x.permute(0, 2, 3, 1).numpy():
        ch = [
            np.asarray(Image.fromarray(im[..., c]).resize((size, size), Image.BICUBIC), dtype=np.float32)
            for c in range(im.shape[-1])
        ]
        out.append(np.stack(ch, 0))
    return torch.from_numpy(np.clip(np.stack(out), 0, 255).round().astype(np.uint8))


# --- where images and reference statistics come from ----------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_IMAGE_PIXELS = 4096 * 4096  # per image; FID sets are 32x32 to 1024x1024, a bigger one is a grid or a photo
# Pixel features need a D x D float64 covariance: 16384 values (3x73x73, 4x64x64 latents) is 2 GiB already.
MAX_PIXEL_FEATURES = 16384


def _too_many_values(where: object, shape: tuple[int, ...]) -> BadInput:
    d = math.prod(shape)
    return BadInput(
        f"{where}: {'x'.join(map(str, shape))} = {d} values per sample; pixel statistics need a {d} x {d} "
        f"covariance ({d * d * 8 / 2**30:.3g} GiB), so --features pixels takes at most {MAX_PIXEL_FEATURES} "
        "values per sample; use --features inception"
    )


def iter_images(source: str, batch: int, max_values: int | None = None) -> Iterator[torch.Tensor]:
    """Batches of uint8 [B, C, H, W] from a samples.npz (`images` if present, else `x`, in [-1, 1]) or a folder
    of PNG/JPEG files (sorted by name). Reads lazily: memory does not grow with the number of samples. Each
    image's size is checked from its header before it is decoded (at most MAX_IMAGE_PIXELS, all one size, and
    at most `max_values` numbers per image when given)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise BadInput(f"{p}: no PNG or JPEG images in this folder")
        size = None
        for b in range(0, len(files), batch):
            arrs = []
            for f in files[b : b + batch]:
                try:
                    with warnings.catch_warnings():  # PIL's bomb warning is moot: MAX_IMAGE_PIXELS is lower
                        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                        im = Image.open(f)  # reads the header only; convert() decodes
                    with im:
                        w, h = im.size
                        if w * h > MAX_IMAGE_PIXELS:
                            raise BadInput(
                                f"{f}: a {w}x{h} image; images for FID have at most {MAX_IMAGE_PIXELS} pixels "
                                "(4096x4096); is it a grid of samples?"
                            )
                        if size is None:
                            size, first = (w, h), f
                            if max_values is not None and w * h * 3 > max_values:
                                raise _too_many_values(f, (3, h, w))
                        elif (w, h) != size:
                            raise BadInput(
                                f"{f}: image size {w}x{h} differs from {first.name}'s {size[0]}x{size[1]}; "
                                "all images must have one size"
                            )
                        a = np.asarray(im.convert("RGB"))
                except Image.DecompressionBombError as e:  # too big for PIL even to open
                    raise BadInput(f"{f}: too large an image for FID ({e})") from None
                except (UnidentifiedImageError, OSError) as e:
                    raise BadInput(f"{f}: unreadable image ({e})") from None
                arrs.append(a)
            yield torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
        return
    from .npzfiles import read_npz

    if not p.is_file():
        raise BadInput(f"{p}: no such samples file or image folder")
    arrays, _ = read_npz(p, "samples file")
    x = arrays.get("images", arrays.get("x"))
    if x is None or x.ndim != 4:
        raise BadInput(f"{p}: expected an array 'x' (or 'images') of shape [N, C, H, W]")
    if max_values is not None and math.prod(x.shape[1:]) > max_values:
        raise _too_many_values(p, tuple(x.shape[1:]))
    for b in range(0, len(x), batch):
        yield to_uint8_nchw(torch.from_numpy(np.asarray(x[b : b + batch])))


def iter_pixels(source: str, batch: int) -> Iterator[torch.Tensor]:
    """Raw sample values, flattened, float64 (no quantisation) from a samples.npz; images from a folder map
    to [-1, 1]. At most MAX_PIXEL_FEATURES values per sample (the covariance is D x D)."""
    p = Path(source)
    if p.is_file() and p.suffix == ".npz":
        from .npzfiles import read_npz

        arrays, _ = read_npz(p, "samples file")
        x = arrays.get("images", arrays.get("x"))
        if x is None:
            raise BadInput(f"{p}: expected an array 'x'")
        if math.prod(x.shape[1:]) > MAX_PIXEL_FEATURES:
            raise _too_many_values(p, tuple(x.shape[1:]))
        for b in range(0, len(x), batch):
            yield torch.from_numpy(np.asarray(x[b : b + batch], dtype=np.float64)).flatten(1)
        return
    for u8 in iter_images(source, batch, max_values=MAX_PIXEL_FEATURES):
        yield (u8.to(torch.float64) - 127.5) / 127.5


def prefetch(iterator: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Run a batch iterator in a background thread so decoding overlaps the network."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def worker() -> None:
        try:
            for item in iterator:
                q.put(item)
            q.put(done)
        except BaseException as e:
            q.put(e)

    threading.Thread(target=worker, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def load_stats(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f.files or "sigma" not in f.files:
                raise BadInput(f"{path}: a statistics file needs arrays 'mu' and 'sigma' (has {', '.join(f.files)})")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not a readable statistics .npz ({e})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise BadInput(f"{path}: 'mu' must be [D] and 'sigma' [D, D], got {mu.shape} and {sigma.shape}")
    return mu, sigma


def stats_dir() -> Path:
    return Path(os.environ.get("SDISTILL_STATS", str(Path.home() / ".cache" / "sdistill" / "stats")))


# --- the `fid` job: samples against a reference ----------------------------------------------------------------

FEATURES = ("inception", "pixels", "digits")
DIGIT_REFS = ("digits:train", "digits:heldout")  # the shipped statistics of the digit features
DIGIT_MODELS = ("toy:unet-digits",)  # samples of these models are measured with digit features by default


@dataclass
class FIDResult:
    distance: float
    samples: int
    features: str
    mode: str
    reference: str
    classes: ClassReport | None = None  # digit features: what the classifier reads in the samples


def iter_float_images(source: str, batch: int) -> Iterator[torch.Tensor]:
    """Float [B, C, H, W] images in [-1, 1]: a samples.npz's values as they are (no quantisation), a folder's
    images mapped from 0..255."""
    p = Path(source)
    if p.is_file() and p.suffix == ".npz":
        from .npzfiles import read_npz

        arrays, _ = read_npz(p, "samples file")
        x = arrays.get("images", arrays.get("x"))
        if x is None or x.ndim != 4:
            raise BadInput(f"{p}: expected an array 'x' (or 'images') of shape [N, C, H, W]")
        for b in range(0, len(x), batch):
            yield torch.from_numpy(np.asarray(x[b : b + batch], dtype=np.float32))
        return
    for u8 in iter_images(source, batch):
        yield u8.to(torch.float32) / 127.5 - 1


def digit_stats(
    batches: Iterable[torch.Tensor], progress: Callable[..., Any] | None = None
) -> tuple[FeatureStats, ClassReport]:
    """Digit-classifier features of [-1, 1] images, and the classifier's report on them."""
    from .digits import class_report, classify, load_classifier

    stats, probs = FeatureStats(), []
    for f, p in classify(load_classifier(), batches):
        stats.update(f)
        probs.append(p)
        if progress:
            progress(f.shape[0])
    if not probs:
        raise BadInput("--features digits: no images to measure")
    return stats, class_report(torch.cat(probs))


def digit_reference(ref: str) -> tuple[np.ndarray, np.ndarray, str]:
    """`digits:train` or `digits:heldout`: the shipped statistics of the digit features."""
    from .digits import REBUILD, STATS

    path = STATS[ref.partition(":")[2]]
    if not path.is_file():
        raise BadInput(f"--ref {ref}: the statistics {path} are missing; rebuild them with `{REBUILD}`")
    mu, sigma = load_stats(path)
    return mu, sigma, f"{ref} ({path.name})"


def digits_fd(x: torch.Tensor | np.ndarray, ref: str = "digits:heldout", batch: int = 256) -> FIDResult:
    """Frechet distance of [-1, 1] digit samples [N, 1, 16, 16] to the shipped statistics, in digit-classifier
    features, with the classifier's report (share read confidently, class histogram): for `compare` and the
    benchmarks, which hold samples in memory."""
    if ref not in DIGIT_REFS:
        raise BadInput(f"--ref: expected one of {', '.join(DIGIT_REFS)}, got {ref!r}")
    mu_r, sig_r, where = digit_reference(ref)
    stats, report = digit_stats(torch.as_tensor(np.asarray(x, dtype=np.float32)).split(batch))
    return FIDResult(frechet_distance(stats.mean(), stats.cov(), mu_r, sig_r), stats.n, "digits", "-", where, report)


def default_features(samples: str | None, ref: str | None) -> str:
    """`fid` without --features: digit features for digit references and for samples of a digit model (its
    samples.npz says so in meta.model), Inception features otherwise."""
    if ref in DIGIT_REFS:
        return "digits"
    p = Path(samples) if samples else None
    if p is not None and p.is_file() and p.suffix == ".npz":
        from .npzfiles import NPZReader

        try:
            with NPZReader(p, "samples file") as r:
                model = str(r.meta().get("model", ""))
        except BadInput:
            return "inception"  # not our samples file: the measurement itself reports what is wrong
        if model.partition("?")[0] in DIGIT_MODELS:
            return "digits"
    return "inception"


def compute_stats(
    source: str,
    features: str,
    mode: str,
    batch: int,
    device: torch.device | str,
    inception: str | None,
    progress: Callable[..., Any] | None = None,
) -> FeatureStats:
    if features == "digits":
        return digit_stats(prefetch(iter_float_images(source, batch)), progress)[0]
    from .distributed import rank_size

    rank, size = rank_size()  # under torchrun each rank measures every size-th batch; the sums are reduced
    stats = FeatureStats()
    if features == "pixels":
        batches = prefetch(iter_pixels(source, batch))
        for i, f in enumerate(batches):
            if i % size == rank:
                stats.update(f)
            if progress:
                progress(f.shape[0])
        return stats.reduced()
    net = InceptionFeatures(inception_path(inception), mode, device)
    for i, u8 in enumerate(prefetch(iter_images(source, batch))):
        if i % size == rank:
            stats.update(net(u8))
        if progress:
            progress(u8.shape[0])
    return stats.reduced()


def reference_stats(
    ref: str, features: str, mode: str, batch: int, device: torch.device | str, inception: str | None
) -> tuple[np.ndarray, np.ndarray, str]:
    if ref.startswith("digits:"):
        if ref not in DIGIT_REFS:
            raise BadInput(f"--ref {ref}: the shipped digit statistics are {' and '.join(DIGIT_REFS)}")
        if features != "digits":
            raise BadInput(f"--ref {ref}: these statistics are of digit features; use --features digits")
        return digit_reference(ref)
    p = Path(ref)
    if p.is_file() and p.suffix == ".npz" and not _is_samples(p):
        mu, sigma = load_stats(p)
        return mu, sigma, str(p)
    if p.is_dir() or (p.is_file() and p.suffix == ".npz"):
        s = compute_stats(ref, features, mode, batch, device, inception)
        return s.mean(), s.cov(), str(p)
    if ":" in ref:  # a model spec: exact moments of an analytic model, pixel features only
        from .models import resolve

        model = resolve(ref)
        if not hasattr(model, "data_cov"):
            raise BadInput(f"--ref {ref}: this model has no exact data moments; give a statistics file or images")
        if features != "pixels":
            raise BadInput(f"--ref {ref}: exact moments are in pixel space; add --features pixels")
        return model.data_mean().numpy(), model.data_cov().numpy(), f"{ref} (exact mixture moments)"
    found = sorted(stats_dir().glob(f"{ref}.npz")) + sorted(stats_dir().glob(f"{ref}-*.npz"))
    if not found:
        raise BadInput(
            f"--ref: {ref!r} is not a file, a folder, a model spec, or a dataset with a statistics file "
            f"in {stats_dir()} (expected {ref}.npz or {ref}-*.npz with 'mu' and 'sigma'; set "
            "SDISTILL_STATS to another folder)"
        )
    mu, sigma = load_stats(found[0])
    return mu, sigma, str(found[0])


def _is_samples(p: Path) -> bool:
    with np.load(p, allow_pickle=False) as f:
        return "mu" not in f.files and ("x" in f.files or "images" in f.files)


def check_options(features: str, mode: str, batch: int) -> None:
    """The flags every FID job shares, checked before any work."""
    if features not in FEATURES:
        raise BadInput(f"--features: expected one of {', '.join(FEATURES)}, got {features!r}")
    if mode not in ("legacy_tensorflow", "clean"):
        raise BadInput(f"--mode: expected legacy_tensorflow or clean, got {mode!r}")
    if batch < 1:
        raise BadInput(f"--batch: must be >= 1, got {batch}")


def run_fid(
    samples: str,
    ref: str,
    features: str,
    mode: str,
    batch: int,
    device: torch.device | str,
    inception: str | None,
    progress: Callable[..., Any] | None = None,
) -> FIDResult:
    check_options(features, mode, batch)
    mu_r, sig_r, where = reference_stats(ref, features, mode, batch, device, inception)
    if features == "digits":
        s, report = digit_stats(prefetch(iter_float_images(samples, batch)), progress)
        return FIDResult(frechet_distance(s.mean(), s.cov(), mu_r, sig_r), s.n, features, "-", where, report)
    s = compute_stats(samples, features, mode, batch, device, inception, progress)
    return FIDResult(frechet_distance(s.mean(), s.cov(), mu_r, sig_r), s.n, features, mode, where)


def make_ref(
    images: str, out: str, features: str, mode: str, batch: int, device: torch.device | str, inception: str | None
) -> tuple[Path, int]:
    """Reference statistics of `images` written to exactly `out` (a .npz path, checked before any work)."""
    from .npzfiles import check_output

    check_options(features, mode, batch)
    path = check_output(Path(out), "--out")
    if path.suffix != ".npz":  # `--ref` recognises a statistics file by it, and np.savez would append it
        raise BadInput(f"--out: a statistics file ends in .npz, got {str(path)!r}")
    s = compute_stats(images, features, mode, batch, device, inception)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # a file object: np.savez writes it as it is, no suffix added
            np.savez(f, mu=s.mean(), sigma=s.cov())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BadInput(f"--out: cannot write {str(path)!r}: {e.strerror or e}") from None
    return path, s.n
