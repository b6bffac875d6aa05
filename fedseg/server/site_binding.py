"""Each enrolled node's authenticated key decides which roster site it is.

Why (issue #13, point 4): a node's enrolment reply NAMES its site, and the server used to take
the name as said: a client holding hospitalB's key that claimed ``site = hospitalA`` enrolled as
hospitalA and displaced the real one. The name must come from the key the SuperLink
authenticated, not from the reply.

Where Flower has it: with SuperNode authentication every node was registered by
``fedseg-server`` (``flwr supernode register`` with the roster's keys) and each Fleet request is
signed with the node's key; the SuperLink's node table keeps the key per node id, and the
ServerApp reads it with ``grid.get_nodes()`` (Runtime API ``GetNodes`` -> ``NodeInfo.public_key``,
the SPKI PEM the CLI registered; flwr 1.42 ``superlink/servicer/runtime/runtime_handlers.py``
``get_nodes``). So at enrolment the server maps node id -> key -> roster site and refuses a
reply that names another site (logged ``refused`` in metrics.jsonl and the job log).

Plain-HTTP trials (``fedseg simulate``, ``insecure = true``) have no authentication: each
SuperNode self-registers a throw-away key, which matches no roster site. Such a node is not
bound (it is accepted as before) unless ``robust.require_site_keys`` is set, which
``fedseg-server`` does whenever authentication is on: then a node whose key is no roster
site's is refused too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from flwr.serverapp import Grid

from fedseg.server.plausibility import robust_config


def spki_der(key: bytes | str) -> bytes | None:
    """DER SubjectPublicKeyInfo of a public key given as PEM, DER or OpenSSH; None if it is none."""
    raw = key.encode() if isinstance(key, str) else bytes(key)
    for load in (serialization.load_pem_public_key, serialization.load_der_public_key,
                 serialization.load_ssh_public_key):
        try:
            pub = load(raw)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        return pub.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)
    return None


class SiteBinding:
    """Roster keys -> site names, and the claim check at enrolment."""

    def __init__(self, roster_path: str | None, required: bool) -> None:
        self.required = required
        self.sites: dict[bytes, str] = {}
        if roster_path:
            from fedseg.privacy.provision import load_roster

            for name, entry in load_roster(roster_path).sites.items():
                der = spki_der(entry.public_key_pem)
                if der is not None:
                    self.sites[der] = name

    @classmethod
    def for_job(cls, cfg: Any) -> SiteBinding:
        """The binding a job config asks for (its roster, ``robust.require_site_keys``)."""
        return cls(getattr(cfg, "roster", None), robust_config(cfg).require_site_keys)

    def site_of(self, public_key: bytes | None) -> str | None:
        der = spki_der(public_key) if public_key else None
        return self.sites.get(der) if der is not None else None

    def check(self, node_id: int, public_key: bytes | None, claimed: str) -> str | None:
        """Why the node may not enrol as ``claimed`` (None: it may)."""
        bound = self.site_of(public_key)
        if bound is not None and bound != claimed:
            return (f"node {node_id} is authenticated with the key of roster site '{bound}' but "
                    f"claims to be site '{claimed}'; a node enrols only as the site its key is")
        if bound is None and self.required:
            return (f"node {node_id} claims site '{claimed}', but its authenticated key is not "
                    "the key of any roster site")
        return None


def node_keys(grid: Grid, log: Callable[[str], None]) -> dict[int, bytes]:
    """node id -> the public key the SuperLink holds for it (empty where Flower has none)."""
    try:
        infos = list(grid.get_nodes())
    except Exception as err:  # noqa: BLE001 - e.g. a SuperLink hiccup: then no claim is bound
        log(f"enrolment: could not read the nodes' keys from the SuperLink ({err})")
        return {}
    return {int(i.node_id): bytes(i.public_key) for i in infos if getattr(i, "public_key", b"")}


def check_claims(binding: SiteBinding, grid: Grid, log: Callable[[str], None],
                 claims: dict[int, str]) -> dict[int, str]:
    """node id -> why its claimed site name is refused, for the claims that are."""
    if not claims:
        return {}
    keys = node_keys(grid, log)
    out = {}
    for nid, claimed in claims.items():
        why = binding.check(nid, keys.get(nid), claimed)
        if why is not None:
            out[nid] = why
    return out
