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
with a well-formed token are forwarded, streamed both ways, to the ServerApp's bulk server on
loopback (global model down, updates up: ``fedseg/protocol/bulk.py``); nothing else under
``/fedseg/`` but ``GET /fedseg/bulk/`` itself, answered here with ``{"fedseg": "fleet-proxy",
"bulk": true|false}`` (no token, nothing forwarded): ``fedseg-client`` checks with it at start
that its ``server`` is this proxy and not the SuperLink's own port (``fedseg/client/probe.py``).
The bulk server refuses an unknown token or an oversized body from the request's headers,
before reading it, and closes that connection.

A hardened front door (issue #13; the limits and why: :mod:`fedseg.runtime.frontdoor`,
docs/security-notes.md §9): every decision is made from the request's headers before its body is
read or forwarded — a Fleet request must declare its length (no chunked bodies) within
``--max-body-mb`` and carry a valid Flower node-auth signature (else 401, the SuperLink's own
answer), and a key the SuperLink has not yet accepted gets small bodies only; a refused request's
connection is closed unless its body is small enough to drop. Bodies are streamed, never held
whole; the SuperLink gets ``--timeout`` seconds to answer (then 504; 502 if it is down — both
retried by Flower's SuperNode). Header size, head and body-idle timeouts and connection caps are
uvicorn's/h11's settings plus :func:`~fedseg.runtime.frontdoor.guarded_protocol`. Uses only
uvicorn + httpx, which ``flwr==1.42.0`` itself depends on.

Run: ``python -m fedseg.runtime.fleet_proxy --listen 0.0.0.0:9092 --upstream
https://127.0.0.1:9093 --certfile server.pem --keyfile server.key --upstream-ca ca.pem``;
or embed: ``FleetProxy(...).start()`` / ``.stop()`` (a uvicorn server in a thread).
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedseg.runtime.fleet_app import (  # noqa: F401 - FLEET_*, fleet_route: this module's API too
    BULK_PREFIX,
    DEFAULT_MAX_BODY_MB,
    DEFAULT_TIMEOUT_S,
    FLEET_PREFIX,
    FLEET_ROUTES,
    LOOPBACK,
    SELF_REGISTRATION_REFUSAL,
    SELF_REGISTRATION_ROUTES,
    FleetProxyApp,
    fleet_route,
)
from fedseg.runtime.frontdoor import Limits, guarded_protocol

log = logging.getLogger("fedseg.fleet_proxy")

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
                 bulk_upstream: str | None = None, limits: Limits | None = None) -> None:
        self.host, self.port = parse_hostport(listen)
        self.limits = limits or Limits()
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
                                 bulk_upstream=bulk_upstream, limits=self.limits)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def _uvicorn(self) -> Any:
        import uvicorn

        lim = self.limits
        cfg = uvicorn.Config(
            self.app, host=self.host, port=self.port, lifespan="on", log_level="warning",
            access_log=False, server_header=False, date_header=False, proxy_headers=False, ws="none",
            ssl_certfile=str(self.certfile) if self.certfile else None,
            ssl_keyfile=str(self.keyfile) if self.keyfile else None,
            # uvicorn's own limits: the header size (h11), idle keep-alive, and requests in
            # flight (503 beyond: a task can outlive its connection while upstream answers);
            # the connection caps and the head timeout are guarded_protocol's
            http=guarded_protocol(lim), h11_max_incomplete_event_size=lim.max_header_bytes,
            timeout_keep_alive=lim.keep_alive_s, limit_concurrency=lim.max_connections + 1,
            timeout_graceful_shutdown=10,
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
    p.add_argument("--bulk-upstream", help="the ServerApp's bulk server, on loopback "
                   "(http://127.0.0.1:PORT): forward /fedseg/bulk/<token> to it")
    d = Limits()
    p.add_argument("--max-header-kb", type=int, default=d.max_header_bytes >> 10,
                   help="request line + headers, at most (default %(default)s)")
    p.add_argument("--head-timeout", type=float, default=d.head_timeout_s,
                   help="seconds a request head may take to arrive (default %(default)s)")
    p.add_argument("--body-idle-timeout", type=float, default=d.body_idle_timeout_s,
                   help="seconds a request body may pause (default %(default)s)")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections in total (default %(default)s)")
    p.add_argument("--max-connections-per-client", type=int,
                   default=d.max_connections_per_client,
                   help="open connections per client address (default %(default)s)")
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
                           allow_self_registration=args.allow_self_registration,
                           bulk_upstream=args.bulk_upstream, limits=Limits(
                               max_header_bytes=args.max_header_kb << 10,
                               head_timeout_s=args.head_timeout,
                               body_idle_timeout_s=args.body_idle_timeout,
                               max_connections=args.max_connections,
                               max_connections_per_client=args.max_connections_per_client))
    except ValueError as err:
        print(f"fleet-proxy: error: {err}", file=sys.stderr)
        return 2
    log.info("serving %s on %s:%d -> %s", FLEET_PREFIX, proxy.host, proxy.port, proxy.upstream)
    proxy.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
