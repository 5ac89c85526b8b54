"""The diffusers backend on tiny random models built from configs (no downloads)."""

import json

import numpy as np
import pytest
import torch

from solverdistill.errors import BadInput
from solverdistill.models import resolve
from solverdistill.solvers import plan
from solverdistill.teacher import TeacherCache

diffusers = pytest.importorskip("diffusers")  # the optional extra; `make test` installs it


def test_euler_matches_diffusers_euler_discrete_with_karras_sigmas(ddpm_dir, ddpm_scheduler):
    d = resolve(f"diffusers:{ddpm_dir}")
    assert d.shape == (3, 16, 16)
    assert d.sigma_min == pytest.approx(0.0100, abs=1e-4) and d.sigma_max == pytest.approx(157.4, rel=1e-3)
    n = 8
    sched = diffusers.EulerDiscreteScheduler.from_config(
        ddpm_scheduler(), use_karras_sigmas=True, final_sigmas_type="sigma_min", timestep_spacing="linspace"
    )
    sched.set_timesteps(n)
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    x = z * sched.sigmas[0]
    with torch.no_grad():
        for t in sched.timesteps:
            eps = d.net(sched.scale_model_input(x, t), t).sample
            x = sched.step(eps, t, x).prev_sample
        # diffusers takes n steps on Karras sigmas and a last, empty step from sigma_min to sigma_min:
        ours = plan("euler", n - 1, d, "polynomial:7").solve(d, z * d.sigma_max)
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()


def test_prediction_types_and_pipeline_layout(tmp_path, tiny_unet, ddpm_scheduler):
    unet = tiny_unet()
    for kind in ("v_prediction", "sample"):
        root = tmp_path / kind
        unet.save_pretrained(root / "unet")
        (root / "scheduler").mkdir(parents=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(ddpm_scheduler(prediction_type=kind)))
        (root / "model_index.json").write_text(
            json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]})
        )
        d = resolve(f"diffusers:{root}")
        x, s = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 5.0])
        with torch.no_grad():
            out = unet(x / torch.sqrt(s[:, None, None, None] ** 2 + 1), d.t_of(s).float()).sample
            got = d(x, s)
        s4 = s[:, None, None, None]
        want = x / (s4**2 + 1) - s4 / torch.sqrt(s4**2 + 1) * out if kind == "v_prediction" else out
        assert torch.allclose(got, want, atol=1e-5)


def test_teacher_dode_sample_end_to_end(ddpm_dir, tmp_path, teacher_dode_sample):
    path = teacher_dode_sample(
        tmp_path, f"diffusers:{ddpm_dir}", steps=12, num_samples=12, batch=6, samples=6, heldout=4, base="dpm++3m"
    )
    with np.load(path) as f:
        assert f["x"].shape == (2, 3, 16, 16) and np.isfinite(f["x"]).all()


def test_model_folder_with_a_model_index_beside_it(tmp_path, tiny_unet, ddpm_scheduler):
    """google/ddpm-cifar10-32's layout: config.json, weights and scheduler_config.json at the root, and a
    model_index.json beside them naming the parts."""
    unet = tiny_unet()
    unet.save_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(ddpm_scheduler()))
    (tmp_path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "scheduler": ["diffusers", "DDPMScheduler"],
                "unet": ["diffusers", "UNet2DModel"],
            }
        )
    )
    d = resolve(f"diffusers:{tmp_path}")
    x, s = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 5.0])
    with torch.no_grad():
        eps = unet(x / torch.sqrt(s[:, None, None, None] ** 2 + 1), d.t_of(s).float()).sample
        assert torch.allclose(d(x, s), x - s[:, None, None, None] * eps, atol=1e-5)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(BadInput, match="no such folder"):
        resolve(f"diffusers:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="missing"):
        resolve(f"diffusers:{tmp_path / 'empty'}")


def build_sd(root, scheduler):
    """A tiny Stable Diffusion folder: UNet2DConditionModel, AutoencoderKL, CLIP text encoder and tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).save_pretrained(root / "unet")
    diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
    ).save_pretrained(root / "vae")
    CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=1000,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).save_pretrained(root / "text_encoder")
    (root / "tok").mkdir()
    (root / "tok" / "vocab.json").write_text(
        json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3, "dog</w>": 4, "photo</w>": 5})
    )
    (root / "tok" / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(
        str(root / "tok" / "vocab.json"), str(root / "tok" / "merges.txt"), pad_token="<|endoftext|>"
    ).save_pretrained(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    )
    (root / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "StableDiffusionPipeline", "unet": [], "vae": [], "text_encoder": [], "tokenizer": []}
        )
    )


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory, ddpm_scheduler):
    root = tmp_path_factory.mktemp("sd")
    build_sd(root, ddpm_scheduler)
    return root


def test_guidance_doubles_passes_and_one_is_the_conditional_model(sd_dir, tmp_path, cli):
    d = resolve(f"diffusers:{sd_dir}?prompt=a photo&guidance=1")
    assert d.passes_per_call == 1 and d.sigma_min == pytest.approx(0.0292, abs=1e-3)
    assert d.sigma_max == pytest.approx(14.61, rel=1e-2)
    x, s = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 3.0])
    cond = d.draw_cond([0, 1])
    with torch.no_grad():
        emb = d.text_encoder(
            d.tokenizer(
                ["a photo"] * 2, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids
        )[0]
        eps = d.net(
            x / torch.sqrt(s[:, None, None, None] ** 2 + 1), d.t_of(s).float(), encoder_hidden_states=emb
        ).sample
        assert torch.allclose(d(x, s, cond), x - s[:, None, None, None] * eps, atol=1e-5)
    r = cli(
        "sample",
        "--model",
        f"diffusers:{sd_dir}",
        "--prompt",
        "a cat",
        "--guidance",
        7.5,
        "--solver",
        "euler",
        "--nfe",
        3,
        "--num",
        2,
        "--out",
        tmp_path,
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "samples.npz") as f:
        meta = json.loads(str(f["meta"][()]))
        assert meta["nfe"] == 3 and meta["network_passes"] == 6
        assert f["x"].shape == (2, 4, 8, 8) and f["images"].shape == (2, 3, 16, 16)


def test_sd_teacher_stores_prompt_indices(sd_dir, tmp_path, cli, teacher_dode_sample):
    (tmp_path / "caps.txt").write_text("a cat\na dog\na photo\n")
    teacher_dode_sample(
        tmp_path,
        f"diffusers:{sd_dir}?prompts={tmp_path / 'caps.txt'}&guidance=2",
        steps=6,
        num_samples=8,
        batch=4,
        samples=4,
        heldout=3,
    )
    assert TeacherCache.open(tmp_path / "cache").cond(np.arange(8)).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    r = cli("sample", "--model", f"diffusers:{sd_dir}", "--out", tmp_path / "x", "--quiet")
    assert r.exit_code == 2 and "--prompt" in r.output


def test_latent_vq_decodes_with_scale_one(tmp_path, ldm_dir):
    _, vq = ldm_dir(tmp_path)
    d = resolve(f"diffusers:{tmp_path}")
    assert d.latent_scale == 1.0 and d.sigma_max == pytest.approx(83.8, rel=1e-2)
    assert d.sigma_min == pytest.approx(0.0388, rel=1e-2)
    z = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(d.decode(z), vq.decode(z).sample, atol=1e-5)
