"""Flower's own baselines for the federation benchmarks: a real ``flower-superlink`` and N real
``flower-supernode`` processes on 127.0.0.1, running Flower's FedAvg (Message API) or Flower's
SecAgg+ (legacy API) with clients that do no training (model back plus a little noise), so the
per-round time is pure federation overhead: messaging, (de)serialisation, process start-up of
the per-message ClientApps and, for SecAgg+, its masking protocol.

    python bench/flower_baseline.py --params 1000000 --sites 3 --rounds 3 --json OUT.json
    python bench/flower_baseline.py --params 1000000 --sites 3 --rounds 2 --secagg --json OUT.json

The SuperLink runs in memory, without runtime dependency installs; the SuperNodes get unique
local ``--port``s and ``--max-retries 0``; every process has telemetry and the update check off,
a private FLWR_HOME in the work folder and this interpreter's ``bin/`` first on PATH. The app
(``bench/flower_apps``, plus ``bench/common.py``) is copied into a fresh app folder and shipped
as a FAB with ``flwr run APP bench --format json``; the run is followed with ``flwr ls``.
Every process (with the superexec/ServerApp/ClientApp processes Flower spawns) is stopped on
success, error, timeout and Ctrl-C. Per-round times come from the ServerApp (``timing.json``);
peak RSS is sampled every 0.2 s over the SuperLink's process tree ("server": it includes the
ServerApp) and the SuperNodes' trees ("sites": they include the ClientApps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    RssSampler,
    round_stats,
    system_busy_seconds,
    tree_cpu_seconds,
)
from fedseg.errors import FedsegError  # noqa: E402
from fedseg.runtime.processes import (  # noqa: E402
    ManagedProcess,
    flower_env,
    flwr_cli,
    free_port,
    stop_all,
    superlink_argv,
    supernode_argv,
    wait_for_port,
    write_flwr_connection,
)

BENCH = ROOT / "bench"
CONNECTION = "bench"
APPS = {
    False: ("plain", "bench.flower_apps.plain_app", "flower-fedavg"),
    True: ("secagg", "bench.flower_apps.secagg_app", "flower-secagg+"),
}
# the files the FAB carries, relative to the repository root (the app imports them as
# ``bench.common`` / ``bench.flower_apps.*``, so the app folder mirrors that layout)
APP_FILES = (
    "bench/common.py",
    "bench/flower_apps/__init__.py",
    "bench/flower_apps/timing.py",
    "bench/flower_apps/plain_app.py",
    "bench/flower_apps/secagg_app.py",
)

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedseg-bench-flower-{kind}"
version = "0.1.0"
description = "Flower baseline for fedseg's federation benchmarks ({system})"
dependencies = []

[tool.flwr.app]
publisher = "fedseg"

[tool.flwr.app.components]
serverapp = "{module}:app"
clientapp = "{module}:client"

[tool.flwr.app.config]
num-server-rounds = 3
params = 1000000
sites = 3
seed = 0
noise-std = 0.001
timing-file = ""
"""


def write_app_dir(dest: Path, secagg: bool) -> Path:
    """A fresh Flower app folder: pyproject.toml + a copy of the bench modules the apps import."""
    kind, module, system = APPS[secagg]
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    (dest / "pyproject.toml").write_text(PYPROJECT.format(kind=kind, module=module, system=system))
    for rel in APP_FILES:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, target)
    return dest


def _online_nodes(env: dict) -> int:
    try:
        nodes = flwr_cli(["supernode", "ls", CONNECTION], env, timeout=30).get("nodes", [])
    except FedsegError:
        return 0
    return sum(1 for n in nodes if n.get("status") == "online")


def _run_status(env: dict, run_id: int) -> str:
    try:
        res = flwr_cli(["ls", CONNECTION, "--run-id", str(run_id)], env, timeout=30)
    except FedsegError:
        return "unknown"
    runs = res.get("runs", [])
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


def _own_cpu() -> float:
    """CPU seconds of this driver (sampler thread, ``flwr`` CLI calls it waited for)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _server_done(timing_file: Path) -> bool:
    try:
        return bool(json.loads(timing_file.read_text()).get("completed"))
    except (OSError, ValueError):
        return False


def wait_quiet(max_wait: float, max_other_cores: float = 0.25, window: float = 5.0) -> float:
    """Wait (up to ``max_wait`` s) until the rest of the machine uses less than
    ``max_other_cores`` cores over a ``window``-second window; returns the last measured
    load in cores. For benchmarks on a shared box: others' work inflates every timing here."""
    deadline = time.monotonic() + max_wait
    while True:
        b0 = system_busy_seconds()
        time.sleep(window)
        load = (system_busy_seconds() - b0) / window
        if load < max_other_cores or time.monotonic() > deadline:
            return load


def _check_alive(procs: list[ManagedProcess]) -> None:
    for p in procs:
        code = p.poll()
        if code is not None:
            raise FedsegError(f"{p.name} exited (code {code}); see {p.log_path}")


def run_flower(
    work: Path,
    params: int,
    sites: int,
    rounds: int,
    secagg: bool = False,
    timeout: float = 1800,
    noise_std: float = 1e-3,
    seed: int = 0,
    poll_interval: float = 30.0,
) -> dict:
    """One Flower run on loopback; returns per-round times, their stats and peak RSS.

    ``status`` is Flower's final run status (``finished:completed`` on success), ``timeout``
    when it did not finish within ``timeout`` seconds, or ``error: ...`` when a process died
    or the submission failed (the other fields then hold what was measured until then)."""
    if secagg and sites < 3:
        raise ValueError("Flower's SecAgg+ needs at least 3 sites (num_shares > 2)")
    kind, _, system = APPS[secagg]
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    flwr_home = work / ".flwr"
    timing_file = work / "timing.json"
    timing_file.unlink(missing_ok=True)
    env = flower_env(flwr_home)
    app_dir = write_app_dir(work / "app", secagg)

    superlink: ManagedProcess | None = None
    nodes: list[ManagedProcess] = []

    def groups() -> dict[str, list[int]]:
        return {"server": [superlink.pid] if superlink and superlink.pid else [],
                "sites": [n.pid for n in nodes if n.pid]}

    def _roots() -> list[int]:
        return [pid for pids in groups().values() for pid in pids]

    sampler = RssSampler(groups, interval=0.2)
    cpu: dict = {}
    status = "not started"
    run_id: int | None = None
    t_submit = t_end = None
    try:
        sampler.start()
        port = free_port()
        superlink = ManagedProcess("flower-superlink", superlink_argv(port),
                                   logs / "superlink.log", env, cwd=work).start()
        wait_for_port("127.0.0.1", port, 60, superlink)
        write_flwr_connection(flwr_home, CONNECTION, f"127.0.0.1:{port}")
        used_ports = {port}
        for i in range(sites):
            node_port = free_port()
            while node_port in used_ports:
                node_port = free_port()
            used_ports.add(node_port)
            nodes.append(ManagedProcess(
                f"supernode-{i}",
                supernode_argv(f"127.0.0.1:{port}", node_port, {"site": f"site{i}"},
                               max_retries=0),
                logs / f"supernode-{i}.log", env, cwd=work,
            ).start())
        # all sites connected before submitting, so that round 1 does not wait for start-up
        deadline = time.monotonic() + 120
        while _online_nodes(env) < sites:
            _check_alive([superlink, *nodes])
            if time.monotonic() > deadline:
                raise FedsegError(f"fewer than {sites} SuperNodes online after 120 s; see {logs}")
            time.sleep(1.0)

        overrides = {"num-server-rounds": rounds, "params": params, "sites": sites,
                     "seed": seed, "noise-std": float(noise_std),
                     "timing-file": str(timing_file)}
        args = ["run", str(app_dir), CONNECTION]
        for key, value in overrides.items():
            args += ["--run-config", f"{key}={json.dumps(value)}"]
        t_submit = time.monotonic()
        cpu0 = (system_busy_seconds(), tree_cpu_seconds(_roots()), os.getloadavg(), _own_cpu())
        run_id = int(flwr_cli(args, env, timeout=300)["run-id"])
        status = "submitted"
        # Each ``flwr ls`` is a fresh Python process costing ~1 CPU-second: polling it every few
        # seconds would eat a good part of a 2-core box. So watch the ServerApp's timing file
        # (free) and ask ``flwr ls`` only every ``poll_interval`` s, or as soon as the ServerApp
        # says it is done.
        deadline = t_submit + timeout
        next_ls = t_submit + 5.0
        while True:
            now = time.monotonic()
            if now >= next_ls or _server_done(timing_file):
                status = _run_status(env, run_id)
                if status.startswith("finished"):
                    break
                next_ls = now + (2.0 if _server_done(timing_file) else poll_interval)
            _check_alive([superlink, *nodes])
            if now > deadline:
                status = "timeout"
                break
            time.sleep(0.25)
        t_end = time.monotonic()
        busy, ours = system_busy_seconds() - cpu0[0], tree_cpu_seconds(_roots()) - cpu0[1]
        cpu = {"wall_seconds": t_end - t_submit, "cpu_seconds_all": busy,
               "cpu_seconds_flower": ours, "cpu_seconds_driver": _own_cpu() - cpu0[3],
               "cpu_seconds_other": max(0.0, busy - ours - (_own_cpu() - cpu0[3])),
               "loadavg_at_submit": cpu0[2], "loadavg_at_finish": os.getloadavg(),
               "cpus": os.cpu_count()}
        cpu["other_share_of_machine"] = cpu["cpu_seconds_other"] / max(
            1e-9, cpu["wall_seconds"] * (os.cpu_count() or 1))
        cpu["flower_cpu_seconds_per_round_whole_run"] = ours / max(1, rounds)
    except FedsegError as err:
        status = f"error: {err}"
    finally:
        sampler.stop()
        stop_all([*nodes, *([superlink] if superlink else [])], timeout=10)

    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    round_seconds = [float(t) for t in timing.get("round_seconds", [])]
    # the train (fit) exchange(s) alone, up to the aggregate: what a run without federated
    # evaluation (fraction_evaluate=0) would take per round
    train_seconds = [float(t) for t in
                     timing.get("phase_seconds_since_round_start", {}).get("train_aggregated", [])]
    peaks = sampler.peaks()
    return {
        "system": system,
        "params": params,
        "sites": sites,
        "rounds": rounds,
        "round_seconds": round_seconds,
        "stats": round_stats(round_seconds),
        "train_phase_seconds": train_seconds,
        "train_phase_stats": round_stats(train_seconds),
        "peak_rss_bytes": {"server": peaks.get("server", 0), "sites": peaks.get("sites", 0),
                           "total": peaks.get("total", 0)},
        "status": status,
        "run_id": run_id,
        "wall_seconds_submit_to_finish": (None if t_submit is None or t_end is None
                                          else t_end - t_submit),
        "server_timing": {k: v for k, v in timing.items() if k != "round_seconds"},
        "cpu_during_run": cpu,
        "processes_sampled": {k: sorted(v) for k, v in sampler.names.items()},
        "rss_samples": sampler.samples,
        "app": kind,
        "work": str(work),
        "host": _host_info(),
    }


def _host_info() -> dict:
    import flwr

    try:
        niceness = os.nice(0)
    except OSError:
        niceness = None
    return {"flwr": getattr(flwr, "__version__", "?"), "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "nice": niceness,
            "node": platform.node()}


def _fmt_gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secagg", action="store_true", help="Flower's SecAgg+ instead of FedAvg")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for the run")
    ap.add_argument("--noise-std", type=float, default=1e-3)
    ap.add_argument("--work", type=Path, default=None,
                    help="work folder (logs, FLWR_HOME, app); default: a temporary one, removed")
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="first wait up to S s for the machine to be (nearly) idle")
    args = ap.parse_args(argv)

    # SIGTERM (e.g. from a timeout wrapper) unwinds like Ctrl-C, so every process gets stopped
    signal.signal(signal.SIGTERM, _raise_interrupt)
    tmp = None
    work = args.work
    if work is None:
        tmp = tempfile.mkdtemp(prefix="flower-baseline-")
        work = Path(tmp)
    if args.wait_quiet > 0:
        load = wait_quiet(args.wait_quiet)
        print(f"other load before start: {load:.2f} cores", flush=True)
    try:
        res = run_flower(work, args.params, args.sites, args.rounds, secagg=args.secagg,
                         timeout=args.timeout, noise_std=args.noise_std)
    finally:
        if tmp is not None and not os.environ.get("BENCH_KEEP_WORK"):
            shutil.rmtree(tmp, ignore_errors=True)
    st = res["stats"]
    rss = res["peak_rss_bytes"]
    print(f"{res['system']} {args.params:,} params x {args.sites} sites, {args.rounds} rounds: "
          f"{res['status']}")
    print("  round seconds: " + ", ".join(f"{t:.2f}" for t in res["round_seconds"]))
    if st["mean"] is not None:
        print(f"  mean {st['mean']:.2f} s/round, median {st['median']:.2f} ({st['note']})")
        tr = res["train_phase_stats"]
        if tr["mean"] is not None:
            print(f"  of which the train exchange(s): mean {tr['mean']:.2f} s, "
                  f"median {tr['median']:.2f}")
    other = res["cpu_during_run"].get("other_share_of_machine")
    if other is not None:
        print(f"  other processes used {other:.0%} of the machine during the run")
    print(f"  peak RSS: server {_fmt_gb(rss['server'])}, sites {_fmt_gb(rss['sites'])}, "
          f"total {_fmt_gb(rss['total'])}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0 if res["status"] == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
