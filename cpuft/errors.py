"""Errors a user can act on.

`UserError` is bad input (config, data, paths, impossible plans): the CLI prints its message
without a traceback and exits with status 2. `RunFailed` (and an OSError: a full disk, a
filesystem gone read-only) is a failed run: its message alone, status 1. Anything else escaping a
command is a failed run too (status 1, with the traceback of the library that raised).
"""

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_BAD_INPUT = 2
# sysexits' EX_TEMPFAIL: the run stopped on a signal after saving a checkpoint; `--resume` continues.
EXIT_INTERRUPTED = 75


class UserError(Exception):
    """Bad input; the message names the file, line or field and says what to do."""


class RunFailed(Exception):
    """A run that started and cannot go on (its loss turned NaN, a disk filled): the CLI prints
    the message, which says what was kept and what to do, without a traceback, and exits 1."""


class PlanError(UserError):
    """The request cannot be carried out on this machine (e.g. cuda with no GPU)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to pages), or its type."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
