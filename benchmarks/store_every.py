"""What teacher.store_every costs: the states `states_at` reads from a cache that keeps every K-th teacher grid
point (K = 1, 2, 4, 8), against the cache that keeps all of them, at every teacher grid point and at the
log-sigma midpoints between them; and what K does to the CIFAR-10 DLMS recipe's cache on disk.

Usage: BENCH_NUM=16 BENCH_STEPS=256 python benchmarks/store_every.py   (models: gmm:cifar and toy:unet-gmm)
Prints one table row per model and K; the relative error is ||x_K - x_1|| / ||x_1|| over samples and sigmas.
"""

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from solverdistill.bench import machine
from solverdistill.recipes import load_recipe
from solverdistill.teacher.cache import TeacherCache, shard_bytes
from solverdistill.teacher.run import run_teacher, stored_points

NUM = int(os.environ.get("BENCH_NUM", 16))
STEPS = int(os.environ.get("BENCH_STEPS", 256))  # the CIFAR-10 recipes' teacher: 256 steps, 257 points
MODELS = os.environ.get("BENCH_MODELS", "gmm:cifar,toy:unet-gmm").split(",")
EVERY = (1, 2, 4, 8)
# recipes/cifar10_dlms.yaml: 20,000 trajectories of 3x32x32 in float16, 256 teacher steps.
CIFAR = {"num": 20000, "steps": 256, "shape": (3, 32, 32), "dtype": np.float16}


def recipe(root: Path, spec: str, every: int) -> Path:
    path = root / f"{spec.replace(':', '_')}_{every}.yaml"
    path.write_text(
        f"name: se\nmodel: {{spec: '{spec}'}}\n"
        f"teacher: {{solver: dpm++3m, schedule: logsnr, steps: {STEPS}, num_samples: {NUM}, batch: {NUM}, "
        f"seed: 0, dtype: float32, device: cpu, store_every: {every}, cache: '{root / path.stem}'}}\n"
    )
    return path


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for spec in MODELS:
            caches = {}
            for k in EVERY:
                began = time.time()
                run_teacher(load_recipe(recipe(root, spec, k)))
                caches[k] = TeacherCache.open(root / f"{spec.replace(':', '_')}_{k}")
                print(f"{spec} store_every {k}: teacher {time.time() - began:.1f}s", flush=True)
            full = caches[1]
            u = np.log(full.sigmas)
            mids = np.exp((u[:-1] + u[1:]) / 2)
            idx = np.arange(NUM)
            for k in EVERY:
                c = caches[k]
                row = {"model": spec, "store_every": k, "points": len(c.sigmas)}
                for where, q in (("grid", full.sigmas), ("midpoints", mids)):
                    ref = full.states_at(idx, q, dtype=torch.float64).flatten(2)
                    got = c.states_at(idx, q, dtype=torch.float64).flatten(2)
                    rel = (got - ref).norm(dim=2) / ref.norm(dim=2)
                    row[f"rel_rms_{where}"] = float((got - ref).norm() / ref.norm())
                    row[f"rel_max_{where}"] = float(rel.max())
                row["bytes_per_sample"] = c.disk_bytes() / c.num_samples
                n_cifar = len(stored_points(CIFAR["steps"], k)) - 1
                cifar = shard_bytes(CIFAR["num"], n_cifar, CIFAR["shape"], CIFAR["dtype"])
                row["cifar10_recipe_GB"] = cifar / 1e9
                rows.append(row)
    print(json.dumps({"machine": machine(torch.device("cpu")), "num": NUM, "steps": STEPS}, indent=1))
    print(
        f"{'model':14} {'K':>2} {'points':>6} {'rel err grid (rms/max)':>24} {'rel err mid (rms/max)':>24} "
        f"{'CIFAR-10 recipe':>15}"
    )
    for r in rows:
        print(
            f"{r['model']:14} {r['store_every']:>2} {r['points']:>6} "
            f"{r['rel_rms_grid']:>11.2e} / {r['rel_max_grid']:.2e} "
            f"{r['rel_rms_midpoints']:>11.2e} / {r['rel_max_midpoints']:.2e} {r['cifar10_recipe_GB']:>12.1f} GB"
        )


if __name__ == "__main__":
    main()
