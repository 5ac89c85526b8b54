"""The `sdistill` command line: the Typer app, its error handling, and one registration per command (the
commands themselves are in commands/, one module each)."""

from __future__ import annotations

import functools

import typer
from rich.text import Text

from . import __version__
from .commands import bench, cache, compare, convert, distill, fid, inspect, listing, sample, teacher
from .commands.console import err, out
from .errors import BadInput, RunFailed

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distill and compare fast few-step solvers for diffusion models.",
)


def handled(fn):
    """Bad input becomes exit 2 with one message (no traceback); a failed run exits 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BadInput as e:
            # One line, never wrapped: a message stays greppable and its paths whole in a log or a narrow terminal.
            err.print(Text("error: ", style="bold red") + Text(str(e)), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except RunFailed as e:
            err.print(Text("failed: ", style="bold red") + Text(str(e)), highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool):
    if value:
        out.print(f"sdistill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="Load EDM pickles (which run code) without an allow-list entry, for this run."
    ),
):
    from .models.edm import trust_every_pickle

    trust_every_pickle(trust_pickle)


for name, fn in (
    ("sample", sample.command),
    ("solvers", listing.solvers),
    ("students", listing.students),
    ("models", listing.models),
    ("teacher", teacher.command),
    ("distill", distill.command),
    ("inspect", inspect.command),
    ("fid", fid.command),
    ("compare", compare.command),
    ("bench", bench.command),
):
    app.command(name)(handled(fn))

convert_app = typer.Typer(help="Convert checkpoints into folders sdistill loads.", no_args_is_help=True)
convert_app.command("ldm")(handled(convert.ldm))
app.add_typer(convert_app, name="convert")

cache_app = typer.Typer(help="Inspect teacher caches.", no_args_is_help=True)
cache_app.command("info")(handled(cache.info))
app.add_typer(cache_app, name="cache")


def main():
    app()


if __name__ == "__main__":
    main()
