"""Tests for p2pchat.peer.server_link: requests and replies, hello, pings, reconnection, pinning."""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest

from p2pchat import crypto
from p2pchat.peer.server_link import (
    PACE_MARGIN,
    KnownServers,
    NotConnected,
    RequestError,
    ServerLink,
    UnusablePins,
)
from p2pchat.tls import ServerTrust, server_certificate_options
from p2pchat.wire import Event

HELLO = {"event": "hello", "protocol": 1, "server": "p2pdiscovery", "max_line": 65536,
         "keepalive_interval": 15, "keepalive_timeout": 45, "idle_timeout": 0}


class MemoryEndpoint:
    """Connects to a StringTransport, or fails, as the test decides."""

    def __init__(self) -> None:
        self.refuse = False
        self.attempts = 0
        self.protocol: Any = None
        self.transport: StringTransport | None = None

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempts += 1
        if self.refuse:
            return fail(ConnectionRefusedError("refused"))
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)

    def lose(self, reason: Failure | None = None) -> None:
        self.protocol.connectionLost(reason or Failure(ConnectionDone()))


class Handler:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.login: Deferred[None] | None = None

    def server_connected(self) -> Deferred[None]:
        self.calls.append(("connected", None))
        return self.login or succeed(None)

    def server_lost(self) -> None:
        self.calls.append(("lost", None))

    def server_unreachable(self, reason: str) -> None:
        self.calls.append(("unreachable", reason))

    def server_refused(self, message: str) -> None:
        self.calls.append(("refused", message))

    def server_event(self, event: Event) -> None:
        self.calls.append(("event", event))


class ServerLinkTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = MemoryEndpoint()
        self.handler = Handler()
        self.link = ServerLink(self.endpoint, self.clock, self.handler, request_timeout=10.0, retry_policy=lambda n: 2.0 * n)
        self.addCleanup(self.link.stop)

    def sent(self) -> list[dict[str, Any]]:
        assert self.endpoint.transport is not None
        lines = self.endpoint.transport.value().splitlines()
        self.endpoint.transport.clear()
        return [json.loads(line) for line in lines]

    def receive(self, *frames: dict[str, Any]) -> None:
        for frame in frames:
            self.endpoint.protocol.dataReceived(json.dumps(frame).encode() + b"\n")

    def connect(self, **hello: Any) -> None:
        self.link.start()
        self.receive({**HELLO, **hello})
        [hello] = self.sent()
        self.assertEqual(hello, {"id": 1, "op": "hello", "protocol": 1})
        self.receive({"id": 1, "ok": True, "result": {"protocol": 1}})

    def test_hello_then_login(self) -> None:
        """The link answers the server's hello with its own, and only then asks the handler to log in."""
        self.link.start()
        self.assertEqual(self.handler.calls, [])
        self.failureResultOf(self.link.request("who"), NotConnected)
        self.receive(HELLO)
        self.assertEqual(self.handler.calls, [])
        self.receive({"id": 1, "ok": True, "result": {"protocol": 1}})
        self.assertEqual(self.handler.calls, [("connected", None)])

    def reconnect(self, **hello: Any) -> None:
        """The connection drops; the next one (after the retry delay) says C{hello}."""
        self.endpoint.lose()
        self.clock.advance(2.0)
        self.receive({**HELLO, **hello}, {"id": 1, "ok": True, "result": {"protocol": 1}})
        self.sent()

    def ask(self, op: str, **args: Any) -> None:
        """A request whose reply does not matter (it fails as not connected once the test drops the connection)."""
        self.link.request(op, **args).addErrback(lambda f: f.trap(NotConnected))

    def test_paced_by_the_servers_rate(self) -> None:
        """Requests the server's rate limit counts go out within the rate and burst its hello
        announces, in order, each in its turn; others go at once; a new connection starts afresh."""
        self.connect(message_rate=4, message_burst=3)
        for i in range(5):
            self.ask("send", to="bob", msg_id=str(i), envelope="e")
        self.ask("lookup", user="bob")
        self.assertEqual([(f["op"], f.get("msg_id")) for f in self.sent()],
                         [("send", "0"), ("send", "1"), ("send", "2"), ("lookup", None)])
        self.clock.advance(0.25)
        self.assertEqual(self.sent(), [])  # a margin after its time: the server may have got the first one late
        self.clock.advance(PACE_MARGIN + 0.001)
        self.assertEqual([f["msg_id"] for f in self.sent()], ["3"])
        self.ask("who")
        self.clock.advance(0.25)
        self.assertEqual([f.get("msg_id") for f in self.sent()], ["4"])
        self.clock.advance(0.25)
        self.assertEqual([f["op"] for f in self.sent()], ["who"])
        self.reconnect(message_rate=4, message_burst=3)
        for i in range(3):
            self.ask("send", to="bob", msg_id=f"again{i}", envelope="e")
        self.assertEqual(len(self.sent()), 3)

    def test_waiting_request_after_the_connection_is_lost(self) -> None:
        """A request waiting for its turn when the connection goes fails as not connected."""
        self.connect(message_rate=1, message_burst=1)
        first = self.link.request("who")
        waiting = self.link.request("who")
        self.endpoint.lose()
        self.failureResultOf(first, NotConnected)
        self.clock.advance(1 + PACE_MARGIN)
        self.failureResultOf(waiting, NotConnected)

    def test_no_pace_without_a_usable_rate(self) -> None:
        """A hello without a rate, or with one that is not a positive finite number, paces nothing."""
        self.connect()
        cases = [{}, {"message_rate": 0, "message_burst": 10}, {"message_rate": -1, "message_burst": 10},
                 {"message_rate": "10", "message_burst": 10}, {"message_rate": True, "message_burst": 10},
                 {"message_rate": 10, "message_burst": 0}, {"message_rate": 10, "message_burst": "x"},
                 {"message_rate": 10}]
        for hello in cases:
            self.reconnect(**hello)
            for i in range(20):
                self.ask("send", to="bob", msg_id=str(i), envelope="e")
            self.assertEqual(len(self.sent()), 20, hello)
        self.reconnect(message_rate=1e300, message_burst=1e300)  # the largest a JSON number gets here
        for i in range(20):
            self.ask("send", to="bob", msg_id=str(i), envelope="e")
        self.assertEqual(len(self.sent()), 20)

    def test_replies_matched_by_id(self) -> None:
        """Each request's Deferred gets its own reply; errors carry the stable code and the sentence."""
        self.connect()
        who = self.link.request("who")
        lookup = self.link.request("lookup", user="zed")
        self.assertEqual(self.sent(), [{"id": 2, "op": "who"}, {"id": 3, "op": "lookup", "user": "zed"}])
        self.receive({"id": 3, "ok": False, "error": {"code": "unknown_user", "message": "no zed"}},
                     {"id": 2, "ok": True, "result": {"users": ["bob"]}})
        self.assertEqual(self.successResultOf(who), {"users": ["bob"]})
        error = self.failureResultOf(lookup, RequestError).value
        self.assertEqual((error.code, error.message), ("unknown_user", "no zed"))

    def test_lists_as_long_as_a_big_server_makes_them(self) -> None:
        """A reply listing 20 000 users with long names (700 KB on one line) is taken, not cut off."""
        self.connect()
        who = self.link.request("who")
        self.sent()
        users = [f"{'u' * 27}{i:05d}" for i in range(20000)]
        self.receive({"id": 2, "ok": True, "result": {"users": users}})
        self.assertEqual(self.successResultOf(who), {"users": users})
        self.assertFalse(self.endpoint.transport.disconnecting)

    def test_events_after_hello_go_to_handler(self) -> None:
        """Events reach the handler; garbage and stray replies are ignored without dropping the connection."""
        self.connect()
        self.endpoint.protocol.dataReceived(b"not json\n\xff\xfe\n[1,2]\n")
        self.receive({"id": 99, "ok": True, "result": {}}, {"event": "presence", "user": "bob", "status": "online"})
        self.assertEqual(self.handler.calls[-1], ("event", Event("presence", {"user": "bob", "status": "online"})))
        self.assertFalse(self.endpoint.transport.disconnecting)

    def test_reconnect(self) -> None:
        """The handler can have the connection dropped: the next one follows after the retry delay."""
        self.link.reconnect()  # not connected: nothing to drop
        self.connect()
        self.link.reconnect()
        self.assertTrue(self.endpoint.transport.disconnecting)
        self.endpoint.lose()
        self.clock.advance(2.0)
        self.assertEqual(self.endpoint.attempts, 2)

    def test_events_before_the_session_ignored(self) -> None:
        """Events from a server whose hello exchange is not done are not passed on; a second hello
        later is an event like any other."""
        self.link.start()
        self.receive(HELLO, {"event": "presence", "online": ["bob"], "offline": {}})
        self.receive({"id": 1, "ok": True, "result": {"protocol": 1}}, HELLO)
        again = Event("hello", {k: v for k, v in HELLO.items() if k != "event"})
        self.assertEqual(self.handler.calls, [("connected", None), ("event", again)])
        self.assertFalse(self.endpoint.transport.disconnecting)

    def test_line_too_long_drops_connection(self) -> None:
        """A line from the server longer than any it may send drops the connection (to reconnect)."""
        self.connect()
        self.endpoint.protocol.dataReceived(b"x" * (self.endpoint.protocol.MAX_LENGTH + 1))
        self.assertTrue(self.endpoint.transport.disconnecting)

    def test_failed_login_drops_connection(self) -> None:
        """A login that fails for any other reason than a lost connection drops the connection, so
        the next one tries again from the start."""
        self.handler.login = fail(RuntimeError("the history file is gone"))
        self.connect()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.endpoint.transport.disconnecting)

    def test_key_signatures_from_hello(self) -> None:
        """Whether the server hands out envelope key signatures is its hello's to say."""
        self.connect()
        self.assertFalse(self.link.key_signatures)
        self.reconnect(key_signatures=True)
        self.assertTrue(self.link.key_signatures)

    def test_request_over_the_servers_line_refused_locally(self) -> None:
        """A request longer than the max_line the server's hello told is not sent (the server would
        answer line_too_long and close, and the same request would come again after reconnecting)."""
        self.connect(max_line=1100)
        error = self.failureResultOf(self.link.request("send", to="bob", msg_id="m1", envelope="x" * 1100), RequestError)
        self.assertEqual((error.value.code, error.value.message),
                         ("line_too_long", "too long for the server, which takes at most 1100 bytes a line"))
        self.assertEqual(self.sent(), [])
        self.link.request("send", to="bob", msg_id="m1", envelope="x" * 1000)
        self.assertEqual(len(self.sent()), 1)

    def test_unencodable_request_refused_locally(self) -> None:
        """A request too big for a line fails at once and nothing is sent."""
        self.connect()
        self.failureResultOf(self.link.request("broadcast", text="x" * 70000), RequestError)
        self.assertEqual(self.sent(), [])

    def test_pings_keep_alive(self) -> None:
        """A ping goes out every keepalive_interval; one unanswered for keepalive_timeout drops the connection."""
        self.connect()
        self.clock.advance(15)
        [ping] = self.sent()
        self.assertEqual(ping["op"], "ping")
        self.receive({"id": ping["id"], "ok": True, "result": {"time": 1}})
        self.clock.advance(15)
        self.assertEqual(self.sent()[0]["op"], "ping")
        self.clock.advance(44)
        self.assertFalse(self.endpoint.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.endpoint.transport.disconnecting)

    def test_pings_stop_with_the_connection(self) -> None:
        """A lost connection pings no more."""
        self.connect()
        old = self.endpoint.transport
        self.endpoint.lose()
        self.clock.advance(15)
        self.assertEqual(old.value(), b"")

    def test_request_timeout_drops_connection(self) -> None:
        """An unanswered request fails with NotConnected after the timeout and the connection is dropped."""
        self.connect()
        who = self.link.request("who")
        self.clock.advance(10)
        self.failureResultOf(who, NotConnected)
        self.assertTrue(self.endpoint.transport.disconnecting)

    def test_lost_connection_fails_requests_and_reconnects(self) -> None:
        """Losing the connection fails what was waiting, tells the handler, and reconnects after a delay."""
        self.connect()
        who = self.link.request("who")
        self.endpoint.lose()
        self.failureResultOf(who, NotConnected)
        self.assertEqual(self.handler.calls[-1], ("lost", None))
        self.failureResultOf(self.link.request("who"), NotConnected)
        self.clock.advance(2)
        self.assertEqual(self.endpoint.attempts, 2)
        self.receive(HELLO)
        self.assertEqual(self.sent()[0]["op"], "hello")

    def test_request_while_the_loss_is_told(self) -> None:
        """A request made by what a failed request's errback runs (a logout waiting for the outbox)
        fails at once: it is not written to the dead connection to wait for its timeout."""
        self.connect()
        later: list[Deferred[dict[str, Any]]] = []
        self.link.request("who").addErrback(lambda f: later.append(self.link.request("logout")))
        self.endpoint.lose()
        self.failureResultOf(later[0], NotConnected)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 2.0)  # only the reconnection waits

    def test_unreachable_reported_once_then_retried(self) -> None:
        """A server that cannot be reached is reported once per outage; retries back off until it answers."""
        self.endpoint.refuse = True
        self.link.start()
        self.clock.advance(2)
        self.clock.advance(4)
        self.assertEqual([c for c, _ in self.handler.calls], ["unreachable"])
        self.assertEqual(self.endpoint.attempts, 3)
        self.endpoint.refuse = False
        self.clock.advance(6)
        self.receive(HELLO, {"id": 1, "ok": True, "result": {"protocol": 1}})
        self.assertEqual(self.handler.calls[-1], ("connected", None))
        self.endpoint.lose()
        self.endpoint.refuse = True
        self.clock.advance(2)
        self.assertEqual([c for c, _ in self.handler.calls], ["unreachable", "connected", "lost", "unreachable"])

    def test_turned_away_before_hello(self) -> None:
        """A server that says bye instead of hello (too many connections from this address) has
        its reason reported as the outage's, rather than a closed connection."""
        self.link.start()
        message = "10.0.0.9 has 1000 connections to this server already; try again later"
        self.receive({"event": "bye", "reason": "too_many_connections", "message": message})
        self.endpoint.lose()
        self.assertEqual(self.handler.calls, [("unreachable", message)])

    def test_no_hello_no_session(self) -> None:
        """A server that never says hello is dropped after the timeout."""
        self.link.start()
        self.clock.advance(10)
        self.assertTrue(self.endpoint.transport.disconnecting)

    def test_stop(self) -> None:
        """stop() closes the connection and nothing reconnects."""
        self.connect()
        stopped = self.link.stop()
        self.assertTrue(self.endpoint.transport.disconnecting)
        self.endpoint.lose()
        self.successResultOf(stopped)
        self.clock.advance(100)
        self.assertEqual(self.endpoint.attempts, 1)


class KnownServersTests(unittest.SynchronousTestCase):
    def test_pin_and_get(self) -> None:
        """Pins are kept per host:port in a file only the owner can read."""
        path = self.mktemp()
        known = KnownServers(path)
        self.assertIsNone(known.get("h:1"))
        known.pin("h:1", "a" * 64)
        known.pin("h:2", "b" * 64)
        self.assertEqual((known.get("h:1"), known.get("h:2"), known.get("h:3")), ("a" * 64, "b" * 64, None))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path, "a") as f:
            f.write("h:3 not-a-fingerprint\nh:3\n\n")  # damaged lines pin nothing...
        self.assertRaises(UnusablePins, known.get, "h:3")  # ...and trust nothing on first use either
        known.pin("h:3", "c" * 64)  # a sound line for the server, kept beside them, is the pin
        self.assertEqual(known.get("h:3"), "c" * 64)


class HelloServer(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(json.dumps(HELLO).encode() + b"\n")


class PinnedServerTests(unittest.TestCase):
    """Real TLS on loopback: the server link reports a certificate other than the pinned one."""

    async def test_wrong_server_certificate_refused(self) -> None:
        """A server presenting another certificate than the pinned one is refused, with both fingerprints."""
        server_identity = crypto.generate_identity("server")
        factory = TLSMemoryBIOFactory(server_certificate_options(server_identity), False, Factory.forProtocol(HelloServer))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        trust = ServerTrust("127.0.0.1", pinned="0" * 64)
        endpoint = wrapClientTLS(trust.creator(), TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        handler = Handler()
        refused: Deferred[None] = Deferred()
        handler.server_refused = lambda message: refused.callback(message)  # type: ignore[method-assign]
        link = ServerLink(endpoint, reactor, handler)
        link.start()
        self.addCleanup(link.stop)
        message = await refused.addTimeout(10, reactor)
        self.assertIn("0" * 64, message)
        self.assertIn(crypto.cert_fingerprint(server_identity.certificate), message)
        self.assertNotIn(("connected", None), handler.calls)
