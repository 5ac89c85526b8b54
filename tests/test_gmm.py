import pytest
import torch

from solverdistill.errors import BadInput
from solverdistill.models import resolve
from solverdistill.models.gmm import GaussianMixture, parse_params


def dense_denoiser(m: GaussianMixture, x, sigma):
    """Brute force: full covariances, dense inverse and log-determinant."""
    a = {k: torch.as_tensor(v) for k, v in m.arrays.items()}
    k, d = a["means"].shape
    out = []
    for b in range(x.shape[0]):
        xb = x[b].reshape(-1)
        logp, posts = [], []
        for j in range(k):
            cov = a["q"][j] @ torch.diag(a["lam"][j]) @ a["q"][j].T + a["s2"][j] * torch.eye(d, dtype=torch.float64)
            noisy = cov + sigma[b] ** 2 * torch.eye(d, dtype=torch.float64)
            v = xb - a["means"][j]
            chol = torch.linalg.cholesky(noisy)
            sol = torch.cholesky_solve(v[:, None], chol)[:, 0]
            logp.append(a["logw"][j] - 0.5 * (v @ sol + 2 * torch.log(torch.diagonal(chol)).sum()))
            posts.append(a["means"][j] + cov @ sol)
        w = torch.softmax(torch.stack(logp), 0)
        out.append((w[:, None] * torch.stack(posts)).sum(0))
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize("spec", ["gmm:tiny", "gmm:shape=5,components=3,rank=2,seed=4,layout=random", "gmm:ring2d"])
def test_exact_denoiser_matches_dense_computation(spec):
    m = resolve(spec, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for sigma in (0.002, 0.05, 0.7, 5.0, 80.0):
        x0 = m.sample_data(6, g).double()
        x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        s = torch.full((6,), sigma, dtype=torch.float64)
        assert torch.allclose(m(x, s), dense_denoiser(m, x, s), atol=1e-10, rtol=0)


def test_denoiser_tends_to_data_mean_at_large_sigma(tiny64):
    g = torch.Generator().manual_seed(0)
    mean = tiny64.data_mean().reshape(tiny64.shape)
    errs = []
    for sigma in (10.0, 100.0, 1e3, 1e4):
        x = sigma * torch.randn(4, *tiny64.shape, generator=g, dtype=torch.float64)
        errs.append((tiny64(x, torch.full((4,), sigma, dtype=torch.float64)) - mean).abs().max().item())
    assert errs[-1] < 1e-3 and all(b < a for a, b in zip(errs, errs[1:]))


def test_exact_moments_match_sampled_data(tiny64):
    x = tiny64.sample_data(200_000, torch.Generator().manual_seed(3)).reshape(200_000, -1).double()
    assert torch.allclose(x.mean(0), tiny64.data_mean(), atol=0.01)
    assert torch.allclose(torch.cov(x.T), tiny64.data_cov(), atol=0.01)


def test_float32_and_any_shape():
    m32 = resolve("gmm:shape=3x5x7x2,components=3,rank=4,seed=2")
    assert m32.shape == (3, 5, 7, 2)
    x = torch.randn(4, *m32.shape) * 10
    y = m32(x, torch.full((4,), 10.0))
    assert y.dtype == torch.float32 and y.shape == x.shape
    m64 = resolve("gmm:shape=3x5x7x2,components=3,rank=4,seed=2", dtype=torch.float64)
    assert torch.allclose(y.double(), m64(x.double(), torch.full((4,), 10.0, dtype=torch.float64)), atol=1e-4)


def test_small_sigma_returns_nearby_clean_point(tiny64):
    x0 = tiny64.sample_data(5, torch.Generator().manual_seed(0)).double()
    out = tiny64(x0, torch.full((5,), 1e-4, dtype=torch.float64))
    assert (out - x0).abs().max() < 1e-3


def test_presets_and_fingerprints():
    assert resolve("gmm:cifar").shape == (3, 32, 32)
    assert resolve("gmm:ring2d").shape == (2,)
    assert resolve("gmm:tiny").fingerprint == resolve("gmm:tiny").fingerprint
    assert resolve("gmm:tiny").fingerprint != resolve("gmm:tiny,seed=5").fingerprint
    assert parse_params("cifar,seed=4").components == 10


@pytest.mark.parametrize(
    "body, word",
    [
        ("nope", "preset"),
        ("shape=3xq", "shape"),
        ("colour=3", "colour"),
        ("components=0", "components"),
        ("rank=99,shape=2x2", "rank"),
    ],
)
def test_bad_parameters(body, word):
    with pytest.raises(BadInput, match=word):
        resolve("gmm:" + body)
