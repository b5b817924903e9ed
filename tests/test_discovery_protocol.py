"""The discovery server's wire end: on in-memory transports (plain, and real TLS in memory), and
its TCP transport on loopback sockets."""

from __future__ import annotations

import socket
import struct
from functools import partial

from OpenSSL import SSL
from twisted.internet import defer, reactor
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pchat.crypto import cert_fingerprint, generate_identity
from p2pchat.discovery import protocol
from p2pchat.discovery.directory import Directory, Limits
from p2pchat.discovery.protocol import (
    DirectConnection,
    DirectConnections,
    DiscoveryFactory,
    DiscoveryTLSFactory,
    MeteredTLS,
    PromptServer,
    serve_promptly,
)
from p2pchat.tls import ServerTrust, server_certificate_options
from p2pchat.wire import Event, decode_frame, encode_request

from .support import LineClient, with_timeout
from .test_session import PASSWORD, Harness

SERVER_IDENTITY = generate_identity("test discovery server")


def directory(**limits) -> Directory:
    # hello, ping and errors touch neither the store nor the hasher
    return Directory(store=None, clock=Clock(), limits=Limits(**limits), hasher=None)


class CountingTransport(StringTransport):
    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


def frames(transport: StringTransport):
    return [decode_frame(line) for line in transport.value().splitlines()]


class PlainProtocolTests(SynchronousTestCase):
    def connect(self, transport_class=StringTransport, **limits):
        self.clock = Clock()
        self.factory = DiscoveryFactory(directory(**limits), self.clock)
        proto = self.factory.buildProtocol(None)
        transport = transport_class()
        self.in_pass(proto.makeConnection, transport)
        return proto, transport

    def in_pass(self, handle, *args) -> None:
        """Run C{handle} as the server's reactor runs socket events: in a pass that the outbox
        is told of (L{p2pchat.discovery.dispatch})."""
        self.factory.outbox.hold()
        try:
            handle(*args)
        finally:
            self.factory.outbox.release()

    def test_hello_on_connect(self):
        """The hello event is the first thing written; it says the server hands out envelope key
        signatures (a peer takes an older server's word for envelope keys)."""
        _, transport = self.connect()
        hello = frames(transport)[0]
        self.assertEqual((hello.name, hello.fields["protocol"], hello.fields["key_signatures"]), ("hello", 1, True))

    def test_line_limit(self):
        """A line over max_line gets line_too_long and the connection closes."""
        proto, transport = self.connect(max_line=1024)
        proto.dataReceived(b"x" * 1025)
        self.assertEqual(frames(transport)[-1].code, "line_too_long")
        self.assertTrue(transport.disconnecting)

    def test_line_at_limit(self):
        """A line of exactly max_line bytes is read (and here refused as bad JSON, not as too long)."""
        proto, transport = self.connect(max_line=1024)
        self.in_pass(proto.dataReceived, b"x" * 1024 + b"\n")
        self.assertEqual(frames(transport)[-1].code, "bad_json")
        self.assertFalse(transport.disconnecting)

    def test_slow_consumer(self):
        """A peer that stops reading is cut off once more than max_queued_bytes pile up; what
        is written after that is dropped, and the cut is logged once."""
        proto, transport = self.connect(max_queued_bytes=100_000)
        proto.pauseProducing()  # what the transport does when its buffer is full
        for _ in range(90):
            proto.write(b"x" * 1000 + b"\n")
        self.clock.advance(0)
        self.assertFalse(transport.disconnecting)
        proto.resumeProducing()
        proto.pauseProducing()
        before = len(transport.value())
        with capturedLogs() as events:
            for _ in range(99):
                proto.write(b"x" * 1000 + b"\n")
            self.clock.advance(0)
            self.assertFalse(transport.disconnected)
            self.assertEqual(len(transport.value()) - before, 99 * 1001)
            for _ in range(101):
                proto.write(b"x" * 1000 + b"\n")
            self.clock.advance(0)
        self.assertTrue(transport.disconnected)
        self.assertEqual(len(transport.value()) - before, 99 * 1001)
        self.assertEqual(len([e for e in events if "cutting off" in e["log_format"]]), 1)

    def test_a_pass_writes_once(self):
        """What a pass over socket events writes to a connection goes out when the pass is over,
        in one write and with no timer: the hello on connect; the answers to a read together
        with what other connections' requests sent it in the same pass."""
        proto, transport = self.connect(CountingTransport)
        self.assertEqual((transport.writes, [f.name for f in frames(transport)]), (1, ["hello"]))
        timers = len(self.clock.getDelayedCalls())

        def handle():
            proto.dataReceived(b'{"id":"a","op":"hello","protocol":1}\n')
            proto.write(b'{"event":"relayed"}\n')  # what another connection's request sends it
            proto.dataReceived(b'{"id":"b","op":"ping"}\n')
            self.assertEqual(transport.writes, 1)

        self.in_pass(handle)
        self.assertEqual([getattr(f, "id", None) or f.name for f in frames(transport)[1:]], ["a", "relayed", "b"])
        self.assertEqual((transport.writes, len(self.clock.getDelayedCalls())), (2, timers))

    def test_pass_takes_over_the_timer(self):
        """Lines written outside a pass (a timer's, a thread's callback) wait on the outbox's timer;
        a pass that comes first sends them with its own and cancels the timer."""
        proto, transport = self.connect(CountingTransport)
        timers = len(self.clock.getDelayedCalls())  # the session's keep-alive watch
        proto.write(b'{"event":"from_a_timer"}\n')
        self.assertEqual(len(self.clock.getDelayedCalls()), timers + 1)
        self.in_pass(proto.dataReceived, b'{"id":"a","op":"ping"}\n')
        self.assertEqual(transport.writes, 2)  # the hello, then both lines at once
        self.assertEqual(frames(transport)[-2].name, "from_a_timer")
        self.assertEqual(frames(transport)[-1].id, "a")
        self.assertEqual(len(self.clock.getDelayedCalls()), timers)
        self.clock.advance(0)
        self.assertEqual(transport.writes, 2)

    def connections(self, n: int):
        """C{n} connections with one outbox, their hellos sent; and the timers there are then."""
        self.clock = Clock()
        self.factory = DiscoveryFactory(directory(), self.clock)
        pairs = []
        for _ in range(n):
            proto, transport = self.factory.buildProtocol(None), CountingTransport()
            proto.makeConnection(transport)
            pairs.append((proto, transport))
        self.clock.advance(0)  # the hellos
        return pairs, len(self.clock.getDelayedCalls())

    def test_outbox(self):
        """Lines written to connections outside a pass over socket events (a timer's, a thread's
        callback) go out by the end of the reactor pass: one write per connection, one timer for
        them all."""
        pairs, timers = self.connections(3)
        for proto, _ in pairs:
            proto.write(b"one\n")
            proto.write(b"two\n")
        self.assertEqual(len(self.clock.getDelayedCalls()), timers + 1)
        self.clock.advance(0)
        self.assertEqual([(t.writes, t.value().endswith(b"\none\ntwo\n")) for _, t in pairs], [(2, True)] * 3)
        self.assertEqual(len(self.clock.getDelayedCalls()), timers)

    def test_outbox_sends_finished_connections_early(self):
        """Outside a pass, a connection's lines go before the end of the pass, as soon as another
        connection gets lines (the store answers a backlog's sends sender after sender; each
        sender can go on while the others' answers are made)."""
        pairs, timers = self.connections(5)
        for k, (proto, _) in enumerate(pairs):
            proto.write(b"one\n")
            proto.write(b"two\n")
            # the hello, and for those before this one, their lines
            self.assertEqual([t.writes for _, t in pairs], [2 if i < k else 1 for i in range(5)])
        self.assertEqual(len(self.clock.getDelayedCalls()), timers + 1)
        self.clock.advance(0)
        self.assertEqual([(t.writes, t.value().endswith(b"\none\ntwo\n")) for _, t in pairs], [(2, True)] * 5)
        self.assertEqual(len(self.clock.getDelayedCalls()), timers)

    def test_outbox_early_once_per_pass(self):
        """A connection goes early at most once in a pass: what it gets after that waits for the
        end of the pass (one recipient of many senders' stored messages; lines that come round
        and round). No connection gets more than two writes."""
        pairs, _ = self.connections(5)
        (recipient, to_recipient), senders = pairs[0], pairs[1:]
        for n, (sender, _) in enumerate(senders):
            recipient.write(b"envelope %d\n" % n)
            sender.write(b"answer\n")
        self.assertEqual([t.writes for _, t in pairs], [2, 2, 2, 2, 1])
        self.clock.advance(0)
        self.assertEqual([t.writes for _, t in pairs], [3, 2, 2, 2, 2])
        self.assertTrue(to_recipient.value().endswith(b"".join(b"envelope %d\n" % n for n in range(4))))

        for round_ in range(3):
            for proto, _ in pairs:
                proto.write(b"line %d\n" % round_)
        self.clock.advance(0)
        self.assertEqual([t.writes for _, t in pairs], [5, 4, 4, 4, 3])
        self.assertEqual([t.value().endswith(b"line 0\nline 1\nline 2\n") for _, t in pairs], [True] * 5)

    def test_outbox_holds_lines_in_a_pass(self):
        """In a pass over socket events nothing goes early: each connection's lines go in one
        write once the pass is over, however they are interleaved."""
        pairs, timers = self.connections(4)

        def handle():
            for round_ in range(2):
                for proto, _ in pairs:
                    proto.write(b"line %d\n" % round_)
            self.assertEqual([t.writes for _, t in pairs], [1] * 4)

        self.in_pass(handle)
        self.assertEqual([(t.writes, t.value().endswith(b"line 0\nline 1\n")) for _, t in pairs], [(2, True)] * 4)
        self.assertEqual(len(self.clock.getDelayedCalls()), timers)

    def test_outbox_failure(self):
        """A connection whose transport fails to take its lines does not keep the others' from
        going, at the end of a pass or early."""
        self.connect()
        first, broken = self.factory.buildProtocol(None), StringTransport()
        first.makeConnection(broken)

        def fail(data):
            raise OSError("gone")

        broken.write = fail
        with capturedLogs() as events:
            later = []
            for _ in range(3):  # the next hello sends the first's lines early
                later.append((self.factory.buildProtocol(None), StringTransport()))
                later[-1][0].makeConnection(later[-1][1])
            self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
            self.clock.advance(0)
        self.assertEqual([frames(t)[0].name for _, t in later], ["hello"] * 3)
        self.assertEqual(len([e for e in events if "while sending" in e.get("log_format", "")]), 1)

    def test_close_flushes(self):
        """Lines written before a close go out before the close."""
        proto, transport = self.connect()
        proto.write(b"last words\n")
        proto.close()
        self.assertTrue(transport.value().endswith(b"last words\n"))
        self.assertTrue(transport.disconnecting)

    def test_lines_across_reads(self):
        """A line may come in pieces, and several in one read; a line after the one that closed the
        connection is not read."""
        proto, transport = self.connect()
        self.in_pass(proto.dataReceived, b'{"id":1,"op":"hel')
        self.in_pass(proto.dataReceived, b'lo","protocol":1}\n{"id":2,"op":"ping"}\n{"id":3,')
        self.in_pass(proto.dataReceived, b'"op":"ping"}\n{"id":4,"op":"hello","protocol":9}\n{"id":5,"op":"ping"}\n')
        replies = [f for f in frames(transport) if not isinstance(f, Event)]
        self.assertEqual([(r.id, r.code) for r in replies], [(1, None), (2, None), (3, None), (4, "unsupported_version")])
        self.assertTrue(transport.disconnecting)

    def test_one_reply_per_line(self):
        """Each garbage line gets exactly one error reply, with the request id when readable."""
        proto, transport = self.connect()
        self.in_pass(proto.dataReceived, b'{"id":"a","op":"hello","protocol":1}\n{"id":"b","op":"who"}\n\xff\nnope\r\n')
        replies = [f for f in frames(transport) if not isinstance(f, Event)]
        self.assertEqual([(r.id, r.code) for r in replies],
                         [("a", None), ("b", "not_authenticated"), (None, "bad_utf8"), (None, "bad_json")])


class LoggedInTests(TestCase):
    """The protocol over a directory with a real store and real password hashing."""

    def connect(self, h: Harness) -> tuple[protocol.DiscoveryProtocol, StringTransport]:
        proto, transport = DiscoveryFactory(h.directory, h.clock).buildProtocol(None), StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    async def test_reading_paused_while_the_password_is_checked(self):
        """The connection stops reading while a login's password is checked (what the client
        sends meanwhile waits in the socket), and reads again once the login is answered."""
        h = await Harness(self).start()
        await (await h.user("bob")).ok("logout")
        verify, checks = h.hasher.verify, []
        h.hasher.verify = lambda *args: checks.append(verify(*args)) or checks[-1]
        proto, transport = self.connect(h)
        proto.dataReceived(
            encode_request(1, "hello", protocol=1)
            + encode_request(2, "login", username="bob", password=PASSWORD, port=1)
            + encode_request(3, "who")
        )
        self.assertEqual(transport.producerState, "paused")
        await checks[0]
        await h.settled()
        self.assertEqual(transport.producerState, "producing")
        h.clock.advance(0)  # the end of the reactor's turn, when the outbox writes
        self.assertEqual([(f.id, f.ok) for f in frames(transport)[1:]], [(1, True), (2, True), (3, True)])

    async def test_cut_off_user_goes_offline(self):
        """A logged-in user cut off as a slow consumer is offline at once: the others hear
        why, and the user can log in again."""
        h = await Harness(self, max_queued_bytes=10_000).start()
        alice = await h.user("alice")
        first = await h.user("bob")
        first.conn.close()
        proto, transport = self.connect(h)
        proto.dataReceived(
            encode_request(1, "hello", protocol=1)
            + encode_request(2, "resume", username="bob", token=first.login["token"], port=1)
        )
        await h.settled()
        self.assertIs(h.directory.online["bob"], proto.session)
        proto.pauseProducing()  # bob stops reading
        for _ in range(20):
            proto.write(b"x" * 1000 + b"\n")
        h.clock.advance(0)
        self.assertTrue(transport.disconnected)
        self.assertNotIn("bob", h.directory.online)
        self.assertEqual(alice.conn.events("presence")[-1].fields["offline"], {"bob": "slow_consumer"})
        await h.user("bob")


class TLSInMemoryTests(SynchronousTestCase):
    def pair(self, pinned: str):
        clock = Clock()  # the TLS layer flushes its writes on this clock; the pump advances it
        server_factory = DiscoveryTLSFactory(
            server_certificate_options(SERVER_IDENTITY), False, DiscoveryFactory(directory(), clock), clock
        )
        trust = ServerTrust("localhost", pinned=pinned)
        app = LineClient()
        client_factory = TLSMemoryBIOFactory(trust.creator(), True, Factory.forProtocol(lambda: app), clock)
        _, self.server_tls, pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None), clock=clock
        )
        return app, trust, pump

    def test_pinned_server(self):
        """Over real TLS with the right pin, the hello exchange and a ping work."""
        client, trust, pump = self.pair(cert_fingerprint(SERVER_IDENTITY.certificate))
        pump.flush()
        self.assertEqual(client.events[0].name, "hello")
        replies = []
        client.request("hello", protocol=1).addCallback(replies.append)
        client.request("ping").addCallback(replies.append)
        pump.flush()
        self.assertEqual([r.ok for r in replies], [True, True])
        self.assertIsNone(trust.last_error)

    def test_burst(self):
        """Every request of a burst (over 30 000 bytes) is answered in order, and the burst gives
        the server's OpenSSL new memory BIOs (L{MeteredTLS}): the old ones grew to hold it. (Not told
        by their addresses: a BIO renewed twice may be where the first was.)"""
        client, _, pump = self.pair(cert_fingerprint(SERVER_IDENTITY.certificate))
        pump.flush()
        openssl = self.server_tls._tlsConnection
        handed, bio_write = [], openssl.bio_write
        openssl.bio_write = lambda data: (handed.append(len(data)), bio_write(data))[1]
        renewed, renew = [], protocol._renew_bio
        self.patch(protocol, "_renew_bio", lambda connection, name: (renewed.append(name), renew(connection, name)))
        replies = []
        client.request("hello", protocol=1).addCallback(replies.append)
        for _ in range(1500):
            client.request("ping").addCallback(replies.append)
        pump.flush()
        self.assertEqual([r.ok for r in replies], [True] * 1501)
        self.assertEqual([r.id for r in replies], sorted(r.id for r in replies))
        self.assertGreater(sum(handed), 30_000)
        self.assertIn("_into_ssl", renewed)
        self.assertIn("_from_ssl", renewed)

    def test_server_closes_cleanly(self):
        """A connection the server ends (here: a protocol version it does not speak) is closed
        over TLS at once, with a close_notify: not left open until CLOSE_TIMEOUT, then reset."""
        client, _, pump = self.pair(cert_fingerprint(SERVER_IDENTITY.certificate))
        pump.flush()
        replies = []
        client.request("hello", protocol=2).addCallback(replies.append)
        pump.flush()
        self.assertEqual([r.code for r in replies], ["unsupported_version"])
        self.assertTrue(client.lost.called)  # the pump never ran the clock to CLOSE_TIMEOUT

    def test_wrong_pin(self):
        """With a wrong pin the handshake fails and the client hears nothing from the server."""
        client, trust, pump = self.pair("0" * 64)
        pump.flush()
        self.assertEqual(list(client.events), [])
        self.assertTrue(client.lost.called)
        self.assertEqual(trust.last_error.seen, cert_fingerprint(SERVER_IDENTITY.certificate))


class _Echo(Protocol):
    """Echoes what it reads (but C{abort}, which aborts) and remembers it, and how its
    connection ended."""

    def connectionMade(self) -> None:
        self.received: list[bytes] = []
        self.reason = None

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        if data == b"abort":
            self.transport.abortConnection()
        else:
            self.transport.write(data)

    def connectionLost(self, reason) -> None:
        self.reason = reason.type


def _read_all(read) -> bytes:
    """What C{read} (a memory-BIO Connection's C{bio_read} or C{recv}) gives until OpenSSL wants more."""
    out = []
    while True:
        try:
            out.append(read(65536))
        except SSL.WantReadError:
            return b"".join(out)


def _bios(server: TLSMemoryBIOProtocol) -> tuple[int, int]:
    """The addresses of the memory BIOs (incoming, outgoing) a TLS layer's OpenSSL uses now."""
    connection = server._tlsConnection
    return int(SSL._ffi.cast("intptr_t", connection._into_ssl)), int(
        SSL._ffi.cast("intptr_t", connection._from_ssl)
    )


class MeteredTLSTests(SynchronousTestCase):
    """
    L{MeteredTLS} reads, answers and ends as Twisted's own layer does, without the exceptions
    that end Twisted's reads; so does it on L{DirectConnection}s (the server's whole TLS layer,
    L{DiscoveryTLSFactory}), and where pyOpenSSL's BIOs cannot be measured.
    """

    # "unmetered" goes last: the meter stays off until the end of the test.
    layers = ("twisted", "metered", "direct", "unmetered")

    # The TLS version the client offers at most; a test may hold it to TLS 1.2.
    client_max = None

    def connect(self, layer: str):
        """A server on C{layer} over a L{StringTransport}, and a pyOpenSSL client after the handshake."""
        if layer == "unmetered":
            self.patch(protocol, "_held", None)
        kind = DiscoveryTLSFactory if layer == "direct" else TLSMemoryBIOFactory
        factory = kind(
            server_certificate_options(SERVER_IDENTITY), False, Factory.forProtocol(_Echo), Clock()
        )
        if layer != "direct":
            factory.protocol = TLSMemoryBIOProtocol if layer == "twisted" else MeteredTLS
        server = factory.buildProtocol(None)
        transport = StringTransport()
        server.makeConnection(transport)
        self.first_bios = _bios(server)
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if self.client_max is not None:
            context.set_max_proto_version(self.client_max)
        client = SSL.Connection(context, None)
        client.set_connect_state()
        while True:
            try:
                client.do_handshake()
                done = True
            except SSL.WantReadError:
                done = False
            flight = _read_all(client.bio_read)
            if flight:  # a TLS 1.2 client has nothing to send once its handshake is done
                server.dataReceived(flight)
            if done:
                break
            client.bio_write(transport.value())
            transport.clear()
        return server, transport, client

    def echoed(self, transport: StringTransport, client: SSL.Connection) -> bytes:
        client.bio_write(transport.value())
        transport.clear()
        return _read_all(client.recv)

    def records(self, client: SSL.Connection, *payloads: bytes) -> bytes:
        """One TLS record per payload, as the client would send them."""
        for payload in payloads:
            client.send(payload)
        return _read_all(client.bio_read)

    def outcomes(self, scenario):
        """C{scenario(server, transport, client)} gives the same result on every layer."""
        results = {layer: scenario(*self.connect(layer)) for layer in self.layers}
        self.assertEqual(results["metered"], results["twisted"])
        self.assertEqual(results["direct"], results["twisted"])
        self.assertEqual(results["unmetered"], results["twisted"])
        return results["twisted"]

    def test_records_in_one_read(self):
        """Three records that arrive in one read are each read and answered."""

        def scenario(server, transport, client):
            server.dataReceived(self.records(client, b"one", b"two", b"three"))
            return server.wrappedProtocol.received, self.echoed(transport, client)

        self.assertEqual(self.outcomes(scenario), ([b"one", b"two", b"three"], b"onetwothree"))

    def test_record_in_pieces(self):
        """A record that arrives a byte at a time is read once it is whole."""

        def scenario(server, transport, client):
            record = self.records(client, b"pieces")
            seen = []
            for i in range(len(record)):
                server.dataReceived(record[i:i + 1])
                seen.append(len(server.wrappedProtocol.received))
            return seen, server.wrappedProtocol.received, self.echoed(transport, client)

        seen, received, echoed = self.outcomes(scenario)
        self.assertEqual(seen, [0] * (len(seen) - 1) + [1])
        self.assertEqual((received, echoed), ([b"pieces"], b"pieces"))

    def test_large_transfer(self):
        """40 000 bytes in three records, in one read or in reads of 2000 bytes, are read and
        echoed whole."""
        payload = bytes(range(256)) * 156 + b"end"

        def scenario(server, transport, client, piece):
            record = self.records(client, payload[:16384], payload[16384:32768], payload[32768:])
            for start in range(0, len(record), piece):
                server.dataReceived(record[start:start + piece])
            client.bio_write(transport.value())
            transport.clear()
            echoed = _read_all(client.recv)
            return b"".join(server.wrappedProtocol.received) == payload, echoed == payload

        for piece in (65536, 2000):
            self.assertEqual(self.outcomes(partial(scenario, piece=piece)), (True, True))

    def test_tls12(self):
        """With a TLS 1.2 client too: large transfers and a forged record."""
        self.client_max = SSL.TLS1_2_VERSION
        _, _, client = self.connect("direct")
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.2")
        self.test_large_transfer()
        self.test_forged_record()

    def test_new_bios_after_handshake(self):
        """The handshake's flights (over 1 KiB each way) leave the connection with new BIOs,
        and their buffers are gone with the old ones."""
        server, _, _ = self.connect("metered")
        now = _bios(server)
        self.assertNotEqual(now[0], self.first_bios[0])
        self.assertNotEqual(now[1], self.first_bios[1])

    def test_new_bios_after_large(self):
        """Small reads and writes keep the BIOs; a read of more than C{SHED_ABOVE} bytes gets a
        new incoming one, a write of more a new outgoing one."""
        server, transport, client = self.connect("metered")
        self.echoed(transport, client)  # the session tickets sent after the handshake
        before = _bios(server)
        server.dataReceived(self.records(client, b"x" * 100))
        self.assertEqual(self.echoed(transport, client), b"x" * 100)
        self.assertEqual(_bios(server), before)

        big = b"y" * (protocol.SHED_ABOVE + 1)
        server.dataReceived(self.records(client, big))
        self.assertEqual(self.echoed(transport, client), big)
        after = _bios(server)
        self.assertNotEqual(after[0], before[0])
        self.assertNotEqual(after[1], before[1])

        # And the new BIOs carry on.
        server.dataReceived(self.records(client, b"z"))
        self.assertEqual(self.echoed(transport, client), b"z")

    def test_close_notify(self):
        """The client's close_notify is answered with ours, and the connection ends cleanly."""

        def scenario(server, transport, client):
            app = server.wrappedProtocol
            self.echoed(transport, client)  # the session tickets sent after the handshake
            client.shutdown()
            server.dataReceived(_read_all(client.bio_read))
            client.bio_write(transport.value())
            answered = client.shutdown()  # true once the server's close_notify is read
            server.connectionLost(Failure(ConnectionDone()))
            return answered, transport.disconnecting, app.reason

        self.assertEqual(self.outcomes(scenario), (True, True, ConnectionDone))

    def test_forged_record(self):
        """A record that fails its integrity check ends the connection with OpenSSL's error, and
        nothing of it or after it is read."""

        def scenario(server, transport, client):
            app = server.wrappedProtocol
            record = bytearray(self.records(client, b"forged"))
            record[-1] ^= 1
            server.dataReceived(bytes(record) + self.records(client, b"after"))
            server.connectionLost(Failure(ConnectionDone()))
            return app.received, transport.disconnecting, app.reason

        self.assertEqual(self.outcomes(scenario), ([], True, SSL.Error))

    def test_aborted_while_reading(self):
        """Once the application aborts the connection, the records after are not handed to it."""

        def scenario(server, transport, client):
            server.dataReceived(self.records(client, b"abort", b"after"))
            return server.wrappedProtocol.received, transport.disconnecting

        self.assertEqual(self.outcomes(scenario), ([b"abort"], True))

    def test_lost_with_a_record_waiting(self):
        """A record still in OpenSSL's BIO when the connection drops is read, then the end of
        the stream without close_notify is reported as Twisted reports it."""

        def scenario(server, transport, client):
            app = server.wrappedProtocol
            server._tlsConnection.bio_write(self.records(client, b"late"))
            server.connectionLost(Failure(ConnectionDone()))
            return app.received, app.reason

        received, reason = self.outcomes(scenario)
        self.assertEqual(received, [b"late"])
        self.assertNotEqual(reason, ConnectionDone)

    def test_no_want_read(self):
        """Reading a record and sending its answer raises no C{WantReadError} in OpenSSL; Twisted's
        layer raises two."""

        def raised(layer: str) -> int:
            server, transport, client = self.connect(layer)
            openssl = server._tlsConnection
            count = [0]

            def counting(method):
                def call(*args):
                    try:
                        return method(*args)
                    except SSL.WantReadError:
                        count[0] += 1
                        raise

                return call

            openssl.recv, openssl.bio_read = counting(openssl.recv), counting(openssl.bio_read)
            server.dataReceived(self.records(client, b"ping"))
            self.assertEqual(self.echoed(transport, client), b"ping")
            return count[0]

        self.assertEqual(raised("twisted"), 2)
        self.assertEqual(raised("metered"), 0)
        self.assertEqual(raised("direct"), 0)
        self.assertEqual(raised("unmetered"), 2)

    def test_meter(self):
        """The meter works on the pyOpenSSL installed here (else the server reads as Twisted does)."""
        self.assertIsNotNone(protocol._held)

    def test_meter_unavailable(self):
        """A pyOpenSSL whose Connections have no memory BIOs where the meter looks: no meter, and
        the log says so."""

        class Elsewhere(SSL.Connection):
            def __init__(self, context, socket) -> None:
                super().__init__(context, socket)
                self._bios = (self._into_ssl, self._from_ssl)
                del self._into_ssl, self._from_ssl

        self.patch(SSL, "Connection", Elsewhere)
        with capturedLogs() as events:
            self.assertEqual(protocol._bio_access(), (None, None))
        self.assertIn("cannot be used", events[0]["log_format"])
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_meter_wrong(self):
        """A pyOpenSSL whose Connections do not write into the BIO the meter looks at: no meter,
        and the log says so."""

        class Elsewhere(SSL.Connection):
            def bio_write(self, buf) -> int:
                return len(buf)

        self.patch(SSL, "Connection", Elsewhere)
        with capturedLogs() as events:
            self.assertEqual(protocol._bio_access(), (None, None))
        self.assertIn("do not work as expected", events[0]["log_format"])


class DirectConnectionTests(SynchronousTestCase):
    """L{DirectConnection} answers every call as pyOpenSSL's Connection does."""

    def pair(self):
        """A handshaken L{DirectConnection} (the server's) and a pyOpenSSL client."""
        server = DirectConnection(server_certificate_options(SERVER_IDENTITY).getContext(), None)
        server.set_accept_state()
        client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
        client.set_connect_state()
        for _ in range(4):
            for side, other in ((client, server), (server, client)):
                try:
                    side.do_handshake()
                except SSL.WantReadError:
                    pass
                flight = _read_all(side.bio_read)
                if flight:
                    other.bio_write(flight)
        _read_all(client.recv)  # the session tickets
        return server, client

    def test_direct(self):
        """The server's TLS factory makes L{DirectConnection}s; the meter and pyOpenSSL allow it."""
        self.assertTrue(protocol._direct)
        factory = DiscoveryTLSFactory(
            server_certificate_options(SERVER_IDENTITY), False, Factory.forProtocol(_Echo), Clock()
        )
        server = factory.buildProtocol(None)
        server.makeConnection(StringTransport())
        self.assertIsInstance(server._tlsConnection, DirectConnection)

    def test_not_direct(self):
        """Where pyOpenSSL lacks what L{DirectConnection} uses, the factory makes its Connections."""
        self.patch(protocol, "_direct", False)
        connection = DirectConnections(server_certificate_options(SERVER_IDENTITY))
        self.assertIs(type(connection.serverConnectionForTLS(None)), SSL.Connection)

    def test_client_side(self):
        """L{DiscoveryTLSFactory} is the server's side only."""
        with self.assertRaises(ValueError):
            DiscoveryTLSFactory(
                server_certificate_options(SERVER_IDENTITY), True, Factory.forProtocol(_Echo)
            )

    def test_round_trip(self):
        """Bytes, memoryviews and bytearrays go both ways; reads and writes of every size."""
        server, client = self.pair()
        client.send(b"hello")
        self.assertEqual(server.bio_write(memoryview(_read_all(client.bio_read))), 5 + 22)
        self.assertEqual(server.recv(2), b"he")
        self.assertEqual(server.recv(100000), b"llo")  # larger than its buffer
        self.assertEqual(server.send(bytearray(b"abc")), 3)
        client.bio_write(server.bio_read(100000))
        self.assertEqual(server.send(b"defg"), 4)
        client.bio_write(server.bio_read(32768))
        self.assertEqual(_read_all(client.recv), b"abcdefg")

    def test_empty(self):
        """Reading with nothing there raises C{WantReadError}, as pyOpenSSL does."""
        server, _ = self.pair()
        with self.assertRaises(SSL.WantReadError):
            server.recv(1024)
        with self.assertRaises(SSL.WantReadError):
            server.bio_read(1024)

    def test_peek(self):
        """C{MSG_PEEK} leaves the bytes to read again."""
        server, client = self.pair()
        client.send(b"peek")
        server.bio_write(_read_all(client.bio_read))
        self.assertEqual(server.recv(100, socket.MSG_PEEK), b"peek")
        self.assertEqual(server.recv(100), b"peek")

    def test_forged(self):
        """A record that fails its check raises OpenSSL's error, as pyOpenSSL does."""
        server, client = self.pair()
        client.send(b"forged")
        record = bytearray(_read_all(client.bio_read))
        record[-1] ^= 1
        server.bio_write(bytes(record))
        with self.assertRaises(SSL.Error):
            server.recv(1024)

    def test_callback_problem(self):
        """An exception a callback of the Context left behind is raised after the next read or
        write that succeeds, as pyOpenSSL does, and only once."""
        server, client = self.pair()
        problems = server._callback_problems[0]
        problems.append(ZeroDivisionError("left by a callback"))
        client.send(b"x")
        server.bio_write(_read_all(client.bio_read))
        with self.assertRaises(ZeroDivisionError):
            server.recv(1024)
        problems.append(KeyError("again"))
        with self.assertRaises(KeyError):
            server.send(b"y")
        self.assertEqual(server.send(b"z"), 1)


class _Grab(Protocol):
    def __init__(self, made: defer.Deferred, lost: defer.Deferred | None = None) -> None:
        self.made, self.lost = made, lost

    def connectionMade(self) -> None:
        self.made.callback(self.transport)

    def connectionLost(self, reason) -> None:
        if self.lost is not None:
            self.lost.callback(reason.value)


class _Collect(Protocol):
    def __init__(self, size: int) -> None:
        self.size, self.chunks, self.got, self.done = size, [], 0, defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.got += len(data)
        if self.got >= self.size and not self.done.called:
            self.done.callback(b"".join(self.chunks))


class PromptServerTests(TestCase):
    """L{PromptServer} on a real loopback port of the reactor."""

    def listen(self, lost: defer.Deferred | None = None):
        made = defer.Deferred()
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: _Grab(made, lost)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        serve_promptly(port)
        return port.getHost().port, made

    async def server_side(self, made: defer.Deferred):
        transport = await with_timeout(made, what="accept")
        self.addCleanup(lambda: transport.abortConnection() if transport.connected else None)
        self.assertIsInstance(transport, PromptServer)
        return transport

    async def test_sent_at_once(self):
        """A write reaches the peer with no pass of the reactor in between: the client reads it
        with the reactor blocked in that very read."""
        port, made = self.listen()
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(client.close)
        transport = await self.server_side(made)
        transport.write(b"hello\n")
        self.assertEqual(client.recv(100), b"hello\n")

    async def test_order_kept(self):
        """What the kernel does not take at once is queued, and later writes go behind it."""
        port, made = self.listen()
        size = 64 * 1024
        chunks = [b"%08d" % i * (size // 8) for i in range(128)]  # 8 MiB: far more than socket buffers
        collect = _Collect(len(chunks) * size)
        connector = reactor.connectTCP("127.0.0.1", port, ClientFactory.forProtocol(lambda: collect))
        self.addCleanup(connector.disconnect)
        transport = await self.server_side(made)
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        for chunk in chunks:
            transport.write(chunk)
        self.assertTrue(transport.dataBuffer or transport._tempDataBuffer)  # some of it had to wait
        received = await with_timeout(collect.done, what="all data")
        self.assertEqual(received, b"".join(chunks))

    async def test_peer_gone(self):
        """A write to a peer that reset the connection does not raise; the connection is lost the
        usual way."""
        lost = defer.Deferred()
        port, made = self.listen(lost)
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        transport = await self.server_side(made)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # with a zero linger: a reset
        for _ in range(3):
            transport.write(b"x" * 1000)
        await with_timeout(lost, what="connection lost")

    async def test_own_tls(self):
        """A port that brings its own TLS (C{listenSSL}, as an C{ssl:} description makes) gets our
        TLS layer as well (L{MeteredTLS}) over a L{PromptServer}."""
        made = defer.Deferred()
        port = reactor.listenSSL(0, Factory.forProtocol(lambda: _Grab(made)),
                                 server_certificate_options(SERVER_IDENTITY), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        serve_promptly(port)
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, CertificateOptions(verify=False))
        collect = _Collect(5)
        client = await with_timeout(connectProtocol(endpoint, collect), what="connect")
        self.addCleanup(client.transport.abortConnection)
        server = await with_timeout(made, what="accept")
        self.assertIsInstance(server, MeteredTLS)
        self.assertIsInstance(server.transport, PromptServer)
        server.write(b"hello")
        self.assertEqual(await with_timeout(collect.done, what="hello"), b"hello")
