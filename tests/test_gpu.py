"""The CUDA path, checked against the CPU: run with `pytest -m gpu` on a machine with a GPU; skipped elsewhere."""

import json

import numpy as np
import pytest
import torch

from solverdistill.generate import generate
from solverdistill.models import resolve
from solverdistill.recipes import load_recipe
from solverdistill.solvers import plan
from solverdistill.students.dlms import DLMS, DLMSStudent, initial_grid
from solverdistill.teacher import TeacherCache
from solverdistill.teacher.run import run_teacher

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("solver, nfe, afs", [("dpm++3m", 8, False), ("heun", 7, True), ("unipc", 6, True)])
def test_gmm_on_cuda_matches_cpu(solver, nfe, afs):
    cpu, gpu = resolve("gmm:tiny", dtype=torch.float64), resolve("gmm:tiny", device="cuda", dtype=torch.float64)
    a = generate(cpu, plan(solver, nfe, cpu, afs=afs), list(range(16)))
    b = generate(gpu, plan(solver, nfe, gpu, afs=afs), list(range(16)))
    assert b.x.device.type == "cpu" and torch.equal(a.z, b.z)  # the same per-seed noise on both devices
    assert a.nfe == b.nfe == nfe
    assert torch.allclose(a.x, b.x, atol=1e-8, rtol=0)


def test_dlms_per_sample_rule_on_cuda_matches_cpu():
    cfg = DLMSStudent(nfe=5, afs=True)
    student = DLMS(cfg, initial_grid(cfg, 0.002, 80.0)).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.designer.head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    cpu, gpu = resolve("gmm:tiny", dtype=torch.float64), resolve("gmm:tiny", device="cuda", dtype=torch.float64)
    grids = {}
    for name, model, s in (("cpu", cpu, student), ("cuda", gpu, DLMS(cfg, student.init_grid).double().cuda())):
        if name == "cuda":
            s.load_state_dict(student.state_dict())
        seen = []
        res = generate(model, s, list(range(12)), batch=5, callback=lambda seeds, step, seen=seen: seen.append(step))
        assert all(st.sigma.device.type == name and st.sigma.dtype == torch.float64 for st in seen)
        grids[name] = (
            res.x,
            torch.cat([torch.stack([st.sigma.cpu() for st in seen[k : k + 6]], 1) for k in range(0, len(seen), 6)]),
        )
    assert torch.allclose(grids["cpu"][0], grids["cuda"][0], atol=1e-6, rtol=0)
    assert torch.allclose(grids["cpu"][1], grids["cuda"][1], rtol=1e-9, atol=0)  # the same learned times per sample


@pytest.fixture
def full_fp32(monkeypatch):
    """No TF32 on CUDA for this test: float32 convolutions and matmuls as exact as the CPU's."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def test_toy_network_on_cuda_matches_cpu(full_fp32):
    cpu, gpu = resolve("toy:unet-gmm"), resolve("toy:unet-gmm", device="cuda")
    p = plan("euler", 4, cpu, afs=True)
    a, b = generate(cpu, p, list(range(6))).x, generate(gpu, p, list(range(6))).x
    assert a.abs().max() > 0.1 and torch.allclose(a, b, atol=2e-3, rtol=0), (a - b).abs().max()


def test_teacher_cache_on_cuda_matches_cpu(tmp_path, recipe_file):
    caches = {}
    for device in ("cpu", "cuda"):
        rec = load_recipe(
            recipe_file(
                tmp_path / f"{device}.yaml",
                teacher={
                    "steps": 16,
                    "num_samples": 12,
                    "batch": 5,
                    "shard_size": 8,
                    "cache": str(tmp_path / device),
                    "device": device,
                    "compute_dtype": "float64",
                },
            )
        )
        run_teacher(rec)
        caches[device] = TeacherCache.open(tmp_path / device)
    idx = np.arange(12)
    for key in ("noise", "seeds"):
        assert np.array_equal(caches["cpu"].get(key, idx), caches["cuda"].get(key, idx))
    for key in ("x", "denoised"):  # float32 storage of float64 runs
        assert np.allclose(caches["cpu"].get(key, idx), caches["cuda"].get(key, idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_diffusers_on_cuda_matches_cpu(tmp_path, tiny_unet, ddpm_scheduler, full_fp32, precision):
    tiny_unet().save_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(ddpm_scheduler()))
    cpu = resolve(f"diffusers:{tmp_path}")
    gpu = resolve(f"diffusers:{tmp_path}", device="cuda").set_precision(precision)
    x, s = torch.randn(4, 3, 16, 16) * 5, torch.full((4,), 5.0)
    with torch.no_grad():
        want = cpu(x, s)
        got = gpu(x.cuda(), s.cuda())
    assert got.dtype == torch.float32  # mixed precision inside, the state's dtype outside
    # Reduced precision: errors relative to the output's scale (bf16 keeps 8 bits of mantissa, fp16 11).
    error = ((got.cpu() - want).abs().max() / want.abs().max()).item()
    assert error < {"fp32": 1e-5, "fp16": 1e-2, "bf16": 3e-2}[precision], error
