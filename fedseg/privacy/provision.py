"""Consortium provisioning: a CA, the server certificate, one identity per site, a roster.

Why these formats (read off flwr 1.42, see docs/security-notes.md):

- TLS: the SuperLink serves HTTPS with ``--ssl-certfile/--ssl-keyfile`` (uvicorn, PEM files);
  SuperNodes and the ``flwr`` CLI verify it against ``--root-certificates`` / ``root-certificates``
  (the CA PEM). There is no client-certificate (mutual) TLS in Flower, so sites get no certs.
- Site identity: ``flower-supernode --auth-supernode-private-key`` loads the key with
  ``load_ssh_private_key`` and requires an EC key; ``flwr supernode register KEY.pub`` loads
  the public key with ``load_ssh_public_key`` and requires a NIST curve. So ``identity.key`` is
  an ECDSA P-384 key in OpenSSH private format and ``identity.pub`` the one-line OpenSSH public
  key (``ecdsa-sha2-nistp384 AAAA... fedseg:SITE``). The roster also carries its PEM form.
- App signing: ``--trusted-entities`` on the SuperNode accepts only Ed25519 keys written as
  OpenSSH public keys (``ssh-ed25519 AAAA...``) keyed by a public-key id; signatures are Ed25519
  over ``signed_at (8 bytes, big endian) || sha256(FAB)``. ``app-signing.key`` is an OpenSSH
  Ed25519 private key.

Only ``cryptography`` is used. Private keys are created with mode 0600 (never world-readable,
not even for an instant); an existing output folder is never overwritten without ``force``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedseg.errors import FedsegError, first_error

SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_SERVER_SANS = ("127.0.0.1", "localhost")
ROSTER_FILE = "roster.json"
# files/folders ``provision`` owns inside OUT (what --force replaces)
_ARTEFACTS = ("ca.pem", "ca.key", "server.pem", "server.key", "app-signing.key",
              "app-signing.pub", ROSTER_FILE, "sites")


# --------------------------------------------------------------------------- roster model
class SiteIdentity(BaseModel):
    """One site's public identity as every party holds it."""

    model_config = ConfigDict(extra="forbid")

    public_key: str = Field(description="OpenSSH one-line ECDSA P-384 public key "
                                        "(the form 'flwr supernode register' reads)")
    public_key_pem: str = Field(description="the same key as SubjectPublicKeyInfo PEM "
                                            "(the form the SuperLink stores)")

    @model_validator(mode="after")
    def _same_p384_key(self) -> SiteIdentity:
        ssh = _load_ssh_pub(self.public_key)
        try:
            pem = serialization.load_pem_public_key(self.public_key_pem.encode())
        except (ValueError, UnsupportedAlgorithm) as err:
            raise ValueError(f"public_key_pem is not a PEM public key ({err})") from None
        for k in (ssh, pem):
            if not isinstance(k, ec.EllipticCurvePublicKey) or not isinstance(k.curve,
                                                                               ec.SECP384R1):
                raise ValueError("site keys must be ECDSA P-384")
        if _spki(ssh) != _spki(pem):  # type: ignore[arg-type]
            raise ValueError("public_key and public_key_pem are different keys")
        return self


class AppSigner(BaseModel):
    """The consortium key that signs app bundles (``--trusted-entities`` on every site)."""

    model_config = ConfigDict(extra="forbid")

    key_id: str = Field(description="public-key id used in trusted-entities and signatures")
    public_key: str = Field(description="OpenSSH 'ssh-ed25519 AAAA...' public key")

    @field_validator("public_key")
    @classmethod
    def _ed25519(cls, v: str) -> str:
        if not isinstance(_load_ssh_pub(v), ed25519.Ed25519PublicKey):
            raise ValueError("the app-signing key must be Ed25519 (Flower accepts no other)")
        return v

    @field_validator("key_id")
    @classmethod
    def _key_id(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", v):
            raise ValueError("key_id: letters, digits, '_', '.', '-' only")
        return v


class Roster(BaseModel):
    """``roster.json``: who is in the consortium. Public material only — safe to copy around."""

    model_config = ConfigDict(extra="forbid")

    version: int = 1
    consortium: str
    created: dt.datetime
    sites: dict[str, SiteIdentity]
    app_signing: AppSigner
    ca_sha256: str = Field(description="SHA-256 of the CA certificate (DER), hex")
    server_sans: list[str] = Field(default_factory=list)

    @field_validator("sites")
    @classmethod
    def _site_names(cls, v: dict[str, SiteIdentity]) -> dict[str, SiteIdentity]:
        if not v:
            raise ValueError("a roster needs at least one site")
        for name in v:
            _check_site_name(name)
        keys = [s.public_key_pem for s in v.values()]
        if len(set(keys)) != len(keys):
            raise ValueError("two sites share one public key")
        return v

    def site(self, name: str) -> SiteIdentity:
        if name not in self.sites:
            raise FedsegError(f"site '{name}' is not in the consortium roster "
                              f"(sites: {', '.join(sorted(self.sites))})")
        return self.sites[name]


# --------------------------------------------------------------------------- helpers
def _load_ssh_pub(line: str) -> object:
    try:
        return serialization.load_ssh_public_key(line.strip().encode())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ValueError(f"not an OpenSSH public key ({err})") from None


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_site_name(name: str) -> str:
    if not SITE_NAME_RE.match(name):
        raise ValueError(f"site name '{name}': use 1-64 letters, digits, '_', '.', '-' "
                         "(starting with a letter or digit)")
    return name


def _write(path: Path, data: bytes, private: bool) -> None:
    """Create ``path`` (never replace); private files are 0600 from the first byte."""
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have cleared bits of a public file; fix both
        os.write(fd, data)
    finally:
        os.close(fd)


def _pem_private(key: object) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                             serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _openssh_private(key: object) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                             serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())


def openssh_public(key: object, comment: str = "") -> str:
    line = key.public_bytes(serialization.Encoding.OpenSSH,  # type: ignore[attr-defined]
                            serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".strip()


def parse_sans(sans: Sequence[str]) -> list[x509.GeneralName]:
    """``127.0.0.1`` / ``::1`` become IP-address SANs, everything else a DNS name."""
    out: list[x509.GeneralName] = []
    for raw in sans:
        s = raw.strip()
        if not s:
            continue
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(s.strip("[]"))))
            continue
        except ValueError:
            pass
        if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*\.?",
                            s):
            raise FedsegError(f"--server-san '{s}': neither an IP address nor a DNS name")
        out.append(x509.DNSName(s.rstrip(".")))
    if not out:
        raise FedsegError("--server-san: give at least one DNS name or IP address")
    return out


def _name(cn: str, org: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(consortium: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    name = _name(f"{consortium} consortium CA", consortium)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: Sequence[str],
    days: int, consortium: str,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    general = parse_sans(sans)
    cn = next((str(g.value) for g in general if isinstance(g, x509.DNSName)), str(general[0].value))
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, consortium)).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(general), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FedsegError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FedsegError(f"{out}: already exists and is not empty; refusing to overwrite "
                              "keys (pass --force to replace the provisioning in it)")
        for name in _ARTEFACTS:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    # it holds the CA's and the sites' private keys: owner only, whatever the umask (mkdir's
    # mode is masked by it, and under umask 000 the folder came out 0777)
    os.chmod(out, 0o700)


# --------------------------------------------------------------------------- public API
def provision(
    out: Path | str,
    sites: Sequence[str],
    server_sans: Sequence[str] = DEFAULT_SERVER_SANS,
    days: int = 825,
    consortium: str = "fedseg",
    force: bool = False,
) -> Roster:
    """Write the consortium's CA, server certificate, site identities, signing key, roster.

    Layout of ``out``::

        ca.pem ca.key                 CA certificate (give to every site) / key (keep offline)
        server.pem server.key         SuperLink TLS certificate, SANs = server_sans
        app-signing.key .pub          Ed25519 OpenSSH key pair that signs app bundles
        sites/<name>/identity.key     ECDSA P-384, OpenSSH private format (give to that site)
        sites/<name>/identity.pub     one-line OpenSSH public key
        roster.json                   public roster (sites -> public keys, signer, CA hash)
    """
    out = Path(out)
    names = [s.strip() for s in sites if s.strip()]
    if not names:
        raise FedsegError("provision: give at least one site (--sites hospitalA,hospitalB)")
    for n in names:
        try:
            _check_site_name(n)
        except ValueError as err:
            raise FedsegError(f"provision: {err}") from None
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FedsegError(f"provision: site name(s) given twice: {', '.join(dupes)}")
    if days < 1:
        raise FedsegError("provision: --days must be >= 1")
    parse_sans(server_sans)  # validate before touching the disk
    _prepare_out(out, force)

    ca_key, ca_cert = make_ca(consortium, days)
    srv_key, srv_cert = make_server_cert(ca_key, ca_cert, server_sans, days, consortium)
    _write(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "ca.key", _pem_private(ca_key), private=True)
    _write(out / "server.pem", srv_cert.public_bytes(serialization.Encoding.PEM)
           + ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "server.key", _pem_private(srv_key), private=True)

    sign_key = ed25519.Ed25519PrivateKey.generate()
    sign_pub = openssh_public(sign_key.public_key(), f"fedseg:{consortium}:app-signing")
    _write(out / "app-signing.key", _openssh_private(sign_key), private=True)
    _write(out / "app-signing.pub", (sign_pub + "\n").encode(), private=False)

    site_ids: dict[str, SiteIdentity] = {}
    (out / "sites").mkdir(mode=0o755)
    for name in names:
        d = out / "sites" / name
        d.mkdir(mode=0o700)
        key = ec.generate_private_key(ec.SECP384R1())
        pub_line = openssh_public(key.public_key(), f"fedseg:{name}")
        _write(d / "identity.key", _openssh_private(key), private=True)
        _write(d / "identity.pub", (pub_line + "\n").encode(), private=False)
        site_ids[name] = SiteIdentity(
            public_key=pub_line,
            public_key_pem=key.public_key().public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo).decode())

    roster = Roster(
        consortium=consortium,
        created=dt.datetime.now(dt.UTC).replace(microsecond=0),
        sites=site_ids,
        app_signing=AppSigner(key_id=f"fpk_{uuid.uuid4()}", public_key=sign_pub),
        ca_sha256=hashlib.sha256(ca_cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        server_sans=[s.strip() for s in server_sans if s.strip()],
    )
    _write(out / ROSTER_FILE, (roster.model_dump_json(indent=2) + "\n").encode(), private=False)
    return roster


def load_roster(path: Path | str) -> Roster:
    """Read ``roster.json`` (or a provisioning folder holding one); one-line FedsegError if bad."""
    p = Path(path)
    if p.is_dir():
        p = p / ROSTER_FILE
    if not p.is_file():
        raise FedsegError(f"{p}: roster not found; create one with 'fedseg provision'")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FedsegError(f"{p}: not a valid roster (unreadable JSON: {err})") from None
    try:
        return Roster.model_validate(data)
    except ValidationError as err:
        where, msg = first_error(err)
        raise FedsegError(f"{p}: not a valid roster ({where}: {msg})") from None


def check_ca_matches(roster: Roster, ca_pem: Path | str) -> None:
    """Fail if ``ca_pem`` is not the CA the roster was provisioned with."""
    p = Path(ca_pem)
    try:
        cert = x509.load_pem_x509_certificate(p.read_bytes())
    except (OSError, ValueError) as err:
        raise FedsegError(f"{p}: not a PEM certificate ({err})") from None
    got = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    if got != roster.ca_sha256:
        raise FedsegError(f"{p}: this CA is not the consortium's (roster ca_sha256 "
                          f"{roster.ca_sha256[:16]}..., file {got[:16]}...)")
