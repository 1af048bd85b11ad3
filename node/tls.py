"""Mutual TLS between the nodes: a network CA, one certificate per node, and the checks.

``network init`` makes a certificate authority for the network (an ECDSA
P-256 key and a self-signed certificate) and issues every node a key and a
certificate whose common name and DNS name are the node's id
(:func:`write_network_tls`). The genesis holds the SHA-256 of the CA
certificate (``[protocol] tls_ca_sha256``), so a node refuses a CA file
that is not its network's. Files, in the network folder and in each host's
bundle::

    tls/ca.pem            the CA certificate (public)
    tls/ca.key            the CA's key: only in the network folder, never in a bundle
    tls/<node id>.pem     the node's certificate
    tls/<node id>.key     its key (mode 0600)

Every node serves and dials with mutual TLS (``node.serving``): a peer must
present a certificate of this CA, its common name must be a member of the
genesis, and the member's role must be one the called method admits
(:data:`node.serving.METHOD_ROLES`). A dialing node checks that the server
it reached holds the certificate of the node id the genesis lists at that
address. :func:`issue` re-issues one node's certificate (rotation:
``network certify``).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from node.durable import write_durably

TLS_DIR: Final = "tls"
CA_CERT: Final = "ca.pem"
CA_KEY: Final = "ca.key"
# A node certificate's validity; the CA's is longer. Rotation before the end: docs/DEPLOY.md.
CERT_DAYS: Final = 825
CA_DAYS: Final = 3650


class TlsError(Exception):
    """TLS files that cannot be used (missing, readable by others, of another network)."""


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "LL-BCFL"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(label: str, *, now: datetime.datetime | None = None) -> tuple[bytes, bytes]:
    """A new CA: (key PEM, certificate PEM)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"LL-BCFL network CA {label}")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def issue(
    ca_key_pem: bytes, ca_cert_pem: bytes, node_id: str, *, now: datetime.datetime | None = None
) -> tuple[bytes, bytes]:
    """A new key and certificate for ``node_id`` (CN and DNS name), signed by the CA."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(node_id))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def ca_digest(ca_cert_pem: bytes) -> str:
    """The SHA-256 (hex) of a CA certificate's DER bytes, as the genesis holds it."""
    cert = x509.load_pem_x509_certificate(ca_cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def node_files(tls_dir: Path, node_id: str) -> tuple[Path, Path]:
    """(certificate, key) paths of ``node_id`` in ``tls_dir``."""
    return Path(tls_dir) / f"{node_id}.pem", Path(tls_dir) / f"{node_id}.key"


def write_node(tls_dir: Path, node_id: str, ca_key_pem: bytes, ca_cert_pem: bytes) -> None:
    """Issue ``node_id`` a new key and certificate into ``tls_dir`` (key 0600)."""
    key, cert = issue(ca_key_pem, ca_cert_pem, node_id)
    cert_path, key_path = node_files(tls_dir, node_id)
    write_durably(key_path, key, mode=0o600)
    write_durably(cert_path, cert, mode=0o600)


def write_network_tls(network_dir: Path, node_ids: Iterable[str], *, label: str) -> str:
    """A CA and every node's key and certificate under ``network_dir/tls``; the CA digest."""
    tls_dir = Path(network_dir) / TLS_DIR
    tls_dir.mkdir(parents=True, exist_ok=True)
    tls_dir.chmod(0o700)
    for stale in (*tls_dir.glob("*.pem"), *tls_dir.glob("*.key")):
        stale.unlink()
    ca_key, ca_cert = make_ca(label)
    write_durably(tls_dir / CA_KEY, ca_key, mode=0o600)
    write_durably(tls_dir / CA_CERT, ca_cert, mode=0o600)
    for node_id in node_ids:
        write_node(tls_dir, node_id, ca_key, ca_cert)
    return ca_digest(ca_cert)


def reissue(network_dir: Path, node_id: str) -> Path:
    """Rotate ``node_id``'s key and certificate in ``network_dir/tls`` (the CA signs)."""
    tls_dir = Path(network_dir) / TLS_DIR
    try:
        ca_key = (tls_dir / CA_KEY).read_bytes()
        ca_cert = (tls_dir / CA_CERT).read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read the network CA in {tls_dir}: {exc.strerror}") from exc
    write_node(tls_dir, node_id, ca_key, ca_cert)
    return node_files(tls_dir, node_id)[0]


@dataclass(frozen=True)
class NodeTls:
    """What one node serves and dials with: the CA, its certificate and key (PEM)."""

    node_id: str
    ca: bytes
    cert: bytes
    key: bytes


def _read_private(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read {path}: {exc.strerror}") from exc
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TlsError(f"{path} is readable by others: chmod 600 {path}")
    return data


def load_node_tls(tls_dir: Path, node_id: str, *, expected_ca: str) -> NodeTls:
    """``node_id``'s TLS files from ``tls_dir``, checked against the genesis' CA digest."""
    tls_dir = Path(tls_dir)
    cert_path, key_path = node_files(tls_dir, node_id)
    try:
        ca_pem = (tls_dir / CA_CERT).read_bytes()
        cert_pem = cert_path.read_bytes()
    except OSError as exc:
        raise TlsError(
            f"cannot read {exc.filename}: {exc.strerror} (mutual TLS needs the network's "
            f"{TLS_DIR}/ folder from network init; --tls-dir points elsewhere)"
        ) from exc
    key_pem = _read_private(key_path)
    try:
        if ca_digest(ca_pem) != expected_ca:
            raise TlsError(f"{tls_dir / CA_CERT} is not this network's CA (see the genesis)")
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(ca)
        serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise TlsError(f"{cert_path}: not a certificate of this network's CA ({exc})") from exc
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [node_id]:
        raise TlsError(f"{cert_path} is not {node_id}'s certificate")
    return NodeTls(node_id=node_id, ca=ca_pem, cert=cert_pem, key=key_pem)
