"""The digits demo's settings (README "Quick start"): DLMS fitted with the demo recipe and variants of it, scored by
the FD (digit features, against the held-out digits) of its samples on several seed sets, each next to the best
handcrafted solver at the same NFE on the same seeds (every one, with and without AFS; measured once per set).

    OMP_NUM_THREADS=1 python benchmarks/digits_demo_settings.py [--recipe recipes/digits_demo.yaml]
        [--seeds 1000000,2000000,3000000] [--num 512] [VARIANT ...]
    python benchmarks/digits_demo_settings.py --throughput    # network calls per second at 1 and 2 torch threads

A variant is `key=value,key=value` over recipe keys (`train.iterations=100,teacher.steps=16,teacher.cache=...`);
`recipe` (the default) is the recipe as it is. Prints one markdown row per variant: fit CPU seconds, FD per seed
set, and how far below the best handcrafted solver's FD it is (positive: DLMS is better)."""

import argparse
import time

import torch

from solverdistill import digits
from solverdistill.fid import digits_fd
from solverdistill.generate import generate
from solverdistill.pipeline import method_configs, open_workspace
from solverdistill.recipes import load_recipe, read_value


def overrides(variant: str) -> dict:
    if variant == "recipe":
        return {}
    pairs = (kv.split("=", 1) for kv in variant.split(",") if kv)
    return {k: read_value(v) for k, v in pairs}


def throughput(seconds: float = 3.0) -> None:
    """toy:unet-digits samples per second through the network at batch 64 and 256, with 1 and then 2 threads."""
    from solverdistill.models import resolve

    m = resolve("toy:unet-digits")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for b in (64, 256):
            x, sigma = torch.randn(b, 1, 16, 16), torch.ones(b)
            with torch.no_grad():
                m(x, sigma)
                began, n = time.time(), 0
                while time.time() - began < seconds:
                    m(x, sigma)
                    n += b
            print(f"{threads} thread(s), batch {b}: {n / (time.time() - began):.0f} samples/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/digits_demo.yaml")
    ap.add_argument("--seeds", default="1000000,2000000,3000000", help="first seed of each set")
    ap.add_argument("--num", type=int, default=512)
    ap.add_argument("--throughput", action="store_true", help="time the network at 1 and 2 threads, then stop")
    ap.add_argument("variants", nargs="*", default=["recipe"])
    args = ap.parse_args()
    if args.throughput:
        return throughput()
    firsts = [int(s) for s in args.seeds.split(",")]
    base = load_recipe(args.recipe)
    nfe = int(base.student.get("nfe", 5))
    best = {}
    for first in firsts:
        rows, _ = digits.handcrafted(base.model.spec, nfe, list(range(first, first + args.num)))
        best[first] = rows[0]
        print(f"seeds {first}..: best handcrafted at NFE {nfe}: {rows[0].solver} {rows[0].fd:.1f}", flush=True)
    print("\n| variant | fit CPU s | FD per seed set | below the best handcrafted by |\n|---|---|---|---|")
    for variant in args.variants:
        rec = load_recipe(args.recipe, overrides(variant))
        ws = open_workspace(rec, say=lambda m: None)
        method, s_cfg, t_cfg = method_configs(rec, say=lambda m: None)
        began = time.process_time()
        art = method.fit(ws.cache, ws.model, s_cfg, t_cfg)
        cpu = time.process_time() - began
        solver = method.load(art, ws.model)
        fds = {}
        for first in firsts:
            x = generate(ws.model, solver, list(range(first, first + args.num)), batch=256).x
            fds[first] = digits_fd(x).distance
        print(
            f"| {variant} | {cpu:.0f} | {' / '.join(f'{fds[f]:.1f}' for f in firsts)} | "
            f"{' / '.join(f'{best[f].fd - fds[f]:.0f}' for f in firsts)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
