"""solverdistill.comparison (the compare engine) and `sdistill compare` (commands/compare.py): table, JSON/CSV,
plot and grid outputs, artifacts found or distilled from a recipe's cache."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from solverdistill import artifacts
from solverdistill.commands.compare import parse_list, table
from solverdistill.comparison import Comparison, Resolver, check_names, run_compare, split_afs
from solverdistill.errors import BadInput
from solverdistill.evaluation import reference_endpoints, rmse
from solverdistill.generate import generate
from solverdistill.models import resolve
from solverdistill.solvers import Plan, plan


def quiet(message):
    pass


def test_split_afs_and_parse_list():
    assert split_afs("euler+afs") == ("euler", True) and split_afs("dpm++") == ("dpm++", False)
    assert split_afs("dpm++3m+afs") == ("dpm++3m", True)
    assert parse_list(" a, b ,,c ", "--solvers") == ["a", "b", "c"]
    assert parse_list("3,4", "--nfe", int) == [3, 4]
    with pytest.raises(BadInput, match="--nfe: expected numbers"):
        parse_list("3,x", "--nfe", int)
    with pytest.raises(BadInput, match="--solvers: give a comma-separated list"):
        parse_list(" , ", "--solvers")


def test_check_names(tmp_path):
    (tmp_path / "a.npz").write_bytes(b"")
    check_names(["euler", "dpm+++afs", "ddim", "dlms", "dode", "sfd", str(tmp_path / "a.npz")])
    for names, message in (
        (["nope"], "unknown solver 'nope'"),
        (["dlms+afs"], "applies to handcrafted"),
        ([str(tmp_path / "b.npz")], "no such artifact"),
    ):
        with pytest.raises(BadInput, match=message):
            check_names(names)


def test_best_per_nfe():
    comp = Comparison(
        rows=[
            {"solver": s, "nfe": n, "network_passes": n, "metric": m, "value": v}
            for s, n, m, v in (
                ("a", 3, "rmse", 0.5),
                ("b", 3, "rmse", 0.2),
                ("a", 4, "rmse", 0.1),
                ("a", 3, "psnr", 10.0),
                ("b", 3, "psnr", 20.0),
            )
        ]
    )
    assert comp.best("rmse") == {3: 0.2, 4: 0.1} and comp.best("psnr") == {3: 20.0} and comp.best("fd") == {}
    t = table(comp, "rmse", ["a", "b"], [3, 4, 5])
    assert t.row_count == 2 and len(t.columns) == 4


def test_resolver(tmp_path, tiny64):
    resolver = Resolver(tiny64, None, [tmp_path], quiet, None)
    p = resolver("dpm++2m+afs", 4)
    assert isinstance(p, Plan) and p.afs and p.nfe == 4 and p.info.name == "dpm++2m"
    assert resolver("heun", 5) is None  # an empty cell, not an error
    meta = artifacts.new_meta(
        "dode", base_solver="euler", nfe=3, afs=False, model="gmm:tiny", model_fingerprint=tiny64.fingerprint
    )
    path = artifacts.save(
        artifacts.Artifact(meta, {"lambdas": np.zeros(3), "grid": plan("euler", 3, tiny64).sigmas.numpy()}),
        tmp_path / "d.npz",
    )
    assert resolver(str(path), 4) is None and resolver(str(path), 3).nfe == 3
    assert resolver("dode", 3).nfe == 3  # found by method and NFE in the folders
    with pytest.raises(BadInput, match=r"no artifact for model gmm:tiny in .*: dode at NFE 4 \(found: dode NFE 3 "):
        resolver("dode", 4)
    with pytest.raises(
        BadInput, match=r"with --recipe RECIPE, or make one first: sdistill distill RECIPE --method dode --nfe 4"
    ):
        resolver("dode", 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metrics": ("ssim",)}, "unknown metric 'ssim'"),
        ({"nfes": [3, 0]}, "every NFE must be >= 1"),
        ({"num": 1}, "--num: must be >= 2"),
        ({"model_spec": None}, "exactly one of --recipe and --model"),
        ({"names": ["euler", "nope"]}, "unknown solver 'nope'"),
        ({"metrics": ("digits",)}, "--metric digits: needs 1x16x16 digit images"),
    ],
)
def test_run_compare_checks_before_work(kwargs, message):
    args = {"names": ["euler"], "nfes": [3], "model_spec": "gmm:tiny", "num": 4, "say": quiet, **kwargs}
    with pytest.raises(BadInput, match=message):
        run_compare(args.pop("names"), args.pop("nfes"), **args)


def test_run_compare_measures_against_rk4(tiny64):
    comp = run_compare(
        ["euler", "heun"], [3, 4], model_spec="gmm:tiny", num=6, seed=7, metrics=("rmse", "psnr"), say=quiet
    )
    assert comp.samples == 6 and comp.reference.startswith("RK4")
    assert {(r["solver"], r["nfe"]) for r in comp.rows} == {("euler", 3), ("euler", 4), ("heun", 4)}
    ref = reference_endpoints(resolve("gmm:tiny"), list(range(7, 13)))
    m = resolve("gmm:tiny")
    want = rmse(generate(m, plan("euler", 4, m), list(range(7, 13))).x.float(), ref.float())
    got = next(r["value"] for r in comp.rows if (r["solver"], r["nfe"], r["metric"]) == ("euler", 4, "rmse"))
    assert got == pytest.approx(want, rel=1e-6)
    assert set(comp.grid_images) == {"reference", "euler, NFE 4", "heun, NFE 4"}  # drawn at the middle NFE


def test_compare_digits_metric_is_fd_in_digit_features_with_the_class_report(tmp_path, cli):
    """--metric digits: the distance `fid.digits_fd` gives the same samples, and the classifier's report per cell."""
    from solverdistill.fid import digits_fd

    spec = "gmm:shape=1x16x16,components=3,rank=4,seed=3"
    r = cli("compare", "--model", spec, "--solvers", "euler", "--nfe", "3", "--num", 8, "--metric", "digits",
            "--json", tmp_path / "c.json", "--csv", tmp_path / "c.csv", "--grid", tmp_path / "g.png")  # fmt: skip
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "g.png") as im:  # one row (no reference here), 16x16 enlarged 2x beside its label
        assert im.size == (150 + 8 * 32, 32)
    doc = json.loads((tmp_path / "c.json").read_text())
    m = resolve(spec)
    want = digits_fd(generate(m, plan("euler", 3, m), list(range(1000000, 1000008))).x.float()).distance
    assert [(x["metric"], x["nfe"]) for x in doc["rows"]] == [("digits", 3)]
    assert doc["reference"].startswith("none")  # measured against real digits: no RK4 solve
    assert doc["rows"][0]["value"] == pytest.approx(want, rel=1e-6)
    [c] = doc["classes"]
    assert (c["solver"], c["nfe"], c["samples"], sum(c["class_histogram"])) == ("euler", 3, 8, 8)
    assert "digits: euler at NFE 3:" in r.output and "classes seen" in r.output


def test_compare_writes_consistent_outputs(tmp_path, cli):
    r = cli(
        "compare",
        "--model",
        "gmm:tiny",
        "--solvers",
        "euler,dpm++,heun+afs,unipc",
        "--nfe",
        "3,4,6",
        "--num",
        16,
        "--metric",
        "rmse,psnr,fd",
        "--json",
        tmp_path / "c.json",
        "--csv",
        tmp_path / "c.csv",
        "--plot",
        tmp_path / "p.png",
        "--grid",
        tmp_path / "g.png",
        "--quiet",
    )
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
    assert all(v >= 0 for (_, _, m), v in by.items() if m == "fd")
    for png in ("p.png", "g.png"):
        with Image.open(tmp_path / png) as im:
            im.verify()
    with Image.open(tmp_path / "g.png") as im:
        assert im.size[1] == 4 * 48  # rows: reference, euler, dpm++, unipc (heun+afs has no NFE 4); 6x6 tiles x8
    assert "*" in r.output and "reference: RK4" in r.output


def test_compare_with_recipe_uses_cache_and_artifacts(tmp_path, cli, recipe_file):
    recipe = recipe_file(
        tmp_path / "r.yaml",
        name="c",
        teacher={"steps": 32, "num_samples": 120, "batch": 60, "cache": str(tmp_path / "cache")},
        student={"method": "dode", "nfe": 3, "base": "euler"},
        train={"samples": 40, "heldout": 30},
    )
    r = cli(
        "compare",
        "--recipe",
        recipe,
        "--solvers",
        "euler,dode",
        "--nfe",
        "3,4",
        "--artifacts",
        tmp_path / "arts",
        "--num",
        50,
        "--json",
        tmp_path / "c.json",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    assert "distilling" in r.output and len(list((tmp_path / "arts").glob("*.npz"))) == 2
    doc = json.loads((tmp_path / "c.json").read_text())
    assert {(x["solver"], x["nfe"]) for x in doc["rows"]} == {("euler", 3), ("euler", 4), ("dode", 3), ("dode", 4)}
    assert "capped" in r.output and doc["samples"] == 30 and doc["reference"].startswith("teacher cache")
    arts = artifacts.scan([tmp_path / "arts"])
    assert sorted(int(a.meta["nfe"]) for a in arts.values()) == [3, 4]
    dode3 = next(a for a in arts.values() if a.meta["nfe"] == 3)
    row = next(x for x in doc["rows"] if (x["solver"], x["nfe"]) == ("dode", 3))
    assert row["value"] == pytest.approx(dode3.meta["metrics"]["heldout_rmse"], rel=1e-4)  # same 30 held-out seeds
    # The second run finds the artifacts instead of distilling again.
    r = cli(
        "compare",
        "--recipe",
        recipe,
        "--solvers",
        "dode",
        "--nfe",
        "3",
        "--artifacts",
        tmp_path / "arts",
        "--num",
        30,
        "--quiet",
    )
    assert r.exit_code == 0 and "distilling" not in r.output
    assert f"dode at NFE 3: {tmp_path / 'arts'}" in r.output  # which found artifact stands for the name


@pytest.mark.parametrize(
    "args, message",
    [
        (["--solvers", "euler,nope"], "unknown solver 'nope'"),
        (["--nfe", "3,0"], "--nfe"),
        (["--nfe", "3,x"], "--nfe"),
        (["--metric", "ssim"], "unknown metric"),
        (["--solvers", "dlms"], ": dlms at NFE 3. Distill them on the way with --recipe"),
        (["--num", "1"], "--num"),
    ],
)
def test_compare_bad_input(tmp_path, cli, args, message):
    base = {"--model": "gmm:tiny", "--solvers": "euler", "--nfe": "3", "--num": "8", "--artifacts": str(tmp_path)}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    r = cli("compare", *[x for kv in base.items() for x in kv], "--quiet")
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_unwritable_output_is_bad_input(tmp_path, cli):
    (tmp_path / "file").write_text("x")
    r = cli(
        "compare",
        "--model",
        "gmm:tiny",
        "--solvers",
        "euler",
        "--nfe",
        2,
        "--num",
        4,
        "--json",
        tmp_path / "file" / "c.json",
        "--quiet",
    )
    assert r.exit_code == 2 and "--json: cannot write" in r.output and "is a file, not a folder" in r.output


OWN_RECIPE_MODEL = """
from solverdistill.models import resolve

RECIPE = [None]


def make():
    m = resolve("gmm:tiny")
    m.default_recipe = RECIPE[0]  # the recipe compare --model distills this model's missing students with
    return m
"""


def test_compare_model_distills_missing_students_with_its_default_recipe(tmp_path, cli, recipe_file, monkeypatch):
    """A model may name a default recipe (`model.default_recipe`): compare --model distills the students it lacks
    with it, says so (recipe, settings, where the artifact goes), and still measures against its RK4 reference."""
    import importlib
    import sys

    (tmp_path / "ownmod.py").write_text(OWN_RECIPE_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("ownmod", None)
    ownmod = importlib.import_module("ownmod")
    recipe = recipe_file(
        tmp_path / "own.yaml",
        name="own",
        model="python:ownmod:make",
        teacher={"steps": 16, "num_samples": 40, "batch": 40, "cache": str(tmp_path / "cache")},
        student={"method": "dode", "nfe": 3, "base": "euler"},
        train={"samples": 20, "heldout": 20},
    )
    ownmod.RECIPE[0] = recipe
    base = ["compare", "--model", "python:ownmod:make", "--nfe", "3", "--num", 6, "--artifacts", tmp_path / "arts"]
    r = cli(*base, "--solvers", "euler,dode", "--json", tmp_path / "c.json", "--quiet")
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert f"missing students are distilled with its default recipe {recipe} (teacher: dpm++3m, 16 logsnr" in said
    assert "40 seeds" in said and "student: {method: dode, nfe: 3, base: euler}" in said
    assert f"({tmp_path / 'arts' / 'own_dode_nfe3.npz'})" in said  # where the artifact goes, said up front
    assert said.index("default recipe") < said.index("building it first")  # said before the teacher runs
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["reference"].startswith("RK4") and doc["samples"] == 6
    assert {(x["solver"], x["nfe"], x["metric"]) for x in doc["rows"]} == {("euler", 3, "rmse"), ("dode", 3, "rmse")}
    [art] = artifacts.scan([tmp_path / "arts"]).values()
    assert (art.method, art.meta["nfe"], art.meta["teacher"]["steps"]) == ("dode", 3, 16)
    # Found the second time: nothing distilled.
    r = cli(*base, "--solvers", "dode", "--quiet")
    assert r.exit_code == 0 and "default recipe" not in r.output and "distilling" not in r.output
    # A default recipe of another model (here other weights: gmm:ring2d) is no recipe for this one: exit 2 as
    # for a model without one, naming the missing (method, NFE).
    recipe_file(recipe, name="own", model="gmm:ring2d", teacher={"steps": 16, "num_samples": 40})
    r = cli(*base, "--solvers", "dlms", "--quiet")
    assert r.exit_code == 2 and ": dlms at NFE 3. Distill them on the way with --recipe" in r.output


def test_compare_metric_defaults_to_the_models_fd_features(tmp_path, cli, monkeypatch):
    """Without --metric: RMSE, plus the FD in the features `fid` picks for the model's samples when they are the
    digit features (fid.DIGIT_MODELS); RMSE only otherwise."""
    from solverdistill import fid

    spec = "gmm:shape=1x16x16,components=3,rank=4,seed=3"
    args = ["--solvers", "euler", "--nfe", "3", "--num", 8, "--quiet", "--json", tmp_path / "c.json"]
    r = cli("compare", "--model", spec, *args)
    assert r.exit_code == 0, r.output
    assert [x["metric"] for x in json.loads((tmp_path / "c.json").read_text())["rows"]] == ["rmse"]
    monkeypatch.setattr(fid, "DIGIT_MODELS", (*fid.DIGIT_MODELS, spec))
    r = cli("compare", "--model", spec, *args)
    assert r.exit_code == 0, r.output
    assert f"--metric rmse,digits (the default for {spec})" in " ".join(r.output.split())
    doc = json.loads((tmp_path / "c.json").read_text())
    assert [x["metric"] for x in doc["rows"]] == ["rmse", "digits"] and doc["classes"][0]["samples"] == 8
    r = cli("compare", "--model", spec, *args, "--metric", "psnr")  # an explicit --metric is kept
    assert r.exit_code == 0 and [x["metric"] for x in json.loads((tmp_path / "c.json").read_text())["rows"]] == ["psnr"]
