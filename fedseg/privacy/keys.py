"""Keys and key derivations for SecAgg(+): site identities, per-round X25519 pairs, HKDF seeds.

Why hand-written: no maintained library implements the SecAgg(+) key schedule on top of
``cryptography`` (Flower's own SecAgg+ derives a 32-bit seed for NumPy's Mersenne Twister from an
unauthenticated exchange). The PRIMITIVES all come from ``cryptography`` — ECDSA P-384 signatures,
X25519, HKDF-SHA256, AES-GCM — and this module only fixes how they are combined:

- every derived key binds its purpose, the round id and the site names (length-prefixed, so no
  two different tuples encode to the same bytes): a key for one round, pair or direction can never
  be reused for another;
- a site's long-term identity is the ECDSA P-384 key it already has for Flower's SuperNode
  authentication (OpenSSH or PEM files), so the consortium roster of public keys is the same one
  that is registered with the SuperLink, and the server cannot swap per-round keys unnoticed;
- all secret randomness comes from the OS CSPRNG (``os.urandom`` via ``cryptography`` key
  generation, and :mod:`secrets`), never from NumPy.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedseg.errors import FedsegError

SEED_BYTES = 32
PROTOCOL_TAG = "fedseg-secagg/v1"


class SecAggAbort(FedsegError):
    """The secure-aggregation round cannot continue safely (forged keys, too few sites or shares,
    an inconsistent request). ``str(err)`` says why; nothing secret or partial is returned."""


# --------------------------------------------------------------------------- encoding


def encode_fields(*parts: str | bytes | int) -> bytes:
    """Unambiguous concatenation: each field as type tag + 4-byte length + bytes."""
    out = bytearray()
    for p in parts:
        if isinstance(p, str):
            tag, raw = b"s", p.encode("utf-8")
        elif isinstance(p, bytes):
            tag, raw = b"b", p
        elif isinstance(p, int):
            tag, raw = b"i", str(p).encode("ascii")
        else:  # pragma: no cover - programming error
            raise TypeError(f"cannot encode {type(p).__name__}")
        out += tag + len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def b64e(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def b64d(text: str, what: str = "value", length: int | None = None) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as err:
        raise SecAggAbort(f"{what} is not valid base64") from err
    if length is not None and len(raw) != length:
        raise SecAggAbort(f"{what} must be {length} bytes, got {len(raw)}")
    return raw


# --------------------------------------------------------------------------- identities


def load_identity_private_key(data: bytes | str) -> ec.EllipticCurvePrivateKey:
    """A site's long-term ECDSA P-384 key from OpenSSH (what ``ssh-keygen -t ecdsa -b 384`` writes
    for Flower's SuperNode auth) or PEM (PKCS#8 / SEC1), unencrypted."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        if raw.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
            key = serialization.load_ssh_private_key(raw, password=None)
        else:
            key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as err:
        raise FedsegError(f"cannot read the site identity key (OpenSSH or PEM, unencrypted): {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise FedsegError("the site identity key must be an ECDSA P-384 key (ssh-keygen -t ecdsa -b 384)")
    return key


def load_identity_public_key(data: bytes | str) -> ec.EllipticCurvePublicKey:
    """A roster entry: ECDSA P-384 public key as OpenSSH one-liner (``ecdsa-sha2-nistp384 ...``,
    the file registered with ``flwr supernode register``) or PEM SubjectPublicKeyInfo."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        if raw.lstrip().startswith(b"ecdsa-"):
            key = serialization.load_ssh_public_key(raw.strip())
        else:
            key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise FedsegError(f"cannot read a roster public key (OpenSSH or PEM): {err}") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise FedsegError("roster keys must be ECDSA P-384 public keys")
    return key


def generate_identity_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-384 identity (tests and tools; real sites use their SuperNode auth key)."""
    return ec.generate_private_key(ec.SECP384R1())


def identity_public_pem(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def public_key_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign(identity: ec.EllipticCurvePrivateKey, payload: bytes) -> bytes:
    return identity.sign(payload, ec.ECDSA(hashes.SHA384()))


def verify(public: ec.EllipticCurvePublicKey, signature: bytes, payload: bytes) -> bool:
    try:
        public.verify(signature, payload, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False
    return True


# --------------------------------------------------------------------------- per-round keys


def new_x25519() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def x25519_private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def x25519_public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def new_self_mask_seed() -> bytes:
    """b_i: 256 bits from the OS CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


def self_mask_commitment(round_id: str, site: str, seed: bytes) -> bytes:
    """SHA-256 commitment to b_i, signed in the advertisement: hiding (b_i has 256 bits of entropy),
    and it lets the server check a reconstructed b_i before using it (a bad share is detected,
    not silently turned into a wrong aggregate)."""
    return hashlib.sha256(encode_fields(PROTOCOL_TAG, "self-mask-commitment", round_id, site, seed)).digest()


def _round_salt(round_id: str) -> bytes:
    return hashlib.sha256(encode_fields(PROTOCOL_TAG, "round-salt", round_id)).digest()


def _ecdh(own: X25519PrivateKey, peer: X25519PublicKey) -> bytes:
    try:
        return own.exchange(peer)
    except ValueError as err:  # all-zero shared secret: a low-order (malicious) public key
        raise SecAggAbort("key agreement failed: a peer's X25519 public key is degenerate") from err


def pairwise_seed(
    own: X25519PrivateKey, peer: X25519PublicKey, round_id: str, site_a: str, site_b: str
) -> bytes:
    """The 32-byte pairwise mask seed of sites a and b in this round: HKDF-SHA256 over their X25519
    shared secret, salt from the round id, info naming both sites in canonical (sorted) order, so
    both ends derive the same seed and no other pair or round does."""
    lo, hi = sorted((site_a, site_b))
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=SEED_BYTES,
        salt=_round_salt(round_id),
        info=encode_fields(PROTOCOL_TAG, "pairwise-mask-seed", round_id, lo, hi),
    )
    return hkdf.derive(_ecdh(own, peer))


def share_encryption_key(
    own: X25519PrivateKey, peer: X25519PublicKey, round_id: str, sender: str, recipient: str
) -> bytes:
    """AES-256-GCM key for the shares ``sender`` sends to ``recipient`` in this round (direction is
    part of the derivation, so the two directions of a pair use different keys)."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=_round_salt(round_id),
        info=encode_fields(PROTOCOL_TAG, "share-encryption-key", round_id, sender, recipient),
    )
    return hkdf.derive(_ecdh(own, peer))


def share_associated_data(round_id: str, sender: str, recipient: str) -> bytes:
    return encode_fields(PROTOCOL_TAG, "share", round_id, sender, recipient)


def advertisement_payload(
    site: str, round_id: str, c_pk: bytes, s_pk: bytes, b_commit: bytes, config_digest: str
) -> bytes:
    """What a site signs with its identity key when it advertises its round keys."""
    return encode_fields(PROTOCOL_TAG, "advertisement", site, round_id, c_pk, s_pk, b_commit, config_digest)
