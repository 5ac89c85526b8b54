"""`teacher` and `sample` throughput with 1 process and with 2 torchrun processes on the CPU (gloo), measured side
by side: the runs alternate (1, 2, 1, 2, ...), median of 3, one thread per process (OMP_NUM_THREADS=1).

Usage: BENCH_MODEL=gmm:cifar BENCH_NUM=256 BENCH_STEPS=64 BENCH_SAMPLES=2048 python benchmarks/distributed_throughput.py
The teacher figure is the integration time the command reports (model loading and process start excluded);
the sample figure is the whole command's wall time (process start, gather and writing included).
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from solverdistill.bench import machine

MODEL = os.environ.get("BENCH_MODEL", "gmm:cifar")
NUM = int(os.environ.get("BENCH_NUM", 256))
STEPS = int(os.environ.get("BENCH_STEPS", 64))
SAMPLES = int(os.environ.get("BENCH_SAMPLES", 2048))
REPEATS = int(os.environ.get("BENCH_REPEATS", 3))
# This host's name may not resolve: torchrun binds to the loopback address (drop it on a normal machine).
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def command(procs: int, *args: str) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "solverdistill", *args]
    return [*TORCHRUN, f"--nproc_per_node={procs}", "-m", "solverdistill", "--", *args]


def run(cmd: list[str]) -> tuple[float, str]:
    began = time.perf_counter()
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    return wall, r.stdout


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    recipe = tmp / "r.yaml"
    recipe.write_text(
        f"name: tp\nmodel: {{spec: '{MODEL}'}}\nteacher: {{steps: {STEPS}, num_samples: {NUM}, batch: 32, "
        f"shard_size: 32, device: cpu, cache: '{tmp / 'cache'}'}}\n"
    )
    times: dict[str, dict[int, list[float]]] = {"teacher": {1: [], 2: []}, "sample": {1: [], 2: []}}
    try:
        for _ in range(REPEATS):
            for procs in (1, 2):
                shutil.rmtree(tmp / "cache", ignore_errors=True)
                _, out = run(command(procs, "teacher", str(recipe), "--quiet"))
                times["teacher"][procs].append(float(re.search(r"([0-9.]+)s\s*$", out.strip()).group(1)))
                wall, _ = run(
                    command(
                        procs,
                        "sample",
                        "--model",
                        MODEL,
                        "--solver",
                        "dpm++",
                        "--nfe",
                        "10",
                        "--num",
                        str(SAMPLES),
                        "--batch",
                        "256",
                        "--device",
                        "cpu",
                        "--out",
                        str(tmp / "s"),
                        "--quiet",
                    )
                )
                times["sample"][procs].append(wall)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: {p: statistics.median(v) for p, v in by.items()} for k, by in times.items()}
    report = {
        "machine": machine(torch.device("cpu")),
        "settings": {
            "model": MODEL,
            "teacher_samples": NUM,
            "teacher_steps": STEPS,
            "samples": SAMPLES,
            "repeats": REPEATS,
            "threads_per_process": 1,
        },
        "seconds": times,
    }
    print(json.dumps(report, indent=1))
    print(
        f"teacher ({NUM} samples, {STEPS} steps): 1 process {NUM / med['teacher'][1]:.1f} samples/s, "
        f"2 processes {NUM / med['teacher'][2]:.1f} samples/s, ratio {med['teacher'][1] / med['teacher'][2]:.2f}"
    )
    print(
        f"sample ({SAMPLES} samples, dpm++ NFE 10): 1 process {SAMPLES / med['sample'][1]:.1f} samples/s, "
        f"2 processes {SAMPLES / med['sample'][2]:.1f} samples/s, ratio {med['sample'][1] / med['sample'][2]:.2f}"
    )


if __name__ == "__main__":
    main()
