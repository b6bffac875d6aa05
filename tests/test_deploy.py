"""Deployment artefacts (deploy/, docs/deploy.md) against the real code, and the fleet proxy.

No container engine or cluster here, so the Dockerfile, compose file and Kubernetes manifests are
checked for what can drift from the code: every command, entrypoint and argument is parsed by the
REAL parser of the program it names (``fedseg.cli``, ``fedseg.server.cli``, ``fedseg.client.cli``,
``fedseg.runtime.fleet_proxy`` and Flower's own ``flwr`` click app) — a renamed flag fails here;
Flower's telemetry/update-check switches are set everywhere; ports agree between the configs the
containers mount, the proxy's flags, published ports, Services and NetworkPolicies; the paths the
configs reference are mounted (read-only where they are keys), and the compose ``init`` script,
run for real with its volume paths mapped into a temporary folder, puts every referenced file
where the services mount it.

docs/deploy.md's walk-through is run command for command: every ```bash block carries a marker
(``tested``, ``tested: background|server|finished``, ``checked``, ``not tested: why``). The default
test runs the ``tested`` blocks that need no server, checks the configurations they write with the
server's and the site's real security checks, and parses all the other blocks; the ``slow`` test
runs the whole walk-through — ``fedseg-server`` with its defaults (TLS, SuperNode
authentication, the roster's sites registered, the fleet proxy on the public port, a signed
job), three ``fedseg-client`` sites with theirs (CA, identity key, trusted entities, secure
aggregation required), a federated run through the proxy, predict/evaluate — as plain processes
on 127.0.0.1. The only edits made to the documented commands: the public port 9092 and the
SuperLink port 9093 become free ports, ``0.0.0.0`` becomes ``127.0.0.1`` and
``fedseg.example.org:9092`` becomes ``127.0.0.1:<port>`` (the server certificate is issued for
127.0.0.1 too).

The example configurations (``deploy/examples``) name every field of ``ServerConfig`` and
``ClientConfig``, and every field the deploy configs set exists (the models forbid extras).

The fleet proxy is tested with real flower-superlink / flower-supernode processes: a registered
site joins and answers a run THROUGH it, while the Control API (``flwr ls``, ``flwr supernode
register``), the runtime API, ``/docs`` and SuperNode self-registration are refused, and an
unreachable SuperLink gives a quick 502. Every process is stopped in teardown.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import json
import re
import shlex
import ssl
import subprocess
import sys
import time
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fedseg.cli import build_parser as fedseg_parser
from fedseg.client.cli import ClientConfig, load_client_config, with_pki_defaults
from fedseg.client.cli import build_parser as client_parser
from fedseg.client.cli import check_security as client_security
from fedseg.config_io import load_toml
from fedseg.privacy.provision import Roster, provision
from fedseg.privacy.transport import (
    check_identity_key,
    check_server_certificate,
    check_signing_key,
    list_nodes,
    online_node_ids,
    register_sites,
)
from fedseg.runtime import fleet_proxy
from fedseg.runtime.processes import (
    BIN_DIR,
    ManagedProcess,
    flower_env,
    flwr_cli,
    free_port,
    supernode_argv,
    wait_for_port,
    write_flwr_connection,
)
from fedseg.server.cli import build_parser as server_parser
from fedseg.server.cli import check_security as server_security
from fedseg.server.cli import load_server_config
from fedseg.server.config import SERVER_PKI_FILES, ServerConfig

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE_DIR = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
DOCS = REPO / "docs" / "deploy.md"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
FLOWER_VARS = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
PUBLIC_PORT, SUPERLINK_PORT = 9092, 9093
SITES = ("hospitalA", "hospitalB", "hospitalC")
PARSERS = {"fedseg": fedseg_parser, "fedseg-server": server_parser, "fedseg-client": client_parser}
PROXY_MODULE = ["-m", "fedseg.runtime.fleet_proxy"]


# =============================================================================== CLI checks
def _argparse(parser_factory, args: list[str], prog: str):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser_factory().parse_args(args)
    except SystemExit as exc:
        if exc.code == 0:  # --help
            return None
        raise AssertionError(f"'{prog} {shlex.join(args)}' is rejected by {prog}'s parser: "
                             f"{err.getvalue().strip().splitlines()[-1:]}") from None


@functools.cache
def _flwr_click():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # typer vs click 8.3
        import typer
        from flwr.cli.app import app

        return typer.main.get_command(app)


def _flwr_parse(args: list[str]) -> dict:
    """Parse ``flwr ARGS`` with Flower's own click app (no command is run)."""
    import click

    cmd = _flwr_click()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # click's protected_args
        try:
            ctx = cmd.make_context("flwr", list(args))
            rest = [*ctx.protected_args, *ctx.args]
            while isinstance(cmd, click.Group) and rest:
                name, sub, rest = cmd.resolve_command(ctx, rest)
                ctx = sub.make_context(name, rest, parent=ctx)
                cmd = sub
                rest = [*getattr(ctx, "protected_args", []), *ctx.args]
        except click.ClickException as exc:
            raise AssertionError(f"'flwr {shlex.join(args)}' is rejected by flwr: "
                                 f"{exc.format_message()}") from None
    return {"command": cmd.name, **ctx.params}


def check_invocation(argv: list[str]):
    """Parse ``argv`` with the real parser of the program it starts; returns (prog, parsed)."""
    prog = Path(argv[0]).name
    if prog in PARSERS:
        assert prog in SCRIPTS, f"{prog} is not a console script in pyproject.toml"
        return prog, _argparse(PARSERS[prog], argv[1:], prog)
    if prog.startswith("python") and argv[1:3] == PROXY_MODULE:
        return "fleet_proxy", _argparse(fleet_proxy.build_parser, argv[3:], "fleet_proxy")
    if prog == "flwr":
        return "flwr", _flwr_parse(argv[1:])
    raise AssertionError(f"{shlex.join(argv)}: starts neither a fedseg console script "
                         f"({', '.join(SCRIPTS)}), the fleet proxy, nor flwr")


# ------------------------------------------------------------------------- shell scripts
_KNOWN = {"fedseg", "fedseg-server", "fedseg-client", "flwr", "python", "python3"}
_KEYWORDS = {"if", "then", "else", "elif", "do", "!", "{", "while", "until", "exec"}
_SEPARATORS = {";", "&&", "||", "|", "&", ";;", "(", ")", "$("}
_HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")


def shell_invocations(script: str) -> list[list[str]]:
    """Every fedseg/flwr/fleet-proxy command line in a (simple) shell script, with loop
    variables replaced by their first value and heredoc bodies skipped."""
    lines = script.splitlines()
    values: dict[str, str] = {"PWD": "/work", "HOME": "/home/fedseg"}
    out: list[list[str]] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        m = _HEREDOC.search(line)
        if m:  # skip the body up to its delimiter
            while i < len(lines) and lines[i].strip() != m.group(1):
                i += 1
            i += 1
            line = line[: m.start()]
        if not line or line.startswith("#"):
            continue
        loop = re.match(r"for\s+(\w+)\s+in\s+(\S+)", line)
        if loop:
            values[loop.group(1)] = loop.group(2).rstrip(";")
        line = re.sub(r"\$\{?(\w+)\}?", lambda v: values.get(v.group(1), "X"), line)
        try:
            lex = shlex.shlex(line, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            tokens = list(lex)
        except ValueError:
            assert not re.search(r"\b(fedseg|flwr)\b", line), f"cannot parse: {line}"
            continue
        seg: list[str] = []
        for tok in [*tokens, ";"]:
            if tok in _SEPARATORS or tok.endswith("$("):
                _take(seg, out)
                seg = []
            else:
                seg.append(tok)
    return out


def _take(seg: list[str], out: list[list[str]]) -> None:
    while seg and (seg[0] in _KEYWORDS or re.match(r"^\w+=", seg[0])):
        seg.pop(0)
    if not seg or Path(seg[0]).name not in _KNOWN:
        return
    argv: list[str] = []
    for j, tok in enumerate(seg):
        if re.match(r"^\d*[<>]", tok) or tok in (">&", "<&"):
            break
        if tok.isdigit() and j + 1 < len(seg) and seg[j + 1].startswith((">", "<")):
            break
        argv.append(tok)
    if Path(argv[0]).name.startswith("python") and argv[1:3] != PROXY_MODULE:
        return  # python -c healthchecks and the like
    out.append(argv)


def test_shell_invocations_helper() -> None:
    script = ("for s in hospitalA hospitalB; do\n"
              "  FLWR_HOME=/x flwr supernode register /p/$s.pub local --name $s > /tmp/o 2>&1 || true\n"
              "done\ncat > f <<'EOF'\nfedseg bogus --flag\nEOF\n"
              "if [ -f x ]; then fedseg check-data /data/a; fi\n"
              'out=$(flwr supernode ls local --format json 2>&1 || true)\n')
    got = shell_invocations(script)
    assert got == [["flwr", "supernode", "register", "/p/hospitalA.pub", "local", "--name",
                    "hospitalA"], ["fedseg", "check-data", "/data/a"],
                   ["flwr", "supernode", "ls", "local", "--format", "json"]], got
    for argv in got:
        check_invocation(argv)
    with pytest.raises(AssertionError, match="rejected"):
        check_invocation(["fedseg-client", "--config", "c.toml", "--sitename", "x"])
    with pytest.raises(AssertionError, match="rejected"):
        check_invocation(["flwr", "supernode", "register", "k.pub", "--nam", "x"])
    with pytest.raises(AssertionError, match="neither"):
        check_invocation(["flower-supernode", "--insecure"])


# =============================================================================== Dockerfile
@dataclass
class Stage:
    name: str
    base: str
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    user: str | None = None
    healthcheck: str | None = None
    volumes: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    text: str = ""


def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name), with what a stage inherits from its base stage."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    cur: Stage | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG" and cur is None:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        elif instr == "FROM":
            m = re.match(r"(\S+)\s+AS\s+(\S+)", rest, re.I)
            assert m, line
            base, name = m.groups()
            parent = stages.get(base)
            cur = Stage(name, base)
            if parent:
                cur.entrypoint, cur.cmd, cur.user = parent.entrypoint, parent.cmd, parent.user
                cur.healthcheck, cur.volumes = parent.healthcheck, parent.volumes
                cur.env = dict(parent.env or {})
            else:
                cur.env = {}
            stages[name] = cur
        elif cur is not None:
            cur.text += line + "\n"
            if instr == "ENTRYPOINT":
                cur.entrypoint = json.loads(rest)
            elif instr == "CMD":
                cur.cmd = json.loads(rest)
            elif instr == "USER":
                cur.user = rest
            elif instr == "HEALTHCHECK":
                cur.healthcheck = rest
            elif instr == "VOLUME":
                cur.volumes = (*cur.volumes, *json.loads(rest))
            elif instr == "ENV":
                for k, v in re.findall(r"(\w+)=(\S+)", rest):
                    cur.env[k] = v  # type: ignore[index]
    return args, stages


def _pin(name: str) -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.search(r"(?:==|<=)\s*([\w.]+)", dep)
        if re.match(rf"{name}\b", dep) and m:
            return m.group(1)
    raise AssertionError(f"no pin for {name} in pyproject.toml")


def test_dockerfile_entrypoints_pins_user_health_volumes() -> None:
    args, stages = dockerfile()
    assert args["FLWR_VERSION"] == _pin("flwr") == "1.42.0"
    assert args["TORCH_VERSION"] == _pin("torch")  # the upper bound fedseg is tested with
    assert "download.pytorch.org/whl/cpu" in args["TORCH_CPU_INDEX"]
    assert re.search(r"download\.pytorch\.org/whl/cu\d+$", args["TORCH_CUDA_INDEX"])
    want = {"server": "fedseg-server", "site": "fedseg-client", "tools": "fedseg"}
    for name, script in want.items():
        st = stages[name]
        assert st.entrypoint == [script] and script in SCRIPTS, (name, st.entrypoint)
        check_invocation([*st.entrypoint, *(st.cmd or [])])
        assert st.user and st.user.split(":")[0] not in ("0", "root"), (name, st.user)
        assert st.user.split(":")[0].isdigit()  # numeric: Kubernetes runAsNonRoot can verify it
        for k, v in FLOWER_VARS.items():
            assert st.env.get(k) == v, (name, k)  # type: ignore[union-attr]
        assert "/opt/fedseg/bin" in st.env["PATH"]  # type: ignore[index]  # flower-superexec
    assert stages["server"].healthcheck and "CMD" in stages["server"].healthcheck
    assert stages["site"].healthcheck and "CMD" in stages["site"].healthcheck
    assert stages["tools"].healthcheck == "NONE"
    assert {"/data", "/cache"} <= set(stages["site"].volumes)
    assert "/state" in stages["server"].volumes
    # server = CPU torch, site = CUDA torch; fedseg installed with the exact flwr pin
    assert "COPY --from=fedseg-cpu" in stages["server"].text
    assert "COPY --from=fedseg-cuda" in stages["site"].text
    for st in ("fedseg-cpu", "fedseg-cuda"):
        assert '"flwr==${FLWR_VERSION}"' in stages[st].text
    assert 'TORCH_CUDA_INDEX}"' in stages["torch-cuda"].text
    assert 'TORCH_CPU_INDEX}"' in stages["torch-cpu"].text
    # no key material in the image: the build context admits only code
    ignore = [ln.strip() for ln in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text()
              .splitlines() if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*" and {"!pyproject.toml", "!README.md", "!fedseg/"} <= set(ignore)
    for src in re.findall(r"^COPY (?!--from)(.+) /src/", DOCKERFILE.read_text(), re.M):
        for p in src.split():
            assert (REPO / p).exists() and (f"!{p}" in ignore or f"!{p}/" in ignore), p


# =============================================================================== compose
def compose() -> dict:
    return yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())


def _image_target(image: str, services: dict | None = None) -> str:
    for svc in (services or {}).values():
        if svc.get("image") == image and isinstance(svc.get("build"), dict):
            return svc["build"]["target"]
    m = re.match(r"(?:.*/)?fedseg-(server|site|tools)(?::.*)?$", image)
    assert m, f"image {image}: not one of the fedseg images"
    return m.group(1)


def _compose_argvs(name: str, svc: dict, services: dict) -> list[list[str]]:
    stages = dockerfile()[1]
    st = stages[_image_target(svc["image"], services)]
    entry = svc.get("entrypoint", st.entrypoint)
    cmd = svc.get("command", st.cmd if "entrypoint" not in svc else [])
    entry = [entry] if isinstance(entry, str) else list(entry)
    cmd = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    if entry[0] == "/bin/sh":
        assert entry[1:] == ["-ec"] and len(cmd) == 1, name
        invocations = shell_invocations(cmd[0].replace("$$", "$"))
        assert invocations, f"{name}: its script runs no fedseg/flwr command"
        return invocations
    return [[*entry, *cmd]]


def test_compose_parses_and_every_command_is_real() -> None:
    c = compose()
    services = c["services"]
    # fedseg-server runs the fleet proxy and registers the sites itself: no extra services
    assert set(services) == {"init", "server", *SITES}
    seen: dict[str, list] = {}
    for name, svc in services.items():
        for argv in _compose_argvs(name, svc, services):
            prog, ns = check_invocation(argv)
            seen.setdefault(name, []).append((prog, ns))
    init_cmds = {ns.cmd for prog, ns in seen["init"] if prog == "fedseg"}
    assert {"provision", "demo-data", "check-data"} <= init_cmds
    assert seen["server"][0][0] == "fedseg-server" and seen["server"][0][1].cmd == "start"
    for s in SITES:
        (prog, ns), = seen[s]
        assert prog == "fedseg-client" and ns.site == s and ns.config
    # the GPU override parses and only adds device reservations to the sites
    gpu = yaml.safe_load((COMPOSE_DIR / "compose.gpu.yaml").read_text())
    assert set(gpu["services"]) == set(SITES)
    for svc in gpu["services"].values():
        dev, = svc["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]


def test_compose_sets_flower_env_everywhere() -> None:
    for name, svc in compose()["services"].items():
        env = svc.get("environment", {})
        assert isinstance(env, dict), name
        for k, v in FLOWER_VARS.items():
            assert str(env.get(k)) == v, (name, k, env.get(k))


def _server_cfg(path: Path) -> ServerConfig:
    return load_toml(path, ServerConfig)


def _pki_files(srv: ServerConfig) -> dict[str, str]:
    """Field -> the file the server's security reads (its override, else the pki folder's;
    ``app_signing_key`` included: the deploy configs sign their jobs)."""
    assert srv.pki, "the deploy configs take their security files from pki"
    return {f: getattr(srv, f) or str(Path(srv.pki) / name) for f, name in SERVER_PKI_FILES.items()}


def test_compose_ports_match_configs() -> None:
    c = compose()
    services = c["services"]
    srv = _server_cfg(COMPOSE_DIR / "server.toml")
    cli = load_toml(COMPOSE_DIR / "client.toml", ClientConfig)
    # the fleet proxy on the public port; the SuperLink on loopback (fedseg-server binds it there)
    assert (srv.host, srv.port, srv.superlink_port) == ("0.0.0.0", PUBLIC_PORT, SUPERLINK_PORT)
    assert not srv.insecure and srv.pki == "/pki"
    published = {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}
    assert published == {"server": [f"{PUBLIC_PORT}:{PUBLIC_PORT}"]}, published
    host, port = cli.server.rsplit(":", 1)
    assert host == "server" and int(port) == srv.port
    assert not cli.insecure and cli.pki == "/keys"
    assert cli.require_secure_aggregation and cli.require_signed_apps
    # the server certificate covers the name the sites use and the SuperLink's loopback address
    init = services["init"]["command"][0]
    prov = next(a for a in shell_invocations(init) if a[1] == "provision")
    sans = check_invocation(prov)[1].server_san.split(",")
    assert host in sans and "127.0.0.1" in sans
    assert cli.runtime_port == 9094  # the site image's HEALTHCHECK port
    assert dockerfile()[1]["site"].env["FEDSEG_HEALTH_PORT"] == str(cli.runtime_port)  # type: ignore[index]
    assert dockerfile()[1]["server"].env["FEDSEG_HEALTH_PORT"] == str(srv.superlink_port)  # type: ignore[index]
    for s in SITES:  # the sites wait for the server's health check (its SuperLink is up)
        assert services[s]["depends_on"]["server"]["condition"] == "service_healthy"


def _mounts(svc: dict) -> dict[str, dict]:
    """target -> {source, read_only, subpath, type}."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            src, tgt = parts[0], parts[1]
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
            out[tgt] = {"source": src, "read_only": ro, "subpath": None,
                        "type": "bind" if src.startswith((".", "/")) else "volume"}
        else:
            out[v["target"]] = {"source": v["source"], "read_only": bool(v.get("read_only")),
                                "subpath": (v.get("volume") or {}).get("subpath"),
                                "type": v.get("type", "volume")}
    return out


def _mounted(mounts: dict[str, dict], path: str) -> tuple[str, dict]:
    best = max((t for t in mounts if path == t or path.startswith(t.rstrip("/") + "/")),
               key=len, default=None)
    assert best is not None, f"{path}: not inside any mount ({sorted(mounts)})"
    return best, mounts[best]


def test_compose_mounts_match_configs_and_init_fills_them(tmp_path: Path) -> None:
    """Run the init service's script for real (volumes mapped into tmp_path), then check that
    every file a service's config references exists where that service mounts it."""
    c = compose()
    services = c["services"]
    init = services["init"]
    roots = {tgt: tmp_path / "vol" / m["source"] for tgt, m in _mounts(init).items()}
    for p in roots.values():
        p.mkdir(parents=True)
    script = init["command"][0].replace("$$", "$")
    for tgt, real in roots.items():
        script = re.sub(rf"(?<![\w/]){re.escape(tgt)}(?=/|\s|$)", str(real), script)
    res = subprocess.run(["bash", "-ec", script], capture_output=True, text=True, timeout=300,
                         env=_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    def host_path(svc: dict, path: str) -> Path:
        tgt, m = _mounted(_mounts(svc), path)
        rel = path[len(tgt):].lstrip("/")
        if m["type"] == "bind":
            return (COMPOSE_DIR / m["source"]).resolve() / rel
        base = tmp_path / "vol" / m["source"]
        return base / (m["subpath"] or "") / rel

    srv_svc = services["server"]
    cfg_path = host_path(srv_svc, "/etc/fedseg/server.toml")
    assert cfg_path.is_file() and _mounts(srv_svc)["/etc/fedseg/server.toml"]["read_only"]
    srv = _server_cfg(cfg_path)
    for f in _pki_files(srv).values():  # everything the server's security takes from pki
        assert host_path(srv_svc, f).is_file(), f
        assert _mounted(_mounts(srv_svc), f)[1]["read_only"], f
    state_mount, m = _mounted(_mounts(srv_svc), srv.state_dir)
    assert m["type"] == "volume" and not m["read_only"]
    assert _mounted(_mounts(srv_svc), srv.job.run_dir)[0] == state_mount  # persisted together
    pki = host_path(srv_svc, srv.pki)  # type: ignore[arg-type]
    assert sorted(p.name for p in pki.iterdir()) == sorted(SERVER_PKI_FILES.values())  # no ca.key
    roster = Roster.model_validate_json(
        (tmp_path / "vol" / "consortium" / "pki" / "roster.json").read_text())
    check_server_certificate(pki / "server.pem", pki / "ca.pem")
    check_signing_key(roster, pki / "app-signing.key")
    for s in SITES:
        svc = services[s]
        argv = _compose_argvs(s, svc, services)[0]
        ns = check_invocation(argv)[1]
        cfg = with_pki_defaults(load_toml(host_path(svc, ns.config), ClientConfig)
                                .model_copy(update={"site": ns.site}))
        data = host_path(svc, cfg.data_dir)
        assert (data / "dataset.json").is_file(), data
        assert _mounted(_mounts(svc), cfg.data_dir)[1]["read_only"]
        for f in (cfg.root_certificates, cfg.auth_private_key, cfg.roster):
            assert host_path(svc, f).is_file(), f  # type: ignore[arg-type]
            assert _mounted(_mounts(svc), f)[1]["read_only"], f  # type: ignore[arg-type]
        # each site mounts ITS OWN key and nobody else's
        check_identity_key(roster, s, host_path(svc, cfg.auth_private_key))  # type: ignore[arg-type]
        keys_dir = host_path(svc, cfg.pki)  # type: ignore[arg-type]
        assert sorted(p.name for p in keys_dir.iterdir()) == ["ca.pem", "identity.key", "roster.json"]
        assert not _mounted(_mounts(svc), cfg.cache_dir)[1]["read_only"]
        # the site's real start-up checks (key vs roster, CA vs roster) pass on these files
        local = cfg.model_copy(update={"pki": str(keys_dir), "root_certificates": None,
                                       "auth_private_key": None, "roster": None})
        client_security(local, f"compose {s}")
    # a second run of init (docker compose up again) keeps the keys and succeeds
    before = (tmp_path / "vol" / "consortium" / "pki" / "ca.pem").read_bytes()
    res = subprocess.run(["bash", "-ec", script], capture_output=True, text=True, timeout=300,
                         env=_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "vol" / "consortium" / "pki" / "ca.pem").read_bytes() == before


def test_example_configs_name_every_field() -> None:
    """deploy/examples documents every option of server.toml and client.toml (set or commented
    out), and nothing the code does not accept (the loaders forbid unknown fields)."""
    from fedseg.client.cli import load_client_config as load_client

    for path, model in ((DEPLOY / "examples" / "server.toml", ServerConfig),
                        (DEPLOY / "examples" / "client.toml", ClientConfig)):
        text = path.read_text()
        for name in model.model_fields:
            if name != "job":
                assert re.search(rf"^#?\s*{name}\s*=", text, re.M), f"{path.name}: {name} missing"
        job = ServerConfig.model_fields["job"].annotation
        known = set(model.model_fields) | set(job.model_fields)  # type: ignore[union-attr]
        for sub in ("aggregation", "dp", "robust"):  # [job.aggregation], [job.dp], [job.robust]
            known |= set(job.model_fields[sub].annotation.model_fields)  # type: ignore[union-attr]
        commented = re.findall(r"^#\s*(\w+)\s*=\s*(.+?)\s*(?:#.*)?$", text, re.M)
        for name, _ in commented:  # a commented-out option is a real one too
            assert name in known, f"{path.name}: '{name}' is not an option"
    load_server_config(DEPLOY / "examples" / "server.toml")
    load_client(DEPLOY / "examples" / "client.toml")


# =============================================================================== kubernetes
def k8s_docs(folder: Path) -> list[dict]:
    docs: list[dict] = []
    for f in sorted(folder.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def _kustomize(folder: Path) -> tuple[list[dict], dict]:
    """The resources a kustomization pulls in (recursively), and its generated ConfigMaps."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert k["kind"] == "Kustomization" and k.get("namespace") == "fedseg"
    resources: list[dict] = []
    generated: dict[str, dict[str, str]] = {}
    for r in k.get("resources", []):
        p = (folder / r).resolve()
        assert p.exists(), f"{folder}/kustomization.yaml: {r} missing"
        if p.is_dir():
            sub, gen = _kustomize(p)
            resources += sub
            generated.update(gen)
        else:
            resources += [d for d in yaml.safe_load_all(p.read_text()) if d]
    for g in k.get("configMapGenerator", []):
        files = {}
        for f in g.get("files", []):
            assert (folder / f).is_file(), f
            files[f] = (folder / f).read_text()
        generated[g["name"]] = files
    for img in k.get("images", []):
        assert re.match(r"fedseg-(server|site)$", img["name"]), img
    return resources, generated


def _containers(resources: list[dict]) -> list[tuple[dict, dict]]:
    out = []
    for d in resources:
        if d["kind"] in ("StatefulSet", "Deployment", "Job"):
            spec = d["spec"]["template"]["spec"]
            out += [(d, c) for c in spec.get("initContainers", []) + spec["containers"]]
    return out


def _k8s_argvs(c: dict) -> list[list[str]]:
    st = dockerfile()[1][_image_target(c["image"])]
    entry = c.get("command", st.entrypoint)
    args = c.get("args", st.cmd if "command" not in c else [])
    if entry[0] == "/bin/sh":
        assert entry[1:] == ["-c"] and len(args) == 1
        return shell_invocations(args[0])
    return [[*entry, *args]]


def test_k8s_manifests_parse_and_commands_are_real() -> None:
    for overlay in ("server", "site"):
        resources, generated = _kustomize(K8S / "overlays" / overlay)
        kinds = {d["kind"] for d in resources}
        assert {"Namespace", "NetworkPolicy"} <= kinds
        for d, c in _containers(resources):
            invocations = _k8s_argvs(c)
            assert invocations, c["name"]
            for argv in invocations:
                check_invocation(argv)
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            for k, v in FLOWER_VARS.items():
                assert env.get(k) == v, (overlay, c["name"], k)
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            pod = d["spec"]["template"]["spec"]["securityContext"]
            assert pod["runAsNonRoot"] and pod["runAsUser"] != 0
        assert generated, overlay


def _volume_of(pod: dict, container: dict, path: str) -> tuple[dict, dict]:
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    best = max((t for t in mounts if path == t or path.startswith(t.rstrip("/") + "/")),
               key=len, default=None)
    assert best is not None, f"{container['name']}: {path} is not mounted"
    m = mounts[best]
    vols = {v["name"]: v for v in pod["volumes"]}
    return m, vols.get(m["name"], {"name": m["name"], "claimTemplate": True})


def test_k8s_server_statefulset_service_networkpolicy() -> None:
    resources, generated = _kustomize(K8S / "overlays" / "server")
    sts = next(d for d in resources if d["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert sts["spec"]["replicas"] == 1
    srv_cfg_text = generated["fedseg-server-config"]["server.toml"]
    srv = ServerConfig.model_validate(tomllib.loads(srv_cfg_text))
    assert (srv.host, srv.port, srv.superlink_port) == ("0.0.0.0", PUBLIC_PORT, SUPERLINK_PORT)
    assert not srv.insecure and srv.pki
    # fedseg-server runs the proxy and registers the sites itself: one container
    assert set(containers) == {"server"}
    server = containers["server"]
    ns = check_invocation(_k8s_argvs(server)[0])[1]
    cfg_mount, cfg_vol = _volume_of(pod, server, ns.config)
    assert cfg_vol["configMap"]["name"] == "fedseg-server-config"
    assert Path(ns.config).name in generated["fedseg-server-config"]
    # state DB and run folders on the PVC from the volumeClaimTemplate
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    for p in (srv.state_dir, srv.job.run_dir):
        m, v = _volume_of(pod, server, p)
        assert v.get("claimTemplate") and m["name"] in claims, p
    # every pki file from the Secret, read-only; key names = the file names the config uses
    keys = set()
    for f in _pki_files(srv).values():
        m, v = _volume_of(pod, server, f)
        assert m.get("readOnly") and v["secret"]["secretName"] == "fedseg-server-tls", f
        keys.add(f[len(m["mountPath"]):].lstrip("/"))
    assert keys == set(SERVER_PKI_FILES.values())
    docs = DOCS.read_text()
    for key in keys:  # the documented 'kubectl create secret' makes exactly these keys
        assert re.search(rf"create secret generic fedseg-server-tls.*--from-file={re.escape(key)}=",
                         docs), key
    assert "fedseg-site-keys" not in docs
    ports = {p["name"]: p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
    assert ports == {"fleet": srv.port}  # nothing but the fleet proxy's port
    assert str(srv.superlink_port) in server["livenessProbe"]["exec"]["command"][-1]
    assert server["readinessProbe"]["tcpSocket"]["port"] == "fleet"
    svc = next(d for d in resources if d["kind"] == "Service")
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(PUBLIC_PORT, "fleet")]
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    netpol = next(d for d in resources if d["kind"] == "NetworkPolicy")
    assert netpol["spec"]["podSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    ingress_ports = [p for rule in netpol["spec"]["ingress"] for p in rule["ports"]]
    assert ingress_ports == [{"protocol": "TCP", "port": PUBLIC_PORT}]
    _dns_only(netpol["spec"]["egress"])


def _dns_only(rules: list[dict]) -> None:
    for rule in rules:
        assert {p["port"] for p in rule["ports"]} == {53}, rule
        assert rule["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}


def test_k8s_site_deployment_gpu_secrets_networkpolicy() -> None:
    resources, generated = _kustomize(K8S / "overlays" / "site")
    dep = next(d for d in resources if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (site,) = pod["containers"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert site["resources"]["limits"]["nvidia.com/gpu"] == 1
    ns = check_invocation(_k8s_argvs(site)[0])[1]
    _, cfg_vol = _volume_of(pod, site, ns.config)
    assert cfg_vol["configMap"]["name"] == "fedseg-client-config"
    given = ClientConfig.model_validate(tomllib.loads(generated["fedseg-client-config"]["client.toml"]))
    assert given.site and given.pki and not given.insecure
    assert given.require_secure_aggregation and given.require_signed_apps
    cfg = with_pki_defaults(given)
    m, v = _volume_of(pod, site, cfg.data_dir)
    assert m.get("readOnly") and v["persistentVolumeClaim"]["readOnly"]
    assert v["persistentVolumeClaim"]["claimName"] == "fedseg-site-data"
    m, v = _volume_of(pod, site, cfg.cache_dir)
    pvcs = {d["metadata"]["name"] for d in resources if d["kind"] == "PersistentVolumeClaim"}
    assert v["persistentVolumeClaim"]["claimName"] in pvcs and not m.get("readOnly")
    secrets, maps = {}, {}
    for f in (cfg.root_certificates, cfg.auth_private_key, cfg.roster):
        m, v = _volume_of(pod, site, f)  # type: ignore[arg-type]
        assert m.get("readOnly"), f
        rel = f[len(m["mountPath"]):].lstrip("/")  # type: ignore[index]
        for src in v["projected"]["sources"]:
            for kind, found in (("secret", secrets), ("configMap", maps)):
                for item in src.get(kind, {}).get("items", []):
                    if item["path"] == rel:
                        assert not src[kind].get("optional"), src  # the site needs all three
                        found[src[kind]["name"]] = item["key"]
    assert secrets == {"fedseg-ca": "ca.pem", "fedseg-site-identity": "identity.key"}
    assert maps == {"fedseg-roster": "roster.json"}
    # the documented 'kubectl create secret' commands create exactly these names and keys
    docs = DOCS.read_text()
    for name, key in secrets.items():
        assert re.search(rf"create secret generic {name} --from-file={re.escape(key)}=", docs)
    assert re.search(r"create configmap fedseg-roster --from-file=roster\.json=", docs)
    # network: nothing in, out only to the server's fleet port (+ DNS)
    netpol = next(d for d in resources if d["kind"] == "NetworkPolicy")
    assert netpol["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert set(netpol["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert netpol["spec"]["ingress"] == []
    server_rules = [r for r in netpol["spec"]["egress"] if "ipBlock" in r["to"][0]]
    assert len(server_rules) == 1
    assert server_rules[0]["ports"] == [{"protocol": "TCP", "port": int(cfg.server.rsplit(":", 1)[1])}]
    assert int(cfg.server.rsplit(":", 1)[1]) == PUBLIC_PORT
    _dns_only([r for r in netpol["spec"]["egress"] if r not in server_rules])
    assert not any(c.get("ports") for c in pod["containers"])  # a site listens on nothing
    probe = site["livenessProbe"]["exec"]["command"]
    assert str(cfg.runtime_port) in probe[-1] and "127.0.0.1" in probe[-1]


# =============================================================================== docs
@dataclass
class Block:
    kind: str  # run | background | server | finished | checked | untested
    text: str
    line: int


def doc_blocks() -> list[Block]:
    text = DOCS.read_text()
    fences = [m.start() for m in re.finditer(r"^\s*```bash\s*$", text, re.M)]
    blocks = []
    pat = re.compile(r"<!--\s*(tested(?::\s*(\w+))?|checked|not tested:[^>]*)\s*-->\s*\n"
                     r"\s*```bash\s*\n(.*?)^\s*```", re.S | re.M)
    for m in pat.finditer(text):
        marker, sub, body = m.groups()
        kind = ("run" if marker == "tested" else sub if marker.startswith("tested")
                else "checked" if marker == "checked" else "untested")
        assert kind in ("run", "background", "server", "finished", "checked", "untested",
                        "variables", "onemachine"), marker  # the last two: test_deploy_one_machine
        blocks.append(Block(kind, body, text.count("\n", 0, m.start()) + 1))
    assert len(blocks) == len(fences), "every ```bash block in docs/deploy.md needs a marker"
    return blocks


def _substitute(text: str, public: int, superlink: int) -> str:
    text = text.replace(f"0.0.0.0:{PUBLIC_PORT}", f"127.0.0.1:{public}")
    text = text.replace('host = "0.0.0.0"', 'host = "127.0.0.1"')
    text = text.replace(f"fedseg.example.org:{PUBLIC_PORT}", f"127.0.0.1:{public}")
    text = re.sub(rf"\b{SUPERLINK_PORT}\b", str(superlink), text)
    return re.sub(rf"\b{PUBLIC_PORT}\b", str(public), text)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = flower_env(None, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(extra or {})})
    env.pop("FLWR_HOME", None)
    return env


def _bash(block: Block, cwd: Path, public: int, superlink: int, timeout: float = 300) -> str:
    script = _substitute(block.text, public, superlink)
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=_env(),
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (f"docs/deploy.md line {block.line}:\n{script}\n"
                                 f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def _background_argvs(block: Block, public: int = PUBLIC_PORT,
                      superlink: int = SUPERLINK_PORT) -> list[list[str]]:
    return [shlex.split(line) for line in _substitute(block.text, public, superlink).splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_docs_every_block_is_marked_and_every_command_parses() -> None:
    blocks = doc_blocks()
    kinds = [b.kind for b in blocks]
    for kind in ("run", "background", "server", "finished", "checked", "untested"):
        assert kind in kinds, kind
    for b in blocks:
        if b.kind == "variables":  # what a reader sets (test_deploy_one_machine.py checks it)
            continue
        if b.kind == "untested":
            for path in re.findall(r"(deploy/\S+)", b.text):
                assert (REPO / path).exists(), f"line {b.line}: {path} does not exist"
            for m in re.finditer(r"--target (\w+)", b.text):
                assert m.group(1) in dockerfile()[1], m.group(1)
            continue
        argvs = _background_argvs(b) if b.kind == "background" else shell_invocations(b.text)
        assert argvs or _HEREDOC.search(b.text), f"line {b.line}: no command found"
        for argv in argvs:
            check_invocation(argv)


def test_docs_walkthrough_without_server(tmp_path: Path) -> None:
    """Every ``tested`` block that needs no running server, executed in order; then the files it
    wrote are the configs the background commands use, and they pass the server's and the
    sites' real start-up security checks (certificate, CA, roster, keys, signing key)."""
    public, superlink = free_port(), free_port()
    blocks = doc_blocks()
    for b in blocks:
        if b.kind == "run":
            _bash(b, tmp_path, public, superlink)
    roster = Roster.model_validate_json((tmp_path / "pki" / "roster.json").read_text())
    assert set(roster.sites) == set(SITES)
    background = [b for b in blocks if b.kind == "background"]
    (server_cmd,) = _background_argvs(background[0], public, superlink)
    ns = check_invocation(server_cmd)[1]
    srv = load_server_config(tmp_path / ns.config)
    assert (srv.host, srv.port, srv.superlink_port) == ("127.0.0.1", public, superlink)
    assert srv.pki and not srv.insecure
    resolved, sec = server_security(srv, ns.config)
    assert sec.ssl is not None and sec.signing is not None and sec.roster == roster
    for field in SERVER_PKI_FILES:
        assert Path(getattr(resolved, field)).is_file(), field
    sites = [check_invocation(a)[1] for a in _background_argvs(background[1], public, superlink)]
    assert len(sites) == 3
    for ns in sites:
        cfg = load_client_config(tmp_path / ns.config)
        assert cfg.server == f"127.0.0.1:{public}"
        assert (tmp_path / cfg.data_dir / "dataset.json").is_file()
        checked = client_security(cfg, ns.config, tmp_path / "cache" / cfg.site)
        check_identity_key(roster, cfg.site, checked.auth_private_key)  # type: ignore[arg-type]
        assert Path(checked.auth_private_key).parent.name == cfg.site  # type: ignore[arg-type]
        assert (Path(checked.root_certificates).read_bytes()  # type: ignore[arg-type]
                == (tmp_path / "pki" / "ca.pem").read_bytes())
        trusted = yaml.safe_load(Path(checked.trusted_entities).read_text())  # type: ignore[arg-type]
        assert trusted == {roster.app_signing.key_id: roster.app_signing.public_key}


def _stop(procs: list[ManagedProcess]) -> None:
    try:
        from fedseg.runtime.processes import stop_all
    except ImportError:  # pragma: no cover - older processes.py
        for p in procs:
            p.stop(timeout=5)
        return
    stop_all(procs, timeout=10)


@pytest.mark.slow
def test_docs_walkthrough_federation(tmp_path: Path) -> None:
    """The whole walk-through: server, proxy, registration, three sites through the proxy, a
    federated run to the end, then the status/predict/evaluate blocks."""
    public, superlink = free_port(), free_port()
    procs: list[ManagedProcess] = []
    server: ManagedProcess | None = None
    finished = False
    try:
        for b in doc_blocks():
            if b.kind == "run":
                _bash(b, tmp_path, public, superlink)
            elif b.kind == "background":
                for argv in _background_argvs(b, public, superlink):
                    name = Path(argv[0]).name + "-" + Path(argv[-1]).stem
                    p = ManagedProcess(name, argv, tmp_path / "logs" / f"{name}.log", _env(),
                                       cwd=tmp_path).start()
                    procs.append(p)
                    if argv[0] == "fedseg-server":
                        server = p
            elif b.kind == "server":
                assert server is not None
                wait_for_port("127.0.0.1", superlink, 120, server)
                wait_for_port("127.0.0.1", public, 60)
                out = _bash(b, tmp_path, public, superlink)
                assert out.count("registered") >= 1 or "node" in out.lower(), out
            elif b.kind == "finished":
                if not finished:
                    _wait_finished(tmp_path / "runs" / "trial", server, procs, timeout=1500)
                    finished = True
                _bash(b, tmp_path, public, superlink, timeout=600)
        assert finished
        assert server is not None and server.proc is not None
        assert server.proc.wait(timeout=120) == 0, server.log_path.read_text()[-3000:]
        metrics = tmp_path / "runs" / "trial" / "metrics.jsonl"
        recs = [json.loads(x) for x in metrics.read_text().splitlines()]
        train = [r for r in recs if r["phase"] == "train" and r["site"] != "pooled"]
        assert {r["site"] for r in train} == set(SITES) and all(r["status"] == "ok" for r in train)
        assert all("loss" not in r and "cases" not in r for r in train)  # secure aggregation
        scores = json.loads((tmp_path / "pred" / "siteA-metrics.json").read_text())
        assert "mean" in scores
        logs = tmp_path / "server-state" / "logs"
        proxy_log = (logs / "fleet-proxy.log").read_text() if (logs / "fleet-proxy.log").exists() else ""
        assert "refused" not in proxy_log, proxy_log[-2000:]  # the sites used only Fleet routes
        registered = json.loads((tmp_path / "server-state" / "node_ids.json").read_text())
        assert set(registered) == set(SITES)
        out = server.log_path.read_text()
        assert "TLS, SuperNode authentication" in out and "job signed" in out, out[-2000:]
        for s in SITES:  # each site ran the signed job with its defaults
            client_out = next(p for p in procs if p.name.endswith(s)).log_path.read_text()
            assert "signed apps only, secure aggregation required" in client_out, client_out
    finally:
        _stop(procs)


def _wait_finished(run_dir: Path, server: ManagedProcess | None, procs: list[ManagedProcess],
                   timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = {}
        with contextlib.suppress(OSError, json.JSONDecodeError):
            st = json.loads((run_dir / "status.json").read_text())
        if st.get("state") == "finished":
            return
        if server is not None and server.poll() is not None:
            pytest.fail(f"fedseg-server exited ({server.poll()}): {st}\n"
                        + server.log_path.read_text()[-3000:])
        for p in procs:
            if p.poll() is not None and p is not server:
                pytest.fail(f"{p.name} exited ({p.poll()}):\n{p.log_path.read_text()[-3000:]}")
        time.sleep(2)
    logs = "\n".join(f"== {p.name}\n{p.log_path.read_text()[-1500:]}" for p in procs)
    pytest.fail(f"the walk-through's job did not finish in {timeout} s: {st}\n{logs}")


# =============================================================================== fleet proxy
APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "proxyapp"
version = "1.0.0"
description = "fedseg fleet-proxy test app"
dependencies = []

[tool.flwr.app]
publisher = "fedsegtest"

[tool.flwr.app.components]
serverapp = "proxyapp.server:app"
clientapp = "proxyapp.client:app"

[tool.flwr.app.config]
timeout = 40.0
"""

APP_SERVER = '''import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    timeout = float(context.run_config["timeout"])
    deadline = time.time() + timeout
    nodes = list(grid.get_node_ids())
    while not nodes and time.time() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    big = ArrayRecord({"w": Array(np.arange(3_000_000, dtype=np.float32))})  # > 1 chunk each way
    msgs = [Message(RecordDict({"q": ConfigRecord({"ping": "hello"}), "w": big}), dst_node_id=n,
                    message_type="query") for n in nodes]
    for r in grid.send_and_receive(msgs, timeout=timeout):
        if r.has_error():
            print(f"PROXYAPP-ERROR node={r.metadata.src_node_id} {r.error.reason}", flush=True)
        else:
            s = float(r.content["w"]["w"].numpy().astype(np.float64).sum())
            print(f"PROXYAPP-REPLY node={r.metadata.src_node_id} "
                  f"site={r.content['a']['site']} sum={s:.1f}", flush=True)
'''

APP_CLIENT = '''from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    w = msg.content["w"]["w"].numpy() * 2
    return Message(RecordDict({"a": ConfigRecord({"site": str(context.node_config["site"])}),
                               "w": ArrayRecord({"w": Array(w)})}), reply_to=msg)
'''


class Fleet:
    """SuperLink (TLS, --enable-supernode-auth: as fedseg-server starts it) on loopback, the
    fleet proxy in front of it as a process of its own, hospitalA's key registered, hospitalB's
    not. (``fedseg-server``'s own proxy is tested in test_transport_security.py.)"""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = root / "pki"
        self.roster = provision(self.pki, ["hospitalA", "hospitalB"], ["127.0.0.1", "localhost"],
                                days=2, consortium="proxytest")
        self.port, self.public = free_port(), free_port()
        self.procs: list[ManagedProcess] = []
        self.admin = flower_env(root / "admin")
        self.via_proxy = flower_env(root / "via-proxy")
        app = root / "app"
        (app / "proxyapp").mkdir(parents=True)
        (app / "pyproject.toml").write_text(APP_PYPROJECT)
        (app / "proxyapp" / "__init__.py").write_text("")
        (app / "proxyapp" / "server.py").write_text(APP_SERVER)
        (app / "proxyapp" / "client.py").write_text(APP_CLIENT)
        self.app = app

    def start(self) -> Fleet:
        p = self.pki
        self.superlink = self._spawn("superlink", [
            "flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
            "--database", ":flwr-in-memory:", "--disable-runtime-dependency-installation",
            "--ssl-certfile", str(p / "server.pem"), "--ssl-keyfile", str(p / "server.key"),
            "--ssl-ca-certfile", str(p / "ca.pem"), "--enable-supernode-auth"],
            flower_env(self.root / "superlink-home"))
        self.proxy = self._spawn("proxy", [
            sys.executable, *PROXY_MODULE, "--listen", f"127.0.0.1:{self.public}",
            "--upstream", f"https://127.0.0.1:{self.port}", "--certfile", str(p / "server.pem"),
            "--keyfile", str(p / "server.key"), "--upstream-ca", str(p / "ca.pem"),
            "--max-body-mb", "64", "--timeout", "60"], _env())
        wait_for_port("127.0.0.1", self.port, 60, self.superlink)
        wait_for_port("127.0.0.1", self.public, 60, self.proxy)
        write_flwr_connection(self.root / "admin", "local", f"127.0.0.1:{self.port}",
                              insecure=False, root_certificates=p / "ca.pem")
        write_flwr_connection(self.root / "via-proxy", "proxy", f"127.0.0.1:{self.public}",
                              insecure=False, root_certificates=p / "ca.pem")
        self.node_ids = register_sites(self.roster, self.admin, "local", sites=["hospitalA"])
        return self

    def _spawn(self, name: str, argv: list[str], env: dict) -> ManagedProcess:
        p = ManagedProcess(name, argv, self.root / "logs" / f"{name}-{time.time_ns()}.log", env,
                           cwd=self.root).start()
        self.procs.append(p)
        return p

    def supernode(self, site: str, key: bool = True) -> ManagedProcess:
        argv = supernode_argv(f"127.0.0.1:{self.public}", free_port(), {"site": site},
                              insecure=False, root_certificates=self.pki / "ca.pem",
                              auth_private_key=(self.pki / "sites" / site / "identity.key"
                                                if key else None), max_retries=0)
        return self._spawn(f"supernode-{site}", argv, flower_env(self.root / f"home-{site}"))

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None, port: int | None = None) -> tuple[int, bytes]:
        """A raw HTTPS request (no URL normalisation) to the proxy; bounded by a timeout."""
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
        conn = http.client.HTTPSConnection("127.0.0.1", port or self.public, context=ctx,
                                           timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def stop(self) -> None:
        _stop(self.procs)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    f = Fleet(tmp_path_factory.mktemp("fleetproxy"))
    try:
        yield f.start()
    finally:
        f.stop()


def _wait_exit(proc: ManagedProcess, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (code := proc.poll()) is not None:
            return code
        time.sleep(0.2)
    pytest.fail(f"{proc.name} still running after {timeout} s:\n{proc.log_path.read_text()}")


def test_fleet_route_allowlist() -> None:
    assert len(fleet_proxy.FLEET_ROUTES) == 12
    assert fleet_proxy.fleet_route("/v1/fleet/pull-messages") == "pull-messages"
    for bad in ("/v1/fleet/", "/v1/fleet//pull-messages", "/v1/fleet/pull-messages/",
                "/v1/fleet/../control/list-runs", "/v1/control/list-runs", "/docs",
                "/v1/fleetx/get-run", "/v1/runtime/pull-app-inputs", "/health", "/V1/fleet/get-run"):
        assert fleet_proxy.fleet_route(bad) is None, bad
    # the allowlist is exactly Flower's Fleet router (a new/renamed route must be looked at)
    from flwr.superlink.routers.fleet.router import router

    flower = {r.path.removeprefix("/v1/fleet/") for r in router.routes}
    assert flower == set(fleet_proxy.FLEET_ROUTES)
    assert all(r.methods == {"POST"} for r in router.routes)
    # the self-registration refusal is the one an auth-enabled SuperLink gives
    from flwr.supercore.error.base import ApiErrorCode
    from flwr.supercore.error.catalog import API_ERROR_MAP

    for route, code in (("register-node", ApiErrorCode.FLEET_SUPERNODE_REGISTRATION_DISABLED),
                        ("unregister-node", ApiErrorCode.FLEET_SUPERNODE_UNREGISTRATION_DISABLED)):
        spec = API_ERROR_MAP[code]
        assert fleet_proxy.SELF_REGISTRATION_REFUSAL[route] == (code, spec.public_message)
        assert spec.http_status_code == 412
    with pytest.raises(ValueError, match="TLS"):
        fleet_proxy.FleetProxy("0.0.0.0:9092", "https://127.0.0.1:9093")
    with pytest.raises(ValueError, match="loopback"):
        fleet_proxy.FleetProxy("0.0.0.0:9092", "http://127.0.0.1:9093", allow_plain_http=True)
    with pytest.raises(ValueError, match="upstream"):
        fleet_proxy.FleetProxy("127.0.0.1:9092", "http://10.0.0.5:9093", allow_plain_http=True)


def test_site_joins_and_answers_through_the_proxy(fleet: Fleet) -> None:
    nid = fleet.node_ids["hospitalA"]
    node = fleet.supernode("hospitalA")
    try:
        deadline = time.monotonic() + 60
        while nid not in online_node_ids(fleet.admin, "local"):
            if node.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"hospitalA not online via the proxy:\n{node.log_path.read_text()}")
            time.sleep(0.5)
        run_id = int(flwr_cli(["run", str(fleet.app), "local"], fleet.admin)["run-id"])
        deadline = time.monotonic() + 150
        status = "unknown"
        while time.monotonic() < deadline:
            runs = flwr_cli(["ls", "local", "--run-id", str(run_id)], fleet.admin).get("runs", [])
            status = str(runs[0]["status"]) if runs else "unknown"
            if status.startswith("finished"):
                break
            time.sleep(1)
        out = subprocess.run([str(BIN_DIR / "flwr"), "log", str(run_id), "local", "--show"],
                             env=fleet.admin, capture_output=True, text=True, timeout=60)
        log = out.stdout + out.stderr
        assert status == "finished:completed", log
        want = float(2 * sum(range(3_000_000)))
        assert f"PROXYAPP-REPLY node={nid} site=hospitalA sum={want:.1f}" in log, log
        assert "refused" not in fleet.proxy.log_path.read_text()
    finally:
        node.stop(timeout=5)


def test_control_and_runtime_api_are_not_reachable_through_the_proxy(fleet: Fleet) -> None:
    before = {int(n["node-id"]) for n in list_nodes(fleet.admin, "local")}
    with pytest.raises(Exception, match="404"):
        flwr_cli(["ls", "proxy"], fleet.via_proxy, timeout=60)
    pub = fleet.root / "b.pub"
    pub.write_text(fleet.roster.sites["hospitalB"].public_key + "\n")
    with pytest.raises(Exception, match="404"):
        flwr_cli(["supernode", "register", str(pub), "proxy", "--name", "hospitalB"],
                 fleet.via_proxy, timeout=60)
    assert {int(n["node-id"]) for n in list_nodes(fleet.admin, "local")} == before
    for method, path in [("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/health"),
                         ("POST", "/v1/control/list-runs"), ("POST", "/v1/control/start-run"),
                         ("POST", "/v1/runtime/pull-app-inputs"), ("GET", "/"),
                         ("POST", "/v1/fleet/../control/list-runs"),
                         ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
                         ("POST", "/v1/fleet//get-run"), ("POST", "/v1/fleet/get-run/")]:
        status, _ = fleet.request(method, path, b"x" if method == "POST" else b"")
        assert status == 404, (method, path, status)
    assert fleet.request("GET", "/v1/fleet/get-run")[0] == 405
    status, body = fleet.request("POST", "/v1/fleet/register-node", b"\x00")
    assert status == 412 and json.loads(body)["code"] == 2001
    assert fleet.request("POST", "/v1/fleet/unregister-node", b"\x00")[0] == 412
    # a body over --max-body-mb is refused before it is read
    status, _ = fleet.request("POST", "/v1/fleet/push-object", b"",
                              headers={"Content-Length": str(65 << 20)})
    assert status == 413
    # an unsigned request is refused by the proxy as the SuperLink would (401), before its body
    status, _ = fleet.request("POST", "/v1/fleet/get-run", b"",
                              headers={"content-type": "application/protobuf"})
    assert status == 401, status
    # a signed one is forwarded: the SuperLink itself answers (a key it does not know: refused)
    status, _ = fleet.request("POST", "/v1/fleet/get-run", b"",
                              headers={"content-type": "application/protobuf", **_signed_headers()})
    assert status not in (403, 404, 405, 502, 504), status
    log = fleet.proxy.log_path.read_text()
    assert "refused POST /v1/control/list-runs" in log


def test_unregistered_node_cannot_self_register_through_the_proxy(fleet: Fleet) -> None:
    before = {int(n["node-id"]) for n in list_nodes(fleet.admin, "local")}
    keyless = fleet.supernode("anon", key=False)
    assert _wait_exit(keyless, 60) != 0
    assert "All SuperNodes must be registered via the CLI" in keyless.log_path.read_text()
    unregistered = fleet.supernode("hospitalB")  # a valid consortium key nobody registered
    assert _wait_exit(unregistered, 60) != 0
    assert "Failed to activate SuperNode" in unregistered.log_path.read_text()
    assert {int(n["node-id"]) for n in list_nodes(fleet.admin, "local")} == before
    assert "self-registration is off" in fleet.proxy.log_path.read_text()


def _signed_headers() -> dict[str, str]:
    """Flower's node-auth headers for a fresh key, as a SuperNode signs them: the proxy forwards
    only signed Fleet requests (fedseg/runtime/frontdoor.py)."""
    import base64

    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import (
        generate_key_pairs,
        public_key_to_bytes,
        sign_message,
    )

    sk, pk = generate_key_pairs()
    ts = now().isoformat()
    return {"flwr-public-key": base64.b64encode(public_key_to_bytes(pk)).decode(),
            "flwr-timestamp": ts,
            "flwr-signature": base64.b64encode(sign_message(sk, ts.encode())).decode()}


def test_proxy_answers_502_quickly_when_the_superlink_is_down(fleet: Fleet) -> None:
    dead = free_port()
    px = fleet_proxy.FleetProxy(f"127.0.0.1:{free_port()}", f"https://127.0.0.1:{dead}",
                                fleet.pki / "server.pem", fleet.pki / "server.key",
                                fleet.pki / "ca.pem", timeout=5).start()
    try:
        t0 = time.monotonic()
        status, _ = fleet.request("POST", "/v1/fleet/pull-messages", b"x", port=px.port,
                                  headers=_signed_headers())
        assert status == 502 and time.monotonic() - t0 < 15
        assert fleet.request("POST", "/v1/control/list-runs", b"x", port=px.port)[0] == 404
    finally:
        px.stop()


def test_proxy_cli_refuses_bad_configuration(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, *PROXY_MODULE, "--listen", "0.0.0.0:1"],
                         capture_output=True, text=True, timeout=60, env=_env())
    assert res.returncode == 2 and "certfile" in res.stderr
    res = subprocess.run([sys.executable, *PROXY_MODULE, "--certfile", str(tmp_path / "x.pem"),
                          "--keyfile", str(tmp_path / "x.key")],
                         capture_output=True, text=True, timeout=60, env=_env())
    assert res.returncode == 2 and "not found" in res.stderr
