"""Site side of secure aggregation in the federation: config, keys, persisted state, one step.

Flower starts a fresh ClientApp process for every message, so each handler builds a
:class:`SiteAgent` from the site's node config (``identity-key``: the site's ECDSA P-384 key from
``fedseg provision``; ``roster``: the consortium's ``roster.json``), the parameters the server
proposes (:class:`~fedseg.protocol.messages.SecAggParams`) and the site's persisted
:class:`~fedseg.privacy.secagg.SiteState` — the per-round private keys, written to
``CACHE_DIR/secagg/<job id>.json`` with mode 0600 and never sent anywhere.

What the site checks before it takes part (everything else is checked by ``SecAggSite``):

- the roster and threshold come from the site's OWN files; the server only proposes the
  threshold t and clip C, and ``SecAggConfig`` refuses 2t <= n (a server could otherwise lower the
  threshold until it can unmask single sites);
- a round id to advertise must start with the Flower run id of the message carrying it
  (``Message.metadata.run_id``) and is single-use per site and job, so a resumed or retried
  round always gets fresh keys: round ids are ``<run id>/.../<n>`` with n (the server's set-up
  counter) strictly increasing within a Flower run, and the site keeps the highest n it
  advertised per run (``StoredState.high_water``) and refuses any id at or below it.

What is kept (``prune``, on every save; the file stays the same size however many rounds run):
the latest round this site masked (its unmask, and so dropout recovery of the current round,
needs the peers' shares it holds) and the rounds advertised after it (the next round's keys,
at most ``MAX_PENDING_ROUNDS``). Rounds before that can never be used again — the server runs
rounds one after another and sets up a fresh id when it gives one up — so they are deleted;
so are, once the round is masked, the site's own round secrets (nothing reads them after the
upload: the unmask reveals only peers' shares). The high-water marks (one number per Flower
run of the job) replace the growing list of used ids, of which only the last
``MAX_USED_IDS`` are kept.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedseg.errors import FedsegError
from fedseg.privacy.aggregates import sum_of_squares
from fedseg.privacy.keys import SecAggAbort, load_identity_private_key
from fedseg.privacy.secagg import SecAggConfig, SecAggSite, SiteState

__all__ = ["SiteAgent", "StoredState", "check_local_update", "node_config_paths", "prune",
           "state_path"]

MAX_PENDING_ROUNDS = 4  # rounds advertised after the latest masked one (normally 1, at most 2)
MAX_USED_IDS = 16  # used round ids kept besides the high-water marks (defence in depth)
_ROUND_ID = re.compile(r"^(\d+)/(?:.*/)?(\d+)$")


def node_config_paths(node_config: Mapping[str, object]) -> tuple[Path, Path]:
    """(identity key, roster) from the node config, or a FedsegError saying what is missing."""
    key, roster = node_config.get("identity-key"), node_config.get("roster")
    if not key or not roster:
        raise FedsegError(
            "the server runs this job with secure aggregation, but this site has no "
            "'identity-key' and 'roster' in its node config; start it with fedseg-client "
            "--identity-key KEY --roster roster.json (files from 'fedseg provision')"
        )
    return Path(str(key)), Path(str(roster))


def state_path(cache_dir: Path, job_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)[:120] or "job"
    return Path(cache_dir) / "secagg" / f"{safe}.json"


def _write_private(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (a crash leaves the old or the new file, never a
    mix); the file is 0600 from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)  # the rename itself survives a power loss
    finally:
        os.close(dfd)


def round_counter(round_id: str) -> tuple[int, int] | None:
    """(Flower run id, set-up counter n) of a round id ``<run id>/.../<n>``, else None."""
    m = _ROUND_ID.match(round_id)
    return (int(m.group(1)), int(m.group(2))) if m else None


class StoredState(BaseModel):
    """The file ``CACHE_DIR/secagg/<job id>.json``: the library's state plus the high-water
    marks. A file from before (a bare ``SiteState``) is read too."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[2] = 2
    high_water: dict[int, int] = Field(
        default_factory=dict, description="Flower run id -> highest round counter advertised")
    state: SiteState

    @classmethod
    def load(cls, text: str) -> StoredState:
        try:
            return cls.model_validate_json(text)
        except ValidationError:
            legacy = SiteState.model_validate_json(text)  # raises ValueError if neither
        marks: dict[int, int] = {}
        for rid in legacy.used_rounds:
            rc = round_counter(rid)
            if rc is not None:
                marks[rc[0]] = max(marks.get(rc[0], 0), rc[1])
        return cls(high_water=marks, state=legacy)


_DONE_WITH_SECRETS = {"c_sk": "", "s_sk": "", "b": "", "verified": {}, "share_request": None,
                      "share_reply": None}


def prune(state: SiteState, max_pending: int = MAX_PENDING_ROUNDS,
          max_used: int = MAX_USED_IDS) -> SiteState:
    """A copy of ``state`` with only what a later step can still need (module docstring):
    the latest masked/answered round, stripped of the site's own secrets (and, once answered,
    of the held shares: the stored reply answers a repeated identical request), and at most
    ``max_pending`` rounds advertised after it. Ids of deleted rounds stay refused through the
    high-water marks (and the last ``max_used`` used ids)."""
    ids = list(state.rounds)  # advertisement order
    done = [i for i, rid in enumerate(ids) if state.rounds[rid].stage in ("masked", "answered")]
    start = done[-1] + 1 if done else 0
    pending = ids[start:][-max_pending:] if max_pending > 0 else []
    keep = ([ids[done[-1]]] if done else []) + pending
    rounds = {}
    for rid in keep:
        rs = state.rounds[rid]
        if rs.stage in ("masked", "answered", "aborted"):
            upd = dict(_DONE_WITH_SECRETS)
            if rs.stage != "masked":
                upd["held"] = {}
            rs = rs.model_copy(update=upd)
        rounds[rid] = rs
    used = [u for i, u in enumerate(state.used_rounds)
            if u in rounds or i >= len(state.used_rounds) - max_used]
    return SiteState(site=state.site, used_rounds=used, rounds=rounds)


class SiteAgent:
    """One message's worth of the site's secure-aggregation work (see the module docstring)."""

    def __init__(
        self,
        site: str,
        node_config: Mapping[str, object],
        cache_dir: Path,
        params: object,  # fedseg.protocol.messages.SecAggParams (no import cycle)
        run_id: int,
    ) -> None:
        from fedseg.privacy.provision import load_roster

        key_path, roster_path = node_config_paths(node_config)
        roster = load_roster(roster_path)
        try:
            self.config = SecAggConfig(
                roster={name: ident.public_key_pem for name, ident in roster.sites.items()},
                threshold=params.threshold,  # type: ignore[attr-defined]
                clip=params.clip,  # type: ignore[attr-defined]
            )
        except ValueError as err:
            raise SecAggAbort(
                f"site {site!r} refuses the secure-aggregation settings the server proposed: "
                f"{' '.join(str(err).split())[:300]}"
            ) from None
        if int(params.run_id) != int(run_id):  # type: ignore[attr-defined]
            raise SecAggAbort(
                f"site {site!r}: the secure-aggregation parameters name Flower run "
                f"{params.run_id}, but the message belongs to run {run_id}"  # type: ignore[attr-defined]
            )
        try:
            identity = load_identity_private_key(key_path.read_bytes())
        except OSError as err:
            raise FedsegError(f"{key_path}: cannot read the site's identity key ({err})") from None
        self.run_id = int(run_id)
        self.job_id = str(params.job_id)  # type: ignore[attr-defined]
        self.path = state_path(cache_dir, self.job_id)
        state = None
        self.high_water: dict[int, int] = {}
        if self.path.is_file():
            try:
                stored = StoredState.load(self.path.read_text())
            except ValueError as err:
                raise FedsegError(f"{self.path}: unreadable secure-aggregation state ({err})") from None
            state, self.high_water = stored.state, dict(stored.high_water)
        self.site = SecAggSite(self.config, site, identity, state)

    def save(self) -> None:
        """Prune what can never be needed again (module docstring), then write atomically."""
        self.site.state = prune(self.site.state)
        stored = StoredState(high_water=self.high_water, state=self.site.state)
        _write_private(self.path, stored.model_dump_json())

    def advertise(self, round_id: str) -> object:  # -> KeyAdvertisement
        """Fresh keys for ``round_id`` (the same ones again while that round is open), after
        the freshness checks of the module docstring."""
        open_round = self.site.state.rounds.get(round_id)
        if open_round is None or open_round.stage == "aborted":
            rc = round_counter(round_id)
            if rc is None or rc[0] != self.run_id:
                raise SecAggAbort(
                    f"round id {round_id!r} is not '{self.run_id}/.../<number>'; round ids must "
                    "name this Flower run and end with the server's set-up counter")
            if rc[1] <= self.high_water.get(rc[0], 0):
                raise SecAggAbort(
                    f"site {self.site.site!r}: round id {round_id!r} is not newer than round "
                    f"{self.high_water[rc[0]]} already advertised in Flower run {rc[0]}; round "
                    "ids must never repeat")
        adv = self.site.advertise(round_id)
        rc = round_counter(round_id)
        if rc is not None:
            self.high_water[rc[0]] = max(self.high_water.get(rc[0], 0), rc[1])
        return adv

    def process(
        self,
        part: object,  # fedseg.protocol.messages.SecAggPart
        values: Callable[[], tuple[np.ndarray | Mapping[str, np.ndarray], Mapping[str, object]]]
        | None = None,
        *,
        weight: float = 1.0,
        buffer: np.ndarray | None = None,
    ) -> tuple[object, np.ndarray | None]:
        """Run the steps ``part`` asks for, in protocol order; returns the reply part and the
        masked vector (or None). ``values()`` supplies (float vector or tensors, int fields)
        when the part carries a mask request; ``weight`` and ``buffer`` (its ``out``) go to
        ``SecAggSite.mask``. The state is saved even when a step aborts."""
        from fedseg.protocol.messages import SecAggReplyPart

        out: dict[str, object] = {}
        vector = None
        try:
            if part.unmask is not None:  # type: ignore[attr-defined]
                out["unmask"] = self.site.unmask(part.unmask)  # type: ignore[attr-defined]
            if part.share_keys is not None:  # type: ignore[attr-defined]
                out["share_keys"] = self.site.share_keys(part.share_keys)  # type: ignore[attr-defined]
            if part.mask is not None:  # type: ignore[attr-defined]
                if values is None:
                    raise SecAggAbort("the server sent a mask request with a message that has no values")
                floats, ints = values()
                meta, vector = self.site.mask(part.mask, floats, ints,  # type: ignore[attr-defined]
                                              weight=weight, out=buffer)
                out["masked"] = meta
            adverts = []
            for rid in part.advertise:  # type: ignore[attr-defined]
                if not rid.startswith(f"{self.run_id}/"):
                    raise SecAggAbort(
                        f"round id {rid!r} does not start with this Flower run's id {self.run_id}; "
                        "round ids must never repeat across runs"
                    )
                adverts.append(self.advertise(rid))
            out["advertisements"] = adverts
        finally:
            self.save()
        return SecAggReplyPart(**out), vector


def check_local_update(delta: Mapping[str, np.ndarray], max_norm: float | None) -> float:
    """The site-side update check that replaces the server's ``check_update`` under secure
    aggregation (the server sees only the sum): every value finite and, if ``max_norm`` is set,
    global L2 norm <= max_norm. Returns the norm; raises ValueError with the reason."""
    sq = 0.0
    for k, d in delta.items():
        s = sum_of_squares(d)  # float64: finite for any finite float32/float64 tensor
        if not math.isfinite(s):
            raise ValueError(f"'{k}' holds NaN or Inf")
        sq += s
    norm = float(np.sqrt(sq))
    if max_norm is not None and norm > max_norm:
        raise ValueError(f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}")
    return norm


