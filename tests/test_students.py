"""solverdistill.students: the registry and plugin seam (students/__init__.py), DLMS (dlms.py) and D-ODE (dode.py).
SFD has its own file (test_sfd.py)."""

import json
import math
import sys

import numpy as np
import pytest
import torch

from solverdistill import artifacts, students
from solverdistill.artifacts import Artifact
from solverdistill.errors import BadInput
from solverdistill.generate import CountingDenoiser, generate
from solverdistill.models import resolve
from solverdistill.recipes import load_recipe
from solverdistill.solvers import Solver, plan
from solverdistill.solvers.base import afs_denoised
from solverdistill.solvers.multistep import TableSource, run_multistep
from solverdistill.solvers.tables import ADAMS_BASHFORTH, dpmpp_table
from solverdistill.students.dlms import DLMS, DLMSStudent, initial_grid, pooled
from solverdistill.students.dode import DODESolver, Extrapolated, closed_form, landing
from solverdistill.teacher import TeacherCache
from solverdistill.teacher.run import run_teacher


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory, recipe_file):
    root = tmp_path_factory.mktemp("students")
    path = recipe_file(
        root / "r.yaml",
        name="tiny",
        output=root / "dlms.npz",
        teacher={
            "steps": 64,
            "num_samples": 140,
            "batch": 70,
            "cache": str(root / "cache"),
            "compute_dtype": "float64",
        },
        student={"method": "dlms", "nfe": 4},
        train={"iterations": 40, "batch": 32, "heldout": 32, "validation": 16, "eval_every": 10},
    )
    rec = load_recipe(path)
    run_teacher(rec)
    return rec


@pytest.fixture(scope="module")
def cache(tiny_recipe):
    return TeacherCache.open(tiny_recipe.cache_dir())


def untrained_dlms(**settings):
    cfg = DLMSStudent(**settings)
    return DLMS(cfg, initial_grid(cfg, 0.002, 80.0)).double()


def perturbed_dlms(**settings):
    """A DLMS student whose zero-initialised heads are set to random values: a 'wild' designer."""
    student = untrained_dlms(**settings)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.designer.head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 3.0)
    return student


# --- the registry ---------------------------------------------------------------------------------------------------


def test_builtin_methods_are_registered():
    assert {"dlms", "dode", "sfd"} <= set(students.names())
    m = students.get("dlms")
    assert isinstance(m, students.Method) and m.name == "dlms" and m.summary
    assert issubclass(m.train_section, students.TrainSection)
    s_keys, t_keys = m.keys()
    assert {"method", "nfe", "order", "afs"} <= s_keys and {"samples", "heldout", "device", "lr"} <= t_keys
    s, t = m.configs({"method": "dlms", "nfe": 3}, {"iterations": 2})
    assert isinstance(s, DLMSStudent) and s.nfe == 3 and t.iterations == 2 and t.heldout == 256
    with pytest.raises(BadInput, match="unknown method 'magic'; choose one of .*dlms"):
        students.get("magic")


def test_stored_settings_are_validated():
    art = Artifact({"method": "dlms"}, {}, "a.npz")
    with pytest.raises(BadInput, match="a.npz: meta.student .* is missing"):
        students.stored_settings(art, DLMSStudent)
    art.meta["student"] = {"method": "dlms", "order": 0}
    with pytest.raises(BadInput, match="a.npz: meta.student.order: must be >= 1"):
        students.stored_settings(art, DLMSStudent)
    art.meta["student"] = {"method": "dlms", "order": 2}
    assert students.stored_settings(art, DLMSStudent).order == 2


# --- a plugin student from outside the package ----------------------------------------------------------------------

PLUGIN = '''
"""A student method living outside solverdistill: euler on the model with its denoiser scaled by one number."""

from dataclasses import dataclass, field

import numpy as np
import torch

from solverdistill.artifacts import Artifact, new_meta
from solverdistill.solvers import plan
from solverdistill.students import Method, TrainSection


@dataclass
class ShrinkStudent:
    method: str = "shrink"
    nfe: int = field(default=3, metadata={"min": 1})


@dataclass
class ShrinkTrain(TrainSection):
    candidates: str = "0.9,0.95,1.0,1.05,1.1"


class Shrunk:
    """The wrapped model: D(x, sigma) times the fitted scale."""

    def __init__(self, model, scale):
        self.model, self.scale = model, scale

    def __call__(self, x, sigma, cond=None):
        return self.scale * self.model(x, sigma, cond)


class ShrinkSolver:
    afs = False

    def __init__(self, base, scale):
        self.base, self.scale, self.nfe = base, scale, base.nfe

    @property
    def network_passes(self):
        return self.base.network_passes

    def describe(self):
        return {**self.base.describe(), "solver": "shrink", "scale": self.scale}

    def solve(self, model, x, cond=None, callback=None):
        return self.base.solve(Shrunk(model, self.scale), x, cond, callback)


def fit(cache, model, s, t, progress=None):
    idx, _ = cache.split(t.samples, t.heldout)
    x, cond = cache.start(idx, model)
    target = cache.endpoints(idx)
    base = plan("euler", s.nfe, model)
    mse = {}
    with torch.no_grad():
        for c in (float(v) for v in t.candidates.split(",")):
            mse[c] = float((ShrinkSolver(base, c).solve(model, x, cond).double().cpu() - target).pow(2).mean())
            if progress:
                progress(1)
    best = min(mse, key=mse.get)
    meta = new_meta("shrink", nfe=s.nfe, network_passes=s.nfe * model.passes_per_call, afs=False,
                    model=model.spec, model_fingerprint=model.fingerprint,
                    training={"candidates": list(mse), "mse": list(mse.values())})
    return Artifact(meta, {"scale": np.array([best])})


def load(artifact, model):
    scale = float(artifact.array("scale", shape=(1,))[0])
    return ShrinkSolver(plan("euler", int(artifact.meta["nfe"]), model), scale)


def untrained(artifact):
    return Artifact(artifact.meta, {"scale": np.ones(1)}, artifact.path)


METHOD = Method("shrink", ShrinkStudent, ShrinkTrain, fit, load, untrained, "euler with a fitted denoiser scale",
                work=lambda s, t: len(t.candidates.split(",")))
'''


@pytest.fixture
def shrink_plugin(tmp_path, monkeypatch, request):
    """An installed-looking package `sdistill_testplugin` whose entry point in `solverdistill.students` names
    its METHOD; the registry is made to scan entry points again, and forgets the plugin afterwards."""
    site = tmp_path / "site"
    (site / "sdistill_testplugin").mkdir(parents=True)
    (site / "sdistill_testplugin" / "__init__.py").write_text(PLUGIN)
    info = site / "sdistill_testplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sdistill-testplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[solverdistill.students]\nshrink = sdistill_testplugin:METHOD\n")
    students.names()  # the built-ins, registered for good before the registry is swapped
    monkeypatch.setattr(students, "METHODS", dict(students.METHODS))  # the plugin lands in a copy
    monkeypatch.setattr(students, "_loaded", False)
    monkeypatch.syspath_prepend(str(site))
    request.addfinalizer(lambda: sys.modules.pop("sdistill_testplugin", None))
    return site


def test_plugin_student_through_the_cli(shrink_plugin, tmp_path, monkeypatch, cli, recipe_file):
    monkeypatch.chdir(tmp_path)
    assert "shrink" not in students.METHODS
    r = cli("students")
    assert r.exit_code == 0 and "shrink" in r.output and "euler with a fitted denoiser scale" in r.output
    assert "dlms" in r.output  # the built-ins are still there
    recipe = recipe_file(
        tmp_path / "r.yaml",
        name="plug",
        output=tmp_path / "arts" / "shrink.npz",
        teacher={"steps": 16, "num_samples": 24, "batch": 24, "cache": str(tmp_path / "cache")},
        student={"method": "shrink", "nfe": 3},
        train={"samples": 16, "heldout": 8},
    )
    r = cli("distill", recipe, "--method", "shrink", "--quiet")
    assert r.exit_code == 0, r.output
    assert "shrink (this artifact)" in r.output and "best handcrafted" in r.output
    art = artifacts.load(tmp_path / "arts" / "shrink.npz")
    assert art.method == "shrink" and art.meta["nfe"] == 3
    training = art.meta["training"]
    assert art.arrays["scale"][0] == training["candidates"][int(np.argmin(training["mse"]))]
    assert set(art.meta["metrics"]["handcrafted_rmse"]) >= {"euler", "euler+afs", "dpm++3m", "heun+afs"}
    r = cli(
        "compare",
        "--recipe",
        recipe,
        "--solvers",
        "euler,shrink",
        "--nfe",
        3,
        "--num",
        8,
        "--artifacts",
        tmp_path / "arts",
        "--json",
        tmp_path / "out.json",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    assert "distilling" not in r.output  # the artifact was found, not fitted again
    rows = {x["solver"]: x for x in json.loads((tmp_path / "out.json").read_text())["rows"]}
    assert set(rows) == {"euler", "shrink"}
    assert rows["shrink"]["nfe"] == 3 and rows["shrink"]["network_passes"] == 3
    # Same 8 held-out seeds as distill measured (float32 here, float64 there).
    assert rows["shrink"]["value"] == pytest.approx(art.meta["metrics"]["heldout_rmse"], rel=1e-4)
    assert rows["euler"]["value"] == pytest.approx(art.meta["metrics"]["handcrafted_rmse"]["euler"], rel=1e-4)


def test_plugin_student_is_a_solver_counted_like_any_other(shrink_plugin, tmp_path, tiny64):
    method = students.get("shrink")
    assert method.name == "shrink" and "shrink" in students.names()
    art = method.untrained(Artifact(artifacts.new_meta("shrink", nfe=4, model_fingerprint="f"), {}))
    solver = method.load(art, tiny64)
    assert isinstance(solver, Solver)
    assert generate(tiny64, solver, [0, 1, 2]).nfe == 4


# --- DLMS -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("afs", [True, False])
def test_untrained_dlms_with_dpmpp_init_is_dpmpp3m(tiny64, noise, afs):
    student = untrained_dlms(nfe=5, afs=afs, init="dpm++", schedule="logsnr")
    x0 = noise(tiny64, 6)
    with torch.no_grad():
        got = student.solve(tiny64, x0)
    grid = student.init_grid
    want = run_multistep(tiny64, x0, TableSource(dpmpp_table(grid, 3, lower_order_final=True), grid), afs=afs)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_low_orders_with_dpmpp_init_are_dpmpp_of_that_order(tiny64, noise, order):
    student = untrained_dlms(nfe=4, order=order, init="dpm++")
    assert torch.allclose(student.init_coefs.sum(1), torch.ones(5, dtype=torch.float64))
    x0 = noise(tiny64, 2)
    with torch.no_grad():
        got = student.solve(tiny64, x0)
    g = student.init_grid
    want = run_multistep(tiny64, x0, TableSource(dpmpp_table(g, order, lower_order_final=True), g), afs=True)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)  # order 1 is DDIM, 2 is dpm++2m


def test_untrained_dlms_with_plms_init_is_the_plms_rule(tiny64, noise):
    student = untrained_dlms(nfe=5, afs=True, init="plms")
    x = noise(tiny64, 6)
    with torch.no_grad():
        got = student.solve(tiny64, x)
    s = student.init_grid.tolist()
    hist = []
    for i in range(len(s) - 1):
        den = afs_denoised(x, s[i]) if i == 0 else tiny64(x, torch.full((6,), s[i], dtype=torch.float64))
        hist.insert(0, den)
        a = ADAMS_BASHFORTH[min(i + 1, 4) - 1]
        d_hat = sum(c * h for c, h in zip(a, hist))
        x = (s[i + 1] / s[i]) * x + (1 - s[i + 1] / s[i]) * d_hat
    assert torch.allclose(got, x, atol=1e-6, rtol=0)


def test_dlms_is_a_solver():
    student = untrained_dlms(nfe=5, afs=True)
    assert isinstance(student, Solver) and student.nfe == 5 and student.afs and student.steps == 6
    student.passes_per_call = 2
    assert student.network_passes == 10
    d = student.describe()
    assert d["solver"] == "dlms" and d["nfe"] == 5 and len(d["grid"]) == 7 and d["order"] == 4


def test_untrained_dlms_steps_share_the_initial_grid(tiny64, noise, step_contract):
    student = untrained_dlms(nfe=4, afs=True)
    seen = []
    with torch.no_grad():
        student.solve(tiny64, noise(tiny64, 3), callback=seen.append)
    step_contract(seen, 3, 5)
    grid = student.init_grid
    for s in seen:
        assert torch.allclose(s.sigma, grid[s.i].expand(3), rtol=1e-12, atol=0)
        assert torch.allclose(s.sigma_next, grid[s.i + 1].expand(3), rtol=1e-12, atol=0)


def test_perturbed_dlms_reports_per_sample_times(tiny64, noise, step_contract):
    student = perturbed_dlms(nfe=5)
    assert 8000 < sum(p.numel() for p in student.designer.parameters()) < 10000
    seen = []
    x0 = noise(tiny64, 5)
    with torch.no_grad():
        student.solve(tiny64, x0, callback=seen.append)
    step_contract(seen, 5, 6)  # a wild designer still gives every sample a strictly decreasing grid ...
    assert torch.equal(seen[0].sigma, torch.full((5,), 80.0, dtype=torch.float64))
    for s in seen[1:]:  # ... of its own once the designer has seen its sample
        assert len(set(s.sigma.tolist())) > 1, (s.i, s.sigma)
    assert torch.equal(seen[-1].sigma_next, torch.full((5,), 0.002, dtype=torch.float64))  # ending at t_min


def test_train_pass_returns_the_loss_and_backpropagates_per_window(tiny64, noise):
    student = perturbed_dlms(nfe=4, afs=True)
    x0 = noise(tiny64, 3)
    target = torch.zeros_like(x0)

    def step_loss(n, t, x):
        return (x - target).pow(2).mean() * (n + 1)

    seen = []
    with torch.no_grad():
        final = student.solve(tiny64, x0, callback=seen.append)
    states = [s.x for s in seen[1:]] + [final]  # x_{n+1}, the state after step n
    want = sum(float((x - target).pow(2).mean()) * (n + 1) for n, x in enumerate(states))
    grads = {}
    for window in (0, 1, 2):
        student.designer.zero_grad(set_to_none=True)
        total = student.train_pass(tiny64, x0, None, step_loss, window=window)
        assert total == pytest.approx(want, rel=1e-10)
        grads[window] = torch.cat([p.grad.flatten() for p in student.designer.parameters() if p.grad is not None])
        assert grads[window].abs().sum() > 0
    # Windows cut the graph: the gradient is a truncation of the full one, and differs from it.
    assert not torch.allclose(grads[0], grads[1]) and not torch.allclose(grads[1], grads[2])


def test_afs_step_never_reads_a_stale_bottleneck(tiny64, noise):
    class Hooked:
        """A model whose bottleneck hook is set on each call, like the EDM backend's."""

        sigma_min, sigma_max, shape = 0.002, 80.0, tiny64.shape

        def __init__(self):
            self.last_features, self.hooks = None, []

        def __call__(self, x, sigma, cond=None):
            flat = x.flatten(1)
            self.last_features = torch.cat([flat, flat.flip(1)], 1) / sigma[:, None]  # 64 numbers from this call
            self.hooks.append(self.last_features)
            return tiny64(x, sigma)

    student = perturbed_dlms(nfe=3, afs=True, features="bottleneck")
    inputs = []
    student.designer.register_forward_hook(lambda mod, args, out: inputs.append(args[0].clone()))
    used = Hooked()
    x4, x3 = noise(tiny64, 4, seed=1), noise(tiny64, 3, seed=2)
    with torch.no_grad():
        student.solve(used, x4)
        inputs.clear()
        after = student.solve(used, x3)  # a smaller batch after a bigger one: the hook holds 4 stale rows
        fresh = student.solve(Hooked(), x3)
    assert torch.equal(after, fresh)
    # The AFS step (no network call) designs from the pooled AFS estimate; every other step from the hook of the
    # call it just made.
    assert torch.equal(inputs[0], pooled(afs_denoised(x3, 80.0)))
    assert len(inputs) == 8  # 4 steps of `after`, then 4 of `fresh`
    assert all(torch.equal(i, h) for i, h in zip(inputs[1:4], used.hooks[-3:]))
    with pytest.raises(BadInput, match="no bottleneck"):
        student.solve(tiny64, x3)


def test_dlms_load_checks_its_arrays(tiny64):
    student = untrained_dlms(nfe=3, designer="global")
    arrays = {f"designer.{k}": v.numpy() for k, v in student.designer.state_dict().items()}
    meta = artifacts.new_meta(
        "dlms", nfe=3, model_fingerprint=tiny64.fingerprint, student={"method": "dlms", "nfe": 3, "designer": "global"}
    )
    load = students.get("dlms").load
    good = student.init_grid.numpy()
    assert load(Artifact(meta, {**arrays, "init_grid": good}), tiny64).steps == 4
    for grid, message in ((good[:-1], "must hold 5 sigmas"), (good[::-1].copy(), "strictly decreasing")):
        with pytest.raises(BadInput, match=message):
            load(Artifact(meta, {**arrays, "init_grid": grid}, "a.npz"), tiny64)
    with pytest.raises(BadInput, match="missing array 'designer.table'"):
        load(Artifact(meta, {"init_grid": good}, "a.npz"), tiny64)


def test_short_fit_lowers_the_validation_error(tiny_recipe, cache, tiny64):
    method = students.get("dlms")
    s, t = method.configs(tiny_recipe.student, tiny_recipe.train)
    art = method.fit(cache, tiny64, s, t)
    history = art.meta["training"]["validation_rmse_history"]
    assert [it for it, _ in history] == [0, 10, 20, 30, 40]
    assert min(r for _, r in history[1:]) < history[0][1]
    assert art.meta["training"]["skipped_steps"] == 0 and art.meta["training"]["validation"] == 16


def test_global_dlms_yaml_round_trip(cache, tiny64, noise, tmp_path):
    method = students.get("dlms")
    s, t = method.configs(
        {"method": "dlms", "nfe": 3, "designer": "global"}, {"iterations": 5, "heldout": 32, "eval_every": 5}
    )
    art = method.fit(cache, tiny64, s, t)
    x0 = noise(tiny64, 4)
    with torch.no_grad():
        want = method.load(art, tiny64).solve(tiny64, x0)
        for name in ("a.yaml", "a.npz"):
            back = artifacts.load(artifacts.save(art, tmp_path / name), fingerprint=tiny64.fingerprint)
            assert torch.allclose(method.load(back, tiny64).solve(tiny64, x0), want, atol=1e-12, rtol=0)


def test_hybrid_designer_starts_at_the_rule_and_trains_both_parts(cache, tiny64, noise, tmp_path):
    """`designer: hybrid` is the network designer plus a per-step table: untrained it is the initial rule exactly
    (like the other designers), training moves the table and the network's head, and the artifact round-trips."""
    x0 = noise(tiny64, 3)
    with torch.no_grad():
        rule = untrained_dlms(nfe=3, designer="global").solve(tiny64, x0)
        hybrid = untrained_dlms(nfe=3, designer="hybrid")
        assert torch.equal(hybrid.solve(tiny64, x0), rule)
    net = untrained_dlms(nfe=3, designer="network")
    extra = sum(p.numel() for p in hybrid.designer.parameters()) - sum(p.numel() for p in net.designer.parameters())
    assert extra == hybrid.steps * (hybrid.order + 1)  # the table: one row of outputs per step
    method = students.get("dlms")
    s, t = method.configs({"method": "dlms", "nfe": 3, "designer": "hybrid"}, {"iterations": 5, "heldout": 32})
    art = method.fit(cache, tiny64, s, t)
    assert np.any(art.arrays["designer.table"] != 0) and np.any(art.arrays["designer.head.weight"] != 0)
    with torch.no_grad():
        want = method.load(art, tiny64).solve(tiny64, x0)
        back = artifacts.load(artifacts.save(art, tmp_path / "h.npz"), fingerprint=tiny64.fingerprint)
        assert torch.equal(method.load(back, tiny64).solve(tiny64, x0), want)
        assert torch.equal(method.load(method.untrained(back), tiny64).solve(tiny64, x0), rule)


def test_auto_schedule_starts_from_the_best_initial_grid(cache, tiny64):
    """`schedule: auto` scores every candidate grid's untrained rule on the validation trajectories and starts from
    the lowest; the artifact names the grid it chose, so it loads without knowing about `auto`."""
    from solverdistill.evaluation import cache_endpoints, rmse
    from solverdistill.students.dlms import AUTO_SCHEDULES

    method = students.get("dlms")
    s, t = method.configs(
        {"method": "dlms", "nfe": 3, "schedule": "auto"}, {"iterations": 0, "heldout": 32, "validation": 16}
    )
    art = method.fit(cache, tiny64, s, t)
    scores = art.meta["training"]["initial_rmse_by_schedule"]
    assert set(scores) == set(AUTO_SCHEDULES) and len(set(scores.values())) > 1  # the grids do differ here
    chosen = art.meta["student"]["schedule"]
    assert scores[chosen] == min(scores.values())
    train_idx, _ = cache.split(0, 32)
    val = train_idx[-16:]
    got = rmse(cache_endpoints(method.load(art, tiny64), tiny64, cache, val), cache.endpoints(val))
    assert got == pytest.approx(scores[chosen], rel=1e-9)  # 0 iterations: the chosen grid's untrained rule
    with pytest.raises(BadInput, match="student.schedule: auto"):
        initial_grid(DLMSStudent(schedule="auto"), 0.002, 80.0)


def test_auto_schedule_probe_scores_short_fits(cache, tiny64):
    """With `train.probe`, every candidate grid is trained briefly and the choice goes by the best validation RMSE
    of those fits, which never exceeds the untrained one (the fit keeps its best state, the start included)."""
    from solverdistill.students.dlms import AUTO_SCHEDULES

    method = students.get("dlms")
    cfg = {"iterations": 0, "heldout": 32, "validation": 16, "probe": 4, "eval_every": 2, "batch": 8, "lr": 0.05}
    s, t = method.configs({"method": "dlms", "nfe": 3, "schedule": "auto", "designer": "global"}, cfg)
    ticks = []
    art = method.fit(cache, tiny64, s, t, lambda n, info="": ticks.append(n))
    assert sum(ticks) == method.work(s, t) == 4 * len(AUTO_SCHEDULES)  # the progress bar counts the probes
    training = art.meta["training"]
    initial, probed = training["initial_rmse_by_schedule"], training["probe_rmse_by_schedule"]
    assert set(probed) == set(initial) == set(AUTO_SCHEDULES)
    assert all(probed[k] <= initial[k] for k in probed) and any(probed[k] < initial[k] for k in probed)
    assert probed[art.meta["student"]["schedule"]] == min(probed.values())
    # Without probe the untrained scores decide and no probe scores are written.
    s, t = method.configs({"method": "dlms", "nfe": 3, "schedule": "auto"}, cfg | {"probe": 0})
    assert method.fit(cache, tiny64, s, t).meta["training"]["probe_rmse_by_schedule"] == {}


def test_endpoint_loss_needs_a_final_weight(cache, tiny64):
    method = students.get("dlms")
    s, t = method.configs(
        {"method": "dlms", "nfe": 3}, {"loss": "endpoint", "final_weight": 0.0, "heldout": 32, "iterations": 1}
    )
    with pytest.raises(BadInput, match="final_weight"):
        method.fit(cache, tiny64, s, t)
    s, t = method.configs({"method": "dlms", "nfe": 3}, {"heldout": 32, "validation": 500})
    with pytest.raises(BadInput, match="train.validation: 500 leaves no training trajectories"):
        method.fit(cache, tiny64, s, t)


# --- D-ODE ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, nfe, afs", [("dpm++3m", 4, False), ("heun", 5, True), ("dpm2", 4, False), ("unipc", 4, True)]
)
def test_dode_closed_form_equals_brute_force_minimisation(cache, tiny64, base, nfe, afs):
    method = students.get("dode")
    s, t = method.configs({"method": "dode", "nfe": nfe, "base": base, "afs": afs}, {"samples": 40, "heldout": 32})
    lams = method.fit(cache, tiny64, s, t).arrays["lambdas"]
    assert lams[0] == 0 and np.all(np.isfinite(lams))
    p = plan(base, nfe, tiny64, afs=afs)
    idx = np.arange(40)
    x, _ = cache.start(idx, tiny64)
    for k in (1, nfe - 1):
        lams[k] = closed_form(p, tiny64, cache, [idx], list(lams[:k]), k)  # the candidate, before the safeguard

        def loss(lam, k=k):
            out, sig = landing(p, tiny64, x, list(lams[:k]) + [lam], k)
            target = cache.states_at(idx, sig[:, None], dtype=torch.float64)[:, 0]
            return float((out - target).pow(2).sum())

        lo, hi = lams[k] - 2, lams[k] + 2  # golden-section search on the same loss
        g = (math.sqrt(5) - 1) / 2
        for _ in range(80):
            a, b = hi - g * (hi - lo), lo + g * (hi - lo)
            lo, hi = (lo, b) if loss(a) < loss(b) else (a, hi)
        assert abs((lo + hi) / 2 - lams[k]) < 1e-6, (k, lams[k], (lo + hi) / 2)


def test_dode_beats_its_base_solver(tiny_recipe, cli):
    out = tiny_recipe.cache_dir() / "d.yaml"
    r = cli("distill", tiny_recipe.path, "--method", "dode", "--nfe", 4, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    art = artifacts.load(out)
    assert art.method == "dode" and art.meta["base_solver"] == "dpm++3m" and art.meta["nfe"] == 4
    assert art.meta["metrics"]["heldout_rmse"] < art.meta["metrics"]["initial_rmse"]


def test_extrapolated_wrapper_applies_one_lambda_per_call():
    calls = []

    def model(x, s, c=None):
        calls.append(1)
        return x * 0 + len(calls)  # call k returns the constant k

    wrapped = Extrapolated(model, [0.0, 0.5, 2.0])
    x = torch.zeros(2, 3)
    outs = [float(wrapped(x, torch.ones(2))[0, 0]) for _ in range(4)]
    # D~_k = D_k + lam_k (D_k - D_{k-1}); no predecessor for the first call, lam = 0 past the list.
    assert outs == [1.0, 2.5, 5.0, 4.0] and len(calls) == 4 and wrapped.k == 4


def test_dode_solver_counts_its_calls_and_describes_itself(tiny64, noise):
    base = plan("unipc", 5, tiny64, afs=True)
    solver = DODESolver(base, [0.0, 0.1, -0.2, 0.3, 0.0])
    assert isinstance(solver, Solver) and solver.nfe == 5 and solver.afs and solver.network_passes == 5
    counted = CountingDenoiser(tiny64)
    x0 = noise(tiny64, 2)
    out = solver.solve(counted, x0)
    assert counted.calls == 5 and not torch.allclose(out, base.solve(tiny64, x0))
    assert torch.equal(DODESolver(base, [0.0] * 5).solve(tiny64, x0), base.solve(tiny64, x0))  # lam = 0: the base
    d = solver.describe()
    assert d["solver"] == "dode[unipc]" and d["lambdas"] == [0.0, 0.1, -0.2, 0.3, 0.0] and d["afs"] is True


# --- distill, artifacts, sampling with them -------------------------------------------------------------------------


def test_distill_writes_artifact_and_samples_with_it(tiny_recipe, tmp_path, cli):
    r = cli("distill", tiny_recipe.path, "--quiet")
    assert r.exit_code == 0, r.output
    assert "best handcrafted" in r.output
    path = tiny_recipe.output
    meta = artifacts.load(path).meta
    for key in (
        "format",
        "format_version",
        "method",
        "base_solver",
        "nfe",
        "network_passes",
        "afs",
        "grid",
        "model_fingerprint",
        "teacher",
        "training",
        "metrics",
        "created",
        "version",
        "cost",
    ):
        assert key in meta, key
    assert meta["cost"]["teacher_nfe_per_sample"] == 65 and meta["metrics"]["heldout_samples"] == 32
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


def test_every_builtin_loads_its_untrained_artifact_as_a_solver(tiny64, cache):
    """What `distill` does for its 'initial' row: load(untrained(artifact)). Checked for D-ODE and DLMS here
    (SFD needs a network: test_sfd.py)."""
    for name, student, train in (
        ("dode", {"method": "dode", "nfe": 3, "base": "euler"}, {"samples": 10, "heldout": 32}),
        ("dlms", {"method": "dlms", "nfe": 3}, {"iterations": 0, "heldout": 32}),
    ):
        method = students.get(name)
        art = method.fit(cache, tiny64, *method.configs(student, train))
        solver = method.load(method.untrained(art), tiny64)
        assert isinstance(solver, Solver) and generate(tiny64, solver, [1, 2]).nfe == 3


# --- issue 12: DLMS is reproducible and does not depend on the batch size --------------------------------------------


def test_identical_dlms_runs_give_identical_artifacts(cache, tiny64):
    """Item 8: the designer's initial weights are seeded per restart, whatever the global random state."""
    method = students.get("dlms")
    s, t = method.configs({"method": "dlms", "nfe": 3}, {"iterations": 2, "restarts": 2, "batch": 8, "heldout": 32})
    arts = []
    for scramble in (1, 2):
        torch.manual_seed(scramble)  # the global state differs between the runs and must not matter
        before = torch.random.get_rng_state()
        arts.append(method.fit(cache, tiny64, s, t))
        assert torch.equal(torch.random.get_rng_state(), before)  # fit leaves the caller's random state alone
    a, b = arts
    assert a.arrays.keys() == b.arrays.keys()
    for k in a.arrays:
        assert a.arrays[k].dtype == b.arrays[k].dtype and np.array_equal(a.arrays[k], b.arrays[k]), k
    assert np.any(a.arrays["designer.head.weight"] != 0)  # it trained

    def timeless(meta):
        return {**meta, "created": None, "training": {**meta["training"], "seconds": None}}

    assert timeless(a.meta) == timeless(b.meta)


def elementwise_denoiser(x, sigma, cond=None):
    """A denoiser without matmuls (gmm's differ in float64 from batch to batch): sample i sees only itself."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))) if torch.is_tensor(sigma) else sigma
    return torch.tanh(x) / (1 + s**2)


elementwise_denoiser.sigma_min, elementwise_denoiser.sigma_max, elementwise_denoiser.shape = 0.002, 80.0, (2,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dlms_sampling_does_not_depend_on_the_batch_size(dtype, tiny64):
    """Item 9: the same seeds in batches of 1, 3 and 7 give bit-identical samples and per-sample grids (bound 0)."""
    model = resolve("gmm:tiny", dtype=dtype) if dtype == torch.float32 else elementwise_denoiser
    for p in ("dtype", "device", "passes_per_call"):
        if not hasattr(model, p):
            setattr(model, p, {"dtype": dtype, "device": torch.device("cpu"), "passes_per_call": 1}[p])
    torch.manual_seed(0)  # a random body, and random heads: every sample gets a grid of its own
    student = perturbed_dlms(nfe=5, afs=True).to(dtype)
    seeds = list(range(7))
    runs = {}
    for batch in (1, 3, 7):
        grids = {}

        def keep(chunk, step, grids=grids):
            for seed, sigma in zip(chunk, step.sigma.tolist()):
                grids.setdefault(seed, []).append(sigma)

        res = generate(model, student, seeds, batch=batch, callback=keep)
        runs[batch] = res.x, torch.tensor([grids[s] for s in seeds], dtype=torch.float64)
    assert len(set(runs[7][1][:, 2].tolist())) == 7  # the grids do differ from sample to sample
    for batch in (3, 7):
        assert torch.equal(runs[batch][0], runs[1][0]), (batch, (runs[batch][0] - runs[1][0]).abs().max())
        assert torch.equal(runs[batch][1], runs[1][1])
