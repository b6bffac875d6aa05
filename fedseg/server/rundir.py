"""The server's run directory: what a consortium keeps of a federated run.

``RUN_DIR/job.json`` (the job's configuration), ``plan.json``, ``metrics.jsonl`` (append-only,
flushed and fsync'ed per line so a crash loses nothing already logged), ``status.json`` (what the
supervising CLI shows: phase, round, per-site state, latest Dice), ``checkpoints/last.npz`` and
``best.npz`` (global weights, server-optimiser state, round — written atomically, so a SIGKILL at
any moment leaves the previous checkpoint intact), ``round_NNNN.npz`` with ``snapshot_every``,
``model/`` (bundle for ``fedseg predict``),
``plots.png`` and ``report.md``.

Checkpoints are plain ``.npz`` files (arrays + a JSON index, no pickle), not ``torch.save``: the
ServerApp never needs torch during the rounds, which keeps ~300 MB of libraries out of the
server's memory (its peak RAM is a benchmarked figure), and anyone can read them with numpy.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np


def snapshot_name(round_: int) -> str:
    """Checkpoint name of round ``round_``'s global model kept by ``snapshot_every``."""
    return f"round_{round_:04d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
    except OSError:
        # the folder refuses new files (read-only, full, permissions) while the file itself
        # may still take a write: better a status written in place than one stuck at
        # "running" (seen: a read-only run folder left status.json at "running", no reason)
        if not path.is_file():
            raise
        path.write_text(text)
        return
    os.replace(tmp, path)


def write_problem(root: str | Path) -> str | None:
    """Why ``root`` cannot take the run's files (one line), or None when it can. By creating
    and removing a file, since permission bits say nothing for root or a read-only mount."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(dir=root, prefix=".write-check-")
    except OSError as err:
        return (f"{root}: the run folder is not writable ({err.strerror or err}); fix its "
                "permissions or mount, or give another run_dir")
    os.close(fd)
    os.unlink(name)
    return None


class RunDir:
    def __init__(self, root: str | Path, create: bool = True) -> None:
        """``create=False``: only look (a folder that may be read-only or missing)."""
        self.root = Path(root)
        if create:
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
        return self.root / "checkpoints" / f"{which}.npz"

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
        """``state``: nested dicts of numpy arrays and JSON scalars."""
        arrays: dict[str, np.ndarray] = {}
        index: dict[str, Any] = {"arrays": [], "scalars": [], "dicts": []}

        def walk(path: list[str], x: Any) -> None:
            if isinstance(x, dict):
                index["dicts"].append(path)
                for k, v in x.items():
                    walk([*path, str(k)], v)
            elif isinstance(x, np.ndarray | np.generic):
                arrays[f"a{len(index['arrays'])}"] = np.ascontiguousarray(x)
                index["arrays"].append(path)
            else:
                index["scalars"].append([path, x])

        walk([], state)
        arrays["index"] = np.frombuffer(json.dumps(index).encode(), dtype=np.uint8)
        path = self.checkpoint_path(which)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def copy_checkpoint(self, src: str, dst: str) -> None:
        """``dst`` becomes a copy of ``src`` (atomically; no arrays loaded)."""
        import shutil

        tmp = self.checkpoint_path(dst).with_name(self.checkpoint_path(dst).name + ".tmp")
        shutil.copyfile(self.checkpoint_path(src), tmp)
        os.replace(tmp, self.checkpoint_path(dst))

    def load_checkpoint(self, which: str = "last") -> dict[str, Any] | None:
        path = self.checkpoint_path(which)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            index = json.loads(z["index"].tobytes())
            out: dict[str, Any] = {}

            def put(p: list[str], v: Any) -> None:
                d = out
                for k in p[:-1]:
                    d = d.setdefault(k, {})
                d[p[-1]] = v

            for p in index["dicts"]:
                if p:
                    put(p, {})
            for i, p in enumerate(index["arrays"]):
                put(p, z[f"a{i}"])
            for p, v in index["scalars"]:
                put(p, v)
        return out


def memory_mb() -> dict[str, float]:
    """This ServerApp process's memory now and at its peak (MB; Linux), for metrics.jsonl: the
    server's RAM is a sizing figure a consortium needs (docs/deploy.md)."""
    import resource

    # VmHWM is this process's own peak; ru_maxrss would also count the peak of the process that
    # forked it (Linux keeps that across exec), e.g. a large SuperLink or test runner
    out = {"server_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    try:
        with open("/proc/self/status") as f:
            hwm = next(ln for ln in f if ln.startswith("VmHWM:"))
        out["server_peak_rss_mb"] = round(int(hwm.split()[1]) / 1024, 1)
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        with open("/proc/self/statm") as f:
            out["server_rss_mb"] = round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return out
