"""One exchange's outgoing arrays and incoming uploads, whichever way they travel.

Why a class: a phase that ships the global model (train, evaluate; plain or secure) needs the
same four steps — make each site's message, drop the server's copy once pushed, read each
reply's arrays, clean up — and they differ by transport (``JobConfig.bulk_transport``):

- ``http`` (default): the model is OFFERED once by the ServerApp's bulk server (no copy; sites
  GET it), each site gets its own upload slot, and a reply's arrays are read from the spool
  file one tensor at a time (``fedseg/server/bulk_server.py``). A reply may only name the slot
  that was given to the site it comes from.
- ``flower``: one ``ArrayRecord`` of the model shared by every site's message (Flower stores it
  once), dropped by the server as soon as the messages are pushed; replies carry their arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict

from fedseg.protocol import messages as pm
from fedseg.protocol.bulk import (
    BulkEnvelope,
    BulkRendezvous,
    BulkUploadSlot,
    get_envelope,
    put_envelope,
)
from fedseg.protocol.records import array_record, pack, unpack
from fedseg.server.bulk_server import BulkServer


class Outbox:
    def __init__(self, bulk: BulkServer | None, arrays: Mapping[str, np.ndarray] | None,
                 upload_bytes: int | None = None) -> None:
        """``arrays``: what every site gets (the global model); ``upload_bytes``: the most a
        site's reply may upload (None: replies carry no arrays)."""
        self.bulk = bulk
        self.upload_bytes = upload_bytes
        self._down = bulk.offer(arrays) if bulk is not None and arrays is not None else None
        self._record = array_record(dict(arrays)) if bulk is None and arrays is not None else None
        self._slots: dict[int, BulkUploadSlot] = {}

    def content(self, nid: int, msg: pm.Msg, step: BulkRendezvous | None = None) -> RecordDict:
        """``step``: a rendezvous for the step that follows this message (secure rounds'
        unmask), named in the envelope; only with the ``http`` transport."""
        if self.bulk is None:
            return pack(msg, record=self._record)
        rd = pack(msg)
        up = None
        if self.upload_bytes is not None:
            up = self._slots[nid] = self.bulk.slot(self.upload_bytes)
        if self._down is not None or up is not None or step is not None:
            put_envelope(rd, BulkEnvelope(down=self._down, up=up, step=step))
        return rd

    def content_for(self, msg_for: Callable[[int], pm.Msg]) -> Callable[[int], RecordDict]:
        return lambda nid: self.content(nid, msg_for(nid))

    def pushed(self) -> None:
        """The messages are with the SuperLink: the server's extra copy of the model can go."""
        self._record = None

    def unpack(self, nid: int, reply: Message, model: type[pm.M]) -> tuple[pm.M, Mapping[str, Any]]:
        """The reply's message and arrays (:class:`pm.ProtocolError` if either is bad)."""
        rep, arrays = unpack(reply.content, model)
        env = get_envelope(reply.content)
        if env is None or env.uploaded is None:
            return rep, arrays
        slot = self._slots.get(nid)
        if self.bulk is None or slot is None or env.uploaded.token != slot.token:
            raise pm.ProtocolError("the reply names a bulk upload that was not this site's")
        return rep, self.bulk.take(env.uploaded)

    def done(self, nid: int) -> None:
        """This site's reply is folded in: delete its upload."""
        slot = self._slots.pop(nid, None)
        if self.bulk is not None and slot is not None:
            self.bulk.close_slot(slot.token)

    def close(self) -> None:
        """The exchange is over: withdraw the offer, delete what nobody folded."""
        self._record = None
        if self.bulk is not None:
            self.bulk.withdraw(self._down)
            for nid in list(self._slots):
                self.done(nid)


def strip_prefix(arrays: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    """``arrays`` whose key starts with ``prefix``, keyed without it (lazily for spooled uploads)."""
    if hasattr(arrays, "strip"):
        return arrays.strip(prefix)  # type: ignore[no-any-return, attr-defined]
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def model_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).nbytes for v in arrays.values()))
