"""SFD and SFD-v with the online teacher against the handcrafted curve, at NFE 1-5 (docs/students.md "SFD").

Held-out endpoint RMSE against the recipe's cached teacher (its last `train.heldout` seeds, which online training
never draws: it trains on seeds >= 2^52) for every handcrafted solver (with and without AFS, the best per NFE),
SFD fitted per NFE, SFD at NFE 1 (the second stage, from the NFE-2 student) and SFD-v (one network); on
toy:unet-digits also the FD in digit features against the held-out digits on the same seeds. Fine-tuning wall
and CPU times (one thread); `--cpu-per-iteration N` only times N iterations per NFE. Rows go to OUT.md / OUT.json
as they are measured.

Usage: python benchmarks/sfd_table.py RECIPE [OUT.md] [--nfes 1,2,3,4,5] [--curve 1,2,3,4,5,6,8]
    [--iterations N] [--batch B] [--lr LR] [--lr-schedule step|cosine] [--refine M] [--teacher online|cache]
    [--distance l1|l2] [--loss steps|endpoint] [--ema DECAY] [--seed S]
    [--variable-iterations N] [--variable-nfes 2,3,4,5] [--step-lr-scale X] [--balance nfe] [--adapters R] [--skip sfd,sfdv] [--solvers euler,ipndm,...]
    [--handcrafted-from EARLIER.json] [--save DIR] [--score ART.npz,...] [--cpu-per-iteration N]
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from solverdistill import artifacts, solvers
from solverdistill.evaluation import acceleration_ratio, cache_endpoints, rmse
from solverdistill.pipeline import method_configs, open_workspace
from solverdistill.recipes import load_recipe

ap = argparse.ArgumentParser()
ap.add_argument("recipe")
ap.add_argument("out", nargs="?", default="out/sfd_table.md")
ap.add_argument("--nfes", default="1,2,3,4,5")
ap.add_argument("--curve", default="1,2,3,4,5,6,8", help="NFEs of the handcrafted curve")
ap.add_argument("--iterations", type=int, default=0, help="0: the recipe's")
ap.add_argument("--variable-iterations", type=int, default=0, help="SFD-v; 0: twice --iterations")
ap.add_argument("--batch", type=int, default=0)
ap.add_argument("--lr", type=float, default=0.0)
ap.add_argument("--lr-schedule", default="")
ap.add_argument("--refine", type=int, default=-1)
ap.add_argument("--step-lr-scale", type=float, default=0.0, help="SFD-v: train.step_lr_scale (0: the recipe's)")
ap.add_argument("--adapters", type=int, default=0, help="SFD-v: student.adapters, per-NFE adapter rank (0: none)")
ap.add_argument("--balance", default="", help="SFD-v: train.balance, none or nfe (empty: the recipe's)")
ap.add_argument("--teacher", default="")
ap.add_argument("--distance", default="", help="train.distance: l1 (the paper's) or l2; empty: the recipe's")
ap.add_argument("--loss", default="", help="train.loss: steps (the paper's) or endpoint; empty: the recipe's")
ap.add_argument("--ema", type=float, default=0.0, help="train.ema (0: the recipe's)")
ap.add_argument("--seed", type=int, default=0, help="train.seed: batch, NFE and adapter draws (0: the recipe's)")
ap.add_argument("--skip", default="", help="comma-separated: sfd, sfdv")
ap.add_argument("--variable-nfes", default="2,3,4,5", help="the NFEs SFD-v trains and is measured at")
ap.add_argument("--solvers", default="", help="handcrafted names the curve takes (with +afs variants); all if empty")
ap.add_argument("--handcrafted-from", default="", help="an earlier OUT.json of the same recipe: reuse its curve")
ap.add_argument("--score", default="", help="SFD artifacts (comma-separated) to measure on these seeds as they are")
ap.add_argument("--save", default="", help="a folder for the fitted artifacts")
ap.add_argument("--cpu-per-iteration", type=int, default=0, help="only time N iterations per NFE (CPU s each)")
args = ap.parse_args()
skip = set(filter(None, args.skip.split(",")))
out_path = Path(args.out)
out_path.parent.mkdir(parents=True, exist_ok=True)
lines = []
raw = {"args": vars(args), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"}
raw["threads"] = torch.get_num_threads()


def say(text=""):
    print(text, flush=True)
    lines.append(text)
    out_path.write_text("\n".join(lines) + "\n")
    out_path.with_suffix(".json").write_text(json.dumps(raw, indent=1))


recipe = load_recipe(args.recipe)
method, s0, t0 = method_configs(recipe, say=lambda m: None)
for key, value in (
    ("iterations", args.iterations),
    ("batch", args.batch),
    ("lr", args.lr),
    ("lr_schedule", args.lr_schedule),
    ("teacher", args.teacher),
    ("distance", args.distance),
    ("loss", args.loss),
    ("ema", args.ema),
    ("seed", args.seed),
):
    if value:
        setattr(t0, key, value)
if args.refine >= 0:
    t0.refine = args.refine
ws = open_workspace(recipe, "cpu")
model, cache = ws.model, ws.cache
_, held = cache.split(0, t0.heldout)
truth = cache.endpoints(held)
digits = model.spec.partition("?")[0] == "toy:unet-digits"
if digits:
    from solverdistill.fid import digits_fd


def measure(solver):
    x = cache_endpoints(solver, model, cache, held)
    out = {"rmse": rmse(x, truth)}
    if digits:
        out["fd"] = digits_fd(x.float(), "digits:heldout").distance
    return out


def cell(m):
    return f"{m['rmse']:.4f}" + (f" / {m['fd']:.1f}" if "fd" in m else "")


if args.cpu_per_iteration:  # fine-tuning cost per iteration by NFE on this thread: one stage each (NFE 1's own)
    from solverdistill.students.sfd import tune

    for nfe in [int(v) for v in args.nfes.split(",")]:
        s_cfg, t_cfg = method.configs(vars(s0) | {"nfe": nfe}, vars(t0) | {"iterations": 1})
        tune(cache, model, s_cfg, t_cfg, None, None)  # warm-up
        t_cfg.iterations = args.cpu_per_iteration
        cpu = time.process_time()
        tune(cache, model, s_cfg, t_cfg, None, None)
        print(f"NFE {nfe}: {(time.process_time() - cpu) / args.cpu_per_iteration:.2f} CPU s per iteration", flush=True)
    raise SystemExit(0)
raw["settings"] = {"student": vars(s0), "train": vars(t0)}
say(f"# SFD on {model.spec}: held-out RMSE{' / FD (digit features)' if digits else ''}")
say("")
say(
    f"Machine: {raw['machine']}, {raw['threads']} thread(s), shared with other jobs. Recipe {args.recipe}; train {vars(t0)}."
)
say(f"Held-out: {len(held)} cached seeds; teacher {cache.spec['solver']} {cache.steps} steps.")
if digits:
    teacher_fd = digits_fd(truth.float(), "digits:heldout").distance
    raw["teacher_fd"] = teacher_fd
    say(f"Teacher FD on these seeds: {teacher_fd:.1f}.")
say("")
curve = {}
if args.handcrafted_from:  # an earlier run's curve on the same seeds; NFEs it lacks are measured below
    earlier = json.loads(Path(args.handcrafted_from).read_text())
    curve = {int(k): v for k, v in earlier["handcrafted"].items()}
for nfe in map(int, args.curve.split(",")):
    if nfe not in curve:
        plans = solvers.sweep(nfe, model, recipe.protocol)
        keep = set(filter(None, args.solvers.split(",")))
        rows = {name: measure(p) for name, p in plans.items() if not keep or name.removesuffix("+afs") in keep}
        curve[nfe] = {
            "rmse": min(r["rmse"] for r in rows.values()),
            "rmse_by": min(rows, key=lambda n: rows[n]["rmse"]),
            **(
                {"fd": min(r["fd"] for r in rows.values()), "fd_by": min(rows, key=lambda n: rows[n]["fd"])}
                if digits
                else {}
            ),
            "all": rows,
        }
        raw["handcrafted"] = curve
        say(
            f"handcrafted NFE {nfe}: best RMSE {curve[nfe]['rmse']:.4f} ({curve[nfe]['rmse_by']})"
            + (f", best FD {curve[nfe]['fd']:.1f} ({curve[nfe]['fd_by']})" if digits else "")
        )
raw["handcrafted"] = curve
save = Path(args.save) if args.save else None
if save:
    save.mkdir(parents=True, exist_ok=True)
nfes = [int(v) for v in args.nfes.split(",")]
results = raw.setdefault("students", {"SFD": {}, "SFD-v": {}})
for path in filter(None, args.score.split(",")):  # students fitted earlier, e.g. scored on fresh seeds
    art = artifacts.load(path)
    m = measure(method.load(art, model))
    results.setdefault("scored", {})[path] = {**m, "nfe": art.meta["nfe"]}
    say(f"{path} (NFE {art.meta['nfe']}): {cell(m)}")
if "sfd" not in skip:
    two = None
    for nfe in sorted(nfes, key=lambda n: (n == 1, n)):  # NFE 1 after NFE 2: it starts from that student
        s = vars(s0) | {"nfe": nfe, "variable": False}
        if nfe == 1 and two is not None:
            s["init"] = str(two)
        s_cfg, t_cfg = method.configs(s, vars(t0))
        began, cpu = time.time(), time.process_time()
        art = method.fit(cache, model, s_cfg, t_cfg)
        seconds, cpu = time.time() - began, time.process_time() - cpu
        path = artifacts.save(art, (save or Path("/tmp")) / f"sfd_{Path(args.recipe).stem}_nfe{nfe}.npz")
        if nfe == 2:
            two = path
        m = measure(method.load(art, model))
        results["SFD"][nfe] = {**m, "seconds": seconds, "cpu_seconds": cpu, "stages": art.meta["training"]["stages"]}
        say(
            f"SFD NFE {nfe}: {cell(m)} ({seconds:.0f}s wall, {cpu:.0f}s CPU{' after the NFE-2 stage' if nfe == 1 and two else ''})"
        )
if "sfdv" not in skip:
    v_nfes = [int(v) for v in args.variable_nfes.split(",")]
    s_cfg, t_cfg = method.configs(
        vars(s0)
        | {"nfe": min(v_nfes), "variable": True, "nfe_set": ",".join(map(str, v_nfes))}
        | ({"adapters": args.adapters} if args.adapters else {}),
        vars(t0)
        | {"iterations": args.variable_iterations or 2 * t0.iterations}
        | ({"step_lr_scale": args.step_lr_scale} if args.step_lr_scale else {})
        | ({"balance": args.balance} if args.balance else {}),
    )
    began, cpu = time.time(), time.process_time()
    art = method.fit(cache, model, s_cfg, t_cfg)
    seconds, cpu = time.time() - began, time.process_time() - cpu
    if save:
        artifacts.save(art, save / f"sfdv_{Path(args.recipe).stem}.npz")
    solver = method.load(art, model)
    for nfe in v_nfes:
        results["SFD-v"][nfe] = {**measure(solver.at_nfe(nfe)), "seconds": seconds, "cpu_seconds": cpu}
    say(
        f"SFD-v NFEs {v_nfes}, {t_cfg.iterations} iterations, adapters {s_cfg.adapters}, step_lr_scale {t_cfg.step_lr_scale}, balance {t_cfg.balance}: {seconds:.0f}s wall, {cpu:.0f}s CPU"
    )
say("")
best = {n: c["rmse"] for n, c in curve.items()}
header = "| NFE | best handcrafted RMSE | SFD RMSE | SFD-v RMSE |"
if digits:
    header += " best handcrafted FD | SFD FD | SFD-v FD |"
say(header)
say("|" + "---|" * (header.count("|") - 1))
for nfe in sorted(set(curve) | set(nfes)):
    c = curve.get(nfe, {})
    row = [f"{c['rmse']:.4f} ({c['rmse_by']})" if c else "-"]
    for label in ("SFD", "SFD-v"):
        r = results[label].get(nfe)
        row.append(f"{r['rmse']:.4f} [x{acceleration_ratio(r['rmse'], nfe, best):.2f}]" if r else "-")
    if digits:
        best_fd = {n: v["fd"] for n, v in curve.items()}
        row.append(f"{c['fd']:.1f} ({c['fd_by']})" if c else "-")
        for label in ("SFD", "SFD-v"):
            r = results[label].get(nfe)
            row.append(f"{r['fd']:.1f} [x{acceleration_ratio(r['fd'], nfe, best_fd):.2f}]" if r else "-")
    say(f"| {nfe} | " + " | ".join(row) + " |")
say("")
say("In brackets: the acceleration ratio (the NFE at which the best handcrafted solver reaches the student's figure,")
say(
    "log-log interpolated, over the student's NFE). Fine-tuning wall times: "
    + "; ".join(
        f"{label} NFE {n}: {r['seconds']:.0f}s" for label in ("SFD",) for n, r in sorted(results[label].items())
    )
    + (f"; SFD-v (one fit) {next(iter(results['SFD-v'].values()))['seconds']:.0f}s" if results["SFD-v"] else "")
    + "."
)
