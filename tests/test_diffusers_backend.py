"""The diffusers backend on a tiny random UNet built from a config (no downloads)."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

diffusers = pytest.importorskip("diffusers")  # the optional extra; `make test` installs it

from solverdistill.cli import app  # noqa: E402
from solverdistill.models import resolve  # noqa: E402
from solverdistill.sampling import plan  # noqa: E402

SCHED = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
         "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon"}


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                 layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddpm")
    tiny_unet().save_pretrained(root)
    (root / "scheduler_config.json").write_text(json.dumps(SCHED))
    return root


def test_euler_matches_diffusers_euler_discrete_with_karras_sigmas(model_dir):
    d = resolve(f"diffusers:{model_dir}")
    assert d.shape == (3, 16, 16)
    assert d.sigma_min == pytest.approx(0.0100, abs=1e-4) and d.sigma_max == pytest.approx(157.4, rel=1e-3)
    n = 8
    sched = diffusers.EulerDiscreteScheduler.from_config(SCHED, use_karras_sigmas=True, final_sigmas_type="sigma_min",
                                                         timestep_spacing="linspace")
    sched.set_timesteps(n)
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    x = z * sched.sigmas[0]
    with torch.no_grad():
        for t in sched.timesteps:
            eps = d.net(sched.scale_model_input(x, t), t).sample
            x = sched.step(eps, t, x).prev_sample
        # diffusers takes n steps on Karras sigmas and a last, empty step from sigma_min to sigma_min:
        ours = plan("euler", n - 1, d.sigma_min, d.sigma_max, "polynomial:7").solve(d, z * d.sigma_max)
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()


def test_prediction_types_and_pipeline_layout(tmp_path):
    unet = tiny_unet()
    for kind in ("v_prediction", "sample"):
        root = tmp_path / kind
        unet.save_pretrained(root / "unet")
        (root / "scheduler").mkdir(parents=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SCHED, "prediction_type": kind}))
        (root / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                            "unet": ["diffusers", "UNet2DModel"]}))
        d = resolve(f"diffusers:{root}")
        x, s = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 5.0])
        with torch.no_grad():
            out = unet(x / torch.sqrt(s[:, None, None, None] ** 2 + 1), d.t_of(s).float()).sample
            got = d(x, s)
        s4 = s[:, None, None, None]
        want = x / (s4**2 + 1) - s4 / torch.sqrt(s4**2 + 1) * out if kind == "v_prediction" else out
        assert torch.allclose(got, want, atol=1e-5)


def test_teacher_dode_sample_end_to_end(model_dir, tmp_path):
    (tmp_path / "r.yaml").write_text(f"""name: d
model: {{spec: "diffusers:{model_dir}"}}
teacher: {{steps: 12, num_samples: 12, batch: 6, cache: '{tmp_path / "cache"}'}}
student: {{method: dode, nfe: 3, base: dpm++3m}}
train: {{samples: 6, heldout: 4}}
output: '{tmp_path / "dode.yaml"}'
""")
    runner = CliRunner()
    for args in (["teacher", tmp_path / "r.yaml", "--quiet"], ["distill", tmp_path / "r.yaml", "--quiet"],
                 ["sample", "--solver", tmp_path / "dode.yaml", "--num", 2, "--out", tmp_path / "s", "--quiet"]):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["x"].shape == (2, 3, 16, 16) and np.isfinite(f["x"]).all()


def test_missing_folder_and_files(tmp_path):
    from solverdistill.errors import BadInput
    with pytest.raises(BadInput, match="no such folder"):
        resolve(f"diffusers:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="missing"):
        resolve(f"diffusers:{tmp_path / 'empty'}")
