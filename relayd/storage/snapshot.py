"""What ``relayd migrate`` reads: everything a relay stored, from any backend that can be read without its relay.

A ``Snapshot`` yields queued messages (per recipient, oldest first, with
their original ``queued_at``), stored receipts (with their source seq),
keys, ownership locks, key floors, unexpired bearer tokens, the messageIds
remembered as delivered, kept message history and push subscriptions, each
as stored (sealed records stay sealed). Sources: ``sqlite:PATH`` (the file
opened read-only, so its relay may keep running), a ``postgresql://`` URL
(one read-only, repeatable-read transaction, so the copy is consistent while
its relays keep running) and a ``redis://`` or ``rediss://`` URL (found with
SCAN under ``[redis] key_prefix``, on a single Redis or every primary of a
Cluster; read live, see ``redis.snapshot``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from .sqlite.file import inspect, read_only_uri
from .store import KeyRecord, PushSubscription, QueuedMessage, Receipt, StoreOpenError


class Snapshot(Protocol):
    def messages(self) -> AsyncIterator[QueuedMessage]:
        """Every stored message, grouped by recipient, each recipient's oldest first."""
        ...

    def receipts(self) -> AsyncIterator[tuple[Receipt, int]]:
        """Every stored receipt with its seq in the source, grouped by recipient, oldest first."""
        ...

    def keys(self) -> AsyncIterator[KeyRecord]:
        ...

    def locks(self) -> AsyncIterator[str]:
        ...

    def floors(self) -> AsyncIterator[tuple[str, int]]:
        """(address, newest issued_at of any signed key ever stored)."""
        ...

    def tokens(self, now_ms: int) -> AsyncIterator[tuple[str, str, int]]:
        """(token hash, address, expires_at ms) of the tokens unexpired at ``now_ms``, soonest expiring first."""
        ...

    def delivered(self) -> AsyncIterator[QueuedMessage]:
        """The messages remembered as delivered: recipient, lower-cased sender, messageId and ``queued_at``
        (what their memory expires from); no content."""
        ...

    def history(self) -> AsyncIterator[tuple[QueuedMessage, int]]:
        """Every kept message (``[history] days``) as stored, with its seq, and when it stops being kept (ms)."""
        ...

    def push_subscriptions(self) -> AsyncIterator[PushSubscription]:
        """Every push subscription, expired or not (the destination's housekeeping deletes expired ones)."""
        ...

    async def key(self, address: str) -> KeyRecord | None:
        """The key record of one address (the encryption check record, before anything is copied)."""
        ...

    async def close(self) -> None:
        ...


def parse_source(text: str) -> tuple[str, str]:
    """("sqlite", PATH), ("postgres", URL) or ("redis", URL); ValueError for anything else."""
    if text.startswith(("postgresql://", "postgres://")):
        return "postgres", text
    if text.startswith(("redis://", "rediss://")):
        return "redis", text
    scheme, sep, path = text.partition(":")
    if scheme != "sqlite" or not sep or not path:
        raise ValueError(f"--from must be sqlite:PATH (a relayd SQLite database), a postgresql:// URL or a "
                         f"redis:// (rediss://) URL, got {text.split('://')[0]!r}")
    return "sqlite", path


async def open_snapshot(text: str, *, key_prefix: str = "relayd:") -> Snapshot:
    """The snapshot ``text`` names (a Redis one under ``key_prefix``); raises ValueError (bad usage) or
    StoreOpenError."""
    kind, where = parse_source(text)
    if kind == "postgres":
        from .postgres.snapshot import PgSnapshot
        return await PgSnapshot.open(where)
    if kind == "redis":
        try:
            from .redis.snapshot import RedisSnapshot
        except ImportError as exc:
            if (exc.name or "").partition(".")[0] != "redis":
                raise
            from .backends import MISSING_REDIS_EXTRA
            raise StoreOpenError(f"reading Redis: {MISSING_REDIS_EXTRA}") from None
        return await RedisSnapshot.open(where, key_prefix)
    return SQLiteSnapshot(where)


class SQLiteSnapshot:
    """A relayd SQLite file, read-only, after checking it is relayd's."""

    def __init__(self, path: str) -> None:
        version = inspect(Path(path))
        if version is None:
            raise StoreOpenError(f"no database at {path}")
        if version == 0:
            raise StoreOpenError(f"{path} is an empty database: nothing to migrate")
        try:
            self.conn = sqlite3.connect(read_only_uri(Path(path)), uri=True)
        except sqlite3.Error as exc:
            raise StoreOpenError(f"cannot open database {path}: {exc}") from exc
        self._tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    async def messages(self) -> AsyncIterator[QueuedMessage]:
        for recipient, sender, message_id, content, timestamp, queued_at in self.conn.execute(
                "SELECT recipient, sender, message_id, content, timestamp, queued_at FROM messages "
                "ORDER BY recipient, seq"):
            yield QueuedMessage(recipient, sender, message_id, content, timestamp, queued_at)

    async def receipts(self) -> AsyncIterator[tuple[Receipt, int]]:
        for seq, recipient, reader, message_id, timestamp in self.conn.execute(
                "SELECT seq, recipient, reader, message_id, timestamp FROM receipts ORDER BY recipient, seq"):
            yield Receipt(recipient, reader, message_id, timestamp), seq

    async def keys(self) -> AsyncIterator[KeyRecord]:
        for row in self.conn.execute("SELECT address, public_key, created_at, updated_at, key_type, issued_at, "
                                     "format, signature FROM keys"):
            yield KeyRecord(*row)

    async def locks(self) -> AsyncIterator[str]:
        if "locks" in self._tables:
            for (address,) in self.conn.execute("SELECT address FROM locks"):
                yield address

    async def floors(self) -> AsyncIterator[tuple[str, int]]:
        if "key_floors" in self._tables:
            for address, issued_at in self.conn.execute("SELECT address, issued_at FROM key_floors"):
                yield address, issued_at

    async def tokens(self, now_ms: int) -> AsyncIterator[tuple[str, str, int]]:
        if "tokens" in self._tables:
            for token_hash, address, expires_at in self.conn.execute(
                    "SELECT hash, address, expires_at FROM tokens WHERE expires_at > ? ORDER BY expires_at",
                    (now_ms,)):
                yield token_hash, address, expires_at

    async def delivered(self) -> AsyncIterator[QueuedMessage]:
        if "delivered" in self._tables:
            for recipient, message_id, sender, queued_at in self.conn.execute(
                    "SELECT recipient, message_id, sender, queued_at FROM delivered ORDER BY recipient"):
                yield QueuedMessage(recipient, sender, message_id, "", 0, queued_at)

    async def history(self) -> AsyncIterator[tuple[QueuedMessage, int]]:
        if "history" in self._tables:
            for recipient, sender, message_id, content, timestamp, queued_at, seq, kept_until in self.conn.execute(
                    "SELECT recipient, sender, message_id, content, timestamp, queued_at, seq, kept_until "
                    "FROM history ORDER BY recipient, timestamp, seq"):
                yield QueuedMessage(recipient, sender, message_id, content, timestamp, queued_at, seq), kept_until

    async def push_subscriptions(self) -> AsyncIterator[PushSubscription]:
        if "push_subscriptions" in self._tables:
            for row in self.conn.execute("SELECT id, address, provider, target, p256dh, auth, created_at, expires_at "
                                         "FROM push_subscriptions ORDER BY address, created_at, id"):
                yield PushSubscription(*row)

    async def key(self, address: str) -> KeyRecord | None:
        row = self.conn.execute("SELECT address, public_key, created_at, updated_at, key_type, issued_at, format, "
                                "signature FROM keys WHERE address = ?", (address,)).fetchone()
        return None if row is None else KeyRecord(*row)

    async def close(self) -> None:
        self.conn.close()
