"""Our NPZ files (samples.npz, artifacts): arrays plus a JSON `meta` string, written atomically, read without
pickles and without trusting the file (docs/formats.md). Also the output-folder check every writing command makes first."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile
import weakref
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInput

# Real numbers torch can take as they are; complex, bool, text, records and objects are refused from the header.
ALLOWED_DTYPES = frozenset(np.dtype(t) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1"))
MAX_META_BYTES = 16 << 20  # the JSON meta of a real artifact is a few KiB; more is not meta
MAX_ENTRIES = 65536
MAX_HEADER = 10000  # numpy's own default for .npy headers; a longer one is not ours
# What a damaged zip (or a forged .npy inside one) raises while being read: all of them mean "unreadable file".
DAMAGED = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    ValueError,
    NotImplementedError,  # an unknown compression method
    RuntimeError,  # an encrypted member; RecursionError from a forged header
    zlib.error,
    struct.error,
    KeyError,
    OverflowError,
    UnicodeError,
    SyntaxError,  # numpy parses the .npy header with ast.literal_eval
    MemoryError,
)


class NotNPZ(BadInput):
    """The file is no zip archive at all (another kind of file): callers may say what else it could have been."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.why = why


def ensure_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create the output folder, or fail with exit 2 before any work is done."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        # A probe of its own name: torchrun ranks check the same folder at once (a shared name raced).
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise BadInput(f"{flag}: cannot write to {str(p)!r}: {e.strerror or e}") from None
    return p


def check_output(path: Path, flag: str) -> Path:
    """Fail (bad input naming `flag`) when `path` cannot become a file: it is a folder, a parent is a file, or the
    nearest existing folder refuses a new file. Creates nothing, so a run that fails later leaves no folder."""
    if path.is_dir():
        raise BadInput(f"{flag}: {str(path)!r} is a folder; give the file to write (e.g. {path / 'a.npz'})")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BadInput(f"{flag}: cannot write {str(path)!r}: {str(parent)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise BadInput(f"{flag}: cannot write {str(path)!r}: {str(parent)!r}: {e.strerror or e}") from None
    return path


def write_npz(path: Path, meta: dict, **arrays: Any) -> None:
    """Write `meta` (as JSON) and the arrays atomically: a reader never sees half a file. A failed write (a full
    disk, a vanished folder) removes its temporary file and is bad input naming the path and the reason."""
    tmp = path.with_name(path.name + ".tmp.npz")
    try:
        np.savez(tmp, meta=np.array(json.dumps(meta)), **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BadInput(f"{path}: cannot write: {e.strerror or e}; nothing was written") from None


def read_meta(npz: Mapping[str, np.ndarray]) -> dict:
    """The JSON `meta` of an opened NPZ file."""
    return json.loads(str(npz["meta"][()]))


def one_line(text: str) -> str:
    """A message from a library (YAML marks, zip errors) folded onto one line."""
    return " ".join(str(text).split())


@dataclass(frozen=True)
class Entry:
    """One array of an NPZ file as its .npy header describes it; nothing of its data is read yet."""

    name: str
    member: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int  # bytes of magic and header before the data

    @property
    def nbytes(self) -> int:
        """The size the header claims, checked against the size stored in the zip before anything is read."""
        return math.prod(self.shape) * self.dtype.itemsize


class NPZReader:
    """An NPZ file opened for reading. The zip's member list and every .npy header are read and checked first
    (names, dtypes, shapes against the bytes really stored), so nothing is allocated from what a header claims and
    no array is read that the caller did not ask for. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, what: str = "file") -> None:
        self.path, self.what = str(path), what
        try:
            self.zip = zipfile.ZipFile(path)
        except OSError as e:
            raise BadInput(f"{path}: cannot read the {what}: {e.strerror or e}") from None
        except DAMAGED as e:
            with open(path, "rb") as f:
                zip_like = f.read(2) == b"PK"
            if zip_like:  # a zip's signature but unreadable: a damaged file rather than another kind of file
                raise BadInput(f"{path}: a damaged NPZ {what} ({one_line(e)})") from None
            raise NotNPZ(f"{path}: not an NPZ {what} ({one_line(e)})", one_line(e)) from None
        try:
            self.entries = self._index()
        except BaseException:
            self.zip.close()
            raise

    def __enter__(self) -> NPZReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.zip.close()

    @contextlib.contextmanager
    def _damaged(self, name: str = "") -> Iterator[None]:
        """Whatever a damaged zip or a forged header raises becomes one message naming the file (and entry)."""
        try:
            yield
        except DAMAGED as e:
            where = f", entry {name!r}" if name else ""
            raise BadInput(
                f"{self.path}: a damaged NPZ {self.what}{where} ({type(e).__name__}: {one_line(e)})"
            ) from None
        except OSError as e:
            raise BadInput(f"{self.path}: cannot read the {self.what}: {e.strerror or e}") from None

    def _index(self) -> dict[str, Entry]:
        with self._damaged():
            infos = self.zip.infolist()
        if len(infos) > MAX_ENTRIES:
            raise BadInput(f"{self.path}: {len(infos)} entries; an NPZ {self.what} holds at most {MAX_ENTRIES}")
        entries: dict[str, Entry] = {}
        for info in infos:
            if not info.filename.endswith(".npy") or info.is_dir():
                raise BadInput(f"{self.path}: entry {info.filename!r} is not a .npy array; not an NPZ {self.what}")
            name = info.filename[: -len(".npy")]
            if name in entries:
                raise BadInput(f"{self.path}: two entries named {name!r}; a damaged or forged NPZ {self.what}")
            entries[name] = self._header(name, info)
        return entries

    def _header(self, name: str, info: zipfile.ZipInfo) -> Entry:
        with self._damaged(name), self.zip.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=MAX_HEADER)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=MAX_HEADER)
            else:
                raise ValueError(f".npy format version {version} is not one numpy.savez writes")
            offset = f.tell()
        if dtype.hasobject:
            raise BadInput(
                f"{self.path}: array {name!r} holds pickled Python objects; only plain numbers are read, "
                "and nothing in a file is ever run"
            )
        if any(int(n) < 0 for n in shape):
            raise BadInput(f"{self.path}: array {name!r} has a negative dimension {shape}; a forged header")
        entry = Entry(name, info, tuple(int(n) for n in shape), dtype, bool(fortran), offset)
        if name == "meta":
            if dtype.kind != "U" or entry.shape != () or entry.nbytes > MAX_META_BYTES:
                raise BadInput(
                    f"{self.path}: 'meta' must be one JSON string (a 0-d text array of at most "
                    f"{MAX_META_BYTES >> 20} MiB), got dtype {dtype.str} and shape {entry.shape}"
                )
        elif dtype.newbyteorder("=") not in ALLOWED_DTYPES:
            raise BadInput(
                f"{self.path}: array {name!r} has dtype {dtype} ({kind_name(dtype)}); expected real numbers "
                "(float16/32/64, int8/16/32/64 or uint8)"
            )
        if info.file_size != offset + entry.nbytes:  # checked before a byte of data is allocated
            raise BadInput(
                f"{self.path}: array {name!r}: its header claims shape {entry.shape} of {dtype} "
                f"({entry.nbytes} bytes), but the file stores {info.file_size - offset} bytes for it; "
                "a damaged or forged file"
            )
        return entry

    def check_total(self, limit: int, hint: str = "") -> None:
        """Refuse a file whose arrays add up to more than `limit` bytes (from the headers, before reading)."""
        total = sum(e.nbytes for e in self.entries.values())
        if total > limit:
            raise BadInput(
                f"{self.path}: its arrays hold {total / 2**30:.3g} GiB, more than the {limit / 2**30:.3g} GiB "
                f"an NPZ {self.what} may hold{hint}"
            )

    def chunks(self, name: str, size: int = 1 << 22) -> Iterator[bytes]:
        """An array's data bytes as stored, in pieces (for checksums without holding the array); the length and
        the zip's CRC are checked at the end."""
        e = self.entries[name]
        with self._damaged(name), self.zip.open(e.member) as f:
            f.read(e.offset)
            left = e.nbytes
            while left:
                piece = f.read(min(size, left))
                if not piece:
                    break
                left -= len(piece)
                yield piece
            if left or f.read(1):  # reading to the end also checks the zip's CRC
                raise EOFError(f"stored size differs from the {e.nbytes} bytes its header claims")

    def read(self, name: str) -> np.ndarray:
        """One array (native byte order, C order, writable), after its header was checked."""
        return self.read_hashed(name)[0]

    def read_hashed(self, name: str) -> tuple[np.ndarray, str]:
        """One array and the sha256 of its data bytes as stored."""
        e = self.entries[name]
        data = b"".join(self.chunks(name))
        flat = np.frombuffer(data, dtype=e.dtype)
        shaped = flat.reshape(e.shape[::-1]).T if e.fortran else flat.reshape(e.shape)
        return np.array(shaped, dtype=e.dtype.newbyteorder("="), order="C"), hashlib.sha256(data).hexdigest()

    def meta(self) -> dict:
        """The JSON `meta` entry; missing or malformed is bad input."""
        if "meta" not in self.entries:
            raise BadInput(f"{self.path}: missing the 'meta' entry (a JSON string)")
        text = str(self.read("meta")[()])
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, and ints too long to convert
            raise BadInput(f"{self.path}: 'meta' is not valid JSON ({one_line(e)})") from None


class LazyArrays(Mapping[str, np.ndarray]):
    """The arrays of a checked NPZ file, each read on first use: a caller that checks names first (a method
    loading an artifact) never allocates an array it does not want. The file is reopened (and its headers checked
    again) once, at the first read, and kept open until every array is read. With `digests` (sha256 of each array's
    data, recorded while the file was verified), what is read must match: a file replaced in between is refused
    rather than mixed with what was checked."""

    def __init__(
        self, path: str | os.PathLike, what: str, entries: Mapping[str, Entry], digests: Mapping[str, str] | None
    ) -> None:
        self.path, self.what = str(path), what
        self.entries = {k: v for k, v in entries.items() if k != "meta"}
        self.digests = digests
        self.cache: dict[str, np.ndarray] = {}
        self.reader: NPZReader | None = None

    def _changed(self, name: str) -> BadInput:
        return BadInput(f"{self.path}: changed while in use (array {name!r}); run again")

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.entries:
            raise KeyError(name)
        if name not in self.cache:
            if self.reader is None:
                self.reader = NPZReader(self.path, self.what)
                weakref.finalize(self, self.reader.zip.close)
            was, now = self.entries[name], self.reader.entries.get(name)
            if now is None or (now.shape, now.dtype, now.fortran) != (was.shape, was.dtype, was.fortran):
                raise self._changed(name)
            arr, digest = self.reader.read_hashed(name)
            if self.digests is not None and digest != self.digests[name]:
                raise self._changed(name)
            self.cache[name] = arr
            if len(self.cache) == len(self.entries):
                self.reader.zip.close()
        return self.cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def kind_name(dtype: np.dtype) -> str:
    """A dtype's kind in words, for messages."""
    names = {"c": "complex", "b": "boolean", "U": "text", "S": "bytes", "V": "raw records", "M": "dates"}
    return names.get(dtype.kind, "not a supported number type")


def read_npz(path: str | os.PathLike, what: str = "file", max_bytes: int | None = None) -> tuple[dict, dict]:
    """Read our NPZ files (samples, artifacts) safely: plain real-number arrays plus a JSON `meta`. Headers are
    checked before any data is read (object arrays, complex numbers and sizes that disagree with the file are
    refused), so nothing in a file is ever executed. Returns (arrays, meta)."""
    with NPZReader(path, what) as r:
        if max_bytes is not None:
            r.check_total(max_bytes)
        meta = r.meta()
        arrays = {name: r.read(name) for name in r.entries if name != "meta"}
    return arrays, meta
