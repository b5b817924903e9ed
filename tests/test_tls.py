"""Tests for p2pchat.tls: real TLS handshakes in memory between the connection creators."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from p2pchat.crypto import CryptoError, Identity, _self_signed, cert_fingerprint, generate_identity
from p2pchat.tls import (
    PeerKeyError,
    ServerPinError,
    ServerTrust,
    peer_connector_creator,
    peer_fingerprint,
    peer_listener_options,
    server_certificate_options,
)

# Generated once for the module: the handshakes, not key generation, are under test.
ALICE = generate_identity("alice")
BOB = generate_identity("bob")
SERVER = generate_identity("p2pdiscovery")
IMPOSTOR = generate_identity("p2pdiscovery")


def _certificate(
    key, issuer_key, issuer: str, *, ca: bool = False, hostname: str | None = None
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname or issuer)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hostname is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _server(issuer_key=None, issuer: str = "discovery.test") -> Identity:
    """A server identity for discovery.test, signed by C{issuer_key} or by itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    return Identity(key, _certificate(key, issuer_key or key, issuer, hostname="discovery.test"))


CA_KEY = ec.generate_private_key(ec.SECP256R1())
CA_PEM = _certificate(CA_KEY, CA_KEY, "p2pchat test CA", ca=True).public_bytes(Encoding.PEM)
CA_SIGNED_SERVER = _server(CA_KEY, "p2pchat test CA")
SELF_SIGNED_SERVER = _server()


@implementer(IHandshakeListener)
class _App(Protocol):
    """The application inside TLS: greets once the handshake is done and records what it sees."""

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting
        self.fingerprint_at_connect = "not called"
        self.fingerprint = None
        self.handshook = False
        self.received = b""
        self.lost = None

    def connectionMade(self):
        self.fingerprint_at_connect = peer_fingerprint(self.transport)

    def handshakeCompleted(self):
        self.handshook = True
        self.fingerprint = peer_fingerprint(self.transport)
        self.transport.write(self.greeting)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost = reason


class _Link:
    """Both ends of one in-memory TLS connection, run to quiescence (as in test_sslverify)."""

    def __init__(self, server_creator, client_creator, flush: bool = True) -> None:
        self.server = _App(b"from server")
        self.client = _App(b"from client")
        clock = Clock()
        server_factory = TLSMemoryBIOFactory(server_creator, False, _factory(self.server), clock)
        client_factory = TLSMemoryBIOFactory(client_creator, True, _factory(self.client), clock)
        self.client_tls, self.server_tls, self.pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            clock=clock,
            greet=flush,
        )
        if flush:
            self.pump.flush()

    def server_flight(self) -> list[bytes]:
        """Hand the server the client's hello; the TLS records the server answers with, not delivered."""
        self.pump.pump()
        data = self.pump.serverIO.getOutBuffer()
        records = []
        while data:
            end = 5 + int.from_bytes(data[3:5], "big")
            records.append(data[:end])
            data = data[end:]
        return records

    def assert_up(self, test: SynchronousTestCase, version: str) -> None:
        test.assertEqual(
            (self.server.received, self.client.received), (b"from client", b"from server")
        )
        test.assertIsNone(self.server.lost)
        test.assertIsNone(self.client.lost)
        test.assertEqual(self.client_tls.getHandle().get_protocol_version_name(), version)

    def assert_refused(self, test: SynchronousTestCase) -> None:
        """No application byte crossed, the listener never completed, and both ends are closed."""
        test.assertEqual((self.server.received, self.client.received), (b"", b""))
        test.assertFalse(self.server.handshook)
        test.assertIsNotNone(self.server.lost)
        test.assertIsNotNone(self.client.lost)


def _factory(app: _App) -> Factory:
    factory = Factory()
    factory.protocol = lambda: app
    return factory


def _options(identity: Identity | None = None, **kwargs) -> CertificateOptions:
    """Plain CertificateOptions, for the other side's misbehaviour."""
    if identity is not None:
        kwargs.update(privateKey=identity.private_key, certificate=identity.certificate)
    return CertificateOptions(**kwargs)


class PeerLinkTests(SynchronousTestCase):
    def test_pinned_both_ways(self):
        """Each side expecting the other's key, TLS 1.3 comes up; each sees the other's key."""
        link = _Link(peer_listener_options(BOB), peer_connector_creator(ALICE, BOB.fingerprint))
        link.assert_up(self, "TLSv1.3")
        self.assertEqual(link.server.fingerprint, ALICE.fingerprint)
        self.assertEqual(link.client.fingerprint, BOB.fingerprint)

    def test_fingerprint_only_after_handshake(self):
        """peer_fingerprint is None before the handshake, after the connection, and without TLS."""
        link = _Link(peer_listener_options(BOB), peer_connector_creator(ALICE, BOB.fingerprint))
        self.assertIsNone(link.server.fingerprint_at_connect)
        self.assertIsNone(link.client.fingerprint_at_connect)
        link.client_tls.loseConnection()
        link.pump.flush()
        self.assertIsNotNone(link.client.lost)
        self.assertIsNone(peer_fingerprint(link.client_tls))
        self.assertIsNone(peer_fingerprint(StringTransport()))

    def test_connector_refuses_wrong_listener(self):
        """A listener with another key than the expected one fails the connector's handshake."""
        link = _Link(peer_listener_options(ALICE), peer_connector_creator(ALICE, BOB.fingerprint))
        link.assert_refused(self)
        self.assertFalse(link.client.handshook)
        error = link.client.lost.value
        self.assertIsInstance(error, PeerKeyError)
        self.assertEqual(error.seen, ALICE.fingerprint)
        self.assertIn(BOB.fingerprint, str(error))

    def test_listener_requires_client_certificate(self):
        """A connector that presents no certificate is refused by the listener."""
        link = _Link(peer_listener_options(BOB), _options(raiseMinimumTo=TLSVersion.TLSv1_3))
        link.assert_refused(self)

    def test_listener_refuse_callback(self):
        """The listener asks refuse() with the client's fingerprint and refuses when it is true."""
        asked = []

        def refuse(fingerprint):
            asked.append(fingerprint)
            return fingerprint == ALICE.fingerprint

        link = _Link(
            peer_listener_options(BOB, refuse), peer_connector_creator(ALICE, BOB.fingerprint)
        )
        link.assert_refused(self)
        self.assertIn(ALICE.fingerprint, asked)
        self.assertIsInstance(link.server.lost.value, PeerKeyError)
        self.assertEqual(link.server.lost.value.seen, ALICE.fingerprint)

        # The same listener lets other keys in.
        other = generate_identity("carol")
        link = _Link(
            peer_listener_options(BOB, refuse), peer_connector_creator(other, BOB.fingerprint)
        )
        link.assert_up(self, "TLSv1.3")

    def test_listener_survives_raising_refuse(self):
        """A refuse() that raises refuses the connection instead of escaping into OpenSSL."""

        def refuse(fingerprint):
            raise RuntimeError("blocklist unavailable")

        link = _Link(
            peer_listener_options(BOB, refuse), peer_connector_creator(ALICE, BOB.fingerprint)
        )
        link.assert_refused(self)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_listener_refuses_tls_1_2(self):
        """A client that speaks at most TLS 1.2 cannot open a peer link."""
        link = _Link(
            peer_listener_options(BOB), _options(ALICE, lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
        )
        link.assert_refused(self)
        self.assertFalse(link.client.handshook)

    def test_connector_refuses_tls_1_2(self):
        """The connector will not talk to a listener that speaks at most TLS 1.2."""
        link = _Link(
            _options(BOB, lowerMaximumSecurityTo=TLSVersion.TLSv1_2),
            peer_connector_creator(ALICE, BOB.fingerprint),
        )
        self.assertEqual((link.server.received, link.client.received), (b"", b""))
        self.assertFalse(link.client.handshook)
        self.assertIsNotNone(link.client.lost)

    def test_connector_rejects_malformed_fingerprint(self):
        """An expected fingerprint that is not 64 lowercase hex digits is a programming error."""
        self.assertRaises(ValueError, peer_connector_creator, ALICE, BOB.fingerprint.upper())


class ServerTrustTests(SynchronousTestCase):
    def test_pinned_match(self):
        """A server presenting the pinned certificate is accepted and asks no client certificate."""
        trust = ServerTrust("localhost", pinned=cert_fingerprint(SERVER.certificate))
        link = _Link(server_certificate_options(SERVER), trust.creator())
        link.assert_up(self, "TLSv1.3")
        self.assertIsNone(trust.last_error)
        self.assertEqual(link.client.fingerprint, SERVER.fingerprint)
        self.assertIsNone(link.server.fingerprint)

    def test_pinned_mismatch(self):
        """Another certificate fails the handshake; last_error is a ServerPinError naming both."""
        pinned = cert_fingerprint(SERVER.certificate)
        trust = ServerTrust("localhost", pinned=pinned)
        link = _Link(server_certificate_options(IMPOSTOR), trust.creator())
        link.assert_refused(self)
        self.assertFalse(link.client.handshook)
        error = trust.last_error
        self.assertIsInstance(error, ServerPinError)
        self.assertEqual(
            (error.expected, error.seen), (pinned, cert_fingerprint(IMPOSTOR.certificate))
        )
        self.assertIn(error.seen, str(error))
        self.assertIn(error.expected, str(error))
        self.assertIs(link.client.lost.value, error)

    def test_pin_is_on_the_certificate(self):
        """The same key in a re-issued certificate does not match a server pin."""
        reissued = Identity(
            SERVER.private_key, _self_signed(SERVER.private_key, "p2pdiscovery", 30)
        )
        trust = ServerTrust("localhost", pinned=cert_fingerprint(SERVER.certificate))
        _Link(server_certificate_options(reissued), trust.creator()).assert_refused(self)
        self.assertIsInstance(trust.last_error, ServerPinError)

    def test_trust_on_first_use(self):
        """With no pin the first server is accepted and reported once; a different one is not."""
        seen = []
        trust = ServerTrust("localhost", on_first_use=seen.append)
        _Link(server_certificate_options(SERVER), trust.creator()).assert_up(self, "TLSv1.3")
        self.assertEqual(seen, [cert_fingerprint(SERVER.certificate)])
        self.assertEqual(trust.pinned, cert_fingerprint(SERVER.certificate))

        _Link(server_certificate_options(IMPOSTOR), trust.creator()).assert_refused(self)
        self.assertIsInstance(trust.last_error, ServerPinError)

        _Link(server_certificate_options(SERVER), trust.creator()).assert_up(self, "TLSv1.3")
        self.assertIsNone(trust.last_error)
        self.assertEqual(len(seen), 1)

    def test_trust_on_first_use_race(self):
        """Two first handshakes at once: the first to finish pins its certificate, and the other,
        which found no pin when it checked its certificate, fails when it finishes with another."""
        seen = []
        trust = ServerTrust("localhost", on_first_use=seen.append)
        links = [_Link(server_certificate_options(server), trust.creator(), flush=False) for server in (SERVER, IMPOSTOR)]
        flights = [link.server_flight() for link in links]
        self.assertGreater(min(map(len, flights)), 2)  # the server's Finished is a record of its own
        for link, flight in zip(links, flights):
            link.client_tls.dataReceived(b"".join(flight[:-1]))  # the certificate is checked
            self.assertFalse(link.client.handshook)
        self.assertIsNone(trust.pinned)
        for link, flight in zip(links, flights):
            link.client_tls.dataReceived(flight[-1])
            link.pump.flush()
        links[0].assert_up(self, "TLSv1.3")
        self.assertEqual((trust.pinned, seen), (cert_fingerprint(SERVER.certificate), [cert_fingerprint(SERVER.certificate)]))
        late = links[1]  # its handshake is done when its certificate turns out not to be the pinned one
        self.assertEqual((late.client.received, late.server.received), (b"", b""))
        self.assertIs(late.client.lost.value, trust.last_error)
        self.assertIsNotNone(late.server.lost)
        self.assertEqual(trust.last_error.seen, cert_fingerprint(IMPOSTOR.certificate))
        self.assertEqual(trust.pinned, cert_fingerprint(SERVER.certificate))

    def test_ca_signed_accepted(self):
        """In CA mode a server certificate signed by that CA for the hostname is accepted."""
        trust = ServerTrust("discovery.test", ca_pem=CA_PEM)
        link = _Link(server_certificate_options(CA_SIGNED_SERVER), trust.creator())
        link.assert_up(self, "TLSv1.3")

    def test_ca_refuses_self_signed(self):
        """In CA mode a self-signed server certificate is refused, though it names the host."""
        trust = ServerTrust("discovery.test", ca_pem=CA_PEM)
        _Link(server_certificate_options(SELF_SIGNED_SERVER), trust.creator()).assert_refused(self)

    def test_ca_checks_hostname(self):
        """In CA mode a CA-signed certificate for another hostname is refused."""
        trust = ServerTrust("other.test", ca_pem=CA_PEM)
        _Link(server_certificate_options(CA_SIGNED_SERVER), trust.creator()).assert_refused(self)

    def test_server_accepts_tls_1_2(self):
        """The discovery server still serves TLS 1.2 clients (PROTOCOL.md: 1.2 or newer)."""
        link = _Link(
            server_certificate_options(SERVER), _options(lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
        )
        link.assert_up(self, "TLSv1.2")

    def test_bad_arguments(self):
        """Both a pin and a CA, a malformed pin, or a CA file without a certificate are refused."""
        pinned = cert_fingerprint(SERVER.certificate)
        self.assertRaises(ValueError, ServerTrust, "localhost", pinned=pinned, ca_pem=CA_PEM)
        self.assertRaises(ValueError, ServerTrust, "localhost", pinned=pinned.upper())
        self.assertRaises(CryptoError, ServerTrust, "localhost", ca_pem=b"not a certificate")
