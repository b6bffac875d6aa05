"""Fleet-only reverse proxy: expose a SuperLink's SuperNode API (``/v1/fleet/``) and nothing else.

Why: ``flower-superlink`` 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr run``,
``flwr supernode register``, stop runs — no login in the open-source SuperLink) and the Runtime
API on ONE port (docs/security-notes.md §5). Whoever reaches that port can submit code that then
runs at every hospital. So the SuperLink binds 127.0.0.1 and this proxy, on the public address,
forwards only the twelve Fleet routes, all ``POST /v1/fleet/<name>``; every other path gets 404
(and a wrong method 405) without touching the SuperLink. Of the twelve, ``register-node`` and
``unregister-node`` (SuperNode self-registration) are refused (412, as an auth-enabled SuperLink
refuses them) unless ``--allow-self-registration``:
site keys are registered by the operator on loopback.

What is forwarded, unchanged: method, the canonical Fleet path, query string, body and every
end-to-end header (``flwr-public-key``/``flwr-signature``/``flwr-timestamp`` node-auth headers,
``content-type``, ``accept``, version headers); the response's status, headers and body are
streamed back. Hop-by-hop headers (RFC 9110 §7.6.1) and ``host`` are not forwarded.

TLS: the proxy terminates the sites' TLS with the server certificate (``--certfile/--keyfile``,
the ``fedseg provision`` ``server.pem``) and re-encrypts to the SuperLink, verifying it against
the consortium CA (``--upstream-ca``), so node-auth headers never travel in clear (they can be
replayed for ~5 min by whoever sees them). Plain HTTP is allowed only on loopback, for trials.

Bulk transfers (``--bulk-upstream``, set by ``fedseg-server``): ``GET``/``PUT /fedseg/bulk/<token>``
are forwarded, streamed both ways, to the ServerApp's bulk server on loopback (global model down,
updates up: ``fedseg/protocol/bulk.py``); nothing else under ``/fedseg/``. The body limit below
does not apply there: the bulk server refuses an unknown token or an oversized body from the
request's headers, before reading it.

Bounded: request bodies above ``--max-body-mb`` are refused (413) before they are read; the
SuperLink gets ``--timeout`` seconds to answer (then 504; 502 if it is down — both are retried by
Flower's SuperNode). Uses only uvicorn + httpx, which ``flwr==1.42.0`` itself depends on.

Run: ``python -m fedseg.runtime.fleet_proxy --listen 0.0.0.0:9092 --upstream
https://127.0.0.1:9093 --certfile server.pem --keyfile server.key --upstream-ca ca.pem``;
or embed: ``FleetProxy(...).start()`` / ``.stop()`` (a uvicorn server in a thread).
"""

from __future__ import annotations

import argparse
import json
import logging
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx

FLEET_PREFIX = "/v1/fleet/"
BULK_PREFIX = "/fedseg/bulk/"
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
DEFAULT_TIMEOUT_S = 600.0

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
    """The ASGI application: allowlist, then forward to ``upstream`` with httpx."""

    def __init__(self, upstream: str, verify: ssl.SSLContext | bool = True,
                 max_body_bytes: int = DEFAULT_MAX_BODY_MB << 20,
                 timeout: float = DEFAULT_TIMEOUT_S, allow_self_registration: bool = False,
                 bulk_upstream: str | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.bulk_upstream = bulk_upstream.rstrip("/") if bulk_upstream else None
        self.allow_self_registration = allow_self_registration
        self.verify = verify
        self.max_body_bytes = max_body_bytes
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

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
        method, path = scope["method"], scope["path"]
        if self.bulk_upstream and path.startswith(BULK_PREFIX) and "/" not in path[len(BULK_PREFIX):]:
            await self._bulk(scope, receive, send)
            return
        name = fleet_route(path)
        client = scope.get("client") or ("?", 0)
        if name is None:
            log.warning("refused %s %s from %s (not a Fleet route)", method, path, client[0])
            await _plain(send, 404, b"not found\n")
            return
        if method != "POST":
            log.warning("refused %s %s from %s (method)", method, path, client[0])
            await _plain(send, 405, b"method not allowed\n", [(b"allow", b"POST")])
            return
        if name in SELF_REGISTRATION_ROUTES and not self.allow_self_registration:
            log.warning("refused %s from %s (self-registration is off)", path, client[0])
            code, detail = SELF_REGISTRATION_REFUSAL[name]
            await _plain(send, 412, json.dumps({"code": code, "detail": detail}).encode(),
                         content_type=b"application/json")
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP
                   and k.lower() not in (b"host", b"content-length")]
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await _plain(send, 413, b"request body too large\n")
            return
        body = bytearray()
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_body_bytes:
                await _plain(send, 413, b"request body too large\n")
                return
        if self._client is None:  # served without lifespan (e.g. a bare ASGI test harness)
            self._client = self._new_client()
        url = self.upstream + FLEET_PREFIX + name
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        req = self._client.build_request("POST", url, headers=headers, content=bytes(body))
        await self._relay(req, send, f"SuperLink ({name})")

    async def _relay(self, req: httpx.Request, send: Send, upstream: str) -> None:
        """Send ``req`` upstream and stream the answer back (504/502 if it cannot)."""
        assert self._client is not None
        try:
            resp = await self._client.send(req, stream=True)
        except httpx.TimeoutException as err:
            log.error("%s did not answer in time: %s", upstream, err)
            await _plain(send, 504, b"upstream timeout\n")
            return
        except httpx.TransportError as err:
            log.error("%s unreachable: %s", upstream, err)
            await _plain(send, 502, b"upstream unavailable\n")
            return
        try:
            out = [(k, v) for k, v in resp.headers.raw if k.lower() not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
            async for chunk in resp.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await resp.aclose()

    async def _bulk(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET``/``PUT /fedseg/bulk/<token>``, streamed to and from the bulk server."""
        method = scope["method"]
        if method not in ("GET", "PUT"):
            await _plain(send, 405, b"method not allowed\n", [(b"allow", b"GET, PUT")])
            return
        keep = (b"content-length", b"content-type")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() in keep]

        async def body():
            more = True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                yield msg.get("body", b"")
                more = msg.get("more_body", False)

        if self._client is None:
            self._client = self._new_client()
        req = self._client.build_request(method, self.bulk_upstream + scope["path"], headers=headers,
                                         content=body() if method == "PUT" else None)
        await self._relay(req, send, "bulk server")

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


async def _plain(send: Send, status: int, body: bytes,
                 extra: list[tuple[bytes, bytes]] | None = None,
                 content_type: bytes = b"text/plain; charset=utf-8") -> None:
    headers = [(b"content-type", content_type),
               (b"content-length", str(len(body)).encode())] + (extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def parse_hostport(value: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """``HOST:PORT`` / ``[::]:PORT`` / ``PORT`` → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = default_host, value
    host = host.strip("[]") or default_host
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"'{value}': expected HOST:PORT") from None
    if not 0 < p < 65536:
        raise ValueError(f"'{value}': port out of range")
    return host, p


class FleetProxy:
    """A configured proxy: ``start()`` serves it in a background thread, ``serve()`` in this one."""

    def __init__(self, listen: str, upstream: str, certfile: str | Path | None = None,
                 keyfile: str | Path | None = None, upstream_ca: str | Path | None = None,
                 max_body_mb: int = DEFAULT_MAX_BODY_MB, timeout: float = DEFAULT_TIMEOUT_S,
                 allow_plain_http: bool = False, allow_self_registration: bool = False,
                 bulk_upstream: str | None = None) -> None:
        self.host, self.port = parse_hostport(listen)
        if bulk_upstream and parse_hostport(bulk_upstream.split("://", 1)[-1].split("/", 1)[0])[0] \
                not in LOOPBACK:
            raise ValueError("the bulk upstream must be on loopback (the ServerApp's bulk server)")
        if not upstream.startswith(("http://", "https://")):
            upstream = ("https://" if upstream_ca else "http://") + upstream
        self.upstream = upstream
        if bool(certfile) != bool(keyfile):
            raise ValueError("give both --certfile and --keyfile (or neither)")
        if not certfile and not (allow_plain_http and self.host in LOOPBACK):
            raise ValueError("the proxy serves TLS: give --certfile and --keyfile "
                             "(plain HTTP only with --insecure on a loopback address)")
        if upstream.startswith("http://") and parse_hostport(
                upstream.split("://", 1)[1].split("/", 1)[0])[0] not in LOOPBACK:
            raise ValueError("plain-HTTP upstream only on loopback; use https:// and --upstream-ca")
        for p in (certfile, keyfile, upstream_ca):
            if p and not Path(p).is_file():
                raise ValueError(f"{p}: file not found")
        verify: ssl.SSLContext | bool = True
        if upstream.startswith("https://"):
            verify = ssl.create_default_context(cafile=str(upstream_ca) if upstream_ca else None)
        self.certfile, self.keyfile = certfile, keyfile
        self.app = FleetProxyApp(upstream, verify, max_body_mb << 20, timeout,
                                 allow_self_registration=allow_self_registration,
                                 bulk_upstream=bulk_upstream)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def _uvicorn(self) -> Any:
        import uvicorn

        cfg = uvicorn.Config(
            self.app, host=self.host, port=self.port, lifespan="on", log_level="warning",
            access_log=False, server_header=False, date_header=False, proxy_headers=False, ws="none",
            ssl_certfile=str(self.certfile) if self.certfile else None,
            ssl_keyfile=str(self.keyfile) if self.keyfile else None,
            timeout_keep_alive=75, timeout_graceful_shutdown=10,
        )
        return uvicorn.Server(cfg)

    def serve(self) -> None:
        """Serve until SIGTERM/SIGINT (uvicorn handles both in the main thread)."""
        self._server = self._uvicorn()
        self._server.run()

    def start(self, timeout: float = 30.0) -> FleetProxy:
        self._server = self._uvicorn()
        self._thread = threading.Thread(target=self._server.run, name="fleet-proxy", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"fleet proxy did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fedseg.runtime.fleet_proxy",
        description="Expose only a SuperLink's Fleet API (/v1/fleet/) to the sites.",
    )
    p.add_argument("--listen", default="0.0.0.0:9092", help="public HOST:PORT (default %(default)s)")
    p.add_argument("--upstream", default="https://127.0.0.1:9093",
                   help="the SuperLink, bound to loopback (default %(default)s)")
    p.add_argument("--certfile", help="server certificate (PEM; fedseg provision's server.pem)")
    p.add_argument("--keyfile", help="its private key (server.key)")
    p.add_argument("--upstream-ca", help="CA that signed the SuperLink's certificate (ca.pem)")
    p.add_argument("--max-body-mb", type=int, default=DEFAULT_MAX_BODY_MB,
                   help="largest request body accepted (default %(default)s)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds the SuperLink gets to answer one request (default %(default)s)")
    p.add_argument("--allow-self-registration", action="store_true",
                   help="forward register-node/unregister-node (default: refused; the "
                        "operator registers the sites' keys)")
    p.add_argument("--insecure", action="store_true",
                   help="plain HTTP on a loopback --listen address (trials only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s fleet-proxy %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per forwarded request
    try:
        proxy = FleetProxy(args.listen, args.upstream, args.certfile, args.keyfile,
                           args.upstream_ca, args.max_body_mb, args.timeout,
                           allow_plain_http=args.insecure,
                           allow_self_registration=args.allow_self_registration)
    except ValueError as err:
        print(f"fleet-proxy: error: {err}", file=sys.stderr)
        return 2
    log.info("serving %s on %s:%d -> %s", FLEET_PREFIX, proxy.host, proxy.port, proxy.upstream)
    proxy.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
