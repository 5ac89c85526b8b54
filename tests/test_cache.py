"""solverdistill.teacher.cache: checked manifests, checksums on first read, unusable places and full disks (each bad
file or place is one exit-2 message naming it; nothing damaged is ever recorded or trained on)."""

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from solverdistill.errors import BadInput
from solverdistill.teacher import TeacherCache
from solverdistill.teacher import cache as cache_mod

TEACHER = {"steps": 8, "num_samples": 24, "batch": 8, "shard_size": 8, "seed": 3}


@pytest.fixture(autouse=True)
def _one_line_messages(monkeypatch):
    """Rich wraps messages at the console width (80 without a terminal): make it wide, so a message is a line."""
    from solverdistill.commands import console

    monkeypatch.setattr(console.err, "width", 100_000)


def flat(text):
    return text.strip()


@pytest.fixture
def built(tmp_path, recipe_file, cli):
    """A recipe (D-ODE student) and its finished cache of 3 shards; returns (recipe path, cache folder)."""
    rec = recipe_file(
        tmp_path / "r.yaml",
        teacher={**TEACHER, "cache": str(tmp_path / "c")},
        student={"method": "dode", "nfe": 3, "base": "euler"},
        train={"samples": 12, "heldout": 8, "device": "cpu"},
        output=tmp_path / "out" / "dode.npz",
    )
    r = cli("teacher", rec, "--quiet")
    assert r.exit_code == 0, r.output
    return rec, tmp_path / "c"


def edit_manifest(folder, change):
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


# --- item 3: readers check checksums; corrupt data is refused, not trained on ----------------------------------


def test_distill_refuses_nan_written_into_a_shard(built, cli):
    rec, c = built
    path = c / "shard-000001" / "denoised.npy"
    arr = np.load(path)
    arr[2, 3] = np.nan  # same size, same header: only the checksum can tell
    np.save(path, arr)
    r = cli("distill", rec, "--quiet")
    out = flat(r.output)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "shard-000001/denoised.npy: checksum mismatch" in out and "sdistill cache info --verify" in out
    assert not (c.parent / "out" / "dode.npz").exists()  # nothing trained on it
    r = cli("cache", "info", c, "--verify")
    assert r.exit_code == 1 and "bad shard shard-000001" in flat(r.output)
    assert cli("teacher", rec, "--quiet").exit_code == 0  # regenerates the marked shard
    assert cli("cache", "info", c, "--verify").exit_code == 0
    assert cli("distill", rec, "--quiet").exit_code == 0


def test_swapped_files_of_equal_size_are_caught_once_per_file(built, cli, monkeypatch):
    rec, c = built
    a, b = c / "shard-000000" / "x.npy", c / "shard-000001" / "x.npy"
    assert a.stat().st_size == b.stat().st_size
    os.replace(a, c / "swap")
    os.replace(b, a)
    os.replace(c / "swap", b)
    cache = TeacherCache.open(c)  # sizes and headers are as recorded: only the checksums differ
    with pytest.raises(BadInput, match=r"shard-000000/x.npy: checksum mismatch.*sdistill cache info --verify"):
        cache.get("x", [0])
    assert cli("cache", "info", c, "--verify").exit_code == 1
    assert cli("teacher", rec, "--quiet").exit_code == 0
    # Verified once per file and process: a second cache object (or a second read) does not hash again.
    calls = []
    real = cache_mod.crc32_file
    monkeypatch.setattr(cache_mod, "crc32_file", lambda p: calls.append(p) or real(p))
    cache_mod._VERIFIED.clear()
    for _ in range(2):
        c2 = TeacherCache.open(c)
        c2.get("x", np.arange(24))
        c2.get("noise", [5])
    assert len(calls) == 3 + 1  # x.npy of each of the 3 shards, noise.npy of shard 0


# --- item 4: manifests are checked like recipes --------------------------------------------------------------


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda m: m["shards"][1].pop("crc32"), "shards[1].crc32: expected a mapping"),
        (lambda m: m.__setitem__("shards", "shard-000000"), "shards: expected a list"),
        (lambda m: m["shards"][2]["bytes"].__setitem__("x.npy", "12"), "shards[2].bytes.x.npy: expected an integer"),
        (lambda m: m["shards"][1]["crc32"].pop("x.npy"), "shards[1].crc32.x.npy: expected a CRC-32"),
        (lambda m: m["shards"][1].__setitem__("name", "../clean/shard-000001"), "shards[1].name: expected a shard"),
        (lambda m: m["shards"][1].__setitem__("count", -4), "shards[1].count: expected an integer in [1,"),
        (lambda m: m["shards"][2].__setitem__("start", 12), "shards[2].start: expected no overlap with shards[1]"),
        (lambda m: m["spec"].__setitem__("grid", "logsnr"), "spec.grid: expected a list"),
        (lambda m: m["shards"][0].__setitem__("status", "fine"), 'shards[0].status: expected "ok" or "bad"'),
    ],
)
def test_bad_manifest_is_one_message_naming_the_key(built, cli, change, key):
    rec, c = built
    edit_manifest(c, change)
    for args in (("cache", "info", c), ("teacher", rec, "--quiet"), ("distill", rec, "--quiet")):
        r = cli(*args)
        out = flat(r.output)
        assert r.exit_code == 2 and f"manifest.json: {key}" in out, (args, r.output)
        assert out.count("error:") == 1 and "Traceback" not in r.output
    assert not (c.parent / "clean").exists()


def test_gaps_in_coverage_are_filled_by_the_next_teacher_run(built, cli):
    rec, c = built
    edit_manifest(c, lambda m: m["shards"][1].__setitem__("count", 4))  # samples 12..15 in no shard
    with pytest.raises(
        BadInput, match="shard-000001: seeds.npy holds int64 \\[8\\], expected int64 \\[4\\]"
    ):  # its files hold 8 samples, not 4
        TeacherCache.open(c)
    r = cli("cache", "info", c, "--verify")
    assert r.exit_code == 1 and "samples 12..15: in no shard" in flat(r.output)
    r = cli("teacher", rec, "--quiet")
    assert r.exit_code == 0 and "8 integrated now" in r.output  # shard 1 again (4) and the gap (4)
    edit_manifest(c, lambda m: m["shards"].pop(0))  # a deleted entry: a gap at the front
    r = cli("teacher", rec, "--quiet")
    assert r.exit_code == 0 and "8 integrated now" in r.output
    assert cli("cache", "info", c, "--verify").exit_code == 0
    cache = TeacherCache.open(c)
    assert cache.num_samples == 24 and np.array_equal(cache.get("seeds", np.arange(24)), np.arange(3, 27))
    names = [s["name"] for s in json.loads((c / "manifest.json").read_text())["shards"]]
    assert len(set(names)) == len(names) == 4  # new shards never reuse a name in use


# --- item 7: unusable places and full disks -----------------------------------------------------------------


def test_unusable_cache_places_are_one_message_with_the_reason(tmp_path, recipe_file, cli):
    (tmp_path / "file").write_text("not a folder")
    for place, why in (
        (tmp_path / "file" / "c", "Not a directory"),
        (tmp_path / ("d" * 300) / "c", "File name too long"),  # one name longer than the filesystem allows
        (tmp_path / "/".join(["d" * 250] * 20), ""),  # a 5,000-character path
    ):
        rec = recipe_file(tmp_path / "r.yaml", teacher={**TEACHER, "cache": str(place)})
        for args in (("teacher", rec, "--quiet"), ("cache", "info", place)):
            r = cli(*args)
            out = flat(r.output)
            assert r.exit_code == 2 and "Traceback" not in r.output, r.output
            assert why in out or args[0] == "cache"  # cache info on a file's child: "no teacher cache here"
            assert out.startswith("error:") and "\n" not in out and len(out) < 600  # long paths are shortened


def _permissions_bind():
    """False for root with its overrides (file modes do not stop it), True for everyone else."""
    if os.name != "posix":
        return False
    probe = Path(tempfile.mkdtemp())
    probe.chmod(0)
    try:
        os.listdir(probe)
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o700)
        probe.rmdir()


@pytest.mark.skipif(not _permissions_bind(), reason="file permissions do not bind this user (root)")
def test_unwritable_and_unreadable_folders(tmp_path, recipe_file, cli, built):
    rec, c = built
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    r = cli("teacher", recipe_file(tmp_path / "r2.yaml", teacher={**TEACHER, "cache": str(ro / "c")}), "--quiet")
    assert r.exit_code == 2 and "Permission denied" in flat(r.output)
    c.chmod(0)
    try:
        for args in (("cache", "info", c), ("teacher", rec, "--quiet")):
            r = cli(*args)
            assert r.exit_code == 2 and "Permission denied" in flat(r.output), r.output
    finally:
        c.chmod(0o755)


def test_full_disk_removes_the_unfinished_shard_and_keeps_the_rest(tmp_path, recipe_file, cli, monkeypatch):
    rec = recipe_file(tmp_path / "r.yaml", teacher={**TEACHER, "cache": str(tmp_path / "c")})
    real, calls = cache_mod.StreamedArray.write, []

    def write(self, rows):
        calls.append(self.path)
        if "shard-000001" in str(self.path) and self.path.name == "x.npy":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, rows)

    monkeypatch.setattr(cache_mod.StreamedArray, "write", write)
    r = cli("teacher", rec, "--quiet")
    out = flat(r.output)
    assert r.exit_code == 2 and "No space left on device" in out and "shard-000001" in out, r.output
    assert out.count("error:") == 1 and "Traceback" not in r.output
    c = tmp_path / "c"
    assert not list(c.glob("*.tmp")) and not (c / "writer.lock").exists()
    shards = json.loads((c / "manifest.json").read_text())["shards"]
    assert [(s["name"], s["status"]) for s in shards] == [("shard-000000", "ok")]  # only what is on disk
    assert cli("cache", "info", c, "--verify").exit_code == 0
    monkeypatch.setattr(cache_mod.StreamedArray, "write", real)
    r = cli("teacher", rec, "--quiet")
    assert r.exit_code == 0 and "16 integrated now" in r.output
    assert cli("cache", "info", c, "--verify").exit_code == 0


def test_shard_folders_are_never_read_through_links(built, cli):
    rec, c = built
    other = c.parent / "elsewhere"
    shutil.copytree(c / "shard-000001", other)
    shutil.rmtree(c / "shard-000001")
    (c / "shard-000001").symlink_to(other, target_is_directory=True)
    with pytest.raises(BadInput, match="shard-000001: not a plain folder"):
        TeacherCache.open(c)
    assert cli("teacher", rec, "--quiet").exit_code == 0  # replaced by a real folder, the link target untouched
    assert not (c / "shard-000001").is_symlink() and (other / "x.npy").is_file()
    assert cli("cache", "info", c, "--verify").exit_code == 0


def test_non_finite_teacher_output_is_never_recorded(tmp_path, recipe_file, cli, monkeypatch):
    from solverdistill.teacher import run as run_mod

    rec = recipe_file(tmp_path / "r.yaml", teacher={**TEACHER, "cache": str(tmp_path / "c")})
    real = run_mod.integrate_batch

    def diverging(*args):
        x, d = real(*args)
        calls.append(1)
        if len(calls) == 2:  # the second batch diverges (an fp16 network can)
            d[0, -1] = float("nan")
        return x, d

    calls = []
    monkeypatch.setattr(run_mod, "integrate_batch", diverging)
    r = cli("teacher", rec, "--quiet")
    assert r.exit_code == 1 and "denoiser outputs for seeds 11..18 are not finite" in r.output, r.output
    shards = json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"]
    assert [s["name"] for s in shards] == ["shard-000000"] and not list((tmp_path / "c").glob("*.tmp"))
