"""TLS connection creators: the discovery server's, a peer's trust in it, and pinned peer links.

Pins are checked inside OpenSSL's verify callback, so a wrong key fails the handshake itself.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .crypto import CryptoError, Identity, cert_fingerprint, spki_fingerprint, valid_fingerprint

log = Logger()

# Whatever the certificate says about itself is irrelevant: only its key (or, for the
# server, its exact bytes) is pinned, and the handshake proves the other side holds the key.
_REQUIRE_PEER = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT

# A check takes the presented leaf certificate and returns why it is refused, or None.
_Check = Callable[[x509.Certificate], Exception | None]


class ServerPinError(Exception):
    """The discovery server presented a certificate other than the pinned one."""

    def __init__(
        self, expected: str, seen: str, hostname: str = "the discovery server", remedy: str | None = None
    ) -> None:
        self.expected = expected
        self.seen = seen
        self.hostname = hostname
        super().__init__(
            f"THE CERTIFICATE OF {hostname} HAS CHANGED: expected sha256:{expected} "
            f"but it presented sha256:{seen}. Someone may be intercepting the connection, "
            "or the server got a new certificate; nothing was sent. If you trust the new "
            "certificate (ask the server's operator for its fingerprint), "
            + (remedy or "remove the stored pin and connect again.")
        )


class PeerKeyError(Exception):
    """The other end of a peer link presented a key this side does not accept."""

    def __init__(self, message: str, seen: str) -> None:
        super().__init__(message)
        self.seen = seen


def _options(identity: Identity | None, minimum: TLSVersion) -> CertificateOptions:
    if identity is None:
        return CertificateOptions(raiseMinimumTo=minimum)
    # pyOpenSSL takes cryptography objects directly (its own X509 and PKey are deprecated).
    return CertificateOptions(
        privateKey=identity.private_key, certificate=identity.certificate, raiseMinimumTo=minimum
    )


def _leaf_verifier(tls_protocol, check: _Check):
    """An OpenSSL verify callback that leaves the decision about the leaf to C{check}."""

    def verify(connection: SSL.Connection, cert: X509, errno: int, depth: int, ok: int) -> bool:
        if depth != 0:
            return True
        try:
            problem = check(cert.to_cryptography())
        except Exception as e:
            # An exception escaping into OpenSSL would be lost; refuse instead.
            log.failure("while checking a TLS certificate")
            problem = e
        if problem is None:
            return True
        tls_protocol.failVerification(Failure(problem))
        return False

    return verify


@implementer(IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator)
class _Pinned:
    """C{CertificateOptions} whose connections require a certificate that C{check} accepts."""

    def __init__(self, options: CertificateOptions, check: _Check) -> None:
        self._options = options
        self._check = check

    def _connection(self, connection: SSL.Connection, tls_protocol) -> SSL.Connection:
        connection.set_verify(_REQUIRE_PEER, _leaf_verifier(tls_protocol, self._check))
        return connection

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return self._connection(self._options.clientConnectionForTLS(tlsProtocol), tlsProtocol)

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return self._connection(self._options.serverConnectionForTLS(tlsProtocol), tlsProtocol)


# -- the discovery server -----------------------------------------------------------


def server_certificate_options(identity: Identity) -> CertificateOptions:
    """The discovery server's side: presents C{identity}, TLS 1.2 or newer, no client cert."""
    return _options(identity, TLSVersion.TLSv1_2)


class ServerTrust:
    """
    How a peer trusts the discovery server: a pinned certificate fingerprint (trust on first
    use when none is known yet, like ssh known_hosts), or a CA with the hostname checked.

    @ivar pinned: the pinned fingerprint; set by the first successful handshake in TOFU mode.
    @ivar last_error: the L{ServerPinError} of the most recent handshake, or C{None}.
    @param remedy: how the user replaces the pin, ending that error's message.
    """

    def __init__(
        self,
        hostname: str,
        *,
        pinned: str | None = None,
        ca_pem: bytes | None = None,
        on_first_use: Callable[[str], None] | None = None,
        remedy: str | None = None,
    ) -> None:
        if pinned is not None and ca_pem is not None:
            raise ValueError(
                "trust the discovery server by a pinned fingerprint or by a CA, not both"
            )
        if pinned is not None and not valid_fingerprint(pinned):
            raise ValueError("a pinned fingerprint must be 64 lowercase hex digits")
        self.hostname = hostname
        self.pinned = pinned
        self.last_error: ServerPinError | None = None
        self._on_first_use = on_first_use
        self._remedy = remedy
        self._creator: IOpenSSLClientConnectionCreator
        if ca_pem is None:
            self._creator = _ServerPinning(self)
            return
        try:
            certificates = [
                Certificate(X509.from_cryptography(c))
                for c in x509.load_pem_x509_certificates(ca_pem)
            ]
        except ValueError:
            raise CryptoError("the CA file holds no valid PEM certificate") from None
        self._creator = optionsForClientTLS(hostname, trustRootFromCertificates(certificates))

    def creator(self) -> IOpenSSLClientConnectionCreator:
        """A connection creator for C{wrapClientTLS}, C{connectSSL} or C{TLSMemoryBIOFactory}."""
        return self._creator

    def _check(self, cert: x509.Certificate, seen: list[str]) -> ServerPinError | None:
        fingerprint = cert_fingerprint(cert)
        if self.pinned is None:
            # Pinned only once the handshake proves the server holds the certificate's key.
            seen.append(fingerprint)
            return None
        if hmac.compare_digest(fingerprint, self.pinned):
            return None
        self.last_error = ServerPinError(self.pinned, fingerprint, self.hostname, self._remedy)
        return self.last_error

    def _handshake_done(self, tls_protocol, seen: list[str]) -> None:
        if not seen:
            return
        fingerprint = seen.pop()
        if self.pinned is None:
            self.pinned = fingerprint
            if self._on_first_use is not None:
                try:
                    self._on_first_use(fingerprint)
                except Exception:
                    log.failure("while storing the discovery server's fingerprint")
        elif not hmac.compare_digest(fingerprint, self.pinned):
            # Another connection pinned a different certificate while this one was handshaking.
            self.last_error = ServerPinError(self.pinned, fingerprint, self.hostname, self._remedy)
            tls_protocol.failVerification(Failure(self.last_error))


@implementer(IOpenSSLClientConnectionCreator)
class _ServerPinning:
    def __init__(self, trust: ServerTrust) -> None:
        self._trust = trust
        self._options = _options(None, TLSVersion.TLSv1_2)

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        trust = self._trust
        trust.last_error = None
        seen: list[str] = []
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(
            _REQUIRE_PEER, _leaf_verifier(tlsProtocol, lambda cert: trust._check(cert, seen))
        )

        def info(connection: SSL.Connection, where: int, ret: int) -> None:
            if where & SSL.SSL_CB_HANDSHAKE_DONE:
                trust._handshake_done(tlsProtocol, seen)

        connection.set_info_callback(info)
        if not (isIPAddress(trust.hostname) or isIPv6Address(trust.hostname)):
            try:
                connection.set_tlsext_host_name(trust.hostname.encode("idna"))
            except UnicodeError:
                pass  # SNI is a courtesy to the server; the pin decides
        return connection


# -- peer links ---------------------------------------------------------------------


def peer_listener_options(
    identity: Identity, refuse: Callable[[str], bool] | None = None
) -> IOpenSSLServerConnectionCreator:
    """
    A peer's direct-link listener: TLS 1.3 only, presents C{identity}, and requires a client
    certificate, self-signed being fine, unless C{refuse(spki_fingerprint)} is true. Whose
    key it is gets settled after the handshake (L{peer_fingerprint}).
    """

    def check(cert: x509.Certificate) -> Exception | None:
        fingerprint = spki_fingerprint(cert)
        if refuse is not None and refuse(fingerprint):
            return PeerKeyError(f"refused a peer with the key sha256:{fingerprint}", fingerprint)
        return None

    return _Pinned(_options(identity, TLSVersion.TLSv1_3), check)


def peer_connector_creator(
    identity: Identity, expected_fingerprint: str
) -> IOpenSSLClientConnectionCreator:
    """
    A peer's side of a direct link it opens: TLS 1.3 only, presents C{identity}, and fails
    the handshake unless the listener's key has the SPKI fingerprint C{expected_fingerprint}.
    """
    if not valid_fingerprint(expected_fingerprint):
        raise ValueError("the expected fingerprint must be 64 lowercase hex digits")

    def check(cert: x509.Certificate) -> Exception | None:
        fingerprint = spki_fingerprint(cert)
        if hmac.compare_digest(fingerprint, expected_fingerprint):
            return None
        return PeerKeyError(
            f"the peer presented the key sha256:{fingerprint}, "
            f"not the expected sha256:{expected_fingerprint}",
            fingerprint,
        )

    return _Pinned(_options(identity, TLSVersion.TLSv1_3), check)


def peer_fingerprint(transport) -> str | None:
    """
    The SPKI fingerprint of the certificate the other side presented on a TLS transport,
    or C{None} before the handshake has completed, after the connection is gone, or
    without TLS. Call it from C{IHandshakeListener.handshakeCompleted}: C{connectionMade}
    runs before the handshake.
    """
    get_peer_certificate = getattr(transport, "getPeerCertificate", None)
    if get_peer_certificate is None:
        return None
    try:
        cert = get_peer_certificate()
    except (AttributeError, SSL.Error):
        # TLSMemoryBIOProtocol drops its OpenSSL connection once the connection is lost.
        return None
    if cert is None:
        return None
    return spki_fingerprint(cert.to_cryptography())
