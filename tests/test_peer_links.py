"""Tests for p2pchat.peer.links: direct links over real TLS 1.3, in memory and on loopback."""

from __future__ import annotations

import json
import shutil
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest

from p2pchat import crypto
from p2pchat.peer.links import (
    HANDSHAKE_TIMEOUT,
    MAX_PENDING_FRAMES,
    MAX_UNVERIFIED,
    Link,
    Links,
)

from .support import TIMEOUT, subprocess_env, with_timeout

# Run in a network namespace of its own (only its loopback exists there): a peer listening on every
# address, as it does by default, is then reached over IPv4 and IPv6 loopback and nothing else.
_EVERY_ADDRESS = """
import socket, subprocess, sys
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from p2pchat import crypto
from p2pchat.peer.links import Links

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["sysctl", "-q", "-w", "net.ipv6.bindv6only=" + sys.argv[1]], check=True)

class Handler:
    def refuse_fingerprint(self, fingerprint):
        return True

async def main():
    links = Links(reactor, crypto.generate_identity("bob"), "bob", Handler())
    port = await links.listen()
    reached = [host for host in ("127.0.0.1", "::1") if socket.create_connection((host, port), 5).close() is None]
    print(" ".join(reached), "on", len(links._listening), "sockets")
    await links.stop_listening()

reactor.callWhenRunning(lambda: ensureDeferred(main()).addErrback(print).addBoth(lambda _: reactor.stop()))
reactor.run()
"""


class Peer:
    """One side: a user's identity, its links and what its handler saw."""

    def __init__(self, name: str, clock: Any, directory: dict[str, str]) -> None:
        self.name = name
        self.identity = crypto.generate_identity(name)
        self.fingerprint = self.identity.fingerprint
        directory[name] = self.fingerprint
        self.directory = directory
        self.refused: set[str] = set()
        self.verified: list[tuple[str, str | None]] = []
        self.up: list[Link] = []
        self.frames: list[tuple[str, dict[str, Any]]] = []
        self.down: list[str] = []
        self.handling: list[Deferred[None]] = []  # what link_frame returns next (else: handled at once)
        self.links = Links(clock, self.identity, name, self)

    # the handler interface
    def refuse_fingerprint(self, fingerprint: str) -> bool:
        return fingerprint in self.refused

    def verify_peer(self, user: str, fingerprint: str | None) -> Deferred[bool]:
        self.verified.append((user, fingerprint))
        return succeed(self.directory.get(user) == fingerprint)

    def link_up(self, link: Link) -> None:
        self.up.append(link)

    def link_frame(self, link: Link, frame: dict[str, Any]) -> Deferred[None]:
        self.frames.append((link.user, frame))
        return self.handling.pop(0) if self.handling else succeed(None)

    def link_down(self, link: Link) -> None:
        self.down.append(link.user)


class InMemoryTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.directory: dict[str, str] = {}
        self.alice = Peer("alice", self.clock, self.directory)
        self.bob = Peer("bob", self.clock, self.directory)
        self.mallory = Peer("mallory", self.clock, {})

    def connect(
        self, client: Peer, server: Peer, user: str, fingerprint: str, *early: dict[str, Any]
    ) -> tuple[Any, Any, iosim.IOPump]:
        """C{client} dials C{server}'s listener expecting C{user} with C{fingerprint}, and at once
        writes the C{early} frames after its hello."""
        client_tls = client.links.connecting_factory(user, fingerprint).buildProtocol(None)
        server_tls = server.links.listening_factory().buildProtocol(None)
        pump = iosim.connect(
            server_tls, iosim.makeFakeServer(server_tls), client_tls, iosim.makeFakeClient(client_tls),
            greet=False, clock=self.clock,
        )
        link = client_tls.wrappedProtocol
        for frame in early:
            link._write(frame)
        opened = link.when_open()
        pump.flush()
        return opened, link, pump

    def test_right_keys_both_ways(self) -> None:
        """With the expected keys both sides open the link, know who is at the other end, and exchange frames."""
        opened, link, pump = self.connect(self.alice, self.bob, "bob", self.bob.fingerprint)
        self.assertIs(self.successResultOf(opened), link)
        self.assertEqual(self.bob.verified, [("alice", self.alice.fingerprint)])
        self.assertEqual([l.user for l in self.alice.up], ["bob"])
        self.assertEqual([l.user for l in self.bob.up], ["alice"])
        self.assertIs(self.alice.links.get("bob"), link)
        link.send({"type": "msg", "text": "hi"})
        self.bob.links.get("alice").send({"type": "ack"})
        pump.flush()
        self.assertEqual(self.bob.frames, [("alice", {"type": "msg", "text": "hi"})])
        self.assertEqual(self.alice.frames, [("bob", {"type": "ack"})])
        self.alice.links.close("bob")
        self.assertIsNone(self.alice.links.get("bob"))  # at once, not when TLS has finished closing
        pump.flush()
        self.assertEqual((self.alice.down, self.bob.down), (["bob"], ["alice"]))
        self.assertIsNone(self.bob.links.get("alice"))

    def test_not_read_while_many_frames_are_handled(self) -> None:
        """A link whose frames wait to be handled (stored) stops being read at MAX_PENDING_FRAMES of
        them, and is read again as soon as fewer wait: a contact writing at line speed cannot make
        the peer hold everything it wrote in memory."""
        opened, link, pump = self.connect(self.alice, self.bob, "bob", self.bob.fingerprint)
        self.successResultOf(opened)
        at_bob = self.bob.links.get("alice")
        calls: list[str] = []
        tcp = at_bob.transport.transport  # under TLS
        tcp.pauseProducing, tcp.resumeProducing = (lambda: calls.append("pause")), (lambda: calls.append("resume"))
        self.bob.handling = [Deferred() for _ in range(MAX_PENDING_FRAMES + 1)]
        waiting = list(self.bob.handling)
        for n in range(MAX_PENDING_FRAMES - 1):
            link.send({"type": "msg", "n": n})
        pump.flush()
        self.assertEqual(calls, [])
        link.send({"type": "msg", "n": "last"})
        link.send({"type": "msg", "n": "past it"})  # already read: handed on all the same
        pump.flush()
        self.assertEqual(calls, ["pause"])
        self.assertEqual(len(self.bob.frames), MAX_PENDING_FRAMES + 1)
        waiting[0].callback(None)
        self.assertEqual(calls, ["pause"])
        waiting[1].callback(None)
        self.assertEqual(calls, ["pause", "resume"])
        for d in waiting[2:]:
            d.callback(None)
        self.assertEqual(calls, ["pause", "resume"])

    def test_unverified_connections_bounded(self) -> None:
        """At most MAX_UNVERIFIED incoming connections wait for their handshake and hello: past it a
        new one is closed at once, before any TLS work; one that is verified, or gone, makes room."""

        def incoming() -> Any:
            tls = self.bob.links.listening_factory().buildProtocol(None)
            tls.makeConnection(iosim.makeFakeServer(tls))
            return tls

        waiting = [incoming() for _ in range(MAX_UNVERIFIED)]
        self.assertFalse(any(t.transport.disconnecting for t in waiting))
        self.assertTrue(incoming().transport.disconnecting)
        opened, _, _ = self.connect(self.alice, self.bob, "bob", self.bob.fingerprint)
        self.failureResultOf(opened)  # alice too, while they wait
        waiting.pop().connectionLost(Failure(ConnectionDone()))
        opened, _, _ = self.connect(self.alice, self.bob, "bob", self.bob.fingerprint)
        self.successResultOf(opened)  # room for one; verified, it no longer counts
        waiting.append(incoming())
        self.assertFalse(waiting[-1].transport.disconnecting)
        self.assertTrue(incoming().transport.disconnecting)

    def test_abort_drops_at_once(self) -> None:
        """abort() forgets the link and drops the connection without the closing handshake that an
        other end which vanished would never answer; the link is down once the transport is."""
        opened, link, pump = self.connect(self.alice, self.bob, "bob", self.bob.fingerprint)
        self.successResultOf(opened)
        link.send({"type": "msg", "text": "into the void"})
        link.abort()
        self.assertIsNone(self.alice.links.get("bob"))
        self.assertTrue(link.transport.disconnecting)
        pump.flush()
        self.assertEqual(self.alice.down, ["bob"])
        self.assertEqual(self.bob.frames, [])

    def test_newest_link_used(self) -> None:
        """With two links to one user (an old one may be dead: its other end vanished and came back
        with a new link) the newest is the one used; when it goes, the older one again."""
        first, first_link, _ = self.connect(self.alice, self.bob, "bob", self.bob.fingerprint)
        second, second_link, second_pump = self.connect(self.alice, self.bob, "bob", self.bob.fingerprint)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertIs(self.alice.links.get("bob"), second_link)
        second_link.close()
        second_pump.flush()
        self.assertIs(self.alice.links.get("bob"), first_link)

    def test_open_link_outlives_the_handshake_timeout(self) -> None:
        """The handshake timeout ends once the link is open: a quiet link stays up."""
        opened, link, pump = self.connect(self.alice, self.bob, "bob", self.bob.fingerprint)
        self.successResultOf(opened)
        self.clock.advance(HANDSHAKE_TIMEOUT * 10)
        pump.flush()
        self.assertEqual((self.alice.down, self.bob.down), ([], []))
        self.assertIs(self.alice.links.get("bob"), link)

    def test_line_too_long_closes(self) -> None:
        """A line longer than any frame closes the link rather than growing a buffer for it."""
        opened, link, pump = self.connect(self.alice, self.bob, "bob", self.bob.fingerprint)
        self.successResultOf(opened)
        link.transport.write(b"x" * (Link.MAX_LENGTH + 1))
        pump.flush()
        self.assertEqual((self.bob.down, self.alice.down), (["alice"], ["bob"]))
        self.assertEqual(self.bob.frames, [])

    def test_lost_while_the_name_is_checked(self) -> None:
        """A connection lost while its claimed name is being checked does not become a link when
        the check comes back positive."""
        decision: Deferred[bool] = Deferred()
        self.bob.verify_peer = lambda user, fingerprint: decision  # type: ignore[method-assign]
        opened, link, pump = self.connect(self.alice, self.bob, "bob", self.bob.fingerprint)
        link.transport.abortConnection()
        pump.flush()
        decision.callback(True)
        pump.flush()
        self.assertEqual((self.bob.up, self.bob.links.get("alice")), ([], None))
        self.failureResultOf(opened)

    def test_connector_refuses_wrong_listener(self) -> None:
        """A listener without the expected key fails the handshake: no link on either side, nothing sent."""
        opened, link, pump = self.connect(self.alice, self.mallory, "bob", self.bob.fingerprint)
        self.failureResultOf(opened)
        self.assertEqual((self.alice.up, self.mallory.up, self.mallory.verified), ([], [], []))

    def test_listener_refuses_claimed_name_with_wrong_key(self) -> None:
        """A peer claiming to be alice with another key gets nothing: no link, its frames never looked at."""
        self.mallory.links.user = "alice"  # mallory's hello claims alice
        opened, link, pump = self.connect(
            self.mallory, self.bob, "bob", self.bob.fingerprint, {"type": "msg", "text": "I am alice"}
        )
        self.assertEqual(self.bob.verified, [("alice", self.mallory.fingerprint)])
        self.assertEqual((self.bob.up, self.bob.frames), ([], []))
        self.failureResultOf(opened)

    def test_listener_refuses_blocked_key_in_handshake(self) -> None:
        """A key the handler refuses (a blocked user's) fails the TLS handshake itself."""
        self.bob.refused.add(self.alice.fingerprint)
        opened, link, pump = self.connect(self.alice, self.bob, "bob", self.bob.fingerprint)
        self.failureResultOf(opened)
        self.assertEqual((self.bob.verified, self.bob.up), ([], []))

    def test_unverified_frames_close(self) -> None:
        """Before hello is accepted, anything else (or a second hello, or garbage) closes the connection."""
        for first in [{"type": "msg", "text": "hi"}, "not json", {"type": "hello", "user": "alice", "protocol": 99}]:
            server_tls = self.bob.links.listening_factory().buildProtocol(None)
            client_tls = self.alice.links.connecting_factory("bob", self.bob.fingerprint).buildProtocol(None)
            client = client_tls.wrappedProtocol
            client.connectionMade = lambda: None  # send no hello of its own
            client.when_open().addErrback(lambda f: None)
            pump = iosim.connect(server_tls, iosim.makeFakeServer(server_tls), client_tls,
                                 iosim.makeFakeClient(client_tls), greet=False, clock=self.clock)
            client.transport.write((first if isinstance(first, str) else json.dumps(first)).encode() + b"\n")
            pump.flush()
            self.assertTrue(server_tls.transport.disconnected, first)
        self.assertEqual((self.bob.up, self.bob.frames), ([], []))

    def test_connector_needs_the_welcome_of_its_user(self) -> None:
        """The side that dials opens the link only on a welcome naming the user it dialled:
        anything else first, or a welcome from another name, closes it."""
        for answer in [{"type": "msg", "text": "hi"}, {"type": "welcome", "protocol": 1, "user": "carol"}]:
            server_tls = self.bob.links.listening_factory().buildProtocol(None)
            client_tls = self.alice.links.connecting_factory("bob", self.bob.fingerprint).buildProtocol(None)
            server = server_tls.wrappedProtocol
            server._check_hello = lambda frame, server=server, answer=answer: server._write(answer)
            pump = iosim.connect(server_tls, iosim.makeFakeServer(server_tls), client_tls,
                                 iosim.makeFakeClient(client_tls), greet=False, clock=self.clock)
            opened = client_tls.wrappedProtocol.when_open()
            pump.flush()
            self.failureResultOf(opened)
            self.assertTrue(client_tls.transport.disconnected, answer)
        self.assertEqual((self.alice.up, self.alice.frames), ([], []))

    def test_handshake_timeout(self) -> None:
        """A connection that never says hello is dropped after the handshake timeout."""
        server_tls = self.bob.links.listening_factory().buildProtocol(None)
        transport = iosim.makeFakeServer(server_tls)
        server_tls.makeConnection(transport)
        self.clock.advance(HANDSHAKE_TIMEOUT)
        self.assertTrue(transport.disconnecting)


class LoopbackTests(unittest.TestCase):
    async def bob_listening(self) -> tuple[Peer, Peer, int]:
        """alice, and bob listening on loopback: (alice, bob, bob's port)."""
        directory: dict[str, str] = {}
        alice = Peer("alice", reactor, directory)
        bob = Peer("bob", reactor, directory)
        bob.links._interface = "127.0.0.1"
        port = await bob.links.listen()
        self.addCleanup(bob.links.stop_listening)
        return alice, bob, port

    async def test_listen_connect_close(self) -> None:
        """On real loopback sockets a peer listens, another connects by name and key, and both see the link."""
        alice, bob, port = await self.bob_listening()
        self.assertEqual(await bob.links.listen(), port)
        link = await alice.links.connect("bob", "127.0.0.1", port, bob.fingerprint).addTimeout(10, reactor)
        self.addCleanup(alice.links.close_all)
        self.assertEqual(link.user, "bob")
        closed: Deferred[None] = Deferred()
        bob.link_down = lambda l: closed.callback(l.user)  # type: ignore[method-assign]
        alice.links.close("bob")
        self.assertEqual(await closed.addTimeout(10, reactor), "alice")

    async def test_wrong_key_refused_on_loopback(self) -> None:
        """Dialling with the wrong expected key fails and leaves no link."""
        alice, bob, port = await self.bob_listening()
        with self.assertRaises(Exception):
            await alice.links.connect("bob", "127.0.0.1", port, "0" * 64).addTimeout(10, reactor)
        self.assertIsNone(alice.links.get("bob"))
        self.assertEqual(bob.up, [])


class EveryAddressTests(unittest.TestCase):
    """Without --interface a peer listens on IPv6 and IPv4: the server gives it out by the address it
    came from, so one that reached the server over IPv6 is dialled over IPv6."""

    async def reached(self, bindv6only: int) -> str:
        if shutil.which("unshare") is None or shutil.which("ip") is None:
            raise unittest.SkipTest("needs unshare and ip to make a network namespace")
        out, err, code = await with_timeout(getProcessOutputAndValue(
            "unshare", ["-n", sys.executable, "-c", _EVERY_ADDRESS, str(bindv6only)], env=subprocess_env(),
            reactor=reactor,
        ), TIMEOUT, "a peer listening in a network namespace")
        if code != 0 and b"unshare" in err:
            raise unittest.SkipTest(f"cannot make a network namespace here: {err.decode(errors='replace').strip()}")
        self.assertEqual(code, 0, err.decode(errors="replace"))
        return out.decode().splitlines()[0]

    async def test_dual_stack(self) -> None:
        """Where IPv6 sockets take IPv4 too (Linux's default), one socket on :: takes both."""
        self.assertEqual(await self.reached(0), "127.0.0.1 ::1 on 1 sockets")

    async def test_ipv6_only_sockets(self) -> None:
        """Where they do not (net.ipv6.bindv6only=1, BSDs), an IPv4 socket on the same port beside it."""
        self.assertEqual(await self.reached(1), "127.0.0.1 ::1 on 2 sockets")
