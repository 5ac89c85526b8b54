"""`sdistill convert ldm`: a tiny model written in the CompVis key layout converts back to the same network."""

import copy
import re
import sys
import types

import numpy as np
import pytest
import torch

from solverdistill.models import resolve

diffusers = pytest.importorskip("diffusers")


def compvis_unet(sd, nrb, levels, heads):
    """diffusers UNet2DModel weights -> openaimodel names (written from the original layout, not from our map)."""
    out = {}
    res = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    }

    def put_res(new, old):
        for a, b in res.items():
            for p in ("weight", "bias"):
                if f"{new}.{a}.{p}" in sd:
                    out[f"{old}.{b}.{p}"] = sd[f"{new}.{a}.{p}"]

    def put_attn(new, old, h):
        out[f"{old}.norm.weight"], out[f"{old}.norm.bias"] = (
            sd[f"{new}.group_norm.weight"],
            sd[f"{new}.group_norm.bias"],
        )
        q, k, v = (sd[f"{new}.{n}.weight"] for n in ("to_q", "to_k", "to_v"))
        c = q.shape[0]
        w = torch.stack([q.reshape(h, c // h, c), k.reshape(h, c // h, c), v.reshape(h, c // h, c)], 1)
        out[f"{old}.qkv.weight"] = w.reshape(3 * c, c)[..., None]
        bq, bk, bv = (sd[f"{new}.{n}.bias"] for n in ("to_q", "to_k", "to_v"))
        out[f"{old}.qkv.bias"] = torch.stack([bq.reshape(h, -1), bk.reshape(h, -1), bv.reshape(h, -1)], 1).reshape(-1)
        out[f"{old}.proj_out.weight"] = sd[f"{new}.to_out.0.weight"][..., None]
        out[f"{old}.proj_out.bias"] = sd[f"{new}.to_out.0.bias"]

    for a, b in (
        ("conv_in", "input_blocks.0.0"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ):
        out[f"{b}.weight"], out[f"{b}.bias"] = sd[f"{a}.weight"], sd[f"{a}.bias"]
    i = 1
    for lvl in range(levels):
        for j in range(nrb):
            put_res(f"down_blocks.{lvl}.resnets.{j}", f"input_blocks.{i}.0")
            if f"down_blocks.{lvl}.attentions.{j}.to_q.weight" in sd:
                put_attn(f"down_blocks.{lvl}.attentions.{j}", f"input_blocks.{i}.1", heads[lvl])
            i += 1
        if lvl < levels - 1:
            out[f"input_blocks.{i}.0.op.weight"] = sd[f"down_blocks.{lvl}.downsamplers.0.conv.weight"]
            out[f"input_blocks.{i}.0.op.bias"] = sd[f"down_blocks.{lvl}.downsamplers.0.conv.bias"]
            i += 1
    put_res("mid_block.resnets.0", "middle_block.0")
    put_attn("mid_block.attentions.0", "middle_block.1", heads[-1])
    put_res("mid_block.resnets.1", "middle_block.2")
    for lvl in range(levels):
        for j in range(nrb + 1):
            i = lvl * (nrb + 1) + j
            put_res(f"up_blocks.{lvl}.resnets.{j}", f"output_blocks.{i}.0")
            has_attn = f"up_blocks.{lvl}.attentions.{j}.to_q.weight" in sd
            if has_attn:
                put_attn(f"up_blocks.{lvl}.attentions.{j}", f"output_blocks.{i}.1", heads[levels - 1 - lvl])
            if j == nrb and lvl < levels - 1:
                k = 2 if has_attn else 1
                out[f"output_blocks.{i}.{k}.conv.weight"] = sd[f"up_blocks.{lvl}.upsamplers.0.conv.weight"]
                out[f"output_blocks.{i}.{k}.conv.bias"] = sd[f"up_blocks.{lvl}.upsamplers.0.conv.bias"]
    return out


def compvis_vq(sd, levels):
    """diffusers VQModel weights -> taming names."""
    out = {}
    for k, v in sd.items():
        new = k
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", r"encoder.down.\1.downsample.conv", new)
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
            lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}",
            new,
        )
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv",
            lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.conv",
            new,
        )
        new = new.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        new = new.replace("mid_block.attentions.0.group_norm", "mid.attn_1.norm")
        for a, b in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            new = new.replace(f"mid_block.attentions.0.{a}", f"mid.attn_1.{b}")
        new = new.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new and new.endswith("weight") and v.ndim == 2:
            v = v[..., None, None]
        out[new] = v
    return out


def compvis_checkpoint():
    """A tiny UNet and VQ model and their weights in CompVis' layout: (unet, vq, state_dict)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=2,
        norm_num_groups=8,
        attention_head_dim=8,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    vq = diffusers.VQModel(
        in_channels=3,
        out_channels=3,
        latent_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        num_vq_embeddings=32,
    )
    sd = {f"model.diffusion_model.{k}": v for k, v in compvis_unet(unet.state_dict(), 2, 2, heads=(2, 4)).items()}
    sd.update({f"first_stage_model.{k}": v for k, v in compvis_vq(vq.state_dict(), 2).items()})
    return unet, vq, sd


CONVERT_SMALL = ("--sample-size", 8, "--norm-groups", 8)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, cli):
    """The tiny models written as a CompVis checkpoint and converted back by `sdistill convert ldm`:
    (unet, vq, output folder)."""
    root = tmp_path_factory.mktemp("convert")
    unet, vq, sd = compvis_checkpoint()
    torch.save({"state_dict": sd, "global_step": 1}, root / "model.ckpt")
    r = cli("convert", "ldm", root / "model.ckpt", root / "out", "--num-head-channels", 8, *CONVERT_SMALL)
    assert r.exit_code == 0, r.output
    assert "raw weights" in r.output and "head width 8 (from --num-head-channels)" in r.output
    return unet, vq, root / "out"


def test_convert_round_trip(converted):
    unet, vq, out = converted
    u2 = diffusers.UNet2DModel.from_pretrained(out / "unet")
    v2 = diffusers.VQModel.from_pretrained(out / "vqvae")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        assert torch.allclose(u2(x, t).sample, unet(x, t).sample, atol=1e-5)
        assert torch.allclose(v2.decode(x).sample, vq.decode(x).sample, atol=1e-5)
    d = resolve(f"diffusers:{out}")
    assert d.latent_scale == 1.0 and d.sigma_max == pytest.approx(83.8, rel=1e-2)
    # diffusers' LDMPipeline divides the latents by this before decoding: 1.0 keeps its images CompVis's
    assert v2.config.scaling_factor == 1.0


def test_convert_rejects_other_files(tmp_path, cli):
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, tmp_path / "x.ckpt")
    r = cli("convert", "ldm", tmp_path / "x.ckpt", tmp_path / "o")
    assert r.exit_code == 2 and "CompVis" in r.output and not (tmp_path / "o" / "unet").exists()


def test_converted_ldm_end_to_end(converted, tmp_path, teacher_dode_sample):
    _, _, out = converted
    path = teacher_dode_sample(tmp_path, f"diffusers:{out}", steps=8, num_samples=8, batch=4, samples=4, heldout=3)
    with np.load(path) as f:
        assert f["x"].shape == (2, 3, 8, 8) and f["images"].shape == (2, 3, 16, 16)
        assert np.isfinite(f["images"]).all()


def unet_out(folder, x, t):
    with torch.no_grad():
        return diffusers.UNet2DModel.from_pretrained(folder / "unet")(x, t).sample


def test_ema_weights_are_converted_when_present(tmp_path, cli):
    """CompVis samples with model_ema.* (names without dots): those are the weights to convert."""
    unet, _, sd = compvis_checkpoint()
    ema_unet = copy.deepcopy(unet)
    with torch.no_grad():
        for p in ema_unet.parameters():
            p.mul_(0.9).add_(0.01)
    ema = compvis_unet(ema_unet.state_dict(), 2, 2, heads=(2, 4))
    sd.update({"model_ema." + f"diffusion_model.{k}".replace(".", ""): v for k, v in ema.items()})
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(10)
    torch.save({"state_dict": sd}, tmp_path / "model.ckpt")
    r = cli("convert", "ldm", tmp_path / "model.ckpt", tmp_path / "out", "--num-head-channels", 8, *CONVERT_SMALL)
    assert r.exit_code == 0, r.output
    assert "EMA weights" in r.output
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        want, raw = ema_unet(x, t).sample, unet(x, t).sample
    got = unet_out(tmp_path / "out", x, t)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, raw, atol=1e-3)


def test_lightning_1_4_checkpoint_loads_with_weights_only(tmp_path, cli, monkeypatch):
    """pytorch-lightning 1.4 keys `callbacks` by the ModelCheckpoint class; weights_only refuses unknown classes,
    so it is allow-listed as an inert placeholder (pytorch-lightning itself is not needed to read it)."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    _, _, sd = compvis_checkpoint()
    torch.save({"state_dict": sd, "callbacks": {ModelCheckpoint: {"best_model_score": None}}}, tmp_path / "m.ckpt")
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(Exception, match="weights_only|GLOBAL|ModelCheckpoint"):
        torch.load(tmp_path / "m.ckpt", weights_only=True)  # what the converter met before
    r = cli("convert", "ldm", tmp_path / "m.ckpt", tmp_path / "out", "--num-head-channels", 8, *CONVERT_SMALL)
    assert r.exit_code == 0, r.output


def test_head_width_that_does_not_divide_is_exit_2_with_the_widths(tmp_path, cli):
    _, _, sd = compvis_checkpoint()
    torch.save({"state_dict": sd}, tmp_path / "m.ckpt")
    r = cli("convert", "ldm", tmp_path / "m.ckpt", tmp_path / "out", "--num-head-channels", 12, *CONVERT_SMALL)
    assert r.exit_code == 2 and "--num-head-channels" in r.output and "[32]" in r.output, r.output
    assert not (tmp_path / "out" / "unet").exists()


def test_head_width_is_read_from_config_yaml_beside_the_checkpoint(tmp_path, cli):
    """16 divides every width but is the wrong head width (a different network): the config's value wins."""
    unet, _, sd = compvis_checkpoint()
    torch.save({"state_dict": sd}, tmp_path / "model.ckpt")
    (tmp_path / "config.yaml").write_text(
        "model:\n  params:\n    unet_config:\n      params:\n        num_head_channels: 8\n"
    )
    r = cli("convert", "ldm", tmp_path / "model.ckpt", tmp_path / "out", "--num-head-channels", 16, *CONVERT_SMALL)
    assert r.exit_code == 0, r.output
    assert "head width 8" in r.output and "config.yaml" in r.output and "16 ignored" in r.output
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        assert torch.allclose(unet_out(tmp_path / "out", x, t), unet(x, t).sample, atol=1e-5)
