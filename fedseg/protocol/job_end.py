"""The job's end, told to every site (issue #16: a site used to retry forever after the job).

Why a message of its own: Flower 1.42 tells a SuperNode nothing when a run ends (the next run
simply arrives, or nothing does), so a hospital's ``fedseg-client`` could not tell a finished
job from a server that is down. At the end of a job — finished, or failed with a reason — the
ServerApp sends ``JobEnd`` to every connected site (:mod:`fedseg.server.job_end`); the site's
ClientApp writes it to ``CACHE_DIR/JOB_END_FILE`` (:mod:`fedseg.client.job_end`) and answers
``JobEndAck``; ``fedseg-client`` sees the file, logs ``job finished`` and, with
``exit_when_done``, exits 0. Shared by both ends; imports neither.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedseg.protocol.messages import Msg

JOB_END = "query.job_end"
JOB_END_FILE = "job-end.json"  # in the site's cache dir: what fedseg-client watches


class JobEnd(Msg):
    """Server → every connected site, once, when the job ends."""

    job_id: str = Field(max_length=200)
    state: Literal["finished", "failed"]
    rounds: int = Field(ge=0, description="rounds completed")
    reason: str = Field(default="", max_length=2000, description="why it failed ('' if not)")
    flower_run_id: int = 0


class JobEndAck(Msg):
    site: str
