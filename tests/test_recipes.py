"""solverdistill.recipes: validation that names the key path, CLI overrides, ${ENV} expansion, and every shipped
recipe (with its student and train sections checked by the method that reads them)."""

from pathlib import Path

import pytest

from solverdistill import students
from solverdistill.errors import BadInput
from solverdistill.pipeline import method_configs
from solverdistill.recipes import Recipe, TeacherSection, load_recipe, outside_note, path_notes, read_value
from solverdistill.teacher import TeacherCache

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_and_types(tmp_path):
    rec = load_recipe(write(tmp_path, "model: {spec: gmm:tiny}\nteacher: {steps: 8}\n"))
    assert isinstance(rec, Recipe) and rec.name == "recipe" and rec.path == str(tmp_path / "r.yaml")
    assert rec.teacher == TeacherSection(steps=8)
    assert rec.student == {} and rec.train == {} and rec.output == ""
    assert str(rec.cache_dir()) == "cache/recipe"  # teacher.cache defaults to cache/NAME
    rec = load_recipe(write(tmp_path, "name: q\nmodel: {spec: gmm:tiny}\nstudent: {method: dlms}\n"))
    assert str(rec.cache_dir()) == "cache/q" and rec.student == {"method": "dlms"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: t\nmodel: {spec: gmm:tiny}\nteacher: {stepz: 3}\n", "teacher.stepz: unknown key; known keys: solver"),
        ("name: t\nmodel: {spec: gmm:tiny}\nteacher: {steps: many}\n", "teacher.steps: expected int, got 'many'"),
        ("name: t\nmodel: {spec: gmm:tiny}\nteacher: {steps: true}\n", "teacher.steps: expected int, got True"),
        ("name: t\nmodel: {spec: gmm:tiny}\nteacher: {steps: 2.5}\n", "teacher.steps: expected int, got 2.5"),
        ("name: t\nteacher: {steps: 3}\n", "model.spec: missing"),
        ("name: t\nmodel: {spec: gmm:tiny}\nteacher: {num_samples: -3}\n", "teacher.num_samples: must be >= 1, got -3"),
        ("name: t\nmodel: {spec: gmm:tiny\nteacher: {}\n", "malformed YAML at line 3"),
        (
            "name: t\nmodel: {spec: gmm:tiny}\nteacher: {dtype: int8}\n",
            "teacher.dtype: must be one of float32, float16",
        ),
        ("name: t\nmodel: {spec: '${NO_SUCH_VAR_SDISTILL}/m.pkl'}\n", "model.spec: environment variable NO_SUCH_VAR"),
        ("name: t\nmodel: gmm:tiny\n", "model: expected a mapping, got str"),
        ("name: t\nmodel: {spec: gmm:tiny}\nstudent: [dlms]\n", "student: expected a mapping, got list"),
        ("name: t\nmodel: {spec: gmm:tiny}\nmodle: {}\n", "modle: unknown key"),
        ("- a\n- b\n", "a recipe is a mapping of sections"),
    ],
)
def test_bad_recipes_name_the_key_path(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(BadInput, match=message.replace("[", r"\[")) as e:
        load_recipe(path)
    assert str(e.value).startswith(str(path))


def test_bad_recipe_exits_2_on_the_command_line(tmp_path, cli):
    path = write(tmp_path, "name: t\nmodel: {spec: gmm:tiny}\nteacher: {num_samples: -3}\n")
    r = cli("teacher", path, "--quiet", "--cache", tmp_path / "c")
    assert r.exit_code == 2 and "teacher.num_samples: must be >= 1, got -3" in r.output
    assert "Traceback" not in r.output
    r = cli("teacher", tmp_path / "missing.yaml", "--quiet")
    assert r.exit_code == 2 and "cannot read the recipe" in r.output


def test_float_keys_take_ints(tmp_path):
    path = write(tmp_path, "model: {spec: gmm:tiny}\nstudent: {method: sfd}\ntrain: {lr: 1}\n")
    _, _, train = method_configs(load_recipe(path), say=lambda m: None)
    assert train.lr == 1.0 and isinstance(train.lr, float)


def test_overrides(tmp_path):
    path = write(tmp_path, "name: t\nmodel: {spec: gmm:tiny}\nteacher: {steps: 8, num_samples: 100}\n")
    rec = load_recipe(
        path, {"teacher.num_samples": 10, "teacher.batch": None, "train.samples": 5, "model.spec": "gmm:cifar"}
    )
    assert rec.teacher.num_samples == 10 and rec.teacher.steps == 8
    assert rec.teacher.batch == TeacherSection().batch  # None: not given, not an override
    assert rec.train == {"samples": 5} and rec.model.spec == "gmm:cifar"  # a missing section is created
    with pytest.raises(BadInput, match="teacher.num_samples: must be >= 1, got 0"):
        load_recipe(path, {"teacher.num_samples": 0})  # overrides are validated like the file
    text = path.read_text()
    assert load_recipe(path).teacher.num_samples == 100 and path.read_text() == text  # the file is untouched


def test_cli_overrides_reach_the_teacher(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("SDISTILL_TEST_DIR", str(tmp_path / "envcache"))
    path = write(
        tmp_path,
        "name: t\nmodel: {spec: gmm:tiny}\nteacher: {cache: '${SDISTILL_TEST_DIR}', steps: 8, num_samples: 100}\n",
    )
    r = cli("teacher", path, "--quiet", "--num", 3, "--batch", 2)
    assert r.exit_code == 0, r.output
    assert TeacherCache.open(tmp_path / "envcache").num_samples == 3  # ${ENV} expanded, --num overrode 100


def test_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("SDISTILL_A", "/models")
    monkeypatch.setenv("SDISTILL_B", "x")
    rec = load_recipe(
        write(
            tmp_path,
            "name: '${SDISTILL_B}y'\nmodel: {spec: 'edm:${SDISTILL_A}/${SDISTILL_B}.pkl'}\n"
            "teacher: {cache: '$SDISTILL_A/{x}'}\n",
        )
    )
    assert rec.model.spec == "edm:/models/x.pkl" and rec.name == "xy"
    assert rec.teacher.cache == "$SDISTILL_A/{x}"  # only ${NAME} expands
    # Expansion happens in every string key, including those of the method's sections.
    rec = load_recipe(write(tmp_path, "model: {spec: gmm:tiny}\nstudent: {method: dode, base: '${SDISTILL_B}'}\n"))
    monkeypatch.delenv("SDISTILL_B")
    with pytest.raises(BadInput, match="student.base: environment variable SDISTILL_B is not set"):
        students.get("dode").configs(rec.student, rec.train)


def test_student_and_train_keys_are_checked_by_their_method(tmp_path, cli):
    path = write(
        tmp_path,
        "name: t\nmodel: {spec: gmm:tiny}\nteacher: {steps: 4, num_samples: 4, cache: "
        f"'{tmp_path / 'c'}'}}\nstudent: {{method: dlms, nfe: 4, ordr: 3}}\n",
    )
    r = cli("distill", path, "--quiet")
    assert r.exit_code == 2 and "student.ordr: unknown key" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "c").exists()  # validated before any work
    r = cli("distill", path, "--method", "magic", "--quiet")
    assert r.exit_code == 2 and "--method: unknown method 'magic'; choose one of dlms, dode, sfd" in r.output
    method = students.get("dlms")
    with pytest.raises(BadInput, match="train.lr_decay: must be one of cosine, none"):
        method.configs({"method": "dlms"}, {"lr_decay": "step"})
    with pytest.raises(BadInput, match="train.heldout: must be >= 1, got 0"):
        method.configs({"method": "dlms"}, {"heldout": 0})
    with pytest.raises(BadInput, match="student.method: unknown method 'magic'"):
        students.get("magic")


def test_switching_methods_keeps_the_keys_the_other_method_knows(tmp_path):
    path = write(
        tmp_path,
        "model: {spec: gmm:tiny}\nstudent: {method: dlms, nfe: 4, order: 3}\n"
        "train: {iterations: 7, samples: 20, heldout: 9}\n",
    )
    said = []
    method, s, t = method_configs(load_recipe(path), "dode", 6, say=said.append)
    assert method.name == "dode" and s.method == "dode" and s.nfe == 6 and s.base == "dpm++3m"
    assert (t.samples, t.heldout) == (20, 9)  # dode has no `iterations` or `order`: dropped, and said so
    assert len(said) == 1 and "--method dode" in said[0]


def test_every_shipped_recipe_validates(monkeypatch):
    monkeypatch.setenv("SDISTILL_MODELS", "/models")
    paths = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(paths) >= 7
    for path in paths:
        rec = load_recipe(path)
        assert rec.model.spec and "${" not in rec.model.spec
        method = students.get(rec.student["method"])
        student, train = method.configs(rec.student, rec.train)
        assert student.method == method.name and train.heldout >= 1


# --- issue 12, item 6: recipes that exhaust memory or escape ---------------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8)
)
OK = "name: t\nmodel: {spec: gmm:tiny}\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (BOMB + OK, "line 2, column 8: aliases \\(\\*name\\) are not allowed in recipes"),  # 9^9 elements if expanded
        (OK + "teacher: {steps: 1000000000000}\n", "teacher.steps: must be <= 100000, got 1000000000000"),
        (OK + "teacher: {num_samples: 10000000000}\n", "teacher.num_samples: must be <= 100000000"),
        (OK + "teacher: {shard_size: 10000000000}\n", "teacher.shard_size: must be <= 100000"),
        (OK + "teacher: {seed: 1180591620717411303424}\n", "teacher.seed: must be <= 1000000000000000"),
        (OK + "teacher: {seed: " + "9" * 5000 + "}\n", "line 3, column 17: an integer of 5000 characters"),
        (OK + "teacher: {steps: .inf}\n", "teacher.steps: expected int, got inf"),
        (OK + "teacher: {solver: " + "x" * 200_000 + "}\n", "teacher.solver: too long \\(200000 characters, at most"),
        (
            OK + "teacher: {cache: " + "x" * 200_000 + "}\n",
            "teacher.cache: too long \\(200000 characters, at most 4096",
        ),
        (OK + "teacher: {device: tpu}\n", r"teacher.device: expected auto, cpu or cuda\[:N\], got 'tpu'"),
        (OK + 'teacher: {cache: "a\\0b"}\n', "teacher.cache: contains a NUL character"),
        (OK.replace("name: t", "name: ../../evil"), "name: must be a simple name .* got '../../evil'"),
        (OK.replace("name: t", "name: a/b"), "name: must be a simple name"),
        (OK.replace("name: t", "name: ''"), "name: must be a simple name"),
        (OK + "model: {spec: gmm:cifar}\n", "line 3, column 1: duplicate key 'model'"),
        (OK + "student: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 20 levels"),
        (OK + "output: !!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
    ],
)
def test_recipes_that_would_exhaust_memory_or_escape_are_refused(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(BadInput, match=message) as e:
        load_recipe(path)
    assert str(e.value).startswith(str(path)) and len(str(e.value)) < 300 + len(str(path))  # echoes are cut
    assert "\n" not in str(e.value)


def test_non_finite_floats_and_absurd_counts_in_method_sections(tmp_path):
    dlms = students.get("dlms")
    for train, message in (
        ({"lr": float("nan")}, "train.lr: must be a finite number, got nan"),
        ({"final_weight": float("inf")}, "train.final_weight: must be a finite number, got inf"),
        ({"iterations": 10**12}, "train.iterations: must be <= 10000000"),
        ({"restarts": 10**9}, "train.restarts: must be <= 1000"),
        ({"batch": 10**12}, "train.batch: must be <= 100000"),
    ):
        with pytest.raises(BadInput, match=message):
            dlms.configs({"method": "dlms"}, train)
    for student, message in (
        ({"nfe": 10**12}, "student.nfe: must be <= 1000, got 1000000000000"),
        ({"order": 10**9}, "student.order: must be <= 64"),
        ({"scale_range": float("nan")}, "student.scale_range: must be a finite number"),
        ({"scale_range": 1.5}, "student.scale_range: must be <= 0.9, got 1.5"),  # k = 1 - r would reach 0
    ):
        with pytest.raises(BadInput, match=message):
            dlms.configs({"method": "dlms", **student}, {})
    with pytest.raises(BadInput, match=r"train.device: expected auto, cpu or cuda\[:N\], got 'tpu'"):
        dlms.configs({"method": "dlms"}, {"device": "tpu"})
    # The ceilings go by key name, so methods that set none of their own (D-ODE here) get them too.
    with pytest.raises(BadInput, match="student.nfe: must be <= 1000"):
        students.get("dode").configs({"method": "dode", "nfe": 5000}, {})
    path = write(tmp_path, OK + "train: {lr: .nan}\nstudent: {method: dlms}\n")
    with pytest.raises(BadInput, match="train.lr: must be a finite number, got nan"):
        method_configs(load_recipe(path), say=lambda m: None)


def test_file_size_encoding_and_empty_sections(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(OK + "#" * 300_000 + "\n")
    with pytest.raises(BadInput, match="larger than 256 KiB"):
        load_recipe(path)
    path.write_bytes(OK.encode() + b"\xff\xfe garbage")
    with pytest.raises(BadInput, match="not UTF-8 text \\(byte 0xff at offset 32\\)"):
        load_recipe(path)
    rec = load_recipe(write(tmp_path, OK + "student: ~\ntrain:\n"))
    assert rec.student == {} and rec.train == {}  # an empty section is the defaults, like an empty teacher
    rec = load_recipe(write(tmp_path, OK.replace("name: t", "name: résumé-v1.2")))
    assert rec.name == "résumé-v1.2"


def test_paths_outside_the_recipe_folder_and_cwd_get_a_note(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    proj.mkdir()
    monkeypatch.chdir(proj)
    rec = load_recipe(write(proj, OK + "teacher: {cache: ../elsewhere}\n"))
    notes = path_notes(rec)
    assert len(notes) == 1 and str(tmp_path / "elsewhere") in notes[0] and notes[0].startswith("note: teacher.cache")
    assert outside_note(rec, "output", "out/a.npz") is None  # inside the current directory
    assert outside_note(rec, "output", "../proj/out/a.npz") is None  # back inside
    assert outside_note(rec, "output", tmp_path / "abs.npz") is None  # an absolute path is deliberate
    assert str(tmp_path / "x.npz") in outside_note(rec, "output", "../x.npz")
    # Relative paths resolve against the current directory; the recipe's folder counts as home too.
    sub = tmp_path / "recipes"
    sub.mkdir()
    rec = load_recipe(write(sub, OK + "teacher: {cache: ../recipes/c}\n"))
    assert path_notes(rec) == []
    assert path_notes(load_recipe(write(proj, OK))) == []  # the default cache/NAME


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads `5e-5` as a string; the recipe loader reads it as the number everyone means.
    path = write(tmp_path, "model: {spec: gmm:tiny}\nstudent: {method: dlms}\ntrain: {lr: 5e-5, clip: 1E2}\n")
    _, _, train = method_configs(load_recipe(path), say=lambda m: None)
    assert train.lr == 5e-5 and train.clip == 100.0
    path = write(tmp_path, "model: {spec: gmm:tiny}\nname: 1e5x\nteacher: {steps: 4, seed: 12}\n")
    r = load_recipe(path)
    assert r.name == "1e5x" and r.teacher.seed == 12  # names stay strings, integers stay integers
    path = write(tmp_path, "model: {spec: gmm:tiny}\nteacher: {steps: 1e3}\n")
    with pytest.raises(BadInput, match="teacher.steps: expected int, got 1000.0"):
        load_recipe(path)
    path = write(tmp_path, "model: {spec: gmm:tiny}\nstudent: {method: dlms}\ntrain: {lr: 1e999}\n")
    with pytest.raises(BadInput, match="train.lr: must be a finite number"):
        method_configs(load_recipe(path), say=lambda m: None)
    # Benchmarks' `--set key=value` read their values the same way.
    assert [read_value(v) for v in ("2e-3", "5", "dpm++", "true")] == [2e-3, 5, "dpm++", True]


def test_student_and_train_errors_name_the_recipe_file(tmp_path, cli):
    path = write(tmp_path, "model: {spec: gmm:tiny}\nstudent: {method: dlms, nfe: 0}\n")
    with pytest.raises(BadInput, match=f"^{path}: student.nfe: must be >= 1"):
        method_configs(load_recipe(path), say=lambda m: None)
    path = write(tmp_path, "model: {spec: gmm:tiny}\ntrain: {lr: fast}\n")
    r = cli("distill", path, "--quiet")
    assert r.exit_code == 2 and f"{path}: train.lr: expected float, got 'fast'" in r.output
