"""``fedseg-server``: start, watch, stop and resume the federation server.

``start --config server.toml`` supervises ``flower-superlink`` (state database on disk, runtime
dependency installs off, telemetry off), submits the fedseg job with ``flwr run`` and shows its
progress until it is done; the config is saved as ``RUN_DIR/server.json`` (paths made absolute).

Secure by default, from the provisioning folder ``pki`` (``fedseg provision``): the SuperLink
serves TLS with ``--enable-supernode-auth`` and listens on 127.0.0.1 ONLY; every site of the
roster has its public key registered (``flwr supernode register``, idempotent); the public
address ``host:port`` is the fleet proxy (:mod:`fedseg.runtime.fleet_proxy`), which forwards the
SuperNode API (``/v1/fleet/``) and nothing else, so the run-submission (Control) API is never
reachable from the sites' side; the job is submitted as an app bundle signed with the
consortium's app-signing key (through :class:`~fedseg.privacy.app_registry.AppRegistry`, since
``flwr run ./app`` cannot carry signatures), the only kind the sites run. ``insecure = true``
(plain HTTP, no authentication, the proxy lets SuperNodes self-register) is refused unless
``host`` is a loopback address.
``resume RUN_DIR`` continues a crashed or stopped job from ``RUN_DIR/checkpoints/last.npz``:
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
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from fedseg.errors import FedsegError, run_cli
from fedseg.runtime.processes import (
    ManagedProcess,
    free_port,
    pid_alive,
    superlink_argv,
    wait_for_port,
    write_flwr_connection,
)
from fedseg.server.config import ServerConfig, load_toml
from fedseg.server.orphans import orphan_note, stop_orphans
from fedseg.server.rundir import RunDir, write_problem

if TYPE_CHECKING:
    from fedseg.privacy.provision import Roster

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SUPERLINK_HOST = "127.0.0.1"  # the SuperLink never listens elsewhere: only the fleet proxy is public
CONNECTION = "fedseg"  # the flwr CLI connection fedseg-server writes into STATE_DIR/.flwr


def load_server_config(path: str | Path) -> ServerConfig:
    """Read ``server.toml``; relative paths in it are relative to the file's folder (so the
    saved ``RUN_DIR/server.json`` works from any working directory)."""
    p = Path(path)
    cfg = load_toml(p, ServerConfig)
    base = p.resolve().parent

    def absolute(v: str | None) -> str | None:
        return v if not v else str((base / Path(v).expanduser()).resolve())

    for key in ("state_dir", "pki", "tls_certfile", "tls_keyfile", "tls_ca_certfile", "roster",
                "app_signing_key"):
        setattr(cfg, key, absolute(getattr(cfg, key)))
    for key in ("run_dir", "roster", "plan_file"):  # the job's paths (those it has)
        if key in type(cfg.job).model_fields:
            setattr(cfg.job, key, absolute(getattr(cfg.job, key)))
    return cfg


def _connectable(host: str, sec: Security) -> str:
    """The name(s) a site can put in ``server``: a wildcard bind address (0.0.0.0, ::) is not
    one; the certificate's names are (TLS checks them), else this machine's host name."""
    if host.strip("[]") not in ("0.0.0.0", "::", ""):
        return host
    sans = list(sec.roster.server_sans) if sec.roster is not None else []
    return " or ".join(sans) if sans else socket.gethostname()


@dataclass
class Security:
    """What ``serve`` runs with, checked before anything starts."""

    ssl: tuple[Path, Path, Path] | None  # server cert, key, CA; None: insecure loopback trial
    roster: Roster | None  # every site in it is registered (SuperNode authentication)
    signing: tuple[Path, str] | None  # app-signing key and its roster key id; None: unsigned


def check_security(given: ServerConfig, source: str) -> tuple[ServerConfig, Security]:
    """Resolve the security files (``pki`` + overrides) and check them; every problem is one
    line naming ``source`` and the field."""
    from fedseg.privacy.provision import check_ca_matches, load_roster
    from fedseg.privacy.transport import check_server_certificate, check_signing_key

    cfg = given.with_pki_defaults()

    def field(name: str) -> str:  # the field a user would fix: the override, or pki
        return name if getattr(given, name) is not None or not given.pki else "pki"

    def fail(name: str, msg: str) -> FedsegError:
        return FedsegError(f"{source}: field '{name}': {msg}")

    def need_file(name: str) -> Path:
        p = Path(getattr(cfg, name))
        if not p.is_file():
            raise fail(field(name), f"{p}: file not found")
        return p

    def checked(name: str, check: Callable[[], None]) -> None:  # a check raising FedsegError
        try:
            check()
        except FedsegError as err:
            raise fail(field(name), str(err)) from None

    if cfg.insecure and cfg.host not in LOOPBACK:
        raise fail("insecure", f"only allowed on loopback (host is {cfg.host}); TLS and "
                   "SuperNode authentication come from pki = 'PKI/' (from 'fedseg provision')")
    ssl = None
    if not cfg.insecure:
        tls = ("tls_certfile", "tls_keyfile", "tls_ca_certfile")
        if not cfg.pki and not any(getattr(cfg, k) for k in tls):
            raise fail("pki", "not set; TLS and SuperNode authentication are on by default and "
                       "need the folder from 'fedseg provision' (pki = 'PKI/'); insecure = true "
                       "only for a trial on loopback")
        for k in tls:
            if not getattr(cfg, k):
                raise fail(k, "not set (and no pki folder to take it from)")
        ssl = tuple(need_file(k) for k in tls)
        checked("tls_ca_certfile" if given.tls_ca_certfile else "tls_certfile",
                lambda: check_server_certificate(ssl[0], ssl[2], SUPERLINK_HOST))
        if not cfg.roster:
            raise fail("roster", "not set; SuperNode authentication registers every site of the "
                       "consortium roster: set pki = 'PKI/' or roster = 'PKI/roster.json'")
    roster = None
    if cfg.roster:
        path = need_file("roster")
        try:
            roster = load_roster(path)
        except FedsegError as err:
            raise fail(field("roster"), str(err)) from None
        if ssl is not None:
            checked("tls_ca_certfile", lambda: check_ca_matches(roster, ssl[2]))
    signing = None
    if cfg.app_signing_key:
        key = need_file("app_signing_key")
        if roster is None:
            raise fail("app_signing_key", "signing needs the roster (its key id); set pki or "
                       "roster")
        checked("app_signing_key", lambda: check_signing_key(roster, key))
        signing = (key, roster.app_signing.key_id)
    return cfg, Security(ssl, roster, signing)  # type: ignore[arg-type]


def _running_server(state: Path) -> int | None:
    """pid of a live fedseg-server for this state folder (a stale pid file is ignored)."""
    pid_file = state / "server.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid != os.getpid() and pid_alive(pid) else None


def _refuse_unwritable(run_dir: str, source: str) -> None:
    """One line before anything starts when the run folder cannot take the run's files; its
    status.json (when that file still takes a write) says so instead of "running"."""
    run = RunDir(run_dir, create=False)
    try:
        if not run.root.is_dir():
            run.root.mkdir(parents=True)
        problem = write_problem(run.root)
    except OSError as err:
        problem = f"{run.root}: cannot create the run folder ({err.strerror or err})"
    if problem is None:
        return
    if run.status().get("state") == "running":
        try:
            run.set_status(state="failed", error=problem)
        except OSError:
            pass
    raise FedsegError(f"{source}: [job] field 'run_dir': {problem}")


def _check_free(host: str, port: int, what: str) -> None:
    """Fail in one line, before anything starts, if ``host:port`` cannot be listened on."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and Flower do
        try:
            s.bind((host, port))
        except OSError as err:
            raise FedsegError(f"{what}: cannot listen on {host}:{port} ({err.strerror}); another "
                              "process uses it (a fedseg-server still running?)") from None


def _proxy_log(path: Path) -> logging.Handler:
    """The fleet proxy's log (refused requests, upstream errors) goes to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s fleet-proxy %(levelname)s %(message)s"))
    log = logging.getLogger("fedseg.fleet_proxy")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler


def serve(cfg: ServerConfig, resume: bool = False, timeout: float = 7 * 24 * 3600,
          source: str = "server config") -> int:
    """Start the SuperLink (127.0.0.1 only) and the fleet proxy (the public address), register
    the roster's sites, submit the job (signed), follow it; stop everything on exit.

    The SuperLink keeps its state in ``STATE_DIR/superlink.db`` (site registrations included).
    After a crash the same file is opened again: SuperNodes that kept retrying are recognised
    under their old node ids, registering the roster again is a no-op, the crashed Flower run is
    left behind as failed, and our job continues as a NEW Flower run from
    ``RUN_DIR/checkpoints/last.npz`` (Flower has no resume of its own)."""
    from fedseg.privacy.app_registry import (
        AppRegistry,
        build_fab,
        sign_fab,
        superlink_registry_env,
    )
    from fedseg.privacy.provision import load_roster
    from fedseg.privacy.transport import register_sites, save_node_ids
    from fedseg.runtime.fab import write_app_dir
    from fedseg.runtime.fleet_proxy import FleetProxy
    from fedseg.simulate import Federation, follow, interrupt_on_sigterm

    cfg, sec = check_security(cfg, source)
    if cfg.superlink_port == cfg.port:
        raise FedsegError(f"{source}: field 'superlink_port': {cfg.port} is the public port "
                          "(the fleet proxy's); the SuperLink needs another one")
    state = Path(cfg.state_dir).resolve()
    other = _running_server(state)
    if other is not None:
        raise FedsegError(f"a fedseg-server (pid {other}) is already running for {state}; "
                          f"stop it first: fedseg-server stop {cfg.job.run_dir}")
    stop_orphans(state, say=lambda line: print(line, flush=True))  # it would hold the port
    _refuse_unwritable(cfg.job.run_dir, source)
    _check_free(cfg.host, cfg.port, f"{source}: field 'port'")
    if cfg.superlink_port:
        _check_free(SUPERLINK_HOST, cfg.superlink_port, f"{source}: field 'superlink_port'")
    state.mkdir(parents=True, exist_ok=True)
    job = cfg.job.model_copy(update={"resume": resume or cfg.job.resume})
    if not job.job_id:
        job.job_id = Path(job.run_dir).name
    if job.secure_aggregation:  # on by default: fail now, not after the SuperLink started
        job.roster = job.roster or cfg.roster
        if not job.roster:
            raise FedsegError(f"{source}: secure aggregation is on (the default) but [job] has no "
                              "roster; set pki = 'PKI/' (from 'fedseg provision'), [job] roster, "
                              "or secure_aggregation = false")
        load_roster(job.roster)
    ssl = sec.ssl
    if ssl is not None:  # authenticated nodes: each must be the roster site its key is
        job.robust = job.robust.model_copy(update={"require_site_keys": True})
    port = cfg.superlink_port or free_port(SUPERLINK_HOST)
    bulk_upstream = None
    if job.bulk_transport == "http":  # the model and updates: through the proxy, over its TLS
        host, _, bport = job.bulk_listen.rpartition(":")
        if host.strip("[]") not in ("127.0.0.1", "localhost", "::1"):
            raise FedsegError(f"{source}: [job] field 'bulk_listen': {job.bulk_listen} is not a "
                              "loopback address; fedseg-server serves bulk transfers on its "
                              "public port (TLS) and needs the ServerApp's on 127.0.0.1")
        bport = bport if bport not in ("", "0") else str(free_port(SUPERLINK_HOST))
        job.bulk_listen = f"127.0.0.1:{bport}"
        job.bulk_url = job.bulk_url or "/fedseg/bulk"  # i.e. the address each site connects to
        bulk_upstream = f"http://127.0.0.1:{bport}"
    run = RunDir(job.run_dir)
    fed = Federation(state, [], device="auto")
    fed.port = port
    registry = AppRegistry(SUPERLINK_HOST) if sec.signing else None
    fed.superlink = ManagedProcess(
        "flower-superlink",
        superlink_argv(port, host=SUPERLINK_HOST,
                       database=(str(state / "superlink.db") if cfg.superlink_database == "disk"
                                 else ":flwr-in-memory:"),
                       insecure=ssl is None, ssl=ssl, enable_auth=ssl is not None),
        state / "logs" / "superlink.log",
        {**fed.env, **(superlink_registry_env(registry) if registry else {})}, cwd=state,
        die_with_parent=True,  # a SIGKILL of this process stops it (and so SuperExec, ServerApp)
    )
    proxy: FleetProxy | None = None
    handler = _proxy_log(state / "logs" / "fleet-proxy.log")
    (state / "server.pid").write_text(str(os.getpid()))
    try:
        interrupt_on_sigterm()
        if registry is not None:
            registry.start()
        fed.superlink.start()
        (state / "superlink.pid").write_text(str(fed.superlink.pid))
        wait_for_port(SUPERLINK_HOST, port, 60, fed.superlink)
        write_flwr_connection(fed.flwr_home, CONNECTION, f"{SUPERLINK_HOST}:{port}",
                              insecure=ssl is None, root_certificates=ssl[2] if ssl else None)
        if ssl is not None and sec.roster is not None:  # idempotent: a known key is kept
            ids = register_sites(sec.roster, fed.env, CONNECTION)
            save_node_ids(state / "node_ids.json", ids)
            print("fedseg-server: sites registered: " + ", ".join(
                f"{k} (node {v})" if v else f"{k} (already)" for k, v in sorted(ids.items())),
                flush=True)
        try:
            proxy = FleetProxy(
                f"{cfg.host}:{cfg.port}", f"{'https' if ssl else 'http'}://{SUPERLINK_HOST}:{port}",
                ssl[0] if ssl else None, ssl[1] if ssl else None, ssl[2] if ssl else None,
                allow_plain_http=ssl is None, allow_self_registration=ssl is None,
                bulk_upstream=bulk_upstream,
            ).start()
        except (ValueError, RuntimeError, OSError) as err:
            raise FedsegError(f"{source}: field 'port': the fleet proxy cannot serve "
                              f"{cfg.host}:{cfg.port} ({err}; is the port in use?)") from None
        app = None
        if registry is not None and sec.signing is not None:
            fab = build_fab(write_app_dir(state / "app"))
            app = registry.publish(fab, [sign_fab(fab, *sec.signing)])
        print(f"fedseg-server: sites connect to {_connectable(cfg.host, sec)}:{cfg.port} "
              f"(fleet proxy on {cfg.host}: /v1/fleet/ "
              f"{'and /fedseg/bulk/ ' if bulk_upstream else ''}only, "
              f"{'TLS, SuperNode authentication' if ssl else 'PLAIN HTTP, loopback trial'}"
              f"); SuperLink on {SUPERLINK_HOST}:{port}; job "
              f"{'signed' if app else 'UNSIGNED (sites that require signed apps refuse it)'}; "
              f"run folder {job.run_dir}", flush=True)
        run_id = fed.submit(job, app=app)
        run.set_status(flower_run_id=run_id, server_pid=os.getpid())
        status = follow(fed, run_id, run, timeout)
        st = run.status()
        if status != "finished:completed" or st.get("state") != "finished":
            why = (st.get("error") or write_problem(run.root)
                   or f"the ServerApp gave no reason; see {state / 'logs' / 'superlink.log'}")
            if st.get("state") == "running":  # the ServerApp could not say it ended
                try:
                    run.set_status(state="failed", error=why)
                except OSError:
                    pass
            raise FedsegError(f"run ended '{status}': {why}"
                              f"; after fixing the cause: fedseg-server resume {job.run_dir}")
        print(f"fedseg-server: done; model bundle in {Path(job.run_dir) / 'model'}")
        from fedseg.simulate import report_summary  # the per-class, per-site final table

        print(report_summary(Path(job.run_dir)), flush=True)
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
        if proxy is not None:
            proxy.stop()
        if registry is not None:
            registry.stop()
        logging.getLogger("fedseg.fleet_proxy").removeHandler(handler)
        handler.close()
        for name in ("server.pid", "superlink.pid"):
            (state / name).unlink(missing_ok=True)


def _cmd_start(args: argparse.Namespace) -> int:
    cfg = load_server_config(args.config)
    _refuse_unwritable(cfg.job.run_dir, str(args.config))
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
    run = RunDir(cfg.job.run_dir, create=False)  # serve() checks that it takes files
    st = run.status()
    if st.get("state") == "finished":
        raise FedsegError(f"{args.run_dir}: the job already finished ({st.get('round')} rounds); "
                          f"the model is in {run.model_dir}")
    if not run.checkpoint_path("last").exists():
        print("fedseg-server: no checkpoint yet; the job starts from the beginning", flush=True)
    return serve(cfg, resume=True, source=str(saved))


def _cmd_status(args: argparse.Namespace) -> int:
    run = RunDir(args.run_dir, create=False) if Path(args.run_dir).is_dir() else None
    st = run.status() if run else {}
    if not st:
        raise FedsegError(f"{args.run_dir}: no status.json; not a fedseg run folder")
    if (Path(args.run_dir) / "server.json").is_file():
        cfg, _ = _saved_config(args.run_dir)
        state = Path(cfg.state_dir).resolve()
        live = _running_server(state) is not None
        if st.get("state") == "running" and not live:
            st["state"] = "interrupted"
            st["hint"] = f"no fedseg-server is running; continue with: fedseg-server resume {args.run_dir}"
            st["error"] = st.get("error") or write_problem(Path(args.run_dir))
        if not live and (note := orphan_note(state)):  # what still listens tells the truth too
            st["orphans"] = note
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
    for key in ("error", "hint", "orphans"):
        if st.get(key):
            print(f"{key}:  {st[key]}")
    return 0


def _cmd_sites(args: argparse.Namespace) -> int:
    from fedseg.server.sites import format_table, site_table, state_and_run

    rows = site_table(*state_and_run(args.run_dir, args.state_dir))
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    if args.run_dir:
        cfg, _ = _saved_config(args.run_dir)
        state = Path(cfg.state_dir)
    else:
        state = Path(args.state_dir)
    pid_file = state / "server.pid"
    pid = _running_server(state)
    if pid is None:  # a dead server: what it left running is stopped, its pid files removed
        orphan = stop_orphans(state.resolve(), say=print)
        existed = pid_file.is_file()
        pid_file.unlink(missing_ok=True)
        if orphan is not None:
            return 0
        if not existed:
            raise FedsegError(f"{pid_file}: no running fedseg-server found for this state folder")
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
    s = sub.add_parser("sites", help="which node id is which site (and who is online now)")
    s.add_argument("run_dir", nargs="?", help="the job's run folder (reads its server.json)")
    s.add_argument("--state-dir", default="fedseg-server-state",
                   help="the server's state folder (when no RUN_DIR is given)")
    s.add_argument("--json", action="store_true", help="print the rows as JSON")
    s.set_defaults(func=_cmd_sites)
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
