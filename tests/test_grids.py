"""solverdistill.grids: strictly decreasing float64 sigmas from sigma_max to sigma_min, and schedule strings."""

import math

import pytest
import torch

from solverdistill import grids
from solverdistill.errors import BadInput

SCHEDULES = ["polynomial", "polynomial:3", "polynomial:7", "logsnr", "time_uniform", "time_uniform:2"]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 7, 64])
@pytest.mark.parametrize("lo, hi", [(0.002, 80.0), (0.0292, 14.61), (0.01, 157.4)])
def test_schedules_are_strictly_decreasing_with_exact_ends(schedule, steps, lo, hi):
    g = grids.make_grid(schedule, steps, lo, hi)
    assert g.dtype == torch.float64 and g.shape == (steps + 1,)
    assert g[0].item() == hi and g[-1].item() == lo  # pinned, not merely close
    assert (g[1:] < g[:-1]).all()


def test_polynomial_is_uniform_in_sigma_to_the_one_over_rho():
    g = grids.polynomial(8, 0.002, 80.0, rho=7.0)
    r = g ** (1 / 7)
    assert torch.allclose(r[1:] - r[:-1], torch.full((8,), (r[1] - r[0]).item(), dtype=torch.float64), rtol=1e-10)
    assert torch.equal(grids.make_grid("polynomial", 8, 0.002, 80.0), g)  # rho 7 is the default


def test_logsnr_is_uniform_in_log_sigma():
    g = grids.logsnr(10, 0.002, 80.0)
    step = math.log(0.002 / 80.0) / 10
    assert torch.allclose(torch.diff(torch.log(g)), torch.full((10,), step, dtype=torch.float64), rtol=1e-10)


def test_time_uniform_is_uniform_in_vp_time():
    vp = grids.VPTime(0.002, 80.0)
    assert vp.sigma(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(80.0, rel=1e-10)
    assert vp.sigma(torch.tensor(grids.TAU_MIN, dtype=torch.float64)).item() == pytest.approx(0.002, rel=1e-8)
    g = grids.time_uniform(6, 0.002, 80.0)
    tau = vp.tau(g)
    assert torch.allclose(torch.diff(tau), torch.full((6,), (grids.TAU_MIN - 1) / 6, dtype=torch.float64), atol=1e-9)
    # sigma(tau(s)) round-trips, and dsigma/dtau matches a finite difference
    s = torch.tensor([0.01, 1.0, 30.0], dtype=torch.float64)
    assert torch.allclose(vp.sigma(vp.tau(s)), s, rtol=1e-10)
    t, h = torch.tensor([0.3], dtype=torch.float64), 1e-6
    fd = (vp.sigma(t + h) - vp.sigma(t - h)) / (2 * h)
    assert torch.allclose(vp.dsigma_dtau(t), fd, rtol=1e-6)


def test_explicit_lists():
    assert grids.parse_schedule("80, 10, 1, 0.002") == [80.0, 10.0, 1.0, 0.002]
    g = grids.make_grid("80,10,1,0.002", 3, 0.5, 1.0)  # an explicit grid is used as given, whatever the range
    assert g.dtype == torch.float64 and g.tolist() == [80.0, 10.0, 1.0, 0.002]
    with pytest.raises(BadInput, match="need 5 sigmas, the explicit grid has 4"):
        grids.make_grid("80,10,1,0.002", 4, 0.002, 80.0)


def test_parsed_specs():
    assert grids.parse_schedule(" logsnr ") == ("logsnr", None)
    assert grids.parse_schedule("polynomial:3.5") == ("polynomial", 3.5)
    assert grids.parse_schedule("time_uniform:2") == ("time_uniform", 2.0)
    assert torch.equal(grids.make_grid(("logsnr", None), 4, 0.002, 80.0), grids.logsnr(4, 0.002, 80.0))


@pytest.mark.parametrize(
    "text, message",
    [
        ("cosine", "unknown schedule 'cosine'"),
        ("polynomial:-1", "rho must be > 0"),
        ("polynomial:0", "rho must be > 0"),
        ("polynomial:inf", "rho must be > 0"),
        ("polynomial:x", "rho must be a number"),
        ("logsnr:2", "logsnr takes no parameter"),
        ("80,1,2", "strictly decreasing"),
        ("80,80,1", "strictly decreasing"),
        ("80,a,1", "numbers separated by commas"),
        ("80,", "at least 2 sigmas"),
        ("80,0", "finite number > 0"),
        ("80,-1", "finite number > 0"),
        ("80,nan", "finite number > 0"),
    ],
)
def test_bad_schedule_strings_are_bad_input(text, message):
    with pytest.raises(BadInput, match=message) as e:
        grids.make_grid(text, 2, 0.002, 80.0)
    assert str(e.value).startswith("--schedule")


def test_a_grid_needs_a_step():
    with pytest.raises(BadInput, match="at least 1 step"):
        grids.make_grid("logsnr", 0, 0.002, 80.0)
