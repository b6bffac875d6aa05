"""Pack protocol messages (and tensors) into Flower records, and back.

One ``ConfigRecord`` "msg" holds the pydantic message as JSON; one optional ``ArrayRecord``
"arrays" holds named numpy arrays (Flower chunks large arrays into <=5 MB pieces; a bytes value
in a ConfigRecord would not be chunked, which is why tensors never go there).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedseg.protocol.messages import ErrorReply, M, Msg, ProtocolError, decode, encode


def pack(msg: Msg, arrays: dict[str, np.ndarray] | None = None) -> RecordDict:
    rd = RecordDict({"msg": ConfigRecord({"json": encode(msg)})})
    if arrays:
        rd["arrays"] = ArrayRecord(
            array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()},
            keep_input=True,
        )
    return rd


def unpack(content: RecordDict, model: type[M]) -> tuple[M, dict[str, np.ndarray]]:
    if "msg" not in content.config_records:
        raise ProtocolError(f"{model.__name__}: message has no 'msg' record")
    msg = decode(content.config_records["msg"].get("json"), model)
    arrays: dict[str, np.ndarray] = {}
    if "arrays" in content.array_records:
        for k, a in content.array_records["arrays"].items():
            arrays[k] = a.numpy()
    return msg, arrays


def payload_bytes(content: RecordDict) -> int:
    """Approximate bytes on the wire (arrays dominate)."""
    n = 0
    for rec in content.array_records.values():
        n += rec.count_bytes()
    for rec in content.config_records.values():
        n += rec.count_bytes()
    return n


def pack_error(err: ErrorReply) -> RecordDict:
    """A site-side failure: the message plus an "error" marker record."""
    rd = pack(err)
    rd["error"] = ConfigRecord({"kind": err.kind})
    return rd
