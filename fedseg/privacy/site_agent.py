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
  (``Message.metadata.run_id``) and is single-use per site and job (``SiteState.used_rounds``),
  so a resumed or retried round always gets fresh keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from fedseg.errors import FedsegError
from fedseg.privacy.keys import SecAggAbort, load_identity_private_key
from fedseg.privacy.secagg import SecAggConfig, SecAggSite, SiteState

__all__ = ["SiteAgent", "check_local_update", "node_config_paths", "state_path"]


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
    """Atomically replace ``path`` with ``text``; the file is 0600 from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


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
        if self.path.is_file():
            try:
                state = SiteState.model_validate_json(self.path.read_text())
            except ValueError as err:
                raise FedsegError(f"{self.path}: unreadable secure-aggregation state ({err})") from None
        self.site = SecAggSite(self.config, site, identity, state)

    def save(self) -> None:
        _write_private(self.path, self.site.state.model_dump_json())

    def process(
        self,
        part: object,  # fedseg.protocol.messages.SecAggPart
        values: Callable[[], tuple[np.ndarray, Mapping[str, object]]] | None = None,
    ) -> tuple[object, np.ndarray | None]:
        """Run the steps ``part`` asks for, in protocol order; returns the reply part and the
        masked vector (or None). ``values()`` supplies (float vector, int fields) when the part
        carries a mask request. The state is saved even when a step aborts."""
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
                meta, vector = self.site.mask(part.mask, floats, ints)  # type: ignore[attr-defined]
                out["masked"] = meta
            adverts = []
            for rid in part.advertise:  # type: ignore[attr-defined]
                if not rid.startswith(f"{self.run_id}/"):
                    raise SecAggAbort(
                        f"round id {rid!r} does not start with this Flower run's id {self.run_id}; "
                        "round ids must never repeat across runs"
                    )
                adverts.append(self.site.advertise(rid))
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
        a = np.asarray(d)
        if not np.isfinite(a).all():
            raise ValueError(f"'{k}' holds NaN or Inf")
        f = a.ravel().astype(np.float64)
        sq += float(np.dot(f, f))
    norm = float(np.sqrt(sq))
    if max_norm is not None and norm > max_norm:
        raise ValueError(f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}")
    return norm


