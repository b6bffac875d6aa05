"""Fetch the sites' replies from the SuperLink one at a time, with one database call per poll.

Why not ``grid.pull_messages`` (Flower 1.42's ``HttpGrid``): it inflates EVERY ready reply
before returning, so the server would hold all sites' 120 MB updates at once, and a 5xx from the
SuperLink (its SQLite state database answers "database is locked" under load) ends the whole
job with an exception. Here one ``PullMessages`` call per poll asks for all pending replies, the
ready ones are inflated and handed over ONE at a time (the caller folds each into a running sum
before the next is fetched), and a failing call is retried at the next poll. The body follows
Flower's ``HttpGrid.pull_messages`` (flwr is pinned exactly); any other grid falls back to
``grid.pull_messages`` one message id at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import httpx
from flwr.app import Message
from flwr.serverapp import Grid


class PullFailed(Exception):
    """The SuperLink did not answer a pull; ``str()`` says why. Retry at the next poll."""


def pull_ready(grid: Grid, message_ids: Iterable[str]) -> Iterator[Message]:
    """Yield the replies to ``message_ids`` that are ready now, inflated one at a time."""
    ids = list(message_ids)
    if not ids:
        return
    try:
        from flwr.superlink.grid.http_grid import HttpGrid
    except ImportError:  # pragma: no cover - flwr is pinned
        HttpGrid = None  # type: ignore[assignment,misc]  # noqa: N806
    if HttpGrid is None or not isinstance(grid, HttpGrid):
        for mid in ids:
            yield from grid.pull_messages([mid])
        return
    yield from _pull_http(grid, ids)


def _pull_http(grid: Any, ids: list[str]) -> Iterator[Message]:
    from flwr.app import Metadata
    from flwr.app.error import Error
    from flwr.app.message import make_message
    from flwr.common.constant import ErrorCode
    from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=E0611
    from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
    from flwr.supercore.date import now
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
    from flwr.supercore.inflatable.inflatable_utils import (
        ObjectPullError,
        inflate_object_from_contents,
        pull_objects,
    )

    client = grid._runtime_client
    run_id = grid.run.run_id
    try:
        res = client.PullMessages(PullAppMessagesRequest(message_ids=ids))
    except (httpx.HTTPStatusError, httpx.TransportError) as err:
        raise PullFailed(f"SuperLink pull-messages failed: {err}") from None
    for msg_proto, tree in zip(res.messages_list, res.message_object_trees, strict=True):
        msg_id = msg_proto.metadata.message_id
        reply_to = msg_proto.metadata.reply_to_message_id
        try:
            contents = pull_objects(
                object_ids=[t.object_id for t in iterate_object_tree(tree)],
                pull_object_fn=make_pull_object_fn_protobuf(
                    pull_object_protobuf=client.PullObject, node=grid.node, run_id=run_id),
            )
            client.ConfirmMessageReceived(ConfirmMessageReceivedRequest(
                node=grid.node, run_id=run_id, message_object_id=msg_id))
        except (ObjectPullError, httpx.HTTPStatusError, httpx.TransportError) as err:
            # the reply was announced but its arrays cannot be fetched: an error reply, so
            # the site is logged as dropped with the reason instead of the job failing
            yield make_message(
                metadata=Metadata(
                    run_id=run_id, message_id="", src_node_id=grid.node.node_id,
                    dst_node_id=grid.node.node_id, message_type=SYSTEM_MESSAGE_TYPE,
                    group_id="", ttl=0, reply_to_message_id=reply_to,
                    created_at=now().timestamp()),
                error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE,
                            reason=f"the reply's arrays could not be fetched: {err}"),
            )
            continue
        message = inflate_object_from_contents(msg_id, contents)
        del contents
        message.metadata.__dict__["_message_id"] = msg_id
        yield message
        del message
