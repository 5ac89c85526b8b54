"""How many trajectories an endpoint RMSE rests on: each solver's per-sample errors against a teacher cache, and
what its worst samples carry (docs/evaluation.md "Tails").

Usage: python benchmarks/sample_tails.py CACHE SOLVER [SOLVER ...] [--model SPEC] [--threshold 0.3] [--curve FILE]
SOLVER is an artifact file (its own NFE) or NAME:NFE with an optional +afs (e.g. ipndm:10, ipndm+afs:9). Every
trajectory of CACHE is scored (a test cache, as `dlms_ablation.py --test-set` builds). Prints one row per solver:
RMSE, the samples whose error is above the threshold (on a mixture: the ones that end in another component), the
share of the squared error its worst 1 / 2 / 5 samples carry, the RMSE without its worst 1 / 2, and the median.
`--curve` (a handcrafted curve `dlms_ablation.py --curve` wrote, measured on this CACHE) adds each row's acceleration
ratio and, after two or more artifacts of one NFE (train seeds), their mean RMSE and its ratio, as dlms_ablation.py
reports a variant.
"""

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from solverdistill import artifacts, students
from solverdistill.comparison import ARTIFACT_SUFFIXES, split_afs
from solverdistill.evaluation import acceleration_ratio, sample_errors
from solverdistill.models import resolve
from solverdistill.solvers import plan
from solverdistill.teacher import TeacherCache

ap = argparse.ArgumentParser()
ap.add_argument("cache")
ap.add_argument("solvers", nargs="+")
ap.add_argument("--model", default="", help="model spec (default: the cache's)")
ap.add_argument("--threshold", type=float, default=0.3, help="a sample error above this counts as a miss")
ap.add_argument("--curve", help="JSON curve from dlms_ablation.py --curve, measured on CACHE: adds the ratios")
args = ap.parse_args()
curve = {int(k): v for k, v in json.loads(Path(args.curve).read_text())["curve"].items()} if args.curve else {}

cache = TeacherCache.open(args.cache)
model = resolve(args.model or cache.spec["model_spec"])
every = np.arange(cache.num_samples)
print(f"{cache.num_samples} trajectories of {args.cache} ({model.spec}); a miss: sample error > {args.threshold}")
print()
ratio_head = " ratio |" if curve else ""
print(f"| solver | RMSE | misses | worst 1 / 2 / 5 carry | RMSE without worst 1 / 2 | median |{ratio_head}")
print("|---|---|---|---|---|---|" + ("---|" if curve else ""))
fitted: dict[int, list[float]] = {}  # artifact RMSEs by NFE, for their mean
for name in args.solvers:
    is_artifact = name.endswith(ARTIFACT_SUFFIXES)
    if is_artifact:
        art = artifacts.load(name, fingerprint=model.fingerprint)
        solver, label = students.get(art.method).load(art, model), f"{name} (NFE {art.meta['nfe']})"
        nfe = int(art.meta["nfe"])
    else:
        base, _, count = name.rpartition(":")
        solver_name, afs = split_afs(base)
        nfe = int(count)
        solver, label = plan(solver_name, nfe, model, afs=afs), name
    e = sample_errors(solver, model, cache, every).double()
    sq = e.pow(2).sort(descending=True).values
    total, n = sq.sum(), len(sq)
    rmse = total.div(n).sqrt().item()
    if is_artifact:
        fitted.setdefault(nfe, []).append(rmse)
    carry = " / ".join(f"{(sq[:k].sum() / total).item():.0%}" for k in (1, 2, 5))
    without = " / ".join(f"{sq[k:].sum().div(n).sqrt().item():.4f}" for k in (1, 2))
    ratio = f" {acceleration_ratio(rmse, nfe, curve):.2f}x |" if curve else ""
    print(
        f"| {label} | {rmse:.4f} | {(e > args.threshold).sum().item()} | {carry} | {without} "
        f"| {e.median().item():.4f} |{ratio}"
    )
for nfe, rmses in fitted.items():
    if curve and len(rmses) > 1:
        mean = statistics.fmean(rmses)
        print(
            f"\nNFE {nfe}, the mean of {len(rmses)} artifacts: RMSE {mean:.4f}, ratio {acceleration_ratio(mean, nfe, curve):.2f}x"
        )
