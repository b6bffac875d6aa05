"""``fedseg-server``: start, watch, stop and resume the federation server.

``start --config server.toml`` supervises ``flower-superlink`` (state database on disk, runtime
dependency installs off, telemetry off), submits the fedseg job with ``flwr run`` and shows its
progress until it is done; the config is saved as ``RUN_DIR/server.json`` (paths made absolute).
``resume RUN_DIR`` continues a crashed or stopped job from ``RUN_DIR/checkpoints/last.pt``:
Flower itself has no resume, so a NEW Flower run picks up our checkpoint (rounds continue, the
plan and the server optimiser's state are restored). ``status RUN_DIR`` prints where a job stands
(and says "interrupted" when it claims to run but no server process is alive); ``stop RUN_DIR``
stops a running server (SIGTERM: everything it started is stopped, the job can be resumed).

What a crash of the server host leaves and how resume copes (measured with Flower 1.42): the
SuperLink's ``STATE_DIR/superlink.db`` is opened again on the same port; the sites' SuperNodes
keep retrying (every <= 20 s) and are recognised under their OLD node ids (``fedseg-client``
restarts a SuperNode that gives up, which then enrols under a new id); the crashed Flower run is
marked failed ("no heartbeat") about a minute later and does not disturb the new one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from fedseg.errors import FedsegError, run_cli
from fedseg.runtime.processes import (
    ManagedProcess,
    pid_alive,
    superlink_argv,
    wait_for_port,
    write_flwr_connection,
)
from fedseg.server.config import ServerConfig, load_toml
from fedseg.server.rundir import RunDir

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def load_server_config(path: str | Path) -> ServerConfig:
    """Read ``server.toml``; relative paths in it are relative to the file's folder (so the
    saved ``RUN_DIR/server.json`` works from any working directory)."""
    p = Path(path)
    cfg = load_toml(p, ServerConfig)
    base = p.resolve().parent

    def absolute(v: str | None) -> str | None:
        return v if not v else str((base / Path(v).expanduser()).resolve())

    cfg.state_dir = absolute(cfg.state_dir)  # type: ignore[assignment]
    cfg.tls_certfile = absolute(cfg.tls_certfile)
    cfg.tls_keyfile = absolute(cfg.tls_keyfile)
    cfg.tls_ca_certfile = absolute(cfg.tls_ca_certfile)
    cfg.job.run_dir = absolute(cfg.job.run_dir)  # type: ignore[assignment]
    cfg.job.roster = absolute(cfg.job.roster)
    return cfg


def _check_tls(cfg: ServerConfig, source: str) -> tuple[Path, Path, Path] | None:
    if cfg.insecure:
        if cfg.host not in LOOPBACK:
            raise FedsegError(
                f"{source}: field 'insecure': only allowed on loopback (host is {cfg.host}); "
                "configure tls_certfile/tls_keyfile/tls_ca_certfile"
            )
        return None
    paths = {"tls_certfile": cfg.tls_certfile, "tls_keyfile": cfg.tls_keyfile,
             "tls_ca_certfile": cfg.tls_ca_certfile}
    missing = [k for k, v in paths.items() if not v]
    if missing:
        raise FedsegError(
            f"{source}: field '{missing[0]}': TLS is on by default and needs tls_certfile, "
            "tls_keyfile and tls_ca_certfile; or set insecure = true for a loopback-only trial"
        )
    for k, v in paths.items():
        if not Path(v).is_file():  # type: ignore[arg-type]
            raise FedsegError(f"{source}: field '{k}': {v}: file not found")
    return tuple(Path(v) for v in paths.values())  # type: ignore[return-value]


def _running_server(state: Path) -> int | None:
    """pid of a live fedseg-server for this state folder (a stale pid file is ignored)."""
    pid_file = state / "server.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid != os.getpid() and pid_alive(pid) else None


def serve(cfg: ServerConfig, resume: bool = False, timeout: float = 7 * 24 * 3600,
          source: str = "server config") -> int:
    """Start the SuperLink, submit the job, follow it; stop everything on exit.

    The SuperLink keeps its state in ``STATE_DIR/superlink.db``. After a crash the same file is
    opened again: SuperNodes that kept retrying are recognised under their old node ids, the
    crashed Flower run is left behind as failed, and our job continues as a NEW Flower run from
    ``RUN_DIR/checkpoints/last.pt`` (Flower has no resume of its own)."""
    from fedseg.simulate import Federation, follow, interrupt_on_sigterm

    state = Path(cfg.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    ssl = _check_tls(cfg, source)
    other = _running_server(state)
    if other is not None:
        raise FedsegError(f"a fedseg-server (pid {other}) is already running for {state}; "
                          f"stop it first: fedseg-server stop {cfg.job.run_dir}")
    job = cfg.job.model_copy(update={"resume": resume or cfg.job.resume})
    if not job.job_id:
        job.job_id = Path(job.run_dir).name
    if job.secure_aggregation:  # on by default: fail now, not after the SuperLink started
        from fedseg.privacy.provision import load_roster

        if not job.roster:
            raise FedsegError(f"{source}: secure aggregation is on (the default) but [job] has no "
                              "roster; set roster = 'PKI/roster.json' (from 'fedseg provision') "
                              "or secure_aggregation = false")
        load_roster(job.roster)
    run = RunDir(job.run_dir)
    fed = Federation(state, [], device="auto")
    fed.port = cfg.port
    fed.superlink = ManagedProcess(
        "flower-superlink",
        superlink_argv(cfg.port, host=cfg.host, database=str(state / "superlink.db"),
                       insecure=ssl is None, ssl=ssl),
        state / "logs" / "superlink.log", fed.env, cwd=state,
    )
    (state / "server.pid").write_text(str(os.getpid()))
    try:
        interrupt_on_sigterm()
        fed.superlink.start()
        (state / "superlink.pid").write_text(str(fed.superlink.pid))
        wait_for_port(_client_host(cfg.host), cfg.port, 60, fed.superlink)
        write_flwr_connection(fed.flwr_home, "fedseg", f"{_client_host(cfg.host)}:{cfg.port}",
                              insecure=ssl is None, root_certificates=ssl[2] if ssl else None)
        print(f"fedseg-server: SuperLink on {cfg.host}:{cfg.port}; run folder {job.run_dir}",
              flush=True)
        run_id = fed.submit(job)
        run.set_status(flower_run_id=run_id, server_pid=os.getpid())
        status = follow(fed, run_id, run, timeout)
        st = run.status()
        if status != "finished:completed" or st.get("state") != "finished":
            raise FedsegError(f"run ended '{status}': {st.get('error', 'see ' + str(state / 'logs'))}"
                              f"; after fixing the cause: fedseg-server resume {job.run_dir}")
        print(f"fedseg-server: done; model bundle in {Path(job.run_dir) / 'model'}")
        return 0
    except KeyboardInterrupt:
        fed.stop()
        if run.status().get("state") == "running":
            run.set_status(state="stopped")
        print(f"fedseg-server: stopped; continue with 'fedseg-server resume {job.run_dir}'",
              file=sys.stderr)
        return 130
    finally:
        fed.stop()
        for name in ("server.pid", "superlink.pid"):
            (state / name).unlink(missing_ok=True)


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def _cmd_start(args: argparse.Namespace) -> int:
    cfg = load_server_config(args.config)
    run = RunDir(cfg.job.run_dir)
    if run.checkpoint_path("last").exists():
        st = run.status()
        raise FedsegError(
            f"{cfg.job.run_dir}: already holds a job ({st.get('state', '?')}, round "
            f"{st.get('round', '?')} of {st.get('rounds', '?')}); continue it with "
            f"'fedseg-server resume {cfg.job.run_dir}', or set another job.run_dir in {args.config}"
        )
    # saved so that 'resume RUN_DIR' needs nothing but the run folder
    (run.root / "server.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    return serve(cfg, source=str(args.config))


def _saved_config(run_dir: str) -> tuple[ServerConfig, Path]:
    saved = Path(run_dir) / "server.json"
    if not saved.is_file():
        raise FedsegError(f"{saved}: missing; {run_dir} was not started by 'fedseg-server start'")
    try:
        return ServerConfig.model_validate_json(saved.read_text()), saved
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(x) for x in first["loc"]) or "(root)"
        raise FedsegError(f"{saved}: field '{field}': {first['msg']}") from None


def _cmd_resume(args: argparse.Namespace) -> int:
    cfg, saved = _saved_config(args.run_dir)
    run = RunDir(cfg.job.run_dir)
    st = run.status()
    if st.get("state") == "finished":
        raise FedsegError(f"{args.run_dir}: the job already finished ({st.get('round')} rounds); "
                          f"the model is in {run.model_dir}")
    if not run.checkpoint_path("last").exists():
        print("fedseg-server: no checkpoint yet; the job starts from the beginning", flush=True)
    return serve(cfg, resume=True, source=str(saved))


def _cmd_status(args: argparse.Namespace) -> int:
    run = RunDir(args.run_dir) if Path(args.run_dir).is_dir() else None
    st = run.status() if run else {}
    if not st:
        raise FedsegError(f"{args.run_dir}: no status.json; not a fedseg run folder")
    if st.get("state") == "running" and (Path(args.run_dir) / "server.json").is_file():
        cfg, _ = _saved_config(args.run_dir)
        if _running_server(Path(cfg.state_dir)) is None:
            st["state"] = "interrupted"
            st["hint"] = f"no fedseg-server is running; continue with: fedseg-server resume {args.run_dir}"
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    print(f"state:  {st.get('state', '?')}  (phase {st.get('phase', '?')})")
    print(f"round:  {st.get('round', 0)} of {st.get('rounds', '?')}")
    if "latest_dice" in st:
        print(f"dice:   {st['latest_dice']:.4f} (pooled mean, after round "
              f"{st.get('latest_eval_round', '?')})")
    if st.get("sites"):
        print(f"sites:  {', '.join(f'{k} ({v})' for k, v in sorted(st['sites'].items()))}")
    for key in ("error", "hint"):
        if st.get(key):
            print(f"{key}:  {st[key]}")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    if args.run_dir:
        cfg, _ = _saved_config(args.run_dir)
        state = Path(cfg.state_dir)
    else:
        state = Path(args.state_dir)
    pid_file = state / "server.pid"
    if not pid_file.is_file():
        raise FedsegError(f"{pid_file}: no running fedseg-server found for this state folder")
    pid = _running_server(state)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        raise FedsegError(f"the fedseg-server of {state} is not running (stale {pid_file} removed)")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.2)
    if pid_alive(pid):
        raise FedsegError(f"fedseg-server (pid {pid}) did not stop within 30 s")
    print(f"fedseg-server (pid {pid}) stopped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedseg-server", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start the SuperLink and run the federated job")
    s.add_argument("--config", required=True, help="server.toml")
    s.set_defaults(func=_cmd_start)
    s = sub.add_parser("resume", help="continue a stopped/crashed job from its last checkpoint")
    s.add_argument("run_dir")
    s.set_defaults(func=_cmd_resume)
    s = sub.add_parser("status", help="show a run folder's status")
    s.add_argument("run_dir")
    s.add_argument("--json", action="store_true", help="print status.json as is")
    s.set_defaults(func=_cmd_status)
    s = sub.add_parser("stop", help="stop the running server of a run folder (or state folder)")
    s.add_argument("run_dir", nargs="?", help="the job's run folder (reads its server.json)")
    s.add_argument("--state-dir", default="fedseg-server-state",
                   help="the server's state folder (when no RUN_DIR is given)")
    s.set_defaults(func=_cmd_stop)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("fedseg-server", lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
