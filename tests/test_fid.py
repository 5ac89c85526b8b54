import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from solverdistill.errors import BadInput
from solverdistill.fid import FeatureStats, FIDResult, frechet_distance, make_ref, reference_stats, run_fid


def test_frechet_distance_equals_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 5))
    s1 = a @ a.T + np.eye(5)
    s2 = np.diag(rng.uniform(0.5, 2.0, 5))
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    # Closed form: tr sqrt(S1 S2) = tr sqrt(S2^1/2 S1 S2^1/2) via a symmetric eigendecomposition.
    r = np.sqrt(s2)
    w = np.linalg.eigvalsh(r @ s1 @ r)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(w).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    # Commuting case: diagonal covariances, FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    d1, d2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    assert frechet_distance([0, 0], d1, [1, 1], d2) == pytest.approx(2 + (1 - 3) ** 2 + (2 - 1) ** 2)


def test_streaming_stats_equal_batch_and_parts_add_up():
    x = torch.randn(103, 7, dtype=torch.float64) * 3 + 1
    whole = FeatureStats()
    whole.update(x)
    assert np.allclose(whole.mean(), x.mean(0).numpy())
    assert np.allclose(whole.cov(), np.cov(x.numpy().T), atol=1e-12)
    streamed, a, b = FeatureStats(), FeatureStats(), FeatureStats()
    for chunk in x.split(10):
        streamed.update(chunk)
    a.update(x[:40])
    b.update(x[40:])
    merged = a.merge(b)
    for s in (streamed, merged):
        assert s.n == 103 and np.allclose(s.mean(), whole.mean()) and np.allclose(s.cov(), whole.cov(), atol=1e-12)


def write_images(folder, n, size=(8, 8), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


class Layers(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


class StandIn(torch.nn.Module):
    """A TorchScript stand-in with the real file's calling convention: uint8-valued floats in, features out."""

    def __init__(self):
        super().__init__()
        self.layers = Layers()

    def forward(self, x, return_features: bool = True):
        x = torch.nn.functional.interpolate(x, size=(29, 29), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


@pytest.fixture
def inception(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated upstream, but it is the published format
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(StandIn()).save(str(path))
    return path


@pytest.mark.parametrize("mode", ["legacy_tensorflow", "clean"])
def test_inception_path_end_to_end(tmp_path, cli, inception, mode):
    write_images(tmp_path / "a", 12, seed=1)
    write_images(tmp_path / "b", 10, seed=2)
    r = cli(
        "fid", tmp_path / "a", "--ref", tmp_path / "b", "--inception", inception, "--mode", mode, "--batch", 5, "--json"
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["samples"] == 12 and res["fid"] > 0
    r = cli(
        "fid", "--make-ref", tmp_path / "b", "--out", tmp_path / "ref.npz", "--inception", inception, "--mode", mode
    )
    assert r.exit_code == 0, r.output
    r2 = cli("fid", tmp_path / "a", "--ref", tmp_path / "ref.npz", "--inception", inception, "--mode", mode)
    assert float(r2.stdout.strip().splitlines()[-1]) == pytest.approx(res["fid"], rel=1e-4)
    same = cli("fid", tmp_path / "a", "--ref", tmp_path / "a", "--inception", inception, "--mode", mode)
    assert abs(float(same.stdout.strip().splitlines()[-1])) < 1e-6


def test_samples_npz_pixels_and_exact_mixture(tmp_path, cli):
    r = cli(
        "sample", "--model", "gmm:ring2d", "--num", 400, "--nfe", 20, "--solver", "heun", "--out", tmp_path, "--quiet"
    )
    assert r.exit_code == 0, r.output
    r = cli("fid", tmp_path / "samples.npz", "--ref", "gmm:ring2d", "--features", "pixels")
    assert r.exit_code == 0, r.output
    assert 0 <= float(r.stdout.strip().splitlines()[-1]) < 0.05


def test_missing_inception_names_file_and_sha(tmp_path, monkeypatch, cli):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SDISTILL_INCEPTION", raising=False)
    write_images(tmp_path / "a", 3)
    r = cli("fid", tmp_path / "a", "--ref", tmp_path / "a")
    assert r.exit_code == 2
    assert "inception-2015-12-05.pt" in r.output and "f58cb9b6" in r.output and "nvlabs" in r.output


@pytest.mark.parametrize(
    "case, message",
    [("unreadable", "unreadable image"), ("sizes", "differs"), ("nomu", "'mu' and 'sigma'"), ("noref", "not a file")],
)
def test_fid_bad_input(tmp_path, cli, inception, case, message):
    write_images(tmp_path / "a", 4)
    ref = tmp_path / "a"
    if case == "unreadable":
        (tmp_path / "a" / "zzz.png").write_bytes(b"not a png")
    elif case == "sizes":
        write_images(tmp_path / "a", 1, size=(9, 9), seed=5)
        Image.open(tmp_path / "a" / "000.png").resize((9, 9)).save(tmp_path / "a" / "001.png")
    elif case == "nomu":
        ref = tmp_path / "s.npz"
        np.savez(ref, sigma=np.eye(2))
    else:
        ref = "no_such_dataset"
    r = cli("fid", tmp_path / "a", "--ref", ref, "--inception", inception)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_engine_entry_points(tmp_path, inception):
    """run_fid / make_ref / reference_stats, as `fid` and `compare` call them."""
    write_images(tmp_path / "a", 6, seed=1)
    write_images(tmp_path / "b", 7, seed=2)
    path, n = make_ref(
        str(tmp_path / "b"), str(tmp_path / "sub" / "ref.npz"), "inception", "clean", 3, "cpu", str(inception)
    )
    assert n == 7 and path.is_file()
    with np.load(path) as f:
        assert f["mu"].shape == (2 * 2 * 3,) and f["sigma"].shape == (12, 12)
    res = run_fid(str(tmp_path / "a"), str(path), "inception", "clean", 4, "cpu", str(inception))
    assert isinstance(res, FIDResult) and res.samples == 6 and res.reference == str(path)
    direct = run_fid(str(tmp_path / "a"), str(tmp_path / "b"), "inception", "clean", 4, "cpu", str(inception))
    # Folder or its statistics: the same. 6-7 images in 12 dimensions give singular covariances, so the batch
    # sizes' summation orders (3 for the file, 4 here) move tr sqrt(S1 S2) by ~1e-9 relative, more or less with
    # the LAPACK build (round-off in a singular eigenproblem).
    assert direct.distance == pytest.approx(res.distance, rel=1e-6)
    mu, sigma, where = reference_stats("gmm:ring2d", "pixels", "clean", 4, "cpu", None)
    assert mu.shape == (2,) and sigma.shape == (2, 2) and "exact mixture moments" in where
    for args, message in (
        (("gmm:ring2d", "inception"), "add --features pixels"),
        (("toy:unet-gmm", "pixels"), "no exact data moments"),
    ):
        with pytest.raises(BadInput, match=message):
            reference_stats(args[0], args[1], "clean", 4, "cpu", None)
    for kw, message in (({"features": "hog"}, "--features"), ({"mode": "fast"}, "--mode"), ({"batch": 0}, "--batch")):
        args = {"features": "pixels", "mode": "clean", "batch": 4, **kw}
        with pytest.raises(BadInput, match=message):
            run_fid(str(tmp_path / "a"), "gmm:ring2d", args["features"], args["mode"], args["batch"], "cpu", None)


# --- issue 12, item 10: --make-ref writes exactly --out, and sizes are checked from the image headers --------------


def flat(text):
    """Text without whitespace: the CLI's messages wrap at the terminal width, anywhere in a long path."""
    return "".join(text.split())


def forged_png(path, width, height):
    """A PNG whose header claims width x height (a tiny image with its IHDR rewritten): PIL reports the size
    without decoding, and decoding it would allocate width * height * 3 bytes."""
    import struct
    import zlib

    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    path.write_bytes(bytes(data))


def test_make_ref_writes_exactly_the_out_path(tmp_path, cli):
    write_images(tmp_path / "imgs", 3)
    (tmp_path / "existing").mkdir()
    r = cli("fid", "--make-ref", tmp_path / "imgs", "--out", tmp_path / "existing", "--features", "pixels")
    assert r.exit_code == 2 and flat(f"--out: '{tmp_path / 'existing'}' is a folder") in flat(r.output)
    r = cli("fid", "--make-ref", tmp_path / "imgs", "--out", tmp_path / "ref", "--features", "pixels")
    assert r.exit_code == 2 and "--out: a statistics file ends in .npz" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "imgs"]  # nothing written anywhere
    assert list((tmp_path / "existing").iterdir()) == []
    r = cli("fid", "--make-ref", tmp_path / "imgs", "--out", tmp_path / "sub" / "ref.npz", "--features", "pixels")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"wrote {tmp_path / 'sub' / 'ref.npz'} (3 images")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["ref.npz"]  # no .tmp left, no .npz.npz


@pytest.mark.parametrize("features", ["pixels", "inception"])
def test_image_sizes_are_checked_from_the_header_before_decoding(tmp_path, cli, inception, features):
    write_images(tmp_path / "imgs", 2)
    args = ("--features", features, "--inception", inception)
    for side, message in ((5000, "a 5000x5000 image; images for FID have at most"), (10**5, "too large an image")):
        forged_png(tmp_path / "imgs" / "big.png", side, side)  # 75 MB and 30 GB decoded
        r = cli("fid", "--make-ref", tmp_path / "imgs", "--out", tmp_path / "ref.npz", *args)
        assert r.exit_code == 2 and flat(f"{tmp_path / 'imgs' / 'big.png'}: {message}") in flat(r.output)
    (tmp_path / "imgs" / "big.png").unlink()
    forged_png(tmp_path / "imgs" / "zz.png", 9, 8)
    r = cli("fid", "--make-ref", tmp_path / "imgs", "--out", tmp_path / "ref.npz", *args)
    assert r.exit_code == 2 and flat("zz.png: image size 9x8 differs from 000.png's 8x8") in flat(r.output)
    assert not (tmp_path / "ref.npz").exists()


def test_pixel_features_of_large_images_are_refused_before_the_covariance(tmp_path, cli):
    """A 256x256 grid image: pixel statistics would need a 196608 x 196608 covariance (309 GB)."""
    write_images(tmp_path / "grid", 2, size=(256, 256))
    r = cli("fid", "--make-ref", tmp_path / "grid", "--out", tmp_path / "ref.npz", "--features", "pixels")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert flat(f"{tmp_path / 'grid' / '000.png'}: 3x256x256 = 196608 values per sample") in flat(r.output)
    assert flat("(288 GiB)") in flat(r.output) and flat("use --features inception") in flat(r.output)
