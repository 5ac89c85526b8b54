"""Teacher cache write overhead alone: `sdistill teacher` against the same integration without writing,
alternating runs, median of 3 (the same measurement `sdistill bench` makes).
Usage: BENCH_MODEL=gmm:cifar BENCH_NUM=256 BENCH_STEPS=128 python benchmarks/teacher_overhead.py"""

import json
import os

import torch

from solverdistill.bench import machine, teacher_overhead

spec = os.environ.get("BENCH_MODEL", "gmm:cifar")
r = teacher_overhead(spec, int(os.environ.get("BENCH_NUM", 256)), int(os.environ.get("BENCH_STEPS", 128)))
r["machine"] = machine(torch.device("cpu"))
print(json.dumps(r, indent=1))
print(
    f"teacher with writing / without: {r['ratio']:.3f} (median of 3, {spec}, {r['samples']} samples, "
    f"{r['steps']} steps)"
)
