"""Messages validate at both ends and survive the Flower record round trip."""

from __future__ import annotations

import numpy as np
import pytest

from fedseg.protocol import messages as pm
from fedseg.protocol.records import pack, pack_error, unpack


def test_round_trip_with_arrays() -> None:
    ev = pm.EvalReply(site="a", num_cases=2, dice_per_class={"1": 0.5}, hd95_per_class={"1": 3.0},
                      seconds=1.0)
    msg = pm.TrainReply(site="a", num_cases=3, iterations=5, loss=0.4, seconds=2.0,
                        iterations_per_s=2.5, evaluation=ev)
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    back, arrays = unpack(pack(msg, {"d/w": arr}), pm.TrainReply)
    assert back == msg
    np.testing.assert_array_equal(arrays["d/w"], arr)


def test_wrong_schema_and_version_are_refused() -> None:
    rd = pack(pm.PrepareReply(site="a", num_cases=1, seconds=0.1))
    with pytest.raises(pm.ProtocolError, match="TrainReply"):
        unpack(rd, pm.TrainReply)
    rd = pack(pm.PrepareReply(site="a", num_cases=1, seconds=0.1, version=99))
    with pytest.raises(pm.ProtocolError, match="protocol version 99"):
        unpack(rd, pm.PrepareReply)


def test_error_reply_is_marked() -> None:
    rd = pack_error(pm.ErrorReply(site="b", kind="data", message="x: bad"))
    assert "error" in rd.config_records
    err, _ = unpack(rd, pm.ErrorReply)
    assert err.message == "x: bad"
