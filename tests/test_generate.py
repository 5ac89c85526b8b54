"""solverdistill.generate: per-seed noise, the batched sampling loop, and NFE counting."""

import pytest
import torch

from solverdistill.errors import BadInput
from solverdistill.generate import CountingDenoiser, Result, generate, initial_noise
from solverdistill.models import resolve
from solverdistill.solvers import plan
from solverdistill.students.dlms import DLMS, DLMSStudent, initial_grid


def test_noise_is_per_seed():
    a = initial_noise([5, 6, 7], (2, 3))
    b = initial_noise([7], (2, 3))
    assert torch.equal(a[2], b[0]) and a.dtype == torch.float32 and a.shape == (3, 2, 3)
    assert not torch.equal(a[0], a[1])
    # Drawn in float32 and cast: float64 noise is the same numbers.
    c = initial_noise([5, 6, 7], (2, 3), dtype=torch.float64)
    assert c.dtype == torch.float64 and torch.equal(c.float(), a)
    assert torch.equal(a[0], torch.randn((2, 3), generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("solver, afs", [("dpm++3m", False), ("heun", True), ("unipc", True)])
def test_samples_do_not_depend_on_batch_size(solver, afs):
    m = resolve("gmm:tiny", dtype=torch.float64)
    p = plan(solver, 5 if afs else 6, m, afs=afs)
    seeds = list(range(100, 164))
    runs = [generate(m, p, seeds, batch=b) for b in (1, 7, 64)]
    # The noise is bitwise the same; the samples agree to rounding (BLAS may sum in another order per batch).
    assert torch.equal(runs[0].z, runs[1].z) and torch.equal(runs[0].z, runs[2].z)
    for r in runs[1:]:
        assert torch.allclose(runs[0].x, r.x, atol=1e-11, rtol=0)


def test_a_seed_gives_the_same_sample_wherever_it_is(tiny64):
    p = plan("dpm++3m", 5, tiny64)
    a = generate(tiny64, p, [3, 4, 5, 6], batch=4)
    b = generate(tiny64, p, [6, 9, 4], batch=2)
    assert isinstance(a, Result) and a.seeds == [3, 4, 5, 6] and a.x.shape == (4, *tiny64.shape)
    assert torch.equal(a.z[3], b.z[0]) and torch.equal(a.z[1], b.z[2])
    assert torch.allclose(a.x[3], b.x[0], atol=1e-12, rtol=0) and torch.allclose(a.x[1], b.x[2], atol=1e-12, rtol=0)
    # The solver starts from sigma_max * z: solving from there by hand gives the same samples.
    with torch.no_grad():
        assert torch.allclose(p.solve(tiny64, a.z.double() * 80.0), a.x, atol=1e-12, rtol=0)


def dlms(afs):
    cfg = DLMSStudent(nfe=4, afs=afs)
    return DLMS(cfg, initial_grid(cfg, 0.002, 80.0)).double()


@pytest.mark.parametrize(
    "make",
    [
        lambda m: plan("euler", 3, m),
        lambda m: plan("heun", 6, m),
        lambda m: plan("dpm2", 5, m, afs=True),
        lambda m: plan("unipc", 4, m, afs=True),
        lambda m: dlms(True),
        lambda m: dlms(False),
    ],
)
def test_measured_nfe_is_the_solvers_nfe(tiny64, make):
    solver = make(tiny64)
    counted = CountingDenoiser(tiny64)
    res = generate(counted, solver, list(range(10)), batch=4)  # 3 batches: 4 + 4 + 2
    assert res.nfe == solver.nfe and res.network_passes == solver.network_passes == solver.nfe
    assert counted.calls == 3 * solver.nfe  # one call per step for the whole batch, three batches


class TwoPass:
    """gmm:tiny as a guided model would count it: two network passes per denoiser call."""

    def __init__(self, m):
        self.m, self.passes_per_call = m, 2

    def __call__(self, x, sigma, cond=None):
        return self.m(x, sigma, cond)

    def __getattr__(self, name):
        return getattr(self.m, name)


def test_network_passes_count_guidance(tiny64):
    model = TwoPass(tiny64)
    p = plan("dpm++2m", 4, model)
    res = generate(model, p, [0, 1])
    assert res.nfe == 4 and res.network_passes == 8 == p.network_passes


def test_callback_progress_and_conditioning(tiny64):
    p = plan("euler", 3, tiny64)
    steps, done, conds = [], [], []

    def spy(x, sigma, cond=None):
        conds.append(cond)
        return tiny64(x, sigma)

    spy.sigma_max, spy.shape, spy.dtype, spy.device = 80.0, tiny64.shape, torch.float64, tiny64.device
    generate(
        spy,
        p,
        [10, 11, 12, 13, 14],
        batch=2,
        cond_for=lambda seeds: torch.tensor(seeds) * 10,
        callback=lambda seeds, step: steps.append((list(seeds), step.i, step.x.shape[0])),
        progress=done.append,
    )
    assert done == [2, 2, 1]
    assert steps == [([10, 11], i, 2) for i in range(3)] + [([12, 13], i, 2) for i in range(3)] + [
        ([14], i, 1) for i in range(3)
    ]
    assert [c.tolist() for c in conds[::3]] == [[100, 110], [120, 130], [140]]  # per-seed conditioning, each batch


def test_draw_cond_is_the_default_conditioning(tiny64):
    seen = []

    class Labelled:
        sigma_max, shape, dtype, device = 80.0, tiny64.shape, torch.float64, tiny64.device

        def draw_cond(self, seeds):
            return torch.tensor([s % 3 for s in seeds])

        def __call__(self, x, sigma, cond=None):
            seen.append(cond.tolist())
            return tiny64(x, sigma)

    generate(Labelled(), plan("euler", 1, tiny64), [4, 5, 6])
    assert seen == [[1, 2, 0]]


def test_bad_batch_and_inconsistent_solvers(tiny64):
    with pytest.raises(BadInput, match="--batch: must be >= 1"):
        generate(tiny64, plan("euler", 2, tiny64), [0], batch=0)

    class Moody:
        """A solver that makes a different number of calls on each batch: the NFE would be a lie."""

        nfe, afs, network_passes, calls = 1, False, 1, 0

        def solve(self, model, x, cond=None, callback=None):
            self.calls += 1
            for _ in range(self.calls):
                model(x, torch.ones(x.shape[0], dtype=x.dtype))
            return x

    with pytest.raises(RuntimeError, match="different number of calls"):
        generate(tiny64, Moody(), [0, 1, 2], batch=1)


def test_counting_denoiser_forwards_and_shares_its_counter(tiny64):
    c = CountingDenoiser(tiny64)
    assert c.sigma_max == 80.0 and c.shape == tiny64.shape and c.fingerprint == tiny64.fingerprint
    x, s = torch.zeros(2, *tiny64.shape, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    assert torch.equal(c(x, s), tiny64(x, s)) and c.calls == 1
    other = c.with_model(lambda x, s, cond=None: x)
    other(x, s)
    other(x, s)
    assert c.calls == 3 and other.calls == 3  # a student's own network counts on the caller's counter
