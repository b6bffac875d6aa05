"""Notice within seconds that the ServerApp process died, instead of polling a dead run.

Why: Flower 1.42's SuperExec starts each ``flwr-serverapp`` with a bare ``Popen`` and never
waits for it, so a ServerApp that is killed (OOM killer, SIGKILL) stays a zombie, the run keeps
its "running" status at the SuperLink for a long while, and the supervisor (``fedseg-server``,
``fedseg simulate``) kept polling a job that no longer existed. Here the ServerApp is looked up
among the SuperLink's descendants (``/proc``; a zombie counts as dead); once it has been seen,
its disappearance without the run folder saying the job ended is reported after a short grace
(a ServerApp that ends normally writes status.json first). Where ``/proc`` is missing nothing is
ever seen and the watch stays silent (the supervisor's own timeouts apply).
"""

from __future__ import annotations

import time
from pathlib import Path

from fedseg.runtime.processes import descendants, pid_alive

SERVERAPP_EXE = "flwr-serverapp"
GRACE_S = 5.0  # after the ServerApp is gone, wait this long for the run folder to say why


def _is_serverapp(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return any(Path(a.decode(errors="replace")).name == SERVERAPP_EXE
               for a in raw.split(b"\0")[:3] if a)


class ServerAppWatch:
    """Watches the ServerApp processes under one SuperLink (``check`` once per poll)."""

    def __init__(self, superlink_pid: int | None, grace_s: float = GRACE_S) -> None:
        self.superlink_pid = superlink_pid
        self.grace_s = grace_s
        self.seen: set[int] = set()
        self.gone_since: float | None = None

    def alive(self) -> set[int]:
        """The live ServerApp pids under the SuperLink now (remembered in ``seen``)."""
        if not self.superlink_pid:
            return set()
        live = {p for p in descendants(self.superlink_pid) if _is_serverapp(p) and pid_alive(p)}
        self.seen |= live
        return live

    def check(self) -> str | None:
        """None while a ServerApp runs (or none was seen yet); the reason once the one seen has
        been gone for ``grace_s`` seconds."""
        if self.alive() or not self.seen:
            self.gone_since = None
            return None
        now = time.monotonic()
        if self.gone_since is None:
            self.gone_since = now
        if now - self.gone_since < self.grace_s:
            return None
        pids = ", ".join(str(p) for p in sorted(self.seen))
        return (f"the ServerApp process (pid {pids}) died without ending the job (killed? out "
                "of memory?); its log is the SuperLink's")
