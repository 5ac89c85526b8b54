"""A newcomer's first hour (issue 13): commands fail before any work, show progress off a terminal, and say what to
run next; help and messages agree with what the tool does."""

import json
import textwrap

import numpy as np
import pytest

from solverdistill import artifacts
from solverdistill.commands.console import err
from solverdistill.fid import INCEPTION_URL
from solverdistill.progress import Bar
from solverdistill.solvers import plan

COUNTING_MODEL = """
import torch
from solverdistill.models import resolve

CALLS = [0, 0]  # all calls, calls in float32 (the reference runs on a float64 copy)
FAIL_AT = [None]  # raise on this float32 call (1-based), to fail in the middle of a comparison


class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = resolve("gmm:tiny")
        self.sigma_min, self.sigma_max, self.shape = self.inner.sigma_min, self.inner.sigma_max, self.inner.shape

    def forward(self, x, sigma, cond=None):
        CALLS[0] += 1
        if x.dtype == torch.float32:
            CALLS[1] += 1
            if FAIL_AT[0] is not None and CALLS[1] >= FAIL_AT[0]:
                from solverdistill.errors import RunFailed
                raise RunFailed("the model broke (a test)")
        return self.inner(x.double(), sigma.double(), cond).to(x.dtype)


def make():
    return Counting()
"""


@pytest.fixture
def counting(tmp_path, monkeypatch):
    """`python:countmod:make`, a gmm:tiny that counts its calls in countmod.CALLS."""
    (tmp_path / "countmod.py").write_text(textwrap.dedent(COUNTING_MODEL))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import countmod

    importlib.reload(countmod)
    return countmod


def compare(cli, tmp_path, *args):
    base = ["compare", "--model", "python:countmod:make", "--num", 6, "--artifacts", tmp_path / "arts", "--quiet"]
    return cli(*base, *args)


def test_compare_with_a_missing_student_fails_before_any_call(tmp_path, cli, counting):
    r = compare(cli, tmp_path, "--solvers", "ddim,dpm++,dlms", "--nfe", "3,4")
    assert r.exit_code == 2 and counting.CALLS == [0, 0], r.output
    assert "dlms at NFE 3, 4" in r.output and "--recipe RECIPE" in r.output and "sdistill distill" in r.output
    assert "Traceback" not in r.output


def test_compare_checks_artifacts_metrics_and_outputs_before_any_call(tmp_path, cli, counting, monkeypatch, tiny64):
    # An artifact made for another model: refused, with what to do (compare has no --force).
    meta = artifacts.new_meta("dode", base_solver="euler", nfe=3, afs=False, model="gmm:x", model_fingerprint="f0")
    art = artifacts.save(
        artifacts.Artifact(meta, {"lambdas": np.zeros(3), "grid": plan("euler", 3, tiny64).sigmas.numpy()}),
        tmp_path / "other.npz",
    )
    r = compare(cli, tmp_path, "--solvers", f"euler,{art}", "--nfe", "3")
    assert r.exit_code == 2 and "made for model gmm:x" in r.output and "--force" not in r.output
    assert "drop it from --solvers" in r.output
    # FID without the Inception weights, an output under a file: said before the reference solve.
    monkeypatch.delenv("SDISTILL_INCEPTION", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    r = compare(cli, tmp_path, "--solvers", "euler", "--nfe", "3", "--metric", "rmse,fid")
    assert r.exit_code == 2 and "--inception" in r.output and "inception-2015-12-05.pt" in r.output
    assert INCEPTION_URL in r.output and len(r.output.strip().splitlines()) == 1  # one line: the URL is whole
    (tmp_path / "file").write_text("x")
    for flag in ("--json", "--csv", "--plot", "--grid"):
        r = compare(cli, tmp_path, "--solvers", "euler", "--nfe", "3", flag, tmp_path / "file" / "x")
        assert r.exit_code == 2 and f"{flag}: cannot write" in r.output
    assert counting.CALLS == [0, 0]


def test_compare_keeps_results_measured_before_a_failure(tmp_path, cli, counting):
    counting.FAIL_AT[0] = 4  # euler at NFE 3 makes 3 calls; dpm++ fails on its first
    r = compare(cli, tmp_path, "--solvers", "euler,dpm++", "--nfe", "3", "--json", tmp_path / "c.json")
    assert r.exit_code == 1 and "the model broke" in r.output
    assert counting.CALLS[0] > 256 and counting.CALLS[1] == 4  # the counter counts: the reference, euler, dpm++
    assert "kept the 1 results measured before the failure" in r.output and "euler" in r.output
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [(x["solver"], x["nfe"]) for x in rows] == [("euler", 3)]


def test_compare_says_up_front_what_it_will_distill(tmp_path, cli, recipe_file):
    recipe = recipe_file(
        tmp_path / "r.yaml",
        name="c",
        teacher={"steps": 16, "num_samples": 60, "batch": 60, "cache": str(tmp_path / "cache")},
        student={"method": "dode", "nfe": 3, "base": "euler"},
        train={"samples": 30, "heldout": 20},
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
        20,
    )
    assert r.exit_code == 0, r.output
    up_front = r.output.index("no artifact in")
    assert "dode at NFE 3, 4: distilling these 2 from the teacher cache" in r.output
    assert up_front < r.output.index("teacher (60 of 60 left)")  # said before the teacher runs
    assert "acceleration: dode at NFE 3:" in r.output


def test_progress_lines_off_a_terminal(tmp_path, cli, monkeypatch, recipe_file):
    monkeypatch.setenv("SDISTILL_PROGRESS_SECONDS", "0")
    r = cli("sample", "--model", "gmm:tiny", "--num", 8, "--batch", 2, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("sampling 8 seeds: ")]
    assert [x.split(": ")[1].split(" ")[0] for x in lines] == ["2/8", "4/8", "6/8", "8/8", "8/8"]
    assert "~0:00:0" in lines[0] and lines[-1].endswith("(done)")  # an estimate, then the end
    r = cli("compare", "--model", "gmm:tiny", "--solvers", "euler", "--nfe", 3, "--num", 4)
    assert r.exit_code == 0 and "reference: RK4 in log sigma, 256 steps, float64, 4 seeds: 4/4" in r.output
    assert "sampling 1 solver x NFE cells: 4/4" in r.output
    recipe = recipe_file(
        tmp_path / "r.yaml",
        teacher={"steps": 8, "num_samples": 30, "batch": 10, "cache": str(tmp_path / "c")},
        student={"method": "dlms", "nfe": 3},
        train={"heldout": 10, "validation": 5, "iterations": 6, "eval_every": 3, "patience": 1, "batch": 8},
    )
    r = cli("teacher", recipe, "--num", 20)
    assert r.exit_code == 0 and "teacher (20 of 20 left): 20/20 (100%)" in r.output
    r = cli("teacher", recipe)  # resumed: the bar counts what is left
    assert r.exit_code == 0 and "teacher (10 of 30 left): 10/10 (100%)" in r.output, r.output
    r = cli("distill", recipe, "--out", tmp_path / "d.npz")
    assert r.exit_code == 0, r.output
    assert "distill dlms: 1/6" in r.output and "(done)" in r.output and "acceleration:" in r.output


def test_bars_end_at_their_real_total_and_draw_nothing_before_work(monkeypatch):
    monkeypatch.setenv("SDISTILL_PROGRESS_SECONDS", "1000")
    with err.capture() as cap:
        with Bar(10, "work", console=err) as bar:
            bar(3)
            bar(1)
    assert cap.get().strip().startswith("work: 4/4 (100%)")  # stopped early: the bar ends at what was done
    with err.capture() as cap:
        with pytest.raises(ValueError):
            with Bar(10, "work", console=err):
                raise ValueError("bad input found before any work")
    assert cap.get() == ""  # no empty 0/10 bar before the error
    with err.capture() as cap:
        with Bar(10, "work", console=err, disabled=True) as bar:
            bar(10)
    assert cap.get() == ""


def test_no_empty_bar_before_an_error(tmp_path, cli, monkeypatch, recipe_file):
    monkeypatch.setenv("SDISTILL_PROGRESS_SECONDS", "0")
    recipe = recipe_file(
        tmp_path / "r.yaml",
        teacher={"steps": 8, "num_samples": 30, "batch": 10, "cache": str(tmp_path / "c")},
        student={"method": "dlms", "nfe": 3},
        train={"heldout": 10, "validation": 25},
    )
    r = cli("distill", recipe)
    assert r.exit_code == 2 and "train.validation: 25 leaves no training trajectories out of 20" in r.output
    assert r.output.startswith(f"error: {recipe}: ") and not (tmp_path / "c").exists()  # before the teacher
    # An error the method finds once it starts: the teacher's lines, but no distill bar stuck at 0/N.
    recipe = recipe_file(
        tmp_path / "r.yaml",
        teacher={"steps": 8, "num_samples": 30, "batch": 10, "cache": str(tmp_path / "c")},
        student={"method": "dlms", "nfe": 3, "order": 5, "init": "plms"},
        train={"heldout": 10, "validation": 5},
    )
    r = cli("distill", recipe)
    assert r.exit_code == 2 and "plms init has coefficients up to order 4" in r.output
    assert "teacher (30 of 30 left): 30/30" in r.output and "distill dlms" not in r.output


def test_huge_nfe_warns(tmp_path, cli):
    r = cli("sample", "--model", "gmm:tiny", "--solver", "euler", "--nfe", 1001, "--num", 1, "--out", tmp_path / "o")
    assert r.exit_code == 0 and "warning: --nfe 1001 is far above the few-step range" in r.output
    r = cli("sample", "--model", "gmm:tiny", "--solver", "euler", "--nfe", 1000, "--num", 1, "--out", tmp_path / "o")
    assert r.exit_code == 0 and "warning" not in r.output


def test_errors_say_what_to_do_next(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("compare", "--solvers", "euler")
    assert r.exit_code == 2 and "one of --recipe and --model" in r.output and "sdistill compare --model" in r.output
    r = cli("sample", "--solver", "out/dlms.npz")
    assert r.exit_code == 2 and "no such solver artifact" in r.output and "sdistill distill RECIPE" in r.output
    (tmp_path / "notes.txt").write_text("not a solver\n")
    r = cli("sample", "--solver", "notes.txt")
    assert r.exit_code == 2 and "not an NPZ or YAML solver artifact" in r.output and "pickled" not in r.output
    assert "sdistill solvers" in r.output
    # A recipe's model that is not there: named as the recipe's model.spec (no --model was given), with the
    # command that makes a diffusers folder from a CompVis checkpoint.
    (tmp_path / "lsun.yaml").write_text(
        f"name: l\nmodel: {{spec: 'diffusers:{tmp_path}/ldm'}}\nteacher: {{cache: {tmp_path}/c}}\n"
    )
    r = cli("teacher", tmp_path / "lsun.yaml")
    assert r.exit_code == 2 and "lsun.yaml: model.spec 'diffusers:" in r.output and "--model" not in r.output
    assert "sdistill convert ldm" in r.output
    r = cli("distill", tmp_path / "lsun.yaml")
    assert r.exit_code == 2 and "sdistill convert ldm" in r.output
    monkeypatch.delenv("SDISTILL_MODELS", raising=False)
    (tmp_path / "env.yaml").write_text("model: {spec: 'edm:${SDISTILL_MODELS}/m.pkl'}\n")
    r = cli("teacher", tmp_path / "env.yaml")
    assert r.exit_code == 2 and "export SDISTILL_MODELS=" in r.output


def test_help_says_what_the_commands_take(cli):
    r = cli("compare", "--help")
    assert r.exit_code == 0 and "One of --recipe/--model" in " ".join(r.output.split())
    r = cli("distill", "--help")
    assert "sfd" in r.output
    r = cli("models")
    assert "Stable Diffusion" in r.output and "convert ldm" in r.output


def test_terminal_bar_starts_at_the_first_tick_and_ends_at_the_real_total():
    import io

    from rich.console import Console

    buf = io.StringIO()
    with Bar(10, "work", console=Console(file=buf, force_terminal=True, width=100)) as bar:
        bar(3)
        bar(1, info="x")
    text = buf.getvalue()
    assert "0/10" not in text and "3/10" in text and "4/4" in text


def test_pictures_say_what_they_show(tmp_path, cli):
    from PIL import Image

    from solverdistill.images import caption, label_rows
    from solverdistill.samples import picture_title

    meta = {"model": "gmm:cifar", "solver": "dlms", "nfe": 5, "artifact": "out/q_dlms_nfe5.npz"}
    assert picture_title(meta, 500, 7, 64).startswith("the first 64 of 500 samples, seeds 7..70; model gmm:cifar")
    assert picture_title(meta, 500, 7, 500).startswith("500 samples, seeds 7..506;")
    assert "solver dlms (q_dlms_nfe5.npz) at NFE 5" in picture_title(meta, 64, 0, 64)
    grid = np.zeros((64, 256, 3), dtype=np.uint8)
    assert caption(grid, "a few words").shape == (64 + 15, 256, 3) and caption(grid, "a few words")[:15].any()
    labelled = label_rows(grid, ["reference", "euler, NFE 5"])
    assert labelled.shape == (64, 256 + 150, 3) and labelled[:32, :150].any() and labelled[32:, :150].any()
    r = cli("sample", "--model", "gmm:shape=1x8x8,components=2,rank=2", "--num", 4, "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "o" / "grid.png") as im:
        assert im.size[1] > 2 * 8  # a 2x2 grid of 8x8 images under its caption
