"""Federation under faults, with real Flower processes on loopback (slow: ``pytest -m slow``).

* a site's SuperNode SIGKILLed mid-round: the round completes with the others (``dropped`` with
  the reason in metrics.jsonl), the run finishes, the restarted site (new node id) rejoins at
  the next round; in the same federation a site sends a NaN update once: ``rejected``, not
  averaged;
* the server host crashes (SIGKILL of fedseg-server, SuperLink, SuperExec and ServerApp) mid-run:
  ``fedseg-server resume RUN_DIR`` finishes the same number of rounds, each round completed once,
  same plan, the sites' caches and trainer state continue; a 4th site with bad data refuses to
  start and the others are unaffected; all through the real CLIs;
* Ctrl-C on ``fedseg simulate`` stops every process it started within seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from waiting import wait_until

from fedseg.data.demo import make_demo_data
from fedseg.privacy.provision import provision
from fedseg.runtime.processes import BIN_DIR, descendants, flwr_cli, free_port, pid_alive
from fedseg.server.config import JobConfig
from fedseg.server.rundir import RunDir
from fedseg.simulate import Federation, follow

pytestmark = pytest.mark.slow

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ENV.pop("FEDSEG_FAULT_INJECT", None)




def _metrics(run_dir: Path) -> list[dict]:
    return RunDir(run_dir).read_metrics()


def _pooled_train(recs: list[dict]) -> list[dict]:
    return [r for r in recs if r["phase"] == "train" and r["site"] == "pooled"]


def _online(env: dict) -> int:
    try:
        nodes = flwr_cli(["supernode", "ls", "fedseg"], env, timeout=30).get("nodes", [])
    except Exception:  # noqa: BLE001 - the SuperLink may still be starting
        return 0
    return sum(1 for n in nodes if n.get("status") == "online")


def _assert_all_gone(pids: set[int], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if pid_alive(p)]
    if left:
        ps = subprocess.run(["ps", "-o", "pid,args", "-p", ",".join(map(str, left))],
                            capture_output=True, text=True).stdout
        pytest.fail(f"processes left behind:\n{ps}")


def _pgrep(pattern: str) -> str:
    return subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout.strip()


# ------------------------------------------------------------------------------------------


def test_site_killed_mid_round_rejoins_and_nan_update_is_rejected(tmp_path: Path) -> None:
    sites = make_demo_data(tmp_path / "demo-data", sites=3, seed=0)
    run_dir = tmp_path / "run"
    # 30 local iterations: a round takes ~5 s, so the kill below lands inside round 2 (with 10,
    # a secure round in one exchange took 2-3 s and could end first)
    job = JobConfig(run_dir=str(run_dir), job_id="faults", min_sites=2, rounds=4,
                    local_iterations=30, plan_preset="tiny", eval_every=2, enrol_timeout_s=300,
                    round_timeout_s=240, site_wait_s=120)
    run = RunDir(run_dir)
    t_kill = t_round_done = 0.0
    with Federation(tmp_path, sites, device="cpu") as fed:
        fed.start_superlink()
        fed.start_site(sites[0])
        fed.start_site(sites[1], env_extra={"FEDSEG_FAULT_INJECT": "nan-update@1"})
        fed.start_site(sites[2])
        wait_until(lambda: _online(fed.env) == 3, 120, "3 SuperNodes online")
        run_id = fed.submit(job)
        # round 2 has been sent: kill siteC (SuperNode + ClientApp) while the sites train
        wait_until(lambda: run.status().get("phase") == "training" and run.status().get("round") == 2,
              600, "round 2", lambda: json.dumps(run.status()))
        time.sleep(1)
        fed.kill_site("siteC")
        t_kill = time.monotonic()
        time.sleep(2)
        fed.start_site(sites[2])  # the hospital restarts it: a new SuperNode, a new node id
        wait_until(lambda: any(r["round"] == 2 for r in _pooled_train(_metrics(run_dir))), 300,
              "round 2 to complete", lambda: json.dumps(run.status()))
        t_round_done = time.monotonic()
        status = follow(fed, run_id, run, timeout=900, quiet=True)
        flower_pids = descendants(os.getpid())
    _assert_all_gone(flower_pids)
    assert _pgrep(str(tmp_path)) == ""

    assert status == "finished:completed", run.status()
    st = run.status()
    assert st["state"] == "finished" and st["round"] == 4
    recs = _metrics(run_dir)
    train = {(r["round"], r["site"]): r for r in recs if r["phase"] == "train"}
    # round 1: siteB's NaN update rejected, not averaged; the round counts with A and C
    assert train[(1, "siteB")]["status"] == "rejected"
    assert "NaN" in train[(1, "siteB")]["reason"]
    assert train[(1, "pooled")]["status"] == "ok" and train[(1, "pooled")]["sites_ok"] == 2
    # round 2: siteC killed mid-round -> dropped with Flower's reason; A and B complete it
    assert train[(2, "siteC")]["status"] == "dropped", train[(2, "siteC")]
    assert "NODE_UNAVAILABLE" in train[(2, "siteC")]["reason"], train[(2, "siteC")]
    assert train[(2, "pooled")]["status"] == "ok" and train[(2, "pooled")]["sites_ok"] == 2
    assert t_round_done - t_kill < 120, "the round waited too long for the dead site"
    # round 3: the restarted siteC (new node id) is enrolled, prepared and trains again
    enrols = [r for r in recs if r["phase"] == "enrol" and r.get("site") == "siteC"]
    assert len(enrols) == 2 and enrols[0]["node"] != enrols[1]["node"], enrols
    for rnd in (3, 4):
        assert train[(rnd, "pooled")]["sites_ok"] == 3, train[(rnd, "pooled")]
        assert all(train[(rnd, s)]["status"] == "ok" for s in ("siteA", "siteB", "siteC"))
    # every round completed exactly once; final evaluation at all three sites
    assert [r["round"] for r in _pooled_train(recs) if r["status"] == "ok"] == [1, 2, 3, 4]
    final = [r for r in recs if r["phase"] == "eval" and r["round"] == 4]
    assert {r["site"] for r in final} == {"siteA", "siteB", "siteC", "pooled"}
    report = (run_dir / "report.md").read_text()
    assert "| siteB | rejected |" in report and "| siteC | dropped |" in report


# ------------------------------------------------------------------------------------------

SERVER_TOML = """
host = "127.0.0.1"
port = {port}
state_dir = "state"
insecure = true

[job]
run_dir = "run"
job_id = "resume-test"
min_sites = 3
rounds = 4
local_iterations = 30
eval_every = 2
plan_preset = "tiny"
roster = "pki/roster.json"
enrol_timeout_s = 300
round_timeout_s = 300
site_wait_s = 120

[job.aggregation]
kind = "fedadam"
lr = 0.01
"""


class Procs:
    """Popen'ed CLIs, each in its own session; everything is killed at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.out", "ab")  # noqa: SIM115
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=ENV,
                             cwd=self.root, start_new_session=True)
        log.close()
        self.procs[name] = p
        return p

    def out(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text(errors="replace")

    def kill_all(self) -> None:
        pids: set[int] = set()
        for p in self.procs.values():
            pids |= descendants(p.pid) | {p.pid}
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_server_crash_then_resume_with_real_clis(tmp_path: Path) -> None:
    sites = make_demo_data(tmp_path / "demo-data", sites=3, seed=1)
    bad = tmp_path / "bad-site"
    sys.path.insert(0, str(Path(__file__).parent))
    from broken_datasets import BROKEN

    build, needle = BROKEN["missing_label"]
    build(bad)
    port = free_port()
    provision(tmp_path / "pki", [d.name for d in sites])  # secure aggregation (the default)
    cfg = tmp_path / "server.toml"
    cfg.write_text(SERVER_TOML.format(port=port))
    run_dir = tmp_path / "run"
    run = RunDir(run_dir)
    fs, fc = str(BIN_DIR / "fedseg-server"), str(BIN_DIR / "fedseg-client")
    procs = Procs(tmp_path)
    try:
        server = procs.start("server", [fs, "start", "--config", str(cfg)])
        for d in sites:
            procs.start(d.name, [fc, "--site", d.name, "--data", str(d), "--insecure",
                                 "--server", f"127.0.0.1:{port}",
                                 "--cache", str(tmp_path / "cache" / d.name),
                                 "--identity-key",
                                 str(tmp_path / "pki" / "sites" / d.name / "identity.key"),
                                 "--roster", str(tmp_path / "pki" / "roster.json"),
                                 "--no-require-signed-apps"])  # the loopback trial's job is unsigned
        # a site with bad data refuses to start, with the problem lines and one error line
        badc = procs.start("bad", [fc, "--site", "badsite", "--data", str(bad), "--insecure",
                                   "--server", f"127.0.0.1:{port}"])
        assert badc.wait(timeout=60) == 2
        bad_out = procs.out("bad")
        assert "Traceback" not in bad_out and needle in bad_out
        assert bad_out.strip().splitlines()[-1].startswith("fedseg-client: error: ")

        # crash the server host once round 2 is checkpointed and round 3 is under way
        def round3_started() -> bool:
            assert server.poll() is None, procs.out("server")
            st = run.status()
            return st.get("phase") == "training" and st.get("round") == 3

        wait_until(round3_started, 600, "round 3", lambda: procs.out("server"))
        # into the round, with its messages out; a round here takes ~5 s (30 local iterations;
        # with 10 a secure round took 2-3 s and could end before the kill)
        time.sleep(1)
        plan_before = (run_dir / "plan.json").read_text()
        victims = descendants(server.pid) | {server.pid}
        names = subprocess.run(["ps", "-o", "args=", "-p", ",".join(map(str, victims))],
                               capture_output=True, text=True).stdout
        assert "flower-superlink" in names and "flwr-serverapp" in names, names
        for pid in victims:  # a crashed host: no process gets to clean up
            os.kill(pid, signal.SIGKILL)
        server.wait(timeout=10)
        _assert_all_gone(victims, timeout=10)
        assert _pgrep(str(tmp_path / "state" / "superlink.db")) == ""
        done_before = [r["round"] for r in _pooled_train(_metrics(run_dir)) if r["status"] == "ok"]
        assert done_before == [1, 2], done_before

        res = subprocess.run([fs, "status", str(run_dir)], capture_output=True, text=True,
                             timeout=60, env=ENV)
        assert res.returncode == 0 and "interrupted" in res.stdout, res.stdout + res.stderr

        # resume: same SuperLink database, same port; the clients reconnect by themselves
        t0 = time.monotonic()
        resumed = procs.start("resume", [fs, "resume", str(run_dir)])
        assert resumed.wait(timeout=900) == 0, procs.out("resume")[-4000:]
        resume_s = time.monotonic() - t0

        recs = _metrics(run_dir)
        st = run.status()
        assert st["state"] == "finished" and st["round"] == 4
        ok_rounds = [r["round"] for r in _pooled_train(recs) if r["status"] == "ok"]
        assert ok_rounds == [1, 2, 3, 4], ok_rounds  # continued, not restarted; each once
        res_recs = [r for r in recs if r["phase"] == "resume"]
        assert len(res_recs) == 1 and res_recs[0]["round"] == 2
        assert res_recs[0]["optimizer_state"] is True  # FedAdam moments restored
        # fingerprint/plan ran once; the plan is the same file
        assert sum(r["phase"] == "plan" for r in recs) == 1
        assert (run_dir / "plan.json").read_text() == plan_before
        plan_hash = res_recs[0]["plan_hash"]
        for d in sites:
            cache = tmp_path / "cache" / d.name
            # one preprocessed cache, keyed by the plan's hash, reused after the resume
            assert [p.name for p in (cache / "preprocessed").iterdir()] == [plan_hash]
            # trainer state (job id + plan hash) continued: >= 4 rounds x 30 iterations
            state = torch.load(cache / "state" / "resume-test" / plan_hash / "checkpoint.pt",
                               map_location="cpu", weights_only=True)
            assert state["iteration"] >= 120, (d.name, state["iteration"])
        assert (run_dir / "model" / "model.pt").is_file()
        print(f"resume to the end: {resume_s:.0f} s")
    finally:
        procs.kill_all()
    assert _pgrep(str(tmp_path)) == ""
    assert _pgrep(f"127.0.0.1:{port}") == ""


# ------------------------------------------------------------------------------------------


def test_ctrl_c_on_simulate_stops_everything(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    log = open(tmp_path / "sim.out", "wb")  # noqa: SIM115
    p = subprocess.Popen(
        [sys.executable, "-m", "fedseg.cli", "simulate", "--sites", "3", "--rounds", "3",
         "--local-iterations", "10", "--out", str(out), "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True,
    )
    log.close()
    try:
        def training() -> bool:
            assert p.poll() is None, (tmp_path / "sim.out").read_text()
            st_path = out / "run" / "status.json"
            return st_path.is_file() and json.loads(st_path.read_text() or "{}").get(
                "phase") in ("preprocess", "training")

        wait_until(training, 300, "simulate to reach preprocessing/training",
              lambda: (tmp_path / "sim.out").read_text())
        time.sleep(2)
        port = re.search(r"SuperLink 127\.0\.0\.1:(\d+)", (tmp_path / "sim.out").read_text())
        assert port is not None
        children = descendants(p.pid)
        names = subprocess.run(["ps", "-o", "args=", "-p", ",".join(map(str, children))],
                               capture_output=True, text=True).stdout
        # each site: Flower's SuperNode through fedseg's launcher (runtime/supernode.py) + its worker
        assert names.count("fedseg.runtime.supernode") == 3, names
        assert names.count("fedseg.client.worker") == 3 and "flwr-serverapp" in names, names
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        code = p.wait(timeout=20)
        _assert_all_gone(children, timeout=max(1.0, 20 - (time.monotonic() - t0)))
        elapsed = time.monotonic() - t0
        assert code == 130, (tmp_path / "sim.out").read_text()[-2000:]
        assert elapsed < 20
        text = (tmp_path / "sim.out").read_text()
        assert "interrupted" in text and "Traceback" not in text, text[-3000:]
        assert _pgrep(str(tmp_path)) == ""
        assert _pgrep(f"127.0.0.1:{port.group(1)}") == ""
        assert json.loads((out / "run" / "status.json").read_text())["state"] == "stopped"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
