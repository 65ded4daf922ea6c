"""TLS and mTLS end to end: a test CA, a server certificate for 127.0.0.1/localhost and client certificates.

Under mTLS a verified client certificate mapped in the tenants file is a tenant without any API key, and a
client without a certificate (or with one from another CA) never gets past the handshake. Under TLS only,
API keys authenticate as usual. A plaintext client never talks to a TLS port."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from service.client import LoraServeClient
from service.tenants import hash_api_key
from tests.api.conftest import Server, rpc_error

KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdefgh"}
UNAVAILABLE, UNAUTHENTICATED = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED
REFUSED_S = 10  # deadline of calls expected to fail: a refused handshake answers at once


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _issue(cn: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None, *,
           usage: x509.ObjectIdentifier | None = None, san: list[x509.GeneralName] | None = None
           ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for `cn`: self-signed CA without an issuer, else a leaf for `usage` signed by it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True))
    if issuer is None:
        b = b.issuer_name(name).add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
        return b.sign(key, hashes.SHA256()), key
    b = b.issuer_name(issuer[0].subject).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer[1], hashes.SHA256()), key


def _pem(pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> Pem:
    cert, key = pair
    return Pem(cert.public_bytes(serialization.Encoding.PEM),
               key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()))


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    alice: Pem  # CN=alice-service, signed by the CA: mapped to tenant alice
    mallory: Pem  # signed by the CA, but its CN is mapped to no tenant
    rogue_ca: Pem
    rogue_alice: Pem  # CN=alice-service too, but signed by another CA


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, rogue = _issue("loraserve test CA"), _issue("rogue CA")
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _issue("loraserve", ca, usage=ExtendedKeyUsageOID.SERVER_AUTH, san=san)
    client = ExtendedKeyUsageOID.CLIENT_AUTH
    return Pki(ca=_pem(ca), server=_pem(server), alice=_pem(_issue("alice-service", ca, usage=client)),
               mallory=_pem(_issue("mallory", ca, usage=client)), rogue_ca=_pem(rogue),
               rogue_alice=_pem(_issue("alice-service", rogue, usage=client)))


def _files(root: Path, pki: Pki, mtls: bool) -> dict[str, str]:
    (root / "server.pem").write_bytes(pki.server.cert)
    (root / "server.key").write_bytes(pki.server.key)
    (root / "ca.pem").write_bytes(pki.ca.cert)
    (root / "tenants.yaml").write_text(f"""
tenants:
  - id: alice
    api_keys: ["{hash_api_key(KEYS['alice'])}"]
    client_cert_subjects: ["CN=alice-service"]
  - id: bob
    api_keys: ["{hash_api_key(KEYS['bob'])}"]
""")
    svc = {"tls_cert": str(root / "server.pem"), "tls_key": str(root / "server.key"),
           "tenants_file": str(root / "tenants.yaml")}
    return {**svc, "tls_client_ca": str(root / "ca.pem")} if mtls else svc


@pytest.fixture(scope="module")
def mtls(tiny, pki, tmp_path_factory):
    root = tmp_path_factory.mktemp("mtls")
    s = Server(tiny[0], root / "data", service=_files(root, pki, mtls=True))
    yield s
    s.close()


@pytest.fixture(scope="module")
def tls_only(tiny, pki, tmp_path_factory):
    root = tmp_path_factory.mktemp("tls-only")
    s = Server(tiny[0], root / "data", service=_files(root, pki, mtls=False))
    yield s
    s.close()


def client(server: Server, *, ca: Pem, cert: Pem | None = None, api_key: str | None = None,
           host: str = "localhost") -> LoraServeClient:
    """A TLS client trusting `ca`, presenting `cert` if given; the server's certificate must match `host`."""
    return LoraServeClient(f"{host}:{server.server.port}", tls=True, root_certificates=ca.cert,
                           client_cert=cert.cert if cert else None, client_key=cert.key if cert else None,
                           api_key=api_key, timeout=30)


def test_mtls_client_certificate_without_a_key_is_its_tenant(mtls, pki, tiny):
    with client(mtls, ca=pki.ca, cert=pki.alice) as alice:
        assert alice.health() == "SERVING"
        up = alice.upload_adapter(tiny[1], "via-cert")
        assert up.created and up.version.owner == "alice"
        assert [(a.owner, a.name) for a in alice.list_adapters()] == [("alice", "via-cert")]
    with client(mtls, ca=pki.ca, cert=pki.alice, host="127.0.0.1") as alice:  # the IP SAN matches too
        assert alice.get_adapter("via-cert").owner == "alice"


def test_mtls_api_key_names_the_tenant_over_the_certificate(mtls, pki):
    """A certificate gets the caller through the handshake; an API key, when sent, says who it is."""
    with client(mtls, ca=pki.ca, cert=pki.alice, api_key=KEYS["bob"]) as bob:
        assert all(a.owner != "alice" for a in bob.list_adapters())
    with client(mtls, ca=pki.ca, cert=pki.alice, api_key="not-a-key-of-anyone-here") as c:
        err = rpc_error(c.list_adapters)
        assert err.code() == UNAUTHENTICATED and "API key is not valid" in err.details()


@pytest.mark.parametrize("who", ["no client certificate", "certificate of another CA"])
def test_mtls_refuses_the_handshake(mtls, pki, who):
    cert = None if who == "no client certificate" else pki.rogue_alice
    with client(mtls, ca=pki.ca, cert=cert, api_key=KEYS["alice"]) as c:  # a valid key does not help
        err = rpc_error(c.list_adapters, timeout=REFUSED_S)
        assert err.code() == UNAVAILABLE, err.details()
        assert rpc_error(c.health, timeout=REFUSED_S).code() == UNAVAILABLE  # nothing is open without it


def test_mtls_certificate_mapped_to_no_tenant_is_unauthenticated(mtls, pki):
    with client(mtls, ca=pki.ca, cert=pki.mallory) as c:
        assert c.health() == "SERVING"  # the CA signed it: the handshake succeeds
        err = rpc_error(c.list_adapters)
        assert err.code() == UNAUTHENTICATED and "not mapped to a tenant" in err.details()


@pytest.mark.parametrize("mode", ["mtls", "tls_only"])
def test_plaintext_client_fails_on_a_tls_port(request, mode):
    server = request.getfixturevalue(mode)
    with LoraServeClient(server.target, api_key=KEYS["alice"]) as c:
        assert rpc_error(c.list_adapters, timeout=REFUSED_S).code() == UNAVAILABLE


@pytest.mark.parametrize("mode", ["mtls", "tls_only"])
def test_client_that_does_not_trust_the_server_fails(request, pki, mode):
    server = request.getfixturevalue(mode)
    with client(server, ca=pki.rogue_ca, cert=pki.alice, api_key=KEYS["alice"]) as c:
        assert rpc_error(c.list_adapters, timeout=REFUSED_S).code() == UNAVAILABLE


def test_tls_only_authenticates_with_api_keys(tls_only, pki, tiny):
    with client(tls_only, ca=pki.ca, api_key=KEYS["alice"]) as alice:
        up = alice.upload_adapter(tiny[1], "over-tls")
        assert up.created and up.version.owner == "alice"
    with client(tls_only, ca=pki.ca) as anonymous:
        assert anonymous.health() == "SERVING"
        err = rpc_error(anonymous.list_adapters)
        assert err.code() == UNAUTHENTICATED and "no credentials" in err.details()


def test_tls_only_ignores_client_certificates(tls_only, pki):
    """Without a client CA the server asks for no certificate, so one names no tenant: a key is needed."""
    with client(tls_only, ca=pki.ca, cert=pki.alice) as c:
        err = rpc_error(c.list_adapters)
        assert err.code() == UNAUTHENTICATED and "no credentials" in err.details()
