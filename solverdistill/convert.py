"""`sdistill convert ldm CKPT OUT_DIR`: a CompVis latent-diffusion checkpoint (the LSUN-Bedroom LDM is published
only that way) into a diffusers pipeline folder: UNet2DModel (`model.diffusion_model.*`), VQModel
(`first_stage_model.*`), and a scheduler config with LDM's "linear" betas (diffusers' scaled_linear 0.0015-0.0195).

The architecture is read off the weights' shapes; the attention head width (`num_head_channels`, 32 for the
LDM-4 LSUN config) cannot be, so it is a parameter. The checkpoint is read with `weights_only=True`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import BadInput

UNET, VQ = "model.diffusion_model.", "first_stage_model."


def _attention(src: dict, old: str, new: str, out: dict, heads: int | None = None) -> None:
    """An attention block: GroupNorm + q/k/v/out 1x1 convs -> diffusers' Attention (group_norm, to_q/k/v, to_out.0).
    openaimodel packs q, k, v in one `qkv` conv, head by head ([q_h, k_h, v_h] for each head)."""
    out[f"{new}.group_norm.weight"], out[f"{new}.group_norm.bias"] = src[f"{old}.norm.weight"], src[f"{old}.norm.bias"]
    if f"{old}.qkv.weight" in src:
        w, b = src[f"{old}.qkv.weight"][..., 0], src[f"{old}.qkv.bias"]
        c = w.shape[1]
        w, b = w.reshape(heads, 3, c // heads, c), b.reshape(heads, 3, c // heads)
        for k, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"{new}.{name}.weight"] = w[:, k].reshape(c, c)
            out[f"{new}.{name}.bias"] = b[:, k].reshape(c)
    else:
        for name, target in (("q", "to_q"), ("k", "to_k"), ("v", "to_v")):
            out[f"{new}.{target}.weight"] = src[f"{old}.{name}.weight"].reshape(src[f"{old}.{name}.weight"].shape[:2])
            out[f"{new}.{target}.bias"] = src[f"{old}.{name}.bias"]
    w = src[f"{old}.proj_out.weight"]
    out[f"{new}.to_out.0.weight"], out[f"{new}.to_out.0.bias"] = w.reshape(w.shape[:2]), src[f"{old}.proj_out.bias"]


def _resnet(src: dict, old: str, new: str, out: dict, openai: bool) -> None:
    names = (
        {
            "in_layers.0": "norm1",
            "in_layers.2": "conv1",
            "emb_layers.1": "time_emb_proj",
            "out_layers.0": "norm2",
            "out_layers.3": "conv2",
            "skip_connection": "conv_shortcut",
        }
        if openai
        else {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
    )
    for a, b in names.items():
        for p in ("weight", "bias"):
            if f"{old}.{a}.{p}" in src:
                out[f"{new}.{b}.{p}"] = src[f"{old}.{a}.{p}"]


def unet_from_compvis(src: dict, num_head_channels: int, sample_size: int) -> tuple[dict, dict]:
    inputs = sorted({int(k.split(".")[1]) for k in src if k.startswith("input_blocks.")})
    levels, current = [], []
    for i in inputs[1:]:
        if f"input_blocks.{i}.0.op.weight" in src:
            levels.append((current, i))
            current = []
        else:
            current.append(i)
    levels.append((current, None))
    nrb = len(levels[0][0])
    out, down_types, widths = {}, [], []
    for key, new in (
        ("input_blocks.0.0", "conv_in"),
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
    ):
        out[f"{new}.weight"], out[f"{new}.bias"] = src[f"{key}.weight"], src[f"{key}.bias"]
    for lvl, (blocks, down) in enumerate(levels):
        if len(blocks) != nrb:
            raise BadInput("the UNet's levels have different numbers of residual blocks; not an LDM openaimodel UNet")
        attn = f"input_blocks.{blocks[0]}.1.qkv.weight" in src
        down_types.append("AttnDownBlock2D" if attn else "DownBlock2D")
        widths.append(src[f"input_blocks.{blocks[0]}.0.out_layers.3.weight"].shape[0])
        for j, i in enumerate(blocks):
            _resnet(src, f"input_blocks.{i}.0", f"down_blocks.{lvl}.resnets.{j}", out, True)
            if attn:
                _attention(
                    src,
                    f"input_blocks.{i}.1",
                    f"down_blocks.{lvl}.attentions.{j}",
                    out,
                    widths[-1] // num_head_channels,
                )
        if down is not None:
            for p in ("weight", "bias"):
                out[f"down_blocks.{lvl}.downsamplers.0.conv.{p}"] = src[f"input_blocks.{down}.0.op.{p}"]
    mid_attn = "middle_block.1.qkv.weight" in src
    _resnet(src, "middle_block.0", "mid_block.resnets.0", out, True)
    _resnet(src, f"middle_block.{2 if mid_attn else 1}", "mid_block.resnets.1", out, True)
    if mid_attn:
        _attention(src, "middle_block.1", "mid_block.attentions.0", out, widths[-1] // num_head_channels)
    up_types = []
    for lvl in range(len(widths)):
        width = widths[len(widths) - 1 - lvl]
        attn = down_types[len(widths) - 1 - lvl] == "AttnDownBlock2D"
        up_types.append("AttnUpBlock2D" if attn else "UpBlock2D")
        for j in range(nrb + 1):
            i = lvl * (nrb + 1) + j
            _resnet(src, f"output_blocks.{i}.0", f"up_blocks.{lvl}.resnets.{j}", out, True)
            if attn:
                _attention(
                    src, f"output_blocks.{i}.1", f"up_blocks.{lvl}.attentions.{j}", out, width // num_head_channels
                )
            for k in (1, 2):
                if f"output_blocks.{i}.{k}.conv.weight" in src:
                    for p in ("weight", "bias"):
                        out[f"up_blocks.{lvl}.upsamplers.0.conv.{p}"] = src[f"output_blocks.{i}.{k}.conv.{p}"]
    config = dict(
        sample_size=sample_size,
        in_channels=src["input_blocks.0.0.weight"].shape[1],
        out_channels=src["out.2.weight"].shape[0],
        block_out_channels=tuple(widths),
        layers_per_block=nrb,
        down_block_types=tuple(down_types),
        up_block_types=tuple(up_types),
        add_attention=mid_attn,
        attention_head_dim=num_head_channels,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    return config, out


def vq_from_compvis(src: dict) -> tuple[dict, dict]:
    levels = sorted({int(k.split(".")[2]) for k in src if k.startswith("encoder.down.")})
    nrb = len({k.split(".")[4] for k in src if k.startswith("encoder.down.0.block.")})
    out, widths = {}, []
    for part in ("encoder", "decoder"):
        for a, b in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("norm_out", "conv_norm_out")):
            out[f"{part}.{b}.weight"], out[f"{part}.{b}.bias"] = src[f"{part}.{a}.weight"], src[f"{part}.{a}.bias"]
        _resnet(src, f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", out, False)
        _resnet(src, f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", out, False)
        _attention(src, f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", out)
    for lvl in levels:
        widths.append(src[f"encoder.down.{lvl}.block.0.conv1.weight"].shape[0])
        for j in range(nrb):
            _resnet(src, f"encoder.down.{lvl}.block.{j}", f"encoder.down_blocks.{lvl}.resnets.{j}", out, False)
        for p in ("weight", "bias"):
            if f"encoder.down.{lvl}.downsample.conv.{p}" in src:
                out[f"encoder.down_blocks.{lvl}.downsamplers.0.conv.{p}"] = src[
                    f"encoder.down.{lvl}.downsample.conv.{p}"
                ]
        old = len(levels) - 1 - lvl  # taming lists decoder levels from high to low resolution
        for j in range(nrb + 1):
            _resnet(src, f"decoder.up.{old}.block.{j}", f"decoder.up_blocks.{lvl}.resnets.{j}", out, False)
        for p in ("weight", "bias"):
            if f"decoder.up.{old}.upsample.conv.{p}" in src:
                out[f"decoder.up_blocks.{lvl}.upsamplers.0.conv.{p}"] = src[f"decoder.up.{old}.upsample.conv.{p}"]
    if any(re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k) for k in src):
        raise BadInput(
            "first stage has attention inside its levels; only the VQ-f4 layout (mid-block attention) is supported"
        )
    for k in (
        "quant_conv.weight",
        "quant_conv.bias",
        "post_quant_conv.weight",
        "post_quant_conv.bias",
        "quantize.embedding.weight",
    ):
        out[k] = src[k]
    emb = src["quantize.embedding.weight"]
    config = dict(
        in_channels=src["encoder.conv_in.weight"].shape[1],
        out_channels=src["decoder.conv_out.weight"].shape[0],
        latent_channels=src["quant_conv.weight"].shape[0],
        block_out_channels=tuple(widths),
        layers_per_block=nrb,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        num_vq_embeddings=emb.shape[0],
        vq_embed_dim=emb.shape[1],
    )
    return config, out


SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "prediction_type": "epsilon",
    "clip_sample": False,
}


def convert_ldm(
    ckpt: str, out_dir: str, num_head_channels: int = 32, sample_size: int = 64, norm_num_groups: int = 32
) -> Path:
    try:
        import diffusers
    except Exception:
        raise BadInput("convert ldm: diffusers is not installed; pip install 'solverdistill[diffusers]'") from None
    try:
        data = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(f"{ckpt}: cannot read the checkpoint with weights_only=True ({type(e).__name__}: {e})") from None
    sd = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith(UNET) for k in sd):
        raise BadInput(f"{ckpt}: expected a CompVis LDM checkpoint (state_dict with {UNET}* and {VQ}*)")
    unet_sd = {k[len(UNET) :]: v for k, v in sd.items() if k.startswith(UNET)}
    vq_sd = {k[len(VQ) :]: v for k, v in sd.items() if k.startswith(VQ)}
    try:
        u_cfg, u_w = unet_from_compvis(unet_sd, num_head_channels, sample_size)
        v_cfg, v_w = vq_from_compvis(vq_sd)
    except KeyError as e:
        raise BadInput(f"{ckpt}: missing weight {e} for the LDM layout") from None
    u_cfg["norm_num_groups"] = v_cfg["norm_num_groups"] = norm_num_groups
    unet, vq = diffusers.UNet2DModel(**u_cfg), diffusers.VQModel(**v_cfg)
    for name, model, weights in (("unet", unet, u_w), ("vqvae", vq, v_w)):
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise BadInput(
                f"{ckpt}: the {name} weights do not fit the inferred architecture (missing "
                f"{missing[:3]}, unexpected {unexpected[:3]})"
            )
    out = Path(out_dir)
    unet.save_pretrained(out / "unet")
    vq.save_pretrained(out / "vqvae")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=1))
    (out / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "LDMPipeline",
                "unet": ["diffusers", "UNet2DModel"],
                "vqvae": ["diffusers", "VQModel"],
                "scheduler": ["diffusers", "DDIMScheduler"],
            },
            indent=1,
        )
    )
    return out
