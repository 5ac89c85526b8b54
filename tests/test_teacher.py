import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from solverdistill.errors import BadInput
from solverdistill.generate import initial_noise
from solverdistill.models import resolve
from solverdistill.recipes import load_recipe
from solverdistill.solvers.singlestep import rk4_logsigma
from solverdistill.teacher import TeacherCache
from solverdistill.teacher.run import prepare_teacher, run_teacher

FIELDS = ("seeds", "noise", "x", "denoised")


def write_recipe(path: Path, cache: Path, **teacher) -> Path:
    t = {
        "solver": "dpm++3m",
        "schedule": "logsnr",
        "steps": 16,
        "num_samples": 24,
        "batch": 4,
        "seed": 5,
        "cache": str(cache),
        "shard_size": 8,
        **teacher,
    }
    model = t.pop("model", "gmm:tiny")
    body = ", ".join(f"{k}: {v}" for k, v in t.items())
    path.write_text(f"name: t\nmodel: {{spec: '{model}'}}\nteacher: {{{body}}}\n")
    return path


@pytest.fixture(autouse=True)
def _one_line_messages(monkeypatch):
    """Rich wraps messages at the console width (80 without a terminal): make it wide, so a message is a line."""
    from solverdistill.commands import console

    monkeypatch.setattr(console.err, "width", 100_000)


def all_arrays(cache_dir):
    c = TeacherCache.open(cache_dir)
    idx = np.arange(c.num_samples)
    return {k: c.get(k, idx) for k in FIELDS}


def test_layout_and_reader(tmp_path, cli):
    r = cli("teacher", write_recipe(tmp_path / "r.yaml", tmp_path / "c"), "--quiet")
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000", "shard-000001", "shard-000002"]
    shard = tmp_path / "c" / "shard-000001"
    assert np.load(shard / "x.npy").shape == (8, 17, 2, 4, 4)
    assert np.load(shard / "sigmas.npy").shape == (17,)
    assert list(np.load(shard / "seeds.npy")) == list(range(13, 21))
    c = TeacherCache.open(tmp_path / "c")
    assert c.num_samples == 24 and list(c.seeds[:2]) == [5, 6]
    # noise is the per-seed noise; x[:, 0] is sigma_max * noise; the last denoised is D at sigma_min
    z = initial_noise([7, 20], (2, 4, 4)).numpy()
    got = c.get("noise", [2, 15])
    assert np.array_equal(got, z)
    assert np.allclose(c.get("x", [2])[0, 0], 80 * z[0], rtol=1e-6)
    m = resolve("gmm:tiny")
    last = m(torch.from_numpy(c.get("x", [3])[:, -1]), torch.tensor([0.002]))
    assert np.allclose(c.get("denoised", [3])[:, -1], last.numpy(), atol=1e-5)
    # states_at: exact copies on grid points, per-sample grids allowed
    on = c.states_at([0, 9, 23], c.sigmas[[0, 5, 16]])
    assert torch.equal(on, torch.from_numpy(c.get("x", [0, 9, 23])[:, [0, 5, 16]]))
    per = c.states_at([1, 2], np.array([[80.0, 1.0], [3.0, 0.002]]))
    assert per.shape == (2, 2, 2, 4, 4) and torch.equal(per[1, 1], torch.from_numpy(c.get("x", [2])[0, -1]))
    r = cli("cache", "info", tmp_path / "c")
    assert r.exit_code == 0 and "24" in r.output and "dpm++3m" in r.output
    r = cli("cache", "info", tmp_path / "nothing")
    assert r.exit_code == 2 and "no teacher cache here" in r.output


def test_interpolation_error_below_1e4_with_default_grid(tmp_path):
    """Hermite states at the geometric midpoints of the default teacher grid (logsnr, 256 steps), the worst
    place for interpolation, against a direct accurate solve. Coarser grids are shown for the record."""
    m = resolve("gmm:tiny", dtype=torch.float64)
    errors = {}
    for steps in (32, 64, 256):
        rec = load_recipe(
            write_recipe(
                tmp_path / f"r{steps}.yaml",
                tmp_path / f"c{steps}",
                steps=steps,
                num_samples=6,
                batch=6,
                compute_dtype="float64",
            )
        )
        run_teacher(rec)
        c = TeacherCache.open(rec.cache_dir())
        picks = np.arange(0, steps, max(1, steps // 16))
        mid = np.sqrt(c.sigmas[picks] * c.sigmas[picks + 1])
        got = c.states_at(np.arange(6), mid, dtype=torch.float64)
        # One RK4 pass whose uniform log-sigma steps land exactly on every midpoint (2048 = 8 * 256).
        z = torch.from_numpy(c.get("noise", np.arange(6))).double()
        # The callback sees the state before each step: step i starts where i uniform steps have led.
        hits = {int(round(2048 * (np.log(80.0) - np.log(s)) / np.log(80.0 / 0.002))): k for k, s in enumerate(mid)}
        direct = {}

        def keep(step, hits=hits, direct=direct):
            if step.i in hits:
                direct[hits[step.i]] = step.x

        rk4_logsigma(m, 80 * z, 80.0, 0.002, steps=2048, callback=keep)
        errors[steps] = max(((got[:, k] - direct[k]).norm() / direct[k].norm()).item() for k in range(len(mid)))
    print("relative interpolation error by teacher steps:", errors)
    assert errors[256] < 1e-4
    assert errors[32] > errors[256]


def test_same_trajectories_for_different_batch_sizes(tmp_path):
    a = load_recipe(write_recipe(tmp_path / "a.yaml", tmp_path / "a", batch=3, compute_dtype="float64"))
    b = load_recipe(write_recipe(tmp_path / "b.yaml", tmp_path / "b", batch=8, compute_dtype="float64"))
    run_teacher(a)
    run_teacher(b)
    x, y = all_arrays(tmp_path / "a"), all_arrays(tmp_path / "b")
    assert np.array_equal(x["noise"], y["noise"]) and np.array_equal(x["seeds"], y["seeds"])
    assert np.allclose(x["x"], y["x"], atol=1e-6, rtol=0) and np.allclose(x["denoised"], y["denoised"], atol=1e-6)


def test_extend_and_mismatch(tmp_path, cli):
    rec = write_recipe(tmp_path / "r.yaml", tmp_path / "c")
    assert cli("teacher", rec, "--quiet", "--num", 10).exit_code == 0
    first = all_arrays(tmp_path / "c")
    r = cli("teacher", rec, "--quiet", "--num", 30)
    assert r.exit_code == 0 and "20 integrated now" in r.output
    more = all_arrays(tmp_path / "c")
    assert len(more["seeds"]) == 30 and np.array_equal(more["x"][:10], first["x"])
    for change, field in (
        (dict(solver="heun"), "solver"),
        (dict(steps=20), "grid"),
        (dict(dtype="float16"), "dtype"),
        (dict(model="gmm:tiny,seed=3"), "model"),
        (dict(seed=0), "seed"),
    ):
        bad = write_recipe(tmp_path / "bad.yaml", tmp_path / "c", **change)
        r = cli("teacher", bad, "--quiet")
        assert r.exit_code == 2 and field in r.output and "--overwrite" in r.output, r.output
    r = cli("teacher", bad, "--quiet", "--overwrite", "--num", 4)
    assert r.exit_code == 0
    assert TeacherCache.open(tmp_path / "c").spec["seed"] == 0


def test_corrupted_shard_detected_and_regenerated(tmp_path, cli):
    rec = write_recipe(tmp_path / "r.yaml", tmp_path / "c")
    assert cli("teacher", rec, "--quiet").exit_code == 0
    good = all_arrays(tmp_path / "c")
    path = tmp_path / "c" / "shard-000001" / "x.npy"
    data = bytearray(path.read_bytes())
    data[-50] ^= 0xFF
    path.write_bytes(bytes(data))
    r = cli("cache", "info", tmp_path / "c", "--verify")
    assert r.exit_code == 1 and "shard-000001" in r.output
    r = cli("teacher", rec, "--quiet")
    assert r.exit_code == 0 and "8 integrated now" in r.output
    assert cli("cache", "info", tmp_path / "c", "--verify").exit_code == 0
    again = all_arrays(tmp_path / "c")
    assert all(np.array_equal(good[k], again[k]) for k in FIELDS)
    # A truncated file is caught by the cheap check of a plain run, without --verify.
    (tmp_path / "c" / "shard-000002" / "denoised.npy").write_bytes(b"short")
    r = cli("teacher", rec, "--quiet")
    assert r.exit_code == 0 and "8 integrated now" in r.output


def test_sigkill_and_resume_is_bit_identical(tmp_path, cli):
    slow = dict(steps=128, num_samples=64, batch=2, shard_size=8)
    rec = write_recipe(tmp_path / "r.yaml", tmp_path / "killed", **slow)
    cmd = [sys.executable, "-m", "solverdistill", "teacher", str(rec), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # like the test processes: no thread fight with the other worker
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        # The manifest is replaced atomically: a reader never sees half of one.
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(json.loads(manifest.read_text())["shards"])
    assert 2 <= done < 8, "the kill must land mid-run"
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert p.returncode == 0 and f"{64 - 8 * done} integrated now" in p.stdout, p.stdout + p.stderr
    assert not list((tmp_path / "killed").glob("*.tmp"))
    ref = write_recipe(tmp_path / "r2.yaml", tmp_path / "clean", **slow)
    assert cli("teacher", ref, "--quiet").exit_code == 0
    a, b = all_arrays(tmp_path / "killed"), all_arrays(tmp_path / "clean")
    assert all(np.array_equal(a[k], b[k]) for k in FIELDS)


def test_prepare_teacher_plans_what_is_missing(tmp_path):
    rec = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "c", num_samples=20))
    job = prepare_teacher(rec)
    assert job.missing == 20 and [t[1:] for t in job.todo] == [(0, 8), (8, 8), (16, 4)]
    ticks = []
    rep = job.run(progress=ticks.append)
    assert sum(ticks) == 20 and rep.generated == 20 and rep.reused == 0 and rep.total == 20
    assert rep.nfe_per_sample == 16 + 1  # dpm++3m: one call per step, plus D at sigma_min for the last point
    assert prepare_teacher(rec).missing == 0
    more = load_recipe(tmp_path / "r.yaml", {"teacher.num_samples": 26})
    job = prepare_teacher(more, model=job.model)  # a model already resolved is used as it is
    assert job.missing == 6 and [t[1:] for t in job.todo] == [(20, 6)]
    assert (tmp_path / "c" / "writer.lock").is_file()  # a job with work to do holds the writer lock...
    job.release()  # ...until it runs or is released
    assert not (tmp_path / "c" / "writer.lock").exists()
    rep = run_teacher(more, write=False)  # integrates, writes nothing
    assert rep.generated == 6 and TeacherCache.open(tmp_path / "c").num_samples == 20


def test_cache_split_start_endpoints_and_summary(tmp_path):
    rec = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "c", num_samples=20, compute_dtype="float64"))
    run_teacher(rec)
    c = TeacherCache.open(tmp_path / "c")
    train, held = c.split(5, 4)
    assert train.tolist() == [0, 1, 2, 3, 4] and held.tolist() == [16, 17, 18, 19]
    train, held = c.split(0, 4)  # 0: every trajectory not held out
    assert train.tolist() == list(range(16)) and not set(train) & set(held)
    for samples, heldout, key in ((17, 4, "exceeds the 20 cached"), (1, 0, "train.heldout: must be >= 1")):
        with pytest.raises(BadInput, match=key):
            c.split(samples, heldout)
    m = resolve("gmm:tiny", dtype=torch.float64)
    x, cond = c.start([2, 7], m)
    assert cond is None and x.dtype == torch.float64
    assert torch.equal(x, torch.from_numpy(c.get("noise", [2, 7])).double() * 80.0)
    assert torch.allclose(x.float(), torch.from_numpy(c.get("x", [2, 7])[:, 0]))
    ends = c.endpoints([19, 3])
    assert ends.dtype == torch.float64 and torch.equal(ends, torch.from_numpy(c.get("x", [19, 3])[:, -1]).double())
    rows = dict(c.summary())
    assert rows["solver"] == "dpm++3m" and rows["samples"].startswith("20 (seeds 5..24)")
    assert rows["grid"].startswith("logsnr, 16 steps") and rows["shards"] == "3 in use, 0 bad"


# --- one writer at a time: the cache's writer lock --------------------------------------------------------------


def teacher_cmd(recipe):
    return [sys.executable, "-m", "solverdistill", "teacher", str(recipe), "--quiet"]


SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100000"}  # one thread; messages on one line


def test_second_writer_is_refused_while_a_live_process_holds_the_lock(tmp_path, cli):
    rec = write_recipe(tmp_path / "r.yaml", tmp_path / "c", num_samples=8)
    (tmp_path / "c").mkdir()
    lock = tmp_path / "c" / "writer.lock"
    # This test process is the live owner; the teacher below is a real second process.
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": "test"}))
    p = subprocess.run(teacher_cmd(rec), capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("error:") and p.stderr.count("\n") == 1
    assert f"{lock}: the cache is being written by pid {os.getpid()} on this host (test" in p.stderr
    assert lock.is_file() and not list((tmp_path / "c").glob("shard-*"))  # nothing touched, the lock not taken
    # A lock from another host cannot be checked from here: refused too (in-process: the same engine).
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.invalid", "command": "sdistill teacher"}))
    r = cli("teacher", rec, "--quiet")
    assert r.exit_code == 2 and "pid 1 on host elsewhere.invalid" in r.output
    lock.write_text("garbage")
    r = cli("teacher", rec, "--quiet")
    assert r.exit_code == 2 and "a lock file that does not name its owner" in r.output


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, cli):
    rec = write_recipe(tmp_path / "r.yaml", tmp_path / "c", num_samples=8)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    (tmp_path / "c").mkdir()
    lock = tmp_path / "c" / "writer.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "sdistill teacher"}))
    (tmp_path / "c" / "shard-000000.tmp").mkdir()  # what that run left behind
    r = cli("teacher", rec, "--quiet")
    assert r.exit_code == 0 and "8 integrated now" in r.output, r.output
    assert not lock.exists() and not list((tmp_path / "c").glob("*.tmp"))
    # A lock naming this very pid but not held by this process: a killed run whose pid came round again.
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": "old"}))
    assert cli("teacher", rec, "--quiet", "--num", 10).exit_code == 0 and not lock.exists()


def test_two_real_writers_never_corrupt_the_cache(tmp_path, cli):
    """Two `sdistill teacher` processes on one cache, started together: each either finishes (exit 0) or is
    refused with one message naming the lock and the other's pid (exit 2); no traceback, and the cache verifies."""
    rec = write_recipe(tmp_path / "r.yaml", tmp_path / "c", steps=64, num_samples=48, batch=2, shard_size=2)
    procs = [
        subprocess.Popen(
            teacher_cmd(rec), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV
        )
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes and set(codes) <= {0, 2}, (codes, errs)
    for err, code, other in zip(errs, codes, [procs[1].pid, procs[0].pid]):
        assert "Traceback" not in err
        if code == 2:
            assert err.startswith("error:") and err.count("\n") == 1, err
            assert f"writer.lock: the cache is being written by pid {other} on this host" in err
    print("two writers:", codes)
    r = cli("cache", "info", tmp_path / "c", "--verify")
    assert r.exit_code == 0 and "all checksums ok" in r.output
    assert TeacherCache.open(tmp_path / "c").num_samples == 48
    assert not list((tmp_path / "c").glob("*.tmp")) and not (tmp_path / "c" / "writer.lock").exists()


def test_interrupt_releases_the_lock_and_records_only_finished_shards(tmp_path, cli, monkeypatch):
    from solverdistill.teacher import run as run_mod

    rec = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "c"))
    real, calls = run_mod.integrate_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the first batch of the third shard (8 samples per shard, 4 per batch)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(run_mod, "integrate_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_teacher(rec)
    c = tmp_path / "c"
    assert not (c / "writer.lock").exists() and not list(c.glob("*.tmp"))
    assert [s["name"] for s in json.loads((c / "manifest.json").read_text())["shards"]] == [
        "shard-000000",
        "shard-000001",
    ]
    assert cli("cache", "info", c, "--verify").exit_code == 0
    monkeypatch.setattr(run_mod, "integrate_batch", real)
    assert run_teacher(rec).generated == 8


def test_store_every_keeps_a_sub_grid_and_interpolates_across_it(tmp_path):
    full = load_recipe(write_recipe(tmp_path / "a.yaml", tmp_path / "a", steps=62, num_samples=4))
    sub = load_recipe(write_recipe(tmp_path / "b.yaml", tmp_path / "b", steps=62, num_samples=4, store_every=4))
    run_teacher(full)
    run_teacher(sub)
    a, b = TeacherCache.open(tmp_path / "a"), TeacherCache.open(tmp_path / "b")
    keep = [*range(0, 62, 4), 62]  # every 4th point and the last
    assert b.spec["store_every"] == 4 and np.array_equal(b.sigmas, a.sigmas[keep])
    assert np.array_equal(b.get("x", range(4)), a.get("x", range(4))[:, keep])
    assert np.array_equal(b.get("denoised", range(4)), a.get("denoised", range(4))[:, keep])
    # Between stored points the Hermite reader still follows the trajectory (the gaps are the only difference).
    q = a.sigmas[1:62]
    exact, read = a.states_at(range(4), q, dtype=torch.float64), b.states_at(range(4), q, dtype=torch.float64)
    err = (exact - read).flatten(2).norm(dim=2) / exact.flatten(2).norm(dim=2)
    assert 0 < float(err.max()) < 0.05, float(err.max())
    assert "every 4th point" in dict(b.summary())["grid"]
    # Another store_every is another cache (named in the message).
    other = load_recipe(write_recipe(tmp_path / "c.yaml", tmp_path / "a", steps=62, num_samples=4, store_every=2))
    with pytest.raises(BadInput, match="store_every"):
        prepare_teacher(other)


def test_teacher_prints_its_size_and_refuses_a_disk_too_small(tmp_path, cli, monkeypatch):
    import shutil as shutil_mod

    rec = write_recipe(tmp_path / "r.yaml", tmp_path / "c", steps=4, num_samples=6)
    real = shutil_mod.disk_usage
    monkeypatch.setattr(shutil_mod, "disk_usage", lambda p: real(p)._replace(free=1000))
    r = cli("teacher", rec, "--quiet")
    assert r.exit_code == 2 and "needs" in r.output and "1000 bytes" not in r.output and "--force" in r.output
    assert not list((tmp_path / "c").glob("shard-*")) and not (tmp_path / "c" / "writer.lock").exists()
    r = cli("teacher", rec, "--quiet", "--force")
    assert r.exit_code == 0, r.output
    assert "the cache takes" in r.output and "bytes per sample" in r.output
    cache = TeacherCache.open(tmp_path / "c")
    assert f"{cache.disk_bytes() / 6:,.0f} bytes per sample" in r.output  # the estimate is the real size
    r = cli("cache", "info", tmp_path / "c", "--batch", 4)
    assert r.exit_code == 0 and "bytes per sample" in r.output and "samples/s" in r.output
