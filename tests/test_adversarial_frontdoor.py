"""The public front door under attack (issue #13, points 1 and 2), with REAL processes on 127.0.0.1.

What runs: a SuperLink (TLS, ``--enable-supernode-auth``, hospitalA's key registered), the fleet
proxy as a process of its own (``python -m fedseg.runtime.fleet_proxy``, its RSS measured from
``/proc``), forwarding ``/fedseg/bulk/`` to a real bulk server (``BulkServer``, the ServerApp's, in
this process), and hospitalA's real SuperNode connected THROUGH the proxy with ``--max-retries 0``
(one failed Fleet request and it exits), which must stay online while every attack runs.

Attacks, each as a few lines of socket code would make them (the attacker is a different
loopback address, 127.0.0.2+, so that per-client limits hit it and not the honest site):
1. ``PUT /fedseg/bulk/<malformed or unknown token>`` with a body that is itself an HTTP request
   (request smuggling): before the fix the body stayed in the proxy's pooled connection to the
   bulk server and became the answer to the next honest transfer. Honest downloads and uploads
   run bit-exact during and after it; the bulk server closes a connection whose body it refused.
2. Three concurrent 250 MB chunked POSTs to ``/v1/fleet/push-messages`` without node-auth
   headers, plus 250 MB declared by a forged signature and by a fresh (unregistered) key: all
   refused before their bodies are read; the proxy's and the SuperLink's RSS stay < 2x idle.
   A 64 MB header is refused after a few KB; incomplete request heads and idle bodies are closed
   after their timeouts; connections beyond the per-client and total limits are closed.

Timing: nothing waits on a fixed sleep for an outcome; every wait is an event or a poll with a
generous bound (the box is shared).
"""

from __future__ import annotations

import base64
import os
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedseg.client.bulk_client import BulkEndpoint
from fedseg.errors import FedsegError
from fedseg.privacy.provision import provision
from fedseg.privacy.transport import online_node_ids, register_sites
from fedseg.runtime.processes import (
    ManagedProcess,
    flower_env,
    free_port,
    stop_all,
    supernode_argv,
    wait_for_port,
    write_flwr_connection,
)
from fedseg.server.bulk_server import BulkServer

HEAD_TIMEOUT_S = 3.0  # the proxy under test is started with short timeouts (defaults: docs)
BODY_IDLE_S = 3.0
PER_CLIENT = 16
ATTACK_MB = 250
MB = 1 << 20


def _env() -> dict[str, str]:
    env = flower_env(None, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    env.pop("FLWR_HOME", None)
    return env


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (``/proc/PID/status``: VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class PeakRss:
    """Samples the RSS of some processes every 20 ms in a thread; ``peak[pid]`` afterwards."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = {p: rss(p) for p in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for p in self.pids:
                self.peak[p] = max(self.peak[p], rss(p))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class Door:
    """SuperLink + fleet proxy (own process) + bulk server + hospitalA's SuperNode via the proxy."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = root / "pki"
        self.roster = provision(self.pki, ["hospitalA", "hospitalB"], ["127.0.0.1", "localhost"],
                                days=2, consortium="frontdoor")
        self.ctx = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
        self.port, self.public = free_port(), free_port()
        self.admin = flower_env(root / "admin")
        self.procs: list[ManagedProcess] = []
        self.bulk = BulkServer(root / "spool", public_url="/fedseg/bulk")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> ManagedProcess:
        p = ManagedProcess(name, argv, self.root / "logs" / f"{name}.log", env,
                           cwd=self.root).start()
        self.procs.append(p)
        return p

    def start(self) -> Door:
        p = self.pki
        self.superlink = self._spawn("superlink", [
            "flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
            "--database", ":flwr-in-memory:", "--disable-runtime-dependency-installation",
            "--ssl-certfile", str(p / "server.pem"), "--ssl-keyfile", str(p / "server.key"),
            "--ssl-ca-certfile", str(p / "ca.pem"), "--enable-supernode-auth"],
            flower_env(self.root / "superlink-home"))
        self.bulk.start()
        self.proxy = self._spawn("proxy", [
            sys.executable, "-m", "fedseg.runtime.fleet_proxy",
            "--listen", f"127.0.0.1:{self.public}", "--upstream", f"https://127.0.0.1:{self.port}",
            "--certfile", str(p / "server.pem"), "--keyfile", str(p / "server.key"),
            "--upstream-ca", str(p / "ca.pem"), "--timeout", "60",
            "--bulk-upstream", f"http://127.0.0.1:{self.bulk.port}",
            "--head-timeout", str(HEAD_TIMEOUT_S), "--body-idle-timeout", str(BODY_IDLE_S),
            "--max-connections-per-client", str(PER_CLIENT)], _env())
        wait_for_port("127.0.0.1", self.port, 60, self.superlink)
        wait_for_port("127.0.0.1", self.public, 60, self.proxy)
        write_flwr_connection(self.root / "admin", "local", f"127.0.0.1:{self.port}",
                              insecure=False, root_certificates=p / "ca.pem")
        self.node_ids = register_sites(self.roster, self.admin, "local", sites=["hospitalA"])
        argv = supernode_argv(f"127.0.0.1:{self.public}", free_port(), {"site": "hospitalA"},
                              insecure=False, root_certificates=p / "ca.pem",
                              auth_private_key=p / "sites" / "hospitalA" / "identity.key",
                              max_retries=0)
        self.site = self._spawn("supernode-hospitalA", argv, flower_env(self.root / "home-A"))
        return self

    def stop(self) -> None:
        stop_all(self.procs, timeout=10)
        self.bulk.stop()

    def proxy_log(self) -> str:
        return self.proxy.log_path.read_text(errors="replace")

    def tls(self, source: str = "127.0.0.1", port: int | None = None,
            timeout: float = 30.0) -> ssl.SSLSocket:
        """A TLS connection to the proxy from ``source`` (another loopback address = another
        client as far as per-client limits go)."""
        raw = socket.create_connection(("127.0.0.1", port or self.public), timeout=timeout,
                                       source_address=(source, 0))
        return self.ctx.wrap_socket(raw, server_hostname="127.0.0.1")

    def endpoint(self) -> BulkEndpoint:
        return BulkEndpoint(server=f"127.0.0.1:{self.public}", ca_file=str(self.pki / "ca.pem"))

    def wait_online(self, timeout: float = 120.0) -> None:
        nid = self.node_ids["hospitalA"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.site_alive()
            if nid in online_node_ids(self.admin, "local"):
                return
            time.sleep(0.5)
        pytest.fail(f"hospitalA not online via the proxy:\n{self.site.log_path.read_text()}")

    def site_alive(self) -> None:
        """hospitalA's SuperNode runs with --max-retries 0: alive = no Fleet request failed."""
        if self.site.poll() is not None:
            pytest.fail(f"hospitalA's SuperNode exited ({self.site.poll()}):\n"
                        f"{self.site.log_path.read_text()[-4000:]}\nproxy:\n{self.proxy_log()[-4000:]}")


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory):
    d = Door(tmp_path_factory.mktemp("frontdoor"))
    try:
        yield d.start()
    finally:
        d.stop()


def _read_status(sock: ssl.SSLSocket, timeout: float = 15.0) -> int | None:
    """The status code of the answer on ``sock``; None if it was closed (or reset) first."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            got = sock.recv(4096)
            if not got:
                return None
            data += got
    except (OSError, ssl.SSLError):
        return None
    return int(data.split(b" ", 2)[1])


def _closed_by_peer(sock: ssl.SSLSocket, timeout: float) -> bool:
    """True once the peer closed ``sock`` (EOF/reset), reading and dropping any answer; False if
    still open after ``timeout`` s."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except TimeoutError:
        return False
    except (OSError, ssl.SSLError):
        return True


def _wait_closed(socks: list[ssl.SSLSocket], want: int, timeout: float) -> list[ssl.SSLSocket]:
    """Wait until ``want`` of ``socks`` are closed by the peer (or ``timeout`` s); those."""
    closed: list[ssl.SSLSocket] = []
    deadline = time.monotonic() + timeout
    while len(closed) < want and time.monotonic() < deadline:
        for s in select.select([s for s in socks if s not in closed], [], [], 0.2)[0]:
            if _closed_by_peer(s, 0.1):
                closed.append(s)
    return closed


def _stream(sock: ssl.SSLSocket, head: bytes, chunks: Iterator[bytes]) -> tuple[int | None, int, float]:
    """Send ``head`` then ``chunks`` as an attacker would, stopping as soon as the server answers
    or stops taking bytes; (status or None, body bytes sent, seconds)."""
    t0 = time.monotonic()
    sent = 0
    sock.settimeout(20.0)
    try:
        sock.sendall(head)
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0] or sock.pending():
                break  # an answer (or EOF) is waiting: the server did not read on
            sock.sendall(chunk)
            sent += len(chunk)
    except (OSError, ssl.SSLError):  # reset / broken pipe / send timeout: it stopped reading
        pass
    return _read_status(sock), sent, time.monotonic() - t0


def _chunked(total: int, size: int = MB) -> Iterator[bytes]:
    """A chunked-encoded body of ``total`` bytes, made as it is sent (never held)."""
    block = b"\x00" * size
    for _ in range(total // size):
        yield f"{size:x}\r\n".encode() + block + b"\r\n"
    yield b"0\r\n\r\n"


def _raw(total: int, size: int = MB) -> Iterator[bytes]:
    block = b"\x00" * size
    for _ in range(total // size):
        yield block


def _signed_headers(private_key=None, public_key_bytes: bytes | None = None) -> str:
    """Flower's node-auth headers as a SuperNode makes them (its own signing functions), for a
    fresh key pair unless given; ``public_key_bytes`` replaces the key named (a forgery)."""
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import (
        generate_key_pairs,
        public_key_to_bytes,
        sign_message,
    )

    if private_key is None:
        private_key, public_key = generate_key_pairs()
    else:
        public_key = private_key.public_key()
    ts = now().isoformat()
    sig = sign_message(private_key, ts.encode("ascii"))
    pk = public_key_bytes if public_key_bytes is not None else public_key_to_bytes(public_key)
    return (f"flwr-public-key: {base64.b64encode(pk).decode()}\r\n"
            f"flwr-timestamp: {ts}\r\n"
            f"flwr-signature: {base64.b64encode(sig).decode()}\r\n")


def _model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(1_500_000).astype(np.float32),
            "b": rng.standard_normal(33).astype(np.float32)}


# ------------------------------------------------------------------------------------------ tests
def test_honest_site_connects_through_the_guarded_proxy(door: Door) -> None:
    door.wait_online()
    assert "node key accepted by the SuperLink" in door.proxy_log()


def test_malformed_bulk_puts_do_not_desync_honest_transfers(door: Door) -> None:
    """Point 1. Each attack PUT carries, as its body, a complete request for an unknown offer:
    if anything forwarded or kept that body on a reused connection, the next honest transfer on
    it would be answered 404 (or 501) instead of its own data."""
    model = _model(3)
    down = door.bulk.offer(model)
    unknown = "A" * 43  # well formed, no such token: reaches the bulk server, which refuses it
    smuggled = f"GET /fedseg/bulk/{'Z' * 43} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    paths = ["/fedseg/bulk/short", "/fedseg/bulk/bad!token" + "x" * 40,
             f"/fedseg/bulk/{unknown}", f"/fedseg/bulk/{unknown}?x=1",
             f"/fedseg/bulk/{down.token[:-1]}%2F"]
    stop = threading.Event()
    attacks: list[tuple[str, int | None]] = []
    errors: list[str] = []

    def attacker(i: int) -> None:
        n = 0
        while not stop.is_set() or n < 2 * len(paths):
            path = paths[n % len(paths)]
            body = smuggled * (1 + (n % 3) * 2000)  # 40 B .. 160 KB of pipelined requests
            framing = (f"Content-Length: {len(body)}\r\n" if n % 2 == 0
                       else "Transfer-Encoding: chunked\r\n")
            data = body if n % 2 == 0 else f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
            try:
                with door.tls(source=f"127.0.0.{2 + i}") as s:
                    s.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\n{framing}\r\n".encode() + data)
                    attacks.append((path, _read_status(s)))
            except (OSError, ssl.SSLError) as err:
                attacks.append((path, None))
                errors.append(repr(err))
            n += 1

    def honest(i: int) -> None:
        site = door.endpoint()
        for k in range(6):
            got = site.fetch(down)
            assert all(np.array_equal(got[key], v) for key, v in model.items())
            slot = door.bulk.slot(sum(v.nbytes for v in model.values()))
            up = site.upload(slot, {key: v + i + k for key, v in model.items()})
            arrays = door.bulk.take(up)
            assert np.array_equal(arrays["w"], model["w"] + i + k)
            door.bulk.close_slot(slot.token)

    threads = [threading.Thread(target=attacker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        results: list[BaseException] = []

        def run(i: int) -> None:
            try:
                honest(i)
            except BaseException as err:  # noqa: BLE001 - reported below
                results.append(err)

        workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(240)
        assert not any(w.is_alive() for w in workers), "honest transfers hung"
        assert not results, f"honest transfer failed during the attack: {results[0]!r}"
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert len(attacks) >= 2 * len(paths)
    odd = [(p, c) for p, c in attacks if c not in (None, 400, 404, 409, 411)]
    assert not odd, odd
    assert {c for p, c in attacks if p == paths[0]} <= {404, None}
    # after the attack too: the first honest transfer on every pooled connection is its own
    for _ in range(4):
        got = door.endpoint().fetch(down)
        assert np.array_equal(got["w"], model["w"])
    door.bulk.withdraw(down)

    # the bulk server itself (the proxy's upstream) closes a connection whose body it refused
    for path in ("/fedseg/bulk/short", f"/fedseg/bulk/{unknown}"):
        with socket.create_connection(("127.0.0.1", door.bulk.port), timeout=30) as s:
            s.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(smuggled)}"
                      f"\r\n\r\n".encode() + smuggled)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.count(b"HTTP/1.1 ") == 1, data  # one answer: the body was not parsed
        assert b"connection: close" in data.lower()
    door.site_alive()


def test_unauthenticated_bodies_are_refused_before_they_are_read(door: Door) -> None:
    """Point 2: 3 x 250 MB chunked POSTs without node-auth headers (the reported attack), and
    250 MB declared under a forged signature, a fresh unregistered key, and hospitalB's public key
    without its private key. Refused from the headers; memory flat; the honest site stays."""
    # warm the proxy up (TLS, its upstream client) before measuring idle
    for _ in range(3):
        door.endpoint()
        with door.tls() as s:
            s.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            _read_status(s)
    idle = {door.proxy.pid: rss(door.proxy.pid), door.superlink.pid: rss(door.superlink.pid)}
    n = ATTACK_MB * MB
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    b_pub = public_key_to_bytes(load_ssh_public_key(
        (door.pki / "sites" / "hospitalB" / "identity.pub").read_bytes()))
    forged = _signed_headers().replace("flwr-signature: ", "flwr-signature: AAAA", 1)
    heads = [("chunked, no auth", b"Transfer-Encoding: chunked\r\n", _chunked)] * 3 + [
        ("250 MB declared, no auth", f"Content-Length: {n}\r\n".encode(), _raw),
        ("forged signature", (f"Content-Length: {n}\r\n" + forged).encode(), _raw),
        ("unregistered key", (f"Content-Length: {n}\r\n" + _signed_headers()).encode(), _raw),
        ("hospitalB's key, not signed by it",
         (f"Content-Length: {n}\r\n" + _signed_headers(public_key_bytes=b_pub)).encode(), _raw),
    ]
    results: dict[int, tuple[str, int | None, int, float]] = {}

    def attack(i: int, what: str, extra: bytes, body) -> None:
        with door.tls(source=f"127.0.0.{10 + i}") as s:
            head = (b"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/protobuf\r\n" + extra + b"\r\n")
            results[i] = (what, *_stream(s, head, body(n)))

    with PeakRss(list(idle)) as peak:
        threads = [threading.Thread(target=attack, args=(i, *h)) for i, h in enumerate(heads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert len(results) == len(heads), results
    for what, code, sent, _ in results.values():
        assert code in (None, 401, 411, 413, 503), (what, code)
        assert sent < 32 * MB, f"{what}: {sent / MB:.0f} MB were taken before the refusal"
    for pid, base in idle.items():
        assert peak.peak[pid] < 2 * base, (
            f"pid {pid} RSS {base / MB:.0f} MB idle -> {peak.peak[pid] / MB:.0f} MB under attack")
    print(f"\nfront door: proxy RSS {idle[door.proxy.pid] / MB:.0f} MB idle, "
          f"{peak.peak[door.proxy.pid] / MB:.0f} MB peak under attack; SuperLink "
          f"{idle[door.superlink.pid] / MB:.0f} -> {peak.peak[door.superlink.pid] / MB:.0f} MB; "
          + "; ".join(f"{w}: {c} after {s / MB:.1f} MB, {t:.2f} s" for w, c, s, t in results.values()))
    door.site_alive()


def test_oversize_header_is_refused_quickly(door: Door) -> None:
    """A 64 MB header: refused after the first kilobytes (the header limit), not parsed, never
    forwarded; the next honest request is served at once."""
    with door.tls(source="127.0.0.20") as s:
        head = b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nX-Big: "
        code, sent, secs = _stream(s, head, _raw(64 * MB, 256 << 10))
    assert code in (None, 400, 431)
    assert sent < 16 * MB, f"{sent / MB:.0f} MB of header taken"
    assert secs < 30
    # one who ignores the 400 and sends on is cut off too: asyncio's TLS shutdown alone would
    # read (and decrypt) on for 30 s; the proxy aborts the connection 0.5 s after closing it
    with door.tls(source="127.0.0.21") as s:
        s.settimeout(20)
        sent, t0 = 0, time.monotonic()
        with pytest.raises((OSError, ssl.SSLError)):
            s.sendall(head)
            while sent < 4096 * MB:
                s.sendall(b"a" * MB)
                sent += MB
    assert time.monotonic() - t0 < 20, f"{sent / MB:.0f} MB taken in {time.monotonic() - t0:.1f} s"
    got = door.endpoint().fetch(door.bulk.offer({"x": np.arange(5, dtype=np.float32)}))
    assert np.array_equal(got["x"], np.arange(5, dtype=np.float32))
    door.site_alive()


def test_incomplete_heads_are_closed_after_the_head_timeout(door: Door) -> None:
    """Slowloris: connections that send nothing, or a head one byte at a time, are closed once
    the head timeout has passed since they connected — not before, and not never."""
    socks: list[tuple[ssl.SSLSocket, bool, float]] = []
    for i in range(8):
        s = door.tls(source="127.0.0.30")
        slow = i % 2 == 0
        if slow:
            s.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append((s, slow, time.monotonic()))
    closed: dict[int, float] = {}
    deadline = time.monotonic() + HEAD_TIMEOUT_S + 60
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for i, (s, slow, _) in enumerate(socks):
            if i in closed:
                continue
            try:
                if slow:
                    s.settimeout(5)
                    s.sendall(b"x")
                if select.select([s], [], [], 0)[0] and not s.recv(4096):
                    closed[i] = time.monotonic()
            except (OSError, ssl.SSLError):
                closed[i] = time.monotonic()
        time.sleep(0.25)
    for s, _, _ in socks:
        s.close()
    assert len(closed) == len(socks), f"still open after {HEAD_TIMEOUT_S + 60} s: " \
        f"{[i for i in range(len(socks)) if i not in closed]}"
    for i, (_, slow, t0) in enumerate(socks):
        assert closed[i] - t0 >= HEAD_TIMEOUT_S - 0.5, (i, slow, closed[i] - t0)
    door.site_alive()


def test_idle_bodies_are_cut_off_and_the_slot_can_be_retried(door: Door) -> None:
    """A body that stops coming (a stalled upload, or an attacker holding the request open) is
    answered 408 and closed after the body idle timeout; a bulk slot it held can be used again."""
    model = _model(9)
    n = sum(v.nbytes for v in model.values())
    slot = door.bulk.slot(n)
    with door.tls(source="127.0.0.40") as s:
        s.sendall(f"PUT /fedseg/bulk/{slot.token} HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n"
                  f"\r\n".encode() + b"\x00" * 1000)
        t0 = time.monotonic()
        code = _read_status(s, timeout=BODY_IDLE_S + 60)
        assert code in (None, 408) and time.monotonic() - t0 >= BODY_IDLE_S - 0.5
        assert _closed_by_peer(s, 30)
    with door.tls(source="127.0.0.41") as s:  # the same for a Fleet request (small, signed)
        s.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                  + _signed_headers().encode() + b"\r\n" + b"\x00" * 100)
        assert _read_status(s, timeout=BODY_IDLE_S + 60) in (None, 408)
    deadline = time.monotonic() + 60
    while True:  # the bulk server sees the cut-off upstream stream end early: slot "failed"
        try:
            up = door.endpoint().upload(slot, model)
            break
        except FedsegError as err:
            if "409" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert np.array_equal(door.bulk.take(up)["w"], model["w"])
    door.bulk.close_slot(slot.token)
    door.site_alive()


def test_connection_limits_per_client_and_in_total(door: Door) -> None:
    """Connections beyond ``max_connections_per_client`` from one address, or beyond
    ``max_connections`` in all, are closed at once; the others stay; freed capacity is reused.
    (A second proxy, in this process, with a long head timeout so that only the limits act.)"""
    from fedseg.runtime.fleet_proxy import FleetProxy
    from fedseg.runtime.frontdoor import Limits

    p = door.pki
    px = FleetProxy(f"127.0.0.1:{free_port()}", f"https://127.0.0.1:{door.port}", p / "server.pem",
                    p / "server.key", p / "ca.pem", limits=Limits(
                        head_timeout_s=120, max_connections=6, max_connections_per_client=3)).start()
    held: list[ssl.SSLSocket] = []
    try:
        a = [door.tls(source="127.0.0.50", port=px.port) for _ in range(5)]
        held += a
        closed = _wait_closed(a, want=2, timeout=30)
        assert len(closed) == 2, "per-client limit 3: 2 of 5 must be closed"
        assert not any(_closed_by_peer(s, 1) for s in a if s not in closed)
        b = [door.tls(source="127.0.0.51", port=px.port) for _ in range(3)]
        held += b
        assert not any(_closed_by_peer(s, 1) for s in b)  # 3 + 3 = the total of 6
        extra = door.tls(source="127.0.0.52", port=px.port)
        held.append(extra)
        assert _closed_by_peer(extra, 30), "total limit 6: the 7th must be closed"
        for s in held:
            s.close()
        deadline = time.monotonic() + 60
        while True:  # the server notices the closes on its own schedule: poll, bounded
            with door.tls(port=px.port) as s:
                s.sendall(b"GET /docs HTTP/1.1\r\nHost: x\r\n\r\n")
                if _read_status(s) == 404:
                    break
            assert time.monotonic() < deadline, "capacity not freed after the clients left"
            time.sleep(0.2)
    finally:
        for s in held:
            s.close()
        px.stop()


def test_honest_site_survived_every_attack(door: Door) -> None:
    door.site_alive()
    assert door.node_ids["hospitalA"] in online_node_ids(door.admin, "local")
    assert "refused" in door.proxy_log()  # the attacks are logged ...
    assert os.path.getsize(door.proxy.log_path) < 2 * MB  # ... without flooding the log
