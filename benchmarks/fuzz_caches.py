"""Fuzz the teacher cache: build a small valid cache, damage copies of it in many ways, and run the CLI on each.

    python benchmarks/fuzz_caches.py [--jobs N] [--only SUBSTRING] [--keep DIR] [--exec] [-v]

For every corruption (68: manifest edits of every kind, damaged/swapped/hostile shard files, unusable places,
writer locks) and every command (`teacher`, `cache info --verify`, `distill` with a D-ODE recipe) the command runs
in a process of its own on a fresh damaged copy, and the outcome is classified:

    clean      exit 2, and stderr's one error line (the last) starts with "error:", no traceback
    detected   `cache info --verify` exit 1 naming what is bad (its documented answer to a damaged shard)
    repaired   exit 0, and `cache info --verify` passes afterwards (the run fixed the cache, or had no need to)
    FAILURE    anything else: a traceback, exit 0 with the damage still there, exit 1 from teacher or distill,
               a timeout, or a pickle in a data file that ran

Each command runs in a child forked from a server that imported sdistill and torch once (what `python -m
solverdistill ARGS` does, without paying 2 s of interpreter and torch start per command); `--exec` runs
`python -m solverdistill` itself. Run as root, the commands run through `setpriv` without the capabilities that
override file permissions (so unreadable folders are unreadable). Exit status 1 when any case is a FAILURE.
About a minute on 2 cores (`--exec`: about 10).

Run it as an unprivileged user or on a throwaway machine, and never point it (`--sdistill`, `--exec` with another
checkout) at an older sdistill as root: its cases are hostile on purpose, and a version without the checks follows
them (an older cache reader deleted the folder an absolute shard name pointed at).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

TEACHER = {"steps": 8, "num_samples": 24, "batch": 8, "shard_size": 8, "seed": 3}
COMMANDS = ("teacher", "verify", "distill")
MARKER = "PICKLE_RAN"  # a data file's pickle would create this file if anything unpickled it


def recipe_text(cache: str, output: str) -> str:
    return "\n".join(
        [
            "name: fuzz",
            "model: {spec: 'gmm:tiny'}",
            f"teacher: {json.dumps({**TEACHER, 'cache': cache})}",
            "student: {method: dode, nfe: 3, base: euler}",
            "train: {samples: 12, heldout: 8, device: cpu}",
            f"output: {json.dumps(output)}",
            "",
        ]
    )


class Case:
    """One damaged copy: `folder` holds the cache `c` and the recipe; a mutation may point the recipe elsewhere."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(exist_ok=True)
        self.cache = folder / "c"
        self.recipe = folder / "r.yaml"
        self.set_cache(self.cache)

    def set_cache(self, path: Path | str) -> None:
        self.cache = Path(path)
        self.recipe.write_text(recipe_text(str(path), str(self.folder / "out" / "dode.npz")))

    def manifest(self, change) -> None:
        path = self.cache / "manifest.json"
        m = json.loads(path.read_text())
        change(m)
        path.write_text(json.dumps(m))

    def shard(self, i: int) -> Path:
        return self.cache / f"shard-{i:06d}"


def _set(path: list, value):
    """A manifest edit: set the item at a key path (a list of keys and indices)."""

    def change(m):
        for k in path[:-1]:
            m = m[k]
        m[path[-1]] = value

    return change


def _pop(path: list):
    def change(m):
        for k in path[:-1]:
            m = m[k]
        m.pop(path[-1])

    return change


def _edit_array(rel: str, fn):
    def mutate(c: Case):
        path = c.cache / rel
        arr = np.load(path)
        fn(arr)
        np.save(path, arr)

    return mutate


def _flip_byte(c: Case):
    path = c.shard(1) / "x.npy"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x5A
    path.write_bytes(bytes(data))


def _swap(a: Path, b: Path):
    tmp = a.with_name(a.name + ".swap")
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)


def _header_huge_shape(c: Case):
    path = c.shard(1) / "x.npy"
    data = path.read_bytes()
    end = data.index(b"\n") + 1
    header = data[:end].decode("latin1")
    start = header.index("'shape': (") + len("'shape': (")
    stop = header.index(")", start)
    huge = "9" * (stop - start)  # same length: the file size stays as recorded
    path.write_bytes((header[:start] + huge + header[stop:]).encode("latin1") + data[end:])


def _absolute_name(c: Case) -> None:
    """Shard 1's name becomes the absolute path of a decoy folder inside this case."""
    decoy = c.folder / "decoy"
    decoy.mkdir(exist_ok=True)
    (decoy / "keep.txt").write_text("must survive")
    c.manifest(_set(["shards", 1, "name"], str(decoy)))


class Evil:
    """Unpickling this creates the marker file: a data file holding it must never be unpickled."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __reduce__(self):
        return (open, (self.where, "w"))


def _pickle_in_x(c: Case):
    path = c.shard(1) / "x.npy"
    arr = np.empty(3, dtype=object)
    arr[:] = [Evil(str(c.folder / MARKER)), 1, 2]
    with open(path, "wb") as f:
        np.lib.format.write_array(f, arr, allow_pickle=True)


def _symlink_shard(c: Case):
    outside = c.folder / "elsewhere"
    shutil.copytree(c.shard(1), outside)
    shutil.rmtree(c.shard(1))
    c.shard(1).symlink_to(outside, target_is_directory=True)


def _to_dir(rel: str):
    def mutate(c: Case):
        path = c.cache / rel
        path.unlink()
        path.mkdir()

    return mutate


def _chmod(rel: str, mode: int):
    def mutate(c: Case):
        (c.cache / rel if rel else c.cache).chmod(mode)

    return mutate


def _unsearchable_parent(c: Case):
    (c.folder / "p").mkdir()
    shutil.move(str(c.cache), str(c.folder / "p" / "c"))
    c.set_cache(c.folder / "p" / "c")
    (c.folder / "p").chmod(0)


def _lock(pid: int, host: str | None = None, text: str | None = None):
    def mutate(c: Case):
        owner = {"pid": pid, "host": host or socket.gethostname(), "command": "sdistill teacher (fuzz)"}
        (c.cache / "writer.lock").write_text(text if text is not None else json.dumps(owner))

    return mutate


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def cases() -> list[tuple[str, object]]:
    """(name, mutation of a Case): at least 30 corruptions of every kind."""
    nan = float("nan")
    return [
        # the manifest: not JSON, wrong shape, wrong types, bad ranges, names outside the cache, overlaps, gaps
        ("manifest not JSON", lambda c: (c.cache / "manifest.json").write_text("{not json")),
        ("manifest empty", lambda c: (c.cache / "manifest.json").write_text("")),
        ("manifest a list", lambda c: (c.cache / "manifest.json").write_text("[]")),
        ("manifest bad UTF-8", lambda c: (c.cache / "manifest.json").write_bytes(b'{"a": "\xff\xfe"}')),
        ("manifest nested 100k deep", lambda c: (c.cache / "manifest.json").write_text("[" * 100_000)),
        ("manifest 5000-digit int", lambda c: (c.cache / "manifest.json").write_text('{"x": ' + "1" * 5000 + "}")),
        ("manifest is a folder", lambda c: ((c.cache / "manifest.json").unlink(), (c.cache / "manifest.json").mkdir())),
        ("manifest deleted", lambda c: (c.cache / "manifest.json").unlink()),
        ("format missing", lambda c: c.manifest(_pop(["format"]))),
        ("format_version 2", lambda c: c.manifest(_set(["format_version"], 2))),
        ("spec missing", lambda c: c.manifest(_pop(["spec"]))),
        ("spec.grid a string", lambda c: c.manifest(_set(["spec", "grid"], "logsnr"))),
        ("spec.grid holds NaN", lambda c: c.manifest(_set(["spec", "grid", 3], nan))),
        ("spec.shape negative", lambda c: c.manifest(_set(["spec", "shape", 0], -2))),
        ("spec.dtype float64", lambda c: c.manifest(_set(["spec", "dtype"], "float64"))),
        ("spec.seed a string", lambda c: c.manifest(_set(["spec", "seed"], "3"))),
        ("shards a string", lambda c: c.manifest(_set(["shards"], "shard-000000"))),
        ("shards missing", lambda c: c.manifest(_pop(["shards"]))),
        ("shard entry a number", lambda c: c.manifest(_set(["shards", 1], 7))),
        ("crc32 missing", lambda c: c.manifest(_pop(["shards", 1, "crc32"]))),
        ("crc32 of x.npy missing", lambda c: c.manifest(_pop(["shards", 1, "crc32", "x.npy"]))),
        ("crc32 not hex", lambda c: c.manifest(_set(["shards", 1, "crc32", "x.npy"], "zzzz"))),
        ("crc32 wrong value", lambda c: c.manifest(_set(["shards", 1, "crc32", "x.npy"], "00000000"))),
        ("crc32 extra file", lambda c: c.manifest(_set(["shards", 0, "crc32", "evil.npy"], "00000000"))),
        ("bytes a string", lambda c: c.manifest(_set(["shards", 1, "bytes", "x.npy"], "12"))),
        ("bytes wrong value", lambda c: c.manifest(_set(["shards", 1, "bytes", "x.npy"], 99))),
        ("count negative", lambda c: c.manifest(_set(["shards", 1, "count"], -8))),
        ("count a float", lambda c: c.manifest(_set(["shards", 1, "count"], 8.0))),
        ("count huge (middle shard)", lambda c: c.manifest(_set(["shards", 1, "count"], 10**15))),
        ("count huge (last shard)", lambda c: c.manifest(_set(["shards", 2, "count"], 10**12))),
        ("count edited down (gap)", lambda c: c.manifest(_set(["shards", 1, "count"], 4))),
        ("start huge", lambda c: c.manifest(_set(["shards", 2, "start"], 2**70))),
        ("start overlapping", lambda c: c.manifest(_set(["shards", 2, "start"], 12))),
        ("entry deleted (gap)", lambda c: c.manifest(_pop(["shards", 1]))),
        ("name ../clean/shard-000001", lambda c: c.manifest(_set(["shards", 1, "name"], "../clean/shard-000001"))),
        # An absolute name points at a decoy folder of this case, never at a system path: a reader that followed
        # it (an older sdistill did, and its cleanup deleted what the name pointed at) must only ever hit the decoy.
        ("name absolute", _absolute_name),
        ("name duplicated", lambda c: c.manifest(_set(["shards", 2, "name"], "shard-000001"))),
        ("status unknown", lambda c: c.manifest(_set(["shards", 1, "status"], "maybe"))),
        # shard files: flipped, NaN, swapped, truncated, deleted, hostile headers, pickles, links, FIFOs
        ("x.npy byte flipped", _flip_byte),
        ("NaN in denoised.npy", _edit_array("shard-000001/denoised.npy", lambda a: a.__setitem__((2, 3), np.nan))),
        ("x.npy swapped between shards", lambda c: _swap(c.shard(0) / "x.npy", c.shard(1) / "x.npy")),
        ("shard folders swapped", lambda c: _swap(c.shard(0), c.shard(1))),
        ("denoised.npy truncated", lambda c: os.truncate(c.shard(1) / "denoised.npy", 1000)),
        ("x.npy empty", lambda c: os.truncate(c.shard(2) / "x.npy", 0)),
        ("seeds.npy deleted", lambda c: (c.shard(1) / "seeds.npy").unlink()),
        ("shard folder deleted", lambda c: shutil.rmtree(c.shard(1))),
        ("header claims a huge shape", _header_huge_shape),
        ("header garbage", lambda c: (c.shard(1) / "x.npy").write_bytes(b"garbage!" * 500)),
        ("pickle in x.npy", _pickle_in_x),
        ("x.npy is a folder", _to_dir("shard-000001/x.npy")),
        (
            "x.npy links to /dev/zero",
            lambda c: ((c.shard(1) / "x.npy").unlink(), (c.shard(1) / "x.npy").symlink_to("/dev/zero")),
        ),
        ("x.npy is a FIFO", lambda c: ((c.shard(1) / "x.npy").unlink(), os.mkfifo(c.shard(1) / "x.npy"))),
        ("shard folder links outside", _symlink_shard),
        ("leftover shard .tmp", lambda c: (c.cache / "shard-000007.tmp").mkdir()),
        # places and permissions
        ("x.npy unreadable", _chmod("shard-000001/x.npy", 0)),
        ("shard folder unreadable", _chmod("shard-000001", 0)),
        ("cache folder unreadable", _chmod("", 0)),
        ("cache folder read-only", _chmod("", 0o555)),
        ("parent folder unsearchable", _unsearchable_parent),
        ("cache path is a file", lambda c: (shutil.rmtree(c.cache), c.cache.write_text("file"))),
        ("cache under a file", lambda c: (c.folder.joinpath("f").write_text("x"), c.set_cache(c.folder / "f" / "c"))),
        ("cache name of 300 characters", lambda c: c.set_cache(c.folder / ("d" * 300))),
        ("cache path of 5000 characters", lambda c: c.set_cache(c.folder / "/".join(["d" * 249] * 20))),
        # the writer lock
        ("stale lock (dead pid)", _lock(_dead_pid())),
        ("live lock (this script)", _lock(os.getpid())),
        ("live lock with work to do", lambda c: (_lock(os.getpid())(c), c.manifest(_pop(["shards", 2])))),
        ("lock of another host", lambda c: (_lock(1, "elsewhere.invalid")(c), c.manifest(_pop(["shards", 2])))),
        ("lock file garbage", lambda c: (_lock(0, text="garbage")(c), c.manifest(_pop(["shards", 2])))),
    ]


def command_line(cmd: str, case: Case) -> list[str]:
    """The sdistill arguments of one command on one case."""
    if cmd == "verify":
        return ["cache", "info", "--verify", str(case.cache)]
    return [cmd, str(case.recipe), "--quiet"]


# Messages on one line whatever rich thinks the width is; one thread each, like the tests.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100000", "PYTHONDONTWRITEBYTECODE": "1"}

# As root, file permissions bind only without the capabilities that override them.
NO_OVERRIDE = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def serve() -> None:
    """The fork server: import sdistill (and torch) once, then run each request (a JSON line of arguments) in a
    forked child, as `python -m solverdistill ARGS` would (SystemExit is the exit status, anything else uncaught
    prints its traceback and exits 1), and answer a JSON line [status or null on timeout, stderr]."""
    import atexit
    import signal
    import traceback

    import solverdistill.cli
    import solverdistill.pipeline
    import solverdistill.students.dode
    import solverdistill.teacher.run
    from solverdistill.models import resolve

    resolve("gmm:tiny")  # the backend's imports, once

    for line in sys.stdin:
        args, timeout = json.loads(line)
        with tempfile.TemporaryFile() as err:
            pid = os.fork()
            if pid == 0:  # the child: stdout discarded, stderr captured
                code = 1
                try:
                    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                    os.dup2(err.fileno(), 2)
                    sys.argv = ["sdistill", *args]
                    try:
                        solverdistill.cli.main()
                        code = 0
                    except SystemExit as e:
                        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                    except BaseException:
                        traceback.print_exc()
                    atexit._run_exitfuncs()  # what interpreter exit runs (finalizers that release locks)
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
            deadline = time.time() + timeout
            status = None
            while time.time() < deadline:
                done, raw = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = os.waitstatus_to_exitcode(raw)
                    break
                time.sleep(0.005)
            if status is None:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            err.seek(0)
            text = err.read().decode(errors="replace")
        print(json.dumps([status, text]), flush=True)


class Runner:
    """Runs `sdistill ARGS` in a process of its own: forked from a server (fast), or `python -m solverdistill`
    (`--exec`, the real interpreter start, 2 s a command). One runner per worker thread."""

    def __init__(self, drop_caps: bool, fork: bool) -> None:
        self.prefix = NO_OVERRIDE if drop_caps else []
        self.server = None
        if fork:
            cmd = self.prefix + [sys.executable, os.path.abspath(__file__), "--serve"]
            self.server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)

    def __call__(self, args: list[str], timeout: float = 120) -> tuple[int | None, str]:
        if self.server is not None:
            self.server.stdin.write(json.dumps([args, timeout]) + "\n")
            self.server.stdin.flush()
            status, err = json.loads(self.server.stdout.readline())
            return status, err
        try:
            p = subprocess.run(
                self.prefix + [sys.executable, "-m", "solverdistill", *args],
                capture_output=True,
                text=True,
                errors="replace",
                env=ENV,
                timeout=timeout,
                cwd="/",
            )
        except subprocess.TimeoutExpired:
            return None, ""
        return p.returncode, p.stderr

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait()


def restore_permissions(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=True):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                try:
                    p.chmod(0o755 if p.is_dir() else 0o644)
                except OSError:
                    pass
    # a folder we could not enter was not walked: walk again after opening it up
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                try:
                    p.chmod(0o755)
                except OSError:
                    pass


def classify(cmd: str, code: int | None, err: str, case: Case, run: Runner) -> tuple[str, str]:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if (case.folder / MARKER).exists():
        return "FAILURE", "a pickle in a data file ran"
    if code is None:
        return "FAILURE", "timed out"
    if "Traceback" in err:
        return "FAILURE", f"traceback: {last[:150]}"
    if code == 2:
        errors = [ln for ln in lines if ln.startswith("error:")]
        if len(errors) == 1 and last.startswith("error:"):
            return "clean", last[:160]
        return "FAILURE", f"exit 2 without one error line: {last[:120]}"
    if code == 1 and cmd == "verify" and any(("bad shard" in ln or "in no shard" in ln) for ln in lines):
        return "detected", next(ln for ln in lines if "bad shard" in ln or "in no shard" in ln)[:160]
    if code == 0:
        restore_permissions(case.folder)
        lock = case.cache / "writer.lock"
        if lock.is_file() and f'"pid": {os.getpid()},' in lock.read_text():
            lock.unlink()  # the "live" writer was this script: it has finished now
        check, verr = run(command_line("verify", case))
        if check == 0:
            return "repaired", "exit 0; cache info --verify passes afterwards"
        vlines = [ln for ln in verr.splitlines() if ln.strip()]
        return "FAILURE", f"exit 0 but verify then exits {check}: {(vlines[-1] if vlines else '')[:120]}"
    return "FAILURE", f"exit {code}: {last[:140]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--only", default="", help="only cases whose name contains this")
    ap.add_argument("--keep", type=Path, help="work here (kept) instead of a temporary folder")
    ap.add_argument("--exec", action="store_true", help="run `python -m solverdistill` per command (slow)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each case's message too")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve()
        return 0
    drop_caps = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("setpriv") is not None
    began = time.time()
    work = Path(tempfile.mkdtemp(prefix="fuzz_caches_")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    base = Case(work / "base")
    runners = [Runner(drop_caps, fork=not args.exec) for _ in range(args.jobs)]
    code, err = runners[0](command_line("teacher", base))
    if code != 0:
        print(f"could not build the base cache: {err}", file=sys.stderr)
        return 1
    todo = [(name, mutate, cmd) for name, mutate in cases() if args.only in name for cmd in COMMANDS]
    free = list(runners)

    def one(item):
        i, (name, mutate, cmd) = item
        run = free.pop()
        try:
            folder = work / f"case-{i:03d}-{cmd}"
            shutil.copytree(base.folder, folder, symlinks=True)
            case = Case(folder)
            try:
                mutate(case)
            except Exception as e:  # a mutation that cannot be applied here (e.g. no FIFOs) is not a result
                return name, cmd, None, "FAILURE", f"could not apply the corruption: {e!r}"
            code, err = run(command_line(cmd, case))
            result = classify(cmd, code, err, case, run)
            if args.keep is None:
                restore_permissions(folder)
                shutil.rmtree(folder, ignore_errors=True)
            return name, cmd, code, *result
        finally:
            free.append(run)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, enumerate(todo)))
    for run in runners:
        run.close()
    names = list(dict.fromkeys(r[0] for r in results))
    table = {(r[0], r[1]): r for r in results}
    width = max(len(n) for n in names)
    print(f"{'case':{width}}  " + "  ".join(f"{c:>14}" for c in COMMANDS))
    for n in names:
        cells = [f"{table[n, c][3]} ({table[n, c][2]})" for c in COMMANDS]
        print(f"{n:{width}}  " + "  ".join(f"{cell:>14}" for cell in cells))
    if args.verbose:
        print()
        for name, cmd, code, kind, why in results:
            print(f"{name} / {cmd}: {kind} ({code}): {why}")
    failures = [r for r in results if r[3] == "FAILURE"]
    if failures:
        print("\nfailures:")
        for name, cmd, code, _, why in failures:
            print(f"  {name} / {cmd} (exit {code}): {why}")
    counts = Counter(r[3] for r in results)
    how = "forked per command" if not args.exec else "python -m per command"
    if drop_caps:
        how += ", without the permission overrides of root"
    print(
        f"\n{len(names)} corruptions x {len(COMMANDS)} commands = {len(results)} cases: "
        f"{counts['clean']} clean errors (exit 2), {counts['detected']} detected by --verify (exit 1), "
        f"{counts['repaired']} repaired (exit 0, verifies), {counts['FAILURE']} failures "
        f"({sum(r[4].startswith('traceback') for r in failures)} with a traceback); {time.time() - began:.0f}s ({how})"
    )
    if args.keep is None:
        restore_permissions(work)
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
