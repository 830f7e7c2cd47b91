"""Errors a user can act on.

`UserError` is bad input (config, data, paths, impossible plans): the CLI prints its message
without a traceback and exits with status 2. Anything else escaping a command is a failed run
(status 1).
"""

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_BAD_INPUT = 2
# sysexits' EX_TEMPFAIL: the run stopped on a signal after saving a checkpoint; `--resume` continues.
EXIT_INTERRUPTED = 75


class UserError(Exception):
    """Bad input; the message names the file, line or field and says what to do."""


class PlanError(UserError):
    """The request cannot be carried out on this machine (e.g. cuda with no GPU)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to pages), or its type."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
