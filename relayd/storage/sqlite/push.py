"""Push subscriptions on SQLite: the ``PushStore`` part of the contract, run as jobs of the store's writer.

Every change returns what it adds to or takes from the storage budget (``store.push_bytes`` of each row), so
the writer's byte total stays exact."""

from __future__ import annotations

import sqlite3

from .writer import NONE, Delta, SQLiteWriter
from ..store import PUSH_OVERHEAD_BYTES, PushSubscription

EXPIRE_BATCH = 1000
_COLUMNS = "id, address, provider, target, p256dh, auth, created_at, expires_at"
PUSH_BYTES_SQL = f"(length(target) + length(p256dh) + length(auth) + {PUSH_OVERHEAD_BYTES})"
"""``store.push_bytes`` of a row, in SQL."""


def _row(row: tuple[str, str, str, str, str, str, int, int]) -> PushSubscription:
    return PushSubscription(*row)


class PushTable:
    """The ``push_subscriptions`` table."""

    def __init__(self, writer: SQLiteWriter) -> None:
        self._writer = writer

    async def put(self, sub: PushSubscription, max_per_address: int) -> PushSubscription:
        def job(conn: sqlite3.Connection) -> tuple[int, Delta]:
            old = conn.execute(f"SELECT created_at, {PUSH_BYTES_SQL} FROM push_subscriptions WHERE address = ? "
                               "AND id = ?", (sub.address, sub.id)).fetchone()
            created_at = int(old[0]) if old else sub.created_at
            grown = sub.size() - (int(old[1]) if old else 0)
            conn.execute(f"INSERT OR REPLACE INTO push_subscriptions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (sub.id, sub.address, sub.provider, sub.target, sub.p256dh, sub.auth, created_at,
                          sub.expires_at))
            gone = conn.execute(f"DELETE FROM push_subscriptions WHERE address = ? AND id IN (SELECT id FROM "
                                "push_subscriptions WHERE address = ? ORDER BY id = ? DESC, created_at DESC, id DESC "
                                f"LIMIT -1 OFFSET ?) RETURNING {PUSH_BYTES_SQL}",
                                (sub.address, sub.address, sub.id, max_per_address)).fetchall()
            conn.execute("UPDATE push_subscriptions SET expires_at = ? WHERE address = ?",
                         (sub.expires_at, sub.address))
            return created_at, (0, grown - sum(int(r[0]) for r in gone))
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
            gone = conn.execute(f"DELETE FROM push_subscriptions WHERE address = ? AND id = ? "
                                f"RETURNING {PUSH_BYTES_SQL}", (address, sub_id)).fetchone()
            return gone is not None, (0, -int(gone[0]) if gone else 0)
        return await self._writer.submit(job, write=True)

    async def extend(self, address: str, expires_at_ms: int) -> None:
        def job(conn: sqlite3.Connection) -> tuple[None, Delta]:
            conn.execute("UPDATE push_subscriptions SET expires_at = ? WHERE address = ?", (expires_at_ms, address))
            return None, NONE
        await self._writer.submit(job, write=True)

    async def expire(self, now_ms: int) -> int:
        def job(conn: sqlite3.Connection) -> tuple[int, Delta]:
            rows = conn.execute(f"DELETE FROM push_subscriptions WHERE (address, id) IN (SELECT address, id FROM "
                                f"push_subscriptions WHERE expires_at <= ? LIMIT ?) RETURNING {PUSH_BYTES_SQL}",
                                (now_ms, EXPIRE_BATCH)).fetchall()
            return len(rows), (0, -sum(int(r[0]) for r in rows))
        return await self._writer.submit(job, write=True)


def push_bytes_total(conn: sqlite3.Connection) -> int:
    """What every stored subscription counts (read once, when the store opens)."""
    return int(conn.execute(f"SELECT COALESCE(SUM({PUSH_BYTES_SQL}), 0) FROM push_subscriptions").fetchone()[0])
