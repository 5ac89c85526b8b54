"""solverdistill.bench: the side-by-side measurements (on a fake clock: what is checked is what gets timed and how
the medians and ratios are formed, not this machine's speed) and the Markdown report."""

import itertools
import types

import pytest
import torch

from solverdistill import bench
from solverdistill.generate import CountingDenoiser
from solverdistill.models import resolve
from solverdistill.solvers import plan


def fake_clock(monkeypatch, durations):
    """perf_counter() for bench: consecutive (start, end) reads are `durations` apart, 10 s between pairs."""
    reads = itertools.chain.from_iterable((10.0 * k, 10.0 * k + d) for k, d in enumerate(durations))
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(reads)))


def test_sampling_overhead_times_the_same_calls_side_by_side(monkeypatch):
    m = CountingDenoiser(resolve("gmm:tiny"))
    # repeats of (full run, bare calls): full 3, 6, 2 s; bare 1, 2, 2 s
    fake_clock(monkeypatch, [3.0, 1.0, 6.0, 2.0, 2.0, 2.0])
    r = bench.sampling_overhead(m, plan("dpm++", 5, m), 5, batch=8, batches=2, repeats=3)
    assert r == {"full_s": 3.0, "bare_s": 2.0, "ratio": 3.0}  # medians, and the median of per-repeat ratios
    # Each repeat: a sampling run over 2 batches at NFE 5, then the same 2 x 5 bare denoiser calls.
    assert m.calls == 3 * (2 * 5 + 2 * 5)


def test_teacher_overhead_compares_writing_with_not(monkeypatch, tmp_path):
    work = tmp_path / "bench"
    work.mkdir()
    monkeypatch.setattr(bench.tempfile, "mkdtemp", lambda: str(work))
    fake_clock(monkeypatch, [2.0, 3.0, 4.0, 5.0])  # (no_write, write) per repeat
    t = bench.teacher_overhead("gmm:tiny", num=8, steps=8, repeats=2)
    assert t == {
        "model": "gmm:tiny",
        "samples": 8,
        "steps": 8,
        "median_s": {"no_write": 3.0, "write": 4.0},
        "ratio": pytest.approx(4 / 3),
    }
    assert not work.exists()  # the scratch cache is removed


def test_fid_throughput_skips_without_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SDISTILL_INCEPTION", raising=False)
    r = bench.fid_throughput(None, torch.device("cpu"), batch=4)
    assert set(r) == {"skipped"} and "inception-2015-12-05.pt" in r["skipped"]


def test_render():
    over = {"full_s": 1.5, "bare_s": 1.0, "ratio": 1.5}
    t = {"model": "gmm:tiny", "samples": 8, "steps": 8, "median_s": {"write": 2.0, "no_write": 1.0}, "ratio": 2.0}
    report = {
        "version": "x",
        "model": "gmm:tiny",
        "machine": {"platform": "p", "cpus": 2, "torch": torch.__version__, "threads": 1, "device": "cpu"},
        "settings": {"heldout_seeds": 4, "teacher": "t"},
        "quality": {
            "handcrafted": {"euler": {3: 0.5}, "heun+afs": {3: 0.25, 5: 0.125}},
            "best_by_nfe": {3: 0.25, 5: 0.125},
            "students": [
                {
                    "artifact": "out/a.npz",
                    "method": "dode",
                    "nfe": 3,
                    "rmse": 0.2,
                    "acceleration": 1.5,
                    "distill_seconds": 2.0,
                    "teacher_nfe_per_sample": 129,
                    "teacher_samples": 512,
                }
            ],
        },
        "sampling_overhead_nfe5": {"batch": 8, "by_solver": {"dpm++3m": over}},
        "teacher_write_overhead": t,
        "fid_feature_throughput": {"skipped": "no weights"},
    }
    text = bench.render(report)
    assert "| euler | 0.5000 | - |" in text and "| heun+afs | 0.2500 | 0.1250 |" in text
    assert "| out/a.npz | dode | 3 | 0.2000 | 1.50x | 2.0 | 129 x 512 |" in text
    assert "| dpm++3m | 1.500 | 1.000 | 1.500 |" in text
    assert "Teacher cache write overhead: 2.000" in text and "FID features: skipped" in text
