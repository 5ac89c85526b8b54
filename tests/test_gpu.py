"""The CUDA path: run with `pytest -m gpu` on a machine with a GPU; skipped elsewhere."""

import pytest
import torch

from solverdistill.models import resolve
from solverdistill.sampling import generate, plan

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_gmm_on_cuda_matches_cpu():
    cpu, gpu = resolve("gmm:tiny", dtype=torch.float64), resolve("gmm:tiny", device="cuda", dtype=torch.float64)
    p = plan("dpm++3m", 8, cpu.sigma_min, cpu.sigma_max)
    a = generate(cpu, lambda m, x, c, cb: p.solve(m, x, c, cb), list(range(16))).x
    b = generate(gpu, lambda m, x, c, cb: p.solve(m, x, c, cb), list(range(16))).x
    assert torch.allclose(a, b, atol=1e-8)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_diffusers_mixed_precision_channels_last(tmp_path, precision):
    diffusers = pytest.importorskip("diffusers")
    from test_diffusers_backend import SCHED, tiny_unet
    import json
    tiny_unet().save_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SCHED))
    ref = resolve(f"diffusers:{tmp_path}", device="cuda")
    low = resolve(f"diffusers:{tmp_path}", device="cuda").set_precision(precision)
    x, s = torch.randn(4, 3, 16, 16, device="cuda") * 5, torch.full((4,), 5.0, device="cuda")
    with torch.no_grad():
        assert torch.allclose(ref(x, s), low(x, s), atol=5e-2, rtol=5e-2)
    assert diffusers is not None
