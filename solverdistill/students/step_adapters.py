"""Per-NFE low-rank adapters: SFD-v's step condition carried by weights (docs/students.md "SFD and SFD-v")."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import BadInput

NAME = "step_adapters"  # the submodule's name in the network, so its weights are saved as net.step_adapters.*


def adaptable(m: nn.Module) -> bool:
    """Layers an adapter pair can sit beside: ungrouped 2-D convolutions and linear layers."""
    return (isinstance(m, nn.Conv2d) and m.groups == 1) or isinstance(m, nn.Linear)


def targets(net: nn.Module) -> list[str]:
    """The layers that get adapters: the network's own choice (`step_adapter_targets()`, names of Conv2d or Linear
    modules), else every ungrouped 2-D convolution, else (a network without any, e.g. a transformer or an MLP)
    every linear layer."""
    chosen = getattr(net, "step_adapter_targets", None)
    names = list(chosen()) if callable(chosen) else None
    if names is None:
        names = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1] or linear_layers(net)
    for n in names:
        if not adaptable(net.get_submodule(n)):
            raise BadInput(f"student.adapters: {n} is not an ungrouped Conv2d or a Linear layer of the network")
    if not names:
        raise BadInput("student.adapters: the network has no 2-D convolution or linear layer to adapt")
    return names


def linear_layers(net: nn.Module) -> list[str]:
    """Every linear layer but attention's output projection, whose weight F.multi_head_attention_forward reads
    without calling the module: a hook on it would never run."""
    inside = {
        f"{n}.{c}" if n else c
        for n, m in net.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for c, _ in m.named_children()
    }
    return [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and n not in inside]


def pair(layer: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    """(A, B) for one layer: A reads the layer's input as the layer does (a convolution's kernel, stride, padding
    and padding mode) down to `rank` channels, B maps back to the layer's output, zero at the start."""
    if isinstance(layer, nn.Linear):
        down, up = nn.Linear(layer.in_features, rank, bias=False), nn.Linear(rank, layer.out_features, bias=False)
    else:
        down = nn.Conv2d(
            layer.in_channels,
            rank,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            bias=False,
            padding_mode=layer.padding_mode,
        )
        up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
    nn.init.zeros_(up.weight)
    w = layer.weight
    return down.to(w.device, w.dtype), up.to(w.device, w.dtype)


class StepAdapters(nn.Module):
    """At NFE n each adapted layer `f(x)` (a convolution or a linear layer) becomes `f(x) + B_n(A_n(x))`: A_n reads
    x as f does, down to `rank` channels (a convolution of the same kernel, stride and padding; a linear map),
    B_n maps back (a 1x1 convolution; a linear map) and starts at zero, so the untrained student is the original
    network. Only the active NFE's pair runs (`active`; None: none)."""

    def __init__(self, net: nn.Module, nfes: Iterable[int], rank: int) -> None:
        super().__init__()
        self.nfes, self.active = sorted(set(nfes)), None
        self.names = targets(net)
        self.down, self.up = nn.ModuleDict(), nn.ModuleDict()
        for name in self.names:
            for n in self.nfes:
                self.down[self.key(name, n)], self.up[self.key(name, n)] = pair(net.get_submodule(name), rank)

    @staticmethod
    def key(name: str, nfe: int) -> str:
        return f"{name.replace('.', '__')}@{nfe}"  # ModuleDict keys may not hold dots

    def correct(self, name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """The forward hook on layer `name`: its output plus the active NFE's low-rank term."""
        if self.active is None:
            return output
        k = self.key(name, int(self.active))
        return output + self.up[k](self.down[k](inputs[0]))


def attach(net: nn.Module, nfes: Iterable[int], rank: int) -> StepAdapters:
    """Add adapters to `net` (a submodule, so optimisers, DDP, EMA copies and state_dict see them) and hook them on.
    The hooks are partials of the adapters' bound method, so a deepcopy of `net` hooks onto its own copy."""
    if hasattr(net, NAME):
        raise BadInput("student.adapters: the network already carries step adapters")
    adapters = StepAdapters(net, nfes, rank)
    for name in adapters.names:
        net.get_submodule(name).register_forward_hook(functools.partial(adapters.correct, name))
    net.add_module(NAME, adapters)
    return adapters


def stored_nfes(names: Iterable[str]) -> set[int]:
    """The NFEs that saved adapter weights (the network's state_dict names) have pairs for, read from the names
    alone (`StepAdapters.key`: `layer@nfe`): a file's claim is checked against them before anything is built."""
    return {int(m.group(1)) for n in names if n.startswith(f"{NAME}.") and (m := re.search(r"@(\d+)\.", n))}


def check(net: Any, nfe: int | None) -> StepAdapters | None:
    """The network's adapters (None without), refusing an NFE they have no pair for."""
    adapters = getattr(net, NAME, None)
    if not isinstance(adapters, StepAdapters):
        return None
    if nfe is not None and nfe not in adapters.nfes:
        raise BadInput(f"this SFD-v student has adapters for NFE {adapters.nfes}; got NFE {nfe}")
    return adapters


def select(net: Any, nfe: int | None) -> None:
    """Make `nfe`'s adapters the active ones (None: none); a network without adapters is left as it is."""
    adapters = check(net, nfe)
    if adapters is not None:
        adapters.active = nfe
