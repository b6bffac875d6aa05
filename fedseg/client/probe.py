"""Why a site cannot reach its server, as one line with what to do, within seconds.

Why: Flower 1.42's SuperNode logs only ``Connection attempt failed, retrying in N seconds`` (the
reason goes to DEBUG), so a site with a misspelt server name, a closed port or the wrong
``ca.pem`` saw nothing but that line, forever. And a site pointed at the SuperLink's own port
(reachable on the server machine itself) instead of ``fedseg-server``'s public port (the fleet
proxy) enrolled, fingerprinted and preprocessed before its first model download got a 404,
minutes later. So ``fedseg-client`` asks the server address itself, step by step, what a
SuperNode would meet: the name (DNS), the port (TCP), the certificate (TLS, against the site's
CA and the name it uses), and then ``GET /fedseg/bulk/``, which only ``fedseg-server``'s fleet
proxy answers (``{"fedseg": "fleet-proxy"}``, :mod:`fedseg.runtime.fleet_app`); a 404 there
with a Fleet API behind ``/v1/fleet/`` is a bare Flower SuperLink. The probe sends nothing
signed and nothing of the site's; it changes nothing at the server.

What a probe cannot see — whether the server accepts this site's identity key — only the
SuperNode's answer shows: :func:`auth_finding` reads it from the SuperNode's log.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

TIMEOUT_S = 10.0
# what Flower 1.42's SuperNode logs when the SuperLink refuses its key (flwr/supercore/error/
# catalog.py: FLEET_NODE_ACTIVATION_FAILED; superlink/routers/fleet/node_auth.py: 401)
ACTIVATION_REFUSED = "Failed to activate SuperNode"
SIGNATURE_REFUSED = "Invalid SuperNode authentication"
# X509 verify codes (OpenSSL x509_vfy.h) that mean "the name in `server` is not the certificate's"
HOSTNAME_MISMATCH = {62, 64}


@dataclass(frozen=True)
class Finding:
    """The probe's answer: ``kind`` ok | address | dns | refused | timeout | tls | tls-name |
    not-tls | tls-expected | superlink | not-fedseg | auth; ``line`` says what to do;
    ``fatal``: retrying cannot help (the client stops with that line)."""

    kind: str
    line: str
    fatal: bool = False

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


def split_server(server: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` → (host, port); ValueError when it is not one."""
    host, sep, port = server.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(server)
    return host, int(port)


def probe(server: str, ca_file: str | Path | None, insecure: bool = False,
          source: str = "client config", timeout: float = TIMEOUT_S) -> Finding:
    """Ask ``server`` what a SuperNode would meet there (module docstring)."""
    field = f"{source}: field 'server'"
    try:
        host, port = split_server(server)
    except ValueError:
        return Finding("address", f"{field}: '{server}' is not HOST:PORT (e.g. "
                       "fedseg.example.org:9092)", fatal=True)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        return Finding("dns", f"{field}: cannot resolve '{host}' ({_why(err)}): use the "
                       "server's name as this site reaches it (one of the names its certificate "
                       "was provisioned with, --server-san), or ask IT to make it resolve here")
    ctx = None
    if not insecure:
        try:
            ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as err:
            return Finding("tls", f"{source}: field 'root_certificates': cannot read the CA "
                           f"{ca_file} ({_why(err)})", fatal=True)
    conn: http.client.HTTPConnection = (
        http.client.HTTPConnection(host, port, timeout=timeout) if ctx is None
        else http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx))
    try:
        try:
            conn.connect()
        except ConnectionRefusedError:
            return Finding("refused", f"{field}: connection refused at {server}: nothing "
                           "listens there (fedseg-server not started yet, or another port: use "
                           "server.toml's 'port', 9092 by default); retrying")
        except ssl.SSLCertVerificationError as err:
            return _tls_finding(err, server, host, port, source)
        except ssl.SSLError as err:
            return Finding("not-tls", f"{field}: TLS handshake with {server} failed "
                           f"({_why(err)}): it does not speak TLS (a server with insecure = "
                           "true?) or is not fedseg-server")
        except TimeoutError:
            return Finding("timeout", f"{field}: no answer from {server} within "
                           f"{timeout:.0f} s: a firewall drops the connection or the address is "
                           "wrong (the site needs outbound TCP to it); retrying")
        except OSError as err:
            return Finding("refused", f"{field}: cannot connect to {server} ({_why(err)}); "
                           "check the address and the network; retrying")
        return _identify(conn, server, field, insecure)
    finally:
        conn.close()


def _identify(conn: http.client.HTTPConnection, server: str, field: str,
              insecure: bool) -> Finding:
    """Connected (TLS verified): is it fedseg-server's public port (the fleet proxy)?"""
    try:
        status, body = _request(conn, "GET", "/fedseg/bulk/")
        if status == 200 and _json(body).get("fedseg") == "fleet-proxy":
            return Finding("ok", f"{server} is fedseg-server's public port (fleet proxy"
                           f"{'' if insecure else ', TLS verified with the consortium CA'})")
        flower = status == 404 and _request(conn, "POST", "/v1/fleet/get-run")[0] != 404
    except (http.client.HTTPException, OSError) as err:
        if insecure:
            return Finding("tls-expected", f"{server} does not answer plain HTTP ({_why(err)}): "
                           "it probably expects TLS; remove insecure = true and set pki")
        return Finding("timeout", f"{server} accepted the connection but did not answer "
                       f"({_why(err)}); retrying")
    if flower:
        return Finding("superlink", f"{field}: {server} is a Flower SuperLink's own port, "
                       "not fedseg-server's public port: use server.toml's 'port' (the fleet "
                       "proxy, 9092 by default), not 'superlink_port'; through the SuperLink's "
                       "port the site would enrol and fail at its first model download",
                       fatal=True)
    return Finding("not-fedseg", f"{field}: {server} answers HTTP but is not fedseg-server "
                   f"(GET /fedseg/bulk/ -> {status}); check the host and the port", fatal=True)


def _request(conn: http.client.HTTPConnection, method: str, path: str) -> tuple[int, bytes]:
    headers = {"Content-Length": "0"}
    if method == "POST":
        headers["Content-Type"] = "application/protobuf"
    conn.request(method, path, headers=headers)
    resp = conn.getresponse()
    body = resp.read(4096)
    if resp.will_close or not resp.isclosed():
        conn.close()  # http.client reconnects for the next request
    return resp.status, body


def _json(body: bytes) -> dict:
    try:
        out = json.loads(body)
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def _tls_finding(err: ssl.SSLCertVerificationError, server: str, host: str, port: int,
                 source: str) -> Finding:
    code = getattr(err, "verify_code", 0)
    what = getattr(err, "verify_message", "") or _why(err)
    if code in HOSTNAME_MISMATCH:
        names = _certificate_names(host, port)
        return Finding("tls-name", f"{source}: field 'server': the server's certificate is not "
                       f"valid for '{host}' ({what}; it names {', '.join(names) or '?'}): use "
                       "one of those names, or have the admin re-provision with --server-san "
                       f"{host}")
    return Finding("tls", f"{source}: field 'root_certificates' (or 'pki'): the certificate of "
                   f"{server} is not trusted by this site's CA ({what}): this ca.pem is not "
                   "the consortium CA that issued the server's certificate; take ca.pem and "
                   "roster.json from the same 'fedseg provision' folder as the server's")


def _certificate_names(host: str, port: int) -> list[str]:
    """The DNS names and IP addresses in the server certificate's SAN (read unverified: only
    to say which name to use)."""
    try:
        from cryptography import x509

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection((host, port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        return [*san.get_values_for_type(x509.DNSName),
                *(str(a) for a in san.get_values_for_type(x509.IPAddress))]
    except Exception:  # only a hint in a message that is already an error
        return []


def auth_finding(log_text: str, site: str) -> Finding | None:
    """The SuperNode's own log, when the server refused this site's key (no probe sees it)."""
    if ACTIVATION_REFUSED in log_text:
        return Finding("auth", f"the server refused the identity key of site '{site}' (not "
                       "registered there): fedseg-server registers the sites of ITS roster.json "
                       "at start; ask the consortium admin whether this site's key "
                       "(identity.key) is the one in the server's roster, then restart the "
                       "server or register the key")
    if SIGNATURE_REFUSED in log_text:
        return Finding("auth", f"the server refused the signed requests of site '{site}' "
                       "(HTTP 401): check this machine's clock (signatures carry a timestamp) and that "
                       "identity.key is the site's registered key")
    return None


def _why(err: BaseException) -> str:
    """An exception's own words, one line, without the errno prefix noise."""
    if isinstance(err, ssl.SSLError) and getattr(err, "reason", None):
        return str(err.reason).replace("_", " ").lower()
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = " ".join(str(err).split())
    return text or type(err).__name__
