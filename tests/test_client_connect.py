"""``fedseg-client`` says WHY it cannot connect, in one line, within seconds (issue #16), with
real processes: the real ``fedseg-client`` executable against an unresolvable name, a closed
port, a real fleet proxy (``python -m fedseg.runtime.fleet_proxy``) in front of a real TLS
SuperLink with SuperNode authentication when the site holds another consortium's CA, the same
server when the site's key was never registered there, and the SuperLink's own port instead of
the proxy's — where the client used to enrol and fail minutes later at its first model download
and now stops at once with one line naming ``server`` and the port to use.

The probe itself (``fedseg/client/probe.py``) is checked directly against the same processes,
and the SuperNode's log now carries Flower's own reason for each failed attempt
(``fedseg/runtime/supernode.py``). Every process is stopped in teardown.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedseg.client.probe import probe
from fedseg.data.demo import make_demo_data
from fedseg.privacy.provision import provision
from fedseg.privacy.transport import register_sites
from fedseg.runtime.processes import (
    BIN_DIR,
    ManagedProcess,
    flower_env,
    free_port,
    stop_all,
    superlink_argv,
    wait_for_port,
    write_flwr_connection,
)

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "OMP_NUM_THREADS": "1"}
WAIT_S = 90.0  # generous: a busy 2-core machine; the lines come within seconds when idle


class Server:
    """A TLS SuperLink with SuperNode authentication on 127.0.0.1 (as fedseg-server starts it)
    and the fleet proxy in front of it; hospitalA's key registered, hospitalB's not."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = root / "pki"
        self.roster = provision(self.pki, ["hospitalA", "hospitalB"], ["127.0.0.1", "localhost"],
                                days=2, consortium="connecttest")
        self.other = root / "other-pki"  # another consortium: its own CA, roster and keys
        provision(self.other, ["hospitalA"], ["127.0.0.1"], days=2, consortium="outsider")
        self.superlink_port, self.public = free_port(), free_port()
        self.procs: list[ManagedProcess] = []
        self.data = make_demo_data(root / "demo", sites=1, cases=2, test_cases=0)[0]

    def start(self) -> Server:
        p = self.pki
        ssl = (p / "server.pem", p / "server.key", p / "ca.pem")
        self.superlink = self._spawn("superlink", superlink_argv(
            self.superlink_port, insecure=False, ssl=ssl, enable_auth=True),
            flower_env(self.root / "superlink-home"))
        self.proxy = self._spawn("proxy", [
            sys.executable, "-m", "fedseg.runtime.fleet_proxy", "--listen",
            f"127.0.0.1:{self.public}", "--upstream", f"https://127.0.0.1:{self.superlink_port}",
            "--certfile", str(ssl[0]), "--keyfile", str(ssl[1]), "--upstream-ca", str(ssl[2])],
            ENV)
        wait_for_port("127.0.0.1", self.superlink_port, 90, self.superlink)
        wait_for_port("127.0.0.1", self.public, 90, self.proxy)
        admin = flower_env(self.root / "admin")
        write_flwr_connection(self.root / "admin", "local", f"127.0.0.1:{self.superlink_port}",
                              insecure=False, root_certificates=p / "ca.pem")
        register_sites(self.roster, admin, "local", sites=["hospitalA"])
        return self

    def _spawn(self, name: str, argv: list[str], env: dict) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.root / "logs" / f"{name}.log", env,
                              cwd=self.root).start()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        stop_all(self.procs, timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    s = Server(tmp_path_factory.mktemp("connect"))
    try:
        yield s.start()
    finally:
        s.stop()


class Client:
    """The real ``fedseg-client`` executable, its output in a file."""

    def __init__(self, root: Path, name: str, argv: list[str]) -> None:
        self.out = root / f"{name}.out"
        self.file = self.out.open("w")
        self.proc = subprocess.Popen([str(BIN_DIR / "fedseg-client"), *argv], cwd=root, env=ENV,
                                     stdout=self.file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.started = time.monotonic()

    def text(self) -> str:
        return self.out.read_text()

    def wait_for(self, needle: str, timeout: float = WAIT_S) -> tuple[str, float]:
        """(the output line with ``needle``, seconds after the 'connecting to' line)."""
        deadline = time.monotonic() + timeout
        connecting = None
        while time.monotonic() < deadline:
            text = self.text()
            if connecting is None and "connecting to" in text:
                connecting = time.monotonic()
            for line in text.splitlines():
                if needle in line:
                    return line, time.monotonic() - (connecting or self.started)
            if self.proc.poll() is not None and needle not in self.text():
                break
            time.sleep(0.2)
        pytest.fail(f"no '{needle}' from fedseg-client in {timeout:.0f} s "
                    f"(exit {self.proc.poll()}):\n{self.text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.file.close()


def _client(server: Server, name: str, address: str, site: str = "hospitalA",
            pki: Path | None = None) -> Client:
    return Client(server.root, name, [
        "--site", site, "--data", str(server.data), "--server", address,
        "--pki", str(pki or server.pki), "--cache", str(server.root / f"cache-{name}"),
        "--no-site-worker", "--restart-delay-s", "1"])


def _one_line_within(client: Client, needle: str, seconds: float) -> str:
    try:
        line, after = client.wait_for(needle)
    finally:
        client.stop()
    assert after < seconds, f"'{needle}' came {after:.1f} s after the start:\n{client.text()}"
    assert "Traceback" not in client.text(), client.text()
    return line


def test_unresolvable_name(server: Server) -> None:
    c = _client(server, "dns", "no-such-host.invalid:9092")
    log = server.root / "cache-dns" / "logs" / "supernode.log"
    try:
        line, after = c.wait_for("cannot connect (dns)")
        assert after < 30, c.text()
        deadline = time.monotonic() + WAIT_S  # Flower's reason, now in the SuperNode's log
        while "Connection attempt failed with exception" not in _read(log):
            assert time.monotonic() < deadline, _read(log)
            time.sleep(0.5)
    finally:
        c.stop()
    assert "cannot resolve 'no-such-host.invalid'" in line and "field 'server'" in line, line
    assert c.text().count("cannot connect (dns)") == 1, c.text()  # said once, not per attempt


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def test_closed_port(server: Server) -> None:
    closed = free_port()
    c = _client(server, "refused", f"127.0.0.1:{closed}")
    line = _one_line_within(c, "cannot connect (refused)", 30)
    assert f"connection refused at 127.0.0.1:{closed}" in line and "'port'" in line, line


def test_wrong_ca(server: Server) -> None:
    c = _client(server, "wrongca", f"127.0.0.1:{server.public}", pki=server.other)
    line = _one_line_within(c, "cannot connect (tls)", 30)
    assert "not trusted by this site's CA" in line and "root_certificates" in line, line


def test_key_not_registered(server: Server) -> None:
    c = _client(server, "auth", f"127.0.0.1:{server.public}", site="hospitalB")
    try:
        line, after = c.wait_for("cannot connect (auth)")
        assert after < 60, c.text()
        time.sleep(8)  # the SuperNode is restarted meanwhile: the line is not repeated
    finally:
        c.stop()
    assert "refused the identity key of site 'hospitalB'" in line, line
    assert c.text().count("is fedseg-server's public port") == 1, c.text()  # the right server
    assert c.text().count("cannot connect (auth)") == 1, c.text()


def test_superlink_port_instead_of_the_proxy(server: Server) -> None:
    """Pointed at the SuperLink's own port, the site stops at once with one line (it used to
    enrol, fingerprint and preprocess, then fail at its first model download: bulk 404)."""
    c = _client(server, "wrongport", f"127.0.0.1:{server.superlink_port}")
    try:
        code = c.proc.wait(timeout=WAIT_S)
    finally:
        c.stop()
    errors = [ln for ln in c.text().splitlines() if ln.startswith("fedseg-client: error:")]
    assert code == 2 and len(errors) == 1, c.text()
    assert "field 'server'" in errors[0] and "SuperLink's own port" in errors[0], errors
    assert "'port'" in errors[0] and "Traceback" not in c.text()


def test_probe_directly(server: Server) -> None:
    good = probe(f"127.0.0.1:{server.public}", server.pki / "ca.pem")
    assert good.ok, good
    assert probe(f"localhost:{server.public}", server.pki / "ca.pem").ok
    assert probe(f"127.0.0.1:{server.superlink_port}", server.pki / "ca.pem").kind == "superlink"
    assert probe(f"127.0.0.1:{server.public}", server.other / "ca.pem").kind == "tls"
    plain = probe(f"127.0.0.1:{server.public}", None, insecure=True)
    assert plain.kind == "tls-expected", plain
    tls_to_plain = probe(f"127.0.0.1:{_plain_http_server(server)}", server.pki / "ca.pem")
    assert tls_to_plain.kind == "not-tls", tls_to_plain


def _plain_http_server(server: Server) -> int:
    """A plain-HTTP fleet proxy (an insecure loopback trial's) for the TLS-to-plain case."""
    port = free_port()
    proc = server._spawn("plain-proxy", [
        sys.executable, "-m", "fedseg.runtime.fleet_proxy", "--listen", f"127.0.0.1:{port}",
        "--upstream", f"http://127.0.0.1:{free_port()}", "--insecure"], ENV)
    wait_for_port("127.0.0.1", port, 90, proc)
    return port


def test_probe_names_the_certificates_names(tmp_path: Path) -> None:
    """``server`` uses a name the certificate was not issued for: the line says which names
    it has (a fleet proxy in this process, certificate for 127.0.0.1 only)."""
    from fedseg.runtime.fleet_proxy import FleetProxy

    pki = tmp_path / "pki"
    provision(pki, ["hospitalA"], ["127.0.0.1"], days=2, consortium="ipsonly")
    px = FleetProxy(f"127.0.0.1:{free_port()}", f"https://127.0.0.1:{free_port()}",
                    pki / "server.pem", pki / "server.key", pki / "ca.pem").start()
    try:
        assert probe(f"127.0.0.1:{px.port}", pki / "ca.pem").ok
        wrong = probe(f"localhost:{px.port}", pki / "ca.pem", source="hospitalA.toml")
    finally:
        px.stop()
    assert wrong.kind == "tls-name", wrong
    assert "hospitalA.toml: field 'server'" in wrong.line and "not valid for 'localhost'" in wrong.line
    assert "it names 127.0.0.1" in wrong.line and "--server-san localhost" in wrong.line
