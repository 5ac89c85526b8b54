"""DLMS ablation on a cached teacher: each variant trained from the same cache and seeds, scored by endpoint
RMSE on the same held-out seeds. Usage: python benchmarks/dlms_ablation.py RECIPE [NFE] [variant ...]
A variant is `name` or `key=value,key=value` over the student/train keys (student keys first)."""

import sys
import time
from dataclasses import replace

import yaml

from solverdistill.evaluation import heldout_rmse
from solverdistill.pipeline import method_configs, open_workspace
from solverdistill.recipes import load_recipe

VARIANTS = {
    "default": {},
    "loss=endpoint": {"loss": "endpoint"},
    "loss=trajectory": {"loss": "trajectory"},
    "window=whole": {"window": 0},
    "designer=global": {"designer": "global"},
    "no AFS": {"afs": False},
    "no time scaling": {"time_scaling": False},
    "fixed grid": {"learn_grid": False},
    "init=plms": {"init": "plms"},
}

recipe = load_recipe(sys.argv[1])
nfe = int(sys.argv[2]) if len(sys.argv) > 2 else 5
chosen = sys.argv[3:] or list(VARIANTS)
method, s0, t0 = method_configs(recipe, "dlms", nfe)
ws = open_workspace(recipe)
model, cache = ws.model, ws.cache
s_keys, t_keys = method.keys()
print("| variant | held-out RMSE | initial RMSE | seconds |\n|---|---|---|---|")
for name in chosen:
    if name in VARIANTS:
        typed = VARIANTS[name]
    else:  # key=value pairs, values read as YAML scalars (5, 0.01, true, dpm++)
        typed = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in name.split(","))}
    s = replace(s0, **{k: v for k, v in typed.items() if k in s_keys})
    t = replace(t0, **{k: v for k, v in typed.items() if k in t_keys})
    start = time.time()
    art = method.fit(cache, model, s, t)
    _, held = cache.split(t.samples, t.heldout)
    rm = heldout_rmse(method.load(art, model), model, cache, held)
    init = heldout_rmse(method.load(method.untrained(art), model), model, cache, held)
    print(f"| {name} | {rm:.4f} | {init:.4f} | {time.time() - start:.0f} |", flush=True)
