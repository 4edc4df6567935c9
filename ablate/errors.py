"""User-facing errors: one line naming the problem and the fix, exit code 2, no traceback.

Library code raises :class:`UserError` for mistakes a user can fix (bad paths, bad
values, unsupported models). Command-line entry points wrap their ``main`` with
:func:`cli` so such errors print one line to stderr and exit with status 2, while
genuine bugs still raise with a full traceback.
"""

from __future__ import annotations

import errno
import functools
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["UserError", "cli", "first_line", "one_line", "disk_full", "disk_full_message"]

F = TypeVar("F", bound=Callable[..., int | None])


class UserError(Exception):
    """A mistake in the user's input; the message names the problem and, where there is one, the fix."""


def disk_full(exc: BaseException) -> bool:
    """True for the errors of a full disk or an exhausted quota: the machine's, not the input's."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(exc: OSError) -> str:
    """``no space left ... writing F (N MB free there)``: where, how much is left, and what to do."""
    where = Path(exc.filename) if exc.filename else None
    probe = where
    while probe is not None and not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = f" ({shutil.disk_usage(probe).free / 1e6:,.0f} MB free there)" if probe is not None else ""
    return (f"no space left on the device writing {where or 'a file'}{free}; free space or choose another --out, "
            "then rerun the same command (finished work is kept)")


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when it has none), at most ``limit`` characters.

    For wrapping a library's error into a :class:`UserError`: a library message may run over many
    lines (a traceback-like report, a list of every missing key), and a user error is one line.
    """
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


def one_line(exc: BaseException, limit: int = 500, *, with_type: bool = False) -> str:
    """The whole message of an exception on one line (whitespace runs become one space).

    ``with_type`` puts the exception's type first (``ValueError: ...``): the form a trial's
    recorded failure reason takes, where the type tells a bug from a bad value.
    """
    text = " ".join(str(exc).split())
    if with_type:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return (text or type(exc).__name__)[:limit]


def _line(text: str) -> None:
    """Write one line to stderr in a single write.

    ``print`` writes the text and the newline separately, and under ``PYTHONUNBUFFERED=1`` each
    becomes its own write(2): the ranks of a torchrun then interleave their error lines on one
    pipe. A single write under PIPE_BUF bytes is atomic, so every rank's line stays whole.
    """
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def cli(main: F) -> F:
    """Decorate a CLI ``main``: a :class:`UserError` becomes ``error: <message>`` and exit code 2.

    Ctrl-C exits with 130 and a one-line note instead of a traceback.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            code = main(*args, **kwargs)
        except UserError as exc:
            message = " ".join(str(exc).split())  # one line, whatever the message held
            _line(f"error: {message}")
            sys.exit(2)
        except KeyboardInterrupt:
            _line("interrupted")
            sys.exit(130)
        except OSError as exc:
            if not disk_full(exc):
                raise
            _line(f"error: {disk_full_message(exc)}")
            sys.exit(2)
        sys.exit(code or 0)

    return wrapper  # type: ignore[return-value]
