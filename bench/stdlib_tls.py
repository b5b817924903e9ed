"""
A server-side TLS layer on Python's own C{ssl} module (memory BIOs) under Twisted, for bench.relay.

It answers one question for the floors: what the bare relay costs when TLS goes through Python's
C{ssl} module instead of Twisted's layer on pyOpenSSL (the OpenSSL inside C{cryptography}). Enough
for the relay's line protocol and nothing more: no producers, no half-close, no renegotiation.
"""

from __future__ import annotations

import ssl

from twisted.internet.protocol import Factory, Protocol


def server_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """What C{p2pchat.tls.server_certificate_options} gives the relay: its certificate, TLS 1.2 or
    newer, no client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    return context


class StdlibTLS(Protocol):
    """TLS for one wrapped protocol, which sees this object as its transport."""

    def __init__(self, context: ssl.SSLContext, wrapped: Protocol) -> None:
        self.context = context
        self.wrapped = wrapped
        self.disconnecting = False
        self._handshaking = True

    def connectionMade(self) -> None:
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = self.context.wrap_bio(self._incoming, self._outgoing, server_side=True)

    def dataReceived(self, data: bytes) -> None:
        self._incoming.write(data)
        if self._handshaking:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except ssl.SSLError:
                self.transport.abortConnection()
                return
            self._handshaking = False
            self._flush()
            self.wrapped.makeConnection(self)
        # The BIO's pending byte count tells when to stop, so no read ends in SSLWantReadError
        # unless a record is still incomplete.
        while not self.disconnecting and (self._incoming.pending or self._tls.pending()):
            try:
                plain = self._tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError:  # a bad record
                self.loseConnection()
                return
            if not plain:  # the peer's close_notify
                self.loseConnection()
                return
            self.wrapped.dataReceived(plain)
        self._flush()

    def _flush(self) -> None:
        if self._outgoing.pending:
            self.transport.write(self._outgoing.read())

    # -- the wrapped protocol's transport ------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.disconnecting:
            self._tls.write(data)
            self._flush()

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self.disconnecting = True
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.transport.abortConnection()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)

    def getPeer(self):
        return self.transport.getPeer()

    def getHost(self):
        return self.transport.getHost()

    def connectionLost(self, reason) -> None:
        if not self._handshaking:
            self.wrapped.connectionLost(reason)


class StdlibTLSFactory(Factory):
    """Wraps the protocols of C{factory} in L{StdlibTLS}."""

    def __init__(self, context: ssl.SSLContext, factory: Factory) -> None:
        self.context = context
        self.factory = factory

    def buildProtocol(self, addr):
        return StdlibTLS(self.context, self.factory.buildProtocol(addr))
