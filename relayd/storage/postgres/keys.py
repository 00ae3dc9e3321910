"""The key directory on PostgreSQL: published keys, their floors, ownership locks and bearer tokens.

No cache: every lookup asks the database. Unsigned keys looked up are
remembered in memory and written as a use by ``expire_keys``, so lookups
never write. Every change of the keys' size goes into the store's ``Totals``
(the budget counts keys).
"""

from __future__ import annotations

import time
from typing import Any

from ..store import KEY_LOOKUPS_REMEMBERED, KEY_OVERHEAD_BYTES, KeyRecord
from .link import PgLink
from .totals import Totals

EXPIRE_KEYS_CHUNK = 1000
KEY_BYTES_SQL = f"(length(public_key) + COALESCE(length(signature), 0) + {KEY_OVERHEAD_BYTES})"
LAST_USE_SQL = "GREATEST(updated_at, COALESCE(used_at, 0))"

_RAISE_FLOOR = ("INSERT INTO key_floors AS f (address, issued_at) VALUES ($1, $2) ON CONFLICT (address) "
                "DO UPDATE SET issued_at = GREATEST(f.issued_at, excluded.issued_at)")
_KEY_COLUMNS = "address, public_key, created_at, updated_at, key_type, issued_at, format, signature"


def _record(row: Any) -> KeyRecord:
    return KeyRecord(row["address"], row["public_key"], int(row["created_at"]), int(row["updated_at"]),
                     row["key_type"], None if row["issued_at"] is None else int(row["issued_at"]),
                     row["format"], row["signature"])


class PgKeyDirectory:
    """The key, ownership and token part of the ``Store`` contract, run on ``link``."""

    def __init__(self, link: PgLink, totals: Totals) -> None:
        self._link = link
        self._totals = totals
        self._looked_up: set[str] = set()
        """Unsigned keys looked up since the last ``expire_keys``."""

    async def get_key(self, address: str) -> KeyRecord | None:
        return (await self.get_keys([address])).get(address)

    async def get_keys(self, addresses: list[str]) -> dict[str, KeyRecord]:
        wanted = list(dict.fromkeys(addresses))
        if not wanted:
            return {}

        async def job(conn: Any) -> dict[str, KeyRecord]:
            rows = await conn.fetch(f"SELECT {_KEY_COLUMNS} FROM keys WHERE address = ANY($1::text[])", wanted)
            return {row["address"]: _record(row) for row in rows}
        found = await self._link.run(job, write=False)
        for address, record in found.items():
            if not record.signed and len(self._looked_up) < KEY_LOOKUPS_REMEMBERED:
                self._looked_up.add(address)
        return found

    async def put_key(self, record: KeyRecord) -> KeyRecord:
        """Store ``record``; an existing key keeps its original ``created_at``; a signed one raises the floor."""
        async def job(conn: Any) -> tuple[int, int]:
            old = await conn.fetchval(f"SELECT {KEY_BYTES_SQL} FROM keys WHERE address = $1 FOR UPDATE",
                                      record.address)
            row = await conn.fetchrow(
                f"INSERT INTO keys AS k ({_KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
                "ON CONFLICT (address) DO UPDATE SET public_key = excluded.public_key, updated_at = "
                "excluded.updated_at, key_type = excluded.key_type, issued_at = excluded.issued_at, format = "
                "excluded.format, signature = excluded.signature "
                f"RETURNING created_at, {KEY_BYTES_SQL} AS size",
                record.address, record.public_key, record.created_at, record.updated_at, record.key_type,
                record.issued_at, record.format, record.signature)
            if record.signed and record.issued_at is not None:
                await conn.execute(_RAISE_FLOOR, record.address, record.issued_at)
            return int(row["created_at"]), int(row["size"]) - int(old or 0)
        record.created_at = await self._totals.sized(self._link.run(job, write=True, transaction=True))
        return record

    async def delete_key(self, address: str) -> bool:
        return await self._delete(address, "")

    async def drop_unsigned_key(self, address: str) -> bool:
        return await self._delete(address, " AND signature IS NULL")

    async def _delete(self, address: str, condition: str) -> bool:
        async def job(conn: Any) -> tuple[bool, int]:
            size = await conn.fetchval(f"DELETE FROM keys WHERE address = $1{condition} RETURNING {KEY_BYTES_SQL}",
                                       address)
            return size is not None, -int(size or 0)
        return bool(await self._totals.sized(self._link.run(job, write=True)))

    async def expire_keys(self, before_ms: int, now_ms: int) -> int:
        looked_up, self._looked_up = list(self._looked_up), set()

        async def mark(conn: Any) -> None:
            await conn.execute("UPDATE keys SET used_at = $2 WHERE signature IS NULL AND address = ANY($1::text[])",
                               looked_up, now_ms)

        async def chunk(conn: Any) -> tuple[int, int]:  # (keys gone, change of bytes)
            row = await conn.fetchrow(
                f"WITH gone AS (DELETE FROM keys WHERE address IN (SELECT address FROM keys WHERE signature IS NULL "
                f"AND {LAST_USE_SQL} < $1 LIMIT $2) RETURNING {KEY_BYTES_SQL} AS size) "
                "SELECT count(*) AS n, COALESCE(SUM(size), 0) AS bytes FROM gone", before_ms, EXPIRE_KEYS_CHUNK)
            return int(row["n"]), -int(row["bytes"])
        if looked_up:
            await self._link.run(mark, write=True)
        removed = 0
        while True:
            gone = int(await self._totals.sized(self._link.run(chunk, write=True)))
            removed += gone
            if gone < EXPIRE_KEYS_CHUNK:
                return removed

    async def raise_key_floor(self, address: str, issued_at: int) -> None:
        """Raise the floor of ``address`` to at least ``issued_at`` (``relayd migrate`` copies floors)."""
        async def job(conn: Any) -> None:
            await conn.execute(_RAISE_FLOOR, address, issued_at)
        await self._link.run(job, write=True)

    async def key_floor(self, address: str) -> int | None:
        async def job(conn: Any) -> int | None:
            floor = await conn.fetchval("SELECT issued_at FROM key_floors WHERE address = $1", address)
            return None if floor is None else int(floor)
        return await self._link.run(job, write=False)

    async def key_count(self) -> int:
        async def job(conn: Any) -> int:
            return int(await conn.fetchval("SELECT count(*) FROM keys"))
        return await self._link.run(job, write=False)

    async def is_locked(self, address: str) -> bool:
        async def job(conn: Any) -> bool:
            return await conn.fetchval("SELECT 1 FROM locks WHERE address = $1", address) is not None
        return await self._link.run(job, write=False)

    async def lock(self, address: str) -> None:
        stamp = int(time.time() * 1000)

        async def job(conn: Any) -> None:
            await conn.execute("INSERT INTO locks (address, locked_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                               address, stamp)
        await self._link.run(job, write=True)

    async def save_token(self, token_hash: str, address: str, expires_at_ms: int, max_per_address: int) -> None:
        async def job(conn: Any) -> None:
            await conn.execute("INSERT INTO tokens (hash, address, expires_at) VALUES ($1, $2, $3) ON CONFLICT "
                               "(hash) DO UPDATE SET address = excluded.address, expires_at = excluded.expires_at",
                               token_hash, address, expires_at_ms)
            await conn.execute("DELETE FROM tokens WHERE address = $1 AND hash NOT IN (SELECT hash FROM tokens "
                               "WHERE address = $1 ORDER BY hash = $3 DESC, expires_at DESC, hash DESC LIMIT $2)",
                               address, max_per_address, token_hash)
        await self._link.run(job, write=True, transaction=True)

    async def token_address(self, token_hash: str, now_ms: int) -> str | None:
        async def job(conn: Any) -> str | None:
            found = await conn.fetchval("SELECT address FROM tokens WHERE hash = $1 AND expires_at > $2",
                                        token_hash, now_ms)
            return None if found is None else str(found)
        return await self._link.run(job, write=False)
