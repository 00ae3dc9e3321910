"""The real Idena P2P app on relayd's defaults, driven the way the app drives a relay.

Every test here runs a relay process on its default configuration (only the
host, port and data directory are set) and emulates the app with
``support.App``: its frames, its REST calls on fresh connections, its late
subscription after start-up, its listeners that each look up the sender's
key, its 3-second reconnects and its EIP-55 addresses. See
``../shared/real-client-notes.md``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import resource
import secrets
from pathlib import Path
from typing import Any

import pytest
from support import (App, ProcessRelay, ProcessRelays, app_address, assert_error, connect,
                     wait_for_state)

from relayd.config import load_config

DEFAULTS = load_config(None, environ={})


@pytest.fixture
def app_relay(process_relays: ProcessRelays, tmp_path: Path) -> ProcessRelay:
    return process_relays(tmp_path, defaults=True)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def start(apps: list[App]) -> list[asyncio.Task[None]]:
    tasks = [asyncio.create_task(app.run()) for app in apps]
    await wait_for_state(lambda: all(app.subscribed for app in apps), f"{len(apps)} apps to start", timeout=60)
    return tasks


async def stop(apps: list[App], tasks: list[asyncio.Task[None]]) -> None:
    await asyncio.gather(*(app.stop() for app in apps))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def ciphertext(size: int) -> str:
    """Base64 content of ``size`` characters, as the app's encryption produces."""
    return base64.b64encode(secrets.token_bytes(size * 3 // 4)).decode()[:size]


# 1. Phones behind one public IP


def test_a_thousand_apps_behind_one_ip_get_in_and_back_in_after_a_restart(process_relays, tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    relay = process_relays(tmp_path, defaults=True)
    apps = [App(relay.port, app_address()) for _ in range(1000)]

    async def main() -> None:
        tasks = await start(apps)
        try:
            assert [app.refusals for app in apps if app.refusals] == []
            assert {app.upload_status for app in apps} == {200}
            assert {app.auths for app in apps} == {1}
            # A restart closes all of them at once; all reconnect together 3 s later (a reconnect storm).
            await asyncio.to_thread(process_relays.restart, tmp_path, relay, kill=False, defaults=True)
            await wait_for_state(lambda: all(app.auths == 2 for app in apps), "every app to sign in again", 60)
            assert [app.refusals for app in apps if app.refusals] == []
            # And they talk: the last app writes to the first, who shows it.
            first, last = apps[0], apps[-1]
            await last.send(first.address, ciphertext(64))
            await wait_for_state(lambda: first.inbox, "the message to reach the first app")
            assert first.inbox[0]["from"] == last.address
        finally:
            await stop(apps, tasks)

    run(main())
    metrics = process_relays.started[-1].http("GET", "/metrics").body.decode()
    assert 'relayd_rate_limit_hits_total{limit="connections"}' not in metrics
    assert 'relayd_rate_limit_hits_total{limit="handshakes"}' not in metrics
    assert 'relayd_rate_limit_hits_total{limit="connection_rate"}' not in metrics


# 2. REST lookups at app rates


def test_a_600_message_backlog_read_by_an_app_opened_three_times_loses_nothing(app_relay):
    """Each listener fetches the sender's key per message: about 1,800 lookups from one IP in seconds."""
    recipient = App(app_relay.port, app_address(), listeners=3)
    sender = App(app_relay.port, app_address())

    async def main() -> None:
        tasks = await start([recipient])
        await stop([recipient], tasks)  # it has uploaded its key and gone offline
        tasks = await start([sender])
        sent = [await sender.send(recipient.address, ciphertext(200)) for _ in range(600)]
        await wait_for_state(lambda: sum(f.get("type") == "queued" for f in sender.frames) == 600, "600 queued")
        reopened = App(app_relay.port, recipient.address, listeners=3)
        tasks += await start([reopened])
        await wait_for_state(lambda: len(reopened.inbox) + len(reopened.lost) == 600, "the backlog to be read", 60)
        await reopened.settle()
        await stop([reopened, sender], tasks)
        assert reopened.dropped == [] and reopened.lost == [], reopened.lookups
        assert reopened.lookups == {200: 1800}
        assert [f["messageId"] for f in reopened.frames if f["type"] == "message"] == sent
        assert sorted(m["messageId"] for m in reopened.inbox) == sorted(sent)
        assert {m["from"] for m in reopened.inbox} == {sender.address}
        assert sender.lookups == {200: 600}

    run(main())
    assert app_relay.http("GET", f"/api/messages/{recipient.address}/queue-size").json["queueSize"] == 0


# 3. Message size


def test_an_80_kb_message_reaches_the_app_live_and_from_storage(app_relay):
    alice, bob = App(app_relay.port, app_address()), App(app_relay.port, app_address())
    big = ciphertext(80_000)

    async def main() -> None:
        tasks = await start([alice, bob])
        await alice.send(bob.address, big)
        await wait_for_state(lambda: bob.inbox, "the live 80 KB message")
        await stop([bob], tasks[1:])
        mid = await alice.send(bob.address, big)
        await wait_for_state(lambda: any(f.get("type") == "queued" and f["messageId"] == mid for f in alice.frames),
                             "the 80 KB message to be queued")
        reopened = App(app_relay.port, bob.address)
        tasks.append(asyncio.create_task(reopened.run()))
        await wait_for_state(lambda: reopened.inbox, "the stored 80 KB message")
        await stop([alice, reopened], tasks)
        assert [m["content"] for m in bob.inbox + reopened.inbox] == [big, big]
        assert [f["type"] for f in alice.frames] == ["delivered", "queued"]

    run(main())


def test_the_largest_allowed_message_passes_and_one_byte_more_is_refused(app_relay):
    limit = DEFAULTS.limits.max_message_bytes
    assert limit >= 256 * 1024
    a, b = app_address(), app_address()
    with connect(app_relay, a) as alice, connect(app_relay, b) as bob:
        alice.send({"type": "message", "to": b, "content": "x" * limit, "messageId": "max", "timestamp": 1})
        assert alice.recv()["type"] == "delivered"
        assert len(bob.recv(timeout=5)["content"]) == limit
        alice.send({"type": "message", "to": b, "content": "x" * (limit + 1), "messageId": "over", "timestamp": 1})
        assert_error(alice.recv(), "message_too_large", "over")


# 4. Stored messages on app start


def test_messages_sent_while_the_app_was_closed_reach_it_on_start(app_relay):
    """auth, key upload, subscription 10 ms after the upload's answer: nothing flushed before is dropped."""
    alice, bob = App(app_relay.port, app_address()), App(app_relay.port, app_address())

    async def main() -> None:
        tasks = await start([alice, bob])
        await stop([bob], tasks[1:])
        sent = [await alice.send(bob.address, ciphertext(100)) for _ in range(20)]
        await wait_for_state(lambda: len(alice.frames) == 20, "20 answers")
        assert {f["type"] for f in alice.frames} == {"queued"}
        restarted = App(app_relay.port, bob.address)
        tasks.append(asyncio.create_task(restarted.run()))
        await wait_for_state(lambda: len(restarted.inbox) == 20, "the stored messages to be shown")
        # Live messages sent meanwhile queue behind the backlog.
        sent.append(await alice.send(bob.address, ciphertext(100)))
        await wait_for_state(lambda: len(restarted.inbox) == 21, "the live message")
        await stop([alice, restarted], tasks)
        assert restarted.dropped == []
        # The relay sends them in order; the app shows each once its key lookup (a REST call of its own) answers,
        # so the inbox's order is the lookups', not the relay's.
        assert [f["messageId"] for f in restarted.frames if f["type"] == "message"] == sent
        assert sorted(m["messageId"] for m in restarted.inbox) == sorted(sent)

    run(main())


def test_a_session_that_never_shows_it_listens_gets_its_backlog_after_the_grace_delay(app_relay):
    a, b = app_address(), app_address()
    with connect(app_relay, a) as alice:
        alice.send({"type": "message", "to": b, "content": "c2VlbiBsYXRl", "messageId": "late", "timestamp": 5})
        assert alice.recv()["type"] == "queued"
    with app_relay.ws() as bob:
        bob.send({"type": "auth", "address": b})
        bob.recv_type("auth_success")
        frame = bob.recv(timeout=DEFAULTS.queue.flush_delay_ms / 1000 + 5)
        assert (frame["type"], frame["messageId"], frame["from"]) == ("message", "late", a)


# 5. Sender address casing


def test_from_is_spelled_as_the_sender_authenticated_live_stored_and_in_receipts(app_relay):
    alice, bob = App(app_relay.port, app_address()), App(app_relay.port, app_address())

    async def main() -> None:
        tasks = await start([alice, bob])
        await alice.send(bob.address, ciphertext(40))
        await alice.ws.send(json.dumps({"type": "typing", "to": bob.address.lower(), "isTyping": True}))
        await wait_for_state(lambda: len(bob.frames) == 2, "message and typing")
        await bob.ws.send(json.dumps({"type": "read_receipt", "to": alice.address.lower(),
                                      "messageId": bob.frames[0]["messageId"]}))
        await wait_for_state(lambda: any(f["type"] == "read" for f in alice.frames), "the read receipt")
        await stop([bob], tasks[1:])
        await alice.send(bob.address, ciphertext(40))
        await wait_for_state(lambda: alice.frames[-1]["type"] == "queued", "the stored message")
        await stop([alice], tasks[:1])
        assert [(f["type"], f["from"]) for f in bob.frames] == [("message", alice.address), ("typing", alice.address)]
        assert [f["from"] for f in alice.frames if f["type"] == "read"] == [bob.address]
        # The app's chat screen compares case-sensitively with the contact as typed: it shows them.
        assert [m["from"] for m in bob.inbox] == [alice.address]

    run(main())
    # Stored, it keeps the spelling; lookups and sign-ins stay case-insensitive.
    assert app_relay.http("GET", f"/api/public-keys/{alice.address.upper().replace('0X', '0x')}").status == 200
    with connect(app_relay, bob.address.lower()) as again:
        frame = again.recv(timeout=DEFAULTS.queue.flush_delay_ms / 1000 + 5)
        assert (frame["type"], frame["from"]) == ("message", alice.address)
        assert frame["queued"] is True
