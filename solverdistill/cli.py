"""The `sdistill` command line: the Typer app, its error handling, and one registration per command (the
commands themselves are in commands/, one module each)."""

from __future__ import annotations

import functools
import inspect
import traceback

import typer
from rich.text import Text

from . import __version__, distributed
from .commands import bench, cache, compare, convert, distill, export, fid, listing, sample, teacher
from .commands import inspect as inspect_command
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
        if distributed.world().size > 1:  # under torchrun (docs/distributed.md)
            return _one_rank(fn, *args, **kwargs)
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


def _one_rank(fn, *args, **kwargs):
    """One torchrun rank: join the group, run, leave it. A failure prints this rank's message and exits at once
    with its status (2 bad input, 1 failed run), so torchrun stops the other ranks instead of leaving them waiting."""
    distributed.init()
    try:
        result = fn(*args, **kwargs)
    except BadInput as e:
        distributed.abort(f"error: {e}", 2)
    except RunFailed as e:
        distributed.abort(f"failed: {e}", 1)
    except typer.Exit as e:
        if e.exit_code:
            distributed.abort(f"exit status {e.exit_code}", e.exit_code)
        distributed.finish()
        raise
    except KeyboardInterrupt:
        distributed.abort("interrupted", 130)
    except BaseException:
        distributed.abort(traceback.format_exc(), 1)
    distributed.finish()
    return result


TRUST_HELP = "Load EDM pickles (which run code) without an allow-list entry, for this run."


def trusting(fn):
    """The command with `--trust-pickle` among its own options too: people type it after the subcommand
    (`sdistill sample --trust-pickle ...`) as often as before it."""

    @functools.wraps(fn)
    def wrapper(*args, trust_pickle: bool = False, **kwargs):
        if trust_pickle:
            from .models.edm import trust_every_pickle

            trust_every_pickle(True)
        return fn(*args, **kwargs)

    sig = inspect.signature(fn)
    flag = inspect.Parameter(
        "trust_pickle",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(False, "--trust-pickle", help=TRUST_HELP),
        annotation=bool,
    )
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values()]
    wrapper.__signature__ = sig.replace(parameters=[*params, flag])
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
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help=TRUST_HELP),
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
    ("inspect", inspect_command.command),
    ("fid", fid.command),
    ("compare", compare.command),
    ("bench", bench.command),
    ("export", export.command),
):
    app.command(name)(handled(trusting(fn)))

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
