"""``fedseg ARGS`` run in the test's own process: ``fedseg.cli.main`` with the console script's
parser and error handling, without paying a fresh torch import per command (tests that chain
plan → train → predict on tiny data would otherwise spend most of their time importing)."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def fedseg(*args: str) -> Result:
    from fedseg.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    assert "Traceback" not in err.getvalue(), err.getvalue()
    return Result(code, out.getvalue(), err.getvalue())
