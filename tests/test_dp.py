"""Site-level DP: clipping, distributed Gaussian noise, RDP accounting (fast, small arrays)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.optimize import brentq
from scipy.stats import norm

from fedseg.privacy.dp import (
    AccountantState,
    DPConfig,
    PrivacyAccountant,
    add_site_noise,
    clip_delta,
    effective_noise_multiplier,
    privatize,
    secagg_clip_bound,
    site_noise_std,
)

DELTA = 1e-5


def _delta(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "enc.w": (rng.standard_normal((8, 4, 3)) * scale).astype(np.float32),
        "enc.b": (rng.standard_normal(8) * scale).astype(np.float32),
        "dec.w": (rng.standard_normal((5, 7)) * scale).astype(np.float32),
    }


def _norm(d: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values()))


# --------------------------------------------------------------------------- config


def test_config_defaults_off_and_validation():
    cfg = DPConfig()
    assert cfg.enabled is False and cfg.target_delta == 1e-5 and cfg.adjacency == "zero_out"
    with pytest.raises(ValidationError, match="clip_norm"):
        DPConfig(enabled=True)
    with pytest.raises(ValidationError):
        DPConfig(enabled=True, clip_norm=-1.0)
    with pytest.raises(ValidationError):
        DPConfig(enabled=True, clip_norm=1.0, noise_multiplier=-0.1)
    with pytest.raises(ValidationError):
        DPConfig(clip_norm=1.0, target_delta=1.0)
    with pytest.raises(ValidationError):
        DPConfig(clip_norm=1.0, surprise=1)


# --------------------------------------------------------------------------- clipping


def test_clip_bounds_norm_exactly():
    rng = np.random.default_rng(0)
    d = _delta(rng, scale=3.0)
    orig = _norm(d)
    clipped, scale, original = clip_delta(d, 1.5)
    assert original == pytest.approx(orig, rel=1e-12)
    assert scale == pytest.approx(1.5 / orig, rel=1e-6)
    n = _norm(clipped)
    assert n <= 1.5 and n == pytest.approx(1.5, rel=1e-6)
    for k in d:  # same direction, same dtype and shape
        assert clipped[k].dtype == np.float32 and clipped[k].shape == d[k].shape
        np.testing.assert_allclose(clipped[k], d[k] * scale, rtol=1e-6, atol=1e-7)
    # global, not per tensor: a tensor may keep a larger share than clip/num_tensors
    assert not np.array_equal(clipped["enc.b"], d["enc.b"])


def test_clip_leaves_small_delta_unchanged():
    rng = np.random.default_rng(1)
    d = _delta(rng, scale=0.01)
    clipped, scale, original = clip_delta(d, 10.0)
    assert scale == 1.0 and original == pytest.approx(_norm(d))
    for k in d:
        np.testing.assert_array_equal(clipped[k], d[k])
        assert clipped[k] is not d[k]  # a copy: the caller's arrays are not aliased


def test_clip_rejects_nan_and_bad_bound():
    d = {"w": np.array([1.0, np.nan], dtype=np.float32)}
    with pytest.raises(ValueError, match="NaN"):
        clip_delta(d, 1.0)
    with pytest.raises(ValueError):
        clip_delta({"w": np.ones(3, np.float32)}, 0.0)
    with pytest.raises(TypeError):
        clip_delta({"n": np.ones(3, np.int64)}, 1.0)


# --------------------------------------------------------------------------- noise


def test_sum_of_site_noise_has_std_z_times_S():
    n, z, S, L = 5, 1.3, 0.7, 100_000
    cfg = DPConfig(enabled=True, clip_norm=S, noise_multiplier=z)
    rng = np.random.default_rng(2)
    zero = {"w": np.zeros(L, np.float32)}
    sites = [add_site_noise(zero, cfg, n, rng)["w"].astype(np.float64) for _ in range(n)]
    per_site = np.std(sites[0])
    total = np.sum(sites, axis=0)
    # std of a sample std of L normals has relative SE 1/sqrt(2L) ≈ 0.22%: 2% is > 9 SE
    assert per_site == pytest.approx(z * S / math.sqrt(n), rel=0.02)
    assert np.std(total) == pytest.approx(z * S, rel=0.02)
    assert abs(np.mean(total)) < 5 * z * S / math.sqrt(L)
    # m = 3 survivors of n = 5: std z·S·sqrt(3/5), i.e. multiplier effective_noise_multiplier
    m = 3
    z_eff = effective_noise_multiplier(z, n, m)
    assert z_eff == pytest.approx(z * math.sqrt(m / n))
    assert np.std(np.sum(sites[:m], axis=0)) == pytest.approx(z_eff * S, rel=0.02)


def test_noise_default_rng_is_fresh_and_keeps_dtype():
    cfg = DPConfig(enabled=True, clip_norm=1.0, noise_multiplier=1.0)
    d = {"w": np.zeros(64, np.float32), "v": np.zeros((2, 3), np.float64)}
    a = add_site_noise(d, cfg, 4)
    b = add_site_noise(d, cfg, 4)
    assert not np.array_equal(a["w"], b["w"])  # OS-seeded, not reproducible
    assert a["w"].dtype == np.float32 and a["v"].dtype == np.float64 and a["v"].shape == (2, 3)
    assert site_noise_std(cfg, 4) == pytest.approx(0.5)


def test_privatize_gate_and_pipeline():
    rng = np.random.default_rng(3)
    d = _delta(rng, scale=5.0)
    out, info = privatize(d, DPConfig(), n_sites=3)
    assert info is None and all(out[k] is d[k] for k in d)
    cfg = DPConfig(enabled=True, clip_norm=1.0, noise_multiplier=0.0)  # clipping only
    out, info = privatize(d, cfg, n_sites=3, rng=rng)
    assert info is not None and info.clipped and info.noise_std == 0.0
    assert _norm(out) == pytest.approx(1.0, rel=1e-6)


def test_secagg_clip_bound():
    cfg = DPConfig(enabled=True, clip_norm=1.0, noise_multiplier=1.0)
    c = secagg_clip_bound(cfg, n_sites=5, num_values=30_000_000, failure_prob=1e-12)
    sigma = site_noise_std(cfg, 5)
    # P(|N(0, σ)| > C - S) per coordinate, times all coordinates of all sites = failure_prob
    tail = 2 * norm.sf((c - 1.0) / sigma) * 5 * 30_000_000
    assert tail == pytest.approx(1e-12, rel=1e-3)


# --------------------------------------------------------------------------- accounting


def _exact_gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    """Independent: T Gaussian mechanisms with multiplier z compose EXACTLY to one with
    multiplier z/√T (μ-GDP, μ = √T/z); its optimal ε(δ) (Balle & Wang 2018) solves
    δ = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""
    mu = math.sqrt(rounds) / z

    def f(e: float) -> float:
        return norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta

    return brentq(f, 0.0, 200.0)


def _simple_rdp_bound(z: float, rounds: int, delta: float) -> float:
    """min_α T·α/(2z²) + log(1/δ)/(α−1) = A + 2√(A·B), A = T/(2z²), B = log(1/δ)."""
    a, b = rounds / (2 * z * z), math.log(1 / delta)
    return a + 2 * math.sqrt(a * b)


@pytest.mark.parametrize("z,rounds", [(1.0, 10), (2.0, 50), (5.0, 100)])
def test_epsilon_matches_independent_computation(z, rounds):
    acc = PrivacyAccountant()
    acc.step(z, count=rounds)
    eps = acc.epsilon(DELTA)
    exact = _exact_gaussian_epsilon(z, rounds, DELTA)
    simple = _simple_rdp_bound(z, rounds, DELTA)
    # an RDP accountant is an upper bound on the optimal ε, and at least as tight as the
    # textbook RDP conversion; and it is not loose: within 15% of the exact value
    assert exact <= eps <= simple
    assert eps <= 1.15 * exact


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    def eps(z: float, t: int, q: float = 1.0) -> float:
        a = PrivacyAccountant()
        a.step(z, sample_rate=q, count=t)
        return a.epsilon(DELTA)

    assert PrivacyAccountant().epsilon(DELTA) == 0.0
    by_rounds = [eps(1.0, t) for t in (1, 5, 20, 100)]
    assert all(x < y for x, y in zip(by_rounds, by_rounds[1:], strict=False))
    by_noise = [eps(z, 20) for z in (0.7, 1.0, 2.0, 5.0)]
    assert all(x > y for x, y in zip(by_noise, by_noise[1:], strict=False))
    assert eps(1.0, 20, q=0.3) < eps(1.0, 20)  # sampling sites amplifies privacy
    a = PrivacyAccountant()
    a.step(0.0)
    assert a.epsilon(DELTA) == math.inf
    # replacing a site's data doubles the sensitivity: same ε as half the noise
    r = PrivacyAccountant("replace")
    r.step(2.0, count=20)
    assert r.epsilon(DELTA) == pytest.approx(eps(1.0, 20))
    with pytest.raises(ValueError, match="replace"):
        r.step(2.0, sample_rate=0.5)


def test_step_by_step_equals_batched_and_dropouts_cost_more():
    a = PrivacyAccountant()
    for _ in range(7):
        a.step(1.5)
    b = PrivacyAccountant()
    b.step(1.5, count=7)
    assert a.rounds == 7 and a.epsilon(DELTA) == pytest.approx(b.epsilon(DELTA))
    assert len(a.state().steps) == 1  # consecutive identical rounds are run-length encoded
    c = PrivacyAccountant()
    c.step(1.5, count=6)
    c.step(effective_noise_multiplier(1.5, n_split=5, n_contributed=3))
    assert c.epsilon(DELTA) > a.epsilon(DELTA)


def test_resume_from_serialised_state():
    a = PrivacyAccountant()
    a.step(1.2, count=4)
    a.step(effective_noise_multiplier(1.2, 5, 4))
    a.step(1.2, sample_rate=0.6, count=3)
    eps = a.epsilon(DELTA)
    blob = a.state().model_dump_json()
    b = PrivacyAccountant.from_state(blob)
    assert b.epsilon(DELTA) == eps and b.rounds == a.rounds == 8
    c = PrivacyAccountant.from_state(AccountantState.model_validate_json(blob).model_dump())
    assert c.epsilon(DELTA) == eps
    # resumed accountants keep composing identically
    a.step(1.2)
    b.step(1.2)
    assert b.epsilon(DELTA) == a.epsilon(DELTA)
    # state() is a copy: mutating it does not touch the accountant
    s = a.state()
    s.steps.clear()
    assert a.rounds == 9


# --------------------------------------------------------------------------- wired into a job


def _site(tmp_path):
    from types import SimpleNamespace as NS

    return NS(site="siteA", cache_dir=tmp_path, node_config={})


def _train_request(dp):
    from fedseg.protocol import messages as pm

    return pm.TrainRequest(round=1, job_id="j", local_iterations=1, global_iteration_start=0,
                           global_total_iterations=1, plan_hash="h", dp=dp)


def test_site_update_is_clipped_to_the_bound_and_carries_its_noise_share(tmp_path):
    """``client.secure.private_delta`` (what the train handler runs on both paths): the norm
    bound holds exactly without noise, and the noise added is N(0, (z·S)²/n) per value."""
    from fedseg.client.secure import UpdateRefused, private_delta
    from fedseg.protocol import messages as pm

    rng = np.random.default_rng(5)
    d = _delta(rng, scale=4.0)
    site = _site(tmp_path)
    out = private_delta(site, _train_request(pm.DPParams(clip_norm=0.5, noise_multiplier=0.0,
                                                         n_sites=3)), d)
    assert _norm(out) <= 0.5 and _norm(out) == pytest.approx(0.5, rel=1e-6)
    for k in d:  # clipped along the update's own direction
        np.testing.assert_allclose(out[k] * (_norm(d) / 0.5), d[k], rtol=1e-4, atol=1e-5)
    small = {"w": np.full(10, 0.01, np.float32)}
    np.testing.assert_array_equal(
        private_delta(site, _train_request(pm.DPParams(clip_norm=1.0, noise_multiplier=0.0,
                                                       n_sites=3)), small)["w"], small["w"])
    # noise: zero update, 200k values -> sample std within 2 % (> 9 standard errors)
    z, S, n = 1.2, 0.8, 4
    zero = {"a": np.zeros(100_000, np.float32), "b": np.zeros((2, 50_000), np.float32)}
    noisy = private_delta(site, _train_request(pm.DPParams(clip_norm=S, noise_multiplier=z,
                                                           n_sites=n)), zero)
    vals = np.concatenate([v.ravel() for v in noisy.values()]).astype(np.float64)
    assert np.std(vals) == pytest.approx(z * S / math.sqrt(n), rel=0.02)
    assert abs(np.mean(vals)) < 5 * z * S / math.sqrt(n) / math.sqrt(vals.size)
    assert noisy["b"].shape == (2, 50_000) and noisy["b"].dtype == np.float32
    # a big update: clipped part plus noise; its projection on the update's direction is S
    big = {"w": np.full(200_000, 3.0, np.float32)}
    out = private_delta(site, _train_request(pm.DPParams(clip_norm=S, noise_multiplier=z,
                                                         n_sites=n)), big)
    proj = float(np.sum(out["w"].astype(np.float64))) / math.sqrt(200_000)
    assert proj == pytest.approx(S, abs=5 * z * S / math.sqrt(n))
    with pytest.raises(UpdateRefused, match="NaN"):
        private_delta(site, _train_request(pm.DPParams(clip_norm=1.0, noise_multiplier=1.0,
                                                       n_sites=3)),
                      {"w": np.array([np.nan], np.float32)})


def test_job_accountant_matches_dp_accounting_round_by_round(tmp_path):
    import dp_accounting as dpa

    from fedseg.privacy.dp import JobAccountant

    cfg = DPConfig(enabled=True, clip_norm=2.0, noise_multiplier=1.1, target_delta=DELTA)
    path = tmp_path / "dp_accountant.json"
    acc = JobAccountant(cfg, path)
    assert acc.record()["dp_epsilon"] == 0.0
    rdp = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_SPECIAL)
    eps = []
    for n, m in ((5, 5), (5, 5), (5, 3), (4, 4)):  # a dropout round carries less noise
        rec = acc.release(n, m)
        z_eff = 1.1 * math.sqrt(m / n)
        rdp.compose(dpa.GaussianDpEvent(z_eff))
        assert rec["dp_sigma"] == pytest.approx(z_eff)
        assert rec["dp_noise_std"] == pytest.approx(2.0 * z_eff)
        assert rec["dp_epsilon"] == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-9)
        eps.append(rec["dp_epsilon"])
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False)) and rec["dp_releases"] == 4
    # a resumed job continues from the saved state; a fresh one starts at 0
    again = JobAccountant(cfg, path, resume=True)
    assert again.record()["dp_epsilon"] == pytest.approx(eps[-1])
    assert JobAccountant(cfg, path, resume=False).record()["dp_epsilon"] == 0.0
    with pytest.raises(ValueError, match="adjacency"):
        JobAccountant(cfg.model_copy(update={"adjacency": "replace"}), path, resume=True)


def test_noise_multiplier_for_target_epsilon():
    from fedseg.privacy.dp import noise_multiplier_for_epsilon

    for target, rounds in ((1.0, 10), (8.0, 50)):
        z = noise_multiplier_for_epsilon(target, DELTA, rounds)

        def eps(zz: float, t: int = rounds) -> float:
            a = PrivacyAccountant()
            a.step(zz, count=t)
            return a.epsilon(DELTA)

        assert eps(z) <= target < eps(z * 0.995)  # the smallest z within 0.1 %
    with pytest.raises(ValueError, match="raise target_epsilon"):
        noise_multiplier_for_epsilon(1e-9, DELTA, 10)


def test_job_config_dp_section():
    from fedseg.privacy.dp import DPSettings
    from fedseg.server.config import JobConfig

    job = JobConfig(run_dir="r")
    assert job.dp.enabled is False and job.dp.resolve(job.rounds).enabled is False
    on = JobConfig(run_dir="r", rounds=20,
                   dp={"enabled": True, "clip_norm": 0.5, "target_epsilon": 4.0})
    cfg = on.dp.resolve(on.rounds)
    a = PrivacyAccountant()
    a.step(cfg.noise_multiplier, count=20)
    assert cfg.enabled and cfg.clip_norm == 0.5 and a.epsilon(DELTA) <= 4.0
    assert DPSettings(enabled=True, clip_norm=1, noise_multiplier=0.7).resolve(5).noise_multiplier == 0.7
    for bad, msg in (({"enabled": True, "noise_multiplier": 1.0}, "clip_norm must be set"),
                     ({"enabled": True, "clip_norm": 1.0}, "exactly one of"),
                     ({"enabled": True, "clip_norm": 1.0, "noise_multiplier": 1.0,
                       "target_epsilon": 3.0}, "exactly one of"),
                     ({"enabled": True, "clip_norm": 1.0, "noise_multiplier": 0.0}, "greater than 0"),
                     ({"enabled": True, "clip_norm": 1.0, "target_epsilon": 1e-9}, "noise multiplier above"),
                     ({"enabled": True, "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.5},
                      "less than 1"),
                     ({"clip": 1.0}, "Extra inputs")):
        with pytest.raises(ValidationError, match=msg):
            JobConfig(run_dir="r", dp=bad)


def test_train_request_carries_dp_only_when_on():
    """Versioning (protocol/messages.py): without DP the field is left out of the JSON, so a site
    that predates it still reads the request; with DP it round-trips."""
    import json

    from fedseg.protocol import messages as pm

    off = _train_request(None)
    assert "dp" not in json.loads(pm.encode(off)) and pm.decode(pm.encode(off), pm.TrainRequest) == off
    on = _train_request(pm.DPParams(clip_norm=1.5, noise_multiplier=0.9, n_sites=4))
    back = pm.decode(pm.encode(on), pm.TrainRequest)
    assert back == on and back.dp.n_sites == 4
    with pytest.raises(pm.ProtocolError, match="n_sites"):
        pm.decode(pm.encode(on).replace('"n_sites":4', '"n_sites":0'), pm.TrainRequest)
