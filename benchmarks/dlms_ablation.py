"""DLMS ablation on a cached teacher: each variant trained from the same cache and train seeds, scored by endpoint
RMSE on the same held-out seeds, with its acceleration ratio against the best handcrafted curve (every handcrafted
solver with and without AFS on its default grid, NFE 2..20, measured once on the same held-out seeds).

    python benchmarks/dlms_ablation.py RECIPE [--nfe 5] [--set KEY=VALUE ...] [--seeds 0,1,2] [--curve FILE.json]
        [--out OUT.md] [--save DIR] [VARIANT ...]

A variant is a name below or `key=value,key=value` over the student/train keys, applied on top of the recipe.
`--set teacher.num_samples=1024` overrides recipe keys (the cache, the split). `--curve` reuses (or writes) the
handcrafted curve, so several runs on one cache measure it once. `--test-set teacher.seed=S --test-set
teacher.cache=DIR` measures the curve and every score on a second cache of fresh seeds instead: choosing a variant by
its held-out RMSE makes those seeds part of the choice, so a claim about the chosen one is checked there. The
validation RMSE is what the fit kept its state by (trajectories of the training pool); the median per-sample error
(with its own ratio against the curve of the best handcrafted medians, which a curve measured by this version keeps)
and the worst 2%'s share of the squared error show whether a ratio speaks for most samples or for a few
(docs/evaluation.md "Tails")."""

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from solverdistill import artifacts, solvers
from solverdistill.evaluation import acceleration_ratio, heldout_rmse, sample_errors, tail_share
from solverdistill.fid import digits_fd
from solverdistill.generate import generate
from solverdistill.pipeline import method_configs, open_workspace
from solverdistill.recipes import load_recipe, read_value
from solverdistill.teacher.run import teacher_grid

VARIANTS = {
    "recipe": {},
    "paper": {"lr_decay": "none", "restarts": 1, "loss": "both", "final_weight": 3.0},
    "loss=endpoint": {"loss": "endpoint"},
    "loss=trajectory": {"loss": "trajectory"},
    "window=2": {"window": 2},
    "designer=global": {"designer": "global"},
    "no AFS": {"afs": False},
    "no time scaling": {"time_scaling": False},
    "fixed grid": {"learn_grid": False},
    "init=plms": {"init": "plms"},
    "no cosine": {"lr_decay": "none"},
    "restarts=1": {"restarts": 1},
}

ap = argparse.ArgumentParser()
ap.add_argument("recipe")
ap.add_argument("variants", nargs="*")
ap.add_argument("--nfe", type=int, default=5)
ap.add_argument(
    "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, e.g. train.heldout=256"
)
ap.add_argument("--seeds", default="0", help="train seeds (train.seed), comma-separated: the spread over seeds")
ap.add_argument("--curve", help="JSON file with the handcrafted curve: read when present, written otherwise")
ap.add_argument("--out", help="append the table to this markdown file")
ap.add_argument("--fd", type=int, default=0, help="toy:unet-digits: also FD (digit features) of N samples")
ap.add_argument("--max-nfe", type=int, default=20, help="the handcrafted curve's largest NFE (FD: at most 12)")
ap.add_argument("--curve-nfes", help="the NFEs of the curve (default 2..--max-nfe); empty: no curve, no ratios")
ap.add_argument("--every-grid", action="store_true", help="the curve's best over every schedule, not the defaults")
ap.add_argument("--curve-only", action="store_true", help="measure (or read) the curve, fit nothing")
ap.add_argument("--fd-seed", type=int, default=1_000_000, help="first seed of the FD samples (none is in the cache)")
ap.add_argument(
    "--test-set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="recipe overrides of a second teacher cache (teacher.cache=..., teacher.seed=...): every trajectory of it is "
    "a test seed, and the curve and the RMSEs are measured there instead of on the recipe's held-out split",
)
ap.add_argument("--save", help="folder: keep each fitted artifact there (VARIANT_seedS.npz), e.g. for sdistill compare")
args = ap.parse_intermixed_args()


overrides = {k: read_value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
recipe = load_recipe(args.recipe, overrides)
method, s0, t0 = method_configs(recipe, "dlms", args.nfe)
ws = open_workspace(recipe)
model, cache = ws.model, ws.cache
_, held = cache.split(t0.samples, t0.heldout)
if args.test_set:  # fresh seeds no fit and no choice of variant has seen: the curve and the scores come from there
    tests = {k: read_value(v) for k, v in (kv.split("=", 1) for kv in args.test_set)}
    test_cache = open_workspace(load_recipe(args.recipe, overrides | tests)).cache
    test_held = np.arange(test_cache.num_samples)
else:
    test_cache, test_held = cache, held
s_keys, t_keys = method.keys()

fd_seeds = list(range(args.fd_seed, args.fd_seed + args.fd))


def fd_of(solver):
    return digits_fd(generate(model, solver, fd_seeds, batch=256).x).distance


def teacher_fd():
    """The FD of the cache's own teacher (its solver and grid, no AFS) on the FD seeds: how low a student that
    matches its teacher can go, and where the handcrafted FD curve flattens out. The workspace model is already in
    the teacher's `compute_dtype`; its network runs in the teacher's `precision` here, as it did for the cache."""
    info = solvers.get(recipe.teacher.solver)
    grid = teacher_grid(recipe, model)
    plan = solvers.Plan(info, (len(grid) - 1) * info.calls_per_step, False, grid, {}, int(model.passes_per_call))
    previous = model.precision
    try:
        model.set_precision(recipe.teacher.precision)
        return fd_of(plan)
    finally:
        model.set_precision(previous)


saved = json.loads(Path(args.curve).read_text()) if args.curve and Path(args.curve).is_file() else {}
if saved and (not args.fd or saved.get("fd_samples") == args.fd):
    curve, best_name = {int(k): v for k, v in saved["curve"].items()}, {int(k): v for k, v in saved["best"].items()}
    fd_curve = {int(k): v for k, v in saved.get("fd", {}).items()}
    fd_name = {int(k): v for k, v in saved.get("fd_best", {}).items()}
    fd_teacher = saved.get("fd_teacher")
    med_curve = {int(k): v for k, v in saved.get("median", {}).items()}
    med_name = {int(k): v for k, v in saved.get("median_best", {}).items()}
else:
    curve, best_name, fd_curve, fd_name, med_curve, med_name = {}, {}, {}, {}, {}, {}
    fd_teacher = teacher_fd() if args.fd else None
    if fd_teacher is not None:
        print(f"teacher ({recipe.teacher.solver}, {recipe.teacher.steps} steps): FD {fd_teacher:.1f}", flush=True)
    wanted = (
        range(2, args.max_nfe + 1) if args.curve_nfes is None else [int(v) for v in args.curve_nfes.split(",") if v]
    )
    for m in wanted:
        plans = solvers.sweep(m, model)
        if args.every_grid:  # every solver with and without AFS on every schedule family
            plans = {
                f"{name}@{sched}": solvers.plan(name.removesuffix("+afs"), m, model, sched, afs=name.endswith("+afs"))
                for name in plans
                for sched in ("polynomial:7", "logsnr", "time_uniform")
            }
        per_sample = {name: sample_errors(p, model, test_cache, test_held) for name, p in plans.items()}
        base = {name: e.pow(2).mean().sqrt().item() for name, e in per_sample.items()}
        best_name[m] = min(base, key=base.get)
        curve[m] = base[best_name[m]]
        meds = {name: e.median().item() for name, e in per_sample.items()}
        med_name[m] = min(meds, key=meds.get)
        med_curve[m] = meds[med_name[m]]
        print(f"handcrafted NFE {m}: best {best_name[m]} {curve[m]:.4f}", flush=True)
        if args.fd and m <= 12:
            fds = {name: fd_of(p) for name, p in plans.items()}
            fd_name[m] = min(fds, key=fds.get)
            fd_curve[m] = fds[fd_name[m]]
            print(f"handcrafted NFE {m}: best FD {fd_name[m]} {fd_curve[m]:.1f}", flush=True)
    if args.curve:
        saved = {"curve": curve, "best": best_name, "held": len(test_held), "fd": fd_curve, "fd_best": fd_name}
        saved |= {"median": med_curve, "median_best": med_name, "fd_teacher": fd_teacher}
        Path(args.curve).write_text(json.dumps(saved | {"fd_samples": args.fd}))

seeds = [int(v) for v in args.seeds.split(",")]
if args.curve_only:
    raise SystemExit(0)


def shown(ratio, curve, nfe):
    """A ratio, or '>R' when no NFE on the curve reaches the student (R: the curve's largest NFE over nfe)."""
    if not curve:
        return "-"
    return f">{max(curve) / nfe:.1f}x" if math.isinf(ratio) else f"{ratio:.2f}x"


where = f"{len(test_held)} test seeds of {test_cache.root}" if args.test_set else f"{len(held)} held-out seeds"
head = f"{recipe.model.spec}, NFE {args.nfe}, {where}; train seeds {seeds}"
if args.nfe in curve:
    head += f"; best handcrafted at NFE {args.nfe}: {curve[args.nfe]:.4f} ({best_name[args.nfe]})"
# The RMSE over many seeds can rest on a few trajectories that end in another mode: the median per-sample error
# and the worst 2%'s share of the squared error say whether a ratio is about most samples or about a few.
# A curve written before medians were kept has none: then the header measures them at n and 2n only.
for m in (args.nfe, 2 * args.nfe):
    if m not in med_curve:
        by_solver = {
            name: sample_errors(p, model, test_cache, test_held).median().item()
            for name, p in solvers.sweep(m, model).items()
        }
        med_name[m] = min(by_solver, key=by_solver.get)
        med_value = by_solver[med_name[m]]
    else:
        med_value = med_curve[m]
    head += f"; best handcrafted median per-sample error at NFE {m}: {med_value:.4f} ({med_name[m]})"
if args.fd and args.nfe in fd_curve:
    head += f"; FD: {args.fd} samples from seed {args.fd_seed}, best handcrafted FD at NFE {args.nfe}: "
    head += f"{fd_curve[args.nfe]:.1f} ({fd_name[args.nfe]})"
    if fd_teacher is not None:
        head += f", the teacher's FD {fd_teacher:.1f}"
scored = "test" if args.test_set else "held-out"
cols = (
    f"| variant | {scored} RMSE per train seed | mean | ratio (mean) | initial RMSE | s per fit | validation RMSE "
    "| median per-sample error | median ratio | worst 2%'s share |"
)
lines = [head, "", cols + (" FD per train seed | FD ratio (mean FD) |" if args.fd else "")]
lines.append("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.fd else ""))
print("\n".join(lines), flush=True)
for name in args.variants or list(VARIANTS):
    if name in VARIANTS:
        typed = VARIANTS[name]
    else:  # key=value pairs, values read as YAML scalars (5, 0.01, true, dpm++)
        typed = {k: read_value(v) for k, v in (kv.split("=", 1) for kv in name.split(","))}
        unknown = sorted(set(typed) - s_keys - t_keys)
        if unknown:  # a misspelt or stale key would otherwise train the recipe as it is under another name
            known = ", ".join(sorted(s_keys | t_keys))
            raise SystemExit(f"variant {name!r}: unknown key {unknown[0]!r}; student/train keys: {known}")
    s = replace(s0, **{k: v for k, v in typed.items() if k in s_keys})
    errs, meds, tails, vals, fds, start, fit_s = [], [], [], [], [], time.time(), 0.0
    for seed in seeds:
        t = replace(t0, **{k: v for k, v in typed.items() if k in t_keys}, seed=seed)
        t_fit = time.time()
        art = method.fit(cache, model, s, t)
        fit_s += time.time() - t_fit
        if args.save:
            artifacts.save(art, Path(args.save) / f"{name.replace('=', '-').replace(',', '_')}_seed{seed}.npz")
        per_sample = sample_errors(method.load(art, model), model, test_cache, test_held)
        errs.append(per_sample.pow(2).mean().sqrt().item())
        meds.append(per_sample.median().item())
        tails.append(tail_share(per_sample))
        vals.append(min(art.meta["training"]["validation_rmse_by_restart"]))  # what the fit chose by
        if args.fd:
            fds.append(fd_of(method.load(art, model)))
    init = heldout_rmse(method.load(method.untrained(art), model), model, test_cache, test_held)
    mean = statistics.fmean(errs)
    row = (
        f"| {name} | {' / '.join(f'{e:.4f}' for e in errs)} | {mean:.4f} | "
        f"{shown(acceleration_ratio(mean, s.nfe, curve) if curve else 0, curve, s.nfe)} | {init:.4f} | {fit_s / len(seeds):.0f} | "
        f"{' / '.join(f'{v:.4f}' for v in vals)} | {statistics.fmean(meds):.4f} | "
        f"{shown(acceleration_ratio(statistics.fmean(meds), s.nfe, med_curve) if med_curve else 0, med_curve, s.nfe)} | "
        f"{statistics.fmean(tails):.0%} |"
    )
    if args.fd:
        mean_fd = statistics.fmean(fds)
        row += f" {' / '.join(f'{e:.1f}' for e in fds)} | {shown(acceleration_ratio(mean_fd, s.nfe, fd_curve) if fd_curve else 0, fd_curve, s.nfe)} ({mean_fd:.1f}) |"
    lines.append(row)
    print(row, flush=True)
if args.out:
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n\n")
