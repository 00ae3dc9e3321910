"""The storage contract: what relayd keeps (queued messages, pending read receipts, public keys,
ownership locks, push subscriptions) and what every backend promises about it.

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


RECEIPT_BYTES = 256
"""What one stored read receipt counts in the storage budget: two addresses, a messageId of up to 128
characters, times, and the store's own overhead."""
KEY_OVERHEAD_BYTES = 128
"""What a stored key counts beyond its public key and signature (address, times, the store's overhead)."""
PUSH_OVERHEAD_BYTES = 160
"""What a push subscription counts beyond its target and keys (its id, address, provider, times, the store's
overhead and expiry index)."""


KEY_LOOKUPS_REMEMBERED = 100_000
"""Addresses whose unsigned key was looked up, remembered in memory between two ``expire_keys`` calls (past it,
further lookups until the next call do not count as use)."""


def key_bytes(public_key: str, signature: str | None) -> int:
    """What a key counts in the storage budget."""
    return len(public_key) + len(signature or "") + KEY_OVERHEAD_BYTES


def push_bytes(target: str, p256dh: str, auth: str) -> int:
    """What a push subscription counts in the storage budget (at most about 2.3 KB: an endpoint URL of 2048
    characters and Web Push keys)."""
    return len(target) + len(p256dh) + len(auth) + PUSH_OVERHEAD_BYTES


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
    """Per-recipient caps, and the storage budget (``max_total_bytes``, 0: none) over what ``stored_bytes``
    counts."""

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


@dataclass(slots=True)
class PushSubscription:
    """Where to wake an address's device: a Web Push endpoint (with its keys) or an FCM/APNs device token.

    ``target`` is the endpoint URL (``webpush``) or the device token (``fcm``, ``apns``); ``p256dh`` and
    ``auth`` are the subscription's base64url keys (Web Push only). ``expires_at`` (epoch ms) moves forward
    whenever a session of ``address`` signs in."""

    id: str
    address: str
    provider: str
    target: str
    p256dh: str = ""
    auth: str = ""
    created_at: int = 0
    expires_at: int = 0

    def size(self) -> int:
        """What it counts in the storage budget (``push_bytes``)."""
        return push_bytes(self.target, self.p256dh, self.auth)


class MessageStore(Protocol):
    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> EnqueueResult:
        """Store ``msg`` for ``msg.recipient`` within ``limits``.

        Returns QUEUED (and sets ``msg.seq``), DUPLICATE when a message with
        the same (sender, recipient, messageId) is still stored (nothing is
        written; ``msg.seq`` is set to the stored one's), DELIVERED when it
        left the store as delivered (``remove``, ``ack``, ``record_delivered``)
        within the retention period (nothing is written), NO_SPACE when the content would take ``stored_bytes``
        past ``max_total_bytes``, or FULL when the recipient's queue is at
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
        """The bytes ``max_total_bytes`` counts, from memory: content of every queue, ``RECEIPT_BYTES`` per
        stored receipt, ``key_bytes`` per key and ``push_bytes`` per push subscription. Never waits and never
        raises (on several instances, other instances' writes are included as of the backend's last refresh)."""
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

    async def drop_unsigned_key(self, address: str) -> bool:
        """Delete the key of ``address`` if it is unsigned (a signed key stays, whatever happens meanwhile);
        whether one went. When an address is locked by its first signed sign-in, a key anyone may have planted
        before stops being served."""
        ...

    async def expire_keys(self, before_ms: int, now_ms: int) -> int:
        """Delete unsigned keys neither uploaded nor looked up since ``before_ms``; how many went.

        A lookup (``get_key``, ``get_keys``) of an unsigned key is remembered in
        memory (up to ``KEY_LOOKUPS_REMEMBERED`` addresses) and written here as a
        use at ``now_ms``, so lookups never write. Signed keys stay: they are
        their owners'. Works in bounded batches.
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

        An address keeps at most ``max_per_address`` tokens: of the others, the ones expiring first are forgotten
        (never this one, though it may tie with them).
        """
        ...

    async def token_address(self, token_hash: str, now_ms: int) -> str | None:
        """The address a token was issued to, or None when unknown or expired at ``now_ms``."""
        ...


class PushStore(Protocol):
    """Push subscriptions by address. Few per address (the caller's cap), each found by (address, id); each
    counts ``push_bytes`` in ``stored_bytes`` from the moment it is stored until it is deleted or expired."""

    async def put_push_subscription(self, sub: PushSubscription, max_per_address: int) -> PushSubscription:
        """Store ``sub``; one of the same address, provider and target is replaced and keeps its ``id`` and
        ``created_at``. Past ``max_per_address`` the address's oldest others (by ``created_at``, then ``id``)
        go, never ``sub`` itself, though it may tie with them. Every subscription of the address gets
        ``sub.expires_at``. Returns the subscription as stored."""
        ...

    async def push_subscriptions(self, address: str, now_ms: int) -> list[PushSubscription]:
        """The subscriptions of ``address`` not expired at ``now_ms``, oldest first."""
        ...

    async def delete_push_subscription(self, address: str, sub_id: str) -> bool:
        """Delete one subscription of ``address``; False when it had none with that id."""
        ...

    async def extend_push_subscriptions(self, address: str, expires_at_ms: int) -> None:
        """A session of ``address`` signed in: its subscriptions live until ``expires_at_ms``."""
        ...

    async def expire_push_subscriptions(self, now_ms: int) -> int:
        """Delete subscriptions expired at ``now_ms`` (bounded work per call: the caller repeats it until it
        returns 0); returns how many went. Only this removes expired ones, so ``stored_bytes`` stays exact."""
        ...


class Store(MessageStore, KeyStore, TokenStore, PushStore, Protocol):
    """Messages, keys, tokens and push subscriptions in one backend."""

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
