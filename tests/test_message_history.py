"""Message history (``[history] days``): a verified session pages through what its address received and deletes
it, on every backend and through the encryption-at-rest layer; off by default; counted in the storage budget."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from support import (ADDR_B, KEY_B, assert_error, connect, frames_until_pong, msg, new_address, signed_login,
                     status_frame, wait_until)

from conftest import make_store

from relayd.storage.store import QueuedMessage, QueueLimits

ROOMY = QueueLimits(max_messages=1000, max_bytes=1_000_000, drop_oldest=False)
HISTORY_BACKENDS = ["memory", "sqlite", "redis", "postgres", "sealed-sqlite", "sealed-redis", "sealed-postgres"]


def page(ws: Any, **query: Any) -> dict[str, Any]:
    ws.send({"type": "history", **query})
    frame = ws.recv()
    assert frame["type"] == "history" and set(frame) == {"type", "messages", "more"}, frame
    return frame


@pytest.mark.parametrize("kind", HISTORY_BACKENDS)
def test_a_second_device_pages_through_what_the_address_received(kind, tmp_path, start_relay, request):
    store = make_store(kind, request, tmp_path)
    relay = start_relay(store=store, history={"days": 7})
    empty = relay.server.store.stored_bytes()  # the sealing layer's check record is a key: counted too
    alice, carol = new_address(), new_address()
    got: dict[str, dict[str, Any]] = {}
    """The frames the first device got: history gives them back (as stored ones: queued true)."""
    with connect(relay, alice) as a:
        a.send(msg(ADDR_B, "m1", "stored first", timestamp=1000))
        status_frame(a.recv(), "queued", "m1", ADDR_B)
        first, _ = signed_login(relay, KEY_B)  # a plain session: the flush delivers m1, which history keeps
        got["m1"] = first.recv_type("message")
        a.send(msg(ADDR_B, "m2", "then live", timestamp=2000))
        assert a.recv()["type"] in ("delivered", "queued")  # SQLite stores first, then pushes
        got["m2"] = first.recv_type("message")
    with connect(relay, carol) as c:
        c.send(msg(ADDR_B, "m3", "from carol", timestamp=3000))
        assert c.recv()["type"] in ("delivered", "queued")
        got["m3"] = first.recv_type("message")
    assert got["m1"] == {"type": "message", "from": alice, "content": "stored first", "messageId": "m1",
                         "timestamp": 1000, "queued": True}
    got = {mid: {**frame, "queued": True} for mid, frame in got.items()}  # history comes from the store
    second, _ = signed_login(relay, KEY_B)  # the second device
    try:
        # a live delivery is recorded after its answer
        wait_until(lambda: page(second)["messages"] == [got["m3"], got["m2"], got["m1"]],
                   "the delivered messages to be kept")
        assert page(second)["more"] is False
        assert [m["messageId"] for m in page(second, **{"with": alice})["messages"]] == ["m2", "m1"]
        newest = page(second, limit=1)
        assert newest["messages"] == [got["m3"]] and newest["more"] is True
        older = page(second, limit=1, before=3000)
        assert [m["messageId"] for m in older["messages"]] == ["m2"] and older["more"] is True
        assert page(second, limit=5, before=2000)["more"] is False
        kept_bytes = len("stored first") + len("then live") + len("from carol")
        assert relay.server.store.total() == 0
        if not kind.startswith("sealed-"):
            assert relay.server.store.stored_bytes() == kept_bytes  # counted in the storage budget
        else:
            assert relay.server.store.stored_bytes() > empty + kept_bytes  # sealed bytes

        second.send({"type": "history_delete", "messageIds": ["m2", "unknown"]})
        assert second.recv() == {"type": "history_delete", "deleted": 1}
        assert [m["messageId"] for m in page(second)["messages"]] == ["m3", "m1"]
        second.send({"type": "history_delete", "all": True})
        assert second.recv() == {"type": "history_delete", "deleted": 2}
        assert page(second) == {"type": "history", "messages": [], "more": False}
        assert relay.server.store.stored_bytes() == empty
    finally:
        second.close()
        first.close()


def test_bad_history_frames_get_precise_errors(start_relay):
    relay = start_relay(history={"days": 1})
    ws, _ = signed_login(relay, KEY_B)
    with ws:
        for query, code in (({"limit": 0}, "invalid_field"), ({"limit": 501}, "invalid_field"),
                            ({"limit": "10"}, "invalid_field"), ({"limit": True}, "invalid_field"),
                            ({"before": "yesterday"}, "invalid_field"), ({"before": -1}, "invalid_field"),
                            ({"with": "bob"}, "invalid_address"), ({"with": 5}, "invalid_address")):
            ws.send({"type": "history", **query})
            assert_error(ws.recv(), code)
        for frame in ({}, {"all": True, "messageIds": ["x"]}, {"messageIds": []}, {"messageIds": "x"},
                      {"messageIds": ["x"] * 1001}, {"messageIds": [""]}, {"messageIds": [7]},
                      {"all": "yes"}, {"messageIds": ["x" * 257]}):
            ws.send({"type": "history_delete", **frame})
            assert_error(ws.recv(), "invalid_field")
        assert frames_until_pong(ws) == []  # the session lives on


def test_an_unsigned_session_gets_not_verified_and_history_is_off_by_default(start_relay):
    on = start_relay(history={"days": 1})
    with connect(on, ADDR_B) as ws:
        for frame in ({"type": "history"}, {"type": "history_delete", "all": True}):
            ws.send(frame)
            assert_error(ws.recv(), "not_verified")
    off = start_relay()
    ws, _ = signed_login(off, KEY_B)
    with ws, connect(off, new_address()) as a:
        a.send(msg(ADDR_B, "live", "not kept"))
        assert a.recv()["type"] == "delivered"
        ws.recv_type("message")
        ws.send({"type": "history"})
        assert_error(ws.recv(), "disabled")
        frames_until_pong(a)
        assert off.call(off.server.store.history(ADDR_B, 10)).messages == []


@pytest.mark.parametrize("kind", [*HISTORY_BACKENDS, "redis-cluster"])
def test_kept_messages_expire_and_a_restored_message_is_no_longer_kept(kind, tmp_path, request):
    store = make_store(kind, request, tmp_path)

    async def body() -> None:
        store.keep_history(60_000)  # type: ignore[attr-defined]
        await store.open()
        try:
            kept, back = (QueuedMessage("0xb0b", "0xA11ce", mid, "text", 5, 5) for mid in ("kept", "back"))
            for m in (kept, back):
                await store.enqueue(m, ROOMY)
            assert await store.remove("0xb0b", [kept.seq, back.seq]) == 2
            assert len((await store.history("0xb0b", 10)).messages) == 2  # type: ignore[attr-defined]
            await store.restore([back])  # its delivery did not happen after all
            page = await store.history("0xb0b", 10, sender="0xa11ce")  # type: ignore[attr-defined]
            assert [(m.message_id, m.sender) for m in page.messages] == [("kept", "0xA11ce")]
            assert await store.expire_history(2**50) == 1  # type: ignore[attr-defined]
            assert (await store.history("0xb0b", 10)).messages == []  # type: ignore[attr-defined]
            assert store.total() == 1
        finally:
            await store.close()
    asyncio.run(body())


def test_several_instances_on_redis_share_one_history(fresh_redis, relay_cluster):
    one, two = relay_cluster(fresh_redis, RELAYD_HISTORY_DAYS="1")
    alice = new_address()
    with connect(one, alice) as a:
        a.send(msg(ADDR_B, "stored", "while away", timestamp=1000))
        status_frame(a.recv(), "queued", "stored", ADDR_B)
        phone, _ = signed_login(two, KEY_B)  # on the other instance
        with phone:
            got = [phone.recv_type("message", timeout=10)]
            a.send(msg(ADDR_B, "live", "across instances", timestamp=2000))
            assert a.recv()["type"] in ("delivered", "queued")
            got.insert(0, phone.recv_type("message", timeout=10))
    got = [{**frame, "queued": True} for frame in got]
    laptop, _ = signed_login(one, KEY_B)
    with laptop:
        wait_until(lambda: page(laptop)["messages"] == got, "both messages in the shared history", timeout=10)


def test_a_page_of_large_messages_ends_at_one_mebibyte(start_relay):
    relay = start_relay(history={"days": 1}, limits={"max_message_bytes": 400_000})
    phone, _ = signed_login(relay, KEY_B)
    with phone, connect(relay, new_address()) as a:
        for i in range(4):
            a.send(msg(ADDR_B, f"big{i}", str(i) * 300_000, timestamp=1000 + i))
            assert a.recv()["type"] == "delivered"
            phone.recv_type("message")
        laptop, _ = signed_login(relay, KEY_B)
        with laptop:
            wait_until(lambda: len(page(laptop, limit=1, before=1001)["messages"]) == 1, "all four kept")
            first = page(laptop)
            assert [m["messageId"] for m in first["messages"]] == ["big3", "big2", "big1"] and first["more"]
            rest = page(laptop, before=first["messages"][-1]["timestamp"])
            assert [m["messageId"] for m in rest["messages"]] == ["big0"] and rest["more"] is False


def test_paging_never_skips_messages_that_share_a_timestamp(start_relay):
    relay = start_relay(history={"days": 1})
    phone, _ = signed_login(relay, KEY_B)
    with phone, connect(relay, new_address()) as a:
        for mid, ts in (("a", 1000), ("b", 2000), ("c", 2000), ("d", 2000), ("e", 3000)):
            a.send(msg(ADDR_B, mid, mid, timestamp=ts))
            assert a.recv()["type"] == "delivered"
            phone.recv_type("message")
        laptop, _ = signed_login(relay, KEY_B)
        with laptop:
            wait_until(lambda: len(page(laptop)["messages"]) == 5, "all five kept")
            seen: list[str] = []
            query: dict[str, Any] = {"limit": 2}
            while True:
                got = page(laptop, **query)
                seen += [m["messageId"] for m in got["messages"]]
                if not got["more"]:
                    break
                query["before"] = got["messages"][-1]["timestamp"]
            assert sorted(seen) == ["a", "b", "c", "d", "e"] and len(seen) == 5
