"""solverdistill.pipeline: the teacher cache built or reused, the workspace, and `distill`'s report and metrics."""

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from solverdistill import artifacts, students
from solverdistill.evaluation import heldout_rmse
from solverdistill.pipeline import DistillReport, distill, open_workspace, teacher_cache
from solverdistill.recipes import load_recipe
from solverdistill.solvers import sweep


@pytest.fixture
def recipe(tmp_path, recipe_file):
    return load_recipe(
        recipe_file(
            tmp_path / "r.yaml",
            name="p",
            output=tmp_path / "out" / "a.npz",
            teacher={
                "steps": 16,
                "num_samples": 30,
                "batch": 15,
                "cache": str(tmp_path / "c"),
                "compute_dtype": "float64",
            },
            student={"method": "dode", "nfe": 3, "base": "euler"},
            train={"samples": 12, "heldout": 10, "device": "cpu"},
        )
    )


def test_teacher_cache_is_built_once(recipe):
    said, bars = [], []

    def bar(total, label):
        bars.append((total, label))
        return contextlib.nullcontext(lambda n=1, info=None: None)

    ws = open_workspace(recipe, "cpu", said.append, bar)
    assert ws.teacher_built and ws.cache.num_samples == 30 and ws.model.dtype == torch.float64
    assert bars == [(30, "teacher (30 of 30 left)")] and "building it first (30 of 30 samples" in said[0]
    cache, built = teacher_cache(recipe, ws.model, said.append, bar)
    assert not built and cache.num_samples == 30 and len(said) == 1 and len(bars) == 1  # nothing left to do


def test_distill_report_and_metrics(recipe):
    ws = open_workspace(recipe, "cpu", say=lambda m: None)
    rep = distill(recipe, workspace=ws, say=lambda m: None)
    assert isinstance(rep, DistillReport) and rep.method == "dode" and rep.nfe == 3
    assert rep.teacher_built  # the workspace it was given built the cache
    assert str(rep.path) == recipe.output and rep.path.is_file()
    art = artifacts.load(rep.path, fingerprint=ws.model.fingerprint)
    m = art.meta["metrics"]
    _, held = ws.cache.split(12, 10)
    method = students.get("dode")
    assert m["heldout_rmse"] == pytest.approx(heldout_rmse(method.load(art, ws.model), ws.model, ws.cache, held))
    assert m["initial_rmse"] == pytest.approx(heldout_rmse(sweep(3, ws.model)["euler"], ws.model, ws.cache, held))
    assert set(m["handcrafted_rmse"]) == set(sweep(3, ws.model)) and m["heldout_samples"] == 10
    assert m["best_handcrafted_rmse"] == min(m["handcrafted_rmse"].values())
    assert m["handcrafted_rmse"][m["best_handcrafted"]] == m["best_handcrafted_rmse"]
    assert [r[1] for r in rep.rows] == [m["heldout_rmse"], m["initial_rmse"], m["best_handcrafted_rmse"]]
    assert art.meta["teacher"]["steps"] == 16 and "grid" not in art.meta["teacher"]
    assert art.meta["cost"]["teacher_nfe_per_sample"] == 17 and art.meta["cost"]["student_nfe"] == 3
    assert np.all(np.isfinite(art.arrays["lambdas"]))


def test_distill_switches_method_and_nfe(recipe, tmp_path):
    said = []
    short = load_recipe(recipe.path, {"train.iterations": 2, "train.validation": 4, "train.eval_every": 1})
    rep = distill(short, method_name="dlms", nfe=2, out=str(tmp_path / "d.npz"), say=said.append)
    art = artifacts.load(rep.path)
    assert rep.method == "dlms" and art.method == "dlms" and art.meta["nfe"] == 2 and rep.teacher_built
    assert art.meta["training"]["iterations"] == 2 and art.meta["training"]["samples"] == 8  # 12 less 4 validation
    assert any("--method dlms" in s for s in said)


def flat(text):
    """Text without whitespace: the CLI's messages wrap at the terminal width, anywhere in a long path."""
    return "".join(text.split())


@pytest.mark.parametrize("where", ["folder", "under_a_file", "recipe_output_folder"])
def test_distill_checks_its_output_before_any_work(tmp_path, cli, recipe_file, where):
    """Issue 12, item 7: an unwritable output is exit 2 naming the path, before the teacher or the training."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    output = tmp_path / ("adir" if where == "recipe_output_folder" else "fine.npz")
    path = recipe_file(
        tmp_path / "r.yaml",
        teacher={"steps": 4, "num_samples": 8, "cache": str(tmp_path / "c")},
        student={"method": "dode", "nfe": 3},
        output=output,
    )
    flag = {"folder": ["--out", tmp_path / "adir"], "under_a_file": ["--out", tmp_path / "afile" / "a.npz"]}
    r = cli("distill", path, "--quiet", *flag.get(where, []))
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    want = {
        "folder": f"--out: '{tmp_path / 'adir'}' is a folder",
        "under_a_file": f"'{tmp_path / 'afile'}' is a file, not a folder",
        "recipe_output_folder": f"output: '{tmp_path / 'adir'}' is a folder",
    }[where]
    assert flat(want) in flat(r.output), r.output
    assert not (tmp_path / "c").exists()  # no teacher work was done
    assert list((tmp_path / "adir").iterdir()) == [] and not (tmp_path / "adir.npz").exists()


def test_distill_says_where_an_output_outside_lands(recipe, tmp_path, monkeypatch):
    for d in ("proj", "recipes"):
        (tmp_path / d).mkdir()
    moved = tmp_path / "recipes" / "r.yaml"
    moved.write_text(Path(recipe.path).read_text())
    monkeypatch.chdir(tmp_path / "proj")
    said = []
    rep = distill(load_recipe(moved, {"output": "../elsewhere/a.npz"}), say=said.append)
    assert rep.path.resolve() == tmp_path / "elsewhere" / "a.npz" and rep.path.is_file()
    assert [s for s in said if s.startswith("note:")] == [
        f"note: output '../elsewhere/a.npz' resolves to {tmp_path / 'elsewhere' / 'a.npz'}, outside the recipe's "
        "folder and the current directory"
    ]


def test_distill_acceleration_and_a_fit_kept_when_evaluation_fails(recipe, monkeypatch):
    from solverdistill import evaluation, pipeline
    from solverdistill.errors import RunFailed

    ws = open_workspace(recipe, "cpu", say=lambda m: None)
    rep = distill(recipe, workspace=ws, say=lambda m: None)
    m = rep.metrics
    curve = {int(k): v for k, v in m["best_handcrafted_by_nfe"].items()}
    assert curve[3] == m["best_handcrafted_rmse"] and min(curve) == 3
    want = evaluation.acceleration_ratio(m["heldout_rmse"], 3, curve)
    assert m["acceleration"] == (None if want == float("inf") else pytest.approx(want))
    rep.path.unlink()
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the student and its initial rule, while measuring the handcrafted solvers
            raise RunFailed("broken while measuring")
        return heldout_rmse(*args, **kwargs)

    monkeypatch.setattr(pipeline, "heldout_rmse", failing)
    said = []
    with pytest.raises(RunFailed):
        distill(recipe, workspace=ws, say=said.append)
    art = artifacts.load(recipe.output)  # the fitted student is kept, without metrics
    assert "metrics" not in art.meta and "saved without its metrics" in said[-1]
