"""The Results table: held-out endpoint RMSE of the best handcrafted solver per NFE, D-ODE and DLMS, with
acceleration ratios (docs/evaluation.md). Usage:
    python benchmarks/students_table.py RECIPE [OUT.md] [--nfe 3,4,5,6,8] [--set KEY=VALUE ...] [--curve FILE.json]
Uses the recipe's teacher cache (built first when missing) and its student/train sections for DLMS; `--set`
overrides recipe keys (train.lr_decay=cosine, teacher.num_samples=1024); `--curve` reuses (or writes) the best
handcrafted curve in the format benchmarks/dlms_ablation.py writes."""

import argparse
import json
import math
import time
from pathlib import Path

from solverdistill import solvers, students
from solverdistill.evaluation import acceleration_ratio, heldout_rmse
from solverdistill.pipeline import method_configs, open_workspace
from solverdistill.recipes import load_recipe, read_value

ap = argparse.ArgumentParser()
ap.add_argument("recipe")
ap.add_argument("out", nargs="?", default="out/students_table.md")
ap.add_argument("--nfe", default="3,4,5,6,8")
ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
ap.add_argument("--curve", help="JSON file with the handcrafted curve: read when present, written otherwise")
args = ap.parse_args()
recipe = load_recipe(args.recipe, {k: read_value(v) for k, v in (kv.split("=", 1) for kv in args.set)})
ws = open_workspace(recipe)
model, cache = ws.model, ws.cache
dlms, dode = students.get("dlms"), students.get("dode")
_, s_dlms, t_dlms = method_configs(recipe, "dlms")
_, held = cache.split(t_dlms.samples, t_dlms.heldout)

if args.curve and Path(args.curve).is_file():
    saved = json.loads(Path(args.curve).read_text())
    curve, best_name = {int(k): v for k, v in saved["curve"].items()}, {int(k): v for k, v in saved["best"].items()}
else:
    curve, best_name = {}, {}
    for nfe in range(2, 21):
        base = {name: heldout_rmse(p, model, cache, held) for name, p in solvers.sweep(nfe, model).items()}
        best_name[nfe] = min(base, key=base.get)
        curve[nfe] = base[best_name[nfe]]
        print(f"handcrafted NFE {nfe}: best {best_name[nfe]} {curve[nfe]:.4f}", flush=True)
    if args.curve:
        Path(args.curve).write_text(json.dumps({"curve": curve, "best": best_name, "held": len(held)}))

rows = []
for nfe in [int(v) for v in args.nfe.split(",")]:
    t0 = time.time()
    art = dlms.fit(cache, model, type(s_dlms)(**{**s_dlms.__dict__, "nfe": nfe}), t_dlms)
    dlms_s = time.time() - t0
    e_dlms = heldout_rmse(dlms.load(art, model), model, cache, held)
    best_dode, best_base = math.inf, ""
    for base in ("dpm++3m", "unipc", "ipndm", "deis", "euler", "dpm++2m"):
        s, t = dode.configs({"method": "dode", "nfe": nfe, "base": base}, {"heldout": t_dlms.heldout})
        e = heldout_rmse(dode.load(dode.fit(cache, model, s, t), model), model, cache, held)
        if e < best_dode:
            best_dode, best_base = e, base
    rows.append(
        (
            nfe,
            best_name[nfe],
            curve[nfe],
            best_base,
            best_dode,
            e_dlms,
            dlms_s,
            acceleration_ratio(best_dode, nfe, curve),
            acceleration_ratio(e_dlms, nfe, curve),
        )
    )
    print(rows[-1], flush=True)

lines = [
    f"Held-out endpoint RMSE on {recipe.model.spec} ({len(held)} held-out seeds, teacher: {cache.spec['solver']} "
    f"{cache.steps} steps), acceleration ratio in brackets",
    "",
    "| NFE | best handcrafted | D-ODE (best base) | DLMS | DLMS fit s |",
    "|---|---|---|---|---|",
]
for nfe, bn, be, db, de, le, ls, ar_d, ar_l in rows:
    lines.append(f"| {nfe} | {be:.4f} ({bn}) | {de:.4f} ({db}) [{ar_d:.2f}x] | {le:.4f} [{ar_l:.2f}x] | {ls:.0f} |")
lines += ["", "Best handcrafted by NFE: " + ", ".join(f"{n}: {curve[n]:.4f} ({best_name[n]})" for n in sorted(curve))]
print("\n".join(lines))
with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
