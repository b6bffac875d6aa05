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
    return quantize_parts_into([values], out, clip, num_sites)


def quantize_parts_into(parts: Sequence[np.ndarray], out: np.ndarray, clip: float, num_sites: int,
                        weight: float = 1.0, masks: MaskStreams | None = None) -> int:
    """:func:`quantize_into` of the concatenation of ``parts`` (any shapes, read flat in C order)
    without building it, and with ``masks`` (if given) added to each block while it is in cache.

    Why fused: at 30M values a site used to build the weighted float64 vector (240 MB), quantise
    it into a fresh uint32 vector and then pass over that vector once per mask. Fresh large
    arrays are paid in page faults (measured on the 2-core box: ~0.6 s to first touch 240 MB),
    and each extra full pass costs memory bandwidth that five sites on two cores share. Here a
    block of 64 Ki values goes float32 → float64 → fixed point → masked while it stays in cache;
    the only large array is ``out``. The arithmetic is the same as before (weight, then scale,
    in float64), so the ring values are bit-identical."""
    total = sum(int(np.size(p)) for p in parts)
    if out.ndim != 1 or out.shape[0] != total or out.dtype != np.uint32:
        raise ValueError(f"quantize_parts_into: out must be a 1-D uint32 array of {total} elements")
    qmax = fixed_point_max(num_sites)
    scale = qmax / clip
    w = float(weight)
    clipped = 0
    step = QCHUNK
    x = np.empty(step, dtype=np.float64)
    pos = 0
    for part in parts:
        flat = np.asarray(part).reshape(-1)
        for a in range(0, flat.shape[0], step):
            src = flat[a : a + step]
            m = src.shape[0]
            xv = x[:m]
            xv[...] = src
            if w != 1.0:
                xv *= w
            lo, hi = float(xv.min()), float(xv.max())  # NaN propagates; two passes, no temporaries
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError("the vector to aggregate contains NaN or infinite values")
            if lo < -clip or hi > clip:  # rare: count, then clip
                clipped += int(np.count_nonzero(xv > clip)) + int(np.count_nonzero(xv < -clip))
                np.clip(xv, -clip, clip, out=xv)
            xv *= scale
            np.rint(xv, out=xv)
            np.clip(xv, -qmax, qmax, out=xv)
            block = out[pos : pos + m]
            block.view(np.int32)[...] = xv
            if masks is not None:
                masks.apply(block)
            pos += m
    return clipped


def dequantize(summed: np.ndarray, clip: float, num_sites: int) -> np.ndarray:
    """float64 values of a ring sum of quantised vectors (of at most ``num_sites`` sites),
    converted block by block into one preallocated vector (no full-size temporaries)."""
    return dequantize_step(summed, quantization_step(clip, num_sites))


def dequantize_step(summed: np.ndarray, step: float) -> np.ndarray:
    """:func:`dequantize` with the step Δ given."""
    ints = summed.astype(np.uint32, copy=False).view(np.int32)
    out = np.empty(ints.shape, dtype=np.float64)
    for a in range(0, ints.shape[0], QCHUNK):
        blk = out[a : a + QCHUNK]
        blk[...] = ints[a : a + QCHUNK]
        blk *= step
    return out


def dequantize_parts(summed: np.ndarray, step: float, factor: float,
                     shapes: Sequence[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """``factor`` × the ring sum's values as float32 arrays of ``shapes`` (name, shape; laid
    out back to back in this order), converted block by block: what the server applies (the
    mean update) without the float64 copy of the whole vector (240 MB at 30M values, paid in
    page faults as much as in arithmetic). ``step``: Δ (:func:`quantization_step`). Same
    float64 arithmetic as ``dequantize(...) * factor`` before the cast, so the result is
    identical."""
    ints = summed.astype(np.uint32, copy=False).view(np.int32)
    n = sum(math.prod(s) for _, s in shapes)
    if n != ints.shape[0]:
        raise ValueError(f"the summed vector has {ints.shape[0]} values, the shapes {n}")
    f = float(factor)
    x = np.empty(min(QCHUNK, max(1, n)), dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    pos = 0
    for name, shape in shapes:
        dst = np.empty(shape, dtype=np.float32)
        flat = dst.reshape(-1)
        for a in range(0, flat.shape[0], QCHUNK):
            m = min(QCHUNK, flat.shape[0] - a)
            xv = x[:m]
            xv[...] = ints[pos + a : pos + a + m]
            xv *= step
            xv *= f
            flat[a : a + m] = xv
        pos += flat.shape[0]
        out[name] = dst
    return out


def _stream(seed: bytes):
    if len(seed) != 32:
        raise ValueError("mask seeds are 32 bytes")
    return Cipher(algorithms.AES(seed), modes.CTR(_COUNTER0)).encryptor()


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """The uint32 mask vector of ``length`` words expanded from ``seed`` (AES-256-CTR keystream)."""
    return np.frombuffer(_stream(seed).update(bytes(4 * length)), dtype=_WORD).astype(np.uint32, copy=False)


class MaskStreams:
    """Several AES-256-CTR keystreams, each added (sign +1) or subtracted (-1) word by word,
    mod 2^32, to consecutive blocks of one vector: ``apply`` may be called block after block
    (``quantize_parts_into`` masks each block as it writes it). The keystream is written into
    one reused buffer (``update_into``): no allocation per block."""

    def __init__(self, masks: Sequence[tuple[bytes, int]]) -> None:
        self._streams = []
        for seed, sign in masks:
            if sign not in (1, -1):
                raise ValueError("mask sign must be +1 or -1")
            self._streams.append((_stream(seed), np.add if sign == 1 else np.subtract))
        self._buf = bytearray(4 * CHUNK + 15)  # update_into wants block size - 1 bytes of room
        self._zeros = bytes(4 * CHUNK)

    def apply(self, block: np.ndarray) -> None:
        if block.dtype != np.uint32 or block.ndim != 1:
            raise ValueError("masks apply to 1-D uint32 arrays")
        n = block.shape[0]
        for a in range(0, n, CHUNK):
            m = min(CHUNK, n - a)
            part = block[a : a + m]
            zeros = memoryview(self._zeros)[: 4 * m]
            for enc, op in self._streams:
                k = enc.update_into(zeros, self._buf)
                op(part, np.frombuffer(self._buf, dtype=_WORD, count=k // 4), out=part)


def apply_masks(vec: np.ndarray, masks: Sequence[tuple[bytes, int]]) -> None:
    """In place: ``vec += sign · expand_mask(seed)`` (mod 2^32) for each ``(seed, sign)``,
    sign ∈ {+1, -1}; keystreams are generated block by block, never as whole vectors."""
    if vec.dtype != np.uint32 or vec.ndim != 1:
        raise ValueError("apply_masks: vec must be a 1-D uint32 array")
    MaskStreams(masks).apply(vec)
