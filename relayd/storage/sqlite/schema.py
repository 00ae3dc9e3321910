"""relayd's SQLite schema: versioned migrations, applied in one transaction at start-up.

``MIGRATIONS[i]`` upgrades schema version i to i + 1. Append, never edit: a
database records every version it went through in ``schema_version``.
"""

from __future__ import annotations

import sqlite3
import time

from ..store import StoreOpenError

APPLICATION_ID = 0x524C5944  # "RLYD": marks a file as relayd's

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE messages (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            recipient TEXT NOT NULL,
            sender TEXT NOT NULL,
            message_id TEXT NOT NULL,
            content TEXT NOT NULL,
            timestamp INTEGER NOT NULL,
            queued_at INTEGER NOT NULL,
            size INTEGER NOT NULL,
            UNIQUE (sender, message_id))""",
        "CREATE INDEX messages_recipient_seq ON messages (recipient, seq)",
        "CREATE INDEX messages_recipient_id ON messages (recipient, message_id)",
        "CREATE INDEX messages_queued_at ON messages (queued_at)",
        """CREATE TABLE queues (
            recipient TEXT PRIMARY KEY,
            count INTEGER NOT NULL,
            bytes INTEGER NOT NULL) WITHOUT ROWID""",
        """CREATE TABLE receipts (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            recipient TEXT NOT NULL,
            reader TEXT NOT NULL,
            message_id TEXT NOT NULL,
            timestamp INTEGER NOT NULL)""",
        "CREATE INDEX receipts_recipient_seq ON receipts (recipient, seq)",
        "CREATE INDEX receipts_timestamp ON receipts (timestamp)",
        """CREATE TABLE keys (
            address TEXT PRIMARY KEY,
            public_key TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            key_type TEXT,
            issued_at INTEGER,
            format TEXT,
            signature TEXT) WITHOUT ROWID""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID",
    ),
    (
        """CREATE TABLE locks (
            address TEXT PRIMARY KEY,
            locked_at INTEGER NOT NULL) WITHOUT ROWID""",
        "INSERT OR IGNORE INTO locks (address, locked_at) "
        "SELECT address, updated_at FROM keys WHERE signature IS NOT NULL",
    ),
    (   # messageIds are idempotent per sender and recipient, not per sender alone
        """CREATE TABLE messages_v3 (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            recipient TEXT NOT NULL,
            sender TEXT NOT NULL,
            message_id TEXT NOT NULL,
            content TEXT NOT NULL,
            timestamp INTEGER NOT NULL,
            queued_at INTEGER NOT NULL,
            size INTEGER NOT NULL,
            UNIQUE (sender, recipient, message_id))""",
        "INSERT INTO messages_v3 SELECT seq, recipient, sender, message_id, content, timestamp, queued_at, size "
        "FROM messages",
        "DROP TABLE messages",
        "ALTER TABLE messages_v3 RENAME TO messages",
        "CREATE INDEX messages_recipient_seq ON messages (recipient, seq)",
        "CREATE INDEX messages_recipient_id ON messages (recipient, message_id)",
        "CREATE INDEX messages_queued_at ON messages (queued_at)",
    ),
    (   # leaner messages: seqs from the writer (no AUTOINCREMENT), one unique index that also finds acks and is
        # blind to the sender's spelling, the content last (small columns are read without its overflow pages);
        # receipts counted per queue; floors of signed keys; bearer tokens
        """CREATE TABLE messages_v4 (
            seq INTEGER PRIMARY KEY,
            recipient TEXT NOT NULL,
            sender TEXT NOT NULL,
            message_id TEXT NOT NULL,
            timestamp INTEGER NOT NULL,
            queued_at INTEGER NOT NULL,
            size INTEGER NOT NULL,
            content TEXT NOT NULL)""",
        "INSERT INTO messages_v4 SELECT seq, recipient, sender, message_id, timestamp, queued_at, size, content "
        "FROM messages ORDER BY seq",
        "DROP TABLE messages",
        "ALTER TABLE messages_v4 RENAME TO messages",
        "CREATE UNIQUE INDEX messages_ident ON messages (recipient, message_id, lower(sender))",
        "CREATE INDEX messages_recipient_seq ON messages (recipient, seq)",
        "CREATE INDEX messages_queued_at ON messages (queued_at)",
        "ALTER TABLE queues ADD COLUMN receipts INTEGER NOT NULL DEFAULT 0",
        "INSERT INTO queues (recipient, count, bytes, receipts) "
        "SELECT recipient, 0, 0, COUNT(*) FROM receipts WHERE true GROUP BY recipient "
        "ON CONFLICT (recipient) DO UPDATE SET receipts = excluded.receipts",
        """CREATE TABLE key_floors (
            address TEXT PRIMARY KEY,
            issued_at INTEGER NOT NULL) WITHOUT ROWID""",
        "INSERT INTO key_floors (address, issued_at) SELECT address, issued_at FROM keys WHERE signature IS NOT NULL",
        """CREATE TABLE tokens (
            hash TEXT PRIMARY KEY,
            address TEXT NOT NULL,
            expires_at INTEGER NOT NULL) WITHOUT ROWID""",
        "CREATE INDEX tokens_address ON tokens (address, expires_at)",
    ),
    (   # messageIds stay known as delivered for the retention period, so a resend is answered "delivered" instead
        # of being stored and delivered again; the sender is kept lower-cased (compared case-insensitively)
        """CREATE TABLE delivered (
            recipient TEXT NOT NULL,
            message_id TEXT NOT NULL,
            sender TEXT NOT NULL,
            queued_at INTEGER NOT NULL,
            PRIMARY KEY (recipient, message_id, sender)) WITHOUT ROWID""",
        "CREATE INDEX delivered_queued_at ON delivered (queued_at)",
    ),
    (   # push subscriptions: where to wake an offline address's devices
        """CREATE TABLE push_subscriptions (
            address TEXT NOT NULL,
            id TEXT NOT NULL,
            provider TEXT NOT NULL,
            target TEXT NOT NULL,
            p256dh TEXT NOT NULL,
            auth TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            PRIMARY KEY (address, id)) WITHOUT ROWID""",
        "CREATE INDEX push_subscriptions_expires_at ON push_subscriptions (expires_at)",
    ),
    (   # unsigned keys nobody uploaded or looked up for a long time expire: when one was last looked up
        "ALTER TABLE keys ADD COLUMN used_at INTEGER",
        "CREATE INDEX keys_unsigned_last_use ON keys (max(updated_at, COALESCE(used_at, 0))) "
        "WHERE signature IS NULL",
    ),
    (   # message history ([history] days): delivered messages kept as stored, once per message, for their
        # recipient
        """CREATE TABLE history (
            recipient TEXT NOT NULL,
            message_id TEXT NOT NULL,
            sender_key TEXT NOT NULL,
            sender TEXT NOT NULL,
            content TEXT NOT NULL,
            timestamp INTEGER NOT NULL,
            queued_at INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            kept_until INTEGER NOT NULL,
            size INTEGER NOT NULL)""",
        "CREATE UNIQUE INDEX history_ident ON history (recipient, message_id, sender_key)",
        "CREATE INDEX history_page ON history (recipient, timestamp, seq)",
        "CREATE INDEX history_kept_until ON history (kept_until)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION, one recorded step per version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                     "version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")
        if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise StoreOpenError(f"database has schema version {current}, newer than "
                                 f"{SCHEMA_VERSION}; upgrade relayd")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                         (version, int(time.time() * 1000)))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
