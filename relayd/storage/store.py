"""The storage contract: what relayd keeps (queued messages, pending read receipts, public keys,
ownership locks) and what every backend promises about it.

The protocol and the REST API see only these interfaces; ``memory``,
``sqlite`` and further backends implement them, and
``tests/test_store_contract.py`` is the one test every backend must pass.

Rules common to every method:

- A method that returns has done its work durably for that backend: an
  awaited write is committed (SQLite: after COMMIT), never merely queued.
- A backend that cannot read or write right now raises ``StorageUnavailable``
  with a human reason and never pretends a write happened; the caller reports
  ``storage_unavailable`` and may retry later. ``healthy``/``problem`` say the
  same for health checks and recover by themselves.
- Addresses are passed lower-cased and compared as given, except a message's
  ``sender`` and a receipt's ``reader``, which keep the spelling the client
  signed in with (the app compares them case-sensitively): the store compares
  those case-insensitively.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class StorageUnavailable(Exception):
    """The store cannot read or write right now (disk full, read-only, locked...): nothing was written."""


class StorageOutcomeUnknown(StorageUnavailable):
    """A write was sent but not confirmed in time (a timeout after sending, a connection lost mid-reply): it
    may have been applied. The sender is told so, and to resend with the same messageId (which is idempotent)."""


class StoreOpenError(Exception):
    """The store cannot be opened at start-up (corrupt or foreign file, bad path); exit 2."""


class EnqueueResult(enum.Enum):
    QUEUED = "queued"
    DUPLICATE = "duplicate"
    """The same message is still stored (``msg.seq`` is set to its seq)."""
    DELIVERED = "delivered"
    """The same message was delivered within the retention period (removed, acked or recorded delivered)."""
    FULL = "full"
    NO_SPACE = "no_space"


@dataclass(slots=True)
class QueueLimits:
    """Per-recipient caps, and the storage budget over all queues (``max_total_bytes``, 0: none)."""

    max_messages: int
    max_bytes: int
    drop_oldest: bool
    max_total_bytes: int = 0


@dataclass(slots=True)
class QueuedMessage:
    """A message waiting for its recipient. ``seq`` is 0 until the store assigns it."""

    recipient: str
    sender: str
    message_id: str
    content: str
    timestamp: int
    queued_at: int
    seq: int = 0


@dataclass(slots=True)
class Receipt:
    """A read receipt waiting for the message's sender (``recipient`` here) to come online."""

    recipient: str
    reader: str
    message_id: str
    timestamp: int
    seq: int = 0


@dataclass(slots=True)
class KeyRecord:
    """A published encryption key; the statement fields are set only for signed keys."""

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
    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> EnqueueResult:
        """Store ``msg`` for ``msg.recipient`` within ``limits``.

        Returns QUEUED (and sets ``msg.seq``), DUPLICATE when a message with
        the same (sender, recipient, messageId) is still stored (nothing is
        written; ``msg.seq`` is set to the stored one's), DELIVERED when it
        left the store as delivered (``remove``, ``ack``, ``record_delivered``)
        within the retention period (nothing is written), NO_SPACE when the content would take the store past
        ``max_total_bytes``, or FULL when the recipient's queue is at
        ``max_messages`` or the content would pass ``max_bytes`` and
        ``drop_oldest`` is off. With ``drop_oldest`` the oldest messages are
        removed to make room (a single message larger than ``max_bytes`` is
        still FULL).
        """
        ...

    async def enqueue_many(self, messages: list[QueuedMessage], limits: QueueLimits) -> list[EnqueueResult]:
        """``enqueue`` each of ``messages``, in order, in as few round trips as the storage allows.

        Returns the results in order. Raises ``StorageUnavailable`` when the
        batch could not be stored (SQLite: none of it was; Redis: some may
        have been); the caller reports none of it as queued, and a retry with
        the same messageIds is answered DUPLICATE for whatever did land.
        """
        ...

    async def restore(self, messages: list[QueuedMessage]) -> int:
        """Put back messages that left the store (or never entered it) but did not reach their recipient.

        A message with ``seq > 0`` gets that seq back, so it keeps its place
        before newer ones; one with ``seq == 0`` gets a new seq. Per-queue caps
        do not apply (the sender was already answered); a message still
        stored is skipped, and one known as delivered is stored again (its
        delivery did not happen after all). Returns how many were stored.
        """
        ...

    async def pending(self, recipient: str, limit: int, after_seq: int = 0,
                      max_bytes: int | None = None) -> list[QueuedMessage]:
        """Up to ``limit`` stored messages of ``recipient`` with ``seq > after_seq``, oldest first.

        With ``max_bytes``, the page ends once its content reaches that many
        bytes (it holds at least one message), so a reader of large messages
        never holds more than it can send.

        ``seq`` grows with every enqueue across the whole store (after a
        reopen, from the largest one stored), so a caller pages through a
        queue by passing the last ``seq`` it got; messages enqueued meanwhile
        appear on a later page, never before older ones.
        """
        ...

    async def remove(self, recipient: str, seqs: list[int]) -> int:
        """Delete these messages of ``recipient`` as delivered (unknown seqs are ignored); returns how many went.

        Their (sender, recipient, messageId) stay known as delivered until they expire, so a resend is
        answered DELIVERED instead of being stored again (``restore`` undoes this).
        """
        ...

    async def ack(self, recipient: str, message_ids: list[str]) -> int:
        """Delete ``recipient``'s messages with these messageIds, from any sender, as delivered (see ``remove``);
        returns how many went."""
        ...

    async def record_delivered(self, messages: list[QueuedMessage]) -> None:
        """Remember messages delivered live (never stored) as delivered, as ``remove`` does for stored ones, so
        a resend through any instance within the retention period is answered DELIVERED. Uses ``queued_at``
        as the time they expire from."""
        ...

    async def clear(self, recipient: str) -> int:
        """Delete every message of ``recipient``; returns how many went."""
        ...

    async def size(self, recipient: str) -> int:
        """How many messages ``recipient`` has stored."""
        ...

    async def backlog_size(self, recipient: str) -> tuple[int, int]:
        """How many messages and how many receipts ``recipient`` has stored, read together."""
        ...

    def total(self) -> int:
        """Messages stored for all recipients, from memory: never waits and never raises."""
        ...

    def stored_bytes(self) -> int:
        """Content bytes stored for all recipients, from memory, as ``max_total_bytes`` counts them."""
        ...

    async def stats(self) -> dict[str, int]:
        """Counts ``recipients``, ``messages``, ``bytes`` (content), ``receipts``, ``keys`` (may scan)."""
        ...

    async def expire(self, before_ms: int) -> int:
        """Delete messages queued, receipts made, delivered messageIds recorded and tokens expiring before
        ``before_ms`` (epoch ms).

        Returns how many messages were removed. Works in bounded batches so
        other operations interleave.
        """
        ...

    async def shift_times(self, before_ms: int, delta_ms: int) -> int:
        """The wall clock stepped by ``delta_ms``: move the times of what was stored before ``before_ms``.

        Messages and receipts keep their age across the step instead of
        expiring at once (or living on). Returns how many records moved.
        """
        ...

    async def add_receipts(self, receipts: list[Receipt], max_per_recipient: int) -> int:
        """Store receipts (setting each ``seq``); past ``max_per_recipient`` a recipient's oldest go.

        Returns how many receipts were dropped to stay within the cap.
        """
        ...

    async def receipts(self, recipient: str, limit: int) -> list[Receipt]:
        """Up to ``limit`` stored receipts of ``recipient``, oldest first (they stay until removed)."""
        ...

    async def remove_receipts(self, recipient: str, seqs: list[int]) -> int:
        """Delete these receipts of ``recipient``; returns how many went."""
        ...

    async def queue_keys(self) -> list[str]:
        """Every recipient that has stored messages, receipts or kept history, each once, in no particular order.

        For maintenance that must visit every record (``relayd reseal``); may scan the whole store.
        """
        ...


@dataclass(slots=True)
class HistoryPage:
    """Delivered messages of one recipient, newest first, and whether older ones remain."""

    messages: list[QueuedMessage]
    more: bool


@runtime_checkable
class HistoryStore(Protocol):
    """Message history (``[history] days``): with ``keep_history(ms > 0)``, a message that leaves the store as
    delivered (``remove``, ``ack``) or is recorded delivered live (``record_delivered``) is kept, as stored,
    for ``ms`` after its delivery, in ``stored_bytes`` (the storage budget) but not in ``total``. ``clear``
    and expiry of undelivered messages keep nothing. Read and deleted only by its recipient."""

    def keep_history(self, ms: int) -> None:
        """Keep what is delivered from now on for ``ms`` (0: keep nothing; what is kept stays until it expires)."""
        ...

    async def history(self, recipient: str, limit: int, before_ms: int | None = None,
                      sender: str | None = None) -> HistoryPage:
        """Up to ``limit`` kept messages of ``recipient`` with ``timestamp < before_ms`` (all when None), from
        ``sender`` only when given (compared case-insensitively), newest first (by timestamp, then seq)."""
        ...

    async def delete_history(self, recipient: str, message_ids: list[str] | None) -> int:
        """Forget ``recipient``'s kept messages with these messageIds (None: all of them); how many went."""
        ...

    async def expire_history(self, now_ms: int) -> int:
        """Forget kept messages whose time ran out by ``now_ms``; how many went (bounded batches)."""
        ...


class KeyStore(Protocol):
    async def get_key(self, address: str) -> KeyRecord | None:
        """The key published for ``address``, or None."""
        ...

    async def get_keys(self, addresses: list[str]) -> dict[str, KeyRecord]:
        """The keys of those addresses that have one (others are absent from the result)."""
        ...

    async def put_key(self, record: KeyRecord) -> KeyRecord:
        """Store ``record``, replacing any key of its address but keeping the first ``created_at``.

        Returns the record as stored (``created_at`` updated). Whether the
        write is allowed (signed keys, locks) is the caller's decision.
        """
        ...

    async def delete_key(self, address: str) -> bool:
        """Delete the key of ``address``; False when there was none.

        A signed key leaves its ``issued_at`` behind (see ``key_floor``), so
        its old statement can never be published again.
        """
        ...

    async def key_floor(self, address: str) -> int | None:
        """The newest ``issued_at`` of any signed key ever stored for ``address`` (deleted or not)."""
        ...

    async def key_count(self) -> int:
        """How many addresses have a key."""
        ...

    async def is_locked(self, address: str) -> bool:
        """Whether ``address`` has proven ownership once (so unsigned claims are refused)."""
        ...

    async def lock(self, address: str) -> None:
        """Record that ``address`` proved ownership; locks are never removed."""
        ...


class TokenStore(Protocol):
    async def save_token(self, token_hash: str, address: str, expires_at_ms: int, max_per_address: int) -> None:
        """Remember a bearer token (by its hash) for ``address`` until ``expires_at_ms`` (epoch ms).

        An address keeps at most ``max_per_address`` tokens: the ones expiring first are forgotten.
        """
        ...

    async def token_address(self, token_hash: str, now_ms: int) -> str | None:
        """The address a token was issued to, or None when unknown or expired at ``now_ms``."""
        ...


class Store(MessageStore, KeyStore, TokenStore, Protocol):
    """Messages, keys and tokens in one backend."""

    name: str

    @property
    def healthy(self) -> bool:
        """False while the last write failed; True again after one succeeds."""
        ...

    @property
    def problem(self) -> str | None:
        """The human reason storage is unhealthy, or None."""
        ...

    async def open(self) -> None:
        """Open or create the store; raises ``StoreOpenError`` with a reason naming what is wrong."""
        ...

    async def close(self) -> None:
        """Finish what was submitted, then release the store; safe to call twice."""
        ...
