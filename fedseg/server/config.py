"""Configuration of a federated job and of the ``fedseg-server`` process (TOML, pydantic).

Every option has a default that suits a small consortium; a wrong value ends as one line naming
the file and the field (see :func:`load_toml`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedseg.config_io import load_toml  # noqa: F401  (re-export)
from fedseg.privacy.dp import DPSettings
from fedseg.server.aggregate import ServerOptimizerConfig
from fedseg.server.plausibility import RobustConfig


class JobConfig(BaseModel):
    """What the ServerApp runs. Written to ``RUN_DIR/job.json``; the run config carries its path."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(description="server folder for plan, metrics, checkpoints, model")
    job_id: str = Field(default="", description="stable id of the job (sites key their state by it)")
    min_sites: int = Field(default=2, ge=1)
    enrol_timeout_s: float = Field(default=600.0, gt=0)
    # a real consortium's defaults (BENCHMARKS.md, "federated recipe"): nnU-Net's schedule,
    # 1000 epochs of 250 iterations, as 1000 rounds of one epoch at every site
    rounds: int = Field(default=1000, ge=1)
    local_iterations: int = Field(
        default=250, ge=1, description="k local iterations per round (250 = one nnU-Net epoch: "
        "on a GPU ~15 s against 1-5 s of round overhead)")
    folds: int = Field(
        default=1, ge=1, le=10, description="cross-validation: 1 trains one model (each site "
        "holds 1 in 5 cases out for validation); K >= 2 trains K fold models one after the "
        "other, `rounds` rounds each, every site splitting its cases into the same K folds, and "
        "the model bundle is their ensemble (fedseg/server/phases/crossval.py)")
    eval_every: int = Field(default=10, ge=1, description="evaluate the global model every E "
                            "rounds (and after the last)")
    snapshot_every: int = Field(
        default=0, ge=0, description="keep the global model of every N-th round as "
        "checkpoints/round_NNNN.npz (learning curves; 0: only last and best)")
    aggregation: ServerOptimizerConfig = ServerOptimizerConfig()
    proximal_mu: float = Field(default=0.0, ge=0, description="FedProx mu (0: off)")
    site_lr: float = Field(
        default=0.02, gt=0, description="initial learning rate of the sites' poly schedule "
        "over the job's global iterations: twice nnU-Net's 0.01, because a momentum buffer "
        "reset every round never reaches the steady state that 0.01 is tuned for "
        "(measured: BENCHMARKS.md)")
    site_momentum: Literal["keep", "reset"] = Field(
        default="reset", description="each site's SGD momentum buffer between rounds: reset at "
        "the start of every round (measured better: BENCHMARKS.md) or kept on the site's disk")
    site_momentum_beta: float = Field(
        default=0.99, ge=0, lt=1, description="the sites' SGD (Nesterov) momentum: nnU-Net's "
        "0.99 by default (BENCHMARKS.md, 'federated recipe', for the measured alternatives)")
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
    plan_preset: Literal["nnunet", "tiny", "resenc_m", "resenc_l", "resenc_tiny"] = Field(
        default="nnunet", description="nnunet: nnU-Net's default plan for the sites' GPUs; "
        "resenc_m / resenc_l: nnU-Net's ResEnc M / L plans (ResidualEncoderUNet, for 8 / 24 GB "
        "GPUs whatever the sites report); tiny / resenc_tiny: nnunet / resenc_m shrunk for CPU "
        "tests (fedseg/planning/presets.py)")
    configuration: Literal["2d", "3d_fullres", "3d_lowres"] | None = Field(
        default=None, description="the plan configuration the sites train: 2d, 3d_fullres or "
        "3d_lowres (where nnU-Net plans one); unset: nnU-Net's choice (3d_fullres for 3D data, "
        "2d for 2D data)")
    configurations: list[Literal["2d", "3d_fullres", "3d_lowres"]] = Field(
        default_factory=list, description="nnU-Net's best-configuration search: train each "
        "of these configurations' fold models (needs folds >= 2), then choose among them and "
        "their ensembles by pooled cross-validation Dice (fedseg/server/phases/selection.py); "
        "empty: one configuration")
    plan_file: str | None = Field(
        default=None,
        description="use this plan (JSON from 'fedseg plan' or a run's plan.json) instead of "
        "planning from the federated fingerprint; the fingerprint phase is skipped and every "
        "site must declare the plan's channels and labels")
    seed: int = 0
    resume: bool = False
    bulk_transport: Literal["http", "flower"] = Field(
        default="http",
        description="how the global model and the updates travel: 'http' (default) one hop "
        "between site and server, next to the Flower message (fedseg/protocol/bulk.py); "
        "'flower' inside Flower's messages (3 hops through Flower's object store, slower)")
    bulk_listen: str = Field(
        default="127.0.0.1:0",
        description="HOST:PORT the ServerApp serves bulk transfers on (0: any free port); "
        "fedseg-server sets a loopback port behind its public fleet proxy")
    bulk_url: str | None = Field(
        default=None,
        description="base URL the sites are told for bulk transfers (default: http://HOST:PORT "
        "of bulk_listen); a path such as '/fedseg/bulk' means the address each site's "
        "SuperNode connects to (fedseg-server's public port)")
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
    dp: DPSettings = Field(
        default_factory=DPSettings,
        description="[job.dp] differential privacy, off by default: enabled, clip_norm (L2 "
        "bound of each site's update), noise_multiplier or target_epsilon, delta; each pooled "
        "train record then logs dp_epsilon and dp_sigma (fedseg/privacy/dp.py)")
    robust: RobustConfig = Field(
        default_factory=RobustConfig,
        description="[job.robust] against a dishonest site: plausibility checks on the unmasked "
        "secure sums (a refused round is retried with the model unchanged) and the binding of "
        "each node's authenticated key to its roster site (fedseg/server/plausibility.py)")

    tensorboard: bool = Field(
        default=False,
        description="also write TensorBoard event files to RUN_DIR/tensorboard/ (one run per "
        "site and pooled; needs the optional extra: pip install 'fedseg[tracking]')")

    @field_validator("configurations")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"{v}: each configuration once")
        return v

    @field_validator("tensorboard")
    @classmethod
    def _tensorboard_installed(cls, on: bool) -> bool:
        from fedseg.server import tracking

        if on and not tracking.available():  # refused with the config, not rounds later
            raise ValueError(tracking.MISSING)
        return on

    @property
    def name(self) -> str:
        """The job's id as the sites see it: ``job_id``, else the run folder's name."""
        return self.job_id or Path(self.run_dir).name

    @property
    def models(self) -> int:
        """Models the job trains, one after the other: ``folds`` per configuration."""
        return self.folds * max(1, len(self.configurations))

    @property
    def total_rounds(self) -> int:
        """Rounds of the whole job: ``rounds`` per model."""
        return self.rounds * self.models

    def model_of(self, rnd: int) -> tuple[int, int]:
        """(model index, round within that model's ``rounds``) of the job's round ``rnd``
        (1-based); model m is fold ``m % folds`` of configuration ``m // folds``."""
        return (rnd - 1) // self.rounds, (rnd - 1) % self.rounds + 1

    def fold_of(self, rnd: int) -> tuple[int, int]:
        """(fold, round within its model's ``rounds``) of the job's round ``rnd``."""
        model, local = self.model_of(rnd)
        return model % self.folds, local

    @model_validator(mode="after")
    def _selection_needs_folds(self) -> JobConfig:
        if self.configurations:
            if self.configuration is not None:
                raise ValueError("give either configuration (one) or configurations (several "
                                 "to choose from), not both")
            if self.folds < 2:
                raise ValueError("configurations: choosing among configurations needs "
                                 "cross-validation; set folds = 2 or more (nnU-Net: 5)")
        return self

    @model_validator(mode="after")
    def _dp_reachable(self) -> JobConfig:
        if self.dp.enabled:  # a target_epsilon no noise level reaches over `rounds` fails here
            self.dp.resolve(self.total_rounds)
        return self


def train_request_fields(
    cfg: JobConfig, plan_hash: str, rnd: int, evaluate_first: bool
) -> dict[str, Any]:
    """What every site's TRAIN message of round ``rnd`` says, plain or secure: the local
    iterations, where they sit in the global poly schedule (of the round's fold model, with
    cross-validation), and the site-side recipe."""
    fold, local = cfg.fold_of(rnd)
    return {
        "round": rnd, "job_id": cfg.name,
        "fold": fold, "folds": cfg.folds,
        "local_iterations": cfg.local_iterations,
        "global_iteration_start": (local - 1) * cfg.local_iterations,
        "global_total_iterations": cfg.rounds * cfg.local_iterations,
        "plan_hash": plan_hash,
        "proximal_mu": cfg.proximal_mu if cfg.aggregation.kind == "fedprox" else 0.0,
        "seed": cfg.seed, "evaluate_first": evaluate_first,
        "reset_momentum": cfg.site_momentum == "reset", "initial_lr": cfg.site_lr,
        "momentum": cfg.site_momentum_beta,
    }


# files 'fedseg provision' writes into its folder, by the ServerConfig field they default
SERVER_PKI_FILES = {"tls_certfile": "server.pem", "tls_keyfile": "server.key",
                    "tls_ca_certfile": "ca.pem", "roster": "roster.json",
                    "app_signing_key": "app-signing.key"}


class ServerConfig(BaseModel):
    """``server.toml``: the supervised SuperLink, the fleet proxy in front of it, and the job.

    Sites reach ONLY ``host:port``, the fleet proxy, which forwards the SuperNode API
    (``/v1/fleet/``) and nothing else to the SuperLink on ``127.0.0.1:superlink_port``: run
    submission and key registration (Flower's Control API, which has no login) stay on loopback.
    Security is on by default and comes from ONE folder, ``pki`` (what ``fedseg provision``
    wrote); each file in it can be overridden by its own field."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="0.0.0.0",
                      description="public address of the fleet proxy: what the sites connect to")
    port: int = Field(default=9092, ge=1, le=65535, description="public port (the fleet proxy)")
    superlink_port: int = Field(
        default=9093, ge=0, le=65535,
        description="the SuperLink's port, bound to 127.0.0.1 only (0: pick a free one)")
    state_dir: str = Field(default="fedseg-server-state", description="SuperLink DB, logs")
    superlink_database: Literal["disk", "memory"] = Field(
        default="disk",
        description="disk: the SuperLink's state in STATE_DIR/superlink.db (SQLite); Flower 1.42 "
        "then also stores every message's arrays in that file, which costs time per round at "
        "nnU-Net model sizes (BENCHMARKS.md). memory: faster; nothing fedseg needs is lost on a "
        "restart (the job resumes from its own checkpoint, site keys are registered again at "
        "every start)")
    insecure: bool = Field(
        default=False, description="plain HTTP and no SuperNode authentication: a trial on "
        "loopback only (refused unless host is a loopback address)")
    pki: str | None = Field(
        default=None, description="the folder 'fedseg provision' wrote: server.pem, "
        "server.key, ca.pem, roster.json and app-signing.key are taken from it")
    tls_certfile: str | None = Field(default=None, description="default PKI/server.pem")
    tls_keyfile: str | None = Field(default=None, description="default PKI/server.key")
    tls_ca_certfile: str | None = Field(default=None, description="default PKI/ca.pem")
    roster: str | None = Field(
        default=None, description="default PKI/roster.json: every site in it is registered "
        "with the SuperLink (SuperNode authentication); also the job's roster unless [job] "
        "sets one")
    app_signing_key: str | None = Field(
        default=None, description="default PKI/app-signing.key if the folder holds it: the "
        "job is submitted as an app bundle signed with it (sites run only signed bundles); "
        "\"\" = submit unsigned")
    job: JobConfig

    def with_pki_defaults(self) -> ServerConfig:
        """A copy in which every security file left unset is taken from ``pki``
        (``app_signing_key`` only when the folder holds one)."""
        if not self.pki:
            return self.model_copy()
        update = {}
        for field, name in SERVER_PKI_FILES.items():
            if getattr(self, field) is None:
                path = Path(self.pki) / name
                if field != "app_signing_key" or path.is_file():
                    update[field] = str(path)
        return self.model_copy(update=update)
