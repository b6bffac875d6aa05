"""Fixed-point quantisation and AES-256-CTR mask expansion for SecAgg(+).

Why hand-written: the masks must come from a cryptographic PRG (Flower's SecAgg+ uses NumPy's
Mersenne Twister seeded with 32 bits), and must be cheap at nnU-Net size (30M parameters).
AES-256-CTR from ``cryptography`` is both: the 32-byte seed is the AES key, the keystream of
4·L bytes is read as L little-endian uint32 words (``np.frombuffer``, no copy) and added in place
with uint32 wrap-around — about 0.1 s per 30M-element mask on one core, no more than MT. Each seed
is used for exactly one vector (it is unique per pair/site and round, and a site masks only one
input per round), so a fixed all-zero counter block is safe.

Quantisation (the ring is Z_{2^32}; the upload is the size of fp32 weights):
values are clipped to [-C, C] and mapped to signed integers q = round(x · q_max / C) with
q_max = floor((2^31 - 1) / n), n = number of sites in the roster. The sum of up to n such
integers lies in [-(2^31 - 1), 2^31 - 1], so it is recovered exactly from its residue mod 2^32
(read as int32) — no overflow whatever the inputs. The price is resolution:
    step Δ = C / q_max ≈ n · C / 2^31,   error of one site's value ≤ Δ/2,
    error of the recovered sum ≤ n · Δ/2,  error of the mean (sum / n) ≤ Δ/2 ≈ n · C / 2^32.
E.g. n = 5: Δ/2 ≈ 1.2e-9 · C. Relative to the typical size σ of the values the mean's error is
≤ 1.2e-9 · (n/5) · C/σ, so ≤ 1e-6 holds while C ≤ ~860 · σ · 5/n — choose C a few σ to tens
of σ above the update scale: a larger C clips less but costs resolution linearly, more sites
cost it linearly too (each doubling of n takes one bit). (Typical errors are smaller than these
bounds: round-to-nearest errors are uniform, RMS Δ/√12 per site.) A 64-bit ring would buy
32 more bits of resolution at twice the upload; 32 bits is ample for clipped deltas.
Non-negative integers (sample counts, the clip count) are appended unscaled, each
≤ floor((2^32 - 1) / n), so their sums are exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

RING_BITS = 32
CHUNK = 1 << 18  # elements per keystream block (1 MiB): bounded temporaries
QCHUNK = 1 << 16  # elements per quantisation block (512 KiB of float64: stays in cache)
_WORD = np.dtype("<u4")
_ZERO_BLOCK = bytes(4 * CHUNK)
_COUNTER0 = bytes(16)


def fixed_point_max(num_sites: int) -> int:
    """Largest |q| one site may contribute so the sum of ``num_sites`` never leaves int32."""
    if num_sites < 1:
        raise ValueError("num_sites must be >= 1")
    return (2**31 - 1) // num_sites


def quantization_step(clip: float, num_sites: int) -> float:
    """Δ: the value of one fixed-point unit."""
    return clip / fixed_point_max(num_sites)


def int_field_max(num_sites: int) -> int:
    """Largest non-negative integer one site may append (the sum of n stays < 2^32)."""
    return (2**32 - 1) // num_sites


def quantize_into(values: np.ndarray, out: np.ndarray, clip: float, num_sites: int) -> int:
    """Clip ``values`` to [-clip, clip], write their fixed-point ring form into ``out`` (uint32,
    same length); returns how many values were clipped. Non-finite values raise ValueError."""
    if values.ndim != 1 or out.shape != values.shape or out.dtype != np.uint32:
        raise ValueError("quantize_into: values must be 1-D and out a uint32 array of the same length")
    qmax = fixed_point_max(num_sites)
    scale = qmax / clip
    clipped = 0
    step = QCHUNK
    x = np.empty(min(step, values.shape[0]), dtype=np.float64)
    for a in range(0, values.shape[0], step):
        src = values[a : a + step]
        xv = x[: src.shape[0]]
        xv[...] = src
        lo, hi = float(xv.min()), float(xv.max())  # NaN propagates; two passes, no temporaries
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("the vector to aggregate contains NaN or infinite values")
        if lo < -clip or hi > clip:  # rare: count, then clip
            clipped += int(np.count_nonzero(xv > clip)) + int(np.count_nonzero(xv < -clip))
            np.clip(xv, -clip, clip, out=xv)
        xv *= scale
        np.rint(xv, out=xv)
        np.clip(xv, -qmax, qmax, out=xv)
        out[a : a + step] = xv.astype(np.int32).view(np.uint32)
    return clipped


def dequantize(summed: np.ndarray, clip: float, num_sites: int) -> np.ndarray:
    """float64 values of a ring sum of quantised vectors (of at most ``num_sites`` sites),
    converted block by block into one preallocated vector (no full-size temporaries)."""
    ints = summed.astype(np.uint32, copy=False).view(np.int32)
    out = np.empty(ints.shape, dtype=np.float64)
    step = quantization_step(clip, num_sites)
    for a in range(0, ints.shape[0], QCHUNK):
        blk = out[a : a + QCHUNK]
        blk[...] = ints[a : a + QCHUNK]
        blk *= step
    return out


def _stream(seed: bytes):
    if len(seed) != 32:
        raise ValueError("mask seeds are 32 bytes")
    return Cipher(algorithms.AES(seed), modes.CTR(_COUNTER0)).encryptor()


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """The uint32 mask vector of ``length`` words expanded from ``seed`` (AES-256-CTR keystream)."""
    return np.frombuffer(_stream(seed).update(bytes(4 * length)), dtype=_WORD).astype(np.uint32, copy=False)


def apply_masks(vec: np.ndarray, masks: Sequence[tuple[bytes, int]]) -> None:
    """In place: ``vec += sign · expand_mask(seed)`` (mod 2^32) for each ``(seed, sign)``,
    sign ∈ {+1, -1}; keystreams are generated block by block, never as whole vectors."""
    if vec.dtype != np.uint32 or vec.ndim != 1:
        raise ValueError("apply_masks: vec must be a 1-D uint32 array")
    streams = []
    for seed, sign in masks:
        if sign not in (1, -1):
            raise ValueError("mask sign must be +1 or -1")
        streams.append((_stream(seed), np.add if sign == 1 else np.subtract))
    n = vec.shape[0]
    for a in range(0, n, CHUNK):
        m = min(CHUNK, n - a)
        block = vec[a : a + m]
        zeros = _ZERO_BLOCK if m == CHUNK else bytes(4 * m)
        for enc, op in streams:
            op(block, np.frombuffer(enc.update(zeros), dtype=_WORD), out=block)
