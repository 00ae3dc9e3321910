"""``relayd.protocol.router.Router`` driven directly: fake sessions, the real presence,
store and metrics, no sockets. Covers the cases a socket cannot provoke on
demand: a peer that stops reading mid-flush, storage failures, sessions that
close while an await is pending."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from support import A, B, C, MIXED, FakeConnection as Peer, LandsUnconfirmed, make_config

from relayd.errors import ErrorCode, RelayError
from relayd.storage.memory import MemoryStore
from relayd.protocol.presence import LocalPresence
from relayd.ratelimit import FrameLimiter, Verdict
from relayd.protocol.router import Router
from relayd.protocol.session import Session
from relayd.storage.store import StorageUnavailable
from relayd.ops.metrics import RelayMetrics
from relayd.clock import SYSTEM_CLOCK
from relayd.identity.auth import Authenticator, SignIn


class Relay:
    def __init__(self, store: Any = None, authenticator: Any = None, **sections: dict[str, Any]) -> None:
        self.presence = LocalPresence()
        self.store = store if store is not None else MemoryStore()
        config = make_config(**{"auth": {"mode": "open"}, **sections})
        metrics = RelayMetrics()
        if authenticator is None:
            authenticator = Authenticator(config, config.effective_public_url, self.store, metrics, SYSTEM_CLOCK)
        self.router = Router(config, self.presence, self.store, metrics, authenticator, SYSTEM_CLOCK)

    async def receive(self, peer: Peer, frame: Any) -> None:
        """Hand one frame to the router as the connection does: await what it returns before the next."""
        pending = self.router.receive(peer.session, frame if isinstance(frame, str) else json.dumps(frame))
        if pending is not None:
            await pending

    async def send(self, peer: Peer, frame: Any) -> None:
        """Handle one frame and wait until any message it stored is answered."""
        await self.receive(peer, frame)
        await self.router.settle()

    async def auth(self, peer: Peer, address: str, **extra: Any) -> dict[str, Any]:
        await self.send(peer, {"type": "auth", "address": address, **extra})
        return peer.frames[0] if peer.frames else {}


def message(to: str, mid: str, content: str = "c", **extra: Any) -> dict[str, Any]:
    return {"type": "message", "to": to, "content": content, "messageId": mid, **extra}


def strip_ts(frame: dict[str, Any]) -> dict[str, Any]:
    assert type(frame.get("timestamp")) is int, frame
    return {k: v for k, v in frame.items() if k != "timestamp"}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_auth_attaches_a_ready_session_and_answers_exactly():
    async def scenario() -> None:
        relay, peer = Relay(), Peer()
        await relay.send(peer, {"type": "auth", "address": MIXED})
        assert [strip_ts(f) for f in peer.take()] == [{"type": "auth_success", "address": MIXED.lower(), "verified": False}]
        assert peer.session.address == MIXED.lower() and peer.session.ready is True
        assert relay.presence.is_online(MIXED.lower())
        assert relay.presence.ready_sessions(MIXED.lower()) == (peer.session,)
    run(scenario())


def test_frames_before_auth_attach_nothing():
    async def scenario() -> None:
        relay, peer = Relay(), Peer()
        await relay.send(peer, message(B, "m1"))
        assert peer.take() == [{"type": "error", "code": "not_authenticated",
                                "message": "Authentication required: send auth first", "messageId": "m1"}]
        assert relay.presence.online_count() == 0
        assert await relay.store.size(B) == 0
    run(scenario())


def test_live_message_and_delivered_answer():
    async def scenario() -> None:
        relay, a, b = Relay(), Peer(), Peer()
        await relay.auth(a, A)
        await relay.auth(b, B)
        a.take(), b.take()
        await relay.send(a, message(B, "m1", "hello", timestamp=5))
        assert [strip_ts(f) for f in a.take()] == [{"type": "delivered", "messageId": "m1", "to": B}]
        assert b.take() == [{"type": "message", "from": A, "content": "hello", "messageId": "m1", "timestamp": 5,
                             "queued": False}]
        assert await relay.store.size(B) == 0
    run(scenario())


def test_recipient_that_stopped_reading_gets_the_message_stored_not_lost():
    async def scenario() -> None:
        relay, a, b = Relay(), Peer(), Peer(accept=1)  # takes auth_success, then stops reading
        await relay.auth(a, A)
        await relay.auth(b, B)
        a.take()
        await relay.send(a, message(B, "m1", "kept", timestamp=5))
        assert [strip_ts(f) for f in a.take()] == [{"type": "queued", "messageId": "m1", "to": B}]
        assert await relay.store.size(B) == 1
        relay.router.closed(b.session)
        fresh = Peer()
        await relay.auth(fresh, B)
        assert fresh.take()[1:] == [{"type": "message", "from": A, "content": "kept", "messageId": "m1",
                                     "timestamp": 5, "queued": True}]
        assert await relay.store.size(B) == 0
    run(scenario())


def test_flush_interrupted_by_a_peer_that_stops_reading_keeps_the_rest():
    async def scenario() -> None:
        relay, a = Relay(), Peer()
        await relay.auth(a, A)
        for i in range(3):
            await relay.send(a, message(B, f"m{i}", str(i), timestamp=i))
        slow = Peer(accept=2)  # auth_success and the first stored message only
        await relay.auth(slow, B)
        assert [f.get("messageId") for f in slow.take()] == [None, "m0"]
        assert [m.message_id for m in await relay.store.pending(B, 10)] == ["m1", "m2"]
        # Not ready: later messages join the backlog instead of overtaking it.
        assert slow.session.ready is False
        a.take()
        await relay.send(a, message(B, "m3", "3", timestamp=3))
        assert strip_ts(a.take()[0]) == {"type": "queued", "messageId": "m3", "to": B}
        relay.router.closed(slow.session)
        again = Peer()
        await relay.auth(again, B)
        assert [f["messageId"] for f in again.take()[1:]] == ["m1", "m2", "m3"]
    run(scenario())


def test_stored_receipt_is_not_lost_when_the_flush_cannot_write_it():
    async def scenario() -> None:
        relay, a = Relay(), Peer()
        await relay.auth(a, A)
        await relay.send(a, {"type": "read_receipt", "to": B, "messageId": "r1"})
        gone = Peer(accept=1)  # reads auth_success, then its connection is gone
        await relay.auth(gone, B)
        relay.router.closed(gone.session)
        fresh = Peer()
        await relay.auth(fresh, B)
        assert [strip_ts(f) for f in fresh.take()[1:]] == [{"type": "read", "from": A, "messageId": "r1"}]
    run(scenario())


def test_closing_one_of_two_sessions_keeps_the_address_online():
    async def scenario() -> None:
        relay, old, new, a = Relay(), Peer(), Peer(), Peer()
        await relay.auth(old, B)
        await relay.auth(new, B)
        await relay.auth(a, A)
        relay.router.closed(old.session)
        relay.router.closed(old.session)  # closing twice changes nothing
        assert relay.presence.is_online(B)
        a.take(), new.take()
        await relay.send(a, message(B, "m1", timestamp=1))
        assert strip_ts(a.take()[0])["type"] == "delivered"
        assert [f["messageId"] for f in new.take()] == ["m1"]
        relay.router.closed(new.session)
        assert not relay.presence.is_online(B)
        await relay.send(a, message(B, "m2", timestamp=2))
        assert strip_ts(a.take()[0])["type"] == "queued"
    run(scenario())


def test_ack_session_keeps_messages_until_acked():
    async def scenario() -> None:
        relay, a = Relay(), Peer()
        await relay.auth(a, A)
        for i in range(2):
            await relay.send(a, message(B, f"m{i}", timestamp=i))
        b = Peer()
        await relay.auth(b, B, ack=True)
        frames = b.take()
        assert [f["type"] for f in frames] == ["auth_success", "message", "message", "queue_empty"]
        assert frames[-1] == {"type": "queue_empty"}
        assert await relay.store.size(B) == 2
        await relay.send(b, {"type": "ack", "messageIds": ["m0"]})
        assert b.take() == []
        assert [m.message_id for m in await relay.store.pending(B, 10)] == ["m1"]
    run(scenario())


class FailingStore(MemoryStore):
    """A backend that cannot write (disk full, read-only) until ``healthy_again``."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = True

    async def enqueue_many(self, messages: Any, limits: Any) -> Any:
        if self.failing:
            raise StorageUnavailable("disk full")
        return await super().enqueue_many(messages, limits)

    async def add_receipts(self, receipts: Any, max_per_recipient: int) -> int:
        if self.failing:
            raise StorageUnavailable("disk full")
        return await super().add_receipts(receipts, max_per_recipient)

    async def pending(self, recipient: str, limit: int, after_seq: int = 0) -> Any:
        if self.failing:
            raise StorageUnavailable("disk full")
        return await super().pending(recipient, limit, after_seq)

    async def backlog_size(self, recipient: str) -> Any:
        if self.failing:
            raise StorageUnavailable("disk full")
        return await super().backlog_size(recipient)


def test_storage_failure_refuses_the_message_and_is_not_remembered():
    async def scenario() -> None:
        store = FailingStore()
        relay, a = Relay(store), Peer()
        await relay.auth(a, A)
        a.take()
        await relay.send(a, message(B, "m1", timestamp=1))
        [frame] = a.take()
        assert (frame["type"], frame["code"], frame["messageId"]) == ("error", "storage_unavailable", "m1")
        await relay.send(a, {"type": "read_receipt", "to": B, "messageId": "r1"})
        [frame] = a.take()
        assert (frame["type"], frame["code"], frame["messageId"]) == ("error", "storage_unavailable", "r1")
        store.failing = False
        await relay.send(a, message(B, "m1", timestamp=1))  # the retry is accepted, not answered from memory
        assert strip_ts(a.take()[0]) == {"type": "queued", "messageId": "m1", "to": B}
        assert await store.size(B) == 1
    run(scenario())


def test_a_resend_after_storage_timeout_is_stored_not_pushed_live_beside_the_copy_that_landed():
    """m1 went to the store behind m0 (A's pipeline was busy) although B was online, and its write landed
    unconfirmed. Pushed live on the resend, B would get it now and its landed copy again on its next session."""
    async def scenario() -> None:
        store = LandsUnconfirmed()
        relay, a, b = Relay(store), Peer(), Peer()
        await relay.auth(a, A)
        await relay.auth(b, B)
        a.take(), b.take()
        store.unconfirmed = 1
        await relay.receive(a, message(C, "m0", timestamp=1))
        await relay.receive(a, message(B, "m1", timestamp=2))  # stored behind m0, in the same write
        await relay.router.settle()
        assert [(f["type"], f.get("code"), f["messageId"]) for f in a.take()] == [
            ("error", "storage_timeout", "m0"), ("error", "storage_timeout", "m1")]
        await relay.send(a, message(B, "m1", timestamp=2))
        assert strip_ts(a.take()[0]) == {"type": "queued", "messageId": "m1", "to": B}  # the copy that landed
        assert b.take() == []
        again = Peer()
        await relay.auth(again, B)
        assert [f["messageId"] for f in again.take() if f["type"] == "message"] == ["m1"]
        assert await store.size(B) == 0
    run(scenario())


def test_unreadable_queue_on_auth_still_opens_live_delivery():
    async def scenario() -> None:
        store = FailingStore()
        relay, a, b = Relay(store), Peer(), Peer()
        await relay.auth(a, A)
        await relay.auth(b, B)
        assert strip_ts(b.take()[0]) == {"type": "auth_success", "address": B, "verified": False}
        assert b.session.ready is True
        a.take()
        await relay.send(a, message(B, "live", timestamp=1))
        assert strip_ts(a.take()[0])["type"] == "delivered"
        assert [f["messageId"] for f in b.take()] == ["live"]
    run(scenario())


class FakeAuthenticator:
    def challenge(self, session_id: int) -> None:
        return None

    def forget(self, session_id: int) -> None:
        pass


class ClosingAuthenticator(FakeAuthenticator):
    """The connection closes while the authenticator is awaited."""

    def __init__(self) -> None:
        self.peer: Peer | None = None

    async def sign_in(self, session_id: int, ip: str, address: str, frame: dict[str, Any]) -> SignIn:
        assert self.peer is not None
        self.peer.session.closed = True
        return SignIn({"verified": False}, proven=False)


class RefusingAuthenticator(FakeAuthenticator):
    async def sign_in(self, session_id: int, ip: str, address: str, frame: dict[str, Any]) -> SignIn:
        raise RelayError(ErrorCode.AUTH_REQUIRED, "sign the challenge")


def test_session_closed_during_auth_is_never_attached():
    async def scenario() -> None:
        auth = ClosingAuthenticator()
        relay, peer = Relay(authenticator=auth), Peer()
        auth.peer = peer
        await relay.send(peer, {"type": "auth", "address": A})
        assert peer.take() == []
        assert not relay.presence.is_online(A)
    run(scenario())


def test_refused_auth_sends_the_error_then_closes_with_its_code():
    async def scenario() -> None:
        relay, peer = Relay(authenticator=RefusingAuthenticator()), Peer()
        await relay.send(peer, {"type": "auth", "address": A})
        assert peer.take() == [{"type": "error", "code": "auth_required", "message": "sign the challenge"}]
        assert peer.closes == [(4403, "auth_required")]
        assert not relay.presence.is_online(A)
    run(scenario())


def test_typing_and_receipts_reach_every_ready_session_only():
    async def scenario() -> None:
        relay, a, b1, b2 = Relay(), Peer(), Peer(), Peer()
        for peer, addr in ((a, A), (b1, B), (b2, B)):
            await relay.auth(peer, addr)
            peer.take()
        await relay.send(a, {"type": "typing", "to": B, "isTyping": True})
        await relay.send(a, {"type": "read_receipt", "to": B, "messageId": "r1"})
        for peer in (b1, b2):
            frames = peer.take()
            assert frames[0] == {"type": "typing", "from": A, "isTyping": True}
            assert strip_ts(frames[1]) == {"type": "read", "from": A, "messageId": "r1"}
        assert a.take() == []
        stats = await relay.store.stats()
        assert (stats["messages"], stats["receipts"]) == (0, 0)
    run(scenario())


def test_frame_rate_limit_refuses_then_closes():
    """The connection's limiter counts frames; the router decides the answer to each verdict."""
    async def scenario() -> None:
        relay, peer = Relay(), Peer()
        limiter = FrameLimiter(rate=0.001, burst=2, strike_limit=2, now=0.0)
        await relay.auth(peer, A)
        assert limiter.admit(0.0) is Verdict.ALLOW  # the auth frame
        assert limiter.admit(0.0) is Verdict.ALLOW
        verdict = limiter.admit(0.0)
        assert verdict is Verdict.REFUSE
        relay.router.throttled(peer.session, verdict)
        [_, frame] = peer.take()
        assert (frame["type"], frame["code"]) == ("error", "rate_limited")
        verdict = limiter.admit(0.0)
        assert verdict is Verdict.CLOSE
        relay.router.throttled(peer.session, verdict)
        assert peer.take() == []
        assert peer.closes == [(1008, "rate limit exceeded")]
    run(scenario())


class SlowStore(MemoryStore):
    """Commits only when released, to hold messages in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def enqueue_many(self, messages: Any, limits: Any) -> Any:
        await self.gate.wait()
        return await super().enqueue_many(messages, limits)


def test_messages_in_flight_are_answered_in_order_and_never_overtaken() -> None:
    """While a sender's writes are pending, its next messages queue behind them,
    even to an online recipient, so nothing overtakes an earlier message."""
    async def main() -> None:
        store = SlowStore()
        relay, a, b = Relay(store=store), Peer(), Peer()
        await relay.auth(a, A)
        a.take()
        for mid in ("m1", "m2", "m3"):
            await relay.receive(a, message(B, mid))
        assert a.take() == [] and relay.router.delivery.in_flight(a.session) == 3
        await relay.receive(b, {"type": "auth", "address": B})
        b.take()
        await relay.receive(a, message(B, "m4"))
        assert b.take() == [], "m4 must not overtake m1..m3"
        store.gate.set()
        await relay.router.settle()
        assert [(f["type"], f["messageId"]) for f in a.take()] == [
            ("delivered", "m1"), ("delivered", "m2"), ("delivered", "m3"), ("delivered", "m4")]
        assert [(f["messageId"], f["queued"]) for f in b.take()] == [
            ("m1", False), ("m2", False), ("m3", False), ("m4", False)]
        assert await store.size(B) == 0
        assert relay.router.delivery.in_flight(a.session) == 0
    run(main())


def test_an_ack_sessions_pong_comes_once_its_earlier_acks_are_stored():
    """So a client can tell its acks are durable: ack, then ping; the pong confirms them."""
    class SlowAcks(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.release = asyncio.Event()

        async def ack(self, recipient: str, message_ids: list[str]) -> int:
            await self.release.wait()
            return await super().ack(recipient, message_ids)

    async def scenario() -> None:
        store = SlowAcks()
        relay, a, b = Relay(store=store), Peer(), Peer()
        await relay.auth(a, A)
        await relay.auth(b, B, ack=True)
        await relay.send(a, message(B, "m1"))
        a.take(), b.take()
        await relay.receive(b, {"type": "ack", "messageIds": ["m1"]})
        pinged = asyncio.ensure_future(relay.receive(b, {"type": "ping"}))
        for _ in range(20):
            await asyncio.sleep(0)
        assert b.take() == [] and await store.size(B) == 1  # the ack is not stored yet: no pong
        store.release.set()
        await pinged
        assert [f["type"] for f in b.take()] == ["pong"] and await store.size(B) == 0
    run(scenario())
