"""Fuzz recipes: a small valid recipe (gmm:tiny, D-ODE, a tiny cache) mutated in 80-odd ways, each run through
`sdistill teacher` and `sdistill distill` in a subprocess with a timeout.

Every run is classified:

- `clean`: exit 2, exactly one stderr line starting "error:", the last one, and no traceback;
- `ok`: exit 0; every mutation says for which commands that is expected (and why it is harmless), and which runs
  must print a note (a path that resolves outside the recipe's folder and the current directory);
- `timeout`, `traceback` (a "Traceback" anywhere), `other` (any other exit code, or exit 2 without one clean line).

A run that is `ok` where an error was expected (or `clean` where success was) is `unexplained`. Files written
outside the mutation's own folder are listed too (only the `../` mutations may do it). Exits 1 when anything is
not as expected.

Usage: python benchmarks/fuzz_recipes.py [--jobs N] [--timeout S] [--only SUBSTRING] [--keep]

Run it as an unprivileged user or on a throwaway machine, and never point it (`--sdistill`, `--exec` with another
checkout) at an older sdistill as root: its cases are hostile on purpose, and a version without the checks follows
them (an older cache reader deleted the folder an absolute shard name pointed at).
"""

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

BASE = {
    "name": "fz",
    "model": {"spec": "gmm:tiny"},
    "teacher": {"steps": 8, "num_samples": 24, "batch": 12, "shard_size": 12, "seed": 0, "cache": "cache"},
    "student": {"method": "dode", "nfe": 3, "base": "euler"},
    "train": {"samples": 12, "heldout": 8, "device": "cpu"},
    "output": "out/a.yaml",
}
DLMS = {"student": {"method": "dlms", "nfe": 3}, "train": {"iterations": 2, "validation": 4, "eval_every": 1}}
UNSET = "SDISTILL_FUZZ_SURELY_UNSET"
LONG = "a" * 200_000


@dataclass
class Mutation:
    name: str
    text: str | bytes  # the recipe file
    teacher: str = "error"  # what `teacher` must do: "error" or "ok"
    distill: str = "error"
    why: str = ""  # for an expected "ok": why the mutation is harmless
    note: bool = False  # distill must print a note (a path outside the recipe's folder and the cwd)
    setup: dict = field(default_factory=dict)  # relative path -> "dir" or file text, made before the run


def dump(recipe: dict) -> str:
    """Flow-style YAML via JSON (JSON is YAML), one section a line."""
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in recipe.items())


def changed(**sections: object) -> str:
    """The base recipe with whole sections replaced (None drops one)."""
    r = {k: v for k, v in BASE.items()}
    for k, v in sections.items():
        if v is None:
            r.pop(k, None)
        else:
            r[k] = v
    return dump(r)


def section(name: str, **keys: object) -> dict:
    return {**BASE[name], **keys}


def named(name: object) -> str:
    """The base recipe named `name`, with no teacher.cache or output: the name makes both paths."""
    return changed(name=name, teacher={k: v for k, v in BASE["teacher"].items() if k != "cache"}, output=None)


def dlms(student: dict | None = None, train: dict | None = None) -> str:
    return changed(
        student={**DLMS["student"], **(student or {})}, train={**BASE["train"], **DLMS["train"], **(train or {})}
    )


def mutations() -> list[Mutation]:
    rng = random.Random(0)
    base = dump(BASE)
    # Nine levels of nine aliases, defined in `train` (which `teacher` never reads) and used as the name, a value
    # that is echoed when refused: 9^9 strings if anything walks it.
    bomb = (
        "train: {a: &a [x, x, x, x, x, x, x, x, x], "
        + ", ".join(f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8))
        + "}\n"
    )
    m = [
        # controls
        Mutation("control: the base recipe", base, "ok", "ok", "unchanged"),
        Mutation("control: DLMS, 2 iterations", dlms(), "ok", "ok", "unchanged apart from a valid DLMS student"),
        Mutation("CRLF line endings", base.replace("\n", "\r\n"), "ok", "ok", "YAML reads CRLF"),
        Mutation("UTF-8 byte order mark", "\ufeff" + base, "ok", "ok", "a BOM is allowed in UTF-8 YAML"),
        Mutation("unicode name", named("résumé-1"), "ok", "ok", "a simple name in any script"),
        Mutation("train: null (defaults)", changed(train=None) + "train: null\n", "ok"),  # D-ODE's need 356 samples
        Mutation("output empty", changed(output=""), "ok", "ok", "empty output means out/NAME_METHOD.npz"),
        # the file itself
        Mutation("empty file", ""),
        Mutation("top level is a list", "- a\n- b\n"),
        Mutation("top level is a scalar", "just words\n"),
        Mutation("binary garbage", bytes(rng.randrange(256) for _ in range(4096))),
        Mutation("NUL bytes in the text", base.replace("fz", "f\0z")),
        Mutation("a 300 KiB file", base + "#" * (300 * 1024) + "\n"),
        Mutation("unknown top-level key", base + "modle: {}\n"),
        Mutation("duplicate top-level key", base + "model: {spec: 'gmm:cifar'}\n"),
        Mutation("tab indentation", "model:\n\tspec: gmm:tiny\n"),
        Mutation("deep nesting (5000 lists)", changed(student=None) + "student: " + "[" * 5000 + "]" * 5000 + "\n"),
        Mutation("deep nesting (3000 maps)", changed(train=None) + "train: " + "{a: " * 3000 + "1" + "}" * 3000),
        Mutation("alias bomb (9^9 elements)", changed(name=None, train=None) + bomb + "name: *i\n"),
        Mutation(
            "one harmless alias",
            "t: &t " + json.dumps(BASE["teacher"]) + "\n" + changed(teacher=None) + "teacher: *t\n",
        ),
        Mutation("!!python/object/apply tag", changed(output=None) + "output: !!python/object/apply:os.system [x]\n"),
        Mutation("!!binary value", changed(name=None) + "name: !!binary aGVsbG8=\n"),
        Mutation("a 5000-digit integer", changed(teacher=None) + "teacher: {seed: " + "9" * 5000 + "}\n"),
        Mutation("a 20000-part base-60 integer", changed(teacher=None) + "teacher: {seed: " + "1:" * 20000 + "1}\n"),
        Mutation("a 200k-character unknown key", changed(teacher=None) + "teacher: {" + LONG + ": 1}\n"),
        # model
        Mutation("model missing", changed(model=None)),
        Mutation("model.spec unknown backend", changed(model={"spec": "gmm:nope"})),
        Mutation("model.spec missing file", changed(model={"spec": "edm:/nonexistent/net.pkl"})),
        Mutation("model.spec ${UNSET}", changed(model={"spec": "${" + UNSET + "}"})),
        Mutation("model.spec 200k characters", changed(model={"spec": LONG})),
        # teacher
        Mutation("teacher.steps -1", changed(teacher=section("teacher", steps=-1))),
        Mutation("teacher.steps 10^12", changed(teacher=section("teacher", steps=10**12))),
        Mutation("teacher.steps .inf", changed(teacher=None) + "teacher: {steps: .inf}\n"),
        Mutation("teacher.num_samples 10^12", changed(teacher=section("teacher", num_samples=10**12))),
        Mutation("teacher.batch 10^12", changed(teacher=section("teacher", batch=10**12))),
        Mutation("teacher.shard_size 10^12", changed(teacher=section("teacher", shard_size=10**12))),
        Mutation("teacher.seed 2^70", changed(teacher=section("teacher", seed=2**70))),
        Mutation("teacher.seed .nan", changed(teacher=None) + "teacher: {seed: .nan}\n"),
        Mutation("teacher.solver unknown", changed(teacher=section("teacher", solver="warp-drive"))),
        Mutation("teacher.solver 200k characters", changed(teacher=section("teacher", solver=LONG))),
        Mutation("teacher.schedule explicit, wrong length", changed(teacher=section("teacher", schedule="3,2,1"))),
        Mutation("teacher.device tpu", changed(teacher=section("teacher", device="tpu"))),
        Mutation(
            "teacher.cache ../ (outside)",
            changed(teacher=section("teacher", cache="../escaped-cache")),
            "ok",
            "ok",
            "a relative path the user wrote; distill says where it resolves",
            note=True,
        ),
        Mutation("teacher.cache is a file", changed(teacher=section("teacher", cache="afile")), setup={"afile": "x"}),
        Mutation("teacher.cache with NUL", changed(teacher=None) + 'teacher: {cache: "c\\0d"}\n'),
        Mutation("teacher.cache 200k characters", changed(teacher=section("teacher", cache=LONG))),
        # name
        Mutation("name ../../evil", named("../../evil")),
        Mutation("name empty", named("")),
        Mutation("name 200k characters", named(LONG)),
        Mutation("name ${UNSET}", named("${" + UNSET + "}")),
        # output
        Mutation(
            "output ../ (outside)",
            changed(output="../escaped.yaml"),
            "ok",
            "ok",
            "a relative path the user wrote; distill says where it resolves",
            note=True,
        ),
        Mutation("output is a folder", changed(output="outdir"), "ok", setup={"outdir": "dir"}),
        Mutation("output under a file", changed(output="afile/a.npz"), "ok", setup={"afile": "x"}),
        Mutation("output 200k characters", changed(output=LONG)),
        # student
        Mutation("student is a list", changed(student=["dlms"])),
        Mutation("student.method unknown", changed(student=section("student", method="magic")), "ok"),
        Mutation("student.method 200k characters", changed(student=section("student", method=LONG)), "ok"),
        Mutation("student.method a list", changed(student=section("student", method=[1, 2])), "ok"),
        Mutation("student.nfe 10^12", changed(student=section("student", nfe=10**12)), "ok"),
        Mutation("student unknown key", changed(student=section("student", nfee=3)), "ok"),
        Mutation("student.base ${UNSET}", changed(student=section("student", base="${" + UNSET + "}")), "ok"),
        Mutation("dlms student.order 10^9", dlms(student={"order": 10**9}), "ok"),
        Mutation("dlms student.scale_range .inf", dlms().replace('"nfe": 3}', '"nfe": 3, "scale_range": .inf}'), "ok"),
        Mutation(
            "sfd student.sigma_max .nan",
            changed(student={"method": "sfd", "nfe": 2}).replace('"nfe": 2}', '"nfe": 2, "sigma_max": .nan}'),
            "ok",
        ),
        # train
        Mutation("dlms train.lr .nan", dlms().replace('"iterations": 2', '"iterations": 2, "lr": .nan'), "ok"),
        Mutation("dlms train.iterations 10^12", dlms(train={"iterations": 10**12}), "ok"),
        Mutation("dlms train.restarts 10^9", dlms(train={"restarts": 10**9}), "ok"),
        Mutation("dlms train.batch 10^12", dlms(train={"batch": 10**12}), "ok"),
        Mutation("dlms train.validation 10^6", dlms(train={"validation": 10**6}), "ok"),
        Mutation("train.heldout more than cached", changed(train=section("train", heldout=1000)), "ok"),
        Mutation("train.device tpu", changed(train=section("train", device="tpu")), "ok"),
    ]
    names = [x.name for x in m]
    assert len(names) == len(set(names)), "mutation names must be unique"
    return m


@dataclass
class Run:
    rc: int | None
    out: str
    err: str
    seconds: float

    @property
    def kind(self) -> str:
        if self.rc is None:
            return "timeout"
        if "Traceback" in self.out + self.err:
            return "traceback"
        if self.rc == 0:
            return "ok"
        lines = [x for x in self.err.splitlines() if x.strip()]
        errors = [x for x in lines if x.startswith("error:")]
        if self.rc == 2 and len(errors) == 1 and lines[-1] == errors[0]:
            return "clean"
        return "other"

    @property
    def message(self) -> str:
        lines = [x for x in self.err.splitlines() if x.strip()]
        return lines[-1] if lines else ""


def limit_memory() -> None:
    """A safety net for the machine: a run that tries to allocate terabytes fails instead of swapping."""
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def run(args: list[str], cwd: Path, timeout: float) -> Run:
    env = {**os.environ, "COLUMNS": "10000", "PYTHONUNBUFFERED": "1"}  # no wrapping: one message is one line
    env.pop(UNSET, None)
    began = time.time()
    try:
        p = subprocess.run(
            [sys.executable, "-m", "solverdistill", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            preexec_fn=limit_memory,
        )
        return Run(p.returncode, p.stdout, p.stderr, time.time() - began)
    except subprocess.TimeoutExpired as e:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        return Run(None, text(e.stdout), text(e.stderr), time.time() - began)


def fuzz_one(m: Mutation, root: Path, index: int, timeout: float) -> tuple[Mutation, Run, Run]:
    folder = root / f"m{index:03d}"
    folder.mkdir()
    for rel, content in m.setup.items():
        if content == "dir":
            (folder / rel).mkdir(parents=True)
        else:
            (folder / rel).write_text(content)
    recipe = folder / "recipe.yaml"
    if isinstance(m.text, bytes):
        recipe.write_bytes(m.text)
    else:
        recipe.write_bytes(m.text.encode("utf-8", errors="surrogatepass"))
    teacher = run(["teacher", "recipe.yaml", "--quiet"], folder, timeout)
    distill = run(["distill", "recipe.yaml", "--quiet"], folder, timeout)
    return m, teacher, distill


def verdict(m: Mutation, teacher: Run, distill: Run) -> str:
    problems = []
    for cmd, r, want in (("teacher", teacher, m.teacher), ("distill", distill, m.distill)):
        if r.kind in ("timeout", "traceback", "other"):
            problems.append(f"{cmd} {r.kind}")
        elif (r.kind == "ok") != (want == "ok"):
            problems.append(f"{cmd} unexplained {r.kind}")
    if m.note and distill.kind == "ok" and "resolves to" not in distill.err:
        problems.append("distill printed no note")
    return "; ".join(problems) or "as expected"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per command")
    ap.add_argument("--only", default="", help="run the mutations whose name contains this")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    muts = [x for x in mutations() if args.only in x.name]
    root = Path(tempfile.mkdtemp(prefix="sdistill-fuzz-"))
    work = root / "work"  # the mutations' folders; `../` lands in `work`, anything above it is a stray write
    work.mkdir()
    began = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda im: fuzz_one(im[1], work, im[0], args.timeout), enumerate(muts)))
    allowed = {"escaped-cache", "escaped.yaml"}
    strays = sorted(
        str(p.relative_to(root))
        for p in list(root.iterdir()) + list(work.iterdir())
        if p.name not in allowed and p != work and not re.fullmatch(r"m\d{3}", p.name)
    )
    counts: dict[str, int] = {}
    bad = 0
    print("| # | mutation | teacher | distill | verdict | message (distill, or teacher) |")
    print("|---|---|---|---|---|---|")
    for i, (m, t, d) in enumerate(results):
        for r, want in ((t, m.teacher), (d, m.distill)):
            key = r.kind if r.kind != "ok" or want == "ok" else "unexplained ok"
            if r.kind == "clean" and want == "ok":
                key = "unexpected error"
            counts[key] = counts.get(key, 0) + 1
        v = verdict(m, t, d)
        bad += v != "as expected"
        msg = (d.message if d.kind != "ok" else t.message if t.kind != "ok" else m.why)[:160].replace("|", "/")
        print(
            f"| {i} | {m.name} | {t.kind} ({t.rc}, {t.seconds:.1f}s) | {d.kind} ({d.rc}, {d.seconds:.1f}s) | {v} | {msg} |"
        )
    for i, (m, t, d) in enumerate(results):
        for cmd, r in (("teacher", t), ("distill", d)):
            if r.kind in ("traceback", "other", "timeout"):
                tail = "\n".join(x[:300] for x in r.err.splitlines()[-8:])
                print(f"\n--- {i} {m.name}: {cmd} {r.kind}, the end of stderr:\n{tail}")
    print()
    print(f"{len(muts)} mutations, {2 * len(muts)} runs in {time.time() - began:.0f}s (--jobs {args.jobs})")
    print("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"mutations not as expected: {bad}; writes outside the mutation folders: {strays or 'none'}")
    if args.keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if bad or strays else 0


if __name__ == "__main__":
    sys.exit(main())
