"""``fedseg-client``'s connection doctor: says WHY the site is not connected, once per reason.

Why: the supervisor's own output used to stop at ``connecting to HOST:PORT`` while the
SuperNode's log repeated ``Connection attempt failed`` without a reason. The doctor probes the
server address when the client starts (:func:`fedseg.client.probe.probe`: DNS, TCP, TLS
against the site's CA, fedseg-server's public port or a bare SuperLink), and again — at most
every ``REPROBE_S`` — whenever the SuperNode's log shows new failed attempts or the SuperNode
exited; it also reads from that log what no probe can see (the server refused the site's key).
Each finding is printed as ONE line, only when it changes, so a site that retries for an hour
while the server is down says it once, and says so again when the reason changes; after a
problem it probes every ``REPROBE_S`` until the server is found, and says that too
(``... is fedseg-server's public port``). Probes run in a thread: the
supervisor's loop never waits on the network.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from fedseg.client.probe import Finding, auth_finding, probe

REPROBE_S = 10.0
FAILED_ATTEMPT = "Connection attempt failed"
PREFIX = "fedseg-client: "


class ConnectionDoctor:
    """Probe at start and after failures; :meth:`tick` (from the supervisor's loop) prints new
    findings and returns a fatal one (the caller stops with it)."""

    def __init__(self, server: str, ca_file: str | None, insecure: bool, source: str,
                 site: str, supernode_log: Path, reprobe_s: float = REPROBE_S) -> None:
        self.server, self.ca_file, self.insecure = server, ca_file, insecure
        self.source, self.site, self.log = source, site, supernode_log
        self.reprobe_s = reprobe_s
        self._offset = 0
        self._result: Finding | None = None
        self._thread: threading.Thread | None = None
        self._last_probe = -1e9
        self._said: str | None = None
        self._refused = False
        self._bad = False  # the last line said was a problem
        self._ended = ""  # the job that ended (then a server that is gone is no surprise)
        self._lock = threading.Lock()

    def start(self) -> None:
        """First probe now (the SuperNode starts meanwhile)."""
        self._offset = _size(self.log)
        self._probe()

    def _probe(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._last_probe = time.monotonic()

        def run() -> None:
            finding = probe(self.server, self.ca_file, self.insecure, self.source)
            with self._lock:
                self._result = finding

        self._thread = threading.Thread(target=run, name="fedseg-probe", daemon=True)
        self._thread.start()

    def job_ended(self, job_id: str) -> None:
        """The server said its job ended: it may now stop; later lines say so."""
        self._ended = job_id

    def supernode_exited(self) -> None:
        """The SuperNode ended (it gives up on TLS errors and refused keys): look again."""
        self._read_log(force_probe=True)

    def tick(self) -> Finding | None:
        """Print what is new; a fatal finding is returned (and printed by the caller)."""
        self._read_log()
        with self._lock:
            finding, self._result = self._result, None
        if finding is None:
            return None
        if finding.fatal:
            return finding
        self._say(finding)
        return None

    def _read_log(self, force_probe: bool = False) -> None:
        size = _size(self.log)
        if size < self._offset:  # rotated / truncated
            self._offset = 0
        new = ""
        if size > self._offset:
            try:
                with self.log.open("rb") as f:
                    f.seek(self._offset)
                    new = f.read(size - self._offset).decode("utf-8", "replace")
            except OSError:
                return
            self._offset = size
        refused = auth_finding(new, self.site)
        if refused is not None:
            self._say(refused)
            return
        # after a problem was said, look again until the server is found (then say that once)
        unresolved = self._bad and not self._refused
        failing = force_probe or FAILED_ATTEMPT in new or unresolved
        if failing and time.monotonic() - self._last_probe >= self.reprobe_s:
            self._probe()

    def _say(self, finding: Finding) -> None:
        if finding.line == self._said or (finding.ok and self._refused):
            return  # a reachable server does not undo its refusal of the key
        self._said = finding.line
        self._bad = not finding.ok
        self._refused = self._refused or finding.kind == "auth"
        out = sys.stdout if finding.ok else sys.stderr
        tag = "" if finding.ok else f"cannot connect ({finding.kind}): "
        note = (f" (job '{self._ended}' ended; waiting for the next job or a resume)"
                if self._ended and not finding.ok else "")
        print(PREFIX + tag + finding.line + note, file=out, flush=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
