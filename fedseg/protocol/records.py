"""Pack protocol messages (and tensors) into Flower records, and back.

One ``ConfigRecord`` "msg" holds the pydantic message as JSON; one optional ``ArrayRecord``
"arrays" holds named numpy arrays (Flower chunks large arrays into <=5 MB pieces; a bytes value
in a ConfigRecord would not be chunked, which is why tensors never go there).
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedseg.protocol.bulk import get_envelope
from fedseg.protocol.messages import ErrorReply, M, Msg, ProtocolError, decode, encode

LAYOUT_KEY = "__layout__"


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Named arrays as ONE flat array per dtype (plus a small JSON layout), not one Flower
    ``Array`` per tensor.

    Why: Flower moves every ``Array`` (and every <=5 MB chunk of it) as its own HTTP request at
    every hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back), two at a time. A
    U-Net's state dict has ~100 tensors, most of them tiny, so a 1M-parameter model took
    ~200 requests per hop and seconds on a loaded machine; flat, it is one array in
    ceil(bytes / 5 MB) chunks. Build the record ONCE when the same tensors go to many sites
    (the global model): Flower stores content-addressed objects once."""
    layout = []
    groups: dict[str, list[np.ndarray]] = {}
    for k, v in arrays.items():
        a = np.asarray(v)
        layout.append({"k": k, "d": a.dtype.str, "s": list(a.shape)})
        groups.setdefault(a.dtype.str, []).append(a.ravel())
    rec = {f"flat{d}": Array(np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0]))
           for d, parts in groups.items()}
    rec[LAYOUT_KEY] = Array(np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8))
    return ArrayRecord(array_dict=rec, keep_input=True)


def arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The named arrays of an :func:`array_record` (views into its flat arrays, no copies)."""
    if LAYOUT_KEY not in record:
        return {k: a.numpy() for k, a in record.items()}
    layout = json.loads(record[LAYOUT_KEY].numpy().tobytes())
    flats = {k[len("flat"):]: a.numpy() for k, a in record.items() if k.startswith("flat")}
    offsets = dict.fromkeys(flats, 0)
    out: dict[str, np.ndarray] = {}
    for e in layout:
        d, shape = e["d"], tuple(e["s"])
        if d not in flats:
            raise ProtocolError(f"array '{e['k']}': no flat array of dtype {d} in the record")
        n = int(np.prod(shape, dtype=np.int64))
        start = offsets[d]
        if start + n > flats[d].size:
            raise ProtocolError(f"array '{e['k']}': the record's flat {d} array is too short")
        out[e["k"]] = flats[d][start:start + n].reshape(shape)
        offsets[d] = start + n
    if any(offsets[d] != flats[d].size for d in flats):
        raise ProtocolError("the record's flat arrays are longer than its layout says")
    return out


def pack(
    msg: Msg, arrays: dict[str, np.ndarray] | None = None, *, record: ArrayRecord | None = None
) -> RecordDict:
    rd = RecordDict({"msg": ConfigRecord({"json": encode(msg)})})
    if record is not None:
        rd["arrays"] = record
    elif arrays:
        rd["arrays"] = array_record(arrays)
    return rd


def unpack(content: RecordDict, model: type[M]) -> tuple[M, dict[str, np.ndarray]]:
    if "msg" not in content.config_records:
        raise ProtocolError(f"{model.__name__}: message has no 'msg' record")
    msg = decode(content.config_records["msg"].get("json"), model)
    arrays: dict[str, np.ndarray] = {}
    if "arrays" in content.array_records:
        arrays = arrays_of(content.array_records["arrays"])
    return msg, arrays


def payload_bytes(content: RecordDict) -> int:
    """Approximate bytes on the wire (arrays dominate), bulk transfers next to it included."""
    n = 0
    try:
        env = get_envelope(content)
    except ProtocolError:
        env = None
    if env is not None:
        n += (env.down.nbytes if env.down else 0) + (env.uploaded.nbytes if env.uploaded else 0)
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
