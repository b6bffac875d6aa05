"""Exact fixed-point sums through SecAgg integer fields (fedseg/privacy/exact_sum.py)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from fedseg.errors import FedsegError
from fedseg.privacy import exact_sum as es
from fedseg.privacy import masking
from fedseg.privacy.secagg import (
    SecAggConfig,
    SecAggServer,
    SecAggSite,
    generate_identity_key,
    identity_public_pem,
)


def _values(rng: np.random.Generator, n: int, sites: int) -> list[np.ndarray]:
    out = []
    for _ in range(sites):
        x = rng.normal(0, 1, n) * 10.0 ** rng.integers(-15, 12, n)
        x[:6] = [0.0, -0.0, 2.0**-70, -(2.0**-64), 3 * 2.0**-65, 1e-300]
        out.append(x)
    return out


def test_layout_and_limbs_fit_the_ring() -> None:
    x = np.array([1.5, -2.25, 0.0])
    enc = es.encode(x, 3)
    assert enc.dtype == np.uint32 and enc.size == es.encoded_length(3) == es.LIMBS * 3
    assert enc.max() < es.LIMB
    # n sites' limbs sum below 2^32 up to MAX_SITES, SecAgg's per-site integer maximum allows them
    assert (es.LIMB - 1) * es.MAX_SITES <= 2**32 - 1
    assert masking.int_field_max(es.MAX_SITES) >= es.LIMB - 1
    assert masking.int_field_max(es.MAX_SITES + 1) < es.LIMB - 1
    # the fingerprint of one channel: 2.2M entries -> 7 limbs each
    assert es.encoded_length(2_200_000) * 4 < 64e6


def test_sum_of_encodings_is_encoding_of_the_exact_sum() -> None:
    rng = np.random.default_rng(1)
    # multiples of 2^-20 below 2^30: every partial sum is exact in float64
    xs = [np.ldexp(rng.integers(-(2**50), 2**50, 5000).astype(np.float64), -20) for _ in range(4)]
    total = xs[0] + xs[1] + xs[2] + xs[3]
    limb_sum = sum(es.encode(x, 4).astype(np.int64) for x in xs)
    np.testing.assert_array_equal(es._digits(limb_sum, total.size),
                                  es.encode(total, 4).astype(np.int64).reshape(es.LIMBS, -1))
    np.testing.assert_array_equal(es.decode(limb_sum, total.size), total)


@pytest.mark.parametrize("sites", [1, 3, 7])
def test_decoded_sum_is_exact_to_float64_rounding(sites: int) -> None:
    rng = np.random.default_rng(sites)
    xs = _values(rng, 3000, sites)
    xs[0][6], xs[-1][7] = es.max_abs(sites), -es.max_abs(sites)
    dec = es.decode(sum(es.encode(x, sites).astype(np.int64) for x in xs), xs[0].size)
    fixed = [es.fixed_point(x) for x in xs]
    for i in range(xs[0].size):
        exact = sum((Fraction(float(f[i])) for f in fixed), Fraction(0))
        ulp = Fraction(np.spacing(abs(float(exact)))) if exact else Fraction(0)
        assert abs(Fraction(float(dec[i])) - exact) <= ulp, i
    # against the plain float sum: fixed-point rounding (<= 2^-(F+1) per site) + float rounding
    plain = np.sum(np.stack(xs), axis=0)
    tol = sites * 2.0 ** -(es.FRAC_BITS + 1) + 4 * sites * np.spacing(np.abs(np.stack(xs)).max(0))
    assert np.all(np.abs(dec - plain) <= tol)


def test_out_of_range_and_non_finite_are_refused() -> None:
    with pytest.raises(FedsegError, match="exceeds the exact secure-sum range"):
        es.encode(np.array([0.0, es.max_abs(5) * 1.01]), 5)
    with pytest.raises(FedsegError, match="NaN"):
        es.encode(np.array([np.nan]), 3)
    with pytest.raises(ValueError):
        es.max_abs(es.MAX_SITES + 1)


def test_fingerprint_vector_through_secure_aggregation() -> None:
    """Three sites' fingerprint-like vectors (counts, 1/n_c weights, HU sums, big Σmean²) summed
    by the real SecAgg protocol as one integer field: equal to the float sum."""
    names = ["a", "b", "c"]
    ids = {n: generate_identity_key() for n in names}
    cfg = SecAggConfig(roster={n: identity_public_pem(k) for n, k in ids.items()}, threshold=2, clip=1.0)
    rng = np.random.default_rng(0)
    vecs = {}
    for n in names:
        v = np.zeros(20_000)
        v[:3] = [40.0, 1.2e7, 2.3e9]  # cases, voxels, Σ mean²
        occ = rng.choice(v.size, 800, replace=False)
        v[occ] = rng.integers(1, 5000, occ.size) / rng.integers(1000, 10**6, occ.size)
        v[occ[:200]] *= -rng.integers(1, 3000, 200)
        vecs[n] = v
    rid = "9/job/fingerprint0/1"
    sites = {n: SecAggSite(cfg, n, ids[n]) for n in names}
    field = {"fingerprint": es.encoded_length(20_000)}
    server = SecAggServer(cfg, rid, 0, field)
    share_req = server.advertisements([s.advertise(rid) for s in sites.values()])
    mask_reqs = server.relay_shares([s.share_keys(share_req) for s in sites.values()])
    for n, s in sites.items():
        meta, vec = s.mask(mask_reqs[n], np.zeros(0), {"fingerprint": es.encode(vecs[n], 3)})
        assert server.add_masked(meta, vec)
    res = server.unmask([s.unmask(server.unmask_request()) for s in sites.values()])
    total = es.decode(res.ints["fingerprint"], 20_000)
    plain = vecs["a"] + vecs["b"] + vecs["c"]
    np.testing.assert_allclose(total, plain, rtol=1e-15, atol=2.0**-62)
    assert total[0] == 120.0 and total[1] == 3.6e7
