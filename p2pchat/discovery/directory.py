"""The discovery server's rules: accounts, lockouts, presence, blocks, routing and the mailbox.

Nothing here touches a socket. Sessions call in with plain values; the directory calls back
through the small L{Member} interface, reads time from an injected clock, and persists
through the store.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
from collections import deque
from dataclasses import dataclass, replace
from functools import partial
from itertools import islice
from typing import Callable, Iterable, Iterator, NoReturn, Protocol

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2pchat.crypto import (
    EnvelopeError,
    check_envelope_key,
    valid_envelope_key,
    valid_fingerprint,
)
from p2pchat.discovery.store.base import Account, StoredEnvelope, UsernameTaken
from p2pchat.wire import (
    MAX_PASSWORD,
    MIN_PASSWORD,
    PASSWORD_RULE,
    Code,
    dumps_line,
    encode_event,
)

log = Logger()

USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_UNDECODED = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8
MAX_FAILURES = 3
# A read of a user's stored mailbox: what its delivery holds in memory at most (beyond one envelope).
MAILBOX_PAGE_ROWS = 1024
MAILBOX_PAGE_BYTES = 256 * 1024
TOKEN_LIFETIME = 30 * 24 * 3600.0
KEEP_TOKENS = 5  # sessions tokens per user: one per device, a few devices
# Presence goes out to this many users per reactor turn, so that a flush to thousands online does
# not hold up the messages of everyone else for its whole length. A message crosses three or four
# turns (read, route, TLS, socket), each as long as a slice's writes: 200 gave a p99 of 45-50 ms
# to messages during a login storm with 2000 online, 50 gave 18 ms, 20 gave 12 ms.
PRESENCE_SLICE = 20

# Takes the outcome of a send: the reply's result, or the Failure that kept it from being stored.
Answer = Callable[[dict | Failure], None]


class Refusal(Exception):
    """A request the rules refuse; becomes an error reply with C{code} and C{message}."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


@dataclass
class Limits:
    """The server's tunables; each is a command-line option (see tap.py)."""

    block_duration: float = 60.0
    idle_timeout: float = 0.0
    keepalive_timeout: float = 45.0
    mailbox_limit: int = 10000
    open_registration: bool = True
    message_rate: float = 50.0
    message_burst: int = 200
    login_rate: float = 30.0  # password attempts per address per minute
    max_connections_per_address: int = 1000  # 0 = no limit
    max_line: int = 65536
    max_queued_bytes: int = 1 << 20
    mailbox_window: int = 1 << 20  # envelope characters written to a user and not yet acked
    presence_batch: float = 0.05  # seconds presence changes are gathered before they go out; 0 = at once
    presence_batch_per_user: float = 0.0003  # flushes at least this much per user online apart (0.6 s at 2000)
    hold: float = 1.0  # seconds an envelope to an online user waits for their ack before it is stored; 0 = never


class Member(Protocol):
    """What the directory needs from a logged-in connection."""

    username: str | None  # set by the directory at login
    host: str
    port: int
    live: bool  # False while stored envelopes are being delivered

    def write(self, frame: bytes) -> None: ...

    def deliver(self, envelope: StoredEnvelope) -> bool:
        """Write C{envelope}; C{False} (and no longer live) if too much written is not acked yet."""

    def kick(self, reason: str, message: str) -> None: ...


def valid_username(name: str) -> bool:
    return bool(USERNAME_RE.match(name))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenBucket:
    """A rate limit: C{rate} per second, bursts of C{burst}; C{rate <= 0} means no limit."""

    def __init__(self, clock, rate: float, burst: float) -> None:
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = clock.seconds()

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        now = self._clock.seconds()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def full(self) -> bool:
        """Whether the bucket has refilled: the same as a new one."""
        return self._tokens + (self._clock.seconds() - self._stamp) * self.rate >= self.burst


class Lockouts:
    """Consecutive failed logins per username, and the blocks they cause."""

    def __init__(self, clock, duration: float) -> None:
        self._clock = clock
        self.duration = duration
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def remaining(self, username: str) -> float:
        """Seconds left on C{username}'s block, 0 when it is not blocked."""
        until = self._until.get(username)
        if until is None:
            return 0.0
        left = until - self._clock.seconds()
        if left <= 0:
            del self._until[username]
            return 0.0
        return left

    def failed(self, username: str) -> int:
        """Count a failure; return how many attempts are left (0: the account is now blocked)."""
        count = self._failures.get(username, 0) + 1
        if count >= MAX_FAILURES:
            self._failures.pop(username, None)
            self._until[username] = self._clock.seconds() + self.duration
            return 0
        self._failures[username] = count
        return MAX_FAILURES - count

    def succeeded(self, username: str) -> None:
        self._failures.pop(username, None)


# Addresses (or IPv6 networks) whose password attempts are counted at most; past it, those not
# counting against anyone any more (their bucket refilled) are forgotten.
MAX_RATE_BUCKETS = 10000


def address_key(host: str) -> str:
    """
    What the per-address limits count: an IPv4 address (also one mapped into IPv6, as a dual-stack
    listener reports it), or the /64 network of an IPv6 address (one machine, or one customer's
    line, gets a whole /64 and can pick any address in it).
    """
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


class AddressLimits:
    """
    Per source address (per /64 for IPv6, see L{address_key}): password attempts, so one host
    cannot guess across many accounts, and connections at once, so one host cannot hold the
    server's memory with connections that never log in.
    """

    def __init__(self, clock, per_minute: float, max_connections: int = 0) -> None:
        self._clock = clock
        self._per_minute = per_minute
        self._buckets: dict[str, TokenBucket] = {}
        self.max_connections = max_connections
        self._connections: dict[str, int] = {}

    def connect(self, host: str) -> bool:
        """Count a new connection from C{host}; False (not counted) when it has as many as allowed."""
        key = address_key(host)
        count = self._connections.get(key, 0)
        if 0 < self.max_connections <= count:
            return False
        self._connections[key] = count + 1
        return True

    def disconnect(self, host: str) -> None:
        key = address_key(host)
        count = self._connections.pop(key, 0) - 1
        if count > 0:
            self._connections[key] = count

    def allow(self, host: str) -> bool:
        if self._per_minute <= 0:
            return True
        key = address_key(host)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_RATE_BUCKETS:
                self._forget_idle()
            bucket = self._buckets[key] = TokenBucket(
                self._clock, self._per_minute / 60.0, self._per_minute
            )
        return bucket.take()

    def _forget_idle(self) -> None:
        """Forget the buckets that have refilled (as good as new); all of them if none has."""
        idle = [key for key, bucket in self._buckets.items() if bucket.full()]
        if not idle:
            # As many addresses all guessing within the last minute or two: forgetting them all
            # lets them start again, but memory stays bounded.
            self._buckets.clear()
        for key in idle:
            del self._buckets[key]


class Directory:
    """
    The server's shared state and rules.

    @ivar online: username -> the L{Member} logged in under that name.
    """

    def __init__(self, store, clock, limits: Limits, hasher) -> None:
        self.store = store
        self.clock = clock
        self.limits = limits
        self.hasher = hasher
        self.accounts: dict[str, Account] = {}
        # Names taken, lowercased: "Alice" beside "alice" would pass for her. (Names that differ
        # only in case from accounts made before this check stay as they are.)
        self._names: dict[str, str] = {}
        self.online: dict[str, Member] = {}
        self.last_seen: dict[str, float] = {}
        self._blocking: dict[str, set[str]] = {}  # blocker -> users they block
        self._blocked_by: dict[str, set[str]] = {}  # user -> users who block them
        self._tokens: dict[str, tuple[str, float]] = {}  # token hash -> (username, expires)
        self._user_tokens: dict[str, list[str]] = {}  # username -> token hashes, oldest first
        # subject -> None (online) or why they went offline, not sent yet; in the order of the changes
        self._presence: dict[str, str | None] = {}
        self._presence_call = None
        self._presence_flushed_at = float("-inf")
        self._presence_writes: Iterator[None] | None = None  # the rest of a flush under way
        self._presence_more = None
        # Envelopes accepted and not yet acked, stored or held, per recipient: the mailbox limit.
        self._mailbox: dict[str, int] = {}
        self._next_seq = 1
        # Envelopes written to an online recipient and kept in memory only, until their ack or
        # the hold ends: recipient -> seq -> (envelope, what takes the sender's answer).
        self._held: dict[str, dict[int, tuple[StoredEnvelope, Answer]]] = {}
        self._hold_ends: deque[tuple[float, str, int]] = deque()  # (when, recipient, seq), oldest first
        self._hold_call = None
        self._storing: dict[str, int] = {}  # recipient -> puts under way
        self.lockouts = Lockouts(clock, limits.block_duration)
        self.address_limits = AddressLimits(clock, limits.login_rate, limits.max_connections_per_address)

    # -- start-up ----------------------------------------------------------------

    def load(self, snapshot) -> None:
        self.accounts = dict(snapshot.accounts)
        self._names = {username.lower(): username for username in self.accounts}
        self.last_seen = dict(snapshot.last_seen)
        self._mailbox = dict(snapshot.mailbox_counts)
        self._next_seq = snapshot.last_seq + 1
        self._tokens = dict(snapshot.tokens)
        for hashed, (username, expires) in sorted(snapshot.tokens.items(), key=lambda kv: kv[1][1]):
            self._user_tokens.setdefault(username, []).append(hashed)
        for blocker, blocked in snapshot.blocks:
            self._blocking.setdefault(blocker, set()).add(blocked)
            self._blocked_by.setdefault(blocked, set()).add(blocker)

    async def import_credentials(self, lines: Iterable[str]) -> tuple[int, int, int]:
        """
        Create the accounts of a credentials file (C{username password} per line) that do not
        exist yet. Existing accounts are left alone: the file seeds the store, it is not the store.

        @return: (imported, existing, skipped): accounts made, lines naming one that exists already,
            lines that are not C{username password} in UTF-8 (each logged)
        """
        imported = existing = skipped = 0
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 1)
            if len(parts) != 2 or not valid_username(parts[0]):
                log.warn("credentials line {number}: expected 'username password'; skipped", number=number)
                skipped += 1
                continue
            if _UNDECODED.search(line):  # bytes that are not UTF-8 (the file is read with surrogateescape)
                log.warn("credentials line {number}: not UTF-8 text; skipped", number=number)  # noqa: G010 - twisted.logger
                skipped += 1
                continue
            username, password = parts
            if username in self.accounts:
                existing += 1
                continue
            taken = self._names.get(username.lower())
            if taken is not None:
                log.warn(  # noqa: G010 - twisted.logger
                    "credentials line {number}: {username} is the account {taken} but for case; skipped",
                    number=number, username=username, taken=taken,
                )
                skipped += 1
                continue
            account = Account(username, await self.hasher.hash(password), None, None, self.clock.seconds())
            await self._create_account(account)
            imported += 1
        return imported, existing, skipped

    def _check_name_free(self, username: str) -> None:
        taken = self._names.get(username.lower())
        if taken == username or username in self.accounts:  # (accounts made before may differ in case)
            raise Refusal(Code.USERNAME_TAKEN, f"the name {username!r} is taken")
        if taken is not None:
            raise Refusal(
                Code.USERNAME_TAKEN_IN_OTHER_CASE,
                f"the name {username!r} is taken, as {taken!r}: names that differ only in case are one name",
            )

    async def _create_account(self, account: Account) -> None:
        """Store a new account, its name taken meanwhile (in any case): two registrations of a name
        spelled in two cases cannot both pass while the first is written.

        @raise UsernameTaken: the store has that name already.
        """
        folded = account.username.lower()
        self._names[folded] = account.username
        try:
            await self.store.create_account(account)
        except BaseException:
            del self._names[folded]
            raise
        self.accounts[account.username] = account

    # -- relationships -------------------------------------------------------------

    def blocks(self, blocker: str, blocked: str) -> bool:
        return blocked in self._blocking.get(blocker, ())

    def visible_to(self, viewer: str, names: Iterable[str]) -> list[str]:
        """C{names} minus C{viewer} and those who block C{viewer}, sorted."""
        hidden = self._blocked_by.get(viewer, set())
        return sorted(n for n in names if n != viewer and n not in hidden)

    def _other(self, me: str, name: str) -> Account:
        """The account C{me} names in a request, or the refusal for self / unknown user."""
        if name == me:
            raise Refusal(Code.SELF, "that is you")
        account = self.accounts.get(name)
        if account is None:
            raise Refusal(Code.UNKNOWN_USER, f"there is no user named {name!r}")
        return account

    def _reachable(self, me: str, name: str) -> Account:
        account = self._other(me, name)
        if self.blocks(name, me):
            raise Refusal(Code.BLOCKED_BY_USER, f"{name} has blocked you")
        return account

    # -- accounts --------------------------------------------------------------------

    def _check_password_rate(self, host: str) -> None:
        if not self.address_limits.allow(host):
            raise Refusal(Code.RATE_LIMITED, "too many password attempts from your address; wait a minute")
        if self.hasher.busy:
            raise Refusal(Code.RATE_LIMITED, "the server is busy checking passwords; try again shortly")

    @staticmethod
    def _check_keys(username: str, fingerprint: str, envelope_key: str, key_signature: str | None) -> None:
        if not valid_fingerprint(fingerprint):
            raise Refusal(Code.INVALID_KEY, "fingerprint must be 64 lowercase hex digits (SHA-256 of the identity key)")
        if not valid_envelope_key(envelope_key):
            raise Refusal(Code.INVALID_KEY, "envelope_key must be an X25519 public key in unpadded base64url")
        if key_signature is not None:
            try:
                check_envelope_key(key_signature, username, fingerprint, envelope_key)
            except EnvelopeError as e:
                raise Refusal(Code.INVALID_KEY, f"key_signature: {e}") from None

    async def _bind_keys(self, account: Account, fingerprint: str, envelope_key: str, key_signature: str | None) -> None:
        """Store these keys for the account, unless it has them already. The same keys without a
        signature (from a peer older than signatures) keep the one they had."""
        same_keys = (fingerprint, envelope_key) == (account.fingerprint, account.envelope_key)
        if same_keys and key_signature in (None, account.key_signature):
            return
        await self.store.set_keys(account.username, fingerprint, envelope_key, key_signature)
        if not same_keys:
            log.info("{username} bound new keys", username=account.username)
        self.accounts[account.username] = replace(
            account, fingerprint=fingerprint, envelope_key=envelope_key, key_signature=key_signature
        )

    async def register(
        self, host: str, username: str, password: str, fingerprint: str, envelope_key: str,
        key_signature: str | None = None,
    ) -> dict:
        if not self.limits.open_registration:
            raise Refusal(Code.REGISTRATION_CLOSED, "registration is closed on this server; ask its operator for an account")
        if not valid_username(username):
            raise Refusal(
                Code.INVALID_USERNAME,
                "a username is 1 to 32 characters from A-Z a-z 0-9 _ . - and starts with a letter or digit",
            )
        if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise Refusal(Code.WEAK_PASSWORD, PASSWORD_RULE)
        self._check_keys(username, fingerprint, envelope_key, key_signature)
        self._check_name_free(username)
        self._check_password_rate(host)
        account = Account(
            username, await self.hasher.hash(password), fingerprint, envelope_key, self.clock.seconds(), key_signature
        )
        self._check_name_free(username)  # registered by someone else while we hashed
        try:
            await self._create_account(account)
        except UsernameTaken:
            raise Refusal(Code.USERNAME_TAKEN, f"the name {username!r} is taken") from None
        log.info("registered {username}", username=username)
        # A session token for the new account, so that its first login is a resume: the password
        # was hashed just now, and a login would hash it again.
        token, stored = self._new_token(username)
        await stored
        return {"username": username, "token": token}

    def _refuse_if_locked(self, username: str) -> None:
        left = self.lockouts.remaining(username)
        if left:
            raise Refusal(
                Code.ACCOUNT_LOCKED,
                f"{username} is blocked after {MAX_FAILURES} failed logins; try again in {int(left + 0.999)} s",
            )

    async def login(
        self, member: Member, username: str, password: str,
        fingerprint: str | None = None, envelope_key: str | None = None, key_signature: str | None = None,
    ) -> dict:
        """Check the password; on success C{member} is online under C{username}."""
        self._refuse_if_locked(username)
        self._check_password_rate(member.host)
        if (fingerprint is None) != (envelope_key is None):
            raise Refusal(Code.BAD_REQUEST, "send both fingerprint and envelope_key, or neither")
        if fingerprint is not None:
            self._check_keys(username, fingerprint, envelope_key, key_signature)
        elif key_signature is not None:
            raise Refusal(Code.BAD_REQUEST, "key_signature goes with fingerprint and envelope_key")
        account = self.accounts.get(username)
        good = await self.hasher.verify(password, account.password_hash if account else None)
        # Another connection may have locked the account while we were hashing.
        self._refuse_if_locked(username)
        if not good:
            if account is None:
                raise Refusal(Code.BAD_CREDENTIALS, "wrong username or password")
            left = self.lockouts.failed(username)
            if left == 0:
                log.info("{username} blocked after failed logins", username=username)
                raise Refusal(
                    Code.TOO_MANY_ATTEMPTS,
                    f"wrong password {MAX_FAILURES} times: {username} is blocked for "
                    f"{int(self.limits.block_duration)} s",
                )
            raise Refusal(Code.BAD_CREDENTIALS, f"wrong username or password ({left} attempts left)")
        self.lockouts.succeeded(username)
        if fingerprint is None and account.fingerprint is None:
            raise Refusal(Code.KEYS_REQUIRED, "this account has no keys yet: log in with fingerprint and envelope_key")
        if username in self.online:
            self._refuse_second_login(username)
        if fingerprint is not None:
            await self._bind_keys(account, fingerprint, envelope_key, key_signature)
        if username in self.online:  # logged in elsewhere while the keys were written
            self._refuse_second_login(username)
        return await self._enter(member, username)

    def _refuse_second_login(self, username: str) -> NoReturn:
        raise Refusal(
            Code.ALREADY_ONLINE,
            f"{username} is already logged in elsewhere (a session whose network was cut off ends "
            f"within {self.limits.keepalive_timeout:g} s)",
        )

    async def resume(self, member: Member, username: str, token: str, key_signature: str | None = None) -> dict:
        """
        Log in with a session token; an existing session of that user is replaced. A
        C{key_signature} for the account's keys is stored (a peer updated since it last gave its
        keys with a password gives it so).
        """
        entry = self._tokens.get(token_hash(token))
        if entry is None or entry[0] != username or entry[1] <= self.clock.seconds():
            raise Refusal(Code.INVALID_TOKEN, "that session token is unknown or expired; log in with your password")
        account = self.accounts[username]
        # Checked when new only: every peer of a restarted server gives it again as it comes back.
        if key_signature not in (None, account.key_signature) and account.fingerprint is not None:
            try:
                self._check_keys(username, account.fingerprint, account.envelope_key, key_signature)
            except Refusal:
                # For other keys than the account's: its user has logged in from another install
                # since. Taking this one in on its token would hand it what is sealed to the other's
                # keys, which it cannot open: its password login binds its own keys instead.
                raise Refusal(
                    Code.INVALID_TOKEN,
                    "this install's keys are not the account's (it has logged in from another since): log in with your password",
                ) from None
            await self._bind_keys(account, account.fingerprint, account.envelope_key, key_signature)
        old = self.online.get(username)
        if old is not None:
            self._leave(old, "replaced", announce=False)
            old.kick("replaced", "you logged in from somewhere else")
        return await self._enter(member, username, announce=old is None)

    async def _enter(self, member: Member, username: str, announce: bool = True) -> dict:
        member.username = username
        self.online[username] = member
        token, stored = self._new_token(username)
        if announce:
            self._announce(username, None)
        log.info("{username} logged in from {host}", username=username, host=member.host)
        try:
            # Queued together, so the writer thread runs them in one transaction.
            await gatherResults([stored, self.store.record_login(username, self.clock.seconds())], consumeErrors=True)
        except BaseException:
            self.leave(member, "disconnected")
            member.username = None  # the connection stays logged out, free to try again
            raise
        return {"username": username, "token": token, "mailbox": self._mailbox.get(username, 0)}

    def _new_token(self, username: str) -> tuple[str, Deferred[None]]:
        """A new session token for C{username}, valid at once; the Deferred fires once it is stored."""
        token = secrets.token_urlsafe(32)
        hashed = token_hash(token)
        expires = self.clock.seconds() + TOKEN_LIFETIME
        self._tokens[hashed] = (username, expires)
        mine = self._user_tokens.setdefault(username, [])
        mine.append(hashed)
        while len(mine) > KEEP_TOKENS:
            self._tokens.pop(mine.pop(0), None)
        return token, self.store.add_token(username, hashed, expires, keep=KEEP_TOKENS)

    def leave(self, member: Member, reason: str) -> None:
        """C{member} logged out, timed out or disconnected."""
        if self.online.get(member.username) is member:
            self._leave(member, reason, announce=True)

    def _leave(self, member: Member, reason: str, announce: bool) -> None:
        username = member.username
        del self.online[username]
        now = self.clock.seconds()
        self.last_seen[username] = now
        if announce:
            self._announce(username, reason)
            log.info("{username} logged out ({reason})", username=username, reason=reason)
        # What they were sent and did not ack waits for their next login.
        for envelope, answer in self._held.pop(username, {}).values():
            self._store(envelope, answer, write=False)
        self.store.record_logout(username, now).addErrback(
            lambda f: log.failure("recording the logout of {username}", f, username=username)
        )

    def _announce(self, subject: str, offline_reason: str | None) -> None:
        """
        Tell everyone online but C{subject} and those C{subject} blocks that C{subject} is now
        online (C{offline_reason} None) or offline. Changes within a window go out together, one
        event per recipient with the latest status of each subject: a reconnect storm of n users is
        then a few events per user instead of n. A change goes out C{presence_batch} after it
        happens, but a flush (a write to everyone) comes at the earliest C{presence_batch_per_user}
        per user online after the one before: flushes then stay a bounded share of the server's
        time however many users come and go, while a lone change still goes out soon.
        """
        self._presence.pop(subject, None)
        self._presence[subject] = offline_reason
        if self.limits.presence_batch <= 0:
            self._flush_presence()
        elif self._presence_call is None:
            now = self.clock.seconds()
            spaced = self._presence_flushed_at + len(self.online) * self.limits.presence_batch_per_user
            at = max(now + self.limits.presence_batch, spaced)
            self._presence_call = self.clock.callLater(at - now, self._flush_presence)

    def _flush_presence(self) -> None:
        self._presence_call = None
        self._presence_flushed_at = self.clock.seconds()
        # A flush still under way ends first, so that everyone hears the changes in order.
        self._write_presence(None)
        pending, self._presence = self._presence, {}
        if pending:
            self._presence_writes = self._presence_deliveries(pending)
            self._write_presence(PRESENCE_SLICE)

    def _presence_deliveries(self, pending: dict[str, str | None]) -> Iterator[None]:
        """Write C{pending} to each user online now, one user per step."""
        # Recipients who are a subject themselves, or blocked by one, get their own selection.
        special = set(pending).union(*(self._blocking.get(subject, ()) for subject in pending))
        everything = presence_frame(pending)
        for name, member in list(self.online.items()):
            if name not in special:
                member.write(everything)
            else:
                mine = {
                    subject: reason for subject, reason in pending.items()
                    if subject != name and name not in self._blocking.get(subject, ())
                }
                if mine:
                    member.write(presence_frame(mine))
            yield

    def _write_presence(self, limit: int | None) -> None:
        """Take up to C{limit} steps (None: all) of the flush under way; the rest at the next turn."""
        if self._presence_more is not None and self._presence_more.active():
            self._presence_more.cancel()
        self._presence_more = None
        writes = self._presence_writes
        if writes is None:
            return
        for _ in writes if limit is None else islice(writes, limit - 1):
            pass
        if limit is None or next(writes, True):
            self._presence_writes = None
        else:
            self._presence_more = self.clock.callLater(0, self._write_presence, limit)

    # -- presence queries --------------------------------------------------------------

    def who(self, me: str) -> dict:
        return {"users": self.visible_to(me, self.online)}

    def whosince(self, me: str, seconds: float) -> dict:
        since = self.clock.seconds() - seconds
        names = set(self.online)
        names.update(name for name, at in self.last_seen.items() if at >= since)
        return {"users": self.visible_to(me, names)}

    # -- blocks ----------------------------------------------------------------------

    async def block(self, me: str, name: str) -> dict:
        self._other(me, name)
        if self.blocks(me, name):
            raise Refusal(Code.ALREADY_BLOCKED, f"you already block {name}")
        await self.store.add_block(me, name)
        self._blocking.setdefault(me, set()).add(name)
        self._blocked_by.setdefault(name, set()).add(me)
        return {"user": name}

    async def unblock(self, me: str, name: str) -> dict:
        self._other(me, name)
        if not self.blocks(me, name):
            raise Refusal(Code.NOT_BLOCKED, f"you do not block {name}")
        await self.store.remove_block(me, name)
        self._blocking[me].discard(name)
        self._blocked_by[name].discard(me)
        return {"user": name}

    def blocked_list(self, me: str) -> dict:
        return {"users": sorted(self._blocking.get(me, ()))}

    # -- directory lookups --------------------------------------------------------------

    def lookup(self, me: str, name: str) -> dict:
        account = self._reachable(me, name)
        member = self.online.get(name)
        if member is None:
            raise Refusal(Code.OFFLINE, f"{name} is offline")
        return {"user": name, "host": member.host, "port": member.port, **_keys_of(account)}

    def keys(self, me: str, name: str) -> dict:
        account = self._reachable(me, name)
        if account.fingerprint is None:
            raise Refusal(Code.KEYS_UNKNOWN, f"{name} has not published keys yet")
        return {"user": name, **_keys_of(account)}

    # -- relay and mailbox ------------------------------------------------------------------

    def send(self, me: str, to: str, msg_id: str, envelope: str, answer: Answer) -> None:
        """
        Take an envelope for C{to}; C{answer} is called once, with the reply's result once it is
        safe (acked by the recipient, or stored) or with the L{Failure} that kept it from being
        stored. A refusal is raised at once and C{answer} is not called.

        An online recipient who has their stored mailbox already, nothing on its way to the store
        and room in their window of unacked envelopes, is written to at once and the envelope is
        held in memory: their ack (which means they stored it) answers the sender and nothing
        touches the disk. Without an ack within C{hold} seconds, or if they leave first, it is
        stored like any other.

        This is the hot path of the relay: a plain callback, no coroutine and no Deferred of its
        own (a Deferred per message took about a sixth of the server's CPU in C{dm_relay_tls}).
        """
        self._reachable(me, to)
        if self._mailbox.get(to, 0) >= self.limits.mailbox_limit:
            # A resend of one already stored is still answered as the duplicate it is.
            self.store.stored_seq(to, me, msg_id).addCallback(self._full, to).addBoth(answer)
            return
        self._mailbox[to] = self._mailbox.get(to, 0) + 1
        seq = self._next_seq
        self._next_seq += 1
        stored = StoredEnvelope(seq, to, me, msg_id, envelope, self.clock.seconds())
        member = self.online.get(to)
        if (
            member is None or not member.live or to in self._storing or self.limits.hold <= 0
            or not member.deliver(stored)
        ):
            self._store(stored, answer, write=True)
            return
        self._held.setdefault(to, {})[seq] = (stored, answer)
        self._hold_ends.append((stored.sent_at + self.limits.hold, to, seq))
        if self._hold_call is None:
            self._hold_call = self.clock.callLater(self.limits.hold, self._hold_over)

    def _full(self, seq: int | None, to: str) -> dict:
        if seq is None:
            raise Refusal(
                Code.MAILBOX_FULL,
                f"{to}'s mailbox is full ({self.limits.mailbox_limit} messages waiting); try again later",
            )
        return {"status": "delivered" if to in self.online else "stored", "seq": seq, "duplicate": True}

    def _store(self, envelope: StoredEnvelope, answer: Answer, write: bool) -> None:
        """Store C{envelope}, then C{answer} its sender (L{_stored} says with what)."""
        to = envelope.recipient
        self._storing[to] = self._storing.get(to, 0) + 1
        self.store.put_envelope_then(envelope, partial(self._answer_stored, envelope, write, answer))

    def _answer_stored(self, envelope: StoredEnvelope, write: bool, answer: Answer, outcome) -> None:
        try:
            reply = self._stored(outcome, envelope, write)
        except Exception:  # noqa: BLE001 - a bug here must still answer the sender, with the failure
            reply = Failure()
        answer(reply)

    def _stored(self, outcome, envelope: StoredEnvelope, write: bool) -> dict:
        to = envelope.recipient
        left = self._storing.pop(to) - 1
        if left:
            self._storing[to] = left
        if isinstance(outcome, Failure):
            self._uncount(to, 1)
            return outcome
        seq, duplicate = outcome
        if duplicate:
            self._uncount(to, 1)
        member = self.online.get(to)
        if member is None:
            return {"status": "stored", "seq": seq, "duplicate": duplicate}
        # A member still receiving stored envelopes gets this one from there, after the older ones.
        if write and member.live and not duplicate:
            member.deliver(envelope)
        return {"status": "delivered", "seq": seq, "duplicate": duplicate}

    def _hold_over(self) -> None:
        self._hold_call = None
        now = self.clock.seconds()
        ends = self._hold_ends
        while ends and ends[0][0] <= now:
            _, to, seq = ends.popleft()
            held = self._held.get(to)
            entry = held.pop(seq, None) if held else None
            if entry is not None:
                envelope, answer = entry
                self._store(envelope, answer, write=False)
        if ends:
            self._hold_call = self.clock.callLater(ends[0][0] - now, self._hold_over)

    def _uncount(self, user: str, n: int) -> None:
        left = self._mailbox.get(user, 0) - n
        if left > 0:
            self._mailbox[user] = left
        else:
            self._mailbox.pop(user, None)

    def mailbox_page(self, me: str, after_seq: int, max_bytes: int) -> Deferred:
        """
        The next envelopes stored for C{me} after C{after_seq}, oldest first: a page of at most
        L{MAILBOX_PAGE_ROWS} that stops at the one that reaches C{max_bytes} characters (or
        L{MAILBOX_PAGE_BYTES}); none once all have been read.
        """
        if not self._mailbox.get(me):
            # Nothing stored, held or on its way to the store: no need to ask the store (most
            # logins, and every reconnect after a restart).
            return succeed([])
        return self.store.fetch_envelopes(me, after_seq, MAILBOX_PAGE_ROWS, min(max_bytes, MAILBOX_PAGE_BYTES))

    def ack(self, me: str, seqs: list[int]) -> dict | Deferred[dict]:
        """
        C{me} stored these envelopes: answer the senders of held ones, delete the stored ones.
        The result comes at once when none was stored.
        """
        held = self._held.get(me)
        taken = 0
        if held:
            rest = []
            for seq in seqs:
                entry = held.pop(seq, None)
                if entry is None:
                    rest.append(seq)
                else:
                    taken += 1
                    entry[1]({"status": "delivered", "seq": seq, "duplicate": False})
            self._uncount(me, taken)
            seqs = rest
        if not seqs:
            return {"acked": taken}
        return self.store.ack_envelopes(me, seqs).addCallback(self._acked, me, taken)

    def _acked(self, deleted: int, me: str, taken: int) -> dict:
        self._uncount(me, deleted)
        return {"acked": taken + deleted}

    def broadcast(self, me: str, text: str, signature: str) -> dict:
        """To everyone online but C{me} and who blocked C{me}; C{signature} is the sender's, passed on unread."""
        frame = encode_event(
            "broadcast", **{"from": me, "text": text, "signature": signature, "sent_at": self.clock.seconds()}
        )
        delivered = skipped = 0
        blockers = self._blocked_by.get(me, ())
        for name, member in self.online.items():
            if name == me:
                continue
            if name in blockers:
                skipped += 1
            else:
                member.write(frame)
                delivered += 1
        return {"delivered": delivered, "skipped": skipped}

    def shutdown(self) -> None:
        """Everyone leaves, so every held envelope is queued for the store before it stops."""
        for call in (self._presence_call, self._presence_more, self._hold_call):
            if call is not None and call.active():
                call.cancel()
        self._presence_call = self._presence_more = self._hold_call = None
        self._presence_writes = None
        self._hold_ends.clear()
        for member in list(self.online.values()):
            self._leave(member, "shutdown", announce=False)
            member.kick("shutdown", "the server is shutting down")


def presence_frame(changes: dict[str, str | None]) -> bytes:
    return encode_event(
        "presence",
        online=[user for user, reason in changes.items() if reason is None],
        offline={user: reason for user, reason in changes.items() if reason is not None},
    )


def envelope_frame(stored: StoredEnvelope) -> bytes:
    # Once per envelope written, the most frequent frame: the dict goes straight to the encoder
    # (through encode_event's keyword arguments it took four times as long as the encoding).
    return dumps_line({
        "event": "envelope", "seq": stored.seq, "msg_id": stored.msg_id, "envelope": stored.envelope,
        "sent_at": stored.sent_at, "from": stored.sender,
    })


def _keys_of(account: Account) -> dict:
    keys = {"fingerprint": account.fingerprint, "envelope_key": account.envelope_key}
    if account.key_signature is not None:
        keys["key_signature"] = account.key_signature
    return keys
