"""Push subscriptions on SQLite: the ``PushStore`` part of the contract, run as jobs of the store's writer."""

from __future__ import annotations

import sqlite3

from .writer import NONE, Delta, SQLiteWriter
from ..store import PushSubscription

EXPIRE_BATCH = 1000
_COLUMNS = "id, address, provider, target, p256dh, auth, created_at, expires_at"


def _row(row: tuple[str, str, str, str, str, str, int, int]) -> PushSubscription:
    return PushSubscription(*row)


class PushTable:
    """The ``push_subscriptions`` table."""

    def __init__(self, writer: SQLiteWriter) -> None:
        self._writer = writer

    async def put(self, sub: PushSubscription, max_per_address: int) -> PushSubscription:
        def job(conn: sqlite3.Connection) -> tuple[int, Delta]:
            old = conn.execute("SELECT created_at FROM push_subscriptions WHERE address = ? AND id = ?",
                               (sub.address, sub.id)).fetchone()
            created_at = int(old[0]) if old else sub.created_at
            conn.execute(f"INSERT OR REPLACE INTO push_subscriptions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (sub.id, sub.address, sub.provider, sub.target, sub.p256dh, sub.auth, created_at,
                          sub.expires_at))
            conn.execute("DELETE FROM push_subscriptions WHERE address = ? AND id IN (SELECT id FROM "
                         "push_subscriptions WHERE address = ? ORDER BY created_at DESC, id DESC LIMIT -1 OFFSET ?)",
                         (sub.address, sub.address, max_per_address))
            conn.execute("UPDATE push_subscriptions SET expires_at = ? WHERE address = ?",
                         (sub.expires_at, sub.address))
            return created_at, NONE
        created_at = await self._writer.submit(job, write=True)
        return PushSubscription(sub.id, sub.address, sub.provider, sub.target, sub.p256dh, sub.auth, created_at,
                                sub.expires_at)

    async def of(self, address: str, now_ms: int) -> list[PushSubscription]:
        def job(conn: sqlite3.Connection) -> tuple[list[PushSubscription], Delta]:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM push_subscriptions WHERE address = ? AND expires_at > ? "
                                "ORDER BY created_at, id", (address, now_ms)).fetchall()
            return [_row(r) for r in rows], NONE
        return await self._writer.submit(job, write=False)

    async def delete(self, address: str, sub_id: str) -> bool:
        def job(conn: sqlite3.Connection) -> tuple[bool, Delta]:
            return conn.execute("DELETE FROM push_subscriptions WHERE address = ? AND id = ?",
                                (address, sub_id)).rowcount > 0, NONE
        return await self._writer.submit(job, write=True)

    async def extend(self, address: str, expires_at_ms: int) -> None:
        def job(conn: sqlite3.Connection) -> tuple[None, Delta]:
            conn.execute("UPDATE push_subscriptions SET expires_at = ? WHERE address = ?", (expires_at_ms, address))
            return None, NONE
        await self._writer.submit(job, write=True)

    async def expire(self, now_ms: int) -> int:
        def job(conn: sqlite3.Connection) -> tuple[int, Delta]:
            return conn.execute("DELETE FROM push_subscriptions WHERE (address, id) IN (SELECT address, id FROM "
                                "push_subscriptions WHERE expires_at <= ? LIMIT ?)", (now_ms, EXPIRE_BATCH)).rowcount, NONE
        return await self._writer.submit(job, write=True)
