"""User-facing errors: one line naming the problem and the fix, exit code 2, no traceback.

Library code raises :class:`UserError` for mistakes a user can fix (bad paths, bad
values, unsupported models). Command-line entry points wrap their ``main`` with
:func:`cli` so such errors print one line to stderr and exit with status 2, while
genuine bugs still raise with a full traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

__all__ = ["UserError", "cli"]

F = TypeVar("F", bound=Callable[..., int | None])


class UserError(Exception):
    """A mistake in the user's input; the message names the problem and, where there is one, the fix."""


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
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code or 0)

    return wrapper  # type: ignore[return-value]
