"""Limits of the public front door (the fleet proxy's port): what a stranger can make it hold.

Why: the fleet proxy is the only address a hospital network sees, and anyone can connect to it.
Before these limits (issue #13) a few lines of socket code could make the server buffer 3 x 250
MB unauthenticated bodies, hold incomplete request heads forever, and push a refused body into
a pooled upstream connection (request smuggling). What this module provides, all enforced
BEFORE a byte of a body is read or forwarded:

- :class:`Limits`: one place for the numbers (docs/security-notes.md §9 lists them).
- :func:`guarded_protocol`: uvicorn's own h11 protocol (no HTTP parsing of ours; the header
  size limit is h11's ``max_incomplete_event_size``, set through uvicorn's
  ``h11_max_incomplete_event_size``) with what uvicorn 0.49 lacks: a cap on connections per
  client address and in total (uvicorn's ``limit_concurrency`` answers 503 but keeps the
  connection), and a request-head timeout (uvicorn's ``timeout_keep_alive`` only runs between
  requests, so a connection that never completes a head was held forever).
- :func:`check_node_auth`: Flower 1.42's SuperNode authentication is three headers
  (``flwr-public-key``, ``flwr-timestamp``, ``flwr-signature`` over the timestamp; see
  ``flwr/superlink/routers/fleet/node_auth.py``) — the SuperLink checks them only after parsing
  the whole protobuf body. The same check, with Flower's own functions, on the headers alone
  refuses an unsigned request before its body is read.
- :class:`KnownKeys`: public keys the SuperLink has accepted (a 2xx answer to a request signed
  with them: with ``--enable-supernode-auth`` only registered keys get one). A valid signature
  by a key nobody registered costs an attacker nothing, so such requests get a small body limit.
- :class:`Body`: reads a request body for forwarding, with an idle timeout and a byte budget.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

# flwr at import time, not inside the request handlers: two threads importing the same
# half-loaded flwr package deadlock (seen under load: ``_DeadlockError`` in the server's main
# thread building the app while a proxy thread checked a SuperNode's first signature)
from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_TOLERANCE
from flwr.supercore.date import now
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_remote_addr

log = logging.getLogger("fedseg.fleet_proxy")

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

# the bulk server's token rule (fedseg/server/bulk_server.py: _Handler._token), checked here too
# so that a malformed bulk path never reaches it
BULK_TOKEN = re.compile(r"[A-Za-z0-9_-]{32,64}")
AUTH_HEADERS = (b"flwr-public-key", b"flwr-timestamp", b"flwr-signature")
# after we close a connection, how long it may take (our answer flushed, TLS close_notify) before
# it is aborted: asyncio's TLS shutdown otherwise keeps reading and decrypting whatever the peer
# still sends for up to 30 s (ssl_shutdown_timeout, which uvicorn does not expose) — measured:
# 64 MB of "header" taken in 0.6 s after the 400
CLOSE_GRACE_S = 0.5


@dataclass(frozen=True)
class Limits:
    """The front door's numbers. Defaults fit 3-50 sites, each a SuperNode (a few connections)
    plus its bulk transfers (one connection each)."""

    max_header_bytes: int = 16 << 10  # request line + headers; Flower's are < 1 KB
    head_timeout_s: float = 20.0  # connect (or first byte of the next request) -> complete head
    body_idle_timeout_s: float = 60.0  # no body byte for this long: 408 and the connection closed
    keep_alive_s: int = 75  # idle keep-alive connections (uvicorn's timeout_keep_alive)
    max_connections: int = 512  # in total
    max_connections_per_client: int = 64  # per client IP address
    unknown_key_max_body: int = 64 << 10  # body limit for a key the SuperLink has not accepted
    known_keys: int = 4096  # public keys remembered (registered sites only ever enter)


class RefusalLog:
    """Refusals are logged, but at most ``burst`` lines per ``window`` seconds (then one line
    counting what was left out): an attacker must not be able to fill the server's disk."""

    def __init__(self, burst: int = 20, window: float = 10.0) -> None:
        self.burst, self.window = burst, window
        self._start, self._n, self._dropped = 0.0, 0, 0

    def __call__(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._start > self.window:
            if self._dropped:
                log.warning("... and %d more refusals in %.0f s (not logged)", self._dropped,
                            self.window)
            self._start, self._n, self._dropped = now, 0, 0
        self._n += 1
        if self._n <= self.burst:
            log.warning(msg, *args)
        else:
            self._dropped += 1


refused = RefusalLog()


class _Counts:
    def __init__(self) -> None:
        self.total = 0
        self.per_client: dict[str, int] = {}


def guarded_protocol(limits: Limits) -> type[H11Protocol]:
    """A subclass of uvicorn's h11 protocol enforcing ``limits`` per connection (one class per
    server: the counters are shared by its connections, all on the server's event loop)."""
    counts = _Counts()

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._peer: str | None = None  # set once the connection is admitted
            self._reaper: asyncio.TimerHandle | None = None
            self._head_timer: asyncio.TimerHandle | None = None
            self._armed_for: Any = None  # the cycle current when the head timer was armed

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            addr = get_remote_addr(transport)
            ip = addr[0] if addr else "?"
            if counts.total >= limits.max_connections:
                refused("refused a connection from %s (%d connections in total)", ip, counts.total)
                transport.abort()
                return
            if counts.per_client.get(ip, 0) >= limits.max_connections_per_client:
                refused("refused a connection from %s (%d connections from it)", ip,
                        counts.per_client[ip])
                transport.abort()
                return
            counts.total += 1
            counts.per_client[ip] = counts.per_client.get(ip, 0) + 1
            self._peer = ip
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._peer is None:  # refused in connection_made: nothing was set up
                return
            counts.total -= 1
            left = counts.per_client[self._peer] - 1
            if left:
                counts.per_client[self._peer] = left
            else:
                del counts.per_client[self._peer]
            self._peer = None
            self._disarm()
            if self._reaper is not None:
                self._reaper.cancel()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            if self.transport.is_closing():  # answered with "connection: close"
                self._reap_soon()
            super().on_response_complete()

        def send_400_response(self, msg: str) -> None:
            super().send_400_response(msg)  # h11 refused the head (e.g. over max_header_bytes)
            self._reap_soon()

        def _reap_soon(self) -> None:
            if self._reaper is None:
                self._reaper = self.loop.call_later(CLOSE_GRACE_S, self._reap)

        def _reap(self) -> None:
            if self._peer is not None:  # not gone yet: stop reading from it
                self.transport.abort()

        def data_received(self, data: bytes) -> None:
            if self._peer is None:  # refused (aborted) in connection_made
                return
            between = self.cycle is None or self.cycle.response_complete
            if between and (self._head_timer is None or self._armed_for is not self.cycle):
                self._arm()  # the first byte of a new request head (or of a drained body)
            super().data_received(data)
            if self.cycle is not self._armed_for:
                self._disarm()  # a complete head arrived: a request is being served

        def _arm(self) -> None:
            self._disarm()
            self._armed_for = self.cycle
            self._head_timer = self.loop.call_later(limits.head_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.cycle is self._armed_for and not self.transport.is_closing():
                refused("closed a connection from %s: no complete request head in %.0f s",
                        self._peer, limits.head_timeout_s)
                self.transport.close()
                self._reap_soon()

    return GuardedH11Protocol


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The single value of header ``name``; None if absent; ValueError if it is repeated."""
    values = [v for k, v in headers if k.lower() == name]
    if len(values) > 1:
        raise ValueError(f"header {name.decode()} repeated")
    return values[0] if values else None


def check_node_auth(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, str]:
    """(the signing public key, "") if the request carries a valid Flower node-auth signature
    made within the SuperLink's time window; (None, why) otherwise. Mirrors
    ``flwr.superlink.routers.fleet.node_auth.authenticate_node`` minus the node-id check, which
    needs the body (the SuperLink still makes it)."""
    try:
        pk_b64, ts_b, sig_b64 = (_header(headers, h) for h in AUTH_HEADERS)
        if pk_b64 is None or ts_b is None or sig_b64 is None:
            return None, "no SuperNode authentication headers"
        public_key = base64.b64decode(pk_b64, validate=True)
        signature = base64.b64decode(sig_b64, validate=True)
        timestamp = ts_b.decode("ascii")
        age = (now() - datetime.datetime.fromisoformat(timestamp)).total_seconds()
        if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
            return None, "signed timestamp outside the allowed window"
        if not verify_signature(bytes_to_public_key(public_key), timestamp.encode("ascii"),
                                signature):
            return None, "invalid signature"
    except (ValueError, TypeError, UnicodeError, binascii.Error) as err:
        return None, f"malformed authentication headers ({type(err).__name__})"
    except Exception as err:  # noqa: BLE001 - e.g. cryptography's UnsupportedAlgorithm
        return None, f"unusable public key ({type(err).__name__})"
    return public_key, ""


def fingerprint(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:16]


class KnownKeys:
    """Public keys a request signed with which the SuperLink answered 2xx (bounded, LRU)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        if key in self._keys:
            self._keys.move_to_end(key)  # type: ignore[arg-type]
            return True
        return False

    def add(self, key: bytes) -> None:
        if key in self:
            return
        self._keys[key] = None
        log.info("node key accepted by the SuperLink: %s", fingerprint(key))
        while len(self._keys) > self.limit:
            self._keys.popitem(last=False)


class BodyError(Exception):
    """Reading the request body stopped; ``status`` is the answer (0: the client is gone)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class Body:
    """A request body read from ASGI ``receive`` for forwarding, chunk by chunk: at most
    ``limit`` bytes, and no wait longer than ``idle_s`` for the next chunk. ``done`` tells
    whether it was read to its end (else the connection must be closed after the answer)."""

    def __init__(self, receive: Receive, limit: int, idle_s: float) -> None:
        self.receive, self.limit, self.idle_s = receive, limit, idle_s
        self.done = False
        self.nbytes = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.done:
            try:
                msg = await asyncio.wait_for(self.receive(), self.idle_s)
            except TimeoutError:
                raise BodyError(408, f"no body bytes for {self.idle_s:.0f} s") from None
            if msg["type"] == "http.disconnect":
                raise BodyError(0, "the client went away")
            data = msg.get("body", b"")
            self.nbytes += len(data)
            if self.nbytes > self.limit:
                raise BodyError(413, "request body too large")
            self.done = not msg.get("more_body", False)
            if data:
                yield data
