"""Handwritten digits, our real-image testbed (docs/digits.md): scikit-learn's bundled 8x8 digits upsampled to
1x16x16 in [-1, 1] with a fixed split, the digit classifier whose penultimate layer is the `digits` feature space
of the Frechet distance, its shipped reference statistics (`digits:train`, `digits:heldout`), and the comparison
`make demo` prints (`python -m solverdistill.digits handcrafted`, then `demo`).

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


# --- the demo (`make demo`): a student's samples next to every handcrafted solver at its NFE --------------------


@dataclass
class DemoRow:
    solver: str
    fd: float
    report: ClassReport


def handcrafted(
    spec: str, nfe: int, seeds: list[int], ref: str = "digits:heldout", batch: int = 256
) -> tuple[list[DemoRow], np.ndarray]:
    """FD (digit features) of every handcrafted solver, with and without AFS, at `nfe` from `seeds`, best first;
    and the first 32 samples of the best one (for the demo's picture)."""
    from .fid import digits_fd
    from .generate import generate
    from .models import resolve
    from .solvers import sweep

    model = resolve(spec)
    rows, best_x = [], None
    for name, plan in sweep(nfe, model).items():
        x = generate(model, plan, seeds, batch=batch).x
        r = digits_fd(x, ref, batch)
        rows.append(DemoRow(name, r.distance, r.classes))
        if r.distance <= min(row.fd for row in rows):
            best_x = x[:32].numpy()
    return sorted(rows, key=lambda r: r.fd), best_x


def write_handcrafted(out: Path, spec: str, nfe: int, num: int, seed: int, ref: str = "digits:heldout") -> None:
    """`handcrafted` for seeds [seed, seed + num), written to an NPZ that `demo --handcrafted` reads: the demo
    runs it on the second core while the teacher and the student run on the first (it needs neither)."""
    from .models import resolve
    from .npzfiles import check_output, write_npz

    check_output(out, "--out")
    seeds = list(range(seed, seed + num))
    rows, best_x = handcrafted(spec, nfe, seeds, ref)
    meta = {
        "kind": "digits-handcrafted",
        "model": spec,
        "model_fingerprint": resolve(spec).fingerprint,
        "nfe": nfe,
        "ref": ref,
        "rows": [{"solver": r.solver, "fd": r.fd} | r.report.as_dict() for r in rows],
    }
    write_npz(out, meta, seeds=np.array(seeds, dtype=np.int64), best_x=best_x)


def read_handcrafted(path: Path, fingerprint: str, nfe: int, seeds: np.ndarray, ref: str) -> tuple[list, np.ndarray]:
    """The rows `write_handcrafted` wrote, checked to be of this model, NFE, seeds and reference."""
    from .npzfiles import read_npz

    arrays, meta = read_npz(path, "handcrafted FD file")
    if meta.get("kind") != "digits-handcrafted" or "seeds" not in arrays or "best_x" not in arrays:
        raise BadInput(f"--handcrafted {path}: expected a file written by `python -m solverdistill.digits handcrafted`")
    got = (meta.get("model_fingerprint"), meta.get("nfe"), meta.get("ref"), arrays["seeds"].tolist())
    if got != (fingerprint, nfe, ref, [int(s) for s in seeds]):
        raise BadInput(
            f"--handcrafted {path}: made for another model, NFE, reference or seeds than the samples "
            f"(NFE {meta.get('nfe')}, {len(arrays['seeds'])} seeds from {arrays['seeds'][:1].tolist()}); rerun "
            f"`python -m solverdistill.digits handcrafted` with the samples' settings"
        )
    rows = []
    for r in meta["rows"]:
        report = ClassReport(r["samples"], r["confident_share"], r["class_histogram"], r["classes_seen"])
        rows.append(DemoRow(r["solver"], float(r["fd"]), report))
    return rows, arrays["best_x"]


def against_handcrafted(
    samples: Path, handcrafted_file: Path | None = None, ref: str = "digits:heldout", batch: int = 256
) -> tuple[DemoRow, list[DemoRow], int, np.ndarray, np.ndarray]:
    """FD (digit features) of a samples.npz of toy:unet-digits, and of every handcrafted solver (with and without
    AFS) at the same NFE from the same seeds, best first (measured here, or read from `handcrafted_file`); that
    NFE; the first 32 samples of each side."""
    from .fid import digits_fd
    from .models import resolve
    from .npzfiles import read_npz

    arrays, meta = read_npz(samples, "samples file")
    spec = str(meta.get("model", ""))
    if spec.partition("?")[0] != "toy:unet-digits" or "seeds" not in arrays or "nfe" not in meta:
        raise BadInput(f"{samples}: expected samples of toy:unet-digits written by `sdistill sample`")
    nfe = int(meta["nfe"])
    res = digits_fd(arrays["x"], ref, batch)
    mine = DemoRow(str(meta.get("solver", "?")), res.distance, res.classes)
    if handcrafted_file is not None:
        rows, best_x = read_handcrafted(handcrafted_file, resolve(spec).fingerprint, nfe, arrays["seeds"], ref)
    else:
        rows, best_x = handcrafted(spec, nfe, [int(s) for s in arrays["seeds"]], ref, batch)
    return mine, rows, nfe, arrays["x"][:32], best_x


def demo_picture(mine: np.ndarray, best: np.ndarray, labels: list[str], title: str, path: Path) -> None:
    """The same seeds by two solvers, 8 to a row, 3x enlarged with a black margin, each block labelled, a caption
    above."""
    from .images import caption, image_grid, label_rows, save_png

    blocks = []
    for x in (mine, best):
        big = np.kron(np.asarray(x, dtype=np.float32), np.ones((1, 1, 3, 3), dtype=np.float32))
        big = np.pad(big, ((0, 0), (0, 0), (3, 3), (3, 3)), constant_values=-1.0)  # black between digits
        g = image_grid(big, cols=8)
        blocks += [g, np.full((8, g.shape[1]), 96, dtype=np.uint8)]  # a grey line under each block
    save_png(caption(label_rows(np.concatenate(blocks), labels), title), path)


def demo_summary(samples: Path, handcrafted_file: Path | None = None, picture: Path | None = None) -> str:
    """The demo's lines: the student's FD next to the best handcrafted solver's at the same NFE and seeds, then the
    others; `picture`: the two solvers' first 32 samples side by side, captioned."""
    mine, rows, nfe, mine_x, best_x = against_handcrafted(samples, handcrafted_file)
    best = rows[0]
    n = mine.report.samples
    if picture is not None:
        demo_picture(
            mine_x,
            best_x,
            [f"{mine.solver}, NFE {nfe}, FD {mine.fd:.1f}", f"{best.solver}, best handcrafted, FD {best.fd:.1f}"],
            f"toy:unet-digits: the same {len(mine_x)} seeds sampled at NFE {nfe} by {mine.solver} (top) and by the "
            f"best of {len(rows)} handcrafted solvers (bottom). FD: digit-classifier features against the held-out "
            f"digits, {n} samples; lower is better.",
            picture,
        )
    verdict = "lower (better)" if mine.fd < best.fd else "not lower"
    return "\n".join(
        [
            f"FD against the held-out digits (digit-classifier features, {n} samples, NFE {nfe}; lower is better):",
            f"  {mine.solver:>12}: {mine.fd:8.2f}   {mine.report.line()}",
            f"  {best.solver:>12}: {best.fd:8.2f}   (best of {len(rows)} handcrafted solvers at the same NFE and "
            f"seeds) {best.report.line()}",
            "  others: " + ", ".join(f"{r.solver} {r.fd:.1f}" for r in rows[1:]),
            f"{mine.solver} at NFE {nfe}: FD {mine.fd:.1f}, {verdict} than the best handcrafted solver's "
            f"{best.fd:.1f} (differences of about 15 are within the noise of {n} samples)"
            + (f"; picture: {picture}" if picture is not None else ""),
        ]
    )


if __name__ == "__main__":
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m solverdistill.digits")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="retrain the classifier and rewrite both statistics (needs the [digits] extra)")
    h = sub.add_parser("handcrafted", help="FD of every handcrafted solver at one NFE, for `demo --handcrafted`")
    h.add_argument("--model", default="toy:unet-digits")
    h.add_argument("--nfe", type=int, required=True)
    h.add_argument("--num", type=int, default=512)
    h.add_argument("--seed", type=int, default=1_000_000)
    h.add_argument("--out", type=Path, required=True)
    d = sub.add_parser("demo", help="a samples.npz's FD next to the best handcrafted solver's (same NFE and seeds)")
    d.add_argument("samples", type=Path)
    d.add_argument("--handcrafted", type=Path, help="their FDs, written by `handcrafted` (else measured here)")
    d.add_argument("--picture", type=Path, help="write both solvers' first 32 samples here (PNG), captioned")
    args = parser.parse_args()
    try:
        if args.command == "build":
            print(json.dumps(build(), indent=1))
        elif args.command == "handcrafted":
            write_handcrafted(args.out, args.model, args.nfe, args.num, args.seed)
        else:
            print(demo_summary(args.samples, args.handcrafted, args.picture))
    except BadInput as e:  # as the CLI does: one message, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
