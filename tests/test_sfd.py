"""solverdistill.students.sfd: fine-tuning the network for few-step euler (SFD), and SFD-v's step condition."""

import copy
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from solverdistill import artifacts, grids, students
from solverdistill.errors import BadInput
from solverdistill.generate import CountingDenoiser, generate, initial_noise
from solverdistill.models import resolve
from solverdistill.recipes import load_recipe
from solverdistill.solvers import Solver, plan
from solverdistill.students import sfd, step_adapters
from solverdistill.students.sfd import student_grid
from solverdistill.teacher import TeacherCache
from solverdistill.teacher.run import run_teacher

TINYTOY = textwrap.dedent("""
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
""")


@pytest.fixture(scope="module")
def toy(tmp_path_factory, recipe_file):
    """A small toy UNet importable as `python:tinytoy:...` (while this module runs), and its teacher cache."""
    root = tmp_path_factory.mktemp("sfd")
    (root / "tinytoy.py").write_text(TINYTOY)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        recipe_file(
            root / "r.yaml",
            name="sfd",
            model="python:tinytoy:make",
            output=root / "sfd.npz",
            teacher={"steps": 16, "num_samples": 40, "batch": 20, "cache": str(root / "cache")},
            student={"method": "sfd", "nfe": 2},
            train={"iterations": 6, "batch": 8, "heldout": 8, "lr": 1e-3},
        )
        run_teacher(load_recipe(root / "r.yaml"))
        yield root


@pytest.fixture(scope="module")
def fitted(toy):
    """The SFD student of the recipe (fitted once), its model and cache."""
    rec = load_recipe(toy / "r.yaml")
    method = students.get("sfd")
    s, t = method.configs(rec.student, rec.train)
    model = resolve(rec.model.spec)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    art = method.fit(TeacherCache.open(rec.cache_dir()), model, s, t)
    return art, model, before


def student_loss(solver, model, cache, idx):
    """SFD's objective: L1 of each student step's output to the teacher state at its next sigma."""
    grid = solver.plan.sigmas
    x, cond = cache.start(idx, model)
    states = []
    with torch.no_grad():
        final = solver.solve(model, x, cond, callback=lambda step: states.append(step.x))
    outs = states[1:] + [final]
    targets = cache.states_at(idx, grid[1:].numpy())
    return sum(float((o - targets[:, k]).abs().flatten(1).sum(1).mean()) for k, o in enumerate(outs))


def test_fine_tuning_lowers_the_student_loss_and_keeps_the_teacher(toy, fitted):
    art, model, before = fitted
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())
    method = students.get("sfd")
    tuned, original = method.load(art, model), method.load(method.untrained(art), model)
    assert not any(k.startswith("net.") for k in method.untrained(art).arrays)
    cache = TeacherCache.open(toy / "cache")
    idx = np.arange(16)
    assert student_loss(tuned, model, cache, idx) < student_loss(original, model, cache, idx)
    assert art.meta["training"]["iterations"] == 6 and art.meta["training"]["cleaned_gradients"] == 0


def test_sfd_solver_counts_calls_on_the_callers_counter(fitted):
    art, model, _ = fitted
    solver = students.get("sfd").load(art, model)
    assert isinstance(solver, Solver) and solver.nfe == 2 and solver.afs and solver.network_passes == 2
    assert generate(model, solver, [0, 1, 2], batch=2).nfe == 2
    counted = CountingDenoiser(model)
    with torch.no_grad():
        solver.solve(counted, torch.randn(2, *model.shape) * 80.0)
    assert counted.calls == 2  # its own network's calls, counted on the caller's counter
    d = solver.describe()
    assert d["solver"] == "sfd" and d["steps"] == 3 and d["grid"] == solver.plan.sigmas.tolist()


def test_sfd_reports_steps(fitted, step_contract):
    art, model, _ = fitted
    solver = students.get("sfd").load(art, model)
    seen = []
    x = torch.randn(2, *model.shape) * 80.0
    out = solver.solve(model, x, callback=seen.append)
    step_contract(seen, 2, 3)
    grid = solver.plan.sigmas
    assert all(torch.equal(s.sigma, torch.full((2,), float(grid[s.i]), dtype=torch.float64)) for s in seen)
    # SFD reports D too: the AFS estimate on the first step, the fine-tuned network's output after.
    assert torch.allclose(seen[0].denoised, x - 80.0 * x / np.sqrt(1 + 80.0**2))
    with torch.no_grad():
        assert torch.allclose(seen[1].denoised, solver.den(seen[1].x, seen[1].sigma.float()), atol=1e-6)
        assert not torch.allclose(seen[1].denoised, model(seen[1].x, seen[1].sigma.float()), atol=1e-6)
    assert torch.isfinite(out).all()


def test_artifact_round_trip_and_refusals(toy, cli):
    r = cli("distill", toy / "r.yaml", "--quiet")
    assert r.exit_code == 0, r.output
    outs = []
    for k in range(2):
        # python: specs run code, so the artifact's meta.model is not enough: the model is named explicitly.
        r = cli(
            "sample",
            "--solver",
            toy / "sfd.npz",
            "--model",
            "python:tinytoy:make",
            "--num",
            3,
            "--out",
            toy / f"s{k}",
            "--quiet",
        )
        assert r.exit_code == 0, r.output
        with np.load(toy / f"s{k}" / "samples.npz") as f:
            outs.append(f["x"])
            assert f["x"].shape == (3, 3, 32, 32)
    assert np.array_equal(outs[0], outs[1])
    r = cli("sample", "--solver", toy / "sfd.npz", "--model", "python:tinytoy:other", "--out", toy / "x", "--quiet")
    assert r.exit_code == 2 and "--force" in r.output
    r = cli(
        "sample",
        "--solver",
        toy / "sfd.npz",
        "--model",
        "python:tinytoy:other",
        "--force",
        "--out",
        toy / "x",
        "--quiet",
    )
    assert r.exit_code == 2 and "net.down2.weight" in r.output and "expected" in r.output


def test_sfd_v_needs_a_step_condition_and_runs_at_every_nfe(toy, fitted):
    method = students.get("sfd")
    s, t = method.configs({"method": "sfd", "nfe": 2, "variable": True}, {"iterations": 2, "heldout": 8})
    cache = TeacherCache.open(toy / "cache")
    with pytest.raises(BadInput, match="step condition"):
        method.fit(cache, resolve("python:tinytoy:plain"), s, t)
    with pytest.raises(BadInput, match="has none"):
        method.fit(cache, resolve("gmm:cifar"), s, t)
    model = resolve("python:tinytoy:make")
    art = method.fit(cache, model, s, t)  # accepts one: trains for NFE 2-5
    solver = method.load(art, model)
    x = torch.randn(2, *model.shape) * 80.0
    for nfe in (2, 5):
        at = solver.at_nfe(nfe)
        assert at.nfe == nfe and len(at.plan.sigmas) == nfe + 2 and at.step_condition == nfe
        assert torch.allclose(at.plan.sigmas, student_grid(at.settings, model, nfe))
        counted = CountingDenoiser(model)
        at.solve(counted, x)
        assert counted.calls == nfe and at.den.step_condition == nfe  # the network is told the number of steps
    fixed_art, fixed_model, _ = fitted  # plain SFD: tuned for its one NFE
    with pytest.raises(BadInput, match="only SFD-v"):
        method.load(fixed_art, fixed_model).at_nfe(3)


def test_step_lr_scale_moves_only_the_step_condition_faster(toy):
    """SFD-v's step embedding starts at zero; `train.step_lr_scale` multiplies its Adam lr alone. One Adam step
    moves each parameter by its lr (Adam's first step is lr * sign(gradient)), so after one update (one iteration
    at NFE 1: the AFS step and one trained step) the embedding has moved k times as far and every other weight
    the same."""
    method = students.get("sfd")
    cache = TeacherCache.open(toy / "cache")
    moved = {}
    for k in (1.0, 30.0):
        s, t = method.configs(
            {"method": "sfd", "nfe": 1, "variable": True, "nfe_set": "1"},
            {"iterations": 1, "heldout": 8, "batch": 4, "lr": 1e-4, "lr_schedule": "cosine", "step_lr_scale": k},
        )
        model = resolve("python:tinytoy:make")
        art = method.fit(cache, model, s, t)
        before = model.net.state_dict()
        moved[k] = {n: torch.from_numpy(art.arrays[f"net.{n}"]) - before[n] for n in before}
    embed = "step_embed.weight"
    row = moved[1.0][embed][1]  # the row of NFE 1, the only one trained
    assert torch.allclose(row.abs(), torch.full_like(row, 1e-4), rtol=0.05)
    assert torch.allclose(moved[30.0][embed][1], 30 * row, rtol=0.05)
    assert not moved[30.0][embed][2].any()  # untrained NFEs keep their zero rows
    for name in moved[1.0]:
        if name != embed:
            assert torch.allclose(moved[30.0][name], moved[1.0][name], atol=1e-7), name
    with pytest.raises(BadInput, match=r"train\.step_lr_scale: applies to SFD-v"):
        s, t = method.configs({"method": "sfd", "nfe": 2}, {"iterations": 1, "heldout": 8, "step_lr_scale": 10})
        method.fit(cache, resolve("python:tinytoy:make"), s, t)


def test_distance_is_the_summed_absolute_or_squared_error_per_step(toy):
    """`train.distance`: the reported first loss (lr 0, the whole training pool as one batch) is the sum over the
    trained steps of the batch mean of each row's summed |error| (l1) or squared error (l2) against the teacher."""
    method = students.get("sfd")
    cache = TeacherCache.open(toy / "cache")
    model = resolve("python:tinytoy:make")
    idx = np.sort(cache.split(0, 8)[0])
    got = {}
    for d in ("l1", "l2"):
        s, t = method.configs(
            {"method": "sfd", "nfe": 2}, {"iterations": 1, "heldout": 8, "batch": len(idx), "lr": 0.0, "distance": d}
        )
        got[d] = method.fit(cache, model, s, t).meta["training"]["first_loss"]
    grid = student_grid(s, model, 2)
    x, cond = cache.start(idx, model)
    targets = cache.states_at(idx, grid[1:].numpy(), dtype=x.dtype, device=x.device)
    errors = []
    euler = sfd.euler_plan(s, grid, 2)
    with torch.no_grad():
        euler.info.solve(
            model, x, euler.sigmas, cond=cond, afs=True,
            on_step=lambda k, sigma, out: errors.append((out - targets[:, k]).flatten(1)) or True,
        )  # fmt: skip
    trained = errors[1:]  # the AFS step calls no network
    assert len(trained) == 2
    assert got["l1"] == pytest.approx(sum(float(e.abs().sum(1).mean()) for e in trained), rel=1e-5)
    assert got["l2"] == pytest.approx(sum(float(e.pow(2).sum(1).mean()) for e in trained), rel=1e-5)
    with pytest.raises(BadInput, match="train.distance"):
        method.configs({"method": "sfd", "nfe": 2}, {"distance": "huber"})


def test_endpoint_loss_is_one_step_back_through_the_whole_student_run(toy, monkeypatch):
    """`train.loss: endpoint`: with plain gradient descent in place of Adam, one iteration moves the weights by
    -lr x the gradient of the batch mean of the last state's summed squared error to the teacher's output, taken
    through both network steps (not step by step), and reports that distance as its loss."""
    monkeypatch.setattr(sfd.torch.optim, "Adam", lambda groups, lr, betas: torch.optim.SGD(groups, lr=lr))
    method = students.get("sfd")
    cache = TeacherCache.open(toy / "cache")
    idx = np.sort(cache.split(0, 8)[0])
    lr, moved = 1e-4, {}
    for loss in ("steps", "endpoint"):
        s, t = method.configs(
            {"method": "sfd", "nfe": 2},
            {
                "iterations": 1,
                "heldout": 8,
                "batch": len(idx),
                "lr": lr,
                "lr_schedule": "cosine",
                "distance": "l2",
                "loss": loss,
            },
        )
        model = resolve("python:tinytoy:make")
        before = {k: v.clone() for k, v in model.net.state_dict().items()}
        art = method.fit(cache, model, s, t)
        moved[loss] = torch.cat([(torch.from_numpy(art.arrays[f"net.{n}"]) - before[n]).flatten() for n in before])
        reported = art.meta["training"]["first_loss"]
    model = resolve("python:tinytoy:make")
    grid = student_grid(s, model, 2)
    x, cond = cache.start(idx, model)
    target = cache.states_at(idx, grid[-1:].numpy(), dtype=x.dtype, device=x.device)[:, 0]
    euler = sfd.euler_plan(s, grid, 2)
    out = euler.info.solve(model, x, euler.sigmas, cond=cond, afs=True)
    distance = (out - target).flatten(1).pow(2).sum(1).mean()
    distance.backward()
    grads = {n: p.grad for n, p in model.net.named_parameters() if p.grad is not None}
    state = model.net.state_dict()
    want = torch.cat([-lr * grads.get(n, torch.zeros_like(v)).flatten() for n, v in state.items()])
    assert reported == pytest.approx(float(distance.detach()), rel=1e-5)
    big = want.abs() > 1e-6  # weights are float32: smaller moves are lost in their rounding
    assert big.sum() > 100 and torch.allclose(moved["endpoint"][big], want[big], rtol=1e-2, atol=1e-7)
    assert not torch.allclose(moved["steps"][big], want[big], rtol=1e-1)
    with pytest.raises(BadInput, match="train.loss"):
        method.configs({"method": "sfd", "nfe": 2}, {"loss": "final"})


def test_balance_divides_each_nfes_distance_by_its_running_mean(toy, monkeypatch):
    """SFD-v `train.balance: nfe`: with plain gradient descent in place of Adam (a step is lr x gradient), the first
    update (train seed 1 draws NFE 1 first: one trained step) is the unbalanced one divided by that step's own
    distance, and the reported loss is the distance itself; plain SFD refuses the key."""
    monkeypatch.setattr(sfd.torch.optim, "Adam", lambda groups, lr, betas: torch.optim.SGD(groups, lr=lr))
    method = students.get("sfd")
    cache = TeacherCache.open(toy / "cache")
    moved, first = {}, {}
    for b in ("none", "nfe"):
        s, t = method.configs(
            {"method": "sfd", "nfe": 1, "variable": True, "nfe_set": "1,2"},
            {"iterations": 1, "heldout": 8, "batch": 4, "lr": 1e-3, "lr_schedule": "cosine", "seed": 1, "balance": b},
        )
        model = resolve("python:tinytoy:make")
        art = method.fit(cache, model, s, t)
        before = model.net.state_dict()
        moved[b] = torch.cat([(torch.from_numpy(art.arrays[f"net.{n}"]) - before[n]).flatten() for n in before])
        first[b] = art.meta["training"]["first_loss"]
    assert first["nfe"] == pytest.approx(first["none"]) and moved["none"].abs().max() > 1e-6
    want = moved["none"] / first["none"]
    big = want.abs() > 1e-5  # weights are float32: smaller moves are lost in their rounding
    assert big.sum() > 100 and torch.allclose(moved["nfe"][big], want[big], rtol=1e-2)
    with pytest.raises(BadInput, match=r"train\.balance: nfe .* student\.variable"):
        s, t = method.configs({"method": "sfd", "nfe": 2}, {"iterations": 1, "heldout": 8, "balance": "nfe"})
        method.fit(cache, resolve("python:tinytoy:make"), s, t)


def test_balance_keeps_one_running_mean_per_nfe():
    b = sfd.NFEBalance()
    assert b.update(2, 10.0) == 10.0 and b.update(3, 1.0) == 1.0  # each NFE starts from its own first value
    assert b.update(2, 20.0) == pytest.approx(11.0) and b.update(3, 2.0) == pytest.approx(1.1)
    assert b.update(2, 0.0) == pytest.approx(9.9) and b.means == pytest.approx({2: 9.9, 3: 1.1})


def test_sfd_euler_is_the_handcrafted_euler_with_afs(fitted):
    """The untrained student samples exactly like `euler+afs` on the student grid with the original network."""
    art, model, _ = fitted
    method = students.get("sfd")
    solver = method.load(method.untrained(art), model)
    p = plan("euler", 2, model, schedule=",".join(str(v) for v in solver.plan.sigmas.tolist()), afs=True)
    x = torch.randn(3, *model.shape) * 80.0
    with torch.no_grad():
        assert torch.allclose(solver.solve(model, x), p.solve(model, x), atol=1e-5)


@pytest.mark.parametrize("spec", ["python:tinytoy:make", "python:tinytoy:plain"])
def test_routed_calls_go_through_the_wrapper_and_attributes_reach_the_network(toy, spec):
    """The seam SFD uses under torchrun (DistributedDataParallel forwards calls only): after route_calls every
    network call goes through the given callable, and attributes are read from and written to the network."""
    den = resolve(spec)
    module = den.net
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([1.0, 2.0])
    with torch.no_grad():
        before = den(x, sigma)
    calls = []

    def through(*args, **kwargs):
        calls.append(len(args))
        return module(*args, **kwargs)

    den.route_calls(through)
    with torch.no_grad():
        after = den(x, sigma)
    assert calls and torch.equal(before, after)
    assert den.net.module is module and dict(den.net.named_parameters()) == dict(module.named_parameters())
    den.net.step_condition = 3  # a write reaches the network itself
    assert module.step_condition == 3
    if spec.endswith(":make"):  # ToyDenoiser reads the bottleneck the network kept in its forward
        assert den.net.bottleneck is module.bottleneck is not None


def test_a_global_batch_smaller_than_the_world_is_refused(toy, monkeypatch):
    """Under torchrun every rank needs a row of the global batch (DDP waits for every rank's backward)."""
    from solverdistill import distributed

    rec = load_recipe(toy / "r.yaml")
    method = students.get("sfd")
    s, t = method.configs(rec.student, rec.train)
    t.batch = 1
    monkeypatch.setattr(distributed, "rank_size", lambda: (0, 2))
    with pytest.raises(BadInput, match="train.batch"):
        method.fit(TeacherCache.open(rec.cache_dir()), resolve(rec.model.spec), s, t)


def online(toy, **train):
    """The recipe's student and train settings with the online teacher (and `train` overrides)."""
    rec = load_recipe(toy / "r.yaml")
    method = students.get("sfd")
    s, t = method.configs(rec.student, {**rec.train, "teacher": "online", "batch": 4, "iterations": 2, **train})
    return method, s, t, TeacherCache.open(rec.cache_dir())


def test_online_targets_are_the_teacher_solvers_states_on_the_student_grid(toy, monkeypatch):
    """Each iteration: fresh seeds (never a cached one), noise from them at the grid's sigma_max, and as targets
    the frozen network's dpm++3m states at the student's points of its grid refined with M points per interval."""
    method, s, t, cache = online(toy, refine=2)
    model = resolve("python:tinytoy:make")
    seen = []
    draw, targets_of = sfd.fresh_seeds, sfd.online_targets

    def record_seeds(*args):
        seen.append({"seeds": draw(*args)})
        return seen[-1]["seeds"]

    def record_targets(model, plan, x, cond, every):
        seen[-1].update(x=x.clone(), targets=targets_of(model, plan, x, cond, every))
        return seen[-1]["targets"]

    monkeypatch.setattr(sfd, "fresh_seeds", record_seeds)
    monkeypatch.setattr(sfd, "online_targets", record_targets)
    art = method.fit(cache, model, s, t)
    assert len(seen) == 2
    grid = student_grid(s, model, 2)  # AFS: 3 intervals, each refined by 2 points: 9 teacher steps
    fine = grids.polynomial(9, float(grid[-1]), float(grid[0]), 7.0)
    assert torch.allclose(sfd.refined(grid, 2, 7.0), fine, rtol=1e-12)
    for row in seen:
        seeds = row["seeds"]
        assert len(seeds) == 4 and (seeds >= 2**52).all() and not np.isin(seeds, cache.seeds).any()
        assert torch.equal(row["x"], initial_noise(seeds.tolist(), model.shape) * 80.0)
        states = []
        with torch.no_grad():
            end = plan("dpm++3m", 9, model, schedule=",".join(map(str, fine.tolist()))).solve(
                model, row["x"], callback=states.append
            )
        want = torch.stack([states[3].x, states[6].x, end], 1)
        assert row["targets"].shape == (4, 3, *model.shape) and torch.allclose(row["targets"], want, atol=1e-5)
    assert not np.isin(seen[0]["seeds"], seen[1]["seeds"]).any()  # fresh noise every iteration
    assert not torch.allclose(seen[0]["x"], seen[1]["x"])
    tr = art.meta["training"]
    assert tr["teacher"] == "online" and tr["refine"] == 2 and tr["teacher_solver"] == "dpm++3m"
    assert tr["samples"] == 8 and tr["train"]["teacher"] == "online"


def test_online_training_lowers_the_loss_without_the_caches_trajectories(toy, monkeypatch):
    method, s, t, cache = online(toy, iterations=6, batch=8, lr=1e-3)
    monkeypatch.setattr(cache, "states_at", lambda *a, **k: pytest.fail("online mode read the cache"))
    monkeypatch.setattr(cache, "start", lambda *a, **k: pytest.fail("online mode read the cache"))
    model = resolve("python:tinytoy:make")
    art = method.fit(cache, model, s, t)
    tuned, original = method.load(art, model), method.load(method.untrained(art), model)
    monkeypatch.undo()
    assert art.meta["training"]["teacher"] == "online"
    idx = np.arange(16)
    assert student_loss(tuned, model, cache, idx) < student_loss(original, model, cache, idx)


def test_teacher_mode_and_solver_are_validated(toy):
    method = students.get("sfd")
    with pytest.raises(BadInput, match=r"train\.teacher: must be one of cache, online, got 'onlin'"):
        method.configs({"method": "sfd"}, {"teacher": "onlin"})
    with pytest.raises(BadInput, match=r"train\.refine: must be >= 0"):
        method.configs({"method": "sfd"}, {"refine": -1})
    m, s, t, cache = online(toy, teacher_solver="rk9")
    with pytest.raises(BadInput, match=r"train\.teacher_solver: .*unknown solver 'rk9'"):
        m.fit(cache, resolve("python:tinytoy:make"), s, t)
    m, s, t, cache = online(toy)
    assert method.configs({"method": "sfd"}, {})[1].teacher == "cache"  # the default stays the cache


def test_one_step_is_a_second_stage_after_nfe_2_and_loads(toy, fitted, tmp_path, monkeypatch):
    method = students.get("sfd")
    rec = load_recipe(toy / "r.yaml")
    s, t = method.configs({**rec.student, "nfe": 1}, {**rec.train, "iterations": 2})
    cache, model = TeacherCache.open(rec.cache_dir()), resolve("python:tinytoy:make")
    starts = []
    tune = sfd.tune
    monkeypatch.setattr(sfd, "tune", lambda c, m, s, t, w, p: starts.append((s.nfe, w)) or tune(c, m, s, t, w, p))
    art = method.fit(cache, model, s, t)
    assert [n for n, _ in starts] == [2, 1] and starts[0][1] is None and starts[1][1] is not None
    assert [st["nfe"] for st in art.meta["training"]["stages"]] == [2, 1]
    assert method.work(s, t) == 4
    solver = method.load(art, model)
    assert solver.nfe == 1 and len(solver.plan.sigmas) == 3
    counted = CountingDenoiser(model)
    assert torch.isfinite(solver.solve(counted, torch.randn(2, *model.shape) * 80.0)).all() and counted.calls == 1
    # student.init: start from a saved NFE-2 student instead (its weights, not the model's)
    two, _, _ = fitted
    path = artifacts.save(two, tmp_path / "two.npz")
    starts.clear()
    s1, _ = method.configs({**rec.student, "nfe": 1, "init": str(path)}, {})
    art1 = method.fit(cache, model, s1, t)
    assert [n for n, _ in starts] == [1] and len(art1.meta["training"]["stages"]) == 1
    assert torch.equal(starts[0][1]["down2.weight"], torch.from_numpy(two.arrays["net.down2.weight"]))
    s_bad, _ = method.configs({**rec.student, "nfe": 1, "init": str(tmp_path / "none.npz")}, {})
    with pytest.raises(BadInput, match="student.init"):
        method.fit(cache, model, s_bad, t)


def test_teacher_mode_online_in_the_recipe(tmp_path, recipe_file):
    """`teacher.mode: online` (the recipe's switch) sets SFD's train.teacher and its solver; methods that fit from
    the cache refuse it, and a contradicting train.teacher is refused, naming the keys."""
    from solverdistill.pipeline import method_configs

    teacher = {"mode": "online", "solver": "dpm++2m", "steps": 8, "num_samples": 40, "cache": str(tmp_path / "c")}
    rec = load_recipe(recipe_file(tmp_path / "a.yaml", teacher=teacher, student={"method": "sfd", "nfe": 2}))
    _, _, t = method_configs(rec)
    assert (t.teacher, t.teacher_solver) == ("online", "dpm++2m")
    with pytest.raises(BadInput, match="teacher.mode: online: dlms fits from cached trajectories"):
        method_configs(rec, "dlms")
    bad = recipe_file(
        tmp_path / "b.yaml", teacher=teacher, student={"method": "sfd", "nfe": 2}, train={"teacher": "cache"}
    )
    with pytest.raises(BadInput, match="train.teacher: 'cache' contradicts teacher.mode: online"):
        method_configs(load_recipe(bad))
    with pytest.raises(BadInput, match="teacher.mode"):
        load_recipe(recipe_file(tmp_path / "c.yaml", teacher={**teacher, "mode": "live"}))


def test_step_adapters_start_at_no_change_and_run_only_the_active_nfe(toy):
    """`student.adapters`: per-NFE low-rank corrections hooked onto the network's convolutions; zero at the start,
    only the selected NFE's pair runs, and a copy of the network (EMA, the loaded student) runs its own pair."""
    model = resolve("python:tinytoy:make")
    net = copy.deepcopy(model.net)
    x, c = torch.randn(2, 3, 32, 32), torch.zeros(2)
    with torch.no_grad():
        plain = net(x, c)
        adapters = step_adapters.attach(net, [3, 2], 4)
        assert adapters.names == net.step_adapter_targets() and adapters.nfes == [2, 3]
        for n in (None, 2, 3):
            step_adapters.select(net, n)
            assert torch.equal(net(x, c), plain)
        for key, up in adapters.up.items():
            if key.endswith("@3"):
                up.weight.normal_()
        step_adapters.select(net, 2)
        assert torch.equal(net(x, c), plain)
        step_adapters.select(net, 3)
        moved = net(x, c)
        assert not torch.allclose(moved, plain)
        twin = copy.deepcopy(net)
        for up in twin.step_adapters.up.values():
            up.weight.zero_()
        assert torch.equal(twin(x, c), plain) and torch.equal(net(x, c), moved)
    added = set(net.state_dict()) - set(model.net.state_dict())
    assert added and all(k.startswith("step_adapters.") for k in added)
    with pytest.raises(BadInput, match=r"adapters for NFE \[2, 3\]; got NFE 5"):
        step_adapters.select(net, 5)
    with pytest.raises(BadInput, match="already carries"):
        step_adapters.attach(net, [2], 4)
    bare = resolve("python:tinytoy:plain").net  # no choice of its own: every ungrouped Conv2d
    assert step_adapters.attach(copy.deepcopy(bare), [2], 1).names == ["conv"]


def test_step_adapters_on_a_network_of_linear_layers():
    """No convolution: every linear layer gets a pair (but not attention's output projection, which
    nn.MultiheadAttention reads as a weight and never calls); zero at the start, then only the active NFE acts."""

    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(6, 8), nn.Linear(8, 6)
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            h = self.inp(x)
            return self.out(h + self.att(h, h, h)[0])

    torch.manual_seed(0)
    net, x = Mixer(), torch.randn(2, 3, 6)
    with torch.no_grad():
        plain = net(x)
        adapters = step_adapters.attach(net, [2, 3], 2)
        assert adapters.names == ["inp", "out"]
        for n in (2, 3):
            step_adapters.select(net, n)
            assert torch.equal(net(x), plain)
        for key, up in adapters.up.items():
            if key.endswith("@3"):
                up.weight.normal_()
        step_adapters.select(net, 2)
        assert torch.equal(net(x), plain)
        step_adapters.select(net, 3)
        assert not torch.allclose(net(x), plain)
    with pytest.raises(BadInput, match="no 2-D convolution or linear layer"):
        step_adapters.attach(nn.Sequential(nn.SiLU()), [2], 2)


def test_distill_reports_sfd_v_at_every_nfe_it_serves(toy, tmp_path):
    """`distill` measures an SFD-v student on the held-out seeds at each NFE of its nfe_set, not at student.nfe
    only; the artifact keeps them in meta.metrics.heldout_rmse_by_nfe."""
    from dataclasses import replace

    from solverdistill.pipeline import distill

    rec = load_recipe(toy / "r.yaml")  # the module's toy network and cache, an SFD-v student
    student = rec.student | {"variable": True, "nfe_set": "2,3"}
    rec = replace(rec, student=student, train=rec.train | {"iterations": 2}, output=str(tmp_path / "v.npz"))
    rep = distill(rec, say=lambda m: None)
    by_nfe = rep.metrics["heldout_rmse_by_nfe"]
    assert set(by_nfe) == {"2", "3"} and by_nfe["2"] == rep.metrics["heldout_rmse"] and by_nfe["3"] != by_nfe["2"]
    assert rep.rows[-1] == ("sfd (this artifact) at NFE 3", by_nfe["3"])
    assert artifacts.load(tmp_path / "v.npz").meta["metrics"]["heldout_rmse_by_nfe"] == by_nfe


def test_sfd_v_with_adapters_needs_no_step_condition_and_round_trips(toy, tmp_path):
    method = students.get("sfd")
    cache = TeacherCache.open(toy / "cache")
    student = {"method": "sfd", "nfe": 2, "variable": True, "nfe_set": "2,3", "adapters": 2}
    s, t = method.configs(student, {"iterations": 6, "heldout": 8, "batch": 4, "lr": 1e-3, "step_lr_scale": 5})
    model = resolve("python:tinytoy:plain")  # no step condition of its own: the adapters carry it
    art = method.fit(cache, model, s, t)
    ups = [v for k, v in art.arrays.items() if k.startswith("net.step_adapters.up.")]
    assert len(ups) == 2 and all(np.any(v) for v in ups)  # both NFEs drawn and trained
    path = artifacts.save(art, tmp_path / "v.npz")
    x = torch.randn(2, *model.shape) * 80.0
    fitted, loaded = method.load(art, model), method.load(artifacts.load(path), model)
    outs = {n: fitted.at_nfe(n).solve(model, x) for n in (2, 3)}
    for n in (2, 3):
        assert torch.equal(loaded.at_nfe(n).solve(model, x), outs[n])
    with torch.no_grad():  # the same input and noise level, another NFE's correction
        sigma, den, d = torch.full((2,), 1.0), loaded.den, []
        for n in (2, 3):
            sfd.set_step(den, n)
            d.append(den(x / 80, sigma))
        assert not torch.allclose(d[0], d[1])
    with pytest.raises(BadInput, match=r"adapters for NFE \[2, 3\]; got NFE 4"):
        loaded.at_nfe(4)
    # `sdistill sample --solver v.npz --nfe 3`: the CLI's loader serves the artifact's other NFEs the same way
    from solverdistill.samples import load_solver

    _, at3, _ = load_solver(str(path), "python:tinytoy:plain", 3, None, False, True, "cpu", torch.float32, False)
    assert at3.nfe == 3 and torch.equal(at3.solve(model, x), outs[3])
    with pytest.raises(BadInput, match=r"--nfe: .*distilled for NFE 2, 3, not 4; drop --nfe"):
        load_solver(str(path), "python:tinytoy:plain", 4, None, False, True, "cpu", torch.float32, False)
    # `compare`: the artifact fills its cells at NFE 2 and 3 (named by path, or found by method in a folder)
    from solverdistill.comparison import Resolver

    resolver = Resolver(model, None, [tmp_path], lambda m: None, None)
    assert resolver(str(path), 4) is None and resolver("sfd", 3).nfe == 3
    assert torch.equal(resolver(str(path), 3).solve(model, x), outs[3])
    untrained = method.load(method.untrained(art), model).at_nfe(3)  # zero adapters: the model's own euler + AFS
    with torch.no_grad():
        own = sfd.euler_plan(s, untrained.plan.sigmas, 3).solve(model, x)
    assert torch.allclose(untrained.solve(model, x), own, atol=1e-6)
    forged = artifacts.load(path)  # an nfe_set claiming 900 NFEs is refused before any pair is built for them
    forged.meta["student"]["nfe_set"] = ",".join(map(str, range(2, 902)))
    with pytest.raises(
        BadInput,
        match=r"nfe_set names NFE 2, 3, 4, 5, 6, 7, \.\.\. \(900 in all\), but its adapter weights are for NFE \[2, 3\]",
    ):
        method.load(forged, model)
    with pytest.raises(BadInput, match="student.adapters: per-NFE adapters are for SFD-v"):
        method.fit(cache, model, *method.configs({"method": "sfd", "adapters": 2}, {"iterations": 1, "heldout": 8}))
    with pytest.raises(BadInput, match="student.init: its weights hold parameters this student lacks"):
        s, t = method.configs({"method": "sfd", "nfe": 2, "init": str(path)}, {"iterations": 1, "heldout": 8})
        method.fit(cache, model, s, t)
