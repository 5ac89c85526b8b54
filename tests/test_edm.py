import pickle
import sys
import types

import numpy as np
import pytest
import torch

from solverdistill.errors import BadInput
from solverdistill.models import resolve
from solverdistill.models.edm import sha256_of, trust_every_pickle
from solverdistill.teacher import TeacherCache

SRC = """
import torch
from torch_utils import persistence

@persistence.persistent_class
class TinyPrecond(torch.nn.Module):
    def __init__(self, img_resolution=8, img_channels=3, label_dim=0):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_min, self.sigma_max = 0, float("inf")
        self.conv = torch.nn.Conv2d(img_channels, img_channels, 3, padding=1)
        self.emb = torch.nn.Linear(max(label_dim, 1), img_channels)

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        s = sigma.reshape(-1, 1, 1, 1)
        out = x / (s ** 2 + 1) + 0.1 * self.conv(x)
        if class_labels is not None:
            out = out + self.emb(class_labels)[:, :, None, None]
        return out
"""

EVIL = SRC + "\nopen(__import__('os').environ['SDISTILL_TEST_MARKER'], 'w').write('ran')\n"


def write_edm_pickle(path, src=SRC, label_dim=0):
    """Pickle a network the way EDM's torch_utils.persistence does: a call to _reconstruct_persistent_obj(meta)
    carrying the module source, the class name and the object's state."""

    def _reconstruct_persistent_obj(meta):  # only its name matters when pickling
        raise AssertionError

    persistence = types.ModuleType("torch_utils.persistence")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj

    def persistent_class(cls):
        def __reduce__(self):
            meta = dict(type="class", version=6, module_src=src, class_name=cls.__name__, state=dict(self.__dict__))
            return _reconstruct_persistent_obj, (meta,)

        cls.__reduce__ = __reduce__
        return cls

    persistence.persistent_class = persistent_class
    pkg = types.ModuleType("torch_utils")
    pkg.persistence = persistence
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": pkg, "torch_utils.persistence": persistence})
    try:
        ns = {}
        exec(compile(SRC, "edm_test_src", "exec"), ns)  # the honest class, to build the network
        torch.manual_seed(0)
        net = ns["TinyPrecond"](label_dim=label_dim)
        with open(path, "wb") as f:
            pickle.dump({"ema": net, "loss_fn": None}, f, protocol=4)
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)
    return net


def test_vouched_pickle_loads_and_matches(tmp_path, monkeypatch):
    net = write_edm_pickle(tmp_path / "net.pkl")
    (tmp_path / "trusted.txt").write_text(f"# mine\n{sha256_of(tmp_path / 'net.pkl')}  net.pkl\n")
    monkeypatch.setenv("SDISTILL_TRUSTED", str(tmp_path / "trusted.txt"))
    d = resolve(f"edm:{tmp_path / 'net.pkl'}")
    assert d.shape == (3, 8, 8) and d.sigma_min == 0.002 and d.sigma_max == 80.0
    x, s = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        assert torch.allclose(d(x, s), net(x, s), atol=1e-6)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules


def test_unvouched_pickle_is_refused_before_anything_runs(tmp_path, monkeypatch, cli):
    marker = tmp_path / "ran.txt"
    monkeypatch.setenv("SDISTILL_TEST_MARKER", str(marker))
    monkeypatch.setenv("SDISTILL_TRUSTED", str(tmp_path / "empty.txt"))
    write_edm_pickle(tmp_path / "evil.pkl", src=EVIL)
    spec = f"edm:{tmp_path / 'evil.pkl'}"
    r = cli("sample", "--model", spec, "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 2 and sha256_of(tmp_path / "evil.pkl") in r.output and "--trust-pickle" in r.output
    assert not marker.exists()
    # Vouching by flag loads it (and its code runs: that is what vouching means) ...
    r = cli("--trust-pickle", "sample", "--model", spec, "--nfe", 2, "--num", 2, "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output
    assert marker.exists()
    # ... for that run only.
    marker.unlink()
    r = cli("sample", "--model", spec, "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 2 and not marker.exists()
    # The flag is accepted after the subcommand too, where people type it.
    r = cli("sample", "--trust-pickle", "--model", spec, "--nfe", 2, "--num", 2, "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output
    assert marker.exists()
    marker.unlink()
    trust_every_pickle(False)
    # The allow-list vouches too, line by line (comments and a file name after the digest are fine).
    (tmp_path / "list.txt").write_text(f"# vouched\n{sha256_of(tmp_path / 'evil.pkl').upper()}  evil.pkl\n")
    monkeypatch.setenv("SDISTILL_TRUSTED", str(tmp_path / "list.txt"))
    assert resolve(spec).shape == (3, 8, 8) and marker.exists()


def test_class_conditional_labels_per_seed(tmp_path, monkeypatch):
    write_edm_pickle(tmp_path / "c.pkl", label_dim=4)
    monkeypatch.setenv("SDISTILL_TRUSTED", str(tmp_path / "t.txt"))
    (tmp_path / "t.txt").write_text(sha256_of(tmp_path / "c.pkl") + "\n")
    d = resolve(f"edm:{tmp_path / 'c.pkl'}")
    labels = d.draw_cond([1, 2, 3])
    assert labels.shape == (3,) and torch.equal(labels, d.draw_cond([1, 2, 3]))
    assert labels.tolist() == [int(v) for v in d.draw_cond([3, 2, 1]).flip(0)]  # per seed, not per position
    assert set(d.draw_cond(range(40)).tolist()) == {0, 1, 2, 3}
    x = torch.randn(3, 3, 8, 8)
    assert d(x, torch.ones(3), labels).shape == x.shape
    with pytest.raises(BadInput, match="labels"):
        d(x, torch.ones(3))


def test_missing_file_message(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        resolve(f"edm:{tmp_path / 'nope.pkl'}")


@pytest.mark.parametrize("label_dim", [0, 4])
def test_teacher_dode_sample_end_to_end(tmp_path, monkeypatch, teacher_dode_sample, label_dim):
    write_edm_pickle(tmp_path / "n.pkl", label_dim=label_dim)
    monkeypatch.setenv("SDISTILL_TRUSTED", str(tmp_path / "t.txt"))
    (tmp_path / "t.txt").write_text(sha256_of(tmp_path / "n.pkl") + "\n")
    path = teacher_dode_sample(
        tmp_path, f"edm:{tmp_path / 'n.pkl'}", steps=10, num_samples=12, batch=6, samples=6, heldout=4, num=3
    )
    cache = TeacherCache.open(tmp_path / "cache")
    if label_dim:
        d = resolve(f"edm:{tmp_path / 'n.pkl'}")
        assert torch.equal(cache.cond(np.arange(12)), d.draw_cond(range(12)))
    else:
        assert cache.cond(np.arange(3)) is None
    with np.load(path) as f:
        assert f["x"].shape == (3, 3, 8, 8) and np.isfinite(f["x"]).all()


def test_fixed_class_option(tmp_path, cli):
    write_edm_pickle(tmp_path / "c.pkl", label_dim=4)
    trust_every_pickle(True)  # reset after every test (conftest)
    assert resolve(f"edm:{tmp_path / 'c.pkl'}?class=2").draw_cond([5, 6]).tolist() == [2, 2]
    r = cli(
        "--trust-pickle",
        "sample",
        "--model",
        f"edm:{tmp_path / 'c.pkl'}",
        "--class",
        9,
        "--out",
        tmp_path / "o",
        "--quiet",
    )
    assert r.exit_code == 2 and "--class" in r.output
