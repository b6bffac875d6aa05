"""The site's end of :mod:`fedseg.protocol.job_end`: the ClientApp handler that records the
job's end, and what ``fedseg-client`` reads of it.

The handler only writes ``CACHE_DIR/job-end.json`` (atomically) and acknowledges: it sends
nothing of the site's. ``fedseg-client`` watches that file (:class:`JobEndWatch`): a notice
written AFTER the client started is this client's job ending (an older file is a past job's).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import Context, Message

from fedseg.client.site_config import SiteConfig, run_local
from fedseg.protocol.job_end import JOB_END_FILE, JobEnd, JobEndAck
from fedseg.protocol.records import pack, unpack


def record_job_end(msg: Message, context: Context) -> Message:
    """``query.job_end``: write the notice, log it, acknowledge."""

    def handle(m: Message, cfg: SiteConfig) -> Message:
        notice, _ = unpack(m.content, JobEnd)
        write_notice(cfg.cache_dir, notice)
        print(f"[fedseg-client {cfg.site}] job '{notice.job_id}' {notice.state} on the server "
              f"after {notice.rounds} round(s){': ' + notice.reason if notice.reason else ''}",
              flush=True)
        return Message(pack(JobEndAck(site=cfg.site)), reply_to=m)

    return run_local(handle, msg, dict(context.node_config))


def write_notice(cache_dir: Path, notice: JobEnd) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / JOB_END_FILE
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**notice.model_dump(), "received": time.time()}) + "\n")
    os.replace(tmp, path)
    return path


class JobEndWatch:
    """``fedseg-client``'s side: the notice of a job that ended since this client started."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / JOB_END_FILE
        self.since = time.time()
        self._seen = 0.0

    def poll(self) -> JobEnd | None:
        """A new notice (each one once), or None."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        received = float(data.pop("received", 0.0))
        if received < self.since or received <= self._seen:
            return None
        self._seen = received
        try:
            return JobEnd.model_validate(data)
        except ValueError:
            return None

    @staticmethod
    def line(notice: JobEnd) -> str:
        """What the client prints: ``job finished`` is the phrase sites grep for."""
        if notice.state == "finished":
            return (f"job finished: '{notice.job_id}' ended on the server after "
                    f"{notice.rounds} round(s); the model bundle is in the server's run folder")
        return (f"job failed: '{notice.job_id}' ended on the server after {notice.rounds} "
                f"round(s): {notice.reason or 'no reason given'}")
