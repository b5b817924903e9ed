"""Tests for p2pchat.crypto: fingerprints, identity and envelope key files, sealed envelopes,
signed broadcasts."""

from __future__ import annotations

import base64
import json
import os
import stat
import struct
from types import SimpleNamespace

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_der_public_key,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2pchat import crypto, wire
from p2pchat.crypto import (
    MAX_ENVELOPE,
    MAX_PAYLOAD,
    CryptoError,
    EnvelopeError,
    WrongEnvelopeKey,
    cert_fingerprint,
    check_envelope_key,
    format_fingerprint,
    generate_envelope_key,
    generate_identity,
    load_or_create_envelope_key,
    load_or_create_identity,
    open_broadcast,
    open_sealed,
    seal,
    sign_broadcast,
    sign_envelope_key,
    spki_fingerprint,
    valid_envelope_key,
    valid_fingerprint,
)

# Computed with the openssl command line, independently of this code:
# the SPKI of the P-256 generator point (private key 1), built from the SEC 2 constants.
GENERATOR_SPKI_FINGERPRINT = "5cd252fb0ce8932436faf8ccd1040981b89ee4ad6b9fe9e2a2b7e71aacb27cd3"
# `openssl req -x509 -newkey ec ...`; `openssl x509 -fingerprint -sha256` and
# `openssl x509 -pubkey | openssl pkey -pubin -outform DER | openssl dgst -sha256`.
VECTOR_CERT = b"""-----BEGIN CERTIFICATE-----
MIIBeTCCAR+gAwIBAgIUQNvqcktfBeZP4mfbBfM4d4uWjE8wCgYIKoZIzj0EAwIw
ETEPMA0GA1UEAwwGdmVjdG9yMCAXDTI2MTEyMTE5NDQwNVoYDzIxMjYxMDI4MTk0
NDA1WjARMQ8wDQYDVQQDDAZ2ZWN0b3IwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC
AAShafNz7QhRScIofroQlQTbCEShinBPH2lndnJYxTwcl5DcdnFkED7sAFQlZiOC
VyKp2g6Pqpm42ka09MuvO5Kvo1MwUTAdBgNVHQ4EFgQUKN9JkGJFbzAuROYnaTv2
J4ShpfIwHwYDVR0jBBgwFoAUKN9JkGJFbzAuROYnaTv2J4ShpfIwDwYDVR0TAQH/
BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiEA0/PTkzM8vrAhm9qj8mt1KZpt+i70
3OnXvvm7rviqJd8CIEEfHH0V4jZcz1qpMuJeYsD8i/VeZPfiwZBIaIqukCOD
-----END CERTIFICATE-----
"""
VECTOR_CERT_FINGERPRINT = "25d17da5897c5d6977c0855036fe562db9758c89104c918b35d182cf7ee9dcb5"
VECTOR_SPKI_FINGERPRINT = "81318786b50c1143759dc333b4ae943ba6f9d4ae184fe3e99037b03b28db1e17"

# Generated once: key generation dominates the cost of these tests otherwise.
ALICE = generate_identity("alice")
MALLORY = generate_identity("mallory")
BOB_KEY = generate_envelope_key()
CAROL_KEY = generate_envelope_key()
SEALED = seal(ALICE, "alice", "bob", BOB_KEY.public_b64, "m1", b"hello bob")

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode(envelope: str) -> bytes:
    return base64.urlsafe_b64decode(envelope + "=" * (-len(envelope) % 4))


def _encode(blob: bytes) -> str:
    return base64.urlsafe_b64encode(blob).rstrip(b"=").decode("ascii")


def _fields(envelope: str) -> list[tuple[int, int]]:
    """(offset, length) of each length-prefixed field of an envelope's binary form."""
    blob = _decode(envelope)
    spans, offset = [], 1
    while offset < len(blob):
        length = int.from_bytes(blob[offset : offset + 4], "big")
        spans.append((offset + 4, length))
        offset += 4 + length
    return spans


def _flip(envelope: str, position: int) -> str:
    blob = bytearray(_decode(envelope))
    blob[position] ^= 0x01
    return _encode(bytes(blob))


class FingerprintTests(SynchronousTestCase):
    def test_spki_known_vector(self):
        """The SPKI fingerprint of a known P-256 key is the SHA-256 openssl computes for it."""
        key = ec.derive_private_key(1, ec.SECP256R1())
        self.assertEqual(spki_fingerprint(key.public_key()), GENERATOR_SPKI_FINGERPRINT)

    def test_spki_of_private_key_and_certificate(self):
        """A private key, its public key and a certificate for it all give the same fingerprint."""
        cert = x509.load_pem_x509_certificate(VECTOR_CERT)
        self.assertEqual(spki_fingerprint(cert), VECTOR_SPKI_FINGERPRINT)
        key = ec.derive_private_key(1, ec.SECP256R1())
        self.assertEqual(spki_fingerprint(key), GENERATOR_SPKI_FINGERPRINT)
        self.assertEqual(spki_fingerprint(ALICE.certificate), spki_fingerprint(ALICE.private_key))
        self.assertEqual(ALICE.fingerprint, spki_fingerprint(ALICE.private_key))

    def test_spki_refuses_other_objects(self):
        """Something that is not a key or certificate is a TypeError, not a wrong fingerprint."""
        self.assertRaises(TypeError, spki_fingerprint, b"not a key")

    def test_cert_known_vector(self):
        """The certificate fingerprint is the SHA-256 of its DER, as openssl prints it."""
        cert = x509.load_pem_x509_certificate(VECTOR_CERT)
        self.assertEqual(cert_fingerprint(cert), VECTOR_CERT_FINGERPRINT)

    def test_cert_fingerprint_differs_from_spki(self):
        """Two certificates for one key share the SPKI fingerprint but not the certificate one."""
        again = crypto.Identity(
            ALICE.private_key, crypto._self_signed(ALICE.private_key, "alice", 1)
        )
        self.assertEqual(spki_fingerprint(again.certificate), ALICE.fingerprint)
        self.assertNotEqual(
            cert_fingerprint(again.certificate), cert_fingerprint(ALICE.certificate)
        )

    def test_format(self):
        """People see sixteen space-separated groups of four hex digits."""
        formatted = format_fingerprint(VECTOR_CERT_FINGERPRINT)
        self.assertEqual(formatted[:15], "25d1 7da5 897c ")
        self.assertEqual(
            formatted.split(), [VECTOR_CERT_FINGERPRINT[i : i + 4] for i in range(0, 64, 4)]
        )

    def test_valid_fingerprint(self):
        """Only a str of exactly 64 lowercase hex digits is a fingerprint."""
        self.assertTrue(valid_fingerprint(VECTOR_CERT_FINGERPRINT))
        for bad in [
            VECTOR_CERT_FINGERPRINT.upper(),
            VECTOR_CERT_FINGERPRINT[:-1],
            VECTOR_CERT_FINGERPRINT + "0",
            VECTOR_CERT_FINGERPRINT + "\n",
            VECTOR_CERT_FINGERPRINT[:-1] + "g",
            VECTOR_CERT_FINGERPRINT.encode("ascii"),
            "٠" * 64,
            None,
            64,
        ]:
            self.assertFalse(valid_fingerprint(bad), bad)

    def test_valid_envelope_key(self):
        """An envelope key is the canonical unpadded base64url of 32 bytes, nothing else."""
        self.assertTrue(valid_envelope_key(BOB_KEY.public_b64))
        self.assertEqual(len(BOB_KEY.public_b64), 43)
        # The all-zero key of PROTOCOL.md's example session is well-formed.
        self.assertTrue(valid_envelope_key("A" * 43))
        for bad in [
            "A" * 42,
            "A" * 44,
            "A" * 43 + "=",
            "A" * 42 + "B",  # unused trailing bits set: a second spelling of some key
            "+" * 43,
            "/" * 43,
            "A" * 42 + "\n",
            b"A" * 43,
            None,
        ]:
            self.assertFalse(valid_envelope_key(bad), bad)


class IdentityFileTests(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.join(self.mktemp(), "data")

    def _mode(self, path: str) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    def test_creates_private_files(self):
        """First use creates the directory 0700, the key 0600 and the certificate 0644 under umask
        0, and nothing else."""
        old_umask = os.umask(0)
        self.addCleanup(os.umask, old_umask)
        identity = load_or_create_identity(self.directory, "peer", "alice")
        key_path = os.path.join(self.directory, "peer.key")
        self.assertEqual(self._mode(self.directory), 0o700)
        self.assertEqual(self._mode(key_path), 0o600)
        self.assertEqual(self._mode(os.path.join(self.directory, "peer.crt")), 0o644)
        self.assertEqual(sorted(os.listdir(self.directory)), ["peer.crt", "peer.key"])
        with open(key_path, "rb") as f:
            self.assertEqual(f.read(), identity.key_pem())
        self.assertIsInstance(identity.private_key.curve, ec.SECP256R1)
        cn = identity.certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        self.assertEqual(cn[0].value, "alice")
        identity.certificate.verify_directly_issued_by(identity.certificate)

    def test_failed_write_leaves_nothing(self):
        """A file that cannot be put in place leaves no temporary file behind, and says why."""
        os.makedirs(os.path.join(self.directory, "peer.crt", "in the way"))
        self.assertRaises(OSError, crypto._write_atomically, os.path.join(self.directory, "peer.crt"), b"x", 0o644)
        self.assertEqual(os.listdir(self.directory), ["peer.crt"])

    def test_reload_gives_same_identity(self):
        """A second load returns the stored key and certificate, not new ones."""
        first = load_or_create_identity(self.directory, "peer", "alice")
        second = load_or_create_identity(self.directory, "peer", "alice")
        self.assertEqual(second.fingerprint, first.fingerprint)
        self.assertEqual(second.cert_pem(), first.cert_pem())

    def test_lost_certificate_is_recreated_for_same_key(self):
        """A key without its certificate (a crash between the two writes) keeps its fingerprint."""
        first = load_or_create_identity(self.directory, "peer", "alice")
        os.unlink(os.path.join(self.directory, "peer.crt"))
        second = load_or_create_identity(self.directory, "peer", "alice")
        self.assertEqual(second.fingerprint, first.fingerprint)
        self.assertTrue(os.path.exists(os.path.join(self.directory, "peer.crt")))

    def _assert_refused(self, name: str) -> None:
        error = self.assertRaises(
            CryptoError, load_or_create_identity, self.directory, "peer", "alice"
        )
        self.assertIn(os.path.join(self.directory, name), str(error))

    def test_corrupt_key(self):
        """A key file that is not a PEM key is a CryptoError naming it, not a new identity."""
        load_or_create_identity(self.directory, "peer", "alice")
        with open(os.path.join(self.directory, "peer.key"), "wb") as f:
            f.write(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        self._assert_refused("peer.key")

    def test_key_of_wrong_type(self):
        """A key file holding an X25519 key instead of a P-256 one is refused, naming it."""
        os.makedirs(self.directory)
        key = generate_envelope_key().private_key
        with open(os.path.join(self.directory, "peer.key"), "wb") as f:
            f.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        self._assert_refused("peer.key")

    def test_corrupt_certificate(self):
        """A certificate file that is not a certificate is a CryptoError naming it."""
        load_or_create_identity(self.directory, "peer", "alice")
        with open(os.path.join(self.directory, "peer.crt"), "wb") as f:
            f.write(b"\x00\x01 not a certificate")
        self._assert_refused("peer.crt")

    def test_certificate_of_another_key(self):
        """A certificate for some other key next to the key file is refused, naming it."""
        load_or_create_identity(self.directory, "peer", "alice")
        with open(os.path.join(self.directory, "peer.crt"), "wb") as f:
            f.write(MALLORY.cert_pem())
        self._assert_refused("peer.crt")

    def test_certificate_without_key(self):
        """A certificate whose key is gone is refused rather than silently replaced."""
        load_or_create_identity(self.directory, "peer", "alice")
        os.unlink(os.path.join(self.directory, "peer.key"))
        self._assert_refused("peer.crt")

    def test_unreadable_key(self):
        """A key path that cannot be read is a CryptoError naming it."""
        os.makedirs(os.path.join(self.directory, "peer.key"))
        self._assert_refused("peer.key")


class EnvelopeKeyFileTests(SynchronousTestCase):
    def setUp(self):
        self.path = os.path.join(self.mktemp(), "envelope.key")

    def test_create_and_reload(self):
        """The key is created 0600 on first use and the same key comes back afterwards."""
        first = load_or_create_envelope_key(self.path)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        second = load_or_create_envelope_key(self.path)
        self.assertEqual(second.public_b64, first.public_b64)
        self.assertTrue(valid_envelope_key(first.public_b64))

    def test_raw_file(self):
        """A file of the 32 raw private bytes is a valid envelope key."""
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "wb") as f:
            f.write(
                BOB_KEY.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            )
        self.assertEqual(load_or_create_envelope_key(self.path).public_b64, BOB_KEY.public_b64)

    def test_corrupt_file(self):
        """A file that holds no X25519 key is a CryptoError naming it, for any wrong content."""
        os.makedirs(os.path.dirname(self.path))
        for content in [
            b"short",
            b"-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n",
            ALICE.key_pem(),
        ]:
            with open(self.path, "wb") as f:
                f.write(content)
            error = self.assertRaises(CryptoError, load_or_create_envelope_key, self.path)
            self.assertIn(self.path, str(error))


class SealTests(SynchronousTestCase):
    def test_round_trip(self):
        """The recipient gets the payload back, with the fingerprint of the sender's key."""
        self.assertEqual(
            open_sealed(SEALED, BOB_KEY, "alice", "bob", "m1", ALICE.fingerprint),
            (b"hello bob", ALICE.fingerprint),
        )

    def test_round_trip_without_expected_key(self):
        """With no pinned key yet, the envelope opens and reports the key to pin."""
        self.assertEqual(
            open_sealed(SEALED, BOB_KEY, "alice", "bob", "m1", None),
            (b"hello bob", ALICE.fingerprint),
        )

    def test_round_trip_unicode_and_empty(self):
        """Non-ASCII names and ids, and an empty payload, survive sealing."""
        envelope = seal(ALICE, "élise", "Bøb", BOB_KEY.public_b64, "id-ü", b"")
        self.assertEqual(
            open_sealed(envelope, BOB_KEY, "élise", "Bøb", "id-ü", None),
            (b"", ALICE.fingerprint),
        )

    def test_each_envelope_is_fresh(self):
        """Sealing the same message twice gives different envelopes (ephemeral key, nonce)."""
        self.assertNotEqual(
            seal(ALICE, "alice", "bob", BOB_KEY.public_b64, "m1", b"hello bob"), SEALED
        )

    def test_json_safe_and_bounded(self):
        """MAX_PAYLOAD bytes seal to an ASCII envelope under 60 KiB that JSON carries as is."""
        payload = os.urandom(MAX_PAYLOAD)
        envelope = seal(ALICE, "alice", "bob", BOB_KEY.public_b64, "m1", payload)
        self.assertLess(len(envelope), 60 * 1024)
        self.assertLessEqual(len(envelope), MAX_ENVELOPE)
        self.assertEqual(json.dumps(envelope), '"' + envelope + '"')
        self.assertEqual(open_sealed(envelope, BOB_KEY, "alice", "bob", "m1", None)[0], payload)

    def test_payload_too_large(self):
        """Sealing more than MAX_PAYLOAD bytes is a clear CryptoError."""
        self.assertRaises(
            CryptoError,
            seal,
            ALICE,
            "alice",
            "bob",
            BOB_KEY.public_b64,
            "m1",
            b"x" * (MAX_PAYLOAD + 1),
        )

    def test_bad_recipient_key(self):
        """Sealing to a malformed or low-order key is a CryptoError, not a weak envelope."""
        for key in ["nope", BOB_KEY.public_b64 + "A", "A" * 43]:
            self.assertRaises(CryptoError, seal, ALICE, "alice", "bob", key, "m1", b"x")


class _Encoded:
    """A signing key that L{seal} writes into the envelope as the given SPKI bytes."""

    def __init__(self, sign, spki: bytes) -> None:
        self.sign, self._spki = sign, spki

    def public_key(self) -> _Encoded:
        return self

    def public_bytes(self, encoding, format) -> bytes:
        return self._spki


def _sealed_with(sign, spki: bytes) -> str:
    """An envelope from alice to bob whose sender key is C{spki}, signed by C{sign}."""
    return seal(SimpleNamespace(private_key=_Encoded(sign, spki)), "alice", "bob", BOB_KEY.public_b64, "m1", b"hi")


class ProtocolLayoutTests(SynchronousTestCase):
    """An envelope as PROTOCOL.md spells it out, made and opened here with the primitives alone:
    what a client of one's own would write from the document works with the peer's code."""

    @staticmethod
    def _lp(*fields: bytes) -> bytes:
        return b"".join(len(f).to_bytes(4, "big") + f for f in fields)

    def _key(self, shared: bytes, ephemeral: bytes, recipient_raw: bytes) -> bytes:
        return HKDF(hashes.SHA256(), 32, None, b"p2pchat envelope v1 key" + ephemeral + recipient_raw).derive(shared)

    def test_sealed_from_the_document_opens(self):
        bound = self._lp(b"alice", b"bob", b"m1")
        spki = ALICE.private_key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        ephemeral_key = X25519PrivateKey.generate()
        ephemeral = ephemeral_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        recipient = BOB_KEY.private_key.public_key()
        recipient_raw = recipient.public_bytes(Encoding.Raw, PublicFormat.Raw)
        nonce = os.urandom(12)
        key = self._key(ephemeral_key.exchange(recipient), ephemeral, recipient_raw)
        ciphertext = ChaCha20Poly1305(key).encrypt(nonce, b'{"kind":"msg"}', b"p2pchat envelope v1 aad" + bound + self._lp(spki))
        signature = ALICE.private_key.sign(
            b"p2pchat envelope v1 signature" + bound + self._lp(spki, ephemeral, nonce, ciphertext), ec.ECDSA(hashes.SHA256())
        )
        envelope = base64.urlsafe_b64encode(b"\x01" + self._lp(spki, ephemeral, nonce, ciphertext, signature)).rstrip(b"=")
        self.assertEqual(open_sealed(envelope.decode(), BOB_KEY, "alice", "bob", "m1", ALICE.fingerprint),
                         (b'{"kind":"msg"}', ALICE.fingerprint))

    def test_sealed_by_the_peer_opens_by_the_document(self):
        blob = base64.urlsafe_b64decode(SEALED + "=" * (-len(SEALED) % 4))
        self.assertEqual(blob[0], 1)
        fields, at = [], 1
        while at < len(blob):
            length = int.from_bytes(blob[at:at + 4], "big")
            fields.append(blob[at + 4:at + 4 + length])
            at += 4 + length
        spki, ephemeral, nonce, ciphertext, signature = fields
        bound = self._lp(b"alice", b"bob", b"m1")
        load_der_public_key(spki).verify(
            signature, b"p2pchat envelope v1 signature" + bound + self._lp(spki, ephemeral, nonce, ciphertext),
            ec.ECDSA(hashes.SHA256()),
        )
        recipient_raw = BOB_KEY.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        shared = BOB_KEY.private_key.exchange(X25519PublicKey.from_public_bytes(ephemeral))
        plaintext = ChaCha20Poly1305(self._key(shared, ephemeral, recipient_raw)).decrypt(
            nonce, ciphertext, b"p2pchat envelope v1 aad" + bound + self._lp(spki)
        )
        self.assertEqual(plaintext, b"hello bob")


class OpenRefusalTests(SynchronousTestCase):
    def _refused(
        self,
        envelope=SEALED,
        key=BOB_KEY,
        sender="alice",
        recipient="bob",
        msg_id="m1",
        expected=ALICE.fingerprint,
    ) -> str:
        error = self.assertRaises(
            EnvelopeError, open_sealed, envelope, key, sender, recipient, msg_id, expected
        )
        return str(error)

    def test_wrong_sender(self):
        """An envelope presented as coming from someone else is refused."""
        self.assertIn("signature", self._refused(sender="carol", expected=None))

    def test_wrong_recipient(self):
        """An envelope for bob is refused when opened as carol's, even with bob's key."""
        self.assertIn("signature", self._refused(recipient="carol"))

    def test_wrong_msg_id(self):
        """An envelope replayed under another message id is refused."""
        self.assertIn("signature", self._refused(msg_id="m2"))

    def test_wrong_key(self):
        """An envelope sealed to bob's key cannot be opened with carol's key, and says so with an
        error of its own (the peer tells its user); an altered one does not."""
        self.assertIn("not sealed to this envelope key", self._refused(key=CAROL_KEY))
        wrong = self.assertRaises(WrongEnvelopeKey, open_sealed, SEALED, CAROL_KEY, "alice", "bob", "m1", None)
        self.assertEqual(wrong.fingerprint, ALICE.fingerprint)  # who signed it, for the caller to check
        self.assertNotIsInstance(
            self.assertRaises(EnvelopeError, open_sealed, SEALED, BOB_KEY, "alice", "bob", "m2", None), WrongEnvelopeKey
        )

    def test_replayed_to_other_recipient(self):
        """An envelope for bob relayed to carol is refused, under either recipient name."""
        self._refused(key=CAROL_KEY, recipient="carol")
        self._refused(key=CAROL_KEY, recipient="bob")

    def test_unexpected_sender_key(self):
        """A correctly signed envelope from a key other than the pinned one is refused."""
        envelope = seal(MALLORY, "alice", "bob", BOB_KEY.public_b64, "m1", b"I am alice")
        self.assertIn("known key", self._refused(envelope))
        # Without a pin it opens, and reports mallory's key for the caller to compare.
        self.assertEqual(
            open_sealed(envelope, BOB_KEY, "alice", "bob", "m1", None)[1], MALLORY.fingerprint
        )

    def test_resigned_by_another_key(self):
        """Someone who re-signs alice's ciphertext with their own key cannot make bob open it."""
        blob = _decode(SEALED)
        spans = _fields(SEALED)
        spki, ephemeral, nonce, ciphertext = (blob[o : o + n] for o, n in spans[:4])
        mallory_spki = MALLORY.private_key.public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo
        )
        signed = (
            crypto._SIGNED_LABEL
            + crypto._bound("alice", "bob", "m1", CryptoError)
            + crypto._lp(mallory_spki, ephemeral, nonce, ciphertext)
        )
        signature = MALLORY.private_key.sign(signed, ec.ECDSA(hashes.SHA256()))
        forged = _encode(
            b"\x01" + crypto._lp(mallory_spki, ephemeral, nonce, ciphertext, signature)
        )
        self.assertNotEqual(spki, mallory_spki)
        self._refused(forged, expected=None)

    def test_sender_key_of_another_kind(self):
        """Only an ECDSA P-256 sender key is taken, and only in its one DER encoding (another
        encoding of the same key would give it another fingerprint)."""
        alice_spki = ALICE.private_key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        # The same key with its point compressed: same algorithm identifier, other BIT STRING.
        point = ALICE.private_key.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
        algorithm = alice_spki[2:23]
        compressed = bytes([0x30, len(algorithm) + 3 + len(point)]) + algorithm + bytes([0x03, len(point) + 1, 0]) + point
        self.assertEqual(load_der_public_key(compressed).public_numbers(), ALICE.private_key.public_key().public_numbers())
        self.assertIn("canonical", self._refused(_sealed_with(ALICE.private_key.sign, compressed), expected=None))
        p384 = ec.generate_private_key(ec.SECP384R1())
        ed25519 = Ed25519PrivateKey.generate()
        for sign, public in [(p384.sign, p384.public_key()), (lambda data, _: ed25519.sign(data), ed25519.public_key())]:
            envelope = _sealed_with(sign, public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
            self.assertIn("not an ECDSA P-256 key", self._refused(envelope, expected=None))
        # The same way of sealing with alice's key as it is: it opens.
        self.assertEqual(open_sealed(_sealed_with(ALICE.private_key.sign, alice_spki), BOB_KEY, "alice", "bob", "m1",
                                     ALICE.fingerprint), (b"hi", ALICE.fingerprint))

    def test_tampered_fields(self):
        """Flipping a bit at the start or end of any field of the envelope gets it refused."""
        for offset, length in _fields(SEALED):
            for position in (offset, offset + length - 1):
                self._refused(_flip(SEALED, position), expected=None)

    def test_signature_checked_before_decryption(self):
        """A bad signature is reported as such even when the envelope would decrypt."""
        offset, length = _fields(SEALED)[4]
        self.assertIn("signature", self._refused(_flip(SEALED, offset + length - 1), expected=None))

    def test_wrong_version(self):
        """An envelope of an unknown version is refused as such."""
        self.assertIn("version", self._refused(_encode(b"\x02" + _decode(SEALED)[1:])))

    def test_truncated_and_extended(self):
        """Cutting bytes off or appending bytes to an envelope gets it refused."""
        blob = _decode(SEALED)
        for changed in [blob[:-1], blob[:50], blob + b"\x00", blob + b"\x00\x00\x00\x00", b""]:
            self._refused(_encode(changed))

    def test_too_long(self):
        """An envelope longer than MAX_ENVELOPE is refused before any work."""
        self.assertIn("longer", self._refused("A" * (MAX_ENVELOPE + 1)))

    def test_bad_arguments(self):
        """Non-text or unencodable names, ids or expected fingerprints are EnvelopeErrors too."""
        self._refused(sender="\ud800")
        self._refused(msg_id=None)
        self._refused(expected="é" * 64)
        self._refused(envelope=None)

    @FUZZ
    @given(st.text(max_size=300))
    def test_garbage_text(self, envelope):
        """Any text at all is refused with EnvelopeError, never another exception."""
        self._refused(envelope, expected=None)

    @FUZZ
    @given(st.binary(max_size=400))
    def test_garbage_binary(self, blob):
        """Any base64url bytes, with or without the version byte, are refused with EnvelopeError."""
        self._refused(_encode(blob), expected=None)
        self._refused(_encode(b"\x01" + blob), expected=None)

    @FUZZ
    @given(st.lists(st.binary(max_size=120), max_size=7))
    def test_garbage_structure(self, fields):
        """Well-framed envelopes of random fields are refused with EnvelopeError."""
        self._refused(_encode(b"\x01" + crypto._lp(*fields)), expected=None)

    @FUZZ
    @given(st.data())
    def test_mutated_envelope(self, data):
        """A real envelope with any byte changed, or cut, is refused with EnvelopeError."""
        blob = bytearray(_decode(SEALED))
        position = data.draw(st.integers(0, len(blob) - 1))
        value = data.draw(st.integers(0, 255).filter(lambda v: v != blob[position]))
        blob[position] = value
        self._refused(_encode(bytes(blob)), expected=None)
        cut = data.draw(st.integers(0, len(blob) - 1))
        self._refused(_encode(bytes(blob[:cut])), expected=None)

    @FUZZ
    @given(st.text(max_size=20), st.text(max_size=20), st.text(max_size=20))
    def test_other_names(self, sender, recipient, msg_id):
        """Opening under any other sender, recipient or id, even unencodable: EnvelopeError."""
        if (sender, recipient, msg_id) == ("alice", "bob", "m1"):
            return
        self._refused(sender=sender, recipient=recipient, msg_id=msg_id, expected=None)


SIGNED = sign_broadcast(ALICE, "alice", "hello all", 1_700_000_000.25)


class BroadcastSignatureTests(SynchronousTestCase):
    """A broadcast is signed, not sealed: the server relays its text and cannot forge or alter it."""

    def _refused(self, signature=SIGNED, sender="alice", text="hello all") -> str:
        return str(self.assertRaises(EnvelopeError, open_broadcast, signature, sender, text))

    def test_round_trip(self):
        """The signature gives back when it was written and who signed it; it fits the protocol."""
        self.assertEqual(open_broadcast(SIGNED, "alice", "hello all"), (1_700_000_000.25, ALICE.fingerprint))
        self.assertEqual(open_broadcast(sign_broadcast(MALLORY, "bob", "é ✓\n", 0.0), "bob", "é ✓\n"),
                         (0.0, MALLORY.fingerprint))  # whose key it is, the caller checks
        self.assertLess(len(SIGNED), wire.MAX_BROADCAST_SIGNATURE)

    def test_other_sender_or_text(self):
        """The same signature under another name or over another text is refused."""
        self.assertIn("does not verify", self._refused(sender="bob"))
        self.assertIn("does not verify", self._refused(text="hello all!"))
        self._refused(sender="\ud800")
        self._refused(text=None)

    def test_not_an_envelope(self):
        """An envelope's signature is not a broadcast's, and the other way round."""
        self._refused(SEALED)
        self.assertRaises(EnvelopeError, open_sealed, SIGNED, BOB_KEY, "alice", "bob", "m1", None)

    def test_time_bound(self):
        """The time it was written is signed; one that is not a number is refused."""
        offset, length = _fields(SIGNED)[1]
        self.assertIn("does not verify", self._refused(_flip(SIGNED, offset + length - 1)))
        blob = _decode(SIGNED)
        spki, _, signature = crypto._fields(blob, 1, "test")
        for when in (float("nan"), float("inf")):
            forged = _encode(b"\x01" + crypto._lp(spki, struct.pack(">d", when), signature))
            self.assertIn("not a number", self._refused(forged))

    def test_malformed(self):
        """Anything but a whole signature of version 1 is refused with EnvelopeError."""
        blob = _decode(SIGNED)
        for bad in [None, 7, "", "not base64!", "A" * (wire.MAX_BROADCAST_SIGNATURE + 1), _encode(b"\x02" + blob[1:]),
                    _encode(blob[:-1]), _encode(blob + b"\x00"), _encode(blob[:1] + crypto._lp(b"x", b"y"))]:
            self._refused(bad)
        for offset, length in _fields(SIGNED):
            for position in (offset, offset + length - 1):
                self._refused(_flip(SIGNED, position))

    @FUZZ
    @given(st.binary(max_size=300))
    def test_garbage(self, blob):
        """Any bytes, with or without the version byte, are refused with EnvelopeError."""
        self._refused(_encode(blob))
        self._refused(_encode(b"\x01" + blob))


class EnvelopeKeySignatureTests(SynchronousTestCase):
    """A user's envelope key comes signed by their identity key, so that whoever checked the
    identity fingerprint need not take the server's word for the envelope key."""

    def test_round_trip(self):
        signature = sign_envelope_key(ALICE, "alice", BOB_KEY.public_b64)
        check_envelope_key(signature, "alice", ALICE.fingerprint, BOB_KEY.public_b64)
        self.assertLess(len(signature), wire.MAX_KEY_SIGNATURE)

    def test_another_key_user_or_signer_refused(self):
        """The server cannot give its own envelope key with the user's signature of another, nor
        a signature of its own identity key with the user's fingerprint, nor move it to another name."""
        signature = sign_envelope_key(ALICE, "alice", BOB_KEY.public_b64)
        other_key = generate_envelope_key().public_b64
        for args in [(signature, "alice", ALICE.fingerprint, other_key),
                     (signature, "bob", ALICE.fingerprint, BOB_KEY.public_b64),
                     (sign_envelope_key(MALLORY, "alice", other_key), "alice", ALICE.fingerprint, other_key),
                     (signature, "alice", MALLORY.fingerprint, BOB_KEY.public_b64)]:
            self.assertRaises(EnvelopeError, check_envelope_key, *args)

    def test_malformed(self):
        """Anything but a whole signature of version 1 is refused with EnvelopeError (never another
        exception), a broadcast's signature too."""
        signature = sign_envelope_key(ALICE, "alice", BOB_KEY.public_b64)
        blob = _decode(signature)
        for bad in [None, 7, "", "not base64!", "A" * (wire.MAX_KEY_SIGNATURE + 1), _encode(b"\x02" + blob[1:]),
                    _encode(blob[:-1]), SIGNED, SEALED, _flip(signature, len(blob) - 2)]:
            self.assertRaises(EnvelopeError, check_envelope_key, bad, "alice", ALICE.fingerprint, BOB_KEY.public_b64)
        for user, fingerprint, key in [("\ud800", ALICE.fingerprint, BOB_KEY.public_b64), ("alice", None, BOB_KEY.public_b64),
                                       ("alice", ALICE.fingerprint, None)]:
            self.assertRaises(EnvelopeError, check_envelope_key, signature, user, fingerprint, key)
