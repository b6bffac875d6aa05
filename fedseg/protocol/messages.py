"""Messages between the fedseg server and the sites, as versioned pydantic models.

Why a schema per phase: Flower's records are untyped bags of values; a site running an older
fedseg, or a server bug, would otherwise surface as a KeyError deep inside training. Each
message is serialised as JSON in a ``ConfigRecord`` (key ``"msg"``) and validated on receipt at
both ends; tensors travel next to it in an ``ArrayRecord`` (chunked by Flower). Both the server
and the client import this module, and it imports neither of them.

Versioning: every message carries ``PROTOCOL_VERSION`` and a peer refuses another version. A
field added within a version is optional and, while unset (None), left out of the JSON
(``_omit_unset``), so a peer built before it still reads the message; a peer that meets the
field SET refuses the message (``extra="forbid"``) rather than ignore it — e.g. a site without
differential privacy refuses a round that asks for it. A change an older peer must not read
bumps ``PROTOCOL_VERSION``.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from fedseg.privacy.secagg import (
    KeyAdvertisement,
    MaskedInput,
    MaskRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)

PROTOCOL_VERSION = 1

# Flower message types: "<type>.<action>" routes to the ClientApp's handler for that action.
ENROL = "query.enrol"
FINGERPRINT = "query.fingerprint"
PREPARE = "query.prepare"
TRAIN = "train"
EVALUATE = "evaluate"
# secure aggregation steps that cannot ride on another phase's message (fedseg/privacy/secagg.py)
SHARE_KEYS = "query.share_keys"
UNMASK = "query.unmask"


class ProtocolError(Exception):
    """A message that does not validate against its schema."""


class Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = PROTOCOL_VERSION


class Empty(Msg):
    pass


# ---- secure aggregation parts (ride on the phase messages; see fedseg/privacy/secagg.py) -----


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SecAggParams(_Part):
    """What the server proposes for the job's secure aggregation. A site builds its
    ``SecAggConfig`` from ITS OWN roster file plus these numbers and refuses what does not
    validate (e.g. a threshold t with 2t <= n); the config digest each site signs makes sites
    with different settings abort instead of mixing."""

    job_id: str = Field(min_length=1, max_length=200)
    run_id: int = Field(description="Flower run id: every round id starts with it")
    threshold: int
    clip: float


class SecAggPart(_Part):
    """Server → site, handled in this order: unmask (round r), share keys (round r+1), mask
    (with the phase's own values), advertise (fresh keys for the listed round ids)."""

    params: SecAggParams
    unmask: UnmaskRequest | None = None
    share_keys: ShareKeysRequest | None = None
    mask: MaskRequest | None = None
    advertise: list[str] = Field(default_factory=list)


class SecAggReplyPart(_Part):
    """Site → server; a masked vector travels in the ArrayRecord under ``SECAGG_VECTOR``."""

    unmask: UnmaskReply | None = None
    share_keys: ShareKeysReply | None = None
    masked: MaskedInput | None = None
    advertisements: list[KeyAdvertisement] = Field(default_factory=list)
    listening: bool = Field(
        default=False,
        description="the site takes the round's next step (unmask) from the bulk rendezvous its "
        "request named (fedseg/protocol/bulk.py: BulkRendezvous), so the server need not send "
        "it as a Flower message")


SECAGG_VECTOR = "secagg/vector"


class SecAggStepRequest(Msg):
    """``query.share_keys`` / ``query.unmask``: a secure-aggregation step on its own."""

    secagg: SecAggPart


class SecAggStepReply(Msg):
    site: str
    secagg: SecAggReplyPart


class EnrolRequest(Msg):
    secagg: SecAggPart | None = None
    hide_case_counts: bool = Field(
        default=False, description="secure aggregation on: per-site case counts stay at the site"
    )


class FingerprintRequest(Msg):
    secagg: SecAggPart | None = None


class EnrolReply(Msg):
    site: str
    channel_names: dict[str, str]
    labels: dict[str, int | list[int]]
    regions_class_order: list[int] | None = None
    file_ending: str
    num_training_cases: int | None = Field(description="None: hidden (secure aggregation)")
    num_validation_cases: int | None = None
    gpu_memory_gb: float = Field(description="memory of the site's GPU (0: CPU only)")
    device: str
    secagg: SecAggReplyPart | None = None


class FingerprintReply(Msg):
    """The fingerprint's additive vector travels in the ArrayRecord under "fingerprint" (plain)
    or, exactly encoded and masked, as the secure-aggregation vector (``secagg``)."""

    site: str
    num_cases: int | None = None
    secagg: SecAggReplyPart | None = None


class PrepareRequest(Msg):
    plan_json: str
    config: str | None = Field(default=None, description="None: the plan's default")
    secagg: SecAggPart | None = None  # round 1's share keys ride here
    hide_case_counts: bool = False  # secure aggregation: the site's case count stays there


class PrepareReply(Msg):
    site: str
    num_cases: int | None
    seconds: float
    secagg: SecAggReplyPart | None = None


class DPParams(_Part):
    """Differential privacy of one round (``fedseg/privacy/dp.py``): the site clips its
    UNWEIGHTED delta to L2 norm <= ``clip_norm`` (S) and adds N(0, (z·S)²/n) per value
    (z = ``noise_multiplier``, n = ``n_sites``, the sites asked this round) before masking, so
    the sum over the n sites carries noise std z·S."""

    clip_norm: float = Field(gt=0)
    noise_multiplier: float = Field(ge=0)
    n_sites: int = Field(ge=1, description="split count: the sites asked in this round")

    @classmethod
    def for_round(cls, cfg: object, n_sites: int) -> DPParams:
        """From a ``fedseg.privacy.dp.DPConfig`` (no import: this module stays light)."""
        return cls(clip_norm=cfg.clip_norm, noise_multiplier=cfg.noise_multiplier,  # type: ignore[attr-defined]
                   n_sites=n_sites)


class TrainRequest(Msg):
    """Global weights travel in the ArrayRecord "weights"."""

    round: int
    job_id: str
    local_iterations: int
    global_iteration_start: int
    global_total_iterations: int
    plan_hash: str
    proximal_mu: float = 0.0
    seed: int = 0
    fold: int = Field(default=0, ge=0, description="cross-validation: the fold whose split "
                      "the site trains and validates on (folds > 1)")
    folds: int = Field(default=1, ge=1, description="cross-validation folds (1: the fixed "
                       "1-in-5 hold-out of a one-model job)")
    initial_lr: float = Field(default=0.01, gt=0, description="the sites' poly schedule starts here")
    momentum: float = Field(default=0.99, ge=0, lt=1, description="the sites' SGD (Nesterov) momentum")
    reset_momentum: bool = Field(
        default=False, description="clear the site's SGD momentum before this round's steps"
    )
    evaluate_first: bool = Field(
        default=False, description="evaluate the received global weights before training"
    )
    secagg: SecAggPart | None = Field(
        default=None, description="secure aggregation: mask the update instead of sending it"
    )
    max_update_norm: float | None = Field(
        default=None, description="secure aggregation: the site checks its update's L2 norm"
    )
    case_scale: float = Field(
        default=1.0, gt=0,
        description="secure aggregation: the site masks (num_cases / case_scale) x delta",
    )
    per_site_metrics: bool = Field(
        default=True,
        description="False: the evaluation goes into the secure sum instead of in clear",
    )
    eval_classes: list[str] = Field(
        default_factory=list, description="class keys of the securely summed evaluation"
    )
    dp: DPParams | None = Field(
        default=None,
        description="differential privacy on: clip the unweighted delta, add the noise share",
    )

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> object:
        """Leave ``dp`` out while it is None (versioning: module docstring)."""
        data = handler(self)
        if isinstance(data, dict) and data.get("dp") is None:
            data.pop("dp", None)
        return data


CandidateName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.+-]{1,64}$")]
# an EvalReply scoring cv_candidates keys its dice_per_class "CANDIDATE/CLASS", and with
# cv_postprocess also "pp/VARIANT/CLASS" (fedseg.training.postprocess's candidates)
CV_POSTPROCESS_PREFIX = "pp"
PlanHash = Annotated[str, Field(pattern=r"^[0-9a-f]{1,64}$")]


class EvalRequest(Msg):
    round: int
    plan_hash: str
    job_id: str = Field(default="", max_length=200, description="the job (keys the site's "
                        "cross-validation predictions)")
    keep_cv_predictions: bool = Field(
        default=False, description="cross-validation: the site also keeps the fold model's "
        "probabilities of its validation cases (fedseg/training/cv_predictions.py)")
    cv_candidates: dict[CandidateName, list[PlanHash]] = Field(
        default_factory=dict, max_length=16,
        description="score these candidates (name -> the plans whose kept CV probabilities "
        "are averaged) instead of the model; no weights travel")
    cv_postprocess: CandidateName | None = Field(
        default=None, description="also score the postprocessing candidates on this one")
    fold: int = Field(default=0, ge=0, description="cross-validation: the fold whose split "
                      "the site trains and validates on (folds > 1)")
    folds: int = Field(default=1, ge=1, description="cross-validation folds (1: the fixed "
                       "1-in-5 hold-out of a one-model job)")
    secagg: SecAggPart | None = None
    per_site_metrics: bool = True
    eval_classes: list[str] = Field(default_factory=list)


def _none_is_nan(v: object) -> object:
    return float("nan") if v is None else v


# a metric no validation case defines (HD95 of a class missed or invented in every case, Dice of
# a class absent from all of them) is NaN; JSON writes NaN as null, so null reads back as NaN
MaybeNaN = Annotated[float, BeforeValidator(_none_is_nan)]


class EvalReply(Msg):
    site: str
    num_cases: int
    dice_per_class: dict[str, MaybeNaN]
    hd95_per_class: dict[str, MaybeNaN]
    hd95_missing_per_class: dict[str, int] = Field(
        default_factory=dict, description="cases whose HD95 is undefined (structure on one "
        "side only; left out of the mean), per class: counted in the run report")
    loss: float | None = None
    seconds: float
    secagg: SecAggReplyPart | None = None


class TrainReply(Msg):
    """The weight DELTA (new - global) travels in the ArrayRecord as "d/<name>" (plain) or,
    weighted, clipped and masked, as the secure-aggregation vector (``secagg``); then the
    loss and case count are in the secure sum too (None here)."""

    site: str
    num_cases: int | None = None
    iterations: int
    loss: float | None = None
    seconds: float
    iterations_per_s: float
    evaluation: EvalReply | None = None
    secagg: SecAggReplyPart | None = None


class ErrorReply(Msg):
    """A site-side failure the site wants the server to log (e.g. bad data)."""

    site: str
    kind: Literal["data", "internal", "rejected", "secagg", "refused"] = Field(
        description="rejected: the site refused its own update (validation before masking); "
        "secagg: a secure-aggregation check failed at the site (e.g. a forged key); "
        "refused: the site requires secure aggregation and the request would send its data "
        "unmasked"
    )
    message: str


class StepAnswer(Msg):
    """Site → server through a bulk rendezvous: the answer to a :class:`SecAggStepRequest`,
    exactly one of the reply (what a ``query.unmask`` reply would carry) or the error."""

    reply: SecAggStepReply | None = None
    error: ErrorReply | None = None

    @model_validator(mode="after")
    def _one(self) -> StepAnswer:
        if (self.reply is None) == (self.error is None):
            raise ValueError("a step answer holds exactly one of 'reply' and 'error'")
        return self


M = TypeVar("M", bound=Msg)


def encode(msg: Msg) -> str:
    return msg.model_dump_json()


def decode(raw: object, model: type[M]) -> M:
    if not isinstance(raw, str):
        raise ProtocolError(f"{model.__name__}: payload is {type(raw).__name__}, not JSON text")
    try:
        obj = model.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ProtocolError(f"{model.__name__}: field '{field}': {first['msg']}") from None
    if obj.version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{model.__name__}: protocol version {obj.version}, expected {PROTOCOL_VERSION}; "
            "run the same fedseg version at the server and every site"
        )
    return obj
