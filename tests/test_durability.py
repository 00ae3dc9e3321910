"""Durability of the SQLite backend, proved on a real ``python relayd.py`` child process.

What relayd promised survives ``kill -9`` and restarts: every message answered
``queued``, unacknowledged messages of ack-mode clients, messageId idempotency,
stored read receipts and public keys. One relayd per database file: a second
exits 2 naming the first, ``kill -9`` leaves no stale lock, and ``relayd
stats`` and ``relayd backup`` read it beside the running one. Storage faults
that are real at the OS level (a full tmpfs, ``RLIMIT_FSIZE``, a lock held by another process) never
crash relayd and never make it say ``queued`` for what it did not store; live
delivery goes on, health says what is wrong, and it recovers by itself. A
corrupt or foreign file stops start-up with exit 2 and is left unchanged.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from support import (A, B, C, D, E, ProcessRelay, WriteLock, WsClient, assert_error, connect, frames_until_pong, ids_of,
                     msg, now_ms, online, pong_next, queue_size, read_backlog, run_cli, scaled, sqlite_file, start_open,
                     status_frame, wait_until)
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed

from relayd.storage.sqlite.store import SQLiteStore
from relayd.storage.sqlite.schema import APPLICATION_ID, MIGRATIONS
from relayd.storage.store import QueuedMessage, QueueLimits

SENDERS = ["0x" + f"{k:02x}" * 20 for k in (0x11, 0x22, 0x33, 0x44)]

CONFIG = """\
[auth]
mode = open

[limits]
frames_per_s = 0
new_queues_per_sender_per_hour = 0
connections_per_ip_per_s = 0

[queue]
max_offline_messages = 10000

[storage]
synchronous = normal
# no storage budget: these tests fill the disk itself
max_bytes = 0
"""

STATUS_TYPES = ("queued", "delivered", "error")


# Helpers


def message(to: str, mid: str, content: str | None = None) -> dict[str, Any]:
    """A message with the sender's timestamp; its content names it unless given."""
    return msg(to, mid, content if content is not None else f"c:{mid}", timestamp=now_ms())


def answer(ws: WsClient, mid: str, timeout: float = 10) -> dict[str, Any]:
    """The status frame (queued / delivered / error) for ``mid``; nothing else may arrive meanwhile."""
    frame = ws.recv(timeout)
    assert frame.get("type") in STATUS_TYPES and frame.get("messageId") == mid, frame
    return frame


def send(ws: WsClient, to: str, mid: str, content: str | None = None, timeout: float = 10) -> dict[str, Any]:
    ws.send(message(to, mid, content))
    return answer(ws, mid, timeout)


def assert_queued(frame: dict[str, Any], mid: str, to: str) -> None:
    status_frame(frame, "queued", mid, to)


def ack(ws: WsClient, ids: list[str]) -> None:
    """Acknowledge ``ids`` (in frames of 1000) and wait until the relay has handled them."""
    for start in range(0, len(ids), 1000):
        ws.send({"type": "ack", "messageIds": ids[start:start + 1000]})
    pong_next(ws)


def assert_nothing_stored_for(relay: ProcessRelay, address: str) -> None:
    """An ack-mode session gets ``queue_empty`` right away and nothing after it."""
    assert queue_size(relay, address) == 0
    with connect(relay, address, ack=True) as ws:
        assert ws.recv() == {"type": "queue_empty"}
        pong_next(ws)


# 1. kill -9 in the middle of a burst


class Burst(threading.Thread):
    """Several sender connections pipeline messages to one offline address as fast as they can.

    ``sent[sender]`` lists messageIds in send order (recorded before the frame is
    written); ``answers`` maps a messageId to its status frame; ``queued`` lists
    the ids answered ``queued`` in arrival order. Stops by itself when every
    answer is in, when the relay dies, or after ``limit_s``. ``at_queued``
    (n, call): ``call()`` runs in the burst's own thread as the n-th ``queued``
    answer arrives, so a fault lands mid-burst however the test's thread is
    scheduled (polling from it, a loaded machine let all 2,000 be answered
    first).
    """

    def __init__(self, url: str, senders: list[str], per_sender: int, to: str, limit_s: float = 30,
                 at_queued: tuple[int, Callable[[], None]] | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.senders, self.per_sender, self.to, self.limit_s = url, senders, per_sender, to, limit_s
        self.at_queued = at_queued
        self.sent: dict[str, list[str]] = {s: [] for s in senders}
        self.answers: dict[str, dict[str, Any]] = {}
        self.queued: list[str] = []
        self.unexpected: list[Any] = []

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        tasks = [asyncio.ensure_future(self._sender(k, s)) for k, s in enumerate(self.senders)]
        done, pending = await asyncio.wait(tasks, timeout=self.limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _sender(self, k: int, sender: str) -> None:
        try:
            async with async_connect(self.url, compression=None, open_timeout=5, close_timeout=1) as ws:
                await ws.send(json.dumps({"type": "auth", "address": sender}))
                frame = json.loads(await ws.recv())
                if frame.get("type") != "auth_success":
                    self.unexpected.append(frame)
                    return
                reader = asyncio.ensure_future(self._read(ws))
                try:
                    for i in range(self.per_sender):
                        mid = f"s{k}-{i:05d}"
                        self.sent[sender].append(mid)
                        await ws.send(json.dumps(message(self.to, mid, f"payload:{sender}:{mid}")))
                    await reader
                finally:
                    reader.cancel()
        except asyncio.CancelledError:  # limit_s ran out
            self.unexpected.append(f"sender {k} still running after {self.limit_s} s")
        except (ConnectionClosed, OSError, EOFError):
            pass  # the relay was killed under us
        except Exception as exc:
            self.unexpected.append(repr(exc))

    async def _read(self, ws: Any) -> None:
        got = 0
        while got < self.per_sender:
            frame = json.loads(await ws.recv())
            mid = frame.get("messageId")
            if frame.get("type") not in STATUS_TYPES or mid is None:
                self.unexpected.append(frame)
                continue
            got += 1
            self.answers[mid] = frame
            if frame["type"] == "queued":
                self.queued.append(mid)
                if self.at_queued is not None and len(self.queued) == self.at_queued[0]:
                    self.at_queued[1]()
            else:
                self.unexpected.append(frame)


def test_kill9_mid_burst_loses_no_queued_message_and_duplicates_none(tmp_path: Path, process_relays) -> None:
    per_sender, total = 500, 500 * len(SENDERS)
    relay = process_relays(tmp_path, config_text=CONFIG)
    burst = Burst(relay.url, SENDERS, per_sender, B, at_queued=(300, relay.kill9))
    burst.start()
    burst.join(scaled(40))
    assert not burst.is_alive()
    assert burst.unexpected == []
    committed = set(burst.queued)
    assert 300 <= len(committed) < total, f"the kill did not land mid-burst ({len(committed)} of {total} queued)"
    sent = {mid: sender for sender, mids in burst.sent.items() for mid in mids}
    unanswered = set(sent) - set(burst.answers)
    assert unanswered, "every message was answered before the kill"

    relay = process_relays.restart(tmp_path, relay, kill=True)
    with connect(relay, B, ack=True) as b:
        frames = read_backlog(b)
        got = ids_of(frames)
        assert len(got) == len(set(got)), "a message was delivered twice"
        assert committed <= set(got), f"lost {len(committed - set(got))} messages that were answered queued"
        assert set(got) - committed <= unanswered, "got messages that were never sent or were refused"
        for frame in frames:
            sender = sent[frame["messageId"]]
            assert frame == {**frame, "type": "message", "from": sender, "queued": True,
                             "content": f"payload:{sender}:{frame['messageId']}"}, frame
        for sender, mids in burst.sent.items():
            # One connection is handled frame by frame, so what survived of a sender is a prefix of what
            # it sent, in order: no gap, no reordering.
            mine = [mid for mid in got if sent[mid] == sender]
            assert mine == mids[:len(mine)], f"per-sender order broken or gap for {sender}"
        assert queue_size(relay, B) == len(got)
        ack(b, got)
    assert_nothing_stored_for(relay, B)

    relay = process_relays.restart(tmp_path, relay, kill=False)
    assert_nothing_stored_for(relay, B)


# 2. Unacknowledged messages come back after a restart, acknowledged ones never


def test_unacked_messages_are_redelivered_in_order_after_a_restart(tmp_path: Path, process_relays) -> None:
    relay = process_relays(tmp_path, config_text=CONFIG)
    stored = [f"m{i}" for i in range(6)]
    with connect(relay, A) as a:
        for mid in stored:
            assert_queued(send(a, B, mid), mid, B)
        with connect(relay, B, ack=True) as b:
            frames = read_backlog(b)
            assert ids_of(frames) == stored
            assert all(f["queued"] is True and f["from"] == A for f in frames)
            frame = send(a, B, "live")
            assert frame["type"] == "delivered", frame
            live = b.recv()
            assert (live["type"], live["messageId"], live["queued"]) == ("message", "live", False), live
            ack(b, ["m0", "m2", "m4"])
            assert queue_size(relay, B) == 4

    relay = process_relays.restart(tmp_path, relay, kill=False)
    with connect(relay, B, ack=True) as b:
        frames = read_backlog(b)
        assert ids_of(frames) == ["m1", "m3", "m5", "live"]
        assert all(f["queued"] is True and f["from"] == A and f["content"] == f"c:{f['messageId']}"
                   for f in frames)
        ack(b, ids_of(frames[:2]))
    # Not acknowledged again: still there on the next connection, the acked ones never.
    with connect(relay, B, ack=True) as b:
        frames = read_backlog(b)
        assert ids_of(frames) == ["m5", "live"]
        ack(b, ids_of(frames))
    assert_nothing_stored_for(relay, B)


# 3. A retried messageId is stored once, also across a restart


def test_retried_message_id_is_stored_once_across_a_restart(tmp_path: Path, process_relays) -> None:
    relay = process_relays(tmp_path, config_text=CONFIG)
    with connect(relay, A) as a:
        assert_queued(send(a, B, "dup"), "dup", B)
        assert_queued(send(a, B, "dup"), "dup", B)
    with connect(relay, A) as a:  # a new connection after a lost answer
        assert_queued(send(a, B, "dup"), "dup", B)
    assert queue_size(relay, B) == 1

    relay = process_relays.restart(tmp_path, relay, kill=True)
    with connect(relay, A) as a:
        assert_queued(send(a, B, "dup"), "dup", B)
        assert_queued(send(a, B, "other"), "other", B)
    assert queue_size(relay, B) == 2

    relay = process_relays.restart(tmp_path, relay, kill=False)
    with connect(relay, A) as a:
        assert_queued(send(a, B, "dup"), "dup", B)
    assert queue_size(relay, B) == 2
    with connect(relay, B, ack=True) as b:
        frames = read_backlog(b)
        assert ids_of(frames) == ["dup", "other"]
        assert frames[0]["content"] == "c:dup"
        ack(b, ids_of(frames))
    assert_nothing_stored_for(relay, B)


# 4. A full queue refuses by default, or drops the oldest when configured


@pytest.mark.parametrize("overflow", ["reject", "drop_oldest"])
def test_full_queue_rejects_or_drops_oldest(tmp_path: Path, process_relays, overflow: str) -> None:
    relay = process_relays(tmp_path, config_text=CONFIG.replace("max_offline_messages = 10000",
                                                        f"max_offline_messages = 3\noverflow = {overflow}"))
    with connect(relay, A) as a:
        for mid in ("q0", "q1", "q2"):
            assert_queued(send(a, B, mid), mid, B)
        frame = send(a, B, "q3")
        if overflow == "reject":
            assert (frame["type"], frame["code"], frame["messageId"]) == ("error", "queue_full", "q3"), frame
            expected = ["q0", "q1", "q2"]
        else:
            assert_queued(frame, "q3", B)
            assert_queued(send(a, B, "q4"), "q4", B)
            expected = ["q2", "q3", "q4"]
    assert queue_size(relay, B) == 3

    relay = process_relays.restart(tmp_path, relay, kill=True)
    assert queue_size(relay, B) == 3
    with connect(relay, B, ack=True) as b:
        frames = read_backlog(b)
        assert ids_of(frames) == expected
        ack(b, expected)
    assert_nothing_stored_for(relay, B)


# 5. Read receipts to an offline user survive a restart; typing is never stored


def test_read_receipt_for_an_offline_user_survives_kill9_and_typing_is_not_stored(tmp_path: Path,
                                                                                   process_relays) -> None:
    relay = process_relays(tmp_path, config_text=CONFIG)
    with connect(relay, B) as b:
        b.send({"type": "typing", "to": A, "isTyping": True})
        b.send({"type": "read_receipt", "to": A, "messageId": "seen-1"})
        pong_next(b)  # the receipt is committed before the pong
    assert queue_size(relay, A) == 0

    relay = process_relays.restart(tmp_path, relay, kill=True)
    assert queue_size(relay, A) == 0
    with connect(relay, A) as a:
        frame = a.recv()
        assert set(frame) == {"type", "from", "messageId", "timestamp"}, frame
        assert (frame["type"], frame["from"], frame["messageId"]) == ("read", B, "seen-1"), frame
        assert type(frame["timestamp"]) is int and abs(frame["timestamp"] - now_ms()) < 600_000
        pong_next(a)  # typing was not stored, and the receipt came once
    with connect(relay, A) as a:
        pong_next(a)  # a delivered receipt does not come back


# 6. Keys survive a restart unchanged


def test_public_keys_survive_kill9_with_the_same_timestamps(tmp_path: Path, process_relays) -> None:
    relay = process_relays(tmp_path, config_text=CONFIG)
    posted = relay.http("POST", "/api/public-keys", {"address": A, "publicKey": "key-of-a"})
    assert posted.status == 200, posted
    before = relay.http("GET", f"/api/public-keys/{A}")
    assert before.status == 200, before
    assert (before.json["createdAt"], before.json["updatedAt"]) == (posted.json["createdAt"],
                                                                     posted.json["updatedAt"])

    relay = process_relays.restart(tmp_path, relay, kill=True)
    after = relay.http("GET", f"/api/public-keys/{A}")
    assert after.status == 200, after
    assert after.json == before.json
    assert relay.http("GET", "/api/public-keys/stats/all").json == {"totalKeys": 1}

    relay = process_relays.restart(tmp_path, relay, kill=False)
    assert relay.http("GET", f"/api/public-keys/{A}").json == before.json


# 7. Storage faults: never crash, never lie, keep live delivery, recover


def _umount(path: Path) -> None:
    for _ in range(50):
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=10).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


class TmpfsFull:
    """A tiny tmpfs as the data directory: writes fail with ENOSPC once it is full (needs root)."""

    name = "tmpfs"

    def __init__(self, tmp: Path) -> None:
        self.mount = tmp / "relayd-data"
        self.mount.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0755", "relayd-test",
                               str(self.mount)], capture_output=True, timeout=10)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")

    def arm(self, relay: ProcessRelay) -> None:
        pass  # the tmpfs is small from the start; queued messages fill it

    def disarm(self, relay: ProcessRelay) -> None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(self.mount)], check=True, timeout=10)

    def cleanup(self) -> None:
        _umount(self.mount)


class FileSizeLimit:
    """``RLIMIT_FSIZE`` on the running relayd: writes past 512 KiB fail with EFBIG (any user).

    Python ignores SIGXFSZ, so the write fails instead of killing the process;
    a SIGXFSZ death would show up as ``proc.poll() is not None``.
    """

    name = "rlimit_fsize"

    def __init__(self, tmp: Path) -> None:
        self.hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]

    def arm(self, relay: ProcessRelay) -> None:
        resource.prlimit(relay.proc.pid, resource.RLIMIT_FSIZE, (512 * 1024, self.hard))

    def disarm(self, relay: ProcessRelay) -> None:
        resource.prlimit(relay.proc.pid, resource.RLIMIT_FSIZE, (self.hard, self.hard))

    def cleanup(self) -> None:
        pass


def assert_storage_unavailable(frame: dict[str, Any], mid: str) -> None:
    assert_error(frame, "storage_unavailable", mid)


@pytest.mark.parametrize("fault", [TmpfsFull, FileSizeLimit], ids=lambda f: f.name)
def test_full_disk_refuses_offline_messages_keeps_live_delivery_and_recovers(tmp_path: Path, process_relays,
                                                                             fault: Any) -> None:
    disk = fault(tmp_path)
    try:
        _full_disk_scenario(tmp_path, process_relays, disk)
    finally:
        process_relays.stop_all()
        disk.cleanup()


def _full_disk_scenario(tmp_path: Path, process_relays: Any, disk: Any) -> None:
    relay = process_relays(tmp_path, config_text=CONFIG)
    big = "x" * 30_000
    with connect(relay, A) as a, connect(relay, C) as c:
        pong_next(c)  # C's backlog flush is over: C takes live traffic (see the flush race test)
        assert send(a, C, "live-before")["type"] == "delivered"
        assert c.recv()["messageId"] == "live-before"
        disk.arm(relay)
        queued = []
        for i in range(100):  # fill the disk with queued messages
            mid = f"fill-{i:03d}"
            frame = send(a, B, mid, big)
            if frame["type"] == "error":
                assert_storage_unavailable(frame, mid)
                failed = mid
                break
            assert_queued(frame, mid, B)
            queued.append(mid)
        else:
            pytest.fail("the disk never filled up")
        assert queued, "the very first message already failed"

        # The disk stays full: retries and other offline recipients are refused, never queued.
        assert_storage_unavailable(send(a, B, failed, big), failed)
        assert_storage_unavailable(send(a, D, "to-d", big), "to-d")

        # Live delivery to an online recipient goes on.
        for i in range(3):
            frame = send(a, C, f"live-{i}")
            assert frame["type"] == "delivered", frame
            got = c.recv()
            assert (got["type"], got["from"], got["messageId"], got["queued"]) == ("message", A, f"live-{i}",
                                                                                     False), got

        health = relay.http("GET", "/health")
        assert health.status == 503, health
        assert health.json["status"] == "degraded"
        storage = health.json["storage"]
        assert storage["backend"] == "sqlite" and storage["status"] == "unavailable", storage
        assert isinstance(storage.get("problem"), str) and storage["problem"], storage
        # ENOSPC is SQLITE_FULL ("disk full"); EFBIG is SQLITE_IOERR_WRITE to SQLite.
        expected = ("disk full",) if disk.name == "tmpfs" else ("disk full", "disk I/O error")
        assert storage["problem"].startswith(expected), storage
        ready = relay.http("GET", "/health/ready")
        assert ready.status == 503, ready
        assert ready.json["storage"]["status"] == "unavailable", ready.json
        assert relay.http("GET", "/health/live").status == 200
        assert relay.proc.poll() is None, "relayd died of the full disk"
        errors = [line for line in relay.log().splitlines() if " ERROR " in line and "storage" in line]
        assert errors and storage["problem"] in errors[0], relay.log()
        assert B not in relay.log() and failed not in relay.log(), "info logs must not carry ids"

        # The fault goes away: the same retry is now stored, and health says ok.
        disk.disarm(relay)
        assert_queued(send(a, B, failed, big), failed, B)
        queued.append(failed)
        health = relay.http("GET", "/health")
        assert health.status == 200, health
        assert health.json["storage"] == {"backend": "sqlite", "status": "ok"}
        assert relay.http("GET", "/health/ready").status == 200
        assert "storage recovered" in relay.log()
        assert send(a, C, "live-after")["type"] == "delivered"
        assert c.recv()["messageId"] == "live-after"

    assert queue_size(relay, D) == 0
    assert queue_size(relay, B) == len(queued)
    with connect(relay, B, ack=True) as b:
        frames = read_backlog(b)
        assert ids_of(frames) == queued
        assert all(f["content"] == big for f in frames)
        ack(b, queued)
    assert_nothing_stored_for(relay, B)


def test_locked_database_refuses_offline_messages_keeps_live_delivery_and_recovers(tmp_path: Path,
                                                                                   process_relays) -> None:
    relay = process_relays(tmp_path, config_text=CONFIG)
    db = tmp_path / "relayd-data" / "relayd.db"
    with connect(relay, A) as a, connect(relay, E) as e, connect(relay, C) as c:
        pong_next(c)
        assert_queued(send(a, B, "before"), "before", B)
        with WriteLock(db):  # another process holds the write lock
            a.send(message(B, "while-locked"))
            pong_next(a)  # handled: its write is with the writer, which waits for the lock
            # While relayd waits for the lock (busy timeout 2 s), live traffic is not held up.
            started = time.monotonic()
            live = send(e, C, "live-locked")
            assert live["type"] == "delivered", live
            assert c.recv()["messageId"] == "live-locked"
            assert time.monotonic() - started < 1.0
            assert_storage_unavailable(answer(a, "while-locked"), "while-locked")
            health = relay.http("GET", "/health")
            assert health.status == 503, health
            assert health.json["storage"]["status"] == "unavailable"
            assert "locked" in health.json["storage"]["problem"], health.json
            assert relay.http("GET", "/health/ready").status == 503
            assert relay.proc.poll() is None
        assert_queued(send(a, B, "while-locked"), "while-locked", B)
        assert relay.http("GET", "/health").status == 200
        assert relay.http("GET", "/health/ready").status == 200
    assert any(" ERROR " in line and "database is locked" in line for line in relay.log().splitlines())
    with connect(relay, B, ack=True) as b:
        assert ids_of(read_backlog(b)) == ["before", "while-locked"]


def test_message_stored_while_the_recipient_finishes_its_flush_still_reaches_it(tmp_path: Path,
                                                                                 process_relays) -> None:
    relay = process_relays(tmp_path, config_text=CONFIG)
    with connect(relay, A) as a, connect(relay, E) as e:
        pong_next(a)
        pong_next(e)
        with WriteLock(tmp_path / "relayd-data" / "relayd.db"):
            e.send(message(D, "stall"))
            pong_next(e)  # handled: the writer now waits for the lock with it
            c = relay.ws()
            c.send({"type": "auth", "address": C})  # C's backlog read is queued behind it (auth waits for it)
            wait_until(lambda: online(relay, C), what="C attached")
            a.send(message(C, "racing"))  # C is not ready yet, so this is stored, right after that read
            pong_next(a)  # handled: the write is queued
        with c:
            assert c.recv()["type"] == "auth_success"
            assert_queued(answer(e, "stall"), "stall", D)
            assert answer(a, "racing")["type"] in ("queued", "delivered")
            try:
                frame = c.recv(3)
            except TimeoutError:
                pytest.fail(f"C is online but never got the message; stored for it: {queue_size(relay, C)}")
            assert (frame["type"], frame["from"], frame["messageId"]) == ("message", A, "racing"), frame


def test_ack_session_is_not_told_queue_empty_when_its_backlog_could_not_be_read(tmp_path: Path, start_relay,
                                                                                 caplog) -> None:
    """In-process, so SQLite's busy timeout can be short: each locked batch fails after 0.3 s, not relayd's 2 s."""
    db = tmp_path / "relayd.db"
    relay = start_open(start_relay, store=SQLiteStore(str(db), busy_timeout_ms=300),
                       limits={"frames_per_s": 0, "new_queues_per_sender_per_hour": 0})
    with connect(relay, A) as a, connect(relay, E) as e:
        pong_next(a)
        pong_next(e)
        for mid in ("s0", "s1"):
            assert_queued(send(a, B, mid), mid, B)
        with WriteLock(db):
            e.send(message(D, "stall-1"))
            pong_next(e)  # handled: the writer waits for the lock with it, then fails
            b = relay.ws()
            b.send({"type": "auth", "address": B, "ack": True})  # B's backlog read is queued behind it ...
            wait_until(lambda: online(relay, B), what="B attached")
            a.send(message(D, "stall-2"))  # ... in one batch with a write, which needs the lock too
            assert_storage_unavailable(answer(e, "stall-1"), "stall-1")
            assert_storage_unavailable(answer(a, "stall-2"), "stall-2")
        with b:
            # B signs in, is told that its backlog was not sent, and never that it has everything.
            assert b.recv()["type"] == "auth_success"
            frames = frames_until_pong(b)
            assert len(frames) == 1, frames
            assert_error(frames[0], "storage_unavailable")
    assert "storage unavailable" in caplog.text
    # Nothing was lost: the backlog is still stored and comes on the next connection.
    assert queue_size(relay, B) == 2
    with connect(relay, B, ack=True) as b:
        assert ids_of(read_backlog(b)) == ["s0", "s1"]


# 8. A file relayd does not own is never touched: exit 2 at start-up


def _text_file(path: Path) -> None:
    path.write_text("these are my notes, not a database\n" * 50)


def _foreign_sqlite(path: Path) -> None:
    sqlite_file(path, "PRAGMA application_id = 1234", "CREATE TABLE messages (id INTEGER PRIMARY KEY, body TEXT)",
                "INSERT INTO messages (body) VALUES ('keep me')")


def _foreign_sqlite_without_id(path: Path) -> None:
    sqlite_file(path, "CREATE TABLE notes (body TEXT)", "INSERT INTO notes VALUES ('keep me')")


def _corrupt_header_relayd_db(path: Path) -> None:
    """A file with relayd's application_id whose every page after the first is garbage."""
    sqlite_file(path, f"PRAGMA application_id = {APPLICATION_ID}",
                "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
                "INSERT INTO schema_version VALUES (1, 0)",
                "CREATE TABLE messages (seq INTEGER PRIMARY KEY, body TEXT)",
                *[f"INSERT INTO messages (body) VALUES ('{'x' * 500}')"] * 50)
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page:] = _garbage(len(data) - page)
    path.write_bytes(bytes(data))


def _garbage(n: int) -> bytes:
    return bytes((i * 7 + 13) % 256 for i in range(n))


def _relayd_db_with_a_corrupt_table(table: str) -> Callable[[Path], None]:
    """A database written by relayd's own store (messages queued for B), then one table's root page garbled."""
    def make(path: Path) -> None:
        async def fill() -> None:
            store = SQLiteStore(str(path))
            await store.open()
            for i in range(3):
                await store.enqueue(QueuedMessage(B, A, f"m{i}", "c", 1, 1), QueueLimits(1000, 1 << 20, False))
            await store.close()
        asyncio.run(fill())
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro&immutable=1", uri=True)
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
        conn.close()
        data = bytearray(path.read_bytes())
        size = int.from_bytes(data[16:18], "big")
        data[(root - 1) * size:root * size] = _garbage(size)
        path.write_bytes(bytes(data))
    return make


@pytest.mark.parametrize("make", [
    pytest.param(_text_file, id="text"),
    pytest.param(_foreign_sqlite, id="foreign"),
    pytest.param(_foreign_sqlite_without_id, id="foreign-no-app-id"),
    pytest.param(_corrupt_header_relayd_db, id="corrupt-pages"),
    pytest.param(_relayd_db_with_a_corrupt_table("queues"), id="corrupt-queues-table"),
    pytest.param(_relayd_db_with_a_corrupt_table("messages"), id="corrupt-messages-table"),
])
def test_foreign_or_corrupt_database_stops_start_up_with_exit_2_and_is_untouched(tmp_path: Path, process_relays,
                                                                                  make: Any) -> None:
    data = tmp_path / "relayd-data"
    data.mkdir()
    db = data / "relayd.db"
    make(db)
    assert sorted(p.name for p in data.iterdir()) == ["relayd.db"]
    before = db.read_bytes()
    stat = db.stat()
    relay = process_relays(tmp_path, config_text=CONFIG, wait=False)

    def exited() -> bool:
        if relay.proc.poll() is not None:
            return True
        if "relayd listening" in relay.log():  # an answer on the port alone may come from another run's relay
            pytest.fail(f"relayd started on a database it cannot use:\n{relay.log()}")
        return False
    wait_until(exited, "relayd to exit", timeout=10)
    out = relay.log()
    assert relay.proc.returncode == 2, out
    assert "database" in out.lower() and "relayd.db" in out, out
    assert "Traceback" not in out, out
    assert db.read_bytes() == before
    assert db.stat().st_mtime_ns == stat.st_mtime_ns
    # Opening it for the corruption check may leave SQLite's side files, but no pending change to the file.
    assert {p.name for p in data.iterdir()} <= {"relayd.db", "relayd.db-wal", "relayd.db-shm"}
    wal = data / "relayd.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0, "relayd left changes for the database in its WAL"


# A database written by an earlier relayd keeps working after an upgrade


def _schema_v2_db(path: Path) -> None:
    """Schema version 2 as relayd released it before messageIds became idempotent per recipient
    (``UNIQUE (sender, message_id)``), holding one message queued for B."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")
    for version, statements in enumerate(MIGRATIONS[:2], 1):
        for statement in statements:
            conn.execute(statement.replace("UNIQUE (sender, recipient, message_id)", "UNIQUE (sender, message_id)"))
        conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, 0)", (version,))
    assert "UNIQUE (sender, message_id)" in conn.execute(
        "SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
    conn.execute("INSERT INTO messages (recipient, sender, message_id, content, timestamp, queued_at, size) "
                 "VALUES (?, ?, 'old-1', 'c:old-1', 1, ?, 7)", (B, A, int(time.time() * 1000)))
    conn.execute("INSERT INTO queues (recipient, count, bytes) VALUES (?, 1, 7)", (B,))
    conn.close()


def test_database_of_the_previous_schema_keeps_its_messages_and_takes_a_message_id_per_recipient(
        tmp_path: Path, process_relays) -> None:
    data = tmp_path / "relayd-data"
    data.mkdir()
    _schema_v2_db(data / "relayd.db")
    relay = process_relays(tmp_path, config_text=CONFIG)
    with connect(relay, B, ack=True) as b:
        frames = read_backlog(b)
        assert [(f["from"], f["messageId"], f["content"]) for f in frames] == [(A, "old-1", "c:old-1")]
        ack(b, ["old-1"])
    with connect(relay, A) as a:
        # docs/protocol.md: messageId is idempotent per sender and recipient.
        assert_queued(send(a, C, "same"), "same", C)
        assert_queued(send(a, D, "same"), "same", D)
    for recipient in (C, D):
        with connect(relay, recipient, ack=True) as ws:
            assert ids_of(read_backlog(ws)) == ["same"]
    assert "Traceback" not in relay.log()


# 9. Without ack mode, stored messages are gone once written to the socket


def test_plain_client_gets_stored_messages_once_and_they_are_deleted(tmp_path: Path, process_relays) -> None:
    relay = process_relays(tmp_path, config_text=CONFIG)
    with connect(relay, A) as a:
        for mid in ("p0", "p1", "p2"):
            assert_queued(send(a, B, mid), mid, B)
    relay = process_relays.restart(tmp_path, relay, kill=True)
    with connect(relay, B) as b:
        frames = [b.recv() for _ in range(3)]
        assert [(f["type"], f["from"], f["messageId"], f["queued"]) for f in frames] == [
            ("message", A, mid, True) for mid in ("p0", "p1", "p2")]
        pong_next(b)  # a plain client gets no queue_empty, nor anything else
    wait_until(lambda: queue_size(relay, B) == 0, "the flushed messages to be deleted")
    with connect(relay, B) as b:
        pong_next(b)
    relay = process_relays.restart(tmp_path, relay, kill=True)
    assert queue_size(relay, B) == 0
    with connect(relay, B) as b:
        pong_next(b)


# 10. One relayd per database: a second one exits 2 naming the first; kill -9 leaves no stale lock


def test_second_relayd_on_a_database_in_use_exits_2_naming_the_holder(tmp_path: Path, process_relays) -> None:
    first = process_relays(tmp_path, config_text=CONFIG)
    with connect(first, A) as a:
        assert_queued(send(a, B, "kept"), "kept", B)
    second = process_relays(tmp_path, wait=False)
    assert second.proc.wait(scaled(15)) == 2, second.log()
    out = second.log()
    assert f"PID {first.proc.pid}" in out and "in use by another relayd" in out and "relayd.db" in out, out
    assert "Traceback" not in out, out
    with connect(first, A) as a:  # the first one never noticed
        assert_queued(send(a, B, "after"), "after", B)
    assert queue_size(first, B) == 2

    first.kill9()
    third = process_relays(tmp_path, port=first.port)  # the kernel dropped the dead one's lock
    with connect(third, B, ack=True) as b:
        assert ids_of(read_backlog(b)) == ["kept", "after"]


def test_stats_and_backup_work_beside_a_running_relayd(tmp_path: Path, process_relays) -> None:
    relay = process_relays(tmp_path, config_text=CONFIG)
    with connect(relay, A) as a:
        for mid in ("s0", "s1", "s2"):
            assert_queued(send(a, B, mid), mid, B)
    db = "relayd-data/relayd.db"
    stats = run_cli(tmp_path, "stats", "--db", db)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["messages"] == 3
    backup = run_cli(tmp_path, "backup", "--db", db, "copy.db")
    assert backup.returncode == 0, backup.stderr
    copy = sqlite3.connect(f"file:{tmp_path / 'copy.db'}?mode=ro", uri=True)
    assert copy.execute("SELECT message_id FROM messages ORDER BY seq").fetchall() == [("s0",), ("s1",), ("s2",)]
    copy.close()
    with connect(relay, A) as a:  # and the relay goes on writing
        assert_queued(send(a, B, "s3"), "s3", B)
    assert queue_size(relay, B) == 4
