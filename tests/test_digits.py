"""The digits testbed (docs/digits.md): data, toy:unet-digits (classes, guidance), the digit classifier and its
Frechet distance. The shipped weights and statistics are checked without scikit-learn; what needs the raw images
skips cleanly without it."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from solverdistill import digits
from solverdistill.errors import BadInput
from solverdistill.fid import DIGIT_REFS, default_features, digits_fd, load_stats
from solverdistill.models import resolve
from solverdistill.models.toy import DIGITS_WEIGHTS, ToyDenoiser, ToyUNet, digits_options
from solverdistill.npzfiles import write_npz


def tiny_digit_net(seed=0):
    torch.manual_seed(seed)
    net = ToyUNet(channels=(8, 16, 16), emb=16, img_channels=1, num_classes=10)
    for p in net.parameters():  # random, non-zero everywhere (the class and step tables too)
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


@pytest.fixture(scope="module")
def heldout():
    pytest.importorskip("sklearn", reason="the raw digits come with scikit-learn (the [digits] extra)")
    return digits.load_split("heldout")


# --- data ---------------------------------------------------------------------------------------------------------


def test_upsample_range_and_shape():
    raw = np.zeros((3, 8, 8), np.float32)
    raw[1] = 16
    raw[2, 2:6, 3] = 16
    x = digits.upsample(raw)
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32
    assert torch.all(x[0] == -1) and torch.all(x[1] == 1)
    assert x.min() >= -1 and x.max() <= 1 and (x[2] > 0).sum() >= 8  # a stroke survives, clipped to [-1, 1]


def test_split_is_fixed_disjoint_and_complete():
    train, held = digits.split_indices(1797)
    again_train, again_held = digits.split_indices(1797)
    assert len(train) == 1500 and len(held) == 297
    assert np.array_equal(train, again_train) and np.array_equal(held, again_held)
    assert not set(train) & set(held) and len(set(train) | set(held)) == 1797
    assert not np.array_equal(digits.split_indices(1797, seed=1)[1], held)


def test_missing_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(BadInput, match=r"pip install 'solverdistill\[digits\]'"):
        digits.raw_digits()


def test_loaded_splits(heldout):
    train = digits.load_split("train")
    assert train.x.shape == (1500, 1, 16, 16) and heldout.x.shape == (297, 1, 16, 16)
    assert set(train.y.tolist()) == set(range(10)) and heldout.x.min() == -1 and heldout.x.max() == 1
    with pytest.raises(BadInput, match="train or heldout"):
        digits.load_split("test")


# --- the network: classes, the null label, guidance ---------------------------------------------------------------


def test_guidance_is_both_passes_combined():
    net = tiny_digit_net()
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(5, 1, 16, 16, generator=g) * 2, torch.tensor([0.1, 0.5, 1.0, 3.0, 20.0])
    labels = torch.tensor([0, 3, 3, 7, 9])
    plain = ToyDenoiser(net, "toy:unet-digits", shape=(1, 16, 16))
    with torch.no_grad():
        d_u, d_c = plain(x, sigma), plain(x, sigma, labels)
        assert not torch.allclose(d_u, d_c)  # the label matters
        null = plain(x, sigma, torch.full((5,), 10))
        assert torch.allclose(d_u, null, atol=1e-6)  # no label = the null class
        guided = ToyDenoiser(net, "toy:unet-digits?guidance=2.5", shape=(1, 16, 16), guidance=2.5)
        assert guided.passes_per_call == 2 and plain.passes_per_call == 1
        assert torch.allclose(guided(x, sigma, labels), d_u + 2.5 * (d_c - d_u), atol=1e-5)
        assert guided.last_features.shape == (5, 64)  # the conditional pass's 8x8 block, channel-averaged
        plain(x, sigma, labels)
        assert torch.allclose(guided.last_features, plain.last_features, atol=1e-6)
        one = ToyDenoiser(net, "toy:unet-digits?guidance=1", shape=(1, 16, 16), guidance=1.0)
        assert one.passes_per_call == 1 and torch.allclose(one(x, sigma, labels), d_c, atol=1e-6)
        guided.step_condition = 3  # SFD-v's input reaches both passes
        assert not torch.allclose(guided(x, sigma, labels), d_u + 2.5 * (d_c - d_u), atol=1e-5)
    with pytest.raises(BadInput, match="no labels"):
        guided(x, sigma)


def test_labels_are_per_seed():
    net = tiny_digit_net()
    free = ToyDenoiser(net, shape=(1, 16, 16))
    assert free.draw_cond([0, 1, 2]) is None  # unconditional: the null label
    drawn = ToyDenoiser(net, shape=(1, 16, 16), guidance=2.0)
    all_ = drawn.draw_cond(range(100))
    assert all_.dtype == torch.long and set(all_.tolist()) == set(range(10))
    assert torch.equal(drawn.draw_cond(range(40, 60)), all_[40:60])  # independent of the batch
    fixed = ToyDenoiser(net, shape=(1, 16, 16), fixed_class=4)
    assert fixed.draw_cond([5, 6]).tolist() == [4, 4]


@pytest.mark.parametrize(
    "query, message",
    [("class=12", "--class"), ("class=x", "--class"), ("guidance=abc", "--guidance"), ("guidance=nan", "--guidance"),
     ("prompt=cat", "unknown option 'prompt'")],
)  # fmt: skip
def test_bad_options(query, message):
    with pytest.raises(BadInput, match=message):
        digits_options(query, f"toy:unet-digits?{query}")


def test_spec_options_and_errors():
    assert digits_options("guidance=2&class=3", "s") == (2.0, 3)
    assert digits_options("", "s") == (None, None)
    with pytest.raises(BadInput, match="takes no options"):
        resolve("toy:unet-gmm?class=3")
    with pytest.raises(BadInput, match="toy:unet-digits"):
        resolve("toy:unet-mnist")


# --- the shipped network ------------------------------------------------------------------------------------------


def test_shipped_digit_network_is_small_safe_and_keyed_by_options():
    assert DIGITS_WEIGHTS.suffix == ".safetensors" and DIGITS_WEIGHTS.stat().st_size <= 5 * 2**20
    den = resolve("toy:unet-digits")
    assert den.shape == (1, 16, 16) and den.passes_per_call == 1 and den.draw_cond([1]) is None
    guided = resolve("toy:unet-digits?guidance=2&class=3")
    assert guided.passes_per_call == 2 and guided.draw_cond([1, 2]).tolist() == [3, 3]
    assert len({den.fingerprint, guided.fingerprint, resolve("toy:unet-digits?class=3").fingerprint}) == 3


def test_shipped_digit_network_denoises_heldout_digits(heldout):
    """A denoising-error bound on images the network never saw: well below the best guess that ignores the
    image's content (the training mean blended in as the EDM skip would)."""
    den = resolve("toy:unet-digits")
    mean = digits.load_split("train").x.mean(0)
    g = torch.Generator().manual_seed(0)
    x0, y = heldout.x[:128], heldout.y[:128]
    for sigma in (0.1, 0.5, 1.0, 2.0):
        x = x0 + sigma * torch.randn(x0.shape, generator=g)
        s = torch.full((len(x0),), sigma)
        c_skip = 0.25 / (sigma**2 + 0.25)
        with torch.no_grad():
            err = (den(x, s) - x0).pow(2).mean().sqrt()
            err_c = (den(x, s, y) - x0).pow(2).mean().sqrt()
        blind = (c_skip * x + (1 - c_skip) * mean - x0).pow(2).mean().sqrt()
        # measured at release: err / blind 0.36, 0.35, 0.45, 0.67; the label helps most at high noise
        assert err < (0.5 if sigma <= 1 else 0.8) * blind and err_c <= err * 1.02, (sigma, err, err_c, blind)
        if sigma >= 2:
            assert err_c < 0.9 * err, (sigma, err, err_c)


def test_sample_cli_with_class_and_guidance(tmp_path, cli):
    out = tmp_path / "s"
    r = cli("sample", "--model", "toy:unet-digits", "--class", 3, "--guidance", 2, "--nfe", 4, "--num", 6,
            "--solver", "dpm++", "--out", out, "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "NFE 4 (8 network passes)" in r.output
    r = cli("fid", out / "samples.npz", "--ref", "digits:heldout", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["features"] == "digits" and res["samples"] == 6 and res["fid"] > 0
    assert sum(res["classes"]["class_histogram"]) == 6


# --- the classifier and the digit Frechet distance ----------------------------------------------------------------


def test_shipped_statistics_are_plain_arrays():
    for name in ("train", "heldout"):
        with np.load(digits.STATS[name], allow_pickle=False) as f:
            assert sorted(f.files) == ["mu", "sigma"]
        mu, sigma = load_stats(digits.STATS[name])
        assert mu.shape == (64,) and sigma.shape == (64, 64) and np.allclose(sigma, sigma.T)
        assert np.linalg.eigvalsh(sigma).min() > -1e-8 and np.isfinite(mu).all()


def test_shipped_classifier_accuracy_and_statistics(heldout):
    net = digits.load_classifier()
    assert digits.accuracy(net, heldout) >= 0.97
    same = digits_fd(heldout.x, "digits:heldout")  # the statistics were made from these very images
    assert same.samples == 297 and abs(same.distance) < 1e-4 * max(
        1.0, float(np.trace(load_stats(digits.STATS["heldout"])[1]))
    )
    floor = digits_fd(heldout.x, "digits:train")
    assert floor.distance > 10 * abs(same.distance)
    rep = floor.classes
    assert rep.classes_seen == 10 and rep.confident > 0.9 and sum(rep.histogram) == 297
    noise = digits_fd(torch.rand(297, 1, 16, 16) * 2 - 1, "digits:train")
    assert noise.distance > 5 * floor.distance  # noise is far from digits


def test_class_report_counts():
    probs = torch.tensor([[0.95] + [0.05 / 9] * 9, [0.5, 0.5] + [0.0] * 8, [0.0] * 9 + [1.0]])
    rep = digits.class_report(probs)
    assert rep.histogram == [2, 0, 0, 0, 0, 0, 0, 0, 0, 1] and rep.classes_seen == 2
    assert rep.confident == pytest.approx(2 / 3) and rep.as_dict()["confident_share"] == rep.confident


def write_samples(path, x, model="toy:unet-digits"):
    write_npz(path, {"format": "sdistill-samples", "model": model}, x=np.asarray(x, np.float32))
    return path


def test_fid_defaults_and_bad_input(tmp_path, cli):
    x = torch.rand(20, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mine = write_samples(tmp_path / "mine.npz", x)
    other = write_samples(tmp_path / "other.npz", x, model="gmm:cifar")
    assert default_features(str(mine), None) == "digits"
    assert default_features(str(other), None) == "inception" and default_features(str(other), DIGIT_REFS[0]) == "digits"
    r = cli("fid", mine, "--ref", "digits:train", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["features"] == "digits" and res["samples"] == 20 and len(res["classes"]["class_histogram"]) == 10
    direct = digits_fd(x, "digits:train")
    assert res["fid"] == pytest.approx(direct.distance, rel=1e-9)
    plain = cli("fid", mine, "--ref", "digits:train")
    assert plain.exit_code == 0 and float(plain.stdout.strip().splitlines()[-1]) == pytest.approx(res["fid"], rel=1e-5)
    assert "confidently read" in plain.output
    for args, message in (
        (("--ref", "digits:train", "--features", "pixels"), "use --features digits"),
        (("--ref", "digits:test"), "digits:train and digits:heldout"),
    ):
        r = cli("fid", mine, *args)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    big = write_samples(tmp_path / "big.npz", torch.zeros(3, 3, 32, 32))
    r = cli("fid", big, "--ref", "digits:train", "--features", "digits")
    assert r.exit_code == 2 and "1x16x16" in r.output, r.output


def test_digit_make_ref_round_trip(tmp_path, cli):
    x = torch.rand(30, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    src = write_samples(tmp_path / "a.npz", x)
    r = cli("fid", "--make-ref", src, "--out", tmp_path / "ref.npz", "--features", "digits")
    assert r.exit_code == 0, r.output
    r = cli("fid", src, "--ref", tmp_path / "ref.npz", "--features", "digits")
    assert r.exit_code == 0 and abs(float(r.stdout.strip().splitlines()[-1])) < 1e-6, r.output


# --- the demo (`make demo`) and compare's default recipe ----------------------------------------------------------


def test_digit_model_names_the_demo_recipe_for_compare():
    """`compare --model toy:unet-digits` distills missing students with recipes/digits_demo.yaml; the guided and
    per-class models are other denoisers (other fingerprints) and name none."""
    from solverdistill.comparison import default_metrics, model_recipe
    from solverdistill.models.toy import DIGITS_RECIPE
    from solverdistill.pipeline import check_split, method_configs
    from solverdistill.recipes import load_recipe

    m = resolve("toy:unet-digits")
    assert m.default_recipe == DIGITS_RECIPE and DIGITS_RECIPE.name == "digits_demo.yaml"
    rec = load_recipe(DIGITS_RECIPE)
    assert rec.model.spec == "toy:unet-digits" and rec.output == "out/digits_demo_dlms_nfe5.npz"
    check_split(rec, method_configs(rec, say=lambda s: None)[2])
    own, own_model = model_recipe(m)
    assert own.name == "digits_demo" and own_model.fingerprint == m.fingerprint
    for spec in ("toy:unet-digits?guidance=2", "toy:unet-digits?class=3"):
        assert resolve(spec).default_recipe is None
    assert default_metrics(m) == ["rmse", "digits"] and default_metrics(resolve("gmm:tiny")) == ["rmse"]


def test_a_link_checked_out_as_text_is_followed(tmp_path):
    """Where git checks symlinks out as one-line files, the package-data link to the demo recipe holds only the
    target's path: `followed` reads through it; a real recipe, a missing target or a longer file is left alone."""
    from solverdistill.models.toy import followed

    (tmp_path / "recipes").mkdir()
    real = tmp_path / "recipes" / "demo.yaml"
    real.write_text("name: demo\nmodel: {spec: gmm:tiny}\n")
    (tmp_path / "pkg" / "data").mkdir(parents=True)
    stub = tmp_path / "pkg" / "data" / "demo.yaml"
    stub.write_text("../../recipes/demo.yaml")
    assert followed(stub) == real.resolve() and followed(real) == real
    stub.write_text("../../recipes/missing.yaml")
    assert followed(stub) == stub
    stub.write_text("name: x\n")
    assert followed(stub) == stub
    assert followed(tmp_path / "absent.yaml") == tmp_path / "absent.yaml"


def test_the_demo_recipe_ships_in_the_wheel(tmp_path):
    """The recipe the digit model names is package data (a link to recipes/digits_demo.yaml in the checkout), so an
    installed wheel's `compare --model toy:unet-digits` finds it too: build a wheel from a copy of the package and
    read the recipe back out of it."""
    import shutil
    import subprocess
    import zipfile

    from solverdistill.models.toy import DIGITS_RECIPE

    root = Path(__file__).resolve().parents[1]
    assert DIGITS_RECIPE.parent == root / "solverdistill" / "data"
    assert DIGITS_RECIPE.resolve() == (root / "recipes" / "digits_demo.yaml").resolve()
    src = tmp_path / "src"
    shutil.copytree(
        root / "solverdistill",
        src / "solverdistill",
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.safetensors", "*.npz"),
    )
    (src / "recipes").mkdir()
    shutil.copy(root / "recipes" / "digits_demo.yaml", src / "recipes")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("solverdistill-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = z.read("solverdistill/data/digits_demo.yaml")
    assert shipped == (root / "recipes" / "digits_demo.yaml").read_bytes()


def test_demo_reads_the_handcrafted_fds_it_would_measure(tmp_path, cli):
    """`digits handcrafted` (run beside the student in `make demo`) writes what `demo` would measure itself, for
    the same seeds only; `demo` prints the student next to the best and draws both."""
    from PIL import Image

    r = cli("sample", "--model", "toy:unet-digits", "--solver", "dpm++", "--nfe", 2, "--num", 8, "--seed", 5,
            "--out", tmp_path / "s", "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    samples = tmp_path / "s" / "samples.npz"
    digits.write_handcrafted(tmp_path / "h.npz", "toy:unet-digits", 2, 8, 5)
    mine, rows, nfe, _, best_x = digits.against_handcrafted(samples, tmp_path / "h.npz")
    mine2, rows2, _, _, best_x2 = digits.against_handcrafted(samples)  # measured here instead
    assert nfe == 2 and [(r.solver, r.fd) for r in rows] == [(r.solver, r.fd) for r in rows2]
    assert [r.fd for r in rows] == sorted(r.fd for r in rows) and np.array_equal(best_x, best_x2)
    assert mine.solver == "dpm++3m" and mine.fd == mine2.fd  # the samples' own solver is among the rows:
    assert mine.fd == pytest.approx(next(r.fd for r in rows if r.solver == "dpm++3m"), rel=1e-6)  # same seeds
    text = digits.demo_summary(samples, tmp_path / "h.npz", tmp_path / "grid.png")
    assert f"  {rows[0].solver:>12}: {rows[0].fd:8.2f}   (best of {len(rows)} handcrafted solvers" in text
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size[0] == 150 + 8 * 54 and im.size[1] > 2 * (54 + 8)  # two labelled rows of 8, captioned
    digits.write_handcrafted(tmp_path / "h6.npz", "toy:unet-digits", 2, 8, 6)  # other seeds
    with pytest.raises(BadInput, match="made for another model, NFE, reference or seeds"):
        digits.against_handcrafted(samples, tmp_path / "h6.npz")
