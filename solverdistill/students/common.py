"""What student methods share: cache splits, evaluation on held-out seeds, and the handcrafted baselines."""

from __future__ import annotations


import numpy as np
import torch

from ..errors import BadInput
from .. import solvers
from ..evaluate import rmse
from ..sampling import plan


def split(cache, samples: int, heldout: int) -> tuple[np.ndarray, np.ndarray]:
    """Training indices from the front of the cache, held-out ones from the back: disjoint seeds."""
    n = cache.num_samples
    if heldout < 1:
        raise BadInput(f"train.heldout: must be >= 1, got {heldout}")
    samples = samples or n - heldout
    if samples < 1 or samples + heldout > n:
        raise BadInput(f"train.samples + train.heldout = {samples} + {heldout} exceeds the {n} cached trajectories; "
                       "raise teacher.num_samples or lower them")
    return np.arange(samples), np.arange(n - heldout, n)


def start(cache, idx, model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sigma_max * z for the cached seeds (on the model's device and dtype) and their conditioning."""
    z = torch.from_numpy(cache.get("noise", idx)).to(device=model.device, dtype=model.dtype)
    cond = cache.cond(idx)
    return z * float(cache.sigmas[0]), None if cond is None else cond.to(model.device)


def endpoints(cache, idx) -> torch.Tensor:
    """The teacher's final states (reads only that column of the trajectories)."""
    cols = np.full((len(idx), 1), cache.steps)
    return torch.from_numpy(cache.get_points("x", idx, cols)[:, 0])


def heldout_rmse(solver, model, cache, idx, batch: int = 256) -> float:
    outs = []
    with torch.no_grad():
        for b in range(0, len(idx), batch):
            part = idx[b:b + batch]
            outs.append(solver.solve(model, *start(cache, part, model)).double().cpu())
    return rmse(torch.cat(outs), endpoints(cache, idx))


def handcrafted_baselines(model, cache, idx, nfe: int) -> dict[str, float]:
    """Every handcrafted solver on its default grid, with and without AFS, at this NFE (where it can make it)."""
    out = {}
    for name in solvers.SOLVERS:
        for afs in (False, True):
            try:
                p = plan(name, nfe, model.sigma_min, model.sigma_max, afs=afs)
            except BadInput:
                continue
            out[f"{name}{'+afs' if afs else ''}"] = heldout_rmse(p, model, cache, idx)
    return out


def stored_settings(artifact, cls):
    """The student settings an artifact stores in `meta.student`, validated like a recipe section."""
    from ..recipes import build_section
    raw = artifact.meta.get("student")
    if not isinstance(raw, dict):
        raise BadInput(f"{artifact.path}: meta.student (the {artifact.method} settings) is missing")
    try:
        return build_section(cls, raw, "meta.student")
    except BadInput as e:
        raise BadInput(f"{artifact.path}: {e}") from None
