"""Read receipts: forwarded to the sender's ready sessions, or stored for its next one, a batch per loop turn
(``relayd.cluster.receipts`` adds the sender's sessions on peers).

A stored receipt counts ``RECEIPT_BYTES`` in the storage budget and in the
reader's (and its IP's) hourly byte budget for offline content, like a
message: receipts to random offline addresses cannot fill the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..clock import Clock, wall_ms
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..frames import field_address, field_message_id
from ..ops.metrics import RelayMetrics
from .session import Session
from ..storage.store import RECEIPT_BYTES, Receipt, StorageUnavailable, Store
from .budgets import OfflineBytes, low_room
from ..tasks import TaskSet
from .writes import AddressWrites


class Receipts:
    """Handles ``read_receipt`` frames; ``forward`` pushes a frame to a recipient's ready sessions (how many took it)."""

    def __init__(self, config: Config, forward: Callable[[dict[str, Any], str], int], store: Store,
                 metrics: RelayMetrics, clock: Clock, writes: AddressWrites,
                 tasks: TaskSet, offline_bytes: OfflineBytes, budget: Callable[[], int]) -> None:
        self.forward = forward
        self.offline_bytes = offline_bytes
        self.budget = budget
        """The storage budget in force (0: none)."""
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.writes = writes
        self.tasks = tasks
        self._waiting: list[tuple[Session, Receipt]] = []
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.max_per_recipient = config.queue.max_receipts_per_recipient

    def read_receipt(self, session: Session, frame: dict[str, Any]) -> None:
        """Forward a read receipt to the sender's ready sessions, or store it (in a batch) for its next one."""
        to, read = self.read_frame(session, frame)
        self.route(session, to, read)

    def read_frame(self, session: Session, frame: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The message's sender and the ``read`` frame it gets, from a ``read_receipt`` frame (or ``RelayError``)."""
        mid = field_message_id(frame)
        to = field_address(frame, "to", message_id=mid)
        return to, {"type": "read", "from": session.spelling, "messageId": mid, "timestamp": wall_ms(self.clock)}

    def route(self, session: Session, to: str, read: dict[str, Any]) -> None:
        """The ``read`` frame to the sender's ready sessions, or kept for its next one."""
        if not self.forward(read, to):
            self.keep(session, to, read)

    def keep(self, session: Session, to: str, read: dict[str, Any]) -> None:
        """Store a receipt nobody took, with the others of this loop iteration; the reader gets an error
        instead when the storage budget, or its hourly byte budget, is used up."""
        mid = read["messageId"]
        budget = self.budget()
        if budget and self.store.stored_bytes() + (len(self._waiting) + 1) * RECEIPT_BYTES > budget:
            session.send(RelayError(ErrorCode.STORAGE_UNAVAILABLE, "The relay's storage budget is used up; the "
                                    "receipt was not stored", message_id=mid).frame())
            return
        try:
            keys = self.offline_bytes.check(session.address or "", session.ip, RECEIPT_BYTES,
                                            self.clock.monotonic(), mid, low_room(budget, self.store.stored_bytes()))
        except RelayError as err:
            self.metrics.rate_limited.labels(limit="offline_bytes").inc()
            session.send(err.frame())
            return
        self.offline_bytes.add(keys, RECEIPT_BYTES)
        if not self._waiting:
            asyncio.get_running_loop().call_soon(self.store_waiting)
        self._waiting.append((session, Receipt(to, session.spelling, read["messageId"], read["timestamp"])))

    def store_waiting(self) -> None:
        """Start storing the receipts gathered so far, in one write."""
        batch, self._waiting = self._waiting, []
        if batch:
            task = self.tasks.spawn(self._store(batch))
            for recipient in {r.recipient for _, r in batch}:
                self.writes.note(recipient, task)

    async def _store(self, batch: list[tuple[Session, Receipt]]) -> None:
        try:
            dropped = await self.store.add_receipts([r for _, r in batch], self.max_per_recipient)
        except StorageUnavailable:
            for session, receipt in batch:
                session.send(RelayError(ErrorCode.STORAGE_UNAVAILABLE, "Storage is unavailable; the receipt "
                                        "was not stored", message_id=receipt.message_id).frame())
            return
        self.metrics.receipts_stored.inc(len(batch))
        if dropped:
            self.metrics.receipts_dropped.inc(dropped)
