"""``fedseg-server`` / ``fedseg-client`` command lines: configuration errors, status, stop, and a
site with bad data refusing to start (default run: fast).

Every user-caused error must end as ONE line on stderr naming the file and the field, exit code
2, no traceback. Most cases call the CLIs' ``main`` in-process (no Flower needed); a few run the
real executables to prove the no-traceback promise end to end. ``test_stop_real_server`` starts
a real SuperLink (the one Flower test here, ~15 s) and stops it with ``fedseg-server stop``.
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

from fedseg.client.cli import load_client_config
from fedseg.client.cli import main as client_main
from fedseg.privacy.provision import provision
from fedseg.runtime.processes import BIN_DIR, descendants, free_port, pid_alive
from fedseg.server.cli import load_server_config
from fedseg.server.cli import main as server_main
from fedseg.server.config import ServerConfig
from fedseg.server.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

GOOD = """
host = "127.0.0.1"
port = {port}
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
    assert srv.host == "127.0.0.1" and srv.port == 9093  # behind the fleet proxy
    assert not srv.insecure and srv.job.min_sites == 2
    # relative paths are made absolute, relative to the file's folder
    assert Path(srv.job.run_dir).is_absolute() and Path(srv.state_dir).is_absolute()
    assert srv.tls_ca_certfile == str(ROOT / "deploy" / "examples" / "pki" / "ca.pem")
    cli = load_client_config(ROOT / "deploy" / "examples" / "client.toml")
    assert cli.site == "hospitalA" and cli.restart_delay_s > 0
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
        (GOOD + "[job.aggregation]\nmomentum = 0.9\n", "field 'job.aggregation.momentum'"),
        ('port = 9092\n', "field 'job': Field required"),
        (GOOD.replace('host = "127.0.0.1"', 'host = "0.0.0.0"'), "field 'insecure'"),
        (GOOD.replace("insecure = true", "insecure = false"), "field 'tls_certfile'"),
        (GOOD.replace("insecure = true", "insecure = false\ntls_certfile = 'a.pem'\n"
                      "tls_keyfile = 'a.key'\ntls_ca_certfile = 'ca.pem'"),
         "field 'tls_certfile'"),
        (GOOD, "secure aggregation is on (the default) but [job] has no roster"),
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


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
