import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from solverdistill import students
from solverdistill.cli import app
from solverdistill.errors import BadInput
from solverdistill.models import resolve
from solverdistill.recipes import load_recipe
from solverdistill.students.common import start
from solverdistill.students.sfd import euler_step, student_grid
from solverdistill.teacher import TeacherCache
from solverdistill.teacher.run import run_teacher

runner = CliRunner()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("sfd")
    (root / "tinytoy.py").write_text(textwrap.dedent("""
        import torch
        from solverdistill.models.toy import ToyDenoiser, ToyUNet

        def make():
            torch.manual_seed(0)
            return ToyDenoiser(ToyUNet(channels=(8, 16, 16), emb=32), spec="python:tinytoy:make")

        def other():
            torch.manual_seed(1)
            return ToyDenoiser(ToyUNet(channels=(8, 16, 24), emb=32), spec="python:tinytoy:other")

        class Plain(torch.nn.Module):
            sigma_min, sigma_max, shape = 0.002, 80.0, (3, 32, 32)
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 3, 1)
            def forward(self, x, sigma, cond=None):
                return self.conv(x) / (1 + sigma[:, None, None, None])

        def plain():
            return Plain()
    """))
    import sys
    sys.path.insert(0, str(root))
    (root / "r.yaml").write_text(f"""name: sfd
model: {{spec: "python:tinytoy:make"}}
teacher: {{steps: 16, num_samples: 40, batch: 20, cache: '{root / "cache"}'}}
student: {{method: sfd, nfe: 2}}
train: {{iterations: 6, batch: 8, heldout: 8, lr: 1.0e-3}}
output: '{root / "sfd.npz"}'
""")
    run_teacher(load_recipe(root / "r.yaml"))
    return root


def student_loss(den, cache, idx, s, model):
    grid = student_grid(s, model, s.nfe).tolist()
    x, cond = start(cache, idx, model)
    targets = cache.states_at(idx, np.array(grid[1:]))
    total = 0.0
    with torch.no_grad():
        for k in range(len(grid) - 1):
            x = euler_step(den, x, grid[k], grid[k + 1], cond, s.afs and k == 0)
            total += float((x - targets[:, k]).abs().flatten(1).sum(1).mean())
    return total


def test_fine_tuning_lowers_the_student_loss_and_keeps_the_teacher(toy):
    rec = load_recipe(toy / "r.yaml")
    method = students.get("sfd")
    s, t = students.configs(method, rec.student, rec.train)
    model = resolve(rec.model.spec)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    cache = TeacherCache.open(rec.cache_dir())
    art = method.fit(cache, model, s, t)
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())
    tuned = method.load(art, model).den
    idx = np.arange(16)
    assert student_loss(tuned, cache, idx, s, model) < student_loss(model, cache, idx, s, model)


def test_artifact_round_trip_and_refusals(toy):
    r = runner.invoke(app, ["distill", str(toy / "r.yaml"), "--quiet"])
    assert r.exit_code == 0, r.output
    outs = []
    for k in range(2):
        r = runner.invoke(app, ["sample", "--solver", str(toy / "sfd.npz"), "--num", "3", "--out",
                                str(toy / f"s{k}"), "--quiet"])
        assert r.exit_code == 0, r.output
        with np.load(toy / f"s{k}" / "samples.npz") as f:
            outs.append(f["x"])
            assert f["x"].shape == (3, 3, 32, 32)
    assert np.array_equal(outs[0], outs[1])
    r = runner.invoke(app, ["sample", "--solver", str(toy / "sfd.npz"), "--model", "python:tinytoy:other",
                            "--out", str(toy / "x"), "--quiet"])
    assert r.exit_code == 2 and "--force" in r.output
    r = runner.invoke(app, ["sample", "--solver", str(toy / "sfd.npz"), "--model", "python:tinytoy:other",
                            "--force", "--out", str(toy / "x"), "--quiet"])
    assert r.exit_code == 2 and "net.down2.weight" in r.output and "expected" in r.output


def test_sfd_v_needs_a_step_condition(toy):
    method = students.get("sfd")
    s, t = students.configs(method, {"method": "sfd", "nfe": 2, "variable": True}, {"iterations": 2, "heldout": 8})
    cache = TeacherCache.open(toy / "cache")
    with pytest.raises(BadInput, match="step condition"):
        method.fit(cache, resolve("python:tinytoy:plain"), s, t)
    with pytest.raises(BadInput, match="has none"):
        method.fit(cache, resolve("gmm:cifar"), s, t)
    art = method.fit(cache, resolve("python:tinytoy:make"), s, t)  # accepts one: trains for NFE 2-5
    for nfe in (2, 5):
        solver = method.load(art, resolve("python:tinytoy:make"), nfe=nfe)
        assert solver.nfe == nfe and len(solver.grid) == nfe + 2
