"""Encryption at rest: a ``Store`` wrapped so that what it keeps about messages is unreadable without the key.

``[storage] encryption_key_file`` names one or several files of 32 random
bytes (``relayd keygen --storage-key PATH``). ``SealedStore`` wraps any
backend and hands it only:

- queue keys (recipient addresses) replaced by a keyed HMAC-SHA256 (a blind
  index), so queues still work and a dump shows no address;
- a message's sender and messageId replaced by keyed HMACs of (recipient,
  sender) and (recipient, messageId), so idempotency and acks still work by
  equality while a dump links nothing across queues;
- the content sealed with AES-256-GCM together with the clear recipient,
  sender and messageId (bound to its queue key), and a stored receipt's reader
  and messageId sealed the same way.

Timestamps, sizes and seqs stay clear (the store orders and expires by them).
Published public keys, ownership locks, bearer tokens and push subscriptions
stay clear too: a public key is public (it is served by address to anyone),
and locks, tokens and push subscriptions must be found by address (a push
subscription says where to wake a device, never who wrote).

Keys, blind indexes and sealed values are ``sealing``'s. Rotation: new
writes use the first key file; reads try each configured key's blind index
and open each sealed value with the key its first byte names;
``reseal`` rewrites older records (and records written before encryption was
turned on) with the first key. A check value sealed with each key that may
have written records is kept in the store (a key record under an address no
client can ask for), so a missing or wrong key file stops the relay at
start-up with a clear error and nothing changed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any, Protocol

from ..frames import utf8_len
from .sealing import SealError, Sealer, StorageKey, sealed_size
from .store import (EnqueueResult, HistoryPage, HistoryStore, KeyRecord, PushSubscription, QueuedMessage,
                    QueueLimits, Receipt, StorageUnavailable, Store, StoreOpenError, key_bytes)

log = logging.getLogger("relayd.storage")

CHECK_ADDRESS = "~relayd-storage-check"
"""The key record holding the check values: never an address, so no client can read, write or count it."""
CHECK_SIGNATURE = "relayd"
"""The check record is stored as a signed key so that unsigned-key expiry ([storage] unsigned_key_ttl_days)
never deletes it."""
_CHECK_TEXT = "relayd storage check v1"


def check_key_ids(record: KeyRecord | None) -> set[int] | None:
    """The ids of the keys a store's check record names (None: the store was never sealed); raises
    StoreOpenError when it is damaged."""
    return None if record is None else set(SealedStore.checks(record))


class _Routed(Protocol):
    """What ``relayd.cluster`` asks of the Redis or PostgreSQL store beyond the contract (the recipient's presence
    read in the same atomic step as the write)."""

    async def enqueue_routed(self, msg: QueuedMessage, limits: QueueLimits, *, watcher: str = "",
                             watch_ttl_ms: int = 0) -> tuple[EnqueueResult, Any]: ...

    async def restore_routed(self, messages: list[QueuedMessage]) -> tuple[int, dict[str, Any]]: ...


class SealedStore:
    """A ``Store`` whose message records are sealed and whose queues are found by blind index (see the module
    docstring); everything else goes to ``inner`` unchanged."""

    def __init__(self, inner: Store, keys: list[StorageKey]) -> None:
        self.inner = inner
        self.sealer = Sealer(keys)
        self.name = inner.name
        self._hidden_keys = 0
        """1 while the check record exists (it is not counted among published keys)."""
        self._hidden_bytes = 0
        """What the check record counts in the inner store's ``stored_bytes`` (not shown either)."""
        self._keeping = False
        """History is on: messages recorded as delivered live are kept whole."""

    # Blind indexes: ``queue`` of a recipient with a key; the writing key for new records.

    def queue(self, recipient: str, key: StorageKey | None = None) -> str:
        """The queue key ``recipient`` is stored under with ``key`` (the writing key by default)."""
        return Sealer.index(key or self.sealer.writer, "q", recipient)

    def _queues(self, recipient: str) -> list[str]:
        return [self.queue(recipient, k) for k in self.sealer.keys]

    def _seal_message(self, msg: QueuedMessage) -> QueuedMessage:
        key = self.sealer.writer
        queue = self.queue(msg.recipient)
        return QueuedMessage(queue, Sealer.index(key, "s", msg.recipient, msg.sender.lower()),
                             Sealer.index(key, "m", msg.recipient, msg.message_id),
                             self.sealer.seal([msg.recipient, msg.sender, msg.message_id, msg.content], queue),
                             msg.timestamp, msg.queued_at, msg.seq)

    def _open_message(self, stored: QueuedMessage) -> QueuedMessage:
        recipient, sender, message_id, content = self.sealer.open(stored.content, stored.recipient)
        return QueuedMessage(recipient, sender, message_id, content, stored.timestamp, stored.queued_at, stored.seq)

    def _open_page(self, page: list[QueuedMessage]) -> list[QueuedMessage]:
        opened = []
        for stored in page:
            try:
                opened.append(self._open_message(stored))
            except SealError as exc:  # start-up checked the keys: only a damaged record gets here
                log.error("stored message seq %d cannot be read: %s; it stays stored until it expires",
                          stored.seq, exc)
        return opened

    def _inner_limits(self, limits: QueueLimits) -> QueueLimits:
        """Per-queue bytes count sealed sizes: a content of ``max_bytes`` still fits once sealed (a larger one
        is refused here, before it is sealed)."""
        return replace(limits, max_bytes=sealed_size(limits.max_bytes))

    # Lifecycle

    @property
    def healthy(self) -> bool:
        return self.inner.healthy

    @property
    def problem(self) -> str | None:
        return self.inner.problem

    async def open(self) -> None:
        await self.inner.open()
        try:
            await self._check_keys()
        except BaseException:
            await self.inner.close()
            raise

    async def _check_keys(self) -> None:
        """Refuse to start unless every key that may have sealed stored records is configured; record the
        writing key's check value before it writes anything."""
        record = await self.inner.get_key(CHECK_ADDRESS)
        checks = self.checks(record)
        if record is None and await self.inner.queue_keys():
            raise StoreOpenError("[storage] encryption_key_file is set but the store holds records written "
                                 "without encryption: run relayd reseal with this configuration to seal them "
                                 "(nothing was changed)")
        for ident, value in checks.items():
            try:
                if self.sealer.open(value, CHECK_ADDRESS) != [_CHECK_TEXT]:
                    raise SealError("the check value is wrong")
            except SealError as exc:
                raise StoreOpenError(f"[storage] encryption_key_file: the store holds records sealed with key id "
                                     f"{ident}, which none of the configured key files "
                                     f"({', '.join(k.path for k in self.sealer.keys)}) opens ({exc}); start with "
                                     "the key file(s) it was written with (nothing was changed)") from None
        if self.sealer.writer.ident not in checks:
            checks[self.sealer.writer.ident] = self.sealer.seal([_CHECK_TEXT], CHECK_ADDRESS)
            await self._write_checks(checks)
        self._hidden_keys = 1
        self._hidden_bytes = key_bytes(self._check_text(checks), CHECK_SIGNATURE)

    @staticmethod
    def checks(record: KeyRecord | None) -> dict[int, str]:
        if record is None:
            return {}
        try:
            return {int(k): str(v) for k, v in json.loads(record.public_key).items()}
        except (ValueError, AttributeError):
            raise StoreOpenError("the store's encryption check record is damaged; restore it from a backup") \
                from None

    @staticmethod
    def _check_text(checks: dict[int, str]) -> str:
        return json.dumps({str(k): v for k, v in checks.items()})

    async def _write_checks(self, checks: dict[int, str]) -> None:
        await self.inner.put_key(KeyRecord(CHECK_ADDRESS, self._check_text(checks), 0, 0,
                                           signature=CHECK_SIGNATURE))

    async def close(self) -> None:
        await self.inner.close()

    # Messages

    async def _stored_earlier(self, msg: QueuedMessage) -> EnqueueResult | None:
        """During a rotation: DUPLICATE (``msg.seq`` set) or DELIVERED when an older key holds the same message.

        Asks each older key's queue with an enqueue that can never write (every backend answers DUPLICATE and
        DELIVERED before it finds a one-byte content over a cap of 0 bytes: FULL)."""
        never = QueueLimits(max_messages=0, max_bytes=0, drop_oldest=False)
        for key in self.sealer.keys[1:]:
            probe = QueuedMessage(self.queue(msg.recipient, key),
                                  Sealer.index(key, "s", msg.recipient, msg.sender.lower()),
                                  Sealer.index(key, "m", msg.recipient, msg.message_id), "x", msg.timestamp,
                                  msg.queued_at)
            result = await self.inner.enqueue(probe, never)
            if result in (EnqueueResult.DUPLICATE, EnqueueResult.DELIVERED):
                msg.seq = probe.seq
                return result
        return None

    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> EnqueueResult:
        if utf8_len(msg.content) > limits.max_bytes:
            return EnqueueResult.FULL
        earlier = await self._stored_earlier(msg) if len(self.sealer.keys) > 1 else None
        if earlier is not None:
            return earlier
        sealed = self._seal_message(msg)
        result = await self.inner.enqueue(sealed, self._inner_limits(limits))
        msg.seq = sealed.seq
        return result

    async def enqueue_many(self, messages: list[QueuedMessage], limits: QueueLimits) -> list[EnqueueResult]:
        answers: dict[int, EnqueueResult] = {}
        for i, m in enumerate(messages):
            if utf8_len(m.content) > limits.max_bytes:
                answers[i] = EnqueueResult.FULL
            elif len(self.sealer.keys) > 1 and (earlier := await self._stored_earlier(m)) is not None:
                answers[i] = earlier
        fits = [m for i, m in enumerate(messages) if i not in answers]
        sealed = [self._seal_message(m) for m in fits]
        results = iter(await self.inner.enqueue_many(sealed, self._inner_limits(limits)))
        for msg, stored in zip(fits, sealed):
            msg.seq = stored.seq
        return [answers[i] if i in answers else next(results) for i in range(len(messages))]

    async def enqueue_routed(self, msg: QueuedMessage, limits: QueueLimits, *, watcher: str = "",
                             watch_ttl_ms: int = 0) -> tuple[EnqueueResult, Any]:
        """The Redis or PostgreSQL store's ``enqueue_routed`` (the cluster's), sealed: presence is kept under the
        same queue key (``relayd.cluster`` is given ``queue`` as its index)."""
        routed: _Routed = self.inner  # type: ignore[assignment]
        inner_limits = self._inner_limits(limits)
        if utf8_len(msg.content) > limits.max_bytes:  # FULL, with the presence read all the same
            inner_limits.max_bytes = 0
        earlier = await self._stored_earlier(msg) if len(self.sealer.keys) > 1 else None
        if earlier is not None:  # the presence read comes with a write that cannot store (a cap of 0 bytes)
            inner_limits.max_bytes = 0
        sealed = self._seal_message(msg)
        result, presence = await routed.enqueue_routed(sealed, inner_limits, watcher=watcher,
                                                       watch_ttl_ms=watch_ttl_ms)
        if earlier is not None:
            return earlier, presence
        msg.seq = sealed.seq
        return result, presence

    async def restore_routed(self, messages: list[QueuedMessage]) -> tuple[int, dict[str, Any]]:
        routed: _Routed = self.inner  # type: ignore[assignment]
        sealed = [self._seal_message(m) for m in messages]
        count, found = await routed.restore_routed(sealed)
        for msg, stored in zip(messages, sealed):
            msg.seq = stored.seq
        clear = {self.queue(m.recipient): m.recipient for m in messages}
        return count, {clear.get(q, q): entries for q, entries in found.items()}

    async def restore(self, messages: list[QueuedMessage]) -> int:
        sealed = [self._seal_message(m) for m in messages]
        count = await self.inner.restore(sealed)
        for msg, stored in zip(messages, sealed):
            msg.seq = stored.seq
        return count

    async def pending(self, recipient: str, limit: int, after_seq: int = 0,
                      max_bytes: int | None = None) -> list[QueuedMessage]:
        inner_bytes = None if max_bytes is None else sealed_size(max_bytes)
        pages = [await self.inner.pending(q, limit, after_seq, inner_bytes) for q in self._queues(recipient)]
        if len(pages) == 1:
            return self._open_page(pages[0])
        merged = sorted((m for page in pages for m in page), key=lambda m: m.seq)[:limit]
        if inner_bytes is not None:  # each page was bounded alone: bound the merged one the same way
            total = 0
            for i, m in enumerate(merged):
                if i and total >= inner_bytes:
                    merged = merged[:i]
                    break
                total += len(m.content)
        return self._open_page(merged)

    async def remove(self, recipient: str, seqs: list[int]) -> int:
        return sum([await self.inner.remove(q, seqs) for q in self._queues(recipient)])

    async def ack(self, recipient: str, message_ids: list[str]) -> int:
        removed = 0
        for key in self.sealer.keys:
            removed += await self.inner.ack(self.queue(recipient, key),
                                            [Sealer.index(key, "m", recipient, mid) for mid in message_ids])
        return removed

    async def record_delivered(self, messages: list[QueuedMessage]) -> None:
        if self._keeping:  # history keeps them: sealed whole
            await self.inner.record_delivered([self._seal_message(m) for m in messages])
            return
        key = self.sealer.writer
        await self.inner.record_delivered([
            QueuedMessage(self.queue(m.recipient), Sealer.index(key, "s", m.recipient, m.sender.lower()),
                          Sealer.index(key, "m", m.recipient, m.message_id), "", m.timestamp, m.queued_at, m.seq)
            for m in messages])

    async def clear(self, recipient: str) -> int:
        return sum([await self.inner.clear(q) for q in self._queues(recipient)])

    async def size(self, recipient: str) -> int:
        return sum([await self.inner.size(q) for q in self._queues(recipient)])

    async def backlog_size(self, recipient: str) -> tuple[int, int]:
        sizes = [await self.inner.backlog_size(q) for q in self._queues(recipient)]
        return sum(s[0] for s in sizes), sum(s[1] for s in sizes)

    def total(self) -> int:
        return self.inner.total()

    def stored_bytes(self) -> int:
        return max(0, self.inner.stored_bytes() - self._hidden_bytes)

    async def stats(self) -> dict[str, int]:
        stats = dict(await self.inner.stats())
        if "keys" in stats:
            stats["keys"] -= self._hidden_keys
        return stats

    async def expire(self, before_ms: int) -> int:
        return await self.inner.expire(before_ms)

    async def shift_times(self, before_ms: int, delta_ms: int) -> int:
        return await self.inner.shift_times(before_ms, delta_ms)

    async def add_receipts(self, receipts: list[Receipt], max_per_recipient: int) -> int:
        sealed = [self._seal_receipt(r) for r in receipts]
        dropped = await self.inner.add_receipts(sealed, max_per_recipient)
        for receipt, stored in zip(receipts, sealed):
            receipt.seq = stored.seq
        return dropped

    def _seal_receipt(self, r: Receipt) -> Receipt:
        queue = self.queue(r.recipient)
        return Receipt(queue, self.sealer.seal([r.recipient, r.reader, r.message_id], queue), "", r.timestamp,
                       r.seq)

    async def receipts(self, recipient: str, limit: int) -> list[Receipt]:
        found: list[Receipt] = []
        for q in self._queues(recipient):
            for stored in await self.inner.receipts(q, limit):
                try:
                    _, reader, message_id = self.sealer.open(stored.reader, stored.recipient)
                except (SealError, ValueError) as exc:
                    log.error("stored receipt seq %d cannot be read: %s", stored.seq, exc)
                    continue
                found.append(Receipt(recipient, reader, message_id, stored.timestamp, stored.seq))
        return sorted(found, key=lambda r: r.seq)[:limit]

    async def remove_receipts(self, recipient: str, seqs: list[int]) -> int:
        return sum([await self.inner.remove_receipts(q, seqs) for q in self._queues(recipient)])

    # History: kept as stored (sealed), found by the same blind indexes

    def keep_history(self, ms: int) -> None:
        if not isinstance(self.inner, HistoryStore):
            if ms:
                raise StoreOpenError(f"[history] days: the {self.inner.name} backend keeps no history")
            return
        self.inner.keep_history(ms)
        self._keeping = ms > 0

    def _history(self) -> HistoryStore:
        if not isinstance(self.inner, HistoryStore):
            raise StorageUnavailable(f"the {self.inner.name} backend keeps no history")
        return self.inner

    async def history(self, recipient: str, limit: int, before_ms: int | None = None,
                      sender: str | None = None) -> HistoryPage:
        found: list[QueuedMessage] = []
        more = False
        for key in self.sealer.keys:
            page = await self._history().history(
                self.queue(recipient, key), limit, before_ms,
                None if sender is None else Sealer.index(key, "s", recipient, sender.lower()))
            found += page.messages
            more = more or page.more
        found.sort(key=lambda m: (m.timestamp, m.seq), reverse=True)
        more = more or len(found) > limit
        opened = []
        for stored in found[:limit]:
            try:
                opened.append(self._open_message(stored))
            except SealError as exc:
                log.error("a kept message cannot be read: %s", exc)
        return HistoryPage(opened, more)

    async def delete_history(self, recipient: str, message_ids: list[str] | None) -> int:
        deleted = 0
        for key in self.sealer.keys:
            ids = None if message_ids is None else [Sealer.index(key, "m", recipient, m) for m in message_ids]
            deleted += await self._history().delete_history(self.queue(recipient, key), ids)
        return deleted

    async def expire_history(self, now_ms: int) -> int:
        return await self.inner.expire_history(now_ms) if isinstance(self.inner, HistoryStore) else 0

    async def queue_keys(self) -> list[str]:
        """The backend's queue keys: blind indexes (and clear addresses of records not sealed yet)."""
        return await self.inner.queue_keys()

    # Rotation

    async def reseal(self, page: int = 500) -> dict[str, int]:
        """Rewrite every record not sealed with the writing key (an older key's, or one stored before
        encryption was turned on) with it, then keep only the writing key's check value.

        Opens ``inner`` itself (``open`` would refuse clear records). Each record is written anew before the old
        one goes, so an interrupted run loses nothing (a copy may be delivered twice: same messageId) and a
        second run finishes the job. A record that opens with no configured key is left as it is and counted
        as ``unreadable``; kept history is not rewritten (it keeps its delivery flag and expiry): what an older
        key (or no key) sealed is counted as ``history_left`` and stays until it expires. While either count
        is not 0 the old keys' check values stay, so start-up still asks for those keys.
        """
        await self.inner.open()
        try:
            checks = self.checks(await self.inner.get_key(CHECK_ADDRESS))
            for ident, value in checks.items():
                try:
                    self.sealer.open(value, CHECK_ADDRESS)
                except SealError as exc:
                    raise StoreOpenError(f"records are sealed with key id {ident}, which no configured key file "
                                         f"opens ({exc}); list that key file after the new one") from None
            writer = self.sealer.writer.ident
            checks[writer] = checks.get(writer) or self.sealer.seal([_CHECK_TEXT], CHECK_ADDRESS)
            await self._write_checks(checks)  # before the first sealed write: start-up knows the key
            counts = {"queues": 0, "messages": 0, "receipts": 0, "unreadable": 0, "history_left": 0}
            for queue in await self.inner.queue_keys():
                moved = await self._reseal_messages(queue, page, counts)
                moved += await self._reseal_receipts(queue, counts)
                counts["queues"] += 1 if moved else 0
                counts["history_left"] += await self._old_history(queue)
            if not counts["unreadable"] and not counts["history_left"]:
                await self._write_checks({writer: checks[writer]})
            return counts
        finally:
            await self.inner.close()

    async def _old_history(self, queue: str) -> int:
        """How many of the kept messages under ``queue`` are not sealed with the writing key."""
        if not isinstance(self.inner, HistoryStore):
            return 0
        kept = (await self.inner.history(queue, 1 << 30)).messages
        return sum(1 for m in kept if self.sealer.key_of(m.content) != self.sealer.writer.ident)

    def _open_old(self, stored: QueuedMessage) -> QueuedMessage:
        if self.sealer.key_of(stored.content) is None:  # stored before encryption: ``queue`` is the address
            return replace(stored)
        return self._open_message(stored)

    async def _reseal_messages(self, queue: str, page: int, counts: dict[str, int]) -> int:
        """A queue holds records of one key only (its blind index is that key's), or clear ones (its key is
        the address): copy them all under the writing key, then clear the old queue (``clear`` leaves no
        delivered record behind, which ``remove`` would). The copies get new seqs, in the old order: messages
        written after the rotation but before the reseal come before them."""
        moved, after, unreadable = 0, 0, 0
        while True:
            found = await self.inner.pending(queue, page, after)
            if not found or self.sealer.key_of(found[0].content) == self.sealer.writer.ident:
                break
            after = found[-1].seq
            fresh = []
            for stored in found:
                try:
                    fresh.append(self._seal_message(replace(self._open_old(stored), seq=0)))
                except SealError as exc:
                    log.error("reseal: message seq %d cannot be read: %s; left as it is", stored.seq, exc)
                    unreadable += 1
            await self.inner.restore(fresh)
            moved += len(fresh)
        if moved and not unreadable:
            await self.inner.clear(queue)
        counts["messages"] += moved
        counts["unreadable"] += unreadable
        return moved

    async def _reseal_receipts(self, queue: str, counts: dict[str, int]) -> int:
        fresh, gone = [], []
        for stored in await self.inner.receipts(queue, 1 << 30):
            if self.sealer.key_of(stored.reader) == self.sealer.writer.ident:
                continue
            try:
                if self.sealer.key_of(stored.reader) is None:
                    clear = replace(stored, seq=0)
                else:
                    recipient, reader, message_id = self.sealer.open(stored.reader, stored.recipient)
                    clear = Receipt(recipient, reader, message_id, stored.timestamp)
            except (SealError, ValueError) as exc:
                log.error("reseal: receipt seq %d cannot be read: %s; left as it is", stored.seq, exc)
                counts["unreadable"] += 1
                continue
            fresh.append(self._seal_receipt(clear))
            gone.append(stored.seq)
        if fresh:
            await self.inner.add_receipts(fresh, 1 << 30)
            await self.inner.remove_receipts(queue, gone)
            counts["receipts"] += len(fresh)
        return len(fresh)

    # Keys, locks and tokens: clear (see the module docstring)

    async def get_key(self, address: str) -> KeyRecord | None:
        return await self.inner.get_key(address)

    async def get_keys(self, addresses: list[str]) -> dict[str, KeyRecord]:
        return await self.inner.get_keys(addresses)

    async def put_key(self, record: KeyRecord) -> KeyRecord:
        return await self.inner.put_key(record)

    async def delete_key(self, address: str) -> bool:
        return await self.inner.delete_key(address)

    async def key_floor(self, address: str) -> int | None:
        return await self.inner.key_floor(address)

    async def key_count(self) -> int:
        return await self.inner.key_count() - self._hidden_keys

    async def is_locked(self, address: str) -> bool:
        return await self.inner.is_locked(address)

    async def lock(self, address: str) -> None:
        await self.inner.lock(address)

    async def save_token(self, token_hash: str, address: str, expires_at_ms: int, max_per_address: int) -> None:
        await self.inner.save_token(token_hash, address, expires_at_ms, max_per_address)

    async def token_address(self, token_hash: str, now_ms: int) -> str | None:
        return await self.inner.token_address(token_hash, now_ms)

    async def drop_unsigned_key(self, address: str) -> bool:
        return await self.inner.drop_unsigned_key(address)

    async def expire_keys(self, before_ms: int, now_ms: int) -> int:
        return await self.inner.expire_keys(before_ms, now_ms)

    # Push subscriptions: clear, like tokens (found by address to wake its devices; they hold no message)

    async def put_push_subscription(self, sub: PushSubscription, max_per_address: int) -> PushSubscription:
        return await self.inner.put_push_subscription(sub, max_per_address)

    async def push_subscriptions(self, address: str, now_ms: int) -> list[PushSubscription]:
        return await self.inner.push_subscriptions(address, now_ms)

    async def delete_push_subscription(self, address: str, sub_id: str) -> bool:
        return await self.inner.delete_push_subscription(address, sub_id)

    async def extend_push_subscriptions(self, address: str, expires_at_ms: int) -> None:
        await self.inner.extend_push_subscriptions(address, expires_at_ms)

    async def expire_push_subscriptions(self, now_ms: int) -> int:
        return await self.inner.expire_push_subscriptions(now_ms)
