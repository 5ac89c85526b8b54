"""solverdistill.evaluation: endpoint RMSE/PSNR, accurate endpoints, held-out RMSE on a teacher cache, the
acceleration ratio and pixel Frechet distances."""

import math

import numpy as np
import pytest
import torch

from solverdistill.evaluation import (
    acceleration_ratio,
    cache_endpoints,
    heldout_rmse,
    pixel_fd,
    pixel_stats,
    psnr,
    reference_endpoints,
    rmse,
    sample_errors,
    tail_share,
)
from solverdistill.generate import generate
from solverdistill.models import resolve
from solverdistill.recipes import load_recipe
from solverdistill.solvers import plan
from solverdistill.solvers.singlestep import RK4Reference
from solverdistill.teacher import TeacherCache
from solverdistill.teacher.run import run_teacher


def test_rmse_and_psnr():
    x, ref = torch.zeros(4, 3), torch.full((4, 3), 0.5)
    assert rmse(x, ref) == pytest.approx(0.5) and rmse(ref, ref) == 0.0
    assert rmse(x.float(), ref.double()) == pytest.approx(0.5)  # computed in float64 whatever comes in
    assert psnr(x, ref) == pytest.approx(20 * math.log10(2 / 0.5))
    assert psnr(ref, ref) == pytest.approx(20 * math.log10(2 / 1e-300))  # identical: finite, huge


def test_acceleration_ratio_interpolates_in_log_log():
    curve = {4: 0.4, 8: 0.1, 16: 0.025}
    assert acceleration_ratio(0.1, 4, curve) == pytest.approx(2.0)
    assert acceleration_ratio(0.05, 4, curve) == pytest.approx(math.sqrt(8 * 16) / 4)
    assert acceleration_ratio(0.5, 4, curve) == pytest.approx(1.0)
    assert acceleration_ratio(0.001, 4, curve) == math.inf
    assert acceleration_ratio(0.025, 4, curve) == pytest.approx(4.0)  # reached exactly at the last NFE
    assert acceleration_ratio(0.3, 3, {5: 0.2}) == pytest.approx(5 / 3)  # a one-point curve


def test_reference_endpoints_are_rk4_in_float64():
    ref = reference_endpoints(resolve("gmm:tiny"), [3, 4, 5], steps=16, batch=2)
    assert ref.dtype == torch.float64 and ref.shape == (3, 2, 4, 4)
    m = resolve("gmm:tiny", dtype=torch.float64)
    want = generate(m, RK4Reference(m, 16), [3, 4, 5]).x
    assert torch.allclose(ref, want, atol=1e-12, rtol=0)
    # 256 steps (the default) is far below any solver error a comparison reports.
    fine = reference_endpoints(resolve("gmm:tiny"), [3, 4, 5])
    assert rmse(fine, reference_endpoints(resolve("gmm:tiny"), [3, 4, 5], steps=512)) < 1e-6


@pytest.fixture(scope="module")
def cache(tmp_path_factory, recipe_file):
    root = tmp_path_factory.mktemp("evaluation")
    rec = load_recipe(
        recipe_file(
            root / "r.yaml",
            teacher={"steps": 32, "num_samples": 20, "batch": 20, "cache": str(root / "c"), "compute_dtype": "float64"},
        )
    )
    run_teacher(rec)
    return TeacherCache.open(root / "c")


def test_cache_endpoints_and_heldout_rmse(cache, tiny64):
    idx = np.arange(12, 20)
    p = plan("dpm++3m", 6, tiny64)
    ends = cache_endpoints(p, tiny64, cache, idx, batch=3)  # batched over the indices, in order
    x, _ = cache.start(idx, tiny64)
    with torch.no_grad():
        assert torch.allclose(ends, p.solve(tiny64, x), atol=1e-12, rtol=0)
    assert ends.dtype == torch.float64 and ends.device.type == "cpu"
    assert heldout_rmse(p, tiny64, cache, idx) == pytest.approx(rmse(ends, cache.endpoints(idx)), rel=1e-12)
    # The teacher's own solver at its own steps reproduces its endpoints.
    teacher = plan("dpm++3m", 32, tiny64, schedule="logsnr")
    assert heldout_rmse(teacher, tiny64, cache, idx) < 1e-6 < heldout_rmse(p, tiny64, cache, idx)


def test_sample_errors_and_tail_share(cache, tiny64):
    idx = np.arange(12, 20)
    p = plan("dpm++3m", 3, tiny64)
    errs = sample_errors(p, tiny64, cache, idx)
    ends, ref = cache_endpoints(p, tiny64, cache, idx), cache.endpoints(idx).double()
    assert errs.shape == (8,) and errs.dtype == torch.float64
    assert errs[3].item() == pytest.approx(rmse(ends[3:4], ref[3:4]), rel=1e-12)  # one sample's own RMSE
    # The RMSE over the set is the root mean square of the per-sample errors (equal sizes per sample).
    assert errs.pow(2).mean().sqrt().item() == pytest.approx(heldout_rmse(p, tiny64, cache, idx), rel=1e-12)
    # One sample with all the error carries all of it; equal errors share it by count (at least one sample).
    assert tail_share(torch.tensor([0.0, 0.0, 3.0, 0.0]), 0.25) == pytest.approx(1.0)
    assert tail_share(torch.ones(100), 0.02) == pytest.approx(0.02)
    assert tail_share(torch.ones(10), 0.02) == pytest.approx(0.1)
    assert tail_share(torch.tensor([1.0, 2.0]), 0.5) == pytest.approx(0.8)


def test_pixel_frechet_distance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    mu, cov = pixel_stats(x)
    assert np.allclose(mu, x.mean(0).numpy()) and np.allclose(cov, np.cov(x.numpy().T))
    assert pixel_fd(x, (mu, cov)) == pytest.approx(0.0, abs=1e-8)
    # A shift by d adds |d|^2 (same covariance).
    assert pixel_fd(x + torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), (mu, cov)) == pytest.approx(5.0, rel=1e-8)
    assert pixel_fd(x.reshape(4000, 3, 1, 1), (mu, cov)) == pytest.approx(0.0, abs=1e-8)  # flattened per sample
