"""Message history in Redis (``[history] days``): pages of an address's kept messages, deletion, expiry.

A part of ``RedisStore``. Messages are kept by the removal and
record-delivered scripts (``scripts.keep``); a page is a read (newest first by
timestamp, filtered by sender while it reads), deletion and expiry are scripts
on the address's slot. A per-slot index (``history_expiry``) lists the
addresses whose kept messages expire first, so expiry visits only those.
"""

from __future__ import annotations

from typing import Any

from ...frames import utf8_len
from ..store import HistoryPage, QueuedMessage
from . import scripts
from .connection import Commands
from .core import SLOT_BATCH, StoreCore
from .records import by_recipient, chunks, decode_message, encode_message

PAGE_SCAN = 200   # kept messages read at a time while a sender filter skips others
EXPIRE_CHUNK = 500
COPY_CHUNK = 200  # kept messages one copy script takes


class RedisHistory:
    def __init__(self, core: StoreCore) -> None:
        self.core = core

    async def page(self, recipient: str, limit: int, before_ms: int | None, sender: str | None) -> HistoryPage:
        keys = self.core.layout.recipient(recipient)
        prefix = None if sender is None else sender.lower() + "\n"
        top = "+inf" if before_ms is None else f"({before_ms}"

        async def work(client: Commands) -> tuple[list[QueuedMessage], bool]:
            found: list[QueuedMessage] = []
            offset = 0
            while True:
                ids = await client.zrevrangebyscore(keys.history_order, top, "-inf", start=offset, num=PAGE_SCAN)
                wanted = [i for i in ids if prefix is None or _text(i).startswith(prefix)]
                for raw in (await client.hmget(keys.history, wanted)) if wanted else []:
                    if raw is None:
                        continue
                    seq, record = _text(raw).split(" ", 1)
                    found.append(decode_message(recipient, seq, record))
                    if len(found) > limit:
                        return found[:limit], True
                if len(ids) < PAGE_SCAN:
                    return found, False
                offset += PAGE_SCAN
        kept, more = await self.core.link.read(work)
        return HistoryPage(kept, more)

    async def copy(self, kept: list[tuple[QueuedMessage, int]]) -> int:
        """``relayd migrate``: keep these messages, each until its time (ms), unless kept already; how many
        were new."""
        copied = 0
        for recipient, group in by_recipient(kept, lambda entry: entry[0].recipient).items():
            self.core.note_slot(self.core.layout.slot_of(recipient))
            for part in chunks(group, COPY_CHUNK):
                args: list[Any] = []
                for m, until in part:
                    size = utf8_len(m.content)
                    args += [m.sender.lower(), m.message_id, m.seq, encode_message(m, size), size, m.timestamp, until]
                count, totals = await self.core.recipient_write(scripts.COPY_HISTORY, recipient, *args)
                self.core.apply_totals(recipient, totals)
                copied += int(count)
        return copied

    async def delete(self, recipient: str, message_ids: list[str] | None) -> int:
        deleted = 0
        for part in [[]] if message_ids is None else chunks(message_ids, 1000):
            mode = "all" if message_ids is None else "id"
            count, totals = await self.core.recipient_write(scripts.DELETE_HISTORY, recipient, mode, *part)
            self.core.apply_totals(recipient, totals)
            deleted += int(count)
        return deleted

    async def expire(self, now_ms: int) -> int:
        """Read the per-slot indexes ``SLOT_BATCH`` slots at a time, then expire each address listed."""
        removed = 0
        due: list[str] = []
        for part in chunks(await self.core.slots(), SLOT_BATCH):
            indexes = [self.core.layout.history_expiry(slot) for slot in part]
            due += [_text(a) for names in await self.core.due_members(indexes, str(now_ms), -1) for a in names]
        for address in due:
            while True:
                count, totals = await self.core.recipient_write(scripts.EXPIRE_HISTORY, address, now_ms,
                                                                EXPIRE_CHUNK)
                self.core.apply_totals(address, totals)
                removed += int(count)
                if int(count) < EXPIRE_CHUNK:
                    break
        return removed


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode()
