"""One site worker serving several simulated sites (``Federation(sites_per_worker=N)``,
``fedseg simulate --sites-per-worker N``): the memory saver for many-site simulations and
benchmarks (``fedseg/client/worker.py``). A hospital's set-up (one worker per site) is what every
other federation test runs.

End to end with real Flower processes on loopback: two sites, ONE worker process, secure
aggregation on (each site's protocol state in its own cache dir), two rounds (the second uses
each site's cached trainer); plus the grouping rules, the per-site trainer cache and the bounded
retries in-process. Slow (``pytest -m slow``): a site that shares its worker is SIGKILLed mid-round
and restarted; the worker keeps serving the other site and takes the restarted one back.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from waiting import wait_until

from fedseg.client.app import _TrainerCache
from fedseg.client.worker import _shared_retry_invoker, worker_argv
from fedseg.data.demo import make_demo_data
from fedseg.errors import FedsegError
from fedseg.planning.cli_impl import plan_main
from fedseg.runtime.processes import descendants, pid_alive
from fedseg.server.config import JobConfig
from fedseg.server.rundir import RunDir
from fedseg.simulate import Federation, follow


def test_worker_argv_repeats_runtime_api() -> None:
    one = worker_argv("127.0.0.1:1")
    assert one[1:] == ["-m", "fedseg.client.worker", "--runtime-api", "127.0.0.1:1"]
    two = worker_argv(["127.0.0.1:1", "127.0.0.1:2"])
    assert two[3:] == ["--runtime-api", "127.0.0.1:1", "--runtime-api", "127.0.0.1:2"]
    with pytest.raises(ValueError):
        worker_argv([])


def test_worker_groups(tmp_path: Path) -> None:
    dirs = [tmp_path / f"site{c}" for c in "ABCDE"]
    fed = Federation(tmp_path, dirs, device="cpu", sites_per_worker=2)
    assert fed.worker_group("siteA") == ["siteA", "siteB"]
    assert fed.worker_group("siteD") == ["siteC", "siteD"]
    assert fed.worker_group("siteE") == ["siteE"]  # the last group may be smaller
    assert fed.worker_group("siteA", {"FEDSEG_FAULT_INJECT": "nan-update"}) is None
    assert fed.worker_group("other") is None
    assert Federation(tmp_path, dirs, device="cpu").worker_group("siteA") is None
    assert Federation(tmp_path, dirs, site_workers=False, sites_per_worker=2).worker_group(
        "siteA") is None
    with pytest.raises(FedsegError):
        Federation(tmp_path, dirs, sites_per_worker=0)


def test_shared_retries_give_up_instead_of_stalling_or_interrupting() -> None:
    """A worker serving several sites must not wait forever for one lost SuperNode, nor SIGINT
    itself on a 401 (a task token from before the SuperNode restarted), as Flower's would."""
    calls = []

    def refused() -> None:
        calls.append(1)
        raise httpx.ConnectError("refused")

    with pytest.raises(httpx.ConnectError):
        _shared_retry_invoker(1, None).invoke(refused)
    assert len(calls) == 1
    request = httpx.Request("POST", "http://127.0.0.1:1/x")
    response = httpx.Response(401, request=request)

    def unauthorized() -> None:
        raise httpx.HTTPStatusError("401", request=request, response=response)

    old = signal.signal(signal.SIGINT, lambda *a: pytest.fail("the worker interrupted itself"))
    try:
        t0 = time.monotonic()
        with pytest.raises(httpx.HTTPStatusError):
            _shared_retry_invoker(None, 30.0).invoke(unauthorized)
        assert time.monotonic() - t0 < 5
    finally:
        signal.signal(signal.SIGINT, old)


class _FakeTrainer:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "checkpoint.pt").write_bytes(b"x")


def test_trainer_cache_keeps_one_trainer_per_site(tmp_path: Path) -> None:
    cache = _TrainerCache()
    a, b = _FakeTrainer(tmp_path / "a"), _FakeTrainer(tmp_path / "b")
    cache.put(("a",), a, site="A")
    cache.put(("b",), b, site="B")  # another site: A's trainer stays
    assert cache.take(("a",), a.state_dir, site="A") is a
    assert cache.take(("b",), b.state_dir, site="B") is b
    assert cache.take(("a",), a.state_dir, site="A") is None  # taken: gone until put back
    cache.put(("a",), a, site="A")
    assert cache.take(("a", "other plan"), a.state_dir, site="A") is None  # key differs
    assert cache.take(("a",), a.state_dir, site="A") is None  # ... and the old one was freed


def _federation_job(tmp_path: Path, n_sites: int, **job: object) -> tuple[list[Path], JobConfig, RunDir]:
    """Demo sites, their pooled tiny plan, and a job over them (``job``: its other fields)."""
    sites = make_demo_data(tmp_path / "data", sites=n_sites, cases=3, test_cases=0, seed=0)
    plan_path = tmp_path / "plan.json"
    plan_main(sites, plan_path, preset="tiny")
    run_dir = tmp_path / "run"
    cfg = JobConfig(run_dir=str(run_dir), min_sites=2, plan_file=str(plan_path),
                    enrol_timeout_s=240, round_timeout_s=240, **job)
    return sites, cfg, RunDir(run_dir)


def test_two_sites_one_worker_complete_secure_rounds(tmp_path: Path) -> None:
    sites, job, run = _federation_job(
        tmp_path, 2, job_id="shared-worker", rounds=2, local_iterations=2, eval_every=3,
        secure_aggregation=True, site_wait_s=60, on_too_few_sites="fail")
    with Federation(tmp_path, sites, device="cpu", sites_per_worker=2) as fed:
        fed.start_superlink()
        for d in sites:
            fed.start_site(d)
        assert list(fed.workers) == ["group0"] and len(fed.nodes) == 2
        worker_pid = fed.workers["group0"].pid
        run_id = fed.submit(job)
        status = follow(fed, run_id, run, timeout=420, quiet=True)
        assert fed.workers["group0"].pid == worker_pid  # the one worker served the whole run
        assert worker_pid in descendants(os.getpid())
        log = fed.workers["group0"].log_path.read_text()
    assert not pid_alive(worker_pid)

    assert status == "finished:completed", run.status()
    recs = run.read_metrics()
    train = {(r["round"], r["site"]): r for r in recs if r["phase"] == "train"}
    for rnd in (1, 2):
        assert train[(rnd, "pooled")]["status"] == "ok", train[(rnd, "pooled")]
        assert train[(rnd, "pooled")]["secagg"]["survivors"] == ["siteA", "siteB"]
        for site in ("siteA", "siteB"):
            assert train[(rnd, site)]["status"] == "ok", train[(rnd, site)]
    # both sites' tasks ran in that one process, each with its own node config and state
    for site in ("siteA", "siteB"):
        assert f" {site} train: pull" in log, log[-3000:]
        assert (tmp_path / "sites" / site / "secagg").is_dir()
        assert list((tmp_path / "sites" / site / "state").rglob("checkpoint.pt"))


@pytest.mark.slow
def test_site_sharing_a_worker_killed_mid_round_rejoins(tmp_path: Path) -> None:
    """siteA and siteC share a worker (siteB, with its own environment, gets its own): siteC's
    SuperNode is SIGKILLed while round 2 trains and restarted; the round completes with A and B,
    the run finishes, and the shared worker (never restarted) serves siteC again afterwards."""
    sites, job, run = _federation_job(
        tmp_path, 3, job_id="shared-faults", rounds=4, local_iterations=10, eval_every=5,
        secure_aggregation=False, site_wait_s=120)

    def wait(cond, timeout: float, what: str) -> None:  # noqa: ANN001
        wait_until(cond, timeout, what, diag=lambda: json.dumps(run.status()))

    with Federation(tmp_path, sites, device="cpu", sites_per_worker=3) as fed:
        fed.require_secure_aggregation = False
        fed.start_superlink()
        fed.start_site(sites[0])
        fed.start_site(sites[1], env_extra={"FEDSEG_TEST_OWN_ENV": "1"})
        fed.start_site(sites[2])
        assert sorted(fed.workers) == ["group0", "siteB"]
        shared_pid = fed.workers["group0"].pid
        run_id = fed.submit(job)
        wait(lambda: run.status().get("phase") == "training" and run.status().get("round") == 2,
             600, "round 2")
        time.sleep(2)
        fed.kill_site("siteC")
        time.sleep(2)
        fed.start_site(sites[2])  # same runtime API port: the shared worker finds it again
        status = follow(fed, run_id, run, timeout=900, quiet=True)
        assert fed.workers["group0"].pid == shared_pid
        assert fed.workers["group0"].poll() is None  # still serving
        log = fed.workers["group0"].log_path.read_text()
    assert status == "finished:completed", run.status()
    train = {(r["round"], r["site"]): r for r in run.read_metrics() if r["phase"] == "train"}
    assert train[(2, "pooled")]["status"] == "ok"
    for rnd in (1, 3, 4):
        assert train[(rnd, "siteA")]["status"] == "ok"
    assert train[(4, "siteC")]["status"] == "ok", train.get((4, "siteC"))  # rejoined
    assert " siteC train: pull" in log and " siteA train: pull" in log
