"""Per-round wall-clock timing written by the ServerApps (one JSON file, rewritten every round)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np


class RoundClock:
    """``start(r)`` when round r begins, ``mark(r, name)`` at its phase ends, ``end(r)`` when it is
    complete. Every ``end`` rewrites ``path`` atomically, so a run cut short still leaves the
    rounds it finished."""

    def __init__(self, path: str | os.PathLike | None, meta: dict | None = None) -> None:
        self.path = Path(path) if path else None
        self.meta = dict(meta or {})
        self._t0: dict[int, float] = {}
        self.round_seconds: list[float] = []
        self.phases: dict[str, list[float]] = {}
        self.extra: dict = {}

    def start(self, rnd: int) -> None:
        self._t0.setdefault(rnd, time.monotonic())

    def mark(self, rnd: int, name: str) -> None:
        if rnd in self._t0:
            self.phases.setdefault(name, []).append(time.monotonic() - self._t0[rnd])

    def end(self, rnd: int) -> None:
        t0 = self._t0.get(rnd)
        if t0 is None:
            return
        self.round_seconds.append(time.monotonic() - t0)
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        data = {**self.meta, "round_seconds": self.round_seconds,
                "phase_seconds_since_round_start": self.phases, **self.extra}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.path)


def check_update(clock: RoundClock, prev: list[np.ndarray], new: list[np.ndarray]) -> None:
    """Sanity check, outside the timed span: the global model changed by the clients' noise
    averaged over the sites (RMS ~ noise-std / sqrt(sites)), has as many elements as sent, and
    note its dtype. Appended to ``clock.extra["update_check"]`` and written out."""
    numel = sum(int(a.size) for a in new)
    sq = sum(float(np.square(n.astype(np.float64) - p.astype(np.float64)).sum())
             for p, n in zip(prev, new, strict=True))
    clock.extra.setdefault("update_check", []).append({
        "elements": numel, "rms_change": (sq / max(1, numel)) ** 0.5,
        "dtypes": sorted({str(a.dtype) for a in new})})
    clock.write()
