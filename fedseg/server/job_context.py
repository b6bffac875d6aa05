"""What the job's phases share: its configuration, run folder, messenger, enrolled sites, plan,
global model and the optional parts (secure aggregation, differential privacy, bulk transfers).

Why a dataclass of its own instead of the job object: every phase (``server/phases/``, the
``secure_*`` modules) takes exactly these collaborators, so none of them imports the driver
(``server/job.py``) and the driver imports them all — no import circle, and a test builds a
context with a stand-in messenger instead of a whole job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.serverapp import Grid

from fedseg.planning.plan import Plan
from fedseg.privacy.dp import JobAccountant
from fedseg.protocol import messages as pm
from fedseg.server.aggregate import ServerOptimizer, State
from fedseg.server.bulk_server import BulkServer
from fedseg.server.checkpoints import Checkpointer
from fedseg.server.config import JobConfig
from fedseg.server.messaging import Messenger
from fedseg.server.outbox import Outbox, model_bytes
from fedseg.server.rundir import RunDir
from fedseg.server.secure_state import SecureAggregation
from fedseg.server.site_binding import SiteBinding

Log = Callable[[str], None]


@dataclass
class Site:
    node_id: int
    info: pm.EnrolReply
    prepared_for: str = ""  # plan hash(es) the site has preprocessed for (plans_key)


@dataclass
class JobState:
    round: int = 0  # rounds completed
    weights: State = field(default_factory=dict)
    best_dice: float = -1.0
    model: int = 0  # the model being trained: fold model % folds of configuration model // folds
    # (after round, cases, Dice per class) of the latest pooled evaluation (phases/evaluation.py)
    last_pooled_eval: tuple[int, int, dict[str, float]] | None = None


@dataclass
class JobContext:
    cfg: JobConfig
    run: RunDir
    net: Messenger
    log: Log
    opt: ServerOptimizer
    checkpoints: Checkpointer
    state: JobState = field(default_factory=JobState)
    sites: dict[int, Site] = field(default_factory=dict)
    refused: set[int] = field(default_factory=set)  # node ids not asked again (a fixed site
    # gets a new id)
    plan: Plan | None = None  # the plan the current model trains with
    # several configurations (cfg.configurations): the plan set to each, in training order
    plans: dict[str, Plan] = field(default_factory=dict)
    secure: SecureAggregation | None = None  # secure aggregation, when on (job.py)
    privacy: JobAccountant | None = None  # differential privacy (cfg.dp), when on
    bulk: BulkServer | None = None  # bulk arrays over HTTP (cfg.bulk_transport)
    site_binding: SiteBinding | None = None  # node key -> roster site, made at first enrolment

    @classmethod
    def create(cls, grid: Grid, cfg: JobConfig, log: Log, net: Messenger | None = None
               ) -> JobContext:
        """A fresh job's context; ``net``: a messenger other than Flower's (tests)."""
        run = RunDir(cfg.run_dir)
        return cls(cfg=cfg, run=run, net=net or Messenger(grid, log), log=log,
                   opt=ServerOptimizer(cfg.aggregation), checkpoints=Checkpointer(run))

    def name(self, nid: int) -> str:
        s = self.sites.get(nid)
        return s.info.site if s else f"node-{nid}"

    def outbox(self, arrays: State | None, upload: bool = False) -> Outbox:
        """Outgoing model / incoming updates for one exchange (``server/outbox.py``); an upload
        slot takes at most the model's size (+1 MB of slack for small extra arrays)."""
        up = model_bytes(self.state.weights) + (1 << 20) if upload else None
        return Outbox(self.bulk, arrays, up)

    @property
    def fold(self) -> int:
        """The fold of the model being trained (0 without cross-validation)."""
        return self.state.model % self.cfg.folds

    def job_plans(self) -> list[Plan]:
        """Every plan the job trains with: one, or one per configuration."""
        assert self.plan is not None
        return list(self.plans.values()) or [self.plan]

    def plans_key(self) -> str:
        """What a site has preprocessed for when it can train every model of the job."""
        return "+".join(p.hash() for p in self.job_plans())

    def active_nodes(self) -> list[int]:
        """The sites prepared for the job's plan(s)."""
        h = self.plans_key()
        return [n for n, s in self.sites.items() if s.prepared_for == h]
