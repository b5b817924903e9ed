"""The peer's local SQLite store: contacts with pinned keys, block and mute state, every message
sent and received with its status, the outbox (outgoing messages not yet accepted by anyone), and
the receipts owed for messages received through the server.

All SQL lives here. Each method runs its statements in one transaction through C{run}: a single
dedicated thread in the peer (L{ThreadRunner}), or L{run_now} in tests.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

log = Logger()

T = TypeVar("T")
Runner = Callable[[Callable[[], T]], "Deferred[T]"]

SCHEMA_VERSION = 3

# Outgoing statuses: pending (in the outbox), sent (a server holds it), delivered (the recipient
# acknowledged it), failed (refused for good). Incoming: shown, muted (stored, not displayed),
# held (signed with a changed key the user has not accepted yet).
PENDING, SENT, DELIVERED, FAILED = "pending", "sent", "delivered", "failed"
SHOWN, MUTED, HELD = "shown", "muted", "held"

_SCHEMA = [
    """CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE contacts (
        user TEXT PRIMARY KEY,
        fingerprint TEXT,
        envelope_key TEXT,
        new_fingerprint TEXT,
        new_envelope_key TEXT,
        blocked INTEGER NOT NULL DEFAULT 0,
        muted INTEGER NOT NULL DEFAULT 0,
        mute_until REAL)""",
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        peer TEXT NOT NULL,
        outgoing INTEGER NOT NULL,
        msg_id TEXT NOT NULL,
        text TEXT NOT NULL,
        private INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL,
        sent_at REAL NOT NULL,
        stored_at REAL NOT NULL,
        UNIQUE (peer, outgoing, msg_id))""",
    """CREATE INDEX messages_by_status ON messages (status, peer, id)""",
]

# _MIGRATIONS[n] takes a file from schema version n + 1 to n + 2. Append only.
_MIGRATIONS = [
    # Receipts owed to senders, kept until the server has taken them: a receipt that could not be
    # sent left the sender's message at "sent" for good.
    ["""CREATE TABLE receipts (peer TEXT NOT NULL, msg_id TEXT NOT NULL, UNIQUE (peer, msg_id))"""],
    # /history USER read all of USER's messages to sort them: 0.23 s for a million.
    ["CREATE INDEX messages_by_peer ON messages (peer, id)"],
]


class UnusableHistory(Exception):
    """The history file cannot be opened as this peer's (not a database, a newer schema...)."""


def run_now(work: Callable[[], T]) -> "Deferred[T]":
    """Run C{work} at once, in the calling thread: for tests and tools."""
    return maybeDeferred(work)


class ThreadRunner:
    """One dedicated thread for the database, so SQLite never blocks the reactor."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="p2pchat-history")

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    def __call__(self, work: Callable[[], T]) -> "Deferred[T]":
        return deferToThreadPool(self._reactor, self._pool, work)


@dataclass(frozen=True)
class Contact:
    user: str
    fingerprint: str | None = None
    envelope_key: str | None = None
    new_fingerprint: str | None = None
    new_envelope_key: str | None = None
    blocked: bool = False
    muted: bool = False
    mute_until: float | None = None  # None with muted: until /unmute


@dataclass(frozen=True)
class Entry:
    peer: str
    outgoing: bool
    msg_id: str
    text: str
    private: bool
    status: str
    sent_at: float  # when it was written, by its writer's clock
    stored_at: float  # when this history took it: the order of /history


class History:
    """
    The peer's database file. Every public method returns a L{Deferred}.

    @param path: the SQLite file; created (mode 0600) with the current schema when missing.
    @param run: how to run one unit of work; see L{ThreadRunner} and L{run_now}.
    """

    def __init__(self, path: str, run: Runner = run_now) -> None:
        self._path = path
        self._run = run
        self._db: sqlite3.Connection | None = None

    # -- lifecycle ----------------------------------------------------------------

    def open(self) -> Deferred[None]:
        return self._run(self._open)

    def close(self) -> Deferred[None]:
        return self._run(self._close)

    def _open(self) -> None:
        if not os.path.exists(self._path):
            os.close(os.open(self._path, os.O_CREAT | os.O_WRONLY, 0o600))
        # One thread uses the connection at a time, but not the thread that made it.
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        try:
            self._prepare(db)
        except sqlite3.Error as e:
            db.close()
            # "file is not a database", "database disk image is malformed"...: say which file.
            raise UnusableHistory(f"{self._path}: {e}") from e
        except BaseException:
            db.close()
            raise
        self._db = db

    def _prepare(self, db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        with _transaction(db):
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute("INSERT INTO schema_version VALUES (1)")
                version = 1
            else:
                version = row[0]
            if not 1 <= version <= SCHEMA_VERSION:
                raise UnusableHistory(
                    f"{self._path} has schema version {version}; this peer knows up to {SCHEMA_VERSION}"
                )
            for step in _MIGRATIONS[version - 1 :]:
                for statement in step:
                    db.execute(statement)
            db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _transact(self, work: Callable[[sqlite3.Connection], T]) -> Deferred[T]:
        def in_transaction() -> T:
            assert self._db is not None, "History.open() first"
            with _transaction(self._db):
                return work(self._db)

        return self._run(in_transaction)

    # -- settings -----------------------------------------------------------------

    def is_registered(self, server: str) -> Deferred[bool]:
        """Whether this identity registered (or found its account) on C{server} ("host:port")."""

        def work(db: sqlite3.Connection) -> bool:
            found = db.execute("SELECT 1 FROM settings WHERE key = ?", ("registered " + server,))
            return found.fetchone() is not None

        return self._transact(work)

    def mark_registered(self, server: str) -> Deferred[None]:
        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR IGNORE INTO settings VALUES (?, '1')", ("registered " + server,))

        return self._transact(work)

    def forget_registered(self, server: str) -> Deferred[None]:
        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM settings WHERE key = ?", ("registered " + server,))

        return self._transact(work)

    # -- contacts -----------------------------------------------------------------

    def contacts(self) -> Deferred[dict[str, Contact]]:
        def work(db: sqlite3.Connection) -> dict[str, Contact]:
            rows = db.execute(
                "SELECT user, fingerprint, envelope_key, new_fingerprint, new_envelope_key,"
                " blocked, muted, mute_until FROM contacts"
            )
            return {
                row[0]: Contact(row[0], row[1], row[2], row[3], row[4], bool(row[5]), bool(row[6]), row[7])
                for row in rows
            }

        return self._transact(work)

    def save_contact(self, contact: Contact) -> Deferred[None]:
        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO contacts (user, fingerprint, envelope_key, new_fingerprint,"
                " new_envelope_key, blocked, muted, mute_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    contact.user,
                    contact.fingerprint,
                    contact.envelope_key,
                    contact.new_fingerprint,
                    contact.new_envelope_key,
                    int(contact.blocked),
                    int(contact.muted),
                    contact.mute_until,
                ),
            )

        return self._transact(work)

    # -- messages -----------------------------------------------------------------

    def add_outgoing(self, peer: str, msg_id: str, text: str, private: bool, now: float) -> Deferred[None]:
        """Store a message the user wrote, as C{pending}: it is in the outbox from now on."""

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO messages (peer, outgoing, msg_id, text, private, status, sent_at,"
                " stored_at) VALUES (?, 1, ?, ?, ?, ?, ?, ?)",
                (peer, msg_id, text, int(private), PENDING, now, now),
            )

        return self._transact(work)

    def add_incoming(
        self, peer: str, msg_id: str, text: str, private: bool, status: str, sent_at: float, now: float,
        owe_receipt: bool = False,
    ) -> Deferred[bool]:
        """
        Store a received message unless C{(peer, msg_id)} is already stored; with C{owe_receipt},
        record in the same transaction that its sender is owed a receipt (a duplicate too: its
        sender sent it again, so it never had one).

        @return: whether it is new (a duplicate must be neither stored nor shown again).
        """

        def work(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "INSERT OR IGNORE INTO messages (peer, outgoing, msg_id, text, private, status,"
                " sent_at, stored_at) VALUES (?, 0, ?, ?, ?, ?, ?, ?)",
                (peer, msg_id, text, int(private), status, sent_at, now),
            )
            new = cursor.rowcount == 1
            if owe_receipt:
                db.execute("INSERT OR IGNORE INTO receipts (peer, msg_id) VALUES (?, ?)", (peer, msg_id))
            return new

        return self._transact(work)

    def owed_receipts(self) -> Deferred[dict[str, list[str]]]:
        """The msg_ids whose receipts are owed, per sender, oldest first."""

        def work(db: sqlite3.Connection) -> dict[str, list[str]]:
            owed: dict[str, list[str]] = {}
            for peer, msg_id in db.execute("SELECT peer, msg_id FROM receipts ORDER BY rowid"):
                owed.setdefault(peer, []).append(msg_id)
            return owed

        return self._transact(work)

    def receipts_sent(self, peer: str, msg_ids: Iterable[str]) -> Deferred[None]:
        """Those receipts are no longer owed."""
        rows = [(peer, msg_id) for msg_id in msg_ids]

        def work(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM receipts WHERE peer = ? AND msg_id = ?", rows)

        return self._transact(work)

    def outbox(self, peer: str | None = None) -> Deferred[list[Entry]]:
        """Pending outgoing messages, oldest first; for one peer or for all."""
        where, args = "outgoing = 1 AND status = ?", [PENDING]
        if peer is not None:
            where += " AND peer = ?"
            args.append(peer)
        return self._transact(lambda db: _entries(db, where, args, "id"))

    def outbox_page(self, peer: str, after: int, limit: int) -> Deferred[list[tuple[int, Entry]]]:
        """
        Up to C{limit} pending messages to C{peer} after the one numbered C{after} (0: from the
        first), oldest first, each with its number: a script may queue more than fit in memory.
        """

        def work(db: sqlite3.Connection) -> list[tuple[int, Entry]]:
            rows = db.execute(
                f"SELECT id, {_ENTRY_COLUMNS} FROM messages"
                " WHERE status = ? AND peer = ? AND outgoing = 1 AND id > ? ORDER BY id LIMIT ?",
                (PENDING, peer, after, limit),
            )
            return [(r[0], _entry(r[1:])) for r in rows]

        return self._transact(work)

    def outbox_peers(self) -> Deferred[list[str]]:
        """Those with pending messages to them."""

        def work(db: sqlite3.Connection) -> list[str]:
            rows = db.execute("SELECT DISTINCT peer FROM messages WHERE status = ? AND outgoing = 1 ORDER BY peer", (PENDING,))
            return [r[0] for r in rows]

        return self._transact(work)

    def awaiting_receipt(self, peer: str) -> Deferred[bool]:
        """
        Whether a message to C{peer} that a server holds (C{sent}) is newer than every one
        C{peer} acknowledged: it may not have reached them yet. A C{sent} one older than a
        delivered one is not counted (its receipt was lost, or it was overtaken already).
        """

        def work(db: sqlite3.Connection) -> bool:
            # Both maxima come from the end of messages_by_status (status, peer, id).
            newest_sent, newest_delivered = db.execute(
                "SELECT (SELECT MAX(id) FROM messages WHERE status = ? AND peer = ?),"
                " (SELECT MAX(id) FROM messages WHERE status = ? AND peer = ?)",
                (SENT, peer, DELIVERED, peer),
            ).fetchone()
            return newest_sent is not None and newest_sent > (newest_delivered or 0)

        return self._transact(work)

    def set_status(self, peer: str, msg_ids: Iterable[str], status: str, only_from: Iterable[str]) -> Deferred[int]:
        """
        Move outgoing messages to C{status}, but only those currently in one of C{only_from}
        (so a late "sent" never hides a "delivered").

        @return: how many changed.
        """
        ids, sources = list(msg_ids), list(only_from)

        def work(db: sqlite3.Connection) -> int:
            changed = 0
            for msg_id in ids:
                changed += db.execute(
                    "UPDATE messages SET status = ? WHERE peer = ? AND outgoing = 1 AND msg_id = ?"
                    f" AND status IN ({','.join('?' * len(sources))})",
                    (status, peer, msg_id, *sources),
                ).rowcount
            return changed

        return self._transact(work)

    def release_held(self, peer: str) -> Deferred[list[Entry]]:
        """Mark the messages held back for a changed key as shown, and return them, oldest first."""

        def work(db: sqlite3.Connection) -> list[Entry]:
            held = _entries(db, "outgoing = 0 AND status = ? AND peer = ?", [HELD, peer], "id")
            db.execute("UPDATE messages SET status = ? WHERE outgoing = 0 AND status = ? AND peer = ?", (SHOWN, HELD, peer))
            return held

        return self._transact(work)

    def conversation(self, peer: str, limit: int) -> Deferred[list[Entry]]:
        """The last C{limit} messages exchanged with C{peer}, oldest first."""

        def work(db: sqlite3.Connection) -> list[Entry]:
            latest = _entries(db, "peer = ?", [peer], "id DESC", limit)
            return latest[::-1]

        return self._transact(work)


def _entries(db: sqlite3.Connection, where: str, args: list[Any], order: str, limit: int = -1) -> list[Entry]:
    rows = db.execute(f"SELECT {_ENTRY_COLUMNS} FROM messages WHERE {where} ORDER BY {order} LIMIT ?", (*args, limit))
    return [_entry(r) for r in rows]


_ENTRY_COLUMNS = "peer, outgoing, msg_id, text, private, status, sent_at, stored_at"


def _entry(row: Any) -> Entry:
    """An L{Entry} from the columns L{_ENTRY_COLUMNS} of a row of messages."""
    return Entry(row[0], bool(row[1]), row[2], row[3], bool(row[4]), row[5], row[6], row[7])


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error (the connection is in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
