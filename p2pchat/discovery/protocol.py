"""The discovery server's wire end: lines in, lines out; all decisions live in the session."""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from p2pchat.discovery.session import Session

log = Logger()

# A connection that will not close politely is cut after this long.
CLOSE_TIMEOUT = 5.0


@implementer(IPushProducer)
class DiscoveryProtocol(LineOnlyReceiver):
    """
    Feeds lines to a L{Session} and writes what it answers.

    It registers itself as the transport's producer so that it learns when the peer stops
    reading; a peer that lets more than C{max_queued_bytes} pile up after that is cut off as a
    slow consumer. (Reading is not paused then: TLS also reports "full" while it buffers writes
    made before the handshake, and the handshake needs reading to finish.)
    """

    delimiter = b"\n"

    def __init__(self, directory, clock) -> None:
        self.directory = directory
        self.clock = clock
        self.MAX_LENGTH = directory.limits.max_line
        self.session: Session | None = None
        self.full = False
        self._queued_while_full = 0
        self._cut = False
        self._abort_call = None

    def connectionMade(self) -> None:
        # Replies and events are small lines: Nagle's algorithm would hold them back for an ACK.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        peer = self.transport.getPeer()
        host = getattr(peer, "host", "unknown")
        self.session = Session(self.directory, self.clock, self, host)
        self.transport.registerProducer(self, True)
        self.session.connected()

    def lineReceived(self, line: bytes) -> None:
        self.session.line_received(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.session.line_too_long()

    def connectionLost(self, reason) -> None:
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        if self.session is not None:
            self.session.connection_lost()

    # -- Connection, for the session ---------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._cut:
            return
        if self.full:
            self._queued_while_full += len(data)
            if self._queued_while_full > self.directory.limits.max_queued_bytes:
                self._cut_slow_consumer()
                return
        self.transport.write(data)

    def close(self) -> None:
        self.transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.clock.callLater(CLOSE_TIMEOUT, self.transport.abortConnection)

    def pause_reading(self) -> None:
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self.transport.resumeProducing()

    def _cut_slow_consumer(self) -> None:
        log.info("cutting off {host}: more than {limit} bytes waiting", host=self.session.host,
                 limit=self.directory.limits.max_queued_bytes)
        self._cut = True
        session = self.session
        if session.username is not None:
            self.directory.leave(session, "slow_consumer")
        session.closed = True
        self.transport.abortConnection()

    # -- IPushProducer: the transport tells us when its buffer is full ------------------

    def pauseProducing(self) -> None:
        self.full = True

    def resumeProducing(self) -> None:
        self.full = False
        self._queued_while_full = 0
        if self.session is not None:
            self.session.drained()

    def stopProducing(self) -> None:
        pass


class DiscoveryFactory(Factory):
    noisy = False

    def __init__(self, directory, clock) -> None:
        self.directory = directory
        self.clock = clock

    def buildProtocol(self, addr):
        p = DiscoveryProtocol(self.directory, self.clock)
        p.factory = self
        return p
