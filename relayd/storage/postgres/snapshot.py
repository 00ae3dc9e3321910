"""A PostgreSQL relay's data for ``relayd migrate``: one read-only, repeatable-read transaction, read by cursors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ...config.redact import redact_url
from ...extras import install_hint
from ..store import KeyRecord, PushSubscription, QueuedMessage, Receipt, StorageUnavailable, StoreOpenError
from .link import describe
from .queue import from_pg
from .schema import SCHEMA_VERSION

_PREFETCH = 1000
HISTORY_VERSION = 2
"""The schema version that added message history."""
_KEY_COLUMNS = "address, public_key, created_at, updated_at, key_type, issued_at, format, signature"


def _failures() -> tuple[type[BaseException], ...]:
    """What a source failing while it is read raises (asyncpg is imported with the extra)."""
    import asyncpg
    return asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError


def _failed(exc: BaseException) -> StorageUnavailable:
    return StorageUnavailable(f"reading the source PostgreSQL failed: {describe(exc)}")


def _key(r: Any) -> KeyRecord:
    return KeyRecord(r["address"], r["public_key"], int(r["created_at"]), int(r["updated_at"]), r["key_type"],
                     None if r["issued_at"] is None else int(r["issued_at"]), r["format"], r["signature"])


class PgSnapshot:
    """The ``Snapshot`` of a relayd database on PostgreSQL (see ``storage.snapshot``)."""

    def __init__(self, conn: Any, transaction: Any, version: int = SCHEMA_VERSION) -> None:
        self._conn = conn
        self._transaction = transaction
        self._version = version
        """The source's schema version: one written by an older relayd has no ``history`` table (version 1)."""

    @classmethod
    async def open(cls, url: str) -> PgSnapshot:
        """Connect and start the snapshot; raises StoreOpenError naming what is wrong (never the password)."""
        try:
            import asyncpg
        except ImportError:
            raise StoreOpenError(f"reading PostgreSQL needs the optional extra postgres: {install_hint('postgres')}") \
                from None
        try:
            conn = await asyncpg.connect(url, timeout=10)
        except Exception as exc:
            raise StoreOpenError(f"cannot open PostgreSQL database {redact_url(url)}: {describe(exc)}") from None
        try:
            version = await conn.fetchval("SELECT CASE WHEN to_regclass('relayd_schema_version') IS NULL THEN 0 "
                                          "ELSE (SELECT COALESCE(MAX(version), 0) FROM relayd_schema_version) END")
            if not version:
                raise StoreOpenError(f"{redact_url(url)} holds no relayd data: nothing to migrate")
            if version > SCHEMA_VERSION:
                raise StoreOpenError(f"{redact_url(url)} has relayd schema version {version}, newer than "
                                     f"{SCHEMA_VERSION}; upgrade relayd")
            transaction = conn.transaction(isolation="repeatable_read", readonly=True)
            await transaction.start()
        except BaseException:
            await conn.close()
            raise
        return cls(conn, transaction, int(version))

    async def _rows(self, sql: str, *args: Any) -> AsyncIterator[Any]:
        """The rows of ``sql``; the source failing meanwhile is ``StorageUnavailable`` naming it."""
        try:
            async for row in self._conn.cursor(sql, *args, prefetch=_PREFETCH):
                yield row
        except _failures() as exc:
            raise _failed(exc) from None

    async def messages(self) -> AsyncIterator[QueuedMessage]:
        async for r in self._rows("SELECT recipient, sender, message_id, content, timestamp, queued_at FROM messages "
                                  "ORDER BY recipient, seq"):
            yield QueuedMessage(r["recipient"], r["sender"], from_pg(r["message_id"]), from_pg(r["content"]),
                                int(r["timestamp"]), int(r["queued_at"]))

    async def receipts(self) -> AsyncIterator[tuple[Receipt, int]]:
        async for r in self._rows("SELECT seq, recipient, reader, message_id, timestamp FROM receipts "
                                  "ORDER BY recipient, seq"):
            yield Receipt(r["recipient"], r["reader"], from_pg(r["message_id"]), int(r["timestamp"])), int(r["seq"])

    async def keys(self) -> AsyncIterator[KeyRecord]:
        async for r in self._rows(f"SELECT {_KEY_COLUMNS} FROM keys ORDER BY address"):
            yield _key(r)

    async def key(self, address: str) -> KeyRecord | None:
        try:
            row = await self._conn.fetchrow(f"SELECT {_KEY_COLUMNS} FROM keys WHERE address = $1", address)
        except _failures() as exc:
            raise _failed(exc) from None
        return None if row is None else _key(row)

    async def locks(self) -> AsyncIterator[str]:
        async for r in self._rows("SELECT address FROM locks ORDER BY address"):
            yield str(r["address"])

    async def floors(self) -> AsyncIterator[tuple[str, int]]:
        async for r in self._rows("SELECT address, issued_at FROM key_floors ORDER BY address"):
            yield str(r["address"]), int(r["issued_at"])

    async def tokens(self, now_ms: int) -> AsyncIterator[tuple[str, str, int]]:
        async for r in self._rows("SELECT hash, address, expires_at FROM tokens WHERE expires_at > $1 "
                                  "ORDER BY expires_at", now_ms):
            yield str(r["hash"]), str(r["address"]), int(r["expires_at"])

    async def delivered(self) -> AsyncIterator[QueuedMessage]:
        async for r in self._rows("SELECT recipient, message_id, sender, queued_at FROM delivered ORDER BY recipient"):
            yield QueuedMessage(r["recipient"], r["sender"], from_pg(r["message_id"]), "", 0, int(r["queued_at"]))

    async def history(self) -> AsyncIterator[tuple[QueuedMessage, int]]:
        if self._version < HISTORY_VERSION:
            return
        async for r in self._rows("SELECT recipient, sender, message_id, content, timestamp, queued_at, seq, "
                                  "kept_until FROM history ORDER BY recipient, timestamp, seq"):
            yield QueuedMessage(r["recipient"], r["sender"], from_pg(r["message_id"]), from_pg(r["content"]),
                                int(r["timestamp"]), int(r["queued_at"]), int(r["seq"])), int(r["kept_until"])

    async def push_subscriptions(self) -> AsyncIterator[PushSubscription]:
        async for r in self._rows("SELECT id, address, provider, target, p256dh, auth, created_at, expires_at "
                                  "FROM push_subscriptions ORDER BY address, created_at, id"):
            yield PushSubscription(r["id"], r["address"], r["provider"], r["target"], r["p256dh"], r["auth"],
                                   int(r["created_at"]), int(r["expires_at"]))

    async def close(self) -> None:
        try:
            await self._transaction.rollback()
        except _failures():
            pass  # a connection that failed holds no transaction any more
        finally:
            await self._conn.close()
