"""One contract, every backend: what the router may rely on from any Store."""

from __future__ import annotations

import time
from typing import Any

import pytest

from relayd.api.messages import message_view
from relayd.storage.store import (PUSH_OVERHEAD_BYTES, RECEIPT_BYTES, EnqueueResult, KeyRecord, PushSubscription,
                                  QueuedMessage, QueueLimits, Receipt, StorageUnavailable, Store, key_bytes,
                                  push_bytes)

QUEUED, DUPLICATE, DELIVERED, FULL, NO_SPACE = (EnqueueResult.QUEUED, EnqueueResult.DUPLICATE,
                                                EnqueueResult.DELIVERED, EnqueueResult.FULL, EnqueueResult.NO_SPACE)
ROOMY = QueueLimits(max_messages=1000, max_bytes=1_000_000, drop_oldest=False)


def msg(recipient: str, message_id: str, content: str = "hello", *, sender: str = "alice",
        queued_at: int = 1000) -> QueuedMessage:
    return QueuedMessage(recipient=recipient, sender=sender, message_id=message_id,
                         content=content, timestamp=queued_at - 5, queued_at=queued_at)


async def enqueue_all(store: Store, *messages: QueuedMessage) -> list[QueuedMessage]:
    """Queue every message, with room for all; returns them, their seqs assigned."""
    for m in messages:
        assert await store.enqueue(m, ROOMY) is QUEUED
    return list(messages)


def bobs(count: int, content: str = "hello") -> list[QueuedMessage]:
    """Messages m0, m1, ... for bob."""
    return [msg("bob", f"m{i}", content) for i in range(count)]


async def ids(store: Store, recipient: str) -> list[str]:
    return [m.message_id for m in await store.pending(recipient, 10_000)]


def counts_content_bytes(store_backend: Any) -> None:
    """Skip a test of exact byte accounting for the encryption-at-rest layer: its store counts sealed bytes
    (``tests/test_sealed_store.py`` checks what it promises instead)."""
    if store_backend.kind.startswith("sealed-"):
        pytest.skip("caps and budgets count sealed bytes with encryption at rest (see test_sealed_store.py)")


def test_enqueue_assigns_increasing_seqs_and_pending_keeps_order(store_backend):
    async def body(store: Store) -> None:
        sent = await enqueue_all(store, *(msg("bob", f"m{i}", f"text {i}", queued_at=1000 + i) for i in range(5)))
        seqs = [m.seq for m in sent]
        assert all(s > 0 for s in seqs) and seqs == sorted(set(seqs))
        got = await store.pending("bob", 10)
        assert got == sent
        assert message_view(got[0]) == {"from": "alice", "content": "text 0", "messageId": "m0",
                                 "timestamp": 995, "queuedAt": 1000}
        assert await store.pending("bob", 2) == sent[:2]
        assert await store.pending("bob", 10, after_seq=seqs[2]) == sent[3:]
        assert await store.pending("bob", 10, after_seq=seqs[-1]) == []
        assert await store.pending("nobody", 10) == []
    store_backend(body)


def test_enqueue_many_is_enqueue_for_each_in_order(store_backend):
    async def body(store: Store) -> None:
        tight = QueueLimits(max_messages=2, max_bytes=1_000_000, drop_oldest=False)
        batch = [msg("bob", "m1"), msg("carol", "m2"), msg("bob", "m1"), msg("bob", "m3"), msg("bob", "m4")]
        assert await store.enqueue_many(batch, tight) == [QUEUED, QUEUED, DUPLICATE, QUEUED, FULL]
        assert [m.seq > 0 for m in batch] == [True, True, True, True, False]
        assert batch[0].seq < batch[1].seq < batch[3].seq and batch[2].seq == batch[0].seq
        assert await ids(store, "bob") == ["m1", "m3"] and await ids(store, "carol") == ["m2"]
        assert store.total() == 3
        assert await store.enqueue_many([], tight) == []
    store_backend(body)


def test_queues_are_per_recipient(store_backend):
    async def body(store: Store) -> None:
        await enqueue_all(store, msg("bob", "m1"), msg("carol", "m2"), msg("bob", "m3"))
        assert await ids(store, "bob") == ["m1", "m3"]
        assert await ids(store, "carol") == ["m2"]
    store_backend(body)


def test_duplicate_is_per_sender_recipient_and_message_id(store_backend):
    async def body(store: Store) -> None:
        first = msg("bob", "m1")
        assert await store.enqueue(first, ROOMY) is QUEUED
        again = msg("bob", "m1", "other text")
        assert await store.enqueue(again, ROOMY) is DUPLICATE
        assert again.seq == first.seq, "DUPLICATE gives the stored message's seq"
        assert await store.enqueue(msg("carol", "m1"), ROOMY) is QUEUED
        assert await store.enqueue(msg("bob", "m1", sender="dave"), ROOMY) is QUEUED
        assert await store.size("bob") == 2
        assert await store.size("carol") == 1
        assert [m.content for m in await store.pending("bob", 10)] == ["hello", "hello"]
        assert await store.ack("bob", ["m1"]) == 2
        assert await store.enqueue(msg("bob", "m1"), ROOMY) is DELIVERED
    store_backend(body)


def test_full_by_count(store_backend):
    async def body(store: Store) -> None:
        limits = QueueLimits(max_messages=3, max_bytes=1000, drop_oldest=False)
        results = [await store.enqueue(msg("bob", f"m{i}"), limits) for i in range(5)]
        assert results == [QUEUED] * 3 + [FULL] * 2
        assert await ids(store, "bob") == ["m0", "m1", "m2"]
        assert await store.enqueue(msg("carol", "c0"), limits) is QUEUED
        assert store.total() == 4
    store_backend(body)


def test_full_by_bytes(store_backend):
    counts_content_bytes(store_backend)
    async def body(store: Store) -> None:
        limits = QueueLimits(max_messages=100, max_bytes=10, drop_oldest=False)
        assert await store.enqueue(msg("bob", "a", "12345"), limits) is QUEUED
        assert await store.enqueue(msg("bob", "b", "1234"), limits) is QUEUED
        assert await store.enqueue(msg("bob", "c", "12"), limits) is FULL
        assert await store.enqueue(msg("bob", "d", "1"), limits) is QUEUED
        assert await store.enqueue(msg("bob", "e", "1"), limits) is FULL
        assert await store.enqueue(msg("carol", "f", "x" * 11), limits) is FULL
        assert await ids(store, "bob") == ["a", "b", "d"]
        assert (await store.stats())["bytes"] == 10
    store_backend(body)


def test_drop_oldest_makes_room(store_backend):
    counts_content_bytes(store_backend)
    async def body(store: Store) -> None:
        limits = QueueLimits(max_messages=3, max_bytes=10, drop_oldest=True)
        for i in range(5):
            assert await store.enqueue(msg("bob", f"m{i}", "ab"), limits) is QUEUED
        assert await ids(store, "bob") == ["m2", "m3", "m4"]
        assert await store.enqueue(msg("bob", "big", "123456789"), limits) is QUEUED
        assert await ids(store, "bob") == ["big"]
        assert store.total() == 1
        assert await store.size("bob") == 1
        assert await store.enqueue(msg("bob", "m0", "ab"), limits) is QUEUED
        stats = await store.stats()
        assert stats["messages"] == 1 and stats["bytes"] == 2
    store_backend(body)


def test_drop_oldest_of_a_shrunk_limit_drops_many(store_backend):
    async def body(store: Store) -> None:
        await enqueue_all(store, *bobs(150, "x"))
        limits = QueueLimits(max_messages=10, max_bytes=1000, drop_oldest=True)
        assert await store.enqueue(msg("bob", "new", "x"), limits) is QUEUED
        assert await ids(store, "bob") == [f"m{i}" for i in range(141, 150)] + ["new"]
        assert store.total() == 10
    store_backend(body)


def test_oversized_message_is_full_without_dropping(store_backend, request):

    async def body(store: Store) -> None:
        limits = QueueLimits(max_messages=10, max_bytes=10, drop_oldest=True)
        await store.enqueue(msg("bob", "m1", "abc"), limits)
        assert await store.enqueue(msg("bob", "huge", "x" * 11), limits) is FULL
        assert await ids(store, "bob") == ["m1"]
    store_backend(body)


def test_remove_by_seq(store_backend):
    async def body(store: Store) -> None:
        *sent, other = await enqueue_all(store, *bobs(4), msg("carol", "c1"))
        assert await store.remove("bob", [sent[1].seq, sent[3].seq, 99_999, other.seq]) == 2
        assert await ids(store, "bob") == ["m0", "m2"]
        assert await ids(store, "carol") == ["c1"]
        assert await store.remove("bob", []) == 0
        assert await store.remove("bob", [sent[0].seq] * 600) == 1
        assert await store.remove("nobody", [1]) == 0
        assert store.total() == 2
    store_backend(body)


def test_ack_by_message_id(store_backend):
    async def body(store: Store) -> None:
        await enqueue_all(store, *bobs(4), msg("carol", "m9"))
        assert await store.ack("bob", ["m0", "m2", "m9", "nope", "m0"]) == 2
        assert await store.ack("bob", [f"x{i}" for i in range(1200)] + ["m3"]) == 1
        assert await ids(store, "bob") == ["m1"]
        assert await store.ack("nobody", ["m1"]) == 0
        assert await store.ack("bob", []) == 0
        assert store.total() == 2
    store_backend(body)


def test_clear(store_backend):
    async def body(store: Store) -> None:
        await enqueue_all(store, *bobs(3), msg("carol", "c"))
        assert await store.clear("bob") == 3
        assert await store.clear("bob") == 0
        assert await store.size("bob") == 0
        assert await ids(store, "carol") == ["c"]
        assert store.total() == 1
        assert await store.enqueue(msg("bob", "m0"), ROOMY) is QUEUED
    store_backend(body)


def test_size_total_and_stats(store_backend):
    counts_content_bytes(store_backend)
    async def body(store: Store) -> None:
        assert store.total() == 0
        assert await store.stats() == {"recipients": 0, "messages": 0, "bytes": 0,
                                       "receipts": 0, "keys": 0}
        await enqueue_all(store, msg("bob", "a", "1234"), msg("bob", "b", "12"), msg("carol", "c", "1"))
        await store.add_receipts([Receipt("bob", "carol", "x", 5)], 10_000)
        await store.put_key(KeyRecord("bob", "pk", 1, 1))
        assert await store.size("bob") == 2
        assert await store.size("carol") == 1
        assert await store.size("dave") == 0
        assert store.total() == 3
        assert await store.stats() == {"recipients": 2, "messages": 3, "bytes": 7,
                                       "receipts": 1, "keys": 1}
        await store.ack("carol", ["c"])
        assert (await store.stats())["recipients"] == 1
    store_backend(body)


def test_expire_messages_and_receipts(store_backend):
    async def body(store: Store) -> None:
        await enqueue_all(store, *(msg("bob" if i % 2 else "carol", f"m{i}", queued_at=when)
                                   for i, when in enumerate([100, 200, 300, 400])))
        for when in (150, 250, 350):
            await store.add_receipts([Receipt("bob", "carol", f"r{when}", when)], 10_000)
        assert await store.expire(300) == 2
        assert await ids(store, "carol") == ["m2"]
        assert await ids(store, "bob") == ["m3"]
        assert store.total() == 2
        assert [r.message_id for r in await store.receipts("bob", 10)] == ["r350"]
        assert await store.expire(300) == 0
        assert await store.expire(10_000) == 2
        assert store.total() == 0
        assert (await store.stats())["recipients"] == 0
    store_backend(body)


def test_receipts_are_listed_oldest_first_and_removed_by_seq(store_backend):
    async def body(store: Store) -> None:
        added = [Receipt("bob", f"reader{i}", f"m{i}", 1000 + i) for i in range(5)]
        for r in added:
            await store.add_receipts([r], 10_000)
        await store.add_receipts([Receipt("carol", "x", "y", 1)], 10_000)
        assert all(r.seq > 0 for r in added)
        assert [r.seq for r in added] == sorted(r.seq for r in added)
        assert await store.receipts("bob", 2) == added[:2]
        assert await store.receipts("bob", 2) == added[:2]
        assert await store.remove_receipts("bob", [added[0].seq, added[1].seq, added[1].seq]) == 2
        assert await store.receipts("bob", 10) == added[2:]
        assert await store.remove_receipts("carol", [added[2].seq]) == 0
        assert await store.remove_receipts("bob", [r.seq for r in added[2:]]) == 3
        assert await store.receipts("bob", 10) == []
        assert await store.receipts("nobody", 10) == []
        assert await store.remove_receipts("nobody", [1]) == 0
        assert (await store.stats())["receipts"] == 1
    store_backend(body)


def test_keys(store_backend):
    async def body(store: Store) -> None:
        assert await store.get_key("bob") is None
        first = KeyRecord("bob", "pk1", created_at=100, updated_at=100)
        assert await store.put_key(first) == first
        second = KeyRecord("bob", "pk2", created_at=500, updated_at=500, key_type="secp256k1",
                           issued_at=490, format="hex", signature="sig")
        stored = await store.put_key(second)
        assert stored.created_at == 100
        assert stored.updated_at == 500 and stored.signed
        assert await store.get_key("bob") == stored
        await store.put_key(KeyRecord("carol", "pkc", 7, 7))
        assert await store.key_count() == 2
        got = await store.get_keys(["bob", "nobody", "carol", "bob"])
        assert set(got) == {"bob", "carol"} and got["carol"].public_key == "pkc"
        assert await store.get_keys([]) == {}
        assert await store.delete_key("bob") is True
        assert await store.delete_key("bob") is False
        assert await store.get_key("bob") is None
        assert await store.key_count() == 1
        fresh = await store.put_key(KeyRecord("bob", "pk3", 900, 900))
        assert fresh.created_at == 900
    store_backend(body)


def test_ownership_locks_are_permanent(store_backend):
    async def body(store: Store) -> None:
        assert await store.is_locked("bob") is False
        await store.lock("bob")
        await store.lock("bob")
        assert await store.is_locked("bob") is True
        assert await store.is_locked("carol") is False
        await store.delete_key("bob")
        assert await store.is_locked("bob") is True
    store_backend(body)


def test_sender_spelling_is_kept_but_idempotency_ignores_it(store_backend):
    async def body(store: Store) -> None:
        first = msg("bob", "m1", sender="0xAbCd")
        assert await store.enqueue(first, ROOMY) is QUEUED
        assert await store.enqueue(msg("bob", "m1", sender="0xabcd"), ROOMY) is DUPLICATE
        assert [m.sender for m in await store.pending("bob", 10)] == ["0xAbCd"]
        assert await store.ack("bob", ["m1"]) == 1
    store_backend(body)


def test_any_text_a_client_may_send_is_stored_exactly(store_backend):
    """JSON text may hold NUL and noncharacters (PostgreSQL's text type holds no NUL): content and messageIds
    round-trip exactly, stay idempotent, are acked and counted by their UTF-8 size."""
    odd = ["nul\x00inside", "\uffff0", "\uffff\uffff\x00", "\x00", "é\x00\U0001f600"]

    async def body(store: Store) -> None:
        sent = await enqueue_all(store, *(msg("bob", f"id{i}\x00{t}", t) for i, t in enumerate(odd)))
        assert await store.pending("bob", 10) == sent
        assert await store.enqueue(msg("bob", f"id0\x00{odd[0]}", "x"), ROOMY) is DUPLICATE
        if not store_backend.kind.startswith("sealed-"):  # that layer counts sealed bytes
            assert (await store.stats())["bytes"] == sum(len(t.encode()) for t in odd)
        await store.add_receipts([Receipt("alice", "bob", "r\x00\uffff", 7)], 10)
        assert [r.message_id for r in await store.receipts("alice", 10)] == ["r\x00\uffff"]
        assert await store.ack("bob", [f"id1\x00{odd[1]}"]) == 1
        assert await store.enqueue(msg("bob", f"id1\x00{odd[1]}"), ROOMY) is DELIVERED
        assert await store.remove("bob", [sent[2].seq]) == 1
        assert await ids(store, "bob") == [f"id{i}\x00{odd[i]}" for i in (0, 3, 4)]
    store_backend(body)


def test_storage_budget_refuses_past_max_total_bytes(store_backend):
    counts_content_bytes(store_backend)
    async def body(store: Store) -> None:
        limits = QueueLimits(max_messages=1000, max_bytes=1_000_000, drop_oldest=False, max_total_bytes=10)
        assert await store.enqueue(msg("bob", "m1", "12345678"), limits) is QUEUED
        assert store.stored_bytes() == 8
        assert await store.enqueue(msg("carol", "m2", "123"), limits) is NO_SPACE
        assert await store.enqueue(msg("bob", "m1", "12345678"), limits) is DUPLICATE
        assert await store.enqueue(msg("carol", "m3", "12"), limits) is QUEUED
        assert store.stored_bytes() == 10
        await store.remove("bob", [m.seq for m in await store.pending("bob", 10)])
        assert store.stored_bytes() == 2
    store_backend(body)


def test_restore_puts_messages_back_in_their_place(store_backend):
    async def body(store: Store) -> None:
        sent = await enqueue_all(store, *(msg("bob", f"m{i}", queued_at=1000 + i) for i in range(4)))
        taken = sent[:2]
        assert await store.remove("bob", [m.seq for m in taken]) == 2
        live = msg("bob", "live", queued_at=2000)
        tight = QueueLimits(max_messages=2, max_bytes=1_000_000, drop_oldest=False)
        assert await store.enqueue(msg("bob", "over", queued_at=2001), tight) is FULL
        assert await store.restore([*taken, live]) == 3  # past the cap: the sender was already answered
        assert live.seq > sent[-1].seq
        assert await ids(store, "bob") == ["m0", "m1", "m2", "m3", "live"]
        assert await store.restore([sent[0]]) == 0  # still stored: skipped
        assert store.total() == 5 and await store.size("bob") == 5
        assert await store.backlog_size("bob") == (5, 0)
    store_backend(body)


def test_receipts_are_capped_per_recipient_oldest_first(store_backend):
    async def body(store: Store) -> None:
        batch = [Receipt("bob", "carol", f"r{i}", 1000 + i) for i in range(5)]
        assert await store.add_receipts(batch, 3) == 2
        assert [r.message_id for r in await store.receipts("bob", 10)] == ["r2", "r3", "r4"]
        assert await store.add_receipts([Receipt("bob", "dave", "r5", 2000)], 3) == 1
        assert [r.message_id for r in await store.receipts("bob", 10)] == ["r3", "r4", "r5"]
        assert await store.backlog_size("bob") == (0, 3)
        assert (await store.stats())["receipts"] == 3
    store_backend(body)


def test_key_floor_outlives_a_deleted_signed_key(store_backend):
    async def body(store: Store) -> None:
        assert await store.key_floor("bob") is None
        await store.put_key(KeyRecord("bob", "k", 1, 1))
        assert await store.key_floor("bob") is None
        await store.put_key(KeyRecord("bob", "k2", 1, 2, "x25519", 50, "doubleHash", "0xsig"))
        await store.put_key(KeyRecord("bob", "k3", 1, 3, "x25519", 40, "doubleHash", "0xsig"))
        assert await store.key_floor("bob") == 50
        assert await store.delete_key("bob") is True
        assert await store.get_key("bob") is None
        assert await store.key_floor("bob") == 50
    store_backend(body)


def test_a_new_token_is_kept_when_it_ties_with_older_ones(store_backend):
    """Tokens issued in the same millisecond tie on their expiry: past the cap one of the earlier goes, never the
    one just saved (its hash may sort first)."""
    async def body(store: Store) -> None:
        for token_hash in ("z1", "z2", "a0"):
            await store.save_token(token_hash, "bob", 10_000, 2)
        assert await store.token_address("a0", 5_000) == "bob"
        assert [await store.token_address(h, 5_000) for h in ("z1", "z2")].count("bob") == 1
    store_backend(body)


def test_tokens_expire_and_are_bounded_per_address(store_backend):
    async def body(store: Store) -> None:
        for i in range(4):
            await store.save_token(f"h{i}", "bob", 10_000 + i, 3)
        assert await store.token_address("h0", 5_000) is None  # the one expiring first went
        assert await store.token_address("h3", 5_000) == "bob"
        assert await store.token_address("h3", 10_003) is None
        assert await store.token_address("nope", 0) is None
        await store.expire(10_002)
        assert await store.token_address("h2", 5_000) is None
        assert await store.token_address("h3", 5_000) == "bob"
    store_backend(body)


def test_shift_times_moves_what_was_stored_before_a_clock_step(store_backend):
    async def body(store: Store) -> None:
        await enqueue_all(store, msg("bob", "old", queued_at=1000), msg("bob", "new", queued_at=5000))
        await store.add_receipts([Receipt("bob", "carol", "r", 1500)], 10)
        assert await store.shift_times(2000, 100_000) == 2
        assert [m.queued_at for m in await store.pending("bob", 10)] == [101_000, 5000]
        assert [r.timestamp for r in await store.receipts("bob", 10)] == [101_500]
        assert await store.expire(50_000) == 1
        assert await ids(store, "bob") == ["old"]
    store_backend(body)


# Delivered messageIds: a resend within the retention period is answered DELIVERED, not stored again


def test_removed_or_acked_message_is_known_as_delivered_until_it_expires(store_backend):
    async def body(store: Store) -> None:
        first, second, third = await enqueue_all(store, msg("bob", "m1", queued_at=1000),
                                                 msg("bob", "m2", queued_at=2000), msg("bob", "m3", queued_at=3000))
        assert await store.remove("bob", [first.seq]) == 1
        assert await store.ack("bob", ["m2"]) == 1
        for mid in ("m1", "m2"):
            again = msg("bob", mid, "resent")
            assert await store.enqueue(again, ROOMY) is DELIVERED
            assert again.seq == 0
        assert await store.enqueue(msg("bob", "m1", sender="ALICE"), ROOMY) is DELIVERED  # sender: any case
        assert await store.enqueue_many([msg("bob", "m2"), msg("bob", "m3")], ROOMY) == [DELIVERED, DUPLICATE]
        assert await ids(store, "bob") == ["m3"]
        assert store.total() == 1 and await store.size("bob") == 1
        assert await store.enqueue(msg("carol", "m1", queued_at=9000), ROOMY) is QUEUED  # another recipient
        assert await store.enqueue(msg("bob", "m1", sender="dave", queued_at=9000), ROOMY) is QUEUED  # another sender
        assert await store.expire(1000) == 0
        assert await store.enqueue(msg("bob", "m1"), ROOMY) is DELIVERED  # its queued_at is not before 1000
        assert await store.expire(1001) == 0
        assert await store.enqueue(msg("bob", "m1", "new", queued_at=9000), ROOMY) is QUEUED  # forgotten: new
        assert await store.enqueue(msg("bob", "m2"), ROOMY) is DELIVERED
        assert await store.expire(2001) == 0
        assert await store.enqueue(msg("bob", "m2"), ROOMY) is QUEUED
    store_backend(body)


def test_cleared_expired_and_dropped_messages_are_not_delivered(store_backend):
    async def body(store: Store) -> None:
        await enqueue_all(store, msg("bob", "cleared"), msg("carol", "old", queued_at=10))
        assert await store.clear("bob") == 1
        assert await store.expire(11) == 1
        dropping = QueueLimits(max_messages=1, max_bytes=1000, drop_oldest=True)
        assert await store.enqueue(msg("dave", "dropped"), dropping) is QUEUED
        assert await store.enqueue(msg("dave", "newer"), dropping) is QUEUED
        assert await ids(store, "dave") == ["newer"]
        assert await store.enqueue(msg("bob", "cleared"), ROOMY) is QUEUED
        assert await store.enqueue(msg("carol", "old", queued_at=20), ROOMY) is QUEUED
        assert await store.enqueue(msg("dave", "dropped"), ROOMY) is QUEUED
    store_backend(body)


def test_record_delivered_remembers_live_deliveries(store_backend):
    async def body(store: Store) -> None:
        await store.record_delivered([])
        await store.record_delivered([msg("bob", "live1", queued_at=1000), msg("carol", "live2", sender="0xAbC",
                                                                               queued_at=3000)])
        assert await store.enqueue(msg("bob", "live1"), ROOMY) is DELIVERED
        assert await store.enqueue_many([msg("carol", "live2", sender="0xabc"), msg("carol", "live3", queued_at=9000)],
                                        ROOMY) == [DELIVERED, QUEUED]
        assert await store.enqueue(msg("bob", "live2", sender="0xabc", queued_at=9000), ROOMY) is QUEUED
        assert store.total() == 2
        assert (await store.stats())["messages"] == 2
        await store.record_delivered([msg("bob", "live1", queued_at=500)])  # recorded again, with an older time
        assert await store.expire(2000) == 0
        assert await store.enqueue(msg("bob", "live1"), ROOMY) is QUEUED
        assert await store.enqueue(msg("carol", "live2", sender="0xabc"), ROOMY) is DELIVERED
    store_backend(body)


def test_a_message_known_as_delivered_twice_is_remembered_from_the_later_time(store_backend):
    async def body(store: Store) -> None:
        stored, = await enqueue_all(store, msg("bob", "m", queued_at=1000))
        await store.record_delivered([msg("bob", "m", queued_at=5000)])  # delivered live by another instance
        again = msg("bob", "m")
        assert await store.enqueue(again, ROOMY) is DUPLICATE and again.seq == stored.seq  # stored comes first
        assert await store.remove("bob", [stored.seq]) == 1
        assert await store.expire(2000) == 0
        assert await store.enqueue(msg("bob", "m"), ROOMY) is DELIVERED
        assert await store.expire(5001) == 0
        assert await store.enqueue(msg("bob", "m", queued_at=9000), ROOMY) is QUEUED
    store_backend(body)


def test_delivered_and_duplicate_take_no_room(store_backend):
    async def body(store: Store) -> None:
        await store.record_delivered([msg("bob", "seen")])
        stored = msg("bob", "kept", "12345")
        assert await store.enqueue(stored, ROOMY) is QUEUED
        full = QueueLimits(max_messages=1, max_bytes=5, drop_oldest=False, max_total_bytes=5)
        assert await store.enqueue(msg("bob", "seen", "12345"), full) is DELIVERED
        again = msg("bob", "kept", "12345")
        assert await store.enqueue(again, full) is DUPLICATE and again.seq == stored.seq
        assert await store.enqueue(msg("bob", "other", "1"), full) is NO_SPACE
        dropping = QueueLimits(max_messages=1, max_bytes=5, drop_oldest=True)
        assert await store.enqueue(msg("bob", "seen", "x"), dropping) is DELIVERED
        assert await ids(store, "bob") == ["kept"], "a resend of a delivered message dropped nothing"
    store_backend(body)


def test_restore_stores_a_delivered_message_again(store_backend):
    async def body(store: Store) -> None:
        sent = await enqueue_all(store, *bobs(3))
        assert await store.remove("bob", [sent[0].seq, sent[1].seq]) == 2
        live = msg("bob", "live")
        await store.record_delivered([live])
        assert await store.restore([sent[0], live]) == 2  # their deliveries did not happen after all
        assert await ids(store, "bob") == ["m0", "m2", "live"]
        assert await store.pending("bob", 1) == [sent[0]], "it keeps its seq"
        assert await store.enqueue(msg("bob", "m0"), ROOMY) is DUPLICATE
        assert await store.enqueue(msg("bob", "live"), ROOMY) is DUPLICATE
        assert await store.enqueue(msg("bob", "m1"), ROOMY) is DELIVERED  # not restored: still delivered
        assert await store.ack("bob", ["m0", "live"]) == 2
        assert await store.enqueue_many([msg("bob", "m0"), msg("bob", "live")], ROOMY) == [DELIVERED, DELIVERED]
        assert store.total() == 1
    store_backend(body)


def test_shift_times_moves_delivered_records_too(store_backend):
    async def body(store: Store) -> None:
        await store.record_delivered([msg("bob", "old", queued_at=1000), msg("bob", "new", queued_at=5000)])
        assert await store.shift_times(2000, 100_000) == 1
        assert await store.expire(50_000) == 0
        assert await store.enqueue(msg("bob", "old"), ROOMY) is DELIVERED
        assert await store.enqueue(msg("bob", "new"), ROOMY) is QUEUED
    store_backend(body)


# A numbering collision is an error, never a duplicate


async def next_seq_is(store: Any, kind: str, seq: int) -> None:
    """Make the store number its next message ``seq`` (test-only access), as if something else had numbered
    messages behind its back."""
    if kind.startswith("sealed-"):
        await next_seq_is(store.inner, kind.removeprefix("sealed-"), seq)
    elif kind == "memory":
        store._last_seq = seq - 1
    elif kind == "sqlite":
        store._seqs.last = seq - 1
    elif kind == "postgres":
        async def rewind(conn: Any) -> None:
            await conn.execute("SELECT setval('message_seq', $1, false)", seq)
        await store.link.run(rewind, write=True)
    else:
        raise NotImplementedError(f"{kind}: set the recipient's message seq counter back")


def test_a_numbering_collision_is_an_error_never_a_duplicate(store_backend):
    if "redis" in store_backend.kind:
        pytest.skip("Redis numbers a message in the same atomic script that stores it (per recipient, "
                    "max(Redis clock, last + 1)): no other writer can take its seq")

    async def body(store: Store) -> None:
        first, second = await enqueue_all(store, msg("bob", "m1", "one"), msg("bob", "m2", "two"))
        await next_seq_is(store, store_backend.kind, first.seq)
        with pytest.raises(StorageUnavailable):
            await store.enqueue(msg("bob", "m3", "three"), ROOMY)
        assert await store.pending("bob", 10) == [first, second], "nothing was overwritten"
        assert [m.content for m in await store.pending("bob", 10)] == ["one", "two"]
        assert store.total() == 2
        again = msg("bob", "m2", "two")
        assert await store.enqueue(again, ROOMY) is DUPLICATE and again.seq == second.seq
    store_backend(body)


def push_sub(sub_id: str, address: str = "bob", *, created_at: int = 1, expires_at: int = 0) -> PushSubscription:
    return PushSubscription(sub_id, address, "webpush", f"https://push.example/{sub_id}", "p256dh-" + sub_id,
                            "auth-" + sub_id, created_at, expires_at)


def test_push_subscriptions_are_kept_per_address_capped_and_replaced_by_id(store_backend):
    async def body(store: Store) -> None:
        now = int(time.time() * 1000)
        later = now + 60_000
        for i in range(4):
            stored = await store.put_push_subscription(push_sub(f"s{i}", created_at=now + i, expires_at=later), 3)
            assert stored.created_at == now + i
        await store.put_push_subscription(push_sub("c0", "carol", created_at=now, expires_at=later), 3)
        assert [s.id for s in await store.push_subscriptions("bob", now)] == ["s1", "s2", "s3"]
        again = await store.put_push_subscription(push_sub("s1", created_at=now + 50, expires_at=later + 1), 3)
        assert again.created_at == now + 1  # the first subscription's time is kept
        got = await store.push_subscriptions("bob", now)
        assert [s.id for s in got] == ["s1", "s2", "s3"] and {s.expires_at for s in got} == {later + 1}
        assert got[0] == PushSubscription("s1", "bob", "webpush", "https://push.example/s1", "p256dh-s1", "auth-s1",
                                          now + 1, later + 1)
        assert await store.delete_push_subscription("bob", "s2") is True
        assert await store.delete_push_subscription("bob", "s2") is False
        assert await store.delete_push_subscription("carol", "s1") is False
        assert [s.id for s in await store.push_subscriptions("bob", now)] == ["s1", "s3"]
        assert [s.id for s in await store.push_subscriptions("carol", now)] == ["c0"]
        assert await store.push_subscriptions("nobody", now) == []
    store_backend(body)


def test_a_new_push_subscription_is_kept_when_it_ties_with_older_ones(store_backend):
    """Subscriptions made in the same millisecond tie on ``created_at``: past the cap one of the earlier goes,
    never the one just stored (CI once saw its id sort first and the new one go)."""
    async def body(store: Store) -> None:
        now = int(time.time() * 1000)
        for sub_id in ("z1", "z2", "a0"):
            await store.put_push_subscription(push_sub(sub_id, created_at=now, expires_at=now + 60_000), 2)
        assert [s.id for s in await store.push_subscriptions("bob", now)] == ["a0", "z2"]
    store_backend(body)


def test_push_subscriptions_expire_unless_their_address_signs_in(store_backend):
    async def body(store: Store) -> None:
        now = int(time.time() * 1000)
        await store.put_push_subscription(push_sub("s1", created_at=now, expires_at=now + 60_000), 5)
        await store.put_push_subscription(push_sub("c1", "carol", created_at=now, expires_at=now + 60_000), 5)
        await store.extend_push_subscriptions("carol", now + 600_000)
        await store.extend_push_subscriptions("nobody", now + 600_000)
        assert await store.push_subscriptions("bob", now + 60_000) == []
        assert [s.expires_at for s in await store.push_subscriptions("carol", now + 60_000)] == [now + 600_000]
        assert await store.expire_push_subscriptions(now + 120_000) == 1
        assert await store.push_subscriptions("bob", now) == []
        assert [s.id for s in await store.push_subscriptions("carol", now + 120_000)] == ["c1"]
        assert await store.push_subscriptions("nobody", now) == []
    store_backend(body)


def test_push_subscriptions_count_in_stored_bytes_until_they_go(store_backend):
    async def body(store: Store) -> None:
        now = int(time.time() * 1000)
        later = now + 60_000
        subs = [push_sub(f"s{i}", created_at=now + i, expires_at=later) for i in range(3)]
        for sub in subs:
            await store.put_push_subscription(sub, 2)  # the third pushes the first out
        each = push_bytes("https://push.example/s1", "p256dh-s1", "auth-s1")
        assert each == len("https://push.example/s1") + len("p256dh-s1") + len("auth-s1") + PUSH_OVERHEAD_BYTES
        assert subs[0].size() == each
        assert store.stored_bytes() == 2 * each
        bigger = PushSubscription("s1", "bob", "fcm", "t" * 300, created_at=now + 9, expires_at=later)
        await store.put_push_subscription(bigger, 2)  # a replacement counts once, at its new size
        assert store.stored_bytes() == each + push_bytes("t" * 300, "", "")
        await store.put_push_subscription(push_sub("c0", "carol", created_at=now, expires_at=now + 1000), 2)
        assert await store.delete_push_subscription("bob", "s2") is True
        assert await store.delete_push_subscription("bob", "s2") is False
        assert store.stored_bytes() == push_bytes("t" * 300, "", "") + push_bytes("https://push.example/c0",
                                                                                  "p256dh-c0", "auth-c0")
        await store.stats()  # a backend that refreshes its sums from storage agrees with itself
        assert store.stored_bytes() == push_bytes("t" * 300, "", "") + each
        assert await store.expire_push_subscriptions(now + 1000) == 1  # carol's went, bob's stay
        assert await store.expire_push_subscriptions(now + 1000) == 0
        assert store.stored_bytes() == push_bytes("t" * 300, "", "")
        await store.extend_push_subscriptions("bob", later + 60_000)
        assert await store.expire_push_subscriptions(later) == 0  # the sign-in moved bob's expiry
        assert await store.expire_push_subscriptions(later + 60_000) == 1
        assert store.stored_bytes() == 0
        await store.stats()
        assert store.stored_bytes() == 0
        assert await store.push_subscriptions("bob", now) == []
    store_backend(body)


def test_many_expired_push_subscriptions_go_in_bounded_calls(store_backend):
    async def body(store: Store) -> None:
        now = int(time.time() * 1000)
        for i in range(150):
            await store.put_push_subscription(push_sub("s", f"addr{i}", created_at=now, expires_at=now + i), 5)
        assert store.stored_bytes() == 150 * push_sub("s").size()
        removed = 0
        while gone := await store.expire_push_subscriptions(now + 200):
            removed += gone
        assert removed == 150 and store.stored_bytes() == 0
        await store.stats()
        assert store.stored_bytes() == 0
    store_backend(body)


# What the storage budget counts; unsigned keys that go (issue 20)

def key(address: str, public_key: str, updated_at: int = 1000, *, signed: bool = False) -> KeyRecord:
    if not signed:
        return KeyRecord(address, public_key, updated_at, updated_at)
    return KeyRecord(address, public_key, updated_at, updated_at, "x25519", updated_at // 1000, "doubleHash",
                     "0x" + "ab" * 65)


def test_stored_bytes_counts_keys_and_receipts_as_the_budget_does(store_backend):
    async def body(store: Store) -> None:
        await store.put_key(key("carol", "k" * 100))
        assert store.stored_bytes() == key_bytes("k" * 100, None)
        await store.put_key(key("carol", "k" * 50, 2000))  # a replaced key counts once, at its new size
        signed = key("dave", "s" * 44, signed=True)
        await store.put_key(signed)
        keys = key_bytes("k" * 50, None) + key_bytes("s" * 44, signed.signature)
        assert store.stored_bytes() == keys
        await store.add_receipts([Receipt("erin", "reader", f"m{i}", 1000) for i in range(3)], 2)
        assert store.stored_bytes() == keys + 2 * RECEIPT_BYTES  # the receipt past the cap went
        [first, _] = await store.receipts("erin", 10)
        assert await store.remove_receipts("erin", [first.seq]) == 1
        assert await store.delete_key("carol") is True
        assert store.stored_bytes() == key_bytes("s" * 44, signed.signature) + RECEIPT_BYTES
        await store.stats()  # a backend that refreshes its sums from storage agrees with itself
        counted = store.stored_bytes()
        assert counted == key_bytes("s" * 44, signed.signature) + RECEIPT_BYTES
        if store_backend.kind.startswith("sealed-"):
            return  # the budget below is content-byte exact; that layer counts sealed bytes
        limits = QueueLimits(max_messages=10, max_bytes=1000, drop_oldest=False, max_total_bytes=counted + 5)
        assert await store.enqueue(msg("bob", "m1", "123456"), limits) is NO_SPACE  # keys and receipts left 5
        assert await store.enqueue(msg("bob", "m2", "12345"), limits) is QUEUED
        assert await store.expire(2000) == 1  # the message and the receipt, both older
        assert store.stored_bytes() == key_bytes("s" * 44, signed.signature)
    store_backend(body)


def test_drop_unsigned_key_leaves_a_signed_one(store_backend):
    async def body(store: Store) -> None:
        signed = key("dave", "s" * 44, signed=True)
        await store.put_key(key("carol", "planted"))
        await store.put_key(signed)
        assert await store.drop_unsigned_key("carol") is True
        assert await store.drop_unsigned_key("dave") is False
        assert await store.drop_unsigned_key("nobody") is False
        assert await store.get_key("carol") is None
        assert (await store.get_key("dave")) == signed
        assert store.stored_bytes() == key_bytes("s" * 44, signed.signature)
        assert await store.key_count() == 1
    store_backend(body)


def test_expire_keys_removes_unsigned_keys_nobody_uploaded_or_looked_up(store_backend):
    async def body(store: Store) -> None:
        await store.put_key(key("old", "a"))
        await store.put_key(key("looked-up", "b"))
        await store.put_key(key("fresh", "c", 10_000))
        await store.put_key(key("signed", "d", signed=True))
        assert (await store.get_keys(["looked-up", "nobody"])).keys() == {"looked-up"}
        assert await store.expire_keys(5000, 8000) == 1
        assert await store.get_key("old") is None
        assert set(await store.get_keys(["looked-up", "fresh", "signed"])) == {"looked-up", "fresh", "signed"}
        # Nobody looked "looked-up" up since 8000 (the lookup just above counts from the next call on).
        assert await store.expire_keys(8500, 9500) == 0
        assert await store.expire_keys(9600, 9700) == 1  # the lookup above made it used at 9500, not after
        assert set(await store.get_keys(["looked-up", "fresh", "signed"])) == {"fresh", "signed"}
        assert await store.key_count() == 2
        assert store.stored_bytes() == key_bytes("c", None) + key_bytes("d", "0x" + "ab" * 65)
        await store.put_key(key("fresh", "c2", 20_000))  # uploading again keeps it
        assert await store.expire_keys(15_000, 20_000) == 0
        assert await store.expire_keys(10**12, 10**12) == 1  # but not for ever; the signed key stays
        assert await store.key_count() == 1
    store_backend(body)
