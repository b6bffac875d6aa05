"""Differential privacy wired into the federated job (issue #4 item 4): the plain-aggregation
round in process, and (slow) a whole ``simulate`` run with DP on through secure aggregation.

The site-side clipping/noise and the accountant are unit-tested in test_dp.py; the secure
round with DP (unweighted mean, ε per round) in test_secure_wiring.py."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest
from flwr.app import Message
from flwr.common import Metadata

from fedseg.client.secure import private_delta
from fedseg.privacy.dp import PrivacyAccountant
from fedseg.protocol import messages as pm
from fedseg.protocol.records import pack, unpack
from fedseg.server.config import JobConfig
from fedseg.server.job_context import JobContext, Site
from fedseg.server.messaging import Messenger
from fedseg.server.phases.training import train_round

SITES = ["siteA", "siteB", "siteC"]


def _reply(content) -> Message:
    md = Metadata(run_id=1, message_id="r", src_node_id=1, dst_node_id=0, reply_to_message_id="m",
                  group_id="", created_at=0.0, ttl=600.0, message_type=pm.TRAIN)
    return Message(content, metadata=md)


def test_plain_round_with_dp_is_unweighted_noised_and_accounted(tmp_path: Path) -> None:
    """``phases.training.train_round`` (without secure aggregation): the request carries the DP
    parameters with n = sites asked, the sites' (real) privatisation runs on their deltas, the
    server takes the UNWEIGHTED mean, does not hold the noised updates to ``max_update_norm``
    and logs dp_epsilon / dp_sigma in the pooled record."""
    from fedseg.privacy.dp import JobAccountant

    S, z = 1.0, 0.05
    cfg = JobConfig(run_dir=str(tmp_path / "run"), secure_aggregation=False, min_sites=2,
                    rounds=2, local_iterations=1, max_update_norm=0.1,
                    dp={"enabled": True, "clip_norm": S, "noise_multiplier": z})
    net = Messenger(None, print)  # type: ignore[arg-type]  (no Flower: exchange below)
    job = JobContext.create(None, cfg, print, net=net)  # type: ignore[arg-type]
    job.privacy = JobAccountant(cfg.dp.resolve(cfg.rounds), tmp_path / "run" / "dp.json")
    job.plan = NS(hash=lambda: "h")  # type: ignore[assignment]
    L = 20_000
    job.state.weights = {"w": np.zeros(L, np.float32)}
    u = 1 / math.sqrt(L)
    scale = {0: 0.2 * u, 1: 1.0, 2: -3.0}  # kept; clipped to +u; clipped to -u (per value)
    cases = {0: 8, 1: 20, 2: 3}
    for nid, name in enumerate(SITES):
        job.sites[nid] = Site(nid, pm.EnrolReply(
            site=name, channel_names={"0": "CT"}, labels={"background": 0, "x": 1},
            file_ending=".nii.gz", num_training_cases=cases[nid], gpu_memory_gb=0.0,
            device="cpu"))
    seen: list[pm.DPParams | None] = []

    def exchange(nodes, mtype, content_for, timeout, on_reply, after_push=None):
        net.sent_bytes = dict.fromkeys(nodes, 1)
        for nid in nodes:
            req, _ = unpack(content_for(nid), pm.TrainRequest)
            seen.append(req.dp)
            delta = private_delta(NS(site=SITES[nid]), req,
                                  {"d/w": np.full(L, scale[nid], np.float32)})
            rep = pm.TrainReply(site=SITES[nid], num_cases=cases[nid], iterations=1, loss=1.0,
                                seconds=1.0, iterations_per_s=1.0)
            on_reply(nid, _reply(pack(rep, delta)))
        return set(nodes)

    net.exchange = exchange  # type: ignore[method-assign]
    pooled = [train_round(job, r, False, [0, 1, 2]) for r in (1, 2)]
    assert seen == [pm.DPParams(clip_norm=S, noise_multiplier=z, n_sites=3)] * 6
    assert [p["status"] for p in pooled] == ["ok", "ok"] and pooled[0]["cases"] == 31
    step = job.state.weights["w"].astype(np.float64) / 2  # two identical rounds
    noise_std = z * S / 3 / math.sqrt(2)  # of the mean of 3, averaged over 2 rounds
    assert np.std(step) == pytest.approx(noise_std, rel=0.05)
    assert abs(np.mean(step) - 0.2 * u / 3) < 5 * noise_std / math.sqrt(L)
    acc = PrivacyAccountant()
    for p in pooled:
        acc.step(z)
        assert p["dp_sigma"] == pytest.approx(z) and p["dp_epsilon"] == pytest.approx(
            acc.epsilon(cfg.dp.delta))
    assert pooled[0]["dp_epsilon"] < pooled[1]["dp_epsilon"]


@pytest.mark.slow
def test_simulate_with_dp_writes_epsilon_per_round(tmp_path: Path) -> None:
    """End to end (real Flower processes, secure aggregation on): ``[job.dp]`` with a target ε;
    every pooled train record carries dp_epsilon (rising, the accountant's value for the
    noise multiplier the target gave) and dp_sigma, and the run finishes."""
    from fedseg.server.rundir import RunDir
    from fedseg.simulate import simulate

    dp = {"enabled": True, "clip_norm": 0.1, "target_epsilon": 50.0, "delta": 1e-5}
    simulate(tmp_path / "sim", sites=2, rounds=2, local_iterations=2, preset="tiny",
             device="cpu", timeout=480, extra={"dp": dp, "eval_every": 2})
    run = RunDir(tmp_path / "sim" / "run")
    assert run.status()["state"] == "finished"
    pooled = [r for r in run.read_metrics() if r["phase"] == "train" and r["site"] == "pooled"]
    assert [r["status"] for r in pooled] == ["ok", "ok"], pooled
    assert all(r["secure_aggregation"] and r["secagg"]["survivors"] == ["siteA", "siteB"]
               for r in pooled)
    z = JobConfig(run_dir="x", rounds=2, dp=dp).dp.resolve(2).noise_multiplier
    acc = PrivacyAccountant()
    for r in pooled:
        acc.step(z)
        assert r["dp_sigma"] == pytest.approx(z) and r["dp_delta"] == 1e-5
        assert r["dp_epsilon"] == pytest.approx(acc.epsilon(1e-5))
    assert pooled[0]["dp_epsilon"] < pooled[1]["dp_epsilon"] <= 50.0 + 1e-9
    assert (tmp_path / "sim" / "run" / "dp_accountant.json").is_file()
