"""Push subscriptions on PostgreSQL: the ``PushStore`` part of the contract, run on the store's link."""

from __future__ import annotations

from typing import Any

from ..store import PUSH_OVERHEAD_BYTES, PushSubscription
from .link import PgLink
from .totals import Totals

EXPIRE_BATCH = 1000
_COLUMNS = "id, address, provider, target, p256dh, auth, created_at, expires_at"
PUSH_BYTES_SQL = f"(length(target) + length(p256dh) + length(auth) + {PUSH_OVERHEAD_BYTES})"
"""What a row counts in the storage budget (``store.push_bytes``)."""


def _sub(row: Any) -> PushSubscription:
    return PushSubscription(row["id"], row["address"], row["provider"], row["target"], row["p256dh"], row["auth"],
                            int(row["created_at"]), int(row["expires_at"]))


class PgPushTable:
    """The ``push_subscriptions`` table."""

    def __init__(self, link: PgLink, totals: Totals) -> None:
        self._link = link
        self._totals = totals

    async def put(self, sub: PushSubscription, max_per_address: int) -> PushSubscription:
        async def job(conn: Any) -> tuple[int, int]:
            old = await conn.fetchval(f"SELECT {PUSH_BYTES_SQL} FROM push_subscriptions WHERE address = $1 AND id = $2",
                                      sub.address, sub.id)
            created_at = await conn.fetchval(
                f"INSERT INTO push_subscriptions AS p ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
                "ON CONFLICT (address, id) DO UPDATE SET provider = excluded.provider, target = excluded.target, "
                "p256dh = excluded.p256dh, auth = excluded.auth, expires_at = excluded.expires_at "
                "RETURNING p.created_at", sub.id, sub.address, sub.provider, sub.target, sub.p256dh, sub.auth,
                sub.created_at, sub.expires_at)
            pruned = await conn.fetchval(
                f"WITH gone AS (DELETE FROM push_subscriptions WHERE address = $1 AND id IN (SELECT id FROM "
                "push_subscriptions WHERE address = $1 ORDER BY id = $3 DESC, created_at DESC, id DESC OFFSET $2) "
                f"RETURNING {PUSH_BYTES_SQL} AS size) SELECT COALESCE(SUM(size), 0) FROM gone",
                sub.address, max_per_address, sub.id)
            await conn.execute("UPDATE push_subscriptions SET expires_at = $2 WHERE address = $1", sub.address,
                               sub.expires_at)
            return int(created_at), sub.size() - int(old or 0) - int(pruned)
        created_at = await self._totals.sized(self._link.run(job, write=True, transaction=True))
        return PushSubscription(sub.id, sub.address, sub.provider, sub.target, sub.p256dh, sub.auth, created_at,
                                sub.expires_at)

    async def of(self, address: str, now_ms: int) -> list[PushSubscription]:
        async def job(conn: Any) -> list[PushSubscription]:
            rows = await conn.fetch(f"SELECT {_COLUMNS} FROM push_subscriptions WHERE address = $1 AND expires_at > $2 "
                                    "ORDER BY created_at, id", address, now_ms)
            return [_sub(r) for r in rows]
        return await self._link.run(job, write=False)

    async def delete(self, address: str, sub_id: str) -> bool:
        async def job(conn: Any) -> tuple[bool, int]:
            size = await conn.fetchval(f"DELETE FROM push_subscriptions WHERE address = $1 AND id = $2 "
                                       f"RETURNING {PUSH_BYTES_SQL}", address, sub_id)
            return size is not None, -int(size or 0)
        return bool(await self._totals.sized(self._link.run(job, write=True)))

    async def extend(self, address: str, expires_at_ms: int) -> None:
        async def job(conn: Any) -> None:
            await conn.execute("UPDATE push_subscriptions SET expires_at = $2 WHERE address = $1", address,
                               expires_at_ms)
        await self._link.run(job, write=True)

    async def expire(self, now_ms: int) -> int:
        async def job(conn: Any) -> tuple[int, int]:
            row = await conn.fetchrow(
                "WITH gone AS (DELETE FROM push_subscriptions WHERE (address, id) IN (SELECT address, id "
                f"FROM push_subscriptions WHERE expires_at <= $1 LIMIT $2) RETURNING {PUSH_BYTES_SQL} AS size) "
                "SELECT count(*) AS n, COALESCE(SUM(size), 0) AS b FROM gone", now_ms, EXPIRE_BATCH)
            return int(row["n"]), -int(row["b"])
        return int(await self._totals.sized(self._link.run(job, write=True, transaction=True)))

    @staticmethod
    def bytes_sql() -> str:
        """A scalar subquery: what every subscription counts in the budget (for a fresh read of the totals)."""
        return f"(SELECT COALESCE(SUM({PUSH_BYTES_SQL}), 0) FROM push_subscriptions)"
