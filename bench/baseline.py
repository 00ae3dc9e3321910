#!/usr/bin/env python3
"""The floor: the least a websockets-based relay can do for the same protocol.

A bare ``websockets`` (new asyncio API) forwarder with relayd's transport
settings (compression off, ping_interval 20 s, ping_timeout 20 s). It
accepts ``auth`` (address shape checked, ``auth_success`` back), keeps a dict
address -> connection, forwards ``message`` frames to the recipient and
answers ``delivered``, or ``queued`` into a plain dict when the recipient is
offline, flushed on auth. ``read_receipt`` goes to the online recipient or
into a list flushed on auth; ``ping`` answers ``pong``. With ``"ack": true``
in ``auth`` the flushed messages stay stored until an ``ack`` frame names
them, then ``queue_empty`` follows the flush: the least relayd's ack
extension can cost. ``GET /health/live`` answers 200. Nothing else: no
validation beyond the address shape, no limits, no store, no durability.

Usage: python bench/baseline.py PORT   (listens on 127.0.0.1 only)
"""

from __future__ import annotations

import asyncio
import http
import json
import re
import signal
import sys
import time

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")

online: dict[str, object] = {}
offline: dict[str, dict[str, list[str]]] = {}  # recipient -> {messageId: [frames]}, in arrival order
receipts: dict[str, list[str]] = {}


def now_ms() -> int:
    return int(time.time() * 1000)


def health(conn, request):
    if request.path == "/health/live":
        return conn.respond(http.HTTPStatus.OK, '{"status":"ok"}\n')
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return conn.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
    return None


async def flush(ws, address: str, ack: bool) -> None:
    stored = offline.get(address) if ack else offline.pop(address, None)
    for frames in list((stored or {}).values()):
        for data in frames:
            await ws.send(data)
    for data in receipts.pop(address, ()):
        await ws.send(data)
    if ack:
        await ws.send('{"type":"queue_empty"}')


async def handler(ws) -> None:
    address = None
    try:
        async for raw in ws:
            try:
                frame = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(frame, dict):
                continue
            ftype = frame.get("type")
            if ftype == "message" and address is not None:
                to = str(frame.get("to", "")).lower()
                mid = frame.get("messageId")
                out = {"type": "message", "from": address, "content": frame.get("content"),
                       "messageId": mid, "timestamp": frame.get("timestamp") or now_ms(), "queued": False}
                peer = online.get(to)
                answer = "queued"
                if peer is not None:
                    try:
                        await peer.send(json.dumps(out))
                        answer = "delivered"
                    except ConnectionClosed:
                        pass
                if answer == "queued":
                    out["queued"] = True
                    offline.setdefault(to, {}).setdefault(str(mid), []).append(json.dumps(out))
                await ws.send(json.dumps({"type": answer, "messageId": mid, "to": to, "timestamp": now_ms()}))
            elif ftype == "read_receipt" and address is not None:
                to = str(frame.get("to", "")).lower()
                out = json.dumps({"type": "read", "from": address, "messageId": frame.get("messageId"),
                                  "timestamp": now_ms()})
                peer = online.get(to)
                try:
                    if peer is not None:
                        await peer.send(out)
                        continue
                except ConnectionClosed:
                    pass
                receipts.setdefault(to, []).append(out)
            elif ftype == "ack" and address is not None:
                stored = offline.get(address, {})
                for mid in frame.get("messageIds") or ():
                    stored.pop(str(mid), None)
            elif ftype == "ping":
                await ws.send(json.dumps({"type": "pong", "timestamp": now_ms()}))
            elif ftype == "auth":
                addr = frame.get("address")
                if not isinstance(addr, str) or not ADDRESS.fullmatch(addr):
                    await ws.send(json.dumps({"type": "error", "code": "invalid_address"}))
                    continue
                address = addr.lower()
                online[address] = ws
                await ws.send(json.dumps({"type": "auth_success", "address": address, "timestamp": now_ms()}))
                await flush(ws, address, frame.get("ack") is True)
    except ConnectionClosed:
        pass
    finally:
        if address is not None and online.get(address) is ws:
            del online[address]


async def main(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(handler, "127.0.0.1", port, process_request=health, compression=None,
                     ping_interval=20, ping_timeout=20):
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
