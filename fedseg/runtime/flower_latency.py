"""Shorter waits inside Flower 1.42, for the processes fedseg runs.

Why hand-written: measured on loopback, most of a small round's time in Flower 1.42 is spent
SLEEPING, not working, and none of these waits has a flag or an environment variable:

* Objects (a message's arrays) are fetched with exponential backoff starting at 1 s and capped
  at 10 s (``supercore/inflatable/inflatable_utils.py``: ``pull_objects`` and
  ``pull_and_inflate_object_from_tree``). A message is announced before its arrays are uploaded,
  so the receiver's first try usually misses, and then waits 1, 2, 4, 8 s — 7 to 16 s per hop
  were seen for a 4 MB model at each site. Here: start at 50 ms, cap at 0.5 s.
* The SuperNode asks the SuperLink for new messages every 3 s and for its ClientApp's reply every
  0.5 s (hard-coded sleeps in ``supernode/start_client_internal.py``). Here: capped at 0.5 s.

Every patch is applied only when Flower's module layout is the expected one (flwr is pinned
exactly); otherwise it is skipped and Flower's own timings apply. The extra requests they cause
are cheap "not yet" answers on a local or consortium link.
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

PULL_INITIAL_BACKOFF_S = 0.05
PULL_BACKOFF_CAP_S = 0.5
SUPERNODE_POLL_S = 0.5


def fast_object_pulls(initial: float = PULL_INITIAL_BACKOFF_S, cap: float = PULL_BACKOFF_CAP_S) -> bool:
    """Make this process's object pulls retry after ``initial`` s, doubling up to ``cap``."""
    try:
        from flwr.supercore.inflatable import inflatable_utils as iu
    except ImportError:
        return False
    done = False
    for fn in (getattr(iu, "pull_objects", None), getattr(iu, "pull_and_inflate_object_from_tree", None)):
        kw = getattr(fn, "__kwdefaults__", None)
        if kw and "initial_backoff" in kw and "backoff_cap" in kw:
            kw["initial_backoff"] = initial
            kw["backoff_cap"] = cap
            done = True
    return done


class _CappedSleepTime:
    """Stands in for the ``time`` module inside Flower's SuperNode loop only."""

    def __init__(self, real: ModuleType, cap: float) -> None:
        self._real = real
        self._cap = cap

    def sleep(self, seconds: float) -> None:
        self._real.sleep(min(float(seconds), self._cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def fast_supernode_poll(cap: float = SUPERNODE_POLL_S) -> bool:
    """Cap the sleeps of the SuperNode's main loop at ``cap`` seconds (in this process)."""
    try:
        from flwr.supernode import start_client_internal as sci
    except ImportError:
        return False
    if getattr(sci, "time", None) is not time:
        return False
    sci.time = _CappedSleepTime(time, cap)  # type: ignore[attr-defined]
    return True
