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


def test_eval_reply_carries_undefined_metrics_as_nan() -> None:
    """A class no validation case has an HD95 (or Dice) for is NaN at the site; it travels as
    JSON null and reads back as NaN, so the round is not lost to a validation error."""
    import math

    from fedseg.protocol import messages as pm
    from fedseg.protocol.records import pack, unpack

    rep = pm.EvalReply(site="a", num_cases=2, dice_per_class={"1": 0.5, "2": math.nan},
                       hd95_per_class={"1": 2.0, "2": math.nan}, seconds=1.0)
    back, _ = unpack(pack(rep), pm.EvalReply)
    assert back.dice_per_class["1"] == 0.5 and math.isnan(back.dice_per_class["2"])
    assert back.hd95_per_class["1"] == 2.0 and math.isnan(back.hd95_per_class["2"])
