import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from solverdistill import artifacts, students
from solverdistill.cli import app
from solverdistill.models import resolve
from solverdistill.recipes import load_recipe
from solverdistill.sampling import plan
from solverdistill.solvers.common import afs_denoised
from solverdistill.solvers.multistep import dpmpp_table, sample_multistep
from solverdistill.students.dlms import DLMS, DLMSStudent, initial_grid
from solverdistill.students.dode import Extrapolated, closed_form, landing
from solverdistill.teacher import TeacherCache
from solverdistill.teacher.run import run_teacher

from conftest import noise

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    path = root / "r.yaml"
    path.write_text(f"""name: tiny
model: {{spec: gmm:tiny}}
teacher: {{steps: 64, num_samples: 140, batch: 70, cache: '{root / "cache"}', compute_dtype: float64}}
student: {{method: dlms, nfe: 4}}
train: {{iterations: 40, batch: 32, heldout: 32, validation: 16, eval_every: 10}}
output: '{root / "dlms.npz"}'
""")
    rec = load_recipe(path)
    run_teacher(rec)
    return rec


# --- DLMS ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("afs", [True, False])
def test_untrained_dlms_with_dpmpp_init_is_dpmpp3m(tiny64, afs):
    cfg = DLMSStudent(nfe=5, afs=afs, init="dpm++", schedule="logsnr")
    student = DLMS(cfg, initial_grid(cfg, 0.002, 80.0)).double()
    x0 = noise(tiny64, 6)
    with torch.no_grad():
        got = student.solve(tiny64, x0)
    grid = student.init_grid
    want = sample_multistep(tiny64, x0, grid, dpmpp_table(grid, 3, lower_order_final=True), afs=afs)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_untrained_dlms_with_plms_init_is_the_plms_rule(tiny64):
    cfg = DLMSStudent(nfe=5, afs=True, init="plms")
    student = DLMS(cfg, initial_grid(cfg, 0.002, 80.0)).double()
    x = noise(tiny64, 6)
    with torch.no_grad():
        got = student.solve(tiny64, x)
    s = student.init_grid.tolist()
    rules = [(1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24)]
    hist = []
    for i in range(len(s) - 1):
        den = afs_denoised(x, s[i]) if i == 0 else tiny64(x, torch.full((6,), s[i], dtype=torch.float64))
        hist.insert(0, den)
        a = rules[min(i + 1, 4) - 1]
        d_hat = sum(c * h for c, h in zip(a, hist))
        x = (s[i + 1] / s[i]) * x + (1 - s[i + 1] / s[i]) * d_hat
    assert torch.allclose(got, x, atol=1e-6, rtol=0)


def test_designer_size_and_monotone_learned_grid(tiny64):
    cfg = DLMSStudent(nfe=5)
    student = DLMS(cfg, initial_grid(cfg, 0.002, 80.0)).double()
    n_params = sum(p.numel() for p in student.designer.parameters())
    assert 8000 < n_params < 10000
    with torch.no_grad():
        for p in student.designer.head.parameters():
            p.normal_(0, 3.0)  # a wild designer still gives a monotone grid ending at t_min
    seen = []
    student.solve(tiny64, noise(tiny64, 5), callback=lambda info: seen.append(info["sigma_next"]))
    times = torch.stack(seen, 1)
    assert (times[:, 1:] < times[:, :-1]).all() and torch.allclose(times[:, -1], torch.tensor(0.002, dtype=torch.float64))


def test_short_fit_lowers_heldout_loss(tiny_recipe):
    method = students.get("dlms")
    s, t = students.configs(method, tiny_recipe.student, tiny_recipe.train)
    cache = TeacherCache.open(tiny_recipe.cache_dir())
    art = method.fit(cache, resolve("gmm:tiny", dtype=torch.float64), s, t)
    history = art.meta["training"]["validation_rmse_history"]
    assert min(r for _, r in history[1:]) < history[0][1]
    assert art.meta["training"]["skipped_steps"] == 0


# --- D-ODE --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base, nfe, afs", [("dpm++3m", 4, False), ("heun", 5, True), ("dpm2", 4, False),
                                            ("unipc", 4, True)])
def test_dode_closed_form_equals_brute_force_minimisation(tiny_recipe, base, nfe, afs):
    method = students.get("dode")
    s, t = students.configs(method, {"method": "dode", "nfe": nfe, "base": base, "afs": afs},
                            {"samples": 40, "heldout": 32})
    cache = TeacherCache.open(tiny_recipe.cache_dir())
    model = resolve("gmm:tiny", dtype=torch.float64)
    lams = method.fit(cache, model, s, t).arrays["lambdas"]
    assert lams[0] == 0 and np.all(np.isfinite(lams))
    p = plan(base, nfe, 0.002, 80.0, afs=afs)
    idx = np.arange(40)
    x = torch.from_numpy(cache.get("noise", idx)).double() * 80
    for k in (1, nfe - 1):
        lams[k] = closed_form(p, model, cache, [idx], list(lams[:k]), k)  # the candidate, before the safeguard

        def loss(lam):
            out, sig = landing(p, model, x, list(lams[:k]) + [lam], k)
            target = cache.states_at(idx, sig[:, None], dtype=torch.float64)[:, 0]
            return float((out - target).pow(2).sum())
        lo, hi = lams[k] - 2, lams[k] + 2  # golden-section search on the same loss
        g = (math.sqrt(5) - 1) / 2
        for _ in range(80):
            a, b = hi - g * (hi - lo), lo + g * (hi - lo)
            lo, hi = (lo, b) if loss(a) < loss(b) else (a, hi)
        assert abs((lo + hi) / 2 - lams[k]) < 1e-6, (k, lams[k], (lo + hi) / 2)


def test_dode_beats_its_base_solver(tiny_recipe):
    r = cli("distill", tiny_recipe.path, "--method", "dode", "--nfe", 4, "--out", tiny_recipe.cache_dir() / "d.yaml",
            "--quiet")
    assert r.exit_code == 0, r.output
    art = artifacts.load(tiny_recipe.cache_dir() / "d.yaml")
    assert art.meta["metrics"]["heldout_rmse"] < art.meta["metrics"]["initial_rmse"]


def test_extrapolated_wrapper_counts_calls(tiny64):
    calls = []
    wrapped = Extrapolated(lambda x, s, c=None: (calls.append(1), x * 0 + len(calls))[1], [0.0, 0.5, 2.0])
    x = torch.zeros(2, 3)
    outs = [wrapped(x, torch.ones(2)) for _ in range(3)]
    assert [float(o[0, 0]) for o in outs] == [1.0, 2.5, 5.0]


# --- distill, artifacts, sampling with them -----------------------------------------------------------------

def test_distill_writes_artifact_and_samples_with_it(tiny_recipe, tmp_path):
    r = cli("distill", tiny_recipe.path, "--quiet")
    assert r.exit_code == 0, r.output
    assert "best handcrafted" in r.output
    path = tiny_recipe.output
    meta = artifacts.load(path).meta
    for key in ("format", "format_version", "method", "base_solver", "nfe", "network_passes", "afs", "grid",
                "model_fingerprint", "teacher", "training", "metrics", "created", "version", "cost"):
        assert key in meta, key
    r = cli("sample", "--solver", path, "--num", 5, "--out", tmp_path / "s", "--quiet")
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "s" / "samples.npz") as f:
        m = json.loads(str(f["meta"][()]))
        assert m["artifact"] == str(path) and m["nfe"] == 4 and f["grids"].shape == (5, 6)
        assert np.all(np.diff(f["grids"], axis=1) < 0)
    r = cli("sample", "--solver", path, "--nfe", 6, "--out", tmp_path / "s2", "--quiet")
    assert r.exit_code == 2 and "NFE 4" in r.output
    r = cli("sample", "--solver", path, "--model", "gmm:tiny,seed=9", "--out", tmp_path / "s3", "--quiet")
    assert r.exit_code == 2 and "--force" in r.output
    r = cli("inspect", path)
    assert r.exit_code == 0 and "designer.head.weight" in r.output


def test_global_dlms_yaml_round_trip(tiny_recipe, tmp_path):
    model = resolve("gmm:tiny", dtype=torch.float64)
    method = students.get("dlms")
    s, t = students.configs(method, {"method": "dlms", "nfe": 3, "designer": "global"},
                            {"iterations": 5, "heldout": 32, "eval_every": 5})
    art = method.fit(TeacherCache.open(tiny_recipe.cache_dir()), model, s, t)
    for name in ("a.yaml", "a.npz"):
        artifacts.save(art, tmp_path / name)
        back = artifacts.load(tmp_path / name, fingerprint=model.fingerprint)
        x0 = noise(model, 4)
        with torch.no_grad():
            assert torch.allclose(method.load(back, model).solve(model, x0), method.load(art, model).solve(model, x0))


class Boom:
    def __reduce__(self):
        import os
        return (os.system, ("touch BOOM_EXECUTED",))


@pytest.mark.parametrize("tamper, message", [
    ("bad_json", "not valid JSON"), ("no_meta", "missing the 'meta'"), ("no_lambdas", "missing array 'lambdas'"),
    ("misshaped", "has shape"), ("version", "unknown format_version"), ("pickle", "pickled object"),
    ("yaml_bad", "malformed YAML"), ("nan", "finite"),
])
def test_tampered_artifacts_exit_2(tiny_recipe, tmp_path, monkeypatch, tamper, message):
    monkeypatch.chdir(tmp_path)
    meta = artifacts.new_meta("dode", base_solver="euler", nfe=3, afs=False, model="gmm:tiny",
                              model_fingerprint=resolve("gmm:tiny").fingerprint, grid=[80.0, 1.0, 0.1, 0.002])
    arrays = {"lambdas": np.zeros(3), "grid": np.array([80.0, 1.0, 0.1, 0.002])}
    path = tmp_path / "a.npz"
    if tamper == "bad_json":
        np.savez(path, meta=np.array("{not json"), **arrays)
    elif tamper == "no_meta":
        np.savez(path, **arrays)
    elif tamper == "no_lambdas":
        np.savez(path, meta=np.array(json.dumps(meta)), grid=arrays["grid"])
    elif tamper == "misshaped":
        np.savez(path, meta=np.array(json.dumps(meta)), lambdas=np.zeros(5), grid=arrays["grid"])
    elif tamper == "version":
        np.savez(path, meta=np.array(json.dumps({**meta, "format_version": 99})), **arrays)
    elif tamper == "pickle":
        np.savez(path, meta=np.array(json.dumps(meta)), lambdas=np.array([Boom()], dtype=object), grid=arrays["grid"])
    elif tamper == "nan":
        np.savez(path, meta=np.array(json.dumps(meta)), lambdas=np.array([0, np.nan, 1.0]), grid=arrays["grid"])
    else:
        path = tmp_path / "a.yaml"
        path.write_text("meta: {format: [unclosed\n")
    r = cli("sample", "--solver", path, "--num", 2, "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "BOOM_EXECUTED").exists()


def test_bad_student_keys_name_the_path(tiny_recipe, tmp_path):
    text = open(tiny_recipe.path).read().replace("student: {method: dlms, nfe: 4}", "student: {method: dlms, nfe: 4, ordr: 3}")
    (tmp_path / "r.yaml").write_text(text)
    r = cli("distill", tmp_path / "r.yaml", "--quiet")
    assert r.exit_code == 2 and "student.ordr: unknown key" in r.output
    r = cli("distill", tiny_recipe.path, "--method", "magic", "--quiet")
    assert r.exit_code == 2 and "unknown method" in r.output


def test_shipped_recipes_are_valid(monkeypatch):
    from pathlib import Path
    monkeypatch.setenv("SDISTILL_MODELS", "/models")
    paths = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
    assert len(paths) >= 7
    for path in paths:
        rec = load_recipe(path)
        students.configs(students.get(rec.student["method"]), rec.student, rec.train)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_low_orders_with_dpmpp_init(tiny64, order):
    cfg = DLMSStudent(nfe=4, order=order, init="dpm++")
    student = DLMS(cfg, initial_grid(cfg, 0.002, 80.0)).double()
    assert torch.allclose(student.init_coefs.sum(1), torch.ones(5, dtype=torch.float64))
    with torch.no_grad():
        assert torch.isfinite(student.solve(tiny64, noise(tiny64, 2))).all()


def test_afs_step_never_reads_a_stale_bottleneck(tiny64):
    class Hooked:
        """A model whose bottleneck hook is set on each call, like the EDM backend's."""
        sigma_min, sigma_max, shape = 0.002, 80.0, tiny64.shape
        last_features = None

        def __call__(self, x, sigma, cond=None):
            self.last_features = torch.randn(x.shape[0], 64, dtype=x.dtype)
            return tiny64(x, sigma)

    cfg = DLMSStudent(nfe=3, afs=True, features="bottleneck")
    student = DLMS(cfg, initial_grid(cfg, 0.002, 80.0)).double()
    m = Hooked()
    with torch.no_grad():
        student.solve(m, noise(tiny64, 4))
        student.solve(m, noise(tiny64, 3))  # a smaller batch after a bigger one


def test_endpoint_loss_needs_a_final_weight(tiny_recipe):
    method = students.get("dlms")
    s, t = students.configs(method, {"method": "dlms", "nfe": 3}, {"loss": "endpoint", "final_weight": 0.0,
                                                                     "heldout": 32, "iterations": 1})
    from solverdistill.errors import BadInput
    with pytest.raises(BadInput, match="final_weight"):
        method.fit(TeacherCache.open(tiny_recipe.cache_dir()), resolve("gmm:tiny", dtype=torch.float64), s, t)
