"""What a crashed ``fedseg-server`` may leave behind, found from its pid files and stopped.

Why: the SuperLink runs in its own session (so that it and Flower's SuperExec and ServerApp can
be stopped as a group), so a SIGKILL of ``fedseg-server`` used to leave all three running and
the SuperLink listening on its port: ``resume`` then failed with "Address already in use",
``status`` said nothing was running and ``stop`` only removed the pid file. Since
:func:`fedseg.runtime.processes.parent_death_preexec` the kernel stops the SuperLink when the
server dies (Linux); this module is the fallback (other platforms, a SuperLink started by an
older version, a kill that raced the start) and what lets ``status`` tell the truth.

A pid file can be stale and its pid reused by any process, so a pid counts as our SuperLink
only if ``/proc/PID`` shows a live ``flower-superlink`` whose working directory is this state
folder (``fedseg-server`` starts it there).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from fedseg.runtime.processes import descendants, pid_alive

SUPERLINK_PID = "superlink.pid"
SERVER_PID = "server.pid"


def read_pid(path: Path) -> int | None:
    """The pid in ``path``; None when missing or not a number."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def cmdline(pid: int) -> list[str]:
    """``/proc/PID/cmdline`` as a list ([] when unreadable or gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def is_our_superlink(pid: int, state: Path) -> bool:
    """True when ``pid`` is a live ``flower-superlink`` started for ``state`` (its cwd)."""
    if pid <= 1 or pid == os.getpid() or not pid_alive(pid):
        return False
    if not any(Path(a).name == "flower-superlink" for a in cmdline(pid)[:3]):
        return False
    cwd = _cwd(pid)
    return cwd is not None and Path(cwd) == state.resolve()


def stale_superlink(state: Path) -> int | None:
    """pid of a SuperLink of ``state`` that outlived its ``fedseg-server`` (None: none)."""
    pid = read_pid(state / SUPERLINK_PID)
    return pid if pid is not None and is_our_superlink(pid, state) else None


def stop_tree(pid: int, timeout: float = 15.0) -> set[int]:
    """SIGTERM ``pid``'s process group and every descendant (Flower starts SuperExec in a new
    session), SIGKILL what is left after ``timeout``; returns the pids that were signalled."""
    tree = descendants(pid) | {pid}
    try:
        os.killpg(pid, signal.SIGTERM)  # the SuperLink leads its own session
    except (ProcessLookupError, PermissionError):
        pass
    for p in tree:
        try:
            os.kill(p, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in tree):
        time.sleep(0.1)
    for p in tree:
        if pid_alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(pid_alive(p) for p in tree):
        time.sleep(0.1)
    return tree


def stop_orphans(state: Path, say: Callable[[str], None] | None = None) -> int | None:
    """Stop the SuperLink (and its children) that a dead ``fedseg-server`` of ``state`` left;
    removes the stale pid file. Returns the SuperLink's pid, or None when there was none.
    The caller has checked that no live ``fedseg-server`` owns ``state``."""
    pid = stale_superlink(state)
    if pid is not None:
        tree = stop_tree(pid)
        if say is not None:
            say(f"fedseg-server: stopped the SuperLink (pid {pid}) and {len(tree) - 1} "
                f"process(es) under it, left running by a fedseg-server that died")
    (state / SUPERLINK_PID).unlink(missing_ok=True)
    return pid


def orphan_note(state: Path) -> str | None:
    """For ``status``: one line when a dead server's SuperLink still runs, else None."""
    pid = stale_superlink(state)
    if pid is None:
        return None
    return (f"the SuperLink (pid {pid}) of a fedseg-server that died still runs; "
            "'fedseg-server stop RUN_DIR' or 'resume' stops it")
