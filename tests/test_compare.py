import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from solverdistill.cli import app

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_compare_writes_consistent_outputs(tmp_path):
    r = cli("compare", "--model", "gmm:tiny", "--solvers", "euler,dpm++,heun+afs,unipc", "--nfe", "3,4,6",
            "--num", 16, "--metric", "rmse,psnr,fd", "--json", tmp_path / "c.json", "--csv", tmp_path / "c.csv",
            "--plot", tmp_path / "p.png", "--grid", tmp_path / "g.png", "--quiet")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    with open(tmp_path / "c.csv") as f:
        crow = list(csv.DictReader(f))
    assert len(rows) == len(crow) == (3 * 3 + 1) * 3  # heun+afs makes only odd NFEs: 3
    for j, c in zip(rows, crow):
        assert j["solver"] == c["solver"] and j["nfe"] == int(c["nfe"]) and j["metric"] == c["metric"]
        assert j["value"] == pytest.approx(float(c["value"]))
    by = {(r["solver"], r["nfe"], r["metric"]): r["value"] for r in rows}
    assert by[("dpm++", 6, "psnr")] == pytest.approx(20 * np.log10(2 / by[("dpm++", 6, "rmse")]))
    assert by[("euler", 6, "rmse")] < by[("euler", 3, "rmse")]
    for png in ("p.png", "g.png"):
        with Image.open(tmp_path / png) as im:
            im.verify()
    with Image.open(tmp_path / "g.png") as im:
        assert im.size[1] == 4 * 48  # rows: reference, euler, dpm++, unipc (heun+afs has no NFE 4); 6x6 tiles x8
    assert "*" in r.output and "reference: RK4" in r.output


def test_compare_with_recipe_uses_cache_and_artifacts(tmp_path):
    (tmp_path / "r.yaml").write_text(f"""name: c
model: {{spec: gmm:tiny}}
teacher: {{steps: 32, num_samples: 120, batch: 60, cache: '{tmp_path / "cache"}'}}
student: {{method: dode, nfe: 3, base: euler}}
train: {{samples: 40, heldout: 30}}
""")
    r = cli("compare", "--recipe", tmp_path / "r.yaml", "--solvers", "euler,dode", "--nfe", "3,4",
            "--artifacts", tmp_path / "arts", "--num", 50, "--json", tmp_path / "c.json", "--quiet")
    assert r.exit_code == 0, r.output
    assert "distilling" in r.output and len(list((tmp_path / "arts").glob("*.npz"))) == 2
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert {(x["solver"], x["nfe"]) for x in rows} == {("euler", 3), ("euler", 4), ("dode", 3), ("dode", 4)}
    assert "capped" in r.output
    # The second run finds the artifacts instead of distilling again.
    r = cli("compare", "--recipe", tmp_path / "r.yaml", "--solvers", "dode", "--nfe", "3", "--artifacts",
            tmp_path / "arts", "--num", 30, "--quiet")
    assert r.exit_code == 0 and "distilling" not in r.output


@pytest.mark.parametrize("args, message", [
    (["--solvers", "euler,nope"], "unknown solver 'nope'"),
    (["--nfe", "3,0"], "--nfe"),
    (["--nfe", "3,x"], "--nfe"),
    (["--metric", "ssim"], "unknown metric"),
    (["--solvers", "dlms"], "no dlms artifact"),
])
def test_compare_bad_input(tmp_path, args, message):
    base = {"--model": "gmm:tiny", "--solvers": "euler", "--nfe": "3", "--num": "8", "--artifacts": str(tmp_path)}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    r = cli("compare", *[x for kv in base.items() for x in kv], "--quiet")
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_bench_pieces_measure_side_by_side():
    import torch
    from solverdistill.bench import render, sampling_overhead, teacher_overhead
    from solverdistill.models import resolve
    from solverdistill.sampling import plan
    m = resolve("gmm:tiny")
    r = sampling_overhead(m, plan("dpm++", 5, m.sigma_min, m.sigma_max), 5, batch=8, batches=2, repeats=2)
    assert r["full_s"] > 0 and r["bare_s"] > 0 and r["ratio"] > 0
    t = teacher_overhead("gmm:tiny", num=8, steps=8, repeats=1)
    assert t["ratio"] > 0 and set(t["median_s"]) == {"write", "no_write"}
    report = {"version": "x", "model": "gmm:tiny", "machine": {"platform": "p", "cpus": 2, "torch": torch.__version__,
              "threads": 1, "device": "cpu"}, "settings": {"heldout_seeds": 4, "teacher": "t"},
              "quality": {"handcrafted": {"euler": {3: 0.5}}, "best_by_nfe": {3: 0.5}, "students": []},
              "sampling_overhead_nfe5": {"batch": 8, "by_solver": {"dpm++3m": r}},
              "teacher_write_overhead": t, "fid_feature_throughput": {"skipped": "no weights"}}
    text = render(report)
    assert "| euler | 0.5000 |" in text and "Teacher cache write overhead" in text
