"""``fedseg-server``: start, watch, stop and resume the federation server.

``start`` supervises ``flower-superlink`` (state database on disk, runtime dependency installs
off, telemetry off), submits the fedseg job with ``flwr run`` and shows its progress until it is
done. ``resume RUN_DIR`` continues a crashed or stopped job from its last checkpoint (Flower
itself has no resume: a new Flower run is started that picks up our checkpoint). ``status``
prints a run directory's status; ``stop`` stops a server started with ``start``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from fedseg.errors import FedsegError
from fedseg.runtime.processes import (
    ManagedProcess,
    superlink_argv,
    wait_for_port,
    write_flwr_connection,
)
from fedseg.server.config import ServerConfig, load_toml
from fedseg.server.rundir import RunDir

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check_tls(cfg: ServerConfig) -> tuple[Path, Path, Path] | None:
    if cfg.insecure:
        if cfg.host not in LOOPBACK:
            raise FedsegError(
                f"server config: insecure = true is only allowed on loopback (host is {cfg.host}); "
                "configure tls_certfile/tls_keyfile/tls_ca_certfile"
            )
        return None
    paths = (cfg.tls_certfile, cfg.tls_keyfile, cfg.tls_ca_certfile)
    if not all(paths):
        raise FedsegError(
            "server config: TLS is on by default and needs tls_certfile, tls_keyfile and "
            "tls_ca_certfile; or set insecure = true for a loopback-only trial"
        )
    out = tuple(Path(p) for p in paths)  # type: ignore[arg-type]
    for p in out:
        if not p.is_file():
            raise FedsegError(f"server config: {p}: file not found")
    return out  # type: ignore[return-value]


def serve(cfg: ServerConfig, resume: bool = False, timeout: float = 7 * 24 * 3600) -> int:
    """Start the SuperLink, submit the job, follow it; stop everything on exit."""
    from fedseg.simulate import Federation, follow

    state = Path(cfg.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    ssl = _check_tls(cfg)
    job = cfg.job.model_copy(update={"resume": resume or cfg.job.resume})
    if not job.job_id:
        job.job_id = Path(job.run_dir).name
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
        fed.superlink.start()
        wait_for_port("127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host, cfg.port, 60,
                      fed.superlink)
        write_flwr_connection(fed.flwr_home, "fedseg", f"{_client_host(cfg.host)}:{cfg.port}",
                              insecure=ssl is None, root_certificates=ssl[2] if ssl else None)
        signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(KeyboardInterrupt()))
        print(f"fedseg-server: SuperLink on {cfg.host}:{cfg.port}; run folder {job.run_dir}",
              flush=True)
        run_id = fed.submit(job)
        status = follow(fed, run_id, RunDir(job.run_dir), timeout)
        st = RunDir(job.run_dir).status()
        if status != "finished:completed" or st.get("state") != "finished":
            raise FedsegError(f"run ended '{status}': {st.get('error', 'see ' + str(state / 'logs'))}")
        print(f"fedseg-server: done; model bundle in {Path(job.run_dir) / 'model'}")
        return 0
    except KeyboardInterrupt:
        print("fedseg-server: stopping (resume with 'fedseg-server resume RUN_DIR')", file=sys.stderr)
        return 130
    finally:
        fed.stop()
        (state / "server.pid").unlink(missing_ok=True)


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def _cmd_start(args: argparse.Namespace) -> int:
    cfg = load_toml(args.config, ServerConfig)
    Path(cfg.job.run_dir).mkdir(parents=True, exist_ok=True)
    # saved so that 'resume RUN_DIR' needs nothing but the run folder
    (Path(cfg.job.run_dir) / "server.json").write_text(cfg.model_dump_json(indent=2))
    return serve(cfg)


def _cmd_resume(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    saved = run_dir / "server.json"
    if not saved.is_file():
        raise FedsegError(f"{saved}: missing; {run_dir} was not started by fedseg-server start")
    cfg = ServerConfig.model_validate_json(saved.read_text())
    return serve(cfg, resume=True)


def _cmd_status(args: argparse.Namespace) -> int:
    run = RunDir(args.run_dir)
    st = run.status()
    if not st:
        raise FedsegError(f"{args.run_dir}: no status.json; not a fedseg run folder")
    print(json.dumps(st, indent=2))
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    pid_file = Path(args.state_dir) / "server.pid"
    if not pid_file.is_file():
        raise FedsegError(f"{pid_file}: no running fedseg-server found for this state folder")
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        raise FedsegError(f"fedseg-server (pid {pid}) is not running") from None
    for _ in range(100):
        if not pid_file.exists():
            break
        time.sleep(0.2)
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
    s.set_defaults(func=_cmd_status)
    s = sub.add_parser("stop", help="stop the server started for a state folder")
    s.add_argument("--state-dir", default="fedseg-server-state")
    s.set_defaults(func=_cmd_stop)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FedsegError as err:
        print(f"fedseg-server: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
