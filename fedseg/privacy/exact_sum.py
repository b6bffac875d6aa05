"""Exact secure sums of float64 vectors: fixed point in 16-bit limbs, carried as SecAgg integers.

Why: the float path of secure aggregation (``masking.quantize_into``) clips every value to
[-C, C] and keeps ~31 bits, which suits clipped model deltas but not a dataset fingerprint
(``Fingerprint.to_vector``): its entries range from weights of 1/n_c (one voxel of a case with
n_c foreground voxels, ~1e-7) to Σ_c mean(x²)_c (~1e11 for CT), and the plan must be the one
made from the exact pooled fingerprint. SecAgg's integer fields are summed exactly (mod 2^32,
each site's value ≤ ⌊(2^32 - 1)/n⌋), so a float64 vector is carried as integers:

1. fixed point with ``FRAC_BITS`` fractional bits: q = round(x · 2^F) — exact in float64
   (``np.ldexp`` by a power of two, then ``np.rint``);
2. two's complement in a ring of 2^(16K) (K = ``LIMBS``): |q| split into K little-endian 16-bit
   limbs — exactly: |q| = hi·2^48 + lo with hi = floor(|q|·2^-48) and lo = |q| - hi·2^48 both
   exact in float64 and below 2^63, then shifts and masks in int64 — and negative entries
   negated limb-wise (~q + 1 with carries).
   Two's complement instead of separate positive/negative parts halves the upload; the sign is
   recovered from the top bit of the summed value;
3. limb-major layout ``[limb 0 of all L entries | limb 1 | ...]`` of K·L integers < 2^16, one
   SecAgg integer field; n sites' limb sums are < n·2^16, exact in the uint32 ring for
   n ≤ 65537 (SecAgg's per-field maximum ⌊(2^32 - 1)/n⌋ ≥ 65535);
4. the server's summed limbs are carried (int64), reduced mod 2^(16K), read as signed and
   converted to float64: the EXACT sum of the sites' fixed-point values, rounded once or twice
   to float64 (≤ 1 ulp; the 16K-bit integer is split into 48-bit groups that float64 holds
   exactly).

Choice of F and K (``FRAC_BITS = 64``, ``LIMBS = 7``, 112-bit ring): the signed range of the
SUM is |Σ| < 2^(16K - 1 - F) = 2^47 ≈ 1.4e14, so each of n sites may contribute
|x| ≤ 2^47 / n (``max_abs``; e.g. 4.7e13 for 3 sites, 1.4e12 for 100) — room for every entry of a
fingerprint: case and voxel counts, Σ_c mean(x²)_c up to ~1e13 (1000 cases of uint16 MRI at full
scale), histogram sums (cases x values). A site with a larger entry gets a clear error instead of
a wrong plan. The resolution 2^-64 ≈ 5e-20 per site makes the rounding error of the smallest
weights (1/n_c ≥ ~1e-9) ≤ 1e-10 relative — the pooled statistics agree with a float64 sum of the
sites' vectors to float64 rounding, not just to the bin width. Cost: 7 x 4 bytes per entry on the
wire (61 MB for the 2.2M-entry fingerprint of one channel; once per job) and the AES-CTR mask
expansion of that length at each site and at the server (~0.1 s per 30M words).
"""

from __future__ import annotations

import numpy as np

from fedseg.errors import FedsegError

LIMB_BITS = 16
LIMB = 1 << LIMB_BITS  # 65536
LIMBS = 7  # K
FRAC_BITS = 64  # F
RANGE_BITS = LIMB_BITS * LIMBS - 1 - FRAC_BITS  # |sum| < 2^RANGE_BITS
MAX_SITES = (2**32 - 1) // (LIMB - 1)  # 65537: limb sums stay below 2^32
_GROUP = 3  # limbs per exactly-convertible group (48 bits < 53)


def encoded_length(length: int) -> int:
    """Number of integers that carry a vector of ``length`` floats."""
    return LIMBS * int(length)


def max_abs(num_sites: int) -> float:
    """Largest |x| one site may contribute so that the sum of ``num_sites`` stays in range."""
    if not 1 <= num_sites <= MAX_SITES:
        raise ValueError(f"exact sums support 1..{MAX_SITES} sites, got {num_sites}")
    return float((2**RANGE_BITS - 1) // num_sites)


def encode(values: np.ndarray, num_sites: int, what: str = "vector") -> np.ndarray:
    """``values`` (float, any shape, flattened) → uint32[K·L] limbs (each < 2^16).

    Raises FedsegError if a value is not finite or exceeds :func:`max_abs` (``what`` names the
    vector in the message)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(x).all():
        raise FedsegError(f"{what}: holds NaN or infinite values; cannot be summed securely")
    bound = max_abs(num_sites)
    if x.size and float(np.max(np.abs(x))) > bound:
        i = int(np.argmax(np.abs(x)))
        raise FedsegError(
            f"{what}: entry {i} = {x[i]:.6g} exceeds the exact secure-sum range ±{bound:.3g} "
            f"(2^{RANGE_BITS} / {num_sites} sites); the data's values are too large for the "
            "fixed-point fingerprint encoding"
        )
    q = np.rint(np.ldexp(x, FRAC_BITS))  # exact: scaling by 2^F, then rounding to an integer
    neg = q < 0
    m = np.abs(q)  # < 2^(16K - 1)
    # split |q| exactly into two int64 parts: hi = floor(|q| / 2^48) (< 2^63), lo < 2^48
    hi = np.floor(np.ldexp(m, -_GROUP * LIMB_BITS))
    lo = (m - np.ldexp(hi, _GROUP * LIMB_BITS)).astype(np.int64)  # exact difference
    hi = hi.astype(np.int64)
    out = np.empty((LIMBS, x.size), dtype=np.int64)
    for k in range(LIMBS):
        part, shift = (lo, k) if k < _GROUP else (hi, k - _GROUP)
        out[k] = (part >> (shift * LIMB_BITS)) & (LIMB - 1)
    if neg.any():
        carry = neg.astype(np.int64)
        for k in range(LIMBS):
            t = np.where(neg, (LIMB - 1) - out[k], out[k]) + carry
            out[k] = t & (LIMB - 1)
            carry = t >> LIMB_BITS
    return out.reshape(-1).astype(np.uint32)


def _digits(limb_sums: np.ndarray, length: int) -> np.ndarray:
    s = np.asarray(limb_sums).reshape(-1).astype(np.int64)
    if s.size != LIMBS * length:
        raise FedsegError(f"summed limbs have {s.size} entries, expected {LIMBS} x {length}")
    if s.size and s.min() < 0:
        raise FedsegError("summed limbs must be non-negative")
    s = s.reshape(LIMBS, length)
    d = np.empty_like(s)
    carry = np.zeros(length, dtype=np.int64)
    for k in range(LIMBS):
        t = s[k] + carry
        d[k] = t & (LIMB - 1)
        carry = t >> LIMB_BITS
    return d  # the final carry is the multiple of 2^(16K) that the ring drops


def decode(limb_sums: np.ndarray, length: int) -> np.ndarray:
    """float64[length] from the element-wise SUM of several sites' :func:`encode` outputs
    (any integer dtype; e.g. SecAgg's int64 field sum)."""
    d = _digits(limb_sums, length)
    neg = d[LIMBS - 1] >= (LIMB >> 1)
    if neg.any():  # magnitude of a negative two's-complement value: ~d + 1
        carry = neg.astype(np.int64)
        for k in range(LIMBS):
            t = np.where(neg, (LIMB - 1) - d[k], d[k]) + carry
            d[k] = t & (LIMB - 1)
            carry = t >> LIMB_BITS
    val = np.zeros(length, dtype=np.float64)
    for g in reversed(range(0, LIMBS, _GROUP)):  # most significant group first
        group = np.zeros(length, dtype=np.int64)
        for k in reversed(range(g, min(g + _GROUP, LIMBS))):
            group = (group << LIMB_BITS) | d[k]
        val += np.ldexp(group.astype(np.float64), g * LIMB_BITS - FRAC_BITS)  # each term exact
    return np.where(neg, -val, val)


def fixed_point(values: np.ndarray) -> np.ndarray:
    """The float64 values a site's entries are rounded to by :func:`encode` (multiples of 2^-F);
    their exact sum is what :func:`decode` returns (up to float64 rounding)."""
    return np.ldexp(np.rint(np.ldexp(np.asarray(values, dtype=np.float64), FRAC_BITS)), -FRAC_BITS)
