"""solverdistill.artifacts: NPZ and YAML round trips, the checks a loaded artifact passes (tampered files exit 2,
nothing in them runs), model fingerprints, and scan/find over artifact folders."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from solverdistill import artifacts, students
from solverdistill.artifacts import Artifact, new_meta
from solverdistill.errors import BadInput
from solverdistill.models import resolve
from solverdistill.models.edm import sha256_of
from solverdistill.npzfiles import write_npz

GRID = [80.0, 1.0, 0.1, 0.002]


@pytest.fixture(autouse=True)
def _one_line_messages(monkeypatch):
    """Rich wraps messages at the console width (80 without a terminal): make it wide, so a message is a line."""
    from solverdistill.commands import console

    monkeypatch.setattr(console.err, "width", 100_000)


def said(result):
    """The CLI's output with line wrapping undone (the console wraps long messages at its width)."""
    return " ".join(result.output.split())


def squeezed(text):
    """Text without any whitespace: long paths are wrapped mid-word."""
    return "".join(text.split())


def dode_artifact(fingerprint, nfe=3, lambdas=(0.0, 0.25, -0.5), method="dode"):
    """A hand-made D-ODE artifact over euler at NFE 3 (what `distill` writes, minus the metrics)."""
    grid = GRID if nfe == 3 else np.geomspace(80.0, 0.002, nfe + 1).tolist()
    meta = new_meta(
        method,
        base_solver="euler",
        nfe=nfe,
        network_passes=nfe,
        afs=False,
        grid=grid,
        model="gmm:tiny",
        model_fingerprint=fingerprint,
    )
    return Artifact(meta, {"lambdas": np.array(lambdas, dtype=np.float64)[:nfe], "grid": np.array(grid)})


@pytest.fixture(scope="module")
def tiny():
    return resolve("gmm:tiny", dtype=torch.float64)


def test_new_meta_has_the_required_fields():
    meta = new_meta("dode", nfe=3, model_fingerprint="f")
    for key in artifacts.REQUIRED_META + ("created", "version"):
        assert key in meta
    assert meta["format"] == "sdistill-solver" and meta["format_version"] == 1 and meta["method"] == "dode"


@pytest.mark.parametrize("name", ["a.npz", "a.yaml", "a.yml", "sub/dir/a.npz"])
def test_round_trip(tmp_path, tiny, noise, name):
    art = dode_artifact(tiny.fingerprint)
    art.meta["nested"] = {"list": [1, 2.5], "text": "x: y"}
    path = artifacts.save(art, tmp_path / name)
    assert path == tmp_path / name and path.is_file() and not list(path.parent.glob("*.tmp*"))
    back = artifacts.load(path, fingerprint=tiny.fingerprint)
    assert back.meta == art.meta and back.path == str(path) and back.method == "dode"
    assert set(back.arrays) == set(art.arrays)
    for k, v in art.arrays.items():
        assert np.array_equal(back.arrays[k], v) and back.arrays[k].dtype == np.float64
    method = students.get("dode")
    x0 = noise(tiny, 3)
    with torch.no_grad():
        assert torch.equal(method.load(back, tiny).solve(tiny, x0), method.load(art, tiny).solve(tiny, x0))


def test_yaml_artifacts_are_readable_and_editable(tmp_path, tiny):
    path = artifacts.save(dode_artifact(tiny.fingerprint), tmp_path / "a.yaml")
    text = path.read_text()
    assert "lambdas: [0.0, 0.25, -0.5]" in text and "method: dode" in text and "arrays_sha256: " in text
    path.write_text(text.replace("lambdas: [0.0, 0.25, -0.5]", "lambdas: [0.0, 1.5, 2]"))
    with pytest.raises(BadInput, match="delete meta.arrays_sha256"):  # an edit is noticed...
        artifacts.load(path)
    lines = [ln for ln in path.read_text().splitlines() if "arrays_sha256" not in ln]
    path.write_text("\n".join(lines) + "\n")  # ...and accepted once the checksum is removed on purpose
    assert artifacts.load(path).array("lambdas", shape=(3,)).tolist() == [0.0, 1.5, 2.0]


def test_unwritable_path_names_out(tmp_path, tiny):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput, match="--out: cannot write the artifact"):
        artifacts.save(dode_artifact(tiny.fingerprint), tmp_path / "file" / "a.npz")


def test_fingerprint_mismatch_is_refused_unless_forced(tmp_path, tiny):
    path = artifacts.save(dode_artifact(tiny.fingerprint), tmp_path / "a.npz")
    other = resolve("gmm:tiny,seed=9").fingerprint
    with pytest.raises(BadInput, match="use --force"):
        artifacts.load(path, fingerprint=other)
    assert artifacts.load(path, fingerprint=other, force=True).method == "dode"


def test_array_checks():
    art = Artifact(
        {"method": "m"}, {"a": np.zeros((2, 3)), "nan": np.array([1.0, np.inf]), "text": np.array(["x"])}, "p.npz"
    )
    assert art.array("a", shape=(2, 3)).shape == (2, 3) and art.array("a", ndim=2).ndim == 2
    for name, kw, message in (
        ("b", {}, "missing array 'b' needed by method 'm'"),
        ("a", {"shape": (3, 2)}, r"has shape \(2, 3\), expected \(3, 2\)"),
        ("a", {"ndim": 1}, "expected 1 dimensions"),
        ("nan", {}, "finite real numbers"),
        ("text", {}, "finite real numbers"),
    ):
        with pytest.raises(BadInput, match=message):
            art.array(name, **kw)


@pytest.mark.parametrize(
    "text, message",
    [
        ("meta: {format: [unclosed\n", "malformed YAML"),
        ("- 1\n", "needs a 'meta' mapping"),
        ("meta: {method: dode}\n", "meta lacks format, format_version, nfe, model_fingerprint"),
        (
            "meta: {format: other, format_version: 1, method: m, nfe: 1, model_fingerprint: f}\n",
            "meta.format is 'other'",
        ),
        (
            "meta: {format: sdistill-solver, format_version: 1, method: m, nfe: 1, model_fingerprint: f}\narrays: [1]\n",
            "'arrays' must be a mapping",
        ),
        (
            "meta: {format: sdistill-solver, format_version: 1, method: m, nfe: 1, model_fingerprint: f}\n"
            "arrays: {a: [x, y]}\n",
            "array 'a' must be a \\(nested\\) list of numbers",
        ),
    ],
)
def test_bad_yaml_artifacts(tmp_path, text, message):
    (tmp_path / "a.yaml").write_text(text)
    with pytest.raises(BadInput, match=message):
        artifacts.load(tmp_path / "a.yaml")


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch BOOM_EXECUTED",))


@pytest.mark.parametrize(
    "tamper, message",
    [
        ("bad_json", "not valid JSON"),
        ("no_meta", "missing the 'meta'"),
        ("no_lambdas", "missing array 'lambdas'"),
        ("misshaped", "has shape"),
        ("version", "unknown format_version"),
        ("pickle", "holds pickled Python objects"),
        ("yaml_bad", "malformed YAML"),
        ("nan", "finite"),
        ("not_npz", "a damaged NPZ solver artifact"),
        ("missing", "no such solver artifact"),
        ("grid", "decreasing sigmas"),
        ("method", "unknown method 'magic'"),
    ],
)
def test_tampered_artifacts_exit_2(tmp_path, monkeypatch, cli, tamper, message):
    monkeypatch.chdir(tmp_path)
    art = dode_artifact(resolve("gmm:tiny").fingerprint)
    meta, arrays = art.meta, art.arrays
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
    elif tamper == "not_npz":
        path.write_bytes(b"PK\x03\x04 this is not a zip")
    elif tamper == "missing":
        path = tmp_path / "nope.npz"
    elif tamper == "grid":
        write_npz(path, meta, lambdas=arrays["lambdas"], grid=np.array(GRID[::-1]))
    elif tamper == "method":
        write_npz(path, {**meta, "method": "magic"}, **arrays)
    else:
        path = tmp_path / "a.yaml"
        path.write_text("meta: {format: [unclosed\n")
    r = cli("sample", "--solver", path, "--num", 2, "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 2 and message in said(r) and "Traceback" not in r.output, r.output
    assert not (tmp_path / "BOOM_EXECUTED").exists()


def test_scan_and_find(tmp_path, tiny):
    fp, other = tiny.fingerprint, resolve("gmm:tiny,seed=9").fingerprint
    a, b = tmp_path / "a", tmp_path / "b"
    artifacts.save(dode_artifact(fp, nfe=3), a / "x_nfe3.npz")
    artifacts.save(dode_artifact(fp, nfe=4), a / "y_nfe4.yaml")
    artifacts.save(dode_artifact(other, nfe=3), a / "other.npz")
    sfd = dode_artifact(fp, nfe=3, method="sfd")
    artifacts.save(Artifact(sfd.meta, {"grid": sfd.arrays["grid"]}), b / "s.npz")  # only arrays SFD reads
    artifacts.save(dode_artifact(fp, nfe=3), b / "z_nfe3.npz")
    write_npz(a / "samples.npz", {"format": "sdistill-samples"}, x=np.zeros((2, 3)))  # not an artifact
    (a / "recipe.yaml").write_text("name: r\nmodel: {spec: gmm:tiny}\n")
    (a / "broken.yaml").write_text("meta: [")
    found = artifacts.scan([a, b])
    assert list(found) == [a / "other.npz", a / "x_nfe3.npz", a / "y_nfe4.yaml", b / "s.npz", b / "z_nfe3.npz"]
    assert all(isinstance(v, Artifact) and v.path == str(k) for k, v in found.items())
    assert list(artifacts.scan([a, b], fp)) == [a / "x_nfe3.npz", a / "y_nfe4.yaml", b / "s.npz", b / "z_nfe3.npz"]
    assert list(artifacts.scan([tmp_path / "nothing"])) == []
    assert artifacts.find("dode", 3, fp, [a, b]) == a / "x_nfe3.npz"
    assert artifacts.find("dode", 3, fp, [b, a]) == b / "z_nfe3.npz"  # folder order decides
    assert artifacts.find("dode", 4, fp, [a, b]) == a / "y_nfe4.yaml"
    assert artifacts.find("sfd", 3, fp, [a, b]) == b / "s.npz"
    assert artifacts.find("dode", 5, fp, [a, b]) is None
    assert artifacts.find("dode", 4, other, [a, b]) is None


# --- issue 12: nothing in an artifact runs code; every bad file is one clear message -------------------------------

MARKER_MODULE = """
import pathlib
pathlib.Path(__file__).with_name("IMPORTED").write_text("imported")
import torch


class Shrink(torch.nn.Module):
    sigma_min, sigma_max, shape = 0.002, 80.0, (2,)

    def forward(self, x, sigma, cond=None):
        return x / (1 + sigma[:, None] ** 2)


def make():
    return Shrink()
"""


class Touch:
    """Unpickling this creates a marker file: stands in for the code an EDM pickle runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.mark.parametrize(
    "spec", ["python:tempfile:mkdtemp", "python:evilmod:make", "python:./evilmod.py:make", "edm:{tmp}/net.pkl"]
)
def test_an_artifact_never_names_code_to_run(tmp_path, monkeypatch, cli, spec):
    """Item 1: meta.model is data; a spec whose backend imports, calls or unpickles is refused before it runs."""
    import pickle
    import tempfile

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where mkdtemp would create its folder
    (tmp_path / "evilmod.py").write_text(MARKER_MODULE)
    (tmp_path / "net.pkl").write_bytes(pickle.dumps(Touch(tmp_path / "UNPICKLED")))
    monkeypatch.setenv("SDISTILL_TRUSTED", str(tmp_path / "trusted.txt"))  # vouched for: only our check stops it
    (tmp_path / "trusted.txt").write_text(sha256_of(tmp_path / "net.pkl") + "\n")
    art = dode_artifact(resolve("gmm:tiny").fingerprint)
    art.meta["model"] = spec.format(tmp=tmp_path)
    path = artifacts.save(art, tmp_path / "a.npz")
    r = cli("sample", "--solver", path, "--num", 2, "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    for part in (f"meta.model: not loading {art.meta['model']!r}", f"name it yourself: --model {art.meta['model']}"):
        assert squeezed(part) in squeezed(r.output), r.output
    assert not (tmp_path / "IMPORTED").exists() and not (tmp_path / "UNPICKLED").exists()
    assert not list((tmp_path / "tmp").iterdir()) and not (tmp_path / "o" / "samples.npz").exists()


def test_a_model_named_on_the_command_line_still_loads(tmp_path, monkeypatch, cli):
    """...while --model SPEC, named by the user, imports the file they named (and only that file)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evilmod.py").write_text(MARKER_MODULE)
    r = cli("sample", "--model", "python:evilmod:make", "--num", 2, "--out", tmp_path / "x", "--quiet")
    assert r.exit_code == 2 and "not on the Python path" in said(r) and "python:path/to/evilmod.py:make" in said(r)
    assert not (tmp_path / "IMPORTED").exists()  # the current folder is not searched
    spec = "python:./evilmod.py:make"
    model = resolve(spec)
    art = dode_artifact(model.fingerprint)
    art.meta["model"] = spec
    path = artifacts.save(art, tmp_path / "a.npz")
    r = cli("sample", "--solver", path, "--model", spec, "--num", 2, "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "IMPORTED").exists() and (tmp_path / "o" / "samples.npz").exists()


def test_backends_declare_whether_loading_runs_code(tmp_path):
    from solverdistill.models import BACKENDS

    assert BACKENDS["gmm"].runs_code("tiny") is None and BACKENDS["toy"].runs_code("unet-gmm") is None
    assert "imports" in BACKENDS["python"].runs_code("m:f") and "pickle" in BACKENDS["edm"].runs_code("x.pkl")
    unet = tmp_path / "pipe" / "unet"
    unet.mkdir(parents=True)
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert BACKENDS["diffusers"].runs_code(f"{tmp_path / 'pipe'}?guidance=2") is None  # safetensors: plain tensors
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"")
    assert "unet/diffusion_pytorch_model.bin" in BACKENDS["diffusers"].runs_code(str(tmp_path / "pipe"))


def forged_npy(shape, dtype="<f8", data=b""):
    """A .npy entry whose header claims `shape` whatever the data that follows."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


@pytest.mark.parametrize(
    "tamper, message",
    [
        ("nfe_text", "meta.nfe: expected a positive integer (at most 1000), got 'five'"),
        ("model_int", "meta.model: expected a model spec (a string), got 5"),
        ("grid_up", "meta.grid: expected a list of finite, strictly decreasing, non-negative sigmas"),
        ("env_ref", "meta.student.schedule: ${...} is not expanded in an artifact, got '${HOME}'"),
        ("complex", "array 'lambdas' has dtype complex128 (complex); expected real numbers"),
        ("extra", "array 'extra' is not one that method 'dode' reads (lambdas, grid); refused without reading it"),
        ("huge_header", "its header claims shape (549755813888,)"),
        ("bit_flip", "a damaged NPZ solver artifact, entry 'lambdas' (BadZipFile: Bad CRC-32"),
        ("swapped", "its arrays do not match meta.arrays_sha256"),
        ("nan_samples", "3 of 3 samples hold NaN or infinite values"),
        ("yaml_alias", "aliases (*name) are not allowed"),
        ("yaml_tag", "malformed YAML artifact: could not determine a constructor"),
    ],
)
def test_bad_artifacts_are_one_message_and_write_nothing(tmp_path, cli, tamper, message):
    """Item 5: the fuzzed failures (tracebacks and silent passes) are each one exit-2 message, no samples."""
    import zipfile

    art = dode_artifact(resolve("gmm:tiny").fingerprint)
    path = artifacts.save(art, tmp_path / "good.npz")
    meta, arrays = art.meta, art.arrays
    bad = tmp_path / "bad.npz"
    if tamper == "nfe_text":
        write_npz(bad, {**meta, "nfe": "five"}, **arrays)
    elif tamper == "model_int":
        write_npz(bad, {**meta, "model": 5}, **arrays)
    elif tamper == "grid_up":
        write_npz(bad, {**meta, "grid": GRID[::-1]}, **arrays)
    elif tamper == "env_ref":  # settings are validated like a recipe, which would expand it
        write_npz(bad, {**meta, "student": {"schedule": "${HOME}"}}, **arrays)
    elif tamper == "complex":
        write_npz(bad, meta, lambdas=arrays["lambdas"].astype(complex), grid=arrays["grid"])
    elif tamper == "extra":
        write_npz(bad, meta, **arrays, extra=np.zeros(10))
    elif tamper in ("huge_header", "bit_flip"):
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename == "lambdas.npy" and tamper == "huge_header":  # 4 TiB claimed, 24 bytes stored
                    data = forged_npy((1 << 39,), data=data[-24:])
                dst.writestr(info, data)
        if tamper == "bit_flip":
            raw = bytearray(bad.read_bytes())
            raw[raw.index(arrays["lambdas"].tobytes()) + 9] ^= 0x10
            bad.write_bytes(bytes(raw))
    elif tamper == "swapped":
        write_npz(bad, meta, lambdas=arrays["lambdas"][::-1].copy(), grid=arrays["grid"])
    elif tamper == "nan_samples":  # finite weights, checksum resealed: only the samples show it
        huge = Artifact(dict(meta), {"lambdas": np.array([0.0, 1e30, 1e30]), "grid": arrays["grid"]})
        artifacts.save(huge, bad)
    else:
        bad = tmp_path / "bad.yaml"
        artifacts.save(art, bad)
        text = bad.read_text()
        if tamper == "yaml_alias":
            text = text.replace("meta:\n", "meta: &m\n") + "extra: [*m, *m]\n"
        else:
            text = text.replace("method: dode", "method: !!python/object/apply:os.system ['touch BOOM']")
        bad.write_text(text)
    for args in (["sample", "--solver", bad, "--num", 3, "--out", tmp_path / "o", "--quiet"], ["inspect", bad]):
        r = cli(*args)
        if tamper == "nan_samples" and args[0] == "inspect":  # a well-formed file: only sampling shows the flaw
            assert r.exit_code == 0, r.output
            continue
        assert r.exit_code == 2 and message in said(r) and "Traceback" not in r.output, (args[0], r.output)
        assert r.output.startswith("error: ") and r.output.strip().count("\n") == 0  # one line, one message
    assert not (tmp_path / "o" / "samples.npz").exists() and not list(tmp_path.glob("BOOM"))


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"just some text\nover two lines\n", b""])
def test_files_that_are_no_artifact_say_so(tmp_path, cli, content):
    """Item 10: random bytes or text given as an artifact are named for what they are not."""
    for name in ("x.npz", "x.bin"):
        (tmp_path / name).write_bytes(content)
        r = cli("sample", "--solver", tmp_path / name, "--num", 2, "--out", tmp_path / "o", "--quiet")
        assert r.exit_code == 2 and "not an NPZ or YAML solver artifact" in said(r), r.output
        assert "pickle" not in r.output and "a artifact" not in said(r) and "Traceback" not in r.output


def test_old_artifacts_without_a_checksum_still_load(tmp_path, tiny):
    art = dode_artifact(tiny.fingerprint)
    write_npz(tmp_path / "old.npz", art.meta, **art.arrays)  # what sdistill wrote before checksums
    back = artifacts.load(tmp_path / "old.npz", fingerprint=tiny.fingerprint)
    assert "arrays_sha256" not in back.meta and np.array_equal(back.arrays["lambdas"], art.arrays["lambdas"])
    for shipped in sorted(Path(__file__).resolve().parent.parent.joinpath("solvers").glob("*.*")):
        if shipped.suffix in (".npz", ".yaml"):  # the artifacts we ship carry one, and it verifies
            assert "arrays_sha256" in artifacts.load(shipped).meta


def test_arrays_are_read_only_when_used(tmp_path, tiny, monkeypatch):
    """Names and checksum are checked from a streamed pass; an array is allocated when a method asks for it."""
    from solverdistill import npzfiles

    path = artifacts.save(dode_artifact(tiny.fingerprint), tmp_path / "a.npz")
    reads = []
    real = npzfiles.NPZReader.read_hashed
    monkeypatch.setattr(npzfiles.NPZReader, "read_hashed", lambda self, name: reads.append(name) or real(self, name))
    art = artifacts.load(path)
    assert reads == ["meta"] and sorted(art.arrays) == ["grid", "lambdas"]
    assert art.arrays["lambdas"].tolist() == [0.0, 0.25, -0.5] and reads == ["meta", "lambdas"]
    art = artifacts.load(path)
    write_npz(path, art.meta, lambdas=np.array([0.0, 0.25, 0.5]), grid=np.array(GRID))  # replaced meanwhile
    with pytest.raises(BadInput, match="changed while in use"):
        art.arrays["lambdas"]
