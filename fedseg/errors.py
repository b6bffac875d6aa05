"""User-facing errors.

Why: anything a hospital engineer can cause (a bad path, a broken NIfTI, a wrong config value)
must end in ONE clear line naming the file/field and what to do, never a traceback from deep
inside a library. Code raises :class:`FedsegError` with such a line; the CLIs catch it, print
it to stderr and exit non-zero.
"""

from __future__ import annotations


class FedsegError(Exception):
    """An error the user can fix; ``str(err)`` is the one-line message shown to them."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
