"""``fedseg-client``: one hospital's agent.

Validates the site's dataset first (a site with bad data never joins: nothing gets trained on
it), then supervises ``flower-supernode`` with the site's node config (site name, data dir,
cache dir, device, GPU memory). If the SuperNode exits — the server restarted, the network
dropped — it is started again after a pause, so the site rejoins without anyone at the site; so
is a SuperNode that runs but has had no successful contact with the server for
``stall_timeout_s`` (hung: :mod:`fedseg.runtime.contact`), and both the SuperNode and the
site worker when the worker dies (the server then learns at once that the task it held failed).

Secure by default, from ONE folder ``pki`` (the ``fedseg provision`` folder, or just the three
files a site receives: ``ca.pem``, ``roster.json`` and its ``identity.key``): TLS verified
against the consortium CA, the site's P-384 identity key for SuperNode authentication and
secure aggregation, ``--trusted-entities`` from the roster's app-signing key (the site runs only
app bundles signed by the consortium), and node config ``require-secure-aggregation`` (the
site refuses to send its fingerprint, update or case counts unmasked). Every file can be given
on its own instead; the key and the CA are checked against the roster before anything starts.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedseg.client.doctor import ConnectionDoctor
from fedseg.client.job_end import JobEndWatch
from fedseg.client.worker import worker_argv
from fedseg.config_io import load_toml
from fedseg.errors import FedsegError, first_error, run_cli
from fedseg.runtime.contact import CONTACT_ENV, ContactWatch
from fedseg.runtime.processes import ManagedProcess, flower_env, free_port, supernode_argv
from fedseg.runtime.supernode import launcher_argv

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
# Flower's node heartbeat comes every ~20 s even while a long task runs, and the SuperLink counts
# a node gone after two missed ones (~60 s): 3 minutes of silence is a hung SuperNode, not a slow
# round, and a restart then loses nothing the server had not already given up
STALL_TIMEOUT_S = 180.0


class ClientConfig(BaseModel):
    """``client.toml`` (every field can also be given as a flag)."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(default="", description="site name, as in the consortium roster (required)")
    data_dir: str = Field(default="", description="nnU-Net raw dataset folder (required)")
    server: str = Field(default="127.0.0.1:9092", description="the server's public host:port")
    cache_dir: str = Field(default="", description="preprocessed data + trainer state")
    device: str = "auto"
    gpu_memory_gb: float | None = Field(default=None, gt=0)
    insecure: bool = Field(default=False, description="plain HTTP, no site authentication: "
                           "only to a loopback server (trials)")
    pki: str | None = Field(
        default=None, description="folder with the consortium's ca.pem and roster.json and this "
        "site's identity key (sites/SITE/identity.key or identity.key): the 'fedseg provision' "
        "folder or the files a site receives; default of the four fields below")
    root_certificates: str | None = Field(default=None, description="default PKI/ca.pem")
    auth_private_key: str | None = Field(
        default=None, description="the site's identity key (OpenSSH ECDSA P-384); default "
        "PKI/sites/SITE/identity.key, else PKI/identity.key")
    identity_key: str | None = Field(
        default=None, description="the site's ECDSA P-384 identity key for secure aggregation "
        "(default: auth_private_key, the same key from 'fedseg provision')")
    roster: str | None = Field(default=None, description="the consortium's roster.json "
                               "(default PKI/roster.json)")
    trusted_entities: str | None = Field(
        default=None, description="YAML {key_id: 'ssh-ed25519 ...'} of the app-signing keys "
        "whose bundles this site runs (default: the roster's consortium key)")
    require_signed_apps: bool = Field(
        default=True, description="run only app bundles signed by a trusted key "
        "(--trusted-entities); false: also unsigned ones (trials)")
    require_secure_aggregation: bool = Field(
        default=True, description="refuse every request that would send this site's "
        "fingerprint, model update or case counts unmasked")
    runtime_port: int = Field(default=0, ge=0, le=65535, description="0: pick a free one")
    site_worker: bool = Field(
        default=True, description="run the ClientApp in one long-lived worker process "
        "(torch, MONAI and the CUDA context stay loaded between rounds); false: Flower's "
        "fresh process per message")
    restart_delay_s: float = Field(default=5.0, ge=0)
    max_restarts: int = Field(default=-1, description="-1: forever")
    stall_timeout_s: float = Field(
        default=STALL_TIMEOUT_S, ge=0, description="restart a SuperNode that has had no "
        "successful contact with the server for this long although it runs (hung); 0: never")
    exit_when_done: bool = Field(
        default=False, description="exit when the server says the job ended (0: finished, "
        "1: failed); false: stay connected for the next job or a resume")


PATH_FIELDS = ("data_dir", "cache_dir", "pki", "root_certificates", "auth_private_key",
               "identity_key", "roster", "trusted_entities")
FLAG_FIELDS = ("site", "data_dir", "server", "cache_dir", "device", "gpu_memory_gb", "pki",
               "root_certificates", "auth_private_key", "identity_key", "roster",
               "trusted_entities", "require_signed_apps", "require_secure_aggregation", "site_worker",
               "runtime_port", "restart_delay_s", "max_restarts", "stall_timeout_s",
               "exit_when_done")


def load_client_config(path: str | Path) -> ClientConfig:
    """Read ``client.toml``; relative paths in it are relative to the file's folder."""
    p = Path(path)
    cfg = load_toml(p, ClientConfig)
    base = p.resolve().parent
    for key in PATH_FIELDS:
        val = getattr(cfg, key)
        if val:
            setattr(cfg, key, str((base / Path(val).expanduser()).resolve()))
    return cfg


def with_pki_defaults(cfg: ClientConfig) -> ClientConfig:
    """A copy in which the security files left unset are taken from ``cfg.pki``."""
    if not cfg.pki:
        return cfg.model_copy()
    pki = Path(cfg.pki)
    update: dict[str, str] = {}
    if cfg.root_certificates is None:
        update["root_certificates"] = str(pki / "ca.pem")
    if cfg.roster is None:
        update["roster"] = str(pki / "roster.json")
    if cfg.auth_private_key is None:
        own = pki / "sites" / cfg.site / "identity.key"
        update["auth_private_key"] = str(own if own.is_file() else pki / "identity.key")
    return cfg.model_copy(update=update)


def _config_from_args(args: argparse.Namespace) -> tuple[ClientConfig, str]:
    base: dict = {}
    if args.config:
        base = load_client_config(args.config).model_dump()
    for key in FLAG_FIELDS:
        val = getattr(args, key, None)
        if val not in (None, ""):
            base[key] = val
    if args.insecure:
        base["insecure"] = True
    missing = [k for k in ("site", "data_dir") if not base.get(k)]
    if missing:
        raise FedsegError(f"give --{missing[0].replace('_', '-')} "
                          "(or set it in --config client.toml)")
    try:
        return ClientConfig.model_validate(base), args.config or "command line"
    except ValidationError as err:
        field, msg = first_error(err)
        raise FedsegError(f"--{field.replace('_', '-')}: {msg}") from None


def check_site_data(data_dir: Path) -> None:
    from fedseg.data.validate import validate_dataset

    problems = validate_dataset(data_dir)
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        raise FedsegError(
            f"{data_dir}: {len(problems)} problem(s) in the site's data; this site will not "
            "join until they are fixed (see the lines above, or run 'fedseg check-data')"
        )


def check_security(given: ClientConfig, source: str = "client config",
                   cache: Path | None = None) -> ClientConfig:
    """Resolve the security files (``pki`` + overrides) and check them before the SuperNode
    starts: present, the identity key is this site's key in the roster, the CA is the roster's.
    Writes the trusted-entities file (into ``cache``) when it comes from the roster. Returns
    the resolved config; every problem is one line naming ``source`` and the field."""
    from fedseg.privacy.provision import check_ca_matches, load_roster
    from fedseg.privacy.transport import check_identity_key, trusted_entities_file

    cfg = with_pki_defaults(given)
    if not cfg.identity_key:
        cfg.identity_key = cfg.auth_private_key

    def origin(name: str) -> str:  # the field a user would fix: the override, or pki
        return name if getattr(given, name) is not None or not given.pki else "pki"

    def fail(name: str, msg: str) -> FedsegError:
        return FedsegError(f"{source}: field '{name}': {msg}")

    def need(name: str, why: str) -> Path:
        val = getattr(cfg, name)
        if not val:
            raise fail(name, f"not set; {why}: set pki = 'PKI/' (the folder with ca.pem, "
                       f"roster.json and this site's identity.key) or {name}")
        p = Path(val)
        if not p.is_file():
            raise fail(origin(name), f"{p}: file not found")
        return p

    def checked(name: str, check: Callable[[], object]) -> None:  # check raises FedsegError
        try:
            check()
        except FedsegError as err:
            raise fail(origin(name), str(err)) from None

    host = cfg.server.rpartition(":")[0] or cfg.server
    if cfg.insecure and host not in LOOPBACK:
        raise fail("insecure", f"plain HTTP only to a loopback server (server is {cfg.server}); "
                   "the consortium's server needs pki = 'PKI/'")
    roster = None
    if cfg.roster or cfg.require_secure_aggregation or (cfg.require_signed_apps
                                                        and not cfg.trusted_entities):
        path = need("roster", "the site checks secure aggregation and signed app bundles "
                    "against the consortium roster (or set require_secure_aggregation = false "
                    "and require_signed_apps = false for a plain trial)")
        try:
            roster = load_roster(path)
            roster.site(cfg.site)
        except FedsegError as err:
            raise fail(origin("roster"), str(err)) from None
    ca = None if cfg.insecure else need("root_certificates", "TLS is on by default (insecure = "
                                        "true only for a loopback trial)")
    auth = None if cfg.insecure else need("auth_private_key", "the server admits only sites "
                                          "whose identity key it registered")
    id_field = "identity_key" if given.identity_key else "auth_private_key"
    identity = None
    if cfg.require_secure_aggregation or (cfg.identity_key and roster is not None):
        identity = need(id_field, "secure aggregation signs the site's keys with its identity key")
    if roster is not None:
        if identity is not None:
            checked(id_field, lambda: check_identity_key(roster, cfg.site, identity))
        if auth is not None and auth != identity:
            checked("auth_private_key", lambda: check_identity_key(roster, cfg.site, auth))
        if ca is not None:
            checked("root_certificates", lambda: check_ca_matches(roster, ca))
        if cfg.require_signed_apps and not cfg.trusted_entities and cache is not None:
            cfg.trusted_entities = str(trusted_entities_file(roster, cache / "trusted-entities.yaml"))
    if cfg.trusted_entities:
        need("trusted_entities", "")
    cfg.identity_key = str(identity) if identity else None
    return cfg


def run_client(given: ClientConfig, source: str = "client config") -> int:
    data = Path(given.data_dir).resolve()
    check_site_data(data)
    cache = Path(given.cache_dir or (data.parent / f".fedseg_cache_{given.site}")).resolve()
    cfg = check_security(given, source, cache)
    cache.mkdir(parents=True, exist_ok=True)
    node_cfg: dict[str, str | float | bool] = {
        "site": cfg.site, "data-dir": str(data), "cache-dir": str(cache), "device": cfg.device,
        "require-secure-aggregation": cfg.require_secure_aggregation,
        # bulk transfers (model, update) go to the same server address, over the same TLS
        "server": cfg.server, "insecure": cfg.insecure}
    if not cfg.insecure and cfg.root_certificates:
        node_cfg["root-certificates"] = str(Path(cfg.root_certificates).resolve())
    if cfg.gpu_memory_gb:
        node_cfg["gpu-memory-gb"] = cfg.gpu_memory_gb
    if cfg.identity_key and cfg.roster:  # what secure aggregation needs
        node_cfg["identity-key"] = str(Path(cfg.identity_key).resolve())
        node_cfg["roster"] = str(Path(cfg.roster).resolve())
    runtime_port = cfg.runtime_port or free_port()  # kept across restarts: the worker uses it
    argv = supernode_argv(
        cfg.server, runtime_port, node_cfg, insecure=cfg.insecure,
        root_certificates=None if cfg.insecure else Path(cfg.root_certificates),  # type: ignore[arg-type]
        auth_private_key=None if cfg.insecure else Path(cfg.auth_private_key),  # type: ignore[arg-type]
        trusted_entities=Path(cfg.trusted_entities) if cfg.require_signed_apps
        and cfg.trusted_entities else None,
    )
    env = flower_env(cache / ".flwr")
    worker = None
    argv = launcher_argv(argv)  # Flower's SuperNode, shorter polls, contacts recorded
    if cfg.site_worker:  # + fedseg's worker: client/worker.py
        argv = [*argv, "--isolation", "process"]
        worker = ManagedProcess(f"worker-{cfg.site}", worker_argv(f"127.0.0.1:{runtime_port}"),
                                cache / "logs" / "worker.log", env, die_with_parent=True)
    contact = cache / "logs" / "supernode.contact"
    watch = ContactWatch(contact, cfg.stall_timeout_s)
    # die_with_parent: a SIGKILL of fedseg-client leaves no SuperNode or worker behind
    proc = ManagedProcess(f"supernode-{cfg.site}", argv, cache / "logs" / "supernode.log",
                          {**env, CONTACT_ENV: str(contact)}, die_with_parent=True)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    restarts = 0
    checks = ("PLAIN HTTP (loopback trial)" if cfg.insecure else "TLS, identity key") + (
        ", signed apps only" if cfg.require_signed_apps and cfg.trusted_entities else
        ", UNSIGNED apps accepted") + (", secure aggregation required"
                                       if cfg.require_secure_aggregation else "")
    print(f"fedseg-client: site '{cfg.site}' data OK; connecting to {cfg.server} ({checks}; "
          f"log: {proc.log_path})", flush=True)
    # why it cannot connect, in one line (client/doctor.py); the job's end (client/job_end.py)
    doctor = ConnectionDoctor(cfg.server, cfg.root_certificates, cfg.insecure, source, cfg.site,
                              proc.log_path)
    ended = JobEndWatch(cache)
    doctor.start()
    proc.start()
    watch.restart()
    if worker is not None:
        worker.start()
    try:
        while not stopping:
            time.sleep(0.5)
            if (finding := doctor.tick()) is not None:  # e.g. the SuperLink's own port
                raise FedsegError(finding.line)
            if (notice := ended.poll()) is not None:
                print(f"fedseg-client: {JobEndWatch.line(notice)}", flush=True)
                doctor.job_ended(notice.job_id)
                if cfg.exit_when_done:
                    time.sleep(2.0)  # the SuperNode pushes the acknowledgement meanwhile
                    return 0 if notice.state == "finished" else 1
            if worker is not None and worker.poll() is not None and not stopping:
                # the site's state is on disk; but a task the worker held would be answered
                # only when Flower's task heartbeat expires (>= 60 s, never for one taken but
                # not yet pulled), so the SuperNode is restarted too: it leaves gracefully and
                # the server gets NODE_UNAVAILABLE for that task at once (fails fast)
                print(f"fedseg-client: site worker exited ({worker.poll()}); restarting it and "
                      f"the SuperNode (log: {worker.log_path})", file=sys.stderr, flush=True)
                worker.stop(timeout=2)
                worker.start()
                proc.stop(timeout=10)
            silent = watch.silent_for() if proc.poll() is None else None
            if silent is not None:
                print(f"fedseg-client: the SuperNode had no contact with {cfg.server} for "
                      f"{silent:.0f} s although it runs (hung?); restarting it "
                      f"(stall_timeout_s = {cfg.stall_timeout_s:g})", file=sys.stderr, flush=True)
                proc.signal_group(signal.SIGCONT)  # a stopped process cannot take SIGTERM
                proc.stop(timeout=5)
            code = proc.poll()
            if code is None:
                continue
            doctor.supernode_exited()
            if cfg.max_restarts >= 0 and restarts >= cfg.max_restarts:
                print(f"fedseg-client: SuperNode exited ({code}); not restarting", file=sys.stderr)
                return 1
            restarts += 1
            print(f"fedseg-client: SuperNode exited ({code}); reconnecting in "
                  f"{cfg.restart_delay_s:.0f} s (restart {restarts})", file=sys.stderr, flush=True)
            deadline = time.monotonic() + cfg.restart_delay_s
            while time.monotonic() < deadline and not stopping:
                time.sleep(0.2)
            if not stopping:
                proc.stop(timeout=2)  # what is left of the old SuperNode's process group
                proc.start()
                watch.restart()
    finally:
        proc.stop(timeout=5)
        if worker is not None:
            worker.stop(timeout=5)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedseg-client", description=__doc__.splitlines()[0])
    p.add_argument("--site", help="site name")
    p.add_argument("--config", help="client.toml")
    p.add_argument("--data", dest="data_dir", help="the site's nnU-Net raw dataset folder")
    p.add_argument("--server", help="the server's public address host:port")
    p.add_argument("--cache", dest="cache_dir", help="cache folder (preprocessed data, state)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--gpu-memory-gb", type=float)
    p.add_argument("--pki", help="folder with ca.pem, roster.json and this site's identity key "
                                 "(default of the next four)")
    p.add_argument("--root-certificates", help="the consortium CA certificate (PEM)")
    p.add_argument("--auth-private-key", help="the site's identity key (OpenSSH, P-384)")
    p.add_argument("--identity-key", help="the site's identity key for secure aggregation "
                                          "(default: --auth-private-key)")
    p.add_argument("--roster", help="the consortium roster.json")
    p.add_argument("--trusted-entities", help="YAML of trusted app-signing keys (default: "
                                              "the roster's)")
    p.add_argument("--require-signed-apps", action=argparse.BooleanOptionalAction, default=None,
                   help="run only consortium-signed app bundles (default: on)")
    p.add_argument("--require-secure-aggregation", action=argparse.BooleanOptionalAction,
                   default=None, help="refuse to send the fingerprint, update or case counts "
                   "unmasked (default: on)")
    p.add_argument("--site-worker", action=argparse.BooleanOptionalAction, default=None,
                   help="run the ClientApp in one long-lived worker process (default: on)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (loopback trials only)")
    p.add_argument("--runtime-port", type=int, help="the local ClientApp port (0: a free one)")
    p.add_argument("--restart-delay-s", type=float,
                   help="seconds before a SuperNode that exited is started again")
    p.add_argument("--max-restarts", type=int, help="SuperNode restarts before giving up (-1: "
                   "forever)")
    p.add_argument("--stall-timeout-s", type=float,
                   help="restart a running SuperNode after this many seconds without a "
                   f"successful contact with the server (default {STALL_TIMEOUT_S:g}; 0: never)")
    p.add_argument("--exit-when-done", action=argparse.BooleanOptionalAction, default=None,
                   help="exit when the server says the job ended (0: finished, 1: failed); "
                   "default: stay connected for the next job")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        cfg, source = _config_from_args(args)
        return run_client(cfg, source)

    return run_cli("fedseg-client", command)


if __name__ == "__main__":
    raise SystemExit(main())
