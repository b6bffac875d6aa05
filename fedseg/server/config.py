"""Configuration of a federated job and of the ``fedseg-server`` process (TOML, pydantic).

Every option has a default that suits a small consortium; a wrong value ends as one line naming
the file and the field (see :func:`load_toml`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedseg.config_io import load_toml  # noqa: F401  (re-export)
from fedseg.server.aggregate import ServerOptimizerConfig


class JobConfig(BaseModel):
    """What the ServerApp runs. Written to ``RUN_DIR/job.json``; the run config carries its path."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(description="server folder for plan, metrics, checkpoints, model")
    job_id: str = Field(default="", description="stable id of the job (sites key their state by it)")
    min_sites: int = Field(default=2, ge=1)
    enrol_timeout_s: float = Field(default=600.0, gt=0)
    rounds: int = Field(default=10, ge=1)
    local_iterations: int = Field(default=50, ge=1, description="k local iterations per round")
    eval_every: int = Field(default=1, ge=1)
    aggregation: ServerOptimizerConfig = ServerOptimizerConfig()
    proximal_mu: float = Field(default=0.0, ge=0, description="FedProx mu (0: off)")
    max_update_norm: float | None = Field(default=None, gt=0)
    round_timeout_s: float = Field(
        default=3600.0, gt=0,
        description="longest wait for a round's replies; a dead site is reported by Flower "
        "within about a minute anyway, this bounds a site that hangs")
    site_wait_s: float = Field(
        default=300.0, ge=0,
        description="before a round with fewer than min_sites connected: wait this long for "
        "sites to (re)join")
    on_too_few_sites: Literal["skip", "retry", "fail"] = Field(
        default="retry",
        description="a round with fewer than min_sites good updates: retry it (up to "
        "max_retries, then skip), skip it (global model unchanged) or fail the job")
    max_retries: int = Field(default=2, ge=0)
    gpu_memory_gb: float | None = Field(default=None, gt=0, description="override site GPUs")
    plan_preset: Literal["nnunet", "tiny"] = "nnunet"
    seed: int = 0
    resume: bool = False
    secure_aggregation: bool = Field(
        default=True,
        description="sum fingerprints and model updates with secure aggregation: the server "
        "sees only sums over at least secagg_threshold sites (needs roster)")
    roster: str | None = Field(
        default=None, description="the consortium's roster.json (from 'fedseg provision')")
    secagg_threshold: int | None = Field(
        default=None, description="t: shares needed to unmask; default floor(n/2)+1 of the "
        "roster's n sites; every site refuses 2t <= n")
    secagg_clip: float = Field(
        default=10.0, gt=0,
        description="C: each coordinate of a site's weighted update (n_i / mean cases) x delta is "
        "clipped to [-C, C] before fixed-point masking (resolution C*n/2^31)")
    per_site_metrics: bool = Field(
        default=True,
        description="log each site's evaluation (Dice/HD95); false: with secure aggregation "
        "only the pooled evaluation, through the secure sum")


class ServerConfig(BaseModel):
    """``server.toml``: the supervised SuperLink plus the job."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=9092, ge=1, le=65535)
    state_dir: str = Field(default="fedseg-server-state", description="SuperLink DB, logs")
    insecure: bool = Field(default=False, description="plain HTTP; only allowed on loopback")
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    tls_ca_certfile: str | None = None
    job: JobConfig
