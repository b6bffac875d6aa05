"""The fleet proxy's ASGI application: which requests pass, what is checked on their headers
before a body byte is read, and how they are relayed (streamed) to the SuperLink or the bulk
server. Served by :class:`fedseg.runtime.fleet_proxy.FleetProxy` (uvicorn, with the connection
limits of :mod:`fedseg.runtime.frontdoor`); why each rule: ``fleet_proxy``'s docstring."""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx

from fedseg.runtime.frontdoor import (
    BULK_TOKEN,
    Body,
    BodyError,
    KnownKeys,
    Limits,
    check_node_auth,
    fingerprint,
    refused,
)

FLEET_PREFIX = "/v1/fleet/"
BULK_PREFIX = "/fedseg/bulk/"
HELLO = "fleet-proxy"  # GET BULK_PREFIX answers {"fedseg": HELLO, "bulk": bool}
# superlink/routers/fleet/router.py in flwr 1.42.0: every Fleet route is a POST
FLEET_ROUTES = frozenset({
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received",
})
# SuperNode self-registration (a node with a key nobody registered). With the SuperLink's
# --enable-supernode-auth these are refused anyway; without it they would let anyone join, so the
# proxy refuses them unless told otherwise — with the very answer an auth-enabled SuperLink gives
# (HTTP 412 + Flower error 2001/2002, flwr/supercore/error/catalog.py), which a SuperNode reports
# as "[code: 2001] ... must be registered via the CLI" and exits on. (A 403 would not do: Flower
# reads 403 as "run not running" and the SuperNode hangs.)
SELF_REGISTRATION_REFUSAL = {
    "register-node": (2001, "SuperNode authentication is enabled. "
                            "All SuperNodes must be registered via the CLI."),
    "unregister-node": (2002, "SuperNode authentication is enabled. "
                              "All SuperNodes must be unregistered via the CLI."),
}
SELF_REGISTRATION_ROUTES = frozenset(SELF_REGISTRATION_REFUSAL)
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_BODY_MB = 256
DEFAULT_MAX_BULK_MB = 4096  # the bulk server's slot sizes are the real limit (the model's size)
DEFAULT_TIMEOUT_S = 600.0
DRAIN_BYTES = 64 << 10  # a refused body up to this size is read and dropped, a larger one: closed
# the SuperLink's own answer to a failed node authentication (node_auth.py: HTTPException 401)
NODE_AUTH_REFUSAL = b'{"detail":"Invalid SuperNode authentication"}'

log = logging.getLogger("fedseg.fleet_proxy")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def fleet_route(path: str) -> str | None:
    """The Fleet route name if ``path`` is exactly one of the twelve, else None (no normalising:
    ``/v1/fleet/../control/x`` and ``/v1/fleet//get-run`` are simply not in the list)."""
    if not path.startswith(FLEET_PREFIX):
        return None
    name = path[len(FLEET_PREFIX):]
    return name if name in FLEET_ROUTES else None


class FleetProxyApp:
    """The ASGI application: allowlist, front-door checks on the headers, then forward to
    ``upstream`` with httpx, bodies streamed (never held whole)."""

    def __init__(self, upstream: str, verify: ssl.SSLContext | bool = True,
                 max_body_bytes: int = DEFAULT_MAX_BODY_MB << 20,
                 timeout: float = DEFAULT_TIMEOUT_S, allow_self_registration: bool = False,
                 bulk_upstream: str | None = None, limits: Limits | None = None,
                 max_bulk_bytes: int = DEFAULT_MAX_BULK_MB << 20) -> None:
        self.upstream = upstream.rstrip("/")
        self.bulk_upstream = bulk_upstream.rstrip("/") if bulk_upstream else None
        self.allow_self_registration = allow_self_registration
        self.verify = verify
        self.max_body_bytes = max_body_bytes
        self.max_bulk_bytes = max_bulk_bytes
        self.timeout = timeout
        self.limits = limits or Limits()
        self.known = KnownKeys(self.limits.known_keys)
        self._client: httpx.AsyncClient | None = None
        # what ``GET /fedseg/bulk/`` answers: a site's fedseg-client checks at start that its
        # ``server`` is this proxy and not, say, the SuperLink's own port, where it would enrol
        # and fail only at its first bulk download (issue #16)
        self.hello = json.dumps({"fedseg": HELLO, "bulk": self.bulk_upstream is not None}).encode()

    def _new_client(self) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            verify=self.verify, follow_redirects=False, trust_env=False,
            timeout=httpx.Timeout(self.timeout, connect=10.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
        client.headers.clear()  # forward the SuperNode's headers, add none of httpx's defaults
        return client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: not part of the Fleet API
            await send({"type": "websocket.close", "code": 1008})
            return
        if self._client is None:  # served without lifespan (e.g. a bare ASGI test harness)
            self._client = self._new_client()
        method, path = scope["method"], scope["path"]
        if path == BULK_PREFIX and method == "GET":  # the sites' start-up probe (client/probe.py)
            await _plain(send, 200, self.hello, content_type=b"application/json",
                         close=_declared_length(scope) != 0)  # a body is never read
            return
        if self.bulk_upstream and path.startswith(BULK_PREFIX):
            await self._bulk(scope, receive, send)
            return
        name = fleet_route(path)
        who = (scope.get("client") or ("?", 0))[0]
        if name is None:
            refused("refused %s %s from %s (not a Fleet route)", method, path[:200], who)
            await _refuse(scope, send, 404, b"not found\n")
            return
        if method != "POST":
            refused("refused %s %s from %s (method)", method, path, who)
            await _refuse(scope, send, 405, b"method not allowed\n", [(b"allow", b"POST")])
            return
        if name in SELF_REGISTRATION_ROUTES and not self.allow_self_registration:
            refused("refused %s from %s (self-registration is off)", path, who)
            code, detail = SELF_REGISTRATION_REFUSAL[name]
            await _refuse(scope, send, 412, json.dumps({"code": code, "detail": detail}).encode(),
                          content_type=b"application/json")
            return
        n = _declared_length(scope)
        if n is None:
            refused("refused %s from %s (no Content-Length)", path, who)
            await _refuse(scope, send, 411, b"Content-Length required\n")
            return
        if n > self.max_body_bytes:
            refused("refused %s from %s (%d-byte body)", path, who, n)
            await _refuse(scope, send, 413, b"request body too large\n")
            return
        key, why = check_node_auth(scope["headers"])
        if key is None:  # what the SuperLink would answer, without its reading the body
            refused("refused %s from %s (%s)", path, who, why)
            await _refuse(scope, send, 401, NODE_AUTH_REFUSAL, content_type=b"application/json")
            return
        if n > self.limits.unknown_key_max_body and key not in self.known:
            # a signature by a key the SuperLink never accepted: small requests only. 503 is
            # retried by Flower's SuperNode; a registered site's key is known after its next
            # heartbeat (e.g. after the proxy restarted)
            refused("refused %s from %s (%d bytes under key %s, not yet accepted by the "
                    "SuperLink)", path, who, n, fingerprint(key))
            await _refuse(scope, send, 503, b"node key not yet accepted: retry\n",
                          [(b"retry-after", b"5")])
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP
                   and k.lower() != b"host"]
        url = self.upstream + FLEET_PREFIX + name
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        body = Body(receive, n, self.limits.body_idle_timeout_s)
        req = self._client.build_request("POST", url, headers=headers, content=body.chunks())
        status = await self._relay(scope, req, body, send, f"SuperLink ({name})")
        if 200 <= status < 300:
            self.known.add(key)

    async def _relay(self, scope: Scope, req: httpx.Request, body: Body, send: Send,
                     upstream: str) -> int:
        """Send ``req`` upstream and stream the answer back (504/502 if it cannot; 408 if the
        client's body stalled); the status sent. The client's connection is closed after the
        answer unless its body was read to the end (nothing of it may stay in the stream)."""
        assert self._client is not None
        try:
            resp = await self._client.send(req, stream=True)
        except BodyError as err:
            if err.status:
                refused("refused %s from %s (%s)", scope["path"][:200],
                        (scope.get("client") or ("?",))[0], err)
                await _plain(send, err.status, f"{err}\n".encode(), close=True)
            return err.status
        except httpx.TimeoutException as err:
            log.error("%s did not answer in time: %s", upstream, err)
            await _plain(send, 504, b"upstream timeout\n", close=not body.done)
            return 504
        except httpx.TransportError as err:
            log.error("%s unreachable: %s", upstream, err)
            await _plain(send, 502, b"upstream unavailable\n", close=not body.done)
            return 502
        try:
            out = [(k, v) for k, v in resp.headers.raw if k.lower() not in HOP_BY_HOP]
            if not body.done:  # answered before the body was read: refuse the rest of it
                out.append((b"connection", b"close"))
            await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
            async for chunk in resp.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await resp.aclose()
        return resp.status_code

    async def _bulk(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET``/``PUT /fedseg/bulk/<token>``, streamed to and from the bulk server. Only a
        well-formed token is forwarded (the path is rebuilt from it), a GET without a body, a
        PUT with a Content-Length (the bulk server decides from it, before reading)."""
        assert self.bulk_upstream is not None and self._client is not None
        method, token = scope["method"], scope["path"][len(BULK_PREFIX):]
        who = (scope.get("client") or ("?", 0))[0]
        if not BULK_TOKEN.fullmatch(token):
            refused("refused %s %s from %s (malformed bulk token)", method, scope["path"][:200], who)
            await _refuse(scope, send, 404, b"not found\n")
            return
        if method not in ("GET", "PUT"):
            await _refuse(scope, send, 405, b"method not allowed\n", [(b"allow", b"GET, PUT")])
            return
        n = _declared_length(scope)
        if method == "GET" and n != 0:
            refused("refused GET %s from %s (a body)", BULK_PREFIX + "...", who)
            await _refuse(scope, send, 400, b"a GET takes no body\n")
            return
        if n is None:
            await _refuse(scope, send, 411, b"Content-Length required\n")
            return
        if n > self.max_bulk_bytes:
            refused("refused PUT %s from %s (%d-byte body)", BULK_PREFIX + "...", who, n)
            await _refuse(scope, send, 413, b"request body too large\n")
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() == b"content-type"]
        body = Body(receive, n, self.limits.body_idle_timeout_s)
        if method == "PUT":
            headers.append((b"content-length", str(n).encode()))
        else:
            body.done = True
        req = self._client.build_request(method, self.bulk_upstream + BULK_PREFIX + token,
                                         headers=headers,
                                         content=body.chunks() if method == "PUT" else None)
        await self._relay(scope, req, body, send, "bulk server")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                self._client = self._new_client()
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                    self._client = None
                await send({"type": "lifespan.shutdown.complete"})
                return


def _declared_length(scope: Scope) -> int | None:
    """The request's Content-Length; 0 for a request without a body; None when the body's
    length is not declared up front (chunked), or declared twice or badly — such a request is
    refused: every limit is decided from the headers."""
    te = [v for k, v in scope["headers"] if k.lower() == b"transfer-encoding"]
    cl = [v for k, v in scope["headers"] if k.lower() == b"content-length"]
    if te or len(cl) > 1 or (cl and not cl[0].isdigit()):
        return None
    return int(cl[0]) if cl else 0


async def _refuse(scope: Scope, send: Send, status: int, body: bytes,
                  extra: list[tuple[bytes, bytes]] | None = None,
                  content_type: bytes = b"text/plain; charset=utf-8") -> None:
    """Answer a request whose body is not read: the connection is closed after the answer
    unless what is left is small (up to DRAIN_BYTES, which uvicorn then reads and drops within
    the head timeout), so no refused body can be read as the next request."""
    n = _declared_length(scope)
    await _plain(send, status, body, extra, content_type,
                 close=n is None or n > DRAIN_BYTES)


async def _plain(send: Send, status: int, body: bytes,
                 extra: list[tuple[bytes, bytes]] | None = None,
                 content_type: bytes = b"text/plain; charset=utf-8", close: bool = False) -> None:
    headers = [(b"content-type", content_type),
               (b"content-length", str(len(body)).encode())] + (extra or [])
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
