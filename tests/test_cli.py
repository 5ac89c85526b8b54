"""solverdistill.cli: the commands it registers, listings, --version, --trust-pickle, and errors without tracebacks."""

import os
import subprocess
import sys

import pytest

from solverdistill.models import edm

COMMANDS = [
    "sample",
    "solvers",
    "students",
    "models",
    "teacher",
    "distill",
    "inspect",
    "fid",
    "compare",
    "bench",
    "convert",
    "cache",
]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_is_registered_with_help(cli, name):
    r = cli(name, "--help")
    assert r.exit_code == 0 and "Usage:" in r.output, r.output


def test_listings(cli):
    r = cli("solvers")
    assert r.exit_code == 0 and "dpm++3m" in r.output and "time_uniform:2" in r.output and "ddim" in r.output
    r = cli("models")
    assert r.exit_code == 0 and "gmm:cifar" in r.output and "diffusers:..." in r.output
    r = cli("students")
    assert r.exit_code == 0 and all(m in r.output for m in ("dlms", "dode", "sfd"))
    assert "fine-tunes the network" in r.output


def test_version():
    p = subprocess.run([sys.executable, "-m", "solverdistill", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("sdistill ")


def test_no_traceback_from_a_real_process(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "solverdistill",
            "sample",
            "--model",
            "gmm:tiny",
            "--solver",
            "nope",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 2 and "unknown solver" in p.stderr and "Traceback" not in p.stderr + p.stdout
    assert p.stderr.startswith("error: ")


def test_trust_pickle_lasts_one_invocation(cli):
    assert edm._trust_every_pickle is False
    assert cli("--trust-pickle", "solvers").exit_code == 0
    assert edm._trust_every_pickle is True  # what `--trust-pickle` asks for: no allow-list check in this run
    assert cli("solvers").exit_code == 0
    assert edm._trust_every_pickle is False  # and the next run without the flag checks again
    assert "SDISTILL_TRUST_PICKLE" not in os.environ  # the flag no longer travels through the environment
