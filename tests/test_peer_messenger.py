"""Tests for p2pchat.peer.messenger: the peer's rules, on a fake clock, a real history file, real
envelopes, and a scripted directory standing in for the server connection."""

from __future__ import annotations

import json
import random
import sqlite3
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent
from twisted.trial import unittest

from p2pchat import crypto
from p2pchat.peer import messenger as messenger_module
from p2pchat.peer.history import DELIVERED, FAILED, PENDING, SENT, History
from p2pchat.peer.messenger import (
    ACK_WAIT,
    DIRECT_RETRY,
    LATE,
    PRESENCE_GRACE,
    PRESENCE_LINES,
    RATE_RETRY,
    RETRY_DELAY,
    UNREADABLE_WAIT,
    CommandError,
    Messenger,
    SparingObserver,
)
from p2pchat.peer.server_link import PACE_MARGIN, NotConnected, RequestError
from p2pchat.wire import Event


class Person:
    """Another user's real keys."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.identity = crypto.generate_identity(name)
        self.envelope_key = crypto.generate_envelope_key()
        self.fingerprint = self.identity.fingerprint
        self.public = self.envelope_key.public_b64
        self.key_signature: str | None = crypto.sign_envelope_key(self.identity, name, self.public)

    def keys(self) -> dict[str, Any]:
        """As the server gives them: without a signature for a peer older than signatures."""
        keys = {"fingerprint": self.fingerprint, "envelope_key": self.public}
        return keys if self.key_signature is None else {**keys, "key_signature": self.key_signature}


class Directory:
    """A scripted stand-in for the discovery server: just the answers the messenger needs."""

    def __init__(self) -> None:
        self.people: dict[str, Person] = {}
        self.online: set[str] = set()
        self.blocked_me: set[str] = set()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.sent: list[dict[str, Any]] = []
        self.acked: list[int] = []
        self.answers: dict[str, Any] = {}  # op -> exception or result overriding the defaults
        self.started = self.stopped = 0
        self.connected = True
        self.message_rate: tuple[float, int] | None = None  # from a hello: none here unless a test says
        self.key_signatures = True  # a server that hands out envelope key signatures
        self.reconnects = 0

    def start(self) -> None:
        self.started += 1

    def reconnect(self) -> None:
        self.reconnects += 1

    def stop(self) -> Deferred[None]:
        self.stopped += 1
        return succeed(None)

    def ops(self) -> list[str]:
        return [op for op, _ in self.requests]

    def request(self, op: str, **args: Any) -> Deferred[dict[str, Any]]:
        self.requests.append((op, args))
        if not self.connected:
            return fail(NotConnected("down"))
        answer = self.answers.get(op)
        if isinstance(answer, list):
            answer = answer.pop(0) if answer else None
        if isinstance(answer, Exception):
            return fail(answer)
        if isinstance(answer, Deferred):
            return answer  # never answered until the test fires it
        if answer is not None:
            return succeed(answer)
        args = {name: value for name, value in args.items() if name != "background"}  # for the server alone
        try:
            return succeed(getattr(self, "_" + op)(**args))
        except (RequestError, NotConnected) as e:
            return fail(e)

    def _person(self, user: str) -> Person:
        if user not in self.people:
            raise RequestError("unknown_user", f"there is no user named {user!r}")
        if user in self.blocked_me:
            raise RequestError("blocked_by_user", f"{user} has blocked you")
        return self.people[user]

    def _register(self, **args: Any) -> dict[str, Any]:
        return {"username": args["username"], "token": "R" * 43}

    def _login(self, **args: Any) -> dict[str, Any]:
        return {"username": args["username"], "token": "T" * 43, "mailbox": 0}

    def _resume(self, **args: Any) -> dict[str, Any]:
        return {"username": args["username"], "token": "T" * 43, "mailbox": 0}

    def _blocks(self) -> dict[str, Any]:
        return {"users": []}

    def _lookup(self, user: str) -> dict[str, Any]:
        person = self._person(user)
        if user not in self.online:
            raise RequestError("offline", f"{user} is offline")
        return {"user": user, "host": "127.0.0.1", "port": 7000, **person.keys()}

    def _keys(self, user: str) -> dict[str, Any]:
        return {"user": user, **self._person(user).keys()}

    def _send(self, to: str, msg_id: str, envelope: str) -> dict[str, Any]:
        self._person(to)
        self.sent.append({"to": to, "msg_id": msg_id, "envelope": envelope})
        return {"status": "delivered" if to in self.online else "stored", "seq": len(self.sent), "duplicate": False}

    def _ack(self, seqs: list[int]) -> dict[str, Any]:
        self.acked.extend(seqs)
        return {"acked": len(seqs)}

    def _who(self) -> dict[str, Any]:
        return {"users": sorted(self.online)}

    def _block(self, user: str) -> dict[str, Any]:
        self._person(user)
        return {"user": user}

    _unblock = _block

    def _logout(self) -> dict[str, Any]:
        return {}


class FakeLink:
    def __init__(self, links: FakeLinks, user: str) -> None:
        self.links = links
        self.user = user
        self.session = False
        self.sent: list[dict[str, Any]] = []
        self.closed = self.aborted = False

    def send(self, frame: dict[str, Any]) -> None:
        self.sent.append(frame)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.links.open.get(self.user) is self:  # an older one going leaves the newest in use
                del self.links.open[self.user]
            self.links.messenger.link_down(self)

    def abort(self) -> None:
        self.aborted = True
        self.close()


class FakeLinks:
    """Direct links that open when the test says the peer is reachable."""

    def __init__(self, messenger: Messenger) -> None:
        self.messenger = messenger
        self.reachable: set[str] = set()
        self.open: dict[str, FakeLink] = {}
        self.connects: list[tuple[str, str, int, str]] = []
        self.listening = False

    def listen(self) -> Deferred[int]:
        self.listening = True
        return succeed(7001)

    def stop_listening(self) -> Deferred[None]:
        self.listening = False
        return succeed(None)

    def connect(self, user: str, host: str, port: int, fingerprint: str) -> Deferred[FakeLink]:
        self.connects.append((user, host, port, fingerprint))
        if user not in self.reachable:
            return fail(ConnectionRefusedError())
        return succeed(self.accept(user))

    def accept(self, user: str) -> FakeLink:
        link = self.open[user] = FakeLink(self, user)
        self.messenger.link_up(link)
        return link

    def get(self, user: str) -> FakeLink | None:
        return self.open.get(user)

    def session_link(self, user: str) -> FakeLink | None:
        link = self.open.get(user)
        return link if link is not None and link.session else None

    def close(self, user: str) -> None:
        link = self.open.get(user)
        if link is not None:
            link.close()

    def close_all(self) -> None:
        for user in list(self.open):
            self.close(user)


class View:
    def __init__(self) -> None:
        self.shown: list[tuple[str, dict[str, Any]]] = []
        self.output: Deferred[None] | None = None  # while set, what was shown has not gone out yet

    def show(self, event: str, **fields: Any) -> None:
        self.shown.append((event, fields))

    def drained(self) -> Deferred[None]:
        if self.output is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.output.addCallback(lambda _: d.callback(None))
        return d

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for event, fields in self.shown if event == name]

    def messages(self) -> list[tuple[str, str]]:
        return [(f["user"], f["text"]) for f in self.events("message")]


class MessengerTestCase(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.path = self.mktemp()
        self.me = Person("alice")
        self.bob = Person("bob")
        self.carol = Person("carol")
        self.directory = Directory()
        self.directory.people = {"bob": self.bob, "carol": self.carol}
        self.passwords: list[str | None] = ["correct horse"]
        self.asked: list[bool] = []
        self.new_messenger()

    def new_messenger(self) -> None:
        self.history = History(self.path)
        self.successResultOf(self.history.open())
        self.addCleanup(self.history.close)
        self.view = View()
        self.messenger = Messenger(
            "alice", self.me.identity, self.me.envelope_key, self.history, self.clock, self.view, self.password, "server:5000"
        )
        self.links = FakeLinks(self.messenger)
        self.messenger.attach(self.directory, self.links)
        self.finished = self.messenger.when_finished()

    def password(self, retry: bool) -> Deferred[str | None]:
        self.asked.append(retry)
        return succeed(self.passwords.pop(0) if self.passwords else None)

    def start(self, login: bool = True) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.messenger.run()))
        if login:
            self.successResultOf(self.messenger.server_connected())
            self.assertTrue(self.messenger.logged_in)

    def command(self, name: str, *args: Any) -> Any:
        return self.successResultOf(Deferred.fromCoroutine(getattr(self.messenger, name)(*args)))

    def command_error(self, name: str, *args: Any) -> CommandError:
        return self.failureResultOf(Deferred.fromCoroutine(getattr(self.messenger, name)(*args)), CommandError).value

    def seal_from(self, person: Person, msg_id: str, payload: dict[str, Any], signer: Person | None = None) -> str:
        return crypto.seal(
            (signer or person).identity, person.name, "alice", self.me.public, msg_id, json.dumps(payload).encode()
        )

    def deliver(self, seq: int, person: Person, msg_id: str, payload: dict[str, Any], signer: Person | None = None) -> None:
        envelope = self.seal_from(person, msg_id, payload, signer)
        self.messenger.server_event(
            Event("envelope", {"seq": seq, "from": person.name, "msg_id": msg_id, "envelope": envelope, "sent_at": 1.0})
        )

    def open_sent(self, index: int, person: Person) -> dict[str, Any]:
        """Open what alice handed to the server, as its recipient would."""
        item = self.directory.sent[index]
        payload, fingerprint = crypto.open_sealed(
            item["envelope"], person.envelope_key, "alice", person.name, item["msg_id"], self.me.fingerprint
        )
        return json.loads(payload)

    def open_receipt(self, index: int) -> dict[str, Any]:
        """Open a receipt alice sent bob through the server, as bob would."""
        item = self.directory.sent[index]
        payload, _ = crypto.open_sealed(
            item["envelope"], self.bob.envelope_key, "alice", "bob", item["msg_id"], self.me.fingerprint
        )
        return json.loads(payload)

    def statuses(self, peer: str) -> list[tuple[str, str]]:
        entries = self.successResultOf(self.history.conversation(peer, 100))
        return [(e.text, e.status) for e in entries if e.outgoing]


class LoginTests(MessengerTestCase):
    def test_first_run_registers_then_resumes(self) -> None:
        """A first run registers the account with this peer's keys, logs in with the token the
        registration gave (the server hashes the password once), and says welcome."""
        self.start()
        self.assertEqual(self.directory.ops()[:3], ["register", "resume", "blocks"])
        register = self.directory.requests[0][1]
        self.assertEqual(register["fingerprint"], self.me.fingerprint)
        self.assertEqual(register["envelope_key"], self.me.public)
        resume = self.directory.requests[1][1]
        self.assertEqual((resume["username"], resume["token"], resume["port"]), ("alice", "R" * 43, 7001))
        self.assertEqual(self.view.events("welcome"), [{"user": "alice", "mailbox": 0}])
        self.assertEqual(self.view.events("reconnected"), [])
        self.assertTrue(self.successResultOf(self.history.is_registered("server:5000")))
        self.directory.requests.clear()
        self.messenger.server_lost()
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual((self.directory.ops()[0], self.directory.requests[0][1]["token"]), ("resume", "T" * 43))

    def test_first_run_without_a_token_logs_in(self) -> None:
        """A registration that gives no token (an older server) is followed by a password login
        with this peer's keys."""
        self.directory.answers["register"] = {"username": "alice"}
        self.start()
        self.assertEqual(self.directory.ops()[:3], ["register", "login", "blocks"])
        login = self.directory.requests[1][1]
        self.assertEqual((login["password"], login["port"], login["fingerprint"]), ("correct horse", 7001, self.me.fingerprint))
        self.assertEqual(self.view.events("welcome"), [{"user": "alice", "mailbox": 0}])

    def test_first_run_token_refused_logs_in(self) -> None:
        """A registration's token refused all the same: the password logs in, without asking again."""
        self.directory.answers["resume"] = RequestError("invalid_token", "unknown")
        self.start()
        self.assertEqual(self.directory.ops()[:4], ["register", "resume", "login", "blocks"])
        self.assertEqual(self.directory.requests[2][1]["password"], "correct horse")
        self.assertEqual(self.asked, [False])
        self.assertEqual(self.view.events("welcome"), [{"user": "alice", "mailbox": 0}])

    def test_closed_registration_said_then_login(self) -> None:
        """On a server that takes no new accounts the first run says so, then logs in with the
        password (an account the operator made); once that worked, later runs log in at once. A
        login that fails leaves the next run to try registering again."""
        self.directory.answers["register"] = RequestError("registration_closed", "closed")
        self.directory.answers["login"] = [RequestError("bad_credentials", "no")]
        self.start(login=False)
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual(self.directory.ops()[:2], ["register", "login"])
        self.assertEqual(self.view.events("registration_closed"), [{"user": "alice", "server": "server:5000"}])
        self.assertFalse(self.successResultOf(self.history.is_registered("server:5000")))
        self.directory.requests.clear()
        self.passwords = ["correct horse"]
        self.new_messenger()
        self.start()
        self.assertEqual(self.directory.ops()[:2], ["register", "login"])
        self.assertTrue(self.successResultOf(self.history.is_registered("server:5000")))
        self.directory.requests.clear()
        self.passwords = ["correct horse"]
        self.new_messenger()
        self.start()
        self.assertEqual(self.directory.ops()[0], "login")
        self.assertEqual(self.view.events("registration_closed"), [])

    def test_existing_account_logs_in(self) -> None:
        """username_taken (an imported account) falls through to login; a second run does not register."""
        self.directory.answers["register"] = RequestError("username_taken", "taken")
        self.start()
        self.assertEqual(self.directory.ops()[:2], ["register", "login"])
        self.directory.requests.clear()
        self.new_messenger()
        self.passwords = ["correct horse"]
        self.start()
        self.assertEqual(self.directory.ops()[0], "login")

    def test_name_taken_in_other_case_exits(self) -> None:
        """A name that is another user's but for case is not tried as a login (which could only say
        "wrong password"): the peer says whose it is and exits."""
        message = "the name 'alice' is taken, as 'Alice': names that differ only in case are one name"
        self.directory.answers["register"] = RequestError("username_taken_in_other_case", message)
        self.start(login=False)
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual(self.directory.ops(), ["register"])
        self.assertEqual(self.view.events("login_failed"),
                         [{"user": "alice", "code": "username_taken_in_other_case", "message": message}])
        self.assertEqual(self.successResultOf(self.finished), 1)

    def test_registration_password_typed_twice(self) -> None:
        """On a terminal the password is typed a second time before the account is made with it
        (a typo would lock the user out); two that differ are said, and both are asked again."""
        confirmations = ["correct horze", "battery staple"]
        self.passwords = ["correct horse", "battery staple"]
        self.messenger._confirm = lambda: succeed(confirmations.pop(0))
        self.start()
        self.assertEqual(len(self.view.events("passwords_differ")), 1)
        self.assertEqual(self.asked, [False, True])
        self.assertEqual([args["password"] for op, args in self.directory.requests if op == "register"], ["battery staple"])
        self.assertEqual(confirmations, [])

    def test_short_password_refused_before_typed_twice(self) -> None:
        """On a terminal a password outside the protocol's 8 to 1024 characters is refused at once,
        as the server would, before it is asked a second time."""
        confirmations = ["battery staple"]
        self.passwords = ["short", "battery staple"]
        self.messenger._confirm = lambda: succeed(confirmations.pop(0))
        self.start()
        self.assertEqual(self.view.events("weak_password"), [{"message": "a password has 8 to 1024 characters"}])
        self.assertEqual([args["password"] for op, args in self.directory.requests if op == "register"], ["battery staple"])
        self.assertEqual(confirmations, [])

    def test_new_server_certificate_registers_again(self) -> None:
        """A server certificate trusted on first use (a new server, or one that lost its data) is
        said, and the next login tries registering first: an account the server lost is made
        anew rather than refused as a wrong password; one it has still logs in."""
        self.start()
        self.messenger.server_pinned("ab" * 32)
        self.assertEqual(self.view.events("server_pinned"), [{"server": "server:5000", "fingerprint": "ab" * 32}])
        self.assertFalse(self.successResultOf(self.history.is_registered("server:5000")))
        self.directory.requests.clear()
        self.messenger.server_lost()
        self.messenger._token = None  # the new server knows no token of ours
        self.passwords = ["correct horse"]
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual(self.directory.ops()[:2], ["register", "resume"])
        self.assertTrue(self.successResultOf(self.history.is_registered("server:5000")))

    def test_wrong_password_asks_again(self) -> None:
        """A wrong password says so and asks again; the next one logs in."""
        self.passwords = ["wrong", "right"]
        self.directory.answers["register"] = RequestError("username_taken", "taken")
        self.directory.answers["login"] = [RequestError("bad_credentials", "no")]
        self.start()
        self.assertEqual(self.asked, [False, True])
        self.assertEqual(len(self.view.events("wrong_password")), 1)
        logins = [args["password"] for op, args in self.directory.requests if op == "login"]
        self.assertEqual(logins, ["wrong", "right"])
        self.assertNoResult(self.finished)

    def test_no_other_password_exits(self) -> None:
        """With no other password to try (a password file) a refusal ends the peer with status 1."""
        self.directory.answers["register"] = RequestError("username_taken", "taken")
        self.directory.answers["login"] = [RequestError("bad_credentials", "no")]
        self.start(login=False)
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual(self.successResultOf(self.finished), 1)
        self.assertEqual([e for e, _ in self.view.shown], ["wrong_password", "login_gave_up"])
        self.assertFalse(self.messenger.logged_in)

    def test_finished_before_ready(self) -> None:
        """A login that cannot work has the peer finished by the time it is ready, so that the
        console never starts running the commands typed ahead."""
        seen = []
        self.messenger.when_ready().addCallback(lambda _: seen.append(self.finished.called))
        self.directory.answers["register"] = RequestError("username_taken", "taken")
        self.directory.answers["login"] = [RequestError("bad_credentials", "no")]
        self.start(login=False)
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual(seen, [True])

    def test_no_password_at_all_exits(self) -> None:
        """Without any password (an empty password file, input closed) the peer says so and ends
        with status 1 before it connects."""
        self.passwords = []
        self.start(login=False)
        self.assertEqual(self.view.shown, [("no_password", {})])
        self.assertEqual(self.successResultOf(self.finished), 1)
        self.assertEqual(self.directory.started, 0)

    def test_no_listening_still_online(self) -> None:
        """When direct links cannot be accepted (the port is taken) the peer says so and goes
        online anyway, telling the server it has no port."""
        self.links.listen = lambda: fail(CannotListenError("127.0.0.1", 7001, OSError("in use")))
        self.start()
        self.assertEqual(len(self.view.events("listen_failed")), 1)
        self.assertEqual(len(self.flushLoggedErrors(CannotListenError)), 1)
        self.assertEqual([args["port"] for op, args in self.directory.requests if op == "resume"], [0])

    def test_blocked_locked_already_online_exit(self) -> None:
        """The third failure, a login during the block, and a user already online each say so and exit."""
        for code, event in [
            ("too_many_attempts", "too_many_attempts"),
            ("account_locked", "account_locked"),
            ("already_online", "already_online"),
        ]:
            self.passwords = ["pw"]
            self.new_messenger()
            self.directory.answers["register"] = RequestError("username_taken", "taken")
            self.directory.answers["login"] = [RequestError(code, "the server's words")]
            self.start(login=False)
            self.successResultOf(self.messenger.server_connected())
            self.assertEqual(self.successResultOf(self.finished), 1, code)
            self.assertEqual(self.view.events(event)[0]["message"], "the server's words")

    def test_reconnect_resumes_without_password(self) -> None:
        """After a lost connection the peer resumes with its token and never sends the password again."""
        self.start()
        self.messenger.server_lost()
        self.assertEqual(self.view.events("server_lost"), [{}])
        self.directory.requests.clear()
        self.successResultOf(self.messenger.server_connected())
        op, args = self.directory.requests[0]
        self.assertEqual((op, args["token"]), ("resume", "T" * 43))
        self.assertNotIn("login", self.directory.ops())
        self.assertEqual(self.view.events("reconnected"), [{"user": "alice", "mailbox": 0}])

    def test_expired_token_logs_in_again(self) -> None:
        """An invalid token falls back to a password login when a password is available."""
        self.start()
        self.passwords = ["again"]
        self.directory.answers["resume"] = RequestError("invalid_token", "expired")
        self.directory.requests.clear()
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual(self.directory.ops()[:2], ["resume", "login"])
        self.assertEqual(self.directory.requests[1][1]["password"], "again")
        self.assertTrue(self.messenger.logged_in)

    def test_expired_token_without_password_exits(self) -> None:
        """With no password available an expired session says so and exits."""
        self.start()
        self.directory.answers["resume"] = RequestError("invalid_token", "expired")
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual(self.view.events("session_expired"), [{"user": "alice"}])
        self.assertEqual(self.successResultOf(self.finished), 1)

    def test_unusable_token_is_not_kept(self) -> None:
        """A login answer whose token the server would not take back (not a string, empty, too
        long) is not kept: the next connection logs in with the password, asked for again, instead
        of resuming with it for ever."""
        for token in [12345, "", "x" * 257, ["T"], None]:
            self.passwords = ["correct horse"]
            self.asked.clear()
            self.new_messenger()
            self.directory.answers["register"] = RequestError("username_taken", "taken")
            self.directory.answers["login"] = [{"username": "alice", "token": token, "mailbox": 0}]
            self.start()
            self.passwords = ["correct horse"]
            self.directory.requests.clear()
            self.messenger.server_lost()
            self.successResultOf(self.messenger.server_connected())
            self.assertEqual(self.directory.ops()[:2], ["login", "blocks"], repr(token))
            self.assertEqual(self.directory.requests[0][1]["password"], "correct horse")
            self.assertEqual(self.asked, [False, False])
            self.assertTrue(self.messenger.logged_in)
            self.directory.requests.clear()
            self.messenger.server_lost()
            self.successResultOf(self.messenger.server_connected())
            self.assertEqual(self.directory.requests[0][1].get("token"), "T" * 43)
            self.assertNoResult(self.finished)

    def test_unusable_registration_token_logs_in(self) -> None:
        """A registration answer with a token that is not one logs in with the password."""
        self.directory.answers["register"] = {"username": "alice", "token": 7}
        self.start()
        self.assertEqual(self.directory.ops()[:2], ["register", "login"])

    def test_no_token_and_no_password_exits(self) -> None:
        """Without a token to resume and no password to give (a password file gone), a reconnect
        says so and exits rather than sending an empty login."""
        self.directory.answers["register"] = {"username": "alice"}
        self.directory.answers["login"] = [{"username": "alice", "mailbox": 0}]
        self.start()
        self.directory.requests.clear()
        self.messenger.server_lost()
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual(self.directory.ops(), [])
        self.assertEqual(self.view.events("session_expired"), [{"user": "alice"}])
        self.assertEqual(self.successResultOf(self.finished), 1)

    def test_busy_login_waits_and_tries_again(self) -> None:
        """A login refused for now (too many password attempts from this address, the server busy
        hashing passwords, its store failing) says so, lets the user work offline, and tries again
        on the same connection after RETRY_DELAY, with the same password."""
        for op, code in [("login", "rate_limited"), ("login", "internal_error"), ("register", "rate_limited"),
                         ("resume", "internal_error")]:
            self.passwords = ["correct horse"]
            self.asked.clear()
            self.path = self.mktemp()  # a first run each time: register, then resume with its token
            self.new_messenger()
            self.directory.requests.clear()
            ready = self.messenger.when_ready()
            if op == "login":
                self.directory.answers["register"] = RequestError("username_taken", "taken")
            self.directory.answers[op] = [RequestError(code, "the server's words")]
            self.start(login=False)
            login = self.messenger.server_connected()
            self.assertEqual(self.view.events("welcome"), [], op)
            self.assertNoResult(login)
            self.assertEqual(self.view.events("login_delayed"),
                             [{"code": code, "message": "the server's words", "seconds": RETRY_DELAY}], op)
            self.successResultOf(ready)
            self.assertFalse(self.messenger.logged_in)
            before = len(self.directory.requests)
            self.clock.advance(RETRY_DELAY - 0.1)
            self.assertEqual(len(self.directory.requests), before)
            self.clock.advance(0.1)
            self.successResultOf(login)
            self.assertTrue(self.messenger.logged_in, op)
            self.assertEqual(self.asked, [False])
            self.assertNoResult(self.finished)
            self.assertEqual(len(self.view.events("welcome")), 1)

    def test_busy_login_said_once(self) -> None:
        """The same refusal again is not said again at each try; another one is."""
        self.directory.answers["register"] = RequestError("username_taken", "taken")
        busy = RequestError("rate_limited", "busy")
        self.directory.answers["login"] = [busy, busy, RequestError("internal_error", "disk full")]
        self.start(login=False)
        login = self.messenger.server_connected()
        self.clock.advance(RETRY_DELAY)
        self.assertEqual([e["message"] for e in self.view.events("login_delayed")], ["busy"])
        self.clock.advance(RETRY_DELAY)
        self.assertEqual([e["message"] for e in self.view.events("login_delayed")], ["busy", "disk full"])
        self.clock.advance(RETRY_DELAY)
        self.successResultOf(login)
        self.assertEqual(self.directory.ops().count("login"), 4)
        self.assertTrue(self.messenger.logged_in)

    def test_busy_login_wait_ends_with_the_connection(self) -> None:
        """The wait before trying again ends when the connection is lost (the next one logs in
        afresh) or the peer stops: no second login from the old wait."""
        self.directory.answers["register"] = RequestError("username_taken", "taken")
        self.directory.answers["login"] = [RequestError("rate_limited", "wait")]
        self.start(login=False)
        first = self.messenger.server_connected()
        self.messenger.server_lost()
        self.successResultOf(first)
        self.successResultOf(self.messenger.server_connected())
        self.assertTrue(self.messenger.logged_in)
        self.directory.requests.clear()
        self.clock.advance(RETRY_DELAY)
        self.assertEqual(self.directory.requests, [])
        self.directory.answers["resume"] = [RequestError("rate_limited", "wait")]
        self.messenger.server_lost()
        waiting = self.messenger.server_connected()
        self.assertNoResult(waiting)
        self.successResultOf(Deferred.fromCoroutine(self.messenger.stop()))
        self.successResultOf(waiting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unexpected_resume_refusal_exits(self) -> None:
        """A resume refused for a reason no retry changes says why and exits (it used to reconnect
        silently for ever)."""
        self.start()
        self.directory.answers["resume"] = RequestError("bad_request", "token: must be a string")
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual(self.view.events("login_failed"),
                         [{"user": "alice", "code": "bad_request", "message": "token: must be a string"}])
        self.assertEqual(self.successResultOf(self.finished), 1)

    def test_unreachable_server_makes_ready(self) -> None:
        """A server that cannot be reached is reported and commands may run (offline)."""
        ready = self.messenger.when_ready()
        self.start(login=False)
        self.assertNoResult(ready)
        self.messenger.server_unreachable("connection refused")
        self.successResultOf(ready)
        self.assertEqual(self.view.events("server_unreachable"), [{"server": "server:5000", "reason": "connection refused"}])

    def test_block_list_synchronised(self) -> None:
        """At login the local block flags follow the server's list."""
        self.directory.answers["blocks"] = {"users": ["carol"]}
        self.start()
        self.assertTrue(self.successResultOf(self.history.contacts())["carol"].blocked)


class AfterLoginTests(MessengerTestCase):
    def test_logged_out_before_the_work_after_login_is_done(self) -> None:
        """A connection that closes right after the login, before the work that follows it (the
        block list, who is online, the outbox) is done, as when a script's input is empty and the
        peer logs out at once, logs no error: the next login does that work again."""
        self.directory.answers["blocks"] = NotConnected("Connection was closed cleanly.")
        self.start()
        self.assertEqual(self.flushLoggedErrors(), [])


class SendTests(MessengerTestCase):
    def test_direct_when_reachable(self) -> None:
        """An online, reachable recipient gets the message over a direct link; delivered on its ack."""
        self.directory.online.add("bob")
        self.links.reachable.add("bob")
        self.start()
        self.command("send", "bob", "hi bob")
        self.assertEqual(self.links.connects, [("bob", "127.0.0.1", 7000, self.bob.fingerprint)])
        [frame] = self.links.open["bob"].sent
        self.assertEqual((frame["type"], frame["text"], frame["private"]), ("msg", "hi bob", False))
        self.assertEqual(self.directory.sent, [])
        self.assertEqual(self.statuses("bob"), [("hi bob", PENDING)])
        self.messenger.link_frame(self.links.open["bob"], {"type": "ack", "msg_ids": [frame["msg_id"]]})
        self.assertEqual(self.statuses("bob"), [("hi bob", DELIVERED)])

    def test_silent_link_dropped(self) -> None:
        """A direct link that acknowledges nothing for ACK_WAIT (its other end vanished: a laptop
        closed, a network changed) is dropped rather than holding the messages until TCP gives up,
        a quarter of an hour later: they go again, through the server when bob is gone."""
        self.directory.online.add("bob")
        self.links.reachable.add("bob")
        self.start()
        self.command("send", "bob", "one")
        link = self.links.open["bob"]
        self.clock.advance(ACK_WAIT / 2)
        self.command("send", "bob", "two")
        self.assertEqual([f["text"] for f in link.sent], ["one", "two"])
        self.directory.online.discard("bob")
        self.links.reachable.discard("bob")
        self.clock.advance(ACK_WAIT / 2 - 0.1)
        self.assertFalse(link.aborted)
        self.clock.advance(0.1)
        self.assertTrue(link.aborted)
        self.assertEqual([self.open_sent(i, self.bob)["text"] for i in range(2)], ["one", "two"])
        self.assertEqual(self.statuses("bob"), [("one", SENT), ("two", SENT)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_slow_link_kept(self) -> None:
        """A link whose receiver acknowledges slowly but steadily (busy with many messages) is not
        taken for dead: only one that acknowledges none of what it carried in ACK_WAIT is dropped."""
        self.directory.online.add("bob")
        self.links.reachable.add("bob")
        self.start()
        for n in range(3):
            self.command("send", "bob", f"m{n}")
        link = self.links.open["bob"]
        self.clock.advance(ACK_WAIT - 1)
        self.messenger.link_frame(link, {"type": "ack", "msg_ids": [link.sent[0]["msg_id"]]})
        self.clock.advance(1)
        self.assertFalse(link.aborted)
        self.clock.advance(ACK_WAIT - 1)
        self.messenger.link_frame(link, {"type": "ack", "msg_ids": [link.sent[1]["msg_id"]]})
        self.clock.advance(1)
        self.assertFalse(link.aborted)
        self.clock.advance(ACK_WAIT)  # then nothing more: dead after all
        self.assertTrue(link.aborted)
        self.assertEqual(self.statuses("bob")[:2], [("m0", DELIVERED), ("m1", DELIVERED)])
        self.assertEqual([f["text"] for f in self.links.open["bob"].sent], ["m2"])  # again, on a new link

    def test_link_window(self) -> None:
        """At most LINK_WINDOW messages travel over a link unacknowledged: the rest wait on disk
        (a contact whose peer takes them slowly would otherwise have all of them wait in the
        link's buffer), and go, in order, as acks make room."""
        self.patch(messenger_module, "LINK_WINDOW", 2)
        self.directory.online.add("bob")
        self.links.reachable.add("bob")
        self.start()
        for n in range(5):
            self.command("send", "bob", f"m{n}")
        link = self.links.open["bob"]
        self.assertEqual([f["text"] for f in link.sent], ["m0", "m1"])
        self.messenger.link_frame(link, {"type": "ack", "msg_ids": [link.sent[0]["msg_id"]]})
        self.assertEqual([f["text"] for f in link.sent], ["m0", "m1", "m2"])
        self.messenger.link_frame(link, {"type": "ack", "msg_ids": [f["msg_id"] for f in link.sent[1:]]})
        self.assertEqual([f["text"] for f in link.sent], ["m0", "m1", "m2", "m3", "m4"])
        self.messenger.link_frame(link, {"type": "ack", "msg_ids": [f["msg_id"] for f in link.sent[3:]]})
        self.assertEqual([status for _, status in self.statuses("bob")], [DELIVERED] * 5)

    def test_no_overtaking_on_another_link(self) -> None:
        """Messages to one user never travel over two links at once: with one on its way over a
        link, the next ones wait rather than take a newer link (bob's own link to alice, say), which
        could deliver them first; they go once it is acknowledged, or again in order once its link
        is down."""
        self.directory.online.add("bob")
        self.links.reachable.add("bob")
        self.start()
        self.command("send", "bob", "one")
        first = self.links.open["bob"]
        second = self.links.accept("bob")  # bob connected to alice meanwhile: the newest link
        self.command("send", "bob", "two")
        self.assertEqual(([f["text"] for f in first.sent], second.sent), (["one"], []))
        self.messenger.link_frame(first, {"type": "ack", "msg_ids": [first.sent[0]["msg_id"]]})
        self.assertEqual([f["text"] for f in second.sent], ["two"])
        self.command("send", "bob", "three")
        third = self.links.accept("bob")
        self.command("send", "bob", "four")
        self.assertEqual(third.sent, [])
        second.close()  # "two" and "three" were on it, unacknowledged: again, in order, then "four"
        self.assertEqual([f["text"] for f in third.sent], ["two", "three", "four"])

    def test_stop_ends_the_ack_checks(self) -> None:
        """Stopping leaves no check of a link's acks behind."""
        self.directory.online.add("bob")
        self.links.reachable.add("bob")
        self.start()
        self.command("send", "bob", "one")
        self.successResultOf(Deferred.fromCoroutine(self.messenger.stop()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_acknowledging_link_kept(self) -> None:
        """A link whose acks come keeps carrying messages, however long it lives; each message
        gets at least ACK_WAIT for its ack."""
        self.directory.online.add("bob")
        self.links.reachable.add("bob")
        self.start()
        link = None
        for n in range(4):
            self.command("send", "bob", f"m{n}")
            link = self.links.open["bob"]
            self.clock.advance(ACK_WAIT - 1)
            self.messenger.link_frame(link, {"type": "ack", "msg_ids": [link.sent[-1]["msg_id"]]})
        self.command("send", "bob", "late")
        self.clock.advance(ACK_WAIT * 1.5)
        self.assertFalse(link.aborted)  # the last check came before "late" had waited ACK_WAIT
        self.messenger.link_frame(link, {"type": "ack", "msg_ids": [link.sent[-1]["msg_id"]]})
        self.clock.advance(ACK_WAIT * 2)
        self.assertFalse(link.aborted)
        self.assertEqual(self.directory.sent, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual({status for _, status in self.statuses("bob")}, {DELIVERED})

    def test_unusable_address_not_dialled(self) -> None:
        """A lookup answer with no usable address (port 0, a host that is not a string) is not
        dialled: the message goes sealed through the server."""
        self.directory.online.add("bob")
        self.links.reachable.add("bob")
        self.start()
        keys = {"user": "bob", "fingerprint": self.bob.fingerprint, "envelope_key": self.bob.public}
        self.directory.answers["lookup"] = {**keys, "host": "127.0.0.1", "port": 0}
        self.command("send", "bob", "one")
        # bob's receipt: the next message may take a direct link again, and looks bob up
        self.deliver(1, self.bob, "r1", {"kind": "receipt", "msg_ids": [self.directory.sent[0]["msg_id"]]})
        self.directory.answers["lookup"] = {**keys, "host": 7, "port": 7000}
        self.command("send", "bob", "two")
        self.assertEqual(self.links.connects, [])
        self.assertEqual([self.open_sent(i, self.bob)["text"] for i in (0, 1)], ["one", "two"])

    def test_sealed_through_server_when_no_link(self) -> None:
        """Without a direct link the message is sealed to the recipient and signed; the server cannot read it."""
        self.directory.online.add("bob")
        self.start()
        self.command("send", "bob", "hi bob")
        self.assertEqual(len(self.links.connects), 1)  # tried direct first
        self.assertNotIn("hi bob", self.directory.sent[0]["envelope"])
        payload = self.open_sent(0, self.bob)
        self.assertEqual((payload["kind"], payload["text"]), ("msg", "hi bob"))
        self.assertEqual(self.statuses("bob"), [("hi bob", SENT)])
        self.assertEqual(self.view.events("stored"), [])

    def test_offline_recipient_stored(self) -> None:
        """A message to an offline user is stored by the server (no direct attempt), and the user is
        told so once, not for every message, until the recipient has been back online."""
        self.start()
        self.command("send", "bob", "one")
        self.command("send", "bob", "two")
        self.assertEqual(self.links.connects, [])
        self.assertEqual([self.open_sent(i, self.bob)["text"] for i in range(2)], ["one", "two"])
        self.assertEqual(self.view.events("stored"), [{"user": "bob"}])
        self.messenger.server_event(Event("presence", {"online": ["bob"], "offline": {}}))
        self.messenger.server_event(Event("presence", {"online": [], "offline": {"bob": "logout"}}))
        self.command("send", "bob", "three")
        self.assertEqual(self.view.events("stored"), [{"user": "bob"}, {"user": "bob"}])

    def test_receipt_marks_delivered(self) -> None:
        """A sealed receipt from the recipient marks the message delivered; one from someone else does not."""
        self.start()
        self.command("send", "bob", "hi")
        msg_id = self.directory.sent[0]["msg_id"]
        self.deliver(1, self.carol, "r-1", {"kind": "receipt", "msg_ids": [msg_id]})
        self.assertEqual(self.statuses("bob"), [("hi", SENT)])
        self.deliver(2, self.bob, "r-2", {"kind": "receipt", "msg_ids": [msg_id]})
        self.assertEqual(self.statuses("bob"), [("hi", DELIVERED)])
        self.assertEqual(self.directory.acked, [1, 2])

    def test_refused_before_storing(self) -> None:
        """Unknown users, yourself, bad names, empty and oversized text are refused and nothing is stored."""
        self.directory.blocked_me.add("carol")
        self.start()
        cases = [
            (("zed", "hi"), "unknown_user"),
            (("carol", "hi"), "blocked_by_user"),
            (("alice", "hi"), "yourself"),
            (("bad name", "hi"), "invalid_user"),
            (("bob", "   "), "empty_message"),
            (("bob", "x" * 16001), "too_long"),
            (("bob", "\x01" * 16000), "too_long_bytes"),
        ]
        for args, code in cases:
            self.assertEqual(self.command_error("send", *args).code, code, args)
        self.assertEqual(self.successResultOf(self.history.outbox()), [])

    def test_queued_while_offline_then_in_order(self) -> None:
        """Messages written while not connected wait as pending and go out in order after login."""
        self.start(login=False)
        for text in ["one", "two", "three"]:
            self.command("send", "bob", text)
        self.assertEqual(len(self.view.events("queued")), 3)
        self.assertEqual(self.statuses("bob"), [("one", PENDING), ("two", PENDING), ("three", PENDING)])
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual([self.open_sent(i, self.bob)["text"] for i in range(3)], ["one", "two", "three"])
        self.assertEqual(self.statuses("bob"), [("one", SENT), ("two", SENT), ("three", SENT)])

    def test_outbox_survives_restart(self) -> None:
        """Pending messages are on disk: a new messenger on the same history sends them after login."""
        self.start(login=False)
        self.command("send", "bob", "before the crash")
        self.new_messenger()
        self.passwords = ["correct horse"]
        self.start()
        self.assertEqual(self.open_sent(0, self.bob)["text"], "before the crash")

    def test_rate_limited_retried_soon(self) -> None:
        """A send the server's rate limit refused stays pending and is retried after a moment,
        keeping the order, with nothing to tell (the peer paces itself by the server's rate; the
        user's own lists and blocks take from it too)."""
        self.start()
        self.directory.answers["send"] = [RequestError("rate_limited", "slow down")] * 2
        self.command("send", "bob", "one")
        self.command("send", "bob", "two")
        self.assertEqual(self.statuses("bob"), [("one", PENDING), ("two", PENDING)])
        self.clock.advance(RATE_RETRY)
        self.assertEqual([self.open_sent(i, self.bob)["text"] for i in range(2)], ["one", "two"])
        self.assertEqual(self.view.events("send_delayed"), [])

    def test_outbox_read_a_page_at_a_time(self) -> None:
        """The outbox is read from the history a page at a time, not whole (a script may queue
        more than fits in memory); all of it still goes, in order."""
        self.patch(messenger_module, "OUTBOX_PAGE", 2)
        pages: list[int] = []
        outbox_page = self.history.outbox_page
        self.history.outbox_page = lambda *args: outbox_page(*args).addCallback(lambda page: pages.append(len(page)) or page)
        self.start(login=False)
        for i in range(5):
            self.command("send", "bob", f"m{i}")
        self.assertEqual(self.directory.sent, [])
        self.messenger.server_lost()
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual([self.open_sent(i, self.bob)["text"] for i in range(5)], [f"m{i}" for i in range(5)])
        self.assertEqual(max(pages), 2)

    def test_full_mailbox_said_once(self) -> None:
        """A recipient's full mailbox is said once while messages wait, not at every try, nor each
        time one of them goes through and the next finds it full again; said again when it
        happens again after all had gone."""
        self.start()
        full = RequestError("mailbox_full", "bob's mailbox is full")
        self.directory.answers["send"] = [full, full, None, full]
        for text in ("one", "two", "three"):
            self.command("send", "bob", text)
        self.clock.advance(RETRY_DELAY)
        self.assertEqual([e["code"] for e in self.view.events("send_delayed")], ["mailbox_full"])
        self.assertEqual(self.view.events("send_delayed")[0]["seconds"], RETRY_DELAY)
        self.clock.advance(RETRY_DELAY)
        self.assertEqual(self.open_sent(0, self.bob)["text"], "one")
        self.clock.advance(RETRY_DELAY)
        self.assertEqual([self.open_sent(i, self.bob)["text"] for i in range(3)], ["one", "two", "three"])
        self.assertEqual(len(self.view.events("send_delayed")), 1)
        self.directory.answers["send"] = [full]
        self.command("send", "bob", "four")
        self.assertEqual(len(self.view.events("send_delayed")), 2)
        self.clock.advance(RETRY_DELAY)
        self.assertEqual(self.open_sent(3, self.bob)["text"], "four")

    def test_permanent_refusal_fails(self) -> None:
        """A queued message to someone who blocked you meanwhile is marked failed, with a notice."""
        self.start(login=False)
        self.command("send", "bob", "hi")
        self.directory.blocked_me.add("bob")
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual(self.statuses("bob"), [("hi", FAILED)])
        self.assertEqual(self.view.events("send_failed")[0]["code"], "blocked_by_user")

    def test_too_long_for_the_server_fails(self) -> None:
        """A message the server's lines cannot hold (its max_line) is marked failed and said once;
        the messages after it go."""
        self.start()
        self.directory.answers["send"] = [RequestError("line_too_long", "too long for the server")]
        self.command("send", "bob", "long")
        self.command("send", "bob", "short")
        self.assertEqual(self.statuses("bob"), [("long", FAILED), ("short", SENT)])
        self.assertEqual([e["code"] for e in self.view.events("send_failed")], ["line_too_long"])

    def test_failed_direct_not_retried_at_once(self) -> None:
        """After a failed direct connection the next messages go straight through the server for a while."""
        self.directory.online.add("bob")
        self.start()
        self.command("send", "bob", "one")
        self.command("send", "bob", "two")
        self.assertEqual(len(self.links.connects), 1)
        self.deliver(1, self.bob, "r-1", {"kind": "receipt", "msg_ids": [m["msg_id"] for m in self.directory.sent]})
        self.clock.advance(DIRECT_RETRY)
        self.links.reachable.add("bob")
        self.command("send", "bob", "three")
        self.assertEqual(self.links.open["bob"].sent[-1]["text"], "three")

    def test_order_kept_across_routes(self) -> None:
        """
        After a message through the server, the next ones follow it there until bob's receipt,
        even with a direct link open: the link could overtake it. Without the server, the link
        carries them.
        """
        self.directory.online.add("bob")
        self.start()
        self.command("send", "bob", "one")
        self.links.accept("bob")  # bob opened a link meanwhile
        self.command("send", "bob", "two")
        self.assertEqual([self.open_sent(i, self.bob)["text"] for i in range(2)], ["one", "two"])
        self.assertEqual(self.links.open["bob"].sent, [])
        [one_id, two_id] = [m["msg_id"] for m in self.directory.sent]
        self.deliver(1, self.bob, "r-1", {"kind": "receipt", "msg_ids": [one_id]})
        self.command("send", "bob", "three")  # two has no receipt yet
        self.assertEqual(self.open_sent(2, self.bob)["text"], "three")
        self.deliver(2, self.bob, "r-2", {"kind": "receipt", "msg_ids": [two_id, self.directory.sent[2]["msg_id"]]})
        self.command("send", "bob", "four")
        self.assertEqual([f["text"] for f in self.links.open["bob"].sent], ["four"])
        self.assertEqual(len(self.directory.sent), 3)
        self.assertEqual(self.statuses("bob"), [("one", DELIVERED), ("two", DELIVERED), ("three", DELIVERED), ("four", PENDING)])
        # The link drops before four's ack: four goes again through the server, and five after it.
        # Then the server goes away: the open link takes the next one.
        self.links.close("bob")
        self.command("send", "bob", "five")
        self.assertEqual([self.open_sent(i, self.bob)["text"] for i in (3, 4)], ["four", "five"])
        self.links.accept("bob")
        self.directory.connected = False
        self.messenger.server_lost()
        self.command("send", "bob", "six")
        self.assertEqual([f["text"] for f in self.links.open["bob"].sent], ["six"])

    def test_lost_link_resends_unacknowledged(self) -> None:
        """A message written to a link that dropped before the ack goes out again (through the server)."""
        self.directory.online.add("bob")
        self.links.reachable.add("bob")
        self.start()
        self.command("send", "bob", "hi")
        self.links.reachable.clear()
        self.links.close("bob")
        self.assertEqual(self.open_sent(0, self.bob)["text"], "hi")

    def test_logout_waits_then_logs_out(self) -> None:
        """/logout logs out of the server, closes everything and finishes with status 0."""
        self.start()
        self.command("logout")
        self.assertEqual(self.directory.ops()[-1], "logout")
        self.assertEqual(self.successResultOf(self.finished), 0)
        self.assertFalse(self.links.listening)

    def test_logout_after_what_came_in_is_acked(self) -> None:
        """A /logout while a message that came in is still being stored waits for its
        acknowledgement to go first: sent after the logout, it was lost, and the server delivered
        the message again at the next login (counted as new in the welcome, shown nowhere)."""
        self.start()
        stored: Deferred[None] = Deferred()
        add_incoming = self.history.add_incoming
        self.patch(self.history, "add_incoming", lambda *a: stored.addCallback(lambda _: add_incoming(*a)))
        self.deliver(5, self.bob, "m1", {"kind": "msg", "text": "bye", "sent_at": 1.0})
        logged_out = Deferred.fromCoroutine(self.messenger.logout())
        self.assertNotIn("logout", self.directory.ops())
        stored.callback(None)
        self.assertEqual([op for op in self.directory.ops() if op in ("ack", "logout")], ["ack", "logout"])
        self.assertIsNone(self.successResultOf(logged_out))


class ReceiveTests(MessengerTestCase):
    def test_envelope_shown_stored_receipted_acked(self) -> None:
        """An envelope is stored and shown, a sealed receipt goes back, and only then is it acked."""
        self.start()
        self.deliver(5, self.bob, "m1", {"kind": "msg", "text": "hello alice", "sent_at": 1.0})
        self.assertEqual(self.view.messages(), [("bob", "hello alice")])
        self.assertEqual(self.directory.ops()[-2:], ["send", "ack"])
        self.assertEqual(self.directory.acked, [5])
        item = self.directory.sent[0]
        payload, _ = crypto.open_sealed(item["envelope"], self.bob.envelope_key, "alice", "bob", item["msg_id"], self.me.fingerprint)
        self.assertEqual(json.loads(payload), {"kind": "receipt", "msg_ids": ["m1"]})

    def test_taken_in_no_faster_than_shown(self) -> None:
        """While what was shown has not gone out (a slow terminal, a script that does not read), no
        further message is stored or acknowledged, from the server or over a link: the server keeps
        them, the link stops being read; nothing piles up in the peer's memory."""
        self.start()
        self.view.output = Deferred()
        self.deliver(5, self.bob, "m1", {"kind": "msg", "text": "one", "sent_at": 1.0})
        link = self.links.accept("carol")
        handled = self.messenger.link_frame(link, {"type": "msg", "msg_id": "c1", "text": "two", "sent_at": 1.0})
        self.assertEqual(self.view.messages(), [])
        self.assertEqual((self.directory.acked, link.sent), ([], []))
        self.assertNoResult(handled)
        self.view.output.callback(None)
        self.view.output = None
        self.assertEqual(self.view.messages(), [("bob", "one"), ("carol", "two")])
        self.assertEqual(self.directory.acked, [5])
        self.assertEqual(link.sent, [{"type": "ack", "msg_ids": ["c1"]}])
        self.successResultOf(handled)

    def test_server_past_its_window_dropped_then_sent_again(self) -> None:
        """A server that sends more than its window while nothing can be stored (the output not
        read): past MAX_INCOMING characters of envelopes in hand the next are dropped, not acked;
        once those in hand are stored and acked, the peer reconnects, for the server to send the
        rest again. A broken or compromised server cannot fill the peer's memory; nothing is lost."""
        size = len(self.seal_from(self.bob, "m0", {"kind": "msg", "text": "0", "sent_at": 1.0}))
        self.patch(messenger_module, "MAX_INCOMING", 3 * size + size // 2)  # signatures vary by a few bytes
        self.start()
        self.view.output = Deferred()
        for n in range(5):
            self.deliver(n + 1, self.bob, f"m{n}", {"kind": "msg", "text": str(n), "sent_at": 1.0})
        self.assertEqual(self.directory.reconnects, 0)
        self.view.output.callback(None)
        self.view.output = None
        self.assertEqual(self.view.messages(), [("bob", str(n)) for n in range(3)])
        self.assertEqual(self.directory.acked, [1, 2, 3])
        self.assertEqual((self.directory.reconnects, self.messenger._incoming_chars), (1, 0))
        for n in range(3, 5):  # as the server sends them again after the reconnection
            self.deliver(n + 1, self.bob, f"m{n}", {"kind": "msg", "text": str(n), "sent_at": 1.0})
        self.assertEqual(self.view.messages(), [("bob", str(n)) for n in range(5)])
        self.assertEqual(self.directory.reconnects, 1)

    def test_acks_and_receipts_fit_the_servers_lines(self) -> None:
        """A server set to short lines refuses a long ack or receipt (line_too_long, said by the
        server link before sending): they go in halves, and halves of those, until they fit."""
        too_long = RequestError("line_too_long", "too long for the server")
        ack, send = self.directory._ack, self.directory._send
        self.patch(self.directory, "_ack", lambda seqs: ack(seqs) if len(seqs) <= 2 else _raise(too_long))
        receipt_sizes = []

        def short_send(to: str, msg_id: str, envelope: str) -> dict[str, Any]:
            if msg_id.startswith("r-"):
                ids = self.open_receipt_envelope(envelope, msg_id)["msg_ids"]
                if len(ids) > 2:
                    raise too_long
                receipt_sizes.append(len(ids))
            return send(to, msg_id, envelope)

        self.patch(self.directory, "_send", short_send)
        self.start()
        self.view.output = Deferred()  # all five come in one batch
        for n in range(5):
            self.deliver(n + 1, self.bob, f"m{n}", {"kind": "msg", "text": str(n), "sent_at": 1.0})
        self.view.output.callback(None)
        self.view.output = None
        self.assertEqual(sorted(self.directory.acked), [1, 2, 3, 4, 5])
        self.assertEqual((sum(receipt_sizes), max(receipt_sizes)), (5, 2))

    def open_receipt_envelope(self, envelope: str, msg_id: str) -> dict[str, Any]:
        payload, _ = crypto.open_sealed(envelope, self.bob.envelope_key, "alice", "bob", msg_id, self.me.fingerprint)
        return json.loads(payload)

    def test_dropped_envelopes_not_overtaken(self) -> None:
        """Once one envelope past MAX_INCOMING is dropped, the rest on that connection are too, even
        when room was made meanwhile: one taken after it would overtake it. A connection lost
        meanwhile needs no reconnection of its own (the next sends all that was not acked)."""
        size = len(self.seal_from(self.bob, "m0", {"kind": "msg", "text": "0", "sent_at": 1.0}))
        self.patch(messenger_module, "MAX_INCOMING", 2 * size + size // 2)
        self.start()
        self.view.output = Deferred()
        for n in range(3):
            self.deliver(n + 1, self.bob, f"m{n}", {"kind": "msg", "text": str(n), "sent_at": 1.0})
        self.messenger._incoming_chars -= size  # as if room were made before the next came
        self.deliver(4, self.bob, "m3", {"kind": "msg", "text": "3", "sent_at": 1.0})
        self.messenger.server_lost()
        self.successResultOf(self.messenger.server_connected())
        self.view.output.callback(None)
        self.view.output = None
        self.assertEqual(self.view.messages(), [("bob", "0"), ("bob", "1")])
        self.assertEqual(self.directory.reconnects, 0)

    def test_late_message_says_when(self) -> None:
        """A message shown more than LATE seconds after it was written (kept by the server while
        this peer was away) carries its time, for the console to say when; a fresh one does not,
        nor one from a sender whose clock is a little behind."""
        self.start()
        now = self.clock.seconds()
        self.deliver(5, self.bob, "m1", {"kind": "msg", "text": "old", "sent_at": now - LATE - 1})
        self.deliver(6, self.bob, "m2", {"kind": "msg", "text": "new", "sent_at": now - LATE + 1})
        self.assertEqual(self.view.events("message"), [
            {"user": "bob", "text": "old", "private": False, "sent_at": now - LATE - 1},
            {"user": "bob", "text": "new", "private": False},
        ])

    def test_own_requests_marked_background(self) -> None:
        """What the peer asks the server on its own (the block list after login, a receipt, key
        checks and lookups for its outbox) is marked "background", so that it does not count as its
        user's activity for the server's idle timeout; what a command asks is not marked."""
        self.directory.online.add("bob")
        self.start()
        self.deliver(5, self.bob, "m1", {"kind": "msg", "text": "hi", "sent_at": 1.0})
        self.command("send", "bob", "hello")
        marked = [(op, args.get("background", False)) for op, args in self.directory.requests
                  if op in ("blocks", "send", "keys", "lookup")]
        self.assertEqual(marked, [
            ("blocks", True),  # after the login
            ("keys", True),  # m1 came signed with a key not pinned yet: checked with the directory
            ("keys", True),  # the key its receipt is sealed to
            ("send", True),  # the receipt for m1
            ("lookup", False),  # /msg checks the recipient before storing the message
            ("lookup", True),  # the outbox looks for a direct link
            ("keys", True),  # none: sealed through the server, keys checked first
            ("send", False),  # the message /msg wrote
        ])

    def test_ack_does_not_wait_for_receipt(self) -> None:
        """The server answers a receipt's send only when its recipient acks it: the envelope is
        acked meanwhile, and the next one is taken, so two peers never wait on each other."""
        self.start()
        self.directory.answers["send"] = Deferred()
        self.deliver(5, self.bob, "m1", {"kind": "msg", "text": "one", "sent_at": 1.0})
        self.deliver(6, self.bob, "m2", {"kind": "msg", "text": "two", "sent_at": 2.0})
        self.assertEqual(self.directory.acked, [5, 6])
        self.assertEqual(self.view.messages(), [("bob", "one"), ("bob", "two")])

    def test_receipts_go_together_while_one_is_on_its_way(self) -> None:
        """While a receipt to bob is on its way (the server answers it when bob's peer acks it),
        those for what bob sends meanwhile wait and go together in the next: a send for many
        messages rather than one each, which would take all of alice's message rate while bob
        writes to her as fast as the server lets him."""
        self.start()
        first: Deferred[dict[str, Any]] = Deferred()
        self.directory.answers["send"] = [first]
        for i in range(1, 5):
            self.deliver(i, self.bob, f"m{i}", {"kind": "msg", "text": f"text {i}", "sent_at": 1.0})
        [args] = [args for op, args in self.directory.requests if op == "send"]
        opened, _ = crypto.open_sealed(args["envelope"], self.bob.envelope_key, "alice", "bob", args["msg_id"], None)
        self.assertEqual(json.loads(opened), {"kind": "receipt", "msg_ids": ["m1"]})
        self.assertEqual(self.directory.acked, [1, 2, 3, 4])
        first.callback({"status": "delivered", "seq": 1, "duplicate": False})
        self.assertEqual([self.open_receipt(i) for i in range(len(self.directory.sent))],
                         [{"kind": "receipt", "msg_ids": ["m2", "m3", "m4"]}])
        self.assertEqual(self.successResultOf(self.history.owed_receipts()), {})
        self.deliver(5, self.bob, "m5", {"kind": "msg", "text": "later", "sent_at": 1.0})
        self.assertEqual(self.open_receipt(1), {"kind": "receipt", "msg_ids": ["m5"]})

    def test_receipt_owed_until_the_server_takes_it(self) -> None:
        """A receipt the server could not take stays owed and goes out after the next login."""
        self.start()
        self.directory.answers["send"] = NotConnected("down")
        self.deliver(5, self.bob, "m1", {"kind": "msg", "text": "hello", "sent_at": 1.0})
        self.assertEqual(self.directory.acked, [5])
        self.assertEqual(self.successResultOf(self.history.owed_receipts()), {"bob": ["m1"]})
        del self.directory.answers["send"]
        self.messenger.server_lost()
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual(self.open_receipt(0), {"kind": "receipt", "msg_ids": ["m1"]})
        self.assertEqual(self.successResultOf(self.history.owed_receipts()), {})

    def test_login_sends_owed_receipts_once(self) -> None:
        """After a login, the receipts owed from before it go out, and those for the mailbox
        the login brings go out once, as it is taken, even while they are still unanswered."""
        self.start()
        self.directory.answers["send"] = NotConnected("down")
        self.deliver(5, self.bob, "m1", {"kind": "msg", "text": "before", "sent_at": 1.0})
        self.messenger.server_lost()
        blocks: Deferred = Deferred()
        self.directory.answers.update(blocks=blocks, send=[Deferred()])  # m2's receipt: never answered
        self.successResultOf(self.messenger.server_connected())
        self.deliver(6, self.bob, "m2", {"kind": "msg", "text": "in the mailbox", "sent_at": 2.0})
        blocks.callback({"users": []})
        self.assertEqual([self.open_receipt(i) for i in range(len(self.directory.sent))],
                         [{"kind": "receipt", "msg_ids": ["m1"]}])
        # m1's refused first try, m2's unanswered one, m1's after the login
        self.assertEqual(self.directory.ops().count("send"), 3)

    def test_receipt_owed_across_a_restart(self) -> None:
        """A receipt owed when the peer stopped is sent after the restarted peer logs in."""
        self.start()
        self.directory.answers["send"] = NotConnected("down")
        self.deliver(5, self.bob, "m1", {"kind": "msg", "text": "hello", "sent_at": 1.0})
        del self.directory.answers["send"]
        self.passwords = ["correct horse"]
        self.new_messenger()
        self.start()
        self.assertEqual(self.open_receipt(0), {"kind": "receipt", "msg_ids": ["m1"]})
        self.assertEqual(self.view.messages(), [])  # only the receipt went out, nothing was shown again

    def test_receipt_retried_after_a_transient_refusal(self) -> None:
        """A receipt refused for now is sent again later: RATE_RETRY after the rate limit,
        RETRY_DELAY after the server failed; one refused for good (no such user any more) is no
        longer owed."""
        self.start()
        self.directory.answers["send"] = [RequestError("rate_limited", "slow down")]
        self.deliver(5, self.bob, "m1", {"kind": "msg", "text": "hello", "sent_at": 1.0})
        self.assertEqual(self.directory.sent, [])
        self.clock.advance(RATE_RETRY)
        self.assertEqual(self.open_receipt(0), {"kind": "receipt", "msg_ids": ["m1"]})
        self.assertEqual(self.successResultOf(self.history.owed_receipts()), {})
        self.directory.answers["send"] = [RequestError("internal_error", "the server failed")]
        self.deliver(6, self.bob, "m3", {"kind": "msg", "text": "later", "sent_at": 2.0})
        self.clock.advance(RETRY_DELAY - 0.1)
        self.assertEqual(len(self.directory.sent), 1)
        self.clock.advance(0.1)
        self.assertEqual(self.open_receipt(1), {"kind": "receipt", "msg_ids": ["m3"]})
        self.directory.answers["send"] = [RequestError("unknown_user", "gone")]
        self.deliver(7, self.bob, "m2", {"kind": "msg", "text": "again", "sent_at": 2.0})
        self.assertEqual(self.successResultOf(self.history.owed_receipts()), {})

    def test_not_stored_not_acked(self) -> None:
        """An envelope the history fails to store is neither acked nor receipted, so the server
        sends it again; it is shown once, when it is stored."""
        self.start()
        add_incoming = self.history.add_incoming
        self.history.add_incoming = lambda *args: fail(sqlite3.OperationalError("disk I/O error"))
        self.deliver(1, self.bob, "m1", {"kind": "msg", "text": "hi", "sent_at": 1.0})
        self.deliver(2, self.bob, "m2", {"kind": "msg", "text": "again", "sent_at": 1.0})
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 2)
        self.assertEqual((self.directory.acked, self.directory.sent, self.view.messages()), ([], [], []))
        self.assertEqual(self.view.events("not_stored"), [{"user": "bob", "reason": "disk I/O error"}])  # once
        self.history.add_incoming = add_incoming
        self.deliver(1, self.bob, "m1", {"kind": "msg", "text": "hi", "sent_at": 1.0})
        self.assertEqual(self.directory.acked, [1])
        self.assertEqual(self.view.messages(), [("bob", "hi")])
        self.assertEqual(self.open_receipt(0), {"kind": "receipt", "msg_ids": ["m1"]})

    def test_receipt_over_an_open_link(self) -> None:
        """The receipt for an envelope that came through the server goes over a direct link when
        one is open, and is then no longer owed."""
        self.start()
        link = self.links.accept("bob")
        self.deliver(1, self.bob, "m1", {"kind": "msg", "text": "hi", "sent_at": 1.0})
        self.assertEqual(link.sent, [{"type": "ack", "msg_ids": ["m1"]}])
        self.assertEqual(self.directory.sent, [])
        self.assertEqual(self.directory.acked, [1])
        self.assertEqual(self.successResultOf(self.history.owed_receipts()), {})

    def test_direct_messages_at_the_servers_rate(self) -> None:
        """Messages from one contact over direct links are taken no faster than the server's
        message rate lets them through it (a contact could otherwise fill the disk at the speed of
        the history); the link waits meanwhile, nothing is lost, and they are shown in order."""
        self.directory.message_rate = (10.0, 2)
        self.start()
        link = self.links.accept("bob")
        handled = [
            self.messenger.link_frame(link, {"type": "msg", "msg_id": f"m{i}", "text": f"t{i}", "sent_at": 1.0})
            for i in range(4)
        ]
        self.assertEqual(self.view.messages(), [("bob", "t0"), ("bob", "t1")])
        self.assertFalse(handled[2].called)
        self.clock.advance(0.1 + PACE_MARGIN + 1e-6)
        self.assertEqual(self.view.messages(), [("bob", "t0"), ("bob", "t1"), ("bob", "t2")])
        self.clock.advance(0.1)
        self.assertEqual([text for _, text in self.view.messages()], ["t0", "t1", "t2", "t3"])
        self.assertEqual([f["msg_ids"] for f in link.sent], [["m0"], ["m1"], ["m2"], ["m3"]])
        carol = self.links.accept("carol")  # another contact has a pace of her own
        self.messenger.link_frame(carol, {"type": "msg", "msg_id": "c0", "text": "from carol", "sent_at": 1.0})
        self.assertEqual(self.view.messages()[-1], ("carol", "from carol"))

    def test_duplicate_shown_once(self) -> None:
        """The same message arriving twice (server redelivery, or direct then server) is shown once and acked."""
        self.start()
        link = self.links.accept("bob")
        self.messenger.link_frame(link, {"type": "msg", "msg_id": "m1", "text": "hi", "sent_at": 1.0})
        self.links.close("bob")
        self.deliver(1, self.bob, "m1", {"kind": "msg", "text": "hi", "sent_at": 1.0})
        self.deliver(2, self.bob, "m1", {"kind": "msg", "text": "hi", "sent_at": 1.0})
        self.assertEqual(self.view.messages(), [("bob", "hi")])
        self.assertEqual(self.directory.acked, [1, 2])
        self.assertEqual(link.sent, [{"type": "ack", "msg_ids": ["m1"]}])

    def test_forged_envelope_dropped(self) -> None:
        """An envelope signed with a key that is not the sender's is dropped (and acked so it goes away)."""
        self.start()
        self.deliver(1, self.bob, "m1", {"kind": "msg", "text": "I am bob", "sent_at": 1.0}, signer=self.carol)
        self.assertEqual(self.view.messages(), [])
        self.assertEqual(self.directory.acked, [1])
        self.assertEqual(self.successResultOf(self.history.conversation("bob", 10)), [])

    def test_tampered_envelope_dropped(self) -> None:
        """A sealed envelope replayed under another message id fails its signature and is dropped."""
        self.start()
        envelope = self.seal_from(self.bob, "m1", {"kind": "msg", "text": "hi", "sent_at": 1.0})
        self.messenger.server_event(Event("envelope", {"seq": 1, "from": "bob", "msg_id": "m2", "envelope": envelope}))
        self.messenger.server_event(Event("envelope", {"seq": 2, "from": "bob", "msg_id": 7, "envelope": envelope}))
        self.assertEqual(self.view.messages(), [])
        self.assertEqual(self.directory.acked, [1, 2])

    def test_unusable_content_dropped(self) -> None:
        """Genuine envelopes with content that cannot be stored (unknown kind, bad text) are dropped and acked."""
        self.start()
        for seq, payload in enumerate([{"kind": "poke"}, {"kind": "msg", "text": "\ud800", "sent_at": 1.0},
                                       {"kind": "msg", "text": "", "sent_at": 1.0}, {"kind": "msg", "text": "x"}], 1):
            self.deliver(seq, self.bob, f"m{seq}", payload)
        self.assertEqual(self.view.messages(), [])
        self.assertEqual(self.directory.acked, [1, 2, 3, 4])

    def test_not_acked_when_server_gone(self) -> None:
        """An envelope whose sender cannot be checked (connection gone) is not acked, so it comes again."""
        self.start()
        self.directory.connected = False
        self.deliver(1, self.bob, "m1", {"kind": "msg", "text": "hi", "sent_at": 1.0})
        self.assertEqual(self.view.messages(), [])
        self.directory.connected = True
        self.deliver(2, self.bob, "m1", {"kind": "msg", "text": "hi", "sent_at": 1.0})
        self.assertEqual(self.view.messages(), [("bob", "hi")])
        self.assertEqual(self.directory.acked, [2])

    def test_blocked_sender_dropped(self) -> None:
        """Once bob is blocked his envelopes and direct links are refused, a link with the key
        pinned for him already in its TLS handshake."""
        self.start()
        self.assertTrue(self.successResultOf(self.messenger.verify_peer("bob", self.bob.fingerprint)))
        self.assertFalse(self.messenger.refuse_fingerprint(self.bob.fingerprint))
        self.command("block", "bob")
        self.assertTrue(self.messenger.refuse_fingerprint(self.bob.fingerprint))
        self.assertFalse(self.messenger.refuse_fingerprint(self.carol.fingerprint))
        self.deliver(1, self.bob, "m1", {"kind": "msg", "text": "hi", "sent_at": 1.0})
        self.assertEqual(self.view.messages(), [])
        self.assertFalse(self.successResultOf(self.messenger.verify_peer("bob", self.bob.fingerprint)))
        self.command("unblock", "bob")
        self.assertFalse(self.messenger.refuse_fingerprint(self.bob.fingerprint))
        self.assertTrue(self.successResultOf(self.messenger.verify_peer("bob", self.bob.fingerprint)))

    def broadcast_from(self, person: Person, text: str, sent_at: float | None = None, signer: Person | None = None,
                       name: str | None = None) -> None:
        """The server relays C{person}'s broadcast, signed by C{signer} (C{person}) as written by C{name}."""
        when = self.clock.seconds() if sent_at is None else sent_at
        signature = crypto.sign_broadcast((signer or person).identity, name or person.name, text, when)
        self.broadcast_event(person.name, text, signature)

    def broadcast_event(self, user: str, text: str, signature: Any) -> None:
        self.messenger.server_event(
            Event("broadcast", {"from": user, "text": text, "signature": signature, "sent_at": self.clock.seconds()})
        )

    def test_broadcast_shown_unless_muted(self) -> None:
        """Broadcasts signed by their sender are shown, except from muted or blocked users; one
        written a while ago says when."""
        self.start()
        self.broadcast_from(self.bob, "hello all")
        self.command("mute", "carol", None)
        self.broadcast_from(self.carol, "psst")
        self.broadcast_from(self.bob, "from before", sent_at=self.clock.seconds() - LATE - 1)
        self.command("block", "bob")
        self.broadcast_from(self.bob, "blocked")
        self.assertEqual(self.view.events("broadcast"), [
            {"user": "bob", "text": "hello all"},
            {"user": "bob", "text": "from before", "sent_at": self.clock.seconds() - LATE - 1},
        ])

    def test_broadcast_signed(self) -> None:
        """What alice broadcasts is signed by her key over her name, the text and when she wrote it."""
        self.directory.answers["broadcast"] = {"delivered": 2, "skipped": 0}
        self.start()
        self.assertEqual(self.command("broadcast", "hello all"), (2, 0))
        args = dict(self.directory.requests)["broadcast"]
        self.assertEqual(args["text"], "hello all")
        self.assertEqual(crypto.open_broadcast(args["signature"], "alice", "hello all"),
                         (self.clock.seconds(), self.me.fingerprint))

    def test_forged_broadcast_dropped(self) -> None:
        """The server cannot make a broadcast from bob: one unsigned, altered, signed for another
        name, or signed by another key than bob's (pinned, or the directory's on first sight), is
        not shown; nor is bob's own sent again."""
        self.start()
        signature = crypto.sign_broadcast(self.bob.identity, "bob", "hi", self.clock.seconds())
        self.broadcast_event("bob", "hi", None)
        self.broadcast_event("bob", "hi", "not a signature")
        self.broadcast_event("bob", "hi!", signature)
        self.broadcast_from(self.bob, "hi", name="carol")
        self.broadcast_from(self.bob, "hi", signer=self.carol)
        self.assertEqual(self.view.events("broadcast"), [])
        self.assertNotIn("bob", self.successResultOf(self.history.contacts()))
        self.broadcast_event("bob", "hi", signature)
        self.broadcast_event("bob", "hi", signature)
        self.assertEqual(self.view.events("broadcast"), [{"user": "bob", "text": "hi"}])
        self.assertEqual(self.successResultOf(self.history.contacts())["bob"].fingerprint, self.bob.fingerprint)

    def test_broadcast_from_changed_key_dropped(self) -> None:
        """A broadcast signed by bob's new key, which alice has not accepted, is not shown; the
        change is told. After /trust his broadcasts are shown again."""
        self.start()
        self.broadcast_from(self.bob, "one")
        self.bob = self.directory.people["bob"] = Person("bob")
        self.clock.advance(1)
        self.broadcast_from(self.bob, "two")
        self.assertEqual([e["text"] for e in self.view.events("broadcast")], ["one"])
        self.assertEqual(self.view.events("key_changed")[0]["new"], self.bob.fingerprint)
        self.command("trust", "bob")
        self.clock.advance(1)
        self.broadcast_from(self.bob, "three")
        self.assertEqual([e["text"] for e in self.view.events("broadcast")], ["one", "three"])

    def test_broadcasts_in_order(self) -> None:
        """Broadcasts are shown in the order they came, also while a sender's key is being asked for."""
        self.start()
        keys: Deferred[dict[str, Any]] = Deferred()
        self.directory.answers["keys"] = [keys]
        self.broadcast_from(self.bob, "first")
        self.clock.advance(1)
        self.broadcast_from(self.bob, "second")
        self.assertEqual(self.view.events("broadcast"), [])
        keys.callback({"user": "bob", "fingerprint": self.bob.fingerprint, "envelope_key": self.bob.public})
        self.assertEqual([e["text"] for e in self.view.events("broadcast")], ["first", "second"])
        self.assertEqual(self.directory.ops().count("keys"), 1)

    def shown_broadcasts(self) -> list[str]:
        return [f.get("text", f"dropped {f.get('count')}") for e, f in self.view.shown if e.startswith("broadcast")]

    def test_broadcasts_wait_for_the_output(self) -> None:
        """Broadcasts are shown once what was shown before has gone out (a script reads its peer's
        output), in order; past the number that may wait, the next ones are dropped, and how many
        is said after those that waited."""
        self.patch(messenger_module, "MAX_BROADCASTS_WAITING", 3)
        self.start()
        self.view.output = Deferred()
        for i in range(5):
            self.clock.advance(1)
            self.broadcast_from(self.bob, f"b{i}")
        self.assertEqual(self.shown_broadcasts(), [])
        self.view.output.callback(None)
        self.view.output = None
        self.assertEqual(self.shown_broadcasts(), ["b0", "b1", "b2", "dropped 2"])
        self.assertEqual(self.view.events("broadcasts_dropped"), [{"count": 2}])
        self.clock.advance(1)
        self.broadcast_from(self.bob, "b5")
        self.assertEqual(self.shown_broadcasts()[-1], "b5")

    def test_broadcasts_dropped_told_in_order(self) -> None:
        """Broadcasts dropped while too many waited are told of before the first one taken after
        them, even while others still wait."""
        self.patch(messenger_module, "MAX_BROADCASTS_WAITING", 2)
        self.start()
        bob_keys: Deferred[dict[str, Any]] = Deferred()
        carol_keys: Deferred[dict[str, Any]] = Deferred()
        self.directory.answers["keys"] = [bob_keys, carol_keys]
        self.broadcast_from(self.bob, "b0")
        self.broadcast_from(self.carol, "c0")
        self.clock.advance(1)
        self.broadcast_from(self.bob, "b1")  # dropped: two wait
        bob_keys.callback({"user": "bob", "fingerprint": self.bob.fingerprint, "envelope_key": self.bob.public})
        self.assertEqual(self.shown_broadcasts(), ["b0"])
        self.clock.advance(1)
        self.broadcast_from(self.bob, "b2")
        carol_keys.callback({"user": "carol", "fingerprint": self.carol.fingerprint, "envelope_key": self.carol.public})
        self.assertEqual(self.shown_broadcasts(), ["b0", "c0", "dropped 1", "b2"])

    def test_broadcast_unchecked_dropped(self) -> None:
        """A broadcast whose sender's key cannot be checked now (the server is gone) is not shown."""
        self.start()
        self.directory.connected = False
        self.broadcast_from(self.bob, "hi")
        self.assertEqual(self.view.events("broadcast"), [])
        self.assertNotIn("bob", self.successResultOf(self.history.contacts()))

    def test_presence_shown_and_flushes(self) -> None:
        """Presence events are shown, malformed ones ignored; a user coming online gets the messages
        that waited for them."""
        self.start()
        self.directory.answers["send"] = [RequestError("rate_limited", "later")]
        self.command("send", "bob", "hi")
        self.messenger.server_event(Event("presence", {"online": "bob", "offline": {}}))
        self.messenger.server_event(Event("presence", {"online": ["bob", 7], "offline": {"carol": "logout", "": "x"}}))
        self.assertEqual(self.view.events("presence"), [{"user": "carol", "online": False}, {"user": "bob", "online": True}])
        self.assertEqual(self.statuses("bob"), [("hi", SENT)])

    def test_many_at_once_share_a_line(self) -> None:
        """Users coming (or going) together beyond a few, as after a server restart, share one line,
        instead of a line each flooding the console; each one's messages still go."""
        self.start()
        self.command("go_offline")
        self.command("send", "bob", "waited")
        self.command("go_online")
        self.successResultOf(self.messenger.server_connected())
        many = [f"u{i}" for i in range(PRESENCE_LINES + 1)]
        self.messenger.server_event(Event("presence", {"online": [*many, "bob"], "offline": {u: "logout" for u in many}}))
        self.assertEqual(self.view.events("presence"), [])
        self.assertEqual(self.view.events("presence_many"), [
            {"users": many, "online": False}, {"users": [*many, "bob"], "online": True},
        ])
        self.assertEqual(self.statuses("bob"), [("waited", SENT)])
        few = [f"v{i}" for i in range(PRESENCE_LINES)]
        self.messenger.server_event(Event("presence", {"online": few, "offline": {}}))
        self.assertEqual([e["user"] for e in self.view.events("presence")], few)

    def test_online_now_after_the_mailbox(self) -> None:
        """Who is online is said after the messages that waited at the server, which come first,
        even while they are still being stored."""
        self.directory.online.add("carol")
        stored: Deferred[None] = Deferred()
        add_incoming = self.history.add_incoming
        self.patch(self.history, "add_incoming", lambda *a: stored.addCallback(lambda _: add_incoming(*a)))
        self.directory.answers["blocks"] = blocks = Deferred()
        self.start()
        self.deliver(5, self.bob, "m1", {"kind": "msg", "text": "while you were away", "sent_at": 1.0})
        blocks.callback({"users": []})  # its answer, and who's, come after the mailbox
        self.assertEqual(self.view.events("online_now"), [])
        stored.callback(None)
        self.assertEqual([event for event, _ in self.view.shown if event in ("message", "online_now")],
                         ["message", "online_now"])

    def test_known_users(self) -> None:
        """The names the console completes: users online lately and users met before, not oneself."""
        self.directory.online.update({"carol", "alice"})
        self.start()
        self.command("send", "bob", "hi")
        self.assertEqual(self.messenger.known_users(), ["bob", "carol"])

    def test_server_restart_tells_only_changes(self) -> None:
        """After the first login the peer learns who is online and says who; after the server
        restarted, users who were online and come back are not news: those who came meanwhile are
        told, and those not back within PRESENCE_GRACE as gone."""
        self.directory.online.update({"bob", "carol"})
        self.start()
        self.assertEqual(self.view.events("online_now"), [{"users": ["bob", "carol"]}])  # who is around
        self.messenger.server_event(Event("presence", {"online": ["dave"], "offline": {}}))
        self.assertEqual(self.view.events("presence"), [{"user": "dave", "online": True}])
        self.messenger.server_event(Event("bye", {"reason": "shutdown", "message": "restarting"}))
        self.messenger.server_lost()
        self.directory.online = {"bob", "dave", "erin"}  # carol not back yet: she may be reconnecting
        self.successResultOf(self.messenger.server_connected())
        self.messenger.server_event(Event("presence", {"online": ["bob", "erin", "dave"], "offline": {}}))
        self.assertEqual(self.view.events("presence")[1:], [{"user": "erin", "online": True}])
        self.assertEqual(len(self.view.events("online_now")), 1)  # said at the first login only
        self.clock.advance(PRESENCE_GRACE - 1)
        self.messenger.server_event(Event("presence", {"online": ["fred"], "offline": {}}))
        self.assertEqual(len(self.view.events("presence")), 3)
        self.clock.advance(1)  # carol, online before, did not come back in time: gone
        self.assertEqual(self.view.events("presence")[3:], [{"user": "carol", "online": False}])
        self.messenger.server_event(Event("presence", {"online": ["carol"], "offline": {}}))
        self.assertEqual(self.view.events("presence")[4:], [{"user": "carol", "online": True}])
        self.messenger.server_lost()
        self.directory.online.discard("carol")
        self.successResultOf(self.messenger.server_connected())
        self.command("go_offline")  # offline, nobody is told gone: /online asks again
        self.clock.advance(PRESENCE_GRACE)
        self.assertEqual(len(self.view.events("presence")), 5)


class MuteTests(MessengerTestCase):
    def test_mute_expires(self) -> None:
        """A muted user's messages are stored but not shown until the mute expires."""
        self.start()
        self.command("mute", "bob", 60.0)
        self.deliver(1, self.bob, "m1", {"kind": "msg", "text": "muted", "sent_at": 1.0})
        self.assertEqual(self.view.messages(), [])
        [entry] = self.successResultOf(self.history.conversation("bob", 10))
        self.assertEqual((entry.text, entry.status), ("muted", "muted"))
        self.clock.advance(60)
        self.deliver(2, self.bob, "m2", {"kind": "msg", "text": "heard", "sent_at": 2.0})
        self.assertEqual(self.view.messages(), [("bob", "heard")])
        self.assertEqual(self.command_error("unmute", "bob").code, "not_muted")

    def test_mute_survives_restart_and_unmute(self) -> None:
        """A mute is stored: a restarted peer still hides the user until /unmute."""
        self.start()
        self.command("mute", "bob", None)
        self.new_messenger()
        self.passwords = ["pw"]
        self.start()
        self.deliver(1, self.bob, "m1", {"kind": "msg", "text": "still muted", "sent_at": 1.0})
        self.command("unmute", "bob")
        self.deliver(2, self.bob, "m2", {"kind": "msg", "text": "back", "sent_at": 1.0})
        self.assertEqual(self.view.messages(), [("bob", "back")])

    def test_mute_of_nobody_refused(self) -> None:
        """/mute of a name the server does not know says so (a typo would seem to work); one who
        blocked you can still be muted (a mute is yours alone); offline, a mute is taken unchecked."""
        self.directory.blocked_me.add("bob")
        self.start()
        self.assertEqual(self.command_error("mute", "bbo", None).code, "unknown_user")
        self.assertFalse(self.messenger._is_muted("bbo"))
        self.command("mute", "bob", None)
        self.command("go_offline")
        self.command("mute", "carol", None)
        self.assertTrue(self.messenger._is_muted("bob") and self.messenger._is_muted("carol"))


class KeyTests(MessengerTestCase):
    def change_bobs_key(self) -> Person:
        new_bob = Person("bob")
        self.directory.people["bob"] = new_bob
        return new_bob

    def test_pinned_on_first_sight(self) -> None:
        """A direct link from an unknown user is accepted only with the key the directory has, which is pinned."""
        self.start()
        self.assertFalse(self.successResultOf(self.messenger.verify_peer("bob", self.carol.fingerprint)))
        self.assertTrue(self.successResultOf(self.messenger.verify_peer("bob", self.bob.fingerprint)))
        self.assertEqual(self.successResultOf(self.history.contacts())["bob"].fingerprint, self.bob.fingerprint)
        self.assertFalse(self.successResultOf(self.messenger.verify_peer("zed", self.carol.fingerprint)))
        self.assertFalse(self.successResultOf(self.messenger.verify_peer("alice", self.me.fingerprint)))

    def test_unusable_keys_not_pinned(self) -> None:
        """Keys from the server that are not keys are not pinned: the message waits, the user is
        told why, and it goes sealed to the real key once the server sends it."""
        self.start()
        self.directory.answers["keys"] = {"user": "bob", "fingerprint": "zz", "envelope_key": "nope"}
        self.command("send", "bob", "hi")
        self.assertEqual(self.statuses("bob"), [("hi", PENDING)])
        self.assertEqual(self.view.events("bad_keys"), [{"user": "bob"}])
        self.assertEqual(self.directory.sent, [])
        self.assertNotIn("bob", self.successResultOf(self.history.contacts()))
        del self.directory.answers["keys"]
        self.messenger.server_event(Event("presence", {"online": ["bob"], "offline": {}}))
        self.assertEqual(self.open_sent(0, self.bob)["text"], "hi")
        self.assertEqual(self.successResultOf(self.history.contacts())["bob"].fingerprint, self.bob.fingerprint)

    def test_server_cannot_put_its_own_envelope_key(self) -> None:
        """A server that gives bob's real fingerprint (the one alice may compare out of band) with
        an envelope key of its own, to read what alice seals: signed by bob's key for another
        envelope key, signed by another key, or not signed at all, nothing is sealed to it; alice
        is told once. With bob's signed keys the message goes, sealed to bob's key."""
        mallory = Person("bob")
        mine = {"user": "bob", "fingerprint": self.bob.fingerprint, "envelope_key": mallory.public}
        self.start()
        for keys, told in [({**mine, "key_signature": self.bob.key_signature}, "bad_keys"),
                           ({**mine, "key_signature": mallory.key_signature}, "bad_keys"),
                           (mine, "keys_unsigned")]:
            self.directory.answers["keys"] = keys
            self.command("send", "bob", "hi") if not self.statuses("bob") else self.messenger.server_event(
                Event("presence", {"online": ["bob"], "offline": {}}))
            self.assertEqual(self.view.events(told)[-1], {"user": "bob"})
        self.messenger.server_event(Event("presence", {"online": ["bob"], "offline": {}}))
        self.assertEqual(len(self.view.events("keys_unsigned")), 1)  # told once
        self.assertEqual((self.directory.sent, self.statuses("bob")), ([], [("hi", PENDING)]))
        del self.directory.answers["keys"]
        self.messenger.server_event(Event("presence", {"online": ["bob"], "offline": {}}))
        self.assertEqual(self.open_sent(0, self.bob)["text"], "hi")

    def test_receipts_to_an_older_peer(self) -> None:
        """A receipt holds message ids only: it goes to a contact whose older peer signs no key (it
        could not know its messages arrived otherwise); messages wait for a signed key."""
        self.bob.key_signature = None
        self.start()
        self.deliver(1, self.bob, "m1", {"kind": "msg", "text": "hi alice", "sent_at": 1.0})
        self.assertEqual(self.open_receipt(0), {"kind": "receipt", "msg_ids": ["m1"]})
        self.command("send", "bob", "hi bob")
        self.assertEqual((len(self.directory.sent), self.statuses("bob")), (1, [("hi bob", PENDING)]))

    def test_behind_the_server_to_an_older_peer(self) -> None:
        """A message that went through the server keeps the next ones there until its receipt (the
        order); to a contact whose peer has since lost its key signature they wait, and once the
        receipt comes they go over a direct link. A receipt of this peer's to that contact (which
        may go to an unsigned key) does not count as their key being signed."""
        self.start()
        self.command("send", "bob", "one")
        self.bob.key_signature = None
        self.directory.online.add("bob")
        self.links.reachable.add("bob")
        self.command("send", "bob", "two")
        self.assertEqual(self.statuses("bob"), [("one", SENT), ("two", PENDING)])
        self.deliver(1, self.bob, "m1", {"kind": "msg", "text": "hi alice", "sent_at": 1.0})  # alice's receipt goes
        self.assertEqual(self.open_receipt(1), {"kind": "receipt", "msg_ids": ["m1"]})
        self.deliver(2, self.bob, "r-1", {"kind": "receipt", "msg_ids": [self.directory.sent[0]["msg_id"]]})
        self.assertEqual(self.links.open["bob"].sent[-1]["text"], "two")
        self.assertEqual(len(self.view.events("keys_unsigned")), 1)

    def test_older_server_gets_nothing_sealed(self) -> None:
        """A server older than key signatures passes none on, from anyone; one that says so (or
        leaves its hello's key_signatures out on purpose) gets nothing sealed to the keys it hands
        out: the user is told once, and messages go over a direct link when there is one."""
        self.directory.key_signatures = False
        self.bob.key_signature = self.carol.key_signature = None
        self.start()
        self.command("send", "bob", "hi")
        self.command("send", "carol", "hi")
        self.assertEqual((self.directory.sent, self.statuses("bob")), ([], [("hi", PENDING)]))
        self.assertEqual(self.view.events("server_unsigned"), [{"server": "server:5000"}])
        self.assertEqual(self.view.events("keys_unsigned"), [])
        self.assertIsNone(self.successResultOf(self.history.contacts())["bob"].envelope_key)
        self.links.accept("bob")
        self.assertEqual(self.links.open["bob"].sent[-1]["text"], "hi")

    def test_keys_given_signed(self) -> None:
        """The peer gives its envelope key's signature with its keys, and at every resume (so that a
        peer updated since its last password login gives it too)."""
        self.start()
        self.messenger.server_lost()
        self.successResultOf(self.messenger.server_connected())
        signature = crypto.sign_envelope_key(self.me.identity, "alice", self.me.public)
        crypto.check_envelope_key(signature, "alice", self.me.fingerprint, self.me.public)
        given = {op: args.get("key_signature") for op, args in self.directory.requests if op in ("register", "resume")}
        self.assertEqual(set(given), {"register", "resume"})
        for value in given.values():
            crypto.check_envelope_key(value, "alice", self.me.fingerprint, self.me.public)

    def test_receipt_from_a_changed_key_ignored(self) -> None:
        """A receipt signed with bob's new key, not accepted yet, does not mark a message
        delivered: it may come from someone who is not bob."""
        self.start()
        self.command("send", "bob", "hi")
        msg_id = self.directory.sent[0]["msg_id"]
        new_bob = self.change_bobs_key()
        self.deliver(1, new_bob, "r-1", {"kind": "receipt", "msg_ids": [msg_id]})
        self.assertEqual(self.statuses("bob"), [("hi", SENT)])
        self.assertEqual(len(self.view.events("key_changed")), 1)
        self.assertEqual(self.directory.acked, [1])

    def test_changed_key_of_an_offline_user_seen_before_sealing(self) -> None:
        """bob moved to a new install (new keys) while offline: a message for him is not sealed to
        the key pinned earlier, which his new install cannot open (the server would store it and
        bob's peer drop it: a message lost). The change is shown and the message waits for /trust."""
        self.start()
        self.command("send", "bob", "first")
        self.assertEqual(self.open_sent(0, self.bob)["text"], "first")
        new_bob = self.change_bobs_key()
        self.command("send", "bob", "second")
        self.assertEqual(len(self.view.events("key_changed")), 1)
        self.assertEqual(len(self.directory.sent), 1)
        self.assertEqual(self.statuses("bob"), [("first", SENT), ("second", PENDING)])
        self.command("trust", "bob")
        self.assertEqual(self.open_sent(-1, new_bob)["text"], "second")
        self.assertEqual(self.statuses("bob"), [("first", SENT), ("second", SENT)])

    def test_changed_key_found_while_the_outbox_waits(self) -> None:
        """A message queued while disconnected, for a user whose keys changed meanwhile, is not
        sealed to the old key when the connection comes back."""
        self.start()
        self.command("send", "bob", "first")
        self.messenger.server_lost()
        self.directory.connected = False
        self.command("send", "bob", "queued")
        new_bob = self.change_bobs_key()
        self.directory.connected = True
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual(len(self.directory.sent), 1)
        self.assertEqual(len(self.view.events("key_changed")), 1)
        self.assertEqual(self.statuses("bob"), [("first", SENT), ("queued", PENDING)])
        self.command("trust", "bob")
        self.assertEqual(self.open_sent(-1, new_bob)["text"], "queued")

    def test_envelopes_sealed_to_an_old_key_are_told(self) -> None:
        """Envelopes sealed to an envelope key this install does not have (sent to the user's old
        install) are acked, since no retry opens them, and the user is told how many, from whom,
        together; a forged one (even one sealed to an old key, signed by someone else) is dropped
        without a word."""
        self.start()
        old_me = crypto.generate_envelope_key()
        for seq, msg_id in [(1, "m1"), (2, "m2")]:
            envelope = crypto.seal(self.bob.identity, "bob", "alice", old_me.public_b64, msg_id,
                                   json.dumps({"kind": "msg", "text": "lost?", "sent_at": 1.0}).encode())
            self.messenger.server_event(
                Event("envelope", {"seq": seq, "from": "bob", "msg_id": msg_id, "envelope": envelope, "sent_at": 1.0})
            )
        self.deliver(3, self.carol, "m3", {"kind": "msg", "text": "hi", "sent_at": 1.0}, signer=self.bob)
        forged = crypto.seal(self.carol.identity, "bob", "alice", old_me.public_b64, "m4",
                             json.dumps({"kind": "msg", "text": "x", "sent_at": 1.0}).encode())
        self.messenger.server_event(
            Event("envelope", {"seq": 4, "from": "bob", "msg_id": "m4", "envelope": forged, "sent_at": 1.0})
        )
        self.assertEqual(self.view.events("unreadable"), [])
        self.clock.advance(UNREADABLE_WAIT)
        self.assertEqual(self.view.events("unreadable"), [{"user": "bob", "count": 2}])
        self.clock.advance(UNREADABLE_WAIT)
        self.assertEqual(len(self.view.events("unreadable")), 1)
        self.assertEqual(self.view.messages(), [])
        self.assertEqual(sorted(self.directory.acked), [1, 2, 3, 4])
        # bob's peer is asked to send them again, in a notice sealed to him and signed by alice
        [notice] = [item for item in self.directory.sent if item["msg_id"].startswith("u-")]
        payload, _ = crypto.open_sealed(
            notice["envelope"], self.bob.envelope_key, "alice", "bob", notice["msg_id"], self.me.fingerprint
        )
        self.assertEqual(json.loads(payload), {"kind": "unopened", "msg_ids": ["m1", "m2"]})

    def test_unopened_messages_sent_again(self) -> None:
        """bob's new install asks for what it could not open (sealed to his old keys): those go
        back to the outbox, and out once alice accepts his new key, sealed to it; each only once
        on such word, and only what went to bob through the server and was not delivered."""
        self.start()
        for text in ("before", "read"):
            self.command("send", "bob", text)
        read_id = self.directory.sent[1]["msg_id"]
        self.deliver(1, self.bob, "r-1", {"kind": "receipt", "msg_ids": [read_id]})
        self.command("send", "carol", "to carol")
        before_id, carol_id = self.directory.sent[0]["msg_id"], self.directory.sent[2]["msg_id"]
        new_bob = self.change_bobs_key()
        unopened = {"kind": "unopened", "msg_ids": [before_id, read_id, carol_id]}
        self.deliver(2, new_bob, "u-1", unopened)
        self.assertEqual(len(self.view.events("key_changed")), 1)
        self.assertEqual(self.view.events("sending_again"), [{"user": "bob", "count": 1, "trusted": False}])
        self.assertEqual(self.statuses("bob"), [("before", PENDING), ("read", DELIVERED)])
        self.assertEqual(self.statuses("carol"), [("to carol", SENT)])
        self.assertEqual(len(self.directory.sent), 3)  # not to the old key, not before /trust
        self.command("trust", "bob")
        self.assertEqual(self.open_sent(-1, new_bob)["text"], "before")
        self.assertEqual(self.directory.sent[-1]["msg_id"], before_id)  # the same id: shown once at most
        self.deliver(3, new_bob, "u-2", unopened)
        self.assertEqual(len(self.view.events("sending_again")), 1)
        self.assertEqual(self.statuses("bob"), [("before", SENT), ("read", DELIVERED)])

    def test_ids_sent_again_remembered_within_bounds(self) -> None:
        """A contact naming any ids in unopened notices (real or not, 256 at a time at the message
        rate) cannot grow what this peer remembers of them without end."""
        self.patch(messenger_module, "SENT_AGAIN_REMEMBERED", 300)
        self.start()
        for n in range(4):
            self.deliver(n + 1, self.bob, f"u-{n}", {"kind": "unopened", "msg_ids": [f"x{n}-{i}" for i in range(256)]})
        self.assertEqual(len(self.messenger._sent_again), 300)
        self.assertIn(("bob", "x3-255"), self.messenger._sent_again)

    def test_receipts_for_held_messages_go_after_trust(self) -> None:
        """Messages from a changed key are held without a receipt (the key is not accepted); /trust
        shows them and sends their receipt then, sealed to the new key, not at the next login."""
        self.start()
        self.command("send", "bob", "first")
        new_bob = self.change_bobs_key()
        self.deliver(1, new_bob, "m1", {"kind": "msg", "text": "it is me, new laptop", "sent_at": 1.0})
        self.assertEqual(len(self.directory.sent), 1)
        self.command("trust", "bob")
        self.assertEqual(self.view.messages(), [("bob", "it is me, new laptop")])
        receipt = crypto.open_sealed(self.directory.sent[-1]["envelope"], new_bob.envelope_key, "alice", "bob",
                                     self.directory.sent[-1]["msg_id"], self.me.fingerprint)
        self.assertEqual(json.loads(receipt[0]), {"kind": "receipt", "msg_ids": ["m1"]})
        self.assertEqual(self.successResultOf(self.history.owed_receipts()), {})

    def test_keys_asked_once_per_outbox_pass(self) -> None:
        """The keys are checked once for the messages an outbox pass seals, not once per message."""
        self.start()
        self.messenger.server_lost()
        self.directory.connected = False
        for text in ("one", "two", "three"):
            self.command("send", "bob", text)
        self.directory.connected = True
        self.directory.requests.clear()
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual([self.open_sent(i, self.bob)["text"] for i in range(3)], ["one", "two", "three"])
        self.assertEqual(self.directory.ops().count("keys"), 1)

    def test_changed_key_refused_until_trusted(self) -> None:
        """A changed key is warned about loudly; messages are held and sending stops until /trust."""
        self.start()
        self.command("send", "bob", "first")
        new_bob = self.change_bobs_key()
        self.deliver(1, new_bob, "m1", {"kind": "msg", "text": "new key, who dis", "sent_at": 1.0})
        self.assertEqual(self.view.messages(), [])
        [warning] = self.view.events("key_changed")
        self.assertEqual((warning["old"], warning["new"]), (self.bob.fingerprint, new_bob.fingerprint))
        self.assertEqual(self.command_error("send", "bob", "second").code, "key_changed")
        self.assertFalse(self.successResultOf(self.messenger.verify_peer("bob", new_bob.fingerprint)))
        info = self.command("fingerprint", "bob")
        self.assertEqual((info.pinned, info.changed_to, info.directory), (self.bob.fingerprint, new_bob.fingerprint, new_bob.fingerprint))
        self.command("trust", "bob")
        self.assertEqual(self.view.messages(), [("bob", "new key, who dis")])
        self.command("send", "bob", "second")
        self.assertEqual(self.open_sent(-1, new_bob)["text"], "second")
        self.assertEqual(self.command_error("trust", "bob").code, "nothing_to_trust")


class PrivateTests(MessengerTestCase):
    def test_session_commands(self) -> None:
        """startprivate opens a link and tells the peer; private uses it only; stopprivate closes it."""
        self.directory.online.add("bob")
        self.links.reachable.add("bob")
        self.start()
        self.assertEqual(self.command_error("private", "bob", "hi").code, "no_private_session")
        self.command("start_private", "bob")
        link = self.links.open["bob"]
        self.assertEqual(link.sent[0], {"type": "session", "state": "start"})
        self.assertEqual(self.command_error("private", "bob", "  ").code, "empty_message")
        self.assertEqual(self.command_error("private", "bob", "x" * 16001).code, "too_long")
        self.command("private", "bob", "secret")
        self.assertEqual((link.sent[1]["text"], link.sent[1]["private"]), ("secret", True))
        self.messenger.link_frame(link, {"type": "ack", "msg_ids": [link.sent[1]["msg_id"]]})
        self.command("stop_private", "bob")
        self.assertEqual(link.sent[2], {"type": "session", "state": "stop"})
        self.assertTrue(link.closed)
        self.assertEqual(self.command_error("stop_private", "bob").code, "no_private_session")
        self.assertEqual(self.directory.sent, [])

    def test_a_link_is_no_session(self) -> None:
        """A link that /msg opened is no private session: /private and /stopprivate are refused
        until one side starts one, and after it stops."""
        self.directory.online.add("bob")
        self.links.reachable.add("bob")
        self.start()
        self.command("send", "bob", "hi")
        link = self.links.open["bob"]
        self.assertEqual(self.command_error("private", "bob", "psst").code, "no_private_session")
        self.assertEqual(self.command_error("stop_private", "bob").code, "no_private_session")
        self.messenger.link_frame(link, {"type": "session", "state": "start"})  # bob started one
        self.command("private", "bob", "psst")
        self.assertEqual((link.sent[-1]["text"], link.sent[-1]["private"]), ("psst", True))
        self.messenger.link_frame(link, {"type": "session", "state": "stop"})
        self.assertEqual(self.command_error("private", "bob", "psst").code, "no_private_session")

    def test_start_errors(self) -> None:
        """startprivate names the reason: offline, unknown, blocked you, unreachable, yourself."""
        self.directory.blocked_me.add("carol")
        self.directory.online.add("bob")
        self.start()
        self.assertEqual(self.command_error("start_private", "bob").code, "unreachable")
        self.directory.online.clear()
        self.assertEqual(self.command_error("start_private", "bob").code, "offline")
        self.assertEqual(self.command_error("start_private", "zed").code, "unknown_user")
        self.assertEqual(self.command_error("start_private", "carol").code, "blocked_by_user")
        self.assertEqual(self.command_error("start_private", "alice").code, "yourself")

    def test_private_never_through_server(self) -> None:
        """A private message whose link dropped before the ack waits for the next link: it never goes
        through the server, and never opens a link by itself."""
        self.directory.online.add("bob")
        self.links.reachable.add("bob")
        self.start()
        self.command("start_private", "bob")
        self.command("private", "bob", "secret")
        self.links.reachable.clear()
        self.links.close("bob")
        self.assertEqual(self.directory.sent, [])
        self.assertEqual(self.view.events("private_ended"), [{"user": "bob", "by_peer": False}])
        self.links.reachable.add("bob")
        self.messenger.server_event(Event("presence", {"online": ["bob"], "offline": {}}))
        self.assertEqual(len(self.links.connects), 1)  # the private message opened no link
        self.command("send", "bob", "hi")  # opens a link, which is no private session
        self.assertEqual([f["text"] for f in self.links.open["bob"].sent], ["hi"])
        self.messenger.link_frame(self.links.open["bob"], {"type": "session", "state": "start"})
        self.assertEqual(self.links.open["bob"].sent[-1]["text"], "secret")

    def test_peer_starts_and_stops(self) -> None:
        """The other side's session frames are shown; its stop closes the link."""
        self.start()
        link = self.links.accept("bob")
        self.messenger.link_frame(link, {"type": "session", "state": "start"})
        self.messenger.link_frame(link, {"type": "msg", "msg_id": "p1", "text": "psst", "sent_at": 1.0, "private": True})
        self.messenger.link_frame(link, {"type": "session", "state": "stop"})
        self.assertEqual([e for e, _ in self.view.shown if e.startswith("private") or e == "message"],
                         ["private_started", "message", "private_ended"])
        self.assertTrue(self.view.events("message")[0]["private"])
        self.assertTrue(link.closed)

    def test_garbage_frames_ignored(self) -> None:
        """Malformed frames on a link change nothing and show nothing."""
        self.start()
        link = self.links.accept("bob")
        self.command("send", "bob", "hi")
        [sent] = link.sent
        shown = list(self.view.shown)
        for frame in [{}, {"type": "msg"}, {"type": "msg", "msg_id": "", "text": "x", "sent_at": 1},
                      {"type": "msg", "msg_id": "a", "text": 5, "sent_at": 1}, {"type": "ack", "msg_ids": "x"},
                      {"type": "ack"}, {"type": "ack", "msg_ids": [sent["msg_id"], 5]},
                      {"type": "session", "state": "dance"}, {"type": "nonsense"},
                      {"type": "msg", "msg_id": "a", "text": "\ud800", "sent_at": 1},
                      {"type": "msg", "msg_id": "\udfff", "text": "x", "sent_at": 1},
                      {"type": "msg", "msg_id": "a", "text": "x", "sent_at": float("nan")}]:
            self.messenger.link_frame(link, frame)
        self.assertEqual(self.view.shown, shown)
        self.assertEqual(link.sent, [sent])
        self.assertEqual(self.statuses("bob"), [("hi", PENDING)])


class OfflineTests(MessengerTestCase):
    def test_offline_then_online(self) -> None:
        """/offline leaves the server and the listener; messages wait; /online sends them in order."""
        self.start()
        self.command("go_offline")
        self.assertEqual((self.directory.stopped, self.links.listening, self.messenger.logged_in), (1, False, False))
        self.assertEqual(self.command_error("go_offline").code, "already_offline")
        self.assertEqual(self.command_error("who").code, "not_connected")
        self.command("send", "bob", "one")
        self.command("send", "bob", "two")
        self.assertEqual(self.view.events("queued"), [{"user": "bob", "chosen": True}] * 2)
        self.directory.requests.clear()
        self.command("go_online")
        self.assertEqual((self.directory.started, self.links.listening), (2, True))
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual(self.directory.ops().count("resume"), 1)
        self.assertEqual([self.open_sent(i, self.bob)["text"] for i in range(2)], ["one", "two"])

    def test_replaced_stays_offline(self) -> None:
        """Logged in from elsewhere: the peer says so and does not fight back by reconnecting."""
        self.start()
        self.messenger.server_event(Event("bye", {"reason": "replaced", "message": "replaced"}))
        self.assertEqual(self.directory.stopped, 1)
        self.assertEqual(self.view.events("bye")[0]["reason"], "replaced")
        self.command("go_online")
        self.assertEqual(self.directory.started, 2)

    def test_bye_then_lost_told_once(self) -> None:
        """The server's goodbye (shutting down, not hearing from this peer) says why the connection
        ends: its end is not told a second time; a connection lost without one is told."""
        self.start()
        self.messenger.server_event(Event("bye", {"reason": "keepalive_timeout", "message": "silent"}))
        self.messenger.server_lost()
        self.assertEqual([e for e, _ in self.view.shown if e in ("bye", "server_lost")], ["bye"])
        self.successResultOf(self.messenger.server_connected())
        self.messenger.server_lost()
        self.assertEqual([e for e, _ in self.view.shown if e in ("bye", "server_lost")], ["bye", "server_lost"])

    def test_malformed_answers_shown_as_nothing(self) -> None:
        """Names in the server's answers that are not usernames (text that could drive a terminal,
        numbers, lists), and counts that are not counts, are dropped, not shown or stored; the
        login's follow-up (blocks, outbox, receipts) still happens."""
        junk = ["\x1b[2Jbob", 7, ["carol"], None, "", "carol"]
        self.directory.answers.update(blocks={"users": junk}, who={"users": junk}, whosince={"users": "bob"},
                                      broadcast={"delivered": "\x1b[2J", "skipped": -1},
                                      resume={"username": "alice", "token": "T" * 43, "mailbox": "\x1b[2J"})
        self.start(login=False)
        self.command("send", "bob", "written before the login")
        self.successResultOf(self.messenger.server_connected())
        self.assertEqual(self.view.events("welcome"), [{"user": "alice", "mailbox": 0}])
        self.assertEqual(self.open_sent(0, self.bob)["text"], "written before the login")
        self.assertEqual(self.successResultOf(self.history.contacts()).keys(), {"bob", "carol"})
        self.assertFalse(self.successResultOf(self.history.contacts())["bob"].blocked)
        self.assertTrue(self.successResultOf(self.history.contacts())["carol"].blocked)
        self.assertEqual(self.command("who"), ["carol"])
        self.assertEqual(self.command("whosince", 60.0), [])
        self.assertEqual(self.command("broadcast", "hello"), (0, 0))
        self.directory.answers["keys"] = {"user": "carol", "fingerprint": "\x1b[2J", "envelope_key": "x"}
        self.assertIsNone(self.command("fingerprint", "carol").directory)

    def test_who_and_broadcast(self) -> None:
        """who lists online users; broadcast reports how many got it and how many blocked you."""
        self.directory.online.update({"carol", "bob"})
        self.directory.answers["broadcast"] = {"delivered": 1, "skipped": 1}
        self.start()
        self.assertEqual(self.command("who"), ["bob", "carol"])
        self.assertEqual(self.command("broadcast", "hello"), (1, 1))
        self.assertEqual(self.command_error("broadcast", "x" * 4097).code, "too_long")
        self.assertEqual(self.command_error("broadcast", " \t ").code, "empty_message")
        self.directory.answers["block"] = RequestError("already_blocked", "already")
        self.assertEqual(self.command_error("block", "bob").fields["user"], "bob")


class _RandomRuns(MessengerTestCase):
    """Runs a kind of L{_World} over SEEDS seeded random schedules of STEPS steps each."""

    SEEDS = 25
    STEPS = 120

    def runs(self, world: type[_World]) -> None:
        for seed in range(self.SEEDS):
            world(self, random.Random(seed)).run(self.STEPS, f"seed {seed}")


class _World:
    """A fresh history and server for one schedule, and what both kinds of schedule do alike."""

    def __init__(self, test: MessengerTestCase, r: random.Random) -> None:
        self.test = test
        self.r = r
        test.path = test.mktemp()
        test.directory = Directory()
        test.directory.people = {"bob": test.bob, "carol": test.carol}

    def run(self, steps: int, name: str) -> None:
        raise NotImplementedError

    def server_lost(self) -> None:
        if self.test.directory.connected:
            self.test.directory.connected = False
            self.test.messenger.server_lost()

    def stop(self) -> None:
        """alice's peer ends, or is killed: what was in memory goes (its timers with it), the history stays."""
        self.test.successResultOf(Deferred.fromCoroutine(self.test.messenger.stop()))
        self.test.successResultOf(self.test.history.close())


class RandomScheduleTests(_RandomRuns):
    """
    The outbox's promise whatever happens around it. Seeded random schedules of: alice writing;
    bob coming online and going away (his peer closing its link, or vanishing and leaving it
    silent); direct links that can or cannot be opened; bob acknowledging what reached him, or not
    yet; alice's server connection lost and back; alice going /offline and /online, or her peer
    killed and started again; the server refusing a message for now; receipts arriving or
    waiting; time passing. Then things heal (the server is back, bob online and reachable,
    acknowledging everything): every message alice wrote is delivered, bob got each one (over a
    link or sealed through the server) first in the order she wrote them, and nothing was logged
    as an error.
    """

    def test_every_message_delivered(self) -> None:
        self.patch(messenger_module, "OUTBOX_PAGE", 3)  # the outbox read a few at a time, as a long one is
        self.patch(messenger_module, "LINK_WINDOW", 3)  # and a link's window filling up
        self.runs(_Schedule)


class _Schedule(_World):
    """One random schedule of RandomScheduleTests, with bob's side of it."""

    def __init__(self, test: MessengerTestCase, r: random.Random) -> None:
        super().__init__(test, r)
        self.links: list[FakeLink] = []  # every link alice ever had to bob
        self.silent: set[int] = set()  # ids of links whose other end vanished: nothing comes back
        self.acked: set[tuple[int, str]] = set()
        self.arrived: list[str] = []  # what reached bob, in the order it first did
        self.seen_on_server = 0
        self.owed: list[str] = []  # receipts bob sent through the server that alice has not had yet
        self.written: list[str] = []
        self.seq = 0
        self.wanted = True  # alice wants to be online (not /offline)
        self.boot()

    def boot(self) -> None:
        """Start alice's peer on her history (again, after a crash)."""
        test = self.test
        reachable = test.links.reachable if hasattr(test, "links") else set()
        test.passwords = ["correct horse"]
        test.new_messenger()
        test.links.reachable = reachable
        accept = test.links.accept

        def accept_watched(user: str) -> FakeLink:
            link = accept(user)
            send = link.send

            def sent(frame: dict[str, Any]) -> None:
                send(frame)
                if frame.get("type") == "msg" and id(link) not in self.silent and frame["text"] not in self.arrived:
                    self.arrived.append(frame["text"])

            link.send = sent  # type: ignore[method-assign]
            self.links.append(link)
            return link

        test.links.accept = accept_watched  # type: ignore[method-assign]
        self.wanted = True
        test.start(login=test.directory.connected)

    # -- bob's side ------------------------------------------------------------------

    def presence(self, online: bool) -> None:
        if self.test.messenger.logged_in:
            fields = {"online": ["bob"], "offline": {}} if online else {"online": [], "offline": {"bob": "logout"}}
            self.test.messenger.server_event(Event("presence", fields))

    def bob_acks(self) -> None:
        for link in self.links:
            if link.closed or id(link) in self.silent:
                continue
            ids = [f["msg_id"] for f in link.sent if f.get("type") == "msg" and (id(link), f["msg_id"]) not in self.acked]
            self.acked.update((id(link), msg_id) for msg_id in ids)
            if ids:
                link.links.messenger.link_frame(link, {"type": "ack", "msg_ids": ids})

    def bob_takes_mailbox(self) -> None:
        test = self.test
        if "bob" not in test.directory.online:
            return
        new = [item for item in test.directory.sent[self.seen_on_server :] if item["to"] == "bob"]
        self.seen_on_server = len(test.directory.sent)
        for item in new:
            payload, _ = crypto.open_sealed(
                item["envelope"], test.bob.envelope_key, "alice", "bob", item["msg_id"], test.me.fingerprint
            )
            text = json.loads(payload)["text"]
            if text not in self.arrived:
                self.arrived.append(text)
            self.owed.append(item["msg_id"])

    def receipts_arrive(self) -> None:
        if self.test.messenger.logged_in and self.owed:
            self.seq += 1
            self.test.deliver(self.seq, self.test.bob, f"r-{self.seq}", {"kind": "receipt", "msg_ids": self.owed[:]})
            self.owed.clear()

    def bob_online(self) -> None:
        self.test.directory.online.add("bob")
        if self.r.random() < 0.7:
            self.test.links.reachable.add("bob")
        self.presence(True)

    def bob_leaves(self) -> None:
        test = self.test
        test.directory.online.discard("bob")
        test.links.reachable.discard("bob")
        link = test.links.open.get("bob")
        if link is not None:
            if self.r.random() < 0.5:
                self.silent.add(id(link))  # vanished: the link stays, silent
            else:
                link.close()
        self.presence(False)

    def reachable(self) -> None:
        if "bob" in self.test.directory.online:
            self.test.links.reachable.symmetric_difference_update({"bob"})

    def silence(self) -> None:
        link = self.test.links.open.get("bob")
        if link is not None:
            self.silent.add(id(link))

    # -- alice's side and the server ---------------------------------------------------

    def write(self) -> None:
        text = f"m{len(self.written)}"
        self.written.append(text)
        self.test.command("send", "bob", text)

    def server_back(self) -> None:
        test = self.test
        test.directory.connected = True
        if self.wanted and not test.messenger.logged_in:
            test.successResultOf(test.messenger.server_connected())

    def alice_offline(self) -> None:
        if self.wanted:
            self.wanted = False
            self.test.command("go_offline")

    def alice_online(self) -> None:
        if not self.wanted:
            self.wanted = True
            self.test.command("go_online")
            if self.test.directory.connected:
                self.test.successResultOf(self.test.messenger.server_connected())

    def alice_restarts(self) -> None:
        self.stop()
        self.boot()

    def refused_for_now(self) -> None:  # the next send: bob's mailbox full, or alice over her rate
        self.test.directory.answers["send"] = [RequestError(self.r.choice(["mailbox_full", "rate_limited"]), "later")]

    def run(self, steps: int, name: str) -> None:
        test, r = self.test, self.r
        actions = [self.write, self.write, self.write, self.bob_online, self.bob_leaves, self.reachable, self.silence,
                   self.bob_acks, self.bob_acks, self.bob_takes_mailbox, self.receipts_arrive, self.receipts_arrive,
                   self.server_lost, self.server_back, self.alice_offline, self.alice_online, self.alice_restarts,
                   self.refused_for_now]
        for _ in range(steps):
            if r.random() < 0.3:
                test.clock.advance(r.uniform(0.1, 40))
            else:
                r.choice(actions)()
            self.bob_takes_mailbox()  # the server hands bob what it holds for him as soon as he is online
        # Things heal: bob online and reachable, acknowledging all; alice online, the server back.
        self.bob_online()
        test.links.reachable.add("bob")
        self.alice_online()
        self.server_back()
        for _ in range(12):
            self.bob_acks()
            self.bob_takes_mailbox()
            self.receipts_arrive()
            test.clock.advance(20)
        test.assertEqual(test.flushLoggedErrors(), [], name)
        test.assertEqual(sorted(self.arrived, key=lambda t: int(t[1:])), self.written, f"{name}: what reached bob")
        test.assertEqual(self.arrived, self.written, f"{name}: the order it first reached bob in")
        statuses = test.statuses("bob")
        test.assertEqual([status for _, status in statuses], [DELIVERED] * len(self.written), f"{name}: {statuses}")
        self.stop()


class RandomInboxTests(_RandomRuns):
    """
    The inbox's promise whatever happens around it: seeded random schedules of bob writing to
    alice over a direct link or sealed through the server, and writing again what alice has not
    acknowledged yet (over either way); the server handing alice what it holds at each login and
    keeping it until she acks; alice's server connection lost and back; her peer killed and
    started again; time passing. Once things heal, alice was shown each of bob's messages exactly
    once, the server holds nothing more for her, and bob has an acknowledgement (over the link) or
    a receipt (through the server) for every one.
    """

    def test_each_message_shown_once(self) -> None:
        self.runs(_Inbox)


class _Inbox(_World):
    """One random schedule of RandomInboxTests: bob's peer and the server's mailbox for alice."""

    def __init__(self, test: MessengerTestCase, r: random.Random) -> None:
        super().__init__(test, r)
        self.written: list[str] = []  # bob's msg_ids, in order
        self.mailbox: list[tuple[int, str]] = []  # (seq, msg_id) the server holds for alice
        self.seq = 0
        self.shown: list[str] = []  # texts alice was shown, across restarts
        self.link: FakeLink | None = None  # bob's link to alice, from her side
        self.acked_by_link: set[str] = set()
        self.receipted: set[str] = set()
        self.receipts_read = 0
        test.directory.online.add("bob")
        self.boot()

    def boot(self) -> None:
        test = self.test
        test.passwords = ["correct horse"]
        test.new_messenger()
        test.start(login=test.directory.connected)
        if test.directory.connected:
            self.hand_over(self.mailbox)
        self.link = None

    def hand_over(self, items: list[tuple[int, str]]) -> None:
        """The server writes envelopes to alice (at her login: all it holds, in order)."""
        self.settle()
        for seq, msg_id in items:
            self.test.deliver(seq, self.test.bob, msg_id, {"kind": "msg", "text": msg_id, "sent_at": 1.0})
        self.settle()

    def settle(self) -> None:
        """alice's acks reach the server, which forgets what was acked."""
        acked = set(self.test.directory.acked)
        self.mailbox = [(seq, msg_id) for seq, msg_id in self.mailbox if seq not in acked]

    def unanswered(self) -> list[str]:
        return [msg_id for msg_id in self.written if msg_id not in self.answered()]

    def answered(self) -> set[str]:
        """What bob had an ack (over a link) or a receipt (through the server) for."""
        if self.link is not None:
            self.acked_by_link.update(m for f in self.link.sent if f.get("type") == "ack" for m in f["msg_ids"])
        sent = self.test.directory.sent
        for item in sent[self.receipts_read :]:
            if item["to"] == "bob" and item["msg_id"].startswith("r-"):
                payload, _ = crypto.open_sealed(
                    item["envelope"], self.test.bob.envelope_key, "alice", "bob", item["msg_id"], self.test.me.fingerprint
                )
                self.receipted.update(json.loads(payload)["msg_ids"])
        self.receipts_read = len(sent)
        return self.acked_by_link | self.receipted

    # -- what happens ------------------------------------------------------------------

    def through_server(self, msg_id: str) -> None:
        self.seq += 1
        self.mailbox.append((self.seq, msg_id))
        if self.test.messenger.logged_in:
            self.hand_over([(self.seq, msg_id)])

    def over_link(self, msg_id: str) -> None:
        test = self.test
        if self.link is None or self.link.closed:
            self.answered()  # the acks that came over the old link
            self.link = test.links.accept("bob")  # bob dials alice
        test.messenger.link_frame(self.link, {"type": "msg", "msg_id": msg_id, "text": msg_id, "sent_at": 1.0})

    def bob_writes(self) -> None:
        msg_id = f"b{len(self.written)}"
        self.written.append(msg_id)
        self.r.choice([self.through_server, self.over_link])(msg_id)

    def bob_writes_again(self) -> None:
        waiting = self.unanswered()
        if waiting:
            self.r.choice([self.through_server, self.over_link])(self.r.choice(waiting))

    def link_closes(self) -> None:
        if self.link is not None:
            self.link.close()

    def server_back(self) -> None:
        test = self.test
        if not test.directory.connected:
            test.directory.connected = True
            test.successResultOf(test.messenger.server_connected())
            self.hand_over(self.mailbox)

    def alice_restarts(self) -> None:
        self.answered()  # the acks that came over the link, which goes with her peer
        self.stop()
        self.shown += [text for _, text in self.test.view.messages()]
        self.boot()

    def run(self, steps: int, name: str) -> None:
        test, r = self.test, self.r
        actions = [self.bob_writes, self.bob_writes, self.bob_writes, self.bob_writes_again, self.link_closes,
                   self.server_lost, self.server_back, self.alice_restarts]
        for _ in range(steps):
            if r.random() < 0.2:
                test.clock.advance(r.uniform(0.1, 40))
            else:
                r.choice(actions)()
        self.server_back()
        for _ in range(6):  # bob writes again what is not answered; receipts refused for now go again
            for msg_id in self.unanswered():
                self.through_server(msg_id)
            test.clock.advance(40)
            self.settle()
        self.shown += [text for _, text in test.view.messages()]
        test.assertEqual(test.flushLoggedErrors(), [], name)
        test.assertEqual(sorted(self.shown, key=lambda t: int(t[1:])), self.written, f"{name}: shown")
        test.assertEqual(self.mailbox, [], f"{name}: left on the server")
        test.assertEqual(self.unanswered(), [], f"{name}: no ack or receipt")
        self.stop()


class SparingObserverTests(unittest.SynchronousTestCase):
    def test_lines_of_one_format_limited(self) -> None:
        """Of warnings and lesser lines with one format, at most the burst a period go on, then
        one line says the rest are left out; other formats, and errors, are not held back; the
        next period lets them through again."""
        seen: list[dict[str, Any]] = []
        clock = Clock()
        observer = SparingObserver(seen.append, burst=3, period=60.0, now=clock.seconds)

        def emit(fmt: str, level: LogLevel = LogLevel.warn) -> None:
            observer({"log_format": fmt, "log_level": level, "user": "bob"})

        for _ in range(10):
            emit("ignored an unknown frame from {user}")
        emit("another from {user}", LogLevel.info)
        emit("ignored an unknown frame from {user}", LogLevel.critical)
        self.assertEqual([formatEvent(e) for e in seen], [
            "ignored an unknown frame from bob",
            "ignored an unknown frame from bob",
            "ignored an unknown frame from bob",
            "more lines like 'ignored an unknown frame from {user}' than 3 in 60 s: the rest are left out until then",
            "another from bob",
            "ignored an unknown frame from bob",
        ])
        clock.advance(60)
        emit("ignored an unknown frame from {user}")
        self.assertEqual(formatEvent(seen[-1]), "ignored an unknown frame from bob")
        self.assertEqual(len(seen), 7)


def _raise(error: Exception) -> Any:
    raise error
