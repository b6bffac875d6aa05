"""The Flower ServerApp of a fedseg job (loaded by Flower's ``flwr-serverapp`` process).

The run config carries one key, ``job-config``: the path of the job's JSON on the server host
(written by ``fedseg-server start``/``fedseg simulate``), so that the full pydantic-validated
job configuration reaches the ServerApp without squeezing it through Flower's flat config.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedseg.errors import FedsegError
from fedseg.server.config import JobConfig
from fedseg.server.job import FederatedJob
from fedseg.server.rundir import RunDir

app = ServerApp()


def _log(msg: str) -> None:
    print(f"[fedseg-server] {msg}", flush=True)


@app.main()
def main(grid: Grid, context: Context) -> None:
    job_file = Path(str(context.run_config.get("job-config", "")))
    if not job_file.is_file():
        raise SystemExit(f"fedseg: job config {job_file} not found on the server host")
    cfg = JobConfig.model_validate_json(job_file.read_text())
    run = RunDir(cfg.run_dir)
    from fedseg.runtime.flower_latency import fast_object_pulls

    fast_object_pulls()  # the sites' replies: retry after 50 ms, not 1-2-4-8 s (see that module)
    try:
        FederatedJob(grid, cfg, log=_log, run_id=int(context.run_id)).run_job()
    except FedsegError as err:
        _log(f"job failed: {err}")
        _record_failure(run, str(err))
        _tell_sites(grid, cfg, run, int(context.run_id), str(err))
        raise SystemExit(1) from None
    except Exception as err:  # keep the reason where the operator looks (status.json)
        traceback.print_exc(file=sys.stdout)
        _record_failure(run, f"internal error: {err!r}")
        _tell_sites(grid, cfg, run, int(context.run_id), f"internal error at the server: {err!r}")
        raise
    _tell_sites(grid, cfg, run, int(context.run_id))


def _tell_sites(grid: Grid, cfg: JobConfig, run: RunDir, run_id: int, failed: str = "") -> None:
    """Every connected site learns that the job ended (fedseg/protocol/job_end.py): its
    fedseg-client logs "job finished" and, with exit_when_done, exits."""
    from fedseg.protocol.job_end import JobEnd
    from fedseg.server.job_end import notify_sites

    rounds = int(run.status().get("round", 0) or 0)
    notice = JobEnd(job_id=cfg.name, rounds=rounds,
                    state="failed" if failed else "finished", reason=failed[:2000],
                    flower_run_id=run_id)
    notify_sites(grid, notice, _log)


def _record_failure(run: RunDir, reason: str) -> None:
    """status.json and metrics.jsonl get the reason; when the run folder itself is what failed
    (read-only, full) the reason still reaches this process's log, and ``fedseg-server`` names
    the folder (``rundir.write_problem``) instead of reporting a failure without a reason."""
    try:
        run.set_status(state="failed", error=reason)
        run.log({"phase": "job", "status": "failed", "reason": reason})
    except OSError as err:
        _log(f"job failed: {reason}; it could not be recorded in {run.root}: {err}")
