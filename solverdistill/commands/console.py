"""Where commands print: results to stdout, messages and progress bars to stderr."""

from __future__ import annotations

from rich.console import Console

from ..progress import Bar

out = Console()
err = Console(stderr=True, markup=False)  # messages hold user text ([...] is not markup)


def say(message: str) -> None:
    """A message for the user (stderr), never wrapped: paths and URLs stay whole in a log or a narrow terminal."""
    err.print(message, highlight=False, soft_wrap=True)


def line(text: str) -> None:
    """One result line on stdout, never wrapped or marked up."""
    out.print(text, highlight=False, markup=False, soft_wrap=True)


def progress(quiet: bool):
    """A progress-bar factory `(total, label) -> Bar` for the engine: rate and ETA on stderr, none with --quiet."""
    return lambda total, label: Bar(total, label, disabled=quiet, console=err)
