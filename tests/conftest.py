import pytest
import torch

from solverdistill.models import resolve

# Tiny models: one thread is faster than two fighting over small ops (and pytest -n 2 uses both cores).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny64():
    """gmm:tiny in float64 on the CPU."""
    return resolve("gmm:tiny", dtype=torch.float64)


def noise(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.shape, generator=g, dtype=torch.float64) * model.sigma_max
