"""``flower-supernode`` with fedseg's shorter waits: ``python -m fedseg.runtime.supernode ARGS``.

Runs Flower's own ``flower-supernode`` entry point unchanged, after
:mod:`fedseg.runtime.flower_latency` has capped the SuperNode loop's hard-coded 3 s idle poll
and the object-pull backoff (why: see that module). ``fedseg-client`` and ``fedseg simulate``
start every site's SuperNode this way. With ``FEDSEG_CONTACT_FILE`` set, every successful
contact with the server touches that file (:mod:`fedseg.runtime.contact`: fedseg-client's
watchdog restarts a SuperNode that stays silent).
"""

from __future__ import annotations

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


def main() -> None:
    if not (fast_supernode_poll() and fast_object_pulls()):
        print("[fedseg] Flower's SuperNode layout differs from flwr 1.42.0; running it with "
              "its own poll intervals", file=sys.stderr, flush=True)
    contact = os.environ.get(CONTACT_ENV)
    if contact and not record_contacts(Path(contact)):  # fedseg-client's watchdog
        print("[fedseg] Flower's SuperNode layout differs from flwr 1.42.0; its contacts are "
              "not recorded (set stall_timeout_s = 0)", file=sys.stderr, flush=True)
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
