"""``flower-supernode`` with fedseg's shorter waits: ``python -m fedseg.runtime.supernode ARGS``.

Runs Flower's own ``flower-supernode`` entry point unchanged, after
:mod:`fedseg.runtime.flower_latency` has capped the SuperNode loop's hard-coded 3 s idle poll
and the object-pull backoff (why: see that module). ``fedseg-client`` and ``fedseg simulate``
start every site's SuperNode this way. With ``FEDSEG_CONTACT_FILE`` set, every successful
contact with the server touches that file (:mod:`fedseg.runtime.contact`: fedseg-client's
watchdog restarts a SuperNode that stays silent). Flower logs the REASON of a failed
connection attempt only at DEBUG (``Connection attempt failed with exception: ...``, under the
WARNING ``Connection attempt failed, retrying in N seconds``); :func:`log_failure_reasons`
raises that record to WARNING, so the SuperNode's log says why (issue #16).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from fedseg.runtime.contact import CONTACT_ENV, record_contacts
from fedseg.runtime.flower_latency import fast_object_pulls, fast_supernode_poll


def launcher_argv(argv: list[str]) -> list[str]:
    """``supernode_argv(...)`` (which starts with ``flower-supernode``) run through this module."""
    if not argv or argv[0] != "flower-supernode":
        raise ValueError(f"not a flower-supernode command line: {argv[:1]}")
    return [sys.executable, "-m", "fedseg.runtime.supernode", *argv[1:]]


REASON_PREFIX = "Connection attempt failed with exception"  # flwr/supercore/retry/http_retry.py


class _ReasonToWarning(logging.Filter):
    """Flower's DEBUG record of a failed attempt's exception, as a WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and str(record.msg).startswith(REASON_PREFIX):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def log_failure_reasons() -> None:
    """Show why each connection attempt failed (see the module docstring)."""
    logging.getLogger("flwr").addFilter(_ReasonToWarning())


def main() -> None:
    if not (fast_supernode_poll() and fast_object_pulls()):
        print("[fedseg] Flower's SuperNode layout differs from flwr 1.42.0; running it with "
              "its own poll intervals", file=sys.stderr, flush=True)
    contact = os.environ.get(CONTACT_ENV)
    if contact and not record_contacts(Path(contact)):  # fedseg-client's watchdog
        print("[fedseg] Flower's SuperNode layout differs from flwr 1.42.0; its contacts are "
              "not recorded (set stall_timeout_s = 0)", file=sys.stderr, flush=True)
    log_failure_reasons()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
