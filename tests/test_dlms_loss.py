"""DLMS's loss terms: the final-step feature distance (students/feature_loss.py, train.final_loss /
train.feature_weight) and the per-step scale (train.step_scale); and the weight average it keeps (train.ema)."""

import itertools
import types
import warnings

import pytest
import torch

from solverdistill import students
from solverdistill.digits import load_classifier
from solverdistill.errors import BadInput
from solverdistill.recipes import load_recipe
from solverdistill.students import dlms
from solverdistill.students.feature_loss import feature_network
from solverdistill.teacher import TeacherCache
from solverdistill.teacher.run import run_teacher


@pytest.fixture(scope="module")
def cache(tmp_path_factory, recipe_file):
    root = tmp_path_factory.mktemp("dlms_loss")
    path = recipe_file(
        root / "r.yaml",
        name="tiny",
        teacher={"steps": 32, "num_samples": 80, "batch": 80, "cache": str(root / "cache"), "compute_dtype": "float64"},
    )
    run_teacher(load_recipe(path))
    return TeacherCache.open(root / "cache")


def stub(spec, shape, **extra):
    return types.SimpleNamespace(spec=spec, shape=shape, device=torch.device("cpu"), **extra)


def configs(**train):
    return students.get("dlms").configs(
        {"method": "dlms", "nfe": 3}, {"heldout": 16, "validation": 16, "batch": 16, "eval_every": 2, **train}
    )


def test_digit_features_backpropagate_to_the_samples():
    net = feature_network(stub("toy:unet-digits?guidance=2", (1, 16, 16)))
    x = (torch.rand(4, 1, 16, 16, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    f = net(x)
    assert torch.equal(f.detach(), load_classifier()(x.detach().float())[0])  # the FD's own features
    f.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "model, match",
    [
        (stub("gmm:tiny", (2,)), "train.final_loss: features: gmm:tiny .* has no feature network"),
        (stub("diffusers:sd", (4, 64, 64), decode=lambda z: z), "train.final_loss: features: .* latent L2"),
    ],
)
def test_models_without_a_feature_network_are_refused(model, match):
    with pytest.raises(BadInput, match=match):
        feature_network(model)


def test_rgb_models_need_the_inception_file(monkeypatch, tmp_path):
    monkeypatch.setenv("SDISTILL_INCEPTION", str(tmp_path / "none.pt"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(BadInput, match="train.final_loss: features on gmm:cifar needs the Inception-v3 weights"):
        feature_network(stub("gmm:cifar", (3, 32, 32)))


def test_keys_are_validated():
    with pytest.raises(BadInput, match="train.final_loss"):
        configs(final_loss="lpips")
    with pytest.raises(BadInput, match="train.feature_weight"):
        configs(final_loss="features", feature_weight=-1.0)


def test_fit_refuses_features_on_a_model_without_them_before_training(cache, tiny64, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("trained before the refusal")

    monkeypatch.setattr(dlms, "train_once", no_training)
    s, t = configs(final_loss="features", iterations=2)
    with pytest.raises(BadInput, match="train.final_loss: features: gmm:tiny"):
        students.get("dlms").fit(cache, tiny64, s, t)


def test_the_feature_term_enters_training(cache, tiny64, monkeypatch):
    """A stand-in feature network on gmm:tiny: weight 0 trains exactly as l2, a weight changes the result, and
    with loss: endpoint and final_weight 0 the feature term alone trains the student."""
    calls = []

    def fake_network(model):
        def net(x):
            calls.append(x.requires_grad)
            return torch.tanh(3 * x.flatten(1))

        return net

    monkeypatch.setattr(dlms, "feature_network", fake_network)
    method = students.get("dlms")

    def fitted(**train):
        s, t = configs(iterations=4, **train)
        return [r for _, r in method.fit(cache, tiny64, s, t).meta["training"]["validation_rmse_history"]]

    base = fitted()  # validation RMSE at iterations 0, 2, 4: the trained designer's trace
    assert fitted(final_loss="features", feature_weight=0.0) == base
    assert fitted(final_loss="features", feature_weight=5.0) != base
    assert any(calls)  # the student's endpoint went through the network with its graph
    only = fitted(final_loss="features", loss="endpoint", final_weight=0.0, feature_weight=1.0)
    assert only[1:] != [only[0]] * 2  # the feature term alone moved the designer
    with pytest.raises(BadInput, match="train.final_weight"):
        fitted(final_loss="l2", loss="endpoint", final_weight=0.0)


def test_feature_term_is_zero_at_the_target_and_scaled_by_the_variance():
    net = lambda x: x.flatten(1) * 2.0  # noqa: E731
    term = dlms.FeatureTerm(net, scale=4.0, weight=3.0)
    target = torch.randn(5, 2, dtype=torch.float64)
    assert float(term(target, target)) == 0.0
    x = target + 0.5
    assert float(term(x, target)) == pytest.approx(3.0 * 1.0 / 4.0)  # (2 * 0.5)^2 = 1 per feature


class ScriptedFeatures(torch.nn.Module):
    """A TorchScript stand-in with the Inception file's calling convention ([0, 255] floats in, features out);
    `cut` quantises to uint8 inside, as a network that gives no gradient would."""

    def __init__(self, cut: bool):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.cut = cut

    def forward(self, x, return_features: bool = True):
        if self.cut:
            x = x.to(torch.uint8).to(torch.float32)
        x = torch.nn.functional.interpolate(x, size=(40, 40), mode="bilinear", align_corners=False)
        return torch.nn.functional.adaptive_avg_pool2d(self.conv(x / 128 - 1), 1).flatten(1)


@pytest.mark.parametrize("cut", [False, True])
def test_inception_features_must_backpropagate(cut, monkeypatch, tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated upstream; the Inception file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(ScriptedFeatures(cut)).save(str(path))
    monkeypatch.setenv("SDISTILL_INCEPTION", str(path))
    model = stub("gmm:cifar", (3, 32, 32))
    if cut:
        with pytest.raises(
            BadInput,
            match="train.final_loss: features: inception-2015-12-05.pt (does not backpropagate|gives no gradient)",
        ):
            feature_network(model)
        return
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    feature_network(model)(x * 2 - 1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_free_query_times_are_any_positive_factor_and_start_at_the_paper_rule(tiny64, noise):
    """student.query: free (LD3's decoupled network-input times): k = exp(output), where the paper's k stays in
    [1 - r, 1 + r]; untrained, both are the initial rule exactly."""
    made = {}
    for query in ("scaled", "free"):
        cfg = dlms.DLMSStudent(nfe=3, query=query)
        made[query] = dlms.DLMS(cfg, dlms.initial_grid(cfg, 0.002, 80.0)).double()
    t = torch.tensor([10.0, 1.0], dtype=torch.float64)
    raw = torch.zeros(2, 5, dtype=torch.float64)
    raw[:, 4] = torch.tensor([2.0, -3.0])
    k_scaled = made["scaled"].rule(raw, t, 1)[2]
    k_free = made["free"].rule(raw, t, 1)[2]
    assert torch.allclose(k_free, torch.exp(raw[:, 4]))
    assert bool((k_scaled <= 1.2).all() and (k_scaled >= 0.8).all())
    x0 = noise(tiny64, 3)
    with torch.no_grad():
        assert torch.equal(made["free"].solve(tiny64, x0), made["scaled"].solve(tiny64, x0))


def test_distill_refuses_a_feature_loss_before_the_teacher_runs(tmp_path, recipe_file):
    """A model without a feature network is refused up front: no teacher cache is built for a run that cannot fit."""
    from typer.testing import CliRunner

    from solverdistill.cli import app

    path = recipe_file(
        tmp_path / "r.yaml",
        name="tiny",
        teacher={"steps": 8, "num_samples": 40, "batch": 40, "cache": str(tmp_path / "cache")},
        train={"final_loss": "features", "heldout": 8, "validation": 8, "batch": 8, "iterations": 1},
    )
    res = CliRunner().invoke(app, ["distill", str(path)])
    assert res.exit_code == 2, res.output
    assert "train.final_loss: features" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "cache").exists()


def test_relative_step_scale_divides_each_step_by_the_teacher_state_size(cache):
    """train.step_scale: relative is each step's absolute term over the teacher state's mean square there, so an
    error of the same relative size costs the same at a noisy step and at the endpoint."""
    idx = cache.split(0, 16)[0][:4]
    sigmas = torch.tensor([40.0, 2.0, 0.002], dtype=torch.float64)

    def terms(scale, relative_error):
        s, t = configs(step_scale=scale, loss="trajectory")
        step_loss = dlms._loss_fn(cache, idx, s, t, steps=3)
        out = []  # (the step's loss, the teacher state's mean square) per step
        for n, sigma in enumerate(sigmas):
            at = sigma.expand(len(idx))
            target = cache.states_at(idx, at[:, None], dtype=torch.float64, device=torch.device("cpu"))[:, 0]
            out.append((float(step_loss(n, at, target * (1 + relative_error))), float(target.pow(2).mean())))
        return out

    absolute, relative = terms("absolute", 0.1), terms("relative", 0.1)
    for (a, size), (r, _) in zip(absolute, relative):
        assert r == pytest.approx(a / size)
        assert r == pytest.approx(0.01 / 3)  # (0.1)^2 with weight 1/3 at every step, whatever the noise level
    assert absolute[0][0] > 100 * absolute[2][0]  # in absolute units the noisy step dominates
    with pytest.raises(BadInput, match="train.step_scale"):
        configs(step_scale="log")


def test_ema_keeps_the_moving_average_of_the_live_designer(cache, tiny64, monkeypatch):
    """train.ema: Adam's steps are the same, and what is validated, kept and written is the exponential moving
    average of the live weights, step by step."""
    falling = itertools.count()
    monkeypatch.setattr(dlms, "rmse", lambda a, b: 1.0 / (1 + next(falling)))  # every evaluation is the best yet
    method = students.get("dlms")

    def weights(iterations, **train):
        s, t = configs(iterations=iterations, eval_every=1, **train)
        arrays = method.fit(cache, tiny64, s, t).arrays
        return {k: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("designer.")}

    live = [weights(n) for n in range(4)]  # the live designer after 0-3 steps (each run a prefix of the next)
    assert any(not torch.equal(live[3][k], live[0][k]) for k in live[0])
    decay = 0.6
    average = dict(live[0])
    for step in live[1:]:
        average = {k: average[k] + (1 - decay) * (step[k] - average[k]) for k in average}
    got = weights(3, ema=decay)
    for k in average:
        torch.testing.assert_close(got[k], average[k])
    assert any(not torch.allclose(got[k], live[3][k]) for k in got)
    with pytest.raises(BadInput, match="train.ema"):
        configs(ema=1.0)
