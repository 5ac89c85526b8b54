"""The `sample` job: a solver from a handcrafted name or an artifact, samples from per-sample seeds, and what is
written: samples.npz (docs/formats.md "samples.npz") and pictures."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from . import __version__, artifacts, distributed, students
from .devices import resolve_device, resolve_dtype
from .errors import BadInput
from .generate import generate, nfe_notes
from .images import is_image, save_pictures
from .models import Denoiser, resolve
from .npzfiles import ensure_dir, write_npz
from .solvers import plan
from .solvers.base import Solver, Step

DEFAULT_NFE = 10


def is_artifact(solver: str) -> bool:
    """A --solver value that names an artifact file rather than a handcrafted solver."""
    return solver.endswith((".npz", ".yaml", ".yml")) or Path(solver).is_file()


def load_solver(
    solver: str,
    model_spec: str | None,
    nfe: int | None,
    schedule: str | None,
    afs: bool,
    lower_order_final: bool,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    force: bool,
) -> tuple[Denoiser, Solver, dict]:
    """(denoiser, solver, meta about the solver) for a handcrafted name or an artifact path."""
    if is_artifact(solver):
        art = artifacts.load(solver)
        if schedule is not None:
            raise BadInput(f"--schedule: {solver} brings its own grid; drop --schedule")
        if art.method not in students.names():  # before the model is loaded: the method decides the rest
            raise BadInput(
                f"{solver}: meta.method: unknown method {art.method!r}; installed methods are "
                f"{', '.join(students.names())} (a plugin's method needs its package installed)"
            )
        method = students.get(art.method)
        nfe = int(art.meta["nfe"]) if nfe is None else nfe
        method.check_nfe(art, nfe)  # SFD-v serves several NFEs, every other student its own
        if model_spec:
            den = resolve(model_spec, device=device, dtype=dtype)
        else:
            den = model_of(solver, art, device, dtype)
        artifacts.check_model(art, den.fingerprint, force)
        return den, method.solver_at(art, den, nfe), {"artifact": str(solver), "method": art.method}
    if model_spec is None:
        raise BadInput("--model: required (e.g. --model gmm:cifar); see `sdistill models`")
    den = resolve(model_spec, device=device, dtype=dtype)
    p = plan(solver, DEFAULT_NFE if nfe is None else nfe, den, schedule, afs, lower_order_final=lower_order_final)
    return den, p, {"schedule": schedule or p.info.default_schedule}


def model_of(
    solver: str, art: artifacts.Artifact, device: torch.device | str | None, dtype: torch.dtype | None
) -> Denoiser:
    """The model an artifact names in meta.model. It comes from a file, not from the user: a spec whose backend
    could run code to load it (python:, edm:, a diffusers folder with pickled weights) is refused by `resolve`."""
    spec = art.meta.get("model")
    if not spec:
        raise BadInput(f"--model: required; {solver} does not name its model")
    try:
        return resolve(spec, device=device, dtype=dtype, source=f"{solver}: meta.model")
    except BadInput as e:
        message = str(e)
        if message.startswith(f"{solver}: "):
            raise
        message = message.removeprefix(f"--model {spec}: ")  # the backend's wording assumes a --model flag
        raise BadInput(f"{solver}: meta.model {spec!r}: {message}") from None


def with_options(spec: str | None, **options: Any) -> str | None:
    """Append model options given as flags (--prompt, --prompts, --guidance) to a spec's query string."""
    from urllib.parse import urlencode

    given = {k: v for k, v in options.items() if v is not None}
    if spec is None or not given:
        return spec
    return spec + ("&" if "?" in spec else "?") + urlencode(given)


def run_sample(
    *,
    model: str | None,
    solver: str,
    nfe: int | None,
    schedule: str | None,
    afs: bool,
    lower_order_final: bool,
    num: int,
    seed: int,
    batch: int,
    out_dir: Path,
    device: str,
    dtype: str,
    png: bool,
    progress: AbstractContextManager[Callable[..., Any]],
    force: bool = False,
    precision: str = "fp32",
    say: Callable[[str], None] = lambda message: None,
) -> str:
    """Sample seeds [seed, seed + num) and write samples.npz and pictures to out_dir; returns a summary line."""
    if num < 1:
        raise BadInput(f"--num: must be >= 1, got {num}")
    if batch < 1:
        raise BadInput(f"--batch: must be >= 1, got {batch}")
    for note in nfe_notes([nfe] if nfe is not None else []):
        say(note)
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    den, sol, extra = load_solver(solver, model, nfe, schedule, afs, lower_order_final, dev, torch_dtype, force)
    den.set_precision(precision)
    out = ensure_dir(out_dir)
    seeds = list(range(seed, seed + num))
    grids: list = []  # per-sample grids, for learned solvers whose grid depends on the sample

    def keep_grid(_: list[int], step: Step) -> None:
        grids.append((step.i, step.sigma.cpu(), step.sigma_next.cpu()))

    per_sample = getattr(sol, "per_sample_grid", False)
    with progress as bar:
        res = generate(den, sol, seeds, batch=batch, progress=bar, callback=keep_grid if per_sample else None)
    refuse_non_finite(res.x, solver, den.spec, num)
    meta = {
        "format": "sdistill-samples",
        "version": __version__,
        "model": den.spec,
        "model_fingerprint": den.fingerprint,
        **sol.describe(),
        **extra,
        "nfe": res.nfe,
        "network_passes": res.network_passes,
        "precision": precision,
        "seed": seed,
        "num": num,
        "dtype": dtype,
        "device": str(dev),
    }
    arrays = {"x": res.x.numpy(), "z": res.z.numpy(), "seeds": res.seeds}
    if per_sample:  # recorded for this rank's seeds (all of them without torchrun)
        mine = per_sample_grids(grids, len(distributed.shard(seeds))) if grids else torch.empty(0, 0)
        arrays["grids"] = distributed.gather_rows(mine).numpy()
        meta["per_sample_grid"] = True
    if not distributed.is_main():  # under torchrun rank 0 writes the files
        return ""
    shown_x = res.x.numpy()
    if callable(getattr(den, "decode", None)):  # latent models: x and z are latents, images are decoded
        with torch.no_grad():
            arrays["images"] = torch.cat(
                [den.decode(part.to(den.device)).float().cpu() for part in res.x.split(batch)]
            ).numpy()
        shown_x = arrays["images"]
        refuse_non_finite(torch.from_numpy(shown_x), solver, den.spec, num, "decoded images")
    write_npz(out / "samples.npz", meta, **arrays)
    try:
        pictures = save_pictures(
            shown_x,
            out,
            png_each=png,
            title=picture_title(meta, num, seed, min(num, 64) if is_image(shown_x.shape[1:]) else num),
        )
    except OSError as e:  # samples.npz is written; only the pictures are missing
        raise BadInput(f"{out}: wrote samples.npz but cannot write its pictures: {e.strerror or e}") from None
    shown = ", ".join(str(pth) for pth in [out / "samples.npz", *pictures])
    return (
        f"{num} samples, {meta['solver']}, NFE {res.nfe} ({res.network_passes} network passes), "
        f"{'AFS, ' if meta.get('afs') else ''}{meta.get('steps', '?')} steps -> {shown}"
    )


def picture_title(meta: dict, num: int, seed: int, shown_n: int) -> str:
    """What a sample picture shows: which samples (the first `shown_n`), of which model, by which solver at which
    NFE."""
    which = f"{shown_n} samples" if shown_n == num else f"the first {shown_n} of {num} samples"
    artifact = f" ({Path(meta['artifact']).name})" if meta.get("artifact") else ""
    return (
        f"{which}, seeds {seed}..{seed + shown_n - 1}; model {meta['model']}; solver {meta['solver']}{artifact} "
        f"at NFE {meta['nfe']}"
    )


def refuse_non_finite(x: torch.Tensor, solver: str, model: str, num: int, what: str = "samples") -> None:
    """NaN or inf in the output means a broken solver (or weights), not samples: say so and write nothing."""
    bad = int((~torch.isfinite(x.reshape(len(x), -1))).any(1).sum()) if len(x) else 0
    if bad:
        who = solver if is_artifact(solver) else f"--solver {solver}"
        raise BadInput(
            f"{who}: {bad} of {num} {what} hold NaN or infinite values with model {model}; the solver (or its "
            "weights) is unusable for this model, so nothing was written"
        )


def per_sample_grids(records: list[tuple[int, torch.Tensor, torch.Tensor]], num: int) -> torch.Tensor:
    """[num, steps + 1] sigmas each sample actually used, from the per-step callback records (batch order)."""
    rows, current = [], {}
    for i, sigma, sigma_next in records:
        if i == 0 and current:
            rows.append(current)
            current = {}
        current[i] = (sigma, sigma_next)
    rows.append(current)
    per_batch = []
    for steps in rows:
        n = len(steps)
        per_batch.append(torch.stack([steps[0][0]] + [steps[i][1] for i in range(n)], 1).double())
    return torch.cat(per_batch)[:num]
