"""The server's rules through its sessions: a real SQLite store and real scrypt, a fake clock
for every timer, and in-memory connections instead of sockets."""

from __future__ import annotations

import os
import random

from twisted.internet import reactor
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    FirstError,
    fail,
)
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from p2pchat import crypto
from p2pchat.discovery import directory as directory_module
from p2pchat.discovery.directory import Directory, Limits
from p2pchat.discovery.passwords import PasswordHasher
from p2pchat.discovery.session import (
    MAILBOX_RETRY,
    MAX_UNANSWERED,
    WRITE_BATCH,
    Session,
)
from p2pchat.discovery.store.base import Account, StoreError
from p2pchat.discovery.store.sqlite import SQLiteStore
from p2pchat.wire import (
    RATE_LIMITED_OPS,
    REQUEST_SCHEMAS,
    Event,
    Reply,
    decode_frame,
    encode_request,
)

from .support import TIMEOUT, changes, fake_keys, with_timeout

PASSWORD = "correct horse"


class MemoryConnection:
    """A session's connection kept in memory: decoded frames, and whether it was closed."""

    def __init__(self) -> None:
        self.frames = []
        self.writes = 0
        self.closed = False
        self.paused = False
        self.full = False
        self.session: Session | None = None
        self._reply_waiters: dict = {}
        self._event_waiters: list = []

    def write(self, data: bytes) -> None:
        self.writes += 1
        for line in data.splitlines():
            frame = decode_frame(line)
            self.frames.append(frame)
            # Like a real transport, the other end reads what we wrote later, not during write().
            if isinstance(frame, Event):
                for entry in list(self._event_waiters):
                    if entry[0] == frame.name:
                        self._event_waiters.remove(entry)
                        reactor.callLater(0, entry[1].callback, frame)
                        break
            elif frame.id in self._reply_waiters:
                reactor.callLater(0, self._reply_waiters.pop(frame.id).callback, frame)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.session.connection_lost()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def events(self, name: str) -> list[Event]:
        return [f for f in self.frames if isinstance(f, Event) and f.name == name]


class Client:
    """One connection to the session under test, with a request helper."""

    def __init__(self, harness: "Harness", host: str) -> None:
        self.conn = MemoryConnection()
        self.session = Session(harness.directory, harness.clock, self.conn, host)
        self.conn.session = self.session
        self.session.connected()
        self._next = 0

    def send_line(self, line: bytes) -> None:
        self.session.line_received(line)

    def request(self, op: str, **args) -> Deferred:
        self._next += 1
        d = Deferred()
        self.conn._reply_waiters[self._next] = d
        self.send_line(encode_request(self._next, op, **args).rstrip(b"\n"))
        return with_timeout(d, TIMEOUT, f"reply to {op}")

    async def ok(self, op: str, **args) -> dict:
        reply = await self.request(op, **args)
        if not reply.ok:
            raise AssertionError(f"{op} refused: {reply.code}: {reply.message}")
        return reply.result

    async def refused(self, op: str, **args) -> str:
        reply = await self.request(op, **args)
        if reply.ok:
            raise AssertionError(f"{op} accepted: {reply.result}")
        return reply.code

    async def relay(self, recipient: "Client", msg_id: str, envelope: str = "e") -> dict:
        """Send to an online C{recipient}, who acks it as a peer does; the send's result."""
        reply = self.request("send", to=recipient.session.username, msg_id=msg_id, envelope=envelope)
        await recipient.ok("ack", seqs=[(await recipient.event("envelope")).fields["seq"]])
        result = (await reply).result
        return result

    def event(self, name: str) -> Deferred:
        for frame in self.conn.events(name):
            if frame not in getattr(self, "_seen", []):
                self.__dict__.setdefault("_seen", []).append(frame)
                return Deferred.fromCoroutine(_value(frame))
        d = Deferred()
        self.conn._event_waiters.append((name, d))

        def seen(frame):
            self.__dict__.setdefault("_seen", []).append(frame)
            return frame

        return with_timeout(d.addCallback(seen), TIMEOUT, f"event {name}")


async def _value(x):
    return x


class Harness:
    """A directory over a real store in a temporary directory, with a fake clock."""

    def __init__(self, testcase: TestCase, **limits) -> None:
        self.testcase = testcase
        self.clock = Clock()
        self.clock.advance(1_000_000)
        limits.setdefault("keepalive_timeout", 1e6)  # only the timer tests want it short
        limits.setdefault("presence_batch", 0)  # only the batching test wants presence held back
        self.limits = Limits(**limits)
        self.path = os.path.join(testcase.mktemp(), "discovery.sqlite3")
        os.makedirs(os.path.dirname(self.path))
        self.keys: dict[str, tuple[str, str]] = {}

    async def start_on(self, path: str) -> "Harness":
        """Start on the database of an earlier harness, as a restarted server does."""
        self.path = path
        return await self.start()

    async def start(self) -> "Harness":
        self.store = SQLiteStore(self.path, reactor)
        snapshot = await self.store.start(self.clock.seconds())
        self.hasher = PasswordHasher(reactor, threads=2)
        self.hasher.start()
        self.testcase.addCleanup(self.hasher.stop)
        self.testcase.addCleanup(self.store.stop)
        self.directory = Directory(self.store, self.clock, self.limits, self.hasher)
        self.directory.load(snapshot)
        return self

    def connect(self, host: str = "127.0.0.1") -> Client:
        return Client(self, host)

    async def user(self, name: str, port: int = 4000, host: str = "127.0.0.1") -> Client:
        """A logged-in client for C{name}, registering it first if needed."""
        return await self.log_in(self.connect(host), name, port)

    async def log_in(self, client: Client, name: str, port: int = 4000) -> Client:
        """Greet on C{client}'s connection and log in as C{name}, registering it first if needed."""
        await client.ok("hello", protocol=1)
        if name not in self.directory.accounts:
            fp, ek = self.keys.setdefault(name, fake_keys())
            await client.ok("register", username=name, password=PASSWORD, fingerprint=fp, envelope_key=ek)
        client.login = await client.ok("login", username=name, password=PASSWORD, port=port)
        await self.settled()
        return client

    async def settled(self) -> None:
        """Wait until every store operation asked for so far is done and its callbacks have run,
        then the ones those callbacks asked for (after a login: until a stored mailbox of one
        page is out, the read that finds no more is done, and the user takes live envelopes)."""
        for _ in range(2):
            await self.store.stored_seq("", "", "")


def harness_test(**limits):
    """Decorate an C{async def test(self, h)} to run with a started L{Harness}."""

    def wrap(f):
        def test(self):
            async def run():
                h = await Harness(self, **limits).start()
                await f(self, h)

            return Deferred.fromCoroutine(run())

        test.__doc__ = f.__doc__
        test.__name__ = f.__name__
        return test

    return wrap


class FirstExchangeTests(TestCase):
    @harness_test(keepalive_timeout=45)
    async def test_hello_event_first(self, h):
        """The server speaks first with a hello event naming the protocol and its limits."""
        c = h.connect()
        hello = c.conn.frames[0]
        self.assertEqual(hello.name, "hello")
        self.assertEqual(hello.fields["protocol"], 1)
        self.assertEqual(hello.fields["keepalive_timeout"], 45.0)
        self.assertEqual((hello.fields["message_rate"], hello.fields["message_burst"]), (50.0, 200))

    @harness_test()
    async def test_hello_required(self, h):
        """Any request before hello is refused with hello_required."""
        c = h.connect()
        self.assertEqual(await c.refused("who"), "hello_required")
        self.assertEqual(await c.refused("login", username="a", password="b", port=0), "hello_required")
        self.assertEqual(await c.refused("ping"), "hello_required")
        self.assertEqual(await c.refused("send", to="x", msg_id="1", envelope="e"), "hello_required")
        await c.ok("hello", protocol=1)

    @harness_test()
    async def test_unsupported_version(self, h):
        """Another version is refused and the connection closes after the reply."""
        c = h.connect()
        self.assertEqual(await c.refused("hello", protocol=2), "unsupported_version")
        self.assertTrue(c.conn.closed)


class AccountTests(TestCase):
    @harness_test()
    async def test_register_and_login(self, h):
        """A registered user logs in with a token and an empty mailbox, and is online."""
        c = h.connect()
        await c.ok("hello", protocol=1)
        fp, ek = fake_keys()
        self.assertEqual((await c.ok("register", username="alice", password=PASSWORD, fingerprint=fp,
                                     envelope_key=ek))["username"], "alice")
        result = await c.ok("login", username="alice", password=PASSWORD, port=4000)
        self.assertEqual((result["username"], result["mailbox"], len(result["token"])), ("alice", 0, 43))
        self.assertIn("alice", h.directory.online)
        self.assertNotIn(PASSWORD, repr(h.directory.accounts["alice"]))

    @harness_test()
    async def test_envelope_key_signed(self, h):
        """The identity key's signature of the envelope key is checked, kept and handed out with the
        keys (lookup and keys); a peer older than signatures registers without one, and gives it
        later with its keys at a password login, or alone at a resume; one that does not verify
        is refused with invalid_key and changes nothing."""
        alice, bob = crypto.generate_identity("alice"), crypto.generate_identity("bob")
        alice_ek, bob_ek = crypto.generate_envelope_key().public_b64, crypto.generate_envelope_key().public_b64
        signed = crypto.sign_envelope_key(alice, "alice", alice_ek)
        c = h.connect()
        await c.ok("hello", protocol=1)
        for bad in (crypto.sign_envelope_key(alice, "alice", bob_ek), crypto.sign_envelope_key(bob, "alice", alice_ek),
                    crypto.sign_envelope_key(alice, "bob", alice_ek), "x" * 100):
            self.assertEqual(await c.refused("register", username="alice", password=PASSWORD, fingerprint=alice.fingerprint,
                                             envelope_key=alice_ek, key_signature=bad), "invalid_key")
        self.assertNotIn("alice", h.directory.accounts)
        await c.ok("register", username="alice", password=PASSWORD, fingerprint=alice.fingerprint, envelope_key=alice_ek,
                   key_signature=signed)
        await c.ok("login", username="alice", password=PASSWORD, port=4000)
        other = await h.user("carol")
        self.assertEqual((await other.ok("keys", user="alice"))["key_signature"], signed)
        self.assertEqual((await other.ok("lookup", user="alice"))["key_signature"], signed)
        # bob's peer is older: no signature, so none is handed out.
        b = h.connect()
        await b.ok("hello", protocol=1)
        await b.ok("register", username="bob", password=PASSWORD, fingerprint=bob.fingerprint, envelope_key=bob_ek)
        self.assertNotIn("key_signature", await other.ok("keys", user="bob"))
        self.assertEqual(await b.refused("login", username="bob", password=PASSWORD, port=0, key_signature="x"), "bad_request")
        bob_token = (await b.ok("login", username="bob", password=PASSWORD, port=0))["token"]
        await b.ok("logout")
        # Updated, it gives its signature at the next resume; a bad one is refused there too.
        b = h.connect()
        await b.ok("hello", protocol=1)
        bob_signed = crypto.sign_envelope_key(bob, "bob", bob_ek)
        # One for other keys (an install whose user has logged in from another since) is sent to
        # a password login, which binds its own keys: on its token it would be handed what is
        # sealed to the other install's keys, which it cannot open.
        self.assertEqual(await b.refused("resume", username="bob", token=bob_token, port=0,
                                         key_signature=crypto.sign_envelope_key(bob, "bob", alice_ek)), "invalid_token")
        self.assertNotIn("key_signature", await other.ok("keys", user="bob"))
        await b.ok("resume", username="bob", token=bob_token, port=0, key_signature=bob_signed)
        self.assertEqual((await other.ok("keys", user="bob"))["key_signature"], bob_signed)
        # The same keys without a signature (bob's older peer again) keep the one they have.
        await b.ok("logout")
        b = h.connect()
        await b.ok("hello", protocol=1)
        await b.ok("login", username="bob", password=PASSWORD, port=0, fingerprint=bob.fingerprint, envelope_key=bob_ek)
        self.assertEqual((await other.ok("keys", user="bob"))["key_signature"], bob_signed)
        # New keys at a password login come with their signature (or none: an older peer again).
        await c.ok("logout")
        c = h.connect()
        await c.ok("hello", protocol=1)
        new_ek = crypto.generate_envelope_key().public_b64
        await c.ok("login", username="alice", password=PASSWORD, port=0, fingerprint=alice.fingerprint,
                   envelope_key=new_ek, key_signature=crypto.sign_envelope_key(alice, "alice", new_ek))
        self.assertEqual((await other.ok("keys", user="alice"))["envelope_key"], new_ek)
        await c.ok("logout")
        c = h.connect()
        await c.ok("hello", protocol=1)
        await c.ok("login", username="alice", password=PASSWORD, port=0, fingerprint=alice.fingerprint, envelope_key=alice_ek)
        self.assertNotIn("key_signature", await other.ok("keys", user="alice"))
        # Kept across a restart.
        await h.store.stop()
        h = await Harness(self).start_on(h.path)
        self.assertEqual(h.directory.accounts["bob"].key_signature, bob_signed)
        self.assertIsNone(h.directory.accounts["alice"].key_signature)

    @harness_test()
    async def test_register_gives_a_session_token(self, h):
        """Registering answers with a session token, stored before the answer: resume logs in with
        it (the password is hashed once, not twice), on this server and after a restart."""
        c = h.connect()
        await c.ok("hello", protocol=1)
        fp, ek = fake_keys()
        registered = await c.ok("register", username="alice", password=PASSWORD, fingerprint=fp, envelope_key=ek)
        self.assertEqual((registered["username"], len(registered["token"])), ("alice", 43))
        result = await c.ok("resume", username="alice", token=registered["token"], port=4000)
        self.assertEqual((result["username"], result["mailbox"]), ("alice", 0))
        self.assertIn("alice", h.directory.online)
        self.assertNotEqual(result["token"], registered["token"])
        await c.ok("logout")
        await h.store.stop()
        h = await Harness(self).start_on(h.path)
        again = h.connect()
        await again.ok("hello", protocol=1)
        await again.ok("resume", username="alice", token=registered["token"], port=4000)
        self.assertIn("alice", h.directory.online)

    @harness_test()
    async def test_register_errors(self, h):
        """Bad usernames, weak passwords, bad keys and taken names each get their own code."""
        await h.user("alice")
        c = h.connect()
        await c.ok("hello", protocol=1)
        fp, ek = fake_keys()
        self.assertEqual(await c.refused("register", username="", password=PASSWORD, fingerprint=fp,
                                         envelope_key=ek), "bad_request")
        for name in ["-x", "a" * 33, "a b", "ä", "a/b"]:
            self.assertEqual(await c.refused("register", username=name, password=PASSWORD, fingerprint=fp,
                                             envelope_key=ek), "invalid_username", name)
        self.assertEqual(await c.refused("register", username="bob", password="short", fingerprint=fp,
                                         envelope_key=ek), "weak_password")
        self.assertEqual(await c.refused("register", username="bob", password=PASSWORD, fingerprint="xyz",
                                         envelope_key=ek), "invalid_key")
        self.assertEqual(await c.refused("register", username="bob", password=PASSWORD, fingerprint=fp,
                                         envelope_key="AAAA"), "invalid_key")
        self.assertEqual(await c.refused("register", username="alice", password=PASSWORD, fingerprint=fp,
                                         envelope_key=ek), "username_taken")
        self.assertNotIn("bob", h.directory.accounts)

    @harness_test()
    async def test_names_differing_only_in_case_are_one(self, h):
        """Once alice exists, nobody registers Alice or ALICE to pass for her (nor imports one), also
        while alice's account is being written, and after a restart."""
        await h.user("alice")
        c = h.connect()
        await c.ok("hello", protocol=1)
        fp, ek = fake_keys()
        for name in ("Alice", "ALICE"):
            reply = await c.request("register", username=name, password=PASSWORD, fingerprint=fp, envelope_key=ek)
            self.assertEqual((reply.code, reply.message), (
                "username_taken_in_other_case",
                f"the name {name!r} is taken, as 'alice': names that differ only in case are one name",
            ))
        self.assertEqual(await h.directory.import_credentials(["ALICE some*password", "Bob some*password"]), (1, 0, 1))
        self.assertEqual(await c.refused("register", username="bob", password=PASSWORD, fingerprint=fp,
                                         envelope_key=ek), "username_taken_in_other_case")
        # While carol's account is being written, Carol is refused already.
        writing, written = Deferred(), Deferred()
        create = h.store.create_account

        def held_create(account):
            writing.callback(None)
            return written.addCallback(lambda _: create(account))

        self.patch(h.store, "create_account", held_create)
        first = c.request("register", username="carol", password=PASSWORD, fingerprint=fp, envelope_key=ek)
        await with_timeout(writing, TIMEOUT, "carol's account being written")
        second = h.connect()
        await second.ok("hello", protocol=1)
        self.assertEqual(await second.refused("register", username="Carol", password=PASSWORD, fingerprint=fp,
                                              envelope_key=ek), "username_taken_in_other_case")
        written.callback(None)
        self.assertTrue((await first).ok)
        self.assertEqual(sorted(h.directory.accounts), ["Bob", "alice", "carol"])
        # A name whose account could not be written is free again.
        self.patch(h.store, "create_account", lambda account: fail(StoreError("disk full")))
        self.assertEqual(await c.refused("register", username="dave", password=PASSWORD, fingerprint=fp,
                                         envelope_key=ek), "internal_error")
        self.assertEqual(len(self.flushLoggedErrors(StoreError)), 1)
        self.patch(h.store, "create_account", create)
        await c.ok("register", username="Dave", password=PASSWORD, fingerprint=fp, envelope_key=ek)
        await h.store.stop()
        h = await Harness(self).start_on(h.path)
        c = h.connect()
        await c.ok("hello", protocol=1)
        self.assertEqual(await c.refused("register", username="CAROL", password=PASSWORD, fingerprint=fp,
                                         envelope_key=ek), "username_taken_in_other_case")
        # Of two accounts made before names were compared so, each is taken as itself (a peer then
        # logs in): neither is refused as the other's.
        await h.store.create_account(Account("carOL", "x", None, None, 0.0))
        await h.store.stop()
        h = await Harness(self).start_on(h.path)
        c = h.connect()
        await c.ok("hello", protocol=1)
        for name in ("carol", "carOL"):
            self.assertEqual(await c.refused("register", username=name, password=PASSWORD, fingerprint=fp,
                                             envelope_key=ek), "username_taken", name)

    @harness_test(open_registration=False)
    async def test_registration_closed(self, h):
        """With registration closed, register is refused."""
        c = h.connect()
        await c.ok("hello", protocol=1)
        fp, ek = fake_keys()
        self.assertEqual(await c.refused("register", username="bob", password=PASSWORD, fingerprint=fp,
                                         envelope_key=ek), "registration_closed")

    @harness_test()
    async def test_before_and_after_login(self, h):
        """Every command but hello, register, login, resume and ping gets not_authenticated before
        login (nobody's keys, address or presence for a connection that has not logged in);
        login after login gets already_authenticated."""
        await h.user("bob")
        c = h.connect()
        await c.ok("hello", protocol=1)
        valid = {"user": "bob", "to": "bob", "msg_id": "1", "envelope": "e", "seconds": 60, "seqs": [1], "text": "hi",
                 "signature": "s"}
        for op, schema in REQUEST_SCHEMAS.items():
            if op not in ("hello", "register", "login", "resume", "ping"):
                self.assertEqual(await c.refused(op, **{name: valid[name] for name in schema}), "not_authenticated", op)
        self.assertIn("time", await c.ok("ping"))
        a = await h.user("alice")
        self.assertEqual(await a.refused("login", username="alice", password=PASSWORD, port=1), "already_authenticated")

    @harness_test(max_connections_per_address=2)
    async def test_connections_per_address(self, h):
        """At most --max-connections-per-address connections from one address at once: the next gets
        bye (too_many_connections) instead of hello and is closed; one closing makes room; other
        addresses are not counted with it."""
        first, second = h.connect("10.0.0.9"), h.connect("10.0.0.9")
        third = h.connect("10.0.0.9")
        self.assertEqual([e.name for e in third.conn.frames], ["bye"])
        self.assertEqual(third.conn.frames[0].fields["reason"], "too_many_connections")
        self.assertTrue(third.conn.closed)
        await h.connect("10.0.0.8").ok("hello", protocol=1)
        first.conn.close()
        await h.connect("10.0.0.9").ok("hello", protocol=1)
        await second.ok("hello", protocol=1)
        self.assertEqual(h.connect("10.0.0.9").conn.events("bye")[0].fields["reason"], "too_many_connections")

    @harness_test(max_connections_per_address=2)
    async def test_connections_per_ipv6_network(self, h):
        """IPv6 connections count by /64: a client cannot get around the limit by taking a new
        address in its network for each connection; the bye names the network."""
        for host in ("2001:db8::1", "2001:db8::2"):
            await h.connect(host).ok("hello", protocol=1)
        bye = h.connect("2001:db8::abcd:3").conn.events("bye")[0].fields
        self.assertEqual(bye["reason"], "too_many_connections")
        self.assertEqual(bye["message"], "2001:db8::/64 has 2 connections to this server already; try again later")
        await h.connect("2001:db8:0:1::1").ok("hello", protocol=1)

    @harness_test()
    async def test_second_login_denied(self, h):
        """A password login of a user who is online is denied; the first session is untouched."""
        first = await h.user("alice")
        c = h.connect("10.0.0.9")
        await c.ok("hello", protocol=1)
        self.assertEqual(await c.refused("login", username="alice", password=PASSWORD, port=1), "already_online")
        self.assertIs(h.directory.online["alice"], first.session)

    @harness_test()
    async def test_login_the_store_fails_to_record(self, h):
        """A login, or a resume, whose records the store fails to write is answered internal_error
        and leaves the connection logged out: nobody sees the user online, the connection cannot
        act as them, and trying again there works once the store does."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        token = bob.login["token"]
        await bob.ok("logout")
        record_login = h.store.record_login

        def broken(username, at):
            return fail(StoreError("disk I/O error"))

        h.store.record_login = broken
        c = h.connect()
        await c.ok("hello", protocol=1)
        self.assertEqual(await c.refused("login", username="bob", password=PASSWORD, port=1), "internal_error")
        self.assertEqual(await c.refused("resume", username="bob", token=token, port=1), "internal_error")
        self.assertEqual(len(self.flushLoggedErrors(FirstError)), 2)
        self.assertNotIn("bob", h.directory.online)
        self.assertEqual((await alice.ok("who"))["users"], [])
        self.assertEqual(await c.refused("send", to="alice", msg_id="m1", envelope="e"), "not_authenticated")
        h.store.record_login = record_login
        await c.ok("login", username="bob", password=PASSWORD, port=1)
        self.assertIs(h.directory.online["bob"], c.session)

    @harness_test()
    async def test_gone_while_the_password_is_checked(self, h):
        """A client that disconnects while its password is being checked is not left online:
        nobody sees it come and stay, and it logs in again from its next connection."""
        alice = await h.user("alice")
        await (await h.user("bob")).ok("logout")
        finished = Deferred()
        login = h.directory.login

        async def watched(*args):
            try:
                return await login(*args)
            finally:
                reactor.callLater(0, finished.callback, None)

        h.directory.login = watched
        c = h.connect()
        await c.ok("hello", protocol=1)
        unanswered = c.request("login", username="bob", password=PASSWORD, port=1)
        c.conn.close()
        await with_timeout(finished, TIMEOUT, "the password check")
        h.directory.login = login
        await h.settled()
        unanswered.addErrback(lambda f: f.trap(CancelledError))
        unanswered.cancel()  # the connection is gone: the answer can never reach it
        self.assertNotIn("bob", h.directory.online)
        self.assertEqual((await alice.ok("who"))["users"], [])
        again = await h.user("bob")
        self.assertIs(h.directory.online["bob"], again.session)

    @harness_test()
    async def test_credentials_import(self, h):
        """Imported accounts log in with their password once they send keys; the file lines are hashed."""
        imported, existing, skipped = await h.directory.import_credentials(
            ["hans falcon*solo", "", "# comment", "bad/name password", "yoda wise@!man",
             b"luke p\xe4ssw\xf6rd".decode("utf-8", "surrogateescape"),  # Latin-1, as the server reads it
             "rey pass\ufffdword"]  # U+FFFD itself is text like any other
        )
        self.assertEqual((imported, existing, skipped), (3, 0, 2))
        self.assertNotIn("luke", h.directory.accounts)
        self.assertNotIn("falcon*solo", h.directory.accounts["hans"].password_hash)
        c = h.connect()
        await c.ok("hello", protocol=1)
        self.assertEqual(await c.refused("login", username="hans", password="falcon*solo", port=0), "keys_required")
        fp, ek = fake_keys()
        await c.ok("login", username="hans", password="falcon*solo", port=0, fingerprint=fp, envelope_key=ek)
        self.assertEqual(h.directory.accounts["hans"].fingerprint, fp)
        # A name that exists already is skipped: its password stays the one it had.
        self.assertEqual(await h.directory.import_credentials(["hans other*password", "leia new*password"]), (1, 1, 0))
        await c.ok("logout")
        c = h.connect()
        await c.ok("hello", protocol=1)
        self.assertEqual(await c.refused("login", username="hans", password="other*password", port=0), "bad_credentials")
        await c.ok("login", username="hans", password="falcon*solo", port=0)


class LockoutTests(TestCase):
    @harness_test(block_duration=60)
    async def test_locked_while_the_password_is_checked(self, h):
        """The right password whose check ends after other connections' wrong ones blocked the
        account is refused too: guesses sent side by side get no more tries than one by one."""
        await (await h.user("alice")).ok("logout")
        verify = h.hasher.verify
        right_checked = Deferred()

        def held(password, stored):
            d = verify(password, stored)
            if password == PASSWORD:  # its outcome waits until the test lets it through
                d.addCallback(lambda good: right_checked.addCallback(lambda _: good))
            return d

        h.hasher.verify = held
        right = h.connect("10.0.0.1")
        await right.ok("hello", protocol=1)
        login = right.request("login", username="alice", password=PASSWORD, port=0)
        guesser = h.connect("10.0.0.2")
        await guesser.ok("hello", protocol=1)
        for guess in ("wrong1", "wrong2"):
            self.assertEqual(await guesser.refused("login", username="alice", password=guess, port=0), "bad_credentials")
        self.assertEqual(await guesser.refused("login", username="alice", password="wrong3", port=0), "too_many_attempts")
        right_checked.callback(None)
        self.assertEqual((await login).code, "account_locked")
        self.assertNotIn("alice", h.directory.online)

    @harness_test(block_duration=60)
    async def test_three_failures_block(self, h):
        """Two bad passwords, then the third blocks the account, even for the right password and
        for a connection opened before; after block_duration it works again."""
        await (await h.user("alice")).ok("logout")
        early = h.connect("10.0.0.2")
        await early.ok("hello", protocol=1)
        c = h.connect("10.0.0.1")
        await c.ok("hello", protocol=1)
        self.assertEqual(await c.refused("login", username="alice", password="wrong1", port=0), "bad_credentials")
        self.assertEqual(await c.refused("login", username="alice", password="wrong2", port=0), "bad_credentials")
        self.assertEqual(await c.refused("login", username="alice", password="wrong3", port=0), "too_many_attempts")
        self.assertEqual(await c.refused("login", username="alice", password=PASSWORD, port=0), "account_locked")
        self.assertEqual(await early.refused("login", username="alice", password=PASSWORD, port=0), "account_locked")
        h.clock.advance(59)
        reply = await early.request("login", username="alice", password=PASSWORD, port=0)
        self.assertEqual(reply.code, "account_locked")
        self.assertIn("1 s", reply.message)
        h.clock.advance(1)
        await early.ok("login", username="alice", password=PASSWORD, port=0)

    @harness_test()
    async def test_success_resets(self, h):
        """A successful login resets the count of consecutive failures."""
        await (await h.user("alice")).ok("logout")
        c = h.connect()
        await c.ok("hello", protocol=1)
        for _ in range(2):
            await c.refused("login", username="alice", password="nope", port=0)
        await c.ok("login", username="alice", password=PASSWORD, port=0)
        await c.ok("logout")
        c = h.connect()
        await c.ok("hello", protocol=1)
        for _ in range(2):
            self.assertEqual(await c.refused("login", username="alice", password="nope", port=0), "bad_credentials")

    @harness_test()
    async def test_unknown_user(self, h):
        """An unknown username gets the same bad_credentials as a wrong password."""
        c = h.connect()
        await c.ok("hello", protocol=1)
        reply = await c.request("login", username="ghost", password="whatever", port=0)
        self.assertEqual(reply.code, "bad_credentials")

    @harness_test(login_rate=2)
    async def test_login_rate(self, h):
        """Password attempts from one address are rate limited."""
        c = h.connect("10.1.1.1")
        await c.ok("hello", protocol=1)
        for _ in range(2):
            await c.refused("login", username="ghost", password="whatever", port=0)
        self.assertEqual(await c.refused("login", username="ghost", password="whatever", port=0), "rate_limited")
        other = h.connect("10.1.1.2")
        await other.ok("hello", protocol=1)
        self.assertEqual(await other.refused("login", username="ghost", password="x", port=0), "bad_credentials")

    async def _attempt(self, h, host: str) -> str:
        """One password attempt from C{host} (a new connection, an unknown user): its error code."""
        c = h.connect(host)
        await c.ok("hello", protocol=1)
        self._attempts = getattr(self, "_attempts", 0) + 1
        return await c.refused("login", username=f"ghost{self._attempts}", password="whatever", port=0)

    @harness_test(login_rate=2)
    async def test_login_rate_per_ipv6_network(self, h):
        """An IPv6 client counts by its /64, which it can pick any address in: attempts from
        three addresses of one /64 share one rate, another /64 has its own; an IPv4 address
        mapped into IPv6 (a dual-stack listener) counts as itself."""
        self.assertEqual(await self._attempt(h, "2001:db8::1"), "bad_credentials")
        self.assertEqual(await self._attempt(h, "2001:db8::ffff:2"), "bad_credentials")
        self.assertEqual(await self._attempt(h, "2001:db8::3"), "rate_limited")
        self.assertEqual(await self._attempt(h, "2001:db8:0:1::1"), "bad_credentials")
        self.assertEqual(await self._attempt(h, "10.1.1.1"), "bad_credentials")
        self.assertEqual(await self._attempt(h, "::ffff:10.1.1.1"), "bad_credentials")
        self.assertEqual(await self._attempt(h, "10.1.1.1"), "rate_limited")

    @harness_test(login_rate=2)
    async def test_login_rates_forgotten_only_when_refilled(self, h):
        """Past the number of addresses kept, the ones whose rate has refilled are forgotten, not
        an address still held back (forgetting everyone would let many addresses wipe the
        limit of the one guessing)."""
        self.patch(directory_module, "MAX_RATE_BUCKETS", 3)
        for _ in range(2):
            await self._attempt(h, "10.1.1.1")
        self.assertEqual(await self._attempt(h, "10.1.1.1"), "rate_limited")
        await self._attempt(h, "10.1.1.2")
        await self._attempt(h, "10.1.1.3")
        h.clock.advance(40)  # 10.1.1.2 and .3 are refilled (one attempt back every 30 s), .1 not yet
        await self._attempt(h, "10.1.1.4")
        self.assertEqual(await self._attempt(h, "10.1.1.1"), "bad_credentials")
        self.assertEqual(await self._attempt(h, "10.1.1.1"), "rate_limited")


class ResumeTests(TestCase):
    @harness_test()
    async def test_resume_replaces(self, h):
        """A valid token logs in without the password and replaces a session the server still has."""
        a = await h.user("alice", port=4000)
        token = a.login["token"]
        bob = await h.user("bob")
        b = h.connect("10.0.0.7")
        await b.ok("hello", protocol=1)
        result = await b.ok("resume", username="alice", token=token, port=4001)
        self.assertEqual(result["username"], "alice")
        self.assertEqual((await a.event("bye")).fields["reason"], "replaced")
        self.assertTrue(a.conn.closed)
        self.assertIs(h.directory.online["alice"], b.session)
        self.assertEqual([e.fields["status"] for e in bob.conn.events("presence")], [])
        self.assertEqual((await bob.ok("lookup", user="alice"))["host"], "10.0.0.7")

    @harness_test()
    async def test_bad_token(self, h):
        """A wrong token, or a token of another user, is invalid_token."""
        alice = await h.user("alice")
        token = alice.login["token"]
        await alice.ok("logout")
        await h.user("bob")
        c = h.connect()
        await c.ok("hello", protocol=1)
        self.assertEqual(await c.refused("resume", username="alice", token="x" * 43, port=0), "invalid_token")
        self.assertEqual(await c.refused("resume", username="bob", token=token, port=0), "invalid_token")
        await c.ok("resume", username="alice", token=token, port=0)

    @harness_test()
    async def test_token_expires(self, h):
        """A token logs in until TOKEN_LIFETIME after it was given, not after; the password still does."""
        alice = await h.user("alice")
        token = alice.login["token"]
        await alice.ok("logout")
        h.clock.advance(directory_module.TOKEN_LIFETIME - 1)
        c = h.connect()
        await c.ok("hello", protocol=1)
        await c.ok("resume", username="alice", token=token, port=0)
        await c.ok("logout")
        h.clock.advance(1)
        c = h.connect()
        await c.ok("hello", protocol=1)
        self.assertEqual(await c.refused("resume", username="alice", token=token, port=0), "invalid_token")
        await c.ok("login", username="alice", password=PASSWORD, port=0)


class PresenceTests(TestCase):
    @harness_test()
    async def test_login_logout_broadcast(self, h):
        """Others hear of a login and a logout; the subject does not hear of itself."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        self.assertEqual(changes(await alice.event("presence")), [("bob", "online")])
        await bob.ok("logout")
        self.assertEqual(changes(await alice.event("presence")), [("bob", "logout")])
        self.assertEqual(bob.conn.events("presence"), [])
        self.assertTrue(bob.conn.closed)

    @harness_test()
    async def test_blocked_users_not_told(self, h):
        """A user who blocked you does not appear in your presence events, who or whosince."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        await alice.event("presence")
        await bob.ok("block", user="alice")
        carol = await h.user("carol")
        await carol.ok("logout")
        await bob.ok("logout")
        await h.user("bob")
        names = [user for user, _ in changes(*alice.conn.events("presence"))]
        self.assertEqual(names, ["bob", "carol", "carol"])
        self.assertEqual((await alice.ok("who"))["users"], [])
        self.assertEqual((await alice.ok("whosince", seconds=1000))["users"], ["carol"])

    @harness_test(presence_batch=0.05)
    async def test_presence_batched(self, h):
        """Presence changes within the batch window reach each recipient in one event with each
        subject's latest status, minus those about themselves and those from users who block them."""
        watcher = await h.user("watcher")
        blocked = await h.user("blocked")
        h.clock.advance(0.05)
        alice = await h.user("alice")
        await alice.ok("block", user="blocked")
        bob = await h.user("bob")
        await bob.ok("logout")
        writes = watcher.conn.writes
        self.assertEqual(changes(*watcher.conn.events("presence")), [("blocked", "online")])
        h.clock.advance(0.05)
        self.assertEqual(watcher.conn.writes, writes + 1)
        self.assertEqual(len(watcher.conn.events("presence")), 2)
        self.assertEqual(changes(watcher.conn.events("presence")[1]), [("alice", "online"), ("bob", "logout")])
        self.assertEqual(changes(*blocked.conn.events("presence")), [("watcher", "online"), ("bob", "logout")])
        self.assertEqual(changes(*alice.conn.events("presence")), [("bob", "logout")])

    @harness_test()
    async def test_presence_in_slices(self, h):
        """A flush reaches PRESENCE_SLICE users per reactor turn; a newer flush first finishes the
        one under way, so every user hears the changes once each, in order."""
        self.patch(directory_module, "PRESENCE_SLICE", 2)
        users = [await h.user(f"u{i}") for i in range(5)]
        h.clock.advance(0)
        for user in users:
            user.conn.frames.clear()
        h.directory._announce("zed", None)
        self.assertEqual([len(u.conn.events("presence")) for u in users], [1, 1, 0, 0, 0])
        h.directory._announce("zed", "logout")
        self.assertEqual([len(u.conn.events("presence")) for u in users], [2, 2, 1, 1, 1])
        h.clock.advance(0)
        h.clock.advance(0)
        for user in users:
            self.assertEqual(changes(*user.conn.events("presence")), [("zed", "online"), ("zed", "logout")])

    @harness_test(presence_batch=0.05, presence_batch_per_user=0.02)
    async def test_presence_flushes_spaced(self, h):
        """A flush comes at the earliest presence_batch_per_user per user online after the one
        before (here 5 online x 0.02 s = 0.1 s); a change after a quiet spell goes out after
        presence_batch."""
        users = [await h.user(f"u{i}") for i in range(4)]
        h.clock.advance(0.05)
        before = len(users[0].conn.events("presence"))
        self.assertEqual(
            changes(users[0].conn.events("presence")[-1]), [("u1", "online"), ("u2", "online"), ("u3", "online")]
        )
        await h.user("late")
        h.clock.advance(0.099)
        self.assertEqual(len(users[0].conn.events("presence")), before)
        h.clock.advance(0.001)
        self.assertEqual(changes(users[0].conn.events("presence")[-1]), [("late", "online")])
        # Quiet for longer than the spacing: the next change waits presence_batch only.
        h.clock.advance(0.1)
        await h.user("later")
        h.clock.advance(0.049)
        self.assertEqual(len(users[0].conn.events("presence")), before + 1)
        h.clock.advance(0.001)
        self.assertEqual(changes(users[0].conn.events("presence")[-1]), [("later", "online")])

    @harness_test()
    async def test_who(self, h):
        """who lists online users but me."""
        alice = await h.user("alice")
        await h.user("bob")
        await h.user("carol")
        self.assertEqual((await alice.ok("who"))["users"], ["bob", "carol"])

    @harness_test()
    async def test_whosince_window(self, h):
        """Someone who logged out 100 s ago is in whosince 200 but not in whosince 50."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        await bob.ok("logout")
        h.clock.advance(100)
        await alice.ok("ping")
        self.assertEqual((await alice.ok("whosince", seconds=200))["users"], ["bob"])
        self.assertEqual((await alice.ok("whosince", seconds=100))["users"], ["bob"])
        self.assertEqual((await alice.ok("whosince", seconds=50))["users"], [])
        self.assertEqual(await alice.refused("whosince", seconds=-1), "bad_request")

    @harness_test()
    async def test_disconnect_is_logout(self, h):
        """A connection that drops logs its user out, with reason disconnected."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        bob.session.connection_lost()
        self.assertEqual(changes(await alice.event("presence")), [("bob", "online")])
        self.assertEqual(changes(await alice.event("presence")), [("bob", "disconnected")])
        self.assertNotIn("bob", h.directory.online)


class TimerTests(TestCase):
    @harness_test(keepalive_timeout=45)
    async def test_keepalive_expiry(self, h):
        """A connection silent for keepalive_timeout is dropped and its user is offline; pings keep it."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        for _ in range(4):
            h.clock.advance(30)
            await alice.ok("ping")
        self.assertFalse(alice.conn.closed)
        self.assertEqual((await bob.event("bye")).fields["reason"], "keepalive_timeout")
        self.assertTrue(bob.conn.closed)
        self.assertNotIn("bob", h.directory.online)
        self.assertIn(("bob", "keepalive_timeout"), changes(*alice.conn.events("presence")))

    @harness_test(keepalive_timeout=45)
    async def test_unauthenticated_silence(self, h):
        """A connection that never logs in is also dropped after keepalive_timeout."""
        c = h.connect()
        h.clock.advance(44.9)
        self.assertFalse(c.conn.closed)
        h.clock.advance(0.1)
        self.assertTrue(c.conn.closed)

    @harness_test(idle_timeout=30, keepalive_timeout=45)
    async def test_idle_timeout(self, h):
        """A user who sends no command for idle_timeout is logged out at that moment and told why;
        pings and acks do not count, other commands do."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        h.clock.advance(20)
        await bob.ok("who")
        await alice.ok("ping")
        await alice.ok("ack", seqs=[])
        h.clock.advance(9.9)
        self.assertFalse(alice.conn.closed)
        h.clock.advance(0.1)
        self.assertEqual((await alice.event("bye")).fields["reason"], "idle_timeout")
        self.assertTrue(alice.conn.closed)
        self.assertFalse(bob.conn.closed)
        self.assertIn(("alice", "idle_timeout"), changes(*bob.conn.events("presence")))
        h.clock.advance(20)
        self.assertEqual((await bob.event("bye")).fields["reason"], "idle_timeout")

    @harness_test(idle_timeout=30, keepalive_timeout=45)
    async def test_background_requests_are_not_activity(self, h):
        """Requests the client marks as its own doing ("background": true: a receipt sealed as an
        envelope, a key check or lookup for its outbox) do not keep its user from the idle timeout,
        as the seed asks of a message's receipt; the same request without the mark does."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        h.clock.advance(20)
        await bob.ok("keys", user="alice")
        await alice.ok("keys", user="bob", background=True)
        sent = alice.request("send", to="bob", msg_id="r-1", envelope="e", background=True)
        await bob.ok("ack", seqs=[(await bob.event("envelope")).fields["seq"]])
        self.assertTrue((await sent).ok)
        h.clock.advance(9.9)
        await alice.ok("lookup", user="bob", background=True)
        self.assertFalse(alice.conn.closed)
        h.clock.advance(0.1)
        self.assertEqual((await alice.event("bye")).fields["reason"], "idle_timeout")
        self.assertFalse(bob.conn.closed)
        h.clock.advance(20)
        self.assertEqual((await bob.event("bye")).fields["reason"], "idle_timeout")

    @harness_test(idle_timeout=30, keepalive_timeout=45)
    async def test_one_timer_per_connection(self, h):
        """Logging in moves the connection's timer to the idle deadline instead of cancelling it
        for a new one: a cancelled call stays in the reactor's queue until its time comes."""
        client = h.connect()
        timer = client.session._watch_call
        self.assertEqual(timer.getTime(), h.clock.seconds() + 45)
        h.clock.advance(5)
        await h.log_in(client, "alice")
        self.assertIs(client.session._watch_call, timer)
        self.assertTrue(timer.active())
        self.assertEqual(timer.getTime(), h.clock.seconds() + 30)
        h.clock.advance(30)
        self.assertEqual((await client.event("bye")).fields["reason"], "idle_timeout")

    @harness_test(keepalive_timeout=45)
    async def test_timers_fire_on_whole_seconds(self, h):
        """Deadlines are rounded up to the whole second: the timers of connections made within
        one second come due together, in one wake-up of the reactor, at most a second late."""
        h.clock.advance(10.25 - h.clock.seconds())
        early = h.connect()
        h.clock.advance(0.5)
        late = h.connect()
        self.assertEqual(early.session._watch_call.getTime(), 56)
        self.assertEqual(late.session._watch_call.getTime(), 56)
        h.clock.advance(45)  # 45.5 s after the first connection
        self.assertFalse(early.conn.closed)
        h.clock.advance(0.25)
        self.assertTrue(early.conn.closed)
        self.assertTrue(late.conn.closed)


class BlockTests(TestCase):
    @harness_test()
    async def test_block_errors(self, h):
        """Block and unblock refuse self, unknown users, and changes that change nothing."""
        alice = await h.user("alice")
        await h.user("bob")
        self.assertEqual(await alice.refused("block", user="alice"), "self")
        self.assertEqual(await alice.refused("block", user="zed"), "unknown_user")
        self.assertEqual(await alice.refused("unblock", user="bob"), "not_blocked")
        await alice.ok("block", user="bob")
        self.assertEqual(await alice.refused("block", user="bob"), "already_blocked")
        self.assertEqual((await alice.ok("blocks"))["users"], ["bob"])
        await alice.ok("unblock", user="bob")
        self.assertEqual((await alice.ok("blocks"))["users"], [])

    @harness_test()
    async def test_pipelined_blocks_take_effect_in_order(self, h):
        """A client writing block, blocks, unblock, blocks without waiting for the answers gets
        them as if it had waited: each takes effect before the next is handled (a block waits
        for the store)."""
        alice = await h.user("alice")
        await h.user("bob")
        replies = [alice.request("block", user="bob"), alice.request("blocks"),
                   alice.request("unblock", user="bob"), alice.request("blocks")]
        replies = [await reply for reply in replies]
        self.assertEqual([(r.ok, r.result or r.code) for r in replies],
                         [(True, {"user": "bob"}), (True, {"users": ["bob"]}),
                          (True, {"user": "bob"}), (True, {"users": []})])
        self.assertFalse(h.directory.blocks("alice", "bob"))

    @harness_test()
    async def test_blocked_cannot_reach(self, h):
        """The blocked user cannot send to, look up or fetch keys of the blocker; never told otherwise."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        await alice.ok("block", user="bob")
        self.assertEqual(await bob.refused("send", to="alice", msg_id="1", envelope="e"), "blocked_by_user")
        self.assertEqual(await bob.refused("lookup", user="alice"), "blocked_by_user")
        self.assertEqual(await bob.refused("keys", user="alice"), "blocked_by_user")
        await alice.relay(bob, msg_id="1")
        self.assertEqual(alice.conn.events("envelope"), [])
        await alice.ok("unblock", user="bob")
        await bob.relay(alice, msg_id="2")

    @harness_test()
    async def test_blocks_survive_restart(self, h):
        """Blocks are stored: a new directory over the same store still enforces them."""
        alice = await h.user("alice")
        await h.user("bob")
        await alice.ok("block", user="bob")
        await h.store.stop()
        store = SQLiteStore(h.path, reactor)
        snapshot = await store.start(h.clock.seconds())
        self.addCleanup(store.stop)
        self.assertIn(("alice", "bob"), snapshot.blocks)


class LookupTests(TestCase):
    @harness_test()
    async def test_lookup(self, h):
        """lookup gives an online user's address, port and keys; distinct errors otherwise."""
        alice = await h.user("alice")
        await h.user("bob", port=4555, host="127.0.0.5")
        result = await alice.ok("lookup", user="bob")
        self.assertEqual(result, {"user": "bob", "host": "127.0.0.5", "port": 4555,
                                  "fingerprint": h.keys["bob"][0], "envelope_key": h.keys["bob"][1]})
        self.assertEqual(await alice.refused("lookup", user="alice"), "self")
        self.assertEqual(await alice.refused("lookup", user="zed"), "unknown_user")
        carol = await h.user("carol")
        await carol.ok("logout")
        self.assertEqual(await alice.refused("lookup", user="carol"), "offline")
        self.assertEqual((await alice.ok("keys", user="carol"))["fingerprint"], h.keys["carol"][0])
        # An imported account that has not logged in with its keys yet has none to give.
        await h.directory.import_credentials(["hans falcon*solo"])
        self.assertEqual(await alice.refused("keys", user="hans"), "keys_unknown")


class RelayTests(TestCase):
    @harness_test()
    async def test_delivered_online(self, h):
        """An envelope to an online user arrives at once; their ack answers the sender 'delivered',
        and the store never saw it."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        commits = h.store.commits
        reply = alice.request("send", to="bob", msg_id="m1", envelope="sealed")
        event = await bob.event("envelope")
        self.assertEqual((event.fields["from"], event.fields["msg_id"], event.fields["envelope"]),
                         ("alice", "m1", "sealed"))
        await alice.ok("ping")
        self.assertFalse(reply.called)
        self.assertEqual(await bob.ok("ack", seqs=[event.fields["seq"]]), {"acked": 1})
        result = (await reply).result
        self.assertEqual(result, {"status": "delivered", "seq": event.fields["seq"], "duplicate": False})
        self.assertEqual(h.store.commits, commits)
        self.assertEqual(await h.store.fetch_envelopes("bob", 0, 10), [])

    @harness_test(hold=2.0)
    async def test_unacked_is_stored(self, h):
        """Without an ack within the hold, the envelope is stored and then answered; the recipient
        gets it again at their next login, and its ack then deletes it."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        reply = alice.request("send", to="bob", msg_id="m1", envelope="sealed")
        seq = (await bob.event("envelope")).fields["seq"]
        h.clock.advance(1.9)
        await alice.ok("ping")
        self.assertFalse(reply.called)
        h.clock.advance(0.1)
        self.assertEqual((await reply).result, {"status": "delivered", "seq": seq, "duplicate": False})
        self.assertEqual([e.msg_id for e in await h.store.fetch_envelopes("bob", 0, 10)], ["m1"])
        self.assertEqual(len(bob.conn.events("envelope")), 1)  # stored, not written again
        await bob.ok("logout")
        bob = await h.user("bob")
        self.assertEqual(bob.login["mailbox"], 1)
        again = await bob.event("envelope")
        self.assertEqual((again.fields["seq"], again.fields["msg_id"]), (seq, "m1"))
        self.assertEqual(await bob.ok("ack", seqs=[seq]), {"acked": 1})
        self.assertEqual(await h.store.fetch_envelopes("bob", 0, 10), [])

    @harness_test(hold=0)
    async def test_no_hold_stores_then_writes(self, h):
        """With --hold 0 every envelope is stored first: an online recipient gets it once it is
        stored, the sender hears 'delivered', a resend is not written twice, and the envelope stays
        stored until the recipient acks it."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        result = await alice.ok("send", to="bob", msg_id="m1", envelope="sealed")
        self.assertEqual([e.msg_id for e in await h.store.fetch_envelopes("bob", 0, 10)], ["m1"])
        event = await bob.event("envelope")
        self.assertEqual(
            (event.fields["seq"], event.fields["msg_id"], event.fields["envelope"], event.fields["from"]),
            (result["seq"], "m1", "sealed", "alice"),
        )
        self.assertEqual(result, {"status": "delivered", "seq": result["seq"], "duplicate": False})
        again = await alice.ok("send", to="bob", msg_id="m1", envelope="sealed")
        self.assertEqual(again, {"status": "delivered", "seq": result["seq"], "duplicate": True})
        self.assertEqual(len(bob.conn.events("envelope")), 1)
        self.assertEqual(await bob.ok("ack", seqs=[result["seq"]]), {"acked": 1})
        self.assertEqual(await h.store.fetch_envelopes("bob", 0, 10), [])

    @harness_test()
    async def test_held_stored_when_recipient_leaves(self, h):
        """A recipient who disconnects before acking: what they were sent is stored, the senders
        hear 'stored', and it comes again, in order, at their next login."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        replies = [alice.request("send", to="bob", msg_id=f"m{i}", envelope="e") for i in range(3)]
        for _ in range(3):
            await bob.event("envelope")
        bob.conn.close()
        results = [(await r).result for r in replies]
        self.assertEqual([r["status"] for r in results], ["stored"] * 3)
        bob = await h.user("bob")
        self.assertEqual(bob.login["mailbox"], 3)
        again = [await bob.event("envelope") for _ in range(3)]
        self.assertEqual([e.fields["msg_id"] for e in again], ["m0", "m1", "m2"])
        self.assertEqual([e.fields["seq"] for e in again], [r["seq"] for r in results])

    @harness_test()
    async def test_held_stored_at_shutdown(self, h):
        """A server shutting down stores what it holds before the store stops: nothing sent and
        unacked is lost, and a resend after the restart is recognised as a duplicate."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        unanswered = alice.request("send", to="bob", msg_id="m1", envelope="sealed")
        seq = (await bob.event("envelope")).fields["seq"]
        h.directory.shutdown()
        self.assertEqual(alice.conn.events("bye")[0].fields["reason"], "shutdown")
        unanswered.addErrback(lambda f: f.trap(CancelledError))
        unanswered.cancel()  # alice's connection is gone: the answer can never reach her
        await h.store.stop()
        h = await Harness(self).start_on(h.path)
        self.assertEqual([e.seq for e in await h.store.fetch_envelopes("bob", 0, 10)], [seq])
        alice = await h.user("alice")
        again = await alice.ok("send", to="bob", msg_id="m1", envelope="sealed")
        self.assertEqual((again["status"], again["seq"], again["duplicate"]), ("stored", seq, True))

    @harness_test()
    async def test_send_answered_out_of_order(self, h):
        """A send waiting for the recipient's ack does not hold back the replies to later requests;
        logout waits for it, then says goodbye."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        reply = alice.request("send", to="bob", msg_id="m1", envelope="e")
        self.assertEqual((await alice.ok("who"))["users"], ["bob"])
        logout = alice.request("logout")
        seq = (await bob.event("envelope")).fields["seq"]
        await bob.ok("ping")
        self.assertFalse(logout.called)
        self.assertEqual(alice.conn.events("bye"), [])
        await bob.ok("ack", seqs=[seq])
        self.assertTrue((await reply).ok)
        self.assertTrue((await logout).ok)
        self.assertEqual(alice.conn.events("bye")[0].fields["reason"], "logout")

    @harness_test(hold=2.0)
    async def test_store_failure_answered(self, h):
        """A send the store fails to take, stored at once or after its hold, is answered
        internal_error; the session goes on, and a logout still waits for every send's answer."""
        alice = await h.user("alice")
        bob = await h.user("bob")

        def broken(envelope, then):
            then(Failure(StoreError("disk I/O error")))

        h.store.put_envelope_then = broken
        held = alice.request("send", to="bob", msg_id="m1", envelope="e")
        await bob.event("envelope")
        await bob.ok("logout")
        self.assertEqual(await alice.refused("send", to="bob", msg_id="m2", envelope="e"), "internal_error")
        self.assertEqual((await held).code, "internal_error")
        self.assertEqual(len(self.flushLoggedErrors(StoreError)), 2)
        self.assertEqual((await alice.ok("who"))["users"], [])
        self.assertEqual(await alice.ok("logout"), {})

    @harness_test()
    async def test_seq_never_reused_after_restart(self, h):
        """Seqs go on above every seq ever stored, even once all are acked and the server restarts."""
        alice = await h.user("alice")
        await (await h.user("bob")).ok("logout")
        first = await alice.ok("send", to="bob", msg_id="m1", envelope="e")
        bob = await h.user("bob")
        await bob.ok("ack", seqs=[(await bob.event("envelope")).fields["seq"]])
        await bob.ok("logout")
        await alice.ok("logout")
        await h.store.stop()
        h = await Harness(self).start_on(h.path)
        alice = await h.user("alice")
        second = await alice.ok("send", to="bob", msg_id="m2", envelope="e")
        self.assertGreater(second["seq"], first["seq"])

    @harness_test()
    async def test_send_errors(self, h):
        """Sending to yourself or to nobody is refused."""
        alice = await h.user("alice")
        self.assertEqual(await alice.refused("send", to="alice", msg_id="1", envelope="e"), "self")
        self.assertEqual(await alice.refused("send", to="nobody", msg_id="1", envelope="e"), "unknown_user")

    @harness_test()
    async def test_stored_then_delivered_in_order(self, h):
        """Envelopes to an offline user are stored and arrive in order at login; unacked ones come again."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        await bob.ok("logout")
        for i in range(5):
            self.assertEqual((await alice.ok("send", to="bob", msg_id=f"m{i}", envelope=f"e{i}"))["status"], "stored")
        bob = h.connect()
        await bob.ok("hello", protocol=1)
        result = await bob.ok("login", username="bob", password=PASSWORD, port=0)
        self.assertEqual(result["mailbox"], 5)
        events = [await bob.event("envelope") for _ in range(5)]
        self.assertEqual([e.fields["msg_id"] for e in events], [f"m{i}" for i in range(5)])
        await bob.ok("ack", seqs=[e.fields["seq"] for e in events[:3]])
        await bob.ok("logout")
        bob = h.connect()
        await bob.ok("hello", protocol=1)
        self.assertEqual((await bob.ok("login", username="bob", password=PASSWORD, port=0))["mailbox"], 2)
        again = [await bob.event("envelope") for _ in range(2)]
        self.assertEqual([e.fields["msg_id"] for e in again], ["m3", "m4"])

    @harness_test()
    async def test_duplicate_stored_once(self, h):
        """The same msg_id sent twice is stored once and reported as a duplicate."""
        alice = await h.user("alice")
        await (await h.user("bob")).ok("logout")
        first = await alice.ok("send", to="bob", msg_id="m1", envelope="e")
        second = await alice.ok("send", to="bob", msg_id="m1", envelope="e")
        self.assertEqual((second["seq"], second["duplicate"]), (first["seq"], True))
        self.assertEqual(len(await h.store.fetch_envelopes("bob", 0, 10)), 1)
        self.assertEqual((await h.user("bob")).login["mailbox"], 1)

    @harness_test(mailbox_limit=2)
    async def test_mailbox_full(self, h):
        """The sender gets mailbox_full once the recipient's mailbox holds the limit; a resend of a
        stored one is still answered as a duplicate (delivered once the recipient is online to
        get it); an ack makes room."""
        alice = await h.user("alice")
        await (await h.user("bob")).ok("logout")
        first = await alice.ok("send", to="bob", msg_id="1", envelope="e")
        await alice.ok("send", to="bob", msg_id="2", envelope="e")
        reply = await alice.request("send", to="bob", msg_id="3", envelope="e")
        self.assertEqual(reply.code, "mailbox_full")
        self.assertIn("2", reply.message)
        again = await alice.ok("send", to="bob", msg_id="1", envelope="e")
        self.assertEqual((again["status"], again["seq"], again["duplicate"]), ("stored", first["seq"], True))
        bob = await h.user("bob")
        again = await alice.ok("send", to="bob", msg_id="1", envelope="e")
        self.assertEqual((again["status"], again["seq"], again["duplicate"]), ("delivered", first["seq"], True))
        await bob.ok("ack", seqs=[first["seq"]])
        await bob.ok("logout")
        self.assertEqual((await alice.ok("send", to="bob", msg_id="3", envelope="e"))["status"], "stored")

    @harness_test(mailbox_limit=2)
    async def test_held_count_toward_limit(self, h):
        """Envelopes an online recipient has not acked yet count toward their mailbox limit."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        held = [alice.request("send", to="bob", msg_id=str(i), envelope="e") for i in range(2)]
        self.assertEqual(await alice.refused("send", to="bob", msg_id="3", envelope="e"), "mailbox_full")
        events = [await bob.event("envelope") for _ in range(2)]
        await bob.ok("ack", seqs=[e.fields["seq"] for e in events])
        for reply in held:
            self.assertEqual((await reply).result["status"], "delivered")
        reply = alice.request("send", to="bob", msg_id="3", envelope="e")
        await bob.ok("ack", seqs=[(await bob.event("envelope")).fields["seq"]])
        self.assertTrue((await reply).ok)

    @harness_test()
    async def test_empty_mailbox_not_read(self, h):
        """A login with nothing stored goes live without reading the store; one with envelopes
        stored reads them, then reads once more to find that there are no more."""
        reads = []
        fetch = h.store.fetch_envelopes
        self.patch(h.store, "fetch_envelopes", lambda *a: reads.append(a[0]) or fetch(*a))
        alice = await h.user("alice")
        self.assertEqual(reads, [])
        self.assertTrue(h.directory.online["alice"].live)
        await (await h.user("bob")).ok("logout")
        await alice.ok("send", to="bob", msg_id="s1", envelope="e")
        bob = await h.user("bob")
        await bob.ok("ack", seqs=[(await bob.event("envelope")).fields["seq"]])
        self.assertEqual(reads, ["bob", "bob"])
        await bob.ok("logout")
        await h.user("bob")
        self.assertEqual(reads, ["bob", "bob"])

    @harness_test()
    async def test_mailbox_read_again_after_a_failure(self, h):
        """A page of the mailbox the store fails to read is asked for again a little later: what
        was stored, and what comes meanwhile, still reaches the user on this connection."""
        alice = await h.user("alice")
        await (await h.user("bob")).ok("logout")
        await alice.ok("send", to="bob", msg_id="s1", envelope="e")
        fetch = h.store.fetch_envelopes
        self.patch(h.store, "fetch_envelopes", lambda *a: fail(StoreError("disk on fire")))
        bob = await h.user("bob")
        self.assertEqual(len(self.flushLoggedErrors(StoreError)), 1)
        await alice.ok("send", to="bob", msg_id="s2", envelope="e")
        self.assertEqual(bob.conn.events("envelope"), [])
        self.patch(h.store, "fetch_envelopes", fetch)
        h.clock.advance(MAILBOX_RETRY)
        await h.settled()
        self.assertEqual([e.fields["msg_id"] for e in bob.conn.events("envelope")], ["s1", "s2"])

    @harness_test()
    async def test_mailbox_waits_for_room(self, h):
        """Stored envelopes go out only while the connection has room: none is read while it is
        full, and a page stops where it fills up and goes on once it has drained."""
        alice = await h.user("alice")
        await (await h.user("bob")).ok("logout")
        for i in range(3):  # envelopes of a write each
            await alice.ok("send", to="bob", msg_id=f"s{i}", envelope="e" * WRITE_BATCH)
        reads = []
        fetch = h.store.fetch_envelopes
        self.patch(h.store, "fetch_envelopes", lambda *a: reads.append(a[0]) or fetch(*a))
        bob = h.connect()
        await bob.ok("hello", protocol=1)
        bob.conn.full = True
        await bob.ok("login", username="bob", password=PASSWORD, port=0)
        await h.settled()
        self.assertEqual((reads, bob.conn.events("envelope")), ([], []))
        # From now on each envelope written fills the connection up.
        write = bob.conn.write
        self.patch(bob.conn, "write", lambda data: write(data) or setattr(bob.conn, "full", b'"envelope"' in data))
        for sent in range(1, 4):
            bob.conn.full = False
            bob.session.drained()
            await h.settled()
            self.assertEqual([e.fields["msg_id"] for e in bob.conn.events("envelope")], [f"s{i}" for i in range(sent)])
        self.assertEqual(reads, ["bob"])
        self.assertFalse(bob.session.live)
        bob.conn.full = False
        bob.session.drained()
        await h.settled()
        self.assertEqual(reads, ["bob", "bob"])
        self.assertTrue(bob.session.live)

    @harness_test(mailbox_window=4)
    async def test_mailbox_window_and_live_order(self, h):
        """The mailbox comes at most a window of envelope characters unacked at a time (here four
        envelopes of one character); acks let more come, and envelopes sent meanwhile arrive after
        the stored ones."""
        alice = await h.user("alice")
        await (await h.user("bob")).ok("logout")
        for i in range(10):
            await alice.ok("send", to="bob", msg_id=f"s{i}", envelope="e")
        bob = h.connect()
        await bob.ok("hello", protocol=1)
        await bob.ok("login", username="bob", password=PASSWORD, port=0)
        first = [await bob.event("envelope") for _ in range(4)]
        await bob.ok("ping")
        self.assertEqual(len(bob.conn.events("envelope")), 4)
        live = await alice.ok("send", to="bob", msg_id="live", envelope="e")
        self.assertEqual(live["status"], "delivered")
        seen = list(first)
        while len(seen) < 11:
            await bob.ok("ack", seqs=[e.fields["seq"] for e in seen])
            seen.append(await bob.event("envelope"))
        self.assertEqual([e.fields["msg_id"] for e in seen], [f"s{i}" for i in range(10)] + ["live"])

    async def _live_window(self, h, wait_for_hold: bool) -> None:
        alice = await h.user("alice")
        bob = await h.user("bob")
        sends = [alice.request("send", to="bob", msg_id=f"m{i}", envelope="e") for i in range(10)]
        await h.settled()
        first = [await bob.event("envelope") for _ in range(4)]
        self.assertEqual([e.fields["msg_id"] for e in bob.conn.events("envelope")], ["m0", "m1", "m2", "m3"])
        self.assertFalse(bob.session.live)
        if wait_for_hold:  # the four written are stored too, and the senders answered
            h.clock.advance(h.directory.limits.hold)
        answered = sends[:4] if wait_for_hold else sends[4:]
        for reply in answered:
            self.assertEqual((await reply).result["status"], "delivered")
        await h.settled()
        self.assertEqual(len(bob.conn.events("envelope")), 4)
        seen = list(first)
        while len(seen) < 10:
            await bob.ok("ack", seqs=[e.fields["seq"] for e in seen])
            seen.append(await bob.event("envelope"))
        await bob.ok("ack", seqs=[e.fields["seq"] for e in seen])
        self.assertEqual([e.fields["msg_id"] for e in bob.conn.events("envelope")], [f"m{i}" for i in range(10)])
        for reply in sends:
            if reply not in answered:
                self.assertEqual((await reply).result["status"], "delivered")
        await h.settled()
        self.assertTrue(bob.session.live)
        self.assertEqual(await h.store.fetch_envelopes("bob", 0, 100, 1 << 20), [])
        # Live again: the next one goes out without waiting for older ones to be acked.
        reply = alice.request("send", to="bob", msg_id="m10", envelope="e")
        last = (await bob.event("envelope")).fields
        self.assertEqual(last["msg_id"], "m10")
        await bob.ok("ack", seqs=[last["seq"]])
        self.assertEqual((await reply).result["status"], "delivered")

    @harness_test(mailbox_window=4)
    async def test_live_window(self, h):
        """Live envelopes too go out at most a window of characters unacked at a time (here four
        of one character): a recipient who takes them in and does not ack (its user's output is
        not read) is not sent more to hold in memory. The ones sent meanwhile are stored (their
        senders hear delivered: the recipient is online) and come in order, each once, as acks
        make room; once none is left the recipient is live again."""
        await self._live_window(h, wait_for_hold=False)

    @harness_test(mailbox_window=4)
    async def test_live_window_past_hold(self, h):
        """The envelopes written and not acked within the hold are stored and stay in the window:
        what follows them comes only once they are acked, and none comes twice."""
        await self._live_window(h, wait_for_hold=True)

    @harness_test(mailbox_window=4, hold=0)
    async def test_live_window_stored_first(self, h):
        """With C{hold} 0 every envelope is stored before it goes out live: the window holds the same."""
        await self._live_window(h, wait_for_hold=False)

    def test_random_relay_order(self):
        """
        Seeded random schedules of sends from two users to a third (envelopes of 1 to 3
        characters against a window of 6), acks of random parts of what arrived, and holds
        running out: within the recipient's connection every envelope comes once, in the order
        sent (by seq), whether it went out live or from the store; once everything is acked all
        have come and none is left stored.
        """

        async def run(seed: int) -> None:
            r = random.Random(seed)
            h = await Harness(self, mailbox_window=6, mailbox_limit=1000).start()
            senders = [await h.user("alice"), await h.user("carol")]
            bob = await h.user("bob")
            sent, replies, acked = [], [], set()
            for step in range(150):
                action = r.random()
                if action < 0.6:
                    msg_id = f"m{step}"
                    sent.append(msg_id)
                    envelope = "e" * r.randint(1, 3)
                    replies.append(r.choice(senders).request("send", to="bob", msg_id=msg_id, envelope=envelope))
                elif action < 0.9:
                    arrived = [e.fields["seq"] for e in bob.conn.events("envelope")]
                    unacked = [seq for seq in arrived if seq not in acked]
                    chosen = r.sample(unacked, r.randint(0, len(unacked)))
                    if chosen:
                        acked.update(chosen)
                        await bob.ok("ack", seqs=chosen)
                else:
                    h.clock.advance(r.choice([0.3, h.limits.hold]))
                if r.random() < 0.3:
                    await h.settled()
            while True:  # ack everything until nothing more comes
                await h.settled()
                arrived = [e.fields["seq"] for e in bob.conn.events("envelope")]
                unacked = [seq for seq in arrived if seq not in acked]
                if not unacked:
                    break
                acked.update(unacked)
                await bob.ok("ack", seqs=unacked)
            events = [e.fields for e in bob.conn.events("envelope")]
            seqs = [e["seq"] for e in events]
            self.assertEqual(seqs, sorted(set(seqs)), f"seed {seed}")
            self.assertEqual(sorted(e["msg_id"] for e in events), sorted(sent), f"seed {seed}")
            for reply in replies:
                self.assertEqual((await reply).result["status"], "delivered")
            self.assertTrue(bob.session.live)
            self.assertEqual(await h.store.fetch_envelopes("bob", 0, 1000, 1 << 20), [])

        async def seeds() -> None:
            for seed in range(10):
                await run(seed)

        return Deferred.fromCoroutine(seeds())

    @harness_test(message_rate=1, message_burst=3)
    async def test_message_rate(self, h):
        """Past the burst, sends are refused with rate_limited until the bucket refills."""
        alice = await h.user("alice")
        await (await h.user("bob")).ok("logout")
        for i in range(3):
            await alice.ok("send", to="bob", msg_id=str(i), envelope="e")
        self.assertEqual(await alice.refused("send", to="bob", msg_id="x", envelope="e"), "rate_limited")
        h.clock.advance(1)
        await alice.ok("send", to="bob", msg_id="y", envelope="e")

    @harness_test(message_rate=1, message_burst=3)
    async def test_lists_count_against_the_rate(self, h):
        """Lists of users (who, whosince), which cost a big server ~0.1 ms and 22 KB of answer for
        a 22-byte request, take from the same bucket: a client cannot ask for them at line speed."""
        alice = await h.user("alice")
        await alice.ok("who")
        await alice.ok("whosince", seconds=60)
        await alice.ok("who")
        self.assertEqual(await alice.refused("who"), "rate_limited")
        self.assertEqual(await alice.refused("whosince", seconds=60), "rate_limited")
        h.clock.advance(1)
        await alice.ok("who")

    @harness_test(message_rate=1, message_burst=1)
    async def test_rate_limited_ops(self, h):
        """The requests wire.RATE_LIMITED_OPS names (what peers pace themselves by) take from the
        rate, and no other does."""
        alice = await h.user("alice")
        await (await h.user("bob")).ok("logout")  # sends are stored and answered at once
        valid = {"to": "bob", "msg_id": "1", "envelope": "e", "text": "hi", "signature": "s", "seconds": 60,
                 "user": "bob", "seqs": [1]}
        for op, schema in REQUEST_SCHEMAS.items():
            if op in ("hello", "register", "login", "resume", "logout"):
                continue
            args = {name: valid[name] for name in schema}
            h.clock.advance(1)
            first = await alice.request(op, **args)
            second = await alice.request(op, **args)
            limited = [not reply.ok and reply.code == "rate_limited" for reply in (first, second)]
            self.assertEqual(limited, [False, op in RATE_LIMITED_OPS], op)

    @harness_test(message_rate=1, message_burst=3)
    async def test_blocks_count_against_the_rate(self, h):
        """Blocks and unblocks, each written to the store, take from the same bucket: a client
        cannot make the server write at line speed."""
        alice = await h.user("alice")
        await h.user("bob")
        await alice.ok("block", user="bob")
        await alice.ok("unblock", user="bob")
        await alice.ok("block", user="bob")
        self.assertEqual(await alice.refused("unblock", user="bob"), "rate_limited")
        self.assertEqual(await alice.refused("block", user="carol"), "rate_limited")
        self.assertTrue(h.directory.blocks("alice", "bob"))
        h.clock.advance(1)
        await alice.ok("unblock", user="bob")


class BroadcastTests(TestCase):
    @harness_test()
    async def test_broadcast(self, h):
        """Broadcast reaches everyone online but the sender and those who blocked the sender, with
        the sender's signature (passed on unread); one without a signature is refused."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        carol = await h.user("carol")
        await carol.ok("block", user="alice")
        self.assertEqual(await alice.ok("broadcast", text="hi all", signature="s1g"), {"delivered": 1, "skipped": 1})
        event = (await bob.event("broadcast")).fields
        self.assertEqual((event["from"], event["text"], event["signature"]), ("alice", "hi all", "s1g"))
        self.assertEqual(await alice.refused("broadcast", text="unsigned"), "bad_request")
        self.assertEqual(await alice.refused("broadcast", text="long", signature="s" * 513), "bad_request")
        self.assertEqual(carol.conn.events("broadcast"), [])
        self.assertEqual(alice.conn.events("broadcast"), [])


class BadInputTests(TestCase):
    @harness_test()
    async def test_nothing_after_close(self, h):
        """Lines that reach a session after it closed (the rest of a read that held a logout) are
        ignored: nothing is answered, relayed or stored under the name it had."""
        alice = await h.user("alice")
        bob = await h.user("bob")
        await alice.ok("logout")
        self.assertTrue(alice.conn.closed)
        frames = len(alice.conn.frames)
        alice.send_line(encode_request(99, "send", to="bob", msg_id="m1", envelope="e").rstrip(b"\n"))
        alice.send_line(b"garbage")
        await bob.ok("ping")
        await h.settled()
        self.assertEqual(len(alice.conn.frames), frames)
        self.assertEqual(bob.conn.events("envelope"), [])
        self.assertEqual(await h.store.fetch_envelopes("bob", 0, 10), [])

    @harness_test()
    async def test_garbage_changes_nothing(self, h):
        """Garbage lines each get one error reply; the session keeps working afterwards."""
        alice = await h.user("alice")
        before = len(alice.conn.frames)
        for line in [b"", b"{", b"\xff\xfe", b"[]", b'{"id":1}', b'{"id":1,"op":"nope"}', b'{"id":1,"op":"block"}']:
            alice.send_line(line)
        replies = alice.conn.frames[before:]
        self.assertEqual([r.code for r in replies],
                         ["bad_json", "bad_json", "bad_utf8", "bad_json", "bad_request", "unknown_op", "bad_request"])
        self.assertEqual((await alice.ok("who"))["users"], [])
        self.assertIn("alice", h.directory.online)

    @harness_test()
    async def test_line_too_long(self, h):
        """An over-long line gets line_too_long and the connection closes."""
        c = h.connect()
        c.session.line_too_long()
        self.assertEqual(c.conn.frames[-1].code, "line_too_long")
        self.assertTrue(c.conn.closed)

    @harness_test()
    async def test_ping_behind_a_reply(self, h):
        """A ping is answered at once, but never before a reply still on its way to an earlier request."""
        alice = await h.user("alice")
        await h.user("bob")
        await alice.ok("ping")
        block = alice.request("block", user="bob")  # answered once the store has it
        ping = alice.request("ping")
        self.assertTrue((await block).ok)
        self.assertTrue((await ping).ok)
        ids = [f.id for f in alice.conn.frames if not isinstance(f, Event)]
        self.assertEqual(ids, sorted(ids))

    @harness_test()
    async def test_replies_in_order(self, h):
        """Pipelined requests behind a login wait for it and are answered in order."""
        fp, ek = fake_keys()
        c = h.connect()
        await c.ok("hello", protocol=1)
        await c.ok("register", username="alice", password=PASSWORD, fingerprint=fp, envelope_key=ek)
        login = c.request("login", username="alice", password=PASSWORD, port=0)
        who = c.request("who")
        self.assertTrue(c.conn.paused)
        self.assertTrue((await login).ok)
        self.assertTrue((await who).ok)
        self.assertFalse(c.conn.paused)
        ids = [f.id for f in c.conn.frames if not isinstance(f, Event)]
        self.assertEqual(ids, sorted(ids))

    @harness_test()
    async def test_requests_waiting_on_the_store_are_bounded(self, h):
        """A client that writes requests waiting on the store (acks, blocks) faster than they are
        answered is not read further while MAX_UNANSWERED wait: the server never holds more; all
        are answered, in order, and the connection is read again."""
        alice = await h.user("alice")
        await h.user("bob")
        replies = [alice.request("ack", seqs=[n]) for n in range(1, 3 * MAX_UNANSWERED)]
        replies += [alice.request("block" if n % 2 else "unblock", user="bob") for n in range(1, 2 * MAX_UNANSWERED)]
        self.assertTrue(alice.conn.paused)
        self.assertLessEqual(alice.session._unanswered, MAX_UNANSWERED)
        for reply in replies:
            self.assertIn((await reply).code if not (await reply).ok else "ok", ("ok", "already_blocked", "not_blocked"))
        self.assertFalse(alice.conn.paused)
        self.assertEqual(alice.session._unanswered, 0)
        ids = [f.id for f in alice.conn.frames if not isinstance(f, Event)]
        self.assertEqual(ids, sorted(ids))

    @harness_test()
    async def test_reading_resumes_as_replies_go_out(self, h):
        """Reading stops while MAX_UNANSWERED requests wait, and starts again as soon as one is
        answered, also when no line was left waiting by then (answers coming one at a time)."""
        alice = await h.user("alice")
        answers = []
        h.directory.ack = lambda me, seqs: answers.append(Deferred()) or answers[-1]
        replies = [alice.request("ack", seqs=[n]) for n in range(MAX_UNANSWERED + 1)]
        self.assertEqual(len(answers), MAX_UNANSWERED)
        self.assertTrue(alice.conn.paused)
        answers[0].callback({"acked": 0})  # the line that waited is taken: MAX_UNANSWERED wait again
        self.assertEqual(len(answers), MAX_UNANSWERED + 1)
        self.assertTrue(alice.conn.paused)
        answers[1].callback({"acked": 0})
        self.assertFalse(alice.conn.paused)
        for answer in answers[2:]:
            answer.callback({"acked": 0})
        for reply in replies:
            self.assertTrue((await reply).ok)


class RandomRequestTests(TestCase):
    """
    PROTOCOL.md's first promise, whatever comes in: every request gets exactly one reply.
    Seeded random mixes of valid and malformed requests (every operation, arguments of every
    JSON type, in and out of range, missing), from two users online, a connection that greeted
    but did not log in and one that did not greet; a closed connection is replaced.
    """

    SEEDS = 8
    REQUESTS = 600

    def test_one_reply_each(self):
        async def run():
            for seed in range(self.SEEDS):
                await self._mix(random.Random(seed), await Harness(self).start())

        return Deferred.fromCoroutine(run())

    def _junk(self, r: random.Random):
        return r.choice([
            "", "ALICE", "a" * 33, "-x", "short", "x" * 65, "é\u2028😀", "f" * 64,
            -1, 65536, 2**53, 2**63, 0.5, -0.0, 1e300, None, True, {}, {"x": 1}, [], ["a"], [1.5], [-1],
        ])

    def _valid(self, r: random.Random, name: str, seqs: list[int]):
        """A value that passes the checks for argument C{name} (it may still be refused)."""
        user = r.choice(["alice", "bob", "carol", "zed"])
        return {
            "protocol": 1, "username": user, "user": user, "to": user, "password": PASSWORD,
            "port": r.randrange(65536), "fingerprint": r.randbytes(32).hex(), "envelope_key": "A" * 43,
            "token": "t" * 43, "seconds": r.uniform(0, 100), "msg_id": str(r.randrange(40)),
            "envelope": "e" * r.randrange(1, 40), "text": "hi", "signature": "s" * r.randrange(1, 300),
            "key_signature": "k" * r.randrange(1, 300),
            "seqs": r.sample(seqs, min(3, len(seqs))) + seqs[-1:],
        }[name]

    def _request(self, r: random.Random, c: Client) -> tuple[str, dict]:
        op = r.choice([*REQUEST_SCHEMAS, "nope"])
        seqs = [f.fields["seq"] for f in c.conn.events("envelope")]
        args = {
            name: self._valid(r, name, seqs) if r.random() < 0.85 else self._junk(r)
            for name in REQUEST_SCHEMAS.get(op, {}) if r.random() < 0.97
        }
        if op == "hello" and r.random() < 0.97:
            args["protocol"] = 1  # any other version closes the connection
        return op, args

    async def _mix(self, r: random.Random, h: Harness) -> None:
        clients = [await h.user("alice"), await h.user("bob"), h.connect(), h.connect()]
        await clients[2].ok("hello", protocol=1)
        asked: list[tuple[Client, int, str, Deferred]] = []
        for n in range(self.REQUESTS):
            i = r.choices(range(4), (4, 4, 1, 1))[0]
            if clients[i].conn.closed:
                clients[i] = h.connect()
                if i < 2:  # back as who it was, unless someone else logged in as that user meanwhile
                    await clients[i].ok("hello", protocol=1)
                    await clients[i].request("login", username=["alice", "bob"][i], password=PASSWORD, port=0)
            c = clients[i]
            if r.random() < 0.03:
                c.send_line(r.choice([b"", b"{", b"\xff", b"[]", b'{"id":null,"op":"who"}', b'{"id":1.5,"op":"who"}',
                                      b'{"id":1,"op":"whosince","seconds":1' + b"0" * 400 + b"}"]))
                continue
            op, args = self._request(r, c)
            if op == "logout" and r.random() < 0.8:
                continue
            d = c.request(op, **args)
            asked.append((c, c._next, op, d))  # the id request() gave it
            if n % 40 == 0:
                await h.settled()
        for _ in range(100):  # each round answers at least one request
            h.clock.advance(h.limits.hold)  # sends held for an ack that will not come
            await h.settled()
            waiting = [d for c, _, _, d in asked if not c.conn.closed and not d.called]
            if not waiting:
                break
            await DeferredList(waiting, fireOnOneCallback=True)  # a password hash, in a thread
        for c, request_id, op, d in asked:
            replies = [f for f in c.conn.frames if isinstance(f, Reply) and f.id == request_id]
            if c.conn.closed:  # what was still on its way when the connection closed goes unanswered
                d.cancel()
                d.addErrback(lambda f: f.trap(CancelledError))
                self.assertLessEqual(len(replies), 1, op)
                continue
            await d
            self.assertEqual(len(replies), 1, op)
            self.assertNotEqual(replies[0].code, "internal_error", op)
        await (await h.user("dave")).ok("who")
