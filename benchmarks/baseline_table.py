"""Endpoint RMSE of every handcrafted solver (its recommended grid, with and without AFS) against an accurate
RK4 reference, on held-out seeds. Usage: python benchmarks/baseline_table.py [MODEL] [NUM] [OUT.md]
[--solvers deis,deis:order=2] (solver names with their table options; default: every registered solver)."""

import argparse
import time

from solverdistill import solvers
from solverdistill.errors import BadInput
from solverdistill.evaluation import reference_endpoints, rmse
from solverdistill.generate import generate
from solverdistill.models import resolve

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("spec", nargs="?", default="gmm:cifar")
ap.add_argument("num", nargs="?", type=int, default=1000)
ap.add_argument("out", nargs="?", default="out/baseline.md")
ap.add_argument("--solvers", default=",".join(solvers.SOLVERS), help="comma-separated, options after a colon")
args = ap.parse_args()
names = [n for n in args.solvers.split(",") if n]
try:
    infos = {n: solvers.get(n) for n in names}
except BadInput as e:
    raise SystemExit(f"--solvers: {e}") from None
NFES = [3, 4, 5, 6, 8, 10, 15, 20]
seeds = list(range(1_000_000, 1_000_000 + args.num))  # held-out range, disjoint from training seeds

t0 = time.time()
ref = reference_endpoints(resolve(args.spec), seeds, steps=256)
print(f"reference: RK4 256 steps float64, {time.time() - t0:.0f}s", flush=True)
model = resolve(args.spec)
lines = [
    f"Endpoint RMSE vs RK4 reference, {args.spec}, {args.num} seeds, float32 sampling",
    "",
    "| solver | grid | AFS | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
    "|---|---|---|" + "---|" * len(NFES),
]
for name in names:
    for afs in (False, True):
        cells = []
        for nfe in NFES:
            try:
                plan = solvers.plan(name, nfe, model, afs=afs)
                cells.append(f"{rmse(generate(model, plan, seeds, batch=250).x, ref):.4f}")
            except BadInput:
                cells.append("-")
        lines.append(
            f"| {name} | {infos[name].default_schedule} | {'yes' if afs else 'no'} | " + " | ".join(cells) + " |"
        )
        print(lines[-1], flush=True)
with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
print(f"done in {time.time() - t0:.0f}s -> {args.out}")
