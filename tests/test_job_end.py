"""The job's end reaches the sites, and ``fedseg-server sites`` names the nodes (issue #16),
with real processes: ``fedseg-server start`` with its defaults (TLS, SuperNode authentication,
the roster registered, a signed job) and two real ``fedseg-client`` sites with
``--exit-when-done``.

``sites`` lists both roster sites as ``registered`` before any connects and hospitalA as
``online`` once its client runs. hospitalB's dataset.json names a label differently, so the job
fails at enrolment: the server tells both sites, each prints ``job failed: ...`` with the
server's reason and exits 1 (a finished job — exit 0 and ``job finished`` — is what
tests/test_deploy_one_machine.py runs). The notice handling at the site is checked directly too
(a notice from before the client started is a past job's and is ignored). Every process is
stopped in teardown.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from fedseg.client.job_end import JobEndWatch, write_notice
from fedseg.data.demo import make_demo_data
from fedseg.privacy.provision import provision
from fedseg.protocol.job_end import JobEnd
from fedseg.runtime.processes import BIN_DIR, ManagedProcess, free_port, stop_all
from fedseg.server.sites import format_table, site_table

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "OMP_NUM_THREADS": "1"}
WAIT_S = 240.0  # generous bounds for a busy 2-core machine


def _sites(run_dir: Path) -> dict[str, dict]:
    res = subprocess.run([str(BIN_DIR / "fedseg-server"), "sites", str(run_dir), "--json"],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert res.returncode == 0, res.stderr
    return {r["site"]: r for r in json.loads(res.stdout)}


def _until(what: str, check, procs: list[ManagedProcess], timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(1.0)
    logs = "\n".join(f"== {p.name}\n{p.log_path.read_text()[-2000:]}" for p in procs
                     if p.log_path.is_file())
    pytest.fail(f"{what} not within {timeout:.0f} s\n{logs}")


def test_failed_job_reaches_the_sites_and_sites_maps_node_ids(tmp_path: Path) -> None:
    provision(tmp_path / "pki", ["hospitalA", "hospitalB"], ["127.0.0.1", "localhost"], days=2,
              consortium="jobend")
    a, b = make_demo_data(tmp_path / "demo", sites=2, cases=2, test_cases=0)
    ds = json.loads((b / "dataset.json").read_text())
    ds["labels"] = {("tumour" if v == 2 else k): v for k, v in ds["labels"].items()}
    (b / "dataset.json").write_text(json.dumps(ds))  # valid alone, not with hospitalA
    port = free_port()
    (tmp_path / "server.toml").write_text(
        f'host = "127.0.0.1"\nport = {port}\nsuperlink_port = {free_port()}\n'
        'state_dir = "state"\npki = "pki"\n\n'
        '[job]\nrun_dir = "run"\njob_id = "endtest"\nmin_sites = 2\nrounds = 1\n'
        'local_iterations = 2\nplan_preset = "tiny"\n')
    run = tmp_path / "run"
    procs: list[ManagedProcess] = []

    def start(name: str, argv: list[str]) -> ManagedProcess:
        p = ManagedProcess(name, argv, tmp_path / f"{name}.log", ENV, cwd=tmp_path).start()
        procs.append(p)
        return p

    def client(site: str, data: Path) -> ManagedProcess:
        return start(site, [str(BIN_DIR / "fedseg-client"), "--site", site, "--data", str(data),
                            "--server", f"127.0.0.1:{port}", "--pki", "pki", "--cache",
                            f"cache-{site}", "--exit-when-done", "--no-site-worker"])

    try:
        server = start("server", [str(BIN_DIR / "fedseg-server"), "start", "--config",
                                  "server.toml"])
        _until("node_ids.json", lambda: (tmp_path / "state" / "node_ids.json").is_file(), procs)
        rows = _until("both sites registered", lambda: (lambda r: r if all(
            r.get(s, {}).get("status") == "registered" for s in ("hospitalA", "hospitalB"))
            else None)(_sites(run)), procs)
        assert rows["hospitalA"]["node"] != rows["hospitalB"]["node"]
        ca = client("hospitalA", a)
        _until("hospitalA online", lambda: _sites(run).get("hospitalA", {}).get("status")
               == "online", procs)
        cb = client("hospitalB", b)
        for p in (ca, cb):
            _until(f"{p.name} exited", lambda p=p: p.poll() is not None, procs)
            out = p.log_path.read_text()
            assert p.poll() == 1, out
            failed = [ln for ln in out.splitlines() if ln.startswith("fedseg-client: job failed")]
            assert len(failed) == 1 and "'endtest'" in failed[0] and "labels" in failed[0], out
        _until("the server exited", lambda: server.poll() is not None, procs)
        assert server.poll() != 0, server.log_path.read_text()[-2000:]
        table = format_table(site_table(tmp_path / "state", run))  # the server is gone now
        assert "hospitalA" in table and "(server not running)" in table, table
    finally:
        stop_all(procs, timeout=10)


def test_a_notice_counts_once_and_only_after_the_client_started(tmp_path: Path) -> None:
    old = JobEnd(job_id="old", state="finished", rounds=3)
    write_notice(tmp_path, old)  # a past job's notice
    time.sleep(0.05)
    watch = JobEndWatch(tmp_path)
    assert watch.poll() is None
    write_notice(tmp_path, JobEnd(job_id="new", state="finished", rounds=2))
    got = watch.poll()
    assert got is not None and got.job_id == "new" and watch.poll() is None
    assert JobEndWatch.line(got).startswith("job finished: 'new'")
    failed = JobEnd(job_id="x", state="failed", rounds=0, reason="site 'b' declares labels")
    assert JobEndWatch.line(failed) == ("job failed: 'x' ended on the server after 0 round(s): "
                                        "site 'b' declares labels")


def test_sites_without_any_state(tmp_path: Path) -> None:
    assert site_table(tmp_path, None) == []
    assert "no sites known yet" in format_table([])
    (tmp_path / "node_ids.json").write_text('{"hospitalA": 7}')
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(
        json.dumps({"phase": "enrol", "site": "hospitalB", "node": 9, "status": "ok",
                    "round": 1}) + "\n")
    rows = {r["site"]: r for r in site_table(tmp_path, tmp_path / "run")}
    assert rows["hospitalA"]["node"] == 7 and rows["hospitalB"]["node"] == 9
    assert rows["hospitalB"]["enrolled"] == "round 1"
    assert {r["status"] for r in rows.values()} == {"(server not running)"}


def test_after_the_job_ended_a_gone_server_is_no_surprise(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from fedseg.client.doctor import ConnectionDoctor
    from fedseg.client.probe import Finding

    doc = ConnectionDoctor("127.0.0.1:1", None, False, "c.toml", "hospitalA", tmp_path / "x.log")
    doc.job_ended("trial")
    doc._say(Finding("refused", "c.toml: field 'server': connection refused at 127.0.0.1:1"))
    err = capsys.readouterr().err.strip()
    assert err == ("fedseg-client: cannot connect (refused): c.toml: field 'server': connection "
                   "refused at 127.0.0.1:1 (job 'trial' ended; waiting for the next job or a "
                   "resume)"), err
