import torch

from solverdistill.models import resolve
from solverdistill.models.toy import WEIGHTS


def test_shipped_toy_network_is_small_safe_and_denoises():
    assert WEIGHTS.suffix == ".safetensors" and WEIGHTS.stat().st_size < 10 * 2**20
    toy, gmm = resolve("toy:unet-gmm"), resolve("gmm:cifar")
    assert 300_000 < sum(p.numel() for p in toy.net.parameters()) < 2_000_000
    g = torch.Generator().manual_seed(0)
    x0 = gmm.sample_data(32, g).float()
    for sigma in (0.05, 0.5, 2.0):
        x = x0 + sigma * torch.randn(x0.shape, generator=g)
        s = torch.full((32,), sigma)
        with torch.no_grad():
            err = (toy(x, s) - gmm(x, s)).pow(2).mean().sqrt()
            trivial = (x / (1 + sigma**2) - gmm(x, s)).pow(2).mean().sqrt()  # the AFS-style guess
        assert err < 0.5 * trivial, (sigma, err, trivial)
    assert toy.last_features.shape == (32, 64)
    with torch.no_grad():
        plain = toy(x, s)
        toy.step_condition = 3  # SFD-v's input: a zero-initialised embedding, so the shipped network ignores it
        assert torch.allclose(toy(x, s), plain, atol=1e-6)
