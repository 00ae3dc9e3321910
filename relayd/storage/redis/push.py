"""Push subscriptions in Redis: a part of ``RedisStore``.

An address's subscriptions are three keys in its own slot that expire together (Redis drops them when no
session of the address signed in for the configured days), so nothing needs sweeping.
"""

from __future__ import annotations

import json
from typing import Any

from ..store import PushSubscription
from . import scripts
from .connection import Commands
from .core import StoreCore


class RedisPush:
    def __init__(self, core: StoreCore) -> None:
        self.core = core
        self.link = core.link
        self.layout = core.layout

    async def put(self, sub: PushSubscription, max_per_address: int) -> PushSubscription:
        record = json.dumps([sub.provider, sub.target, sub.p256dh, sub.auth], separators=(",", ":"))
        created = await self.link.write(scripts.PUT_PUSH, list(self.layout.push(sub.address)),
                                        [sub.id, record, sub.created_at, max_per_address, sub.expires_at])
        return PushSubscription(sub.id, sub.address, sub.provider, sub.target, sub.p256dh, sub.auth,
                                int(created), sub.expires_at)

    async def of(self, address: str, now_ms: int) -> list[PushSubscription]:
        records, order, expires = self.layout.push(address)

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
            provider, target, p256dh, auth = json.loads(raw)
            out.append(PushSubscription(sub_id, address, provider, target, p256dh, auth, int(score),
                                        int(expires_at)))
        return out

    async def delete(self, address: str, sub_id: str) -> bool:
        return int(await self.link.write(scripts.DELETE_PUSH, list(self.layout.push(address)), [sub_id])) == 1

    async def extend(self, address: str, expires_at_ms: int) -> None:
        await self.link.write(scripts.EXTEND_PUSH, list(self.layout.push(address)), [expires_at_ms])
