"""Bulk arrays (global model, updates) next to Flower's messages: the schema both ends share.

Why: Flower 1.42 moves every array through its object store at every hop (ServerApp →
SuperLink → SuperNode → ClientApp and back): one HTTP request per 5 MB chunk, a SHA-256 object
id computed at each hop, protobuf copies, and the SuperLink holding every in-flight array. At
30M parameters × 5 sites that per-byte work, not training, was the round time on a 2-core box
(BENCHMARKS.md), and the in-flight copies were most of the server's RAM. So the Flower message
carries only the pydantic message plus a small :class:`BulkEnvelope`, and the arrays go ONE hop,
site ↔ server, over plain HTTP(S) (``fedseg/server/bulk_server.py``, ``fedseg/client/
bulk_client.py``): the site GETs the global model and PUTs its update.

Access is by capability: every offer and every upload slot has its own random 256-bit token,
and tokens travel only inside Flower messages, i.e. to the authenticated SuperNode the message
is addressed to, over the same TLS (through ``fedseg-server``'s public port, where the fleet
proxy forwards ``/fedseg/bulk/`` and nothing else besides the Fleet API). An upload slot
accepts one body of at most its size limit, once; the server checks the uploaded layout
against what it expects exactly as it checks an inline update. With secure aggregation the
uploaded bytes are the MASKED vector, so the server still sees only sums.

This module is imported by both ends and imports neither.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedseg.protocol.messages import ProtocolError

BULK_RECORD = "bulk"  # ConfigRecord key in a Flower RecordDict
URL_PATH = "/fedseg/bulk/"  # every bulk URL is <base>/fedseg/bulk/<token>
BULK_VERSION = 1


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArraySpec(_M):
    """One named array: key, numpy dtype string (e.g. '<f4'), shape."""

    k: str
    d: str
    s: list[int]

    @property
    def nbytes(self) -> int:
        return int(np.dtype(self.d).itemsize * int(np.prod(self.s, dtype=np.int64)))


class BulkDownload(_M):
    """Server → site: GET ``url`` + ``token`` for ``nbytes`` bytes, the arrays of ``layout`` back to
    back in C order."""

    url: str
    token: str = Field(min_length=32)
    layout: list[ArraySpec]
    nbytes: int


class BulkUploadSlot(_M):
    """Server → site: PUT at most ``max_bytes`` to ``url`` + ``token`` (once)."""

    url: str
    token: str = Field(min_length=32)
    max_bytes: int


class BulkUploaded(_M):
    """Site → server: what the site PUT into its slot."""

    token: str
    layout: list[ArraySpec]
    nbytes: int


class BulkRendezvous(_M):
    """Server → site: a one-step mailbox for the secure-aggregation step that FOLLOWS this
    message (the round's unmask and the next round's share keys). The site long-polls ``GET``
    ``url`` + ``token`` until the server posts the step's :class:`SecAggStepRequest` (JSON),
    then ``PUT``s its :class:`StepAnswer` (JSON, at most ``max_bytes``) once.

    Why: that step is a Flower exchange of its own otherwise — about 1 s on loopback for a few
    kilobytes (the SuperNode's poll, the worker's poll, the server's poll; BENCHMARKS.md), the
    largest part of what secure aggregation added to a round. Through the rendezvous it costs
    one HTTP answer. Same content, same checks at the site, same capability rule as the other
    tokens; a site that does not listen (no long-lived worker) or does not answer in time is
    sent the step as a Flower message after all, which it answers identically."""

    url: str
    token: str = Field(min_length=32)
    max_bytes: int


class BulkEnvelope(_M):
    version: int = BULK_VERSION
    down: BulkDownload | None = None
    up: BulkUploadSlot | None = None
    uploaded: BulkUploaded | None = None
    step: BulkRendezvous | None = None

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


def layout_of(arrays: Mapping[str, np.ndarray]) -> list[ArraySpec]:
    return [ArraySpec(k=k, d=np.asarray(v).dtype.str, s=list(np.shape(v))) for k, v in arrays.items()]


def total_bytes(layout: list[ArraySpec]) -> int:
    return sum(s.nbytes for s in layout)


def _c_order(v: np.ndarray) -> np.ndarray:
    """``v`` in C order, copied only if needed (``np.ascontiguousarray`` would make 0-d 1-d)."""
    a = np.asarray(v)
    return a if a.flags.c_contiguous else a.copy(order="C")


def buffers(arrays: Iterable[np.ndarray]) -> Iterator[memoryview]:
    """Each array's bytes in order, without copies for C-contiguous arrays."""
    for v in arrays:
        a = _c_order(v)
        yield memoryview(a.reshape(-1).view(np.uint8))


def views(buf: np.ndarray, layout: list[ArraySpec]) -> dict[str, np.ndarray]:
    """The arrays of ``layout`` as views into one uint8 buffer (no copies)."""
    if buf.nbytes != total_bytes(layout):
        raise ProtocolError(f"bulk data has {buf.nbytes} bytes, its layout says {total_bytes(layout)}")
    out: dict[str, np.ndarray] = {}
    off = 0
    for s in layout:
        n = s.nbytes
        out[s.k] = buf[off:off + n].view(np.dtype(s.d)).reshape(s.s)
        off += n
    return out


def get_envelope(content) -> BulkEnvelope | None:
    """The :class:`BulkEnvelope` of a Flower ``RecordDict``, if it has one."""
    if BULK_RECORD not in content.config_records:
        return None
    raw = content.config_records[BULK_RECORD].get("json")
    try:
        env = BulkEnvelope.model_validate(json.loads(str(raw)))
    except (ValidationError, ValueError) as err:
        raise ProtocolError(f"bulk envelope does not validate: {err}") from None
    if env.version != BULK_VERSION:
        raise ProtocolError(f"bulk envelope version {env.version}, this fedseg speaks {BULK_VERSION}")
    return env


def put_envelope(content, env: BulkEnvelope) -> None:
    from flwr.app import ConfigRecord

    content[BULK_RECORD] = ConfigRecord({"json": env.to_json()})
