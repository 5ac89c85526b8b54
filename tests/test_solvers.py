import math

import numpy as np
import pytest
import torch

from solverdistill import grids, solvers
from solverdistill.errors import BadInput
from solverdistill.reference import rk4_logsigma
from solverdistill.sampling import CountingDenoiser, plan
from solverdistill.solvers.multistep import deis_table, dpmpp_table, euler_table, sample_multistep

from conftest import noise

NFES = [24, 32, 48, 64, 96]


@pytest.fixture(scope="module")
def reference(tiny64):
    x0 = noise(tiny64, 8)
    return x0, rk4_logsigma(tiny64, x0, tiny64.sigma_max, tiny64.sigma_min, steps=2048)


def rmse(a, b):
    return (a - b).pow(2).mean().sqrt().item()


def test_reference_is_far_more_accurate_than_what_it_measures(tiny64, reference):
    x0, ref = reference
    e1 = rmse(rk4_logsigma(tiny64, x0, 80.0, 0.002, steps=512), ref)
    e2 = rmse(rk4_logsigma(tiny64, x0, 80.0, 0.002, steps=1024), ref)
    # Fourth order: doubling the steps divides the error by ~16 (less the reference's own, tiny, error).
    assert 10 < e1 / e2 < 20
    assert e2 < 1e-9


def slope(model, x0, ref, name, **options):
    errs = []
    for nfe in NFES:
        p = plan(name, nfe, model.sigma_min, model.sigma_max, **options)
        errs.append(rmse(p.solve(model, x0), ref))
    return -np.polyfit(np.log(NFES), np.log(errs), 1)[0], errs


@pytest.mark.parametrize("name, lo, hi", [
    ("euler", 0.85, 1.3),
    ("heun", 1.7, 2.7), ("dpm2", 1.7, 2.7), ("dpm++2m", 1.7, 2.7), ("ipndm", 1.7, 2.7),
    ("unipc", 2.8, 6.0), ("deis", 2.5, 4.0),
    # Measures ~2.4, not 3: the published DPM-Solver++(3M) update weighs its second difference D2 by half its
    # Taylor coefficient (-phi3 * D2 with D2 ~ h^2 m''/2 where h^2 m'' is needed), so it is formally second
    # order with a small constant. We keep the published formula (it is what users compare against); the
    # tests below check it beats the second-order group and that the exact coefficient gives order 3.
    ("dpm++3m", 2.1, 3.5),
])
def test_convergence_order(tiny64, reference, name, lo, hi):
    s, errs = slope(tiny64, *reference, name)
    assert lo <= s <= hi, (name, s, errs)


def test_third_order_solvers_beat_second_order_at_equal_nfe(tiny64, reference):
    _, e2m = slope(tiny64, *reference, "dpm++2m")
    for name in ("dpm++3m", "unipc", "deis"):
        _, e = slope(tiny64, *reference, name)
        assert all(a < b for a, b in zip(e[2:], e2m[2:])), (name, e, e2m)


def test_exact_third_order_taylor_coefficient_gives_slope_three(tiny64, reference):
    """Doubling D2's weight in the 3M update (the exact Taylor coefficient) restores third order; this pins
    down the explanation above, so the published formula is kept knowingly."""
    x0, ref = reference
    errs = []
    for n in (64, 128, 256):
        sig = grids.logsnr(n, 0.002, 80.0)
        t = dpmpp_table(sig, 3, lower_order_final=False)
        lam = -np.log(sig.numpy())
        for i in range(2, n):
            h = lam[i + 1] - lam[i]
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            phi3 = (math.expm1(-h) / h + 1) / h - 0.5
            d2 = (np.array([1.0, -1.0, 0.0]) / r0 - np.array([0.0, 1.0, -1.0]) / r1) / (r0 + r1)
            t.b[i] -= phi3 * d2
        errs.append(rmse(sample_multistep(tiny64, x0, sig, t), ref))
    assert math.log2(errs[1] / errs[2]) > 2.8, errs


# --- the same numbers as plain loops written from the formulas (algorithms.md section 3) -------------------

def D(model, x, s):
    return model(x, torch.full((x.shape[0],), s, dtype=x.dtype))


def loop_euler(model, x, s):
    for i in range(len(s) - 1):
        x = x + (s[i + 1] - s[i]) * (x - D(model, x, s[i])) / s[i]
    return x


def loop_heun(model, x, s):
    for i in range(len(s) - 1):
        d = (x - D(model, x, s[i])) / s[i]
        xe = x + (s[i + 1] - s[i]) * d
        d2 = (xe - D(model, xe, s[i + 1])) / s[i + 1]
        x = x + (s[i + 1] - s[i]) * (d + d2) / 2
    return x


def loop_dpm2(model, x, s):
    for i in range(len(s) - 1):
        d = (x - D(model, x, s[i])) / s[i]
        sm = math.exp((math.log(s[i]) + math.log(s[i + 1])) / 2)
        xm = x + (sm - s[i]) * d
        x = x + (s[i + 1] - s[i]) * (xm - D(model, xm, sm)) / sm
    return x


def loop_dpmpp_2m(model, x, s):
    """k-diffusion's sample_dpmpp_2m on a grid ending at sigma_min (second order on the last step too)."""
    old = None
    for i in range(len(s) - 1):
        den = D(model, x, s[i])
        t, t_next = -math.log(s[i]), -math.log(s[i + 1])
        h = t_next - t
        if old is None:
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * den
        else:
            r = (t - (-math.log(s[i - 1]))) / h
            dd = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * dd
        old = den
    return x


@pytest.mark.parametrize("name, loop, options", [
    ("euler", loop_euler, {}), ("heun", loop_heun, {}), ("dpm2", loop_dpm2, {}),
    ("dpm++2m", loop_dpmpp_2m, {"lower_order_final": False}),
])
@pytest.mark.parametrize("schedule", ["polynomial", "logsnr", "time_uniform:2"])
def test_matches_plain_loop(tiny64, name, loop, options, schedule):
    x0 = noise(tiny64, 5, seed=3)
    p = plan(name, 8, tiny64.sigma_min, tiny64.sigma_max, schedule, **options)
    got = p.solve(tiny64, x0)
    want = loop(tiny64, x0, p.sigmas.tolist())
    assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_lower_order_final_changes_only_the_last_steps(tiny64):
    sig = grids.logsnr(6, 0.002, 80.0)
    on = solvers.get("dpm++3m").make_table(sig, lower_order_final=True)
    off = solvers.get("dpm++3m").make_table(sig, lower_order_final=False)
    assert np.allclose(on.b[:4], off.b[:4])
    assert np.count_nonzero(on.b[5]) == 1 and np.count_nonzero(off.b[5]) == 3


def test_deis_first_order_is_euler_and_coefficients_sum_to_step():
    sig = grids.time_uniform(7, 0.002, 80.0, 2.0)
    t = deis_table(sig)
    assert np.allclose(t.c.sum(1), np.diff(sig.numpy()), rtol=1e-12, atol=1e-12)
    assert np.allclose(t.c[0, 0], euler_table(sig).c[0, 0], rtol=1e-14)


# --- NFE accounting, AFS, errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(solvers.SOLVERS))
@pytest.mark.parametrize("afs", [False, True])
def test_nfe_is_the_number_of_real_calls(tiny64, name, afs):
    info = solvers.get(name)
    nfe = (5 if afs else 6) if info.calls_per_step == 2 else 5
    p = plan(name, nfe, tiny64.sigma_min, tiny64.sigma_max, afs=afs)
    counter = CountingDenoiser(tiny64)
    x = p.solve(counter, noise(tiny64, 3))
    assert counter.calls == nfe and torch.isfinite(x).all()
    assert p.steps == (nfe + afs) // info.calls_per_step


def test_afs_replaces_only_the_first_call(tiny64):
    x0 = noise(tiny64, 4)
    calls = []

    def spy(x, sigma, cond=None):
        calls.append(float(sigma[0]))
        return tiny64(x, sigma, cond)

    p = plan("dpm++2m", 4, 0.002, 80.0, afs=True)
    p.solve(spy, x0)
    assert 80.0 not in calls and len(calls) == 4
    # AFS's D is x - sigma * x / sqrt(1 + sigma^2): at 80 that is ~ x / 80 / ... tiny data estimate
    got = []
    p.solve(tiny64, x0, callback=lambda info: got.append(info["denoised"]))
    assert torch.allclose(got[0], x0 - 80 * x0 / math.sqrt(1 + 80**2))


@pytest.mark.parametrize("name", ["heun", "dpm2"])
def test_two_call_solvers_reject_impossible_nfe(name):
    with pytest.raises(BadInput, match="odd one with --afs"):
        plan(name, 5, 0.002, 80.0)
    with pytest.raises(BadInput, match="even NFE without --afs"):
        plan(name, 6, 0.002, 80.0, afs=True)


def test_callback_sees_every_step(tiny64):
    seen = []
    p = plan("unipc", 6, 0.002, 80.0)
    p.solve(tiny64, noise(tiny64, 2), callback=lambda info: seen.append((info["i"], info["sigma"])))
    assert [i for i, _ in seen] == list(range(6)) and seen[0][1] == 80.0


def test_unknown_solver_and_aliases():
    assert solvers.get("ddim").name == "euler" and solvers.get("dpm++").name == "dpm++3m"
    with pytest.raises(BadInput, match="unknown solver"):
        solvers.get("rk45")


def test_acceleration_ratio_interpolates_in_log_log():
    from solverdistill.evaluate import acceleration_ratio
    curve = {4: 0.4, 8: 0.1, 16: 0.025}
    assert acceleration_ratio(0.1, 4, curve) == pytest.approx(2.0)
    assert acceleration_ratio(0.05, 4, curve) == pytest.approx(math.sqrt(8 * 16) / 4)
    assert acceleration_ratio(0.5, 4, curve) == pytest.approx(1.0)
    assert acceleration_ratio(0.001, 4, curve) == math.inf
