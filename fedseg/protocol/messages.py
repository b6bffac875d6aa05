"""Messages between the fedseg server and the sites, as versioned pydantic models.

Why a schema per phase: Flower's records are untyped bags of values; a site running an older
fedseg, or a server bug, would otherwise surface as a KeyError deep inside training. Each
message is serialised as JSON in a ``ConfigRecord`` (key ``"msg"``) and validated on receipt at
both ends; tensors travel next to it in an ``ArrayRecord`` (chunked by Flower). Both the server
and the client import this module, and it imports neither of them.
"""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROTOCOL_VERSION = 1

# Flower message types: "<type>.<action>" routes to the ClientApp's handler for that action.
ENROL = "query.enrol"
FINGERPRINT = "query.fingerprint"
PREPARE = "query.prepare"
TRAIN = "train"
EVALUATE = "evaluate"


class ProtocolError(Exception):
    """A message that does not validate against its schema."""


class Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = PROTOCOL_VERSION


class Empty(Msg):
    pass


class EnrolReply(Msg):
    site: str
    channel_names: dict[str, str]
    labels: dict[str, int | list[int]]
    file_ending: str
    num_training_cases: int
    num_validation_cases: int
    gpu_memory_gb: float = Field(description="memory of the site's GPU (0: CPU only)")
    device: str


class FingerprintReply(Msg):
    """The fingerprint's additive vector travels in the ArrayRecord under "fingerprint"."""

    site: str
    num_cases: int


class PrepareRequest(Msg):
    plan_json: str
    config: str = "3d_fullres"


class PrepareReply(Msg):
    site: str
    num_cases: int
    seconds: float


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
    evaluate_first: bool = Field(
        default=False, description="evaluate the received global weights before training"
    )


class EvalRequest(Msg):
    round: int
    plan_hash: str


class EvalReply(Msg):
    site: str
    num_cases: int
    dice_per_class: dict[str, float]
    hd95_per_class: dict[str, float]
    loss: float | None = None
    seconds: float


class TrainReply(Msg):
    """The weight DELTA (new - global) travels in the ArrayRecord "delta"."""

    site: str
    num_cases: int
    iterations: int
    loss: float
    seconds: float
    iterations_per_s: float
    evaluation: EvalReply | None = None


class ErrorReply(Msg):
    """A site-side failure the site wants the server to log (e.g. bad data)."""

    site: str
    kind: Literal["data", "internal"]
    message: str


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
