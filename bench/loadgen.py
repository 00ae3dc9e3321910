#!/usr/bin/env python3
"""Load generator for relayd benchmarks: one process, asyncio, websockets' asyncio client.

Run by ``bench/run.py`` as one or more processes separate from the server
under test. Each subcommand drives one scenario against ``--port`` on
127.0.0.1 and prints exactly one line ``RESULT {json}`` at the end.

Phase marks: at each phase boundary the load generator prints
``MARK <name>`` and (with ``--marks``, as run.py uses it) blocks until one
line arrives on stdin. run.py waits until every load process has printed
the same mark, samples the server (CPU, RSS, I/O counters) and answers them
all, so several processes start each phase together; the load generator
never reads the server's /proc itself. Without ``--marks`` the marks are
only printed.

The protocol is the one relayd, the bench baseline and the Node original
share: ``auth`` (with ``"ack": true`` where the scenario needs the ack
extension), ``message``, ``read_receipt``, ``ack``, ``ping``. Frames of
types a scenario does not expect (``challenge``, ``queue_empty``, ...) are
skipped, so a server that sends more, or less, still works.

Every loop is bounded in count and time: each phase has a deadline and a
count cap, every connect and every wait has a timeout, and the whole run is
under ``--max-time``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import select
import sys
import time
from collections import Counter
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

HOST = "127.0.0.1"
CONNECT_TIMEOUT = 10.0
MARK_TIMEOUT = 120.0
MAX_ACK_IDS = 1000  # the ack extension's per-frame limit

_marks_enabled = False
loads = json.loads
dumps = json.JSONEncoder(separators=(",", ":")).encode


def mark(name: str) -> None:
    """Announce a phase boundary; with --marks wait for run.py's answer on stdin."""
    sys.stdout.write(f"MARK {name}\n")
    sys.stdout.flush()
    if not _marks_enabled:
        return
    ready, _, _ = select.select([sys.stdin], [], [], MARK_TIMEOUT)
    if not ready:
        raise TimeoutError(f"runner did not answer mark {name}")
    if not sys.stdin.readline():
        raise EOFError("runner went away")


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(max(soft, want), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def make_address(role: int, tag: int, i: int) -> str:
    """0x + 40 hex digits, unique per (role, run tag, index)."""
    return f"0x{role:02x}{tag:06x}{i:032x}"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(q / 100 * (len(values) - 1)))))
    return values[k]


def ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


async def open_ws(url: str, **kw: Any) -> ClientConnection:
    return await asyncio.wait_for(
        connect(url, compression=None, ping_interval=None, open_timeout=CONNECT_TIMEOUT,
                close_timeout=1, max_queue=kw.pop("max_queue", 256), **kw),
        CONNECT_TIMEOUT + 1)


async def auth(ws: ClientConnection, address: str, timeout: float = CONNECT_TIMEOUT, ack: bool = False) -> None:
    """Authenticate; skip frames of other types (a relay may send a challenge first)."""
    frame: dict[str, Any] = {"type": "auth", "address": address}
    if ack:
        frame["ack"] = True
    await asyncio.wait_for(ws.send(dumps(frame)), timeout)
    async with asyncio.timeout(timeout):
        while True:
            answer = loads(await ws.recv())
            if answer.get("type") == "auth_success":
                return
            if answer.get("type") == "error":
                raise RuntimeError(f"auth refused: {answer}")


ONE_IP_CONNECTIONS = 2048
"""relayd's default ``[limits] max_connections_per_ip``."""


def crowd_source(i: int) -> str:
    """The source address of the crowd's ``i``-th connection: 1,000 per address over 127.1.0.0/16, as phones
    behind many NATs (one source address has fewer ports than 100,000 connections need)."""
    n = i // 1000
    return f"127.1.{n // 250}.{n % 250 + 1}"


async def open_authed(url: str, addresses: list[str], concurrency: int, source: Any = None,
                      **kw: Any) -> list[ClientConnection]:
    """Open and authenticate one connection per address, ``concurrency`` at a time (from ``source(i)`` when
    given: a function of the connection's index)."""
    sem = asyncio.Semaphore(concurrency)
    out: list[ClientConnection | None] = [None] * len(addresses)

    async def one(i: int, address: str) -> None:
        async with sem:
            ws = await open_ws(url, **kw) if source is None else await open_ws(url, local_addr=(source(i), 0), **kw)
            out[i] = ws
            await auth(ws, address)

    results = await asyncio.gather(*(one(i, a) for i, a in enumerate(addresses)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        abort_all([w for w in out if w is not None])
        raise RuntimeError(f"{len(errors)} of {len(addresses)} connections failed; first: {errors[0]!r}")
    return out  # type: ignore[return-value]


def abort_all(conns: list[ClientConnection]) -> None:
    """Drop connections at once (the relay sees them vanish); cheap for thousands."""
    for ws in conns:
        try:
            ws.transport.abort()
        except Exception:
            pass


def padding(size: int) -> str:
    return "x" * max(0, size)


async def wait_until(pred: Any, timeout: float, step: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(step)
    return True


async def ping_barrier(ws: ClientConnection, timeout: float, on_frame: Any = None) -> None:
    """Send ``ping`` and read until ``pong``; every earlier frame goes to ``on_frame``.

    The relays handle one connection's frames in order, so the pong proves
    that every frame sent before the ping has been handled.
    """
    await asyncio.wait_for(ws.send(dumps({"type": "ping"})), timeout)
    async with asyncio.timeout(timeout):
        while True:
            frame = loads(await ws.recv())
            if frame.get("type") == "pong":
                return
            if on_frame is not None:
                on_frame(frame)


async def fill_queues(url: str, sender: str, targets: list[tuple[str, str]], window: int, content: str,
                      timeout: float) -> Counter[str]:
    """Send (recipient, messageId) messages from one connection, ``window`` in flight; count the answers."""
    ws = (await open_authed(url, [sender], 1))[0]
    answers: Counter[str] = Counter()
    try:
        inflight = sent = 0
        async with asyncio.timeout(timeout):
            while sent < len(targets) or inflight:
                while sent < len(targets) and inflight < window:
                    to, mid = targets[sent]
                    sent += 1
                    inflight += 1
                    await ws.send(dumps({"type": "message", "to": to, "content": content, "messageId": mid,
                                         "timestamp": int(time.time() * 1000)}))
                frame = loads(await ws.recv())
                ftype = frame.get("type")
                if ftype in ("queued", "delivered"):
                    answers[ftype] += 1
                elif ftype == "error":
                    answers["error:" + str(frame.get("code"))] += 1
                else:
                    continue
                inflight -= 1
    finally:
        abort_all([ws])
    return answers


# Scenario 1: live routing

class LiveState:
    def __init__(self) -> None:
        self.mode = "closed"  # closed: send on ack; paced: a pacer sends
        self.deadline = 0.0
        self.limit = 0
        self.received = 0
        self.last_rx = 0.0
        self.lat: list[int] = []
        self.acks: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.queued_rx = 0
        self.record_after = 0  # perf_counter_ns: latencies of messages sent earlier are not kept (warm-up)


class Pair:
    __slots__ = ("idx", "s", "r", "sender", "receiver", "sent", "acked", "seq")

    def __init__(self, idx: int, s: ClientConnection, r: ClientConnection, sender: str, receiver: str) -> None:
        self.idx, self.s, self.r, self.sender, self.receiver = idx, s, r, sender, receiver
        self.sent = self.acked = self.seq = 0


async def live(args: argparse.Namespace) -> dict[str, Any]:
    url = f"ws://{HOST}:{args.port}"
    tag = random.getrandbits(24)
    P, W = args.pairs, args.window
    senders = [make_address(1, tag, i) for i in range(P)]
    receivers = [make_address(2, tag, i) for i in range(P)]
    crowd: list[ClientConnection] = []
    if args.crowd:  # scenario 11: this many authenticated idle connections stay open through both phases
        nofile = raise_nofile(args.crowd + 2 * P + 256)
        if nofile < args.crowd + 2 * P + 64:
            raise RuntimeError(f"RLIMIT_NOFILE is {nofile}; need about {args.crowd + 2 * P + 64}")
        mark("crowd_start")
        t0 = time.monotonic()
        crowd = await open_authed(url, [make_address(4, tag, i) for i in range(args.crowd)], 100,
                                  source=crowd_source, max_queue=4)
        crowd_s = time.monotonic() - t0
        await asyncio.sleep(1)
        mark("crowd_ready")
    r_ws = await open_authed(f"ws://{HOST}:{args.receiver_port or args.port}", receivers, 50)
    s_ws = await open_authed(url, senders, 50)
    pairs = [Pair(i, s_ws[i], r_ws[i], senders[i], receivers[i]) for i in range(P)]
    st = LiveState()
    pad = padding(args.content_bytes - 20)

    async def send(pair: Pair) -> None:
        pair.seq += 1
        pair.sent += 1
        await pair.s.send(dumps({"type": "message", "to": pair.receiver,
                                 "content": f"{time.perf_counter_ns()}|{pad}",
                                 "messageId": f"m{pair.idx}-{pair.seq}", "timestamp": int(time.time() * 1000)}))

    async def sender_reader(pair: Pair) -> None:
        async for raw in pair.s:
            frame = loads(raw)
            ftype = frame.get("type")
            if ftype in ("delivered", "queued"):
                st.acks[ftype] += 1
            elif ftype == "error":
                st.errors[str(frame.get("code"))] += 1
            else:
                continue
            pair.acked += 1
            if st.mode == "closed" and pair.sent < st.limit and time.monotonic() < st.deadline:
                await send(pair)

    async def receiver_reader(pair: Pair) -> None:
        lat, perf = st.lat, time.perf_counter_ns
        async for raw in pair.r:
            frame = loads(raw)
            if frame.get("type") != "message":
                continue
            now = perf()
            sent_ns = int(frame["content"].split("|", 1)[0])
            if sent_ns >= st.record_after:
                lat.append(now - sent_ns)
            if trace is not None:
                trace.append((now, now - sent_ns))
            st.received += 1
            st.last_rx = time.monotonic()
            if frame.get("queued"):
                st.queued_rx += 1

    trace: list[tuple[int, int]] | None = [] if args.trace else None
    readers = [asyncio.create_task(sender_reader(p)) for p in pairs]
    readers += [asyncio.create_task(receiver_reader(p)) for p in pairs]

    def total_sent() -> int:
        return sum(p.sent for p in pairs)

    def drained() -> bool:
        return st.received >= total_sent() and sum(p.acked for p in pairs) >= total_sent()

    def phase_result(t0: float, complete: bool) -> dict[str, Any]:
        elapsed = max(1e-9, st.last_rx - t0)
        return {"sent": total_sent(), "received": st.received, "elapsed_s": round(elapsed, 4),
                "rate": round(st.received / elapsed, 1), "p50_ms": ms(pct(st.lat, 50)),
                "p99_ms": ms(pct(st.lat, 99)), "max_ms": ms(max(st.lat, default=None)),
                "lat_us": [x // 1000 for x in st.lat],
                "acks": dict(st.acks), "errors": dict(st.errors), "queued_rx": st.queued_rx, "complete": complete}

    def reset() -> None:
        st.received, st.last_rx, st.queued_rx = 0, 0.0, 0
        st.lat.clear()
        st.record_after = 0
        st.acks, st.errors = Counter(), Counter()
        for p in pairs:
            p.sent = p.acked = 0

    out: dict[str, Any] = {"pairs": P, "window": W, "content_bytes": args.content_bytes, "crowd": len(crowd)}
    if crowd:
        out["crowd_connects_per_s"] = round(len(crowd) / crowd_s, 1)
    try:
        # Warm-up at full speed, not measured: first-use costs (and a JIT's compilation) stay out.
        st.mode, st.limit, st.deadline = "closed", max(1, args.warmup), time.monotonic() + args.max_duration
        for p in pairs:
            for _ in range(min(W, st.limit)):
                await send(p)
        await wait_until(lambda: total_sent() >= st.limit * P and drained(), args.max_duration + 10)
        reset()

        # Max rate: every sender keeps W messages in flight until it has sent --count.
        st.mode, st.limit = "closed", args.count
        mark("max_start")
        t0 = time.monotonic()
        st.deadline = t0 + args.max_duration
        for p in pairs:
            for _ in range(min(W, args.count)):
                await send(p)
        await wait_until(lambda: time.monotonic() >= st.deadline or total_sent() >= args.count * P,
                         args.max_duration + 1, 0.005)
        complete = await wait_until(drained, args.drain_timeout, 0.002)
        mark("max_end")
        out["max"] = phase_result(t0, complete)

        # Paced: an open-loop pacer at a fixed rate, round-robin over the senders, as many messages.
        rate = args.paced_rate or out["max"]["rate"] / 2
        reset()
        st.mode = "paced"
        n_total = int(min(args.count * P, rate * args.max_duration))
        mark("paced_start")
        t0 = time.monotonic()
        # The first seconds (at most a fifth of the phase) are the pacer's own warm-up: not kept.
        st.record_after = time.perf_counter_ns() + int(min(args.paced_warmup, 0.2 * n_total / rate) * 1e9)
        n = 0
        while n < n_total and time.monotonic() < t0 + args.max_duration + 2:
            due = min(n_total, int((time.monotonic() - t0) * rate) + 1)
            while n < due:
                await send(pairs[n % P])
                n += 1
            await asyncio.sleep(0.001)
        complete = await wait_until(drained, args.drain_timeout, 0.002)
        mark("paced_end")
        out["paced"] = phase_result(t0, complete)
        out["paced"]["target_rate"] = round(rate, 1)
        if trace is not None:
            with open(args.trace, "w") as f:  # receive time (s) and latency (ms), both phases
                f.writelines(f"{(t - trace[0][0]) / 1e9:.4f} {lat / 1e6:.3f}\n" for t, lat in trace)
    finally:
        for t in readers:
            t.cancel()
        abort_all(s_ws + r_ws + crowd)
    return out


# Scenario 2: idle connections

async def idle(args: argparse.Namespace) -> dict[str, Any]:
    url = f"ws://{HOST}:{args.port}"
    nofile = raise_nofile(args.connections + 256)
    if nofile < args.connections + 64:
        raise RuntimeError(f"RLIMIT_NOFILE is {nofile}; need about {args.connections + 64} "
                           f"(raise the hard limit: ulimit -Hn)")
    tag = random.getrandbits(24)
    addresses = [make_address(3, tag, i) for i in range(args.connections)]
    mark("before")
    t0 = time.monotonic()
    # relayd caps one client IP below half its descriptors (max_connections_per_ip): past its default, the
    # connections come from many source addresses, as the crowd of scenario 11 does
    source = crowd_source if args.connections > ONE_IP_CONNECTIONS else None
    conns = await open_authed(url, addresses, args.concurrency, source, max_queue=4)
    elapsed = time.monotonic() - t0
    await asyncio.sleep(args.settle)
    mark("after")
    abort_all(conns)
    return {"connections": len(conns), "connect_s": round(elapsed, 3),
            "connects_per_s": round(len(conns) / elapsed, 1), "nofile": nofile}


# Scenario 3: offline path (every recipient is offline)

async def offline(args: argparse.Namespace) -> dict[str, Any]:
    url = f"ws://{HOST}:{args.port}"
    tag = random.getrandbits(24)
    S, W = args.senders, args.window
    senders = [make_address(4, tag, i) for i in range(S)]
    recipients = [make_address(5, tag, i) for i in range(args.recipients)]
    conns = await open_authed(url, senders, 50)
    pad = padding(args.content_bytes)
    acks: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    sent = [0] * S
    acked = [0] * S
    state = {"deadline": 0.0, "limit": 0, "last": 0.0}
    rr = iter(range(1 << 62))

    async def send(i: int) -> None:
        sent[i] += 1
        n = next(rr)
        await conns[i].send(dumps({"type": "message", "to": recipients[n % len(recipients)], "content": pad,
                                   "messageId": f"o{i}-{sent[i]}", "timestamp": int(time.time() * 1000)}))

    async def reader(i: int) -> None:
        async for raw in conns[i]:
            frame = loads(raw)
            ftype = frame.get("type")
            if ftype in ("queued", "delivered"):
                acks[ftype] += 1
            elif ftype == "error":
                errors[str(frame.get("code"))] += 1
            else:
                continue
            acked[i] += 1
            state["last"] = time.monotonic()
            if sent[i] < state["limit"] and time.monotonic() < state["deadline"]:
                await send(i)

    tasks = [asyncio.create_task(reader(i)) for i in range(S)]
    try:
        # Warm-up, not measured: creates the first rows and tables' pages (and lets a JIT compile).
        state.update(limit=args.warmup, deadline=time.monotonic() + 10)
        for i in range(S):
            for _ in range(min(W, args.warmup)):
                await send(i)
        await wait_until(lambda: sum(acked) >= sum(sent) and sum(sent) >= args.warmup * S, 15)
        acks.clear()
        errors.clear()
        for i in range(S):
            sent[i] = acked[i] = 0
        mark("start")
        t0 = time.monotonic()
        state.update(limit=args.count, deadline=t0 + args.duration)
        for i in range(S):
            for _ in range(W):
                await send(i)
        await wait_until(lambda: time.monotonic() >= state["deadline"] or sum(sent) >= args.count * S,
                         args.duration + 1, 0.01)
        complete = await wait_until(lambda: sum(acked) >= sum(sent), args.drain_timeout)
        mark("end")
        elapsed = max(1e-9, state["last"] - t0)
        return {"senders": S, "window": W, "recipients": args.recipients, "sent": sum(sent),
                "acks": dict(acks), "errors": dict(errors), "elapsed_s": round(elapsed, 4),
                "rate": round(acks["queued"] / elapsed, 1), "complete": complete}
    finally:
        for t in tasks:
            t.cancel()
        abort_all(conns)


# Scenario 4: reconnect flush

async def flush(args: argparse.Namespace) -> dict[str, Any]:
    url = f"ws://{HOST}:{args.port}"
    tag = random.getrandbits(24)
    recipient = make_address(7, tag, 0)
    S = args.senders
    senders = [make_address(6, tag, i) for i in range(S)]
    conns = await open_authed(url, senders, 50)
    pad = padding(args.content_bytes)
    per = [args.messages // S + (1 if i < args.messages % S else 0) for i in range(S)]
    acks: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    out: dict[str, Any] = {"messages": args.messages}

    async def fill(i: int) -> None:
        ws, inflight, sent = conns[i], 0, 0
        async with asyncio.timeout(args.fill_timeout):
            while sent < per[i] or inflight:
                while sent < per[i] and inflight < args.window:
                    sent += 1
                    inflight += 1
                    await ws.send(dumps({"type": "message", "to": recipient, "content": f"{sent}|{pad}",
                                         "messageId": f"f{i}-{sent}", "timestamp": int(time.time() * 1000)}))
                frame = loads(await ws.recv())
                ftype = frame.get("type")
                if ftype in ("queued", "delivered"):
                    acks[ftype] += 1
                elif ftype == "error":
                    errors[str(frame.get("code"))] += 1
                else:
                    continue
                inflight -= 1

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(fill(i) for i in range(S)))
    finally:
        abort_all(conns)
    out["fill"] = {"s": round(time.monotonic() - t0, 3), "acks": dict(acks), "errors": dict(errors)}
    expected = acks["queued"]
    await asyncio.sleep(args.settle)  # let the store settle (group commits, GC) before timing
    ws = await open_ws(url, max_queue=1024)
    try:
        mark("flush_start")
        t0 = time.perf_counter()
        first = auth_at = None
        got = queued_true = 0
        last_seen = [0] * S
        in_order = True
        await ws.send(dumps({"type": "auth", "address": recipient}))
        async with asyncio.timeout(args.flush_timeout):
            while got < expected:
                frame = loads(await ws.recv())
                ftype = frame.get("type")
                if ftype == "auth_success":
                    auth_at = time.perf_counter()
                    # A client that listens says so: relayd holds a plain session's backlog until its first
                    # frame after auth (or a key upload, or [queue] flush_delay_ms); the others ignore the ping.
                    await ws.send(dumps({"type": "ping"}))
                elif ftype == "message":
                    if first is None:
                        first = time.perf_counter()
                    got += 1
                    queued_true += bool(frame.get("queued"))
                    sender_idx = int(frame["messageId"][1:].split("-", 1)[0])
                    n = int(frame["messageId"].split("-", 1)[1])
                    if n <= last_seen[sender_idx]:
                        in_order = False
                    last_seen[sender_idx] = n
        done = time.perf_counter()
        mark("flush_end")
    finally:
        abort_all([ws])
    out["flush"] = {"expected": expected, "received": got, "queued_true": queued_true, "in_order": in_order,
                    "auth_s": round((auth_at or done) - t0, 4), "first_s": round((first or done) - t0, 4),
                    "all_s": round(done - t0, 4), "rate": round(got / max(1e-9, done - t0), 1)}
    return out


# Scenario 5: REST

class HttpClient:
    """One HTTP/1.1 client that reuses its TCP connection while the server keeps it open.

    ``request`` sends one request and reads one response (Content-Length,
    chunked, or to EOF). The connection is kept when the answer allows it
    (HTTP/1.1 without ``Connection: close``) and dropped otherwise, after
    reading to EOF so the server, which closed first, holds the TIME_WAIT.
    A kept connection that the server closed while idle is reopened once
    and counted in ``stale``.
    """

    def __init__(self, port: int, timeout: float) -> None:
        self.port = port
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.connections = 0
        self.stale = 0

    async def request(self, raw: bytes) -> int:
        async with asyncio.timeout(self.timeout):
            for _ in range(2):
                fresh = self.writer is None
                if fresh:
                    self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
                    self.connections += 1
                assert self.reader is not None and self.writer is not None
                self.writer.write(raw)
                try:
                    status, keep = await self._response(self.reader)
                except (ConnectionError, asyncio.IncompleteReadError):
                    self.close()
                    if fresh:
                        raise
                    self.stale += 1
                    continue
                if not keep:
                    await self.reader.read()
                    self.close()
                return status
        raise ConnectionError("kept connection failed twice")

    @staticmethod
    async def _response(reader: asyncio.StreamReader) -> tuple[int, bool]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        status = int(rest[:3])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip().lower()
        conn = headers.get("connection", "")
        keep = ("close" not in conn) if version == "HTTP/1.1" else ("keep-alive" in conn)
        if "content-length" in headers:
            await reader.readexactly(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", ""):
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            keep = False
        return status, keep

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def http_request(method: str, path: str, body: bytes = b"", keep_alive: bool = False) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def rest(args: argparse.Namespace) -> dict[str, Any]:
    """Each phase is ``name`` or ``name:close``: an endpoint with keep-alive requested, or one request
    per connection."""
    tag = random.getrandbits(24)
    address = make_address(8, tag, 0)
    out: dict[str, Any] = {"concurrency": args.concurrency}
    if any(p.split(":")[0] == "public-keys" for p in args.phases):
        body = json.dumps({"address": address, "publicKey": "0x04" + "ab" * 64}).encode()
        status = await HttpClient(args.port, 10).request(http_request("POST", "/api/public-keys", body))
        if status != 200:
            raise RuntimeError(f"POST /api/public-keys answered {status}")
    paths = {"status": f"/api/status/{address}", "public-keys": f"/api/public-keys/{address}",
             "live": "/health/live", "health": "/health"}
    for phase in args.phases:
        name, _, mode = phase.partition(":")
        request = http_request("GET", paths[name], keep_alive=mode != "close")
        statuses: Counter[int] = Counter()
        errors: Counter[str] = Counter()
        clients = [HttpClient(args.port, 5) for _ in range(args.concurrency)]
        done = 0

        async def worker(client: HttpClient, deadline: float) -> None:
            nonlocal done
            while time.monotonic() < deadline and done < args.count:
                done += 1
                try:
                    statuses[await client.request(request)] += 1
                except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                    errors[type(exc).__name__] += 1
                    client.close()
            client.close()

        # Warm-up, not measured: the same requests for a moment (a JIT compiles, caches fill).
        await asyncio.wait_for(asyncio.gather(*(worker(c, time.monotonic() + args.warmup) for c in clients)),
                               args.warmup + 10)
        statuses.clear()
        errors.clear()
        done = 0
        for c in clients:
            c.connections = c.stale = 0
        mark(f"{phase}_start")
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(worker(c, t0 + args.duration) for c in clients)),
                               args.duration + 10)
        elapsed = time.monotonic() - t0
        mark(f"{phase}_end")
        out[phase] = {"path": paths[name].replace(address, ":address"), "requests": sum(statuses.values()),
                      "ok": statuses.get(200, 0), "statuses": {str(k): v for k, v in statuses.items()},
                      "errors": dict(errors), "elapsed_s": round(elapsed, 4),
                      "connections": sum(c.connections for c in clients), "stale": sum(c.stale for c in clients),
                      "rate": round(statuses.get(200, 0) / elapsed, 1)}
    return out


# Scenario 7: acknowledged delivery

async def ack_drain(url: str, address: str, expected: int, mode: str, timeout: float) -> dict[str, Any]:
    """Authenticate with ``"ack": true``, receive ``expected`` stored messages and ack them.

    mode ``single``: one ``ack`` frame per message as it arrives; ``batch``:
    frames of up to MAX_ACK_IDS ids as they fill up; ``none``: no acks (the
    delivery-only reference). Acks go out from a separate task, so receiving
    never waits on sending (a phone's client buffers its writes too). Ends
    with a ping barrier: the pong proves every ack was handled.
    """
    ws = await open_ws(url, max_queue=4096)
    outbox: asyncio.Queue[str | None] = asyncio.Queue()
    errors: Counter[str] = Counter()

    async def writer() -> None:
        while (data := await outbox.get()) is not None:
            await ws.send(data)

    task = asyncio.create_task(writer())
    got = 0
    try:
        async with asyncio.timeout(timeout):
            await ws.send(dumps({"type": "auth", "address": address, "ack": True}))
            batch: list[str] = []
            while got < expected:
                frame = loads(await ws.recv())
                ftype = frame.get("type")
                if ftype == "error":
                    errors[str(frame.get("code"))] += 1
                if ftype != "message":
                    continue
                got += 1
                if mode == "single":
                    outbox.put_nowait(dumps({"type": "ack", "messageIds": [frame["messageId"]]}))
                elif mode == "batch":
                    batch.append(frame["messageId"])
                    if len(batch) >= MAX_ACK_IDS:
                        outbox.put_nowait(dumps({"type": "ack", "messageIds": batch}))
                        batch = []
            if batch:
                outbox.put_nowait(dumps({"type": "ack", "messageIds": batch}))
            outbox.put_nowait(None)
            await task

        def note(frame: dict[str, Any]) -> None:
            if frame.get("type") == "error":
                errors[str(frame.get("code"))] += 1
        await ping_barrier(ws, timeout, note)
        await asyncio.wait_for(ws.close(), 5)  # a clean close, as an app going to the background
    finally:
        task.cancel()
        abort_all([ws])
    return {"received": got, "errors": dict(errors)}


async def count_redelivered(url: str, address: str, timeout: float, kinds: tuple[str, ...] = ("message",)) -> int:
    """Reconnect as ``address`` (ack mode) and count frames of ``kinds`` the server sends before a pong."""
    ws = await open_ws(url, max_queue=4096)
    seen = 0

    def note(frame: dict[str, Any]) -> None:
        nonlocal seen
        seen += frame.get("type") in kinds
    try:
        await ws.send(dumps({"type": "auth", "address": address, "ack": True}))
        await ping_barrier(ws, timeout, note)
    finally:
        abort_all([ws])
    return seen


async def acks(args: argparse.Namespace) -> dict[str, Any]:
    """Forms: ``one`` (one recipient, single-id acks), ``many`` (--conns recipients in parallel,
    single-id acks), ``batch`` (one recipient, acks of up to 1000 ids), ``none`` (one recipient,
    no acks: the delivery-only reference). Each form fills its own recipients first (not measured)."""
    url = f"ws://{HOST}:{args.port}"
    tag = random.getrandbits(24)
    pad = padding(args.content_bytes)
    out: dict[str, Any] = {"messages": args.messages}
    if args.warmup:  # not measured: every code path once (and a JIT's compilation) before the first form
        r = make_address(0x0E, tag, 0)
        await fill_queues(url, make_address(0x0E, tag, 1), [(r, f"w-{i}") for i in range(args.warmup)], 32, pad,
                          args.timeout)
        await ack_drain(url, r, args.warmup, "single", args.timeout)
        await count_redelivered(url, r, args.timeout)
    for fi, form in enumerate(args.forms):
        k = args.conns if form == "many" else 1
        recipients = [make_address(0x10 + fi, tag, i) for i in range(k)]
        targets = [(recipients[i % k], f"a{fi}-{i}") for i in range(args.messages)]
        answers = await fill_queues(url, make_address(0x0F, tag, fi), targets, 32, pad, args.timeout)
        per = [sum(1 for to, _ in targets if to == r) for r in recipients]
        await asyncio.sleep(args.settle)
        mode = {"one": "single", "many": "single", "batch": "batch", "none": "none"}[form]
        mark(f"{form}_start")
        t0 = time.perf_counter()
        drained = await asyncio.gather(*(ack_drain(url, r, n, mode, args.timeout)
                                         for r, n in zip(recipients, per)))
        elapsed = time.perf_counter() - t0
        mark(f"{form}_end")
        redelivered = None
        if mode != "none":
            counts = await asyncio.gather(*(count_redelivered(url, r, args.timeout) for r in recipients))
            redelivered = sum(counts)
        errors: Counter[str] = Counter()
        for d in drained:
            errors.update(d["errors"])
        received = sum(d["received"] for d in drained)
        out[form] = {"connections": k, "fill": dict(answers), "received": received, "errors": dict(errors),
                     "elapsed_s": round(elapsed, 4), "rate": round(received / max(1e-9, elapsed), 1),
                     "redelivered": redelivered}
    return out


# Scenario 8: read receipts to an offline recipient

async def receipts(args: argparse.Namespace) -> dict[str, Any]:
    """Forms: ``one`` (one reader connection), ``many`` (--conns readers in parallel); every
    receipt is its own ``read_receipt`` frame to one offline address. A pong ends each reader's
    stream; then the offline address connects and counts the ``read`` frames it gets (stored
    receipts, not measured)."""
    url = f"ws://{HOST}:{args.port}"
    tag = random.getrandbits(24)
    out: dict[str, Any] = {"receipts": args.receipts}
    if args.warmup:  # not measured: every code path once (and a JIT's compilation) before the first form
        target, reader = make_address(0x1E, tag, 0), make_address(0x1E, tag, 1)
        ws = (await open_authed(url, [reader], 1))[0]
        try:
            for n in range(args.warmup):
                await ws.send(dumps({"type": "read_receipt", "to": target, "messageId": f"w{n}"}))
            await ping_barrier(ws, args.timeout)
        finally:
            abort_all([ws])
        await count_redelivered(url, target, args.timeout, ("read",))
    for fi, form in enumerate(args.forms):
        k = args.conns if form == "many" else 1
        target = make_address(0x20 + fi, tag, 0)
        readers = [make_address(0x28 + fi, tag, i) for i in range(k)]
        conns = await open_authed(url, readers, 50)
        per = [args.receipts // k + (1 if i < args.receipts % k else 0) for i in range(k)]
        errors: Counter[str] = Counter()

        def note(frame: dict[str, Any]) -> None:
            if frame.get("type") == "error":
                errors[str(frame.get("code"))] += 1

        async def read_all(i: int) -> None:
            ws = conns[i]
            async with asyncio.timeout(args.timeout):
                for n in range(per[i]):
                    await ws.send(dumps({"type": "read_receipt", "to": target, "messageId": f"r{i}-{n}"}))
            await ping_barrier(ws, args.timeout, note)

        try:
            mark(f"{form}_start")
            t0 = time.perf_counter()
            await asyncio.gather(*(read_all(i) for i in range(k)))
            elapsed = time.perf_counter() - t0
            mark(f"{form}_end")
        finally:
            abort_all(conns)
        stored = await count_redelivered(url, target, args.timeout, ("read",))
        sent = sum(per)
        out[form] = {"connections": k, "sent": sent, "errors": dict(errors), "elapsed_s": round(elapsed, 4),
                     "rate": round(sent / max(1e-9, elapsed), 1), "stored_delivered": stored}
    return out


# Command line

def csv_list(value: str) -> list[str]:
    return [x for x in value.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True, help="server port on 127.0.0.1")
    p.add_argument("--marks", action="store_true", help="wait for run.py's answer on stdin at each MARK")
    p.add_argument("--max-time", type=float, default=300, help="hard cap on the whole run, seconds")
    sub = p.add_subparsers(dest="scenario", required=True)

    s = sub.add_parser("live", help="scenario 1: live routing between online pairs")
    s.add_argument("--pairs", type=int, default=20)
    s.add_argument("--window", type=int, default=16, help="messages in flight per sender")
    s.add_argument("--count", type=int, default=1000, help="messages per pair in each measured phase")
    s.add_argument("--warmup", type=int, default=100, help="messages per pair before measuring")
    s.add_argument("--max-duration", type=float, default=30, help="cap on each phase, seconds")
    s.add_argument("--paced-rate", type=float, default=0, help="msg/s of this process in the paced phase "
                                                                "(0: half its own max)")
    s.add_argument("--paced-warmup", type=float, default=0.5,
                   help="latencies of messages sent in the paced phase's first seconds (at most a fifth "
                        "of it) are not kept")
    s.add_argument("--content-bytes", type=int, default=200)
    s.add_argument("--drain-timeout", type=float, default=15)
    s.add_argument("--trace", metavar="FILE", help="write every receipt's time and latency (diagnosis)")
    s.add_argument("--receiver-port", type=int, default=0,
                   help="receivers connect to this port (another instance of a cluster); 0: --port")
    s.add_argument("--crowd", type=int, default=0,
                   help="first open this many authenticated idle connections (sources over 127.1.0.0/16) and "
                        "keep them through both phases (scenario 11)")

    s = sub.add_parser("idle", help="scenario 2: idle authenticated connections")
    s.add_argument("--connections", type=int, default=2000)
    s.add_argument("--concurrency", type=int, default=100)
    s.add_argument("--settle", type=float, default=1.0)

    s = sub.add_parser("offline", help="scenario 3: messages to offline recipients")
    s.add_argument("--senders", type=int, default=20)
    s.add_argument("--window", type=int, default=16)
    s.add_argument("--recipients", type=int, default=5000)
    s.add_argument("--count", type=int, default=5000, help="messages per sender, at most")
    s.add_argument("--warmup", type=int, default=50, help="messages per sender before measuring")
    s.add_argument("--duration", type=float, default=3)
    s.add_argument("--content-bytes", type=int, default=200)
    s.add_argument("--drain-timeout", type=float, default=15)

    s = sub.add_parser("flush", help="scenario 4: reconnect with a full offline queue")
    s.add_argument("--messages", type=int, default=10000)
    s.add_argument("--senders", type=int, default=4)
    s.add_argument("--window", type=int, default=32)
    s.add_argument("--content-bytes", type=int, default=200)
    s.add_argument("--fill-timeout", type=float, default=120)
    s.add_argument("--flush-timeout", type=float, default=120)
    s.add_argument("--settle", type=float, default=0.5)

    s = sub.add_parser("rest", help="scenario 5: REST requests, keep-alive requested or one per connection")
    s.add_argument("--phases", default="public-keys,public-keys:close", type=csv_list,
                   help="endpoint[:close] list; endpoints: status, public-keys, live, health")
    s.add_argument("--concurrency", type=int, default=4)
    s.add_argument("--duration", type=float, default=2)
    s.add_argument("--warmup", type=float, default=0.3, help="seconds of the same requests before each phase")
    s.add_argument("--count", type=int, default=1_000_000, help="requests per phase, at most")

    s = sub.add_parser("acks", help="scenario 7: ack-mode recipients acking stored messages")
    s.add_argument("--forms", default="one,many,batch,none", type=csv_list, help="one, many, batch, none")
    s.add_argument("--messages", type=int, default=2000, help="stored messages per form")
    s.add_argument("--conns", type=int, default=20, help="recipients in parallel for the 'many' form")
    s.add_argument("--warmup", type=int, default=200, help="messages stored and acked before the first form")
    s.add_argument("--content-bytes", type=int, default=200)
    s.add_argument("--settle", type=float, default=0.3)
    s.add_argument("--timeout", type=float, default=120)

    s = sub.add_parser("receipts", help="scenario 8: read receipts to an offline recipient")
    s.add_argument("--forms", default="one,many", type=csv_list, help="one, many")
    s.add_argument("--receipts", type=int, default=2000, help="receipts per form")
    s.add_argument("--conns", type=int, default=20, help="reader connections for the 'many' form")
    s.add_argument("--warmup", type=int, default=200, help="receipts sent before the first form")
    s.add_argument("--timeout", type=float, default=120)
    return p


SCENARIOS = {"live": live, "idle": idle, "offline": offline, "flush": flush, "rest": rest, "acks": acks,
             "receipts": receipts}


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    async with asyncio.timeout(args.max_time):
        return await SCENARIOS[args.scenario](args)


def main() -> int:
    global _marks_enabled
    args = build_parser().parse_args()
    _marks_enabled = args.marks
    try:
        result: dict[str, Any] = {"ok": True, **asyncio.run(amain(args))}
        code = 0
    except BaseException as exc:  # always print one RESULT line
        if isinstance(exc, KeyboardInterrupt):
            raise
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        code = 1
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    # Skip interpreter teardown of thousands of sockets; everything is already reported.
    os._exit(code)


if __name__ == "__main__":
    main()
