"""Identity keys, self-signed certificates, fingerprints and sealed envelopes.

Pure functions over `cryptography`; DESIGN.md "Security model" says what each piece is for.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import math
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from functools import cached_property

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from .wire import MAX_BROADCAST_SIGNATURE, MAX_KEY_SIGNATURE

MAX_PAYLOAD = 40 * 1024
# In characters; a sealed MAX_PAYLOAD stays below it and fits a protocol line.
MAX_ENVELOPE = 60 * 1024

_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")

_ENVELOPE_VERSION = 1
# Distinct labels keep the AEAD data, the signed data and the key derivation from ever
# being mistaken for one another, or for another version's.
_AAD_LABEL = b"p2pchat envelope v1 aad"
_SIGNED_LABEL = b"p2pchat envelope v1 signature"
_HKDF_LABEL = b"p2pchat envelope v1 key"
_BROADCAST_LABEL = b"p2pchat broadcast v1 signature"
_KEY_LABEL = b"p2pchat envelope key v1 signature"
_X25519_LENGTH = 32
_ENVELOPE_KEY_LENGTH = 43  # unpadded base64 of 32 bytes
_NONCE_LENGTH = 12
_CERTIFICATE_DAYS = 3650


class CryptoError(Exception):
    """A key, certificate or envelope cannot be used; the message says why, for people."""


class EnvelopeError(CryptoError):
    """An envelope that must not be trusted or cannot be opened."""


class WrongEnvelopeKey(EnvelopeError):
    """
    A well-signed envelope sealed to another envelope key (one its recipient had before).

    @ivar fingerprint: the SPKI fingerprint of the key that signed it (the signature verified).
    """

    def __init__(self, message: str, fingerprint: str) -> None:
        super().__init__(message)
        self.fingerprint = fingerprint


# -- fingerprints -------------------------------------------------------------------


def spki_fingerprint(key_or_cert) -> str:
    """
    SHA-256 of the DER SubjectPublicKeyInfo of a public key, private key or certificate,
    as 64 lowercase hex digits: what identifies a user, whatever certificate wraps the key.
    """
    if isinstance(key_or_cert, x509.Certificate) or hasattr(key_or_cert, "private_bytes"):
        key_or_cert = key_or_cert.public_key()
    if not hasattr(key_or_cert, "public_bytes"):
        raise TypeError(f"cannot take the fingerprint of {type(key_or_cert).__name__}")
    return hashlib.sha256(_spki(key_or_cert)).hexdigest()


def _spki(public_key) -> bytes:
    """A public key's DER SubjectPublicKeyInfo: what a fingerprint hashes, and envelopes carry."""
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def cert_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, as 64 lowercase hex digits (pins the server)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def format_fingerprint(fp: str) -> str:
    """A fingerprint for people to compare aloud: groups of four hex digits."""
    return " ".join(fp[i : i + 4] for i in range(0, len(fp), 4))


def valid_fingerprint(value) -> bool:
    """Whether C{value} is a fingerprint as the protocol carries it: 64 lowercase hex digits."""
    return isinstance(value, str) and _FINGERPRINT.fullmatch(value) is not None


def valid_envelope_key(value) -> bool:
    """Whether C{value} is a published envelope key: unpadded base64url of an X25519 public key."""
    try:
        _decode_envelope_key(value)
    except CryptoError:
        return False
    return True


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Strict unpadded base64url: the alphabet only, and the canonical encoding only."""
    if _BASE64URL.fullmatch(text) is None or len(text) % 4 == 1:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # Unused trailing bits must be zero, so one key or envelope has exactly one spelling.
    if _b64encode(data) != text:
        raise ValueError("not canonical base64url")
    return data


def _decode_envelope_key(value) -> X25519PublicKey:
    try:
        if not isinstance(value, str) or len(value) != _ENVELOPE_KEY_LENGTH:
            raise ValueError(value)
        return X25519PublicKey.from_public_bytes(_b64decode(value))
    except ValueError:
        raise CryptoError(
            "an envelope key must be the unpadded base64url of a 32-byte X25519 public key"
        ) from None


# -- files --------------------------------------------------------------------------


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    """
    Replace C{path} with C{data} so that a crash leaves the old file or the new one, never
    a partial one, and the new file never exists with a mode wider than C{mode}.
    """
    directory = os.path.dirname(path) or "."
    # mkstemp creates the file 0600 before anything is written to it.
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


def _read(path: str) -> bytes | None:
    """The file's bytes, or C{None} when it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CryptoError(f"cannot read {path}: {e.strerror}") from None


def _make_directory(directory: str) -> None:
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise CryptoError(f"cannot create the directory {directory}: {e.strerror}") from None


# -- identity -----------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """An ECDSA P-256 key and the self-signed certificate that presents it in TLS."""

    private_key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @cached_property
    def fingerprint(self) -> str:
        return spki_fingerprint(self.private_key)

    @property
    def name(self) -> str | None:
        """The common name in its certificate (for a peer, its user), if any."""
        names = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else None

    def key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def _self_signed(
    private_key: ec.EllipticCurvePrivateKey, common_name: str, days: int
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        # A day of slack for peers whose clocks run behind.
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(private_key, hashes.SHA256())
    )


def generate_identity(common_name: str, days: int = _CERTIFICATE_DAYS) -> Identity:
    """A fresh P-256 key with a self-signed certificate naming C{common_name}."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    return Identity(private_key, _self_signed(private_key, common_name, days))


def _load_identity_key(path: str, data: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CryptoError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CryptoError(f"{path} does not hold an ECDSA P-256 key")
    return key


def _load_certificate(path: str, data: bytes, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(data)
        matches = spki_fingerprint(cert) == spki_fingerprint(key)
    except (ValueError, UnsupportedAlgorithm):
        raise CryptoError(f"{path} is not a PEM certificate") from None
    if not matches:
        raise CryptoError(f"{path} does not belong to the key next to it")
    return cert


def load_or_create_identity(directory: str, basename: str, common_name: str) -> Identity:
    """
    The identity kept in C{<directory>/<basename>.key} (mode 0600) and C{.crt}, created on
    first use; the directory is created mode 0700 when missing.

    @raise CryptoError: naming the file that cannot be read or used.
    """
    _make_directory(directory)
    key_path = os.path.join(directory, basename + ".key")
    cert_path = os.path.join(directory, basename + ".crt")
    key_data = _read(key_path)
    cert_data = _read(cert_path)
    if key_data is None:
        if cert_data is not None:
            raise CryptoError(
                f"{cert_path} exists but its key {key_path} is missing; "
                "move the certificate away to create a new identity"
            )
        identity = generate_identity(common_name)
        # The key first: a crash before the certificate is written is repaired below.
        _write_atomically(key_path, identity.key_pem(), 0o600)
        _write_atomically(cert_path, identity.cert_pem(), 0o644)
        return identity
    key = _load_identity_key(key_path, key_data)
    if cert_data is None:
        identity = Identity(key, _self_signed(key, common_name, _CERTIFICATE_DAYS))
        _write_atomically(cert_path, identity.cert_pem(), 0o644)
        return identity
    return Identity(key, _load_certificate(cert_path, cert_data, key))


# -- envelope keys ------------------------------------------------------------------


@dataclass(frozen=True)
class EnvelopeKey:
    """The X25519 key that envelopes are sealed to; its public half is published."""

    private_key: X25519PrivateKey

    @cached_property
    def public_b64(self) -> str:
        return _b64encode(
            self.private_key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )


def generate_envelope_key() -> EnvelopeKey:
    return EnvelopeKey(X25519PrivateKey.generate())


def load_or_create_envelope_key(path: str) -> EnvelopeKey:
    """
    The envelope key kept in C{path} (PEM, or the 32 raw bytes), created mode 0600 on first use.

    @raise CryptoError: naming the file when it cannot be read or used.
    """
    _make_directory(os.path.dirname(path) or ".")
    data = _read(path)
    if data is None:
        key = generate_envelope_key()
        pem = key.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_atomically(path, pem, 0o600)
        return key
    try:
        if data.startswith(b"-----BEGIN"):
            private_key = serialization.load_pem_private_key(data, password=None)
        elif len(data) == _X25519_LENGTH:
            private_key = X25519PrivateKey.from_private_bytes(data)
        else:
            private_key = None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        private_key = None
    if not isinstance(private_key, X25519PrivateKey):
        raise CryptoError(f"{path} does not hold an X25519 private key (PEM or 32 raw bytes)")
    return EnvelopeKey(private_key)


# -- envelopes ----------------------------------------------------------------------
#
# An envelope is unpadded base64url of: one version byte, then the length-prefixed fields
# sender SPKI (DER), ephemeral X25519 public key, nonce, ciphertext, signature (DER ECDSA).


def _lp(*fields: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def _fields(blob: bytes, offset: int, what: str) -> list[bytes]:
    fields = []
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise EnvelopeError(f"the {what} is truncated")
        (length,) = struct.unpack_from(">I", blob, offset)
        offset += 4
        if offset + length > len(blob):
            raise EnvelopeError(f"the {what} is truncated")
        fields.append(blob[offset : offset + length])
        offset += length
    return fields


def _utf8(value, what: str, error: type[CryptoError]) -> bytes:
    try:
        return value.encode("utf-8")
    except (AttributeError, UnicodeEncodeError):
        raise error(f"the {what} must be valid Unicode text") from None


def _bound(sender: str, recipient: str, msg_id: str, error: type[CryptoError]) -> bytes:
    """What an envelope is about, as bytes bound into both the AEAD and the signature."""
    return _lp(
        _utf8(sender, "sender", error),
        _utf8(recipient, "recipient", error),
        _utf8(msg_id, "message id", error),
    )


def _symmetric_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=_HKDF_LABEL + ephemeral + recipient,
    ).derive(shared)


def _raw(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def seal(
    identity: Identity,
    sender: str,
    recipient: str,
    recipient_key_b64: str,
    msg_id: str,
    payload: bytes,
) -> str:
    """
    Encrypt C{payload} to C{recipient}'s envelope key and sign it with C{identity}, binding
    sender, recipient and message id. The result is ASCII, safe inside a JSON string.

    @raise CryptoError: a bad recipient key, or a payload over L{MAX_PAYLOAD} bytes.
    """
    if len(payload) > MAX_PAYLOAD:
        raise CryptoError(f"a sealed message may hold at most {MAX_PAYLOAD} bytes")
    recipient_key = _decode_envelope_key(recipient_key_b64)
    bound = _bound(sender, recipient, msg_id, CryptoError)
    spki = _spki(identity.private_key.public_key())
    ephemeral_key = X25519PrivateKey.generate()
    ephemeral = _raw(ephemeral_key.public_key())
    try:
        shared = ephemeral_key.exchange(recipient_key)
    except ValueError:
        raise CryptoError("the recipient's envelope key is unusable (a low-order point)") from None
    nonce = os.urandom(_NONCE_LENGTH)
    ciphertext = ChaCha20Poly1305(_symmetric_key(shared, ephemeral, _raw(recipient_key))).encrypt(
        nonce, payload, _AAD_LABEL + bound + _lp(spki)
    )
    signed = _SIGNED_LABEL + bound + _lp(spki, ephemeral, nonce, ciphertext)
    signature = identity.private_key.sign(signed, ec.ECDSA(hashes.SHA256()))
    blob = bytes([_ENVELOPE_VERSION]) + _lp(spki, ephemeral, nonce, ciphertext, signature)
    return _b64encode(blob)


def _unpack(token, what: str, max_length: int, count: int) -> list[bytes]:
    """The C{count} fields of a version 1 C{what} (an envelope, a signature), or EnvelopeError."""
    if not isinstance(token, str):
        raise EnvelopeError(f"the {what} is not a string")
    if len(token) > max_length:
        raise EnvelopeError(f"the {what} is longer than {max_length} characters")
    try:
        blob = _b64decode(token)
    except ValueError:
        raise EnvelopeError(f"the {what} is not valid base64url") from None
    if not blob or blob[0] != _ENVELOPE_VERSION:
        raise EnvelopeError(f"the {what} has an unknown version")
    fields = _fields(blob, 1, what)
    if len(fields) != count:
        raise EnvelopeError(f"the {what} does not have the expected structure")
    return fields


def _sender_key(spki: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_der_public_key(spki)
    except (ValueError, UnsupportedAlgorithm):
        raise EnvelopeError("the signing key is malformed") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise EnvelopeError("the signing key is not an ECDSA P-256 key")
    # Another encoding of the same key would give another fingerprint for it.
    if _spki(key) != spki:
        raise EnvelopeError("the signing key is not in canonical form")
    return key


def open_sealed(
    envelope: str,
    key: EnvelopeKey,
    sender: str,
    recipient: str,
    msg_id: str,
    expected_sender_fingerprint: str | None,
) -> tuple[bytes, str]:
    """
    Check and decrypt an envelope from L{seal}.

    @param expected_sender_fingerprint: the SPKI fingerprint the sender must have signed
        with, or C{None} to accept any key (the caller then pins the one returned).
    @return: C{(payload, sender_fingerprint)}, once the signature has been verified.
    @raise EnvelopeError: for anything that is not an untampered envelope from C{sender}
        to C{recipient} with id C{msg_id}, sealed to C{key}; never any other exception.
    """
    spki, ephemeral, nonce, ciphertext, signature = _unpack(envelope, "envelope", MAX_ENVELOPE, 5)
    if len(ephemeral) != _X25519_LENGTH or len(nonce) != _NONCE_LENGTH:
        raise EnvelopeError("the envelope does not have the expected structure")
    bound = _bound(sender, recipient, msg_id, EnvelopeError)
    sender_key = _sender_key(spki)
    fingerprint = hashlib.sha256(spki).hexdigest()
    if expected_sender_fingerprint is not None and not hmac.compare_digest(
        fingerprint.encode("ascii"),
        _utf8(expected_sender_fingerprint, "fingerprint", EnvelopeError),
    ):
        raise EnvelopeError(f"the envelope is signed by a key that is not {sender!r}'s known key")
    signed = _SIGNED_LABEL + bound + _lp(spki, ephemeral, nonce, ciphertext)
    try:
        sender_key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise EnvelopeError(
            f"the envelope's signature does not verify: it was altered, or it is not "
            f"from {sender!r} to {recipient!r} with message id {msg_id!r}"
        ) from None
    try:
        shared = key.private_key.exchange(X25519PublicKey.from_public_bytes(ephemeral))
        symmetric = _symmetric_key(shared, ephemeral, _raw(key.private_key.public_key()))
        payload = ChaCha20Poly1305(symmetric).decrypt(
            nonce, ciphertext, _AAD_LABEL + bound + _lp(spki)
        )
    except (ValueError, InvalidTag):
        raise WrongEnvelopeKey("the envelope was not sealed to this envelope key", fingerprint) from None
    return payload, fingerprint


# -- signed broadcasts --------------------------------------------------------------
#
# A broadcast goes to everyone online in the clear (any account can read it), so it is signed
# rather than sealed: the server relays its text and this signature, and cannot forge or alter
# either. The signature is unpadded base64url of one version byte, then the length-prefixed fields
# sender SPKI (DER), sent_at (IEEE 754 double, big-endian), signature (DER ECDSA) over the label,
# then the length-prefixed sender, text, sent_at and SPKI.


def _broadcast_signed(sender: str, text: str, when: bytes, spki: bytes) -> bytes:
    return _BROADCAST_LABEL + _lp(
        _utf8(sender, "sender", EnvelopeError), _utf8(text, "text", EnvelopeError), when, spki
    )


def sign_broadcast(identity: Identity, sender: str, text: str, sent_at: float) -> str:
    """The signature of C{sender}'s broadcast of C{text}, written at C{sent_at} (seconds since the epoch)."""
    spki = _spki(identity.private_key.public_key())
    when = struct.pack(">d", sent_at)
    signature = identity.private_key.sign(_broadcast_signed(sender, text, when, spki), ec.ECDSA(hashes.SHA256()))
    return _b64encode(bytes([_ENVELOPE_VERSION]) + _lp(spki, when, signature))


def open_broadcast(signature: str, sender: str, text: str) -> tuple[float, str]:
    """
    Check a signature from L{sign_broadcast}.

    @return: C{(sent_at, fingerprint)}: when the sender wrote it, and the SPKI fingerprint of the
        key that signed it (the caller checks it is the sender's).
    @raise EnvelopeError: for anything but C{sender}'s untampered C{text}; never any other exception.
    """
    spki, when, signed = _unpack(signature, "broadcast signature", MAX_BROADCAST_SIGNATURE, 3)
    if len(when) != 8:
        raise EnvelopeError("the broadcast signature does not have the expected structure")
    (sent_at,) = struct.unpack(">d", when)
    if not math.isfinite(sent_at):
        raise EnvelopeError("the broadcast signature's time is not a number")
    try:
        _sender_key(spki).verify(signed, _broadcast_signed(sender, text, when, spki), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise EnvelopeError(f"the broadcast's signature does not verify: it was altered, or it is not {sender!r}'s") from None
    return sent_at, hashlib.sha256(spki).hexdigest()


def sign_envelope_key(identity: Identity, user: str, envelope_key: str) -> str:
    """
    C{identity}'s word that C{envelope_key} (unpadded base64url, as published) is C{user}'s
    envelope key. Published beside it, it lets a peer that knows C{user}'s fingerprint (compared
    out of band) check the envelope key too: the server that hands both out cannot put a key of
    its own there, to read what is sealed to it.
    """
    spki = _spki(identity.private_key.public_key())
    signature = identity.private_key.sign(_key_signed(user, envelope_key, CryptoError), ec.ECDSA(hashes.SHA256()))
    return _b64encode(bytes([_ENVELOPE_VERSION]) + _lp(spki, signature))


def check_envelope_key(signature: str, user: str, fingerprint: str, envelope_key: str) -> None:
    """
    Check a signature from L{sign_envelope_key}: made by the key with C{fingerprint}, for
    C{user}'s C{envelope_key}.

    @raise EnvelopeError: for anything else; never any other exception.
    """
    spki, signed = _unpack(signature, "key signature", MAX_KEY_SIGNATURE, 2)
    key = _sender_key(spki)
    if not hmac.compare_digest(hashlib.sha256(spki).hexdigest().encode("ascii"), _utf8(fingerprint, "fingerprint", EnvelopeError)):
        raise EnvelopeError("the envelope key is signed by another identity key than the one given with it")
    try:
        key.verify(signed, _key_signed(user, envelope_key, EnvelopeError), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise EnvelopeError(f"the envelope key's signature does not verify: it is not {user!r}'s key") from None


def _key_signed(user: str, envelope_key: str, error: type[CryptoError]) -> bytes:
    return _KEY_LABEL + _lp(_utf8(user, "user", error), _utf8(envelope_key, "envelope key", error))
