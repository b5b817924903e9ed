"""The discovery server's wire end on in-memory transports: plain, and real TLS in memory."""

from __future__ import annotations

from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from p2pchat.crypto import cert_fingerprint, generate_identity
from p2pchat.discovery.directory import Directory, Limits
from p2pchat.discovery.protocol import DiscoveryFactory
from p2pchat.tls import ServerTrust, server_certificate_options
from p2pchat.wire import Event, decode_frame

from .support import LineClient

SERVER_IDENTITY = generate_identity("test discovery server")


def directory(**limits) -> Directory:
    # hello, ping and errors touch neither the store nor the hasher
    return Directory(store=None, clock=Clock(), limits=Limits(**limits), hasher=None)


def frames(transport: StringTransport):
    return [decode_frame(line) for line in transport.value().splitlines()]


class PlainProtocolTests(SynchronousTestCase):
    def connect(self, **limits):
        proto = DiscoveryFactory(directory(**limits), Clock()).buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_hello_on_connect(self):
        """The hello event is the first thing written."""
        _, transport = self.connect()
        hello = frames(transport)[0]
        self.assertEqual((hello.name, hello.fields["protocol"]), ("hello", 1))

    def test_line_limit(self):
        """A line over max_line gets line_too_long and the connection closes."""
        proto, transport = self.connect(max_line=1024)
        proto.dataReceived(b"x" * 1025)
        self.assertEqual(frames(transport)[-1].code, "line_too_long")
        self.assertTrue(transport.disconnecting)

    def test_line_at_limit(self):
        """A line of exactly max_line bytes is read (and here refused as bad JSON, not as too long)."""
        proto, transport = self.connect(max_line=1024)
        proto.dataReceived(b"x" * 1024 + b"\n")
        self.assertEqual(frames(transport)[-1].code, "bad_json")
        self.assertFalse(transport.disconnecting)

    def test_slow_consumer(self):
        """A peer that stops reading is cut off once more than max_queued_bytes pile up; what
        is written after that is dropped, and the cut is logged once."""
        proto, transport = self.connect(max_queued_bytes=100_000)
        proto.pauseProducing()  # what the transport does when its buffer is full
        for _ in range(90):
            proto.write(b"x" * 1000 + b"\n")
        self.assertFalse(transport.disconnecting)
        proto.resumeProducing()
        proto.pauseProducing()
        before = len(transport.value())
        with capturedLogs() as events:
            for _ in range(200):
                proto.write(b"x" * 1000 + b"\n")
        self.assertTrue(transport.disconnected)
        self.assertEqual(len(transport.value()) - before, 99 * 1001)
        self.assertEqual(len([e for e in events if "cutting off" in e["log_format"]]), 1)

    def test_one_reply_per_line(self):
        """Each garbage line gets exactly one error reply, with the request id when readable."""
        proto, transport = self.connect()
        proto.dataReceived(b'{"id":"a","op":"hello","protocol":1}\n{"id":"b","op":"who"}\n\xff\nnope\r\n')
        replies = [f for f in frames(transport) if not isinstance(f, Event)]
        self.assertEqual([(r.id, r.code) for r in replies],
                         [("a", None), ("b", "not_authenticated"), (None, "bad_utf8"), (None, "bad_json")])


class TLSInMemoryTests(SynchronousTestCase):
    def pair(self, pinned: str):
        clock = Clock()  # the TLS layer flushes its writes on this clock; the pump advances it
        server_factory = TLSMemoryBIOFactory(
            server_certificate_options(SERVER_IDENTITY), False, DiscoveryFactory(directory(), clock), clock
        )
        trust = ServerTrust("localhost", pinned=pinned)
        app = LineClient()
        client_factory = TLSMemoryBIOFactory(trust.creator(), True, Factory.forProtocol(lambda: app), clock)
        client, server, pump = connectedServerAndClient(
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

    def test_wrong_pin(self):
        """With a wrong pin the handshake fails and the client hears nothing from the server."""
        client, trust, pump = self.pair("0" * 64)
        pump.flush()
        self.assertEqual(list(client.events), [])
        self.assertTrue(client.lost.called)
        self.assertEqual(trust.last_error.seen, cert_fingerprint(SERVER_IDENTITY.certificate))
