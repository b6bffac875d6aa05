"""One message per site and the replies as they come: how every phase of the job talks to the sites.

Why not ``grid.send_and_receive``: it sleeps 3 s between polls, inflates every ready reply at
once and fails the job on one SuperLink error. Here the SuperLink is asked every ``POLL_S`` (one
call for all pending replies) and the ready replies are fetched one at a time
(``server/replies.py``), so a round ends a fraction of a second after its last site, and the
server holds at most ONE site's update in memory at a time (callers fold it into a running sum
and drop it): the server's peak RAM does not grow with the number of sites.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedseg.errors import FedsegError
from fedseg.protocol import messages as pm
from fedseg.protocol.records import payload_bytes, unpack
from fedseg.server.replies import PullFailed, pull_ready

Log = Callable[[str], None]

POLL_S = 0.25  # how often the server asks the SuperLink for replies (Flower's own loop: 3 s)
MAX_PULL_FAILURES = 120  # consecutive failed pulls (about a minute) before the job gives up

_FLOWER_ERRORS = {v: k for k, v in vars(ErrorCode).items() if isinstance(v, int)}


class Messenger:
    """The job's messages over Flower's ``Grid``; ``sent_bytes``: the last exchange's payload
    size per node id (the per-site train records report it)."""

    def __init__(self, grid: Grid, log: Log) -> None:
        self.grid = grid
        self.log = log
        self.sent_bytes: dict[int, int] = {}

    def send(self, node_ids: Iterable[int], mtype: str, content_for: Callable[[int], Any],
             timeout: float) -> dict[int, Message]:
        """Send one message per node; the replies that came before ``timeout``, by node id."""
        out: dict[int, Message] = {}

        def keep(nid: int, reply: Message) -> None:
            out[nid] = reply

        self.exchange(node_ids, mtype, content_for, timeout, keep)
        return out

    def exchange(
        self, node_ids: Iterable[int], mtype: str, content_for: Callable[[int], Any],
        timeout: float, on_reply: Callable[[int, Message], None],
        after_push: Callable[[], None] | None = None,
    ) -> set[int]:
        """Send one message per node and hand each reply to ``on_reply`` AS IT ARRIVES (module
        docstring); returns the node ids that replied before ``timeout``."""
        msgs = []
        sent_bytes: dict[int, int] = {}
        node_ids = list(node_ids)
        for nid in node_ids:
            content = content_for(nid)
            sent_bytes[nid] = payload_bytes(content)
            # TTL a little past the timeout: an instruction nobody picked up in time expires at
            # the SuperLink instead of being run by a site that reconnects hours later
            msgs.append(Message(content=content, dst_node_id=nid, message_type=mtype,
                                ttl=timeout + 60.0))
        self.sent_bytes = sent_bytes
        ids = list(self.grid.push_messages(msgs))
        del msgs
        if after_push is not None:
            after_push()
        # Match replies to nodes by the instruction they answer: the error reply the SuperLink
        # makes for a dead node (NODE_UNAVAILABLE) comes FROM the SuperLink, not from the node.
        pending = {mid: nid for mid, nid in zip(ids, node_ids, strict=True) if mid}
        replied: set[int] = set()
        deadline = time.monotonic() + timeout
        failures = 0
        while pending and time.monotonic() < deadline:
            got = False
            try:
                for reply in pull_ready(self.grid, list(pending)):
                    nid = pending.pop(reply.metadata.reply_to_message_id, None)
                    if nid is None:
                        continue
                    got = True
                    replied.add(nid)
                    on_reply(nid, reply)
                    del reply
                failures = 0
            except PullFailed as err:  # e.g. SQLite "database is locked" under load: retry
                failures += 1
                if failures >= MAX_PULL_FAILURES:
                    raise FedsegError(f"{mtype}: the SuperLink failed {failures} pulls in a row; "
                                      f"last: {err}") from None
                self.log(f"{mtype}: {err} (retrying)")
            if pending and not got:
                time.sleep(POLL_S)
        return replied


def reply_error(reply: Message | None) -> str | None:
    """Why a site's reply is no answer (none in time, Flower's error, the site's ErrorReply)."""
    if reply is None:
        return "no reply before the timeout"
    if reply.has_error():
        code = _FLOWER_ERRORS.get(reply.error.code, str(reply.error.code))
        return f"Flower error {code}: {reply.error.reason}"
    if "error" in reply.content.config_records:
        err, _ = unpack_error(reply)
        return f"{err.kind} error at the site: {err.message}"
    return None


def unpack_error(reply: Message) -> tuple[pm.ErrorReply, dict]:
    return unpack(reply.content, pm.ErrorReply)  # type: ignore[return-value]
