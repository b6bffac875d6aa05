"""Transport security with REAL flower-superlink / flower-supernode processes on 127.0.0.1.

First the mechanisms, on a hand-started SuperLink: HTTPS with the provisioned server
certificate, SuperNode authentication on, the sites of the consortium roster registered, and
FLWR_SUPERGRID_API_URL pointing at fedseg's app registry (for signed app bundles). A second
provisioning run plays the outsider: its CA and its site key are not the consortium's. A tiny
Flower app (one query, one reply naming the site) is written per test session.

Then the same guarantees from ``fedseg-server start`` and ``fedseg-client`` configured with
nothing but their provisioning folder (``pki``): the SuperLink on 127.0.0.1 only with TLS and
``--enable-supernode-auth``, every roster site registered, the public port the fleet proxy — a
run submission or key registration aimed at it is refused (404) —, a site key not in the roster
refused, a SuperNode without the CA or with a wrong one unable to connect, and (slow) a default
site that does not run an unsigned bundle but runs the consortium-signed job, and refuses to
answer a job without secure aggregation. Every process is stopped in teardown.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
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
    stop_all,
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


# =================================================================== fedseg-server's defaults
# The same checks against ``fedseg-server start`` configured with NOTHING but ``pki``: the real
# CLI, its SuperLink (127.0.0.1 only, TLS, SuperNode authentication, roster sites registered),
# its fleet proxy on the public port and its signed job submission.

SERVER_TOML = """host = "127.0.0.1"
port = {public}
superlink_port = {superlink}
state_dir = "state"
pki = "pki"

[job]
run_dir = "run"
min_sites = 2
enrol_timeout_s = 900
plan_preset = "tiny"
{job_extra}
"""


class Served:
    """``fedseg-server start`` with its defaults, on free loopback ports; stopped in teardown."""

    def __init__(self, root: Path, job_extra: str = "") -> None:
        self.root = root
        self.pki = root / "pki"
        self.other = root / "other"
        self.roster = provision(self.pki, ["hospitalA", "hospitalB"], ["127.0.0.1", "localhost"],
                                days=2, consortium="served")
        provision(self.other, ["hospitalA"], ["127.0.0.1", "localhost"], days=2,
                  consortium="outsiders")
        self.app_dir = _write_app(root / "app")
        self.public, self.superlink = free_port(), free_port()
        (root / "server.toml").write_text(SERVER_TOML.format(
            public=self.public, superlink=self.superlink, job_extra=job_extra))
        self.state = root / "state"
        self.admin = flower_env(self.state / ".flwr")  # the connection fedseg-server writes
        self.server = ManagedProcess(
            "fedseg-server", ["fedseg-server", "start", "--config", str(root / "server.toml")],
            root / "logs" / "fedseg-server.log", flower_env(None), cwd=root)
        self.procs: list[ManagedProcess] = [self.server]

    def start(self) -> Served:
        self.server.start()
        wait_for_port("127.0.0.1", self.public, 120, self.server)  # the proxy opens last
        deadline = time.monotonic() + 120
        status = self.root / "run" / "status.json"
        while not (status.is_file() and json.loads(status.read_text()).get("flower_run_id")):
            if self.server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the job was not submitted:\n" + self.log())
            time.sleep(0.5)
        return self

    def log(self) -> str:
        return self.server.log_path.read_text(errors="replace")

    def node(self, name: str, key: Path | None, ca: Path | None) -> ManagedProcess:
        """A bare flower-supernode aimed at the PUBLIC address (the fleet proxy)."""
        argv = supernode_argv(f"127.0.0.1:{self.public}", free_port(), {"site": name},
                              insecure=False, root_certificates=ca, auth_private_key=key,
                              max_retries=0)
        p = ManagedProcess(f"supernode-{name}", argv,
                           self.root / "logs" / f"{name}-{time.time_ns()}.log",
                           flower_env(self.root / f"home-{name}"), cwd=self.root).start()
        self.procs.append(p)
        return p

    def stop(self) -> None:
        stop_all(self.procs, timeout=15)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    s = Served(tmp_path_factory.mktemp("served"))
    try:
        yield s.start()
    finally:
        s.stop()


def _https(port: int, method: str, path: str, ca: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        conn.request(method, path, body=b"x" if method == "POST" else None)
        return conn.getresponse().status
    finally:
        conn.close()


def test_server_defaults_superlink_on_loopback_tls_auth_sites_registered(served: Served) -> None:
    pid = int((served.state / "superlink.pid").read_text())
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == str(served.superlink)
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert argv[argv.index("--ssl-certfile") + 1] == str(served.pki / "server.pem")
    assert argv[argv.index("--ssl-ca-certfile") + 1] == str(served.pki / "ca.pem")
    # every roster site registered (none online yet); registering again is a no-op
    ids = json.loads((served.state / "node_ids.json").read_text())
    assert set(ids) == set(served.roster.sites)
    listed = {int(n["node-id"]): n["status"] for n in list_nodes(served.admin, "fedseg")}
    assert listed == {int(v): "registered" for v in ids.values()}
    assert register_sites(served.roster, served.admin, "fedseg") == {s: None for s in ids}
    # the job went in as the consortium-signed bundle (the app registry's spec)
    assert "job signed" in served.log() and "TLS, SuperNode authentication" in served.log()
    # the public port serves TLS with the consortium's certificate and only /v1/fleet/
    for method, path in (("GET", "/docs"), ("GET", "/health"), ("POST", "/v1/control/list-runs"),
                         ("POST", "/v1/runtime/pull-app-inputs")):
        assert _https(served.public, method, path, served.pki / "ca.pem") == 404, path
    with pytest.raises(ssl.SSLError):
        _https(served.public, "GET", "/docs", served.other / "ca.pem")


def test_run_submission_aimed_at_the_public_address_is_refused(served: Served) -> None:
    outside = flower_env(served.root / "outside")
    write_flwr_connection(served.root / "outside", "public", f"127.0.0.1:{served.public}",
                          insecure=False, root_certificates=served.pki / "ca.pem")
    before = flwr_cli(["ls", "fedseg"], served.admin)["runs"]
    with pytest.raises(FedsegError, match="404"):
        flwr_cli(["run", str(served.app_dir), "public"], outside, timeout=120)
    with pytest.raises(FedsegError, match="404"):
        flwr_cli(["ls", "public"], outside)
    pub = served.root / "intruder.pub"
    pub.write_text((served.other / "sites" / "hospitalA" / "identity.pub").read_text())
    with pytest.raises(FedsegError, match="404"):
        flwr_cli(["supernode", "register", str(pub), "public", "--name", "intruder"], outside)
    # nothing was submitted or registered: the job is still the only run
    after = flwr_cli(["ls", "fedseg"], served.admin)["runs"]
    assert [r["run-id"] for r in after] == [r["run-id"] for r in before]
    assert len(list_nodes(served.admin, "fedseg")) == len(served.roster.sites)
    proxy_log = (served.state / "logs" / "fleet-proxy.log").read_text()
    assert "refused POST /v1/control/start-run" in proxy_log
    assert "refused POST /v1/control/register-node" in proxy_log


def test_site_key_not_in_the_roster_is_refused(served: Served) -> None:
    before = {int(n["node-id"]) for n in list_nodes(served.admin, "fedseg")}
    # right CA, a valid P-384 key — but another consortium's: never registered
    p = served.node("intruder", served.other / "sites" / "hospitalA" / "identity.key",
                    served.pki / "ca.pem")
    assert _wait_exit(p, 60) == 1
    log = p.log_path.read_text()
    assert SUPERNODE_CONNECTION_ERROR_LOG in log and "Failed to activate SuperNode" in log
    superlink_log = (served.state / "logs" / "superlink.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in superlink_log
    assert {int(n["node-id"]) for n in list_nodes(served.admin, "fedseg")} == before
    assert not online_node_ids(served.admin, "fedseg")


def test_supernode_without_the_ca_or_with_a_wrong_ca_cannot_connect(served: Served) -> None:
    key = served.pki / "sites" / "hospitalA" / "identity.key"  # a registered key
    wrong = served.node("hospitalA", key, served.other / "ca.pem")
    system = served.node("hospitalA", key, None)  # no CA: the system trust store
    for p in (wrong, system):
        assert _wait_exit(p, 60) == 1
        log = p.log_path.read_text()
        assert SUPERNODE_CONNECTION_ERROR_LOG in log and "CERTIFICATE_VERIFY_FAILED" in log, log
    assert not online_node_ids(served.admin, "fedseg")


@pytest.mark.slow
def test_default_sites_refuse_an_unsigned_bundle_and_a_plain_job(tmp_path: Path) -> None:
    """``fedseg-client`` with only ``pki`` against ``fedseg-server`` with only ``pki``, the job
    set to run WITHOUT secure aggregation: (1) an unsigned bundle submitted on the server's
    loopback is not run by the site; (2) the signed fedseg job is run — the site answers its
    enrolment with fedseg's own refusal: it does not send its case counts unmasked — so the job
    ends with no site enrolled."""
    from fedseg.data.demo import make_demo_data

    data = make_demo_data(tmp_path / "demo", sites=2, cases=2, test_cases=0)
    s = Served(tmp_path, job_extra="secure_aggregation = false")
    clients: list[ManagedProcess] = []

    def client(site: str, folder: Path) -> ManagedProcess:
        argv = ["fedseg-client", "--site", site, "--data", str(folder), "--pki", str(s.pki),
                "--server", f"127.0.0.1:{s.public}", "--cache", str(tmp_path / "cache" / site),
                "--device", "cpu"]
        p = ManagedProcess(f"client-{site}", argv, tmp_path / "logs" / f"client-{site}.log",
                           flower_env(None), cwd=tmp_path).start()
        s.procs.append(p)
        clients.append(p)
        return p

    try:
        s.start()
        a = client("hospitalA", data[0])
        nid = int(json.loads((s.state / "node_ids.json").read_text())["hospitalA"])
        deadline = time.monotonic() + 120
        while nid not in online_node_ids(s.admin, "fedseg"):
            if a.poll() is not None or time.monotonic() > deadline:
                pytest.fail("hospitalA did not come online:\n" + a.log_path.read_text())
            time.sleep(1)
        # (1) the job waits for min_sites=2; meanwhile an UNSIGNED bundle via the loopback admin
        run_id = int(flwr_cli(["run", str(s.app_dir), "fedseg"], s.admin)["run-id"])
        deadline = time.monotonic() + 150
        status = "unknown"
        while time.monotonic() < deadline and not status.startswith("finished"):
            time.sleep(1)
            runs = flwr_cli(["ls", "fedseg", "--run-id", str(run_id)], s.admin).get("runs", [])
            status = str(runs[0]["status"]) if runs else "unknown"
        out = subprocess.run([str(BIN_DIR / "flwr"), "log", str(run_id), "fedseg", "--show"],
                             env=s.admin, capture_output=True, text=True, timeout=60)
        log = out.stdout + out.stderr
        assert f"TINYAPP-ERROR node={nid}" in log and "TINYAPP-REPLY" not in log, log
        site_log = tmp_path / "cache" / "hospitalA" / "logs" / "supernode.log"
        assert "App verification is not supported" in site_log.read_text()
        # (2) a second site: the signed plain job enrols both; both refuse to answer in clear
        client("hospitalB", data[1])
        assert s.server.proc is not None
        assert s.server.proc.wait(timeout=300) == 2, s.log()
        assert "only 0 site(s) enrolled" in s.log()
        recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        refused = [r for r in recs if r["phase"] == "enrol" and r["status"] == "refused"]
        assert len(refused) == 2, recs
        for r in refused:
            assert "refuses to send its case counts unmasked" in r["reason"], r
        for c in clients:  # the sites are still up: a refusal is an answer, not a crash
            assert c.poll() is None
    finally:
        s.stop()
