"""Handwritten digits, our real-image testbed (docs/digits.md): scikit-learn's bundled 8x8 digits upsampled to
1x16x16 in [-1, 1] with a fixed split, the digit classifier whose penultimate layer is the `digits` feature space
of the Frechet distance, and its shipped reference statistics (`digits:train`, `digits:heldout`).

scikit-learn (the `[digits]` extra) is needed only to read the raw images: to retrain the networks or rebuild the
statistics (`python -m solverdistill.digits build`). The shipped classifier and statistics are data files.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import BadInput

DATA = Path(__file__).resolve().parent / "data"
CLASSIFIER = DATA / "digits_classifier.safetensors"
STATS = {"train": DATA / "digits_train.npz", "heldout": DATA / "digits_heldout.npz"}
SPLIT_SEED = 0
HELDOUT = 297  # 1,797 images: 1,500 for training, 297 held out
NUM_CLASSES = 10
SHAPE = (1, 16, 16)
CONFIDENT = 0.9  # a sample counts as a confidently read digit when the classifier's top probability reaches this
INSTALL = "pip install 'solverdistill[digits]'"


def raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: (images [1797, 8, 8] with values 0..16, labels [1797]); nothing downloaded."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise BadInput(f"digits: the raw images come with scikit-learn, which is not installed; {INSTALL}") from None
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def upsample(images: np.ndarray) -> torch.Tensor:
    """[N, 8, 8] grey levels 0..16 -> [N, 1, 16, 16] in [-1, 1]: bicubic x2, clipped (bicubic overshoots)."""
    x = torch.from_numpy(np.asarray(images, np.float32))[:, None] / 16.0
    x = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)
    return x * 2 - 1


def split_indices(n: int, seed: int = SPLIT_SEED, heldout: int = HELDOUT) -> tuple[np.ndarray, np.ndarray]:
    """A fixed permutation by seed: (training indices, held-out indices), each sorted."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(perm[heldout:]), np.sort(perm[:heldout])


@dataclass
class Split:
    x: torch.Tensor  # [N, 1, 16, 16] in [-1, 1]
    y: torch.Tensor  # [N] class labels


def load_split(name: str) -> Split:
    """`train` (1,500 images) or `heldout` (297), from the raw digits (needs scikit-learn)."""
    if name not in STATS:
        raise BadInput(f"digits: unknown split {name!r}; expected train or heldout")
    images, labels = raw_digits()
    train, heldout = split_indices(len(images))
    idx = train if name == "train" else heldout
    return Split(upsample(images[idx]), torch.from_numpy(labels[idx]))


# --- the classifier: features for the Frechet distance ---------------------------------------------------------


class DigitClassifier(nn.Module):
    """16x16 -> 8x8 -> 4x4 convolutions, a 64-d penultimate layer (the FD features), 10 logits."""

    def __init__(self, width: int = 32, features: int = 64) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * 16, features),
            nn.ReLU(),
        )
        self.head = nn.Linear(features, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 1, 16, 16] in [-1, 1] -> (features [B, 64], logits [B, 10])."""
        f = self.body(x.clamp(-1, 1))
        return f, self.head(f)


_classifier: DigitClassifier | None = None


def load_classifier(path: Path = CLASSIFIER) -> DigitClassifier:
    """The shipped classifier (safetensors), loaded once per process."""
    global _classifier
    if path == CLASSIFIER and _classifier is not None:
        return _classifier
    if not path.is_file():
        raise BadInput(f"--features digits: the classifier {path} is missing; rebuild it with `{REBUILD}`")
    from safetensors.torch import load_file

    net = DigitClassifier()
    net.load_state_dict(load_file(str(path)))
    net.eval().requires_grad_(False)
    if path == CLASSIFIER:
        _classifier = net
    return net


REBUILD = "python -m solverdistill.digits build"


def as_digit_batch(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Samples as the classifier's input: float [B, 1, 16, 16] in [-1, 1] (grey from RGB by averaging)."""
    x = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x).to(torch.float32)
    if x.ndim != 4 or tuple(x.shape[2:]) != SHAPE[1:] or x.shape[1] not in (1, 3):
        raise BadInput(
            f"--features digits: expects 1x16x16 (or 3x16x16) images like toy:unet-digits samples, got "
            f"{'x'.join(map(str, x.shape[1:]))}"
        )
    return x.mean(1, keepdim=True) if x.shape[1] == 3 else x


@torch.no_grad()
def classify(net: DigitClassifier, batches: Iterable[torch.Tensor]) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(features float64, probabilities) per batch."""
    for x in batches:
        f, logits = net(as_digit_batch(x))
        yield f.to(torch.float64), logits.softmax(1)


@dataclass
class ClassReport:
    """What the classifier says about a sample set: how many it reads confidently, and how the classes spread."""

    samples: int
    confident: float  # share of samples whose top class probability is >= CONFIDENT
    histogram: list[int]  # count of samples per predicted class 0..9
    classes_seen: int  # classes predicted for at least one sample (mode coverage)

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "confident_share": self.confident,
            "confident_threshold": CONFIDENT,
            "class_histogram": self.histogram,
            "classes_seen": self.classes_seen,
        }

    def line(self) -> str:
        return (
            f"{self.confident:.1%} confidently read (p >= {CONFIDENT}); classes seen {self.classes_seen}/10; "
            f"histogram {self.histogram}"
        )


def class_report(probs: torch.Tensor) -> ClassReport:
    top, cls = probs.max(1)
    hist = torch.bincount(cls, minlength=NUM_CLASSES).tolist()
    return ClassReport(int(probs.shape[0]), float((top >= CONFIDENT).double().mean()), hist, sum(h > 0 for h in hist))


# --- building the shipped classifier and statistics ------------------------------------------------------------


def shift_augment(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translations by up to `max_shift` pixels (background -1 fills in): digits are not centred alike."""
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    size = x.shape[-1]
    for i, (dy, dx) in enumerate(torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=g).tolist()):
        out[i] = pad[i, :, dy : dy + size, dx : dx + size]
    return out


def train_classifier(train: Split, epochs: int = 30, seed: int = 0, batch: int = 64) -> DigitClassifier:
    """Adam with cosine decay, random one-pixel shifts; deterministic from the seed."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = DigitClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(train.x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        perm = torch.randperm(len(train.x), generator=g)
        for b in range(0, len(perm), batch):
            idx = perm[b : b + batch]
            _, logits = net(shift_augment(train.x[idx], g))
            loss = F.cross_entropy(logits, train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(net: DigitClassifier, split: Split) -> float:
    _, logits = net(split.x)
    return float((logits.argmax(1) == split.y).double().mean())


def feature_stats(net: DigitClassifier, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    from .fid import FeatureStats

    stats = FeatureStats()
    for f, _ in classify(net, x.split(256)):
        stats.update(f)
    return stats.mean(), stats.cov()


def save_stats(path: Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.savez adds no suffix; plain float arrays, no pickles
        np.savez(f, mu=mu, sigma=sigma)


def build(out: Path = DATA, seed: int = 0) -> dict:
    """Retrain the classifier and rewrite its statistics of both splits; returns the figures it measured."""
    from safetensors.torch import save_file

    start = time.time()
    train, heldout = load_split("train"), load_split("heldout")
    net = train_classifier(train, seed=seed)
    seconds = time.time() - start
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / CLASSIFIER.name))
    for name, split in (("train", train), ("heldout", heldout)):
        save_stats(out / STATS[name].name, *feature_stats(net, split.x))
    from .fid import frechet_distance

    mu_t, s_t = feature_stats(net, train.x)
    mu_h, s_h = feature_stats(net, heldout.x)
    return {
        "train_accuracy": accuracy(net, train),
        "heldout_accuracy": accuracy(net, heldout),
        "floor_fd_train_vs_heldout": frechet_distance(mu_h, s_h, mu_t, s_t),
        "train_seconds": seconds,
    }


# --- the demo: a sample set next to every handcrafted solver at its NFE ---------------------------------------


@dataclass
class DemoRow:
    solver: str
    fd: float
    report: ClassReport


def against_handcrafted(
    samples: Path, ref: str = "digits:heldout", batch: int = 256
) -> tuple[DemoRow, list[DemoRow], int]:
    """FD (digit features) of a samples.npz of toy:unet-digits, and of every handcrafted solver (with and without
    AFS) at the same NFE from the same seeds, best first; and that NFE."""
    from .fid import digits_fd
    from .generate import generate
    from .models import resolve
    from .npzfiles import read_npz
    from .solvers import sweep

    arrays, meta = read_npz(samples, "samples file")
    spec = str(meta.get("model", ""))
    if spec.partition("?")[0] != "toy:unet-digits" or "seeds" not in arrays or "nfe" not in meta:
        raise BadInput(f"{samples}: expected samples of toy:unet-digits written by `sdistill sample`")
    model = resolve(spec)
    seeds = [int(s) for s in arrays["seeds"]]
    res = digits_fd(arrays["x"], ref, batch)
    mine = DemoRow(str(meta.get("solver", "?")), res.distance, res.classes)
    rows = []
    for name, plan in sweep(int(meta["nfe"]), model).items():
        r = digits_fd(generate(model, plan, seeds, batch=batch).x, ref, batch)
        rows.append(DemoRow(name, r.distance, r.classes))
    return mine, sorted(rows, key=lambda r: r.fd), int(meta["nfe"])


def demo_summary(samples: Path) -> str:
    mine, rows, nfe = against_handcrafted(samples)
    best = rows[0]
    return "\n".join(
        [
            f"FD against the held-out digits (digit-classifier features, {mine.report.samples} samples, NFE {nfe}):",
            f"  {mine.solver:>12}: {mine.fd:8.2f}   {mine.report.line()}",
            f"  {best.solver:>12}: {best.fd:8.2f}   (best handcrafted solver at the same NFE) {best.report.line()}",
            "  others: " + ", ".join(f"{r.solver} {r.fd:.1f}" for r in rows[1:]),
        ]
    )


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) >= 2 and sys.argv[1] == "build":
        print(json.dumps(build(), indent=1))
    elif len(sys.argv) == 3 and sys.argv[1] == "demo":
        print(demo_summary(Path(sys.argv[2])))
    else:
        print(f"usage: {REBUILD} | python -m solverdistill.digits demo SAMPLES.npz")
