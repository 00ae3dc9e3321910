"""Push subscriptions in Redis: a part of ``RedisStore``.

An address's subscriptions are three keys in its own slot; the slot's statistics count what they take in the
storage budget (``pbytes``) and the slot's push expiry index lists the address by its expiry, so housekeeping
(``expire``) deletes expired ones and takes them out of the count. They never expire by Redis TTL, which could
not decrement a counter.
"""

from __future__ import annotations

import json
from typing import Any

from ..store import PushSubscription
from . import scripts
from .connection import Commands
from .core import SLOT_BATCH, StoreCore
from .records import chunks

EXPIRE_SCAN = 100
"""Expired addresses read from one slot's index at a time."""
EXPIRE_BATCH = 1000
"""Subscriptions one ``expire`` call deletes before it returns (the caller calls again)."""


class RedisPush:
    def __init__(self, core: StoreCore) -> None:
        self.core = core
        self.link = core.link
        self.layout = core.layout

    async def put(self, sub: PushSubscription, max_per_address: int) -> PushSubscription:
        size = sub.size()
        record = json.dumps([sub.provider, sub.target, sub.p256dh, sub.auth, size], separators=(",", ":"))
        self.core.note_slot(self.layout.slot_of(sub.address))
        created, grown = await self.link.write(
            scripts.PUT_PUSH, list(self.layout.push(sub.address)),
            [sub.id, record, sub.created_at, max_per_address, sub.expires_at, size, sub.address])
        self.core.other_bytes += int(grown)
        return PushSubscription(sub.id, sub.address, sub.provider, sub.target, sub.p256dh, sub.auth,
                                int(created), sub.expires_at)

    async def of(self, address: str, now_ms: int) -> list[PushSubscription]:
        records, order, expires, *_ = self.layout.push(address)

        async def work(client: Commands) -> list[Any]:
            pipe = self.core.pipeline(client)
            pipe.hgetall(records)
            pipe.zrange(order, 0, -1, withscores=True)
            pipe.get(expires)
            return list(await pipe.execute())
        found, created, expires_at = await self.link.read(work)
        if not expires_at or int(expires_at) <= now_ms:
            return []
        out = []
        for sub_id, score in created:
            raw = found.get(sub_id)
            if raw is None:
                continue
            provider, target, p256dh, auth = json.loads(raw)[:4]
            out.append(PushSubscription(sub_id, address, provider, target, p256dh, auth, int(score),
                                        int(expires_at)))
        return out

    async def delete(self, address: str, sub_id: str) -> bool:
        deleted, size = await self.link.write(scripts.DELETE_PUSH, list(self.layout.push(address)),
                                              [sub_id, address])
        self.core.other_bytes -= int(size)
        return int(deleted) == 1

    async def extend(self, address: str, expires_at_ms: int) -> None:
        await self.link.write(scripts.EXTEND_PUSH, list(self.layout.push(address)), [expires_at_ms, address])

    async def expire(self, now_ms: int) -> int:
        """Each slot's index is read from its oldest (``SLOT_BATCH`` slots at a time); each expired address goes
        in a script of its own. Returns once ``EXPIRE_BATCH`` went, or every slot was read."""
        removed = 0
        for part in chunks(await self.core.slots(), SLOT_BATCH):
            indexes = [self.layout.push_expiry(slot) for slot in part]
            for addresses in await self.core.due_members(indexes, str(now_ms), EXPIRE_SCAN):
                for address in addresses:
                    count, size = await self.link.write(scripts.EXPIRE_PUSH, list(self.layout.push(address)),
                                                        [now_ms, address])
                    self.core.other_bytes -= int(size)
                    removed += int(count)
            if removed >= EXPIRE_BATCH:
                break
        return removed
