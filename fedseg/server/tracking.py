"""Optional experiment tracking: TensorBoard event files beside ``metrics.jsonl``.

Off by default; ``tensorboard = true`` in the job config (server.toml's ``[job]``, or
``fedseg simulate --tensorboard``) turns it on, and ``fedseg report RUN_DIR --tensorboard``
writes them for any finished run. Layout: ``RUN_DIR/tensorboard/<site>/`` and
``RUN_DIR/tensorboard/pooled/``, one TensorBoard *run* per site, so that TensorBoard draws the
sites and the pool in one chart per tag: ``Dice/<class>``, ``HD95/<class>`` (mm; an undefined
HD95 is left out, not drawn as a distance), ``Dice/mean``, ``loss``, ``seconds`` and, with
differential privacy, ``dp/epsilon``; the step is the round. ``tensorboard --logdir RUN_DIR``.

Why event files are derived from the records, written by the process that follows the job
(``fedseg simulate`` / ``fedseg-server``) and not by the ServerApp: the ServerApp keeps torch
and other large libraries out of its memory (a benchmarked figure), and ``metrics.jsonl``
stays the one source of truth. Each writer starts by removing the event files a previous one
wrote and replays the whole ``metrics.jsonl`` (resume included), so the event files never
hold a round twice.

Why ``tensorboard``'s own event writer and not ``torch.utils.tensorboard``: it is the same
writer without importing torch (~300 MB, seconds) into ``fedseg-server``'s process. The
package is the optional extra ``fedseg[tracking]``; with the setting on and the package
missing, the job config is refused with one line naming the extra.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from fedseg.errors import FedsegError

FOLDER = "tensorboard"
MISSING = ("needs the 'tensorboard' package, which is not installed: pip install "
           "'fedseg[tracking]' (or set tensorboard = false)")


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def require(where: str = "tensorboard") -> None:
    """One line naming the extra when tracking is asked for but cannot be done."""
    if not available():
        raise FedsegError(f"{where}: {MISSING}")


def wanted(root: Path) -> bool:
    """Whether the run folder's job config (``job.json``) turns tracking on."""
    try:
        return bool(json.loads((Path(root) / "job.json").read_text()).get("tensorboard"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _folder_name(site: str) -> str:
    return re.sub(r"[^\w.-]", "_", site) or "_"


def scalars(rec: dict[str, Any], names: dict[str, str]) -> list[tuple[str, str, int, float]]:
    """(run, tag, step, value) of one metrics record; ``names``: class key -> label name."""
    if rec.get("status", "ok") != "ok" or "site" not in rec or not isinstance(rec.get("round"), int):
        return []
    site, rnd = str(rec["site"]), int(rec["round"])
    out: list[tuple[str, str, int, float]] = []

    def put(tag: str, v: Any) -> None:
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out.append((site, tag, rnd, float(v)))

    if rec.get("phase") == "eval":
        for k, v in (rec.get("dice") or {}).items():
            put(f"Dice/{names.get(str(k), 'class ' + str(k))}", v)
        for k, v in (rec.get("hd95") or {}).items():
            put(f"HD95/{names.get(str(k), 'class ' + str(k))}", v)
        put("Dice/mean", rec.get("mean_dice"))
    elif rec.get("phase") == "train":
        put("loss", rec.get("loss"))
        put("seconds", rec.get("seconds"))
        put("dp/epsilon", rec.get("dp_epsilon"))
        put("iterations_per_s", rec.get("it_per_s"))
    return out


class TensorBoardLog:
    """Event files under ``ROOT/tensorboard/``, fed one metrics record at a time."""

    def __init__(self, root: str | Path) -> None:
        require()
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._writer_cls = EventFileWriter
        self.root = Path(root)
        self.folder = self.root / FOLDER
        for old in self.folder.glob("*/events.out.tfevents.*"):  # replayed below by the caller
            old.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, Any] = {}
        self._names: dict[str, str] = {}

    def _class_names(self) -> dict[str, str]:
        if not self._names:
            from fedseg.server.report_data import class_names

            try:
                plan = json.loads((self.root / "plan.json").read_text())
            except (OSError, json.JSONDecodeError):
                return {}
            self._names = dict(class_names(plan))
        return self._names

    def add(self, rec: dict[str, Any]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        wall = float(rec.get("time") or time.time())
        for run, tag, step, value in scalars(rec, self._class_names()):
            w = self._writers.get(run)
            if w is None:
                w = self._writers[run] = self._writer_cls(str(self.folder / _folder_name(run)),
                                                          flush_secs=10)
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)])
            w.add_event(Event(wall_time=wall, step=step, summary=summary))

    def flush(self) -> None:
        for w in self._writers.values():
            w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()


def write_all(root: str | Path) -> Path:
    """Event files for every record of ``ROOT/metrics.jsonl`` (any run, after the fact)."""
    from fedseg.server.rundir import RunDir

    log = TensorBoardLog(root)
    try:
        for rec in RunDir(root).read_metrics():
            log.add(rec)
    finally:
        log.close()
    return log.folder
