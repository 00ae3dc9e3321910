"""Shared helpers for the end-to-end suite: addresses, raw sockets and exact-shape checks.

Fixtures defined here are imported by the test modules that use them
(``from e2e_support import open_relay``); conftest.py stays untouched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import struct
import time
from typing import Any, Callable

import pytest
from websockets.exceptions import ConnectionClosed

# Plain test addresses (lower-case) and one EIP-55 address from the EIP-55 specification.
A = "0x" + "a1" * 20
B = "0x" + "b2" * 20
C = "0x" + "c3" * 20
MIXED = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
MIXED_LOWER = MIXED.lower()

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# auth_success may carry relayd's sign-in extension fields; an unsigned
# auth reports verified: false and nothing else.
UNSIGNED_AUTH_EXTRAS = ({}, {"verified": False})


# Fixtures


@pytest.fixture
def open_relay(start_relay: Callable[..., Any]) -> Any:
    """A relay in ``[auth] mode = open``: the seed protocol, no sign-in challenge."""
    return start_relay(auth={"mode": "open"})


def start_open(start_relay: Callable[..., Any], **sections: dict[str, Any]) -> Any:
    """``start_relay`` in open mode plus the given sections."""
    auth = {"mode": "open", **sections.pop("auth", {})}
    return start_relay(auth=auth, **sections)


@pytest.fixture
def quiet_server_tracebacks() -> Any:
    """Silence the websockets loggers while a test provokes a server-side exception.

    On CPython 3.11, formatting a traceback (which the relay thread's logging
    does) runs ast.parse, which is not thread-safe against pytest building a
    failure report in the main thread at the same moment ("AST constructor
    recursion depth mismatch" INTERNALERROR). Disabled loggers never format.
    """
    loggers = [logging.getLogger(name) for name in ("websockets", "websockets.server", "asyncio")]
    saved = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, saved):
            lg.disabled = was


# Shape checks


def now_ms() -> int:
    return int(time.time() * 1000)


def assert_ms(value: Any, *, near: bool = True) -> None:
    """An integer of milliseconds (never a bool or float); near now when ``near``.

    "Near" is a generous ten minutes: it catches seconds-instead-of-ms and
    zero without depending on how fast the machine is.
    """
    assert type(value) is int, f"expected an int of ms, got {value!r}"
    if near:
        assert abs(value - now_ms()) < 600_000, f"{value} is not a current time in ms"


def assert_auth_success(frame: dict[str, Any], address: str) -> None:
    """``{"type":"auth_success","address":<lower>,"timestamp":<int ms>}`` (+ verified:false)."""
    base = {k: frame[k] for k in ("type", "address") if k in frame}
    assert base == {"type": "auth_success", "address": address.lower()}, frame
    assert_ms(frame.get("timestamp"))
    extras = {k: v for k, v in frame.items() if k not in ("type", "address", "timestamp")}
    assert extras in UNSIGNED_AUTH_EXTRAS, f"unexpected auth_success fields: {extras}"


def status_frame(frame: dict[str, Any], ftype: str, mid: str, to: str) -> None:
    """Assert a ``delivered``/``queued`` frame exactly (timestamp: an int of ms)."""
    assert set(frame) == {"type", "messageId", "to", "timestamp"}, frame
    assert (frame["type"], frame["messageId"], frame["to"]) == (ftype, mid, to.lower()), frame
    assert_ms(frame["timestamp"])


def error_frame(code: str, mid: Any = None) -> Callable[[dict[str, Any]], None]:
    """A checker for ``{"type":"error","code":code,"message":<str>[,"messageId":mid]}``."""
    def check(frame: dict[str, Any]) -> None:
        expected_keys = {"type", "code", "message"} | ({"messageId"} if mid is not None else set())
        assert set(frame) == expected_keys, frame
        assert frame["type"] == "error" and frame["code"] == code, frame
        assert isinstance(frame["message"], str) and frame["message"], frame
        if mid is not None:
            assert frame["messageId"] == mid, frame
    return check


def assert_error(frame: dict[str, Any], code: str, mid: Any = None) -> None:
    error_frame(code, mid)(frame)


def message_frame(frm: str, content: str, mid: str, timestamp: int, queued: bool) -> dict[str, Any]:
    return {"type": "message", "from": frm, "content": content, "messageId": mid, "timestamp": timestamp,
            "queued": queued}


def msg(to: str, mid: str, content: str = "Y2lwaGVydGV4dA==", **extra: Any) -> dict[str, Any]:
    return {"type": "message", "to": to, "content": content, "messageId": mid, **extra}


def recv_closed(ws: Any, timeout: float = 5) -> Any:
    """Read until the connection closes; return the received Close (code/reason)."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            ws.ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    except ConnectionClosed as exc:
        return exc.rcvd
    raise AssertionError("connection did not close")  # pragma: no cover


def wait_until(predicate: Callable[[], bool], timeout: float = 5, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def queue_size(relay: Any, address: str) -> int:
    reply = relay.http("GET", f"/api/messages/{address}/queue-size")
    assert reply.status == 200, reply
    body = reply.json
    assert set(body) == {"address", "queueSize"} and body["address"] == address.lower(), body
    assert type(body["queueSize"]) is int, body
    return body["queueSize"]


def online(relay: Any, address: str) -> bool:
    reply = relay.http("GET", f"/api/status/{address}")
    assert reply.status == 200, reply
    assert type(reply.json["online"]) is bool, reply
    return reply.json["online"]


# Raw HTTP


class RawReply:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head, sep, self.body = raw.partition(b"\r\n\r\n")
        assert sep, f"no complete HTTP response head in {raw[:300]!r}"
        lines = head.decode("iso-8859-1").split("\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split(" ", 2)[1])
        self.headers: dict[str, str] = {}
        self.header_list: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
            self.header_list.append((name.strip().lower(), value.strip()))

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<RawReply {self.raw[:300]!r}>"


def raw_http(port: int, data: bytes, *, timeout: float = 5, chunks: list[bytes] | None = None) -> RawReply:
    """Send ``data`` (then each of ``chunks``) on a fresh socket and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        for part in chunks or ():
            time.sleep(0.01)
            s.sendall(part)
        out = b""
        while True:
            block = s.recv(65536)
            if not block:
                break
            out += block
    return RawReply(out)


def http_head(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
              *, length: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    headers = dict(headers or {})
    if not any(k.lower() == "connection" for k in headers):
        headers["Connection"] = "close"  # one request per connection unless a test asks for keep-alive
    for k, v in headers.items():
        lines.append(f"{k}: {v}")
    if length and body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(body: bytes, sizes: tuple[int, ...] = (7, 5)) -> bytes:
    """Encode ``body`` with Transfer-Encoding: chunked, in pieces of the given sizes (rest last)."""
    out, pos = b"", 0
    for size in sizes:
        piece = body[pos:pos + size]
        if not piece:
            break
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
        pos += len(piece)
    if pos < len(body):
        out += b"%x;ext=1\r\n" % (len(body) - pos) + body[pos:] + b"\r\n"
    return out + b"0\r\n\r\n"


# Raw WebSocket client (for peers that misbehave on purpose)


class RawWs:
    """A minimal client-side WebSocket over a plain socket.

    It never answers pings unless told to, so it models a dead or frozen peer.
    """

    def __init__(self, port: int, *, path: str = "/", headers: dict[str, str] | None = None,
                 timeout: float = 5, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # a small window makes a slow reader with little data
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            block = self.sock.recv(4096)
            if not block:
                raise ConnectionError(f"handshake refused: {buf!r}")
            buf += block
        head, _, self.buf = buf.partition(b"\r\n\r\n")
        self.head = head.decode("iso-8859-1")
        self.status = int(self.head.split(" ", 2)[1])
        if self.status == 101:
            expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
            assert f"sec-websocket-accept: {expected.lower()}" in self.head.lower(), self.head

    def send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send_json(self, frame: Any) -> None:
        self.send_frame(0x1, json.dumps(frame).encode())

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            block = self.sock.recv(65536)
            if not block:
                raise EOFError("server closed the TCP connection")
            self.buf += block
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self, timeout: float = 5) -> tuple[int, bytes]:
        """One frame as (opcode, payload); control frames included, no automatic pong."""
        self.sock.settimeout(timeout)
        b1, b2 = self._read(2)
        n = b2 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        return b1 & 0x0F, self._read(n)

    def recv_json(self, timeout: float = 5) -> Any:
        while True:
            opcode, payload = self.recv_frame(timeout)
            if opcode in (0x1, 0x2):
                return json.loads(payload)
            if opcode == 0x8:
                raise EOFError(f"close frame {payload!r}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawWs":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
