"""`edm:PATH.pkl`: the official EDM checkpoints (a pickle of a dict whose `ema` entry is the network).

EDM's classes are "persistent": each object pickles as `torch_utils.persistence._reconstruct_persistent_obj(meta)`
with the defining module's whole source in `meta.module_src`, which runs at load time. So a checkpoint is loaded
only when the user vouched for it: its sha256 is listed in the allow-list (`$SDISTILL_TRUSTED`, else
`~/.config/sdistill/trusted.txt`, one hex digest per line) or the run says `--trust-pickle`. The check happens
before a single byte is unpickled. EDM's own packages are not needed: small stand-ins for `torch_utils` and
`dnnlib` live in `sys.modules` only while loading.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInput
from .base import Denoiser

_trust_every_pickle = False  # `sdistill --trust-pickle`: for this process only


def trust_every_pickle(trust: bool = True) -> None:
    """Load EDM pickles without an allow-list entry (they run code): what `sdistill --trust-pickle` asks for."""
    global _trust_every_pickle
    _trust_every_pickle = trust


def allow_list_path() -> Path:
    return Path(os.environ.get("SDISTILL_TRUSTED") or Path.home() / ".config" / "sdistill" / "trusted.txt")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_trust(path: Path, digest: str) -> None:
    if _trust_every_pickle:
        return
    allowed = set()
    lst = allow_list_path()
    if lst.is_file():
        allowed = {
            line.split()[0].lower()
            for line in lst.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        }
    if digest not in allowed:
        raise BadInput(
            f"--model edm:{path}: an EDM checkpoint runs the Python code stored inside it when loaded, so it "
            f"is loaded only if you vouch for it. Its sha256 is {digest}; add that line to {lst} "
            f"(or set SDISTILL_TRUSTED to another list), or pass --trust-pickle for this run."
        )


class _EasyDict(dict):
    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


def _stand_in_modules(reconstruct: Callable[[dict], Any]) -> dict[str, types.ModuleType]:
    """What EDM's pickled sources import: `torch_utils.persistence` (the decorator), `torch_utils.misc`,
    `dnnlib` (EasyDict)."""
    torch_utils = types.ModuleType("torch_utils")
    persistence = types.ModuleType("torch_utils.persistence")
    persistence.persistent_class = lambda cls: cls
    persistence._reconstruct_persistent_obj = reconstruct
    misc = types.ModuleType("torch_utils.misc")
    dnnlib = types.ModuleType("dnnlib")
    dnnlib.EasyDict = _EasyDict
    dnnlib.util = types.ModuleType("dnnlib.util")
    dnnlib.util.EasyDict = _EasyDict
    torch_utils.persistence, torch_utils.misc = persistence, misc
    return {
        "torch_utils": torch_utils,
        "torch_utils.persistence": persistence,
        "torch_utils.misc": misc,
        "dnnlib": dnnlib,
        "dnnlib.util": dnnlib.util,
    }


def load_edm_pickle(path: Path) -> dict:
    """Unpickle a vouched-for EDM checkpoint with our stand-ins; each distinct module source is compiled once."""
    modules: dict[str, types.ModuleType] = {}

    def reconstruct(meta: dict) -> Any:
        meta = _EasyDict(meta)
        if meta.get("type") != "class":
            raise BadInput(f"{path}: unsupported persistent object type {meta.get('type')!r}")
        src = meta["module_src"]
        module = modules.get(src)
        if module is None:
            module = types.ModuleType(f"_sdistill_edm_{len(modules)}")
            sys.modules[module.__name__] = module
            exec(compile(src, f"<{path.name}:{meta['class_name']}>", "exec"), module.__dict__)  # vouched for
            modules[src] = module
        cls = getattr(module, meta["class_name"])
        obj = cls.__new__(cls)
        state = meta.get("state")
        if callable(getattr(obj, "__setstate__", None)):
            obj.__setstate__(state)
        else:
            obj.__dict__.update(state)
        return obj

    stand_ins = _stand_in_modules(reconstruct)
    saved = {k: sys.modules.get(k) for k in stand_ins}
    sys.modules.update(stand_ins)
    try:
        with open(path, "rb") as f:
            data = pickle.Unpickler(f).load()
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"--model edm:{path}: cannot load the checkpoint ({type(e).__name__}: {e})") from None
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return data


class EDMDenoiser(Denoiser):
    """Wraps `net(x, sigma, class_labels)`; sampling range [max(0.002, net.sigma_min), min(80, net.sigma_max)]."""

    def __init__(self, net: torch.nn.Module, spec: str, fingerprint: str, fixed_class: int | None = None) -> None:
        self.net = net.eval().requires_grad_(False)
        self.fixed_class = fixed_class
        self.spec, self.fingerprint = spec, fingerprint
        self.shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
        self.label_dim = int(getattr(net, "label_dim", 0) or 0)
        self.sigma_min = max(0.002, float(getattr(net, "sigma_min", 0.0)))
        self.sigma_max = min(80.0, float(getattr(net, "sigma_max", float("inf"))))
        self.last_features = None
        self._hook_bottleneck()

    def _hook_bottleneck(self) -> None:
        """DLMS designer input: the last 8x8 encoder block, averaged over channels (64 numbers)."""
        enc = getattr(getattr(self.net, "model", None), "enc", None)
        keys = [k for k in (enc.keys() if enc is not None else []) if k.startswith("8x8_block")]
        if keys:

            def keep(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
                self.last_features = output.mean(1).flatten(1)

            enc[keys[-1]].register_forward_hook(keep)

    def draw_cond(self, seeds: Sequence[int]) -> torch.Tensor | None:
        """One class label per seed (its own generator, offset from the noise's), so labels too are per sample."""
        if self.label_dim == 0:
            return None
        if self.fixed_class is not None:
            return torch.full((len(list(seeds)),), self.fixed_class, dtype=torch.long)
        return torch.tensor(
            [
                int(torch.randint(self.label_dim, (1,), generator=torch.Generator().manual_seed(int(s) + (1 << 31))))
                for s in seeds
            ]
        )

    def labels(self, cond: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        if self.label_dim == 0:
            return None
        if cond is None:
            raise BadInput(
                f"--model {self.spec}: a class-conditional model needs labels (--class K, or drawn per seed)"
            )
        cond = torch.as_tensor(cond, device=device)
        if cond.ndim == 1:  # class indices -> one-hot
            cond = torch.nn.functional.one_hot(cond.long(), self.label_dim)
        return cond.to(torch.float32)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        with self.autocast():
            out = self.net(x.to(torch.float32), sigma.to(torch.float32), self.labels(cond, x.shape[0], x.device))
        return out.to(x.dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EDMDenoiser:
        self.device = torch.device(device) if device is not None else self.device
        self.net.to(device=self.device)
        self.dtype = dtype or self.dtype
        return self


def load(body: str, spec: str) -> EDMDenoiser:
    """`edm:PATH.pkl`, optionally `?class=K` (one class for every seed; otherwise drawn per seed)."""
    raw, _, query = body.partition("?")
    fixed = None
    if query:
        key, _, value = query.partition("=")
        if key != "class" or not value.isdigit():
            raise BadInput(f"--model {spec}: the only option is ?class=K (a class index), got {query!r}")
        fixed = int(value)
    path = Path(os.path.expanduser(raw))
    if not path.is_file():
        raise BadInput(
            f"--model {spec}: no such file {path}; EDM checkpoints (e.g. edm-cifar10-32x32-uncond-vp.pkl) are "
            "published by NVIDIA with the EDM code release"
        )
    digest = sha256_of(path)
    check_trust(path, digest)
    data = load_edm_pickle(path)
    net = data.get("ema") if isinstance(data, dict) else None
    if not isinstance(net, torch.nn.Module):
        raise BadInput(f"--model {spec}: expected a pickled dict with an 'ema' network, got {type(data).__name__}")
    for attr in ("img_resolution", "img_channels"):
        if not hasattr(net, attr):
            raise BadInput(f"--model {spec}: the 'ema' network lacks {attr}")
    den = EDMDenoiser(net, spec, "edm:" + digest[:16], fixed)
    if fixed is not None and not 0 <= fixed < max(den.label_dim, 1):
        raise BadInput(f"--class: {fixed} is outside this model's {den.label_dim} classes")
    return den
