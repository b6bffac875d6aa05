"""The server's end of bulk array transfer: an HTTP server in the ServerApp process.

Why hand-written (on the standard library's ``http.server``): what is needed is small and
specific — serve the global model's arrays straight from the server's memory (no copy, no
chunk objects, no hashing), and accept each site's update into a spool file once, for a
capability token that was handed out in a Flower message — and no web framework does less
work per byte than writing memoryviews to a socket. Why bulk arrays leave Flower's object
store at all, and the token scheme: ``fedseg/protocol/bulk.py``.

Memory: an offer keeps a REFERENCE to the arrays it serves (the server's global weights, which
it holds anyway); uploads go to ``SPOOL/<token>.bin`` on disk and are read back one tensor at a
time (:class:`SpooledArrays`) while they are checked and folded into the running sum, so the
server's RAM does not grow with the model size times the number of sites.

Listens on ``listen`` (default an ephemeral port on 127.0.0.1: ``fedseg simulate``). Under
``fedseg-server`` it listens on a loopback port and the fleet proxy forwards the public
address's ``/fedseg/bulk/`` to it over the proxy's TLS; ``public_url`` is then what the sites
are told (a path like ``/fedseg/bulk`` means: the address your SuperNode connects to).
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from fedseg.protocol.bulk import (
    URL_PATH,
    ArraySpec,
    BulkDownload,
    BulkUploaded,
    BulkUploadSlot,
    _c_order,
    buffers,
    layout_of,
    total_bytes,
)
from fedseg.protocol.messages import ProtocolError

CHUNK = 4 << 20
SOCKET_TIMEOUT_S = 300.0  # a stalled transfer frees its thread after this
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass
class _Offer:
    arrays: list[np.ndarray]
    nbytes: int


@dataclass
class _Slot:
    max_bytes: int
    state: str = "open"  # open -> receiving -> done | failed
    nbytes: int = 0


class SpooledArrays(Mapping[str, np.ndarray]):
    """The arrays of an upload, read from its spool file one at a time on access."""

    def __init__(self, path: Path, layout: list[ArraySpec], prefix: str = "") -> None:
        self.path = path
        self._index: dict[str, tuple[int, ArraySpec]] = {}
        off = 0
        for s in layout:
            if s.k.startswith(prefix):
                self._index[s.k[len(prefix):]] = (off, s)
            off += s.nbytes

    def strip(self, prefix: str) -> SpooledArrays:
        """The arrays whose key starts with ``prefix``, keyed without it."""
        out = SpooledArrays.__new__(SpooledArrays)
        out.path = self.path
        out._index = {k[len(prefix):]: v for k, v in self._index.items() if k.startswith(prefix)}
        return out

    def __getitem__(self, key: str) -> np.ndarray:
        off, s = self._index[key]
        with open(self.path, "rb") as f:
            f.seek(off)
            a = np.fromfile(f, dtype=np.dtype(s.d), count=int(np.prod(s.s, dtype=np.int64)))
        return a.reshape(s.s)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


class BulkServer:
    def __init__(self, spool: str | Path, listen: str = "127.0.0.1:0",
                 public_url: str | None = None) -> None:
        self.spool = Path(spool)
        host, _, port = listen.rpartition(":")
        self._bind = (host.strip("[]") or "127.0.0.1", int(port or 0))
        self._public_url = public_url.rstrip("/") if public_url else None
        self._offers: dict[str, _Offer] = {}
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- life cycle
    def start(self) -> BulkServer:
        # leftovers of a crashed run are updates nobody will fold: drop them
        shutil.rmtree(self.spool, ignore_errors=True)
        self.spool.mkdir(parents=True, exist_ok=True)
        httpd = ThreadingHTTPServer(self._bind, _Handler)
        httpd.daemon_threads = True
        httpd.bulk = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="fedseg-bulk", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        with self._lock:
            self._offers.clear()
            self._slots.clear()
        shutil.rmtree(self.spool, ignore_errors=True)

    @property
    def port(self) -> int:
        assert self._httpd is not None, "not started"
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The base URL the sites are told (``<url>/fedseg/bulk/<token>``)."""
        if self._public_url is not None:
            return self._public_url.removesuffix(URL_PATH.rstrip("/"))
        return f"http://{self._bind[0]}:{self.port}"

    # ---------------------------------------------------------------- offers (server -> sites)
    def offer(self, arrays: Mapping[str, np.ndarray]) -> BulkDownload:
        """Serve ``arrays`` (by reference: do not modify them while offered) under a new token."""
        arrs = [_c_order(v) for v in arrays.values()]
        layout = layout_of(dict(zip(arrays.keys(), arrs, strict=True)))
        token = secrets.token_urlsafe(32)
        nbytes = total_bytes(layout)
        with self._lock:
            self._offers[token] = _Offer(arrs, nbytes)
        return BulkDownload(url=self.url, token=token, layout=layout, nbytes=nbytes)

    def withdraw(self, down: BulkDownload | None) -> None:
        if down is not None:
            with self._lock:
                self._offers.pop(down.token, None)

    # ---------------------------------------------------------------- uploads (sites -> server)
    def slot(self, max_bytes: int) -> BulkUploadSlot:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._slots[token] = _Slot(max_bytes=int(max_bytes))
        return BulkUploadSlot(url=self.url, token=token, max_bytes=int(max_bytes))

    def take(self, uploaded: BulkUploaded) -> SpooledArrays:
        """The arrays a site says it uploaded; :class:`ProtocolError` unless the upload arrived
        complete, into a slot of ours, with exactly the bytes its layout needs."""
        with self._lock:
            slot = self._slots.get(uploaded.token)
        if slot is None:
            raise ProtocolError("bulk upload: unknown or closed upload slot")
        if slot.state != "done":
            raise ProtocolError(f"bulk upload: the upload is not complete (state {slot.state})")
        need = total_bytes(uploaded.layout)
        if not (slot.nbytes == uploaded.nbytes == need):
            raise ProtocolError(f"bulk upload: {slot.nbytes} bytes arrived, the reply says "
                                f"{uploaded.nbytes}, its layout needs {need}")
        return SpooledArrays(self._path(uploaded.token), uploaded.layout)

    def close_slot(self, token: str | None) -> None:
        """Forget a slot and delete what was uploaded into it."""
        if token is None:
            return
        with self._lock:
            self._slots.pop(token, None)
        self._path(token).unlink(missing_ok=True)
        self._path(token, ".part").unlink(missing_ok=True)

    def _path(self, token: str, suffix: str = ".bin") -> Path:
        return self.spool / f"{token}{suffix}"

    # ---------------------------------------------------------------- used by the handler
    def _offer(self, token: str) -> _Offer | None:
        with self._lock:
            return self._offers.get(token)

    def _claim(self, token: str) -> _Slot | None:
        with self._lock:
            slot = self._slots.get(token)
            if slot is None or slot.state not in ("open", "failed"):  # failed: a retry
                return None
            slot.state = "receiving"
            return slot


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S
    server_version = "fedseg-bulk"
    sys_version = ""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass  # one line per transfer would drown the ServerApp's log; errors answer the site

    def _token(self) -> str | None:
        path = urlsplit(self.path).path
        if not path.startswith(URL_PATH):
            return None
        tok = path[len(URL_PATH):]
        return tok if 32 <= len(tok) <= 64 and set(tok) <= _TOKEN_CHARS else None

    def _answer(self, code: int, text: str = "") -> None:
        body = (text + "\n").encode() if text else b""
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        bulk: BulkServer = self.server.bulk  # type: ignore[attr-defined]
        tok = self._token()
        offer = bulk._offer(tok) if tok else None
        if offer is None:
            self._answer(404, "no such offer (expired: the round it belonged to is over)")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(offer.nbytes))
        self.end_headers()
        for mv in buffers(offer.arrays):
            for i in range(0, len(mv), CHUNK):
                self.wfile.write(mv[i:i + CHUNK])

    def do_PUT(self) -> None:  # noqa: N802
        bulk: BulkServer = self.server.bulk  # type: ignore[attr-defined]
        tok = self._token()
        length = self.headers.get("Content-Length", "")
        if tok is None:
            self._answer(404, "no such upload slot")
            return
        if not length.isdigit():
            self._answer(411, "Content-Length required")
            return
        n = int(length)
        slot = bulk._claim(tok)
        if slot is None:
            self._answer(409, "no such upload slot, or it was used already")
            self.close_connection = True
            return
        if n > slot.max_bytes:
            slot.state = "failed"
            self._answer(413, f"upload of {n} bytes exceeds the slot's {slot.max_bytes}")
            self.close_connection = True
            return
        part = bulk._path(tok, ".part")
        buf = bytearray(min(CHUNK, max(1, n)))
        mv = memoryview(buf)
        try:
            with open(part, "wb") as f:
                left = n
                while left:
                    got = self.rfile.readinto(mv[:min(len(buf), left)])
                    if not got:
                        raise ConnectionError("the upload stopped early")
                    f.write(mv[:got])
                    left -= got
            os.replace(part, bulk._path(tok))
        except (OSError, ConnectionError) as err:
            slot.state = "failed"
            part.unlink(missing_ok=True)
            self.close_connection = True
            try:
                self._answer(400, f"upload failed: {err}")
            except OSError:
                pass
            return
        slot.nbytes = n
        slot.state = "done"
        self._answer(204)
