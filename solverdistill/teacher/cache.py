"""The teacher cache directory (docs/teacher-cache.md): format, manifest checks, writer lock, shard writer, reader.

    DIR/manifest.json            spec (model fingerprint, solver, grid, dtype, shape, first seed), format
                                 version, and the finished shards with CRC-32 checksums; rewritten atomically
    DIR/shard-NNNNNN/*.npy       seeds [n], noise [n,*shape], sigmas [T+1], x [n,T+1,*shape],
                                 denoised [n,T+1,*shape] for the contiguous seeds of one shard
    DIR/writer.lock              while a run writes: its pid, host and command (one writer at a time)

A shard is written under `shard-NNNNNN.tmp`, fsync'ed, renamed, and only then recorded in the manifest, so the
manifest never lists a shard whose bytes are not on disk, and a killed run loses only the shard in progress.
CRC-32 checksums are computed while writing (files are written front to back), not by reading back: the writer
shares the CPU with the integration, and CRC-32 is several times cheaper than SHA-256 while catching the
corruption readers look for. The manifest is checked like a recipe when read (every error names the key path);
readers check each file's checksum the first time a process maps it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, DTypeLike

from ..errors import BadInput

FORMAT, FORMAT_VERSION = "sdistill-teacher-cache", 1
SPEC_FIELDS = ("model", "solver", "store_every", "grid", "dtype", "shape", "seed", "precision")
SPEC_DEFAULTS = {"precision": "fp32", "store_every": 1}  # caches written before a field existed
STORE_DTYPE_NAMES = ("float32", "float16")
PRECISIONS = ("fp32", "fp16", "bf16")
STATUSES = ("ok", "bad")
SHARD_NAME = re.compile(r"shard-[0-9]{6}")
LOCK_NAME = "writer.lock"
# Far beyond any real cache, small enough that sample indices stay exact int64 arithmetic.
MAX_SAMPLES = 2**40
# Header parsing errors numpy raises for a damaged or hostile .npy header (the data is never unpickled).
NPY_ERRORS = (ValueError, TypeError, SyntaxError, OverflowError, MemoryError, RecursionError, EOFError)


def shown(path: str | os.PathLike) -> str:
    """A path for a one-line message: very long ones keep their two ends and say how long they are."""
    s = str(path)
    return s if len(s) <= 200 else f"{s[:80]}...{s[-80:]} ({len(s)} characters)"


def reason(e: OSError) -> str:
    """The errno text of an OSError ("No space left on device"), for messages."""
    return e.strerror or str(e)


def damaged(root: Path, what: str) -> BadInput:
    """The one message for a cache whose files do not match its manifest: where, and how to repair it."""
    return BadInput(
        f"{shown(root / what)}; the teacher cache is damaged: find and mark its bad shards with "
        f"`sdistill cache info --verify {shown(root)}`, then run `sdistill teacher` with the recipe to regenerate them"
    )


def spec_differences(have: dict, want: dict) -> list[str]:
    """The spec fields in which a cache (`have`) differs from a request (`want`), described for a message."""
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


def fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (skipped where a folder cannot be opened, e.g. on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders; the rename itself has happened
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace `path` with `data` all at once (temporary file, fsync, rename); no temporary is left on failure."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


# --- the writer lock -------------------------------------------------------------------------------------------

_HELD: set[str] = set()  # tokens of the locks this process holds (a lock naming our pid but not here is stale)


class LockHeld(BadInput):
    """Another live process is writing the cache (the message names the lock file and its owner)."""


class CacheUnwritable(BadInput):
    """The cache folder cannot be written (read-only, no permission, full): the message names it and the reason."""


_GUARD = threading.RLock()  # one guard section at a time in this process; re-entrant for finalizers run by GC
_guard_depth = 0


@contextlib.contextmanager
def _guard(root: Path) -> Iterator[None]:
    """Serialize lock checks between processes (flock on the folder), so two runs that both find a stale lock
    cannot both break it and both believe they hold it. Best effort: without flock (or after 10 s of waiting
    for a process that never lets go) the check runs unguarded."""
    global _guard_depth
    with _GUARD:
        fd = None
        if _guard_depth == 0:  # nested (a lock released by GC during a check): the outer section holds it
            try:
                import fcntl

                fd = os.open(root, os.O_RDONLY)
                deadline = time.monotonic() + 10
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.005)
            except (ImportError, OSError):
                pass
        _guard_depth += 1
        try:
            yield
        finally:
            _guard_depth -= 1
            if fd is not None:
                os.close(fd)  # closing the descriptor releases the flock


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate the process there: never treat a lock as stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists but belongs to someone else
    try:  # a zombie (dead, not yet reaped by its parent) writes nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _read_lock(path: Path) -> dict | None:
    """The owner recorded in a lock file, or None when it cannot be read as one."""
    try:
        with open(path, "rb") as f:
            owner = json.loads(f.read(4096))
    except (OSError, ValueError, RecursionError):
        return None
    pid = owner.get("pid") if isinstance(owner, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not isinstance(owner.get("host"), str):
        return None
    return owner


def _lock_is_stale(owner: dict) -> bool:
    if owner["host"] != socket.gethostname():
        return False  # a process on another host cannot be checked from here
    if owner["pid"] == os.getpid():
        return owner.get("token") not in _HELD  # our pid, not our lock: a killed run whose pid came round again
    return not _pid_alive(owner["pid"])


def _create_exclusive(path: Path, text: str) -> None:
    """Create `path` (failing if it exists) holding `text`, on disk before it returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new_lock(path: Path, text: str, token: str) -> None:
    """Create the lock file with its content all at once (write a private file, then hard-link it into place:
    the link fails if a lock exists, and a reader never sees a half-written lock)."""
    tmp = path.with_name(f"{path.name}.{token}")
    _create_exclusive(tmp, text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        # No hard links on this filesystem: exclusive create (under the guard, nobody reads it half-written).
        _create_exclusive(path, text)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def running_command() -> str:
    """This process's command line as the user typed it (`sdistill distill r.yaml`), for lock owners."""
    argv = [str(a) for a in sys.argv]
    head = os.path.basename(argv[0]) if argv else ""
    if head in ("__main__.py", "sdistill", "sdistill.exe"):
        argv = ["sdistill", *argv[1:]]
    return " ".join(argv)[:200] or "python"


def _release_lock(path: Path, token: str, pid: int) -> None:
    if os.getpid() != pid:
        return  # a forked child exiting: the lock is its parent's
    _HELD.discard(token)
    with contextlib.suppress(OSError), _guard(path.parent):
        owner = _read_lock(path)
        if owner is not None and owner.get("token") == token:
            path.unlink()


class CacheLock:
    """The one-writer lock of a cache folder: `writer.lock` names the owner's pid, host and command. A lock whose
    process is gone (same host, pid not running) is stale and taken over. Released by `release()`, on leaving a
    `with` block, when the object is collected, or at interpreter exit; a killed process leaves a stale lock."""

    def __init__(self, path: Path, token: str) -> None:
        self.path, self.token = path, token
        _HELD.add(token)
        self._finalizer = weakref.finalize(self, _release_lock, path, token, os.getpid())

    @classmethod
    def acquire(cls, root: Path, command: str | None = None) -> CacheLock:
        """Take the lock of the existing folder `root` for `command` (default: this process's command line);
        LockHeld (exit 2) names the owner when another live process holds it, and CacheUnwritable names the
        folder and the reason when it cannot be written."""
        path = root / LOCK_NAME
        token = secrets.token_hex(8)
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command or running_command(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "token": token,
        }
        try:
            with _guard(root):
                for _ in range(5):  # another stale lock can only appear where the guard is unavailable
                    try:
                        _write_new_lock(path, json.dumps(owner), token)
                        return cls(path, token)
                    except FileExistsError:
                        held = _read_lock(path)
                        if held is not None and _lock_is_stale(held):
                            with contextlib.suppress(FileNotFoundError):
                                path.unlink()
                            continue
                        if held is None and not path.exists():
                            continue  # released between our attempt and our look
                        raise _held_error(path, held) from None
                raise _held_error(path, _read_lock(path))
        except OSError as e:
            raise CacheUnwritable(f"{shown(root)}: cannot write in the cache folder: {reason(e)}") from None

    def release(self) -> None:
        """Give the lock back (only if the lock file is still ours); safe to call more than once."""
        self._finalizer()

    def __enter__(self) -> CacheLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _held_error(path: Path, owner: dict | None) -> LockHeld:
    if owner is None:
        return LockHeld(
            f"{shown(path)}: a lock file that does not name its owner; the cache may be in use. If no sdistill "
            "run is writing this cache, delete the lock file and run again"
        )

    def text(v: Any, n: int) -> str:  # a lock file is data from elsewhere: one short line of it
        return " ".join(str(v).split())[:n]

    where = "this host" if owner["host"] == socket.gethostname() else f"host {text(owner['host'], 80)}"
    what, since = text(owner.get("command", "sdistill"), 80), text(owner.get("since", "?"), 40)
    return LockHeld(
        f"{shown(path)}: the cache is being written by pid {owner['pid']} on {where} ({what}, since {since}); "
        "wait for it to finish. If that process is gone, delete the lock file and run again"
    )


# --- the manifest ----------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _got(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (str, int, float, bool, type(None))) else type(v).__name__
    return s if len(s) <= 40 else s[:37] + "..."


def check_manifest(manifest: Any, path: Path) -> dict:
    """Check a manifest's types, ranges, shard names and coverage; BadInput names the file and the key path
    (`manifest.json: shards[3].bytes.x.npy: expected an integer >= 0, got "12"`). Gaps in coverage are allowed
    (the next `teacher` run fills them; readers stop at the first); overlaps are not."""
    where = shown(path)
    fix = "the manifest is damaged: restore it, or rebuild the cache with `sdistill teacher RECIPE --overwrite`"

    def need(ok: bool, key: str, expected: str, value: Any = None, got: bool = True) -> None:
        if not ok:
            tail = f", got {_got(value)}" if got else ""
            raise BadInput(f"{where}: {key}: expected {expected}{tail}; {fix}")

    if not isinstance(manifest, dict):
        raise BadInput(f"{where}: expected a JSON object (a teacher cache manifest), got {_got(manifest)}; {fix}")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BadInput(f"{where}: not a teacher cache of format {FORMAT} version {FORMAT_VERSION}")
    if "version" in manifest:
        need(isinstance(manifest["version"], str), "version", "a string", manifest["version"])
    spec = manifest.get("spec")
    need(isinstance(spec, dict), "spec", "a mapping", spec)
    for key in ("model", "model_spec", "solver", "schedule"):
        need(isinstance(spec.get(key), str), f"spec.{key}", "a string", spec.get(key))
    grid = spec.get("grid")
    need(isinstance(grid, list) and len(grid) >= 2, "spec.grid", "a list of at least 2 sigmas", grid)
    for i, v in enumerate(grid):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        need(ok, f"spec.grid[{i}]", "a finite number > 0", v)
        need(i == 0 or v < grid[i - 1], f"spec.grid[{i}]", f"a sigma below the one before it ({grid[i - 1]})", v)
    need(spec.get("dtype") in STORE_DTYPE_NAMES, "spec.dtype", " or ".join(STORE_DTYPE_NAMES), spec.get("dtype"))
    shape = spec.get("shape")
    need(isinstance(shape, list) and len(shape) >= 1, "spec.shape", "a non-empty list of sizes", shape)
    for i, d in enumerate(shape):
        need(_is_int(d) and 1 <= d <= 2**31, f"spec.shape[{i}]", "an integer >= 1", d)
    need(_is_int(spec.get("seed")) and 0 <= spec["seed"] < 2**62, "spec.seed", "an integer >= 0", spec.get("seed"))
    if "store_every" in spec:
        need(
            _is_int(spec["store_every"]) and spec["store_every"] >= 1,
            "spec.store_every",
            "an integer >= 1",
            spec["store_every"],
        )
    if "precision" in spec:
        need(spec["precision"] in PRECISIONS, "spec.precision", " or ".join(PRECISIONS), spec["precision"])
    cond = spec.get("cond_shape")
    need(cond is None or isinstance(cond, list), "spec.cond_shape", "null or a list of sizes", cond)
    for i, d in enumerate(cond or []):
        need(_is_int(d) and 1 <= d <= 2**31, f"spec.cond_shape[{i}]", "an integer >= 1", d)
    files = {f"{k}.npy" for k in shard_shapes(1, 1, shape, cond)}
    shards = manifest.get("shards")
    need(isinstance(shards, list), "shards", "a list of shard entries", shards)
    names: dict[str, int] = {}
    for i, s in enumerate(shards):
        key = f"shards[{i}]"
        need(isinstance(s, dict), key, "a mapping (name, start, count, status, crc32, bytes)", s)
        name = s.get("name")
        need(
            isinstance(name, str) and SHARD_NAME.fullmatch(name) is not None,
            f"{key}.name",
            "a shard folder of this cache, shard-NNNNNN (six digits)",
            name,
        )
        need(name not in names, f"{key}.name", f"a name of its own ({name} is also shards[{names.get(name)}])", got=0)
        names[name] = i
        for field in ("start", "count"):
            lo = 0 if field == "start" else 1
            v = s.get(field)
            need(_is_int(v) and lo <= v <= MAX_SAMPLES, f"{key}.{field}", f"an integer in [{lo}, 2**40]", v)
        need(s.get("status") in STATUSES, f"{key}.status", '"ok" or "bad"', s.get("status"))
        for field, what in (("crc32", "a CRC-32 of 8 hex digits"), ("bytes", "an integer >= 0 (the file size)")):
            table = s.get(field)
            need(isinstance(table, dict), f"{key}.{field}", "a mapping of file name to " + what, table)
            for fname in sorted(files - set(table)):
                need(False, f"{key}.{field}.{fname}", what + " (missing)", got=False)
            for fname in sorted(set(table) - files):
                need(False, f"{key}.{field}.{fname}", "no entry (not a file of this cache's shards)", got=False)
            for fname, v in table.items():
                if field == "crc32":
                    ok = isinstance(v, str) and re.fullmatch(r"[0-9a-f]{8}", v) is not None
                else:
                    ok = _is_int(v) and 0 <= v < 2**62
                need(ok, f"{key}.{field}.{fname}", what, v)
    order = sorted(range(len(shards)), key=lambda i: shards[i]["start"])
    for a, b in zip(order, order[1:]):
        end = shards[a]["start"] + shards[a]["count"]
        need(
            shards[b]["start"] >= end,
            f"shards[{b}].start",
            f"no overlap with shards[{a}] ({shards[a]['name']}, samples {shards[a]['start']}..{end - 1})",
            shards[b]["start"],
        )
    return manifest


def read_manifest(root: Path) -> dict | None:
    """The checked manifest of the cache in `root`, or None when there is none (BadInput when it is unusable)."""
    path = root / "manifest.json"
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise BadInput(f"{shown(path)}: cannot read the cache manifest: {reason(e)}") from None
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8, or an integer of absurd length
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise BadInput(
            f"{shown(path)}: not valid JSON ({why}); restore it, or rebuild the cache with `sdistill teacher "
            "RECIPE --overwrite`"
        ) from None
    return check_manifest(manifest, path)


# --- shard files -----------------------------------------------------------------------------------------------


class StreamedArray:
    """An .npy file written front to back (header first, then rows), hashed as it goes."""

    def __init__(self, path: Path, shape: tuple, dtype: DTypeLike) -> None:
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        self.file = open(path, "wb")
        self.crc = 0
        self.size = 0
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        )
        self._put(header.getvalue())
        self.rows = 0

    def _put(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)

    def write(self, rows: np.ndarray) -> None:
        """Append rows (converted to the file's dtype) and hash them."""
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        self._put(memoryview(data).cast("B"))
        self.rows += len(data)

    def close(self) -> str:
        """Flush and fsync the file (its bytes are on disk before the shard is renamed); returns the CRC-32."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.rows != self.shape[0]:
            raise RuntimeError(f"{self.path}: wrote {self.rows} rows, expected {self.shape[0]}")
        if os.stat(self.path).st_size != self.size:
            raise OSError(errno.EIO, f"{self.size} bytes written, {os.stat(self.path).st_size} on disk", self.path)
        return f"{self.crc:08x}"


def crc32_file(path: Path) -> str:
    """The CRC-32 of a file (8 hex digits), read in 4 MiB blocks."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def shard_shapes(n: int, steps: int, shape: Sequence[int], cond_shape: Sequence[int] | None = None) -> dict[str, tuple]:
    """The array shape of each shard file for a shard of `n` samples."""
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


def shard_bytes(
    n: int, steps: int, shape: Sequence[int], store: DTypeLike, cond_shape: Sequence[int] | None = None
) -> int:
    """Bytes on disk of a shard of `n` samples: its arrays plus one 128-byte .npy header per file."""
    dtypes = shard_dtypes(store)
    return sum(128 + math.prod(s) * dtypes[k].itemsize for k, s in shard_shapes(n, steps, shape, cond_shape).items())


def shard_dtypes(store: DTypeLike) -> dict[str, np.dtype]:
    """The dtype of each shard file; `store` is the cache's teacher.dtype (of x and denoised)."""
    kinds = {"seeds": np.int64, "noise": np.float32, "sigmas": np.float64, "x": store, "denoised": store}
    return {k: np.dtype(v) for k, v in (kinds | {"cond": np.int64}).items()}


# Files verified against their manifest checksum in this process: (path, inode, device, size, mtime, crc).
# A rewritten or replaced file changes inode or mtime and is checked again.
_VERIFIED: set[tuple] = set()


def _verified_key(path: Path, st: os.stat_result, crc: str) -> tuple:
    return (os.path.abspath(path), st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, crc)


def checksum_problem(path: Path, crc: str) -> str | None:
    """Compare a file with its recorded CRC-32 (streamed; once per file and process): None, or what is wrong."""
    try:
        st = os.stat(path)
        key = _verified_key(path, st, crc)
        if key in _VERIFIED:
            return None
        if crc32_file(path) != crc:
            return "checksum mismatch (the file changed, or belongs to another shard)"
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({reason(e)})"
    _VERIFIED.add(key)
    return None


def npy_header(path: Path) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) from an .npy header, read without loading any data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        return shape, fortran, dtype, f.tell()


def check_shard(root: Path, entry: dict, spec: dict) -> str | None:
    """Cheap check of a finished shard (no data read): a plain folder inside the cache, every file present, a
    plain file of the recorded size whose header has the expected shape and dtype. None, or what is wrong."""
    folder = root / entry["name"]
    try:
        mode = folder.lstat().st_mode
    except FileNotFoundError:
        return "folder missing"
    except OSError as e:
        return f"folder unreadable ({reason(e)})"
    if not stat.S_ISDIR(mode):
        return "not a plain folder inside the cache (a link or a file)"
    steps = len(spec["grid"]) - 1
    dtypes = shard_dtypes(spec["dtype"])
    for key, want in shard_shapes(entry["count"], steps, spec["shape"], spec.get("cond_shape")).items():
        name = f"{key}.npy"
        path = folder / name
        try:
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                return f"{name} is not a plain file"
            if st.st_size != entry["bytes"][name]:
                return f"{name} has {st.st_size} bytes, the manifest records {entry['bytes'][name]}"
            shape, fortran, dtype, offset = npy_header(path)
        except FileNotFoundError:
            return f"{name} missing"
        except OSError as e:
            return f"{name} unreadable ({reason(e)})"
        except NPY_ERRORS:
            return f"{name} is not a valid .npy file"
        if shape != want or fortran or dtype != dtypes[key]:
            return f"{name} holds {dtype} {list(shape)}, expected {dtypes[key]} {list(want)}"
        if st.st_size != offset + math.prod(want) * dtypes[key].itemsize:
            return f"{name} has {st.st_size} bytes, its header says {offset + math.prod(want) * dtypes[key].itemsize}"
    return None


def shard_problem(root: Path, entry: dict, spec: dict, checksums: bool = True) -> str | None:
    """`check_shard`, then (with `checksums`) every file's CRC-32 against the manifest: None, or what is wrong."""
    problem = check_shard(root, entry, spec)
    if problem or not checksums:
        return problem
    for fname, crc in entry["crc32"].items():
        problem = checksum_problem(root / entry["name"] / fname, crc)
        if problem:
            return f"{fname} {problem}"
    return None


class ShardWriter:
    """Writes one shard under a temporary name; `finish` makes its bytes durable, renames it and returns its
    manifest entry. Filesystem errors become BadInput naming the shard, the file and the errno text."""

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
        self.files: dict[str, StreamedArray] = {}
        self.done = False
        dtypes = shard_dtypes(dtype)
        with self._errors("create"):
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
            for k, s in shard_shapes(count, steps, shape, cond_shape).items():
                self.files[k] = StreamedArray(self.tmp / f"{k}.npy", s, dtypes[k])
            self.files["sigmas"].write(np.asarray(sigmas, dtype=np.float64))

    @contextlib.contextmanager
    def _errors(self, doing: str, fname: str = "") -> Iterator[None]:
        try:
            yield
        except OSError as e:
            self.abort()
            what = f"cannot {doing} {fname or os.path.basename(e.filename or '') or 'its files'}"
            raise BadInput(
                f"{shown(self.root / self.name)}: {what}: {reason(e)}; the unfinished shard was removed and "
                "finished shards are kept: fix this and run again to resume"
            ) from None

    def append(
        self,
        seeds: np.ndarray,
        noise: np.ndarray,
        x: np.ndarray,
        denoised: np.ndarray,
        cond: np.ndarray | None = None,
    ) -> None:
        """Append one batch to every file of the shard."""
        for key, rows in (("seeds", seeds), ("noise", noise), ("x", x), ("denoised", denoised), ("cond", cond)):
            if key in self.files:
                with self._errors("write", f"{key}.npy"):
                    self.files[key].write(rows)

    def abort(self) -> None:
        """Close and remove a shard that will not be finished (the run failed); the next run redoes it."""
        if self.done:
            return
        self.done = True
        for f in self.files.values():
            with contextlib.suppress(OSError, ValueError):
                f.file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(self) -> dict:
        """Data, fsync, rename, then (the caller) record: the manifest never names a shard not on disk."""
        with self._errors("finish"):
            sums = {f"{k}.npy": f.close() for k, f in self.files.items()}
            sizes = {f"{k}.npy": f.size for k, f in self.files.items()}
            fsync_dir(self.tmp)
            final = self.root / self.name
        with self._errors("remove the old", self.name):  # a bad shard being regenerated
            if final.is_symlink() or final.is_file():
                final.unlink()  # a link is removed, never what it points to
            elif final.exists():
                shutil.rmtree(final)
        with self._errors("finish"):
            os.replace(self.tmp, final)
            fsync_dir(self.root)
        self.done = True
        for fname, crc in sums.items():  # we hashed these bytes as we wrote them: readers here need not re-read
            with contextlib.suppress(OSError):
                _VERIFIED.add(_verified_key(final / fname, os.stat(final / fname), crc))
        return {
            "name": self.name,
            "start": self.start,
            "count": self.count,
            "status": "ok",
            "crc32": sums,
            "bytes": sizes,
        }


class TeacherCache:
    """Read side: memory-mapped shards, batches by sample index, states at any sigma (docs/teacher-cache.md).
    Opening checks the shards it serves cheaply (files, sizes, headers); each file's checksum is checked the first
    time this process maps it. A damaged shard is BadInput naming it and `sdistill cache info --verify`."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root, self.manifest = Path(root), manifest
        self.spec = manifest["spec"]
        self.sigmas = np.asarray(self.spec["grid"], dtype=np.float64)
        self.steps = len(self.sigmas) - 1
        self.shape = tuple(self.spec["shape"])
        self.cond_shape = self.spec.get("cond_shape")
        self._dtypes = shard_dtypes(self.spec["dtype"])
        # Serve the contiguous run of good shards from the first seed; a bad shard ends it until regenerated.
        self.shards, n = [], 0
        for s in sorted(manifest["shards"], key=lambda s: s["start"]):
            if s["status"] != "ok" or s["start"] != n:
                break
            problem = check_shard(self.root, s, self.spec)
            if problem:
                raise damaged(self.root, f"{s['name']}: {problem}")
            self.shards.append(s)
            n += s["count"]
        self.num_samples = n
        self._starts = np.array([s["start"] for s in self.shards] + [n])
        self._maps: dict[str, dict] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> TeacherCache:
        """Open the cache in `path` (its manifest checked; BadInput when there is none or it is unusable)."""
        root = Path(path)
        manifest = read_manifest(root)
        if manifest is None:
            raise BadInput(
                f"{shown(root)}: no teacher cache here (manifest.json missing); run `sdistill teacher` first"
            )
        return cls(root, manifest)

    @property
    def seeds(self) -> np.ndarray:
        """The seeds of the samples served, in order."""
        return self.spec["seed"] + np.arange(self.num_samples)

    def _field(self, shard: dict, key: str) -> np.ndarray:
        maps = self._maps.setdefault(shard["name"], {})
        if key not in maps:
            fname = f"{key}.npy"
            path = self.root / shard["name"] / fname
            problem = checksum_problem(path, shard["crc32"][fname])
            if problem:
                raise damaged(self.root, f"{shard['name']}/{fname}: {problem}")
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except OSError as e:
                raise damaged(self.root, f"{shard['name']}/{fname}: unreadable ({reason(e)})") from None
            except NPY_ERRORS:
                raise damaged(self.root, f"{shard['name']}/{fname}: not a valid .npy file") from None
            want = shard_shapes(shard["count"], self.steps, self.shape, self.cond_shape)[key]
            if arr.shape != want or arr.dtype != self._dtypes[key]:
                raise damaged(self.root, f"{shard['name']}/{fname}: holds {arr.dtype} {list(arr.shape)}")
            maps[key] = arr
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
        every = spec.get("store_every", 1)
        if every > 1:
            grid += f" (every {every}th point of the teacher's grid stored)"
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
            ("bytes per sample", f"{per:,.0f}"),
        ]

    def read_rate(self, batch: int = 256, points: int = 8, repeats: int = 3) -> tuple[float, float]:
        """What a training step reads: `states_at` for `batch` random samples at `points` random sigmas each
        (per-sample grids, as DLMS and SFD ask). Returns (samples per second, MiB per second of states served),
        the best of `repeats` timed reads after one warm-up read (the first read maps files and checks sums)."""
        n = self.num_samples
        if n < 1:
            return 0.0, 0.0
        rng = np.random.default_rng(0)
        lo, hi = np.log(self.sigmas[-1]), np.log(self.sigmas[0])
        best = math.inf
        for r in range(repeats + 1):
            idx = rng.integers(0, n, size=min(batch, n))
            q = np.exp(rng.uniform(lo, hi, size=(len(idx), points)))
            began = time.perf_counter()
            self.states_at(idx, q)
            if r:  # the warm-up read is not counted
                best = min(best, time.perf_counter() - began)
        k = min(batch, n)
        return k / best, k * points * math.prod(self.shape) * 4 / best / 2**20

    def disk_bytes(self) -> int:
        """Bytes on disk of the shards served."""
        return sum(sum(s["bytes"].values()) for s in self.shards)


def coverage_gaps(shards: Sequence[dict], upto: int | None = None) -> list[tuple[int, int]]:
    """Sample ranges (start, count) no shard covers, before the end of coverage (or before `upto`)."""
    gaps, covered = [], 0
    for s in sorted(shards, key=lambda s: s["start"]):
        if upto is not None and covered >= upto:
            break
        if s["start"] > covered:
            end = s["start"] if upto is None else min(s["start"], upto)
            gaps.append((covered, end - covered))
        covered = max(covered, s["start"] + s["count"])
    if upto is not None and covered < upto:
        gaps.append((covered, upto - covered))
    return gaps


@dataclass
class VerifyReport:
    """What `verify` found: problems as (shard or sample range, why), whether its marks were written (False where
    the folder cannot be written, e.g. a read-only copy) and the manifest with the bad shards marked."""

    problems: list[tuple[str, str]]
    marked: bool
    manifest: dict


def verify(root: Path) -> VerifyReport:
    """Check every shard (files, sizes, headers, every CRC-32) and the coverage; mark bad shards in the manifest
    so the next `teacher` run regenerates them."""
    manifest = read_manifest(root)
    if manifest is None:
        raise BadInput(f"{shown(root)}: no teacher cache here (manifest.json missing)")
    try:
        lock: CacheLock | None = CacheLock.acquire(root)
    except CacheUnwritable:
        lock = None  # a read-only copy: check anyway, mark nothing
    try:
        if lock is not None:
            manifest = read_manifest(root) or manifest  # the latest, now that nobody else writes it
        bad, changed = [], False
        for shard in manifest["shards"]:
            if shard["status"] != "ok":
                bad.append((shard["name"], "marked bad earlier"))
                continue
            problem = shard_problem(root, shard, manifest["spec"])
            if problem:
                bad.append((shard["name"], problem))
                shard["status"] = "bad"
                changed = True
        for start, count in coverage_gaps(manifest["shards"]):
            bad.append((f"samples {start}..{start + count - 1}", "in no shard (a gap in the manifest)"))
        if changed and lock is not None:
            try:
                write_json_atomic(root / "manifest.json", manifest)
            except OSError as e:
                raise BadInput(f"{shown(root / 'manifest.json')}: cannot write: {reason(e)}") from None
        return VerifyReport(bad, lock is not None, manifest)
    finally:
        if lock is not None:
            lock.release()
