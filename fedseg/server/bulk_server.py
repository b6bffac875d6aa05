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
import socket
import threading
import time
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
    BulkRendezvous,
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
LONG_POLL_S = 20.0  # a rendezvous GET waits this long for the request, then answers 204 (ask again)
MAX_STEP_BYTES = 4 << 20  # a step answer (unmask + share-key replies) is kilobytes
LINGER_S, LINGER_BYTES = 2.0, 16 << 20  # what a refused request may still send us (_linger)
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass
class _Offer:
    arrays: list[np.ndarray]
    nbytes: int


@dataclass
class _Rendezvous:
    max_bytes: int
    request: bytes | None = None  # posted by the server (the step's request, JSON)
    answer: bytes | None = None  # PUT by the site, once


@dataclass
class _Slot:
    max_bytes: int
    state: str = "open"  # open -> receiving -> done | failed
    nbytes: int = 0


class SpooledArray:
    """One array of a spooled upload, read front to back in blocks into ONE reused buffer
    (``blocks``): the server adds a 120 MB masked vector into its sum without allocating
    (and page-faulting in) a copy of its own per site."""

    def __init__(self, path: Path, offset: int, spec: ArraySpec) -> None:
        self.path, self.offset = path, offset
        self.dtype = np.dtype(spec.d)
        self.shape = tuple(spec.s)

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        """Consecutive flat blocks of at most ``size`` elements; each is valid until the next."""
        n = int(np.prod(self.shape, dtype=np.int64))
        buf = np.empty(min(size, max(n, 1)), dtype=self.dtype)
        raw = memoryview(buf.view(np.uint8))
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            done = 0
            while done < n:
                m = min(size, n - done)
                want, got = m * self.dtype.itemsize, 0
                while got < want:
                    k = f.readinto(raw[got:want])
                    if not k:
                        raise OSError(f"{self.path}: ends after {done * self.dtype.itemsize + got} bytes")
                    got += k
                yield buf[:m]
                done += m


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

    def lazy(self, key: str) -> SpooledArray:
        """The array ``key`` as a :class:`SpooledArray` (read block by block, never whole)."""
        off, s = self._index[key]
        return SpooledArray(self.path, off, s)

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
        self._steps: dict[str, _Rendezvous] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a rendezvous was posted/answered/closed
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
            self._steps.clear()
            self._changed.notify_all()
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

    # ---------------------------------------------------------------- rendezvous (one step)
    def rendezvous(self, max_bytes: int = MAX_STEP_BYTES) -> BulkRendezvous:
        """A new mailbox for one follow-up step (``fedseg/protocol/bulk.py``: BulkRendezvous)."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._steps[token] = _Rendezvous(max_bytes=int(max_bytes))
        return BulkRendezvous(url=self.url, token=token, max_bytes=int(max_bytes))

    def post(self, token: str, request: bytes) -> bool:
        """Hand ``request`` to the site waiting on ``token`` (once); False if it is gone."""
        with self._lock:
            rv = self._steps.get(token)
            if rv is None or rv.request is not None:
                return False
            rv.request = bytes(request)
            self._changed.notify_all()
            return True

    def answers(self, tokens: list[str], timeout: float) -> dict[str, bytes]:
        """The answers to the posted ``tokens``, waiting until each has one (or is closed) or
        ``timeout`` s have passed; what came by then."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                open_ = [t for t in tokens if t in self._steps and self._steps[t].answer is None]
                left = deadline - time.monotonic()
                if not open_ or left <= 0:
                    return {t: self._steps[t].answer for t in tokens  # type: ignore[misc]
                            if t in self._steps and self._steps[t].answer is not None}
                self._changed.wait(left)

    def close_rendezvous(self, token: str | None) -> None:
        """Forget a mailbox: a site still waiting on it is told so (404) and stops."""
        if token is None:
            return
        with self._lock:
            if self._steps.pop(token, None) is not None:
                self._changed.notify_all()

    def _path(self, token: str, suffix: str = ".bin") -> Path:
        return self.spool / f"{token}{suffix}"

    # ---------------------------------------------------------------- used by the handler
    def _offer(self, token: str) -> _Offer | None:
        with self._lock:
            return self._offers.get(token)

    def _await_request(self, token: str, timeout: float) -> tuple[bool, bytes | None]:
        """(is a rendezvous, its request or None after ``timeout``); (False, None): unknown or
        closed."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                rv = self._steps.get(token)
                if rv is None:
                    return False, None
                left = deadline - time.monotonic()
                if rv.request is not None or left <= 0:
                    return True, rv.request
                self._changed.wait(left)

    def _step_limit(self, token: str) -> int | None:
        """The answer size limit of rendezvous ``token``; None if there is no such rendezvous."""
        with self._lock:
            rv = self._steps.get(token)
            return rv.max_bytes if rv is not None else None

    def _take_answer(self, token: str, body: bytes) -> str | None:
        """Store a site's answer; None if taken, else why not."""
        with self._lock:
            rv = self._steps.get(token)
            if rv is None:
                return "no such rendezvous (the step is over)"
            if rv.request is None:
                return "nothing was asked on this rendezvous yet"
            if rv.answer is not None:
                return "this rendezvous was answered already"
            rv.answer = body
            self._changed.notify_all()
            return None

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

    def _answer(self, code: int, text: str = "", close: bool = False) -> None:
        """Answer ``code``; ``close``: a request whose body was not read (all of it) — the
        connection is closed after the answer and says so, or the unread body would be parsed
        as the next request on it (the fleet proxy pools its connections here: issue #13)."""
        body = (text + "\n").encode() if text else b""
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")  # also sets self.close_connection
        self.end_headers()
        if body:
            self.wfile.write(body)
        if close:
            self._linger()

    def _linger(self) -> None:
        """Half-close after a refusal and read (and drop) what the peer still sends, for at most
        LINGER_S / LINGER_BYTES: closing a socket with unread data resets the connection, and a
        reset can destroy our answer in the peer's receive buffer before it is read (the fleet
        proxy would then report 502 instead of our 409/413)."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline, left = time.monotonic() + LINGER_S, LINGER_BYTES
            while left > 0 and (wait := deadline - time.monotonic()) > 0:
                self.connection.settimeout(wait)
                data = self.connection.recv(min(CHUNK, left))
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        bulk: BulkServer = self.server.bulk  # type: ignore[attr-defined]
        if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length", "0") != "0":
            self._answer(400, "a GET takes no body", close=True)
            return
        tok = self._token()
        known, request = bulk._await_request(tok, LONG_POLL_S) if tok else (False, None)
        if known:
            if request is None:
                self._answer(204)  # not yet: ask again
            else:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(request)))
                self.end_headers()
                self.wfile.write(request)
            return
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
            self._answer(404, "no such upload slot", close=True)
            return
        if not length.isdigit() or self.headers.get("Transfer-Encoding"):
            self._answer(411, "Content-Length required", close=True)
            return
        n = int(length)
        limit = bulk._step_limit(tok)
        if limit is not None:
            self._step_answer(bulk, tok, n, limit)
            return
        slot = bulk._claim(tok)
        if slot is None:
            self._answer(409, "no such upload slot, or it was used already", close=n > 0)
            return
        if n > slot.max_bytes:
            slot.state = "failed"
            self._answer(413, f"upload of {n} bytes exceeds the slot's {slot.max_bytes}", close=True)
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
            self.close_connection = True  # even if the answer cannot be written
            try:
                self._answer(400, f"upload failed: {err}", close=True)
            except OSError:
                pass
            return
        slot.nbytes = n
        slot.state = "done"
        self._answer(204)

    def _step_answer(self, bulk: BulkServer, tok: str, n: int, limit: int) -> None:
        """``PUT`` of a site's answer (at most ``limit`` bytes) into a rendezvous (small: read
        into memory; one closed meanwhile is refused by ``_take_answer``)."""
        if n > limit:
            self._answer(413, f"a step answer of {n} bytes exceeds the rendezvous' {limit}",
                         close=True)
            return
        body = self.rfile.read(n)
        if len(body) != n:
            self._answer(400, "the answer stopped early", close=True)
            return
        why = bulk._take_answer(tok, body)
        if why is not None:
            self._answer(409, why)
            return
        self._answer(204)
