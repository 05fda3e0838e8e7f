"""Refusals of bad input, and how stage scripts and the command line show them.

The library raises :class:`InputError` (or one of its kinds) when a file, column, key or value is
wrong in a way the user can fix; its message names the file, the column or key, and the fix.
:func:`run_stage` turns such a refusal into one line on stderr and exit status 2, writes the full
traceback to :data:`ERROR_LOG` (or to the screen with ``--debug``), and lets every other exception
through with its traceback, because that is a bug, not a user's mistake.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

logger = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
ERROR_LOG = Path("logs") / "errors.log"
DEBUG_FLAG = "--debug"


class InputError(ValueError):
    """A file, column, key or value the user must fix; the message says which, and how."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder that should exist does not."""


class MissingKeyError(InputError, KeyError):
    """A key (a params key, a column, a dictionary entry) that should exist does not."""

    def __str__(self) -> str:
        # KeyError's str() quotes its argument; the message is a sentence.
        return str(self.args[0]) if self.args else ""


def _log_traceback(program: str, argv: Sequence[str], error: BaseException) -> Path | None:
    """Append the traceback of ``error`` to :data:`ERROR_LOG`; ``None`` when it cannot be written."""
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    text = "".join(traceback.format_exception(error))
    try:
        ERROR_LOG.parent.mkdir(parents=True, exist_ok=True)
        with ERROR_LOG.open("a") as fh:
            fh.write(f"--- {stamp} {program} {' '.join(argv)}\n{text}\n")
    except OSError:
        return None
    return ERROR_LOG


def report_input_error(program: str, argv: Sequence[str], error: InputError) -> int:
    """Print ``error`` as ``<program>: error: <message>`` and return :data:`EXIT_BAD_INPUT`.

    The traceback goes to :data:`ERROR_LOG`, and to stderr too when ``argv`` has ``--debug``.
    """
    logger.debug("refused input", exc_info=error)
    where = _log_traceback(program, argv, error)
    if DEBUG_FLAG in argv:
        traceback.print_exception(error, file=sys.stderr)
    hint = f" [traceback: {where}; {DEBUG_FLAG} shows it here]" if where else ""
    lines = str(error).splitlines() or [type(error).__name__]
    for line in lines[:-1]:
        print(f"{program}: error: {line}", file=sys.stderr)
    print(f"{program}: error: {lines[-1]}{hint}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run_stage(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
    """Run a stage script's ``main(argv)``; a refused input exits 2 with one line per problem.

    Parameters
    ----------
    main
        The stage's ``main``; it receives the arguments (``--debug`` included: stage scripts
        accept it through :func:`rosmap_geneformer.params.stage_arguments`).
    argv
        The arguments; ``sys.argv[1:]`` by default.

    Raises
    ------
    SystemExit
        With status 2 on an :class:`InputError`, printed by rank 0 alone under a launcher
        (every rank with ``--debug``). Other exceptions propagate.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    program = Path(inspect.getsourcefile(main) or sys.argv[0]).name
    try:
        main(arguments)
    except InputError as error:
        if _launcher_rank() > 0 and DEBUG_FLAG not in arguments:
            # Every process of a launcher reads the same inputs: rank 0 says it once for all
            # (the launcher names the other ranks that exited with status 2).
            raise SystemExit(EXIT_BAD_INPUT) from None
        raise SystemExit(report_input_error(program, arguments, error)) from None


def _launcher_rank() -> int:
    """This process's ``RANK`` under ``torchrun``/``accelerate launch``; 0 without a launcher."""
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0
