"""Transport security of a deployment: the flags and steps that Flower 1.42 really honours.

Checked against the installed flwr 1.42 and real processes on loopback
(tests/test_transport_security.py; commands in docs/security-notes.md):

- SuperLink: ``--ssl-certfile server.pem --ssl-keyfile server.key --ssl-ca-certfile ca.pem
  --enable-supernode-auth`` (auth refuses to start without TLS). With auth on, the Fleet API
  no longer lets SuperNodes self-register; each site's public key is registered through the
  Control API: ``flwr supernode register identity.pub <connection> --name SITE``. The
  open-source SuperLink needs no login for that (nor for anything else on the Control API).
- SuperNode: ``--root-certificates ca.pem --auth-supernode-private-key identity.key``
  (+ ``--trusted-entities trusted.yaml`` to run only consortium-signed app bundles). An
  unregistered key exits at once (status 1, log "Exit Code: 305 ... Failed to activate
  SuperNode"); a wrong CA exits at once the same way (CERTIFICATE_VERIFY_FAILED). Flower retries
  neither (HTTP 412 and TLS errors are not retryable).

``fedseg-server`` and ``fedseg-client`` apply all of this by default from the provisioning folder
(docs/security-notes.md §6); the start-up checks here (:func:`check_server_certificate`,
:func:`check_signing_key`, :func:`check_identity_key`) turn a wrong file into one line before any
process starts, instead of a site that cannot connect.
"""

from __future__ import annotations

import ipaddress
import json
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedseg.errors import FedsegError
from fedseg.privacy.provision import Roster
from fedseg.runtime.processes import flwr_cli

# flower-supernode logs "Exit Code: 305" when it cannot connect/authenticate (flwr ExitCode
# SUPERNODE_CONNECTION_ERROR); the process itself exits with status 1 (flwr_exit: 1 on error).
SUPERNODE_CONNECTION_ERROR = 305
SUPERNODE_CONNECTION_ERROR_LOG = "Exit Code: 305"


def pki_paths(pki_dir: Path | str) -> dict[str, Path]:
    """Standard file names inside a ``fedseg provision`` folder."""
    d = Path(pki_dir)
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key",
            "roster": d / "roster.json", "signing_key": d / "app-signing.key"}


def _need(*paths: Path | str) -> None:
    for p in paths:
        if not Path(p).is_file():
            raise FedsegError(f"{p}: file not found")


def superlink_security_args(certfile: Path | str, keyfile: Path | str,
                            ca_certfile: Path | str, enable_auth: bool = True) -> list[str]:
    """Flags for ``flower-superlink``: HTTPS on its one port, SuperNode authentication on."""
    _need(certfile, keyfile, ca_certfile)
    args = ["--ssl-certfile", str(certfile), "--ssl-keyfile", str(keyfile),
            "--ssl-ca-certfile", str(ca_certfile)]
    if enable_auth:
        args.append("--enable-supernode-auth")
    return args


def supernode_security_args(root_certificates: Path | str,
                            auth_private_key: Path | str | None = None,
                            trusted_entities: Path | str | None = None) -> list[str]:
    """Flags for ``flower-supernode`` (do not combine with ``--insecure``)."""
    _need(root_certificates)
    args = ["--root-certificates", str(root_certificates)]
    if auth_private_key is not None:
        _need(auth_private_key)
        args += ["--auth-supernode-private-key", str(auth_private_key)]
    if trusted_entities is not None:
        _need(trusted_entities)
        args += ["--trusted-entities", str(trusted_entities)]
    return args


def trusted_entities_file(roster: Roster, path: Path | str) -> Path:
    """Write the SuperNode's ``--trusted-entities`` YAML: ``{key_id: 'ssh-ed25519 AAAA...'}``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump({roster.app_signing.key_id: roster.app_signing.public_key},
                                default_flow_style=False))
    return p


def check_identity_key(roster: Roster, site: str, key_path: Path | str) -> None:
    """Fail early (one line) if a site's identity key is unreadable or not its roster key."""
    p = Path(key_path)
    try:
        key = serialization.load_ssh_private_key(p.read_bytes(), password=None)
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise FedsegError(f"{p}: not an OpenSSH private key ({err}); use the identity.key "
                          "written by 'fedseg provision'") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedsegError(f"{p}: the site identity key must be an ECDSA key")
    want = roster.site(site).public_key_pem.strip()
    got = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    if got.decode().strip() != want:
        raise FedsegError(f"{p}: this key is not the one the consortium roster lists for "
                          f"site '{site}'")


def check_server_certificate(certfile: Path | str, ca_certfile: Path | str,
                             loopback: str = "127.0.0.1") -> None:
    """Fail early (one line) unless ``certfile`` was issued by ``ca_certfile`` and names
    ``loopback``: the SuperLink listens on 127.0.0.1 only, and the fleet proxy and the ``flwr``
    CLI verify it there against the CA (a mismatch would otherwise show up as every site's
    requests failing with 502)."""
    certs = {}
    for name, p in (("certificate", Path(certfile)), ("CA certificate", Path(ca_certfile))):
        try:
            certs[name] = x509.load_pem_x509_certificate(p.read_bytes())
        except (OSError, ValueError) as err:
            raise FedsegError(f"{p}: not a PEM {name} ({err})") from None
    cert, ca = certs["certificate"], certs["CA certificate"]
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise FedsegError(f"{certfile}: not issued by the CA {ca_certfile}; use the server.pem "
                          "and ca.pem of one 'fedseg provision' run") from None
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    if ipaddress.ip_address(loopback) not in sans.get_values_for_type(x509.IPAddress):
        raise FedsegError(f"{certfile}: has no subject alternative name {loopback}, where the fleet "
                          "proxy and the flwr CLI reach the SuperLink; provision again with "
                          f"--server-san PUBLIC_NAME,{loopback}")


def check_signing_key(roster: Roster, key_path: Path | str) -> None:
    """Fail early (one line) if ``key_path`` is not the consortium's app-signing key: the sites
    trust only the roster's key (``--trusted-entities``) and would refuse every run it signs."""
    from fedseg.privacy.app_registry import load_signing_key
    from fedseg.privacy.provision import openssh_public

    got = openssh_public(load_signing_key(key_path).public_key()).split()[:2]
    if got != roster.app_signing.public_key.split()[:2]:
        raise FedsegError(f"{key_path}: not the consortium's app-signing key (roster key id "
                          f"{roster.app_signing.key_id}); the sites would refuse every run it signs")


def register_sites(
    roster: Roster,
    env: Mapping[str, str],
    connection: str | None = None,
    sites: Iterable[str] | None = None,
    timeout: float = 60.0,
) -> dict[str, int | None]:
    """Register roster sites' public keys with the SuperLink (``flwr supernode register``).

    ``env`` must carry the ``FLWR_HOME`` whose config.toml has a TLS connection to the
    SuperLink (``connection`` or the default one). Idempotent: a key that is already registered
    (the SuperLink state database persists across restarts) counts as done and maps to None,
    since the Flower CLI does not report its node id then.
    """
    names = list(sites) if sites is not None else sorted(roster.sites)
    out: dict[str, int | None] = {}
    with tempfile.TemporaryDirectory(prefix="fedseg-keys-") as tmp:
        for name in names:
            entry = roster.site(name)
            pub = Path(tmp) / f"{name}.pub"
            pub.write_text(entry.public_key + "\n")
            args = ["supernode", "register", str(pub)]
            if connection:
                args.append(connection)
            args += ["--name", name]
            try:
                data = flwr_cli(args, env, timeout=timeout)
            except FedsegError as err:
                if "already in use" in str(err).lower():
                    out[name] = None
                    continue
                raise FedsegError(f"registering site '{name}' with the SuperLink failed: "
                                  f"{err}") from None
            out[name] = int(data["node-id"])
    return out


def list_nodes(env: Mapping[str, str], connection: str | None = None,
               timeout: float = 60.0) -> list[dict]:
    """``flwr supernode ls --format json`` → [{'node-id', 'status', ...}]."""
    args = ["supernode", "ls"] + ([connection] if connection else [])
    return list(flwr_cli(args, env, timeout=timeout).get("nodes", []))


def online_node_ids(env: Mapping[str, str], connection: str | None = None) -> set[int]:
    return {int(n["node-id"]) for n in list_nodes(env, connection) if n.get("status") == "online"}


def save_node_ids(path: Path | str, node_ids: Mapping[str, int | None]) -> None:
    """Keep site -> node id (merged with what is there), for logs and per-site metrics."""
    p = Path(path)
    old: dict = json.loads(p.read_text()) if p.is_file() else {}
    old.update({k: v for k, v in node_ids.items() if v is not None})
    p.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
