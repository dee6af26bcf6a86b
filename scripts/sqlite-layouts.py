#!/usr/bin/env python3
"""Measures the messages table's two layouts with Python's sqlite3, built from the store's
own migration files: how long migration 0004 takes to move N messages of 100 bytes from the
layout clustered by (conversation, seq) into arrival order, the database's size before and
after, and what a page of 100 messages and an unread count over 100 messages cost: before
the migration, after it (the old messages stay grouped by conversation), and in a database
whose messages were all written in arrival order (conversations interleaved, as new
messages are).

Usage: scripts/sqlite-layouts.py [MESSAGES] [CONVERSATIONS]   (default 1000000 1000)
"""
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

MIGRATIONS = Path(__file__).resolve().parent.parent / "host/store/migrations/sqlite"
READS = 2000


def fill(path, messages, conversations, migrations):
    """A database after `migrations`, then `messages` spread over `conversations` 1:1 chats,
    written one message per conversation in turn."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    for migration in migrations:
        db.executescript((MIGRATIONS / migration).read_text())
    db.execute(
        f"""WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {messages - 1})
        INSERT INTO messages SELECT 'u:user' || (i % {conversations}) || ':peer' || (i % {conversations}),
            i / {conversations} + 1, 'srv-' || printf('%015d', i), 'user' || (i % {conversations}),
            'device-1', 'peer' || (i % {conversations}), 'client-' || i, randomblob(100),
            'text/plain', 1700000000000 + i FROM n"""
    )
    db.commit()
    return db


def reads(db, conversations, per_conversation):
    """Mean µs of a page of 100 messages from a random point, and of an unread count over
    the last 100 messages, of random conversations."""
    rng = random.Random(1)
    started = time.perf_counter()
    for _ in range(READS):
        c = rng.randrange(conversations)
        after = rng.randrange(max(per_conversation - 100, 1))
        db.execute(
            "SELECT conversation_id, seq, server_msg_id, sender_id, sender_device_id, recipient_id, "
            "client_msg_id, body, content_type, server_time_ms FROM messages "
            "WHERE conversation_id = ? AND seq > ? ORDER BY seq LIMIT 100",
            (f"u:user{c}:peer{c}", after),
        ).fetchall()
    page = (time.perf_counter() - started) / READS * 1e6
    started = time.perf_counter()
    for _ in range(READS):
        c = rng.randrange(conversations)
        db.execute(
            "SELECT COUNT(*) FROM messages WHERE conversation_id = ? AND seq > ? AND sender_id <> ?",
            (f"u:user{c}:peer{c}", per_conversation - 100, f"peer{c}"),
        ).fetchone()
    unread = (time.perf_counter() - started) / READS * 1e6
    return page, unread


def main():
    messages = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    conversations = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    with tempfile.TemporaryDirectory() as dir:
        path = os.path.join(dir, "im.db")
        db = fill(path, messages, conversations, ["0001_messages.sql"])
        size = os.path.getsize(path) >> 20
        print(f"{messages} messages over {conversations} conversations: {size} MiB")
        page, unread = reads(db, conversations, messages // conversations)
        print(f"clustered: page of 100 {page:.0f} µs, unread count of 100 {unread:.0f} µs")
        started = time.perf_counter()
        db.executescript("BEGIN;" + (MIGRATIONS / "0004_messages_in_arrival_order.sql").read_text() + "COMMIT;")
        took = time.perf_counter() - started
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        print(f"migration 0004: {took:.1f} s; {os.path.getsize(path) >> 20} MiB after")
        page, unread = reads(db, conversations, messages // conversations)
        print(f"after the migration: page of 100 {page:.0f} µs, unread count of 100 {unread:.0f} µs")
        db.close()
        path = os.path.join(dir, "arrival.db")
        db = fill(path, messages, conversations, ["0001_messages.sql", "0004_messages_in_arrival_order.sql"])
        page, unread = reads(db, conversations, messages // conversations)
        print(f"written in arrival order: page of 100 {page:.0f} µs, unread count of 100 {unread:.0f} µs")


if __name__ == "__main__":
    main()
