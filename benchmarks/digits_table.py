"""The seeds' tables on real data (docs/digits.md): Frechet distance in digit-classifier features against the
held-out handwritten digits, for toy:unet-digits samples from every handcrafted solver (with and without AFS),
D-ODE (best base), DLMS, SFD (one network per NFE) and SFD-v (one network), unconditional and with guidance;
the teacher's FD, the real-vs-real floor, each student's acceleration ratio in FD, and distillation wall times.

Every sampler uses the same seeds: the held-out seeds of the teacher cache (`--num`), whose endpoints give the
teacher's FD. The floor compares the shipped training-split statistics with the held-out ones (no data needed).

Usage: python benchmarks/digits_table.py [OUT.md] [--nfes 3,4,5,6,8,10] [--student-nfes 3,4,5,6,8,10]
    [--num 512] [--guidance 2] [--conditions uncond,guided] [--dlms-iterations 200] [--dlms-batch 32]
    [--sfd-iterations 200]
    [--skip dode,dlms,sfd,sfdv]
Rows are written to OUT.md as they are measured (a stopped run keeps what it finished)."""

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from solverdistill import solvers, students
from solverdistill.digits import STATS
from solverdistill.evaluation import acceleration_ratio, heldout_rmse
from solverdistill.fid import digits_fd, frechet_distance, load_stats
from solverdistill.generate import generate
from solverdistill.pipeline import open_workspace
from solverdistill.recipes import load_recipe

ap = argparse.ArgumentParser()
ap.add_argument("out", nargs="?", default="out/digits_table.md")
ap.add_argument("--nfes", default="3,4,5,6,8,10")
ap.add_argument("--student-nfes", default="3,4,5,6,8,10")
ap.add_argument("--num", type=int, default=512, help="held-out seeds: samples per FD")
ap.add_argument("--guidance", type=float, default=2.0)
ap.add_argument("--conditions", default="uncond,guided")
ap.add_argument("--dlms-iterations", type=int, default=200)
ap.add_argument("--dlms-batch", type=int, default=32)
ap.add_argument("--sfd-iterations", type=int, default=200)
ap.add_argument("--dode-bases", default="euler,ipndm,dpm++3m,unipc")
ap.add_argument("--skip", default="", help="comma-separated: dode, dlms, sfd, sfdv")
ap.add_argument(
    "--handcrafted-from",
    default="",
    help="an earlier run's OUT.json: reuse its handcrafted FDs (same --num) and teacher",
)
args = ap.parse_args()
nfes = [int(v) for v in args.nfes.split(",")]
student_nfes = [int(v) for v in args.student_nfes.split(",")]
skip = set(filter(None, args.skip.split(",")))
out_path = Path(args.out)
out_path.parent.mkdir(parents=True, exist_ok=True)
lines = []
raw = {"args": vars(args), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"}


def say(text=""):
    print(text, flush=True)
    lines.append(text)
    out_path.write_text("\n".join(lines) + "\n")
    out_path.with_suffix(".json").write_text(json.dumps(raw, indent=1))


def fd_of(x):
    return digits_fd(x, "digits:heldout")


floor = frechet_distance(*load_stats(STATS["train"]), *load_stats(STATS["heldout"]))
raw["floor"] = floor
say("# toy:unet-digits: FD in digit-classifier features against the held-out digits")
say("")
say(f"Machine: {raw['machine']} (shared with other jobs while measured). Settings: {vars(args)}.")
say("")
say(f"Real-vs-real floor (training split, 1,500 images, against held-out, 297): FD {floor:.2f}.")

base_recipe = load_recipe("recipes/digits_dlms.yaml")
for condition in args.conditions.split(","):
    guided = condition == "guided"
    spec = f"toy:unet-digits?guidance={args.guidance:g}" if guided else "toy:unet-digits"
    cache_dir = f"cache/digits_g{args.guidance:g}" if guided else base_recipe.teacher.cache
    recipe = replace(
        base_recipe,
        model=replace(base_recipe.model, spec=spec),
        teacher=replace(base_recipe.teacher, cache=cache_dir, num_samples=max(1024, 512 + args.num)),
    )
    t0 = time.time()
    ws = open_workspace(recipe, "cpu")
    model, cache = ws.model, ws.cache
    teacher_s = time.time() - t0
    _, held = cache.split(0, args.num)
    seeds = [int(s) for s in cache.seeds[held]]
    teacher = fd_of(cache.endpoints(held).float())
    res = raw.setdefault(condition, {"teacher_fd": teacher.distance, "handcrafted": {}, "students": {}, "times": {}})
    res["times"]["teacher_s"] = teacher_s
    title = f"guidance {args.guidance:g}, classes drawn per seed" if guided else "unconditional"
    say("")
    say(f"## {spec} ({title}; {len(seeds)} held-out seeds)")
    say("")
    say(
        f"Teacher ({cache.spec['solver']}, {cache.steps} steps, {cache.steps + 1} NFE): FD {teacher.distance:.2f}; "
        f"{teacher.classes.confident:.0%} read confidently, classes {teacher.classes.histogram}. "
        f"Cache {'built' if ws.teacher_built else 'reused'} in {teacher_s:.0f}s."
    )
    say("")
    say("Handcrafted solvers (FD; `+afs`: analytical first step):")
    say("")
    names = None
    best = {}
    earlier = json.loads(Path(args.handcrafted_from).read_text())[condition] if args.handcrafted_from else None
    for nfe in nfes:
        if earlier is not None:  # the same seeds and settings: the curve the students are compared with
            res["handcrafted"][nfe] = earlier["handcrafted"][str(nfe)]
            best[nfe] = earlier["best_handcrafted"][str(nfe)]
            continue
        plans = solvers.sweep(nfe, model)
        if names is None:
            names = sorted({n for nfe_ in nfes for n in solvers.sweep(nfe_, model)})
            say("| NFE | " + " | ".join(names) + " |")
            say("|---|" + "---|" * len(names))
        row = {}
        for name, plan in plans.items():
            row[name] = fd_of(generate(model, plan, seeds, batch=256).x).distance
        res["handcrafted"][nfe] = row
        best[nfe] = min(row.values())
        say(f"| {nfe} | " + " | ".join(f"{row[n]:.2f}" if n in row else "-" for n in names) + " |")
    res["best_handcrafted"] = best
    if earlier is not None:
        say(f"(handcrafted FDs from {args.handcrafted_from}: best per NFE {best})")

    def student_row(label, nfe, solver, seconds, model=model, seeds=seeds, best=best, res=res):
        fd = fd_of(generate(model, solver, seeds, batch=256).x)
        ratio = acceleration_ratio(fd.distance, nfe, best)
        res["students"].setdefault(label, {})[nfe] = {"fd": fd.distance, "ratio": ratio, "seconds": seconds}
        return fd.distance

    dode, dlms, sfd = students.get("dode"), students.get("dlms"), students.get("sfd")
    cells = {}
    for nfe in student_nfes:
        if "dode" not in skip:
            t0, tried = time.time(), []
            for b in args.dode_bases.split(","):
                s, t = dode.configs({"method": "dode", "nfe": nfe, "base": b}, {"heldout": args.num})
                solver = dode.load(dode.fit(cache, model, s, t), model)
                tried.append((heldout_rmse(solver, model, cache, held), b, solver))
            _, b, solver = min(tried, key=lambda r: r[0])  # the base is picked by held-out RMSE, then measured in FD
            cells[("D-ODE", nfe)] = f"{student_row('D-ODE', nfe, solver, time.time() - t0):.2f} ({b})"
        if "dlms" not in skip:
            t0 = time.time()
            s, t = dlms.configs(
                {"method": "dlms", "nfe": nfe},
                {"iterations": args.dlms_iterations, "batch": args.dlms_batch, "heldout": args.num},
            )
            solver = dlms.load(dlms.fit(cache, model, s, t), model)
            cells[("DLMS", nfe)] = f"{student_row('DLMS', nfe, solver, time.time() - t0):.2f}"
        if "sfd" not in skip:
            t0 = time.time()
            s, t = sfd.configs(
                {"method": "sfd", "nfe": nfe}, {"lr": 2e-4, "iterations": args.sfd_iterations, "heldout": args.num}
            )
            solver = sfd.load(sfd.fit(cache, model, s, t), model)
            cells[("SFD", nfe)] = f"{student_row('SFD', nfe, solver, time.time() - t0):.2f}"
        say(f"(distilled at NFE {nfe})")
    if "sfdv" not in skip:
        t0 = time.time()
        s, t = sfd.configs(
            {"method": "sfd", "nfe": min(student_nfes), "variable": True, "nfe_set": ",".join(map(str, student_nfes))},
            {"lr": 2e-4, "iterations": args.sfd_iterations + 100, "heldout": args.num},
        )
        sfdv = sfd.load(sfd.fit(cache, model, s, t), model)
        seconds = time.time() - t0
        for nfe in student_nfes:
            cells[("SFD-v", nfe)] = f"{student_row('SFD-v', nfe, sfdv.at_nfe(nfe), seconds):.2f}"
    cols = [c for c in ("D-ODE", "DLMS", "SFD", "SFD-v") if any(k[0] == c for k in cells)]
    say("")
    say("Students (FD; in brackets the acceleration ratio in FD: the NFE at which the best handcrafted solver")
    say("reaches the student's FD, log-log interpolated, over the student's NFE; inf = none here reaches it):")
    say("")
    say("| NFE | best handcrafted | " + " | ".join(cols) + " |")
    say("|---|---|" + "---|" * len(cols))
    for nfe in student_nfes:
        bh = f"{best[nfe]:.2f}" if nfe in best else "-"
        row = []
        for c in cols:
            if (c, nfe) not in cells:
                row.append("-")
                continue
            ratio = res["students"][c][nfe]["ratio"]
            row.append(f"{cells[(c, nfe)]} [x{ratio:.2f}]")
        say(f"| {nfe} | {bh} | " + " | ".join(row) + " |")
    say("")
    times = {c: ", ".join(f"NFE {n}: {v['seconds']:.0f}s" for n, v in sorted(res["students"][c].items())) for c in cols}
    say("Distillation wall times: " + "; ".join(f"{c} {t}" for c, t in times.items()) + ".")
