"""Shared fixtures: tiny models, the one CLI runner, small recipes, and the end-to-end path every backend passes."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from solverdistill.cli import app
from solverdistill.models import resolve

# Tiny models: one thread is faster than two fighting over small ops (and pytest -n 2 uses both cores).
torch.set_num_threads(1)

_runner = CliRunner()


def run_cli(*args):
    """Invoke `sdistill ARGS...` in-process (arguments are str()-ed); returns click's Result (exit_code, output)."""
    return _runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def cli():
    """The one way tests run the command line: `cli("sample", "--model", "gmm:tiny", ...)`."""
    return run_cli


@pytest.fixture(autouse=True)
def _no_pickle_trust_leaks():
    """`--trust-pickle` (and `trust_every_pickle`) set a process-wide flag: never let it outlive a test."""
    yield
    from solverdistill.models.edm import trust_every_pickle

    trust_every_pickle(False)


@pytest.fixture(scope="session")
def tiny64():
    """gmm:tiny in float64 on the CPU."""
    return resolve("gmm:tiny", dtype=torch.float64)


def _noise(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.shape, generator=g, dtype=torch.float64) * model.sigma_max


@pytest.fixture(scope="session")
def noise():
    """`noise(model, n, seed=0)`: sigma_max * N(0, I) in float64, n samples of the model's shape."""
    return _noise


def write_recipe(
    path: Path,
    *,
    model: str = "gmm:tiny",
    teacher: dict,
    student: dict | None = None,
    train: dict | None = None,
    output: str | None = None,
    name: str = "t",
) -> Path:
    """A recipe YAML from plain dicts (flow style, so paths and specs need no escaping beyond JSON's)."""
    lines = [f"name: {name}", f"model: {{spec: {json.dumps(str(model))}}}", f"teacher: {json.dumps(teacher)}"]
    if student is not None:
        lines.append(f"student: {json.dumps(student)}")
    if train is not None:
        lines.append(f"train: {json.dumps(train)}")
    if output is not None:
        lines.append(f"output: {json.dumps(str(output))}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def recipe_file():
    """`recipe_file(path, teacher={...}, student={...}, train={...}, output=..., model=...)` writes a recipe."""
    return write_recipe


def check_steps(steps, batch: int, n_steps: int) -> None:
    """The callback contract (solvers/base.py `Step`): one Step per step, i = 0..n-1, sigma and sigma_next
    float64 tensors of shape [B], x and denoised batches of the state's shape, sigma_next of a step = sigma of
    the next (to rounding), every sample moving to a smaller sigma."""
    assert [s.i for s in steps] == list(range(n_steps))
    for s in steps:
        for v in (s.sigma, s.sigma_next):
            assert isinstance(v, torch.Tensor) and v.dtype == torch.float64 and v.shape == (batch,)
        assert s.denoised is not None and s.denoised.shape == s.x.shape and s.x.shape[0] == batch
        assert (s.sigma_next < s.sigma).all()
    for a, b in zip(steps, steps[1:]):
        assert torch.allclose(a.sigma_next, b.sigma, rtol=1e-12, atol=0)


@pytest.fixture(scope="session")
def step_contract():
    """`step_contract(steps, batch, n_steps)` checks a list of callback `Step`s."""
    return check_steps


@pytest.fixture(scope="session")
def teacher_dode_sample():
    """The end-to-end path every backend must pass: a recipe, `teacher`, D-ODE `distill`, `sample` with the
    artifact. `teacher_dode_sample(tmp_path, spec, steps=, num_samples=, batch=, samples=, heldout=)` returns the
    samples.npz path."""

    def run(tmp_path, spec, *, steps, num_samples, batch, samples, heldout, base="euler", num=2):
        recipe = write_recipe(
            tmp_path / "r.yaml",
            model=spec,
            name="e2e",
            teacher={
                "steps": steps,
                "num_samples": num_samples,
                "batch": batch,
                "shard_size": batch,
                "cache": str(tmp_path / "cache"),
            },
            student={"method": "dode", "nfe": 3, "base": base},
            train={"samples": samples, "heldout": heldout},
            output=tmp_path / "dode.yaml",
        )
        for args in (
            ["teacher", recipe, "--quiet"],
            ["distill", recipe, "--quiet"],
            # The model is named here: a spec read from an artifact is never loaded when loading runs code (edm:).
            [
                "sample",
                "--solver",
                tmp_path / "dode.yaml",
                "--model",
                spec,
                "--num",
                num,
                "--out",
                tmp_path / "s",
                "--quiet",
            ],
        ):
            r = run_cli(*args)
            assert r.exit_code == 0, (args[0], r.output)
        return tmp_path / "s" / "samples.npz"

    return run


# --- diffusers: a tiny random UNet folder (no downloads); skipped without the optional extra ---------------------

DDPM_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
}


@pytest.fixture(scope="session")
def ddpm_scheduler():
    """The scheduler config of the tiny diffusers models (a fresh dict each time it is asked for)."""
    return lambda **changes: {**DDPM_SCHEDULER, **changes}


@pytest.fixture(scope="session")
def tiny_unet():
    """`tiny_unet()`: a small random diffusers UNet2DModel (16x16, 3 channels), seeded."""
    diffusers = pytest.importorskip("diffusers")

    def make():
        torch.manual_seed(0)
        return diffusers.UNet2DModel(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        )

    return make


@pytest.fixture
def ldm_dir(ddpm_scheduler):
    """`ldm_dir(root) -> (unet, vqvae)`: a tiny LDM pipeline folder (8x8 UNet over VQ latents, LDM's
    scaled_linear betas) written at root."""
    diffusers = pytest.importorskip("diffusers")

    def make(root: Path):
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(
            sample_size=8,
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        )
        vq = diffusers.VQModel(
            in_channels=3,
            out_channels=3,
            latent_channels=3,
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8,
            num_vq_embeddings=32,
        )
        unet.save_pretrained(root / "unet")
        vq.save_pretrained(root / "vqvae")
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(ddpm_scheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195))
        )
        (root / "model_index.json").write_text(json.dumps({"_class_name": "LDMPipeline", "unet": [], "vqvae": []}))
        return unet, vq

    return make


@pytest.fixture(scope="session")
def ddpm_dir(tmp_path_factory, tiny_unet):
    """A diffusers model folder: the tiny UNet plus a DDPM (epsilon, linear betas) scheduler config."""
    root = tmp_path_factory.mktemp("ddpm")
    tiny_unet().save_pretrained(root)
    (root / "scheduler_config.json").write_text(json.dumps(DDPM_SCHEDULER))
    return root
