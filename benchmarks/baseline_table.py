"""Endpoint RMSE of every handcrafted solver (its recommended grid, with and without AFS) against an accurate
RK4 reference, on held-out seeds. Usage: python benchmarks/baseline_table.py [MODEL] [NUM] [OUT.md]"""

import sys
import time

from solverdistill import solvers
from solverdistill.errors import BadInput
from solverdistill.evaluation import reference_endpoints, rmse
from solverdistill.generate import generate
from solverdistill.models import resolve

spec = sys.argv[1] if len(sys.argv) > 1 else "gmm:cifar"
num = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
out = sys.argv[3] if len(sys.argv) > 3 else "out/baseline.md"
NFES = [3, 4, 5, 6, 8, 10, 15, 20]
seeds = list(range(1_000_000, 1_000_000 + num))  # held-out range, disjoint from training seeds

t0 = time.time()
ref = reference_endpoints(resolve(spec), seeds, steps=256)
print(f"reference: RK4 256 steps float64, {time.time() - t0:.0f}s", flush=True)
model = resolve(spec)
lines = [
    f"Endpoint RMSE vs RK4 reference, {spec}, {num} seeds, float32 sampling",
    "",
    "| solver | grid | AFS | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
    "|---|---|---|" + "---|" * len(NFES),
]
for name, info in solvers.SOLVERS.items():
    for afs in (False, True):
        cells = []
        for nfe in NFES:
            try:
                plan = solvers.plan(name, nfe, model, afs=afs)
                cells.append(f"{rmse(generate(model, plan, seeds, batch=250).x, ref):.4f}")
            except BadInput:
                cells.append("-")
        lines.append(f"| {name} | {info.default_schedule} | {'yes' if afs else 'no'} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
print(f"done in {time.time() - t0:.0f}s -> {out}")
