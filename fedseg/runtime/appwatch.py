"""Notice within seconds that the ServerApp process died, instead of polling a dead run.

Why: Flower 1.42's SuperExec starts each ``flwr-serverapp`` with a bare ``Popen`` and never
waits for it, so a ServerApp that is killed (OOM killer, SIGKILL) stays a zombie, the run keeps
its "running" status at the SuperLink for a long while, and the supervisor (``fedseg-server``,
``fedseg simulate``) kept polling a job that no longer existed. Here the ServerApp is looked up
among the SuperLink's descendants (``/proc``, by its command name, which a zombie keeps, so
that even one that died at once is seen); one that is a zombie or gone counts as dead after a
short grace (a ServerApp that ends normally writes status.json first), and none at all within
``STARTUP_S`` is reported too. Where ``/proc`` is missing nothing is ever seen and the watch
stays silent (the supervisor's own timeouts apply).
"""

from __future__ import annotations

import time
from pathlib import Path

from fedseg.runtime.processes import descendants, pid_alive

SERVERAPP_EXE = "flwr-serverapp"
GRACE_S = 5.0  # after the ServerApp is gone, wait this long for the run folder to say why
STARTUP_S = 180.0  # SuperExec starts it within seconds of the submission; this is a busy box's


def _serverapp_state(pid: int) -> str | None:
    """The process state letter (``Z``: zombie) when ``pid`` is a ServerApp, else None. The
    command name (``comm``, the script's name for ``#!`` scripts) survives in a zombie, whose
    cmdline is empty."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = stat[stat.find("(") + 1:stat.rfind(")")]
    state = stat[stat.rfind(")") + 2:].split(" ", 1)[0]
    if comm == SERVERAPP_EXE:
        return state
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    named = any(Path(a.decode(errors="replace")).name == SERVERAPP_EXE
                for a in raw.split(b"\0")[:3] if a)
    return state if named else None


class ServerAppWatch:
    """Watches the ServerApp processes under one SuperLink (``check`` once per poll)."""

    def __init__(self, superlink_pid: int | None, grace_s: float = GRACE_S) -> None:
        self.superlink_pid = superlink_pid
        self.grace_s = grace_s
        self.seen: set[int] = set()
        self.zombies: set[int] = set()
        self.gone_since: float | None = None
        self.created = time.monotonic()

    def alive(self) -> set[int]:
        """The live ServerApp pids under the SuperLink now (all seen are kept in ``seen``,
        the dead ones that are zombies also in ``zombies``)."""
        if not self.superlink_pid:
            return set()
        live: set[int] = set()
        for p in descendants(self.superlink_pid):
            state = _serverapp_state(p)
            if state is None:
                continue
            self.seen.add(p)
            if state == "Z" or not pid_alive(p):
                self.zombies.add(p)
            else:
                live.add(p)
        return live

    def check(self) -> str | None:
        """None while a ServerApp runs; the reason once it is a zombie, has been gone for
        ``grace_s`` seconds, or never appeared within ``STARTUP_S``."""
        live = self.alive()
        now = time.monotonic()
        if not self.superlink_pid or live:
            self.gone_since = None
            return None
        if not self.seen:
            if now - self.created > STARTUP_S:
                return (f"no ServerApp process started within {STARTUP_S:.0f} s of the "
                        "submission")
            return None
        if self.gone_since is None:
            self.gone_since = now
        if now - self.gone_since < self.grace_s:
            return None
        pids = ", ".join(str(p) for p in sorted(self.seen))
        return (f"the ServerApp process (pid {pids}) died without ending the job (killed? out "
                "of memory?); its log is the SuperLink's")
