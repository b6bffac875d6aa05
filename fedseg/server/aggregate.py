"""Checking site updates and turning their weighted mean into the next global model.

Sites send weight DELTAS (new − global), weighted here by their training cases. Flower's
strategies aggregate whole models inside its own ``start()`` loop and cannot be fed a
pre-summed delta (which is all the server will have once secure aggregation masks the
individual updates), so the few lines of FedAvg/FedAdam/FedYogi (Reddi et al. 2021,
"Adaptive Federated Optimization") live here, on flat numpy arrays keyed like the state_dict.
FedProx differs only at the sites (proximal term), so its server side is FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedseg.privacy.aggregates import sum_of_squares

State = dict[str, np.ndarray]


class UpdateRejected(Exception):
    """An update that must not be averaged; ``str()`` says why (logged in metrics.jsonl)."""


def check_update(delta: Mapping[str, np.ndarray], reference: State, max_norm: float | None) -> float:
    """Raise :class:`UpdateRejected` unless ``delta`` is a sane update of ``reference``.

    Checks keys, shapes, dtype (float32), finiteness and, when ``max_norm`` is set, the global
    L2 norm. Returns the norm.

    Only without secure aggregation: with it (the default) the server never sees one site's
    update, so each site runs the same checks on its own update before masking it
    (``fedseg.privacy.site_agent.check_local_update``: finite, norm <= ``max_update_norm``;
    a refused update is reported as ``rejected``) and the server checks the unmasked SUM
    (finite; the number of values the fixed-point clip cut is logged) — see
    ``fedseg/server/secure_rounds.py``.
    """
    missing = sorted(set(reference) - set(delta))
    extra = sorted(set(delta) - set(reference))
    if missing or extra:
        raise UpdateRejected(f"keys differ from the model (missing {missing[:3]}, extra {extra[:3]})")
    sq = 0.0
    for k, ref in reference.items():
        d = delta[k]
        if d.shape != ref.shape:
            raise UpdateRejected(f"'{k}' has shape {d.shape}, model has {ref.shape}")
        if d.dtype != np.float32:
            raise UpdateRejected(f"'{k}' has dtype {d.dtype}, expected float32")
        s = sum_of_squares(d)  # non-finite exactly when d holds NaN or Inf
        if not math.isfinite(s):
            raise UpdateRejected(f"'{k}' holds NaN or Inf")
        sq += s
    norm = float(np.sqrt(sq))
    if max_norm is not None and norm > max_norm:
        raise UpdateRejected(f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}")
    return norm


def weighted_mean(deltas: list[State], weights: list[float]) -> State:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to > 0")
    out: State = {}
    for k in deltas[0]:
        acc = np.zeros(deltas[0][k].shape, dtype=np.float64)
        for d, w in zip(deltas, weights, strict=True):
            acc += d[k].astype(np.float64) * (w / total)
        out[k] = acc.astype(np.float32)
    return out


class RunningMean:
    """Weighted mean of updates folded in one at a time (float64 accumulator), so the server
    never holds more than one site's update besides the sum; ``mean()`` equals
    :func:`weighted_mean` of the same updates up to float64 rounding."""

    def __init__(self) -> None:
        self.sum: State = {}
        self.total = 0.0
        self.count = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        for k, d in delta.items():
            acc = self.sum.get(k)
            if acc is None:
                self.sum[k] = d.astype(np.float64) * weight
            else:
                acc += d.astype(np.float64) * weight
        self.total += float(weight)
        self.count += 1

    def mean(self) -> Mapping[str, np.ndarray]:
        """The mean, computed per tensor when read (no second full-model copy at once)."""
        if self.total <= 0:
            raise ValueError("weights must sum to > 0")
        return _MeanView(self.sum, self.total)


class _MeanView(Mapping[str, np.ndarray]):
    def __init__(self, sums: dict[str, np.ndarray], total: float) -> None:
        self._sums, self._total = sums, total

    def __getitem__(self, k: str) -> np.ndarray:
        return (self._sums[k] / self._total).astype(np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sums)

    def __len__(self) -> int:
        return len(self._sums)


class ServerOptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi"] = "fedavg"
    lr: float = 1.0
    momentum: float = Field(default=0.9, ge=0, lt=1, description="fedavgm: server momentum")
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


class ServerOptimizer:
    """Applies the averaged delta to the global weights; state is checkpointed with the run."""

    def __init__(self, cfg: ServerOptimizerConfig) -> None:
        self.cfg = cfg
        self.m: State = {}
        self.v: State = {}

    def step(self, weights: State, mean_delta: Mapping[str, np.ndarray]) -> State:
        c = self.cfg
        if c.kind in ("fedavg", "fedprox"):
            return {k: (w + c.lr * mean_delta[k]).astype(np.float32) for k, w in weights.items()}
        if c.kind == "fedavgm":  # Hsu et al. 2019: heavy-ball momentum on the mean update
            out = {}
            for k, w in weights.items():
                m = self.m.get(k)
                m = mean_delta[k].astype(np.float32) if m is None else c.momentum * m + mean_delta[k]
                self.m[k] = m.astype(np.float32)
                out[k] = (w + c.lr * self.m[k]).astype(np.float32)
            return out
        out: State = {}
        for k, w in weights.items():
            d = mean_delta[k]
            m = self.m.get(k, np.zeros_like(w))
            v = self.v.get(k, np.full_like(w, c.tau**2))
            m = c.beta1 * m + (1 - c.beta1) * d
            d2 = d * d
            if c.kind == "fedadam":
                v = c.beta2 * v + (1 - c.beta2) * d2
            else:  # fedyogi
                v = v - (1 - c.beta2) * d2 * np.sign(v - d2)
            self.m[k], self.v[k] = m.astype(np.float32), v.astype(np.float32)
            out[k] = (w + c.lr * m / (np.sqrt(v) + c.tau)).astype(np.float32)
        return out

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        self.m = {k: np.asarray(v, dtype=np.float32) for k, v in state.get("m", {}).items()}
        self.v = {k: np.asarray(v, dtype=np.float32) for k, v in state.get("v", {}).items()}
