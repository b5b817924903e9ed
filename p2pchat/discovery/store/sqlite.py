"""The discovery server's store on one SQLite file, run by one writer thread with group commit."""

from __future__ import annotations

import json
import math
import queue
import sqlite3
import threading
from functools import partial
from itertools import chain, groupby
from operator import itemgetter
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .base import (
    Account,
    Snapshot,
    StoredEnvelope,
    StoreError,
    UnknownAccount,
    UsernameTaken,
)

log = Logger()

# Most queued operations run in one transaction: one commit (one sync with synchronous=full) for them all.
MAX_BATCH = 512

SYNCHRONOUS = ("normal", "full")

# Rows of login history kept per user: only the newest logout is read (last seen), the rest is for
# people looking at the file.
LOGIN_HISTORY = 10

# MIGRATIONS[n] takes a database from schema version n to n + 1. Append only; never edit a released step.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE accounts (
            username TEXT PRIMARY KEY,
            password_hash TEXT,
            fingerprint TEXT,
            envelope_key TEXT,
            created_at REAL NOT NULL)""",
        """CREATE TABLE blocks (
            blocker TEXT NOT NULL,
            blocked TEXT NOT NULL,
            PRIMARY KEY (blocker, blocked)) WITHOUT ROWID""",
        """CREATE TABLE tokens (
            token_hash TEXT PRIMARY KEY,
            username TEXT NOT NULL,
            expires_at REAL NOT NULL)""",
        "CREATE INDEX tokens_by_username ON tokens (username)",
        """CREATE TABLE sessions (
            id INTEGER PRIMARY KEY,
            username TEXT NOT NULL,
            login_at REAL NOT NULL,
            logout_at REAL)""",
        # Serves both closing a user's open rows (NULLs sort first) and MAX(logout_at) per user.
        "CREATE INDEX sessions_by_username ON sessions (username, logout_at)",
        # AUTOINCREMENT so a seq is never handed out twice, even after the highest row is acked.
        """CREATE TABLE envelopes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            recipient TEXT NOT NULL,
            sender TEXT NOT NULL,
            msg_id TEXT NOT NULL,
            envelope TEXT NOT NULL,
            sent_at REAL NOT NULL,
            UNIQUE (recipient, sender, msg_id))""",
        "CREATE INDEX envelopes_by_recipient ON envelopes (recipient, seq)",
        # Kept by triggers so the mailbox limit costs one key lookup per put, never a COUNT(*),
        # and rolls back with the envelope row itself.
        """CREATE TABLE mailbox_counts (
            recipient TEXT PRIMARY KEY,
            n INTEGER NOT NULL) WITHOUT ROWID""",
        """CREATE TRIGGER envelopes_counted AFTER INSERT ON envelopes BEGIN
            INSERT INTO mailbox_counts (recipient, n) VALUES (NEW.recipient, 1)
                ON CONFLICT (recipient) DO UPDATE SET n = n + 1;
        END""",
        """CREATE TRIGGER envelopes_uncounted AFTER DELETE ON envelopes BEGIN
            UPDATE mailbox_counts SET n = n - 1 WHERE recipient = OLD.recipient;
        END""",
    ),
    # The directory counts mailboxes in memory (it holds envelopes for online users there too), so
    # the triggers were a write per put and per ack for nothing. seq now comes from the directory.
    (
        "DROP TRIGGER envelopes_counted",
        "DROP TRIGGER envelopes_uncounted",
        "DROP TABLE mailbox_counts",
    ),
    # Login history is cut to the newest 10 rows per user (LOGIN_HISTORY when this step was written);
    # it was one row per login, forever.
    (
        """DELETE FROM sessions WHERE id IN (
            SELECT id FROM (
                SELECT id, row_number() OVER (PARTITION BY username ORDER BY id DESC) AS newer FROM sessions)
            WHERE newer > 10)""",
    ),
    # The identity key's signature of the envelope key, so that peers need not take the server's
    # word for the envelope key.
    ("ALTER TABLE accounts ADD COLUMN key_signature TEXT",),
]

SCHEMA_VERSION = len(MIGRATIONS)

# What takes an operation's outcome in the reactor thread: its result, or the Failure that stopped it.
Then = Callable[[Any], object]

# An operation for the writer thread: a function of the connection, its arguments, and what takes
# its outcome (a Deferred's callback, which also takes a Failure).
_Op = tuple[Callable[..., Any], tuple[Any, ...], Then]


class SQLiteStore:
    """
    Persistence on a SQLite file in WAL mode.

    Every method queues an operation for the writer thread and returns a Deferred fired in the
    reactor thread once the operation's transaction has committed (L{put_envelope_then} calls a
    function instead). The thread runs all the operations queued so far in one transaction, each
    inside its own SAVEPOINT (but those of one statement, see L{_ONE_STATEMENT}, and puts, see
    L{_put_envelopes}) so that one failing operation is undone alone.

    Puts are handed to the writer thread together, once per turn of the reactor (or before the
    next other operation, so that operations still run in the order they were asked for), so
    that the thread, woken by the first put of a turn, does not start a transaction with it alone.

    @ivar commits: how many transactions the writer thread has committed (for tests and benchmarks).
    """

    def __init__(self, path: str, reactor: Any, synchronous: str = "normal") -> None:
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, not {synchronous!r}")
        self._path = path
        self._reactor = reactor
        self._synchronous = synchronous
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self._ready = False
        self._stop_waiters: list[Deferred[None]] | None = None
        # Puts of this turn of the reactor, not handed to the writer thread yet, and what takes each outcome.
        self._puts: list[StoredEnvelope] = []
        self._put_thens: list[Then] = []
        self._hand_over_call = None
        self.commits = 0

    # Life cycle

    def start(self, now: float) -> Deferred[Snapshot]:
        """
        Open or create the file (its directory must exist), migrate it, close the login sessions a
        crash left open with C{now} as their logout time, drop expired tokens and load the snapshot.
        """
        if self._thread is not None:
            return fail(StoreError("the store is started already"))
        started: Deferred[Snapshot] = Deferred()
        self._thread = threading.Thread(
            target=self._run, args=(now, started), name=f"SQLiteStore {self._path}", daemon=True
        )
        self._thread.start()
        return started

    def stop(self) -> Deferred[None]:
        """Finish every operation queued so far, close the file and end the writer thread."""
        if self._thread is None:
            return succeed(None)
        if self._stop_waiters is None:
            self._hand_over_puts()
            self._ready = False
            self._stop_waiters = []
            self._queue.put(None)
        stopped: Deferred[None] = Deferred()
        self._stop_waiters.append(stopped)
        return stopped

    # Accounts

    def create_account(self, account: Account) -> Deferred[None]:
        """Store a new account; L{UsernameTaken} if its username exists."""
        return self._submit(_create_account, account)

    def set_password_hash(self, username: str, password_hash: str) -> Deferred[None]:
        """Replace an account's password hash; L{UnknownAccount} if there is no such account."""
        return self._submit(_set_password_hash, username, password_hash)

    def set_keys(
        self, username: str, fingerprint: str, envelope_key: str, key_signature: str | None = None
    ) -> Deferred[None]:
        """Bind an account to an identity fingerprint and envelope key (and the identity key's
        signature of the envelope key); L{UnknownAccount} if there is no such account."""
        return self._submit(_set_keys, username, fingerprint, envelope_key, key_signature)

    def add_token(self, username: str, token_hash: str, expires_at: float, keep: int = 5) -> Deferred[None]:
        """Store a session token, then keep only the newest C{keep} tokens of that user."""
        return self._submit(_add_token, username, token_hash, expires_at, keep)

    # Blocks and presence

    def add_block(self, blocker: str, blocked: str) -> Deferred[None]:
        """Record that C{blocker} blocks C{blocked}; recording it twice changes nothing."""
        return self._submit(_add_block, blocker, blocked)

    def remove_block(self, blocker: str, blocked: str) -> Deferred[None]:
        return self._submit(_remove_block, blocker, blocked)

    def record_login(self, username: str, at: float) -> Deferred[None]:
        """Open a row of login history, then keep only the user's newest L{LOGIN_HISTORY} rows."""
        return self._submit(_record_login, username, at)

    def record_logout(self, username: str, at: float) -> Deferred[None]:
        """Close the user's open rows of login history."""
        return self._submit(_record_logout, username, at)

    # Mailboxes

    def put_envelope(self, envelope: StoredEnvelope) -> Deferred[tuple[int, bool]]:
        """
        Store an envelope under its own seq (which must be above every seq stored so far); fire with
        C{(seq, duplicate)}. While an envelope with the same recipient, sender and msg_id is stored,
        store nothing and fire with that one's seq and C{True}.
        """
        stored: Deferred[tuple[int, bool]] = Deferred()
        self.put_envelope_then(envelope, stored.callback)
        return stored

    def put_envelope_then(self, envelope: StoredEnvelope, then: Then) -> None:
        """
        L{put_envelope} for the send path: call C{then} in the reactor thread with the outcome,
        C{(seq, duplicate)} or the L{Failure}, and make no Deferred (a Deferred and its callbacks
        per put took about a fifth of the reactor thread's CPU while a backlog was stored).
        """
        if not self._running(then):
            return
        if not self._puts:
            self._hand_over_call = self._reactor.callLater(0, self._hand_over_puts)
        self._puts.append(envelope)
        self._put_thens.append(then)

    def stored_seq(self, recipient: str, sender: str, msg_id: str) -> Deferred[int | None]:
        """The seq of the stored envelope with that recipient, sender and msg_id, or C{None}."""
        return self._submit(_stored_seq, recipient, sender, msg_id)

    def fetch_envelopes(
        self, recipient: str, after_seq: int, limit: int, max_bytes: float = math.inf
    ) -> Deferred[list[StoredEnvelope]]:
        """
        At most C{limit} of the recipient's envelopes with a seq above C{after_seq}, oldest first;
        no more once their envelopes add up to C{max_bytes} characters.
        """
        return self._submit(_fetch_envelopes, recipient, after_seq, limit, max_bytes)

    def ack_envelopes(self, recipient: str, seqs: list[int]) -> Deferred[int]:
        """Delete the recipient's own envelopes among C{seqs}; fire with how many went."""
        return self._submit(_ack_envelopes, recipient, list(seqs))

    # Reactor thread side

    def _submit(self, operation: Callable[..., Any], *args: Any) -> Deferred[Any]:
        result: Deferred[Any] = Deferred()
        self._enqueue(operation, args, result.callback)
        return result

    def _enqueue(self, operation: Callable[..., Any], args: tuple[Any, ...], then: Then) -> None:
        if self._running(then):
            self._hand_over_puts()
            self._queue.put((operation, args, then))

    def _running(self, then: Then) -> bool:
        """Whether the store takes operations; if not, C{then} has the L{StoreError} at once."""
        if not self._ready:
            then(Failure(StoreError("the store is not running")))
        return self._ready

    def _hand_over_puts(self) -> None:
        """Queue the puts of this turn as one operation, whose outcome is the list of theirs."""
        if not self._puts:
            return
        if self._hand_over_call.active():
            self._hand_over_call.cancel()
        self._hand_over_call = None
        envelopes, thens = self._puts, self._put_thens
        self._puts, self._put_thens = [], []
        self._queue.put((_put_envelopes, (envelopes,), partial(self._deliver, thens)))

    def _started(self, outcome: Snapshot | Failure, started: Deferred[Snapshot]) -> None:
        if isinstance(outcome, Failure):
            self._ended(None)
            started.errback(outcome)
        elif self._stop_waiters is not None:
            started.errback(StoreError("the store was stopped while it started"))
        else:
            self._ready = True
            log.info("store {path} open, schema version {version}", path=self._path, version=SCHEMA_VERSION)
            started.callback(outcome)

    @staticmethod
    def _deliver(thens: list[Then], outcomes: list[Any] | Failure) -> None:
        if isinstance(outcomes, Failure):  # the transaction failed: so did each of them
            outcomes = [outcomes] * len(thens)
        for then, outcome in zip(thens, outcomes):
            try:
                then(outcome)
            except Exception:  # noqa: BLE001 - one taker's bug must not keep the others from theirs
                log.failure("handling the outcome of a store operation")

    def _ended(self, outcome: Failure | None) -> None:
        # The thread's last act was to schedule this call, so joining it here returns at once.
        self._thread.join()
        self._thread = None
        self._queue = queue.SimpleQueue()  # drops a stop request that a failed start never read
        waiters, self._stop_waiters = self._stop_waiters or [], None
        for stopped in waiters:
            if outcome is None:
                stopped.callback(None)
            else:
                stopped.errback(outcome)

    # Writer thread side

    def _run(self, now: float, started: Deferred[Snapshot]) -> None:
        try:
            try:
                snapshot = self._open(now)
            except sqlite3.Error as e:
                # "file is not a database", "unable to open database file"...: say which file.
                raise StoreError(f"{self._path}: {e}") from e
        except BaseException:
            failure = Failure()
            self._close()
            self._reactor.callFromThread(self._started, failure, started)
            return
        self._reactor.callFromThread(self._started, snapshot, started)
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH and batch[-1] is not None:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = batch[-1] is None
            if stopping:
                batch.pop()
            if batch:
                outcomes = self._run_batch(batch)
                self._reactor.callFromThread(self._deliver, [op[2] for op in batch], outcomes)
            if stopping:
                try:
                    self._close()
                except BaseException:
                    self._reactor.callFromThread(self._ended, Failure())
                else:
                    self._reactor.callFromThread(self._ended, None)
                return

    def _open(self, now: float) -> Snapshot:
        # Autocommit mode: this class writes every BEGIN, SAVEPOINT and COMMIT itself.
        self._db = db = sqlite3.connect(self._path, isolation_level=None)
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"{self._path}: SQLite refused WAL mode (journal mode is {mode!r})")
        db.execute(f"PRAGMA synchronous = {self._synchronous.upper()}")
        # A multi-row INSERT keeps a statement journal, to undo that statement alone; past 64 KiB
        # it went to a temporary file, created and deleted once per transaction of puts, and its
        # writes were two thirds of the writer's write calls.
        db.execute("PRAGMA temp_store = MEMORY")
        try:
            db.execute("SELECT value FROM json_each('[]')")
        except sqlite3.OperationalError:
            raise StoreError(
                f"this SQLite ({sqlite3.sqlite_version}) has no JSON functions, which the store needs"
            ) from None
        db.execute("BEGIN IMMEDIATE")
        try:
            _migrate(db, self._path)
            db.execute("UPDATE sessions SET logout_at = ? WHERE logout_at IS NULL", (now,))
            db.execute("DELETE FROM tokens WHERE expires_at <= ?", (now,))
            snapshot = _load_snapshot(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return snapshot

    def _run_batch(self, batch: list[_Op]) -> list[Any]:
        db = self._db
        outcomes: list[Any] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for operation, ops in groupby(batch, key=itemgetter(0)):
                if operation is _put_envelopes:
                    # Runs of puts queued one after the other are stored together.
                    runs = [args[0] for _, args, _ in ops]
                    stored = _put_envelopes(db, list(chain.from_iterable(runs)))
                    at = 0
                    for run in runs:
                        outcomes.append(stored[at:at + len(run)])
                        at += len(run)
                    continue
                savepoint = operation not in _ONE_STATEMENT
                for _, args, _ in ops:
                    if savepoint:
                        db.execute("SAVEPOINT op")
                    try:
                        outcomes.append(operation(db, *args))
                    except Exception:
                        if not db.in_transaction:
                            raise  # SQLite rolled the transaction back itself
                        outcomes.append(Failure())
                        if savepoint:
                            db.execute("ROLLBACK TO op")
                    if savepoint:
                        db.execute("RELEASE op")
            db.execute("COMMIT")
        except Exception:
            # The transaction itself failed (disk full, I/O error...): nothing of the batch is stored.
            failure = Failure()
            if db.in_transaction:
                db.execute("ROLLBACK")
            return [failure] * len(batch)
        self.commits += 1
        return outcomes

    def _close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()


def _migrate(db: sqlite3.Connection, path: str) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = db.execute("SELECT version FROM schema_version").fetchone()
    version = 0 if row is None else row[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {version}, newer than the {SCHEMA_VERSION} this p2pchat"
            " understands: run a newer p2pchat on it"
        )
    for step in MIGRATIONS[version:]:
        for statement in step:
            db.execute(statement)
    if row is None:
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    else:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))


def _load_snapshot(db: sqlite3.Connection) -> Snapshot:
    return Snapshot(
        accounts={
            row[0]: Account(*row)
            for row in db.execute(
                "SELECT username, password_hash, fingerprint, envelope_key, created_at, key_signature FROM accounts"
            )
        },
        blocks={(blocker, blocked) for blocker, blocked in db.execute("SELECT blocker, blocked FROM blocks")},
        tokens={
            token_hash: (username, expires_at)
            for token_hash, username, expires_at in db.execute(
                "SELECT token_hash, username, expires_at FROM tokens"
            )
        },
        last_seen=dict(db.execute("SELECT username, MAX(logout_at) FROM sessions GROUP BY username")),
        mailbox_counts=dict(db.execute("SELECT recipient, COUNT(*) FROM envelopes GROUP BY recipient")),
        # AUTOINCREMENT's record of the highest seq ever put, acked or not.
        last_seq=(db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'envelopes'").fetchone() or (0,))[0],
    )


# The operations below run in the writer thread, inside the batch's transaction and their own savepoint.


def _create_account(db: sqlite3.Connection, account: Account) -> None:
    inserted = db.execute(
        "INSERT INTO accounts (username, password_hash, fingerprint, envelope_key, created_at, key_signature)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (username) DO NOTHING",
        (account.username, account.password_hash, account.fingerprint, account.envelope_key, account.created_at,
         account.key_signature),
    ).rowcount
    if not inserted:
        raise UsernameTaken(account.username)


def _set_password_hash(db: sqlite3.Connection, username: str, password_hash: str) -> None:
    if not db.execute("UPDATE accounts SET password_hash = ? WHERE username = ?", (password_hash, username)).rowcount:
        raise UnknownAccount(username)


def _set_keys(
    db: sqlite3.Connection, username: str, fingerprint: str, envelope_key: str, key_signature: str | None
) -> None:
    updated = db.execute(
        "UPDATE accounts SET fingerprint = ?, envelope_key = ?, key_signature = ? WHERE username = ?",
        (fingerprint, envelope_key, key_signature, username),
    ).rowcount
    if not updated:
        raise UnknownAccount(username)


def _add_token(db: sqlite3.Connection, username: str, token_hash: str, expires_at: float, keep: int) -> None:
    db.execute(
        "INSERT INTO tokens (token_hash, username, expires_at) VALUES (?, ?, ?)", (token_hash, username, expires_at)
    )
    _keep_newest(db, "tokens", username, keep)


def _keep_newest(db: sqlite3.Connection, table: str, username: str, keep: int) -> None:
    """Delete the user's rows of C{table} but the newest C{keep}."""
    # rowid order is insertion order here: a new row always gets a rowid above the user's others,
    # because the newest row is never the one deleted.
    db.execute(
        f"DELETE FROM {table} WHERE username = ? AND rowid NOT IN"
        f" (SELECT rowid FROM {table} WHERE username = ? ORDER BY rowid DESC LIMIT ?)",
        (username, username, keep),
    )


def _add_block(db: sqlite3.Connection, blocker: str, blocked: str) -> None:
    db.execute("INSERT INTO blocks (blocker, blocked) VALUES (?, ?) ON CONFLICT DO NOTHING", (blocker, blocked))


def _remove_block(db: sqlite3.Connection, blocker: str, blocked: str) -> None:
    db.execute("DELETE FROM blocks WHERE blocker = ? AND blocked = ?", (blocker, blocked))


def _record_login(db: sqlite3.Connection, username: str, at: float) -> None:
    db.execute("INSERT INTO sessions (username, login_at) VALUES (?, ?)", (username, at))
    _keep_newest(db, "sessions", username, LOGIN_HISTORY)


def _record_logout(db: sqlite3.Connection, username: str, at: float) -> None:
    db.execute("UPDATE sessions SET logout_at = ? WHERE username = ? AND logout_at IS NULL", (at, username))


# Rows per INSERT when a run of queued puts is stored: a few fixed sizes, so that a handful of
# prepared statements serve every run; 128 rows bind 768 values, within the 999 that SQLite
# allows even where it was built with its old default.
_PUT_ROWS = (128, 32, 8, 2, 1)
_INSERT_ROWS = {
    rows: "INSERT INTO envelopes (seq, recipient, sender, msg_id, envelope, sent_at) VALUES "
    + ", ".join(["(?, ?, ?, ?, ?, ?)"] * rows)
    + " ON CONFLICT (recipient, sender, msg_id) DO NOTHING"
    for rows in _PUT_ROWS
}


def _put_envelopes(
    db: sqlite3.Connection, envelopes: list[StoredEnvelope], sizes: tuple[int, ...] = _PUT_ROWS
) -> list[tuple[int, bool] | Failure]:
    """
    Store consecutive puts with one INSERT per up to 128 of them; the outcome of each, in order.

    The writer thread lets go of the GIL around every statement it steps, and gets it back only
    when the reactor thread lets go too: one statement per envelope made a backlog's writer wait
    on the reactor thread once per envelope. An INSERT that fails is undone whole by SQLite; its
    envelopes are then stored one by one, so that only the one at fault fails.
    """
    outcomes: list[tuple[int, bool] | Failure] = []
    at = 0
    for rows in sizes:
        while len(envelopes) - at >= rows:
            chunk = envelopes[at:at + rows]
            at += rows
            try:
                inserted = db.execute(_INSERT_ROWS[rows], tuple(chain.from_iterable(chunk))).rowcount
            except Exception:
                if not db.in_transaction:
                    raise  # SQLite rolled the transaction back itself
                if rows == 1:
                    outcomes.append(Failure())
                else:
                    outcomes.extend(_put_envelopes(db, chunk, (1,)))
                continue
            if inserted == rows:
                outcomes.extend((envelope.seq, False) for envelope in chunk)
            else:
                # Some were stored before (rare): each is answered with the seq stored under its key.
                for envelope in chunk:
                    seq = _stored_seq(db, envelope.recipient, envelope.sender, envelope.msg_id)
                    outcomes.append((seq, seq != envelope.seq))
    return outcomes


def _stored_seq(db: sqlite3.Connection, recipient: str, sender: str, msg_id: str) -> int | None:
    row = db.execute(
        "SELECT seq FROM envelopes WHERE recipient = ? AND sender = ? AND msg_id = ?", (recipient, sender, msg_id)
    ).fetchone()
    return None if row is None else row[0]


def _fetch_envelopes(
    db: sqlite3.Connection, recipient: str, after_seq: int, limit: int, max_bytes: float
) -> list[StoredEnvelope]:
    envelopes = []
    for row in db.execute(
        "SELECT seq, recipient, sender, msg_id, envelope, sent_at FROM envelopes"
        " WHERE recipient = ? AND seq > ? ORDER BY seq LIMIT ?",
        (recipient, after_seq, limit),
    ):
        envelopes.append(StoredEnvelope(*row))
        max_bytes -= len(row[4])
        if max_bytes <= 0:
            break
    return envelopes


def _ack_envelopes(db: sqlite3.Connection, recipient: str, seqs: list[int]) -> int:
    # One statement for the whole list: atomic without a savepoint, and one step instead of one per seq.
    return db.execute(
        "DELETE FROM envelopes WHERE recipient = ? AND seq IN (SELECT value FROM json_each(?))",
        (recipient, json.dumps(seqs)),
    ).rowcount


# Operations that write with one statement at most need no savepoint: SQLite undoes a failed
# statement by itself and leaves the transaction open. These are the mailbox's, run once per
# page or per ack on the busiest paths (puts have their own way, _put_envelopes).
_ONE_STATEMENT = frozenset({_stored_seq, _fetch_envelopes, _ack_envelopes})
