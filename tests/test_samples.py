"""solverdistill.samples (the `sample` job), images.py (pictures of samples) and npzfiles.py (our NPZ files)."""

import json

import numpy as np
import pytest
import torch

from solverdistill import artifacts
from solverdistill.errors import BadInput
from solverdistill.images import as_images, image_grid, is_image, to_uint8, to_uint8_nchw
from solverdistill.npzfiles import ensure_dir, read_meta, read_npz, write_npz
from solverdistill.progress import Bar
from solverdistill.samples import is_artifact, load_solver, per_sample_grids, run_sample, with_options
from solverdistill.solvers import Plan, plan
from solverdistill.students.dlms import DLMS, DLMSStudent, initial_grid


def test_with_options_appends_model_flags():
    assert with_options("gmm:tiny") == "gmm:tiny" and with_options(None, prompt="a") is None
    assert (
        with_options("diffusers:/m", prompt="a cat", guidance=7.5, prompts=None)
        == "diffusers:/m?prompt=a+cat&guidance=7.5"
    )
    assert with_options("edm:/m.pkl?class=2", round_timesteps=1) == "edm:/m.pkl?class=2&round_timesteps=1"


def test_is_artifact(tmp_path):
    (tmp_path / "named").write_text("x")
    assert is_artifact("a.npz") and is_artifact("b.yml") and is_artifact(str(tmp_path / "named"))
    assert not is_artifact("dpm++") and not is_artifact("euler")


def test_per_sample_grids_from_callback_records(tiny64, noise):
    """The sigmas each sample actually used, rebuilt from `generate`'s (seeds, step) records, batch after batch."""
    cfg = DLMSStudent(nfe=3, afs=True)
    student = DLMS(cfg, initial_grid(cfg, 0.002, 80.0)).double()
    with torch.no_grad():
        for p in student.designer.head.parameters():
            p.normal_(0, 2.0, generator=torch.Generator().manual_seed(0))
    records, per_batch = [], []
    for x in (noise(tiny64, 3, seed=1), noise(tiny64, 2, seed=2)):
        steps = []
        with torch.no_grad():
            student.solve(tiny64, x, callback=steps.append)
        records += [(s.i, s.sigma, s.sigma_next) for s in steps]
        per_batch.append(torch.stack([steps[0].sigma] + [s.sigma_next for s in steps], 1))
    got = per_sample_grids(records, 4)  # 5 samples in two batches, the first 4 kept
    assert got.shape == (4, 5) and got.dtype == torch.float64
    assert torch.equal(got, torch.cat(per_batch)[:4])
    assert (got[:, 1:] < got[:, :-1]).all() and len({tuple(r) for r in got.tolist()}) == 4


def test_load_solver(tmp_path, tiny64):
    den, solver, extra = load_solver("dpm++2m", "gmm:tiny", 4, None, True, False, "cpu", torch.float64, False)
    assert (
        isinstance(solver, Plan) and solver.nfe == 4 and solver.afs and solver.options == {"lower_order_final": False}
    )
    assert den.dtype == torch.float64 and extra == {"schedule": "logsnr"}
    assert load_solver("euler", "gmm:tiny", None, None, False, True, "cpu", torch.float32, False)[1].nfe == 10
    with pytest.raises(BadInput, match="--model: required"):
        load_solver("euler", None, 4, None, False, True, "cpu", torch.float32, False)
    meta = artifacts.new_meta(
        "dode", base_solver="euler", nfe=3, afs=False, model="gmm:tiny", model_fingerprint=tiny64.fingerprint
    )
    path = artifacts.save(
        artifacts.Artifact(meta, {"lambdas": np.zeros(3), "grid": plan("euler", 3, tiny64).sigmas.numpy()}),
        tmp_path / "d.npz",
    )
    den, solver, extra = load_solver(str(path), None, None, None, False, True, "cpu", torch.float32, False)
    assert den.spec == "gmm:tiny" and solver.nfe == 3 and extra == {"artifact": str(path), "method": "dode"}
    with pytest.raises(BadInput, match="brings its own grid"):
        load_solver(str(path), None, None, "logsnr", False, True, "cpu", torch.float32, False)
    with pytest.raises(BadInput, match="distilled for NFE 3, not 5"):
        load_solver(str(path), None, 5, None, False, True, "cpu", torch.float32, False)


def test_run_sample_meta(tmp_path):
    line = run_sample(
        model="gmm:tiny",
        solver="heun",
        nfe=5,
        schedule=None,
        afs=True,
        lower_order_final=True,
        num=3,
        seed=7,
        batch=2,
        out_dir=tmp_path,
        device="cpu",
        dtype="float64",
        png=False,
        progress=Bar(3, "t", disabled=True),
    )
    assert "3 samples, heun, NFE 5 (5 network passes), AFS, 3 steps" in line
    with np.load(tmp_path / "samples.npz") as f:
        meta = read_meta(f)
        assert list(f["seeds"]) == [7, 8, 9] and "grids" not in f.files  # a shared grid: no per-sample grids
    assert meta["format"] == "sdistill-samples" and meta["nfe"] == 5 and meta["steps"] == 3 and meta["afs"] is True
    assert meta["dtype"] == "float64" and meta["device"] == "cpu" and meta["seed"] == 7 and meta["num"] == 3


# --- images ------------------------------------------------------------------------------------------------------


def test_uint8_conversion_follows_edm():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 3.0]).reshape(1, 1, 2, 3)
    assert to_uint8_nchw(x).flatten().tolist() == [0, 0, 128, 191, 255, 255]
    assert to_uint8(x.numpy()).shape == (1, 2, 3, 1)


def test_image_grid_tiles_and_as_images():
    x = np.stack([np.full((3, 8, 8), v, dtype=np.float32) for v in (-1.0, 0.0, 1.0)])
    g = image_grid(x, cols=2)
    assert g.shape == (16, 16, 3) and g[0, 0, 0] == 0 and g[0, 8, 0] == 128 and g[8, 0, 0] == 255
    assert g[8, 8:].max() == 0  # the empty fourth tile
    assert image_grid(x[:, :1]).shape == (16, 16)  # one channel: HW, square layout
    assert is_image((3, 8, 8)) and is_image((1, 32, 32)) and not is_image((2, 8, 8)) and not is_image((3, 4, 4))
    pts = as_images(np.arange(10, dtype=np.float32).reshape(2, 5))  # 5 values -> 3x3 grey square, 8x upscaled
    assert pts.shape == (2, 1, 24, 24) and pts[1, 0, 0, 8] == 6.0 and pts[1, 0, 23, 23] == 0.0


# --- npzfiles ----------------------------------------------------------------------------------------------------


def test_npz_round_trip_and_refusals(tmp_path):
    write_npz(tmp_path / "a.npz", {"k": [1, "x"]}, x=np.arange(3), y=[1.5])
    arrays, meta = read_npz(tmp_path / "a.npz")
    assert meta == {"k": [1, "x"]} and arrays["x"].tolist() == [0, 1, 2] and arrays["y"].tolist() == [1.5]
    assert not list(tmp_path.glob("*.tmp*"))
    np.savez(tmp_path / "nometa.npz", x=np.zeros(2))
    with pytest.raises(BadInput, match="missing the 'meta' entry"):
        read_npz(tmp_path / "nometa.npz")
    np.savez(tmp_path / "obj.npz", meta=np.array(json.dumps({})), x=np.array([object()], dtype=object))
    with pytest.raises(BadInput, match="array 'x' holds pickled Python objects"):
        read_npz(tmp_path / "obj.npz", "samples file")
    (tmp_path / "zip.npz").write_bytes(b"PK\x03\x04 damaged")
    with pytest.raises(BadInput, match="a damaged NPZ samples file"):
        read_npz(tmp_path / "zip.npz", "samples file")
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    with pytest.raises(BadInput, match=r"not an NPZ samples file \(File is not a zip file\)"):
        read_npz(tmp_path / "text.npz", "samples file")


def forged(path, entries):
    """An NPZ from raw (name, .npy header dict, data bytes) entries."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for name, header, data in entries:
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, header)
            z.writestr(name, buf.getvalue() + data)


META = ("meta.npy", {"descr": "<U2", "fortran_order": False, "shape": ()}, "{}".encode("utf-32-le"))


@pytest.mark.parametrize(
    "entries, message",
    [
        ([META, ("x.npy", {"descr": "<f8", "fortran_order": False, "shape": (1 << 40,)}, b"\0" * 8)], "claims shape"),
        ([META, ("x.npy", {"descr": "<c16", "fortran_order": False, "shape": (1,)}, b"\0" * 16)], "complex"),
        ([META, ("x.npy", {"descr": "|b1", "fortran_order": False, "shape": (1,)}, b"\0")], "boolean"),
        ([META, ("x.npy", {"descr": "<f8", "fortran_order": False, "shape": (-1,)}, b"")], "negative dimension"),
        ([META, ("x.txt", {"descr": "<f8", "fortran_order": False, "shape": ()}, b"\0" * 8)], "not a .npy array"),
        ([META, META], "two entries named 'meta'"),
        ([("meta.npy", {"descr": "<f8", "fortran_order": False, "shape": ()}, b"\0" * 8)], "one JSON string"),
    ],
)
def test_npz_headers_are_checked_before_reading(tmp_path, entries, message):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it was asked to write
        forged(tmp_path / "f.npz", entries)
    with pytest.raises(BadInput, match=message):
        read_npz(tmp_path / "f.npz", "samples file")


def test_npz_reads_fortran_and_big_endian_arrays_as_native(tmp_path):
    a = np.asfortranarray(np.arange(6.0).reshape(2, 3)).astype(">f4")
    write_npz(tmp_path / "a.npz", {}, a=a)
    arrays, _ = read_npz(tmp_path / "a.npz")
    assert np.array_equal(arrays["a"], a) and arrays["a"].dtype == np.float32 and arrays["a"].flags.c_contiguous
    assert torch.from_numpy(arrays["a"]).shape == (2, 3)  # native byte order: torch takes it as it is


def test_ensure_dir(tmp_path):
    assert ensure_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    assert not list((tmp_path / "a" / "b").iterdir())  # the write probe is removed
    (tmp_path / "f").write_text("x")
    with pytest.raises(BadInput, match="--grid: cannot write to"):
        ensure_dir(tmp_path / "f" / "sub", "--grid")


def test_ensure_dir_from_many_processes_at_once(tmp_path):
    """torchrun ranks check the same --out folder together: no rank may remove another's write probe."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda _: ensure_dir(tmp_path / "out"), range(400)))
    assert len(done) == 400 and not list((tmp_path / "out").iterdir())


def test_full_disk_while_writing_samples_is_bad_input_and_leaves_nothing(tmp_path, cli, monkeypatch):
    """Issue 12 item 7: a full disk gives exit 2 naming the file and the reason, and no temporary file stays."""
    import errno

    from solverdistill import npzfiles

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(npzfiles.np, "savez", full)
    r = cli(
        "sample", "--model", "gmm:tiny", "--solver", "euler", "--nfe", 3, "--num", 2, "--out", tmp_path / "s", "--quiet"
    )
    assert r.exit_code == 2, r.output
    assert "samples.npz: cannot write: No space left on device" in r.output and "Traceback" not in r.output
    assert list((tmp_path / "s").iterdir()) == []
