"""`sdistill sample`: sample a model with a handcrafted solver and write samples.npz and pictures."""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..errors import BadInput
from ..models import resolve
from ..outputs import ensure_dir, save_pictures, write_npz
from ..sampling import generate, plan, resolve_device, resolve_dtype


def run_sample(*, model, solver, nfe, schedule, afs, lower_order_final, num, seed, batch, out_dir: Path,
               device, dtype, png, progress) -> str:
    if model is None:
        raise BadInput("--model: required (e.g. --model gmm:cifar); see `sdistill models`")
    if num < 1:
        raise BadInput(f"--num: must be >= 1, got {num}")
    if batch < 1:
        raise BadInput(f"--batch: must be >= 1, got {batch}")
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    den = resolve(model, device=dev, dtype=torch_dtype)
    p = plan(solver, nfe, den.sigma_min, den.sigma_max, schedule, afs, lower_order_final=lower_order_final)
    out = ensure_dir(out_dir)
    seeds = list(range(seed, seed + num))
    with progress as bar:
        res = generate(den, lambda m, x, c, cb: p.solve(m, x, c, cb), seeds, batch=batch, progress=bar)
    meta = {"format": "sdistill-samples", "version": __version__, "model": den.spec,
            "model_fingerprint": den.fingerprint, **p.describe(), "nfe": res.nfe,
            "network_passes": res.network_passes, "schedule": schedule or p.info.default_schedule,
            "seed": seed, "num": num, "dtype": dtype, "device": str(dev)}
    write_npz(out / "samples.npz", meta, x=res.x.numpy(), z=res.z.numpy(), seeds=res.seeds)
    pictures = save_pictures(res.x.numpy(), out, png_each=png, title=f"{p.info.name}, NFE {res.nfe}")
    shown = ", ".join(str(pth) for pth in [out / "samples.npz", *pictures])
    return (f"{num} samples, {p.info.name}, NFE {res.nfe} ({res.network_passes} network passes), "
            f"{'AFS, ' if afs else ''}{p.steps} steps -> {shown}")
