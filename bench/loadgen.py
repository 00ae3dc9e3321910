#!/usr/bin/env python3
"""Load generator for relayd benchmarks: one process, asyncio, websockets' asyncio client.

Run by ``bench/run.py`` as a separate process from the server under test.
Each subcommand drives one scenario against ``--port`` on 127.0.0.1 and
prints exactly one line ``RESULT {json}`` at the end.

Phase marks: at each phase boundary the load generator prints
``MARK <name>`` and (with ``--marks``, as run.py uses it) blocks until one
line arrives on stdin. run.py samples the server's CPU time and RSS from
/proc when it sees the mark, then answers; the load generator never reads
the server's /proc itself. Without ``--marks`` the marks are only printed.

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
MARK_TIMEOUT = 60.0

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


async def auth(ws: ClientConnection, address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Authenticate; skip frames of other types (a relay may send a challenge first)."""
    await asyncio.wait_for(ws.send(dumps({"type": "auth", "address": address})), timeout)
    async with asyncio.timeout(timeout):
        while True:
            frame = loads(await ws.recv())
            if frame.get("type") == "auth_success":
                return
            if frame.get("type") == "error":
                raise RuntimeError(f"auth refused: {frame}")


async def open_authed(url: str, addresses: list[str], concurrency: int, **kw: Any) -> list[ClientConnection]:
    """Open and authenticate one connection per address, ``concurrency`` at a time."""
    sem = asyncio.Semaphore(concurrency)
    out: list[ClientConnection | None] = [None] * len(addresses)

    async def one(i: int, address: str) -> None:
        async with sem:
            ws = await open_ws(url, **kw)
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
    r_ws = await open_authed(url, receivers, 50)
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
                "p90_ms": ms(pct(st.lat, 90)), "p99_ms": ms(pct(st.lat, 99)), "max_ms": ms(max(st.lat, default=None)),
                "latency_samples": len(st.lat),
                "acks": dict(st.acks), "errors": dict(st.errors), "queued_rx": st.queued_rx, "complete": complete}

    def reset() -> None:
        st.received, st.last_rx, st.queued_rx = 0, 0.0, 0
        st.lat.clear()
        st.record_after = 0
        st.acks, st.errors = Counter(), Counter()
        for p in pairs:
            p.sent = p.acked = 0

    out: dict[str, Any] = {"pairs": P, "window": W, "content_bytes": args.content_bytes}
    try:
        # Warm-up: a little traffic so first-use costs stay out of the figures.
        st.mode, st.limit, st.deadline = "closed", 5, time.monotonic() + 5
        for p in pairs:
            await send(p)
        await wait_until(lambda: total_sent() >= 5 * P and drained(), 10)
        reset()

        # Max rate: every sender keeps W messages in flight.
        st.mode, st.limit = "closed", args.count
        mark("max_start")
        t0 = time.monotonic()
        st.deadline = t0 + args.duration
        for p in pairs:
            for _ in range(W):
                await send(p)
        await wait_until(lambda: time.monotonic() >= st.deadline or total_sent() >= args.count * P,
                         args.duration + 1, 0.01)
        complete = await wait_until(drained, args.drain_timeout)
        mark("max_end")
        out["max"] = phase_result(t0, complete)

        # Paced: an open-loop pacer at a fixed total rate, round-robin over the senders.
        rate = args.paced_rate or out["max"]["rate"] / 2
        reset()
        st.mode = "paced"
        n_total = int(rate * args.paced_duration)
        mark("paced_start")
        t0 = time.monotonic()
        st.record_after = time.perf_counter_ns() + int(args.paced_warmup * 1e9)
        n = 0
        while n < n_total and time.monotonic() < t0 + args.paced_duration + 2:
            due = min(n_total, int((time.monotonic() - t0) * rate) + 1)
            while n < due:
                await send(pairs[n % P])
                n += 1
            await asyncio.sleep(0.001)
        complete = await wait_until(drained, args.drain_timeout)
        mark("paced_end")
        out["paced"] = phase_result(t0, complete)
        out["paced"]["target_rate"] = round(rate, 1)
        if trace is not None:
            with open(args.trace, "w") as f:  # receive time (s) and latency (ms), both phases
                f.writelines(f"{(t - trace[0][0]) / 1e9:.4f} {lat / 1e6:.3f}\n" for t, lat in trace)
    finally:
        for t in readers:
            t.cancel()
        abort_all(s_ws + r_ws)
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
    conns = await open_authed(url, addresses, args.concurrency, max_queue=4)
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
        # Warm-up (also creates the first rows / tables' pages).
        state.update(limit=2, deadline=time.monotonic() + 5)
        for i in range(S):
            await send(i)
        await wait_until(lambda: sum(acked) >= sum(sent) and sum(sent) >= 2 * S, 10)
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

async def http_once(port: int, request: bytes, timeout: float) -> int:
    """One request on a fresh connection; read to EOF (the server closes: Connection: close)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(request)
            data = await reader.read()
        finally:
            writer.close()
    if not data.startswith(b"HTTP/1.1 "):
        return 0
    return int(data[9:12])


def http_request(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def rest(args: argparse.Namespace) -> dict[str, Any]:
    tag = random.getrandbits(24)
    address = make_address(8, tag, 0)
    out: dict[str, Any] = {"concurrency": args.concurrency}
    if "public-keys" in args.endpoints:
        body = json.dumps({"address": address, "publicKey": "0x04" + "ab" * 64}).encode()
        status = await http_once(args.port, http_request("POST", "/api/public-keys", body), 10)
        if status != 200:
            raise RuntimeError(f"POST /api/public-keys answered {status}")
    paths = {"status": f"/api/status/{address}", "public-keys": f"/api/public-keys/{address}",
             "live": "/health/live", "health": "/health"}
    for name in args.endpoints:
        request = http_request("GET", paths[name])
        statuses: Counter[int] = Counter()
        errors: Counter[str] = Counter()
        done = 0

        async def worker(deadline: float) -> None:
            nonlocal done
            while time.monotonic() < deadline and done < args.count:
                done += 1
                try:
                    statuses[await http_once(args.port, request, 5)] += 1
                except (OSError, asyncio.TimeoutError) as exc:
                    errors[type(exc).__name__] += 1

        mark(f"{name}_start")
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(worker(t0 + args.duration) for _ in range(args.concurrency))),
                               args.duration + 10)
        elapsed = time.monotonic() - t0
        mark(f"{name}_end")
        out[name] = {"path": paths[name].replace(address, ":address"), "requests": sum(statuses.values()),
                     "ok": statuses.get(200, 0), "statuses": {str(k): v for k, v in statuses.items()},
                     "errors": dict(errors), "elapsed_s": round(elapsed, 4),
                     "rate": round(statuses.get(200, 0) / elapsed, 1)}
    return out


# Command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True, help="server port on 127.0.0.1")
    p.add_argument("--marks", action="store_true", help="wait for run.py's answer on stdin at each MARK")
    p.add_argument("--max-time", type=float, default=300, help="hard cap on the whole run, seconds")
    sub = p.add_subparsers(dest="scenario", required=True)

    s = sub.add_parser("live", help="scenario 1: live routing between online pairs")
    s.add_argument("--pairs", type=int, default=50)
    s.add_argument("--window", type=int, default=8, help="messages in flight per sender")
    s.add_argument("--count", type=int, default=2000, help="messages per pair, at most")
    s.add_argument("--duration", type=float, default=4, help="max-rate phase length, seconds, at most")
    s.add_argument("--paced-rate", type=float, default=0, help="total msg/s in the paced phase (0: half the max)")
    s.add_argument("--paced-duration", type=float, default=3)
    s.add_argument("--paced-warmup", type=float, default=0.5,
                   help="latencies of messages sent in the paced phase's first seconds are not kept")
    s.add_argument("--content-bytes", type=int, default=200)
    s.add_argument("--drain-timeout", type=float, default=15)
    s.add_argument("--trace", metavar="FILE", help="write every receipt's time and latency (diagnosis)")

    s = sub.add_parser("idle", help="scenario 2: idle authenticated connections")
    s.add_argument("--connections", type=int, default=2000)
    s.add_argument("--concurrency", type=int, default=100)
    s.add_argument("--settle", type=float, default=1.0)

    s = sub.add_parser("offline", help="scenario 3: messages to offline recipients")
    s.add_argument("--senders", type=int, default=20)
    s.add_argument("--window", type=int, default=16)
    s.add_argument("--recipients", type=int, default=5000)
    s.add_argument("--count", type=int, default=5000, help="messages per sender, at most")
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

    s = sub.add_parser("rest", help="scenario 5: REST requests on fresh connections")
    s.add_argument("--endpoints", default="status,public-keys",
                   type=lambda v: [x for x in v.split(",") if x], help="status,public-keys,live,health")
    s.add_argument("--concurrency", type=int, default=4)
    s.add_argument("--duration", type=float, default=2)
    s.add_argument("--count", type=int, default=100000, help="requests per endpoint, at most")
    return p


SCENARIOS = {"live": live, "idle": idle, "offline": offline, "flush": flush, "rest": rest}


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
