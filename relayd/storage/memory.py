"""The in-memory backend: the original relay's behaviour, lost on restart.

For tests and throwaway relays. Same contract as the SQLite backend,
including idempotent messageIds (also of delivered messages, until they
expire), per-recipient limits and the storage budget; acks are O(1) per id
through an index by messageId.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import time
from typing import TypeVar

from ..frames import utf8_len
from .store import (
    KEY_LOOKUPS_REMEMBERED,
    RECEIPT_BYTES,
    EnqueueResult,
    HistoryPage,
    KeyRecord,
    PushSubscription,
    QueuedMessage,
    QueueLimits,
    Receipt,
    StorageUnavailable,
    key_bytes,
)

log = logging.getLogger("relayd.storage")

Ident = tuple[str, str, str]


_T = TypeVar("_T")


def _past_cap(others: list[_T], cap: int) -> list[_T]:
    """Of an address's others, oldest first, those that go so that they and the one just stored fit in ``cap``."""
    return others[:max(0, len(others) - (cap - 1))]


def _ident(msg: QueuedMessage) -> Ident:
    return (msg.sender.lower(), msg.recipient, msg.message_id)


class _Queue:
    __slots__ = ("messages", "by_id", "bytes")

    def __init__(self) -> None:
        self.messages: dict[int, QueuedMessage] = {}
        self.by_id: dict[str, set[int]] = {}
        self.bytes = 0


class _Delivered:
    """Idents of messages delivered, each until the ``queued_at`` it carries expires."""

    __slots__ = ("since", "_order")

    def __init__(self) -> None:
        self.since: dict[Ident, int] = {}
        self._order: list[tuple[int, Ident]] = []
        """A heap by queued_at; entries of idents forgotten or recorded again meanwhile are skipped."""

    def record(self, ident: Ident, queued_at: int) -> None:
        when = max(queued_at, self.since.get(ident, queued_at))
        self.since[ident] = when
        heapq.heappush(self._order, (when, ident))

    def forget(self, ident: Ident) -> None:
        self.since.pop(ident, None)

    def expire(self, before_ms: int) -> None:
        order = self._order
        while order and order[0][0] < before_ms:
            when, ident = heapq.heappop(order)
            if self.since.get(ident) == when:
                del self.since[ident]

    def shift(self, before_ms: int, delta_ms: int) -> int:
        moved = 0
        for ident, when in self.since.items():
            if when < before_ms:
                self.since[ident] = when + delta_ms
                moved += 1
        self._order = [(when, ident) for ident, when in self.since.items()]
        heapq.heapify(self._order)
        return moved


class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}
        self._stored: dict[Ident, int] = {}
        """The seq of every stored message, by (sender lower-cased, recipient, messageId)."""
        self._delivered = _Delivered()
        self._receipts: dict[str, list[Receipt]] = {}
        self._keys: dict[str, KeyRecord] = {}
        self._floors: dict[str, int] = {}
        self._key_used: dict[str, int] = {}
        """When an unsigned key was last looked up, as written by ``expire_keys``."""
        self._looked_up: set[str] = set()
        self._locked: set[str] = set()
        self._tokens: dict[str, tuple[str, int]] = {}
        self._push: dict[str, dict[str, PushSubscription]] = {}
        self._last_seq = 0
        self._total = 0
        self._bytes = 0
        self._history_ms = 0
        self._history: dict[str, dict[tuple[str, str], tuple[QueuedMessage, int]]] = {}
        """Per recipient, by (sender lower-cased, messageId): (the message, kept until (epoch ms))."""
        self._other_bytes = 0
        """What receipts, keys and push subscriptions count in the storage budget."""

    @property
    def healthy(self) -> bool:
        return True

    @property
    def problem(self) -> str | None:
        return None

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _next_seq(self) -> int:
        self._last_seq += 1
        return self._last_seq

    # Messages

    async def enqueue_many(self, messages: list[QueuedMessage], limits: QueueLimits) -> list[EnqueueResult]:
        return [self._enqueue(msg, limits) for msg in messages]

    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> EnqueueResult:
        return self._enqueue(msg, limits)

    def _enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> EnqueueResult:
        ident = (msg.sender.lower(), msg.recipient, msg.message_id)
        stored = self._stored.get(ident)
        if stored is not None:
            msg.seq = stored
            return EnqueueResult.DUPLICATE
        if ident in self._delivered.since:
            return EnqueueResult.DELIVERED
        size = utf8_len(msg.content)
        if limits.max_total_bytes and self.stored_bytes() + size > limits.max_total_bytes:
            return EnqueueResult.NO_SPACE
        if size > limits.max_bytes:
            return EnqueueResult.FULL
        queue = self._queues.get(msg.recipient)
        if queue is None:
            queue = self._queues[msg.recipient] = _Queue()
        elif (len(queue.messages) >= limits.max_messages or queue.bytes + size > limits.max_bytes) \
                and not limits.drop_oldest:
            return EnqueueResult.FULL
        self._last_seq = seq = self._last_seq + 1
        if seq in queue.messages:
            self._last_seq = max(self._last_seq, *(max(q.messages, default=0) for q in self._queues.values()))
            log.error("message seq %d is already taken: the write failed and new messages now start at seq %d",
                      seq, self._last_seq + 1)
            raise StorageUnavailable("message numbering collided with a stored message; nothing was written")
        while queue.messages and (len(queue.messages) >= limits.max_messages
                                  or queue.bytes + size > limits.max_bytes):
            self._drop(queue, next(iter(queue.messages)))
        msg.seq = seq
        self._add(queue, msg, ident, size)
        return EnqueueResult.QUEUED

    def _add(self, queue: _Queue, msg: QueuedMessage, ident: Ident, size: int) -> None:
        queue.messages[msg.seq] = msg
        queue.by_id.setdefault(msg.message_id, set()).add(msg.seq)
        queue.bytes += size
        self._stored[ident] = msg.seq
        self._total += 1
        self._bytes += size

    def _drop(self, queue: _Queue, seq: int, *, delivered: bool = False) -> None:
        msg = queue.messages.pop(seq)
        size = utf8_len(msg.content)
        queue.bytes -= size
        same = queue.by_id[msg.message_id]
        same.discard(seq)
        if not same:
            del queue.by_id[msg.message_id]
        ident = _ident(msg)
        del self._stored[ident]
        if delivered:
            self._delivered.record(ident, msg.queued_at)
            if self._history_ms:
                self._keep(msg)
        self._total -= 1
        self._bytes -= size

    async def restore(self, messages: list[QueuedMessage]) -> int:
        restored = 0
        touched: set[str] = set()
        for msg in messages:
            ident = _ident(msg)
            if ident in self._stored:
                continue
            self._delivered.forget(ident)
            if msg.recipient in self._history:  # its delivery did not happen after all
                await self.delete_history_of(msg)
            queue = self._queues.get(msg.recipient)
            if queue is None:
                queue = self._queues[msg.recipient] = _Queue()
            if msg.seq <= 0:
                msg.seq = self._next_seq()
            elif msg.seq in queue.messages:
                log.warning("a message put back had seq %d, which another message holds; it gets a new one",
                            msg.seq)
                msg.seq = self._next_seq()
            else:
                self._last_seq = max(self._last_seq, msg.seq)
                if queue.messages and msg.seq < next(reversed(queue.messages)):
                    touched.add(msg.recipient)
            self._add(queue, msg, ident, utf8_len(msg.content))
            restored += 1
        for recipient in touched:  # an older seq came back: keep the queue in seq order
            queue = self._queues[recipient]
            queue.messages = dict(sorted(queue.messages.items()))
        return restored

    async def record_delivered(self, messages: list[QueuedMessage]) -> None:
        for msg in messages:
            self._delivered.record(_ident(msg), msg.queued_at)
            if self._history_ms:  # a copy only for history (every live message passes here)
                self._keep(dataclasses.replace(msg, seq=msg.seq or self._next_seq()))

    # History

    def keep_history(self, ms: int) -> None:
        self._history_ms = ms

    def _keep(self, msg: QueuedMessage) -> None:
        """Keep a delivered message for its recipient's history (callers check that history is on)."""
        kept = self._history.setdefault(msg.recipient, {})
        key = (msg.sender.lower(), msg.message_id)
        if key not in kept:
            self._bytes += utf8_len(msg.content)
            kept[key] = (msg, int(time.time() * 1000) + self._history_ms)

    async def history(self, recipient: str, limit: int, before_ms: int | None = None,
                      sender: str | None = None) -> HistoryPage:
        kept = self._history.get(recipient, {})
        found = sorted((entry for key, entry in kept.items()
                        if (before_ms is None or entry[0].timestamp < before_ms)
                        and (sender is None or key[0] == sender.lower())),
                       key=lambda e: (e[0].timestamp, e[0].seq), reverse=True)
        return HistoryPage([dataclasses.replace(m) for m, _ in found[:limit]], len(found) > limit)

    async def delete_history(self, recipient: str, message_ids: list[str] | None) -> int:
        kept = self._history.get(recipient, {})
        wanted = None if message_ids is None else set(message_ids)
        gone = [key for key in kept if wanted is None or key[1] in wanted]
        for key in gone:
            self._bytes -= utf8_len(kept.pop(key)[0].content)
        if not kept:
            self._history.pop(recipient, None)
        return len(gone)

    async def delete_history_of(self, msg: QueuedMessage) -> None:
        kept = self._history.get(msg.recipient, {})
        entry = kept.pop((msg.sender.lower(), msg.message_id), None)
        if entry is not None:
            self._bytes -= utf8_len(entry[0].content)

    async def expire_history(self, now_ms: int) -> int:
        removed = 0
        for recipient, kept in list(self._history.items()):
            for key, (msg, until) in list(kept.items()):
                if until <= now_ms:
                    del kept[key]
                    self._bytes -= utf8_len(msg.content)
                    removed += 1
            if not kept:
                del self._history[recipient]
        return removed

    async def pending(self, recipient: str, limit: int, after_seq: int = 0,
                      max_bytes: int | None = None) -> list[QueuedMessage]:
        queue = self._queues.get(recipient)
        if queue is None:
            return []
        found = list(itertools.islice((m for seq, m in queue.messages.items() if seq > after_seq), limit))
        if max_bytes is None:
            return found
        page: list[QueuedMessage] = []
        total = 0
        for msg in found:
            if page and total >= max_bytes:
                break
            page.append(msg)
            total += utf8_len(msg.content)
        return page

    async def remove(self, recipient: str, seqs: list[int]) -> int:
        return self._remove(recipient, seqs, delivered=True)

    def _remove(self, recipient: str, seqs: list[int], *, delivered: bool) -> int:
        queue = self._queues.get(recipient)
        if queue is None:
            return 0
        removed = 0
        for seq in seqs:
            if seq in queue.messages:
                self._drop(queue, seq, delivered=delivered)
                removed += 1
        if not queue.messages:
            del self._queues[recipient]
        return removed

    async def ack(self, recipient: str, message_ids: list[str]) -> int:
        queue = self._queues.get(recipient)
        if queue is None:
            return 0
        seqs = [seq for mid in message_ids for seq in queue.by_id.get(mid, ())]
        return self._remove(recipient, seqs, delivered=True)

    async def clear(self, recipient: str) -> int:
        queue = self._queues.get(recipient)
        return self._remove(recipient, list(queue.messages), delivered=False) if queue else 0

    async def size(self, recipient: str) -> int:
        queue = self._queues.get(recipient)
        return len(queue.messages) if queue else 0

    async def backlog_size(self, recipient: str) -> tuple[int, int]:
        queue = self._queues.get(recipient)
        return (len(queue.messages) if queue else 0), len(self._receipts.get(recipient, ()))

    def total(self) -> int:
        return self._total

    def stored_bytes(self) -> int:
        return self._bytes + self._other_bytes

    async def stats(self) -> dict[str, int]:
        return {"recipients": len(self._queues), "messages": self._total, "bytes": self._bytes,
                "receipts": sum(len(r) for r in self._receipts.values()), "keys": len(self._keys)}

    async def expire(self, before_ms: int) -> int:
        removed = 0
        for recipient, queue in list(self._queues.items()):
            old = [seq for seq, m in queue.messages.items() if m.queued_at < before_ms]
            removed += self._remove(recipient, old, delivered=False)
        self._delivered.expire(before_ms)
        for recipient, receipts in list(self._receipts.items()):
            kept = [r for r in receipts if r.timestamp >= before_ms]
            self._other_bytes -= (len(receipts) - len(kept)) * RECEIPT_BYTES
            if kept:
                self._receipts[recipient] = kept
            else:
                del self._receipts[recipient]
        for token, (_, expires) in list(self._tokens.items()):
            if expires <= before_ms:
                del self._tokens[token]
        return removed

    async def shift_times(self, before_ms: int, delta_ms: int) -> int:
        moved = 0
        for queue in self._queues.values():
            for msg in queue.messages.values():
                if msg.queued_at < before_ms:
                    msg.queued_at += delta_ms
                    moved += 1
        for receipts in self._receipts.values():
            for receipt in receipts:
                if receipt.timestamp < before_ms:
                    receipt.timestamp += delta_ms
                    moved += 1
        return moved + self._delivered.shift(before_ms, delta_ms)

    async def add_receipts(self, receipts: list[Receipt], max_per_recipient: int) -> int:
        dropped = 0
        for receipt in receipts:
            receipt.seq = self._next_seq()
            stored = self._receipts.setdefault(receipt.recipient, [])
            stored.append(receipt)
            if len(stored) > max_per_recipient:
                excess = len(stored) - max_per_recipient
                del stored[:excess]
                dropped += excess
        self._other_bytes += (len(receipts) - dropped) * RECEIPT_BYTES
        return dropped

    async def receipts(self, recipient: str, limit: int) -> list[Receipt]:
        return list(self._receipts.get(recipient, ())[:limit])

    async def remove_receipts(self, recipient: str, seqs: list[int]) -> int:
        receipts = self._receipts.get(recipient)
        if not receipts:
            return 0
        gone = set(seqs)
        kept = [r for r in receipts if r.seq not in gone]
        self._other_bytes -= (len(receipts) - len(kept)) * RECEIPT_BYTES
        if kept:
            self._receipts[recipient] = kept
        else:
            del self._receipts[recipient]
        return len(receipts) - len(kept)

    async def queue_keys(self) -> list[str]:
        return list(dict.fromkeys([*self._queues, *self._receipts, *self._history]))

    # Keys

    async def get_key(self, address: str) -> KeyRecord | None:
        return (await self.get_keys([address])).get(address)

    async def get_keys(self, addresses: list[str]) -> dict[str, KeyRecord]:
        found = {a: self._keys[a] for a in addresses if a in self._keys}
        for address, record in found.items():
            if not record.signed and len(self._looked_up) < KEY_LOOKUPS_REMEMBERED:
                self._looked_up.add(address)
        return found

    async def put_key(self, record: KeyRecord) -> KeyRecord:
        old = self._keys.get(record.address)
        if old is not None:
            record.created_at = old.created_at
            self._other_bytes -= key_bytes(old.public_key, old.signature)
        self._other_bytes += key_bytes(record.public_key, record.signature)
        self._key_used.pop(record.address, None)
        if record.issued_at is not None and record.signed:
            self._floors[record.address] = max(self._floors.get(record.address, 0), record.issued_at)
        self._keys[record.address] = dataclasses.replace(record)
        return record

    async def delete_key(self, address: str) -> bool:
        old = self._keys.pop(address, None)
        self._key_used.pop(address, None)
        if old is not None:
            self._other_bytes -= key_bytes(old.public_key, old.signature)
        return old is not None

    async def drop_unsigned_key(self, address: str) -> bool:
        old = self._keys.get(address)
        return old is not None and not old.signed and await self.delete_key(address)

    async def expire_keys(self, before_ms: int, now_ms: int) -> int:
        looked_up, self._looked_up = self._looked_up, set()
        for address in looked_up:
            if address in self._keys:
                self._key_used[address] = now_ms
        old = [a for a, r in self._keys.items()
               if not r.signed and max(r.updated_at, self._key_used.get(a, 0)) < before_ms]
        for address in old:
            await self.delete_key(address)
        return len(old)

    async def key_floor(self, address: str) -> int | None:
        return self._floors.get(address)

    async def key_count(self) -> int:
        return len(self._keys)

    # Ownership locks and tokens

    async def is_locked(self, address: str) -> bool:
        return address in self._locked

    async def lock(self, address: str) -> None:
        self._locked.add(address)

    async def save_token(self, token_hash: str, address: str, expires_at_ms: int, max_per_address: int) -> None:
        self._tokens[token_hash] = (address, expires_at_ms)
        others = sorted((expires, token) for token, (owner, expires) in self._tokens.items()
                        if owner == address and token != token_hash)
        for _, token in _past_cap(others, max_per_address):
            del self._tokens[token]

    async def token_address(self, token_hash: str, now_ms: int) -> str | None:
        entry = self._tokens.get(token_hash)
        return entry[0] if entry is not None and entry[1] > now_ms else None

    # Push subscriptions

    async def put_push_subscription(self, sub: PushSubscription, max_per_address: int) -> PushSubscription:
        subs = self._push.setdefault(sub.address, {})
        old = subs.get(sub.id)
        stored = dataclasses.replace(sub, created_at=old.created_at if old is not None else sub.created_at)
        if old is not None:
            self._other_bytes -= old.size()
        self._other_bytes += stored.size()
        subs[sub.id] = stored
        others = sorted((s for s in subs.values() if s.id != sub.id), key=lambda s: (s.created_at, s.id))
        for gone in _past_cap(others, max_per_address):
            self._forget_push(subs, gone.id)
        for each in subs.values():
            each.expires_at = sub.expires_at
        return dataclasses.replace(stored)

    def _forget_push(self, subs: dict[str, PushSubscription], sub_id: str) -> bool:
        gone = subs.pop(sub_id, None)
        if gone is not None:
            self._other_bytes -= gone.size()
        return gone is not None

    async def push_subscriptions(self, address: str, now_ms: int) -> list[PushSubscription]:
        subs = self._push.get(address, {}).values()
        return [dataclasses.replace(s) for s in sorted(subs, key=lambda s: (s.created_at, s.id))
                if s.expires_at > now_ms]

    async def delete_push_subscription(self, address: str, sub_id: str) -> bool:
        subs = self._push.get(address, {})
        gone = self._forget_push(subs, sub_id)
        if not subs:
            self._push.pop(address, None)
        return gone

    async def extend_push_subscriptions(self, address: str, expires_at_ms: int) -> None:
        for sub in self._push.get(address, {}).values():
            sub.expires_at = expires_at_ms

    async def expire_push_subscriptions(self, now_ms: int) -> int:
        removed = 0
        for address, subs in list(self._push.items()):
            for sub_id, sub in list(subs.items()):
                if sub.expires_at <= now_ms:
                    removed += self._forget_push(subs, sub_id)
            if not subs:
                del self._push[address]
        return removed
