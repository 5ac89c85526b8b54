"""How many trajectories an endpoint RMSE rests on: each solver's per-sample errors against a teacher cache, and
what its worst samples carry (docs/evaluation.md "Tails").

Usage: python benchmarks/sample_tails.py CACHE SOLVER [SOLVER ...] [--model SPEC] [--threshold 0.3]
SOLVER is an artifact file (its own NFE) or NAME:NFE with an optional +afs (e.g. ipndm:10, ipndm+afs:9). Every
trajectory of CACHE is scored (a test cache, as `dlms_ablation.py --test-set` builds). Prints one row per solver:
RMSE, the samples whose error is above the threshold (on a mixture: the ones that end in another component), the
share of the squared error its worst 1 / 2 / 5 samples carry, the RMSE without its worst 1 / 2, and the median.
"""

import argparse

import numpy as np

from solverdistill import artifacts, students
from solverdistill.comparison import split_afs
from solverdistill.evaluation import sample_errors
from solverdistill.models import resolve
from solverdistill.solvers import plan
from solverdistill.teacher import TeacherCache

ap = argparse.ArgumentParser()
ap.add_argument("cache")
ap.add_argument("solvers", nargs="+")
ap.add_argument("--model", default="", help="model spec (default: the cache's)")
ap.add_argument("--threshold", type=float, default=0.3, help="a sample error above this counts as a miss")
args = ap.parse_args()

cache = TeacherCache.open(args.cache)
model = resolve(args.model or cache.spec["model_spec"])
every = np.arange(cache.num_samples)
print(f"{cache.num_samples} trajectories of {args.cache} ({model.spec}); a miss: sample error > {args.threshold}")
print()
print("| solver | RMSE | misses | worst 1 / 2 / 5 carry | RMSE without worst 1 / 2 | median |")
print("|---|---|---|---|---|---|")
for name in args.solvers:
    if name.endswith((".npz", ".yaml", ".yml")):
        art = artifacts.load(name, fingerprint=model.fingerprint)
        solver, label = students.get(art.method).load(art, model), f"{name} (NFE {art.meta['nfe']})"
    else:
        base, _, nfe = name.rpartition(":")
        solver_name, afs = split_afs(base)
        solver, label = plan(solver_name, int(nfe), model, afs=afs), name
    e = sample_errors(solver, model, cache, every).double()
    sq = e.pow(2).sort(descending=True).values
    total, n = sq.sum(), len(sq)
    carry = " / ".join(f"{(sq[:k].sum() / total).item():.0%}" for k in (1, 2, 5))
    without = " / ".join(f"{sq[k:].sum().div(n).sqrt().item():.4f}" for k in (1, 2))
    print(
        f"| {label} | {total.div(n).sqrt().item():.4f} | {(e > args.threshold).sum().item()} | {carry} | {without} "
        f"| {e.median().item():.4f} |"
    )
