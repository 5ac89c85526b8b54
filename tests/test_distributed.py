"""torchrun on the CPU (gloo): 2 (and 3) processes started with `python -m torch.distributed.run`, the way the
README documents it (program arguments after `--`), against one process with the same seeds."""

import filecmp
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from solverdistill import distributed
from solverdistill.teacher import cache as cache_module
from solverdistill.teacher.cache import TeacherCache

# The one model-agnostic killer: gmm:tiny that SIGKILLs itself on the given rank after some calls.
KILLER = """
import os, signal
import torch
from solverdistill.models import resolve

CALLS = [0]


class Killer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = resolve("gmm:tiny")
        self.sigma_min, self.sigma_max, self.shape = self.inner.sigma_min, self.inner.sigma_max, self.inner.shape

    def forward(self, x, sigma, cond=None):
        CALLS[0] += 1
        if os.environ.get("KILL_RANK", "none") == os.environ.get("RANK") and CALLS[0] > int(os.environ["KILL_AFTER"]):
            if os.environ.get("KILL_HOW") == "raise":
                from solverdistill.errors import RunFailed

                raise RunFailed("the model broke on purpose")
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(x, sigma, cond)


def make():
    return Killer()
"""


def torchrun(
    n: int, *args, cwd: Path, env: dict | None = None, timeout: float = 120, script: bool = False
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m solverdistill -- ARGS`, or with `script` the installed
    `$(command -v sdistill) -- ARGS` (this host needs --local-addr: its name does not resolve)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1"]
    program = [str(Path(sys.executable).parent / "sdistill")] if script else ["-m", "solverdistill"]
    cmd += [f"--nproc_per_node={n}", *program, "--", *map(str, args)]
    full = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def one_process(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        full.pop(k, None)
    return subprocess.run(
        [sys.executable, "-m", "solverdistill", *map(str, args)],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


def same_tree(a: Path, b: Path) -> None:
    """Every file of two folders equal byte for byte (writer.lock and temporaries excluded)."""
    names_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    names_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert names_a == names_b
    for rel in names_a:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


TEACHER = {"steps": 6, "num_samples": 14, "batch": 2, "shard_size": 3}


def test_single_process_has_no_group():
    assert distributed.world().size == 1 or "WORLD_SIZE" in os.environ
    assert not distributed.active() and distributed.is_main() and distributed.rank_size() == (0, 1)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]


def test_shard_splits_contiguously(monkeypatch):
    monkeypatch.setattr(distributed, "rank_size", lambda: (1, 3))
    assert distributed.shard(list(range(8))) == [2, 3, 4]
    got = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank_size", lambda r=r: (r, 3))
        got += distributed.shard(list(range(8)))
    assert got == list(range(8))


def test_teacher_and_sample_on_two_ranks_equal_one_process(tmp_path, recipe_file):
    one = recipe_file(tmp_path / "one.yaml", teacher={**TEACHER, "cache": str(tmp_path / "c1")})
    two = recipe_file(tmp_path / "two.yaml", teacher={**TEACHER, "cache": str(tmp_path / "c2")})
    r = one_process("teacher", one, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = torchrun(2, "teacher", two, "--num", 14, cwd=tmp_path)  # `--num` after `--` is the program's
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("14 samples (14 integrated now") == 1  # rank 0 prints, the other is silent
    assert not (tmp_path / "c2" / "writer.lock").exists()
    same_tree(tmp_path / "c1", tmp_path / "c2")

    sample = ["sample", "--model", "gmm:tiny", "--solver", "dpm++2m", "--nfe", 5, "--num", 7, "--batch", 3]
    r = one_process(*sample, "--out", tmp_path / "s1", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = torchrun(2, *sample, "--out", tmp_path / "s2", "--quiet", cwd=tmp_path, script=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert filecmp.cmp(tmp_path / "s1" / "samples.npz", tmp_path / "s2" / "samples.npz", shallow=False)


def manifest_count(cache: Path) -> int:
    m = json.loads((cache / "manifest.json").read_text())
    return sum(s["count"] for s in m["shards"] if s["status"] == "ok")


@pytest.mark.parametrize("rerun", [1, 3])
def test_a_killed_rank_stops_the_run_and_any_world_size_resumes(tmp_path, recipe_file, rerun):
    (tmp_path / "killer.py").write_text(textwrap.dedent(KILLER))
    teacher = {**TEACHER, "num_samples": 24, "cache": str(tmp_path / "c")}
    rec = recipe_file(tmp_path / "r.yaml", model=f"python:{tmp_path / 'killer.py'}:make", teacher=teacher)
    # Rank 1 dies in its second shard: rank 0 must not wait for it forever, and the run must fail.
    r = torchrun(2, "teacher", rec, cwd=tmp_path, env={"KILL_RANK": "1", "KILL_AFTER": "30"}, timeout=90)
    assert r.returncode != 0
    assert "rank 1" in r.stdout + r.stderr or "local_rank: 1" in r.stdout + r.stderr
    done = manifest_count(tmp_path / "c")
    assert 0 < done < 24  # the first round was recorded, not the whole cache
    if rerun == 1:
        r = one_process("teacher", rec, "--quiet", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    else:
        r = torchrun(3, "teacher", rec, "--quiet", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
    assert f"({24 - done} integrated now, {done} already cached)" in r.stdout
    ref = recipe_file(
        tmp_path / "ref.yaml",
        model=f"python:{tmp_path / 'killer.py'}:make",
        teacher={**teacher, "cache": str(tmp_path / "ref")},
    )
    assert one_process("teacher", ref, "--quiet", cwd=tmp_path).returncode == 0
    got, want = TeacherCache.open(tmp_path / "c"), TeacherCache.open(tmp_path / "ref")
    assert got.num_samples == want.num_samples == 24
    for key in ("seeds", "noise", "x", "denoised"):
        assert np.array_equal(got.get(key, range(24)), want.get(key, range(24)))


def test_a_failure_on_one_rank_stops_all_with_its_message_and_status(tmp_path, recipe_file):
    (tmp_path / "killer.py").write_text(textwrap.dedent(KILLER))
    teacher = {**TEACHER, "num_samples": 24, "cache": str(tmp_path / "c")}
    rec = recipe_file(tmp_path / "r.yaml", model=f"python:{tmp_path / 'killer.py'}:make", teacher=teacher)
    env = {"KILL_RANK": "1", "KILL_AFTER": "30", "KILL_HOW": "raise"}
    r = torchrun(2, "teacher", rec, "--quiet", cwd=tmp_path, env=env, timeout=90)
    said = r.stdout + r.stderr
    assert r.returncode != 0 and "[rank 1/2] failed: the model broke on purpose" in said
    assert "exitcode  : 1" in said and "Traceback" not in said.split("[rank 1/2]")[0]
    # Rank 0 was stopped: it gave its lock back, or (killed while blocked in a collective, as a loaded machine can
    # make it) left a stale one, which the next run takes over.
    lock = tmp_path / "c" / "writer.lock"
    if lock.exists():
        owner = cache_module._read_lock(lock)
        assert owner is not None and cache_module._lock_is_stale(owner), lock.read_text()
    r = one_process("teacher", rec, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert TeacherCache.open(tmp_path / "c").num_samples == 24 and not lock.exists()


FIT = """
import sys
from pathlib import Path

import numpy as np
import torch

from solverdistill import distributed
from solverdistill.pipeline import method_configs, recipe_model
from solverdistill.recipes import load_recipe
from solverdistill.teacher.cache import TeacherCache


def fit(recipe_path, method):
    rec = load_recipe(Path(recipe_path))
    m, s, t = method_configs(rec, method, None, lambda _: None)
    model = recipe_model(rec, "cpu")
    return m.fit(TeacherCache.open(rec.cache_dir()), model, s, t).arrays


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed.init()
    rank = distributed.rank_size()[0]
    for job in sys.argv[2:]:  # RECIPE:METHOD
        recipe, method = job.rsplit(":", 1)
        np.savez(Path(sys.argv[1]) / f"{Path(recipe).stem}-{method}-rank{rank}.npz", **fit(recipe, method))
    distributed.finish()
"""


def test_dode_dlms_and_sfd_fit_the_same_on_two_ranks_as_one_process(tmp_path, recipe_file):
    (tmp_path / "fit.py").write_text(textwrap.dedent(FIT))
    rec = recipe_file(
        tmp_path / "r.yaml",
        teacher={"steps": 16, "num_samples": 40, "batch": 20, "cache": str(tmp_path / "c")},
        student={"nfe": 3},
        train={"samples": 24, "iterations": 4, "batch": 8, "heldout": 8, "validation": 4, "eval_every": 2},
    )
    net = recipe_file(  # SFD fine-tunes a network: the built-in one
        tmp_path / "net.yaml",
        model="toy:unet-gmm",
        teacher={"steps": 8, "num_samples": 24, "batch": 24, "cache": str(tmp_path / "n")},
        student={"nfe": 2},
        train={"iterations": 2, "batch": 7, "heldout": 8},  # unequal shares (3 and 4 rows): DDP's mean weighted
    )
    endpoint = recipe_file(  # one backward through both network calls of each rank's DDP-wrapped network
        tmp_path / "endpoint.yaml",
        model="toy:unet-gmm",
        teacher={"steps": 8, "num_samples": 24, "batch": 24, "cache": str(tmp_path / "n")},
        student={"nfe": 2},
        train={"iterations": 2, "batch": 7, "heldout": 8, "loss": "endpoint", "distance": "l2"},
    )
    adapters = recipe_file(  # SFD-v with per-NFE adapters: each iteration leaves the other NFE's unused
        tmp_path / "adapters.yaml",
        model="toy:unet-gmm",
        teacher={"steps": 8, "num_samples": 24, "batch": 24, "cache": str(tmp_path / "n")},
        student={"nfe": 1, "variable": True, "nfe_set": "1,2", "adapters": 2},
        train={"iterations": 3, "batch": 7, "heldout": 8, "step_lr_scale": 2},
    )
    assert one_process("teacher", rec, "--quiet", cwd=tmp_path).returncode == 0
    assert one_process("teacher", net, "--quiet", cwd=tmp_path).returncode == 0
    jobs = [("dode", rec), ("dlms", rec), ("sfd", net), ("sfd", endpoint), ("sfd", adapters)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1"]
    cmd += ["--nproc_per_node=2", str(tmp_path / "fit.py"), str(tmp_path), *(f"{r}:{m}" for m, r in jobs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        import fit as fit_module
    finally:
        sys.path.remove(str(tmp_path))
    for method, recipe in jobs:
        one = fit_module.fit(recipe, method)  # this process: no group
        ranks = [np.load(tmp_path / f"{Path(recipe).stem}-{method}-rank{r}.npz", allow_pickle=False) for r in (0, 1)]
        assert sorted(ranks[0].files) == sorted(one)
        for k in one:
            assert np.array_equal(ranks[0][k], ranks[1][k]), (method, k)  # both ranks hold the same student
            # float32 gradients summed in another order, then Adam steps: float error only. Adam normalises
            # each entry, so one whose gradient is near zero moves by up to lr whatever its rounding (SFD:
            # 4 steps of lr 5e-5 on a network).
            atol = 1e-4 if method == "sfd" else 1e-5
            assert np.allclose(ranks[0][k], one[k], rtol=1e-4, atol=atol), (method, k)
        if method == "dode":
            assert np.abs(one["lambdas"]).max() > 0  # something was fitted
        if recipe == adapters:
            assert any(np.abs(v).max() > 0 for k, v in one.items() if k.startswith("net.step_adapters.up."))


def test_fid_on_two_ranks_equals_one_process(tmp_path):
    sample = ["sample", "--model", "gmm:tiny", "--solver", "dpm++2m", "--nfe", 4, "--num", 40, "--quiet"]
    assert one_process(*sample, "--out", tmp_path / "s", cwd=tmp_path).returncode == 0
    fid = ["fid", tmp_path / "s" / "samples.npz", "--ref", "gmm:tiny", "--features", "pixels", "--batch", 8]
    one = one_process(*fid, cwd=tmp_path)
    two = torchrun(2, *fid, cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stdout + two.stderr
    number = re.compile(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?")
    a, b = [float(x) for x in number.findall(one.stdout)], [float(x) for x in number.findall(two.stdout)]
    assert a and len(a) == len(b) and np.allclose(a, b, rtol=1e-9), (one.stdout, two.stdout)


def test_bench_on_two_ranks_reports_the_quality_of_one_process(tmp_path, recipe_file):
    teacher = {"steps": 8, "num_samples": 16, "batch": 8, "cache": str(tmp_path / "c")}
    rec = recipe_file(tmp_path / "r.yaml", teacher=teacher)
    assert one_process("teacher", rec, "--quiet", cwd=tmp_path).returncode == 0
    bench = ["bench", "--recipe", rec, "--num", 7, "--quick", "--quiet", "--device", "cpu", "--out"]
    one = one_process(*bench, tmp_path / "one", cwd=tmp_path)
    two = torchrun(2, *bench, tmp_path / "two", cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stdout + two.stderr
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert a["quality"] == b["quality"]  # 7 held-out seeds split 3 + 4, endpoints gathered: the same figures
    assert a["machine"]["processes"] == 1 and b["machine"]["processes"] == 2
    assert "2 processes (torchrun)" in two.stdout and "2 processes" in (tmp_path / "two" / "report.md").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (nccl: one GPU per rank)")
def test_sample_and_teacher_over_nccl_equal_one_gpu(tmp_path, recipe_file):
    sample = ["sample", "--model", "gmm:tiny", "--solver", "dpm++2m", "--nfe", 5, "--num", 9, "--device", "cuda"]
    assert one_process(*sample, "--out", tmp_path / "s1", "--quiet", cwd=tmp_path).returncode == 0
    r = torchrun(2, *sample, "--out", tmp_path / "s2", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # Other batch shapes on a GPU may pick other kernels: equal to float error, the noise exactly.
    a, b = (np.load(tmp_path / s / "samples.npz", allow_pickle=False) for s in ("s1", "s2"))
    assert np.array_equal(a["z"], b["z"]) and np.allclose(a["x"], b["x"], rtol=1e-5, atol=1e-5)
    teacher = {**TEACHER, "device": "cuda"}
    one = recipe_file(tmp_path / "one.yaml", teacher={**teacher, "cache": str(tmp_path / "c1")})
    two = recipe_file(tmp_path / "two.yaml", teacher={**teacher, "cache": str(tmp_path / "c2")})
    assert one_process("teacher", one, "--quiet", cwd=tmp_path).returncode == 0
    r = torchrun(2, "teacher", two, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    same_tree(tmp_path / "c1", tmp_path / "c2")
