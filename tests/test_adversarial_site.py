"""A dishonest registered site and an impostor against a secure job (issue #13, points 3, 4, 7).

Fast (default run): the sum checks of ``server/plausibility.py`` on numbers, the key -> site
binding of ``server/site_binding.py`` on real provisioned keys, and a wrecking update (x1e6)
through the real ClientApp handlers and SecAgg server in process (``test_secure_wiring``'s
stand-in job): refused, the model unchanged, the retry applied.

Slow (``-m slow``, real processes on 127.0.0.1): ``fedseg-server start`` with TLS and SuperNode
authentication, three ``fedseg-client`` sites of which siteB multiplies its delta by 1e6 in
round 2 and replays its previous masked vector in round 3 (``FEDSEG_FAULT_INJECT``,
``client/faults.py``), and a bare SuperNode holding siteD's key that claims to be siteA. Both
bad rounds are refused without changing the model (the refused record's model digest equals the
snapshot of the round before), retried and completed; the impostor is refused at enrolment and
the real siteA trains every round.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fedseg.privacy import aggregates as agg
from fedseg.privacy.provision import provision
from fedseg.server import plausibility as pl
from fedseg.server.rundir import RunDir, snapshot_name
from fedseg.server.site_binding import SiteBinding

sys.path.insert(0, str(Path(__file__).parent))
from test_secure_wiring import SITES, _in_process_job  # noqa: E402
from waiting import wait_until  # noqa: E402

RC = pl.RobustConfig()


# ------------------------------------------------------------------ sum checks, on numbers


def _ints(sites: int, clipped_loss: tuple[int, int] = (1000, 0), **extra) -> dict:
    return {agg.SITES_FIELD: np.array([sites]), "loss": np.array(clipped_loss), **extra}


def test_canary_and_clip_count_catch_a_vector_not_masked_for_the_round() -> None:
    assert pl.check_sums(_ints(3), 0, 3, 1000, RC) == []
    # what a replay leaves: random ring words in the canary and the clip count
    bad = pl.check_sums(_ints(2_741_899_565), 3_900_000_000, 3, 36_443, RC)
    assert any(p.startswith("canary") for p in bad) and any("more than the" in p for p in bad)
    # the wrecking update through the honest code path: every value clipped
    wreck = pl.check_sums(_ints(3), 36_443, 3, 36_443, RC)
    assert len(wreck) == 1 and "an honest update clips none" in wreck[0]
    # per-round counts (plan_file jobs): fewer cases than sites is no count
    assert pl.check_sums(_ints(3, num_samples=np.array([2])), 0, 3, 10, RC)
    assert pl.check_sums({**_ints(3), "eval_cases": np.array([2]), "dice": np.array([3 << 16]),
                          "hd95": np.array([0]), "hd95_cases": np.array([0])}, 0, 3, 10, RC)
    assert pl.check_loss(1e9, 30, 3) and not pl.check_loss(40.0, 30, 3)


def test_step_norm_against_the_bound_the_model_and_the_history() -> None:
    assert pl.check_step(0.5, 25.8, [0.4, 0.6], RC, None) == []
    assert pl.check_step(float("nan"), 25.8, [], RC, None)
    assert "max_update_norm" in pl.check_step(2.0, 25.8, [], RC, 1.0)[0]
    assert "global weights' norm" in pl.check_step(1456.0, 25.8, [], RC, None)[0]
    grown = pl.check_step(7.0, 25.8, [0.4, 0.6, 0.5], RC, None)
    assert len(grown) == 1 and "median 0.5" in grown[0]
    assert pl.check_step(7.0, 25.8, [0.5], RC, None) == []  # one round is no history yet
    # differential privacy: S plus the summed noise's norm over m, nothing else
    bound = pl.dp_step_bound(1.0, 0.1, 3, 10_000)
    assert pl.check_step(bound * 0.99, 0.1, [1e-3, 1e-3], RC, None, bound) == []
    assert pl.check_step(bound * 1.01, 0.1, [], RC, None, bound)


# ------------------------------------------------------------------ key -> site binding


def test_binding_refuses_a_node_claiming_another_sites_name(tmp_path: Path) -> None:
    roster = provision(tmp_path / "pki", ["hospitalA", "hospitalB"], days=2)
    b = SiteBinding(str(tmp_path / "pki" / "roster.json"), required=False)
    key_a = roster.site("hospitalA").public_key_pem.encode()
    key_b = roster.site("hospitalB").public_key_pem.encode()
    assert b.check(1, key_a, "hospitalA") is None
    why = b.check(2, key_b, "hospitalA")
    assert why and "key of roster site 'hospitalB'" in why and "claims to be site 'hospitalA'" in why
    # the OpenSSH form the roster also holds maps to the same site
    assert b.site_of(roster.site("hospitalB").public_key.encode()) == "hospitalB"
    # a throw-away key (a plain-HTTP trial's SuperNode): unbound, refused only when required
    from cryptography.hazmat.primitives import serialization

    other = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert b.check(3, other, "hospitalA") is None and b.check(4, None, "hospitalA") is None
    strict = SiteBinding(str(tmp_path / "pki" / "roster.json"), required=True)
    assert "not the key of any roster site" in strict.check(3, other, "hospitalA")


# ------------------------------------------------------------------ in process, real crypto


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    provision(out, SITES)
    return out


def test_wrecking_update_is_refused_and_the_retry_applied(pki: Path, tmp_path: Path) -> None:
    """siteB multiplies its delta by 1e6 in the first attempt of round 3: the round is refused
    (clip count and step norm), the weights are bit-identical, the refusal is logged; the retry
    (same survivors) is applied. A retry over OTHER survivors is refused before unmasking."""
    from fedseg.server import secure_rounds as sr

    shapes = {"w": (40, 50), "b": (50,)}
    rng = np.random.default_rng(0)
    attempts: list[int] = []

    def delta_for(nid: int) -> dict:
        d = {k: rng.normal(0, 0.01, sh).astype(np.float32) for k, sh in shapes.items()}
        if nid == 1 and len(attempts) == 3:  # siteB, the first attempt of round 3
            d = {k: v * 1e6 for k, v in d.items()}
        return d

    job = _in_process_job(pki, tmp_path, "adv", shapes, {s: 10 for s in SITES}, 5,
                          delta_for=delta_for)
    job.state.weights = {k: rng.normal(0, 1, sh).astype(np.float32) for k, sh in shapes.items()}
    digests = []
    for rnd in (1, 2, 3, 3):
        attempts.append(rnd)
        before = pl.model_digest(job.state.weights)
        p = sr.train_round(job, rnd, False, [0, 1, 2])
        digests.append((before, pl.model_digest(job.state.weights), p))
    statuses = [d[2]["status"] for d in digests]
    assert statuses == ["ok", "ok", "refused", "ok"], [d[2].get("reason") for d in digests]
    before, after, refused = digests[2]
    assert before == after == refused["model_digest"]  # not one bit of the model changed
    assert any("clip count" in c for c in refused["checks"]), refused["checks"]
    assert any("global weights' norm" in c for c in refused["checks"]), refused["checks"]
    assert refused["secagg"]["num_clipped"] > 0.9 * 2050
    assert digests[3][0] == before != digests[3][1]  # the retry started from it and applied
    events = [r for r in job.run.read_metrics() if r.get("step") == "plausibility"]
    assert len(events) == 1 and events[0]["status"] == "refused" and events[0]["round"] == 3
    honest = [d[2]["update_norm"] for d in digests if d[2]["status"] == "ok"]
    assert refused["update_norm"] > 100 * max(honest)

    # a second refusal of round 4, then a retry in which siteC is gone: not unmasked
    attempts.append(3)  # delta_for: len(attempts) == 5 -> honest; force a refusal by history
    job.secure.robust_state["refused"][4] = list(SITES)
    job.net.dead.add(2)
    p = sr.train_round(job, 4, False, [0, 1, 2])
    assert p["status"] == "refused" and "other survivors" in p["reason"], p
    assert "secagg" not in p  # nothing was unmasked


# ------------------------------------------------------------------ real processes

SERVER_TOML = """host = "127.0.0.1"
port = {public}
superlink_port = {superlink}
state_dir = "state"
pki = "pki"

[job]
run_dir = "run"
job_id = "adversarial"
min_sites = 3
rounds = 4
local_iterations = 10
eval_every = 10
snapshot_every = 1
plan_preset = "tiny"
enrol_timeout_s = 600
round_timeout_s = 300
site_wait_s = 60
"""




@pytest.mark.slow
def test_wrecking_update_replay_and_impostor_are_refused(tmp_path: Path) -> None:
    from fedseg.data.demo import make_demo_data
    from fedseg.runtime.processes import ManagedProcess, flower_env, free_port, stop_all, supernode_argv

    names = ["siteA", "siteB", "siteC", "siteD"]  # siteD's key is the impostor's
    data = make_demo_data(tmp_path / "demo", sites=3, cases=5, test_cases=0, seed=3)
    pki = tmp_path / "pki"
    roster = provision(pki, names, ["127.0.0.1", "localhost"], days=2, consortium="adversarial")
    public, superlink = free_port(), free_port()
    (tmp_path / "server.toml").write_text(SERVER_TOML.format(public=public, superlink=superlink))
    server = ManagedProcess("fedseg-server", ["fedseg-server", "start", "--config",
                                              str(tmp_path / "server.toml")],
                            tmp_path / "logs" / "fedseg-server.log", flower_env(None), cwd=tmp_path)
    procs = [server]
    run = RunDir(tmp_path / "run")

    def client(site: str, folder: Path, extra: dict | None = None) -> ManagedProcess:
        argv = ["fedseg-client", "--site", site, "--data", str(folder), "--pki", str(pki),
                "--server", f"127.0.0.1:{public}", "--cache", str(tmp_path / "cache" / site),
                "--device", "cpu"]
        p = ManagedProcess(f"client-{site}", argv, tmp_path / "logs" / f"client-{site}.log",
                           flower_env(None, {"OMP_NUM_THREADS": "1", **(extra or {})}),
                           cwd=tmp_path).start()
        procs.append(p)
        return p

    def diag() -> str:
        return server.log_path.read_text(errors="replace")[-6000:] if server.log_path.exists() else ""

    try:
        server.start()
        wait_until(lambda: (tmp_path / "state" / "node_ids.json").is_file(), 120, "registration", diag)
        client("siteA", data[0])
        client("siteB", data[1], {"FEDSEG_FAULT_INJECT": "scale-update:1e6@2,replay-masked@3"})
        client("siteC", data[2])

        def enrolled() -> set[str]:
            return {r["site"] for r in run.read_metrics()
                    if r["phase"] == "enrol" and r["status"] == "ok"}

        wait_until(lambda: enrolled() >= {"siteA", "siteB", "siteC"}, 600, "3 sites enrolled", diag)
        # the impostor: siteD's key, claiming siteA, with a roster doctored to match its key
        doctored = json.loads((pki / "roster.json").read_text())
        doctored["sites"]["siteA"] = doctored["sites"]["siteD"]
        (tmp_path / "impostor").mkdir()
        (tmp_path / "impostor" / "roster.json").write_text(json.dumps(doctored))
        shutil.copytree(data[0], tmp_path / "impostor" / "data")
        nc = {"site": "siteA", "data-dir": str(tmp_path / "impostor" / "data"),
              "cache-dir": str(tmp_path / "impostor" / "cache"), "device": "cpu",
              "identity-key": str(pki / "sites" / "siteD" / "identity.key"),
              "roster": str(tmp_path / "impostor" / "roster.json")}
        imp = ManagedProcess(
            "impostor", supernode_argv(f"127.0.0.1:{public}", free_port(), nc, insecure=False,
                                       root_certificates=pki / "ca.pem",
                                       auth_private_key=pki / "sites" / "siteD" / "identity.key",
                                       max_retries=0),
            tmp_path / "logs" / "impostor.log", flower_env(tmp_path / "impostor" / "home"),
            cwd=tmp_path).start()
        procs.append(imp)
        assert server.proc is not None
        code = server.proc.wait(timeout=1500)
        assert code == 0, diag()
    finally:
        stop_all(procs, timeout=15)

    recs = run.read_metrics()
    node_ids = json.loads((tmp_path / "state" / "node_ids.json").read_text())
    pooled = [r for r in recs if r["phase"] == "train" and r["site"] == "pooled"]
    print(json.dumps([{k: r.get(k) for k in ("round", "status", "reason", "update_norm",
                                              "weight_norm", "loss")} for r in pooled], indent=1))
    assert [(r["round"], r["status"]) for r in pooled] == [
        (1, "ok"), (2, "refused"), (2, "ok"), (3, "refused"), (3, "ok"), (4, "ok")], pooled

    def snap_digest(rnd: int) -> str:
        ck = run.load_checkpoint(snapshot_name(rnd))
        assert ck is not None
        return pl.model_digest(ck["weights"])

    wreck, replay = pooled[1], pooled[3]
    # the x1e6 update: refused, the model is still round 1's; the retry completed round 2
    assert any(c.startswith("clip count") for c in wreck["checks"]), wreck
    assert wreck["model_digest"] == snap_digest(1)
    assert math.isclose(wreck["weight_norm"], pooled[0]["weight_norm"], rel_tol=1e-9)
    assert wreck["update_norm"] > 20 * pooled[0]["update_norm"]
    # the replayed vector: the canary is random, refused before any step; model is round 2's
    assert any(c.startswith("canary") for c in replay["checks"]), replay
    assert replay["model_digest"] == snap_digest(2)
    n_train = json.loads((tmp_path / "run" / "secure_cases.json").read_text())["train_cases"]
    for r in pooled:  # honest rounds: sane steps; full rounds report the fixed N
        if r["status"] == "ok":
            assert r["update_norm"] < pooled[0]["weight_norm"] and r["cases"] == n_train
    events = [r for r in recs if r.get("step") == "plausibility"]
    assert [e["round"] for e in events] == [2, 3] and all(e["status"] == "refused" for e in events)
    console = server.log_path.read_text(errors="replace")  # fedseg-server's
    assert "round 2: refused" in console and "round 3: refused" in console, console
    assert "canary" in console and "claims to be site 'siteA'" in console, console
    # the impostor: refused at enrolment, logged; the real siteA trained every round
    refused = [r for r in recs if r["phase"] == "enrol" and r["status"] == "refused"]
    assert len(refused) == 1, refused
    assert refused[0]["node"] == node_ids["siteD"], (refused, node_ids)
    assert "key of roster site 'siteD'" in refused[0]["reason"], refused
    a_enrols = [r for r in recs if r["phase"] == "enrol" and r.get("site") == "siteA"]
    assert [r["node"] for r in a_enrols] == [node_ids["siteA"]], a_enrols
    a_train = [r for r in recs if r["phase"] == "train" and r["site"] == "siteA"]
    assert len(a_train) == 6 and all(r["status"] == "ok" for r in a_train), a_train
    assert json.dumps(roster.sites["siteD"].public_key)  # the key the impostor held
