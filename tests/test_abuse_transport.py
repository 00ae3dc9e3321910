"""Issue 20's transport and REST attacks, each against a real relayd process: what one client can make the relay
spend in memory for REST answers, in CPU, per connection and in descriptors, and the bound that holds it.

Memory bounds are read from the child's VmRSS on relayd's default asyncio loop; ``loop`` is a fixture so every
test can later run on another loop as a parameter. Timing goals live in ``bench/abuse_transport.py``; here the
timings are only generous correctness limits.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from support import (
    PipelineFlood,
    ProcessRelay,
    RawWs,
    UnreadPipelines,
    http_request,
    addr,
    client_socket,
    http_head,
    live_latency,
    raw_http,
    scaled,
    wait_until,
)
from websockets.frames import Frame, Opcode

MiB = 1 << 20
CONFIG = "[auth]\nmode = open\n"
KEY = "k" * 4096  # the longest public key relayd stores
BATCH = 1000  # addresses per batch lookup: a 4.4 MB answer


@pytest.fixture(params=["asyncio"])
def loop(request: pytest.FixtureRequest) -> str:
    """The event loop the relay runs on: relayd's default asyncio loop only, for now. Every memory-bound test takes
    it, so another loop (uvloop) joins as a parameter once relayd can be told to run on it."""
    return str(request.param)


def start(request: pytest.FixtureRequest, tmp_path: Path, env: dict[str, str] | None = None) -> ProcessRelay:
    marker = request.node.get_closest_marker("config")
    return ProcessRelay(tmp_path, config_text=CONFIG + (marker.args[0] if marker else ""), env=env,
                        nofile=marker.kwargs.get("nofile") if marker else None)


@pytest.fixture
def relay(tmp_path: Path, request: pytest.FixtureRequest, loop: str) -> Iterator[ProcessRelay]:
    """A relayd process on defaults (open mode, SQLite); ``config`` marker lines and ``nofile`` from the test."""
    relay = start(request, tmp_path)
    yield relay
    relay.stop()


@pytest.fixture(params=["sqlite", "redis"])
def backend_relay(tmp_path: Path, request: pytest.FixtureRequest, loop: str) -> Iterator[ProcessRelay]:
    """``relay`` on SQLite and on Redis, for attacks whose answers come from the store."""
    env = None
    if request.param == "redis":
        env = {"RELAYD_STORAGE_BACKEND": "redis", "RELAYD_REDIS_URL": request.getfixturevalue("redis_server").url,
               "RELAYD_REDIS_KEY_PREFIX": request.getfixturevalue("redis_prefix")}
    relay = start(request, tmp_path, env)
    yield relay
    relay.stop()


def keep_alive(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> bytes:
    data = b"" if body is None else json.dumps(body).encode()
    return http_head(method, path, {"Connection": "keep-alive", **(headers or {})}, data)


def read_replies(sock: socket.socket, count: int, timeout: float = 10) -> list[bytes]:
    """The heads of the next ``count`` answers on a kept-alive socket (bodies skipped by Content-Length)."""
    sock.settimeout(scaled(timeout))
    buf, heads = b"", []
    while len(heads) < count:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(rest) >= length:
                heads.append(head)
                buf = rest[length:]
                continue
        block = sock.recv(1 << 20)
        if not block:
            break
        buf += block
    return heads


def upload_keys(relay: ProcessRelay, addresses: list[str]) -> None:
    """One kept-alive connection, pipelined: a 4 KiB key for each address."""
    with socket.create_connection(("127.0.0.1", relay.port)) as s:
        for start in range(0, len(addresses), 500):
            part = addresses[start:start + 500]
            s.sendall(b"".join(keep_alive("POST", "/api/public-keys", {"address": a, "publicKey": KEY})
                               for a in part))
            heads = read_replies(s, len(part), timeout=30)
            assert len(heads) == len(part) and all(h.startswith(b"HTTP/1.1 200") for h in heads), heads[-1:]


def never_reading(source: str = "127.0.0.1", rcvbuf: int = 4096) -> socket.socket:
    sock = client_socket(source)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    return sock


def is_cut(sock: socket.socket, timeout: float = 5) -> bool:
    """The relay closed or reset ``sock`` within ``timeout`` (reading, then, ends)."""
    sock.settimeout(scaled(timeout))
    try:
        while sock.recv(1 << 20):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


class PeakRss:
    """The relay's highest resident memory while the ``with`` block runs (sampled every 10 ms)."""

    def __init__(self, relay: ProcessRelay) -> None:
        self.relay = relay
        self.value = relay.rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.01):
            try:
                self.value = max(self.value, self.relay.rss())
            except (OSError, StopIteration):
                return

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()


# 1. REST answers nobody reads


def batch_lookup(addresses: list[str]) -> bytes:
    return keep_alive("POST", "/api/public-keys/batch", {"addresses": addresses})


READS = "[limits]\nrate_limit_max_reads = 1000000\n"  # the attacks below read more than one IP may per minute


def answered_or_cut(sock: socket.socket) -> bool:
    """The relay began writing its answer to ``sock`` (bytes wait in it) or closed it."""
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK)) or True
    except BlockingIOError:
        return False
    except OSError:
        return True


def unread_lookups(relay: ProcessRelay, addresses: list[str], count: int = 28) -> list[socket.socket]:
    """``count`` kept-alive connections that each ask for a batch of keys and never read the answer."""
    socks = []
    for _ in range(count):
        s = never_reading()
        s.connect(("127.0.0.1", relay.port))
        s.sendall(batch_lookup(addresses))
        socks.append(s)
    wait_until(lambda: all(answered_or_cut(s) for s in socks), "every lookup to be answered", timeout=20)
    return socks


@pytest.mark.config(READS + "max_buffered_bytes_per_ip = 8388608\n")
def test_unread_rest_answers_count_against_the_per_ip_buffer_budget(backend_relay) -> None:
    """28 kept-alive connections each ask for a 4.4 MB batch of keys and never read (+156 MiB before): the
    answers' unsent bytes are charged to the IP's buffer budget (8 MiB here), so the connections holding the most
    are cut and memory stays bounded."""
    relay = backend_relay
    addresses = [addr(i) for i in range(BATCH)]
    upload_keys(relay, addresses)
    relay.http("POST", "/api/public-keys/batch", {"addresses": addresses})  # warm the caches
    before = relay.rss()
    with PeakRss(relay) as peak:
        socks = unread_lookups(relay, addresses)
    try:
        # The 8 MiB budget, plus at most 4 answers of one IP being built (each up to about 10 MB while its 4.4 MB
        # of JSON text and the bytes written coexist), plus allocator slack; unbounded, it was +156 MiB. (48 MiB
        # was exceeded by 3 MiB in 1 run of 4 on Redis under a loaded machine.)
        assert peak.value - before < 56 * MiB, f"28 unread answers grew RSS by {(peak.value - before) >> 20} MiB"
        cut = sum(is_cut(s, timeout=0.1) for s in socks)
        assert cut >= 1, "no connection was cut past the IP's 8 MiB budget"
        assert "rate_limit_hits_total{limit=\"buffered_per_ip\"}" in relay.http("GET", "/metrics").body.decode()
    finally:
        for s in socks:
            s.close()
    assert relay.http("GET", "/health/live").status == 200


@pytest.mark.config("[server]\nstall_timeout_s = 2\nhttp_idle_timeout_s = 600\n[log]\nlevel = debug\n")
def test_a_rest_connection_whose_reader_stalls_is_cut(relay) -> None:
    """A kept-alive answer its reader takes none of is cut after stall_timeout_s (it was held for ever)."""
    addresses = [addr(i) for i in range(BATCH)]
    upload_keys(relay, addresses)
    s = never_reading()
    s.connect(("127.0.0.1", relay.port))
    try:
        s.sendall(batch_lookup(addresses))
        relay.wait_log("took none of its answers for 2 s", timeout=10)
        assert is_cut(s)
    finally:
        s.close()


@pytest.mark.config(READS)
def test_memory_returns_after_unread_kept_alive_answers_close(backend_relay) -> None:
    """Four rounds of 28 never-reading kept-alive lookups, each closed by the client: memory comes back after
    every round instead of growing (it grew 157, 273, 389, 476 MiB)."""
    relay = backend_relay
    addresses = [addr(i) for i in range(BATCH)]
    upload_keys(relay, addresses)
    relay.http("POST", "/api/public-keys/batch", {"addresses": addresses})
    before = relay.rss()
    for round_ in range(4):
        socks = unread_lookups(relay, addresses)
        for s in socks:
            s.close()
        wait_until(lambda: relay.rss() - before < 24 * MiB,
                   f"memory to come back after round {round_ + 1} (it stays "
                   f"{(relay.rss() - before) >> 20} MiB up)", timeout=30)


# 2. CPU fairness


def test_another_ip_is_served_while_one_ip_pipelines_metrics_on_20_connections(relay) -> None:
    """One IP pipelines ``GET /metrics`` on 20 connections (another IP's /health/live took 5.4-7.2 s): answers
    take turns with other connections, probes have a budget of their own, and a connection that keeps getting 429
    is closed. The 1 s goal is measured in bench/abuse_transport.py; here a generous limit."""
    with PipelineFlood(relay.port, "127.0.0.1", connections=20, requests=1000) as flood:
        wait_until(lambda: sum(flood.statuses.values()) > 500, "the flood to be answered", timeout=10)
        latencies = [live_latency(relay.port, "127.0.0.2") for _ in range(10)]
        wait_until(lambda: flood.closes > 0, "a connection that keeps getting 429 to be closed", timeout=10)
    assert max(latencies) < scaled(2), f"another IP's /health/live took {max(latencies):.2f} s"
    assert flood.statuses.get(429, 0) > 0 and flood.statuses.get(200, 0) <= 600, flood.statuses


def test_another_ip_is_served_while_300_connections_of_one_ip_pipeline_metrics_unread(relay) -> None:
    """300 connections x 1,000 pipelined ``/metrics`` never read (another IP's /health/live timed out for 20 s):
    one IP starts a few answers per loop iteration, so the others' wait is short."""
    with UnreadPipelines(relay.port, "127.0.0.1", connections=300, requests=1000):
        latencies = [live_latency(relay.port, "127.0.0.2") for _ in range(10)]
    # About 0.75 s alone on 2 cores, 2.15 s once beside the rest of the suite at -n 4: the bound is for the
    # 20 s it was, not a timing goal (those live in bench/abuse_transport.py).
    assert max(latencies) < scaled(5), f"another IP's /health/live took {max(latencies):.2f} s"
    # still serving afterwards (asked from a third IP: the flooding one may have spent its probe budget)
    assert http_request(relay.port, "GET", "/health/live", source="127.0.0.3").status == 200


def test_probes_have_a_budget_of_their_own(relay) -> None:
    """Past ``rate_limit_max_probes`` an IP's health checks get 429; its reads and another IP's probes do not."""
    flood = raw_http(relay.port, keep_alive("GET", "/health/live") * 600 + http_head("GET", "/health"))
    assert flood.status == 200  # the first of 601 answers
    assert b"HTTP/1.1 429" in flood.raw and 590 <= flood.raw.count(b"HTTP/1.1 200") <= 600  # wait_ready took one
    assert relay.http("GET", f"/api/status/{addr(1)}").status == 200
    assert live_latency(relay.port, "127.0.0.2") < scaled(2)


# 3. Per connection


def ping_flood(sock: socket.socket, seconds: float = 10) -> None:
    ping = Frame(Opcode.PING, b"x" * 125).serialize(mask=True, extensions=[]) * 64
    sock.settimeout(2)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            sock.sendall(ping)
    except OSError:
        pass


def test_pongs_on_a_closing_connection_stay_under_the_outbound_cap(relay) -> None:
    """The frame limit closes a ping flood (1008); the peer never reads, so the close never completes and its
    pings keep coming: the pongs owed to it stay within max_outbound_bytes (it grew 54 to 66 MiB)."""
    before = relay.rss()
    ws = RawWs(relay.port, rcvbuf=4096)
    ws.send_json({"type": "auth", "address": addr(1)})
    with PeakRss(relay) as peak:
        ping_flood(ws.sock)
    assert is_cut(ws.sock)
    ws.close()
    assert peak.value - before < 12 * MiB, f"a closing connection's pongs grew RSS by {(peak.value - before) >> 20} MiB"


def test_a_rest_request_carrying_upgrade_stays_http(relay) -> None:
    """Only an accepted GET upgrade switches to WebSocket framing: the request after a POST that carries
    ``Upgrade: websocket`` is answered, and a WebSocket ping after it is a bad HTTP request, not a pong."""
    upgrade = {"Upgrade": "websocket", "Connection": "keep-alive, Upgrade"}
    with socket.create_connection(("127.0.0.1", relay.port)) as s:
        s.sendall(keep_alive("POST", "/api/public-keys/batch", {"addresses": [addr(1)]}, upgrade)
                  + keep_alive("GET", "/health/live") + keep_alive("OPTIONS", "/health", headers=upgrade))
        heads = read_replies(s, 3)
        assert [h.split(b"\r\n")[0][:12] for h in heads] == [b"HTTP/1.1 200", b"HTTP/1.1 200", b"HTTP/1.1 204"]
        s.sendall(Frame(Opcode.PING, b"x" * 125).serialize(mask=True, extensions=[]) + b"\r\n\r\n")
        rest = b""
        while block := s.recv(65536):
            rest += block
        assert rest.startswith(b"HTTP/1.1 400"), rest[:200]


def test_a_refused_get_upgrade_stays_http_until_it_closes(relay) -> None:
    """A GET upgrade the relay refuses (a bad Sec-WebSocket-Version) gets its 4xx as its last answer."""
    head = http_head("GET", "/", {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key":
                                  "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "7"})
    reply = raw_http(relay.port, head + Frame(Opcode.PING, b"p").serialize(mask=True, extensions=[]))
    assert 400 <= reply.status < 500, reply


# 4. Handshake flood


@pytest.fixture
def descriptors() -> Iterator[None]:
    """This test process may hold the thousands of sockets an attack needs."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.config("[server]\nhead_timeout_s = 30\n", nofile=2048)
def test_another_ip_is_served_while_one_ip_holds_3000_half_open_connections(relay, descriptors) -> None:
    """With 2048 descriptors, one IP opens 3000 connections and never finishes a request head (another IP got 0
    of 4 answers within 3 s): its pending handshakes stay well below the descriptor capacity, so another IP is
    served. The 1 s goal is measured in bench/abuse_transport.py."""
    held: list[socket.socket] = []
    try:
        for _ in range(3000):
            s = client_socket("127.0.0.3")
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", relay.port))
            except BlockingIOError:
                pass
            held.append(s)
        for s in held:
            try:
                s.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
            except OSError:
                pass
        wait_until(lambda: relay.descriptors() > 300, "the relay to take the flood")
        latencies = [live_latency(relay.port, f"127.0.0.{2 + i % 2 * 2}") for i in range(5)]
        # The first may wait behind the flood in the kernel's accept queue (about 1 s on 2 cores).
        assert latencies[0] < scaled(3) and max(latencies[1:]) < scaled(1), f"another IP's took {latencies}"
        assert relay.descriptors() < 2048 - 100, "the flood took the relay's descriptor reserve"
    finally:
        for s in held:
            s.close()
    assert "Traceback" not in relay.log()
