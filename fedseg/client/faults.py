"""Test-only misbehaviour of a site (``FEDSEG_FAULT_INJECT``), so that the server's defences can
be tested end to end with real processes. OFF unless the variable is set; nothing sets it
outside tests.

The variable holds comma-separated faults ``KIND[:ARG][@ROUND]``:

- ``nan-update[@R]`` (every round, or round R): the first tensor of the update becomes NaN
  (``client/app.py``; plain aggregation's server must reject it).
- ``scale-update:F@R`` (secure aggregation): in the FIRST attempt of round R the site multiplies
  its delta by F and skips its own norm check — the dishonest site of issue #13 point 3.
- ``replay-masked@R`` (secure aggregation): in the first attempt of round R the site uploads the
  masked vector of its previous upload (resized to this round's length) under this round's
  metadata — the replay of issue #13 point 3.

"First attempt" because a refused round is retried with the same round number: a fault that
fired again every retry would only show that the retries are refused too. The marker is a file
in the site's cache (``CACHE_DIR/faults/``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedseg.errors import FedsegError

FAULT_ENV = "FEDSEG_FAULT_INJECT"
KINDS = ("nan-update", "scale-update", "replay-masked")


@dataclass(frozen=True)
class Fault:
    kind: str
    arg: str
    round: int | None  # None: every round


def parse(text: str | None = None) -> list[Fault]:
    """The faults of ``text`` (default: the environment variable); unknown kinds raise."""
    text = os.environ.get(FAULT_ENV, "") if text is None else text
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        head, _, rnd = item.partition("@")
        kind, _, arg = head.partition(":")
        if kind not in KINDS or (rnd and not rnd.isdigit()) or (kind == "scale-update" and not arg):
            raise FedsegError(f"{FAULT_ENV}={text!r}: unknown fault {item!r}; known: "
                              "nan-update[@R], scale-update:F@R, replay-masked@R")
        out.append(Fault(kind, arg, int(rnd) if rnd else None))
    return out


def _first_time(fault: Fault, rnd: int, cache_dir: Path) -> bool:
    """True once per (fault, round): the first attempt of the round."""
    if fault.round is not None and fault.round != rnd:
        return False
    marker = Path(cache_dir) / "faults" / f"{fault.kind}@{rnd}.done"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("")
    return True


def tamper_delta(delta: dict[str, np.ndarray], rnd: int,
                 cache_dir: Path) -> tuple[dict[str, np.ndarray], bool]:
    """(delta, skip the own check): the ``scale-update`` fault, if it fires now."""
    for f in parse():
        if f.kind == "scale-update" and _first_time(f, rnd, cache_dir):
            factor = float(f.arg)
            print(f"[fedseg-client] {FAULT_ENV}: multiplying the update by {factor:g} in round "
                  f"{rnd}, own check skipped", flush=True)
            return {k: (v * factor).astype(v.dtype) for k, v in delta.items()}, True
    return delta, False


def replay_masked(vec: np.ndarray, rnd: int, cache_dir: Path) -> None:
    """The ``replay-masked`` fault: remember each masked upload; in the round it fires, write
    the previous one (resized) over ``vec`` in place."""
    faults = [f for f in parse() if f.kind == "replay-masked"]
    if not faults:
        return
    path = Path(cache_dir) / "faults" / "last-masked.npy"
    old = np.load(path) if path.is_file() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vec)
    if old is not None and any(_first_time(f, rnd, cache_dir) for f in faults):
        print(f"[fedseg-client] {FAULT_ENV}: replaying the previous masked upload in round "
              f"{rnd}", flush=True)
        n = min(old.size, vec.size)
        vec[:n] = old[:n]
        vec[n:] = 0
