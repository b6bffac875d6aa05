"""``fedseg-client``: one hospital's agent.

Validates the site's dataset first (a site with bad data never joins: nothing gets trained on
it), then supervises ``flower-supernode`` with the site's node config (site name, data dir,
cache dir, device, GPU memory). If the SuperNode exits — the server restarted, the network
dropped — it is started again after a pause, so the site rejoins without anyone at the site.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedseg.config_io import load_toml
from fedseg.errors import FedsegError, run_cli
from fedseg.runtime.processes import ManagedProcess, flower_env, free_port, supernode_argv


class ClientConfig(BaseModel):
    """``client.toml`` (every field can also be given as a flag)."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(default="", description="site name, as in the consortium roster (required)")
    data_dir: str = Field(default="", description="nnU-Net raw dataset folder (required)")
    server: str = Field(default="127.0.0.1:9092", description="SuperLink address host:port")
    cache_dir: str = Field(default="", description="preprocessed data + trainer state")
    device: str = "auto"
    gpu_memory_gb: float | None = Field(default=None, gt=0)
    insecure: bool = False
    root_certificates: str | None = None
    auth_private_key: str | None = None
    identity_key: str | None = Field(
        default=None, description="the site's ECDSA P-384 identity key for secure aggregation "
        "(default: auth_private_key, the same key from 'fedseg provision')")
    roster: str | None = Field(default=None, description="the consortium's roster.json")
    runtime_port: int = Field(default=0, ge=0, le=65535, description="0: pick a free one")
    restart_delay_s: float = Field(default=5.0, ge=0)
    max_restarts: int = Field(default=-1, description="-1: forever")


PATH_FIELDS = ("data_dir", "cache_dir", "root_certificates", "auth_private_key", "identity_key",
               "roster")


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


def _config_from_args(args: argparse.Namespace) -> ClientConfig:
    base: dict = {}
    if args.config:
        base = load_client_config(args.config).model_dump()
    for key in ("site", "data_dir", "server", "cache_dir", "device", "gpu_memory_gb",
                "root_certificates", "auth_private_key", "identity_key", "roster"):
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
        return ClientConfig.model_validate(base)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(x) for x in first["loc"]) or "(root)"
        raise FedsegError(f"--{field.replace('_', '-')}: {first['msg']}") from None


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


def run_client(cfg: ClientConfig) -> int:
    data = Path(cfg.data_dir).resolve()
    check_site_data(data)
    if not cfg.insecure and not cfg.root_certificates:
        raise FedsegError("TLS is on by default; give --root-certificates CA.pem "
                          "(or --insecure for a loopback trial)")
    cache = Path(cfg.cache_dir or (data.parent / f".fedseg_cache_{cfg.site}")).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    node_cfg: dict[str, str | float] = {"site": cfg.site, "data-dir": str(data),
                                        "cache-dir": str(cache), "device": cfg.device}
    if cfg.gpu_memory_gb:
        node_cfg["gpu-memory-gb"] = cfg.gpu_memory_gb
    identity = cfg.identity_key or cfg.auth_private_key
    if identity and cfg.roster:  # what secure aggregation needs (a job without it ignores them)
        node_cfg["identity-key"] = str(Path(identity).resolve())
        node_cfg["roster"] = str(Path(cfg.roster).resolve())
    argv = supernode_argv(
        cfg.server, cfg.runtime_port or free_port(), node_cfg, insecure=cfg.insecure,
        root_certificates=Path(cfg.root_certificates) if cfg.root_certificates else None,
        auth_private_key=Path(cfg.auth_private_key) if cfg.auth_private_key else None,
    )
    proc = ManagedProcess(f"supernode-{cfg.site}", argv, cache / "logs" / "supernode.log",
                          flower_env(cache / ".flwr"))
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    restarts = 0
    print(f"fedseg-client: site '{cfg.site}' data OK; connecting to {cfg.server} "
          f"(log: {proc.log_path})", flush=True)
    proc.start()
    try:
        while not stopping:
            time.sleep(0.5)
            code = proc.poll()
            if code is None:
                continue
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
    finally:
        proc.stop(timeout=5)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedseg-client", description=__doc__.splitlines()[0])
    p.add_argument("--site", help="site name")
    p.add_argument("--config", help="client.toml")
    p.add_argument("--data", dest="data_dir", help="the site's nnU-Net raw dataset folder")
    p.add_argument("--server", help="SuperLink address host:port")
    p.add_argument("--cache", dest="cache_dir", help="cache folder (preprocessed data, state)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--gpu-memory-gb", type=float)
    p.add_argument("--root-certificates", help="the consortium CA certificate (PEM)")
    p.add_argument("--auth-private-key", help="the site's identity key (PEM)")
    p.add_argument("--identity-key", help="the site's identity key for secure aggregation "
                                          "(default: --auth-private-key)")
    p.add_argument("--roster", help="the consortium roster.json (secure aggregation)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (loopback trials only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("fedseg-client", lambda: run_client(_config_from_args(args)))


if __name__ == "__main__":
    raise SystemExit(main())
