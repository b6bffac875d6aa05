"""The site's end of bulk array transfer: GET the global model, PUT the update.

Why hand-written (on the standard library's ``http.client``): the transfer is one request per
direction with a known length — read straight into one preallocated buffer, write memoryviews
of the update's arrays — which is less work per byte than any client library (and ``httpx``,
Flower's own dependency, would add a copy per chunk). Why bulk arrays bypass Flower's object
store and how access is controlled: ``fedseg/protocol/bulk.py``.

TLS: an ``https`` URL is verified against the site's consortium CA (node config
``root-certificates``, the same CA its SuperNode trusts). A URL without scheme and host (the
server advertises only the path when it sits behind ``fedseg-server``'s public port) is
resolved against the address the site's SuperNode connects to (node config ``server``).
"""

from __future__ import annotations

import http.client
import ssl
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

import numpy as np
from flwr.app import Message, RecordDict

from fedseg.errors import FedsegError
from fedseg.protocol.bulk import (
    URL_PATH,
    BulkDownload,
    BulkEnvelope,
    BulkRendezvous,
    BulkUploaded,
    BulkUploadSlot,
    buffers,
    get_envelope,
    layout_of,
    put_envelope,
    total_bytes,
    views,
)
from fedseg.protocol.messages import M, Msg
from fedseg.protocol.records import pack, unpack

CHUNK = 4 << 20
TIMEOUT_S = 300.0
ATTEMPTS = 3  # transient connection failures (server busy, proxy restarting) are retried
STEP_POLL_TIMEOUT_S = 60.0  # a rendezvous GET is held up to LONG_POLL_S (20 s) by the server


class BulkEndpoint:
    """How this site reaches the server's bulk URLs."""

    def __init__(self, server: str | None = None, ca_file: str | None = None,
                 insecure: bool = False) -> None:
        self.server = server
        self.ca_file = ca_file
        self.insecure = insecure

    def _connect(self, base: str, timeout: float = TIMEOUT_S) -> tuple[http.client.HTTPConnection, str]:
        if not base:  # path only: the address our SuperNode connects to
            if not self.server:
                raise FedsegError("the server sent a relative bulk-transfer URL but this site's "
                                  "node config has no 'server' address; start it with fedseg-client")
            base = ("http://" if self.insecure else "https://") + self.server
        u = urlsplit(base)
        if u.scheme == "https":
            ctx = ssl.create_default_context(cafile=self.ca_file)
            return http.client.HTTPSConnection(u.hostname, u.port or 443, timeout=timeout,
                                               context=ctx), u.path.rstrip("/")
        if u.scheme == "http":
            return http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout), \
                u.path.rstrip("/")
        raise FedsegError(f"bulk-transfer URL '{base}': expected http:// or https://")

    def _retrying(self, what: str, url: str, fn):
        err: Exception | None = None
        for attempt in range(ATTEMPTS):
            try:
                return fn()
            except (ConnectionError, TimeoutError, http.client.HTTPException, OSError) as e:
                if isinstance(e, ssl.SSLCertVerificationError):
                    raise FedsegError(f"{what} {url or self.server}: TLS verification failed ({e}); "
                                      "the site's root-certificates must be the consortium CA") from None
                err = e
                time.sleep(0.5 * (attempt + 1))
        raise FedsegError(f"{what} {url or self.server} failed after {ATTEMPTS} attempts: {err}; "
                          "the site must reach the server's bulk-transfer address (fedseg-server "
                          "serves it on its public port under /fedseg/bulk/)") from None

    def fetch(self, down: BulkDownload) -> dict[str, np.ndarray]:
        """The offered arrays (views into one buffer, read in place)."""
        def get() -> dict[str, np.ndarray]:
            conn, prefix = self._connect(down.url)
            try:
                conn.request("GET", prefix + URL_PATH + down.token)
                resp = conn.getresponse()
                if resp.status != 200:
                    raise FedsegError(f"server answered {resp.status}: "
                                      f"{resp.read(500).decode(errors='replace').strip()}")
                n = int(resp.getheader("Content-Length", "-1"))
                if n != down.nbytes or n != total_bytes(down.layout):
                    raise FedsegError(f"server sends {n} bytes, the message says {down.nbytes}")
                buf = np.empty(n, dtype=np.uint8)
                mv = memoryview(buf)
                got = 0
                while got < n:
                    k = resp.readinto(mv[got:min(n, got + CHUNK)])
                    if not k:
                        raise ConnectionError(f"download stopped after {got} of {n} bytes")
                    got += k
                return views(buf, down.layout)
            finally:
                conn.close()

        t0 = time.monotonic()
        try:
            out = self._retrying("downloading the global model from", down.url, get)
        except FedsegError as err:
            raise FedsegError(f"bulk download: {err}") from None
        _report("GET", down.nbytes, t0)
        return out

    def upload(self, slot: BulkUploadSlot, arrays: Mapping[str, np.ndarray]) -> BulkUploaded:
        layout = layout_of(arrays)
        n = total_bytes(layout)
        if n > slot.max_bytes:
            raise FedsegError(f"bulk upload: the update has {n} bytes, the server's slot takes "
                              f"at most {slot.max_bytes}")

        def put() -> None:
            conn, prefix = self._connect(slot.url)
            try:
                conn.putrequest("PUT", prefix + URL_PATH + slot.token, skip_accept_encoding=True)
                conn.putheader("Content-Type", "application/octet-stream")
                conn.putheader("Content-Length", str(n))
                conn.endheaders()
                try:
                    for mv in buffers(arrays.values()):
                        for i in range(0, len(mv), CHUNK):
                            conn.send(mv[i:i + CHUNK])
                except (BrokenPipeError, ConnectionResetError):
                    # the server refused before reading the body: its answer says why
                    try:
                        resp = conn.getresponse()
                    except (OSError, http.client.HTTPException):
                        raise ConnectionError("the server closed the upload") from None
                    raise FedsegError(f"server answered {resp.status}: "
                                      f"{resp.read(500).decode(errors='replace').strip()}") from None
                # 409: the slot is used (a retry after a lost answer) - not retried
                _expect_204(conn.getresponse())
            finally:
                conn.close()

        t0 = time.monotonic()
        try:
            self._retrying("uploading the update to", slot.url, put)
        except FedsegError as err:
            raise FedsegError(f"bulk upload: {err}") from None
        _report("PUT", n, t0)
        return BulkUploaded(token=slot.token, layout=layout, nbytes=n)

    def await_step(self, rv: BulkRendezvous, deadline: float) -> bytes | None:
        """The step request posted on ``rv`` (long polls until ``deadline``, a ``time.monotonic``
        value); None when the server closed it (the step went another way, or is over) or the
        deadline passed. A few connection failures in a row end it too (the server is gone)."""
        failures = 0
        while time.monotonic() < deadline:
            conn, prefix = self._connect(rv.url, timeout=STEP_POLL_TIMEOUT_S)
            try:
                conn.request("GET", prefix + URL_PATH + rv.token)
                resp = conn.getresponse()
                body = resp.read()
                failures = 0
                if resp.status == 200:
                    return body
                if resp.status != 204:  # 404: closed
                    return None
            except (ConnectionError, TimeoutError, http.client.HTTPException, OSError):
                failures += 1
                if failures >= ATTEMPTS:
                    return None
                time.sleep(0.5 * failures)
            finally:
                conn.close()
        return None

    def answer_step(self, rv: BulkRendezvous, body: bytes) -> None:
        """PUT the site's answer into ``rv`` (once); FedsegError if the server does not take it."""
        if len(body) > rv.max_bytes:
            raise FedsegError(f"step answer of {len(body)} bytes exceeds the rendezvous' {rv.max_bytes}")

        def put() -> None:
            conn, prefix = self._connect(rv.url)
            try:
                conn.request("PUT", prefix + URL_PATH + rv.token, body=body,
                             headers={"Content-Type": "application/json"})
                _expect_204(conn.getresponse())
            finally:
                conn.close()

        self._retrying("answering the step at", rv.url, put)


def _expect_204(resp: http.client.HTTPResponse) -> None:
    """A PUT's answer: 204, or a FedsegError quoting the server's reason (not retried)."""
    text = resp.read(500)
    if resp.status != 204:
        raise FedsegError(f"server answered {resp.status}: {text.decode(errors='replace').strip()}")


def _report(what: str, nbytes: int, t0: float) -> None:
    dt = time.monotonic() - t0
    print(f"[fedseg-client] {time.strftime('%H:%M:%S')} bulk {what} {nbytes / 1e6:.1f} MB in "
          f"{dt:.2f} s", flush=True)


def endpoint_of(node_config: Mapping[str, object]) -> BulkEndpoint:
    """The bulk endpoint from a site's node config (``server``, ``root-certificates``,
    ``insecure``: set by ``fedseg-client``)."""
    ca = node_config.get("root-certificates")
    insecure = node_config.get("insecure", False)
    return BulkEndpoint(server=str(node_config["server"]) if node_config.get("server") else None,
                        ca_file=str(ca) if ca else None,
                        insecure=insecure in (True, "true", "True", 1))


def receive(msg: Message, model: type[M], endpoint: BulkEndpoint) -> tuple[M, dict[str, np.ndarray]]:
    """A request's message and arrays, fetched from the server when they came as an offer."""
    req, arrays = unpack(msg.content, model)
    env = get_envelope(msg.content)
    if env is not None and env.down is not None:
        arrays = endpoint.fetch(env.down)
    return req, arrays


def reply_content(request: Message, reply: Msg, arrays: Mapping[str, np.ndarray] | None,
                  endpoint: BulkEndpoint) -> RecordDict:
    """The reply to ``request``: ``arrays`` are uploaded into the slot the server gave (then the
    reply names the upload), or travel in the reply when the server gave none."""
    env = get_envelope(request.content)
    if not arrays or env is None or env.up is None:
        return pack(reply, dict(arrays) if arrays else None)
    uploaded = endpoint.upload(env.up, arrays)
    rd = pack(reply)
    put_envelope(rd, BulkEnvelope(uploaded=uploaded))
    return rd
