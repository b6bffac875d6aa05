"""Shamir secret sharing over GF(2^521 - 1), for the SecAgg(+) recovery secrets.

Why this exists: SecAgg needs every site's self-mask seed and pairwise-mask private key split
t-of-n among its peers, so the server can still remove the masks of sites that drop out (and the
self masks of those that do not) from any t answers, while t-1 colluders learn nothing.
``cryptography`` (our only crypto dependency) has no secret sharing at all, and the Python
libraries that do are unsuitable: PyCryptodome's ``SecretSharing`` works in GF(2^128) on 16-byte
secrets only (our secrets are 32 bytes) and would be a second crypto stack; the small PyPI
"shamir" packages are unreviewed and some use ``random``. Shamir's scheme itself is a few lines of
modular arithmetic, so we write it here, test it, and keep the only randomness on
:mod:`secrets` (the OS CSPRNG).

Field: the Mersenne prime p = 2^521 - 1. Any secret of up to 64 bytes (512 bits) is one field
element, so a 32-byte seed or X25519 private key is a single polynomial's constant term (no
chunking), and a share is one 66-byte value. Evaluation points are small positive integers
(the holder's 1-based position in the consortium roster), never 0.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
MAX_SECRET_BYTES = 64


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` for each evaluation point in ``xs``; any ``threshold``
    of them reconstruct it, fewer reveal nothing about it."""
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(f"secret must be 1..{MAX_SECRET_BYTES} bytes, got {len(secret)}")
    _check_points(xs)
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the number of shares {len(xs)}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _eval(coeffs, x) for x in xs}


def combine(shares: Mapping[int, int], secret_len: int) -> bytes:
    """The secret of length ``secret_len`` interpolated (at 0) from exactly the given shares.

    The caller passes at least ``threshold`` shares; with fewer (or corrupted ones) the result is
    an unrelated value, which is why callers check it against a commitment or a public key.
    Raises ValueError when the interpolated value cannot be a secret of that length."""
    if not shares:
        raise ValueError("no shares to combine")
    xs = list(shares)
    _check_points(xs)
    total = 0
    for j in xs:
        num, den = 1, 1
        for m in xs:
            if m != j:
                num = num * m % PRIME
                den = den * (m - j) % PRIME
        total = (total + (shares[j] % PRIME) * num * pow(den, -1, PRIME)) % PRIME
    if total >= 1 << (8 * secret_len):
        raise ValueError("shares do not interpolate to a secret of the expected length (inconsistent shares)")
    return total.to_bytes(secret_len, "big")


def share_to_hex(y: int) -> str:
    return y.to_bytes(SHARE_BYTES, "big").hex()


def share_from_hex(text: str) -> int:
    raw = bytes.fromhex(text)
    if len(raw) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(raw)}")
    y = int.from_bytes(raw, "big")
    if y >= PRIME:
        raise ValueError("share value is not a field element")
    return y


def _eval(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):  # Horner
        acc = (acc * x + c) % PRIME
    return acc


def _check_points(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ValueError("evaluation points must be distinct")
    for x in xs:
        if not 0 < x < PRIME:
            raise ValueError(f"evaluation point {x} must be in 1..p-1")
