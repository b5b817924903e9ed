"""Tests for p2pchat.peer.history: the peer's SQLite store, on real database files."""

from __future__ import annotations

import os
import sqlite3
import stat

from twisted.internet import reactor
from twisted.trial import unittest

from p2pchat.peer.history import (
    _SCHEMA,
    DELIVERED,
    FAILED,
    HELD,
    MUTED,
    PENDING,
    SCHEMA_VERSION,
    SENT,
    SHOWN,
    Contact,
    History,
    ThreadRunner,
    UnusableHistory,
)


class HistoryTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp() + ".d", "history.sqlite3")
        os.makedirs(os.path.dirname(self.path))
        self.history = self.open()

    def open(self) -> History:
        history = History(self.path)
        self.successResultOf(history.open())
        self.addCleanup(history.close)
        return history

    def test_file_private_and_wal(self) -> None:
        """The database is created readable by its owner only, in WAL mode, with a schema version."""
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        db = sqlite3.connect(self.path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(db.execute("SELECT version FROM schema_version").fetchone()[0], SCHEMA_VERSION)

    def test_unknown_schema_refused(self) -> None:
        """A database from a newer peer is refused rather than misread."""
        db = sqlite3.connect(self.path)
        db.execute("UPDATE schema_version SET version = 99")
        db.commit()
        db.close()
        failure = self.failureResultOf(History(self.path).open(), UnusableHistory)
        self.assertIn("schema version 99", str(failure.value))

    def test_not_a_database_refused_and_kept(self) -> None:
        """A file that is not an SQLite database (a damaged copy, another program's file) is refused
        with a sentence naming it, and left as it was."""
        path = os.path.join(os.path.dirname(self.path), "other.sqlite3")
        garbage = b"not a database, " * 512
        with open(path, "wb") as f:
            f.write(garbage)
        failure = self.failureResultOf(History(path).open(), UnusableHistory)
        self.assertEqual(str(failure.value), f"{path}: file is not a database")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), garbage)

    def test_migrates_version_1(self) -> None:
        """A file of schema version 1 keeps its messages and gains the table of owed receipts and the
        index of messages by user."""
        path = os.path.join(os.path.dirname(self.path), "old.sqlite3")
        db = sqlite3.connect(path)
        with db:
            db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            db.execute("INSERT INTO schema_version VALUES (1)")
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(
                "INSERT INTO messages (peer, outgoing, msg_id, text, status, sent_at, stored_at)"
                " VALUES ('bob', 0, 'm1', 'hi', 'shown', 1.0, 1.0)"
            )
        db.close()
        history = History(path)
        self.successResultOf(history.open())
        self.addCleanup(history.close)
        self.assertEqual([e.text for e in self.successResultOf(history.conversation("bob", 10))], ["hi"])
        self.successResultOf(history.add_incoming("bob", "m2", "again", False, SHOWN, 2.0, 2.0, owe_receipt=True))
        self.assertEqual(self.successResultOf(history.owed_receipts()), {"bob": ["m2"]})
        db = sqlite3.connect(path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("SELECT version FROM schema_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(
            db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND name = 'messages_by_peer'").fetchall(),
            [("messages_by_peer",)],
        )

    def test_conversation_read_by_index(self) -> None:
        """The last messages with one user come from an index, whatever the size of the history
        (without it, every message with that user was read and sorted: 0.23 s for a million)."""
        self.successResultOf(self.history.add_incoming("bob", "m1", "hi", False, SHOWN, 1.0, 1.0))
        statements: list[str] = []
        self.history._db.set_trace_callback(statements.append)
        self.assertEqual([e.text for e in self.successResultOf(self.history.conversation("bob", 20))], ["hi"])
        self.history._db.set_trace_callback(None)
        [query] = [s for s in statements if s.startswith("SELECT")]
        plan = " ".join(row[-1] for row in self.history._db.execute("EXPLAIN QUERY PLAN " + query))
        self.assertIn("messages_by_peer", plan)
        self.assertNotIn("TEMP B-TREE", plan)

    def test_owed_receipts(self) -> None:
        """
        A message stored with owe_receipt is owed once, even when it comes again, until
        receipts_sent; without it nothing is owed. Owed receipts come per sender, oldest first.
        """
        h = self.history
        for peer, msg_id, owe in [("bob", "m1", True), ("carol", "c1", True), ("bob", "m2", True),
                                  ("bob", "m1", True), ("bob", "d1", False)]:
            self.successResultOf(h.add_incoming(peer, msg_id, "text", False, SHOWN, 1.0, 1.0, owe_receipt=owe))
        self.assertEqual(self.successResultOf(h.owed_receipts()), {"bob": ["m1", "m2"], "carol": ["c1"]})
        self.successResultOf(h.receipts_sent("bob", ["m1", "c1"]))
        self.assertEqual(self.successResultOf(h.owed_receipts()), {"bob": ["m2"], "carol": ["c1"]})
        reopened = self.open()
        self.assertEqual(self.successResultOf(reopened.owed_receipts()), {"bob": ["m2"], "carol": ["c1"]})

    def test_outbox_fifo_per_peer(self) -> None:
        """Pending messages come back oldest first, per peer or for everyone."""
        for i, peer in enumerate(["bob", "carol", "bob"]):
            self.successResultOf(self.history.add_outgoing(peer, f"m{i}", f"text {i}", False, 100.0 + i))
        bob = self.successResultOf(self.history.outbox("bob"))
        self.assertEqual([e.msg_id for e in bob], ["m0", "m2"])
        self.assertTrue(all(e.outgoing and e.status == PENDING for e in bob))
        everyone = self.successResultOf(self.history.outbox())
        self.assertEqual([e.msg_id for e in everyone], ["m0", "m1", "m2"])

    def test_status_moves_only_forward(self) -> None:
        """A message leaves the outbox once sent; a late "sent" never hides "delivered"."""
        self.successResultOf(self.history.add_outgoing("bob", "m1", "hi", False, 1.0))
        self.assertEqual(self.successResultOf(self.history.set_status("bob", ["m1"], SENT, (PENDING,))), 1)
        self.assertEqual(self.successResultOf(self.history.outbox("bob")), [])
        self.successResultOf(self.history.set_status("bob", ["m1"], DELIVERED, (PENDING, SENT)))
        self.assertEqual(self.successResultOf(self.history.set_status("bob", ["m1"], SENT, (PENDING,))), 0)
        [entry] = self.successResultOf(self.history.conversation("bob", 10))
        self.assertEqual(entry.status, DELIVERED)

    def test_awaiting_receipt(self) -> None:
        """Only a sent message newer than everything delivered to that peer is awaited."""
        h = self.history

        def awaiting(peer: str = "bob") -> bool:
            return self.successResultOf(h.awaiting_receipt(peer))

        for i in range(4):
            self.successResultOf(h.add_outgoing("bob", f"m{i}", "hi", False, 1.0 + i))
        self.assertFalse(awaiting())  # pending is not sent
        self.successResultOf(h.set_status("bob", ["m0", "m1"], SENT, (PENDING,)))
        self.assertTrue(awaiting())
        self.assertFalse(awaiting("carol"))
        self.successResultOf(h.add_incoming("bob", "in", "yo", False, SHOWN, 1.0, 9.0))
        self.assertTrue(awaiting())  # a message from bob is no receipt
        self.successResultOf(h.set_status("bob", ["m0"], DELIVERED, (PENDING, SENT)))
        self.assertTrue(awaiting())  # m1 still
        self.successResultOf(h.set_status("bob", ["m2"], SENT, (PENDING,)))
        self.successResultOf(h.set_status("bob", ["m3"], DELIVERED, (PENDING,)))
        self.assertFalse(awaiting())  # m1 and m2 are older than the delivered m3

    def test_status_only_for_that_peer(self) -> None:
        """A receipt from carol cannot mark a message to bob delivered."""
        self.successResultOf(self.history.add_outgoing("bob", "m1", "hi", False, 1.0))
        self.assertEqual(self.successResultOf(self.history.set_status("carol", ["m1"], DELIVERED, (PENDING,))), 0)

    def test_incoming_deduplicated(self) -> None:
        """The same (peer, msg_id) is stored once; the second arrival says it is a duplicate."""
        self.assertTrue(self.successResultOf(self.history.add_incoming("bob", "x", "hi", False, SHOWN, 1.0, 2.0)))
        self.assertFalse(self.successResultOf(self.history.add_incoming("bob", "x", "hi", False, SHOWN, 1.0, 3.0)))
        self.assertTrue(self.successResultOf(self.history.add_incoming("carol", "x", "hi", False, SHOWN, 1.0, 3.0)))
        self.assertEqual(len(self.successResultOf(self.history.conversation("bob", 10))), 1)

    def test_conversation_last_n_in_order(self) -> None:
        """History returns the last N messages both ways, oldest first."""
        for i in range(5):
            self.successResultOf(self.history.add_outgoing("bob", f"o{i}", f"out {i}", False, float(i)))
            self.successResultOf(self.history.add_incoming("bob", f"i{i}", f"in {i}", False, MUTED, float(i), float(i)))
        entries = self.successResultOf(self.history.conversation("bob", 3))
        self.assertEqual([e.text for e in entries], ["in 3", "out 4", "in 4"])

    def test_entries_say_when_taken(self) -> None:
        """An entry has the time it was written and the time this history took it: a message
        written earlier than one before it (kept by the server) is after it, as it came."""
        self.successResultOf(self.history.add_outgoing("bob", "o1", "mine", False, 100.0))
        self.successResultOf(self.history.add_incoming("bob", "i1", "late", False, MUTED, 50.0, 160.0))
        entries = self.successResultOf(self.history.conversation("bob", 10))
        self.assertEqual([(e.text, e.sent_at, e.stored_at) for e in entries], [("mine", 100.0, 100.0), ("late", 50.0, 160.0)])

    def test_release_held(self) -> None:
        """Messages held for a changed key are returned once and then count as shown."""
        self.successResultOf(self.history.add_incoming("bob", "a", "one", False, HELD, 1.0, 1.0))
        self.successResultOf(self.history.add_incoming("bob", "b", "two", True, HELD, 2.0, 2.0))
        released = self.successResultOf(self.history.release_held("bob"))
        self.assertEqual([(e.text, e.private) for e in released], [("one", False), ("two", True)])
        self.assertEqual(self.successResultOf(self.history.release_held("bob")), [])

    def test_contacts_and_settings_survive_reopen(self) -> None:
        """Pins, block and mute state, the outbox and registration marks are on disk."""
        contact = Contact("bob", "a" * 64, "k" * 43, None, None, True, True, 1234.5)
        self.successResultOf(self.history.save_contact(contact))
        self.successResultOf(self.history.add_outgoing("bob", "m1", "hi", False, 1.0))
        self.successResultOf(self.history.mark_registered("localhost:5000"))
        self.successResultOf(self.history.close())
        reopened = self.open()
        self.assertEqual(self.successResultOf(reopened.contacts()), {"bob": contact})
        self.assertEqual(len(self.successResultOf(reopened.outbox("bob"))), 1)
        self.assertTrue(self.successResultOf(reopened.is_registered("localhost:5000")))
        self.assertFalse(self.successResultOf(reopened.is_registered("otherhost:5000")))

    def test_outbox_pages(self) -> None:
        """The outbox to one user reads in pages after a message's number; outbox_peers names
        those with pending messages."""
        h = self.history
        for peer, msg_id in [("bob", "b1"), ("carol", "c1"), ("bob", "b2"), ("bob", "b3")]:
            self.successResultOf(h.add_outgoing(peer, msg_id, "t " + msg_id, False, 1.0))
        first = self.successResultOf(h.outbox_page("bob", 0, 2))
        self.assertEqual([e.msg_id for _, e in first], ["b1", "b2"])
        rest = self.successResultOf(h.outbox_page("bob", first[-1][0], 2))
        self.assertEqual([e.msg_id for _, e in rest], ["b3"])
        self.assertEqual(self.successResultOf(h.outbox_page("bob", rest[-1][0], 2)), [])
        self.assertEqual(self.successResultOf(h.outbox_peers()), ["bob", "carol"])
        self.successResultOf(h.set_status("carol", ["c1"], SENT, (PENDING,)))
        self.assertEqual(self.successResultOf(h.outbox_peers()), ["bob"])

    def test_failed_leaves_outbox(self) -> None:
        """A message refused for good is failed and no longer pending."""
        self.successResultOf(self.history.add_outgoing("bob", "m1", "hi", False, 1.0))
        self.successResultOf(self.history.set_status("bob", ["m1"], FAILED, (PENDING,)))
        self.assertEqual(self.successResultOf(self.history.outbox()), [])


class ThreadRunnerTests(unittest.TestCase):
    async def test_runs_in_its_thread(self) -> None:
        """With the thread runner the database work happens off the reactor thread and still completes."""
        import threading

        runner = ThreadRunner(reactor)
        runner.start()
        self.addCleanup(runner.stop)
        path = self.mktemp()
        history = History(path, runner)
        await history.open()
        self.addCleanup(history.close)
        await history.add_outgoing("bob", "m1", "hi", False, 1.0)
        self.assertEqual(len(await history.outbox("bob")), 1)
        name = await runner(lambda: threading.current_thread().name)
        self.assertNotEqual(name, threading.current_thread().name)
