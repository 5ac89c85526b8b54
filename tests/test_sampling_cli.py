"""`sdistill sample` (commands/sample.py over samples.py): handcrafted solvers and models from the command line,
what samples.npz holds, and bad input."""

import json
import textwrap

import numpy as np
import pytest
import torch

from solverdistill.models import resolve
from solverdistill.solvers import plan


def test_sample_writes_files(tmp_path, cli):
    r = cli(
        "sample",
        "--model",
        "gmm:cifar",
        "--solver",
        "dpm++",
        "--nfe",
        4,
        "--num",
        6,
        "--seed",
        3,
        "--batch",
        4,
        "--out",
        tmp_path / "s",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "s" / "samples.npz", allow_pickle=False) as f:
        assert f["x"].shape == (6, 3, 32, 32) and f["z"].shape == (6, 3, 32, 32)
        assert list(f["seeds"]) == [3, 4, 5, 6, 7, 8]
        meta = json.loads(str(f["meta"][()]))
        z, x = f["z"], f["x"]
    assert meta["model"] == "gmm:cifar" and meta["solver"] == "dpm++3m" and meta["nfe"] == 4
    assert meta["network_passes"] == 4 and meta["afs"] is False
    assert meta["grid"][0] == 80.0 and meta["grid"][-1] == 0.002 and len(meta["grid"]) == 5
    assert (tmp_path / "s" / "grid.png").exists()
    # z is the noise exactly as used: re-running the solver from sigma_max * z gives x.
    m = resolve("gmm:cifar")
    p = plan("dpm++3m", 4, m)
    with torch.no_grad():
        again = p.solve(m, torch.from_numpy(z) * 80.0)
    assert np.allclose(again.numpy(), x, atol=2e-4)  # float32, another batch size


def test_sample_afs_float64_points_and_png(tmp_path, cli):
    r = cli(
        "sample",
        "--model",
        "gmm:ring2d",
        "--solver",
        "heun",
        "--nfe",
        5,
        "--afs",
        "--num",
        10,
        "--dtype",
        "float64",
        "--out",
        tmp_path,
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "samples.npz") as f:
        assert f["x"].dtype == np.float64 and json.loads(str(f["meta"][()]))["afs"] is True
    assert (tmp_path / "scatter.png").exists()
    r = cli(
        "sample",
        "--model",
        "gmm:shape=1x8x8,components=2,rank=2",
        "--nfe",
        3,
        "--num",
        3,
        "--png",
        "--out",
        tmp_path / "p",
        "--quiet",
    )
    assert r.exit_code == 0 and len(list((tmp_path / "p" / "png").glob("*.png"))) == 3


def test_python_factory_and_yaml_model(tmp_path, monkeypatch, cli):
    (tmp_path / "mymodel.py").write_text(
        textwrap.dedent("""
        import torch
        class Shrink(torch.nn.Module):
            sigma_min, sigma_max, shape = 0.01, 10.0, (3,)
            def forward(self, x, sigma, cond=None):
                return x / (1 + sigma[:, None] ** 2)
        def make():
            return Shrink()
        def broken():
            return object()
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    r = cli(
        "sample",
        "--model",
        "python:mymodel:make",
        "--solver",
        "euler",
        "--nfe",
        3,
        "--num",
        2,
        "--out",
        tmp_path / "o",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "o" / "samples.npz") as f:
        assert json.loads(str(f["meta"][()]))["grid"][0] == 10.0
    (tmp_path / "m.yaml").write_text("model: {spec: 'python:mymodel:make'}\n")
    r = cli("sample", "--model", tmp_path / "m.yaml", "--nfe", 3, "--num", 2, "--out", tmp_path / "y", "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("sample", "--model", "python:mymodel:broken", "--out", tmp_path / "b", "--quiet")
    assert r.exit_code == 2 and "sigma_min" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--solver", "rk45"], "unknown solver"),
        (["--model", "gmm:nope"], "unknown preset"),
        (["--model", "vae:foo"], "unknown model spec"),
        (["--model", "gmm:shape=axb"], "shape"),
        (["--nfe", "0"], "--nfe"),
        (["--schedule", "cosine"], "--schedule"),
        (["--schedule", "polynomial:-1"], "rho"),
        (["--schedule", "80,1,2"], "decreasing"),
        (["--solver", "heun", "--nfe", "5"], "odd one with --afs"),
        (["--model", "python:no_such_module_xyz:f"], "cannot import"),
        (["--num", "0"], "--num"),
        (["--dtype", "float16"], "--dtype"),
        (["--device", "tpu"], "--device"),
        (["--precision", "fp8"], "--precision"),
        (["--precision", "bf16"], "no network"),
    ],
)
def test_bad_input_exits_2_with_message(tmp_path, cli, args, message):
    base = {"--model": "gmm:tiny", "--out": str(tmp_path / "o")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    r = cli("sample", *[x for kv in base.items() for x in kv], "--quiet")
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_unwritable_output(tmp_path, cli):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli("sample", "--model", "gmm:tiny", "--out", blocker / "sub", "--quiet")
    assert r.exit_code == 2 and "--out" in r.output


def test_python_factory_from_a_named_file_and_non_finite_samples(tmp_path, monkeypatch, cli):
    """A python: factory is imported from the installed path or from a file named in the spec, never from the
    current folder; samples with NaN or inf are refused and nothing is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models_here.py").write_text(
        textwrap.dedent("""
        import torch
        class Denoise(torch.nn.Module):
            sigma_min, sigma_max, shape = 0.01, 10.0, (3,)
            def __init__(self, broken=False):
                super().__init__()
                self.broken = broken
            def forward(self, x, sigma, cond=None):
                out = x / (1 + sigma[:, None] ** 2)
                return out.clone().fill_(float("nan")) if self.broken else out
        def make():
            return Denoise()
        def broken():
            return Denoise(broken=True)
    """)
    )
    args = ["--solver", "euler", "--nfe", 3, "--num", 3, "--quiet"]
    r = cli("sample", "--model", "python:models_here:make", *args, "--out", tmp_path / "a")
    assert r.exit_code == 2 and "not on the Python path" in r.output and "Traceback" not in r.output
    r = cli("sample", "--model", "python:./models_here.py:make", *args, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b" / "samples.npz").exists()
    r = cli("sample", "--model", "python:./nowhere.py:make", *args, "--out", tmp_path / "c")
    assert r.exit_code == 2 and "cannot read the Python file" in r.output
    r = cli("sample", "--model", "python:./models_here.py:broken", *args, "--out", tmp_path / "d")
    assert r.exit_code == 2 and "3 of 3 samples hold NaN" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "d" / "samples.npz").exists() and not list((tmp_path / "d").glob("*.png"))
