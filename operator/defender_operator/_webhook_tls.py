"""The admission webhook's secrets: its serving certificate and the stamp key.

Both live in one operator-owned Secret (`DEFENDER_OPERATOR_ADMISSION_SECRET`), created by the
first replica that needs it and read by every other, so all replicas serve with the same
certificate (the API server trusts one CA bundle) and verify each other's stamps, across
restarts. When the certificate comes from elsewhere (cert-manager, mounted as a directory),
the Secret holds the stamp key only.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from defender_operator._errors import AdmissionSetupError, api_errors_only, api_failure

log = logging.getLogger("defender_operator.admission")

STAMP_KEY = "stamp.key"
CERT, KEY, CA = "tls.crt", "tls.key", "ca.crt"
HOSTS_ANNOTATION = "mldefender.io/cert-hosts"
# Renewed at start-up when less than this is left; a CA and leaf of this age are replaced.
RENEW_BEFORE = timedelta(days=90)
VALIDITY = timedelta(days=3650)


@dataclass(frozen=True)
class ServingCert:
    cert_pem: bytes
    # Out of repr: a logged or raised object must not carry the private key.
    key_pem: bytes = field(repr=False)
    ca_pem: bytes


def self_signed(hosts: list[str], now: datetime) -> ServingCert:
    """A private CA and a serving certificate for `hosts` (IP addresses or DNS names)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ml-defender admission CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return ServingCert(
        cert_pem=leaf.public_bytes(pem),
        key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        ca_pem=ca.public_bytes(pem),
    )


def needs_new_cert(
    data: dict[str, str], stored_hosts: str, hosts: list[str], now: datetime
) -> bool:
    """True when the Secret holds no usable certificate for `hosts` valid beyond RENEW_BEFORE."""
    if any(k not in data for k in (CERT, KEY, CA)) or stored_hosts != ",".join(hosts):
        return True
    try:
        cert = x509.load_pem_x509_certificate(base64.b64decode(data[CERT]))
    except ValueError:
        return True
    return cert.not_valid_after_utc - now < RENEW_BEFORE


@dataclass(frozen=True)
class AdmissionSecrets:
    stamp_key: bytes = field(repr=False)
    cert: ServingCert


def ensure(
    core: client.CoreV1Api,
    namespace: str,
    name: str,
    *,
    hosts: list[str],
    cert_dir: Path | None,
    now: datetime | None = None,
) -> AdmissionSecrets:
    """Read the Secret, creating or completing it when needed; the certificate comes from
    `cert_dir` (tls.crt, tls.key, ca.crt) when given. A replica that loses the race to create
    or update the Secret reads the winner's."""
    now = now or datetime.now(UTC)
    core = api_errors_only(core)
    for _ in range(3):
        try:
            secret = core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise _error("read", namespace, name, exc) from None
            secret = None
        meta = secret.metadata if secret is not None else None
        stored = (secret.data if secret is not None else None) or {}
        data: dict[str, str] = {k: str(v) for k, v in stored.items()}
        annotations: dict[str, str] = dict((meta.annotations if meta else None) or {})
        wanted = dict(data)
        if STAMP_KEY not in wanted:
            wanted[STAMP_KEY] = base64.b64encode(secrets.token_bytes(32)).decode()
        if cert_dir is None and needs_new_cert(
            data, annotations.get(HOSTS_ANNOTATION, ""), hosts, now
        ):
            made = self_signed(hosts, now)
            wanted.update(
                {
                    CERT: base64.b64encode(made.cert_pem).decode(),
                    KEY: base64.b64encode(made.key_pem).decode(),
                    CA: base64.b64encode(made.ca_pem).decode(),
                }
            )
            annotations[HOSTS_ANNOTATION] = ",".join(hosts)
        if wanted != data and not _write(core, namespace, name, secret, wanted, annotations):
            continue  # another replica wrote it meanwhile: use theirs
        stamp_key = base64.b64decode(wanted[STAMP_KEY])
        if cert_dir is not None:
            return AdmissionSecrets(stamp_key, _from_dir(cert_dir))
        return AdmissionSecrets(
            stamp_key,
            ServingCert(*(base64.b64decode(wanted[k]) for k in (CERT, KEY, CA))),
        )
    raise AdmissionSetupError(f"Secret {namespace}/{name} keeps changing; is another writer busy?")


def _write(
    core: client.CoreV1Api,
    namespace: str,
    name: str,
    existing: client.V1Secret | None,
    data: dict[str, str],
    annotations: dict[str, str],
) -> bool:
    """False when another writer got there first (create conflict, stale resourceVersion)."""
    meta = client.V1ObjectMeta(
        name=name,
        annotations=annotations,
        labels={"app.kubernetes.io/managed-by": "ml-defender-operator"},
        resource_version=(
            existing.metadata.resource_version if existing and existing.metadata else None
        ),
    )
    body = client.V1Secret(metadata=meta, type="Opaque", data=data)
    try:
        if existing is None:
            core.create_namespaced_secret(namespace, body)
        else:
            core.replace_namespaced_secret(name, namespace, body)
    except ApiException as exc:
        if exc.status == 409:
            return False
        # The API error's body may echo the Secret sent: private key and stamp key.
        raise _error("write", namespace, name, exc) from None
    log.info("admission Secret %s/%s written", namespace, name)
    return True


def _from_dir(cert_dir: Path) -> ServingCert:
    try:
        return ServingCert(*((cert_dir / f).read_bytes() for f in (CERT, KEY, CA)))
    except OSError as exc:
        raise AdmissionSetupError(
            f"cannot read the webhook certificate from {cert_dir} ({exc.strerror}): it must hold"
            f" {CERT}, {KEY} and {CA} (a cert-manager Certificate's Secret, mounted)"
        ) from exc


def _error(action: str, namespace: str, name: str, exc: ApiException) -> AdmissionSetupError:
    return AdmissionSetupError(
        f"cannot {action} Secret {namespace}/{name}: {api_failure(exc, 'secrets in its namespace')}"
    )
