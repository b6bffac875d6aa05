"""Secure aggregation wired into the federation, in process (no Flower processes): the
ClientApp's handlers are called with crafted Messages, the server side is ``SecureAggregation``
with the real SecAgg server. The crypto itself is covered by test_secagg.py; here: config and
key files, persisted site state, the forged-key refusal as the server sees it, and that the
unmasked sum gives the case-weighted mean update, pooled loss and case count."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common import Metadata

from fedseg.client import app as client_app
from fedseg.privacy import aggregates as agg
from fedseg.privacy.keys import b64e
from fedseg.privacy.provision import provision
from fedseg.privacy.secagg import KeyAdvertisement, ShareKeysRequest
from fedseg.privacy.site_agent import state_path
from fedseg.protocol import messages as pm
from fedseg.protocol.records import pack, unpack
from fedseg.server.job_context import JobContext
from fedseg.server.messaging import Messenger
from fedseg.server.secure_state import SecureAggregation

RUN_ID = 4242
SITES = ["siteA", "siteB", "siteC"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    provision(out, SITES)
    return out


def _ctx(pki: Path, site: str, tmp: Path) -> Context:
    nc = {"site": site, "data-dir": str(tmp / site / "data"), "cache-dir": str(tmp / site / "cache"),
          "identity-key": str(pki / "sites" / site / "identity.key"),
          "roster": str(pki / "roster.json")}
    return Context(run_id=RUN_ID, node_id=1, node_config=nc, state=RecordDict(), run_config={})


def _site_cfg(pki: Path, site: str, tmp: Path) -> client_app.SiteConfig:
    return client_app.SiteConfig.from_context(_ctx(pki, site, tmp))


def _msg(content: RecordDict, mtype: str, run_id: int = RUN_ID) -> Message:
    md = Metadata(run_id=run_id, message_id="m", src_node_id=0, dst_node_id=1,
                  reply_to_message_id="", group_id="", created_at=0.0, ttl=600.0,
                  message_type=mtype)
    return Message(content, metadata=md)


def _step(pki: Path, tmp: Path, site: str, part: pm.SecAggPart, mtype: str = pm.SHARE_KEYS,
          run_id: int = RUN_ID) -> Message:
    handler = client_app.share_keys if mtype == pm.SHARE_KEYS else client_app.unmask
    msg = _msg(pack(pm.SecAggStepRequest(secagg=part)), mtype, run_id)
    return handler(msg, _ctx(pki, site, tmp))


def _ok(reply: Message) -> pm.SecAggStepReply:
    assert "error" not in reply.content.config_records, unpack(reply.content, pm.ErrorReply)[0]
    return unpack(reply.content, pm.SecAggStepReply)[0]


def _error(reply: Message) -> pm.ErrorReply:
    assert "error" in reply.content.config_records
    return unpack(reply.content, pm.ErrorReply)[0]


def _setup(pki: Path, tmp: Path, sec: SecureAggregation, rid: str, layout) -> dict:
    for s in SITES:
        sec.take_adverts(rid, s, _ok(_step(pki, tmp, s, sec.part(advertise=[rid]))).secagg)
    req = sec.share_request(rid, layout)
    shares = [_ok(_step(pki, tmp, s, sec.part(share_keys=req))).secagg.share_keys for s in SITES]
    return sec.take_share_replies(rid, shares)


def test_site_refuses_a_forged_key_relayed_by_the_server(pki: Path, tmp_path: Path) -> None:
    sec = SecureAggregation(str(pki / "roster.json"), None, 10.0, "job1", RUN_ID)
    rid = sec.new_round("train", 1)
    adverts = {s: _ok(_step(pki, tmp_path, s, sec.part(advertise=[rid]))).secagg.advertisements[0]
               for s in SITES}
    # the server swaps siteB's mask key for one it controls (signature left as it was)
    forged = KeyAdvertisement(**{**adverts["siteB"].model_dump(), "s_pk": b64e(os.urandom(32))})
    req = ShareKeysRequest(round_id=rid, advertisements=[adverts["siteA"], forged, adverts["siteC"]])
    err = _error(_step(pki, tmp_path, "siteA", sec.part(share_keys=req)))
    assert err.kind == "secagg" and "does not verify against that site's roster key" in err.message
    # the abort is persisted (0600, keyed by job id): the round stays refused in later processes
    path = state_path(tmp_path / "siteA" / "cache", "job1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    honest = ShareKeysRequest(round_id=rid, advertisements=list(adverts.values()))
    err = _error(_step(pki, tmp_path, "siteA", sec.part(share_keys=honest)))
    assert err.kind == "secagg" and "was aborted" in err.message


def test_site_refuses_weak_threshold_and_foreign_round_ids(pki: Path, tmp_path: Path) -> None:
    sec = SecureAggregation(str(pki / "roster.json"), None, 10.0, "job2", RUN_ID)
    weak = sec.params.model_copy(update={"threshold": 1})
    err = _error(_step(pki, tmp_path, "siteA", pm.SecAggPart(params=weak, advertise=[f"{RUN_ID}/x/1"])))
    assert err.kind == "secagg" and "threshold must be between 2" in err.message
    err = _error(_step(pki, tmp_path, "siteA", sec.part(advertise=["999/job2/train1/1"])))
    assert err.kind == "secagg" and "does not start with this Flower run's id" in err.message
    err = _error(_step(pki, tmp_path, "siteA", sec.part(advertise=[f"{RUN_ID}/j/1"]), run_id=1))
    assert err.kind == "secagg" and "belongs to run 1" in err.message
    # a round id is single-use: after it was answered (or aborted) it cannot be advertised again
    rid = sec.new_round("train", 1)
    a1 = _ok(_step(pki, tmp_path, "siteA", sec.part(advertise=[rid]))).secagg.advertisements[0]
    a2 = _ok(_step(pki, tmp_path, "siteA", sec.part(advertise=[rid]))).secagg.advertisements[0]
    assert a1 == a2  # idempotent while the round is open (a retried message)


def test_secure_round_gives_weighted_mean_pooled_loss_and_count(pki: Path, tmp_path: Path) -> None:
    from fedseg.client import secure

    sec = SecureAggregation(str(pki / "roster.json"), None, 10.0, "job3", RUN_ID)
    shapes = {"w": (4, 5), "b": (5,)}
    # with per-round counts (a plan_file job; fingerprinted jobs keep them out of the rounds)
    layout = (agg.flat_length(shapes), agg.train_int_fields(with_counts=True))
    rid = sec.new_round("train", 1)
    mask_reqs = _setup(pki, tmp_path, sec, rid, layout)
    server = sec.aggs[rid].server
    rng = np.random.default_rng(0)
    cases = {"siteA": 8, "siteB": 20, "siteC": 3}
    losses = {"siteA": 0.9, "siteB": 1.3, "siteC": -0.2}
    deltas = {s: {k: rng.normal(0, 0.1, sh).astype(np.float32) for k, sh in shapes.items()}
              for s in SITES}
    scale = sum(cases.values()) / 3
    for s in SITES:
        req = pm.TrainRequest(round=1, job_id="job3", local_iterations=1, global_iteration_start=0,
                              global_total_iterations=1, plan_hash="h", case_scale=scale,
                              secagg=sec.part(mask=mask_reqs[s]))
        msg = _msg(pack(req), pm.TRAIN)
        reply = secure.train_reply(msg, _site_cfg(pki, s, tmp_path), req, deltas[s], cases[s],
                                   losses[s], None, 1, 1.0, 1.0)
        rep, arrays = unpack(reply.content, pm.TrainReply)
        assert rep.loss is None and rep.num_cases is None  # nothing per-site in clear
        assert set(arrays) == {pm.SECAGG_VECTOR}
        assert server.add_masked(rep.secagg.masked, arrays[pm.SECAGG_VECTOR])
    ureq = server.unmask_request()
    ureps = [_ok(_step(pki, tmp_path, s, sec.part(unmask=ureq), pm.UNMASK)).secagg.unmask
             for s in SITES]
    res = server.unmask(ureps)
    n = res.num_samples
    assert n == 31
    mean = agg.unflatten(res.float_sum * (scale / n), shapes)
    for k in shapes:
        want = sum(deltas[s][k].astype(np.float64) * cases[s] for s in SITES) / n
        np.testing.assert_allclose(mean[k], want, atol=1e-7)
    want_loss = sum(losses[s] * cases[s] for s in SITES) / n
    assert agg.pooled_loss(res.ints) == pytest.approx(want_loss, abs=1e-3)
    assert res.num_clipped == 0 and int(res.ints[agg.SITES_FIELD][0]) == 3  # the canary


def test_site_refuses_its_own_bad_update(pki: Path, tmp_path: Path) -> None:
    from fedseg.client import secure

    sec = SecureAggregation(str(pki / "roster.json"), None, 10.0, "job4", RUN_ID)
    req = pm.TrainRequest(round=1, job_id="job4", local_iterations=1, global_iteration_start=0,
                          global_total_iterations=1, plan_hash="h", max_update_norm=1.0,
                          secagg=sec.part())
    cfg = _site_cfg(pki, "siteA", tmp_path)
    for bad, why in (({"w": np.full(3, np.nan, np.float32)}, "NaN"),
                     ({"w": np.full(3, 5.0, np.float32)}, "exceeds the bound")):
        with pytest.raises(secure.UpdateRefused, match=why):
            secure.train_reply(_msg(pack(req), pm.TRAIN), cfg, req, bad, 3, 0.5, None, 1, 1.0, 1.0)


class InProcessNet(Messenger):
    """The job's messenger with the sites in this process: each message goes straight to the
    real ClientApp handlers (``handle(nid, content, mtype)``) instead of through Flower.
    ``dead`` (node ids that do not answer), ``mute`` (message type -> node ids that do not
    answer it) and ``calls`` (message types sent) are for the test."""

    def __init__(self, handle) -> None:
        super().__init__(None, lambda _: None)  # type: ignore[arg-type]  (no Flower grid)
        self.handle = handle
        self.dead: set[int] = set()
        self.mute: dict[str, set[int]] = {}
        self.calls: list[str] = []

    def exchange(self, node_ids, mtype, content_for, timeout, on_reply, after_push=None):
        nodes = list(node_ids)
        self.calls.append(mtype)
        self.sent_bytes = dict.fromkeys(nodes, 1)
        mute = self.dead | self.mute.get(mtype, set())
        replies = {n: self.handle(n, content_for(n), mtype) for n in nodes if n not in mute}
        for n, r in replies.items():
            on_reply(n, r)
        return set(replies)


def _in_process_job(pki: Path, tmp: Path, job_id: str, shapes: dict, cases: dict,
                    rounds: int, delta_for=None, privacy=None, bulk=None) -> JobContext:
    """A job's context for ``secure_rounds.train_round``: the real ClientApp handlers and
    SecAgg server, messages passed in process (``InProcessNet``, as ``job.net``) instead of
    through Flower. ``delta_for(nid)`` gives a site's delta (default: 0.01·(nid + 1)).
    ``bulk``: a real BulkServer (uploads and the unmask rendezvous over HTTP on 127.0.0.1), else
    arrays inside the messages."""
    from types import SimpleNamespace as NS

    from fedseg.client import secure
    from fedseg.server import secure_apply
    from fedseg.server.config import JobConfig
    from fedseg.server.job_context import Site

    def handle(nid: int, content: RecordDict, mtype: str) -> Message:
        s = SITES[nid]
        msg = _msg(content, mtype)
        if mtype in (pm.SHARE_KEYS, pm.UNMASK):
            return (client_app.share_keys if mtype == pm.SHARE_KEYS else client_app.unmask)(
                msg, _ctx(pki, s, tmp))
        req, _ = unpack(content, pm.TrainRequest)
        delta = (delta_for(nid) if delta_for else
                 {k: np.full(sh, 0.01 * (nid + 1), np.float32) for k, sh in shapes.items()})
        return secure.train_reply(msg, _site_cfg(pki, s, tmp), req, delta, cases[s],
                                  1.0 + nid, None, 5, 1.0, 5.0)

    cfg = JobConfig(run_dir=str(tmp / "run"), min_sites=2, rounds=rounds, local_iterations=1,
                    eval_every=1, per_site_metrics=True, job_id=job_id, seed=0,
                    round_timeout_s=60, site_momentum="reset", site_lr=0.01)
    job = JobContext.create(None, cfg, lambda _: None, net=InProcessNet(handle))  # type: ignore[arg-type]
    job.plan = NS(hash=lambda: "h", labels={"background": 0, "x": 1},  # type: ignore[assignment]
                  num_training_cases=sum(cases.values()))
    job.state.weights = {k: np.zeros(sh, np.float32) for k, sh in shapes.items()}
    for nid, name in enumerate(SITES):
        job.sites[nid] = Site(nid, pm.EnrolReply(
            site=name, channel_names={"0": "CT"}, labels={"background": 0, "x": 1},
            file_ending=".nii.gz", num_training_cases=None, gpu_memory_gb=0.0, device="cpu"))
    job.privacy = privacy
    job.bulk = bulk  # None: arrays inside the messages (tests/test_bulk_transfer.py: the HTTP way)
    job.secure = SecureAggregation(str(pki / "roster.json"), None, 10.0, job_id, RUN_ID)
    # as the secure fingerprint would: N, the rounds' fixed denominator (server/secure_apply.py)
    secure_apply.set_census(job, SITES, sum(cases.values()))
    return job


def test_rounds_fold_setup_and_recover_a_dropped_site(pki: Path, tmp_path: Path) -> None:
    """``secure_rounds.train_round`` over three rounds with an in-process "grid": round 1 sets
    up its keys (2 exchanges), later rounds only add UNMASK to TRAIN, and a site that dies in
    round 3 after sharing keys is recovered (its masks removed, the sum over the others)."""
    from fedseg.server import secure_rounds as sr

    shapes = {"w": (3, 4), "b": (4,)}
    job = _in_process_job(pki, tmp_path, "job5", shapes, {"siteA": 8, "siteB": 20, "siteC": 3}, 3)
    calls, dead, cfg = job.net.calls, job.net.dead, job.cfg
    pooled = []
    for rnd in (1, 2, 3):
        if rnd == 3:
            dead.add(2)
        pooled.append(sr.train_round(job, rnd, False, [0, 1, 2]))
    assert calls == [pm.SHARE_KEYS, pm.SHARE_KEYS, pm.TRAIN, pm.UNMASK,
                     pm.TRAIN, pm.UNMASK, pm.TRAIN, pm.UNMASK]
    assert [p["status"] for p in pooled] == ["ok"] * 3
    assert [p["secagg"]["exchanges"] for p in pooled] == [4, 2, 2]
    # a partial round: weighted by the fingerprint's fixed N = 31 (server/secure_apply.py), and
    # neither its case count nor its loss is unmasked or reported
    assert pooled[2]["secagg"]["dropped"] == ["siteC"] and "cases" not in pooled[2]
    assert "loss" not in pooled[2] and "partial" in pooled[2] and pooled[0]["cases"] == 31
    assert pooled[0]["loss"] == pytest.approx((8 * 1 + 20 * 2 + 3 * 3) / 31, abs=1e-3)
    want = 2 * (8 * 0.01 + 20 * 0.02 + 3 * 0.03) / 31 + (8 * 0.01 + 20 * 0.02) / 31
    np.testing.assert_allclose(job.state.weights["b"], want, rtol=1e-6)
    round_ids = [p["secagg"]["round_id"] for p in pooled]
    assert len(set(round_ids)) == 3 and all(r.startswith(f"{RUN_ID}/job5/") for r in round_ids)

    # round 4 after a retry-like gap: no keys set up in advance, siteC dies during the set-up
    # -> logged as a dropped training site, the round runs with the other two
    cfg.rounds = 4
    calls.clear()
    pooled4 = sr.train_round(job, 4, False, [0, 1, 2])
    assert calls == [pm.SHARE_KEYS, pm.SHARE_KEYS, pm.TRAIN, pm.UNMASK]
    assert pooled4["status"] == "ok" and pooled4["sites_ok"] == 2
    recs = job.run.read_metrics()
    dropped = [r for r in recs if r["phase"] == "train" and r["round"] == 4 and r["site"] == "siteC"]
    assert dropped and dropped[0]["status"] == "dropped", dropped


@pytest.fixture
def bulk_server(tmp_path: Path):
    from fedseg.server.bulk_server import BulkServer

    srv = BulkServer(tmp_path / "spool").start()
    yield srv
    srv.stop()


def test_unmask_through_the_bulk_rendezvous(pki: Path, tmp_path: Path, bulk_server,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With bulk transfers and sites that outlive their messages (the site worker), the unmask
    step and the next round's share keys go through each site's rendezvous: a round is ONE
    Flower exchange, with the same result as the two-exchange path (the test above). A site
    dead after sharing keys is recovered as before."""
    from fedseg.client import secure
    from fedseg.server import secure_rounds as sr

    monkeypatch.setitem(secure._BACKGROUND, "on", True)
    shapes = {"w": (3, 4), "b": (4,)}
    job = _in_process_job(pki, tmp_path, "job-rv", shapes, {"siteA": 8, "siteB": 20, "siteC": 3},
                          3, bulk=bulk_server)
    pooled = []
    for rnd in (1, 2, 3):
        if rnd == 3:
            job.net.dead.add(2)
        pooled.append(sr.train_round(job, rnd, False, [0, 1, 2]))
    assert job.net.calls == [pm.SHARE_KEYS, pm.SHARE_KEYS, pm.TRAIN, pm.TRAIN, pm.TRAIN]
    assert [p["status"] for p in pooled] == ["ok"] * 3
    assert [p["secagg"]["exchanges"] for p in pooled] == [3, 1, 1]
    # a partial round: weighted by the fingerprint's fixed N = 31 (server/secure_apply.py), and
    # neither its case count nor its loss is unmasked or reported
    assert pooled[2]["secagg"]["dropped"] == ["siteC"] and "cases" not in pooled[2]
    assert "loss" not in pooled[2] and "partial" in pooled[2] and pooled[0]["cases"] == 31
    want = 2 * (8 * 0.01 + 20 * 0.02 + 3 * 0.03) / 31 + (8 * 0.01 + 20 * 0.02) / 31
    np.testing.assert_allclose(job.state.weights["b"], want, rtol=1e-6)
    unmasks = [r for r in job.run.read_metrics() if r.get("step") == "unmask"]
    assert [(r["via_rendezvous"], r["via_flower"]) for r in unmasks] == [(3, 0), (3, 0), (2, 0)]
    assert not list(bulk_server.spool.iterdir())  # every upload folded and deleted


def test_a_silent_listener_gets_the_step_by_flower(pki: Path, tmp_path: Path, bulk_server,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A site that said it listens but does not answer its rendezvous (its worker restarted
    after the upload, say) is sent the unmask step as a Flower message after
    ``FAST_STEP_WAIT_S``; if it is gone altogether, its upload still counts: its self mask is
    rebuilt from the others' shares."""
    from fedseg.client import secure
    from fedseg.server import secure_rounds as sr
    from fedseg.server import secure_steps

    monkeypatch.setitem(secure._BACKGROUND, "on", True)
    monkeypatch.setattr(secure_steps, "FAST_STEP_WAIT_S", 0.5)
    real_listen = secure.listen_for_step
    monkeypatch.setattr(secure, "listen_for_step", lambda rv, run_id, cfg: (
        None if cfg.site == "siteC" else real_listen(rv, run_id, cfg)))
    shapes = {"w": (3, 4), "b": (4,)}
    cases = {"siteA": 8, "siteB": 20, "siteC": 3}
    job = _in_process_job(pki, tmp_path, "job-rv2", shapes, cases, 2, bulk=bulk_server)
    p1 = sr.train_round(job, 1, False, [0, 1, 2])  # siteC answers the Flower UNMASK
    assert job.net.calls == [pm.SHARE_KEYS, pm.SHARE_KEYS, pm.TRAIN, pm.UNMASK]
    assert p1["status"] == "ok" and p1["secagg"]["exchanges"] == 4
    job.net.calls.clear()
    job.net.mute[pm.UNMASK] = {2}  # siteC uploads, then is gone
    p2 = sr.train_round(job, 2, False, [0, 1, 2])
    assert job.net.calls == [pm.TRAIN, pm.UNMASK]
    assert p2["status"] == "ok" and p2["secagg"]["survivors"] == SITES and p2["cases"] == 31
    want = 2 * (8 * 0.01 + 20 * 0.02 + 3 * 0.03) / 31
    np.testing.assert_allclose(job.state.weights["b"], want, rtol=1e-6)


def test_dp_round_clips_noises_unweighted_and_accounts_epsilon(pki: Path, tmp_path: Path) -> None:
    """Differential privacy through secure aggregation: each site clips its delta to S and adds
    N(0, (zS)²/n) before masking, unweighted; the server applies sum / survivors and logs
    dp_epsilon (cumulative; equal to dp-accounting's RDP accountant run directly) and dp_sigma
    (z·√(m/n): lower in the round a site drops after sharing keys)."""
    import dp_accounting as dpa

    from fedseg.privacy.dp import DPConfig, JobAccountant
    from fedseg.server import secure_rounds as sr

    S, z, delta_ = 1.0, 0.05, 1e-5
    shapes = {"w": (200, 100), "b": (50,)}
    L = 200 * 100 + 50
    # site 0 is under the bound (kept), sites 1 and 2 are clipped to +u and -u (u = 1/√L each)
    scale = {0: 0.2 / math.sqrt(L), 1: 1.0, 2: -3.0}
    cases = {"siteA": 8, "siteB": 20, "siteC": 3}
    priv = JobAccountant(DPConfig(enabled=True, clip_norm=S, noise_multiplier=z,
                                  target_delta=delta_))
    job = _in_process_job(
        pki, tmp_path, "job-dp", shapes, cases, 3, privacy=priv,
        delta_for=lambda nid: {k: np.full(sh, scale[nid], np.float32) for k, sh in shapes.items()})
    pooled, steps = [], []
    for rnd in (1, 2, 3):
        if rnd == 3:
            job.net.dead.add(2)  # siteC dies after sharing keys: m = 2 of n = 3 in the sum
        before = {k: v.astype(np.float64) for k, v in job.state.weights.items()}
        pooled.append(sr.train_round(job, rnd, False, [0, 1, 2]))
        steps.append(np.concatenate([(job.state.weights[k] - before[k]).ravel()
                                     for k in sorted(shapes)]))
    assert [p["status"] for p in pooled] == ["ok"] * 3
    u = 1 / math.sqrt(L)
    # unweighted mean of the clipped deltas (case weights would give (8·0.2 + 20 − 3)·u / 31)
    for step, m, want in ((steps[0], 3, (0.2 + 1 - 1) * u / 3), (steps[2], 2, (0.2 + 1) * u / 2)):
        noise_std = z * S * math.sqrt(m / 3) / m  # of the MEAN: sum std z·S·√(m/n), over m
        assert np.std(step) == pytest.approx(noise_std, rel=0.05)
        assert abs(np.mean(step) - want) < 5 * noise_std / math.sqrt(L)
    assert abs(np.mean(steps[0]) - (8 * 0.2 + 20 - 3) * u / 31) > 20 * z * S / 3 / math.sqrt(L)
    # the accountant: one Gaussian release per round, z_eff = z·√(m/n), sample rate 1
    rdp = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_SPECIAL)
    eps = []
    for p, m in zip(pooled, (3, 3, 2), strict=True):
        z_eff = z * math.sqrt(m / 3)
        rdp.compose(dpa.GaussianDpEvent(z_eff))
        assert p["dp_sigma"] == pytest.approx(z_eff) and p["dp_delta"] == delta_
        assert p["dp_noise_std"] == pytest.approx(z_eff * S)
        assert p["dp_epsilon"] == pytest.approx(rdp.get_epsilon(delta_), rel=1e-9)
        eps.append(p["dp_epsilon"])
    assert eps[0] < eps[1] < eps[2]
    logged = [r for r in job.run.read_metrics() if r["phase"] == "train" and r["site"] == "pooled"]
    assert [r["dp_epsilon"] for r in logged] == eps


def test_site_refuses_a_noise_split_larger_than_its_roster(pki: Path, tmp_path: Path) -> None:
    from fedseg.client import secure

    sec = SecureAggregation(str(pki / "roster.json"), None, 10.0, "job-dp2", RUN_ID)
    req = pm.TrainRequest(round=1, job_id="job-dp2", local_iterations=1, global_iteration_start=0,
                          global_total_iterations=1, plan_hash="h", secagg=sec.part(),
                          dp=pm.DPParams(clip_norm=1.0, noise_multiplier=1.0, n_sites=50))
    with pytest.raises(secure.UpdateRefused, match="over 50 sites: its roster has 3"):
        secure.train_reply(_msg(pack(req), pm.TRAIN), _site_cfg(pki, "siteA", tmp_path), req,
                           {"w": np.ones(3, np.float32)}, 3, 0.5, None, 1, 1.0, 1.0)


def test_site_state_stays_bounded_over_many_rounds(pki: Path, tmp_path: Path) -> None:
    """Task: the site's secure-aggregation state file must not grow with the rounds. Over 24
    rounds, with siteC dying every 5th round (so dropout recovery runs and stale next-round
    keys are left behind), every round unmasks, each file keeps at most 3 rounds and stops
    growing once the short list of used ids is full; an old round id stays refused."""
    from fedseg.privacy.site_agent import MAX_USED_IDS, StoredState
    from fedseg.server import secure_rounds as sr

    shapes = {"w": (3, 4)}
    rounds = 24
    job = _in_process_job(pki, tmp_path, "job-grow", shapes, {s: 5 for s in SITES}, rounds)
    paths = {s: state_path(tmp_path / s / "cache", "job-grow") for s in SITES}
    sizes: dict[str, list[int]] = {s: [] for s in SITES}
    pooled = []
    for rnd in range(1, rounds + 1):
        job.net.dead.clear()
        if rnd % 5 == 0:
            job.net.dead.add(2)
        pooled.append(sr.train_round(job, rnd, False, [0, 1, 2]))
        for s in SITES:
            sizes[s].append(paths[s].stat().st_size)
            stored = StoredState.load(paths[s].read_text())
            assert len(stored.state.rounds) <= 3, (rnd, s, list(stored.state.rounds))
            assert len(stored.state.used_rounds) <= MAX_USED_IDS + 3
            assert stat.S_IMODE(paths[s].stat().st_mode) == 0o600
            for rs in stored.state.rounds.values():  # own secrets gone once the input is masked
                if rs.stage in ("masked", "answered"):
                    assert rs.c_sk == rs.s_sk == rs.b == ""
    assert [p["status"] for p in pooled] == ["ok"] * rounds
    assert all(pooled[r - 1]["secagg"]["recovered"] for r in range(5, rounds + 1, 5))
    for s in SITES:
        warm = sizes[s][11:rounds - 1]  # the last round advertises nothing after it
        assert max(warm) <= 1.05 * max(sizes[s][:11]), (s, sizes[s])
        assert max(warm) < 12_000, (s, sizes[s])
    # a pruned round's id is still single-use
    old = pooled[1]["secagg"]["round_id"]
    err = _error(_step(pki, tmp_path, "siteA", job.secure.part(advertise=[old])))
    assert err.kind == "secagg" and "not newer" in err.message


def test_state_file_from_before_pruning_is_read(pki: Path, tmp_path: Path) -> None:
    """A state file written before the high-water marks (a bare SiteState) still loads, and the
    ids it lists as used stay refused."""
    from fedseg.privacy.secagg import SiteState
    from fedseg.privacy.site_agent import StoredState

    sec = SecureAggregation(str(pki / "roster.json"), None, 10.0, "job-old", RUN_ID)
    path = state_path(tmp_path / "siteA" / "cache", "job-old")
    path.parent.mkdir(parents=True)
    used = f"{RUN_ID}/job-old/train3/7"
    path.write_text(SiteState(site="siteA", used_rounds=[used]).model_dump_json())
    for rid in (used, f"{RUN_ID}/job-old/train2/6"):
        err = _error(_step(pki, tmp_path, "siteA", sec.part(advertise=[rid])))
        assert "not newer" in err.message
    _ok(_step(pki, tmp_path, "siteA", sec.part(advertise=[f"{RUN_ID}/job-old/train4/8"])))
    stored = StoredState.load(path.read_text())
    assert stored.format == 2 and stored.high_water == {RUN_ID: 8}
