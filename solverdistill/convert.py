"""`sdistill convert ldm CKPT OUT_DIR`: a CompVis latent-diffusion checkpoint (the LSUN-Bedroom LDM is published
only that way) into a diffusers pipeline folder: UNet2DModel (`model.diffusion_model.*`), VQModel
(`first_stage_model.*`), and a scheduler config with LDM's "linear" betas (diffusers' scaled_linear 0.0015-0.0195).

The architecture is read off the weights' shapes. The attention head width (`num_head_channels`, 32 for the
LDM-4 LSUN config) cannot be: it is read from the model config the checkpoint or a `config.yaml` beside it
carries, else taken from --num-head-channels (32 by default), and the value used is reported. CompVis samples with
the EMA weights (`model_ema.*`, stored with the dots of their names removed): they are converted when present.
The checkpoint is read with `weights_only=True`; the one class pytorch-lightning 1.4 (the version latent-diffusion
pins) stores, `ModelCheckpoint` as a key of `callbacks`, is allowed as an inert placeholder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import BadInput

UNET, VQ, EMA = "model.diffusion_model.", "first_stage_model.", "model_ema."
LIGHTNING_CLASSES = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)


class LightningPlaceholder:
    """Stands for a pytorch-lightning class a checkpoint names (never instantiated: it is only a dict key)."""


def read_checkpoint(ckpt: str) -> Any:
    """torch.load with weights_only=True, pytorch-lightning's callback classes allowed as placeholders."""
    allowed = [(LightningPlaceholder, name) for name in LIGHTNING_CLASSES]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(f"{ckpt}: cannot read the checkpoint with weights_only=True ({type(e).__name__}: {e})") from None


def ema_key(key: str) -> str:
    """Where LitEma keeps the EMA copy of `model.<name>`: `model_ema.<name without dots>`."""
    return EMA + key[len("model.") :].replace(".", "")


def unet_weights(sd: dict) -> tuple[dict, str]:
    """The UNet's weights: the EMA copy when the checkpoint holds one for every weight, else the raw ones."""
    raw = [k for k in sd if k.startswith(UNET)]
    if raw and all(ema_key(k) in sd for k in raw):
        return {k[len(UNET) :]: sd[ema_key(k)] for k in raw}, "EMA weights (model_ema.*, what CompVis samples with)"
    has_ema = any(k.startswith(EMA) for k in sd)
    note = "raw weights (model.diffusion_model.*)" + (
        "; the checkpoint's model_ema.* does not cover every UNet weight, so it was not used" if has_ema else ""
    )
    return {k[len(UNET) :]: sd[k] for k in raw}, note


def head_channels_from_config(ckpt: str, data: Any) -> tuple[dict, str] | None:
    """The UNet's `params` from the model config in the checkpoint (`hyper_parameters`) or a config.yaml beside it."""
    found = []
    if isinstance(data, dict) and isinstance(data.get("hyper_parameters"), dict):
        found.append((data["hyper_parameters"], f"{ckpt}: hyper_parameters"))
    beside = Path(ckpt).with_name("config.yaml")
    if beside.is_file():
        try:
            doc = yaml.safe_load(beside.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise BadInput(f"{beside}: cannot read the model config ({e})") from None
        found.append(((doc or {}).get("model", {}).get("params", {}) if isinstance(doc, dict) else {}, str(beside)))
    for params, where in found:
        unet = params.get("unet_config", {}) if isinstance(params, dict) else {}
        unet = unet.get("params") if isinstance(unet, dict) else None
        if isinstance(unet, dict) and ("num_head_channels" in unet or "num_heads" in unet):
            return unet, f"{where} (unet_config.params)"
    return None


def head_width(widths: list[int], unet_params: dict | None, given: int | None, where: str) -> tuple[int, str]:
    """The attention head width to convert with, and a line saying where it came from. A config's `num_heads`
    (with num_head_channels -1) fixes the head count instead: one width only if every attention level agrees."""
    if unet_params is not None:
        nhc = int(unet_params.get("num_head_channels", -1))
        if nhc == -1:
            heads = int(unet_params.get("num_heads", -1))
            per = {w // heads for w in widths if heads > 0 and w % heads == 0}
            if heads <= 0 or len(per) != 1 or any(w % heads for w in widths):
                raise BadInput(
                    f"{where}: num_heads {heads} over attention widths {widths} gives no single head width; "
                    "diffusers' UNet2DModel takes one"
                )
            value, source = per.pop(), f"num_heads {heads} in {where}"
        else:
            value, source = nhc, f"num_head_channels in {where}"
        if given is not None and given != value:
            source += f"; --num-head-channels {given} ignored"
    else:
        value = 32 if given is None else given
        source = "--num-head-channels" if given is not None else "the default (no model config found)"
    bad = [w for w in widths if value <= 0 or w % value]
    if bad:
        raise BadInput(
            f"--num-head-channels: {value} (from {source}) does not divide the attention widths {bad} of this "
            f"UNet (attention widths: {widths}); pass a divisor of each"
        )
    return value, f"attention head width {value} (from {source})"


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
        # CompVis decodes VQ-f4 latents unscaled; diffusers' LDMPipeline divides by this key, and its default is
        # the KL autoencoders' 0.18215 (diffusers issue #6725), so write 1.0 and both decode the same images.
        scaling_factor=1.0,
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


def attention_widths(unet_sd: dict) -> list[int]:
    """The channel widths of the UNet's attention blocks (each `qkv` conv has 3 x width outputs)."""
    return sorted({int(v.shape[1]) for k, v in unet_sd.items() if k.endswith(".qkv.weight")})


def convert_ldm(
    ckpt: str,
    out_dir: str,
    num_head_channels: int | None = None,
    sample_size: int = 64,
    norm_num_groups: int = 32,
) -> tuple[Path, list[str]]:
    """Convert; returns the folder and what was chosen (which weights, which head width and where from)."""
    try:
        import diffusers
    except Exception:
        raise BadInput("convert ldm: diffusers is not installed; pip install 'solverdistill[diffusers]'") from None
    data = read_checkpoint(ckpt)
    sd = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith(UNET) for k in sd):
        raise BadInput(f"{ckpt}: expected a CompVis LDM checkpoint (state_dict with {UNET}* and {VQ}*)")
    unet_sd, weights_note = unet_weights(sd)
    vq_sd = {k[len(VQ) :]: v for k, v in sd.items() if k.startswith(VQ)}
    config = head_channels_from_config(ckpt, data)
    params, where = config if config is not None else (None, "")
    heads, heads_note = head_width(attention_widths(unet_sd), params, num_head_channels, where)
    try:
        u_cfg, u_w = unet_from_compvis(unet_sd, heads, sample_size)
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
    return out, [f"UNet: {weights_note}", heads_note]
