"""The key directory on SQLite: published keys (with a cache of recent lookups), floors, ownership locks, tokens.

``SQLiteStore`` holds one ``KeyDirectory`` on its writer and hands it the
key, ownership and token part of the ``Store`` contract. Every key write
passes through this class, so the cache never goes stale.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections import OrderedDict

from .queue import chunks, marks
from .writer import NONE, Delta, SQLiteWriter
from ..store import KEY_LOOKUPS_REMEMBERED, KEY_OVERHEAD_BYTES, KeyRecord, key_bytes

KEY_CACHE_SIZE = 4096
EXPIRE_KEYS_CHUNK = 1000  # keys one expiry transaction deletes at most
LAST_USE_SQL = "max(updated_at, COALESCE(used_at, 0))"
"""When an unsigned key was last uploaded or looked up (the expression of its index)."""
KEY_BYTES_SQL = f"(length(public_key) + COALESCE(length(signature), 0) + {KEY_OVERHEAD_BYTES})"
"""``store.key_bytes`` of a row, in SQL."""
_KEY_COLUMNS = ("address, public_key, created_at, updated_at, key_type, issued_at, "
                "format, signature")


class KeyDirectory:
    """The key, ownership and token part of the ``Store`` contract, run as jobs of ``writer``."""

    def __init__(self, writer: SQLiteWriter) -> None:
        self._writer = writer
        self._key_cache: OrderedDict[str, KeyRecord | None] = OrderedDict()
        self._looked_up: set[str] = set()
        """Unsigned keys looked up since the last ``expire_keys``."""

    # Keys

    async def get_key(self, address: str) -> KeyRecord | None:
        if address in self._key_cache:
            self._key_cache.move_to_end(address)
            record = self._key_cache[address]
            self._note_lookup(address, record)
            return record
        return (await self.get_keys([address])).get(address)

    def _note_lookup(self, address: str, record: KeyRecord | None) -> None:
        if record is not None and not record.signed and len(self._looked_up) < KEY_LOOKUPS_REMEMBERED:
            self._looked_up.add(address)

    async def get_keys(self, addresses: list[str]) -> dict[str, KeyRecord]:
        """Lookups are served from a small cache of recent keys (hits and misses);
        every key write passes through this store, so it never goes stale."""
        found: dict[str, KeyRecord] = {}
        wanted = []
        for address in dict.fromkeys(addresses):
            if address not in self._key_cache:
                wanted.append(address)
            elif (cached := self._key_cache[address]) is not None:
                found[address] = cached
                self._note_lookup(address, cached)
        if not wanted:
            return found

        def job(conn: sqlite3.Connection) -> tuple[dict[str, KeyRecord], Delta]:
            rows: dict[str, KeyRecord] = {}
            for part in chunks(wanted):
                for row in conn.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE address IN ({marks(len(part))})",
                                        part):
                    rows[row[0]] = KeyRecord(*row)
            return rows, NONE
        rows = await self._writer.submit(job, write=False)
        for address in wanted:
            self._cache_key(address, rows.get(address))
            self._note_lookup(address, rows.get(address))
        found.update(rows)
        return found

    def _cache_key(self, address: str, record: KeyRecord | None) -> None:
        cache = self._key_cache
        cache[address] = record
        cache.move_to_end(address)
        if len(cache) > KEY_CACHE_SIZE:
            cache.popitem(last=False)

    async def put_key(self, record: KeyRecord) -> KeyRecord:
        """Store ``record``; an existing key keeps its original ``created_at``; a signed one raises the floor."""
        row = (record.address, record.public_key, record.created_at, record.updated_at,
               record.key_type, record.issued_at, record.format, record.signature)

        def job(conn: sqlite3.Connection) -> tuple[int, Delta]:
            old = conn.execute(f"SELECT created_at, {KEY_BYTES_SQL} FROM keys WHERE address = ?",
                               (row[0],)).fetchone()
            created_at = int(old[0]) if old else record.created_at
            grown = key_bytes(record.public_key, record.signature) - (int(old[1]) if old else 0)
            conn.execute(f"INSERT OR REPLACE INTO keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (*row[:2], created_at, *row[3:]))
            if record.signed and record.issued_at is not None:
                conn.execute("INSERT INTO key_floors (address, issued_at) VALUES (?, ?) ON CONFLICT (address) "
                             "DO UPDATE SET issued_at = max(issued_at, excluded.issued_at)",
                             (record.address, record.issued_at))
            return created_at, (0, grown)
        self._key_cache.pop(record.address, None)
        record.created_at = await self._writer.submit(job, write=True)
        self._cache_key(record.address, dataclasses.replace(record))
        return record

    async def delete_key(self, address: str) -> bool:
        def job(conn: sqlite3.Connection) -> tuple[bool, Delta]:
            gone = conn.execute(f"DELETE FROM keys WHERE address = ? RETURNING {KEY_BYTES_SQL}",
                                (address,)).fetchone()
            return gone is not None, (0, -int(gone[0]) if gone else 0)
        self._key_cache.pop(address, None)
        deleted = await self._writer.submit(job, write=True)
        self._cache_key(address, None)
        return deleted

    async def raise_key_floor(self, address: str, issued_at: int) -> None:
        """Raise the floor of ``address`` to at least ``issued_at`` (``relayd migrate`` copies floors)."""
        def job(conn: sqlite3.Connection) -> tuple[None, Delta]:
            conn.execute("INSERT INTO key_floors (address, issued_at) VALUES (?, ?) ON CONFLICT (address) "
                         "DO UPDATE SET issued_at = max(issued_at, excluded.issued_at)", (address, issued_at))
            return None, NONE
        await self._writer.submit(job, write=True)

    async def drop_unsigned_key(self, address: str) -> bool:
        def job(conn: sqlite3.Connection) -> tuple[bool, Delta]:
            gone = conn.execute(f"DELETE FROM keys WHERE address = ? AND signature IS NULL RETURNING {KEY_BYTES_SQL}",
                                (address,)).fetchone()
            return gone is not None, (0, -int(gone[0]) if gone else 0)
        self._key_cache.pop(address, None)
        dropped = await self._writer.submit(job, write=True)
        self._key_cache.pop(address, None)  # a lookup that raced the deletion may have cached the old key
        return dropped

    async def expire_keys(self, before_ms: int, now_ms: int) -> int:
        looked_up, self._looked_up = list(self._looked_up), set()

        def mark(conn: sqlite3.Connection) -> tuple[None, Delta]:
            for part in chunks(looked_up):
                conn.execute(f"UPDATE keys SET used_at = ? WHERE signature IS NULL AND address IN "
                             f"({marks(len(part))})", (now_ms, *part))
            return None, NONE

        def chunk(conn: sqlite3.Connection) -> tuple[list[str], Delta]:
            rows = conn.execute(f"DELETE FROM keys WHERE address IN (SELECT address FROM keys WHERE signature IS "
                                f"NULL AND {LAST_USE_SQL} < ? LIMIT ?) RETURNING address, {KEY_BYTES_SQL}",
                                (before_ms, EXPIRE_KEYS_CHUNK)).fetchall()
            return [r[0] for r in rows], (0, -sum(int(r[1]) for r in rows))
        if looked_up:
            await self._writer.submit(mark, write=True)
        removed = 0
        while True:
            gone = await self._writer.submit(chunk, write=True)
            for address in gone:
                self._key_cache.pop(address, None)
            removed += len(gone)
            if len(gone) < EXPIRE_KEYS_CHUNK:
                return removed

    async def key_floor(self, address: str) -> int | None:
        def job(conn: sqlite3.Connection) -> tuple[int | None, Delta]:
            row = conn.execute("SELECT issued_at FROM key_floors WHERE address = ?", (address,)).fetchone()
            return (int(row[0]) if row else None), NONE
        return await self._writer.submit(job, write=False)

    async def key_count(self) -> int:
        def job(conn: sqlite3.Connection) -> tuple[int, Delta]:
            return int(conn.execute("SELECT COUNT(*) FROM keys").fetchone()[0]), NONE
        return await self._writer.submit(job, write=False)

    # Ownership locks and tokens

    async def is_locked(self, address: str) -> bool:
        def job(conn: sqlite3.Connection) -> tuple[bool, Delta]:
            return conn.execute("SELECT 1 FROM locks WHERE address = ?", (address,)).fetchone() is not None, NONE
        return await self._writer.submit(job, write=False)

    async def lock(self, address: str) -> None:
        stamp = int(time.time() * 1000)

        def job(conn: sqlite3.Connection) -> tuple[None, Delta]:
            conn.execute("INSERT OR IGNORE INTO locks (address, locked_at) VALUES (?, ?)", (address, stamp))
            return None, NONE
        await self._writer.submit(job, write=True)

    async def save_token(self, token_hash: str, address: str, expires_at_ms: int, max_per_address: int) -> None:
        def job(conn: sqlite3.Connection) -> tuple[None, Delta]:
            conn.execute("INSERT OR REPLACE INTO tokens (hash, address, expires_at) VALUES (?, ?, ?)",
                         (token_hash, address, expires_at_ms))
            conn.execute("DELETE FROM tokens WHERE address = ? AND hash NOT IN (SELECT hash FROM tokens "
                         "WHERE address = ? ORDER BY hash = ? DESC, expires_at DESC, hash DESC LIMIT ?)",
                         (address, address, token_hash, max_per_address))
            return None, NONE
        await self._writer.submit(job, write=True)

    async def token_address(self, token_hash: str, now_ms: int) -> str | None:
        def job(conn: sqlite3.Connection) -> tuple[str | None, Delta]:
            row = conn.execute("SELECT address FROM tokens WHERE hash = ? AND expires_at > ?",
                               (token_hash, now_ms)).fetchone()
            return (str(row[0]) if row else None), NONE
        return await self._writer.submit(job, write=False)
