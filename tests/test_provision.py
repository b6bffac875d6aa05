"""``fedseg provision``: files, permissions, formats Flower 1.42 really accepts, the roster."""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedseg.cli import main as fedseg_main
from fedseg.errors import FedsegError
from fedseg.privacy.app_registry import sign_fab, verify_fab
from fedseg.privacy.provision import check_ca_matches, load_roster, provision
from fedseg.privacy.transport import (
    check_identity_key,
    check_server_certificate,
    check_signing_key,
    superlink_security_args,
    supernode_security_args,
    trusted_entities_file,
)

SANS = ["127.0.0.1", "localhost", "::1", "fedseg.example.org"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prov") / "pki"
    provision(out, ["hospitalA", "hospitalB"], SANS, days=30, consortium="demo")
    return out


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prov2") / "pki"
    provision(out, ["hospitalA"], ["localhost"], days=30)
    return out


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_layout_and_private_key_permissions(pki: Path) -> None:
    for name in ("ca.pem", "server.pem", "app-signing.pub", "roster.json"):
        assert (pki / name).is_file()
    private = [pki / "ca.key", pki / "server.key", pki / "app-signing.key"]
    for site in ("hospitalA", "hospitalB"):
        d = pki / "sites" / site
        assert _mode(d) == 0o700
        assert (d / "identity.pub").is_file()
        private.append(d / "identity.key")
    for p in private:
        assert _mode(p) == 0o600, p
    assert _mode(pki / "ca.pem") == 0o644


def test_server_certificate_is_signed_by_ca_with_typed_sans(pki: Path) -> None:
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    certs = x509.load_pem_x509_certificates((pki / "server.pem").read_bytes())
    srv = certs[0]
    srv.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                       ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "fedseg.example.org"]
    eku = srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku


def _handshake(pki: Path, ca: Path, server_hostname: str) -> None:
    """A real TLS handshake in memory: server.pem/.key against a client trusting ``ca``."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    cctx = ssl.create_default_context(cafile=str(ca))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = cctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for key, obj in (("c", client), ("s", server)):
            if not done[key]:
                try:
                    obj.do_handshake()
                    done[key] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "fedseg.example.org", "::1"])
def test_tls_handshake_verifies_for_every_san(pki: Path, host: str) -> None:
    _handshake(pki, pki / "ca.pem", host)


def test_tls_handshake_fails_for_wrong_ca_or_name(pki: Path, other: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki, other / "ca.pem", "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki, pki / "ca.pem", "evil.example.org")


def test_site_keys_load_the_way_flower_loads_them(pki: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    roster = load_roster(pki)
    for site in ("hospitalA", "hospitalB"):
        d = pki / "sites" / site
        # flower-supernode --auth-supernode-private-key identity.key
        priv, pub = _try_setup_client_authentication(argparse.Namespace(
            auth_supernode_private_key=str(d / "identity.key"), auth_supernode_public_key=None))
        assert isinstance(priv.curve, ec.SECP384R1)
        # flwr supernode register identity.pub -> PEM the SuperLink stores
        registered = try_load_public_key(d / "identity.pub")
        assert registered.decode() == roster.sites[site].public_key_pem
        assert (d / "identity.pub").read_text().strip() == roster.sites[site].public_key
        assert pub.public_bytes(serialization.Encoding.PEM,
                                serialization.PublicFormat.SubjectPublicKeyInfo) == registered
        check_identity_key(roster, site, d / "identity.key")
    with pytest.raises(FedsegError, match="not the one the consortium roster lists"):
        check_identity_key(roster, "hospitalA", pki / "sites" / "hospitalB" / "identity.key")
    with pytest.raises(FedsegError, match="not in the consortium roster"):
        check_identity_key(roster, "nobody", pki / "sites" / "hospitalB" / "identity.key")
    with pytest.raises(FedsegError, match="not an OpenSSH private key"):
        check_identity_key(roster, "hospitalA", pki / "server.key")


def test_trusted_entities_and_fab_signatures_match_flower(pki: Path, other: Path,
                                                          tmp_path: Path) -> None:
    from flwr.supercore.fab import Fab
    from flwr.supercore.primitives.asymmetric_ed25519 import load_private_key
    from flwr.supernode.cli.flower_supernode import (
        _try_obtain_trusted_entities,
        _validate_public_keys_ed25519,
    )
    from flwr.supernode.start_client_internal import _verify_fab

    roster = load_roster(pki / "roster.json")
    assert isinstance(load_private_key(pki / "app-signing.key"), ed25519.Ed25519PrivateKey)
    path = trusted_entities_file(roster, tmp_path / "trusted.yaml")
    trusted = _try_obtain_trusted_entities(path)
    _validate_public_keys_ed25519(trusted)  # flwr_exit (SystemExit) if not Ed25519
    assert trusted == {roster.app_signing.key_id: roster.app_signing.public_key}

    fab = b"not really a zip, but the signature covers sha256 of exactly these bytes"
    good = sign_fab(fab, pki / "app-signing.key", roster.app_signing.key_id)
    assert verify_fab(fab, [good], trusted)
    assert not verify_fab(fab + b"!", [good], trusted)
    wrong_key = sign_fab(fab, other / "app-signing.key", roster.app_signing.key_id)
    assert not verify_fab(fab, [wrong_key], trusted)

    def flwr_verifies(rec: dict) -> bool:
        verifs = {rec["public_key_id"]: json.dumps({k: v for k, v in rec.items()
                                                    if k != "public_key_id"}),
                  "valid_license": "Valid"}
        return _verify_fab(Fab(hashlib.sha256(fab).hexdigest(), fab, verifs), trusted)

    assert flwr_verifies(good)
    assert not flwr_verifies(wrong_key)


def test_security_args(pki: Path, tmp_path: Path) -> None:
    args = superlink_security_args(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    assert args[-1] == "--enable-supernode-auth" and "--ssl-ca-certfile" in args
    key = pki / "sites" / "hospitalA" / "identity.key"
    assert supernode_security_args(pki / "ca.pem", key) == [
        "--root-certificates", str(pki / "ca.pem"), "--auth-supernode-private-key", str(key)]
    with pytest.raises(FedsegError, match="file not found"):
        supernode_security_args(tmp_path / "nope.pem")


def test_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    first = provision(out, ["a", "b"], ["localhost"], days=5)
    with pytest.raises(FedsegError, match="refusing to overwrite"):
        provision(out, ["a"], ["localhost"], days=5)
    assert load_roster(out) == first  # untouched
    second = provision(out, ["c"], ["localhost"], days=5, force=True)
    assert set(second.sites) == {"c"}
    assert sorted(p.name for p in (out / "sites").iterdir()) == ["c"]
    assert second.sites["c"].public_key != first.sites["a"].public_key
    empty = tmp_path / "empty"
    empty.mkdir()
    provision(empty, ["a"], ["localhost"], days=5)  # an empty folder is fine


@pytest.mark.parametrize("sites,sans,match", [
    ([], ["localhost"], "at least one site"),
    (["ok", "bad name"], ["localhost"], "site name 'bad name'"),
    (["a", "a"], ["localhost"], "given twice"),
    (["a"], ["not a host!"], "neither an IP address nor a DNS name"),
    (["a"], [""], "at least one DNS name"),
])
def test_bad_arguments(tmp_path: Path, sites: list, sans: list, match: str) -> None:
    with pytest.raises(FedsegError, match=match):
        provision(tmp_path / "x", sites, sans, days=5)
    assert not (tmp_path / "x").exists()  # nothing written


def test_load_roster_errors_are_one_line(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(FedsegError, match="roster not found") as e:
        load_roster(tmp_path / "missing.json")
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FedsegError, match="unreadable JSON"):
        load_roster(bad)
    data = json.loads((pki / "roster.json").read_text())
    data["sites"]["hospitalA"]["public_key"] = data["sites"]["hospitalB"]["public_key"]
    bad.write_text(json.dumps(data))
    with pytest.raises(FedsegError, match=r"sites\.hospitalA.*different keys") as e:
        load_roster(bad)
    assert "\n" not in str(e.value)
    data = json.loads((pki / "roster.json").read_text())
    data["app_signing"]["public_key"] = data["sites"]["hospitalA"]["public_key"]
    bad.write_text(json.dumps(data))
    with pytest.raises(FedsegError, match="must be Ed25519"):
        load_roster(bad)
    data = json.loads((pki / "roster.json").read_text())
    del data["consortium"]
    bad.write_text(json.dumps(data))
    with pytest.raises(FedsegError, match="consortium"):
        load_roster(bad)


def test_ca_fingerprint_in_roster(pki: Path, other: Path) -> None:
    roster = load_roster(pki)
    check_ca_matches(roster, pki / "ca.pem")
    with pytest.raises(FedsegError, match="not the consortium's"):
        check_ca_matches(roster, other / "ca.pem")


def test_start_up_checks_of_certificate_and_signing_key(pki: Path, other: Path) -> None:
    """What fedseg-server checks before it starts: its certificate is the CA's and names
    127.0.0.1 (where the fleet proxy and the flwr CLI reach the SuperLink); its app-signing key
    is the roster's (the key the sites trust)."""
    check_server_certificate(pki / "server.pem", pki / "ca.pem")
    with pytest.raises(FedsegError, match="not issued by the CA"):
        check_server_certificate(pki / "server.pem", other / "ca.pem")
    with pytest.raises(FedsegError, match="no subject alternative name 127.0.0.1"):
        check_server_certificate(other / "server.pem", other / "ca.pem")  # SAN: localhost only
    with pytest.raises(FedsegError, match="not a PEM certificate"):
        check_server_certificate(pki / "roster.json", pki / "ca.pem")
    roster = load_roster(pki)
    check_signing_key(roster, pki / "app-signing.key")
    with pytest.raises(FedsegError, match="not the consortium's app-signing key"):
        check_signing_key(roster, other / "app-signing.key")
    with pytest.raises(FedsegError, match="must be Ed25519"):
        check_signing_key(roster, pki / "sites" / "hospitalA" / "identity.key")


def test_cli_provision(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pki"
    argv = ["provision", str(out), "--sites", "hospitalA,hospitalB",
            "--server-san", "127.0.0.1,fedseg.example.org", "--days", "10"]
    assert fedseg_main(argv) == 0
    printed = capsys.readouterr().out
    assert "site hospitalB" in printed
    assert load_roster(out).server_sans == ["127.0.0.1", "fedseg.example.org"]
    assert fedseg_main(argv) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert fedseg_main(argv + ["--force"]) == 0
