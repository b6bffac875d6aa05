"""Signed app bundles (FABs) for ``--trusted-entities``, and the consortium app registry.

What Flower 1.42 does (see docs/security-notes.md for the source lines):

- A SuperNode started with ``--trusted-entities FILE.yaml`` runs a FAB only if the SuperLink
  delivered it with verification records and one of them is a valid Ed25519 signature by a
  key listed in the file over ``signed_at (8 bytes big endian) || sha256(FAB bytes)``.
  Otherwise it replies with an error and never runs the app.
- The SuperLink attaches verification records ONLY to FABs it fetched from "Flower Hub"
  (``flwr run @account/app==x.y.z``): ``POST $FLWR_SUPERGRID_API_URL/hub/fetch-fab`` returns a
  download URL plus ``verifications``. A FAB uploaded with ``flwr run ./app`` carries none, so a
  site with ``--trusted-entities`` refuses every locally submitted app.
- ``FLWR_SUPERGRID_API_URL`` is an environment variable of the SuperLink process. Pointing it
  at this module's :class:`AppRegistry` (on 127.0.0.1, reachable only by the SuperLink) makes
  the open-source SuperLink deliver consortium-signed FABs without Flower's cloud.

Trust does not rest on the registry or the SuperLink: each site checks the signature against
its own trusted-entities file, so a SuperLink (or registry) without the signing key cannot make
a site run a FAB that the consortium did not sign.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

# at import time, not in the functions: the registry's request threads and the server's main
# thread would otherwise import flwr concurrently, which can deadlock (fedseg/runtime/frontdoor.py)
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import get_fab_config, get_metadata_from_config

from fedseg.errors import FedsegError

APP_ID_RE = r"^@[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$"  # flwr.supercore.constant.APP_ID_PATTERN


def build_fab(app_dir: Path | str) -> bytes:
    """The exact FAB bytes ``flwr run APP_DIR`` would upload (deterministic zip)."""
    try:
        return build_fab_from_disk(Path(app_dir).resolve())
    except Exception as err:  # flwr raises click/typer exceptions for a bad app folder
        raise FedsegError(f"{app_dir}: cannot build the app bundle ({err})") from None


def fab_app_spec(fab: bytes) -> tuple[str, str]:
    """``('@publisher/name', 'x.y.z')`` from the FAB's pyproject.toml."""
    fab_id, version = get_metadata_from_config(get_fab_config(fab))
    return f"@{fab_id}", version


def _message(fab: bytes, signed_at: int) -> bytes:
    # flwr.supercore.primitives.asymmetric_ed25519.create_message_to_sign
    return signed_at.to_bytes(8, byteorder="big") + hashlib.sha256(fab).digest()


def load_signing_key(path: Path | str) -> ed25519.Ed25519PrivateKey:
    p = Path(path)
    try:
        key = serialization.load_ssh_private_key(p.read_bytes(), password=None)
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise FedsegError(f"{p}: not an OpenSSH private key ({err})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise FedsegError(f"{p}: the app-signing key must be Ed25519")
    return key


def sign_fab(fab: bytes, signing_key: Path | str | ed25519.Ed25519PrivateKey,
             key_id: str) -> dict:
    """A verification record as Flower Hub returns it: public_key_id, signature, signed_at."""
    key = signing_key if isinstance(signing_key, ed25519.Ed25519PrivateKey) \
        else load_signing_key(signing_key)
    signed_at = int(dt.datetime.now(dt.UTC).timestamp())
    sig = key.sign(_message(fab, signed_at))
    return {
        "public_key_id": key_id,
        "signature": base64.urlsafe_b64encode(sig).rstrip(b"=").decode("ascii"),
        "signed_at": signed_at,
    }


def verify_fab(fab: bytes, verifications: list[dict], trusted: dict[str, str]) -> bool:
    """Mirror of the SuperNode's check (flwr.supernode.start_client_internal._verify_fab)."""
    for v in verifications:
        line = trusted.get(str(v.get("public_key_id")))
        if not line:
            continue
        try:
            pub = serialization.load_ssh_public_key(line.encode())
            sig = str(v["signature"])
            raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
            if not isinstance(pub, ed25519.Ed25519PublicKey):
                continue
            pub.verify(raw, _message(fab, int(v["signed_at"])))
            return True
        except (InvalidSignature, KeyError, ValueError, UnsupportedAlgorithm):
            continue
    return False


@dataclass
class _Entry:
    fab: bytes
    verifications: list[dict] = field(default_factory=list)


class AppRegistry:
    """A minimal stand-in for Flower Hub's ``/hub/fetch-fab``, serving consortium-signed FABs.

    Bind it to 127.0.0.1 next to the SuperLink and start the SuperLink with
    ``FLWR_SUPERGRID_API_URL=registry.api_url`` (see :func:`superlink_registry_env`). Submit
    runs with ``flwr run @publisher/name==x.y.z``. Unsigned FABs can be published too (the
    sites then refuse them), which is what the tests use to show the refusal.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._apps: dict[tuple[str, str], _Entry] = {}
        self._by_hash: dict[str, bytes] = {}
        self._lock = threading.Lock()
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: object) -> None:  # quiet
                return

            def _json(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                if self.path.rstrip("/") != "/v1/hub/fetch-fab":
                    self._json(404, {"detail": "not found"})
                    return
                try:
                    n = int(self.headers.get("Content-Length", "0"))
                    req = json.loads(self.rfile.read(n) or b"{}")
                    app_id, version = str(req["app_id"]), req.get("app_version")
                except (ValueError, KeyError):
                    self._json(400, {"detail": "bad request"})
                    return
                entry, ver = registry._lookup(app_id, version)
                if entry is None:
                    self._json(404, {"detail": {"available_app_versions":
                                                registry.versions(app_id)}})
                    return
                h = hashlib.sha256(entry.fab).hexdigest()
                host, port = self.server.server_address[:2]
                self._json(200, {
                    "fab_url": f"http://{host}:{port}/fab/{h}",
                    "verifications": entry.verifications,
                })

            def do_GET(self) -> None:  # noqa: N802
                h = self.path.rsplit("/", 1)[-1]
                with registry._lock:
                    fab = registry._by_hash.get(h) if self.path.startswith("/fab/") else None
                if fab is None:
                    self._json(404, {"detail": "not found"})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(fab)))
                self.end_headers()
                self.wfile.write(fab)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def api_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def publish(self, fab: bytes, verifications: list[dict] | None = None) -> str:
        """Offer ``fab`` (with its signatures); returns the app spec to pass to ``flwr run``."""
        app_id, version = fab_app_spec(fab)
        with self._lock:
            self._apps[(app_id, version)] = _Entry(fab, list(verifications or []))
            self._by_hash[hashlib.sha256(fab).hexdigest()] = fab
        return f"{app_id}=={version}"

    def versions(self, app_id: str) -> list[str]:
        with self._lock:
            return sorted(v for (a, v) in self._apps if a == app_id)

    def _lookup(self, app_id: str, version: str | None) -> tuple[_Entry | None, str | None]:
        with self._lock:
            if version is None:
                vs = sorted((v for (a, v) in self._apps if a == app_id),
                            key=lambda s: tuple(int(x) for x in s.split(".")))
                version = vs[-1] if vs else None
            return self._apps.get((app_id, version or "")), version

    def start(self) -> AppRegistry:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="fedseg-app-registry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> AppRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def superlink_registry_env(registry: AppRegistry) -> dict[str, str]:
    """Environment for ``flower-superlink`` so that ``@app`` runs come from ``registry``."""
    return {"FLWR_SUPERGRID_API_URL": registry.api_url}
