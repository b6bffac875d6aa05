"""SecAgg(+) protocol tests: 5 sites simulated in-process with real crypto, small vectors."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from scipy import stats

from fedseg.privacy import keys, masking, shamir
from fedseg.privacy.secagg import (
    KeyAdvertisement,
    SecAggAbort,
    SecAggConfig,
    SecAggServer,
    SecAggSite,
    ShareKeysRequest,
    SiteState,
    UnmaskRequest,
    generate_identity_key,
    identity_public_pem,
    load_identity_private_key,
    load_identity_public_key,
    pairwise_seed,
)

NAMES = ["alpha", "bravo", "charlie", "delta", "echo"]
L = 20_000


@pytest.fixture(scope="module")
def ids():
    return {n: generate_identity_key() for n in NAMES}


@pytest.fixture(scope="module")
def cfg(ids):
    return SecAggConfig(roster={n: identity_public_pem(k) for n, k in ids.items()}, threshold=3, clip=1.0)


def _sites(cfg, ids):
    return {n: SecAggSite(cfg, n, ids[n]) for n in NAMES}


def _deltas(seed: int, length: int = L, scale: float = 0.2):
    rng = np.random.default_rng(seed)  # test data, not secrets
    return {n: rng.normal(0.0, scale, length).astype(np.float32) for n in NAMES}


def _counts():
    return {n: 100 + 7 * i for i, n in enumerate(NAMES)}


def _round_to_masking(cfg, ids, round_id="run1/train/1", length=L, sites=None):
    sites = sites or _sites(cfg, ids)
    srv = SecAggServer(cfg, round_id, length)
    req = srv.advertisements([s.advertise(round_id) for s in sites.values()])
    mreqs = srv.relay_shares([s.share_keys(req) for s in sites.values()])
    return srv, sites, mreqs


def _upload(srv, sites, mreqs, deltas, names):
    for n in names:
        meta, vec = sites[n].mask(mreqs[n], deltas[n], {"num_samples": _counts()[n]})
        assert vec.dtype == np.uint32 and vec.shape == (L + 2,)
        assert srv.add_masked(meta, vec)


def _clipped_sum(deltas, names, clip):
    return sum(np.clip(deltas[n].astype(np.float64), -clip, clip) for n in names)


# --------------------------------------------------------------------------- correctness


def test_unmasked_sum_is_exact_within_quantisation(cfg, ids):
    srv, sites, mreqs = _round_to_masking(cfg, ids)
    deltas = _deltas(1, scale=0.4)  # ~1% of values beyond clip=1
    _upload(srv, sites, mreqs, deltas, NAMES)
    ureq = srv.unmask_request()
    assert ureq.survivors == sorted(NAMES) and ureq.dropped == []
    res = srv.unmask([sites[n].unmask(ureq) for n in NAMES])
    ref = _clipped_sum(deltas, NAMES, cfg.clip)
    assert np.abs(res.float_sum - ref).max() <= res.error_bound
    assert res.error_bound == pytest.approx(5 * cfg.quantization_step / 2)
    assert res.num_samples == sum(_counts().values())
    assert res.num_clipped == sum(int(np.count_nonzero(np.abs(d) > 1.0)) for d in deltas.values()) > 0


def test_quantisation_cannot_overflow_at_the_clip_bound(cfg, ids):
    srv, sites, mreqs = _round_to_masking(cfg, ids)
    extreme = {n: np.full(L, 5.0 if i % 2 == 0 else -5.0, np.float32) for i, n in enumerate(NAMES)}
    extreme["alpha"][:10] = -1.0
    for n in NAMES:
        extreme[n][-1] = 1.0  # all five at +C: the sum is 5C, still inside int32
    _upload(srv, sites, mreqs, extreme, NAMES)
    ureq = srv.unmask_request()
    res = srv.unmask([sites[n].unmask(ureq) for n in NAMES])
    ref = _clipped_sum(extreme, NAMES, cfg.clip)
    assert np.abs(res.float_sum - ref).max() <= res.error_bound
    assert res.float_sum[-1] == pytest.approx(5.0, abs=1e-8)


def test_masked_vector_is_uniform_and_uncorrelated(cfg, ids):
    n_el = 100_000
    srv, sites, mreqs = _round_to_masking(cfg, ids, length=n_el)
    delta = np.random.default_rng(2).normal(0.0, 0.3, n_el).astype(np.float32)
    meta, masked = sites["charlie"].mask(mreqs["charlie"], delta, {"num_samples": 10})
    assert meta.peers == ["alpha", "bravo", "delta", "echo"]
    q = np.empty(n_el, np.uint32)
    masking.quantize_into(delta, q, cfg.clip, cfg.num_sites)
    body = masked[:n_el]
    # bytes of the upload are uniform over 0..255
    byte_hist = np.bincount(body.view(np.uint8), minlength=256)
    assert stats.chisquare(byte_hist).pvalue > 1e-4
    # so are the high 8 bits (where a weak mask would leave the sign/magnitude visible)
    hi_hist = np.bincount((body >> 24).astype(np.int64), minlength=256)
    assert stats.chisquare(hi_hist).pvalue > 1e-4
    r = np.corrcoef(body.astype(np.float64), q.view(np.int32).astype(np.float64))[0, 1]
    assert abs(r) < 0.02
    # and the quantised delta itself is far from uniform (the test has power)
    assert stats.chisquare(np.bincount((q >> 24).astype(np.int64), minlength=256)).pvalue < 1e-10


# --------------------------------------------------------------------------- dropouts


def test_site_drops_after_key_exchange_before_upload(cfg, ids):
    srv, sites, mreqs = _round_to_masking(cfg, ids)
    deltas = _deltas(3)
    alive = [n for n in NAMES if n != "delta"]
    _upload(srv, sites, mreqs, deltas, alive)
    ureq = srv.unmask_request()
    assert ureq.dropped == ["delta"]
    replies = [sites[n].unmask(ureq) for n in alive]
    assert all(set(r.key_shares) == {"delta"} and "delta" not in r.self_mask_shares for r in replies)
    res = srv.unmask(replies)
    assert np.abs(res.float_sum - _clipped_sum(deltas, alive, 1.0)).max() <= res.error_bound
    assert res.num_samples == sum(_counts()[n] for n in alive)


@pytest.mark.parametrize("answering", [4, 3])
def test_site_drops_after_upload_still_exact(cfg, ids, answering):
    srv, sites, mreqs = _round_to_masking(cfg, ids)
    deltas = _deltas(4)
    _upload(srv, sites, mreqs, deltas, NAMES)
    ureq = srv.unmask_request()
    res = srv.unmask([sites[n].unmask(ureq) for n in NAMES[:answering]])
    assert np.abs(res.float_sum - _clipped_sum(deltas, NAMES, 1.0)).max() <= res.error_bound
    assert res.num_samples == sum(_counts().values())


def test_two_dropouts_before_upload_with_threshold_answers(cfg, ids):
    srv, sites, mreqs = _round_to_masking(cfg, ids)
    deltas = _deltas(5)
    alive = ["alpha", "charlie", "echo"]
    _upload(srv, sites, mreqs, deltas, alive)
    ureq = srv.unmask_request()
    res = srv.unmask([sites[n].unmask(ureq) for n in alive])
    assert res.dropped == ["bravo", "delta"]
    assert np.abs(res.float_sum - _clipped_sum(deltas, alive, 1.0)).max() <= res.error_bound


def test_fewer_than_t_answers_aborts_without_partial_result(cfg, ids):
    srv, sites, mreqs = _round_to_masking(cfg, ids)
    _upload(srv, sites, mreqs, _deltas(6), NAMES)
    ureq = srv.unmask_request()
    replies = [sites[n].unmask(ureq) for n in NAMES[:2]]
    with pytest.raises(SecAggAbort, match="fewer than the threshold 3 shares.*nothing was unmasked"):
        srv.unmask(replies)
    with pytest.raises(SecAggAbort):  # the round is dead: no second try with the masked sum
        srv.unmask(replies + [sites["charlie"].unmask(ureq)])


def test_fewer_than_t_uploads_aborts(cfg, ids):
    srv, sites, mreqs = _round_to_masking(cfg, ids)
    _upload(srv, sites, mreqs, _deltas(7), NAMES[:2])
    with pytest.raises(SecAggAbort, match="only 2 masked inputs"):
        srv.unmask_request()


def test_fewer_than_t_advertisements_aborts(cfg, ids):
    sites = _sites(cfg, ids)
    srv = SecAggServer(cfg, "r", L)
    with pytest.raises(SecAggAbort, match="only 2 sites with valid key advertisements"):
        srv.advertisements([sites[n].advertise("r") for n in NAMES[:2]])


def test_corrupt_unmask_share_is_tolerated_with_spare_answers(cfg, ids):
    srv, sites, mreqs = _round_to_masking(cfg, ids)
    deltas = _deltas(8)
    alive = NAMES[:4]
    _upload(srv, sites, mreqs, deltas, alive)
    ureq = srv.unmask_request()
    replies = [sites[n].unmask(ureq) for n in alive]
    bad = replies[0]
    y = int(bad.key_shares["echo"].y, 16) ^ 1
    forged = bad.model_copy(
        update={
            "key_shares": {"echo": bad.key_shares["echo"].model_copy(update={"y": shamir.share_to_hex(y)})}
        }
    )
    res = srv.unmask([forged] + replies[1:])
    assert np.abs(res.float_sum - _clipped_sum(deltas, alive, 1.0)).max() <= res.error_bound


# --------------------------------------------------------------------------- active server


def _adverts(cfg, ids, round_id):
    sites = _sites(cfg, ids)
    advs = {n: s.advertise(round_id) for n, s in sites.items()}
    return sites, advs


def _request(advs, round_id):
    return ShareKeysRequest(round_id=round_id, advertisements=[advs[n] for n in NAMES])


def test_server_substituted_public_key_is_detected(cfg, ids):
    sites, advs = _adverts(cfg, ids, "r5")
    mine = X25519PrivateKey.generate()
    advs["bravo"] = advs["bravo"].model_copy(update={"s_pk": keys.b64e(keys.x25519_public_bytes(mine))})
    with pytest.raises(SecAggAbort, match="'bravo'.*does not verify against that site's roster key"):
        sites["alpha"].share_keys(_request(advs, "r5"))
    # the site refuses to continue that round
    with pytest.raises(SecAggAbort, match="aborted"):
        sites["alpha"].share_keys(_request(advs, "r5"))
    assert sites["alpha"].state.rounds["r5"].s_sk == ""  # secrets wiped


def test_advertisement_re_signed_with_another_key_is_detected(cfg, ids):
    sites, advs = _adverts(cfg, ids, "r5")
    rogue = generate_identity_key()
    a = advs["delta"]
    mine = X25519PrivateKey.generate()
    c_pk = keys.b64d(a.c_pk)
    s_pk = keys.x25519_public_bytes(mine)
    payload = keys.advertisement_payload("delta", "r5", c_pk, s_pk, keys.b64d(a.b_commit), a.config_digest)
    advs["delta"] = a.model_copy(
        update={"s_pk": keys.b64e(s_pk), "signature": keys.b64e(keys.sign(rogue, payload))}
    )
    with pytest.raises(SecAggAbort, match="'delta'.*substituted, re-signed or replayed"):
        sites["charlie"].share_keys(_request(advs, "r5"))


def test_replayed_advertisement_from_previous_round_is_detected(cfg, ids):
    sites = _sites(cfg, ids)
    old = {n: s.advertise("r4") for n, s in sites.items()}
    new = {n: s.advertise("r5") for n, s in sites.items()}
    replay = dict(new, echo=old["echo"])
    with pytest.raises(SecAggAbort, match="'echo' is for round 'r4', not 'r5'"):
        sites["alpha"].share_keys(_request(replay, "r5"))
    relabelled = dict(new, echo=old["echo"].model_copy(update={"round_id": "r5"}))
    with pytest.raises(SecAggAbort, match="'echo'.*does not verify"):
        sites["bravo"].share_keys(_request(relabelled, "r5"))


def test_own_advertisement_must_come_back_unchanged(cfg, ids):
    sites, advs = _adverts(cfg, ids, "r6")
    other = SecAggSite(cfg, "alpha", ids["alpha"]).advertise("r6")  # validly signed, but not ours
    advs["alpha"] = other
    with pytest.raises(SecAggAbort, match="own advertisement unchanged"):
        sites["alpha"].share_keys(_request(advs, "r6"))


def test_config_mismatch_is_reported(cfg, ids):
    sites, advs = _adverts(cfg, ids, "r7")
    other_cfg = SecAggConfig(roster=cfg.roster, threshold=3, clip=2.0)
    advs["echo"] = SecAggSite(other_cfg, "echo", ids["echo"]).advertise("r7")
    with pytest.raises(SecAggAbort, match="'echo' uses a different secure-aggregation configuration"):
        sites["alpha"].share_keys(_request(advs, "r7"))


def test_server_excludes_forged_advertisement(cfg, ids):
    sites, advs = _adverts(cfg, ids, "r8")
    advs["bravo"] = advs["bravo"].model_copy(update={"c_pk": advs["alpha"].c_pk})
    srv = SecAggServer(cfg, "r8", L)
    req = srv.advertisements(advs.values())
    assert [a.site for a in req.advertisements] == ["alpha", "charlie", "delta", "echo"]
    assert "does not verify" in srv.excluded["bravo"]


def test_tampered_share_ciphertext_aborts_at_recipient(cfg, ids):
    srv, sites, mreqs = _round_to_masking(cfg, ids)
    req = mreqs["bravo"]
    sh = req.shares[0]
    ct = bytearray(keys.b64d(sh.ciphertext))
    ct[5] ^= 1
    bad = req.model_copy(update={"shares": [sh.model_copy(update={"ciphertext": keys.b64e(bytes(ct))})]})
    with pytest.raises(SecAggAbort, match="fails authentication"):
        sites["bravo"].mask(bad, _deltas(9)["bravo"], {"num_samples": 1})
    # a share re-addressed to another recipient does not decrypt either
    moved = mreqs["charlie"].shares[0].model_copy(update={"recipient": "delta"})
    req_d = mreqs["delta"].model_copy(update={"shares": [moved, *mreqs["delta"].shares[1:]]})
    with pytest.raises(SecAggAbort, match="fails authentication"):
        sites["delta"].mask(req_d, _deltas(9)["delta"], {"num_samples": 1})


def test_site_refuses_self_mask_and_key_share_of_the_same_site(cfg, ids):
    srv, sites, mreqs = _round_to_masking(cfg, ids)
    _upload(srv, sites, mreqs, _deltas(10), NAMES)
    # one request naming a site in both lists
    both = UnmaskRequest(round_id="run1/train/1", survivors=NAMES, dropped=["echo"])
    with pytest.raises(SecAggAbort, match="both as survivors and as dropped"):
        sites["alpha"].unmask(both)
    # two requests: first 'echo' survived, then 'echo' dropped
    ureq = srv.unmask_request()
    first = sites["bravo"].unmask(ureq)
    assert "echo" in first.self_mask_shares
    assert sites["bravo"].unmask(ureq) == first  # a repeated request gets the same answer
    flipped = UnmaskRequest(round_id=ureq.round_id, survivors=NAMES[:4], dropped=["echo"])
    with pytest.raises(SecAggAbort, match="already answered"):
        sites["bravo"].unmask(flipped)


def test_site_checks_unmask_request_sanity(cfg, ids):
    srv, sites, mreqs = _round_to_masking(cfg, ids)
    _upload(srv, sites, mreqs, _deltas(11), NAMES)
    rid = "run1/train/1"
    with pytest.raises(SecAggAbort, match="fewer than the threshold"):
        sites["alpha"].unmask(UnmaskRequest(round_id=rid, survivors=["alpha", "bravo"], dropped=NAMES[2:]))
    with pytest.raises(SecAggAbort, match="not listed as a survivor"):
        sites["bravo"].unmask(UnmaskRequest(round_id=rid, survivors=NAMES[2:], dropped=NAMES[:2]))
    with pytest.raises(SecAggAbort, match="do not match"):
        sites["charlie"].unmask(UnmaskRequest(round_id=rid, survivors=NAMES[:4], dropped=[]))


def test_site_never_masks_twice_and_never_reuses_a_round(cfg, ids):
    srv, sites, mreqs = _round_to_masking(cfg, ids)
    d = _deltas(12)
    sites["alpha"].mask(mreqs["alpha"], d["alpha"], {"num_samples": 1})
    with pytest.raises(SecAggAbort, match="already uploaded"):
        sites["alpha"].mask(mreqs["alpha"], d["alpha"] * 2, {"num_samples": 1})
    sites["alpha"].state.rounds["run1/train/1"].stage = "aborted"
    with pytest.raises(SecAggAbort, match="already used"):
        sites["alpha"].advertise("run1/train/1")


def test_unmask_before_upload_is_refused(cfg, ids):
    srv, sites, mreqs = _round_to_masking(cfg, ids)
    with pytest.raises(SecAggAbort, match="has not uploaded"):
        sites["alpha"].unmask(UnmaskRequest(round_id="run1/train/1", survivors=NAMES, dropped=[]))


# --------------------------------------------------------------------------- state, pipelining


def test_state_survives_json_between_steps_and_rounds_pipeline(cfg, ids):
    """As in Flower: a fresh ClientApp per message, state persisted as JSON; round r+1's keys
    are advertised and shared while round r is being unmasked."""
    states = {n: SiteState(site=n).model_dump_json() for n in NAMES}

    def step(n, fn):
        site = SecAggSite(cfg, n, ids[n], SiteState.model_validate_json(states[n]))
        out = fn(site)
        states[n] = site.state.model_dump_json()
        return out

    srv1 = SecAggServer(cfg, "p/1", L)
    req1 = srv1.advertisements([step(n, lambda s: s.advertise("p/1")) for n in NAMES])
    m1 = srv1.relay_shares([step(n, lambda s: s.share_keys(req1)) for n in NAMES])
    d1, d2 = _deltas(13), _deltas(14)
    srv2 = SecAggServer(cfg, "p/2", L)
    adv2 = []
    for n in NAMES:  # TRAIN_1 reply: masked input 1 + advertisement 2
        meta, vec = step(n, lambda s, n=n: s.mask(m1[n], d1[n], {"num_samples": 3}))
        srv1.add_masked(meta, vec)
        adv2.append(step(n, lambda s: s.advertise("p/2")))
    u1 = srv1.unmask_request()
    req2 = srv2.advertisements(adv2)
    r1, sh2 = [], []
    for n in NAMES[:4]:  # UNMASK_1: unmask 1 + share keys 2 ('echo' is gone from now on)
        r1.append(step(n, lambda s: s.unmask(u1)))
        sh2.append(step(n, lambda s: s.share_keys(req2)))
    res1 = srv1.unmask(r1)
    assert np.abs(res1.float_sum - _clipped_sum(d1, NAMES, 1.0)).max() <= res1.error_bound
    m2 = srv2.relay_shares(sh2)
    for n in NAMES[:4]:
        srv2.add_masked(*step(n, lambda s, n=n: s.mask(m2[n], d2[n], {"num_samples": 2})))
    u2 = srv2.unmask_request()
    res2 = srv2.unmask([step(n, lambda s: s.unmask(u2)) for n in NAMES[:3]])
    assert res2.dropped == [] and res2.survivors == NAMES[:4]
    assert np.abs(res2.float_sum - _clipped_sum(d2, NAMES[:4], 1.0)).max() <= res2.error_bound
    assert res2.num_samples == 8
    # finished rounds are pruned from the state when a new round starts
    step("alpha", lambda s: s.advertise("p/3"))
    st = SiteState.model_validate_json(states["alpha"])
    assert "p/1" not in st.rounds and "p/2" not in st.rounds and st.used_rounds == ["p/1", "p/2", "p/3"]


def test_int_fields_layout_and_limits(cfg, ids):
    sites = _sites(cfg, ids)
    srv = SecAggServer(cfg, "h", 10, int_fields={"num_samples": 1, "hist": 4})
    req = srv.advertisements([s.advertise("h") for s in sites.values()])
    mreqs = srv.relay_shares([s.share_keys(req) for s in sites.values()])
    with pytest.raises(ValueError, match="within"):
        sites["alpha"].mask(mreqs["alpha"], np.zeros(10), {"num_samples": cfg.int_max + 1, "hist": [0] * 4})
    with pytest.raises(ValueError, match="float array"):
        sites["alpha"].mask(mreqs["alpha"], np.zeros(10, int), {"num_samples": 1, "hist": [0] * 4})
    with pytest.raises(ValueError, match="NaN"):
        sites["alpha"].mask(mreqs["alpha"], np.full(10, np.nan), {"num_samples": 1, "hist": [0] * 4})
    for i, n in enumerate(NAMES):
        meta, vec = sites[n].mask(mreqs[n], np.full((2, 5), 0.5), {"num_samples": i, "hist": [i, 1, 2, 3]})
        assert vec.shape == (16,)
        srv.add_masked(meta, vec)
    u = srv.unmask_request()
    res = srv.unmask([sites[n].unmask(u) for n in NAMES])
    assert res.ints["hist"].tolist() == [10, 5, 10, 15] and res.num_samples == 10
    np.testing.assert_allclose(res.float_sum, 2.5, atol=res.error_bound)


# --------------------------------------------------------------------------- primitives


def test_pairwise_seed_derivation():
    a, b, c = (X25519PrivateKey.generate() for _ in range(3))
    s_ab = pairwise_seed(a, b.public_key(), "run/train/1", "alpha", "bravo")
    s_ba = pairwise_seed(b, a.public_key(), "run/train/1", "bravo", "alpha")
    assert len(s_ab) == 32 and s_ab == s_ba
    assert pairwise_seed(a, c.public_key(), "run/train/1", "alpha", "charlie") != s_ab
    assert pairwise_seed(a, b.public_key(), "run/train/2", "alpha", "bravo") != s_ab
    assert pairwise_seed(a, b.public_key(), "run/train/1", "alpha", "bravx") != s_ab
    # it is HKDF-SHA256 over the X25519 secret, salted by the round, bound to both names
    expected = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=hashlib.sha256(keys.encode_fields(keys.PROTOCOL_TAG, "round-salt", "run/train/1")).digest(),
        info=keys.encode_fields(keys.PROTOCOL_TAG, "pairwise-mask-seed", "run/train/1", "alpha", "bravo"),
    ).derive(a.exchange(b.public_key()))
    assert s_ab == expected
    # distinct (pair, round) → distinct seeds, over a small grid
    ks = [X25519PrivateKey.generate() for _ in range(4)]
    seeds = {
        pairwise_seed(ks[i], ks[j].public_key(), f"r{r}", f"s{i}", f"s{j}")
        for r in range(3)
        for i, j in itertools.combinations(range(4), 2)
    }
    assert len(seeds) == 18


def test_masks_cancel_and_expand_deterministically():
    seed = bytes(range(32))
    m = masking.expand_mask(seed, 1000)
    assert m.dtype == np.uint32 and np.array_equal(m, masking.expand_mask(seed, 1000))
    v = np.arange(masking.CHUNK + 123, dtype=np.uint32)  # crosses a block boundary
    w = v.copy()
    masking.apply_masks(w, [(seed, 1), (bytes(32), -1)])
    assert not np.array_equal(v, w)
    masking.apply_masks(w, [(bytes(32), 1), (seed, -1)])
    assert np.array_equal(v, w)
    assert np.array_equal(masking.expand_mask(seed, masking.CHUNK + 123)[:1000], m)


def _reference_masked(parts, weight, clip, n, seeds):
    """The unfused way: one weighted float64 vector, quantised, then each mask over all of it."""
    flat = np.concatenate([np.asarray(p, np.float64).reshape(-1) * weight for p in parts])
    qmax = masking.fixed_point_max(n)
    q = np.rint(np.clip(flat, -clip, clip) * (qmax / clip))
    out = np.clip(q, -qmax, qmax).astype(np.int32).view(np.uint32)
    for seed, sign in seeds:
        m = masking.expand_mask(seed, out.shape[0])
        out = (out + m) if sign == 1 else (out - m)
    return out


def test_fused_quantise_and_mask_is_bit_identical_to_the_unfused_way():
    """``quantize_parts_into`` (the site's path: the delta's tensors weighted, quantised and
    masked block by block, never concatenated) gives exactly the ring values of the plain
    pipeline, across block boundaries, with clipping, a weight and mixed dtypes."""
    rng = np.random.default_rng(7)
    parts = [rng.normal(0, 0.4, (3, masking.QCHUNK + 5)).astype(np.float32),
             rng.normal(0, 0.4, 17).astype(np.float64),
             rng.normal(0, 0.4, (masking.CHUNK + 11,)).astype(np.float32)]
    seeds = [(bytes(range(32)), 1), (bytes(range(1, 33)), -1), (bytes(32), 1)]
    clip, n, weight = 1.0, 5, 1.7
    total = sum(p.size for p in parts)
    out = np.empty(total, np.uint32)
    clipped = masking.quantize_parts_into(parts, out, clip, n, weight, masking.MaskStreams(seeds))
    want = _reference_masked(parts, weight, clip, n, seeds)
    assert np.array_equal(out, want)
    flat = np.concatenate([p.reshape(-1).astype(np.float64) * weight for p in parts])
    assert clipped == int(np.count_nonzero(np.abs(flat) > clip)) > 0
    # the single-vector form, without weight and masks, agrees too
    one = np.empty(total, np.uint32)
    masking.quantize_into(flat, one, clip, n)
    assert np.array_equal(one, _reference_masked([flat], 1.0, clip, n, []))
    with pytest.raises(ValueError, match="NaN"):
        masking.quantize_parts_into([np.array([0.0, np.nan])], np.empty(2, np.uint32), clip, n)
    with pytest.raises(ValueError, match="1-D uint32 array of 3"):
        masking.quantize_parts_into([np.zeros(3)], np.empty(4, np.uint32), clip, n)


def test_dequantise_into_tensors_equals_the_float64_way():
    rng = np.random.default_rng(8)
    ring = rng.integers(0, 2**32, masking.QCHUNK * 2 + 9, dtype=np.uint64).astype(np.uint32)
    shapes = [("a", (masking.QCHUNK + 3,)), ("b", (2, 3, 1)), ("c", (masking.QCHUNK,))]
    step = masking.quantization_step(10.0, 5)
    got = masking.dequantize_parts(ring, step, 0.37, shapes)
    ref = (masking.dequantize_step(ring, step) * 0.37).astype(np.float32)
    pos = 0
    for name, shape in shapes:
        k = int(np.prod(shape))
        assert got[name].dtype == np.float32 and got[name].shape == shape
        assert np.array_equal(got[name].reshape(-1), ref[pos:pos + k])
        pos += k
    with pytest.raises(ValueError, match="the shapes"):
        masking.dequantize_parts(ring, step, 1.0, shapes[:2])


def test_buffer_pool_reuses_only_what_was_given_back():
    from fedseg.privacy.buffers import BufferPool

    pool = BufferPool(keep=1)
    a = pool.take(10)
    assert pool.take(10) is not a  # still taken: a fresh one
    pool.give(a)
    pool.give(a)  # twice is once
    assert len(pool) == 1 and pool.take(11) is not a and pool.take(10) is a and len(pool) == 0
    pool.give(a[2:])  # a view is never pooled
    pool.give(np.empty(10, np.float32))
    assert len(pool) == 0
    b, c = pool.take(5), pool.take(6)
    pool.give(b)
    pool.give(c)  # keep=1: the older goes
    assert len(pool) == 1 and pool.take(6) is c


def test_server_sum_buffer_is_reused_and_uploads_can_be_read_in_blocks(cfg, ids, tmp_path: Path):
    """``SecAggServer(pool=...)``: the running sum's buffer goes back to the pool on
    ``AggregateResult.release`` and serves the next round; an upload given as a block source
    (``SpooledArray``: read from the spool file block by block) sums like the array."""
    from fedseg.privacy.buffers import BufferPool
    from fedseg.protocol.bulk import ArraySpec
    from fedseg.server.bulk_server import SpooledArray

    pool = BufferPool(keep=2)
    deltas = _deltas(9)
    seen = []
    for r, as_blocks in ((1, False), (2, True)):
        sites = {n: SecAggSite(cfg, n, ids[n]) for n in NAMES}
        srv = SecAggServer(cfg, f"pool/{r}", L, pool=pool)
        keys_req = srv.advertisements([sites[m].advertise(f"pool/{r}") for m in NAMES])
        reqs = srv.relay_shares([sites[n].share_keys(keys_req) for n in NAMES])
        for n in NAMES:
            meta, vec = sites[n].mask(reqs[n], deltas[n], {"num_samples": 1})
            if as_blocks:
                path = tmp_path / f"{n}.bin"
                path.write_bytes(b"pad" + vec.tobytes())
                vec = SpooledArray(path, 3, ArraySpec(k="v", d="<u4", s=[vec.shape[0]]))
                assert not isinstance(vec, np.ndarray)
            assert srv.add_masked(meta, vec)
        res = srv.unmask([sites[n].unmask(srv.unmask_request()) for n in NAMES])
        assert np.abs(res.float_sum - _clipped_sum(deltas, NAMES, 1.0)).max() <= res.error_bound
        seen.append(res.ring_sum.base)
        res.release()
    assert seen[0] is seen[1]  # round 2 summed into round 1's buffer


def test_shamir_threshold():
    secret = bytes(range(1, 33))
    sh = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    for combo in itertools.combinations(sh, 3):
        assert shamir.combine({x: sh[x] for x in combo}, 32) == secret
    assert shamir.combine(sh, 32) == secret
    try:  # two points of a degree-2 polynomial give an unrelated value (almost surely > 256 bits)
        fewer = shamir.combine({1: sh[1], 2: sh[2]}, 32)
    except ValueError:
        fewer = None
    assert fewer != secret
    assert shamir.split(secret, [1, 2, 3], 3) != shamir.split(secret, [1, 2, 3], 3)  # fresh randomness
    with pytest.raises(ValueError):
        shamir.split(secret, [1, 1, 2], 2)
    with pytest.raises(ValueError):
        shamir.split(secret, [0, 1, 2], 2)
    assert shamir.share_from_hex(shamir.share_to_hex(sh[4])) == sh[4]


def test_config_validation_and_openssh_identity(ids):
    roster = {n: identity_public_pem(k) for n, k in ids.items()}
    with pytest.raises(ValueError, match="threshold"):
        SecAggConfig(roster=roster, threshold=2, clip=1.0)  # 2t must exceed n
    # the OpenSSH form Flower's SuperNode auth uses (ssh-keygen -t ecdsa -b 384)
    key = ids["alpha"]
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert load_identity_private_key(priv).private_numbers() == key.private_numbers()
    ssh_roster = dict(roster, alpha=pub.decode())
    assert (
        SecAggConfig(roster=ssh_roster, threshold=3, clip=1.0).digest
        == SecAggConfig(roster=roster, threshold=3, clip=1.0).digest
    )
    assert load_identity_public_key(pub).public_numbers() == key.public_key().public_numbers()
    cfg = SecAggConfig(roster=roster, threshold=3, clip=1.0)
    from fedseg.errors import FedsegError

    with pytest.raises(FedsegError, match="does not match the roster"):
        SecAggSite(cfg, "alpha", ids["bravo"])


def test_advertisement_json_roundtrip(cfg, ids):
    adv = SecAggSite(cfg, "alpha", ids["alpha"]).advertise("j")
    assert KeyAdvertisement.model_validate_json(adv.model_dump_json()) == adv
