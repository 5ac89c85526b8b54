"""The teacher cache directory (docs/teacher-cache.md): format, shard writer and memory-mapped reader.

    DIR/manifest.json            spec (model fingerprint, solver, grid, dtype, shape, first seed), format
                                 version, and the finished shards with CRC-32 checksums; rewritten atomically
    DIR/shard-NNNNNN/*.npy       seeds [n], noise [n,*shape], sigmas [T+1], x [n,T+1,*shape],
                                 denoised [n,T+1,*shape] for the contiguous seeds of one shard

A shard is written under `shard-NNNNNN.tmp` and renamed when complete, so a killed run loses only the shard
in progress. CRC-32 checksums are computed while writing (files are written front to back), not by reading
back: the writer shares the CPU with the integration, and CRC-32 is several times cheaper than SHA-256 while
catching the corruption `--verify` looks for. Shard files are not fsync'ed (a killed process loses nothing
the page cache holds; after a power loss `cache info --verify` finds a damaged shard); the manifest is.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, DTypeLike

from ..errors import BadInput

FORMAT, FORMAT_VERSION = "sdistill-teacher-cache", 1
SPEC_FIELDS = ("model", "solver", "grid", "dtype", "shape", "seed", "precision")
SPEC_DEFAULTS = {"precision": "fp32"}  # caches written before a field existed


def spec_differences(have: dict, want: dict) -> list[str]:
    diffs = []
    for key in SPEC_FIELDS:
        a, b = have.get(key, SPEC_DEFAULTS.get(key)), want.get(key, SPEC_DEFAULTS.get(key))
        if key == "grid":
            same = a is not None and len(a) == len(b) and np.allclose(a, b, rtol=1e-12, atol=0)
        else:
            same = a == b
        if not same:
            diffs.append(key if key == "grid" else f"{key} ({a!r} in the cache, {b!r} asked for)")
    return diffs


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StreamedArray:
    """An .npy file written front to back (header first, then rows), hashed as it goes."""

    def __init__(self, path: Path, shape: tuple, dtype: DTypeLike) -> None:
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        self.file = open(path, "wb")
        self.crc = 0
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        )
        self._put(header.getvalue())
        self.rows = 0

    def _put(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.crc = zlib.crc32(data, self.crc)

    def write(self, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        self._put(memoryview(data).cast("B"))
        self.rows += len(data)

    def close(self) -> str:
        self.file.close()
        if self.rows != self.shape[0]:
            raise RuntimeError(f"{self.path}: wrote {self.rows} rows, expected {self.shape[0]}")
        return f"{self.crc:08x}"


def crc32_file(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def shard_shapes(n: int, steps: int, shape: Sequence[int], cond_shape: Sequence[int] | None = None) -> dict[str, tuple]:
    shapes = {
        "seeds": (n,),
        "noise": (n, *shape),
        "sigmas": (steps + 1,),
        "x": (n, steps + 1, *shape),
        "denoised": (n, steps + 1, *shape),
    }
    if cond_shape is not None:  # class labels / prompt indices, one row per sample
        shapes["cond"] = (n, *cond_shape)
    return shapes


class ShardWriter:
    """Writes one shard under a temporary name; `finish` renames it and returns its manifest entry."""

    def __init__(
        self,
        root: Path,
        name: str,
        start: int,
        count: int,
        steps: int,
        shape: Sequence[int],
        dtype: DTypeLike,
        sigmas: ArrayLike,
        cond_shape: Sequence[int] | None = None,
    ) -> None:
        self.root, self.name, self.start, self.count = root, name, start, count
        self.tmp = root / (name + ".tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        dtypes = {
            "seeds": np.int64,
            "noise": np.float32,
            "sigmas": np.float64,
            "x": dtype,
            "denoised": dtype,
            "cond": np.int64,
        }
        self.files = {
            k: StreamedArray(self.tmp / f"{k}.npy", s, dtypes[k])
            for k, s in shard_shapes(count, steps, shape, cond_shape).items()
        }
        self.files["sigmas"].write(np.asarray(sigmas, dtype=np.float64))

    def append(
        self,
        seeds: np.ndarray,
        noise: np.ndarray,
        x: np.ndarray,
        denoised: np.ndarray,
        cond: np.ndarray | None = None,
    ) -> None:
        for key, rows in (("seeds", seeds), ("noise", noise), ("x", x), ("denoised", denoised), ("cond", cond)):
            if key in self.files:
                self.files[key].write(rows)

    def abort(self) -> None:
        """Close the files of a shard that will not be finished (the run failed); the next run redoes it."""
        for f in self.files.values():
            f.file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(self) -> dict:
        sums = {f"{k}.npy": f.close() for k, f in self.files.items()}
        sizes = {f"{k}.npy": (self.tmp / f"{k}.npy").stat().st_size for k in self.files}
        final = self.root / self.name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(self.tmp, final)
        return {
            "name": self.name,
            "start": self.start,
            "count": self.count,
            "status": "ok",
            "crc32": sums,
            "bytes": sizes,
        }


def check_shard_files(
    root: Path, entry: dict, steps: int, shape: Sequence[int], cond_shape: Sequence[int] | None = None
) -> str | None:
    """Cheap check before trusting a finished shard: files present, sizes and shapes as recorded."""
    folder = root / entry["name"]
    for key, want in shard_shapes(entry["count"], steps, shape, cond_shape).items():
        path = folder / f"{key}.npy"
        if not path.is_file():
            return f"{path.name} missing"
        if path.stat().st_size != entry["bytes"].get(path.name):
            return f"{path.name} has the wrong size"
        try:
            if np.load(path, mmap_mode="r", allow_pickle=False).shape != want:
                return f"{path.name} has the wrong shape"
        except ValueError:
            return f"{path.name} is not a valid .npy file"
    return None


class TeacherCache:
    """Read side: memory-mapped shards, batches by sample index, states at any sigma (docs/teacher-cache.md)."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root, self.manifest = Path(root), manifest
        self.spec = manifest["spec"]
        self.sigmas = np.asarray(self.spec["grid"], dtype=np.float64)
        self.steps = len(self.sigmas) - 1
        self.shape = tuple(self.spec["shape"])
        self.cond_shape = self.spec.get("cond_shape")
        # Serve the contiguous run of good shards from the first seed; a bad shard ends it until regenerated.
        self.shards, n = [], 0
        for s in sorted(manifest["shards"], key=lambda s: s["start"]):
            if s["status"] != "ok" or s["start"] != n:
                break
            self.shards.append(s)
            n += s["count"]
        self.num_samples = n
        self._starts = np.array([s["start"] for s in self.shards] + [n])
        self._maps: dict[str, dict] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> TeacherCache:
        root = Path(path)
        manifest = read_manifest(root)
        if manifest is None:
            raise BadInput(f"{root}: no teacher cache here (manifest.json missing); run `sdistill teacher` first")
        return cls(root, manifest)

    @property
    def seeds(self) -> np.ndarray:
        return self.spec["seed"] + np.arange(self.num_samples)

    def _field(self, shard: dict, key: str) -> np.ndarray:
        maps = self._maps.setdefault(shard["name"], {})
        if key not in maps:
            maps[key] = np.load(self.root / shard["name"] / f"{key}.npy", mmap_mode="r", allow_pickle=False)
        return maps[key]

    def get(self, key: str, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """Rows of one field (`seeds`, `noise`, `x`, `denoised`) for sample indices, in the order given."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise IndexError(f"sample index out of range [0, {self.num_samples})")
        which = np.searchsorted(self._starts, idx, side="right") - 1
        out = None
        for k in np.unique(which):
            sel = np.nonzero(which == k)[0]
            rows = self._field(self.shards[k], key)[idx[sel] - self._starts[k]]
            if out is None:
                out = np.empty((len(idx), *rows.shape[1:]), dtype=rows.dtype)
            out[sel] = rows
        return out

    def cond(self, indices: np.ndarray | Sequence[int]) -> torch.Tensor | None:
        """The conditioning of these samples (class labels, prompt indices), or None for unconditional caches."""
        return None if self.cond_shape is None else torch.from_numpy(self.get("cond", indices))

    def get_points(self, key: str, indices: np.ndarray | Sequence[int], cols: ArrayLike) -> np.ndarray:
        """`key` rows at per-sample grid positions: out[b, c] = field[indices[b], cols[b, c]] (reads only those)."""
        idx = np.asarray(indices, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise IndexError(f"sample index out of range [0, {self.num_samples})")
        which = np.searchsorted(self._starts, idx, side="right") - 1
        out = np.empty((len(idx), cols.shape[1], *self.shape), dtype=np.float64)
        for k in np.unique(which):
            sel = np.nonzero(which == k)[0]
            local = idx[sel] - self._starts[k]
            out[sel] = self._field(self.shards[k], key)[local[:, None], cols[sel]]
        return out

    def states_at(
        self,
        indices: np.ndarray | Sequence[int],
        sigmas: torch.Tensor | ArrayLike,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """States x(sigma) of the given samples: exact copies on grid points, cubic Hermite in log sigma between
        them with slopes dx/dlog(sigma) = x - D. `sigmas` is [T'] (shared) or [n, T'] (one grid per sample),
        an array or a tensor; a tensor that requires grad gets gradients (a learned grid needs them).
        Returns [n, T', *shape]."""
        idx = np.asarray(indices, dtype=np.int64)
        q = sigmas if isinstance(sigmas, torch.Tensor) else torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
        q = q.to(torch.float64)
        q = q.expand(len(idx), q.shape[-1]) if q.ndim == 1 else q
        if q.shape[0] != len(idx):
            raise ValueError("per-sample sigmas need one row per index")
        grid = torch.as_tensor(self.sigmas, device=q.device)
        lo, hi = self.sigmas[-1], self.sigmas[0]
        qd = q.detach()
        # float32 round trips (a learned grid) may land a hair outside the range: clamp within 1e-5 relative.
        if not bool(torch.isfinite(qd).all()) or bool((qd < lo * (1 - 1e-5)).any() or (qd > hi * (1 + 1e-5)).any()):
            raise ValueError(f"sigmas must be finite and lie in the cached range [{lo}, {hi}]")
        u, grid_u = torch.log(q.clamp(lo, hi)), torch.log(grid)
        # Interval j: grid_u[j] >= u >= grid_u[j+1] (the grid decreases).
        j = (torch.searchsorted(-grid_u, -u.detach().contiguous(), right=True) - 1).clamp(0, self.steps - 1)
        jn = j.cpu().numpy()
        cols = np.concatenate([jn, jn + 1], axis=1)
        xs = torch.as_tensor(self.get_points("x", idx, cols), device=q.device)
        ds = torch.as_tensor(self.get_points("denoised", idx, cols), device=q.device)
        n = jn.shape[1]
        x0, x1, m0, m1 = xs[:, :n], xs[:, n:], xs[:, :n] - ds[:, :n], xs[:, n:] - ds[:, n:]
        du = grid_u[j + 1] - grid_u[j]
        t = (u - grid_u[j]) / du
        expand = (...,) + (None,) * len(self.shape)
        t, du = t[expand], du[expand]
        h00, h10 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t
        h01, h11 = -2 * t**3 + 3 * t**2, t**3 - t**2
        out = h00 * x0 + h10 * du * m0 + h01 * x1 + h11 * du * m1
        # On-grid queries are exact copies of the stored states (within float32 rounding of a grid sigma).
        on0 = torch.isclose(qd, grid[j], rtol=1e-6, atol=0)[expand]
        on1 = torch.isclose(qd, grid[j + 1], rtol=1e-6, atol=0)[expand]
        out = torch.where(on0, x0, torch.where(on1, x1, out))
        return out.to(dtype=dtype, device=device if device is not None else q.device)

    def split(self, samples: int, heldout: int) -> tuple[np.ndarray, np.ndarray]:
        """Training indices from the front (`samples`, 0 = all not held out), held-out ones from the back:
        disjoint seeds. Bad sizes are bad input naming the train.* keys."""
        n = self.num_samples
        if heldout < 1:
            raise BadInput(f"train.heldout: must be >= 1, got {heldout}")
        samples = samples or n - heldout
        if samples < 1 or samples + heldout > n:
            raise BadInput(
                f"train.samples + train.heldout = {samples} + {heldout} exceeds the {n} cached "
                "trajectories; raise teacher.num_samples or lower them"
            )
        return np.arange(samples), np.arange(n - heldout, n)

    def start(self, indices: np.ndarray | Sequence[int], model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """sigma_max * z for these samples (on the model's device and dtype) and their conditioning."""
        z = torch.from_numpy(self.get("noise", indices)).to(device=model.device, dtype=model.dtype)
        cond = self.cond(indices)
        return z * float(self.sigmas[0]), None if cond is None else cond.to(model.device)

    def endpoints(self, indices: np.ndarray | Sequence[int]) -> torch.Tensor:
        """The teacher's final states of these samples, float64 (reads only that column)."""
        cols = np.full((len(indices), 1), self.steps)
        return torch.from_numpy(self.get_points("x", indices, cols)[:, 0])

    def summary(self) -> list[tuple[str, str]]:
        """(field, value) rows describing the cache: model, solver, grid, dtype, shape, samples, shards, size."""
        spec = self.spec
        grid = f"{spec['schedule']}, {self.steps} steps, sigma {self.sigmas[0]:g} -> {self.sigmas[-1]:g}"
        per = self.disk_bytes() / max(self.num_samples, 1)
        bad = sum(s["status"] != "ok" for s in self.manifest["shards"])
        return [
            ("model", f"{spec['model_spec']} ({spec['model']})"),
            ("solver", spec["solver"]),
            ("grid", grid),
            ("dtype", spec["dtype"]),
            ("shape", "x".join(map(str, spec["shape"]))),
            ("samples", f"{self.num_samples} (seeds {spec['seed']}..{spec['seed'] + self.num_samples - 1})"),
            ("shards", f"{len(self.shards)} in use, {bad} bad"),
            ("on disk", f"{self.disk_bytes() / 2**20:.1f} MiB, {per / 2**10:.1f} KiB per sample"),
        ]

    def disk_bytes(self) -> int:
        return sum(sum(s["bytes"].values()) for s in self.shards)


def read_manifest(root: Path) -> dict | None:
    path = root / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}: not valid JSON ({e}); remove the folder or use --overwrite") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BadInput(f"{path}: not a teacher cache of format {FORMAT} version {FORMAT_VERSION}")
    return manifest


def verify(root: Path) -> list[tuple[str, str]]:
    """Recompute every checksum; mark bad shards in the manifest so the next `teacher` run regenerates them."""
    manifest = read_manifest(root)
    if manifest is None:
        raise BadInput(f"{root}: no teacher cache here (manifest.json missing)")
    bad = []
    for shard in manifest["shards"]:
        for fname, want in shard["crc32"].items():
            path = root / shard["name"] / fname
            if not path.is_file() or crc32_file(path) != want:
                bad.append((shard["name"], f"{fname} {'missing' if not path.is_file() else 'checksum mismatch'}"))
                shard["status"] = "bad"
                break
    if bad:
        write_json_atomic(root / "manifest.json", manifest)
    return bad
