"""Pure parts of the harness: certificates it generates, names it derives."""

from __future__ import annotations

import ipaddress
import re
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from defender_devcluster._kube import write_kubeconfig
from defender_devcluster._pki import Pki, make_pki
from defender_devcluster.pytest_plugin import namespace_name


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "10.0.0.1")


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_serving_cert_is_signed_by_the_ca_with_the_needed_sans(pki: Pki) -> None:
    ca, cert = load(pki.ca_cert), load(pki.serving_cert)
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"} <= set(
        san.get_values_for_type(x509.DNSName)
    )
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.1")} <= ips
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku


@pytest.mark.parametrize(
    ("user", "cn", "groups"),
    [
        ("admin", "kubernetes-admin", ["system:masters"]),
        ("controller-manager", "system:kube-controller-manager", []),
        ("scheduler", "system:kube-scheduler", []),
    ],
)
def test_client_certs_carry_user_and_groups(
    pki: Pki, user: str, cn: str, groups: list[str]
) -> None:
    crt, key = pki.client(user)
    cert = load(crt)
    cert.verify_directly_issued_by(load(pki.ca_cert))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == (
        groups
    )
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_service_account_key_is_rsa_and_private(pki: Pki) -> None:
    priv = load_pem_private_key(pki.sa_key.read_bytes(), None)
    pub = load_pem_public_key(pki.sa_pub.read_bytes())
    assert isinstance(priv, rsa.RSAPrivateKey) and isinstance(pub, rsa.RSAPublicKey)
    assert priv.public_key().public_numbers() == pub.public_numbers()
    assert stat.S_IMODE(pki.sa_key.stat().st_mode) == 0o600
    assert isinstance(
        load_pem_private_key(pki.ca_key.read_bytes(), None), ec.EllipticCurvePrivateKey
    )


def test_kubeconfig_is_self_contained_and_private(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "admin.kubeconfig"
    write_kubeconfig(path, "https://127.0.0.1:6443", pki, "admin")
    doc = yaml.safe_load(path.read_text())
    assert doc["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"
    assert set(doc["users"][0]["user"]) == {"client-certificate-data", "client-key-data"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "test_name",
    ["test_x", "test_a[param-1/2]", "test_" + "very_long_name_" * 10, "[]", "TEST_Upper"],
)
def test_namespace_names_are_unique_dns_labels(test_name: str) -> None:
    a, b = namespace_name(test_name), namespace_name(test_name)
    assert a != b
    for n in (a, b):
        assert len(n) <= 63
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", n), n


def test_front_proxy_ca_is_not_the_cluster_ca(pki: Pki) -> None:
    # A client cert from the cluster CA must not be able to act as the request-header proxy.
    fp_ca, ca = load(pki.front_proxy_ca), load(pki.ca_cert)
    assert fp_ca.public_key() != ca.public_key()
    client = load(pki.front_proxy_client_cert)
    client.verify_directly_issued_by(fp_ca)
    with pytest.raises(ValueError):
        load(pki.client("admin")[0]).verify_directly_issued_by(fp_ca)
