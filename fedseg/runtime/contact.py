"""A SuperNode's last successful contact with the server, for ``fedseg-client``'s watchdog.

Why: after a TLS handshake timeout or an HTTP 500 on pull-messages, Flower 1.42's SuperNode was
seen to stay alive without ever reconnecting (12+ minutes silent; its worker loop had ended,
other threads kept the process up), and ``fedseg-client`` restarted only a SuperNode that
EXITED, so the site silently missed the job. A hung process cannot report itself, so the
SuperNode (started through :mod:`fedseg.runtime.supernode`) touches a file on every successful
Fleet API answer (pulls every 0.5 s when idle, and Flower's node heartbeat every ~20 s while
a long task runs), and the supervisor restarts a SuperNode whose file has not moved for
``stall_timeout_s``. That is safe by construction: by then the SuperLink has long counted the
node as gone (two missed heartbeats, ~60 s), so a restart loses nothing that was not lost.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

CONTACT_ENV = "FEDSEG_CONTACT_FILE"
TOUCH_EVERY_S = 1.0  # at most one utime per second, however fast the SuperNode polls


def _touch(path: Path) -> None:
    try:
        os.utime(path, None)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def record_contacts(path: Path) -> bool:
    """In a SuperNode process: touch ``path`` after each successful Fleet API call (Flower's
    ``FleetHttpClient``, heartbeats included). False when Flower's layout is not the expected
    one (flwr is pinned exactly): the watchdog then sees no contact and must be switched off."""
    try:
        from flwr.supernode.fleet_http_client import FleetHttpClient
    except ImportError:
        return False
    inner = getattr(FleetHttpClient, "_unary_unary", None)
    if inner is None:
        return False
    last = [0.0]

    def _unary_unary(self: Any, **kwargs: Any) -> Any:
        result = inner(self, **kwargs)  # raises on a transport error or an HTTP error status
        now = time.monotonic()
        if now - last[0] >= TOUCH_EVERY_S:
            last[0] = now
            try:
                _touch(path)
            except OSError:
                pass
        return result

    FleetHttpClient._unary_unary = _unary_unary  # type: ignore[method-assign]
    _touch(path)  # the process is up: the supervisor counts from its own start time anyway
    return True


class ContactWatch:
    """Supervisor side: has the SuperNode started at ``started`` been silent too long?"""

    def __init__(self, path: Path, stall_s: float) -> None:
        self.path = path
        self.stall_s = stall_s
        self.started = time.time()

    def restart(self) -> None:
        """A new SuperNode process starts now: its silence counts from here."""
        self.started = time.time()

    def last_contact(self) -> float:
        """Wall-clock time of the last successful contact (or of the process start)."""
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            mtime = 0.0
        return max(self.started, mtime)

    def silent_for(self) -> float | None:
        """Seconds without contact when above ``stall_s`` (the SuperNode must be restarted);
        None while it is fine or the watchdog is off (``stall_s`` 0)."""
        if self.stall_s <= 0:
            return None
        silent = time.time() - self.last_contact()
        return silent if silent > self.stall_s else None
