"""What every part of the Redis store works with: the link, the key layout, and the per-slot bookkeeping.

The parts (``messages``, ``keys``, ``receipts``, ``retention``, ``lifecycle``)
each hold this one object; ``RedisStore`` holds them all.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Sequence
from typing import Any, TypeAlias


from redis.asyncio.client import Pipeline

from . import scripts
from .connection import Commands, RedisLink, read_script
from .layout import Layout
from .records import SlotTotals, chunks
from ..store import RECEIPT_BYTES

SLOT_BATCH = 500         # per-slot keys read at once (one script call, or one pipeline on a Cluster)
STAT_FIELDS = ("recipients", "messages", "bytes", "receipts", "keys", "kbytes", "pbytes")
"""Per-slot statistics; ``kbytes`` and ``pbytes`` are what the slot's keys and push subscriptions count in the
storage budget (``store.key_bytes``, ``store.push_bytes``)."""

Pipe: TypeAlias = "Pipeline[str]"


class StoreCore:
    """The link and layout, the slots known to hold data, and the per-slot totals."""

    def __init__(self, link: RedisLink, layout: Layout) -> None:
        self.link = link
        self.layout = layout
        self.totals = SlotTotals()
        self.other_bytes = 0
        """What receipts, keys and push subscriptions count in the storage budget: as of the last ``stats``,
        plus this instance's writes since."""
        self._known_slots: set[int] = set()
        link.health.on_failure = self.forget_assumptions

    def forget_assumptions(self) -> None:
        """After a failure Redis may have restarted with other data: note slots again, trust the next read."""
        self._known_slots.clear()
        self.totals.trust_next_read = True

    def pipeline(self, client: Commands) -> Pipe:
        """A non-transactional pipeline; a Cluster's splits itself per node (and has the same commands)."""
        return client.pipeline() if self.link.cluster else client.pipeline(transaction=False)

    def note_slot(self, slot: int) -> asyncio.Future[Any] | None:
        """Record a slot in the set expiry, statistics and the cluster's presence walk (once per process, and
        again after a failure): queued, not awaited, so it shares the round trip of the write that follows (a call
        of one merged script call with the slots noted meanwhile, before the merged enqueue being filled)."""
        if slot in self._known_slots:
            return None
        self._known_slots.add(slot)
        noted = self.link.merge(scripts.ADD_SLOTS, self.layout.slots_keys, (), (slot,), early=True)

        def forget(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None:
                self._known_slots.discard(slot)
        noted.add_done_callback(forget)
        return noted

    async def slots(self) -> list[int]:
        """The hash slots that hold relayd data (noted by ``note_slot``). Raises StorageUnavailable."""
        async def work(client: Commands) -> list[int]:
            return sorted(int(m) for m in await client.smembers(self.layout.slots))
        return await self.link.read(work)

    def recipient_write(self, script: scripts.Script, address: str, *args: Any) -> asyncio.Future[Any]:
        """Run ``script`` on ``address``'s keys (one hash slot), in write order (``RedisLink.write``)."""
        return self.link.write(script, self.layout.script_keys(address), (address, *args))

    def apply_totals(self, address: str, totals: Sequence[Any]) -> None:
        """Take the totals a script returned for ``address``'s slot."""
        self.totals.apply(self.layout.slot_of(address), totals)

    async def stats(self) -> dict[str, int]:
        """Sum every slot's statistics (and take its totals, so they include other instances' writes)."""
        sums = dict.fromkeys(STAT_FIELDS, 0)
        force, self.totals.trust_next_read = self.totals.trust_next_read, False
        slots = await self.slots()
        for part in chunks(slots, SLOT_BATCH):
            for slot, row in zip(part, await self.link.read(functools.partial(self._slot_stats, part))):
                for name, value in zip(STAT_FIELDS, row):
                    sums[name] += int(value or 0)
                self.totals.apply(slot, (row[1], row[2], row[len(STAT_FIELDS)]), force=force)
        self.other_bytes = sums["receipts"] * RECEIPT_BYTES + sums.pop("kbytes") + sums.pop("pbytes")
        return sums

    async def due_members(self, indexes: Sequence[str], until: str, count: int,
                          offsets: Sequence[int] | None = None) -> list[list[str]]:
        """The members of these per-slot sorted sets scored up to ``until`` (a ZRANGEBYSCORE bound: "(n" leaves n
        out), at most ``count`` of each (-1: all) from its offset in ``offsets`` (none: 0), lowest first. One
        script call on a single server, a pipeline on a Cluster (one slot per command there): a redis-py
        pipeline cost about 40 us of relayd's CPU per slot, and housekeeping reads an index of every slot."""
        starts = offsets if offsets is not None else [0] * len(indexes)

        async def work(client: Commands) -> list[list[str]]:
            if not self.link.cluster:
                return list(await read_script(client, scripts.DUE_MEMBERS, indexes, (until, count, *starts)))
            pipe = self.pipeline(client)
            for index, start in zip(indexes, starts):
                pipe.zrangebyscore(index, "-inf", until, start=start, num=count)
            return list(await pipe.execute())
        return await self.link.read(work)

    async def _slot_stats(self, part: Sequence[int], client: Commands) -> list[Any]:
        """The statistics of these slots (``STAT_FIELDS`` and ``ver`` each): one script call on a single server,
        a pipeline on a Cluster (one slot per command there)."""
        keys = [self.layout.slot_keys(slot)[1] for slot in part]
        if not self.link.cluster:
            return list(json.loads(await read_script(client, scripts.SLOT_STATS, keys, (*STAT_FIELDS, "ver"))))
        pipe = self.pipeline(client)
        for key in keys:
            pipe.hmget(key, [*STAT_FIELDS, "ver"])
        return list(await pipe.execute())
