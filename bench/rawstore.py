"""The offline_backlog baseline: a raw sqlite3 loop that stores one user's mailbox and drains it.

Same durability as our store (WAL, synchronous=NORMAL), the same envelopes table and indexes, one
INSERT per envelope, a COMMIT every C{batch} inserts (bench.run passes the number of sends the load
generator keeps in flight, the most our group commit can gather). Draining reads the oldest 256 and
deletes them by seq in one transaction, as many times as needed. No network, no JSON, no dedupe
lookup, no mailbox counter: the cost of the storage alone.

Run by bench.run as C{python -m bench.rawstore CONFIG_JSON}; it speaks the load generator's
mark protocol on stdin/stdout so that bench.run reads this process's own CPU time at each mark.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time

from bench.codecs import payload
from p2pchat.discovery.store.sqlite import MIGRATIONS
from bench.procs import driver_mark as mark

FETCH = 256

# Our store's own envelopes table and indexes, so the baseline stores exactly the same rows
# (without our mailbox counter and its triggers: the cost of the storage alone).
SCHEMA = tuple(
    statement for statement in MIGRATIONS[0]
    if statement.startswith(("CREATE TABLE envelopes", "CREATE INDEX envelopes_"))
)


def store(db: sqlite3.Connection, recipient: str, count: int, senders: int, batch: int, size: int) -> None:
    for start in range(0, count, batch):
        db.execute("BEGIN IMMEDIATE")
        for i in range(start, min(count, start + batch)):
            sender = i % senders
            db.execute(
                "INSERT INTO envelopes (recipient, sender, msg_id, envelope, sent_at) VALUES (?, ?, ?, ?, ?)",
                (recipient, f"b{sender:05d}", f"m{i}", payload(sender, i, time.perf_counter_ns(), size), time.time()),
            )
        db.execute("COMMIT")


def drain(db: sqlite3.Connection, recipient: str) -> int:
    received = 0
    last = 0
    while True:
        rows = db.execute(
            "SELECT seq, recipient, sender, msg_id, envelope, sent_at FROM envelopes"
            " WHERE recipient = ? AND seq > ? ORDER BY seq LIMIT ?",
            (recipient, last, FETCH),
        ).fetchall()
        if not rows:
            return received
        received += len(rows)
        last = rows[-1][0]
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "DELETE FROM envelopes WHERE recipient = ? AND seq = ?", [(recipient, row[0]) for row in rows]
        )
        db.execute("COMMIT")


def main(argv: list[str]) -> None:
    config = json.loads(argv[1])
    db = sqlite3.connect(config["path"], isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    for statement in SCHEMA:
        db.execute(statement)
    recipient = "b99999"
    count = config["envelopes"]
    mark("store_start")
    started = time.monotonic()
    store(db, recipient, count, config["senders"], config["batch"], config["size"])
    store_s = time.monotonic() - started
    mark("store_end")
    started = time.monotonic()
    received = drain(db, recipient)
    deliver_s = time.monotonic() - started
    mark("deliver_end")
    db.close()
    result = {
        "envelopes": count,
        "stored": count,
        "received": received,
        "store_s": store_s,
        "store_per_s": count / store_s,
        "deliver_s": deliver_s,
        "deliver_per_s": received / deliver_s,
    }
    print(json.dumps({"result": result}), flush=True)


if __name__ == "__main__":
    main(sys.argv)
