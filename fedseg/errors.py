"""User-facing errors.

Why: anything a hospital engineer can cause (a bad path, a broken NIfTI, a wrong config value)
must end in ONE clear line naming the file/field and what to do, never a traceback from deep
inside a library. Code raises :class:`FedsegError` with such a line; the CLIs catch it, print
it to stderr and exit non-zero.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class FedsegError(Exception):
    """An error the user can fix; ``str(err)`` is the one-line message shown to them."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def first_error(err: Exception) -> tuple[str, str]:
    """(dotted field path, one-line message) of a pydantic ``ValidationError``'s first error.

    Shared by every loader that turns a schema violation into a :class:`FedsegError` line.
    """
    errors = err.errors()  # type: ignore[attr-defined]
    first = errors[0]
    field = ".".join(str(x) for x in first["loc"]) or "(root)"
    msg = " ".join(str(first["msg"]).removeprefix("Value error, ").split())
    return field, msg


def run_cli(prog: str, command: Callable[[], int | None], interrupt_code: int | None = None) -> int:
    """Run a CLI command: a :class:`FedsegError` becomes ``PROG: error: LINE`` on stderr and its
    exit code; with ``interrupt_code`` set, Ctrl-C becomes ``PROG: interrupted`` and that code."""
    try:
        return int(command() or 0)
    except FedsegError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        if interrupt_code is None:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return interrupt_code
