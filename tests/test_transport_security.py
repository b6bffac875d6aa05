"""Transport security with REAL flower-superlink / flower-supernode processes on 127.0.0.1.

One SuperLink per module: HTTPS with the provisioned server certificate, SuperNode
authentication on, the sites of the consortium roster registered, and FLWR_SUPERGRID_API_URL
pointing at fedseg's app registry (for signed app bundles). A second provisioning run plays the
outsider: its CA and its site key are not the consortium's. A tiny Flower app (one query, one
reply naming the site) is written per test session. Every process is stopped in teardown.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from fedseg.errors import FedsegError
from fedseg.privacy.app_registry import AppRegistry, build_fab, sign_fab, superlink_registry_env
from fedseg.privacy.provision import provision
from fedseg.privacy.transport import (
    SUPERNODE_CONNECTION_ERROR_LOG,
    check_identity_key,
    list_nodes,
    online_node_ids,
    register_sites,
    superlink_security_args,
    supernode_security_args,
    trusted_entities_file,
)
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

APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "1.0.0"
description = "fedseg transport-security test app"
dependencies = []

[tool.flwr.app]
publisher = "fedsegtest"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"

[tool.flwr.app.config]
timeout = 40.0
"""

APP_SERVER = '''"""ServerApp: one query to every connected node; print each reply."""
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
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
    msgs = [Message(RecordDict({"q": ConfigRecord({"ping": "hello"})}), dst_node_id=n,
                    message_type="query") for n in nodes]
    for r in grid.send_and_receive(msgs, timeout=timeout):
        if r.has_error():
            print(f"TINYAPP-ERROR node={r.metadata.src_node_id} code={r.error.code} "
                  f"reason={r.error.reason}", flush=True)
        else:
            print(f"TINYAPP-REPLY node={r.metadata.src_node_id} site={r.content['a']['site']}",
                  flush=True)
    print(f"TINYAPP-DONE nodes={len(nodes)}", flush=True)
'''

APP_CLIENT = '''"""ClientApp: answer a query with the site name."""
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    site = str(context.node_config.get("site", "?"))
    return Message(RecordDict({"a": ConfigRecord({"site": site})}), reply_to=msg)
'''

CONN = "consortium"


def _write_app(dest: Path) -> Path:
    (dest / "tinyapp").mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(APP_PYPROJECT)
    (dest / "tinyapp" / "__init__.py").write_text("")
    (dest / "tinyapp" / "server.py").write_text(APP_SERVER)
    (dest / "tinyapp" / "client.py").write_text(APP_CLIENT)
    return dest


class Link:
    """The module's SuperLink and everything needed to talk to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = root / "pki"
        self.other = root / "other"
        self.roster = provision(self.pki, ["hospitalA", "hospitalB"], ["127.0.0.1", "localhost"],
                                days=2, consortium="testconsortium")
        self.other_roster = provision(self.other, ["intruder"], ["127.0.0.1", "localhost"],
                                      days=2, consortium="outsiders")
        self.app_dir = _write_app(root / "app")
        self.home = root / "admin-home"
        self.env = flower_env(self.home)
        self.registry = AppRegistry().start()
        self.port = free_port()
        self.nodes: list[ManagedProcess] = []
        self.proc = ManagedProcess(
            "flower-superlink",
            ["flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
             "--database", ":flwr-in-memory:", "--disable-runtime-dependency-installation",
             *superlink_security_args(self.pki / "server.pem", self.pki / "server.key",
                                      self.pki / "ca.pem")],
            root / "logs" / "superlink.log",
            flower_env(root / "superlink-home", superlink_registry_env(self.registry)),
            cwd=root,
        )

    def start(self) -> Link:
        self.proc.start()
        wait_for_port("127.0.0.1", self.port, 60, self.proc)
        write_flwr_connection(self.home, CONN, f"127.0.0.1:{self.port}", insecure=False,
                              root_certificates=self.pki / "ca.pem")
        self.node_ids = register_sites(self.roster, self.env, CONN)
        return self

    def superlink_log(self) -> str:
        return self.proc.log_path.read_text(errors="replace")

    def start_node(self, name: str, key: Path, ca: Path,
                   trusted: Path | None = None) -> ManagedProcess:
        argv = supernode_argv(f"127.0.0.1:{self.port}", free_port(), {"site": name},
                              insecure=False, max_retries=0)
        argv += supernode_security_args(ca, key, trusted)
        p = ManagedProcess(f"supernode-{name}", argv, self.root / "logs" / f"{name}-{time.time_ns()}.log",
                           flower_env(self.root / f"home-{name}"), cwd=self.root).start()
        self.nodes.append(p)
        return p

    def wait_online(self, node_id: int, proc: ManagedProcess, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{proc.name} exited ({proc.poll()}):\n{proc.log_path.read_text()}")
            if node_id in online_node_ids(self.env, CONN):
                return
            time.sleep(0.5)
        pytest.fail(f"node {node_id} not online after {timeout} s:\n{proc.log_path.read_text()}")

    def run(self, app: str, timeout: float = 120) -> tuple[str, str]:
        """``flwr run APP``; wait until finished; return (status, ServerApp log)."""
        run_id = int(flwr_cli(["run", app, CONN], self.env)["run-id"])
        deadline = time.monotonic() + timeout
        status = "unknown"
        while time.monotonic() < deadline:
            runs = flwr_cli(["ls", CONN, "--run-id", str(run_id)], self.env).get("runs", [])
            status = str(runs[0]["status"]) if runs else "unknown"
            if status.startswith("finished"):
                break
            time.sleep(1)
        out = subprocess.run([str(BIN_DIR / "flwr"), "log", str(run_id), CONN, "--show"],
                             env=self.env, capture_output=True, text=True, timeout=60)
        return status, out.stdout + out.stderr

    def stop_nodes(self) -> None:
        for p in self.nodes:
            p.stop(timeout=5)
        self.nodes.clear()

    def stop(self) -> None:
        self.stop_nodes()
        self.proc.stop(timeout=5)
        self.registry.stop()


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory):
    lk = Link(tmp_path_factory.mktemp("transport"))
    try:
        lk.start()
        yield lk
    finally:
        lk.stop()


@pytest.fixture
def nodes(link: Link):
    """Per test: whatever SuperNodes the test started are stopped afterwards."""
    try:
        yield link
    finally:
        link.stop_nodes()


def _wait_exit(proc: ManagedProcess, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (code := proc.poll()) is not None:
            return code
        time.sleep(0.2)
    pytest.fail(f"{proc.name} still running after {timeout} s:\n{proc.log_path.read_text()}")


def test_sites_are_registered_but_not_online(link: Link) -> None:
    assert set(link.node_ids) == {"hospitalA", "hospitalB"}
    assert all(isinstance(v, int) and v > 0 for v in link.node_ids.values())
    listed = {int(n["node-id"]): n["status"] for n in list_nodes(link.env, CONN)}
    assert set(listed) == set(link.node_ids.values())
    assert set(listed.values()) == {"registered"}
    # registering again is harmless (key already known -> None)
    again = register_sites(link.roster, link.env, CONN, sites=["hospitalA"])
    assert again == {"hospitalA": None}


def test_unregistered_key_is_refused(nodes: Link) -> None:
    intruder_key = nodes.other / "sites" / "intruder" / "identity.key"
    with pytest.raises(FedsegError, match="not in the consortium roster"):
        check_identity_key(nodes.roster, "intruder", intruder_key)
    before = {int(n["node-id"]) for n in list_nodes(nodes.env, CONN)}
    # right CA, valid P-384 key, but never registered
    p = nodes.start_node("intruder", intruder_key, nodes.pki / "ca.pem")
    assert _wait_exit(p, 30) == 1
    log = p.log_path.read_text()
    assert SUPERNODE_CONNECTION_ERROR_LOG in log and "Failed to activate SuperNode" in log
    assert "No SuperNode found with the given public key" in nodes.superlink_log()
    after = list_nodes(nodes.env, CONN)
    assert {int(n["node-id"]) for n in after} == before  # nothing new appeared
    assert not online_node_ids(nodes.env, CONN)


def test_wrong_ca_cannot_connect(nodes: Link) -> None:
    # hospitalA's registered key, but the outsiders' CA: the server certificate is not trusted
    p = nodes.start_node("hospitalA", nodes.pki / "sites" / "hospitalA" / "identity.key",
                         nodes.other / "ca.pem")
    assert _wait_exit(p, 30) == 1
    log = p.log_path.read_text()
    assert SUPERNODE_CONNECTION_ERROR_LOG in log and "CERTIFICATE_VERIFY_FAILED" in log
    assert nodes.node_ids["hospitalA"] not in online_node_ids(nodes.env, CONN)


def test_keyless_node_cannot_self_register(nodes: Link) -> None:
    # right CA, no identity key: Flower would self-register it on an open SuperLink
    before = {int(n["node-id"]) for n in list_nodes(nodes.env, CONN)}
    argv = supernode_argv(f"127.0.0.1:{nodes.port}", free_port(), {"site": "anon"},
                          insecure=False, max_retries=0)
    argv += supernode_security_args(nodes.pki / "ca.pem")
    p = ManagedProcess("supernode-keyless", argv, nodes.root / "logs" / "keyless.log",
                       flower_env(nodes.root / "home-keyless"), cwd=nodes.root).start()
    nodes.nodes.append(p)
    assert _wait_exit(p, 30) == 1
    log = p.log_path.read_text()
    assert SUPERNODE_CONNECTION_ERROR_LOG in log
    assert "All SuperNodes must be registered via the CLI" in log
    assert {int(n["node-id"]) for n in list_nodes(nodes.env, CONN)} == before


def test_plain_http_client_cannot_connect(nodes: Link) -> None:
    # no TLS and no key: an anonymous SuperNode that would self-register on an open SuperLink
    before = {int(n["node-id"]) for n in list_nodes(nodes.env, CONN)}
    argv = supernode_argv(f"127.0.0.1:{nodes.port}", free_port(), {"site": "anon"},
                          insecure=True, max_retries=0)
    p = ManagedProcess("supernode-plain", argv, nodes.root / "logs" / "plain.log",
                       flower_env(nodes.root / "home-plain"), cwd=nodes.root).start()
    nodes.nodes.append(p)
    assert _wait_exit(p, 30) == 1
    assert SUPERNODE_CONNECTION_ERROR_LOG in p.log_path.read_text()
    assert {int(n["node-id"]) for n in list_nodes(nodes.env, CONN)} == before
    assert not online_node_ids(nodes.env, CONN)


def test_registered_site_connects_and_answers(nodes: Link) -> None:
    key = nodes.pki / "sites" / "hospitalA" / "identity.key"
    check_identity_key(nodes.roster, "hospitalA", key)
    p = nodes.start_node("hospitalA", key, nodes.pki / "ca.pem")
    nodes.wait_online(nodes.node_ids["hospitalA"], p)
    status, log = nodes.run(str(nodes.app_dir))
    assert status == "finished:completed", log
    assert f"TINYAPP-REPLY node={nodes.node_ids['hospitalA']} site=hospitalA" in log, log


@pytest.mark.slow
def test_site_runs_only_consortium_signed_apps(nodes: Link) -> None:
    trusted = trusted_entities_file(nodes.roster, nodes.root / "trusted-entities.yaml")
    key = nodes.pki / "sites" / "hospitalB" / "identity.key"
    p = nodes.start_node("hospitalB", key, nodes.pki / "ca.pem", trusted=trusted)
    nid = nodes.node_ids["hospitalB"]
    nodes.wait_online(nid, p)

    # 1. unsigned bundle uploaded by `flwr run ./app`: the site refuses to run it
    status, log = nodes.run(str(nodes.app_dir))
    assert status == "finished:completed", log  # the ServerApp got an error reply, no answer
    assert f"TINYAPP-ERROR node={nid}" in log, log
    assert "TINYAPP-REPLY" not in log, log
    assert "App verification is not supported" in p.log_path.read_text()

    fab = build_fab(nodes.app_dir)
    # 2. the same bundle signed by a key the site does not trust: refused
    spec = nodes.registry.publish(fab, [sign_fab(fab, nodes.other / "app-signing.key",
                                                 nodes.other_roster.app_signing.key_id)])
    status, log = nodes.run(spec)
    assert f"TINYAPP-ERROR node={nid}" in log and "TINYAPP-REPLY" not in log, log
    assert "FAB verification failed" in p.log_path.read_text()

    # 3. signed with the consortium's key (the key id the site trusts): it runs
    spec = nodes.registry.publish(fab, [sign_fab(fab, nodes.pki / "app-signing.key",
                                                 nodes.roster.app_signing.key_id)])
    assert spec == "@fedsegtest/tinyapp==1.0.0"
    status, log = nodes.run(spec)
    assert status == "finished:completed", log
    assert f"TINYAPP-REPLY node={nid} site=hospitalB" in log, log
    assert not re.search(r"TINYAPP-ERROR", log), log
    assert p.poll() is None  # the refusals did not take the site down
    json.dumps(nodes.node_ids)  # keep the node ids printable for a failure message
