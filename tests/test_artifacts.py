"""solverdistill.artifacts: NPZ and YAML round trips, the checks a loaded artifact passes (tampered files exit 2,
nothing in them runs), model fingerprints, and scan/find over artifact folders."""

import json

import numpy as np
import pytest
import torch

from solverdistill import artifacts, students
from solverdistill.artifacts import Artifact, new_meta
from solverdistill.errors import BadInput
from solverdistill.models import resolve
from solverdistill.npzfiles import write_npz

GRID = [80.0, 1.0, 0.1, 0.002]


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
    assert "lambdas: [0.0, 0.25, -0.5]" in text and "method: dode" in text
    path.write_text(text.replace("lambdas: [0.0, 0.25, -0.5]", "lambdas: [0.0, 1.5, 2]"))
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
        ("nan", {}, "finite numbers"),
        ("text", {}, "finite numbers"),
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
        ("pickle", "pickled object"),
        ("yaml_bad", "malformed YAML"),
        ("nan", "finite"),
        ("not_npz", "not a readable NPZ"),
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
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "BOOM_EXECUTED").exists()


def test_scan_and_find(tmp_path, tiny):
    fp, other = tiny.fingerprint, resolve("gmm:tiny,seed=9").fingerprint
    a, b = tmp_path / "a", tmp_path / "b"
    artifacts.save(dode_artifact(fp, nfe=3), a / "x_nfe3.npz")
    artifacts.save(dode_artifact(fp, nfe=4), a / "y_nfe4.yaml")
    artifacts.save(dode_artifact(other, nfe=3), a / "other.npz")
    artifacts.save(dode_artifact(fp, nfe=3, method="sfd"), b / "s.npz")
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
