"""Tell every connected site that the job ended (:mod:`fedseg.protocol.job_end`).

Called by the ServerApp (``server/app.py``) after the job finished or failed, before the Flower
run ends: the notice goes to every node the SuperLink has online (enrolled or refused alike: a
refused site also waits for nothing any more) and the acknowledgements are awaited for at most
``timeout`` seconds, so that a site that is gone delays the server's exit by that much, never
more. Nothing here can fail the job: a site that cannot be told just is not told.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import Message
from flwr.serverapp import Grid

from fedseg.protocol.job_end import JOB_END, JobEnd
from fedseg.protocol.records import pack
from fedseg.server.replies import PullFailed, pull_ready

TIMEOUT_S = 20.0
POLL_S = 0.25


def notify_sites(grid: Grid, notice: JobEnd, log: Callable[[str], None],
                 timeout: float = TIMEOUT_S) -> int:
    """Send ``notice`` to every online node; the number that acknowledged in time."""
    try:
        nodes = sorted(grid.get_node_ids())
        if not nodes:
            return 0
        msgs = [Message(content=pack(notice), dst_node_id=n, message_type=JOB_END,
                        ttl=timeout + 60.0) for n in nodes]
        pending = {mid for mid in grid.push_messages(msgs) if mid}
        acked = 0
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            got = False
            try:
                for reply in pull_ready(grid, list(pending)):
                    pending.discard(reply.metadata.reply_to_message_id)
                    got = True
                    acked += 0 if reply.has_error() else 1
            except PullFailed:  # e.g. "database is locked": the next poll
                pass
            if pending and not got:
                time.sleep(POLL_S)
        log(f"job {notice.state}: told {acked} of {len(nodes)} connected site(s)")
        return acked
    except Exception as err:  # the job's outcome is already recorded; this is a courtesy
        log(f"job {notice.state}: could not tell the sites ({err!r})")
        return 0
