"""What relayd keeps: queued messages, pending read receipts and public keys.

The router and the HTTP API see only these interfaces; ``memory_store`` and
``sqlite_store`` implement them. A backend that cannot write raises
``StorageUnavailable`` and never pretends a write happened.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol


class StorageUnavailable(Exception):
    """The store cannot read or write right now (disk full, read-only, locked...)."""


class StoreOpenError(Exception):
    """The store cannot be opened at start-up (corrupt or foreign file, bad path); exit 2."""


class EnqueueResult(enum.Enum):
    QUEUED = "queued"
    DUPLICATE = "duplicate"
    FULL = "full"


@dataclass(slots=True)
class QueueLimits:
    max_messages: int
    max_bytes: int
    drop_oldest: bool


@dataclass(slots=True)
class QueuedMessage:
    recipient: str
    sender: str
    message_id: str
    content: str
    timestamp: int
    queued_at: int
    seq: int = 0

    def rest(self) -> dict[str, Any]:
        """The REST listing shape of the original relay."""
        return {"from": self.sender, "content": self.content, "messageId": self.message_id,
                "timestamp": self.timestamp, "queuedAt": self.queued_at}


@dataclass(slots=True)
class Receipt:
    recipient: str
    reader: str
    message_id: str
    timestamp: int
    seq: int = 0


@dataclass(slots=True)
class KeyRecord:
    address: str
    public_key: str
    created_at: int
    updated_at: int
    key_type: str | None = None
    issued_at: int | None = None
    format: str | None = None
    signature: str | None = None

    @property
    def signed(self) -> bool:
        return self.signature is not None


class MessageStore(Protocol):
    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> EnqueueResult: ...
    async def pending(self, recipient: str, limit: int, after_seq: int = 0) -> list[QueuedMessage]: ...
    async def remove(self, recipient: str, seqs: list[int]) -> int: ...
    async def ack(self, recipient: str, message_ids: list[str]) -> int: ...
    async def clear(self, recipient: str) -> int: ...
    async def size(self, recipient: str) -> int: ...
    def total(self) -> int: ...
    async def stats(self) -> dict[str, int]: ...
    async def expire(self, before_ms: int) -> int: ...
    async def add_receipt(self, receipt: Receipt) -> None: ...
    async def receipts(self, recipient: str, limit: int) -> list[Receipt]: ...
    async def remove_receipts(self, recipient: str, seqs: list[int]) -> int: ...


class KeyStore(Protocol):
    async def get_key(self, address: str) -> KeyRecord | None: ...
    async def get_keys(self, addresses: list[str]) -> dict[str, KeyRecord]: ...
    async def put_key(self, record: KeyRecord) -> KeyRecord: ...
    async def delete_key(self, address: str) -> bool: ...
    async def key_count(self) -> int: ...
    async def is_locked(self, address: str) -> bool: ...
    async def lock(self, address: str) -> None: ...


class Store(MessageStore, KeyStore, Protocol):
    """One backend holds both, so one transaction can cover both."""

    name: str

    @property
    def healthy(self) -> bool: ...

    @property
    def problem(self) -> str | None: ...

    async def open(self) -> None: ...
    async def close(self) -> None: ...
