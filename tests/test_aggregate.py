"""Server-side aggregation: update checks and server optimisers (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from fedseg.server.aggregate import (
    ServerOptimizer,
    ServerOptimizerConfig,
    UpdateRejected,
    check_update,
    weighted_mean,
)


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}


def test_weighted_mean_matches_numpy() -> None:
    d1, d2 = _model(1), _model(2)
    m = weighted_mean([d1, d2], [1.0, 3.0])
    np.testing.assert_allclose(m["a"], 0.25 * d1["a"] + 0.75 * d2["a"], rtol=1e-6)
    assert m["a"].dtype == np.float32


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: d.pop("b"), "keys differ"),
        (lambda d: d.__setitem__("a", np.zeros((4, 3), np.float32)), "shape"),
        (lambda d: d.__setitem__("a", d["a"].astype(np.float64)), "dtype"),
        (lambda d: d["a"].__setitem__((0, 0), np.nan), "NaN"),
        (lambda d: d["b"].__setitem__(0, np.inf), "NaN or Inf"),
        (lambda d: d.__setitem__("a", d["a"] * 1e6), "exceeds the bound"),
    ],
)
def test_bad_updates_are_rejected(mutate, reason: str) -> None:
    ref = _model(0)
    delta = {k: v.copy() * 0.01 for k, v in _model(3).items()}
    assert check_update(delta, ref, max_norm=10.0) > 0
    mutate(delta)
    with pytest.raises(UpdateRejected, match=reason):
        check_update(delta, ref, max_norm=10.0)


def test_fedavg_applies_mean_delta() -> None:
    w, d = _model(0), _model(1)
    out = ServerOptimizer(ServerOptimizerConfig(kind="fedavg")).step(w, d)
    np.testing.assert_allclose(out["a"], w["a"] + d["a"], rtol=1e-6)


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_adaptive_optimisers_move_along_delta_and_keep_state(kind: str) -> None:
    w, d = _model(0), _model(1)
    opt = ServerOptimizer(ServerOptimizerConfig(kind=kind, lr=0.01))
    out = opt.step(w, d)
    step = out["a"] - w["a"]
    assert np.all(np.sign(step) == np.sign(d["a"]))  # first step follows the delta's sign
    st = opt.state_dict()
    opt2 = ServerOptimizer(ServerOptimizerConfig(kind=kind, lr=0.01))
    opt2.load_state_dict(st)
    np.testing.assert_allclose(opt2.step(out, d)["a"], opt.step(out, d)["a"], rtol=1e-6)


def test_fedavgm_accumulates_server_momentum() -> None:
    w, d = _model(0), _model(1)
    opt = ServerOptimizer(ServerOptimizerConfig(kind="fedavgm", lr=1.0, momentum=0.5))
    w1 = opt.step(w, d)
    np.testing.assert_allclose(w1["a"], w["a"] + d["a"], rtol=1e-6)  # first step: plain FedAvg
    w2 = opt.step(w1, d)  # then the heavy ball: m = 0.5 m + d
    np.testing.assert_allclose(w2["a"], w1["a"] + 1.5 * d["a"], rtol=1e-5)
    opt2 = ServerOptimizer(ServerOptimizerConfig(kind="fedavgm", lr=1.0, momentum=0.5))
    opt2.load_state_dict(opt.state_dict())  # the momentum is checkpointed with the run
    np.testing.assert_allclose(opt2.step(w2, d)["a"], opt.step(w2, d)["a"], rtol=1e-6)
