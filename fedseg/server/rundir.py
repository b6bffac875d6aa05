"""The server's run directory: what a consortium keeps of a federated run.

``RUN_DIR/job.json`` (the job's configuration), ``plan.json``, ``metrics.jsonl`` (append-only,
flushed and fsync'ed per line so a crash loses nothing already logged), ``status.json`` (what the
supervising CLI shows: phase, round, per-site state, latest Dice), ``checkpoints/last.pt`` and
``best.pt`` (global weights, server-optimiser state, round — written atomically, so a SIGKILL at
any moment leaves the previous checkpoint intact), ``model/`` (bundle for ``fedseg predict``),
``plots.png`` and ``report.md``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "checkpoints").mkdir(exist_ok=True)

    # -- files ---------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def plan_path(self) -> Path:
        return self.root / "plan.json"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    def checkpoint_path(self, which: str = "last") -> Path:
        return self.root / "checkpoints" / f"{which}.pt"

    # -- metrics -------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        rec = {"time": round(time.time(), 3), **record}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash mid-write
        return out

    def set_status(self, **fields: Any) -> None:
        path = self.root / "status.json"
        cur: dict[str, Any] = {}
        if path.exists():
            try:
                cur = json.loads(path.read_text())
            except json.JSONDecodeError:
                cur = {}
        cur.update(fields)
        cur["updated"] = round(time.time(), 3)
        _atomic_write_text(path, json.dumps(cur, indent=2, sort_keys=True) + "\n")

    def status(self) -> dict[str, Any]:
        path = self.root / "status.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, which: str, state: dict[str, Any]) -> None:
        def conv(x: Any) -> Any:
            if isinstance(x, np.ndarray):
                return torch.from_numpy(np.ascontiguousarray(x))
            if isinstance(x, dict):
                return {k: conv(v) for k, v in x.items()}
            return x

        path = self.checkpoint_path(which)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(conv(state), tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, which: str = "last") -> dict[str, Any] | None:
        path = self.checkpoint_path(which)
        if not path.exists():
            return None

        def conv(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.numpy()
            if isinstance(x, dict):
                return {k: conv(v) for k, v in x.items()}
            return x

        return conv(torch.load(path, map_location="cpu", weights_only=True))
