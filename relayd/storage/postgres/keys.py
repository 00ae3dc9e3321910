"""The key directory on PostgreSQL: published keys, their floors, ownership locks and bearer tokens.

No cache: several instances may write the same database, so every lookup asks it.
"""

from __future__ import annotations

import time
from typing import Any

from ..store import KeyRecord
from .link import PgLink

_RAISE_FLOOR = ("INSERT INTO key_floors AS f (address, issued_at) VALUES ($1, $2) ON CONFLICT (address) "
                "DO UPDATE SET issued_at = GREATEST(f.issued_at, excluded.issued_at)")
_KEY_COLUMNS = "address, public_key, created_at, updated_at, key_type, issued_at, format, signature"


def _record(row: Any) -> KeyRecord:
    return KeyRecord(row["address"], row["public_key"], int(row["created_at"]), int(row["updated_at"]),
                     row["key_type"], None if row["issued_at"] is None else int(row["issued_at"]),
                     row["format"], row["signature"])


class PgKeyDirectory:
    """The key, ownership and token part of the ``Store`` contract, run on ``link``."""

    def __init__(self, link: PgLink) -> None:
        self._link = link

    async def get_key(self, address: str) -> KeyRecord | None:
        return (await self.get_keys([address])).get(address)

    async def get_keys(self, addresses: list[str]) -> dict[str, KeyRecord]:
        wanted = list(dict.fromkeys(addresses))
        if not wanted:
            return {}

        async def job(conn: Any) -> dict[str, KeyRecord]:
            rows = await conn.fetch(f"SELECT {_KEY_COLUMNS} FROM keys WHERE address = ANY($1::text[])", wanted)
            return {row["address"]: _record(row) for row in rows}
        return await self._link.run(job, write=False)

    async def put_key(self, record: KeyRecord) -> KeyRecord:
        """Store ``record``; an existing key keeps its original ``created_at``; a signed one raises the floor."""
        async def job(conn: Any) -> int:
            created_at = await conn.fetchval(
                f"INSERT INTO keys AS k ({_KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
                "ON CONFLICT (address) DO UPDATE SET public_key = excluded.public_key, updated_at = "
                "excluded.updated_at, key_type = excluded.key_type, issued_at = excluded.issued_at, format = "
                "excluded.format, signature = excluded.signature RETURNING k.created_at",
                record.address, record.public_key, record.created_at, record.updated_at, record.key_type,
                record.issued_at, record.format, record.signature)
            if record.signed and record.issued_at is not None:
                await conn.execute(_RAISE_FLOOR, record.address, record.issued_at)
            return int(created_at)
        record.created_at = await self._link.run(job, write=True, transaction=True)
        return record

    async def delete_key(self, address: str) -> bool:
        async def job(conn: Any) -> bool:
            return str(await conn.execute("DELETE FROM keys WHERE address = $1", address)) != "DELETE 0"
        return await self._link.run(job, write=True)

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
                               "WHERE address = $1 ORDER BY expires_at DESC LIMIT $2)", address, max_per_address)
        await self._link.run(job, write=True, transaction=True)

    async def token_address(self, token_hash: str, now_ms: int) -> str | None:
        async def job(conn: Any) -> str | None:
            found = await conn.fetchval("SELECT address FROM tokens WHERE hash = $1 AND expires_at > $2",
                                        token_hash, now_ms)
            return None if found is None else str(found)
        return await self._link.run(job, write=False)
