"""The discovery server's wire end: lines in, lines out; all decisions live in the session."""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import tcp
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IPushProducer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from p2pchat.discovery.session import Session

try:
    # pyOpenSSL's cffi bindings to OpenSSL: not its public API (see L{MeteredTLS} and
    # L{DirectConnection}, which fall back to its public API without them).
    from OpenSSL.SSL import _ffi, _lib
except ImportError:  # pragma: no cover - a pyOpenSSL without them
    _ffi = _lib = None

log = Logger()

# A connection that will not close politely is cut after this long.
CLOSE_TIMEOUT = 5.0


class PromptWrites:
    """
    For a TCP transport class (a L{tcp.Connection}): send a write at once when nothing waits to
    go before it.

    Twisted queues every write until a later pass of the reactor finds the socket writable
    (twisted#5303): per reply, two C{epoll_ctl} calls and a pass more. Nagle's algorithm is off
    on our connections, so a small reply gains nothing by waiting. What the kernel does not take
    at once (all of it, when the socket's buffer is full) is queued as usual, and later writes
    queue behind it; an error (the peer gone) is met again by the queued write, which closes the
    connection the usual way.
    """

    def write(self, data: bytes) -> None:
        if (
            self.TLS or not self.connected or self._writeDisconnected or self._tempDataBuffer
            or self.offset < len(self.dataBuffer) or not isinstance(data, bytes)
        ):
            super().write(data)
            return
        try:
            sent = self.socket.send(data)
        except OSError:
            super().write(data)
            return
        if sent != len(data):
            super().write(data[sent:])


class PromptServer(PromptWrites, tcp.Server):
    """A server connection's TCP transport with L{PromptWrites}."""


def serve_promptly(port) -> None:
    """
    Give a listening TCP port's new connections L{PromptServer}; other ports keep theirs. A port
    that brings its own TLS (an C{ssl:} description, which wraps our factory in Twisted's
    L{TLSMemoryBIOFactory}) gets the TLS layer of L{DiscoveryTLSFactory} too.
    """
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.transport = PromptServer
        if type(port.factory) is TLSMemoryBIOFactory:
            port.factory.protocol = MeteredTLS


class Outbox:
    """
    Connections with lines written: each sends what it has in one write at the end of the reactor
    pass, the answers to its own requests and what others sent it together, on one timer for all.
    A pass over socket events, when the reactor's dispatch says where it begins and ends
    (L{hold} and L{release}, see L{p2pchat.discovery.dispatch}), needs no timer: its writes go
    once its events are handled.

    Against answering each read at once, that took C{dm_relay_tls} from 32 300 sends (and TLS
    records) to 23 300 for its 200 000 relayed messages, and 4-5 % off the server's CPU per
    message (bench/FINDINGS.md, "Relaying").

    Outside a pass (the store's outcomes, the password hasher's, timers) a connection's lines go
    as soon as another connection gets lines: the store answers a backlog's sends sender after
    sender, and each sender's client goes on while the others' answers are made (bench/FINDINGS.md,
    "Storing a backlog"). What a connection gets after going early waits for the end of the
    turn, so that none gets more than two writes in a turn (one recipient of many senders).
    """

    def __init__(self, clock) -> None:
        self.clock = clock
        self._waiting: list[DiscoveryProtocol] = []
        # Outside a pass: the connections sent early in this turn, and those written to again since.
        self._sent_early: set[DiscoveryProtocol] = set()
        self._later: list[DiscoveryProtocol] = []
        self._call = None
        self._held = False

    def add(self, protocol: DiscoveryProtocol) -> None:
        if self._held:
            self._waiting.append(protocol)
            return
        if self._call is None:
            self._call = self.clock.callLater(0, self._send)
        if protocol in self._sent_early:
            self._later.append(protocol)
            return
        if self._waiting:
            waiting, self._waiting = self._waiting, []
            self._sent_early.update(waiting)
            self._flush(waiting)
        self._waiting.append(protocol)

    def hold(self) -> None:
        """Socket events are being handled: what they write waits for L{release}."""
        self._held = True

    def release(self) -> None:
        """The pass's socket events are handled: send what they (and anything before) wrote."""
        self._held = False
        if self._waiting or self._later:
            if self._call is not None:
                self._call.cancel()
            self._send()

    def _send(self) -> None:
        self._call = None
        waiting, self._waiting = self._waiting, []
        later, self._later = self._later, []
        self._sent_early.clear()
        self._flush(waiting)
        self._flush(later)

    @staticmethod
    def _flush(protocols: list[DiscoveryProtocol]) -> None:
        for protocol in protocols:
            try:
                protocol.flush()
            except Exception:  # noqa: BLE001 - one connection's failure must not strand the others' lines
                log.failure("while sending to {protocol!r}", protocol=protocol)


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

    def __init__(self, directory, clock, outbox: Outbox) -> None:
        self.directory = directory
        self.clock = clock
        self.outbox = outbox
        self.MAX_LENGTH = directory.limits.max_line
        self.session: Session | None = None
        self.full = False
        # Lines written and not yet handed to the transport: they go at the end of the pass (Outbox).
        self._out: list[bytes] = []
        self._in_outbox = False
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
        # LineOnlyReceiver hands each line straight to the session: a keep-alive is a read of one
        # line, and a call of ours in between costs on every one.
        self.lineReceived = self.session.line_received
        self.transport.registerProducer(self, True)
        self.session.connected()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.session.line_too_long()

    def connectionLost(self, reason) -> None:
        self._out.clear()
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
        self._out.append(data)
        if not self._in_outbox:
            self._in_outbox = True
            self.outbox.add(self)

    def flush(self) -> None:
        """Hand the lines written so far to the transport, in one write."""
        self._in_outbox = False
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            self.transport.write(data)

    def close(self) -> None:
        self.flush()
        # The TLS layer closes (close_notify, then the socket) only once no producer is registered:
        # without this, every connection the server ends stayed open until CLOSE_TIMEOUT.
        self.transport.unregisterProducer()
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
        self._out.clear()
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

    def __init__(self, directory, clock, outbox: Outbox | None = None) -> None:
        self.directory = directory
        self.clock = clock
        self.outbox = Outbox(clock) if outbox is None else outbox

    def buildProtocol(self, addr):
        p = DiscoveryProtocol(self.directory, self.clock, self.outbox)
        p.factory = self
        return p


def _renew_bio(connection: SSL.Connection, name: str) -> None:
    """Give C{connection} an empty memory BIO in place of the one it has under C{name}
    (C{_into_ssl} or C{_from_ssl}); OpenSSL frees the old one with the buffer it grew."""
    fresh = _lib.BIO_new(_lib.BIO_s_mem())
    if fresh == _ffi.NULL:
        return  # no memory for a new one: keep the old
    if name == "_into_ssl":
        _lib.SSL_set_bio(connection._ssl, fresh, connection._from_ssl)
    else:
        _lib.SSL_set_bio(connection._ssl, connection._into_ssl, fresh)
    setattr(connection, name, fresh)


def _bio_access():
    """
    C{BIO_get_mem_data} and C{NULL}: with a Connection's memory BIO (its C{_into_ssl} or
    C{_from_ssl}) they tell how many bytes it holds. pyOpenSSL uses them itself, as it uses the
    calls of L{_renew_bio}, but none of them is its public API: this tries them once on a
    Connection of its own, and gives C{(None, None)} where they do not work as expected.
    """
    try:
        held = _lib.BIO_get_mem_data
        probe = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        probe.bio_write(b"probe")
        if held(probe._into_ssl, _ffi.NULL) == 5 and held(probe._from_ssl, _ffi.NULL) == 0:
            _renew_bio(probe, "_into_ssl")
            _renew_bio(probe, "_from_ssl")
            probe.bio_write(b"again!")
            if held(probe._into_ssl, _ffi.NULL) == 6:
                return held, _ffi.NULL
    except Exception:  # noqa: BLE001 - any change in pyOpenSSL's insides: read as Twisted does
        log.failure("pyOpenSSL's memory BIOs cannot be used; TLS reads as Twisted's layer does")
    else:
        log.error("pyOpenSSL's memory BIOs do not work as expected; TLS reads as Twisted's does")
    return None, None


_held, _NULL = _bio_access()

# L{MeteredTLS} gives a connection a new memory BIO after a read or write of more bytes than this.
SHED_ABOVE = 1024

# The most L{MeteredTLS} asks OpenSSL for at once (a record holds at most 16 KiB), and the size of
# L{DirectConnection}'s buffer, so that such a read goes straight.
_READ_BUFFER_SIZE = 32768


class MeteredTLS(TLSMemoryBIOProtocol):
    """
    Twisted's TLS layer, which asks OpenSSL's memory BIOs how many bytes they hold instead of
    reading them until OpenSSL raises C{WantReadError}, and which gives a connection new BIOs
    after a large read or write.

    Twisted ends every read from the socket with two such exceptions: one from the C{recv} after
    the last record, one from the C{bio_read} after the last reply. That was about 2.5 of the
    20 microseconds that a keep-alive took on a server with 2000 connections (in memory). Here a
    read goes on only while a record waits in the BIO, and the BIO is read for exactly what it
    holds. Once the connection is lost, reading is Twisted's again, so that OpenSSL reports how
    the stream ended.

    A memory BIO keeps a buffer as large as the most it ever held until its connection closes:
    the handshake's flights (about 4.5 KiB), each socket read (up to 64 KiB) and each write (up to
    16 KiB at a time). Once such a read or write has gone through and the BIO is empty, it is
    replaced with a new one (L{SHED_ABOVE}).
    """

    _eof = False

    def _flushSendBIO(self) -> None:
        if _held is None:
            super()._flushSendBIO()
            return
        connection = self._tlsConnection
        waiting = _held(connection._from_ssl, _NULL)
        if waiting:
            data = connection.bio_read(waiting)
            if waiting > SHED_ABOVE:
                _renew_bio(connection, "_from_ssl")  # empty now, and before anything else is sent
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        # OpenSSL takes everything a read brought (a record not whole yet into a buffer of its
        # own), unless the connection ended on the way.
        if len(data) > SHED_ABOVE and _held is not None and not self._lostTLSConnection:
            connection = self._tlsConnection
            if not _held(connection._into_ssl, _NULL):
                _renew_bio(connection, "_into_ssl")

    def _flushReceiveBIO(self) -> None:
        if _held is None or self._eof:
            super()._flushReceiveBIO()
            return
        connection = self._tlsConnection
        while not self._lostTLSConnection:
            try:
                data = connection.recv(_READ_BUFFER_SIZE)
            except SSL.WantReadError:
                break  # a record not whole yet
            except SSL.ZeroReturnError:
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    self.wrappedProtocol.dataReceived(data)
                # recv took the whole record (at most 16 KiB): what is left is in the BIO.
                if not _held(connection._into_ssl, _NULL):
                    break
        if _held(connection._from_ssl, _NULL):  # the handshake's flights, alerts, key updates
            self._flushSendBIO()

    def connectionLost(self, reason) -> None:
        self._eof = True
        super().connectionLost(reason)


# What DirectConnection reads into before it copies out what it got; the reactor's thread is the
# only one that reads or writes TLS.
_read_buffer = None


class DirectConnection(SSL.Connection):
    """
    pyOpenSSL's Connection whose four calls on a TLS layer's data path (C{bio_write}, C{recv},
    C{send}, C{bio_read}) go straight into OpenSSL and return at once when OpenSSL did what was
    asked and no callback of the Context left an exception behind (pyOpenSSL raises those after the
    next call, as this does). Anything else (an error, a retry, arguments of another kind) is
    pyOpenSSL's own handling.

    pyOpenSSL's methods check their arguments, allocate a buffer for every read and look up the
    error of every call: a keep-alive's four calls took 4.7 microseconds through them and 2.0
    straight (one connection in memory); a whole keep-alive on a server with 2000 connections in
    memory went from about 19.4 to 17.2.
    """

    def __init__(self, context: SSL.Context, socket=None) -> None:
        super().__init__(context, socket)
        # Where the Context's callbacks leave their exceptions (lists, each kept for good). Taken
        # once: a callback set on the Context after this connection is made would go unseen here,
        # where pyOpenSSL looks up the Context's helpers at every call. The server's Context is
        # complete before its first connection (CertificateOptions makes it once).
        self._callback_problems = [helper._problems for helper in _helpers(context)]

    def bio_write(self, buf) -> int:
        if type(buf) is bytes:
            written = _lib.BIO_write(self._into_ssl, buf, len(buf))
            if written > 0:
                return written
        return super().bio_write(buf)  # a failed write wrote nothing: pyOpenSSL tries and raises

    def recv(self, bufsiz: int, flags: int | None = None) -> bytes:
        if flags is not None or not 0 < bufsiz <= _READ_BUFFER_SIZE:
            return super().recv(bufsiz, flags)
        got = _lib.SSL_read(self._ssl, _read_buffer, bufsiz)
        if got <= 0 or any(self._callback_problems):
            self._raise_ssl_error(self._ssl, got)  # as pyOpenSSL does after its SSL_read
        return _ffi.buffer(_read_buffer, got)[:]

    def send(self, buf, flags: int = 0) -> int:
        if type(buf) is not bytes or len(buf) > 2**31 - 1:
            return super().send(buf, flags)
        sent = _lib.SSL_write(self._ssl, buf, len(buf))
        if sent <= 0 or any(self._callback_problems):
            self._raise_ssl_error(self._ssl, sent)
        return sent

    def bio_read(self, bufsiz: int) -> bytes:
        if type(bufsiz) is int and 0 < bufsiz <= _READ_BUFFER_SIZE:
            got = _lib.BIO_read(self._from_ssl, _read_buffer, bufsiz)
            if got > 0:
                return _ffi.buffer(_read_buffer, got)[:]
        return super().bio_read(bufsiz)  # a failed read took nothing: pyOpenSSL tries and raises


def _helpers(context: SSL.Context) -> list:
    """The helpers of C{context}'s callbacks: each keeps the exceptions its callback raised, for
    pyOpenSSL to raise after the next call."""
    helpers = (context._verify_helper, context._alpn_select_helper, context._ocsp_helper)
    return [helper for helper in helpers if helper is not None]


def _direct_available() -> bool:
    """Whether pyOpenSSL has the private parts L{DirectConnection} uses; if not, it logs that."""
    global _read_buffer
    try:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        if not all(type(helper._problems) is list for helper in _helpers(context)):
            raise TypeError("a callback helper without a list of problems")
        probe = SSL.Connection(context, None)
        for name in ("_ssl", "_into_ssl", "_from_ssl", "_raise_ssl_error"):
            getattr(probe, name)
        for name in ("BIO_write", "BIO_read", "SSL_read", "SSL_write"):
            getattr(_lib, name)
        _read_buffer = _ffi.new("char[]", _READ_BUFFER_SIZE)
    except Exception:  # noqa: BLE001 - any change in pyOpenSSL's insides: its own Connection
        log.failure("pyOpenSSL has changed; the server's TLS uses its Connection as it is")
        return False
    return True


_direct = _direct_available()


@implementer(IOpenSSLServerConnectionCreator)
class DirectConnections:
    """The server's side of TLS connections with C{options}'s Context: L{DirectConnection}s, or
    pyOpenSSL's own Connections where pyOpenSSL lacks what they use."""

    def __init__(self, options) -> None:
        self._options = options

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return (DirectConnection if _direct else SSL.Connection)(self._options.getContext(), None)


class DiscoveryTLSFactory(TLSMemoryBIOFactory):
    """TLS for L{DiscoveryFactory}: its protocols put their writes together themselves (L{Outbox}),
    so the TLS layer need not hold them for a pass of its own (L{MeteredTLS}); its connections are
    L{DirectConnection}s of C{options}' Context (the server's C{CertificateOptions})."""

    protocol = MeteredTLS

    def __init__(self, options, isClient: bool, wrappedFactory, clock=None) -> None:
        if isClient:
            raise ValueError("DiscoveryTLSFactory is the server's side only")
        super().__init__(DirectConnections(options), False, wrappedFactory, clock)
