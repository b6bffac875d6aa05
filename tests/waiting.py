"""Waiting on a condition in tests with real processes: poll, with a generous bounded timeout,
and fail with what was awaited plus a diagnosis (log tails) instead of a bare timeout."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def wait_until(cond: Callable[[], bool], timeout: float, what: str,
               diag: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{diag()}")
