"""Teacher cache write overhead: `sdistill teacher` against the same integration without writing, measured
side by side in one run (alternating, median of repeats). Usage: python benchmarks/teacher_overhead.py"""

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch

from solverdistill.recipes import load_recipe
from solverdistill.teacher.run import run_teacher

SPEC = os.environ.get("BENCH_MODEL", "gmm:cifar")
NUM, STEPS, REPEATS = int(os.environ.get("BENCH_NUM", 128)), int(os.environ.get("BENCH_STEPS", 64)), 3

tmp = tempfile.mkdtemp()
recipe_path = os.path.join(tmp, "r.yaml")
with open(recipe_path, "w") as f:
    f.write(f"name: bench\nmodel: {{spec: '{SPEC}'}}\nteacher: {{steps: {STEPS}, num_samples: {NUM}, batch: 32, "
            f"shard_size: 64, cache: '{tmp}/cache'}}\n")
recipe = load_recipe(recipe_path)
times = {"write": [], "no_write": []}
for _ in range(REPEATS):
    for mode in ("no_write", "write"):
        shutil.rmtree(f"{tmp}/cache", ignore_errors=True)
        t0 = time.perf_counter()
        run_teacher(recipe, write=(mode == "write"))
        times[mode].append(time.perf_counter() - t0)
med = {k: statistics.median(v) for k, v in times.items()}
report = {"benchmark": "teacher write overhead", "model": SPEC, "samples": NUM, "steps": STEPS, "repeats": REPEATS,
          "seconds": times, "median_seconds": med, "ratio": med["write"] / med["no_write"],
          "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "python": sys.version.split()[0]}}
print(json.dumps(report, indent=1))
print(f"teacher with writing / without: {report['ratio']:.3f} (median of {REPEATS}, {SPEC}, {NUM} samples, "
      f"{STEPS} steps)")
shutil.rmtree(tmp, ignore_errors=True)
