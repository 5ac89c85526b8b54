"""Errors that mean "bad input": the CLI turns them into exit code 2 and one message, no traceback."""


class BadInput(Exception):
    """The user gave something we cannot use: a flag, a key, a file. The message names it and what was expected."""


class RunFailed(Exception):
    """The inputs were fine but the run could not finish (exit code 1)."""
