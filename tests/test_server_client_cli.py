"""``fedseg-server`` / ``fedseg-client`` command lines: configuration errors, status, stop, and a
site with bad data refusing to start (default run: fast).

Every user-caused error must end as ONE line on stderr naming the file and the field, exit code
2, no traceback. Most cases call the CLIs' ``main`` in-process (no Flower needed); a few run the
real executables to prove the no-traceback promise end to end. ``test_stop_real_server`` starts
a real SuperLink (the one Flower test here, ~15 s) and stops it with ``fedseg-server stop``.

Secure defaults: both CLIs take TLS, keys, roster and signing from ONE provisioning folder
(``pki``) and check them before anything starts (a certificate the CA did not issue, a key that is
not the site's roster key, another consortium's CA or signing key: one line naming the field); the
site's ClientApp refuses requests that would send its data's statistics or its update unmasked
unless ``require-secure-aggregation`` is false. The real-process security tests of the server's
defaults are in test_transport_security.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedseg.client import app as client_app
from fedseg.client.cli import ClientConfig, load_client_config, with_pki_defaults
from fedseg.client.cli import check_security as client_security
from fedseg.client.cli import main as client_main
from fedseg.errors import FedsegError
from fedseg.privacy.provision import load_roster, provision
from fedseg.protocol import messages as pm
from fedseg.protocol.records import pack, unpack
from fedseg.runtime.processes import BIN_DIR, descendants, free_port, pid_alive
from fedseg.server.cli import check_security as server_security
from fedseg.server.cli import load_server_config
from fedseg.server.cli import main as server_main
from fedseg.server.config import ServerConfig
from fedseg.server.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

GOOD = """
host = "127.0.0.1"
port = {port}
superlink_port = 0
state_dir = "state"
insecure = true

[job]
run_dir = "run"
min_sites = 2
rounds = 2
"""


def _write(tmp: Path, text: str, name: str = "server.toml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def _one_error_line(err: str, prog: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


# ---------------------------------------------------------------- example configs


def test_example_configs_parse() -> None:
    srv = load_server_config(ROOT / "deploy" / "examples" / "server.toml")
    # the public address is the fleet proxy's; the SuperLink is on 127.0.0.1:superlink_port
    assert (srv.host, srv.port, srv.superlink_port) == ("0.0.0.0", 9092, 9093)
    assert not srv.insecure and srv.job.min_sites == 2
    # relative paths are made absolute, relative to the file's folder
    assert Path(srv.job.run_dir).is_absolute() and Path(srv.state_dir).is_absolute()
    pki = ROOT / "deploy" / "examples" / "pki"
    assert srv.pki == str(pki)
    full = srv.with_pki_defaults()  # one folder gives every security file
    assert (full.tls_certfile, full.tls_keyfile, full.tls_ca_certfile, full.roster) == (
        str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"),
        str(pki / "roster.json"))
    cli = load_client_config(ROOT / "deploy" / "examples" / "client.toml")
    assert cli.site == "hospitalA" and cli.restart_delay_s > 0 and cli.pki == str(pki)
    assert cli.require_secure_aggregation and cli.require_signed_apps and not cli.insecure
    site = with_pki_defaults(cli)
    assert (site.root_certificates, site.auth_private_key, site.roster) == (
        str(pki / "ca.pem"), str(pki / "identity.key"), str(pki / "roster.json"))
    # every option except the job's run folder has a default
    minimal = ServerConfig.model_validate({"job": {"run_dir": "x"}})
    assert minimal.job.rounds >= 1 and minimal.job.on_too_few_sites == "retry"


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host = \n", "not valid TOML"),
        (GOOD + "colour = 'blue'\n", "field 'job.colour': Extra inputs are not permitted"),
        ("verbose = true\n" + GOOD, "field 'verbose': Extra inputs are not permitted"),
        (GOOD.replace("port = {port}", "port = 70000"), "field 'port'"),
        (GOOD.replace("min_sites = 2", "min_sites = 0"), "field 'job.min_sites'"),
        (GOOD.replace("rounds = 2", "rounds = 'many'"), "field 'job.rounds'"),
        (GOOD + "on_too_few_sites = 'maybe'\n", "field 'job.on_too_few_sites'"),
        (GOOD + "[job.aggregation]\nkind = 'fedmagic'\n", "field 'job.aggregation.kind'"),
        (GOOD + "[job.aggregation]\nnesterov = true\n", "field 'job.aggregation.nesterov'"),
        ('port = 9092\n', "field 'job': Field required"),
        (GOOD.replace('host = "127.0.0.1"', 'host = "0.0.0.0"'), "field 'insecure'"),
        (GOOD.replace("insecure = true", "insecure = false"), "field 'pki': not set"),
        (GOOD.replace("insecure = true", "insecure = false\ntls_certfile = 'a.pem'"),
         "field 'tls_keyfile': not set"),
        (GOOD.replace("insecure = true", "insecure = false\ntls_certfile = 'a.pem'\n"
                      "tls_keyfile = 'a.key'\ntls_ca_certfile = 'ca.pem'"),
         "field 'tls_certfile'"),
        (GOOD, "secure aggregation is on (the default) but [job] has no roster"),
        (GOOD.replace("superlink_port = 0", "superlink_port = {port}"), "field 'superlink_port'"),
        (GOOD.replace("insecure = true", "insecure = true\npki = 'nowhere'"), "field 'pki'"),
    ],
)
def test_server_config_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                           text: str, expected: str) -> None:
    cfg = _write(tmp_path, text.replace("{port}", str(free_port())))
    code = server_main(["start", "--config", str(cfg)])
    line = _one_error_line(capsys.readouterr().err, "fedseg-server")
    assert code == 2
    assert str(cfg) in line, line
    assert expected in line, line
    assert not (tmp_path / "state" / "server.pid").exists()


def test_server_port_in_use_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = _write(tmp_path, GOOD.replace("{port}", str(port)))
        assert server_main(["start", "--config", str(cfg)]) == 2
    line = _one_error_line(capsys.readouterr().err, "fedseg-server")
    assert f"{cfg}: field 'port': cannot listen on 127.0.0.1:{port}" in line, line
    assert not (tmp_path / "state" / "server.pid").exists()


def test_server_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert server_main(["start", "--config", str(tmp_path / "nope.toml")]) == 2
    line = _one_error_line(capsys.readouterr().err, "fedseg-server")
    assert "nope.toml: config file not found" in line


def test_server_config_error_real_cli(tmp_path: Path) -> None:
    """The real executable: exit 2, one line on stderr, no traceback."""
    cfg = _write(tmp_path, GOOD.replace("{port}", "9092") + "colour = 'blue'\n")
    res = subprocess.run([str(BIN_DIR / "fedseg-server"), "start", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, env=ENV)
    assert res.returncode == 2
    line = _one_error_line(res.stderr, "fedseg-server")
    assert f"{cfg}: field 'job.colour'" in line


# ---------------------------------------------------------------- status / resume / stop


def _fake_run(tmp: Path, **status: object) -> Path:
    cfg = load_server_config(_write(tmp, GOOD.replace("{port}", "9092")))
    run = RunDir(cfg.job.run_dir)
    (run.root / "server.json").write_text(cfg.model_dump_json())
    run.set_status(**status)
    return run.root


def test_status(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _fake_run(tmp_path, state="finished", phase="done", round=2, rounds=2,
                    latest_dice=0.75, latest_eval_round=2, sites={"a": "active"})
    assert server_main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "state:  finished" in out and "round:  2 of 2" in out and "0.7500" in out
    assert server_main(["status", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "finished"


def test_status_of_crashed_server_says_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _fake_run(tmp_path, state="running", phase="training", round=1, rounds=2)
    assert server_main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "state:  interrupted" in out and f"fedseg-server resume {run}" in out


def test_status_resume_stop_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert server_main(["status", str(tmp_path / "nothing")]) == 2
    assert "not a fedseg run folder" in _one_error_line(capsys.readouterr().err, "fedseg-server")
    assert server_main(["resume", str(tmp_path)]) == 2
    assert "server.json: missing" in _one_error_line(capsys.readouterr().err, "fedseg-server")
    assert server_main(["stop", "--state-dir", str(tmp_path / "st")]) == 2
    assert "no running fedseg-server" in _one_error_line(capsys.readouterr().err, "fedseg-server")
    run = _fake_run(tmp_path, state="finished", phase="done", round=2, rounds=2)
    assert server_main(["resume", str(run)]) == 2
    assert "already finished" in _one_error_line(capsys.readouterr().err, "fedseg-server")
    # a run folder that holds a checkpoint is not started again from scratch
    RunDir(run).save_checkpoint("last", {"round": 1})
    assert server_main(["start", "--config", str(tmp_path / "server.toml")]) == 2
    line = _one_error_line(capsys.readouterr().err, "fedseg-server")
    assert f"fedseg-server resume {run}" in line


def test_stop_real_server(tmp_path: Path) -> None:
    """``fedseg-server start`` (real SuperLink, job waiting for sites) → ``stop RUN_DIR``:
    the server exits, status says stopped, and no process is left behind."""
    port = free_port()
    provision(tmp_path / "pki", ["a", "b"])  # secure aggregation (default) needs the roster
    cfg = _write(tmp_path, GOOD.replace("{port}", str(port))
                 .replace("[job]\n", "[job]\nroster = \"pki/roster.json\"\n"))
    log = open(tmp_path / "server.out", "wb")  # noqa: SIM115
    srv = subprocess.Popen([str(BIN_DIR / "fedseg-server"), "start", "--config", str(cfg)],
                           stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    run = tmp_path / "run"
    procs: set[int] = set()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            st = RunDir(run).status() if run.is_dir() else {}
            if st.get("phase") == "enrolment" and st.get("state") == "running":
                break
            assert srv.poll() is None, (tmp_path / "server.out").read_text()
            time.sleep(0.5)
        else:
            pytest.fail("the job did not start:\n" + (tmp_path / "server.out").read_text())
        procs = descendants(srv.pid) | {srv.pid}
        assert len(procs) >= 3  # fedseg-server, flower-superlink, superexec (+ ServerApp)
        res = subprocess.run([str(BIN_DIR / "fedseg-server"), "stop", str(run)],
                             capture_output=True, text=True, timeout=60, env=ENV)
        assert res.returncode == 0, res.stderr
        assert srv.wait(timeout=30) == 130
        assert RunDir(run).status()["state"] == "stopped"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(pid_alive(p) for p in procs):
            time.sleep(0.2)
        assert not [p for p in procs if pid_alive(p)]
        left = subprocess.run(["pgrep", "-f", f"127.0.0.1:{port}"], capture_output=True, text=True)
        assert left.stdout.strip() == ""
        assert not (tmp_path / "state" / "server.pid").exists()
        # stopping again is a clear one-line error
        res = subprocess.run([str(BIN_DIR / "fedseg-server"), "stop", str(run)],
                             capture_output=True, text=True, timeout=60, env=ENV)
        assert res.returncode == 2 and "no running fedseg-server" in res.stderr
    finally:
        log.close()
        for p in procs | {srv.pid}:
            if pid_alive(p):
                os.kill(p, signal.SIGKILL)
        srv.wait(timeout=10)


# ---------------------------------------------------------------- fedseg-client


def test_client_with_bad_data_refuses_to_start(tmp_path: Path) -> None:
    """check-data runs first: exit 2, the problem lines, then one error line; no traceback,
    and no SuperNode was started."""
    sys.path.insert(0, str(Path(__file__).parent))
    from broken_datasets import BROKEN

    build, needle = BROKEN["missing_label"]
    data = tmp_path / "bad"
    build(data)
    res = subprocess.run(
        [str(BIN_DIR / "fedseg-client"), "--site", "badsite", "--data", str(data),
         "--server", "127.0.0.1:9", "--insecure", "--cache", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=120, env=ENV,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("fedseg-client: error: ") and "will not join" in lines[-1]
    assert any(needle in ln for ln in lines[:-1]), res.stderr
    assert not (tmp_path / "cache" / "logs" / "supernode.log").exists()


def test_every_client_config_key_is_also_a_flag(tmp_path: Path) -> None:
    """client.toml says every key is also a flag: each field (insecure is --insecure) has one,
    and the flag's value reaches the config."""
    from fedseg.client.cli import FLAG_FIELDS, _config_from_args, build_parser

    assert set(ClientConfig.model_fields) - {"insecure"} == set(FLAG_FIELDS)
    args = build_parser().parse_args(["--site", "a", "--data", str(tmp_path), "--runtime-port",
                                      "9099", "--restart-delay-s", "2.5", "--max-restarts", "4"])
    cfg, _ = _config_from_args(args)
    assert (cfg.runtime_port, cfg.restart_delay_s, cfg.max_restarts) == (9099, 2.5, 4)


def test_client_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert client_main(["--data", str(tmp_path), "--insecure"]) == 2
    assert "give --site" in _one_error_line(capsys.readouterr().err, "fedseg-client")
    cfg = _write(tmp_path, "site = 'a'\ndata_dir = 'x'\nretries = 3\n", "client.toml")
    assert client_main(["--config", str(cfg)]) == 2
    line = _one_error_line(capsys.readouterr().err, "fedseg-client")
    assert f"{cfg}: field 'retries'" in line
    cfg = _write(tmp_path, "site = 'a'\nrestart_delay_s = -1\n", "client.toml")
    assert client_main(["--config", str(cfg)]) == 2
    assert "field 'restart_delay_s'" in _one_error_line(capsys.readouterr().err, "fedseg-client")
    assert client_main(["--site", "a", "--data", str(tmp_path), "--gpu-memory-gb", "-2"]) == 2
    assert "--gpu-memory-gb" in _one_error_line(capsys.readouterr().err, "fedseg-client")


# ---------------------------------------------------------------- secure defaults (pki)


@pytest.fixture(scope="module")
def consortia(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Ours (hospitalA, hospitalB), an outsider consortium that also has a 'hospitalA', and ours
    again with a server certificate that does not name 127.0.0.1."""
    root = tmp_path_factory.mktemp("consortia")
    out = {"ours": root / "ours", "other": root / "other", "nolo": root / "nolo"}
    provision(out["ours"], ["hospitalA", "hospitalB"], ["127.0.0.1", "localhost"], days=2)
    provision(out["other"], ["hospitalA"], ["127.0.0.1", "localhost"], days=2)
    provision(out["nolo"], ["hospitalA", "hospitalB"], ["fedseg.example.org"], days=2)
    return out


SECURE = """
port = {port}
superlink_port = 0
state_dir = "state"
pki = "{pki}"
{extra}
[job]
run_dir = "run"
"""


@pytest.mark.parametrize(
    ("pki", "extra", "expected"),
    [
        ("{tmp}/empty", "", "field 'pki': {tmp}/empty/server.pem: file not found"),
        ("{ours}", "tls_ca_certfile = '{other}/ca.pem'", "field 'tls_ca_certfile': "
         "{ours}/server.pem: not issued by the CA {other}/ca.pem"),
        ("{ours}", "roster = '{other}/roster.json'", "field 'pki': {ours}/ca.pem: this CA is not "
         "the consortium's"),
        ("{nolo}", "", "field 'pki': {nolo}/server.pem: has no subject alternative name 127.0.0.1"),
        ("{ours}", "app_signing_key = '{other}/app-signing.key'", "field 'app_signing_key': "
         "{other}/app-signing.key: not the consortium's app-signing key"),
        ("{ours}", "app_signing_key = '{ours}/server.key'", "field 'app_signing_key': "
         "{ours}/server.key: not an OpenSSH private key"),
        ("{ours}", "host = '0.0.0.0'\ninsecure = true", "field 'insecure': only allowed on loopback"),
    ],
)
def test_server_security_errors_are_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture, consortia: dict[str, Path],
        pki: str, extra: str, expected: str) -> None:
    (tmp_path / "empty").mkdir()
    names = {"tmp": str(tmp_path), **{k: str(v) for k, v in consortia.items()}}
    cfg = _write(tmp_path, SECURE.format(port=free_port(), pki=pki.format(**names),
                                         extra=extra.format(**names)))
    assert server_main(["start", "--config", str(cfg)]) == 2
    line = _one_error_line(capsys.readouterr().err, "fedseg-server")
    assert f"{cfg}: " + expected.format(**names) in line, line
    assert not (tmp_path / "state" / "server.pid").exists()


def test_server_takes_everything_from_pki(tmp_path: Path, consortia: dict[str, Path]) -> None:
    cfg = load_server_config(_write(tmp_path, SECURE.format(
        port=9092, pki=consortia["ours"], extra="")))
    resolved, sec = server_security(cfg, "server.toml")
    ours = consortia["ours"]
    assert sec.ssl == (ours / "server.pem", ours / "server.key", ours / "ca.pem")
    assert sec.roster == load_roster(ours / "roster.json")
    assert sec.signing == (ours / "app-signing.key", sec.roster.app_signing.key_id)
    assert resolved.roster == str(ours / "roster.json")
    # "" switches signing off; insecure on loopback needs no TLS files
    cfg2 = cfg.model_copy(update={"app_signing_key": ""})
    assert server_security(cfg2, "server.toml")[1].signing is None
    cfg3 = cfg.model_copy(update={"insecure": True, "host": "127.0.0.1", "pki": None})
    assert server_security(cfg3, "server.toml")[1] == server_security(cfg3, "x")[1]
    assert server_security(cfg3, "server.toml")[1].ssl is None


def _client(pki: Path | None, **kw: object) -> ClientConfig:
    return ClientConfig(site=str(kw.pop("site", "hospitalA")), data_dir="unused",
                        pki=str(pki) if pki else None, **kw)  # type: ignore[arg-type]


def test_client_takes_everything_from_pki(tmp_path: Path, consortia: dict[str, Path]) -> None:
    ours = consortia["ours"]
    roster = load_roster(ours / "roster.json")
    cfg = client_security(_client(ours), "client.toml", tmp_path / "cache")
    assert cfg.root_certificates == str(ours / "ca.pem")
    assert cfg.auth_private_key == cfg.identity_key == str(ours / "sites/hospitalA/identity.key")
    assert cfg.roster == str(ours / "roster.json")
    # trusted entities: the roster's consortium app-signing key, nothing else
    import yaml

    trusted = yaml.safe_load(Path(cfg.trusted_entities).read_text())  # type: ignore[arg-type]
    assert trusted == {roster.app_signing.key_id: roster.app_signing.public_key}
    # a site's own folder with just the three files works the same
    own = tmp_path / "keys"
    own.mkdir()
    for src, name in (("ca.pem", "ca.pem"), ("roster.json", "roster.json"),
                      ("sites/hospitalB/identity.key", "identity.key")):
        (own / name).write_bytes((ours / src).read_bytes())
    cfg = client_security(_client(own, site="hospitalB"), "client.toml", tmp_path / "cacheB")
    assert cfg.auth_private_key == str(own / "identity.key")
    # a plain loopback trial without any pki, when the site explicitly allows it
    plain = client_security(_client(None, insecure=True, require_secure_aggregation=False,
                                    require_signed_apps=False), "client.toml", tmp_path / "c")
    assert plain.trusted_entities is None and plain.identity_key is None


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"pki": None}, "field 'roster': not set"),
        ({"pki": None, "require_secure_aggregation": False, "require_signed_apps": False},
         "field 'root_certificates': not set; TLS is on by default"),
        ({"site": "hospitalZ"}, "field 'pki': site 'hospitalZ' is not in the consortium roster"),
        ({"auth_private_key": "{other}/sites/hospitalA/identity.key"},
         "field 'auth_private_key': {other}/sites/hospitalA/identity.key: this key is not the one "
         "the consortium roster lists for site 'hospitalA'"),
        ({"pki": "{other}", "roster": "{ours}/roster.json"},
         "field 'pki': {other}/sites/hospitalA/identity.key: this key is not the one"),
        ({"root_certificates": "{other}/ca.pem"},
         "field 'root_certificates': {other}/ca.pem: this CA is not the consortium's"),
        ({"trusted_entities": "{tmp}/nope.yaml"}, "field 'trusted_entities': {tmp}/nope.yaml: "
         "file not found"),
        ({"insecure": True, "server": "fedseg.example.org:9092"},
         "field 'insecure': plain HTTP only to a loopback server"),
        ({"insecure": True, "pki": None}, "field 'roster': not set"),
    ],
)
def test_client_security_errors(tmp_path: Path, consortia: dict[str, Path], kw: dict,
                                expected: str) -> None:
    names = {"tmp": str(tmp_path), **{k: str(v) for k, v in consortia.items()}}
    kw = {k: v.format(**names) if isinstance(v, str) else v for k, v in kw.items()}
    pki = kw.pop("pki", "{ours}".format(**names))
    with pytest.raises(FedsegError) as exc:
        client_security(_client(Path(pki) if pki else None, **kw), "client.toml", tmp_path / "c")
    msg = str(exc.value)
    assert msg.startswith("client.toml: ") and len(msg.splitlines()) == 1, msg
    assert expected.format(**names) in msg, msg


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedseg.data.demo import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("sitedata"), sites=1, cases=2, test_cases=0)[0]


def test_client_cli_checks_keys_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                consortia: dict[str, Path], site_data: Path) -> None:
    """The real CLI path: data OK, then the key check fails as one line naming the file and the
    field; no SuperNode was started."""
    cfg = _write(tmp_path, f"site = 'hospitalA'\ndata_dir = '{site_data}'\ncache_dir = 'cache'\n"
                 f"pki = '{consortia['other']}'\nroster = '{consortia['ours']}/roster.json'\n",
                 "client.toml")
    assert client_main(["--config", str(cfg)]) == 2
    line = _one_error_line(capsys.readouterr().err, "fedseg-client")
    assert f"{cfg}: field 'pki': " in line and "not the one the consortium roster lists" in line
    assert not (tmp_path / "cache" / "logs" / "supernode.log").exists()


# ---------------------------------------------------------------- the site refuses plain requests


def _ctx(site_data: Path, tmp: Path, require: bool | None) -> object:
    from flwr.app import Context, RecordDict

    nc: dict = {"site": "hospitalA", "data-dir": str(site_data), "cache-dir": str(tmp / "cache")}
    if require is not None:
        nc["require-secure-aggregation"] = require
    return Context(run_id=7, node_id=1, node_config=nc, state=RecordDict(), run_config={})


def _msg(content: object, mtype: str) -> object:
    from flwr.app import Message
    from flwr.common import Metadata

    md = Metadata(run_id=7, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                  group_id="", created_at=0.0, ttl=600.0, message_type=mtype)
    return Message(content, metadata=md)


PLAIN_REQUESTS = {
    "enrol": (pm.ENROL, pm.EnrolRequest(), "case counts"),
    "fingerprint": (pm.FINGERPRINT, pm.FingerprintRequest(), "fingerprint"),
    "prepare": (pm.PREPARE, pm.PrepareRequest(plan_json="{}"), "case count"),
    "train": (pm.TRAIN, pm.TrainRequest(round=1, job_id="j", local_iterations=1,
                                        global_iteration_start=0, global_total_iterations=1,
                                        plan_hash="h"), "model update and case count"),
}


@pytest.mark.parametrize("handler", sorted(PLAIN_REQUESTS))
@pytest.mark.parametrize("require", [None, True])
def test_site_refuses_requests_that_would_send_data_unmasked(
        tmp_path: Path, site_data: Path, handler: str, require: bool | None) -> None:
    """node config require-secure-aggregation (default on): a plain (unmasked) request gets one
    clear ErrorReply and nothing of the site's data."""
    mtype, req, what = PLAIN_REQUESTS[handler]
    reply = getattr(client_app, handler)(_msg(pack(req), mtype), _ctx(site_data, tmp_path, require))
    assert "error" in reply.content.config_records
    err, arrays = unpack(reply.content, pm.ErrorReply)
    assert not arrays
    assert err.kind == "refused" and err.site == "hospitalA", err
    assert f"refuses to send its {what} unmasked" in err.message, err.message
    assert "require_secure_aggregation = false" in err.message


def test_site_answers_plain_requests_when_allowed(tmp_path: Path, site_data: Path) -> None:
    """``fedseg simulate --secure-aggregation off`` sets require-secure-aggregation false."""
    ctx = _ctx(site_data, tmp_path, False)
    reply = client_app.enrol(_msg(pack(pm.EnrolRequest()), pm.ENROL), ctx)
    rep, _ = unpack(reply.content, pm.EnrolReply)
    assert rep.num_training_cases is not None  # plain enrolment: the count in clear
    reply = client_app.fingerprint(_msg(pack(pm.FingerprintRequest()), pm.FINGERPRINT), ctx)
    rep, arrays = unpack(reply.content, pm.FingerprintReply)
    assert rep.num_cases == 2 and "fingerprint" in arrays


def test_simulated_sites_get_the_requirement(tmp_path: Path, site_data: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``Federation`` (``fedseg simulate``) passes require-secure-aggregation to its SuperNodes:
    on by default, off when the job runs plain (``simulate`` sets it from the job)."""
    from fedseg.runtime.processes import ManagedProcess
    from fedseg.simulate import Federation

    monkeypatch.setattr(ManagedProcess, "start", lambda self: self)  # argv only, no process
    fed = Federation(tmp_path, [site_data])
    node_config = lambda p: p.argv[p.argv.index("--node-config") + 1]  # noqa: E731
    assert "require-secure-aggregation=true" in node_config(fed.start_site(site_data))
    fed.require_secure_aggregation = False
    assert "require-secure-aggregation=false" in node_config(fed.start_site(site_data))

if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))


def _worker_pids(log: Path) -> list[int]:
    import re

    if not log.is_file():
        return []
    return [int(m) for m in re.findall(r"taking ClientApp tasks from \S+ \(pid (\d+)\)", log.read_text())]


def test_client_restarts_a_dead_site_worker(tmp_path: Path) -> None:
    """fedseg-client supervises the site worker next to the SuperNode: a worker that dies (OOM,
    SIGKILL) is started again, and stopping the client stops both (no process left)."""
    from fedseg.data.demo import make_demo_data

    data = make_demo_data(tmp_path / "data", sites=1, cases=2, test_cases=0)[0]
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [str(BIN_DIR / "fedseg-client"), "--site", data.name, "--data", str(data),
         "--server", f"127.0.0.1:{free_port()}", "--insecure", "--cache", str(cache),
         "--no-require-secure-aggregation", "--no-require-signed-apps"],  # a plain trial
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
        start_new_session=True,
    )
    log = cache / "logs" / "worker.log"
    try:
        deadline = time.monotonic() + 180
        while not _worker_pids(log) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        pids = _worker_pids(log)
        assert pids, (log.read_text() if log.is_file() else f"no worker log; client exit {proc.poll()}")
        tree = descendants(proc.pid)
        assert pids[0] in tree
        os.kill(pids[0], signal.SIGKILL)
        while len(_worker_pids(log)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        pids = _worker_pids(log)
        assert len(pids) == 2 and pids[1] != pids[0], log.read_text()
        assert pid_alive(pids[1])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    assert "site worker exited" in out and "restarting it" in out, out
    time.sleep(1.0)
    assert not any(pid_alive(p) for p in _worker_pids(log))
