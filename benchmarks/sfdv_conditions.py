"""SFD-v with other step conditions on the toy network: an ablation of where the number of steps enters the network.

The built-in `toy:unet-*` networks add the step embedding to the noise embedding after its MLP, so in every block
it is one bias per channel (docs/students.md "SFD and SFD-v"). This script patches the network class for one run,
then runs `sfd_table.py` with the remaining arguments (SFD-v rows; pass `--skip sfd`):

- `--condition mlp`: the embedding joins before the MLP's nonlinearity (where EDM's networks add labels), so it can
  act differently at each noise level;
- `--condition film`: besides, a per-NFE scale on every residual block's features (zero at the start).

Every added parameter starts at zero effect, so the untrained student is the shipped network. The patch lives here,
not in the package: neither closed the gap it was run for (README "Results"). What did, per-NFE adapters, is the
package's `student.adapters` (`sfd_table.py --adapters R`).

Usage: python benchmarks/sfdv_conditions.py --condition mlp|film RECIPE OUT.md --skip sfd ...
"""

import argparse
import runpy
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from solverdistill.models import toy

ap = argparse.ArgumentParser(add_help=False)
ap.add_argument("--condition", required=True, choices=("mlp", "film"))
args, rest = ap.parse_known_args()
BLOCKS = ("d1", "d2", "mid1", "mid2", "u2", "u1")
plain_init, plain_load, plain_forward = toy.ToyUNet.__init__, toy.ToyUNet.load_state_dict, toy.ToyUNet.forward


def block_forward(self: toy.ResBlock, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """ResBlock.forward with the active NFE's scale (`self.nfe`; None: the plain block)."""
    n = getattr(self, "nfe", None)
    h = self.c1(F.silu(self.n1(x))) + self.emb(e)[:, :, None, None]
    if n is not None and args.condition == "film":
        h = h * (1 + self.scale.weight[n][None, :, None, None])
    return self.skip(x) + self.c2(F.silu(self.n2(h)))


def init(self: toy.ToyUNet, *a, **k) -> None:
    plain_init(self, *a, **k)
    steps = self.step_embed.num_embeddings
    for name in BLOCKS:
        block = getattr(self, name)
        if args.condition == "film":
            block.scale = nn.Embedding(steps, block.c1.out_channels)
            nn.init.zeros_(block.scale.weight)


def load(self: toy.ToyUNet, state: dict, strict: bool = True, **kw):
    """The shipped weights lack the added parameters: they keep their zero-effect start."""
    return plain_load(self, {**self.state_dict(), **state}, strict=strict, **kw)


def forward(self: toy.ToyUNet, x, c_noise, step=None, label=None):
    for name in BLOCKS:
        getattr(self, name).nfe = None if step is None else int(step[0])
    if args.condition != "mlp" or step is None:
        return plain_forward(self, x, c_noise, step, label)
    # plain_forward with the step embedding moved before the MLP's nonlinearity
    mlp, self.t_mlp = self.t_mlp, nn.Sequential(self.t_mlp[0], StepBefore(self.step_embed, step), *self.t_mlp[1:])
    try:
        return plain_forward(self, x, c_noise, None, label)
    finally:
        self.t_mlp = mlp


class StepBefore(nn.Module):
    """The step embedding added between the noise MLP's first layer and its nonlinearity (`--condition mlp`)."""

    def __init__(self, embed: nn.Embedding, step: torch.Tensor) -> None:
        super().__init__()
        self.embed, self.step = embed, step

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.embed(self.step)


def conditioned(self: toy.ToyUNet):
    """The step-condition parameters (`train.step_lr_scale` applies to them): the embedding and what is added."""
    yield from self.step_embed.parameters()
    for name in BLOCKS:
        for key, p in getattr(self, name).named_parameters():
            if key.startswith("scale"):
                yield p


toy.ResBlock.forward = block_forward
toy.ToyUNet.__init__, toy.ToyUNet.load_state_dict, toy.ToyUNet.forward = init, load, forward
toy.ToyUNet.step_condition_parameters = conditioned
sys.argv = [str(Path(__file__).with_name("sfd_table.py"))] + rest
runpy.run_path(sys.argv[0], run_name="__main__")
