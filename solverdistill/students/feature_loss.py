"""DLMS's final-step feature distance (docs/students.md "DLMS"): the feature network of the model's FD, with gradients."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..errors import BadInput
from ..fid import DIGIT_MODELS, INCEPTION_FILE, inception_path

FeatureNet = Callable[[torch.Tensor], torch.Tensor]


def feature_network(model: Any, inception: str | None = None) -> FeatureNet:
    """[-1, 1] samples of `model` -> [B, D] features that backpropagate to the samples: the digit classifier's
    penultimate layer for toy:unet-digits, Inception-v3 pool features for RGB images of 32 px and more (when the
    weights file is present). Latent models and models without a feature network are refused, naming the key."""
    spec, shape = str(getattr(model, "spec", "")), tuple(getattr(model, "shape", ()))
    device = getattr(model, "device", torch.device("cpu"))
    if spec.partition("?")[0] in DIGIT_MODELS:
        from ..digits import load_classifier

        net = load_classifier()
        if torch.device(device) != torch.device("cpu"):
            net = copy.deepcopy(net).to(device)  # the shared instance stays on the CPU
        return lambda x: net(x.to(torch.float32))[0]
    if hasattr(model, "decode"):
        # The paper keeps a latent model's final step in latent L2: decoding for Inception would cost a VAE pass.
        raise BadInput(
            f"train.final_loss: features: {spec} is a latent model, whose final step is measured in latent L2 as in "
            "the DLMS paper; use final_loss: l2"
        )
    if len(shape) == 3 and shape[0] == 3 and min(shape[1:]) >= 32:
        try:
            path = inception_path(inception)
        except BadInput as e:
            raise BadInput(f"train.final_loss: features on {spec} needs the Inception-v3 weights: {e}") from None
        return inception_network(path, device)
    raise BadInput(
        f"train.final_loss: features: {spec} ({'x'.join(map(str, shape))} samples) has no feature network (Inception "
        "needs RGB images of 32 px or more; the digit features need toy:unet-digits); use final_loss: l2"
    )


def inception_network(path: Any, device: Any) -> FeatureNet:
    """The TorchScript Inception of fid.InceptionFeatures (legacy_tensorflow), fed [0, 255] floats instead of uint8
    so gradients reach the samples; checked once that they do."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            net = torch.jit.load(str(path), map_location=device).eval()
        except Exception as e:
            raise BadInput(
                f"train.final_loss: {path} is not a loadable TorchScript file ({type(e).__name__})"
            ) from None
    for p in net.parameters():  # ScriptModules have no requires_grad_
        p.requires_grad_(False)

    def features(x: torch.Tensor) -> torch.Tensor:
        f = net((x.to(torch.float32).clamp(-1, 1) + 1) * 127.5, return_features=True)
        return f.reshape(f.shape[0], -1)

    probe = torch.zeros(1, 3, 32, 32, device=device, requires_grad=True)
    try:
        features(probe).sum().backward()
    except RuntimeError as e:
        raise BadInput(
            f"train.final_loss: features: {INCEPTION_FILE} does not backpropagate to its input ({e})"
        ) from None
    if probe.grad is None or not bool(torch.isfinite(probe.grad).all()):
        raise BadInput(f"train.final_loss: features: {INCEPTION_FILE} gives no gradient with respect to its input")
    return features
