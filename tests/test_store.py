"""Tests for the discovery server's SQLite store, on real files and the real reactor."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.trial import unittest

import p2pchat
from p2pchat.discovery.store import (
    Account,
    Snapshot,
    SQLiteStore,
    StoredEnvelope,
    StoreError,
    UnknownAccount,
    UsernameTaken,
)
from p2pchat.discovery.store.sqlite import (
    LOGIN_HISTORY,
    MIGRATIONS,
    SCHEMA_VERSION,
    _put_envelopes,
)

FINGERPRINT = "ab" * 32
ENVELOPE_KEY = "K" * 43


def account(username: str, created_at: float = 1.0) -> Account:
    return Account(username, "scrypt$" + username, FINGERPRINT, ENVELOPE_KEY, created_at)


def env(
    seq: int, recipient: str, sender: str, msg_id: str, envelope: str = "e", sent_at: float = 1.0
) -> StoredEnvelope:
    return StoredEnvelope(seq, recipient, sender, msg_id, envelope, sent_at)


class StoreTestCase(unittest.TestCase):
    def setUp(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.path = os.path.join(directory, "discovery.sqlite")

    async def start_store(self, now: float = 1000.0, synchronous: str = "normal") -> tuple[SQLiteStore, Snapshot]:
        store = SQLiteStore(self.path, reactor, synchronous)
        snapshot = await store.start(now)
        self.addCleanup(store.stop)
        return store, snapshot

    async def restart(self, store: SQLiteStore, now: float = 2000.0) -> tuple[SQLiteStore, Snapshot]:
        await store.stop()
        return await self.start_store(now)

    def query(self, sql: str) -> list[tuple]:
        """Read the file with a connection of the test's own."""
        db = sqlite3.connect(self.path)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()


class LifeCycleTests(StoreTestCase):
    async def test_new_file_in_wal_mode_with_schema_version(self) -> None:
        """start() creates the file in WAL mode, records the schema version and loads an empty snapshot."""
        store, snapshot = await self.start_store()
        self.assertEqual(snapshot, Snapshot({}, set(), {}, {}, {}, last_seq=0))
        self.assertEqual(self.query("PRAGMA journal_mode"), [("wal",)])
        self.assertEqual(self.query("SELECT version FROM schema_version"), [(SCHEMA_VERSION,)])

    async def test_newer_schema_refused(self) -> None:
        """A file with a newer schema version than the code knows fails start() with a clear error and stays as it was."""
        store, _ = await self.start_store()
        await store.stop()
        db = sqlite3.connect(self.path)
        with db:
            db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
        db.close()
        newer = SQLiteStore(self.path, reactor)
        error = await self.assertFailure(newer.start(1000.0), StoreError)
        self.assertIn(f"schema version {SCHEMA_VERSION + 1}, newer than the {SCHEMA_VERSION}", str(error))
        self.assertEqual(self.query("SELECT version FROM schema_version"), [(SCHEMA_VERSION + 1,)])
        await newer.stop()

    async def test_migrates_version_1(self) -> None:
        """
        A file of schema version 1 is brought to the current version: the mailbox_counts table and its
        triggers are gone, its envelopes are fetched and counted, last_seq covers its highest seq even
        acked, and a resend of a stored one is still a duplicate.
        """
        db = sqlite3.connect(self.path)
        with db:
            db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            for statement in MIGRATIONS[0]:
                db.execute(statement)
            db.execute("INSERT INTO schema_version (version) VALUES (1)")
            # As version 1 stored them: seqs from AUTOINCREMENT, the highest one acked already.
            for msg_id in ("m1", "m2"):
                db.execute(
                    "INSERT INTO envelopes (recipient, sender, msg_id, envelope, sent_at) VALUES (?, ?, ?, ?, ?)",
                    ("bob", "alice", msg_id, "sealed", 5.0),
                )
            db.execute("DELETE FROM envelopes WHERE seq = 2")
        db.close()
        self.assertEqual(self.query("SELECT recipient, n FROM mailbox_counts"), [("bob", 1)])

        store, snapshot = await self.start_store()
        self.assertEqual(self.query("SELECT version FROM schema_version"), [(SCHEMA_VERSION,)])
        self.assertEqual(
            self.query("SELECT type, name FROM sqlite_master WHERE name = 'mailbox_counts' OR type = 'trigger'"),
            [],
        )
        self.assertEqual((snapshot.mailbox_counts, snapshot.last_seq), ({"bob": 1}, 2))
        self.assertEqual(await store.fetch_envelopes("bob", 0, 10), [env(1, "bob", "alice", "m1", "sealed", 5.0)])
        self.assertEqual(await store.put_envelope(env(3, "bob", "alice", "m1")), (1, True))
        self.assertEqual(await store.put_envelope(env(3, "bob", "alice", "m3")), (3, False))

    async def test_migration_cuts_login_history(self) -> None:
        """
        A file of schema version 2 with an unbounded login history keeps each user's newest
        LOGIN_HISTORY rows, and last_seen is still each user's latest logout.
        """
        db = sqlite3.connect(self.path)
        with db:
            db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            for step in MIGRATIONS[:2]:
                for statement in step:
                    db.execute(statement)
            db.execute("INSERT INTO schema_version (version) VALUES (2)")
            for i in range(30):
                db.execute("INSERT INTO sessions (username, login_at, logout_at) VALUES ('alice', ?, ?)", (i, i + 0.5))
                if i < 3:
                    db.execute("INSERT INTO sessions (username, login_at, logout_at) VALUES ('bob', ?, ?)", (i, i + 0.5))
        db.close()

        _, snapshot = await self.start_store()
        self.assertEqual(
            self.query("SELECT username, COUNT(*), MIN(login_at) FROM sessions GROUP BY username ORDER BY username"),
            [("alice", LOGIN_HISTORY, 30 - LOGIN_HISTORY), ("bob", 3, 0)],
        )
        self.assertEqual(snapshot.last_seen, {"alice": 29.5, "bob": 2.5})

    async def test_missing_directory_fails_start(self) -> None:
        """start() does not create directories: a path in a missing directory fails, naming it."""
        path = os.path.join(self.mktemp(), "discovery.sqlite")
        store = SQLiteStore(path, reactor)
        failure = await self.assertFailure(store.start(1000.0), StoreError)
        self.assertEqual(str(failure), f"{path}: unable to open database file")
        await store.stop()

    async def test_not_a_database_fails_start(self) -> None:
        """A file that is not an SQLite database fails start() with a sentence naming it, and is left
        as it was."""
        garbage = b"not a database, " * 512
        with open(self.path, "wb") as f:
            f.write(garbage)
        store = SQLiteStore(self.path, reactor)
        failure = await self.assertFailure(store.start(1000.0), StoreError)
        self.assertEqual(str(failure), f"{self.path}: file is not a database")
        await store.stop()
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), garbage)

    def test_synchronous_checked(self) -> None:
        """Only "normal" and "full" are accepted for synchronous."""
        self.assertRaises(ValueError, SQLiteStore, self.path, reactor, "off")

    async def test_synchronous_full(self) -> None:
        """A store with synchronous="full" works like the default."""
        store, _ = await self.start_store(synchronous="full")
        self.assertEqual(await store.put_envelope(env(1, "bob", "alice", "m1")), (1, False))

    async def test_refused_when_not_running(self) -> None:
        """Operations before start() and after stop() fail with StoreError instead of waiting forever."""
        store = SQLiteStore(self.path, reactor)
        await self.assertFailure(store.fetch_envelopes("bob", 0, 10), StoreError)
        await store.start(1000.0)
        await store.stop()
        await self.assertFailure(store.fetch_envelopes("bob", 0, 10), StoreError)

    async def test_stop_drains_queue(self) -> None:
        """stop() right after queueing operations lets every one of them complete and be stored."""
        store, _ = await self.start_store()
        puts = [store.put_envelope(env(i, "bob", "alice", f"m{i}")) for i in range(1, 101)]
        stopped = store.stop()
        await gatherResults(puts)
        await stopped
        _, snapshot = await self.start_store()
        self.assertEqual(snapshot.mailbox_counts, {"bob": 100})

    async def test_stop_while_starting(self) -> None:
        """stop() before start() has fired makes start() fail with StoreError and still ends the store."""
        store = SQLiteStore(self.path, reactor)
        started = store.start(1000.0)
        await store.stop()
        await self.assertFailure(started, StoreError)
        await self.assertFailure(store.fetch_envelopes("bob", 0, 10), StoreError)

    async def test_restart_same_object(self) -> None:
        """A stopped store can be started again and sees what it stored before."""
        store, _ = await self.start_store()
        await store.create_account(account("alice"))
        await store.stop()
        snapshot = await store.start(1000.0)
        self.assertEqual(list(snapshot.accounts), ["alice"])


class AccountTests(StoreTestCase):
    async def test_create_account_persists(self) -> None:
        """A created account is in the snapshot of the next start, field for field."""
        store, _ = await self.start_store()
        alice = account("alice", created_at=12.5)
        await store.create_account(alice)
        await store.create_account(Account("bob", None, None, None, 13.0))
        _, snapshot = await self.restart(store)
        self.assertEqual(snapshot.accounts, {"alice": alice, "bob": Account("bob", None, None, None, 13.0)})

    async def test_username_taken(self) -> None:
        """Creating an existing username fails with UsernameTaken and keeps the first account; case matters."""
        store, _ = await self.start_store()
        await store.create_account(account("alice", created_at=1.0))
        await self.assertFailure(store.create_account(account("alice", created_at=2.0)), UsernameTaken)
        await store.create_account(account("Alice"))
        _, snapshot = await self.restart(store)
        self.assertEqual(snapshot.accounts["alice"].created_at, 1.0)
        self.assertEqual(sorted(snapshot.accounts), ["Alice", "alice"])

    async def test_set_password_hash_and_keys(self) -> None:
        """set_password_hash and set_keys change the stored account."""
        store, _ = await self.start_store()
        await store.create_account(Account("alice", None, None, None, 1.0))
        await store.set_password_hash("alice", "scrypt$new")
        await store.set_keys("alice", "cd" * 32, "Z" * 43)
        await store.create_account(Account("bob", None, "ab" * 32, "Y" * 43, 2.0, "signed"))
        store, snapshot = await self.restart(store)
        self.assertEqual(snapshot.accounts["alice"], Account("alice", "scrypt$new", "cd" * 32, "Z" * 43, 1.0))
        self.assertEqual(snapshot.accounts["bob"].key_signature, "signed")
        await store.set_keys("alice", "cd" * 32, "Z" * 43, "signed too")
        await store.set_keys("bob", "ab" * 32, "X" * 43)  # an older peer's new keys come unsigned
        _, snapshot = await self.restart(store)
        self.assertEqual(snapshot.accounts["alice"].key_signature, "signed too")
        self.assertEqual((snapshot.accounts["bob"].envelope_key, snapshot.accounts["bob"].key_signature), ("X" * 43, None))

    async def test_unknown_account(self) -> None:
        """set_password_hash and set_keys on a missing account fail with UnknownAccount and create nothing."""
        store, _ = await self.start_store()
        await self.assertFailure(store.set_password_hash("zed", "scrypt$x"), UnknownAccount)
        await self.assertFailure(store.set_keys("zed", FINGERPRINT, ENVELOPE_KEY), UnknownAccount)
        _, snapshot = await self.restart(store)
        self.assertEqual(snapshot.accounts, {})

    def test_password_hash_not_in_repr(self) -> None:
        """An account's repr, which may end up in a log, leaves the password hash out."""
        self.assertNotIn("scrypt$alice", repr(account("alice")))


class TokenTests(StoreTestCase):
    async def test_keeps_newest_tokens(self) -> None:
        """add_token keeps only the newest `keep` tokens of that user and leaves other users' alone."""
        store, _ = await self.start_store()
        await store.add_token("bob", "bob-token", 5000.0)
        for i in range(7):
            await store.add_token("alice", f"t{i}", 5000.0 - i, keep=3)
        _, snapshot = await self.restart(store)
        self.assertEqual(
            snapshot.tokens,
            {
                "t4": ("alice", 4996.0),
                "t5": ("alice", 4995.0),
                "t6": ("alice", 4994.0),
                "bob-token": ("bob", 5000.0),
            },
        )

    async def test_expired_tokens_dropped_at_start(self) -> None:
        """Tokens expired at start time are neither in the snapshot nor in the file."""
        store, _ = await self.start_store()
        await store.add_token("alice", "old", 1500.0)
        await store.add_token("alice", "fresh", 2500.0)
        _, snapshot = await self.restart(store, now=2000.0)
        self.assertEqual(snapshot.tokens, {"fresh": ("alice", 2500.0)})
        self.assertEqual(self.query("SELECT token_hash FROM tokens"), [("fresh",)])


class BlockTests(StoreTestCase):
    async def test_add_remove_blocks(self) -> None:
        """Blocks persist, adding one twice is harmless, and removing one removes only it."""
        store, _ = await self.start_store()
        await store.add_block("alice", "bob")
        await store.add_block("alice", "bob")
        await store.add_block("alice", "carol")
        await store.add_block("bob", "alice")
        await store.remove_block("alice", "carol")
        await store.remove_block("carol", "alice")
        _, snapshot = await self.restart(store)
        self.assertEqual(snapshot.blocks, {("alice", "bob"), ("bob", "alice")})


class PresenceTests(StoreTestCase):
    async def test_last_seen_is_last_logout(self) -> None:
        """last_seen holds each user's latest logout; a logout closes every open row of that user."""
        store, _ = await self.start_store()
        await store.record_login("alice", 100.0)
        await store.record_logout("alice", 150.0)
        await store.record_login("alice", 200.0)
        await store.record_login("alice", 210.0)
        await store.record_logout("alice", 300.0)
        await store.record_login("bob", 120.0)
        await store.record_logout("bob", 130.0)
        _, snapshot = await self.restart(store, now=1000.0)
        self.assertEqual(snapshot.last_seen, {"alice": 300.0, "bob": 130.0})

    async def test_login_history_is_bounded(self) -> None:
        """A login keeps the user's newest LOGIN_HISTORY rows of history, the open one among them; others' rows stay."""
        store, _ = await self.start_store()
        await store.record_login("bob", 1.0)
        for i in range(LOGIN_HISTORY + 5):
            await store.record_login("alice", 10.0 + i)
            await store.record_logout("alice", 10.5 + i)
        await store.record_login("alice", 100.0)
        self.assertEqual(
            self.query("SELECT login_at, logout_at FROM sessions WHERE username = 'alice' ORDER BY id")[-2:],
            [(10.0 + LOGIN_HISTORY + 4, 10.5 + LOGIN_HISTORY + 4), (100.0, None)],
        )
        self.assertEqual(
            self.query("SELECT username, COUNT(*) FROM sessions GROUP BY username ORDER BY username"),
            [("alice", LOGIN_HISTORY), ("bob", 1)],
        )
        _, snapshot = await self.restart(store, now=200.0)
        self.assertEqual(snapshot.last_seen, {"alice": 200.0, "bob": 200.0})

    async def test_kill_closes_open_sessions_at_next_start(self) -> None:
        """
        After a kill -9, a session left open gets last_seen = the next start's time, and an envelope
        whose put had been confirmed is still stored.
        """
        child = (
            "import os, signal, sys\n"
            "from twisted.internet import reactor\n"
            "from twisted.internet.defer import Deferred\n"
            "from p2pchat.discovery.store import SQLiteStore, StoredEnvelope\n"
            "async def main():\n"
            "    store = SQLiteStore(sys.argv[1], reactor)\n"
            "    await store.start(100.0)\n"
            "    await store.record_login('alice', 110.0)\n"
            "    await store.record_login('bob', 111.0)\n"
            "    await store.record_logout('bob', 112.0)\n"
            "    await store.put_envelope(StoredEnvelope(1, 'alice', 'bob', 'm1', 'sealed', 120.0))\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "Deferred.fromCoroutine(main()).addErrback(lambda f: (f.printTraceback(), os._exit(3)))\n"
            "reactor.run()\n"
        )
        ended: Deferred[object] = Deferred()
        stderr: list[bytes] = []

        class Child(ProcessProtocol):
            def errReceived(self, data: bytes) -> None:
                stderr.append(data)

            def processEnded(self, reason) -> None:
                ended.callback(reason.value)

        root = os.path.dirname(os.path.dirname(os.path.abspath(p2pchat.__file__)))
        env = dict(os.environ, PYTHONPATH=root)
        reactor.spawnProcess(Child(), sys.executable, [sys.executable, "-c", child, self.path], env=env)
        ended.addTimeout(60, reactor)
        reason = await ended
        self.assertIsInstance(reason, ProcessTerminated, b"".join(stderr))
        self.assertEqual(reason.signal, signal.SIGKILL, b"".join(stderr))

        store, snapshot = await self.start_store(now=500.0)
        self.assertEqual(snapshot.last_seen, {"alice": 500.0, "bob": 112.0})
        self.assertEqual(snapshot.mailbox_counts, {"alice": 1})
        self.assertEqual(
            await store.fetch_envelopes("alice", 0, 10), [StoredEnvelope(1, "alice", "bob", "m1", "sealed", 120.0)]
        )


class MailboxTests(StoreTestCase):
    async def test_put_fetch_ack(self) -> None:
        """
        Envelopes are stored under the seq they are put with, come back oldest first after a seq, and an
        ack removes exactly the acked ones.
        """
        store, _ = await self.start_store()
        self.assertEqual(await store.put_envelope(env(10, "bob", "alice", "m1", "e1", 10.0)), (10, False))
        self.assertEqual(await store.put_envelope(env(20, "bob", "carol", "m1", "e2", 11.0)), (20, False))
        self.assertEqual(await store.put_envelope(env(30, "bob", "alice", "m2", "e3", 12.0)), (30, False))
        self.assertEqual(
            await store.fetch_envelopes("bob", 0, 10),
            [
                StoredEnvelope(10, "bob", "alice", "m1", "e1", 10.0),
                StoredEnvelope(20, "bob", "carol", "m1", "e2", 11.0),
                StoredEnvelope(30, "bob", "alice", "m2", "e3", 12.0),
            ],
        )
        self.assertEqual([e.seq for e in await store.fetch_envelopes("bob", 10, 1)], [20])
        self.assertEqual(await store.ack_envelopes("bob", [10, 30, 30, 99]), 2)
        self.assertEqual(await store.ack_envelopes("bob", []), 0)
        self.assertEqual([e.seq for e in await store.fetch_envelopes("bob", 0, 10)], [20])
        self.assertEqual(await store.fetch_envelopes("nobody", 0, 10), [])

    async def test_fetch_by_size(self) -> None:
        """With a byte budget, a fetch stops at the envelope that reaches it (always at least one)."""
        store, _ = await self.start_store()
        for seq in range(1, 6):
            await store.put_envelope(env(seq, "bob", "alice", f"m{seq}", "x" * 100 * seq))
        self.assertEqual([e.seq for e in await store.fetch_envelopes("bob", 0, 10, 300)], [1, 2])
        self.assertEqual([e.seq for e in await store.fetch_envelopes("bob", 0, 10, 301)], [1, 2, 3])
        self.assertEqual([e.seq for e in await store.fetch_envelopes("bob", 3, 10, 1)], [4])
        self.assertEqual([e.seq for e in await store.fetch_envelopes("bob", 0, 2, 10_000)], [1, 2])

    async def test_duplicate_stored_once(self) -> None:
        """A second put of a stored (recipient, sender, msg_id) answers the first seq and stores nothing; after the ack it is new again."""
        store, _ = await self.start_store()
        self.assertEqual(await store.put_envelope(env(1, "bob", "alice", "m1", "first")), (1, False))
        self.assertEqual(await store.put_envelope(env(2, "bob", "alice", "m1", "second")), (1, True))
        self.assertEqual(await store.put_envelope(env(3, "carol", "alice", "m1", "other")), (3, False))
        self.assertEqual(await store.fetch_envelopes("bob", 0, 10), [env(1, "bob", "alice", "m1", "first")])
        await store.ack_envelopes("bob", [1])
        self.assertEqual(await store.put_envelope(env(4, "bob", "alice", "m1", "again")), (4, False))

    async def test_stored_seq(self) -> None:
        """stored_seq finds a stored envelope by (recipient, sender, msg_id); None for any other and once it is acked."""
        store, _ = await self.start_store()
        await store.put_envelope(env(5, "bob", "alice", "m1"))
        await store.put_envelope(env(6, "bob", "carol", "m1"))
        self.assertEqual(await store.stored_seq("bob", "alice", "m1"), 5)
        self.assertEqual(await store.stored_seq("bob", "carol", "m1"), 6)
        self.assertIsNone(await store.stored_seq("bob", "alice", "m2"))
        self.assertIsNone(await store.stored_seq("alice", "bob", "m1"))
        self.assertIsNone(await store.stored_seq("carol", "alice", "m1"))
        await store.ack_envelopes("bob", [5])
        self.assertIsNone(await store.stored_seq("bob", "alice", "m1"))
        self.assertEqual(await store.stored_seq("bob", "carol", "m1"), 6)

    async def test_ack_only_own_rows(self) -> None:
        """Acking another recipient's seqs deletes nothing of theirs."""
        store, _ = await self.start_store()
        bob_seq, _ = await store.put_envelope(env(1, "bob", "alice", "m1"))
        carol_seq, _ = await store.put_envelope(env(2, "carol", "alice", "m1"))
        self.assertEqual(await store.ack_envelopes("carol", [bob_seq]), 0)
        self.assertEqual(await store.ack_envelopes("carol", [bob_seq, carol_seq]), 1)
        self.assertEqual(await store.fetch_envelopes("bob", 0, 10), [env(bob_seq, "bob", "alice", "m1")])
        self.assertEqual(await store.fetch_envelopes("carol", 0, 10), [])

    async def test_mailbox_persists(self) -> None:
        """
        Envelopes survive a restart, and the snapshot counts each recipient's envelopes left after acks;
        an emptied mailbox is absent.
        """
        store, _ = await self.start_store()
        await store.put_envelope(env(1, "bob", "alice", "m1", "e1", 1.5))
        await store.put_envelope(env(2, "bob", "alice", "m2", "e2", 2.5))
        await store.put_envelope(env(3, "carol", "alice", "m1", "e3", 3.5))
        await store.put_envelope(env(4, "bob", "carol", "m1", "e4", 4.5))
        await store.put_envelope(env(5, "dave", "alice", "m1", "e5", 5.5))
        await store.ack_envelopes("carol", [3])
        await store.ack_envelopes("bob", [4])
        store, snapshot = await self.restart(store)
        self.assertEqual(snapshot.mailbox_counts, {"bob": 2, "dave": 1})
        self.assertEqual(
            await store.fetch_envelopes("bob", 0, 10),
            [StoredEnvelope(1, "bob", "alice", "m1", "e1", 1.5), StoredEnvelope(2, "bob", "alice", "m2", "e2", 2.5)],
        )

    async def test_last_seq_survives_acks(self) -> None:
        """last_seq is 0 for a new file and, after a restart, the highest seq ever stored, even once it is acked."""
        store, snapshot = await self.start_store()
        self.assertEqual(snapshot.last_seq, 0)
        await store.put_envelope(env(7, "bob", "alice", "m1"))
        await store.put_envelope(env(42, "bob", "alice", "m2"))
        await store.ack_envelopes("bob", [42])
        store, snapshot = await self.restart(store)
        self.assertEqual(snapshot.last_seq, 42)
        await store.ack_envelopes("bob", [7])
        store, snapshot = await self.restart(store)
        self.assertEqual((snapshot.mailbox_counts, snapshot.last_seq), ({}, 42))
        await store.put_envelope(env(43, "carol", "alice", "m1"))
        await store.ack_envelopes("carol", [43])
        _, snapshot = await self.restart(store)
        self.assertEqual((snapshot.mailbox_counts, snapshot.last_seq), ({}, 43))

    async def test_twenty_thousand_envelopes_paged(self) -> None:
        """20000 envelopes put without waiting come back page by page, in seq order, none missing or doubled."""
        store, _ = await self.start_store()
        puts = []
        seq = 0
        for i in range(20000):
            seq += 1
            puts.append(store.put_envelope(env(seq, "bob", "alice", f"m{i}", f"envelope {i}", float(i))))
            if i % 20 == 0:
                seq += 1
                puts.append(store.put_envelope(env(seq, "carol", "alice", f"m{i}", "e", float(i))))
        await gatherResults(puts)
        fetched: list[StoredEnvelope] = []
        after = 0
        while page := await store.fetch_envelopes("bob", after, 256):
            fetched.extend(page)
            after = page[-1].seq
        self.assertEqual([e.msg_id for e in fetched], [f"m{i}" for i in range(20000)])
        seqs = [e.seq for e in fetched]
        self.assertTrue(all(a < b for a, b in zip(seqs, seqs[1:])))


class GroupCommitTests(StoreTestCase):
    async def test_batches_share_transactions(self) -> None:
        """1000 puts issued without waiting commit in far fewer than 1000 transactions, each answered with its own seq."""
        store, _ = await self.start_store()
        before = store.commits
        results = await gatherResults([store.put_envelope(env(i, "bob", "alice", f"m{i}")) for i in range(1, 1001)])
        self.assertEqual(results, [(i, False) for i in range(1, 1001)])
        self.assertLess(store.commits - before, 100)

    async def test_puts_of_one_turn_go_together(self) -> None:
        """
        The puts of one turn of the reactor reach the writer thread as one operation once the turn
        is over, so they share a transaction even when the thread is idle at the first of them.
        """
        store, _ = await self.start_store()
        before = store.commits
        puts = [store.put_envelope(env(i, "bob", "alice", f"m{i}")) for i in range(1, 51)]
        self.assertTrue(store._queue.empty())
        self.assertEqual(await gatherResults(puts), [(i, False) for i in range(1, 51)])
        self.assertEqual(store.commits - before, 1)

    async def test_operations_keep_their_order_after_puts(self) -> None:
        """An operation asked for after puts of the same turn runs after them: an ack finds what was just put."""
        store, _ = await self.start_store()
        puts = [store.put_envelope(env(i, "bob", "alice", f"m{i}")) for i in range(1, 4)]
        acked = store.ack_envelopes("bob", [1, 2, 3])
        later = store.put_envelope(env(4, "bob", "alice", "m4"))
        self.assertEqual(await acked, 3)
        self.assertEqual(await gatherResults([*puts, later]), [(i, False) for i in range(1, 5)])
        self.assertEqual(self.query("SELECT seq FROM envelopes"), [(4,)])

    async def test_statement_journal_in_memory(self) -> None:
        """
        The store keeps temporary data, such as the statement journal of a multi-row INSERT, in
        memory rather than in a temporary file made and deleted for each transaction of puts.
        """
        store, _ = await self.start_store()
        self.assertEqual(await store._submit(lambda db: db.execute("PRAGMA temp_store").fetchone()[0]), 2)

    async def test_put_envelope_then(self) -> None:
        """
        put_envelope_then calls its taker with the outcome, (seq, duplicate) or the Failure, in the
        reactor thread; a taker that raises is logged and keeps no other operation of its batch
        from its outcome. Before start() it is called at once with StoreError.
        """
        store = SQLiteStore(self.path, reactor)
        early: list = []
        store.put_envelope_then(env(1, "bob", "alice", "m1"), early.append)
        self.assertIsInstance(early[0].value, StoreError)
        store, _ = await self.start_store()
        outcomes: list = []
        threads: set = set()

        def broken(outcome):
            outcomes.append(outcome)
            threads.add(threading.current_thread())
            raise RuntimeError("a bug in the taker")

        store.put_envelope_then(env(1, "bob", "alice", "m1"), broken)
        store.put_envelope_then(env(2, "bob", "alice", "m1"), outcomes.append)
        store.put_envelope_then(env(1, "bob", "alice", "m2"), outcomes.append)
        after = store.fetch_envelopes("bob", 0, 10)
        self.assertEqual([e.msg_id for e in await after], ["m1"])
        self.assertEqual(outcomes[:2], [(1, False), (1, True)])
        outcomes[2].trap(sqlite3.IntegrityError)
        self.assertEqual(threads, {threading.main_thread()})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_failing_operation_undone_alone(self) -> None:
        """In one transaction, operations that fail are undone alone: the others around them are stored."""
        store, _ = await self.start_store()
        before = store.commits
        outcomes = await DeferredList(
            [
                store.create_account(account("alice")),
                store.create_account(account("alice")),
                store.put_envelope(env(1, "bob", "alice", "m1")),
                # A new envelope on a stored seq.
                store.put_envelope(env(1, "bob", "alice", "m2")),
                store.create_account(account("bob")),
                store.put_envelope(env(2, "carol", "alice", "m1")),
                # Stores the token, then fails on a count SQLite cannot hold: the token must be undone.
                store.add_token("bob", "t1", 5000.0, keep=2**64),
                store.ack_envelopes("carol", [2, 3]),
            ],
            consumeErrors=True,
        )
        self.assertEqual(store.commits - before, 1)
        self.assertEqual([ok for ok, _ in outcomes], [True, False, True, False, True, True, False, True])
        outcomes[1][1].trap(UsernameTaken)
        outcomes[3][1].trap(sqlite3.IntegrityError)
        outcomes[6][1].trap(OverflowError)
        self.assertEqual(outcomes[7][1], 1)
        _, snapshot = await self.restart(store)
        self.assertEqual(sorted(snapshot.accounts), ["alice", "bob"])
        self.assertEqual(snapshot.tokens, {})
        self.assertEqual(snapshot.mailbox_counts, {"bob": 1})

    async def test_transaction_lost_fails_whole_batch(self) -> None:
        """
        When SQLite rolls the whole transaction back by itself, every operation of the batch fails
        and none of the later ones is stored on its own outside the transaction.
        """
        store, _ = await self.start_store()
        await store.put_envelope(env(1, "bob", "alice", "boom"))
        await store.stop()
        db = sqlite3.connect(self.path)
        with db:
            db.execute(
                "CREATE TRIGGER boom BEFORE DELETE ON envelopes WHEN OLD.msg_id = 'boom'"
                " BEGIN SELECT RAISE(ROLLBACK, 'boom'); END"
            )
        db.close()
        store, _ = await self.start_store()
        before = store.commits
        outcomes = await DeferredList(
            [
                store.put_envelope(env(2, "bob", "alice", "m2")),
                store.ack_envelopes("bob", [1]),
                store.put_envelope(env(3, "bob", "alice", "m3")),
            ],
            consumeErrors=True,
        )
        self.assertEqual(store.commits, before)
        self.assertEqual([ok for ok, _ in outcomes], [False, False, False])
        self.assertEqual(self.query("SELECT seq FROM envelopes"), [(1,)])

    async def test_failed_commit_rolled_back(self) -> None:
        """
        A batch whose COMMIT fails with the transaction still open (a disk I/O error) fails whole
        and is rolled back: the store goes on, and the next batch is stored as usual.
        """
        store, _ = await self.start_store()
        connection = store._db

        class CommitFailsOnce:
            """The store's own connection, whose next COMMIT fails as a full or failing disk makes it."""

            failed = False

            def __getattr__(self, name: str):
                return getattr(connection, name)

            def execute(self, sql: str, *args):
                if sql == "COMMIT" and not self.failed:
                    self.failed = True
                    raise sqlite3.OperationalError("disk I/O error")
                return connection.execute(sql, *args)

        store._db = CommitFailsOnce()  # the writer thread is idle: it takes _db at its next batch
        [(ok, failure)] = await DeferredList([store.put_envelope(env(1, "bob", "alice", "m1"))], consumeErrors=True)
        self.assertFalse(ok)
        self.assertIn("disk I/O error", str(failure.value))
        await store.put_envelope(env(2, "bob", "alice", "m2"))
        self.assertEqual(self.query("SELECT seq FROM envelopes"), [(2,)])


class PutRunTests(unittest.SynchronousTestCase):
    """The writer thread's way of storing a run of queued puts, on a connection of the test's own."""

    def setUp(self) -> None:
        self.db = sqlite3.connect(self.mktemp(), isolation_level=None)
        self.addCleanup(self.db.close)
        for step in MIGRATIONS:
            for statement in step:
                self.db.execute(statement)
        self.inserts = 0

        def trace(statement: str) -> None:
            self.inserts += statement.startswith("INSERT")

        self.db.set_trace_callback(trace)
        self.db.execute("BEGIN IMMEDIATE")

    def stored(self) -> list[tuple]:
        return self.db.execute("SELECT seq, sender, msg_id FROM envelopes ORDER BY seq").fetchall()

    def test_few_statements(self) -> None:
        """300 puts are stored with 6 INSERTs (128 + 128 + 32 + 8 + 2 + 2), not one per envelope."""
        outcomes = _put_envelopes(self.db, [env(i, "bob", "alice", f"m{i}") for i in range(1, 301)])
        self.assertEqual(outcomes, [(i, False) for i in range(1, 301)])
        self.assertEqual(self.inserts, 6)
        self.assertEqual(self.stored(), [(i, "alice", f"m{i}") for i in range(1, 301)])

    def test_duplicates(self) -> None:
        """
        A duplicate of a stored envelope, or of one earlier in the same run, stores nothing and is
        answered with the stored one's seq; the others in its INSERT are stored as usual.
        """
        _put_envelopes(self.db, [env(1, "bob", "alice", "m1")])
        outcomes = _put_envelopes(
            self.db,
            [
                env(2, "bob", "alice", "m2"),
                env(3, "bob", "alice", "m1"),  # stored before this run
                env(4, "bob", "carol", "m1"),
                env(5, "bob", "alice", "m2"),  # earlier in this run
            ],
        )
        self.assertEqual(outcomes, [(2, False), (1, True), (4, False), (2, True)])
        self.assertEqual(self.stored(), [(1, "alice", "m1"), (2, "alice", "m2"), (4, "carol", "m1")])

    def test_failing_put_fails_alone(self) -> None:
        """A put that fails (here: a seq stored already) fails alone; the rest of its INSERT is stored."""
        _put_envelopes(self.db, [env(2, "bob", "alice", "m0")])
        outcomes = _put_envelopes(self.db, [env(i, "bob", "alice", f"m{i}") for i in range(1, 6)])
        self.assertEqual([outcomes[0], *outcomes[2:]], [(1, False), (3, False), (4, False), (5, False)])
        outcomes[1].trap(sqlite3.IntegrityError)
        self.assertEqual([seq for seq, _, _ in self.stored()], [1, 2, 3, 4, 5])
        self.assertEqual(self.stored()[1], (2, "alice", "m0"))

    def test_transaction_lost(self) -> None:
        """
        When SQLite rolls the whole transaction back by itself, the error is raised: the rest of
        the run is not stored one by one outside the transaction.
        """
        self.db.execute(
            "CREATE TEMP TRIGGER boom BEFORE INSERT ON envelopes WHEN NEW.msg_id = 'boom'"
            " BEGIN SELECT RAISE(ROLLBACK, 'boom'); END"
        )
        _put_envelopes(self.db, [env(1, "bob", "alice", "m1")])
        with self.assertRaises(sqlite3.IntegrityError):
            _put_envelopes(self.db, [env(i, "bob", "alice", "boom" if i == 3 else f"m{i}") for i in range(2, 6)])
        self.assertFalse(self.db.in_transaction)
        self.assertEqual(self.stored(), [])


class HostileInputTests(StoreTestCase):
    HOSTILE = [
        "",
        "'; DROP TABLE accounts; --",
        '"quoted" \\ back%slash_ *',
        "nul\x00inside",
        "line\nbreak\r\n\t",
        "\u202eright-to-left\u200f",
        "emoji 🐍🏳️‍🌈",
        "\U0010ffff\ufeff\ufffd",
        "x" * 100000,
    ]

    async def test_any_unicode_round_trips(self) -> None:
        """Any Unicode string, SQL-looking or not, is stored and read back unchanged in every field."""
        store, _ = await self.start_store()
        for i, text in enumerate(self.HOSTILE):
            name = f"{text}{i}"
            await store.create_account(Account(name, text, text, text, 1.0))
            await store.add_block(name, text)
            await store.add_token(name, f"token{i}{text}", 5000.0)
            await store.record_login(name, 10.0)
            await store.record_logout(name, 20.0)
            await store.put_envelope(env(i + 1, text, name, text, text))
        store, snapshot = await self.restart(store)
        self.assertEqual(len(snapshot.accounts), len(self.HOSTILE))
        for i, text in enumerate(self.HOSTILE):
            name = f"{text}{i}"
            self.assertEqual(snapshot.accounts[name], Account(name, text, text, text, 1.0))
            self.assertIn((name, text), snapshot.blocks)
            self.assertEqual(snapshot.tokens[f"token{i}{text}"], (name, 5000.0))
            self.assertEqual(snapshot.last_seen[name], 20.0)
            [stored] = await store.fetch_envelopes(text, 0, 10)
            self.assertEqual((stored.sender, stored.msg_id, stored.envelope), (name, text, text))

    async def test_lone_surrogate_fails_alone(self) -> None:
        """A string SQLite cannot encode (a lone surrogate) fails its own operation and none of its neighbours'."""
        store, _ = await self.start_store()
        outcomes = await DeferredList(
            [
                store.put_envelope(env(1, "bob", "alice", "m1")),
                store.put_envelope(env(2, "bob", "alice", "m2", "\ud800")),
                store.put_envelope(env(3, "bob", "alice", "m3")),
            ],
            consumeErrors=True,
        )
        self.assertEqual([ok for ok, _ in outcomes], [True, False, True])
        self.assertEqual([e.msg_id for e in await store.fetch_envelopes("bob", 0, 10)], ["m1", "m3"])
