"""The key directory, ownership locks and bearer tokens in Redis: a part of ``RedisStore``.

Bearer tokens are found by hash in the hash's slot, and listed (and capped)
in the address's own slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..store import KEY_LOOKUPS_REMEMBERED, KeyRecord
from . import scripts
from .connection import Commands
from .core import StoreCore
from .records import KEY_OPTIONAL, by_recipient, chunks, decode_key, now_ms

SLOT_BATCH = 500  # keys or slots read at once
EXPIRE_KEYS_SCAN = 100  # expired unsigned keys read from one slot's index at a time


class RedisKeys:
    def __init__(self, core: StoreCore) -> None:
        self.core = core
        self.link = core.link
        self.layout = core.layout
        self._looked_up: set[str] = set()
        """Unsigned keys looked up since the last ``expire_keys``."""

    async def get_key(self, address: str) -> KeyRecord | None:
        return (await self.get_keys([address])).get(address)

    async def get_keys(self, addresses: list[str]) -> dict[str, KeyRecord]:
        wanted = list(dict.fromkeys(addresses))
        found: dict[str, KeyRecord] = {}
        for part in chunks(wanted, SLOT_BATCH):
            async def work(client: Commands, part: Sequence[str] = part) -> list[Any]:
                pipe = self.core.pipeline(client)
                for address in part:
                    pipe.hgetall(self.layout.key(address)[0])
                return list(await pipe.execute())
            for address, fields in zip(part, await self.link.read(work)):
                if fields:
                    found[address] = record = decode_key(address, fields)
                    if not record.signed and len(self._looked_up) < KEY_LOOKUPS_REMEMBERED:
                        self._looked_up.add(address)
        return found

    async def put_key(self, record: KeyRecord) -> KeyRecord:
        """Store ``record``; an existing key keeps its original ``created_at``; a signed one raises the floor."""
        await self.write_key(record, "put", "", 0)
        return record

    async def write_key(self, record: KeyRecord, mode: str, ledger: str, ledger_ttl_ms: int) -> str:
        """``put`` or ``migrate`` (remembered in the ledger) ``record``; returns stored, migrated or newer."""
        fields: list[Any] = ["public_key", record.public_key, "updated_at", record.updated_at]
        for name in KEY_OPTIONAL:
            value = getattr(record, name)
            if value is not None:
                fields += [name, value]
        signed_issued = record.issued_at if record.signed and record.issued_at is not None else ""
        self.core.note_slot(self.layout.slot_of(record.address))
        outcome, created_at, *grown = await self.link.write(
            scripts.PUT_KEY, [*self.layout.key(record.address), self._index_of(record.address)],
            [mode, record.created_at, ledger, ledger_ttl_ms, record.updated_at, signed_issued, *fields])
        if outcome == "stored":
            record.created_at = int(created_at)
            self.core.other_bytes += int(grown[0])
        return str(outcome)

    def _index_of(self, address: str) -> str:
        return self.layout.unsigned_keys(self.layout.slot_of(address))

    async def delete_key(self, address: str) -> bool:
        key, stats, _, _ = self.layout.key(address)
        return await self._forget(scripts.DELETE_KEY, key, stats, self._index_of(address))

    async def drop_unsigned_key(self, address: str) -> bool:
        key, stats, _, _ = self.layout.key(address)
        return await self._forget(scripts.DROP_UNSIGNED_KEY, key, stats, self._index_of(address))

    async def _forget(self, script: scripts.Script, key: str, stats: str, index: str, *args: Any) -> bool:
        """Run a script that may delete a key; whether it did (what the key counted leaves the budget)."""
        deleted, size = await self.link.write(script, [key, stats, index], list(args))
        self.core.other_bytes -= int(size)
        return int(deleted) == 1

    async def expire_keys(self, before_ms: int, now_ms: int) -> int:
        """Lookups are written first (a script per slot); then each slot's index of unsigned keys is read
        from its oldest (``SLOT_BATCH`` slots at a time), and each key older than ``before_ms`` goes in a script
        of its own."""
        looked_up, self._looked_up = self._looked_up, set()
        for slot, names in by_recipient([self.layout.key(a)[0] for a in looked_up],
                                        lambda name: self.layout.slot_of(self.layout.address_of_key(name))).items():
            for part in chunks(names, SLOT_BATCH):
                await self.link.write(scripts.TOUCH_KEYS, [self.layout.unsigned_keys(slot)], [now_ms, *part])
        removed = 0
        todo = await self.core.slots()
        while todo:
            slots, todo = todo[:SLOT_BATCH], todo[SLOT_BATCH:]
            indexes = [self.layout.unsigned_keys(slot) for slot in slots]
            pages = await self.core.due_members(indexes, f"({before_ms}", EXPIRE_KEYS_SCAN)
            for slot, index, names in zip(slots, indexes, pages):
                for name in names:
                    stats = self.layout.key(self.layout.address_of_key(name))[1]
                    removed += await self._forget(scripts.EXPIRE_KEY, name, stats, index, before_ms)
                if len(names) == EXPIRE_KEYS_SCAN:  # those went from the index: read it from its oldest again
                    todo.append(slot)
        return removed

    async def key_floor(self, address: str) -> int | None:
        """The floor key, or (for keys stored before floors existed) the stored signed key's ``issued_at``."""
        key, _, _, floor_key = self.layout.key(address)

        async def work(client: Commands) -> list[Any]:
            pipe = self.core.pipeline(client)
            pipe.get(floor_key)
            pipe.hmget(key, ["signature", "issued_at"])
            return list(await pipe.execute())
        floor, (signature, issued) = await self.link.read(work)
        found = [int(v) for v in (floor, issued if signature is not None else None) if v is not None]
        return max(found) if found else None

    async def key_count(self) -> int:
        return (await self.core.stats())["keys"]

    # Ownership locks

    async def is_locked(self, address: str) -> bool:
        async def work(client: Commands) -> int:
            return await client.exists(self.layout.lock(address))
        return bool(await self.link.read(work))

    async def lock(self, address: str) -> None:
        await self.link.write(scripts.LOCK, [self.layout.lock(address)], [now_ms()])

    # Bearer tokens: found by hash in the hash's slot, listed (and capped) in the address's own slot.

    async def save_token(self, token_hash: str, address: str, expires_at_ms: int, max_per_address: int) -> None:
        slot = self.layout.token_slot(token_hash)
        self.core.note_slot(slot)
        saved = self.link.post(scripts.SAVE_TOKEN, list(self.layout.token_slot_keys(slot)),
                               [token_hash, address, expires_at_ms])
        gone = await self.link.write(scripts.OWN_TOKEN, [self.layout.tokens_of(address)],
                                     [token_hash, expires_at_ms, max_per_address])
        await saved
        for slot, hashes in by_recipient(gone, self.layout.token_slot).items():
            await self.link.write(scripts.DROP_TOKENS, list(self.layout.token_slot_keys(slot)), hashes)

    async def token_address(self, token_hash: str, now_ms: int) -> str | None:
        """The lookup by hash, confirmed by the address's own list (a token over the cap is gone from it)."""
        tokens = self.layout.token_slot_keys(self.layout.token_slot(token_hash))[0]

        async def find(client: Commands) -> str | None:
            return await client.hget(tokens, token_hash)
        found = await self.link.read(find)
        if not found:
            return None
        address, _, expires = found.partition(" ")
        if int(expires) <= now_ms:
            return None

        async def listed(client: Commands) -> float | None:
            return await client.zscore(self.layout.tokens_of(address), token_hash)
        return address if await self.link.read(listed) is not None else None
