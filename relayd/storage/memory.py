"""The in-memory backend: the original relay's behaviour, lost on restart.

For tests and throwaway relays. Same contract as the SQLite backend,
including idempotent messageIds and per-recipient limits.
"""

from __future__ import annotations

import itertools

from ..frames import utf8_len
from .store import EnqueueResult, KeyRecord, QueuedMessage, QueueLimits, Receipt


class _Queue:
    __slots__ = ("messages", "bytes")

    def __init__(self) -> None:
        self.messages: dict[int, QueuedMessage] = {}
        self.bytes = 0


class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}
        self._ids: dict[tuple[str, str, str], tuple[str, int]] = {}
        self._receipts: dict[str, list[Receipt]] = {}
        self._keys: dict[str, KeyRecord] = {}
        self._locked: set[str] = set()
        self._seq = itertools.count(1)
        self._total = 0

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

    # Messages

    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> EnqueueResult:
        ident = (msg.sender, msg.recipient, msg.message_id)
        if ident in self._ids:
            return EnqueueResult.DUPLICATE
        queue = self._queues.get(msg.recipient)
        if queue is None:
            queue = self._queues[msg.recipient] = _Queue()
        size = utf8_len(msg.content)
        if size > limits.max_bytes:
            return EnqueueResult.FULL
        while queue.messages and (len(queue.messages) >= limits.max_messages
                                  or queue.bytes + size > limits.max_bytes):
            if not limits.drop_oldest:
                return EnqueueResult.FULL
            self._drop(queue, next(iter(queue.messages)))
        msg.seq = next(self._seq)
        queue.messages[msg.seq] = msg
        queue.bytes += size
        self._ids[ident] = (msg.recipient, msg.seq)
        self._total += 1
        return EnqueueResult.QUEUED

    def _drop(self, queue: _Queue, seq: int) -> None:
        msg = queue.messages.pop(seq)
        queue.bytes -= utf8_len(msg.content)
        self._ids.pop((msg.sender, msg.recipient, msg.message_id), None)
        self._total -= 1

    async def pending(self, recipient: str, limit: int, after_seq: int = 0) -> list[QueuedMessage]:
        queue = self._queues.get(recipient)
        if queue is None:
            return []
        found = (m for seq, m in queue.messages.items() if seq > after_seq)
        return list(itertools.islice(found, limit))

    async def remove(self, recipient: str, seqs: list[int]) -> int:
        queue = self._queues.get(recipient)
        if queue is None:
            return 0
        removed = 0
        for seq in seqs:
            if seq in queue.messages:
                self._drop(queue, seq)
                removed += 1
        if not queue.messages:
            del self._queues[recipient]
        return removed

    async def ack(self, recipient: str, message_ids: list[str]) -> int:
        queue = self._queues.get(recipient)
        if queue is None:
            return 0
        wanted = set(message_ids)
        seqs = [seq for seq, m in queue.messages.items() if m.message_id in wanted]
        return await self.remove(recipient, seqs)

    async def clear(self, recipient: str) -> int:
        queue = self._queues.get(recipient)
        return await self.remove(recipient, list(queue.messages)) if queue else 0

    async def size(self, recipient: str) -> int:
        queue = self._queues.get(recipient)
        return len(queue.messages) if queue else 0

    def total(self) -> int:
        return self._total

    async def stats(self) -> dict[str, int]:
        return {"recipients": len(self._queues), "messages": self._total,
                "bytes": sum(q.bytes for q in self._queues.values()),
                "receipts": sum(len(r) for r in self._receipts.values()), "keys": len(self._keys)}

    async def expire(self, before_ms: int) -> int:
        removed = 0
        for recipient, queue in list(self._queues.items()):
            old = [seq for seq, m in queue.messages.items() if m.queued_at < before_ms]
            removed += await self.remove(recipient, old)
        for recipient, receipts in list(self._receipts.items()):
            kept = [r for r in receipts if r.timestamp >= before_ms]
            if kept:
                self._receipts[recipient] = kept
            else:
                del self._receipts[recipient]
        return removed

    async def add_receipt(self, receipt: Receipt) -> None:
        receipt.seq = next(self._seq)
        self._receipts.setdefault(receipt.recipient, []).append(receipt)

    async def receipts(self, recipient: str, limit: int) -> list[Receipt]:
        return list(self._receipts.get(recipient, ())[:limit])

    async def remove_receipts(self, recipient: str, seqs: list[int]) -> int:
        receipts = self._receipts.get(recipient)
        if not receipts:
            return 0
        gone = set(seqs)
        kept = [r for r in receipts if r.seq not in gone]
        if kept:
            self._receipts[recipient] = kept
        else:
            del self._receipts[recipient]
        return len(receipts) - len(kept)

    # Keys

    async def get_key(self, address: str) -> KeyRecord | None:
        return self._keys.get(address)

    async def get_keys(self, addresses: list[str]) -> dict[str, KeyRecord]:
        return {a: self._keys[a] for a in addresses if a in self._keys}

    async def put_key(self, record: KeyRecord) -> KeyRecord:
        old = self._keys.get(record.address)
        if old is not None:
            record.created_at = old.created_at
        self._keys[record.address] = record
        return record

    async def delete_key(self, address: str) -> bool:
        return self._keys.pop(address, None) is not None

    async def key_count(self) -> int:
        return len(self._keys)

    # Ownership locks

    async def is_locked(self, address: str) -> bool:
        return address in self._locked

    async def lock(self, address: str) -> None:
        self._locked.add(address)
