"""The suite's one toolkit: real relays, clients, raw wire helpers, waits and exact-shape checks.

Fixtures live in ``conftest.py``; everything they and the tests share is here,
one home per helper. Every relay listens on 127.0.0.1 on a port from
``free_port`` (or one the kernel chose) and is driven with real sockets.

Timeouts: every ``timeout`` a helper here takes is in seconds *on a normal
machine* and is multiplied by ``TIMEOUT_FACTOR``, read from the environment
variable ``RELAYDTEST_TIMEOUT_FACTOR`` (default 1), so a slow CI machine can
be given more time without editing a test (like websockets' ``MS``). Tests
never sleep to order events: they wait on something observable with
``wait_until``, send a ``ping`` and read up to its ``pong`` (frames on one
connection are ordered), or move a ``ManualClock``.
"""

from __future__ import annotations

import asyncio
import re
import hashlib
import base64
import http.client
import importlib.util
import itertools
import json
import logging
import os
import resource
import secrets
import shutil
import signal
import socket
import ssl
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import pytest

from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.streams import StreamReader
from websockets.sync.client import connect as ws_connect
from websockets.utils import accept_key, generate_key

from relayd.clock import SYSTEM_CLOCK, Clock
from relayd.config import Config, load_config
from relayd.identity.signatures import keccak256
from relayd.identity.signing import address_of_private, sign_text
from relayd.identity.statements import auth_statement, key_statement
from relayd.protocol.session import Session
from relayd.server import RelayServer
from relayd.storage.memory import MemoryStore
from relayd.storage.store import EnqueueResult, QueuedMessage, QueueLimits, StorageOutcomeUnknown, Store

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_FACTOR = float(os.environ.get("RELAYDTEST_TIMEOUT_FACTOR")
                       or os.environ.get("RELAYD_TEST_TIMEOUT_FACTOR", "1"))
"""``RELAYD_TEST_TIMEOUT_FACTOR`` is the old name, still read (the daemon ignores ``RELAYD_TEST_*``)."""

T = TypeVar("T")


HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None
EVENT_LOOPS = [pytest.param("asyncio"),
               pytest.param("uvloop", marks=pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop is not installed"))]
"""Parameters for a fixture that runs its relay on each ``[server] event_loop`` (the test extra installs uvloop)."""


def new_loop(event_loop: str = "asyncio") -> asyncio.AbstractEventLoop:
    """A fresh loop of the kind ``[server] event_loop`` names, for a relay run in this process."""
    if event_loop == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def scaled(timeout: float) -> float:
    """``timeout`` seconds on this machine (see the module docstring)."""
    return timeout * TIMEOUT_FACTOR


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 5, interval: float = 0.01) -> T:
    """Poll ``predicate`` until it returns something true and return that.

    Raises AssertionError naming ``what`` when ``timeout`` runs out.
    """
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {scaled(timeout):g} s waiting for {what}")
        time.sleep(interval)


# Addresses, keys and ids

A = "0x" + "a1" * 20
B = "0x" + "b2" * 20
C = "0x" + "c3" * 20
D = "0x" + "d4" * 20
E = "0x" + "e5" * 20
# An EIP-55 address from the EIP-55 specification, and its lower-case form.
MIXED = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
MIXED_LOWER = MIXED.lower()

# Signing vectors of /work/shared/auth-test-vectors.md; keys in hex, as the file gives them.
# V2 / V3: idena-web dnaSign test key, doubleHash and prefix over the same text.
V2_KEY = "c6fccb1b926e774d7e3a1716eddeba55ae7d40db4fb7c22d2705835f48d5be1b"
V2_ADDRESS = "0xa79b11814a162129a6dC136885C1c92EE1336Ffc"
V2_TEXT = "salt-0x010203-50"
V2_HASH = "e640350d786814f43742f18bee7333c5d1d44bfcd9f5f2e65ffdfe0a3c2278c0"
V2_SIG = ("4adf3bb775e94b56ce0acbbbcede83cd6382841e4152a1956bff2b73105adc0c"
          "0292f84193648f83e0f2b66b7095055ded4a062330199970e26613dc392336eb01")
V3_HASH = "0cf72780b2992a8fa8bf1055046ab6826ee7d1f1dfd9d67a9ddb6a9cea3f049b"
V3_SIG = ("8f18c02c8e6724dcb117cbcf7c9450c004b9e4ef0a8d62bc14c62c7fe6734639"
          "4a2f4bc415f65cb02169620d1aae198b9dbbd751e194fee223476c6f0e76432a01")
# V5: key to address, and a sign-in nonce signed by the first key.
V5_KEYS = [("289c2857d4598e37fb9647507e47a309d6133539bf21a8b9cb6df88fd5232032",
            "0x970e8128ab834e8eac17ab8e3812f010678cf791"),
           ("58d23b55bc9cdce1f18c2500f40ff4ab7245df9a89505e9b1fa4851f623d241d",
            "0xdc544d1aa88ff8bbd2f2aec754b1f1e99e1812fd")]
V5_TEXT = "signin-0652c409-17ef-4ad6-b580-3faaefcc204d"
V5_SIG = ("ca5f6ac5ee526685de07b60eec8c1e02e9f2ce09cecf887fa4adca654a2f82ac"
          "7e25c4e90eb4f5537e2e60c8478ae1e8ee7ec35435701a624549599cb7441d6b00")
# V6: eth-keys signatures over keccak256(b"message").
V6_CASES = [
    ("9c0257114eb9399a2985f8e75dad7600c5d89fe3824ffa99ec1c3eb8bf3b0501",
     "0x328809bc894f92807417d2dad6b7c998c1afdac6",
     "b20e2ea5d3cbaa83c1e0372f110cf12535648613b479b64c1a8c1a20c5021f38"
     "0434d07ec5795e3f789794351658e80b7faf47a46328f41e019d7b853745cdfd01"),
    ("38e47a7b719dce63662aeaf43440326f551b8a7ee198cee35cb5d517f2d296a2",
     "0x1d96f2f6bef1202e4ce1ff6dad0c2cb002861d3e",
     "5c48ea4f0f2257fa23bd25e6fcb0b75bbe2ff9bbda0167118dab2bb6e31ba76e"
     "691dbdaf2a231fc9958cd8edd99507121f8184042e075cf10f98ba88abff1f3601"),
]
# V7: ethereumjs-util, v = 27 (recovery id 0).
V7_KEY = "3c9229289a6125f7fdf1885a77bb12c37a8d3b4962d936f7e3084dece32a3ca1"
V7_HASH = "82ff40c0a986c6a5cfad4ddf4c3aa6996f1a7837f9c398e17e5de5cbd5a12b28"
V7_R = "99e71a99cb2270b8cac5254f9e99b6210c6c10224a1579cf389ef88b20a1abe9"
V7_S = "129ff05af364204442bdb53ab6f18a99ab48acc9326fa689f228040429e3ca66"
V7_ADDRESS = "0xed54a7c1d8634bb589f24bb7f05a5554b36f9618"

# The vectors' keys (V2, V5) as signers for sign-in tests.
KEY_A, ADDR_A, ADDR_A_EIP55 = bytes.fromhex(V2_KEY), V2_ADDRESS.lower(), V2_ADDRESS
KEY_B, ADDR_B = bytes.fromhex(V5_KEYS[0][0]), V5_KEYS[0][1]
KEY_C, ADDR_C = bytes.fromhex(V5_KEYS[1][0]), V5_KEYS[1][1]


def addr(n: int) -> str:
    """The ``n``-th of a family of distinct, valid test addresses."""
    return "0x" + f"{n:040x}"


def new_address() -> str:
    """A random address, so tests on one long-lived relay never meet each other's state."""
    return "0x" + secrets.token_hex(20)


def eip55(address: str) -> str:
    """``address`` in EIP-55 mixed case, as the app spells its own and its contacts' addresses."""
    digits = address[2:].lower()
    digest = keccak256(digits.encode()).hex()
    return "0x" + "".join(c.upper() if int(h, 16) >= 8 else c for c, h in zip(digits, digest))


def app_address() -> str:
    """A random address spelled as the app spells it (EIP-55), with letters in both cases."""
    while True:
        spelled = eip55(new_address())
        if spelled[2:] not in (spelled[2:].lower(), spelled[2:].upper()):
            return spelled


def new_mid() -> str:
    return str(uuid.uuid4())


def backlog_bytes() -> int:
    """More than the kernel can buffer between a relay and a reader that stops reading (send buffer max + 2 MB)."""
    try:
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        wmem_max = 4 * 1024 * 1024
    return min(max(6_000_000, wmem_max + 2_000_000), 40_000_000)


def now_ms() -> int:
    return int(time.time() * 1000)


class ManualClock:
    """A relayd ``Clock`` that moves only when the test calls ``advance``.

    Pass it to a relay (``start_relay(clock=...)``) to expire challenges,
    tokens, auth deadlines, rate windows and retention without sleeping.
    The relay's housekeeping still wakes on the event loop's real timer, so
    after ``advance`` wait on the effect (a frame, a REST answer), not on time.
    """

    def __init__(self) -> None:
        self._wall = time.time()
        self._monotonic = time.monotonic()

    def wall(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._monotonic += seconds

    def step_wall(self, seconds: float) -> None:
        """Set the wall clock forward (or back) without time passing: what NTP's first sync does."""
        self._wall += seconds


class FakeConnection:
    """A connection for protocol unit tests: its ``session`` records the frames (and parcels) pushed to it;
    ``accept`` limits how many it takes before it stops reading."""

    _ids = iter(range(1, 10_000))

    def __init__(self, accept: int | None = None) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closes: list[tuple[int, str]] = []
        self.accept = accept
        self.session = Session(next(self._ids), "127.0.0.1", 0.0, self)
        self.parcels: list[Any] = []

    closing = False

    def hold(self, delta: int) -> None:
        pass

    def push(self, data: str, parcel: Any = None) -> bool:
        if self.accept is not None:
            if self.accept <= 0:
                return False
            self.accept -= 1
        self.frames.append(json.loads(data))
        self.parcels.append(parcel)
        return True

    def close_soon(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def congested(self) -> None:
        return None

    def take(self) -> list[dict[str, Any]]:
        out, self.frames = self.frames, []
        return out


class LandsUnconfirmed(MemoryStore):
    """A memory store whose next ``unconfirmed`` message writes land but are not confirmed in time (a hung link's
    reply): ``StorageOutcomeUnknown`` after the write."""

    def __init__(self) -> None:
        super().__init__()
        self.unconfirmed = 0

    def _unconfirmed(self) -> None:
        if self.unconfirmed:
            self.unconfirmed -= 1
            raise StorageOutcomeUnknown("no reply in time")

    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> EnqueueResult:
        result = await super().enqueue(msg, limits)
        self._unconfirmed()
        return result

    async def enqueue_many(self, messages: list[QueuedMessage], limits: QueueLimits) -> list[EnqueueResult]:
        results = await super().enqueue_many(messages, limits)
        self._unconfirmed()
        return results


# A hostile relay, for the client

ESCAPES = "\x1b[2J\x1b]0;pwned\x07\x9b31m\u202e"


def _ws_frame_head(length: int) -> bytes:
    """The head of one unmasked text frame of ``length`` bytes (server to client)."""
    if length < 126:
        return bytes([0x81, length])
    if length < 1 << 16:
        return bytes([0x81, 126]) + length.to_bytes(2, "big")
    return bytes([0x81, 127]) + length.to_bytes(8, "big")


class HostileRelay:
    """Serves one hostile ``scenario`` to every connection: trickle, huge, long_error, escapes, nested.

    ``url`` is its ws:// URL; REST calls get the HTTP side of the scenario, WebSocket upgrades the frame side.
    """

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.sent = 0  # bytes of huge payloads written, to show the client stopped reading early
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(scaled(10)), "the hostile relay did not start"
        self.url = f"ws://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        async def shut() -> None:
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(scaled(10))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(scaled(10))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            key = re.search(r"(?im)^sec-websocket-key:\s*(\S+)", head)
            if key:
                accept = base64.b64encode(hashlib.sha1((key.group(1) + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")
                                                       .encode()).digest()).decode()
                writer.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
                await getattr(self, f"_ws_{self.scenario}")(writer)
            else:
                await getattr(self, f"_http_{self.scenario}")(writer)
            await reader.read()  # until the client goes away
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()

    async def _trickle(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        for i in range(len(data)):
            writer.write(data[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0.05)

    async def _flood(self, writer: asyncio.StreamWriter, total: int) -> None:
        chunk = b"[" + b"0," * ((1 << 20) // 2)
        while self.sent < total:
            writer.write(chunk)
            await writer.drain()
            self.sent += len(chunk)

    @staticmethod
    def _http(writer: asyncio.StreamWriter, status: str, body: bytes) -> None:
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)

    async def _http_trickle(self, writer: asyncio.StreamWriter) -> None:
        await self._trickle(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b" " * 100000)

    async def _ws_trickle(self, writer: asyncio.StreamWriter) -> None:
        frame = json.dumps({"type": "auth_success", "padding": " " * 1000}).encode()
        await self._trickle(writer, _ws_frame_head(len(frame)) + frame)

    async def _http_huge(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
        await self._flood(writer, 700 << 20)  # no Content-Length: read until the connection closes

    async def _ws_huge(self, writer: asyncio.StreamWriter) -> None:
        writer.write(_ws_frame_head(700 << 20))
        await self._flood(writer, 700 << 20)

    async def _http_long_error(self, writer: asyncio.StreamWriter) -> None:
        self._http(writer, "500 Internal Server Error", json.dumps({"code": "x", "error": "e" * (3 << 20)}).encode())

    async def _ws_long_error(self, writer: asyncio.StreamWriter) -> None:
        frame = json.dumps({"type": "error", "code": "auth_failed", "message": "m" * (3 << 20)}).encode()
        writer.write(_ws_frame_head(len(frame)) + frame)

    async def _http_escapes(self, writer: asyncio.StreamWriter) -> None:
        self._http(writer, "500 Internal Server Error", ESCAPES.encode())

    async def _ws_escapes(self, writer: asyncio.StreamWriter) -> None:
        frame = json.dumps({"type": "error", "code": "auth_failed\x1b[31m", "message": ESCAPES}).encode()
        writer.write(_ws_frame_head(len(frame)) + frame)

    async def _http_nested(self, writer: asyncio.StreamWriter) -> None:
        self._http(writer, "200 OK", b"[" * 100000 + b"]" * 100000)

    async def _ws_nested(self, writer: asyncio.StreamWriter) -> None:
        frame = b'{"type":' + b"[" * 100000 + b"]" * 100000 + b"}"
        writer.write(_ws_frame_head(len(frame)) + frame)


# Configuration and processes


def make_config(**sections: dict[str, Any]) -> Config:
    """``make_config(server={"auth_timeout_s": "1"})``: defaults plus overrides, memory storage, 127.0.0.1:0."""
    # A session that has not sent a frame gets its backlog after [queue] flush_delay_ms (the app listens late);
    # tests that are not about that hold start with it off, so a fresh session takes its backlog at once.
    # RELAYD_TEST_EVENT_LOOP=uvloop runs every in-process relay on uvloop (ThreadRelay reads the key).
    overrides = [("storage", "backend", "memory"), ("server", "host", "127.0.0.1"), ("server", "port", "0"),
                 ("queue", "flush_delay_ms", "0"),
                 ("server", "event_loop", os.environ.get("RELAYD_TEST_EVENT_LOOP", "asyncio"))]
    for section, values in sections.items():
        overrides += [(section, k, str(v)) for k, v in values.items()]
    return load_config(None, environ={}, overrides=overrides)


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2+


def client_socket(source: str) -> socket.socket:
    """A TCP socket bound to the loopback address ``source`` (another client IP), its port chosen at connect.

    A plain ``bind((source, 0))`` searches for a free port at bind time,
    which takes milliseconds once thousands of sockets exist.
    """
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source, 0))
    return sock


def _port_block() -> tuple[int, int]:
    """This pytest worker's share of the ports outside the kernel's ephemeral range (size 0: there is no room).

    A port taken from the ephemeral range can be handed to some client's
    outgoing connection before the relay binds it ("address already in use";
    CI saw it once in 1,753 tests). No connect picks a port outside the range,
    and each xdist worker draws from its own block, so only a listener that
    is still open can hold a port we pick, and ``free_port`` checks for that.
    """
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2])
    except (OSError, ValueError):
        low, high = 32768, 60999
    first, last = max((PORT_FLOOR, low - 1), (high + 1, 65535), key=lambda r: r[1] - r[0])
    size = (last - first) // PORT_BLOCKS
    if size < MIN_BLOCK:
        return 0, 0
    worker = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    return first + (int(worker.group(1)) % PORT_BLOCKS if worker else PORT_BLOCKS - 1) * size, size


PORT_FLOOR = 12000  # below: registered services a developer may be running
PORT_BLOCKS = 16    # enough for -n 15 plus a run without xdist
MIN_BLOCK = 256
_port_lock = threading.Lock()
_port_start, _port_size = _port_block()
_port_next = itertools.count(secrets.randbelow(max(1, _port_size)))  # another session here starts elsewhere


def free_port() -> int:
    """A port free on every interface, so a relay may bind it on 127.0.0.1 or on 0.0.0.0."""
    with _port_lock:
        for _ in range(_port_size):
            port = _port_start + next(_port_next) % _port_size
            with socket.socket() as s:
                try:
                    s.bind(("0.0.0.0", port))
                except OSError:
                    continue
            return port
    with socket.socket() as s:  # no room outside the ephemeral range, or all of this worker's block taken
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


# Variables a child relayd must not inherit from the test's environment.
LEGACY_ENV = ("PORT", "ALLOWED_ORIGINS", "RATE_LIMIT_WINDOW_MS", "RATE_LIMIT_MAX_REQUESTS", "MAX_OFFLINE_MESSAGES",
              "MESSAGE_RETENTION_HOURS", "LOG_LEVEL")
SERVICE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without relayd's, the legacy and the systemd variables, plus ``extra``."""
    dropped = set(LEGACY_ENV) | set(SERVICE_ENV)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_") and k not in dropped}
    env.update(extra)
    return env


BLOCK_MODULES = '''
import importlib.abc, sys

class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {names!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Blocked())
'''


def without_modules(tmp: Path, *names: str) -> dict[str, str]:
    """Environment for a child Python in which ``names`` (and their submodules) cannot be imported, as on a
    machine without that optional extra."""
    blocker = tmp / "blocked-modules"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCK_MODULES.format(names=set(names)))
    return {"PYTHONPATH": str(blocker)}


def run_cli(cwd: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """``python relayd.py ARGS`` in ``cwd`` with a clean environment; returns the finished process."""
    return subprocess.run([sys.executable, str(ROOT / "relayd.py"), *args], cwd=cwd,
                          env=env if env is not None else clean_env(), capture_output=True, text=True,
                          encoding="utf-8", timeout=scaled(timeout))


def cli_ok(cwd: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """``run_cli`` that must exit 0 (the failure shows its output)."""
    result = run_cli(cwd, *args, **kwargs)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


# TLS


def client_context(cert: Path) -> ssl.SSLContext:
    """A client TLS context trusting only ``cert``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(cert))
    return ctx


# HTTP


class HttpReply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<HttpReply {self.status} {self.body[:200]!r}>"


def http_request(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                 raw_body: bytes | None = None, timeout: float = 5, source: str | None = None) -> HttpReply:
    """One request with http.client; ``body`` is sent as JSON, ``raw_body`` as is. Header names come back lower-case.
    ``source``: the loopback address to send from (another client IP)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=scaled(timeout),
                                      source_address=(source, 0) if source else None)
    hdrs = {"Connection": "close", **(headers or {})}  # one request per connection unless a test asks
    data = raw_body
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        return HttpReply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload)
    finally:
        conn.close()


class RawReply:
    """An HTTP response read off a raw socket; ``headers`` keeps the last of a repeated name."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head, sep, self.body = raw.partition(b"\r\n\r\n")
        assert sep, f"no complete HTTP response head in {raw[:300]!r}"
        lines = head.decode("iso-8859-1").split("\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split(" ", 2)[1])
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<RawReply {self.raw[:300]!r}>"


def raw_http(port: int, data: bytes, *, timeout: float = 5, chunks: list[bytes] | None = None) -> RawReply:
    """Send ``data`` (then each of ``chunks`` as its own write) on a fresh socket; read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(timeout)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(data)
        for part in chunks or ():
            # Not an ordering of events but the traffic under test: a client whose request trickles in,
            # so the relay most likely reads each part on its own.
            time.sleep(0.01)
            s.sendall(part)
        out = b""
        while block := s.recv(65536):
            out += block
    return RawReply(out)


def http_head(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
              *, length: bool = True) -> bytes:
    """A request as bytes: request line, Host, ``headers``, Content-Length of ``body`` unless ``length`` is off."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    headers = dict(headers or {})
    if not any(k.lower() == "connection" for k in headers):
        headers["Connection"] = "close"  # one request per connection unless a test asks for keep-alive
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if length and body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(body: bytes, sizes: tuple[int, ...] = (7, 5)) -> bytes:
    """``body`` with Transfer-Encoding: chunked, in pieces of ``sizes`` (the rest last, with a chunk extension)."""
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


# WebSocket clients


class WsClient:
    """A blocking WebSocket client (websockets' sync client) that speaks JSON frames."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self._cm = ws_connect(url, compression=None, open_timeout=scaled(5), **kwargs)
        self.ws = self._cm.__enter__()

    def send(self, frame: Any) -> None:
        self.ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    def recv(self, timeout: float = 3) -> dict[str, Any]:
        return json.loads(self.ws.recv(timeout=scaled(timeout)))

    def recv_type(self, ftype: str, timeout: float = 3) -> dict[str, Any]:
        """Skip frames of other types until one of ``ftype`` arrives."""
        deadline = time.monotonic() + scaled(timeout)
        while True:
            frame = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if frame.get("type") == ftype:
                return frame

    def auth(self, address: str, **extra: Any) -> dict[str, Any]:
        """Send an unsigned ``auth``; return ``auth_success``, which must be the next frame after any challenge."""
        self.send({"type": "auth", "address": address, **extra})
        frame = self.recv()
        if frame.get("type") == "challenge":
            frame = self.recv()
        assert frame.get("type") == "auth_success", frame
        return frame

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def __enter__(self) -> "WsClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def frames_until_pong(ws: WsClient, timeout: float = 3) -> list[dict[str, Any]]:
    """Send a ``ping``; return every frame that arrives before its ``pong`` (checked exactly).

    Frames on one connection are handled in order, so the pong proves every
    frame sent before it was handled (and its answers sent).
    """
    ws.send({"type": "ping"})
    frames = []
    while (frame := ws.recv(timeout))["type"] != "pong":
        frames.append(frame)
    assert set(frame) == {"type", "timestamp"}, frame
    assert_ms(frame["timestamp"])
    return frames


def pong_next(ws: WsClient) -> None:
    """Barrier: nothing but the pong follows a ping (so nothing else was pending on the connection)."""
    assert frames_until_pong(ws) == []


def received_once(relay: Any, address: str, queued: set[str], unknown: set[str], timeout: float = 15,
                  done: Callable[[], bool] = lambda: True) -> list[str]:
    """Sign ``address`` in on a fresh session and read until every messageId answered ``queued`` arrived (and
    ``done``): each arrives once, and nothing arrives that was not answered ``queued`` or ``storage_timeout``
    (``unknown``: it may have been stored). Returns the messageIds in arrival order. ``timeout`` is unscaled."""
    with relay.ws() as receiver:
        receiver.auth(address)
        got: list[str] = []

        def everything_arrived() -> bool:
            got.extend(f["messageId"] for f in frames_until_pong(receiver) if f["type"] == "message")
            return queued <= set(got) and done()
        wait_until(everything_arrived, "every queued message delivered", timeout=scaled(timeout))
        pong_next(receiver)
    assert len(got) == len(set(got)), "delivered once"
    assert set(got) <= queued | unknown, sorted(set(got) - queued - unknown)
    return got


def read_backlog(ws: WsClient, timeout: float = 15) -> list[dict[str, Any]]:
    """An ack-mode session's stored messages, up to ``queue_empty`` (exactly); anything else fails."""
    deadline = time.monotonic() + scaled(timeout)
    frames = []
    while True:
        frame = json.loads(ws.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        if frame["type"] == "queue_empty":
            assert set(frame) == {"type"}, frame
            return frames
        assert frame["type"] == "message", frame
        frames.append(frame)


def connect(relay: Any, address: str, **extra: Any) -> WsClient:
    """An open, unsigned session of ``address`` (``extra`` goes into the auth frame, e.g. ``ack=True``)."""
    ws = relay.ws()
    try:
        assert_auth_success(ws.auth(address, **extra), address)
    except BaseException:
        ws.close()
        raise
    return ws


def read_until_closed(ws: WsClient, timeout: float = 5) -> tuple[Close | None, list[dict[str, Any]]]:
    """Read until the server closes; return its Close frame (None: dropped without one) and the frames read."""
    frames = []
    deadline = time.monotonic() + scaled(timeout)
    try:
        while True:
            frames.append(json.loads(ws.ws.recv(timeout=max(0.01, deadline - time.monotonic()))))
    except ConnectionClosed as exc:
        return exc.rcvd, frames
    except TimeoutError:
        raise AssertionError(f"the connection was not closed within {scaled(timeout):g} s; got {frames[-5:]}") \
            from None


def assert_closed_with(ws: WsClient, code: int, timeout: float = 5) -> list[dict[str, Any]]:
    """The server closes ``ws`` with ``code``; returns the frames read before the close."""
    close, frames = read_until_closed(ws, timeout)
    assert close is not None, f"connection dropped without a close frame; frames: {frames}"
    assert close.code == code, f"close code {close.code} ({close.reason}), expected {code}; frames: {frames}"
    return frames


def unauthenticated_probe(relay: Any) -> WsClient:
    """A connection that never signs in; its first answer proves the relay holds its session and auth deadline."""
    probe = relay.ws()
    probe.send({"type": "ping", "messageId": "probe"})
    frame = probe.recv()
    if frame.get("type") == "challenge":
        frame = probe.recv()
    assert_error(frame, "not_authenticated", "probe")
    return probe


def assert_auth_timed_out(client: WsClient) -> None:
    """The next frame is the ``auth_timeout`` error, then the relay closes with 1008."""
    assert_error(client.recv(), "auth_timeout")
    assert assert_closed_with(client, 1008) == []


def assert_exchange(sender: WsClient, receiver: WsClient, to: str, mid: str, content: str = "still here") -> None:
    """The pair still talks: ``sender``'s message to ``to`` is answered ``delivered`` and reaches ``receiver``."""
    sender.send(msg(to, mid, content))
    status_frame(sender.recv(), "delivered", mid, to)
    got = receiver.recv()
    assert (got["type"], got["messageId"], got["content"], got["queued"]) == ("message", mid, content, False), got


class RawWs:
    """A client-side WebSocket on a plain socket, for peers that misbehave on purpose.

    It reads only when told to and never answers pings, so it models a dead,
    frozen or slow peer. Frames are written with ``websockets.frames.Frame``
    and parsed with ``Frame.parse``; the handshake answer with
    ``websockets.http11.Response.parse``. ``status`` is the handshake's HTTP
    status (101 when it upgraded). EOF or a reset raises ConnectionError;
    ``recv_json`` raises it on a close frame too.
    """

    def __init__(self, port: int, *, headers: dict[str, str] | None = None, timeout: float = 5,
                 rcvbuf: int | None = None, source: str | None = None) -> None:
        # another loopback address: another client IP
        self.sock = client_socket(source) if source is not None else socket.socket()
        if rcvbuf is not None:  # a small window makes a slow reader with little data
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(scaled(timeout))
        self.sock.connect(("127.0.0.1", port))
        self.reader = StreamReader()
        key = generate_key()
        lines = ["GET / HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        reader = self.reader
        self.response: Response = self._drive(Response.parse(reader.read_line, reader.read_exact, reader.read_to_eof))
        self.status = self.response.status_code
        if self.status == 101:
            assert self.response.headers["Sec-WebSocket-Accept"] == accept_key(key), self.response.headers

    def _drive(self, parser: Any) -> Any:
        """Run a websockets sans-I/O parser, feeding it from the socket until it returns."""
        while True:
            try:
                next(parser)
            except StopIteration as done:
                return done.value
            except EOFError as exc:
                raise ConnectionError(f"server closed the TCP connection: {exc}") from None
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError as exc:
                raise ConnectionError("connection reset by the server") from exc
            if data:
                self.reader.feed_data(data)
            else:
                self.reader.feed_eof()

    def send_frame(self, opcode: Opcode, payload: bytes) -> None:
        self.sock.sendall(Frame(opcode, payload).serialize(mask=True, extensions=[]))

    def send_json(self, frame: Any) -> None:
        self.send_frame(Opcode.TEXT, json.dumps(frame).encode())

    def recv_frame(self, timeout: float = 5) -> Frame:
        """The next frame, control frames included; nothing is answered automatically."""
        self.sock.settimeout(scaled(timeout))
        return self._drive(Frame.parse(self.reader.read_exact, mask=False))

    def recv_json(self, timeout: float = 5) -> Any:
        """The next data frame, decoded; control frames are skipped, a close frame raises ConnectionError."""
        while True:
            frame = self.recv_frame(timeout)
            if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                return json.loads(frame.data)
            if frame.opcode is Opcode.CLOSE:
                raise ConnectionError(f"close frame {Close.parse(frame.data)}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawWs":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# Real relays


class _Endpoints:
    port: int
    url: str

    def http(self, method: str, path: str, body: Any = None, **kw: Any) -> HttpReply:
        return http_request(self.port, method, path, body, **kw)

    def ws(self, **kwargs: Any) -> WsClient:
        return WsClient(self.url, **kwargs)


class ThreadRelay(_Endpoints):
    """A RelayServer on its own event loop in a daemon thread (start with the ``start_relay`` fixture)."""

    def __init__(self, config: Config, store: Store | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.loop = new_loop(config.server.event_loop)
        self.server = RelayServer(config, store, clock)
        started = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self.server.start())
            except BaseException as exc:  # surfaced to the test
                self.error = exc
                started.set()
                return
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(scaled(10)), "the relay thread did not start"
        if self.error:
            raise self.error
        self.port = self.server.port
        self.url = f"ws://127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = 10) -> Any:
        """Run ``coro`` on the relay's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(scaled(timeout))

    def stop(self) -> None:
        if self.loop.is_running():
            self.call(self.server.stop(), timeout=15)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(scaled(10))


def start_open(start_relay: Callable[..., ThreadRelay], **sections: Any) -> ThreadRelay:
    """``start_relay`` in ``[auth] mode = open`` plus the given sections (and ``store``/``clock``)."""
    auth = {"mode": "open", **sections.pop("auth", {})}
    return start_relay(auth=auth, **sections)


class ProcessRelay(_Endpoints):
    """``python relayd.py --config tmp/relayd.conf`` as a child process, for signals, crashes and restarts.

    The config file is (re)written when ``config_text`` is given or none
    exists yet, so a restart on the same ``tmp`` keeps it. stdout and stderr
    go to a log file (``log()``). ``journal_stream=True`` sets JOURNAL_STREAM
    to that log file's device:inode, as systemd does; a string sets it as is.
    ``defaults=True`` runs on relayd's own defaults, without the suite's
    ``flush_delay_ms = 0``.
    """

    def __init__(self, tmp: Path, *, config_text: str = "", env: dict[str, str] | None = None,
                 args: tuple[str, ...] = (), port: int | None = None, wait: bool = True,
                 journal_stream: bool | str = False, nofile: int | None = None, defaults: bool = False) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.config_path = tmp / "relayd.conf"
        if not self.config_path.exists() or config_text:
            self.config_path.write_text(config_text)
        self.log_path = tmp / f"relayd-{self.port}-{time.monotonic_ns()}.log"
        self.log_file = open(self.log_path, "w")
        full_env = clean_env(RELAYD_SERVER_HOST="127.0.0.1", RELAYD_SERVER_PORT=str(self.port), PYTHONUNBUFFERED="1")
        if not defaults:
            full_env["RELAYD_QUEUE_FLUSH_DELAY_MS"] = "0"  # see make_config
        if journal_stream:
            st = os.fstat(self.log_file.fileno())
            full_env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}" if journal_stream is True else journal_stream
        full_env.update(env or {})
        def limit_descriptors() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "relayd.py"), "--config", str(self.config_path),
                                      *args], cwd=tmp, env=full_env, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     preexec_fn=limit_descriptors)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 15) -> None:
        """Until this child logged that it listens and answers /health/live (not another run's relay on the port)."""
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"relayd exited with {self.proc.returncode}:\n{self.log()}")
            if "relayd listening" not in self.log():
                return False
            try:
                return http_request(self.port, "GET", "/health/live", timeout=1).status == 200
            except OSError:
                return False
        wait_until(up, f"relayd to start; its log:\n{self.log()}", timeout)

    def log(self) -> str:
        """The child's output so far (also after ``stop()``)."""
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text()

    def wait_log(self, needle: str, count: int = 1, timeout: float = 5) -> str:
        """Until ``needle`` appears ``count`` times in the log; returns the log."""
        return wait_until(lambda: (log := self.log()).count(needle) >= count and log,
                          f"{count}x {needle!r} in the log", timeout)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def rss(self) -> int:
        """The child's resident memory in bytes (VmRSS)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def descriptors(self) -> int:
        """How many file descriptors the child has open."""
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(scaled(10))

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM (SIGKILL after ``timeout``); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(scaled(timeout))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(scaled(5))
        self.log_file.close()
        return self.proc.returncode


def cluster_env(url: str, prefix: str, node_id: str, *, redis_cluster: bool = False,
                **extra: str) -> dict[str, str]:
    """The environment of one relayd instance among several on the Redis at ``url`` (keys under ``prefix``):
    a short heartbeat (0.2 s) and presence TTL (1 s) so a dead instance goes offline quickly, plus ``extra``."""
    env = {"RELAYD_STORAGE_BACKEND": "redis", "RELAYD_REDIS_URL": url, "RELAYD_REDIS_KEY_PREFIX": prefix,
           "RELAYD_CLUSTER_NODE_ID": node_id, "RELAYD_CLUSTER_HEARTBEAT_S": "0.2",
           "RELAYD_CLUSTER_PRESENCE_TTL_S": "1", "RELAYD_REDIS_SOCKET_TIMEOUT_S": "1"}
    if redis_cluster:
        env["RELAYD_REDIS_CLUSTER"] = "true"
    return {**env, **extra}


def pg_cluster_env(url: str, node_id: str, **extra: str) -> dict[str, str]:
    """``cluster_env`` for an instance among several on the PostgreSQL database at ``url``."""
    env = {"RELAYD_STORAGE_BACKEND": "postgres", "RELAYD_POSTGRES_URL": url, "RELAYD_POSTGRES_CLUSTER": "true",
           "RELAYD_CLUSTER_NODE_ID": node_id, "RELAYD_CLUSTER_HEARTBEAT_S": "0.2",
           "RELAYD_CLUSTER_PRESENCE_TTL_S": "1", "RELAYD_POSTGRES_CONNECT_TIMEOUT_S": "1",
           "RELAYD_POSTGRES_COMMAND_TIMEOUT_S": "2"}
    return {**env, **extra}


class SealedDatabase(str):
    """A PostgreSQL database URL for ``relay_cluster`` whose instances run with encryption at rest: ``env`` names
    the key file."""

    env: dict[str, str]

    def __new__(cls, url: str, key_file: str) -> SealedDatabase:
        made = super().__new__(cls, url)
        made.env = {"RELAYD_STORAGE_ENCRYPTION_KEY_FILE": key_file}
        return made


class SealedRedis:
    """A Redis server for ``relay_cluster`` whose instances run with encryption at rest: ``env`` names the key
    file; everything else is the server's."""

    def __init__(self, server: Any, key_file: str) -> None:
        self.server = server
        self.env = {"RELAYD_STORAGE_ENCRYPTION_KEY_FILE": key_file}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)


async def present_and_forgotten(plane: Any, dump: Callable[[], Awaitable[str]]) -> list[str]:
    """Drive a sealed backplane's presence as the cluster does: two addresses join on instance i1, i2 watches one;
    ``dump`` (what the server holds, as text) must name neither; the online list, then forgetting the dead i1,
    give both back with their watchers. Returns the three addresses used (the third never joined)."""
    alice, bob, carol = new_address(), new_address(), new_address()
    await plane.join(alice, "i1", "p", 60_000)
    await plane.join(bob, "i1", "a", 60_000)
    assert await plane.lookup(alice, "i2", 60_000) == {"i1": "p"}  # i2 now watches alice
    assert await plane.presence_of([bob, alice, carol]) == [{"i1": "a"}, {"i1": "p"}, {}]
    assert await plane.addresses_of(["i1"]) == sorted([alice, bob])
    shown = (await dump()).lower()
    assert shown and not any(a[2:] in shown for a in (alice, bob)), "the presence shows an address in clear"
    chunks = [chunk async for chunk in plane.forget("i1", 1)]  # i1 is dead: one address at a time
    assert sorted(a for part, _ in chunks for a in part) == sorted([alice, bob])
    assert {part[0]: watchers for part, watchers in chunks} == {alice: ["i1", "i2"], bob: ["i1"]}
    assert await plane.presence_of([alice, bob]) == [{}, {}]
    return [alice, bob, carol]


def storage_key(tmp: Path, name: str = "storage.key") -> str:
    """A new storage key file (32 random bytes, mode 0600) in ``tmp``, with a key id none of the other key files
    there has: a key id is one byte, so two random keys share one once in 256 pairs, which relayd refuses (a test
    of rotation would then fail by chance)."""
    from relayd.storage.sealing import generate_key_file, load_keys

    def ident(path: Path) -> int:
        return load_keys([str(path)])[0].ident
    taken = {ident(other) for other in tmp.glob("*.key") if other.name != name}
    path = tmp / name
    while True:
        generate_key_file(str(path))
        if ident(path) not in taken:
            return str(path)
        path.unlink()


class ProcessRelays:
    """Starts ``ProcessRelay``s (``process_relays(tmp, **kwargs)``) and stops every one in ``stop_all``."""

    def __init__(self) -> None:
        self.started: list[ProcessRelay] = []

    def __call__(self, tmp: Path, **kwargs: Any) -> ProcessRelay:
        relay = ProcessRelay(tmp, **kwargs)
        self.started.append(relay)
        return relay

    def restart(self, tmp: Path, relay: ProcessRelay, *, kill: bool, **kwargs: Any) -> ProcessRelay:
        """Stop ``relay`` (SIGKILL or SIGTERM, which must exit 0) and start a new one on the same data and port."""
        if relay.proc.poll() is not None:
            pass  # already dead (killed by the test)
        elif kill:
            relay.kill9()
            assert relay.proc.returncode == -9
        else:
            assert relay.stop() == 0, relay.log()
        return self(tmp, port=relay.port, **kwargs)

    def stop_all(self) -> None:
        for relay in self.started:
            relay.stop(timeout=5)


# Frames and shape checks


# auth_success may carry relayd's sign-in extension fields; an unsigned auth reports verified: false and nothing else.
UNSIGNED_AUTH_EXTRAS = ({}, {"verified": False})


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


def assert_answered(ws: WsClient, frame: dict[str, Any], answer: str) -> None:
    """Send a ``message`` frame; the next frame is its ``answer`` (delivered/queued), checked exactly."""
    ws.send(frame)
    status_frame(ws.recv(), answer, frame["messageId"], frame["to"])


def assert_error(frame: dict[str, Any], code: str, mid: Any = None) -> None:
    """``{"type":"error","code":code,"message":<str>[,"messageId":mid]}`` exactly."""
    expected_keys = {"type", "code", "message"} | ({"messageId"} if mid is not None else set())
    assert set(frame) == expected_keys, frame
    assert frame["type"] == "error" and frame["code"] == code, frame
    assert isinstance(frame["message"], str) and frame["message"], frame
    if mid is not None:
        assert frame["messageId"] == mid, frame


def assert_read(frame: dict[str, Any], reader: str, mid: str) -> None:
    """A ``read`` receipt from ``reader`` for ``mid``, exactly."""
    assert set(frame) == {"type", "from", "messageId", "timestamp"}, frame
    assert (frame["type"], frame["from"], frame["messageId"]) == ("read", reader, mid), frame
    assert_ms(frame["timestamp"])


def message_frame(frm: str, content: str, mid: str, timestamp: int, queued: bool) -> dict[str, Any]:
    """The ``message`` frame a recipient gets."""
    return {"type": "message", "from": frm, "content": content, "messageId": mid, "timestamp": timestamp,
            "queued": queued}


def msg(to: str, mid: str, content: str = "Y2lwaGVydGV4dA==", **extra: Any) -> dict[str, Any]:
    """The ``message`` frame a sender sends (``extra``: e.g. ``timestamp``)."""
    return {"type": "message", "to": to, "content": content, "messageId": mid, **extra}


def ids_of(frames: list[dict[str, Any]]) -> list[str]:
    return [f["messageId"] for f in frames]


# REST checks

JSON = "application/json"


def assert_refused(reply: Any, status: int, code: str) -> dict[str, Any]:
    """An error response: ``status``, JSON ``{"error": <text>, "code": code}``, Connection: close."""
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith(JSON), reply.headers
    assert reply.headers["connection"].lower() == "close", reply.headers
    body = reply.json
    assert set(body) == {"error", "code"} and body["code"] == code, body
    assert isinstance(body["error"], str) and body["error"], body
    return body


def queue_size(relay: Any, address: str) -> int:
    """``GET /api/messages/{address}/queue-size``, its shape checked."""
    reply = relay.http("GET", f"/api/messages/{address}/queue-size")
    assert reply.status == 200, reply
    body = reply.json
    assert set(body) == {"address", "queueSize"} and body["address"] == address.lower(), body
    assert type(body["queueSize"]) is int, body
    return body["queueSize"]


def online(relay: Any, address: str) -> bool:
    """``GET /api/status/{address}``'s ``online``, its type checked."""
    reply = relay.http("GET", f"/api/status/{address}")
    assert reply.status == 200, reply
    assert type(reply.json["online"]) is bool, reply
    return reply.json["online"]


def connections(relay: Any) -> int:
    """Authenticated sessions, as ``GET /health`` counts them."""
    return relay.http("GET", "/health").json["connections"]


def make_cert(directory: Path, name: str, days: int = 1) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 valid for ``days`` and its key, made by the openssl CLI."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-days", str(days), "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def metric_families(text: str) -> dict[str, dict[str, Any]]:
    """A Prometheus exposition read by prometheus_client: each family as ``{"type", "help", "samples": [(name,
    labels, value)]}``, by the name relayd gives it (a counter's with the ``_total`` prometheus_client drops)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {fam.name + ("_total" if fam.type == "counter" else ""):
            {"type": fam.type, "help": fam.documentation, "samples": [(s.name, s.labels, s.value) for s in fam.samples]}
            for fam in text_string_to_metric_families(text)}


# Sign-in


def challenge_of(client: WsClient) -> dict[str, Any]:
    """The next frame, which must be the sign-in challenge."""
    frame = client.recv()
    assert frame["type"] == "challenge", frame
    return frame


def signed_login(relay: Any, key: bytes, *, fmt: str = "doubleHash", **extra: Any) -> tuple[Any, dict[str, Any]]:
    """Open a connection and sign in with ``key``; return (client, auth_success)."""
    client = relay.ws()
    ch = challenge_of(client)
    client.send({**signed_auth_frame(key, ch, fmt=fmt), **extra})
    reply = client.recv()
    assert reply["type"] == "auth_success", reply
    return client, reply


def auth_text(ch: dict[str, Any], address: str, *, relay: str | None = None, nonce: str | None = None,
              issued: int | None = None) -> str:
    """The statement a client signs for challenge ``ch``; each part may be replaced to forge a wrong one."""
    return auth_statement(relay if relay is not None else ch["relay"], address.lower(),
                          nonce if nonce is not None else ch["nonce"],
                          issued if issued is not None else ch["issuedAt"])


def signed_auth_frame(key: bytes, ch: dict[str, Any], *, address: str | None = None, fmt: str = "doubleHash",
                      **text_overrides: Any) -> dict[str, Any]:
    """A signed ``auth`` frame answering ``ch`` with ``key`` (``text_overrides``: see ``auth_text``)."""
    address = address or address_of_private(key)
    return {"type": "auth", "address": address, "nonce": ch["nonce"],
            "signature": sign_text(key, auth_text(ch, address, **text_overrides), fmt), "format": fmt}


def key_body(key: bytes, public_key: str, issued: int, *, key_type: Any = "x25519", fmt: str = "doubleHash",
             address: str | None = None, signer: bytes | None = None) -> dict[str, Any]:
    """A signed ``POST /api/public-keys`` body (``key_type=None`` leaves keyType out)."""
    address = (address or address_of_private(key)).lower()
    text = key_statement(address, key_type, public_key, issued)
    body: dict[str, Any] = {"address": address, "publicKey": public_key, "issuedAt": issued, "format": fmt,
                            "signature": sign_text(signer or key, text, fmt)}
    if key_type is not None:
        body["keyType"] = key_type
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# SQLite files


def sqlite_file(path: Path, *statements: str) -> None:
    """Run ``statements`` on the SQLite database at ``path`` (created if missing) and commit."""
    conn = sqlite3.connect(path)
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


class WriteLock:
    """Another process's write transaction on a database (``with WriteLock(db):``), as a backup tool would hold."""

    def __init__(self, db: Path) -> None:
        self.conn = sqlite3.connect(db, isolation_level=None, timeout=0)

    def __enter__(self) -> "WriteLock":
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.conn.close()


# Logs


class ErrorLog(logging.Handler):
    """Collects ERROR records (a crashed handler logs one); ``take`` returns them as text and forgets them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        out = [f"{r.name}: {r.getMessage()} {r.exc_info[1]!r}" if r.exc_info else f"{r.name}: {r.getMessage()}"
               for r in self.records]
        self.records.clear()
        return out


# systemd's notify socket


def parse_datagram(data: bytes) -> dict[str, str]:
    """One sd_notify datagram as its ``KEY=value`` fields."""
    fields = {}
    for line in data.decode().split("\n"):
        key, sep, value = line.partition("=")
        assert sep, f"malformed notify line {line!r} in {data!r}"
        fields[key] = value
    return fields


class NotifySocket:
    """The service manager's end: an AF_UNIX datagram socket; ``env_value`` is what NOTIFY_SOCKET names."""

    def __init__(self, address: str, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.env_value = env_value
        self.seen: list[dict[str, str]] = []

    def until(self, predicate: Callable[[list[dict[str, str]]], bool], what: str,
              timeout: float = 5) -> list[dict[str, str]]:
        """Datagrams received until ``predicate`` holds for all received by this call."""
        got: list[dict[str, str]] = []
        deadline = time.monotonic() + scaled(timeout)
        while not predicate(got):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {scaled(timeout):g} s; got {got} (before: {self.seen[-5:]})")
            self.sock.settimeout(remaining)
            try:
                fields = parse_datagram(self.sock.recv(4096))
            except TimeoutError:
                continue
            got.append(fields)
            self.seen.append(fields)
        return got

    def until_field(self, name: str, timeout: float = 5) -> list[dict[str, str]]:
        """Datagrams received up to and including the first one carrying ``name``."""
        return self.until(lambda got: bool(got) and name in got[-1], f"{name} notification", timeout)

    def pending(self) -> list[str]:
        """The datagrams already waiting, as text, without blocking."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return out
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


# The Idena P2P app, emulated (asyncio, so a test can run a thousand of them)

APP_RECONNECT_S = 3.0
"""The app reconnects this long after any close, forever, with no backoff."""
APP_SUBSCRIBE_DELAY_S = 0.010
"""The app subscribes to messages this long after its key upload answered (5-15 ms on a phone)."""


async def app_http(port: int, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], bytes]:
    """One REST call as the app's ``http`` package makes it: a fresh connection, closed after the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost:{port}\r\nUser-Agent: Dart/3.5 (dart:io)\r\n"
        if body is not None:
            head += f"Content-Type: application/json; charset=utf-8\r\nContent-Length: {len(data)}\r\n"
        writer.write(head.encode() + b"\r\n" + data)
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, await reader.readexactly(int(headers.get("content-length", "0")))
    finally:
        writer.close()


class App:
    """One Idena P2P app as ``../shared/real-client-notes.md`` describes it.

    ``run()`` connects to ``ws://host:port`` (no Origin, permessage-deflate
    offered), sends ``auth`` with the EIP-55 address at once and takes the
    first status frame as the answer. On its first connection it uploads a
    fresh unsigned key and subscribes ``APP_SUBSCRIBE_DELAY_S`` after the
    upload answered: messages, typing and receipts read before that are
    ``dropped``, as the app's event stream drops events nobody listens to. Each of ``listeners``
    fetches the sender's key for each message; a message whose lookup is
    refused is ``lost``, one whose lookups all succeed is in ``inbox``.
    A refused handshake is counted in ``refusals`` (its status; 0 when the
    relay closed without answering). ``APP_RECONNECT_S`` after any close it connects again, forever, until
    ``stop()``; its listeners stay subscribed.
    """

    def __init__(self, port: int, address: str, *, listeners: int = 1) -> None:
        self.port = port
        self.address = address
        self.listeners = listeners
        self.subscribed = False
        self.auths = 0
        self.refusals: list[int] = []
        self.upload_status: int | None = None
        self.inbox: list[dict[str, Any]] = []
        self.frames: list[dict[str, Any]] = []
        self.dropped: list[dict[str, Any]] = []
        self.lost: list[dict[str, Any]] = []
        self.lookups: dict[int, int] = {}
        self.ws: Any = None
        self._stopped = False
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self) -> None:
        while not self._stopped:
            try:
                async with async_connect(f"ws://127.0.0.1:{self.port}", open_timeout=scaled(10),
                                         ping_interval=None, max_size=None) as ws:
                    self.ws = ws
                    await ws.send(json.dumps({"type": "auth", "address": self.address}))
                    await self._session(ws)
            except InvalidStatus as exc:
                self.refusals.append(exc.response.status_code)
            except InvalidHandshake:
                self.refusals.append(0)  # closed without an answer
            except (OSError, ConnectionClosed, asyncio.TimeoutError):
                pass
            self.ws = None
            if not self._stopped:
                await asyncio.sleep(APP_RECONNECT_S)

    async def _session(self, ws: Any) -> None:
        answered = False
        async for raw in ws:
            frame = json.loads(raw)
            if not answered and frame.get("type") in ("auth_success", "error"):
                answered = True
                if frame["type"] == "auth_success":
                    self.auths += 1
                    if not self.subscribed:
                        self._spawn(self._init())
                continue
            if not self.subscribed:
                if frame.get("type") in ("message", "typing", "read"):
                    self.dropped.append(frame)
                continue
            self.frames.append(frame)
            if frame.get("type") == "message":
                self._spawn(self._receive(frame))

    async def _init(self) -> None:
        """Upload a fresh key (the app makes one on every start), then subscribe a moment later."""
        self.upload_status, _, _ = await app_http(self.port, "POST", "/api/public-keys", {
            "address": self.address, "publicKey": base64_key()})
        await asyncio.sleep(APP_SUBSCRIBE_DELAY_S)
        self.subscribed = True

    async def _receive(self, frame: dict[str, Any]) -> None:
        statuses = await asyncio.gather(*(self.lookup(frame["from"]) for _ in range(self.listeners)))
        (self.inbox if all(s == 200 for s in statuses) else self.lost).append(frame)

    async def lookup(self, address: str) -> int:
        """``GET /api/public-keys/<address as given>``, counted by status."""
        status, _, _ = await app_http(self.port, "GET", f"/api/public-keys/{address}")
        self.lookups[status] = self.lookups.get(status, 0) + 1
        return status

    async def send(self, to: str, content: str) -> str:
        """Look up the recipient's key as typed (a 404 aborts), then send; returns the messageId."""
        if await self.lookup(to) != 200:
            raise AssertionError(f"the app aborts the send: no key for {to}")
        mid = str(uuid.uuid4())
        await self.ws.send(json.dumps({"type": "message", "to": to, "content": content, "messageId": mid,
                                       "timestamp": now_ms()}))
        return mid

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Until every key lookup and upload started so far has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks))

    async def stop(self) -> None:
        self._stopped = True
        if self.ws is not None:
            await self.ws.close()


def base64_key() -> str:
    """A fresh X25519-sized public key as the app uploads it (base64 of 32 bytes)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


async def wait_for_state(predicate: Callable[[], T], what: str, timeout: float = 10) -> T:
    """``wait_until`` for asyncio tests: polls ``predicate`` without blocking the loop."""
    deadline = time.monotonic() + scaled(timeout)
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
    return value


# A real browser


class DevToolsPage:
    """A page in headless Chromium (Debian's ``chromium``), driven over the DevTools protocol: ``evaluate`` runs
    JavaScript in it and returns the value, so a test can watch a live page change. Close it when done."""

    def __init__(self, url: str, tmp: Path) -> None:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        assert binary, "chromium not found on PATH: install it with `apt-get install chromium` (Debian package)"
        self.log_path = tmp / "chromium.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={tmp / 'chromium-profile'}", url],
            stdout=subprocess.DEVNULL, stderr=self.log_file)
        try:
            port = wait_until(self._port, "chromium to open its DevTools port", timeout=30)
            page = wait_until(lambda: self._page(port, url), "chromium to open the page", timeout=30)
            self.ws: WsClient | None = WsClient(page["webSocketDebuggerUrl"], max_size=None)
        except BaseException:
            self.close()
            raise
        self._ids = itertools.count(1)

    def _port(self) -> int | None:
        assert self.proc.poll() is None, f"chromium exited: {self.log_path.read_text()[-2000:]}"
        found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", self.log_path.read_text())
        return int(found.group(1)) if found else None

    @staticmethod
    def _page(port: int, url: str) -> dict[str, Any] | None:
        reply = http_request(port, "GET", "/json/list")
        return next((t for t in reply.json if t.get("type") == "page" and t.get("url", "").startswith(url)), None)

    def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` (awaited when it is a promise) in the page."""
        call_id = next(self._ids)
        assert self.ws is not None
        self.ws.send({"id": call_id, "method": "Runtime.evaluate", "params": {
            "expression": expression, "returnByValue": True, "awaitPromise": True}})
        while True:
            reply = self.ws.recv(timeout=10)
            if reply.get("id") == call_id:
                result = reply["result"]
                assert "exceptionDetails" not in result, result["exceptionDetails"]
                return result["result"].get("value")

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
            self.ws = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(scaled(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(scaled(5))
        self.log_file.close()


class PipelineFlood:
    """Issue 20's CPU attack: ``connections`` threads from ``source`` each pipeline ``requests`` kept-alive
    ``GET path`` on one connection, read what comes back (answers and 429s) and start over when it closes.

    ``statuses`` counts the answers by status, ``closes`` the connections the relay ended before their last
    request was answered.
    """

    def __init__(self, port: int, source: str = "127.0.0.1", *, connections: int = 20, requests: int = 1000,
                 path: str = "/metrics") -> None:
        self.port, self.source = port, source
        self.batch = (f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n" * requests).encode()
        self.requests = requests
        self.statuses: dict[int, int] = {}
        self.closes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(connections)]

    def _run(self) -> None:
        status = re.compile(rb"HTTP/1\.1 (\d{3}) ")
        while not self._stop.is_set():
            answered = 0
            counts: dict[int, int] = {}
            try:
                with client_socket(self.source) as s:
                    s.settimeout(2)
                    s.connect(("127.0.0.1", self.port))
                    s.sendall(self.batch)
                    tail = b""
                    while not self._stop.is_set() and (block := s.recv(1 << 16)):
                        data = tail + block
                        end = 0
                        for m in status.finditer(data):
                            counts[int(m.group(1))] = counts.get(int(m.group(1)), 0) + 1
                            answered += 1
                            end = m.end()
                        tail = data[max(end, len(data) - 16):]  # a status line cut in two is counted once
            except OSError:
                pass
            with self._lock:
                for code, n in counts.items():
                    self.statuses[code] = self.statuses.get(code, 0) + n
                if answered < self.requests and not self._stop.is_set():
                    self.closes += 1

    def __enter__(self) -> "PipelineFlood":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(scaled(10))


class UnreadPipelines:
    """``connections`` sockets from ``source``, each pipelining ``requests`` ``GET path`` and never reading."""

    def __init__(self, port: int, source: str = "127.0.0.1", *, connections: int = 300, requests: int = 1000,
                 path: str = "/metrics") -> None:
        self.port, self.source, self.connections = port, source, connections
        self.batch = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * requests
        self.socks: list[socket.socket] = []
        self.statuses: dict[int, int] = {}  # never read: always empty

    def __enter__(self) -> "UnreadPipelines":
        for _ in range(self.connections):
            s = client_socket(self.source)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", self.port))
            s.setblocking(False)
            try:
                s.send(self.batch)
            except OSError:
                pass
            self.socks.append(s)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s in self.socks:
            s.close()


def live_latency(port: int, source: str, timeout: float = 10) -> float:
    """Seconds ``GET /health/live`` from ``source`` takes on a new connection (``timeout`` when unanswered)."""
    started = time.monotonic()
    try:
        with client_socket(source) as s:
            s.settimeout(timeout)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if not s.recv(64).startswith(b"HTTP/1.1 200"):
                return timeout
    except OSError:
        return timeout
    return time.monotonic() - started
