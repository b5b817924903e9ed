"""Direct peer links: JSON lines over mutually authenticated TLS 1.3 (PROTOCOL.md, "Direct peer
links"). The connector pins the listener's key inside the handshake; the listener accepts the name
claimed in C{hello} only once its handler has matched it to the presented key, and passes nothing
on before that."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from ..crypto import Identity
from ..tls import peer_connector_creator, peer_fingerprint, peer_listener_options
from ..wire import WireError, dumps_line, loads_line

log = Logger()

LINK_PROTOCOL = 1
# A message of 16000 characters, each escaped as \uXXXX, plus framing.
MAX_FRAME = 128 * 1024
HANDSHAKE_TIMEOUT = 10.0
# Frames being handled (a message stored, then acknowledged) past which a link is not read until
# fewer are: a contact writing messages at line speed would otherwise have every one held in memory
# at once, waiting its turn to be stored.
MAX_PENDING_FRAMES = 64
# Incoming connections not verified yet (no TLS handshake and hello done), at most: past it new
# ones are closed at once. Each holds an open file for up to HANDSHAKE_TIMEOUT, and a peer has
# about a thousand: a flood of connections that never finish would leave none for the server
# connection, new links or the history.
MAX_UNVERIFIED = 64


class LinkHandler(Protocol):
    """The rules behind the links (the messenger)."""

    def refuse_fingerprint(self, fingerprint: str) -> bool: ...
    def verify_peer(self, user: str, fingerprint: str | None) -> Deferred[bool]: ...
    def link_up(self, link: Link) -> None: ...
    def link_frame(self, link: Link, frame: dict[str, Any]) -> Deferred[None]: ...  # fires once handled
    def link_down(self, link: Link) -> None: ...


class Link(LineOnlyReceiver, TimeoutMixin):
    """
    One direct link. C{user} is the verified other side: given when connecting out, learned
    from C{hello} (and verified) when accepting. C{session} marks a /startprivate session.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_FRAME

    def __init__(self, links: Links, user: str | None) -> None:
        self._links = links
        self._outgoing = user is not None
        self.user: str = user or ""
        self.session = False
        self._open = False
        self._hello_seen = False
        self._lost = False
        self._pending = 0  # frames handed to the handler and not handled yet
        self._paused = False
        self._unverified = False  # an incoming connection counted in Links' MAX_UNVERIFIED
        self._opened: Deferred[Link] = Deferred()
        self.callLater = links.clock.callLater  # TimeoutMixin's clock

    def connectionMade(self) -> None:
        if not self._outgoing:
            self._unverified = self._links._admit()
            if not self._unverified:
                self.transport.abortConnection()
                return
        self.setTimeout(self._links.handshake_timeout)
        if self._outgoing:
            # Buffered by TLS until the handshake has checked the listener's key.
            self._write({"type": "hello", "protocol": LINK_PROTOCOL, "user": self._links.user})

    def when_open(self) -> Deferred[Link]:
        return self._opened

    def lineReceived(self, line: bytes) -> None:
        try:
            frame = loads_line(line)
        except WireError:
            frame = None
        if not isinstance(frame, dict):
            log.warn("closed a direct link ({user}) that sent something other than a JSON object", user=self.user or "?")
            self.transport.abortConnection()
            return
        if self._open:
            self._pending += 1
            if self._pending >= MAX_PENDING_FRAMES and not self._paused:
                self._paused = True
                self.transport.pauseProducing()
            self._links.handler.link_frame(self, frame).addBoth(self._handled)
        elif self._outgoing:
            if frame.get("type") == "welcome" and frame.get("user") == self.user:
                self._become_open()
            else:
                log.warn("closed the link to {user}: no welcome", user=self.user)
                self.transport.abortConnection()
        elif frame.get("type") == "hello" and not self._hello_seen:
            self._hello_seen = True
            self._check_hello(frame)
        else:
            # Nothing from an unverified peer is looked at, let alone shown.
            self.transport.abortConnection()

    def _handled(self, result: object) -> None:
        self._pending -= 1
        if self._paused and self._pending < MAX_PENDING_FRAMES and not self._lost:
            self._paused = False
            self.transport.resumeProducing()

    def _check_hello(self, frame: dict[str, Any]) -> None:
        user = frame.get("user")
        fingerprint = peer_fingerprint(self.transport)
        if frame.get("protocol") != LINK_PROTOCOL or not isinstance(user, str):
            self.transport.abortConnection()
            return

        def decided(accepted: bool) -> None:
            if self._lost:
                return
            if not accepted:
                self.transport.abortConnection()
                return
            self.user = user
            self._write({"type": "welcome", "protocol": LINK_PROTOCOL, "user": self._links.user})
            self._become_open()

        def failed(failure: Failure) -> None:
            log.failure("checking a direct link", failure)
            if not self._lost:
                self.transport.abortConnection()

        maybeDeferred(self._links.handler.verify_peer, user, fingerprint).addCallbacks(decided, failed)

    def _verified_or_gone(self) -> None:
        if self._unverified:
            self._unverified = False
            self._links._unverified -= 1

    def _become_open(self) -> None:
        self._verified_or_gone()
        self._open = True
        self.setTimeout(None)
        self._links._add(self)
        self._links.handler.link_up(self)
        self._opened.callback(self)

    def _write(self, frame: dict[str, Any]) -> None:
        self.transport.write(dumps_line(frame))

    def send(self, frame: dict[str, Any]) -> None:
        if self._open and not self._lost:
            self._write(frame)

    def close(self) -> None:
        # Forgotten at once: closing TLS takes a round trip, and a closing link is no link.
        self._links._remove(self)
        if not self._lost:
            self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the link at once, without the closing handshake a dead or stuck link would never finish."""
        self._links._remove(self)
        if not self._lost:
            self.transport.abortConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        log.warn("closed the link to {user}: a line over {n} bytes", user=self.user or "?", n=self.MAX_LENGTH)
        self.transport.abortConnection()

    def timeoutConnection(self) -> None:
        log.info("closed a direct link ({user}) that did not finish its handshake", user=self.user or "?")
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        self._lost = True
        self._verified_or_gone()
        self.setTimeout(None)
        if self._open:
            self._links._remove(self)
            self._links.handler.link_down(self)
        elif self._outgoing:
            self._opened.errback(reason)


class Links:
    """Every direct link of this peer, the listener, and outgoing connections."""

    def __init__(
        self,
        reactor: Any,
        identity: Identity,
        user: str,
        handler: LinkHandler,
        interface: str = "",
        port: int = 0,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        connect_timeout: float = 5.0,
    ) -> None:
        self.clock = reactor
        self._reactor = reactor
        self._identity = identity
        self.user = user
        self.handler = handler
        self.handshake_timeout = handshake_timeout
        self._interface = interface
        self._port_number = port
        self._connect_timeout = connect_timeout
        self._listening: list[IListeningPort] = []
        self._links: dict[str, list[Link]] = {}
        self._unverified = 0  # incoming connections not verified yet
        self._refusing = False  # told the log that MAX_UNVERIFIED was reached

    def listening_factory(self) -> TLSMemoryBIOFactory:
        options = peer_listener_options(self._identity, refuse=self.handler.refuse_fingerprint)
        return TLSMemoryBIOFactory(options, False, _links_to(lambda: Link(self, None)), self.clock)

    def connecting_factory(self, user: str, fingerprint: str) -> TLSMemoryBIOFactory:
        creator = peer_connector_creator(self._identity, fingerprint)
        return TLSMemoryBIOFactory(creator, True, _links_to(lambda: Link(self, user)), self.clock)

    def listen(self) -> Deferred[int]:
        """Start listening; fires with the port number (the same one again after a restart)."""

        def start() -> int:
            if not self._listening:
                self._listening = self._listen_everywhere() if not self._interface else [self._listen(self._interface)]
                self._port_number = self._listening[0].getHost().port
            return self._port_number

        return maybeDeferred(start)

    def _listen(self, interface: str, port: int | None = None) -> IListeningPort:
        port = self._port_number if port is None else port
        return self._reactor.listenTCP(port, self.listening_factory(), interface=interface)

    def _listen_everywhere(self) -> list[IListeningPort]:
        """
        Listen on every address, IPv6 and IPv4: the server gives a peer out by the address it came
        from, an IPv6 one when it reached the server over IPv6. IPv4 alone where there is no IPv6.
        """
        try:
            ipv6 = self._listen("::")
        except CannotListenError:  # no IPv6 here (or the port is taken: IPv4 then says so)
            return [self._listen("0.0.0.0")]
        listening = [ipv6]
        if ipv6.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
            # A system whose IPv6 sockets take no IPv4 (net.ipv6.bindv6only, BSDs): IPv4 beside it.
            try:
                listening.append(self._listen("0.0.0.0", ipv6.getHost().port))
            except CannotListenError:
                ipv6.stopListening()
                raise
        return listening

    def stop_listening(self) -> Deferred[None]:
        listening, self._listening = self._listening, []
        return gatherResults([maybeDeferred(port.stopListening) for port in listening]).addCallback(lambda _: None)

    def connect(self, user: str, host: str, port: int, fingerprint: str) -> Deferred[Link]:
        """Open a link to C{user}, whose key must have C{fingerprint}; fires once it is open."""

        async def connect() -> Link:
            endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self._connect_timeout)
            tls = await endpoint.connect(self.connecting_factory(user, fingerprint))
            return await tls.wrappedProtocol.when_open()

        return Deferred.fromCoroutine(connect())

    def get(self, user: str) -> Link | None:
        """C{user}'s newest link: an older one may be the dead link of a process they left."""
        links = self._links.get(user)
        return links[-1] if links else None

    def session_link(self, user: str) -> Link | None:
        """C{user}'s newest link in a private session (/startprivate, from either side), if any."""
        return next((link for link in reversed(self._links.get(user, ())) if link.session), None)

    def close(self, user: str) -> None:
        for link in list(self._links.get(user, ())):
            link.close()

    def close_all(self) -> None:
        for user in list(self._links):
            self.close(user)

    def _admit(self) -> bool:
        """Whether an incoming connection may go on to its handshake (counted until verified or gone)."""
        if self._unverified >= MAX_UNVERIFIED:
            if not self._refusing:
                self._refusing = True
                log.warn("closing new direct links at once: {n} are not verified yet", n=self._unverified)  # noqa: G010 - twisted.logger
            return False
        self._refusing = False
        self._unverified += 1
        return True

    def _add(self, link: Link) -> None:
        self._links.setdefault(link.user, []).append(link)

    def _remove(self, link: Link) -> None:
        links = self._links.get(link.user, [])
        if link in links:
            links.remove(link)
        if not links:
            self._links.pop(link.user, None)


def _links_to(make: Callable[[], Link]) -> Factory:
    factory = Factory.forProtocol(make)
    factory.noisy = False  # "Starting factory" in the log for every link is no news
    return factory
