"""Throwaway ECDSA P-256 certificates for the baseline servers, and keys for load users."""

from __future__ import annotations

import datetime
import ipaddress
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from p2pchat.crypto import generate_envelope_key, generate_identity, sign_broadcast


def write_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """
    Create a self-signed ECDSA P-256 certificate for localhost / 127.0.0.1.

    @return: the paths of the certificate and the (unencrypted PKCS#8) key, both PEM.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}-cert.pem"
    key_path = directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def user_keys() -> tuple[str, str]:
    """
    Real keys for one load user, made the way a peer makes its own (p2pchat.crypto).

    @return: C{(fingerprint, envelope_key)} as the server's C{register} wants them.
    """
    return generate_identity("bench user").fingerprint, generate_envelope_key().public_b64


def broadcast_signature() -> str:
    """
    A real broadcast signature (p2pchat.crypto.sign_broadcast), as long as a peer's: the load users
    send it with every broadcast. The server passes it on without reading it, as a peer's.
    """
    return sign_broadcast(generate_identity("bench user"), "bench user", "x", time.time())
