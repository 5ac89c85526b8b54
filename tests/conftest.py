import pytest
import torch

from solverdistill.models import resolve

# Tiny models: one thread is faster than two fighting over small ops (and pytest -n 2 uses both cores).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny64():
    """gmm:tiny in float64 on the CPU."""
    return resolve("gmm:tiny", dtype=torch.float64)


def noise(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.shape, generator=g, dtype=torch.float64) * model.sigma_max


def teacher_dode_sample(tmp_path, spec, *, steps, num_samples, batch, samples, heldout, base="euler", num=2):
    """The end-to-end path every backend must pass: a recipe, `teacher`, D-ODE `distill`, `sample` with the
    artifact. Returns the samples.npz path."""
    from typer.testing import CliRunner

    from solverdistill.cli import app
    (tmp_path / "r.yaml").write_text(f"""name: e2e
model: {{spec: "{spec}"}}
teacher: {{steps: {steps}, num_samples: {num_samples}, batch: {batch}, shard_size: {batch}, cache: '{tmp_path / "cache"}'}}
student: {{method: dode, nfe: 3, base: {base}}}
train: {{samples: {samples}, heldout: {heldout}}}
output: '{tmp_path / "dode.yaml"}'
""")
    runner = CliRunner()
    for args in (["teacher", tmp_path / "r.yaml", "--quiet"], ["distill", tmp_path / "r.yaml", "--quiet"],
                 ["sample", "--solver", tmp_path / "dode.yaml", "--num", num, "--out", tmp_path / "s", "--quiet"]):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, (args[0], r.output)
    return tmp_path / "s" / "samples.npz"
