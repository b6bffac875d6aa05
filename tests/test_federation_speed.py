"""The pieces that make a fedseg round cheap: flat array records, the running mean, Flower's
shortened waits, and the site worker's bundle check. End to end they run in every federation
test (``fedseg simulate`` starts every site with a worker and the fast-poll SuperNode)."""

from __future__ import annotations

import io
import time
import zipfile

import numpy as np
import pytest

from fedseg.client.worker import FEDSEG_CLIENTAPP, _check_fab
from fedseg.protocol import messages as pm
from fedseg.protocol.records import LAYOUT_KEY, array_record, arrays_of, pack, unpack
from fedseg.runtime import flower_latency
from fedseg.runtime.fab import PYPROJECT
from fedseg.server.aggregate import RunningMean, weighted_mean


def _state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layer{i}.weight": rng.standard_normal((i + 1, 3, 3)).astype(np.float32)
            for i in range(40)} | {"bias": rng.standard_normal(7).astype(np.float32)}


def test_array_record_is_flat_and_round_trips_every_dtype() -> None:
    arrays = {**_state(0), "masked": np.arange(10, dtype=np.uint32) * 7,
              "fingerprint": np.linspace(0, 1, 13), "scalar": np.float32(3.5).reshape(())}
    rec = array_record(arrays)
    # one array per dtype plus the layout, not one per tensor
    assert sorted(rec) == sorted([LAYOUT_KEY, "flat<f4", "flat<u4", "flat<f8"])
    _, back = unpack(pack(pm.Empty(), arrays), pm.Empty)
    assert list(back) == list(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)


def test_array_record_layout_mismatch_is_a_protocol_error() -> None:
    from flwr.app import Array, ArrayRecord

    rec = array_record(_state(1))
    short = ArrayRecord({"flat<f4": Array(rec["flat<f4"].numpy()[:-1]),
                         LAYOUT_KEY: rec[LAYOUT_KEY]}, keep_input=True)
    with pytest.raises(pm.ProtocolError, match="too short"):
        arrays_of(short)


def test_running_mean_equals_weighted_mean() -> None:
    deltas = [_state(s) for s in range(5)]
    weights = [3.0, 1.0, 7.0, 2.0, 5.0]
    acc = RunningMean()
    for d, w in zip(deltas, weights, strict=True):
        acc.add(d, w)
    ref = weighted_mean(deltas, weights)
    got = acc.mean()
    assert acc.count == 5 and acc.total == sum(weights)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-7)


def test_flower_latency_patches_apply_to_the_pinned_flower() -> None:
    """If a Flower upgrade moves these internals the patches say so (False) instead of
    silently doing nothing; this test then fails and the module must be revisited."""
    from flwr.supercore.inflatable import inflatable_utils as iu
    from flwr.supernode import start_client_internal as sci

    saved = {fn: dict(fn.__kwdefaults__) for fn in (iu.pull_objects,
                                                     iu.pull_and_inflate_object_from_tree)}
    saved_time = sci.time
    try:
        assert flower_latency.fast_object_pulls()
        for fn in saved:
            assert fn.__kwdefaults__["initial_backoff"] == flower_latency.PULL_INITIAL_BACKOFF_S
            assert fn.__kwdefaults__["backoff_cap"] == flower_latency.PULL_BACKOFF_CAP_S
        assert flower_latency.fast_supernode_poll(cap=0.05)
        t0 = time.monotonic()
        sci.time.sleep(3)  # the SuperNode's idle poll
        assert time.monotonic() - t0 < 1.0
        assert sci.time.monotonic() > 0  # everything else is the real time module
        assert not flower_latency.fast_supernode_poll()  # already patched: refuses twice
    finally:
        for fn, kw in saved.items():
            fn.__kwdefaults__.update(kw)
        sci.time = saved_time


def _fab(pyproject: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", pyproject)
    return buf.getvalue()


def test_site_worker_runs_only_fedseg_installed_clientapp() -> None:
    _check_fab(_fab(PYPROJECT))  # the job bundle fedseg-server/simulate submit
    other = PYPROJECT.replace(f'clientapp = "{FEDSEG_CLIENTAPP}"', 'clientapp = "evil.app:app"')
    assert other != PYPROJECT
    with pytest.raises(PermissionError, match="runs only 'fedseg.client.app:app'"):
        _check_fab(_fab(other))


def test_checkpoint_round_trip_is_plain_npz(tmp_path) -> None:
    from fedseg.server.rundir import RunDir

    run = RunDir(tmp_path / "run")
    state = {"round": 3, "weights": _state(2), "optimizer": {"m": {}, "v": _state(3)},
             "best_dice": -1.0, "plan_hash": "abc", "note": None}
    run.save_checkpoint("last", state)
    assert run.checkpoint_path("last").suffix == ".npz"
    with np.load(run.checkpoint_path("last"), allow_pickle=False) as z:  # readable without fedseg
        assert "index" in z.files
    back = run.load_checkpoint("last")
    assert back is not None and back["round"] == 3 and back["plan_hash"] == "abc"
    assert back["optimizer"]["m"] == {} and back["note"] is None and back["best_dice"] == -1.0
    for k, v in state["weights"].items():
        np.testing.assert_array_equal(back["weights"][k], v)
        np.testing.assert_array_equal(back["optimizer"]["v"][k], state["optimizer"]["v"][k])
    run.copy_checkpoint("last", "best")
    assert run.load_checkpoint("best")["round"] == 3
    assert run.load_checkpoint("other") is None
