"""The peer's rules: login, routing (a direct link, else a sealed envelope through the server), the
outbox, receipts, dedupe, key pinning, block and mute. It does no I/O itself: it drives the server
link, the direct links and the history, and tells the view what happened."""

from __future__ import annotations

import json
import math
import re
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, Callable, NoReturn, Protocol

from twisted.internet.defer import CancelledError, Deferred, DeferredLock, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from .. import crypto
from ..crypto import CryptoError, EnvelopeError, EnvelopeKey, Identity, WrongEnvelopeKey
from ..wire import MAX_ACK, MAX_BROADCAST, MAX_PASSWORD, MIN_PASSWORD, PASSWORD_RULE, REQUEST_SCHEMAS, Code, Event
from .history import DELIVERED, FAILED, HELD, MUTED, PENDING, SENT, SHOWN, Contact, Entry, History
from .server_link import NotConnected, Pace, RequestError



class SparingObserver:
    """
    Passes log events on, but of warnings and lesser lines with one format at most C{burst} in a
    C{period}, and says so when it starts leaving them out. What the messenger warns about per
    message or frame (a forged envelope, a frame that means nothing) is a contact's to cause at
    the speed of a direct link: without this, one could fill the disk with this peer's log.
    """

    def __init__(
        self, observer: ILogObserver, burst: int = 20, period: float = 60.0, now: Callable[[], float] = time.monotonic
    ) -> None:
        self._observer = observer
        self._burst = burst
        self._period = period
        self._now = now
        self._windows: dict[str, list[float]] = {}  # format -> [start, lines in this window]

    def __call__(self, event: dict[str, Any]) -> None:
        key = event.get("log_format")
        if key is None or event.get("log_level", LogLevel.warn) > LogLevel.warn:
            self._observer(event)
            return
        now = self._now()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self._period:
            window = self._windows[key] = [now, 0]
        window[1] += 1
        if window[1] <= self._burst:
            self._observer(event)
        elif window[1] == self._burst + 1:
            self._observer({
                **event, "log_level": LogLevel.warn, "format": key, "burst": self._burst, "period": self._period,
                "log_format": "more lines like {format!r} than {burst} in {period:g} s: the rest are left out until then",
            })


log = Logger(observer=SparingObserver(globalLogPublisher))

USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
MAX_TEXT = 16000
PRESENCE_GRACE = 30.0  # seconds users online before a reconnection have to come back before told gone
PRESENCE_LINES = 5  # users logging in (or out) together shown a line each; more share one line
# Seconds after it was written that a message shown says when it was written: beyond the skew of
# clocks that are set by hand rather than kept by NTP (the time is the sender's word)
LATE = 300.0
MAX_MSG_IDS = 256
DIRECT_RETRY = 60.0  # after a failed direct connection, go through the server for this long
RETRY_DELAY = 30.0  # after a transient server refusal (full mailbox, the server failing to store)
# After the server's rate limit refused a message anyway (the server link paces requests by the
# rate the server announces: a server that announces none, or a hiccup of the clocks).
RATE_RETRY = 1.0
OUTBOX_WAIT = 5.0  # how long /logout waits for messages on their way out
OUTBOX_PAGE = 256  # pending messages read from the history at a time
# Messages on their way over a direct link and not acknowledged, at most: a contact whose peer
# takes them slowly (its user's output not read) would otherwise have everything written to
# them wait in this peer's memory, in the link's buffer.
LINK_WINDOW = 256
ACK_WAIT = 15.0  # a direct link that acknowledges none of what it carries this long is dead or stuck: dropped
BROADCASTS_REMEMBERED = 1000  # the last broadcasts shown, by sender and time: one sent again is not shown
SENT_AGAIN_REMEMBERED = 10000  # the last ids sent again on an unopened notice: each goes again once
# Broadcasts waiting for the output to go out (a script that does not read its peer's output), at
# most: past it they are dropped and counted. Unlike a message, nobody keeps a broadcast to send
# again, and keeping all of them would let anyone broadcasting fill this peer's memory.
MAX_BROADCASTS_WAITING = 256
UNREADABLE_WAIT = 1.0  # envelopes that cannot be opened are told of together, this long after the first
# Envelope characters from the server in hand (not stored yet), past which the next envelopes are
# dropped; once what is in hand is stored and acked, the peer reconnects and the server sends again
# what it had not acknowledged. The server sends at most its window (1 MiB) unacknowledged: a server
# that does not keep to it (compromised, or broken) would otherwise fill this peer's memory.
MAX_INCOMING = 4 << 20

# Server refusals that no retry will change: the message is marked failed.
_PERMANENT = {
    Code.UNKNOWN_USER, Code.BLOCKED_BY_USER, Code.SELF, Code.BAD_REQUEST, Code.INVALID_USERNAME,
    Code.LINE_TOO_LONG,  # over the max_line its hello told: sent again, it would not fit either
}
# Login refusals that pass: too many password attempts from this address (a class behind one
# router), the server busy hashing passwords, its store failing. The peer waits and tries again.
_LOGIN_LATER = {Code.RATE_LIMITED, Code.INTERNAL_ERROR}
_TOKEN_CHECK = REQUEST_SCHEMAS["resume"]["token"][0]


class CommandError(Exception):
    """A command that did nothing; C{code} says why (the console words it), C{fields} give details."""

    def __init__(self, code: str, **fields: Any) -> None:
        super().__init__(code, fields)
        self.code = code
        self.fields = fields


class View(Protocol):
    """Where the messenger reports what happened: the console renders C{event} with C{fields}."""

    def show(self, event: str, **fields: Any) -> None: ...

    def drained(self) -> Deferred[None]:
        """Fires once what was shown has gone out: messages are taken in no faster than they can be shown."""


# The next password: retry is true after the previous one was refused. None: no (more) password.
PasswordSource = Callable[[bool], "Deferred[str | None]"]
# The password typed once more (on a terminal), before an account is registered with it.
PasswordCheck = Callable[[], "Deferred[str | None]"]


class ServerLinkLike(Protocol):
    message_rate: tuple[float, int] | None  # the server's, once known
    key_signatures: bool  # its hello says it hands out key signatures: only for what the user is told

    def start(self) -> None: ...
    def stop(self) -> Deferred[None]: ...
    def request(self, op: str, **args: Any) -> Deferred[dict[str, Any]]: ...
    def reconnect(self) -> None: ...  # drop the connection; the next one follows


class LinkLike(Protocol):
    user: str
    session: bool

    def send(self, frame: dict[str, Any]) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class LinksLike(Protocol):
    def listen(self) -> Deferred[int]: ...
    def stop_listening(self) -> Deferred[None]: ...
    def connect(self, user: str, host: str, port: int, fingerprint: str) -> Deferred[LinkLike]: ...
    def get(self, user: str) -> LinkLike | None: ...
    def session_link(self, user: str) -> LinkLike | None: ...
    def close(self, user: str) -> None: ...
    def close_all(self) -> None: ...


@dataclass(frozen=True)
class Address:
    host: str
    port: int


@dataclass(frozen=True)
class FingerprintInfo:
    user: str
    pinned: str | None  # what this peer trusts
    changed_to: str | None  # a new key seen and not accepted yet
    directory: str | None  # what the server says now (None: not asked or unknown)


class _Fatal(Exception):
    """Login cannot succeed: the view was told why; the peer exits."""


class _Later(Exception):
    """Login refused for now (L{_LOGIN_LATER}): the peer says so and tries again."""

    def __init__(self, refusal: RequestError) -> None:
        super().__init__(refusal)
        self.refusal = refusal


def valid_username(name: Any) -> bool:
    return isinstance(name, str) and USERNAME.fullmatch(name) is not None


class Messenger:
    """
    One user's chat logic.

    @param server_name: "host:port", to remember registration per server.
    @param passwords: where login passwords come from (a prompt or a file).
    @param confirm: asks for the password again before registering (a typo there would lock the
        user out of the new account); None where it cannot be typed twice (a password file, a pipe).
    """

    def __init__(
        self,
        user: str,
        identity: Identity,
        envelope_key: EnvelopeKey,
        history: History,
        clock: IReactorTime,
        view: View,
        passwords: PasswordSource,
        server_name: str,
        confirm: PasswordCheck | None = None,
    ) -> None:
        self.user = user
        self._identity = identity
        self._envelope_key = envelope_key
        # Given with the keys, so that contacts take the envelope key on the identity key's word,
        # not the server's alone (crypto.sign_envelope_key).
        self._key_signature = crypto.sign_envelope_key(identity, user, envelope_key.public_b64)
        self._history = history
        self._clock = clock
        self._view = view
        self._passwords = passwords
        self._confirm = confirm
        self._server_name = server_name
        self._server: ServerLinkLike
        self._links: LinksLike
        self._contacts: dict[str, Contact] = {}
        self._password: str | None = None
        self._token: str | None = None
        self._login_wait: Deferred[None] | None = None
        self._port = 0
        self._online_wanted = False
        self.logged_in = False
        self._in_flight: dict[tuple[str, str], LinkLike] = {}
        self._behind_link: set[str] = set()  # their outbox waits for acks: of a message on its way over another link, or for room on this one
        self._ack_checks: dict[LinkLike, Any] = {}  # link -> the check that what it carries got acknowledged
        self._direct_retry: dict[str, float] = {}
        self._delays_told: dict[str, str] = {}  # user -> the refusal their outbox waits on, said once
        self._stored_told: set[str] = set()  # told that messages to them wait on the server, until they are back
        self._unsigned_told: set[str] = set()  # told that their peer signs no envelope key, until it does
        self._server_unsigned_told = False  # told that the server passes on no key signatures
        self._bye_told = False  # the server said why it closes the connection: its loss is not told again
        self._online_seen: set[str] = set()  # who this peer last heard is online (presence, who)
        self._presence_known = False  # it has asked who is online once, after its first login
        self._unconfirmed: set[str] = set()  # online before a reconnection, not heard of since
        self._settle_call: Any = None  # when those are told as gone
        # after a transient refusal: ("outbox", user) sends the user's outbox again, ("receipts",) the owed
        # receipts; ("unreadable",) tells of the envelopes in _unreadable (sender -> msg_ids)
        self._retry_calls: dict[tuple[str, ...], Any] = {}
        self._unreadable: dict[str, list[str]] = {}
        self._store_failing = False  # the history failed to store a message (and the user was told)
        # (user, msg_id) sent again once on their word, the last SENT_AGAIN_REMEMBERED: a contact
        # may name any ids in an unopened notice, real or not
        self._sent_again: dict[tuple[str, str], None] = {}
        self._pumping: set[str] = set()
        self._again: set[str] = set()
        self._idle_waiters: list[Deferred[None]] = []
        self._incoming: list[dict[str, Any]] = []
        self._incoming_chars = 0  # of the envelopes in _incoming and in the batch being stored
        self._incoming_dropped = False  # past MAX_INCOMING: reconnect once what is in hand is done
        self._draining = False
        self._drained_waiters: list[Deferred[None]] = []
        self._incoming_lock = DeferredLock()
        self._receipts_waiting: dict[str, list[str]] = {}  # sender -> ids for after the receipt on its way
        # contact -> the server's rate, and the pace of their messages over direct links by it
        self._link_paces: dict[str, tuple[tuple[float, int], Pace]] = {}
        self._broadcast_lock = DeferredLock()
        self._broadcasts_seen: dict[tuple[str, float], None] = {}  # (sender, sent_at), oldest first
        self._broadcasts_waiting = 0
        self._broadcasts_dropped = 0  # since the last told of
        self._ready_waiters: list[Deferred[None]] | None = []
        self._finish_waiters: list[Deferred[int]] = []
        self._finished: int | None = None

    def attach(self, server: ServerLinkLike, links: LinksLike) -> None:
        """Give the messenger its connections (they call back into it, so they come second)."""
        self._server = server
        self._links = links

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        """Load the contacts, get a password, listen for direct links, connect to the server."""
        self._contacts = await self._history.contacts()
        self._password = await self._passwords(False)
        if self._password is None:
            self._view.show("no_password")
            self._finish(1)
            return
        await self._go_online()

    def when_ready(self) -> Deferred[None]:
        """Fires once the first login succeeded or failed to reach the server: commands may run."""
        d: Deferred[None] = Deferred()
        if self._ready_waiters is None:
            d.callback(None)
        else:
            self._ready_waiters.append(d)
        return d

    def when_finished(self) -> Deferred[int]:
        """Fires with an exit status when the peer should stop (logout, or a login that cannot work)."""
        d: Deferred[int] = Deferred()
        if self._finished is not None:
            d.callback(self._finished)
        else:
            self._finish_waiters.append(d)
        return d

    async def stop(self) -> None:
        """Leave the server and close every link (idempotent)."""
        self._online_wanted = False
        await self._leave()
        for call in [*self._retry_calls.values(), *self._ack_checks.values()]:
            call.cancel()
        self._retry_calls.clear()
        self._ack_checks.clear()

    def _ready(self) -> None:
        waiters, self._ready_waiters = self._ready_waiters, None
        for d in waiters or ():
            d.callback(None)

    def _finish(self, status: int) -> None:
        if self._finished is not None:
            return
        self._finished = status
        waiters, self._finish_waiters = self._finish_waiters, []
        for d in waiters:
            d.callback(status)
        self._ready()  # after: whoever waits to be ready sees the peer finished (no commands run)

    async def _go_online(self) -> None:
        self._online_wanted = True
        try:
            self._port = await self._links.listen()
        except Exception as e:
            log.failure("cannot listen for direct links")
            self._view.show("listen_failed", reason=str(e))
            self._port = 0
        self._server.start()

    # -- the server connection (called by the server link) ----------------------

    def server_connected(self) -> Deferred[None]:
        """The server said hello: log in (resume, or register and log in with the password)."""
        return Deferred.fromCoroutine(self._authenticate())

    def server_lost(self) -> None:
        self._cancel_login_wait()  # the next connection logs in afresh
        self._incoming_dropped = False  # the next connection sends again all that was not acked
        was_logged_in, self.logged_in = self.logged_in, False
        told, self._bye_told = self._bye_told, False
        if was_logged_in and self._online_wanted and not told:
            self._view.show("server_lost")

    def server_unreachable(self, reason: str) -> None:
        """No connection could be made (said once per outage): work offline meanwhile."""
        if self._online_wanted:
            self._view.show("server_unreachable", server=self._server_name, reason=reason)
        self._ready()

    def server_pinned(self, fingerprint: str) -> None:
        """
        The server's certificate was trusted on first use: a new server, or one that lost its data
        (the user deleted the old pin), where this account may not exist any more. Registering is
        tried again, so that a lost account is made anew rather than refused as a wrong password.
        """
        self._view.show("server_pinned", server=self._server_name, fingerprint=fingerprint)
        self._history.forget_registered(self._server_name).addErrback(lambda f: log.failure("forget registration", f))

    def server_refused(self, message: str) -> None:
        """The server is not the one pinned: stop for good."""
        self._view.show("server_refused", message=message)
        Deferred.fromCoroutine(self.stop())
        self._finish(1)

    def server_event(self, event: Event) -> None:
        handler = getattr(self, "_event_" + event.name, None)
        if handler is None:
            log.debug("ignored server event {name}", name=event.name)
            return
        handler(event.fields)

    async def _authenticate(self) -> None:
        told = None
        while True:
            if self._finished is not None:
                return
            try:
                result = await self._resume()
                resumed = result is not None
                if result is None and not await self._history.is_registered(self._server_name):
                    result = await self._register()
                if result is None:
                    result = await self._login()
                break
            except _Fatal:
                # Stopping the connection from inside its own setup would re-enter the server link;
                # the peer is about to exit, which stops everything.
                self._online_wanted = False
                self._finish(1)
                return
            except _Later as later:
                e = later.refusal
                if told != (e.code, e.message):  # said once, not at every try
                    told = (e.code, e.message)
                    self._view.show("login_delayed", code=e.code, message=e.message, seconds=RETRY_DELAY)
                self._ready()  # meanwhile the user works offline
                self._login_wait = deferLater(self._clock, RETRY_DELAY)
                try:
                    await self._login_wait
                except CancelledError:
                    return  # the connection was lost or the peer stops
                finally:
                    self._login_wait = None
        self._token = _usable_token(result.get("token"))
        self._password = None  # reconnections resume with the token (or ask for the password again)
        self.logged_in = True
        mailbox = _count(result.get("mailbox"))
        self._view.show("reconnected" if resumed else "welcome", user=self.user, mailbox=mailbox)
        self._ready()
        Deferred.fromCoroutine(self._after_login()).addErrback(self._after_login_failed)

    def _after_login_failed(self, failure: Failure) -> None:
        if failure.check(NotConnected):  # logged out or disconnected meanwhile: the next login does it again
            log.info("the work after login stopped: {e}", e=failure.value)
        else:
            log.failure("after login", failure)

    async def _resume(self) -> dict[str, Any] | None:
        """
        Log in with the session token, if there is one; None when the password has to log in
        (asked for when this peer no longer has it: the token expired, or the server gave none).
        """
        result = None if self._token is None else await self._resume_with(self._token)
        if result is None:
            self._token = None
            if self._password is None:
                self._password = await self._passwords(False)
                if self._password is None:
                    self._view.show("session_expired", user=self.user)
                    raise _Fatal()
        return result

    def _cancel_login_wait(self) -> None:
        if self._login_wait is not None:
            self._login_wait.cancel()

    async def _resume_with(self, token: str) -> dict[str, Any] | None:
        """Log in with C{token}: the login's result, or None when the server does not know the token."""
        try:
            return await self._server.request(
                "resume", username=self.user, token=token, port=self._port, key_signature=self._key_signature
            )
        except RequestError as e:
            if e.code == Code.INVALID_TOKEN:
                return None
            self._refused(e)

    async def _next_password(self) -> None:
        self._password = await self._passwords(True)
        if self._password is None:
            self._view.show("login_gave_up", user=self.user)
            raise _Fatal()

    async def _register(self) -> dict[str, Any] | None:
        """
        Register this account and log in with the session token the registration answers with: the
        login's result, or None when the password has to log in (the account existed already,
        registration is closed, or the server gave no token).
        """
        while True:
            if self._confirm is not None:  # a person at a terminal: checked before typed twice
                if not MIN_PASSWORD <= len(self._password) <= MAX_PASSWORD:
                    self._view.show("weak_password", message=PASSWORD_RULE)
                    await self._next_password()
                    continue
                if await self._confirm() != self._password:
                    self._view.show("passwords_differ")
                    await self._next_password()
                    continue
            try:
                registered = await self._server.request(
                    "register",
                    username=self.user,
                    password=self._password,
                    fingerprint=self._identity.fingerprint,
                    envelope_key=self._envelope_key.public_b64,
                    key_signature=self._key_signature,
                )
            except RequestError as e:
                if e.code == Code.WEAK_PASSWORD:
                    self._view.show("weak_password", message=e.message)
                    await self._next_password()
                    continue
                if e.code == Code.REGISTRATION_CLOSED:
                    # Only accounts its operator made log in there: say so (a refused password
                    # then reads right), try, and register next time.
                    self._view.show("registration_closed", user=self.user, server=self._server_name)
                    return None
                if e.code != Code.USERNAME_TAKEN:
                    self._refused(e)
                # The account exists already (imported, or ours from another install): log in.
                registered = {}
            else:
                self._view.show("registered", user=self.user, server=self._server_name)
            await self._history.mark_registered(self._server_name)
            # Log in with the token the registration gave, so the server hashes the password once;
            # without one (the account existed) the password logs in.
            token = _usable_token(registered.get("token"))
            return None if token is None else await self._resume_with(token)

    async def _login(self) -> dict[str, Any]:
        while True:
            try:
                result = await self._server.request(
                    "login",
                    username=self.user,
                    password=self._password,
                    port=self._port,
                    fingerprint=self._identity.fingerprint,
                    envelope_key=self._envelope_key.public_b64,
                    key_signature=self._key_signature,
                )
            except RequestError as e:
                if e.code == Code.BAD_CREDENTIALS:
                    self._view.show("wrong_password", user=self.user)
                    await self._next_password()
                    continue
                self._refused(e)
            else:
                await self._history.mark_registered(self._server_name)  # the account is there
                return result

    def _refused(self, e: RequestError) -> NoReturn:
        """A login, resume or registration refused: wait and try again (L{_LOGIN_LATER}), or say why and exit."""
        if e.code in _LOGIN_LATER:
            raise _Later(e) from None
        event = {
            Code.TOO_MANY_ATTEMPTS: "too_many_attempts",
            Code.ACCOUNT_LOCKED: "account_locked",
            Code.ALREADY_ONLINE: "already_online",
        }.get(e.code, "login_failed")
        self._view.show(event, user=self.user, code=e.code, message=e.message)
        raise _Fatal() from None

    async def _after_login(self) -> None:
        # Read before this login's mailbox is stored (the history runs its work in order): the
        # receipts for the mailbox go out as it is taken, and would otherwise go twice.
        owed = await self._history.owed_receipts()
        blocked = set(_usernames(await self._server.request("blocks", background=True)))
        await self._sync_presence()
        for user in blocked | {u for u, c in self._contacts.items() if c.blocked}:
            await self._save(replace(self._contact(user), blocked=user in blocked))
        for peer in await self._history.outbox_peers():
            self._kick(peer)
        await self._send_receipts(owed)

    # -- server events ---------------------------------------------------------

    def _event_presence(self, fields: dict[str, Any]) -> None:
        online, offline = fields.get("online"), fields.get("offline")
        if not (isinstance(online, list) and isinstance(offline, dict)):
            return
        gone = [user for user in offline if valid_username(user)]
        came = [user for user in online if valid_username(user)]
        seen = self._online_seen
        self._show_presence(gone, False)
        # Back after the server restarted, everyone who was online comes back: not news to the user.
        self._show_presence([user for user in came if user not in seen], True)
        seen.difference_update(gone)
        seen.update(came)
        self._unconfirmed.difference_update(gone, came)
        self._stored_told.difference_update(came)
        for user in came:
            self._kick(user)

    async def _sync_presence(self) -> None:
        """
        After a login, learn who is online. After a reconnection (the server may have restarted,
        and announced nothing of who came and went meanwhile), tell who came; those who were online
        before and are not yet back get L{PRESENCE_GRACE} to reconnect too before they are told
        as gone: after a restart everyone comes back over a few seconds, which is not news.
        """
        try:
            users = set(_usernames(await self._server.request("who", background=True)))
        except (RequestError, NotConnected) as e:
            log.info("who is online stays unknown until the next presence: {e}", e=e)
            return
        seen = self._online_seen
        if self._presence_known:
            self._show_presence(sorted(users - seen), True)
            self._unconfirmed = seen - users
            self._stop_settling()
            self._settle_call = self._clock.callLater(PRESENCE_GRACE, self._presence_settled)
            seen.update(users)
        else:
            self._online_seen = users
            # A first login: who is around, said after the messages that waited (they came first).
            self.when_inbox_idle().addCallback(lambda _: self._view.show("online_now", users=sorted(users)))
        self._presence_known = True

    def _stop_settling(self) -> None:
        if self._settle_call is not None and self._settle_call.active():
            self._settle_call.cancel()
        self._settle_call = None

    def _presence_settled(self) -> None:
        self._settle_call = None
        gone, self._unconfirmed = sorted(self._unconfirmed), set()
        self._online_seen.difference_update(gone)
        self._show_presence(gone, False)

    def _show_presence(self, users: list[str], online: bool) -> None:
        if len(users) > PRESENCE_LINES:  # many at once (a big server's morning): one line
            self._view.show("presence_many", users=users, online=online)
        else:
            for user in users:
                self._view.show("presence", user=user, online=online)

    def _event_broadcast(self, fields: dict[str, Any]) -> None:
        user, text = fields.get("from"), fields.get("text")
        if not valid_username(user) or not isinstance(text, str):
            return
        contact = self._contacts.get(user)
        if (contact and contact.blocked) or self._is_muted(user):
            return
        if self._broadcasts_waiting >= MAX_BROADCASTS_WAITING:
            if not self._broadcasts_dropped:
                log.warn("the output is not being read: broadcasts dropped until it is")  # noqa: G010 - twisted.logger
            self._broadcasts_dropped += 1
            return
        try:
            sent_at, fingerprint = crypto.open_broadcast(fields.get("signature"), user, text)
        except EnvelopeError as e:
            log.warn("dropped a forged broadcast from {sender}: {e}", sender=user, e=e)  # noqa: G010 - twisted.logger
            return
        # Those dropped came before this one: told of just before it is shown.
        dropped, self._broadcasts_dropped = self._broadcasts_dropped, 0
        self._broadcasts_waiting += 1
        Deferred.fromCoroutine(self._show_broadcast(user, text, sent_at, fingerprint, dropped)).addErrback(
            lambda f: log.failure("broadcast from {sender}", f, sender=user)
        )

    async def _show_broadcast(self, user: str, text: str, sent_at: float, fingerprint: str, dropped: int) -> None:
        """
        Show a broadcast once its key is known to be its sender's and what was shown before has
        gone out, in the order they came; first say how many were C{dropped} before it came.
        """
        try:
            async with self._broadcast_lock:
                await self._view.drained()
                if dropped:
                    self._view.show("broadcasts_dropped", count=dropped)
                await self._check_and_show_broadcast(user, text, sent_at, fingerprint)
        finally:
            self._broadcasts_waiting -= 1
            if not self._broadcasts_waiting and self._broadcasts_dropped:
                # None came after them to tell it before.
                dropped, self._broadcasts_dropped = self._broadcasts_dropped, 0
                self._view.show("broadcasts_dropped", count=dropped)

    async def _check_and_show_broadcast(self, user: str, text: str, sent_at: float, fingerprint: str) -> None:
        try:
            verdict = await self._verify_key(user, fingerprint)
        except (RequestError, NotConnected) as e:
            log.info("dropped a broadcast from {sender}: their key could not be checked ({e})", sender=user, e=e)
            return
        if verdict is not True:  # not their key, or a changed key not accepted yet (the user was told)
            log.warn(  # noqa: G010 - twisted.logger
                "dropped a broadcast from {sender} signed with sha256:{fingerprint}, not their accepted key",
                sender=user, fingerprint=fingerprint,
            )
            return
        # The server cannot forge one, but it could send one again: each is shown once.
        if (user, sent_at) in self._broadcasts_seen:
            log.warn("dropped a broadcast from {sender} shown before", sender=user)  # noqa: G010 - twisted.logger
            return
        _remember(self._broadcasts_seen, [(user, sent_at)], BROADCASTS_REMEMBERED)
        self._view.show("broadcast", user=user, text=text, **self._when(sent_at))

    def _event_bye(self, fields: dict[str, Any]) -> None:
        reason = fields.get("reason")
        if reason == "logout":
            return
        self._view.show("bye", reason=reason, message=fields.get("message"))
        self._bye_told = True  # the connection's end that follows needs no line of its own
        if reason in ("replaced", "idle_timeout"):
            # Reconnecting would undo what the server did on purpose: stay offline until /online.
            self._online_wanted = False
            Deferred.fromCoroutine(self._leave())

    def _event_envelope(self, fields: dict[str, Any]) -> None:
        size = _envelope_chars(fields)
        # Once one is dropped, all that follow on this connection are: one taken after it would
        # overtake it.
        if self._incoming_dropped or (self._incoming_chars and self._incoming_chars + size > MAX_INCOMING):
            if not self._incoming_dropped:
                self._incoming_dropped = True
                log.warn("the server sent more than {n} characters of envelopes unacknowledged: the rest come again"  # noqa: G010 - twisted.logger
                         " after a reconnection", n=MAX_INCOMING)
            return
        self._incoming.append(fields)
        self._incoming_chars += size
        if not self._draining:
            Deferred.fromCoroutine(self._drain()).addErrback(lambda f: log.failure("incoming", f))

    async def _drain(self) -> None:
        """Store what arrived, start the receipts, then ack the server (so a crash redelivers, never loses)."""
        self._draining = True
        try:
            while self._incoming:
                batch, self._incoming = self._incoming, []
                receipts: dict[str, list[str]] = {}
                seqs = []
                for fields in batch:
                    try:
                        async with self._incoming_lock:
                            done = await self._accept_envelope(fields, receipts)
                    except Exception:
                        log.failure("envelope {seq} not stored; the server will send it again", seq=fields.get("seq"))
                        done = False
                    self._incoming_chars -= _envelope_chars(fields)
                    if done and isinstance(fields.get("seq"), int):
                        seqs.append(fields["seq"])
                # Receipts go out without waiting for their answers: the server answers a send
                # when its recipient acks it, and two peers waiting on each other's receipts
                # before acking would stall until the server's hold ran out.
                for user, msg_ids in receipts.items():
                    self._receipts_for(user, msg_ids)
                for chunk in _chunks(seqs, MAX_ACK):
                    try:
                        await _halved_while_too_long(lambda part: self._server.request("ack", seqs=part), chunk)
                    except (RequestError, NotConnected) as e:
                        log.info("ack failed, the server will send them again: {e}", e=e)
        finally:
            self._draining = False
            if self._incoming_dropped:  # what was dropped comes again on the next connection
                self._incoming_dropped = False
                self._server.reconnect()
            waiters, self._drained_waiters = self._drained_waiters, []
            for d in waiters:
                d.callback(None)

    async def _accept_envelope(self, fields: dict[str, Any], receipts: dict[str, list[str]]) -> bool:
        """
        Open, check and store one envelope.

        @return: whether it may be acked (False: try again when it comes back).
        """
        sender, msg_id, envelope = fields.get("from"), fields.get("msg_id"), fields.get("envelope")
        if not (valid_username(sender) and _valid_id(msg_id) and isinstance(envelope, str)):
            log.warn("dropped a malformed envelope event {seq}", seq=fields.get("seq"))
            return True
        contact = self._contacts.get(sender)
        if contact is not None and contact.blocked:
            log.info("dropped an envelope from {sender}, who is blocked", sender=sender)
            return True
        try:
            try:
                payload, fingerprint = crypto.open_sealed(envelope, self._envelope_key, sender, self.user, msg_id, None)
            except WrongEnvelopeKey as e:
                payload, fingerprint = None, e.fingerprint
            verdict = await self._verify_key(sender, fingerprint)
            if verdict is False:
                raise EnvelopeError(f"signed with sha256:{fingerprint}, which is not {sender}'s key")
            if payload is None:
                # From the sender, sealed to a key this install does not have (sent to its user's
                # old install): no retry opens it. The user is told how many, from whom, once a
                # mailbox's worth has come in.
                log.warn("dropped {msg_id} from {sender}: sealed to another envelope key", msg_id=msg_id, sender=sender)  # noqa: G010 - twisted.logger
                self._unreadable.setdefault(sender, []).append(msg_id)
                self._retry_later(("unreadable",), self._tell_unreadable, UNREADABLE_WAIT)
                return True
            data = json.loads(payload)
            kind = data["kind"]
        except NotConnected:
            return False
        except (EnvelopeError, RequestError, ValueError, TypeError, KeyError) as e:
            log.warn("dropped a forged or unreadable envelope {msg_id} from {sender}: {e}", msg_id=msg_id, sender=sender, e=e)
            return True
        if kind == "msg" and _valid_text(data.get("text")) and _number(data.get("sent_at")):
            await self._store_incoming(
                sender, msg_id, data["text"], False, data["sent_at"], held=verdict is None, owe_receipt=True
            )
            receipts.setdefault(sender, []).append(msg_id)
        elif kind == "receipt" and verdict is True and _msg_ids(data.get("msg_ids")):
            await self._delivered(sender, data["msg_ids"])
        elif kind == "unopened" and _msg_ids(data.get("msg_ids")):
            # From the sender's key, accepted or new (a new install is why it could not open them).
            await self._send_again(sender, data["msg_ids"], trusted=verdict is True)
        else:
            log.warn("dropped an envelope {msg_id} from {sender} with unusable content", msg_id=msg_id, sender=sender)
        return True

    async def _store_incoming(
        self, sender: str, msg_id: str, text: str, private: bool, sent_at: float, held: bool = False,
        owe_receipt: bool = False,
    ) -> None:
        status = HELD if held else MUTED if self._is_muted(sender) else SHOWN
        # Not faster than the terminal (or the script reading the output) takes them: a sender
        # writing faster would otherwise have everything shown meanwhile held in memory. Waiting
        # here holds back the acknowledgement, so the link, or the server, holds back the rest.
        await self._view.drained()
        try:
            new = await self._history.add_incoming(
                sender, msg_id, text, private, status, sent_at, self._clock.seconds(), owe_receipt
            )
        except sqlite3.Error as e:
            # Not acknowledged, so not lost: the server keeps it, a sender's peer sends it again.
            if not self._store_failing:  # said once until a message is stored again
                self._store_failing = True
                self._view.show("not_stored", user=sender, reason=str(e))
            raise
        self._store_failing = False
        if not new:
            log.info("dropped {msg_id} from {sender}: already stored", msg_id=msg_id, sender=sender)
        elif status == SHOWN:
            self._show_message(sender, text, private, sent_at)

    def _show_message(self, sender: str, text: str, private: bool, sent_at: float) -> None:
        self._view.show("message", user=sender, text=text, private=private, **self._when(sent_at))

    def _when(self, sent_at: float) -> dict[str, float]:
        """What is shown of when a message was written: only when that was a while ago (it was kept
        by the server while this peer was away, held for a changed key, or sent again)."""
        return {"sent_at": sent_at} if self._clock.seconds() - sent_at > LATE else {}

    async def _delivered(self, user: str, msg_ids: list[str]) -> None:
        for msg_id in msg_ids:
            self._in_flight.pop((user, msg_id), None)
        await self._history.set_status(user, msg_ids, DELIVERED, (PENDING, SENT))
        # What waited behind these: on another link, or behind one that went through the server
        # to a contact whose key is unsigned (a direct link may carry the rest now).
        if user in self._behind_link or user in self._unsigned_told:
            self._behind_link.discard(user)
            self._kick(user)

    def _receipts_for(self, user: str, msg_ids: list[str]) -> None:
        """
        Send receipts for C{msg_ids} from C{user}; while one to C{user} is on its way, they go
        together in the next. A receipt is a send, which takes from this user's message rate:
        one for each message that came alone would leave none of the rate for what this user
        writes while someone writes to them as fast as the server lets them.
        """
        waiting = self._receipts_waiting.get(user)
        if waiting is not None:
            waiting.extend(msg_ids)
            return
        self._receipts_waiting[user] = []
        Deferred.fromCoroutine(self._send_receipts_to(user, msg_ids)).addErrback(lambda f: log.failure("receipt", f))

    async def _send_receipts_to(self, user: str, msg_ids: list[str]) -> None:
        try:
            while msg_ids:
                for chunk in _chunks(msg_ids, MAX_MSG_IDS):
                    await self._send_receipt(user, chunk)
                msg_ids, self._receipts_waiting[user] = self._receipts_waiting[user], []
        finally:
            del self._receipts_waiting[user]

    async def _send_receipt(self, user: str, msg_ids: list[str]) -> None:
        """Send a receipt; it stays owed (sent after the next login) unless the server took it."""
        link = self._links.get(user)
        if link is not None:
            link.send({"type": "ack", "msg_ids": msg_ids})
        else:
            try:
                await self._seal_and_send(user, "receipt", msg_ids)
            except (RequestError, NotConnected, CommandError, CryptoError) as e:
                log.info("no receipt to {user} for {n} message(s) yet: {e}", user=user, n=len(msg_ids), e=e)
                if not isinstance(e, RequestError):
                    return  # sent after the next login
                if e.code not in _PERMANENT:
                    delay = RATE_RETRY if e.code == Code.RATE_LIMITED else RETRY_DELAY
                    self._retry_later(("receipts",), self._retry_receipts, delay)
                    return
        await self._history.receipts_sent(user, msg_ids)

    async def _seal_and_send(self, user: str, kind: str, msg_ids: list[str]) -> None:
        """Hand the server a notice of C{kind} about C{msg_ids}, sealed to C{user} and signed (in
        parts, if one is too long for the server's lines)."""
        key = await self._recipient_key(user, signed=False)

        def send(part: list[str]) -> Deferred[dict[str, Any]]:
            notice_id = {"receipt": "r-", "unopened": "u-"}[kind] + secrets.token_hex(16)
            payload = json.dumps({"kind": kind, "msg_ids": part}).encode()
            envelope = crypto.seal(self._identity, self.user, user, key, notice_id, payload)
            return self._server.request("send", to=user, msg_id=notice_id, envelope=envelope, background=True)

        await _halved_while_too_long(send, msg_ids)

    async def _send_unopened(self, user: str, msg_ids: list[str]) -> None:
        """
        Ask C{user} to send again what this install could not open (sealed to keys its user had
        before). Best effort: without it, those stay C{sent} at C{user}'s end, as they were.
        """
        try:
            await self._seal_and_send(user, "unopened", msg_ids)
        except (RequestError, NotConnected, CommandError, CryptoError) as e:
            log.info("could not ask {user} to send {n} message(s) again: {e}", user=user, n=len(msg_ids), e=e)

    async def _send_again(self, user: str, msg_ids: list[str], trusted: bool) -> None:
        """C{user}'s peer could not open these (sealed to keys they had before): back to the outbox."""
        fresh = [m for m in msg_ids if (user, m) not in self._sent_again]  # once each: no ping-pong
        _remember(self._sent_again, [(user, m) for m in fresh], SENT_AGAIN_REMEMBERED)
        count = await self._history.set_status(user, fresh, PENDING, (SENT,))
        if count:
            self._view.show("sending_again", user=user, count=count, trusted=trusted)
            self._kick(user)

    async def _send_receipts(self, owed: dict[str, list[str]]) -> None:
        for user, msg_ids in owed.items():
            for chunk in _chunks(msg_ids, MAX_MSG_IDS):
                await self._send_receipt(user, chunk)

    def _retry_receipts(self) -> None:
        d = self._history.owed_receipts()
        d.addCallback(lambda owed: Deferred.fromCoroutine(self._send_receipts(owed)))
        d.addErrback(lambda f: log.failure("receipts", f))

    # -- keys ------------------------------------------------------------------

    def _contact(self, user: str) -> Contact:
        return self._contacts.get(user) or Contact(user)

    async def _save(self, contact: Contact) -> None:
        self._contacts[contact.user] = contact
        await self._history.save_contact(contact)

    async def _check_keys(self, user: str, keys: dict[str, Any]) -> None:
        """
        Compare a user's keys from the directory (C{keys}, as C{keys} or C{lookup} answers) with
        the pinned ones: pin them on first sight; a change is remembered and refused (loudly) until
        the user accepts it with /trust. An envelope key is pinned only with the identity key's
        signature (L{crypto.sign_envelope_key}); without one (a peer, or a server, older than
        signatures) it is the server's word alone, and only the fingerprint counts.

        @raise CommandError: C{key_changed}, or C{bad_keys} when the server sent garbage or an
            envelope key the identity key did not sign.
        """
        fingerprint, envelope_key, signature = keys.get("fingerprint"), keys.get("envelope_key"), keys.get("key_signature")
        if not (crypto.valid_fingerprint(fingerprint) and crypto.valid_envelope_key(envelope_key)):
            raise CommandError("bad_keys", user=user)
        if signature is None:
            envelope_key = None
        else:
            try:
                crypto.check_envelope_key(signature, user, fingerprint, envelope_key)
            except EnvelopeError as e:
                log.warn("the server gave {user}'s keys with a bad signature: {e}", user=user, e=e)  # noqa: G010 - twisted.logger
                raise CommandError("bad_keys", user=user) from None
        contact = self._contact(user)
        if contact.fingerprint is None:
            await self._save(replace(contact, fingerprint=fingerprint, envelope_key=envelope_key))
            return
        if contact.fingerprint == fingerprint and envelope_key in (None, contact.envelope_key):
            return
        if contact.fingerprint == fingerprint and contact.envelope_key is None:
            await self._save(replace(contact, envelope_key=envelope_key))  # signed now: pinned
            return
        if (contact.new_fingerprint, contact.new_envelope_key) != (fingerprint, envelope_key):
            await self._save(replace(contact, new_fingerprint=fingerprint, new_envelope_key=envelope_key))
            self._view.show("key_changed", user=user, old=contact.fingerprint, new=fingerprint)
        raise CommandError("key_changed", user=user)

    async def _verify_key(self, user: str, fingerprint: str) -> bool | None:
        """
        Whether C{fingerprint} is C{user}'s key: True (pinned, or pinned now on first sight),
        None (the directory confirms a change not accepted yet), False (not theirs).

        @raise NotConnected: when the directory would be needed and cannot be asked.
        """
        contact = self._contacts.get(user)
        if contact is not None and contact.fingerprint == fingerprint:
            return True
        keys = await self._server.request("keys", user=user, background=True)
        if keys.get("fingerprint") != fingerprint:
            return False
        try:
            await self._check_keys(user, keys)
        except CommandError as e:
            return None if e.code == "key_changed" else False
        return True

    async def _recipient_key(self, user: str, fresh: bool = True, signed: bool = True) -> str:
        """
        The envelope key to seal to C{user}: the pinned one, checked against the directory first
        when C{fresh}. A user who moved to a new install has new keys, which the directory has
        from their last login: what is sealed to the old key, their new install cannot open. The
        key must come signed by their identity key: otherwise it is the server's word alone, and
        a server could give its own key, with the right fingerprint, to read what is sealed to it.

        @param signed: whether only a signed key will do: not for a notice that holds message ids
            only (a receipt), which their peer could not answer otherwise.
        @raise CommandError: C{key_changed} or C{bad_keys}, as L{_check_keys}; C{keys_unsigned}
            when their peer has not signed its envelope key (one older than the signatures).
        """
        contact = self._contacts.get(user)
        if not fresh and contact is not None and contact.envelope_key and not contact.new_fingerprint:
            return contact.envelope_key
        keys = await self._server.request("keys", user=user, background=True)
        await self._check_keys(user, keys)
        if keys.get("key_signature") is None:
            if signed:
                raise CommandError("keys_unsigned", user=user)
        else:
            self._unsigned_told.discard(user)
        # The pinned key when there is one (signed, checked against these keys just now).
        return self._contacts[user].envelope_key or keys["envelope_key"]

    async def _lookup(self, user: str, background: bool) -> Address | None:
        """
        Where C{user} listens for direct links (keys checked), or None when offline or not listening.
        C{background}: this peer's own doing (for its outbox), not its user's (a command).
        """
        try:
            found = await self._server.request("lookup", user=user, background=background)
        except RequestError as e:
            if e.code == Code.OFFLINE:
                return None
            raise
        await self._check_keys(user, found)
        host, port = found.get("host"), found.get("port")
        if not isinstance(host, str) or not isinstance(port, int) or not 0 < port < 65536:
            return None
        return Address(host, port)

    # -- direct links (called by the links) --------------------------------------

    def refuse_fingerprint(self, fingerprint: str) -> bool:
        """Inside the TLS handshake: refuse keys pinned to users this user blocks."""
        return any(c.blocked and c.fingerprint == fingerprint for c in self._contacts.values())

    def verify_peer(self, user: str, fingerprint: str | None) -> Deferred[bool]:
        """An incoming link claims to be C{user} and presented C{fingerprint}: accept it?"""
        return Deferred.fromCoroutine(self._verify_peer(user, fingerprint))

    async def _verify_peer(self, user: str, fingerprint: str | None) -> bool:
        if not valid_username(user) or user == self.user or fingerprint is None:
            return False
        contact = self._contacts.get(user)
        if contact is not None and contact.blocked:
            log.info("refused a direct link from {user}, who is blocked", user=user)
            return False
        try:
            verdict = await self._verify_key(user, fingerprint)
        except (RequestError, NotConnected) as e:
            log.info("refused a direct link from {user}: cannot check the key ({e})", user=user, e=e)
            return False
        if verdict is not True:
            log.warn("refused a direct link claiming to be {user} with key sha256:{fp}", user=user, fp=fingerprint)
        return verdict is True

    def link_up(self, link: LinkLike) -> None:
        self._kick(link.user)

    def link_down(self, link: LinkLike) -> None:
        lost = self._carried(link)
        for key in lost:
            del self._in_flight[key]
        if link.session:
            self._view.show("private_ended", user=link.user, by_peer=False)
        if lost:
            self._kick(link.user)

    def link_frame(self, link: LinkLike, frame: dict[str, Any]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._link_frame(link, frame)).addErrback(
            lambda f: log.failure("frame from {user}", f, user=link.user)
        )

    async def _link_frame(self, link: LinkLike, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "msg":
            msg_id, text, sent_at = frame.get("msg_id"), frame.get("text"), frame.get("sent_at")
            if not (_valid_id(msg_id) and _valid_text(text) and _number(sent_at)):
                log.warn("ignored a malformed message from {user}", user=link.user)
                return
            delay = self._link_delay(link.user)
            if delay:
                await deferLater(self._clock, delay)
            async with self._incoming_lock:
                await self._store_incoming(link.user, msg_id, text, frame.get("private") is True, sent_at)
            link.send({"type": "ack", "msg_ids": [msg_id]})
        elif kind == "ack" and _msg_ids(frame.get("msg_ids")):
            await self._delivered(link.user, frame["msg_ids"])
        elif kind == "session" and frame.get("state") in ("start", "stop"):
            started = frame["state"] == "start"
            link.session = started
            self._view.show("private_started" if started else "private_ended", user=link.user, by_peer=True)
            if started:
                self._kick(link.user)  # private messages that waited for a session
            else:
                link.close()
        else:
            log.warn("ignored an unknown frame from {user}", user=link.user)

    def _link_delay(self, user: str) -> float:
        """
        How long a message from C{user} over a direct link waits before it is taken: they come no
        faster than the server's message rate lets them through it. A contact writing at the
        speed of a link would otherwise fill this peer's disk at the speed of its history (3000
        messages of 16 000 characters in under 10 s); past a few waiting the link is not read, so
        the sender waits.
        """
        rate = self._server.message_rate
        if rate is None:
            return 0.0
        known = self._link_paces.get(user)
        if known is None or known[0] != rate:  # first, or the server's rate changed
            known = self._link_paces[user] = (rate, Pace(self._clock, *rate))
        return known[1].delay()

    # -- the outbox ------------------------------------------------------------

    def _kick(self, user: str) -> None:
        """Send C{user}'s pending messages, in order; at most one sender per recipient at a time."""
        if user in self._pumping:
            self._again.add(user)
            return
        self._pumping.add(user)
        Deferred.fromCoroutine(self._pump_while_needed(user)).addErrback(
            lambda f: log.failure("outbox for {user}", f, user=user)
        )

    async def _pump_while_needed(self, user: str) -> None:
        try:
            while True:
                self._again.discard(user)
                await self._pump(user)
                if user not in self._again:
                    return
        finally:
            self._pumping.discard(user)
            if not self._pumping:
                waiters, self._idle_waiters = self._idle_waiters, []
                for d in waiters:
                    d.callback(None)

    async def _pump(self, user: str) -> None:
        # Once a message has gone through the server, the next ones follow it there until the
        # recipient's receipt says it arrived: a direct link opened meanwhile could overtake it
        # (the server may have stored it, or written it without waiting for the ack). Without the
        # server, a link open already carries them rather than leaving them pending.
        behind_server = await self._history.awaiting_receipt(user)
        keys_checked = False  # the first message sealed in this pass asks the directory for the keys
        carried = 0  # on their way over the link in use
        async for entry in self._outbox_of(user):
            on = self._in_flight.get((user, entry.msg_id))
            if on is not None:
                if on is self._links.get(user):
                    carried += 1
                    continue  # on its way over the link in use, ahead of what follows there
                # On its way over another link (an older one, or one the other side opened
                # meanwhile): what follows could overtake it on this one. It waits until that one
                # is acknowledged, or its link is down and it goes again.
                self._behind_link.add(user)
                return
            try:
                link = self._links.get(user)
                if entry.private:
                    # Only over a private session (either side's /startprivate): never through the
                    # server, nor over a link that /msg opened.
                    link = self._links.session_link(user)
                    if link is None:
                        continue
                elif behind_server and self.logged_in:
                    link = None
                else:
                    link = link or await self._open_link(user)
                if link is not None:
                    if carried >= LINK_WINDOW:
                        # The rest waits on disk, not in the link's buffer, until acks make room.
                        self._behind_link.add(user)
                        return
                    link.send(_msg_frame(entry))
                    self._in_flight[(user, entry.msg_id)] = link
                    carried += 1
                    self._watch_acks(link)
                    continue
                if not self.logged_in:
                    return
                status = await self._send_sealed(user, entry, fresh=not keys_checked)
                behind_server = keys_checked = True
            except CommandError as e:
                if e.code == "bad_keys":
                    self._view.show("bad_keys", user=user)
                elif e.code == "keys_unsigned":
                    if not self._server.key_signatures:  # a server older than signatures: said once
                        if not self._server_unsigned_told:
                            self._server_unsigned_told = True
                            self._view.show("server_unsigned", server=self._server_name)
                    elif user not in self._unsigned_told:
                        self._view.show("keys_unsigned", user=user)
                    self._unsigned_told.add(user)
                elif e.code != "key_changed":  # that one was shown loudly when it was seen
                    log.warn("outbox for {user}: {code}", user=user, code=e.code)
                return  # waits for /trust, or for the server to send sane keys
            except NotConnected:
                return  # flushed again after the next login
            except RequestError as e:
                if e.code in _PERMANENT:
                    await self._history.set_status(user, [entry.msg_id], FAILED, (PENDING,))
                    self._view.show("send_failed", user=user, code=e.code, message=e.message, text=entry.text)
                    continue
                if e.code == Code.KEYS_UNKNOWN:
                    self._view.show("waiting_for_keys", user=user)
                    return  # flushed again when they log in
                log.info("outbox for {user} retries later: {code}", user=user, code=e.code)
                if e.code == Code.RATE_LIMITED:  # a moment's wait, nothing to tell
                    self._retry_later(("outbox", user), lambda: self._kick(user), RATE_RETRY)
                    return
                if self._delays_told.get(user) != e.code:  # said once until the outbox is empty
                    self._delays_told[user] = e.code
                    self._view.show("send_delayed", user=user, code=e.code, message=e.message, seconds=RETRY_DELAY)
                self._retry_later(("outbox", user), lambda: self._kick(user))
                return
            await self._history.set_status(user, [entry.msg_id], SENT, (PENDING,))
            if status == "stored" and user not in self._stored_told:
                self._stored_told.add(user)
                self._view.show("stored", user=user)
        self._delays_told.pop(user, None)

    async def _outbox_of(self, user: str) -> AsyncIterator[Entry]:
        """The pending messages to C{user}, oldest first, read a page at a time (a script may have
        queued more than fit in memory: 100 000 of 1000 characters were 136 MB at once)."""
        after = 0
        while page := await self._history.outbox_page(user, after, OUTBOX_PAGE):
            for _, entry in page:
                yield entry
            after = page[-1][0]

    def _carried(self, link: LinkLike) -> set[tuple[str, str]]:
        """The messages on their way over C{link}, not acknowledged yet."""
        return {key for key, on in self._in_flight.items() if on is link}

    def _watch_acks(self, link: LinkLike) -> None:
        """
        Check, L{ACK_WAIT} from now, that some of what C{link} carries now has been acknowledged.
        A link whose other end vanished (a laptop closed, a network changed) takes TCP a quarter of
        an hour to notice, and it would hold this user's messages, and the next ones, all that
        time: it is dropped, and they go again another way (the recipient drops what it already
        has). One acknowledging slowly (its receiver busy with many messages) is kept.
        """
        if link not in self._ack_checks:
            self._ack_checks[link] = self._clock.callLater(ACK_WAIT, self._check_acks, link, self._carried(link))

    def _check_acks(self, link: LinkLike, carried: set[tuple[str, str]]) -> None:
        del self._ack_checks[link]
        if carried and carried <= self._carried(link):  # not one of them acknowledged
            log.warn("dropped the direct link to {user}: no acknowledgement in {s:g} s", user=link.user, s=ACK_WAIT)  # noqa: G010 - twisted.logger
            link.abort()
        elif self._carried(link):  # slow, but going: a receiver busy with many messages
            self._watch_acks(link)

    async def _open_link(self, user: str) -> LinkLike | None:
        if not self.logged_in or self._direct_retry.get(user, 0) > self._clock.seconds():
            return None
        address = await self._lookup(user, background=True)
        if address is None:
            return None
        try:
            fingerprint = self._contacts[user].fingerprint
            assert fingerprint is not None
            return await self._links.connect(user, address.host, address.port, fingerprint)
        except Exception as e:
            log.info("no direct link to {user} at {host}:{port}: {e}", user=user, host=address.host, port=address.port, e=e)
            self._direct_retry[user] = self._clock.seconds() + DIRECT_RETRY
            return None

    async def _send_sealed(self, user: str, entry: Entry, fresh: bool) -> str:
        key = await self._recipient_key(user, fresh)
        payload = _msg_payload(entry.text, entry.sent_at)
        envelope = crypto.seal(self._identity, self.user, user, key, entry.msg_id, payload)
        result = await self._server.request("send", to=user, msg_id=entry.msg_id, envelope=envelope)
        return result.get("status", "stored")

    def _retry_later(self, key: tuple[str, ...], action: Callable[[], object], delay: float = RETRY_DELAY) -> None:
        if key not in self._retry_calls:

            def retry() -> None:
                del self._retry_calls[key]
                action()

            self._retry_calls[key] = self._clock.callLater(delay, retry)

    def _tell_unreadable(self) -> None:
        told, self._unreadable = self._unreadable, {}
        for user, msg_ids in told.items():
            self._view.show("unreadable", user=user, count=len(msg_ids))
            for chunk in _chunks(msg_ids, MAX_MSG_IDS):
                Deferred.fromCoroutine(self._send_unopened(user, chunk)).addErrback(
                    lambda f: log.failure("asking to send again", f)
                )

    def when_outbox_idle(self) -> Deferred[None]:
        return _wait_while(bool(self._pumping), self._idle_waiters)

    def when_inbox_idle(self) -> Deferred[None]:
        """Fires once what arrived from the server is stored and acknowledged."""
        return _wait_while(self._draining, self._drained_waiters)

    # -- commands (called by the console) ----------------------------------------

    def _check_peer(self, user: str) -> None:
        if not valid_username(user):
            raise CommandError("invalid_user", user=user)
        if user == self.user:
            raise CommandError("yourself")

    def _check_text(self, text: str) -> bytes:
        if not text.strip():
            raise CommandError("empty_message")
        if len(text) > MAX_TEXT:
            raise CommandError("too_long", length=len(text), limit=MAX_TEXT)
        payload = _msg_payload(text, self._clock.seconds())
        if len(payload) > crypto.MAX_PAYLOAD:
            raise CommandError("too_long_bytes", size=len(payload), limit=crypto.MAX_PAYLOAD)
        return payload

    async def _request(self, op: str, **args: Any) -> dict[str, Any]:
        """A request on behalf of a command: every failure becomes a L{CommandError}."""
        if not self.logged_in:
            raise CommandError("not_connected", chosen=not self._online_wanted, server=self._server_name)
        try:
            return await self._server.request(op, **args)
        except RequestError as e:
            raise CommandError(e.code, user=args.get("user", args.get("to")), message=e.message) from None
        except NotConnected:
            raise CommandError("not_connected", chosen=False, server=self._server_name) from None

    async def send(self, user: str, text: str) -> None:
        """/msg: store as pending, then send directly or through the server, in order."""
        self._check_peer(user)
        self._check_text(text)
        if self._contact(user).new_fingerprint:
            raise CommandError("key_changed", user=user)
        if self.logged_in:
            try:
                await self._lookup(user, False)  # unknown user, blocked: refused before anything is stored
            except RequestError as e:
                raise CommandError(e.code, user=user, message=e.message) from None
            except NotConnected:
                pass
        await self._history.add_outgoing(user, _new_msg_id(), text, False, self._clock.seconds())
        if not self.logged_in and self._links.get(user) is None:
            self._view.show("queued", user=user, chosen=not self._online_wanted)
        self._kick(user)

    async def start_private(self, user: str) -> None:
        """/startprivate: open a direct link now and tell the other side."""
        self._check_peer(user)
        link = self._links.get(user)
        if link is None:
            try:
                address = await self._lookup(user, False) if self.logged_in else None
            except RequestError as e:
                raise CommandError(e.code, user=user, message=e.message) from None
            except NotConnected:
                address = None
            if not self.logged_in:
                raise CommandError("not_connected", chosen=not self._online_wanted, server=self._server_name)
            if address is None:
                raise CommandError(Code.OFFLINE, user=user)
            link = await self._open_link_now(user, address)
        link.session = True
        link.send({"type": "session", "state": "start"})
        self._view.show("private_ready", user=user)
        self._kick(user)  # private messages that waited for a session

    async def _open_link_now(self, user: str, address: Address) -> LinkLike:
        fingerprint = self._contact(user).fingerprint
        assert fingerprint is not None  # pinned by the lookup
        try:
            return await self._links.connect(user, address.host, address.port, fingerprint)
        except Exception as e:
            log.info("startprivate {user}: {e}", user=user, e=e)
            raise CommandError("unreachable", user=user, host=address.host, port=address.port) from None

    async def private(self, user: str, text: str) -> None:
        """/private: a message that only ever travels over the direct link."""
        self._check_peer(user)
        self._check_text(text)
        if self._links.session_link(user) is None:  # a link /msg opened is no private session
            raise CommandError("no_private_session", user=user)
        await self._history.add_outgoing(user, _new_msg_id(), text, True, self._clock.seconds())
        self._kick(user)

    async def stop_private(self, user: str) -> None:
        self._check_peer(user)
        link = self._links.session_link(user)
        if link is None:
            raise CommandError("no_private_session", user=user)
        link.send({"type": "session", "state": "stop"})
        link.session = False
        self._links.close(user)

    async def broadcast(self, text: str) -> tuple[int, int]:
        """@return: (how many got it, how many online users blocked you)."""
        if not text.strip():
            raise CommandError("empty_message")
        if len(text) > MAX_BROADCAST:
            raise CommandError("too_long", length=len(text), limit=MAX_BROADCAST)
        signature = crypto.sign_broadcast(self._identity, self.user, text, self._clock.seconds())
        result = await self._request("broadcast", text=text, signature=signature)
        return _count(result.get("delivered")), _count(result.get("skipped"))

    def known_users(self) -> list[str]:
        """Users this peer knows of (online lately, or met before), for completing a name."""
        return sorted((self._online_seen | self._contacts.keys()) - {self.user})

    async def who(self) -> list[str]:
        return _usernames(await self._request("who"))

    async def whosince(self, seconds: float) -> list[str]:
        return _usernames(await self._request("whosince", seconds=seconds))

    async def block(self, user: str) -> None:
        self._check_peer(user)
        await self._request("block", user=user)
        await self._save(replace(self._contact(user), blocked=True))
        self._links.close(user)

    async def unblock(self, user: str) -> None:
        self._check_peer(user)
        await self._request("unblock", user=user)
        await self._save(replace(self._contact(user), blocked=False))

    def _is_muted(self, user: str) -> bool:
        contact = self._contacts.get(user)
        if contact is None or not contact.muted:
            return False
        return contact.mute_until is None or self._clock.seconds() < contact.mute_until

    async def mute(self, user: str, seconds: float | None) -> None:
        """Stored but not shown, until /unmute or for C{seconds}; survives a restart."""
        self._check_peer(user)
        await self._check_exists(user)
        until = None if seconds is None else self._clock.seconds() + seconds
        await self._save(replace(self._contact(user), muted=True, mute_until=until))

    async def _check_exists(self, user: str) -> None:
        """
        A setting of this peer's own (a mute) for a name it has never met is checked with the
        server when it can be: a typo (/mute bbo) would seem to work, and bob stay unmuted.
        """
        if user in self._contacts or not self.logged_in:
            return
        try:
            await self._server.request("keys", user=user)
        except RequestError as e:
            if e.code == Code.UNKNOWN_USER:
                raise CommandError("unknown_user", user=user) from None
        except NotConnected:
            pass

    async def unmute(self, user: str) -> None:
        self._check_peer(user)
        if not self._is_muted(user):
            raise CommandError("not_muted", user=user)
        await self._save(replace(self._contact(user), muted=False, mute_until=None))

    async def history(self, user: str, limit: int) -> list[Entry]:
        self._check_peer(user)
        return await self._history.conversation(user, limit)

    async def fingerprint(self, user: str | None) -> FingerprintInfo:
        if user is None or user == self.user:
            fp = self._identity.fingerprint
            return FingerprintInfo(self.user, fp, None, fp)
        self._check_peer(user)
        try:
            directory = (await self._request("keys", user=user)).get("fingerprint")
            if not crypto.valid_fingerprint(directory):
                directory = None  # the server sent garbage: shown as not known
        except CommandError as e:
            if e.code != "not_connected":
                raise
            directory = None
        contact = self._contact(user)
        return FingerprintInfo(user, contact.fingerprint, contact.new_fingerprint, directory)

    async def trust(self, user: str) -> None:
        """Accept a changed key: pin it, show what was held back, send what waited."""
        self._check_peer(user)
        contact = self._contact(user)
        if contact.new_fingerprint is None:
            raise CommandError("nothing_to_trust", user=user)
        await self._save(
            replace(
                contact,
                fingerprint=contact.new_fingerprint,
                envelope_key=contact.new_envelope_key,
                new_fingerprint=None,
                new_envelope_key=None,
            )
        )
        for entry in await self._history.release_held(user):
            self._show_message(user, entry.text, entry.private, entry.sent_at)
        self._direct_retry.pop(user, None)
        self._kick(user)
        self._retry_receipts()  # those for what was held: no receipt goes to a key not accepted

    async def go_offline(self) -> None:
        """/offline: leave the server and close the listener; messages wait in the outbox."""
        if not self._online_wanted:
            raise CommandError("already_offline")
        self._online_wanted = False
        await self._leave()

    async def _leave(self) -> None:
        self.logged_in = False
        self._cancel_login_wait()
        self._stop_settling()  # offline, presence is not followed; /online asks anew
        await self._server.stop()
        await self._links.stop_listening()
        self._links.close_all()

    async def go_online(self) -> None:
        """/online: listen again, reconnect (resuming the session), send what waited."""
        if self._online_wanted:
            raise CommandError("already_online_mode")
        await self._go_online()

    async def logout(self) -> None:
        """Let messages on their way out finish, and those that came in be acknowledged (briefly),
        log out, and finish: an acknowledgement sent after the logout is lost, and the server would
        deliver the message again at the next login (shown once, but counted as new)."""
        idle = gatherResults([self.when_outbox_idle(), self.when_inbox_idle()])
        await idle.addTimeout(OUTBOX_WAIT, self._clock).addErrback(lambda _: None)
        if self.logged_in:
            try:
                await self._server.request("logout")
            except (RequestError, NotConnected):
                pass
        await self.stop()
        self._finish(0)


def _wait_while(busy: bool, waiters: list[Deferred[None]]) -> Deferred[None]:
    """Fired now if not C{busy}, else with the C{waiters} (which whoever is busy fires when done)."""
    if not busy:
        return succeed(None)
    d: Deferred[None] = Deferred()
    waiters.append(d)
    return d


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _new_msg_id() -> str:
    return secrets.token_hex(16)


def _msg_payload(text: str, sent_at: float) -> bytes:
    return json.dumps({"kind": "msg", "text": text, "sent_at": sent_at}, ensure_ascii=False).encode()


def _msg_frame(entry: Entry) -> dict[str, Any]:
    return {"type": "msg", "msg_id": entry.msg_id, "text": entry.text, "sent_at": entry.sent_at, "private": entry.private}


def _unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a \ud800 escape in JSON
        return False
    return True


def _valid_text(text: Any) -> bool:
    return isinstance(text, str) and 0 < len(text) <= MAX_TEXT and _unicode(text)


async def _halved_while_too_long(request: Callable[[list[Any]], Deferred[Any]], items: list[Any]) -> None:
    """
    C{request} about C{items}; in halves, and halves of those, while the server's lines (its
    max_line) cannot hold it. Acks and receipts carry up to hundreds of ids; a server may be set to
    lines of 1024 bytes.
    """
    try:
        await request(items)
    except RequestError as e:
        if e.code != Code.LINE_TOO_LONG or len(items) < 2:
            raise
        half = len(items) // 2
        await _halved_while_too_long(request, items[:half])
        await _halved_while_too_long(request, items[half:])


def _remember(memory: dict[Any, None], keys: list[Any], most: int) -> None:
    """Add C{keys} to C{memory} (a set in the order things were added), forgetting the oldest
    past C{most}: what a contact or the server causes must not grow it without end."""
    memory.update(dict.fromkeys(keys))
    while len(memory) > most:
        del memory[next(iter(memory))]


def _envelope_chars(fields: dict[str, Any]) -> int:
    envelope = fields.get("envelope")
    return len(envelope) if isinstance(envelope, str) else 0


def _valid_id(msg_id: Any) -> bool:
    return isinstance(msg_id, str) and 0 < len(msg_id) <= 64 and _unicode(msg_id)


def _usernames(result: dict[str, Any]) -> list[str]:
    """The usernames in a server answer's C{users}, sorted; anything else there is dropped."""
    users = result.get("users")
    return sorted({u for u in users if valid_username(u)}) if isinstance(users, list) else []


def _usable_token(value: Any) -> str | None:
    """A session token the server would take back in a resume, else None (the password logs in)."""
    return value if _TOKEN_CHECK(value) is None else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _msg_ids(value: Any) -> bool:
    return isinstance(value, list) and 0 < len(value) <= MAX_MSG_IDS and all(_valid_id(v) for v in value)
