"""D-ODE over every handcrafted base solver: held-out endpoint RMSE of base vs D-ODE at NFE 3-10, and fit time.
Usage: python benchmarks/dode_table.py RECIPE [OUT.md]   (uses the recipe's teacher cache; builds it if missing)"""

import sys
import time

from solverdistill import solvers, students
from solverdistill.errors import BadInput
from solverdistill.evaluation import heldout_rmse
from solverdistill.pipeline import open_workspace
from solverdistill.recipes import load_recipe

recipe = load_recipe(sys.argv[1])
out = sys.argv[2] if len(sys.argv) > 2 else "out/dode_table.md"
ws = open_workspace(recipe)
model, cache = ws.model, ws.cache
method = students.get("dode")
NFES = range(3, 11)
lines = [
    f"D-ODE vs its base solver, {recipe.model.spec}: held-out endpoint RMSE (base -> D-ODE), fit seconds",
    "",
    "| base | AFS | " + " | ".join(f"NFE {n}" for n in NFES) + " | max fit s |",
    "|---|---|" + "---|" * (len(NFES) + 1),
]
wins = total = 0
for name, info in solvers.SOLVERS.items():
    for afs in (False, True) if info.calls_per_step == 2 else (False,):
        cells, worst = [], 0.0
        for nfe in NFES:
            try:
                s, t = method.configs({"method": "dode", "nfe": nfe, "base": name, "afs": afs}, {})
                t0 = time.time()
                art = method.fit(cache, model, s, t)
                worst = max(worst, time.time() - t0)
            except BadInput:
                cells.append("-")
                continue
            _, held = cache.split(t.samples, t.heldout)
            base = heldout_rmse(method.load(method.untrained(art), model), model, cache, held)
            fitted = heldout_rmse(method.load(art, model), model, cache, held)
            wins += fitted < base
            total += 1
            cells.append(f"{base:.4f} -> {fitted:.4f}")
        lines.append(f"| {name} | {'yes' if afs else 'no'} | " + " | ".join(cells) + f" | {worst:.1f} |")
        print(lines[-1], flush=True)
lines.append("")
lines.append(f"D-ODE beats its base in {wins} of {total} cases.")
print(lines[-1])
with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
