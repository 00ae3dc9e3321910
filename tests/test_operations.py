"""Operations: relayd as a real process under systemd-like conditions.

systemd notify and watchdog, /metrics, SIGHUP reload, graceful shutdown,
TLS, log privacy and formats, admin commands and health endpoints. Every
relay is a child process on 127.0.0.1 (``ProcessRelay``), driven with real
sockets, and stopped by the ``relays`` fixture whatever happens.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from websockets.exceptions import ConnectionClosed

import prom_parser
from relayd import __version__
from relay_harness import ROOT, ProcessRelay, WsClient, free_port, http_request

OPEN = "[auth]\nmode = open\n"
CONTENT = "Y2lwaGVydGV4dA=="  # base64 "ciphertext"


def new_address() -> str:
    return "0x" + secrets.token_hex(20)


def new_mid() -> str:
    return str(uuid.uuid4())


def message(to: str, mid: str, content: str = CONTENT) -> dict[str, Any]:
    return {"type": "message", "to": to, "content": content, "messageId": mid}


def wait_until(predicate: Callable[[], Any], timeout: float = 5, interval: float = 0.02, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(interval)


def clean_env(**extra: str) -> dict[str, str]:
    legacy = {"PORT", "ALLOWED_ORIGINS", "RATE_LIMIT_WINDOW_MS", "RATE_LIMIT_MAX_REQUESTS", "MAX_OFFLINE_MESSAGES",
              "MESSAGE_RETENTION_HOURS", "LOG_LEVEL", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
              "JOURNAL_STREAM"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_") and k not in legacy}
    env.update(extra)
    return env


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "relayd.py"), *args], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def relays(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., ProcessRelay]]:
    """Start ``ProcessRelay``s (environment cleaned of systemd and legacy variables); all stop afterwards."""
    for name in set(os.environ) - set(clean_env()):
        monkeypatch.delenv(name)
    started: list[ProcessRelay] = []

    def start(tmp: Path, config_text: str = OPEN, env: dict[str, str] | None = None, **kw: Any) -> ProcessRelay:
        tmp.mkdir(parents=True, exist_ok=True)
        relay = ProcessRelay(tmp, config_text=config_text, env=env, **kw)
        started.append(relay)
        if kw.get("wait", True):
            # free_port() can hand two concurrent test runs the same port: make sure the relay that
            # answered is this child (signal handlers are installed once it logs that it listens).
            wait_log(relay, "relayd listening")
            assert relay.http("GET", "/health/live").status == 200
        return relay

    yield start
    for relay in started:
        relay.stop(timeout=10)


def log_of(relay: ProcessRelay) -> str:
    """The child's whole log so far (also after ``stop()`` closed the harness's handle)."""
    return relay.log_path.read_text()


def wait_log(relay: ProcessRelay, needle: str, count: int = 1, timeout: float = 5) -> str:
    return wait_until(lambda: log_of(relay) if log_of(relay).count(needle) >= count else None, timeout,
                      what=f"{count}x {needle!r} in the log")


def ping(ws: WsClient) -> None:
    ws.send({"type": "ping"})
    assert ws.recv_type("pong")["type"] == "pong"


def auth(ws: WsClient, address: str, **extra: Any) -> list[dict[str, Any]]:
    """Authenticate; with ``ack=True`` return the backlog up to and including ``queue_empty``.

    Without ack, the pong after a ping proves the auth frame is done: a session with nothing stored is
    ready for live traffic by then (its backlog, if any, follows and is read by the caller).
    """
    ws.auth(address, **extra)
    frames = []
    if extra.get("ack"):
        while (frame := ws.recv())["type"] != "queue_empty":
            frames.append(frame)
        return [*frames, frame]
    ws.send({"type": "ping"})
    while (frame := ws.recv())["type"] != "pong":
        frames.append(frame)
    return frames


def recv_close_code(ws: WsClient, timeout: float = 5) -> int | None:
    deadline = time.monotonic() + timeout
    try:
        while True:
            ws.ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None
    except TimeoutError:
        raise AssertionError("the connection did not close") from None


def offline(relay: ProcessRelay, address: str) -> bool:
    return relay.http("GET", f"/api/status/{address}").json["online"] is False


# systemd notify


def parse_datagram(data: bytes) -> dict[str, str]:
    fields = {}
    for line in data.decode().split("\n"):
        key, sep, value = line.partition("=")
        assert sep, f"malformed notify line {line!r} in {data!r}"
        fields[key] = value
    return fields


class NotifySocket:
    """The service manager's end: an AF_UNIX datagram socket relayd sends to."""

    def __init__(self, address: str, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.env_value = env_value
        self.seen: list[dict[str, str]] = []

    def until(self, predicate: Callable[[dict[str, str]], bool], timeout: float = 5) -> list[dict[str, str]]:
        """Datagrams received up to and including the first matching one."""
        got: list[dict[str, str]] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching notification; got {got} (before: {self.seen[-5:]})")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = parse_datagram(data)
            got.append(fields)
            self.seen.append(fields)
            if predicate(fields):
                return got

    def during(self, seconds: float) -> list[dict[str, str]]:
        got: list[dict[str, str]] = []
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                got.append(parse_datagram(self.sock.recv(4096)))
            except TimeoutError:
                break
        self.seen.extend(got)
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify.sock"
    short_dir = None
    if len(str(path)) > 100:  # sun_path holds 108 bytes
        short_dir = tempfile.mkdtemp(prefix="rdn")
        path = Path(short_dir) / "notify.sock"
    ns = NotifySocket(str(path), str(path))
    yield ns
    ns.close()
    if short_dir:
        shutil.rmtree(short_dir, ignore_errors=True)


@pytest.fixture
def notify_abstract() -> Iterator[NotifySocket]:
    name = f"relayd-test-{secrets.token_hex(8)}"
    ns = NotifySocket("\0" + name, "@" + name)
    yield ns
    ns.close()


STATUS_RE = re.compile(r"\d+ sessions, \d+ connections, \d+ queued, storage ok\Z")


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_notify_ready_watchdog_status_reload_and_stop(relays, tmp_path, notify_path):
    relay = relays(tmp_path, env={"NOTIFY_SOCKET": notify_path.env_value, "WATCHDOG_USEC": "1000000"})
    ready = notify_path.until(lambda f: "READY" in f)[-1]
    assert ready["READY"] == "1"
    assert STATUS_RE.match(ready.get("STATUS", "")), ready

    # Watchdog every WATCHDOG_USEC/2 from the housekeeping tick; plain STATUS updates too.
    seen = notify_path.during(2.0)
    pings = [f for f in seen if f.get("WATCHDOG") == "1"]
    assert len(pings) >= 2, seen
    assert all(f == {"WATCHDOG": "1"} for f in pings), pings
    statuses = [f for f in notify_path.seen if set(f) == {"STATUS"}]
    assert statuses and all(STATUS_RE.match(f["STATUS"]) for f in statuses), notify_path.seen

    # SIGHUP: RELOADING=1 with a current CLOCK_MONOTONIC stamp, then READY=1 again.
    with relay.ws() as client:
        auth(client, new_address())
        before = monotonic_usec()
        relay.signal(signal.SIGHUP)
        got = notify_path.until(lambda f: "READY" in f)
        after = monotonic_usec()
        reloading = [f for f in got if "RELOADING" in f]
        assert len(reloading) == 1, got
        assert got.index(reloading[0]) < len(got) - 1
        assert reloading[0]["RELOADING"] == "1"
        assert before <= int(reloading[0]["MONOTONIC_USEC"]) <= after, (before, reloading[0], after)
        assert got[-1]["READY"] == "1" and STATUS_RE.match(got[-1]["STATUS"]), got[-1]
        assert got[-1]["STATUS"].startswith("1 sessions, 1 connections"), got[-1]
        wait_log(relay, "configuration reloaded")
        ping(client)

    # SIGTERM: STOPPING=1, then a clean exit.
    relay.signal(signal.SIGTERM)
    stopping = notify_path.until(lambda f: "STOPPING" in f)[-1]
    assert stopping["STOPPING"] == "1"
    assert relay.proc.wait(10) == 0, log_of(relay)


def test_notify_abstract_socket(relays, tmp_path, notify_abstract):
    relay = relays(tmp_path, env={"NOTIFY_SOCKET": notify_abstract.env_value, "WATCHDOG_USEC": "1000000"})
    ready = notify_abstract.until(lambda f: "READY" in f)[-1]
    assert ready["READY"] == "1" and "STATUS" in ready
    pings = [f for f in notify_abstract.during(1.6) if f.get("WATCHDOG") == "1"]
    assert len(pings) >= 2
    relay.signal(signal.SIGTERM)
    assert notify_abstract.until(lambda f: "STOPPING" in f)[-1]["STOPPING"] == "1"
    assert relay.proc.wait(10) == 0, log_of(relay)
    assert "sd_notify" not in log_of(relay)  # no send failure was logged


# /metrics


TELEMETRY_FAMILIES = {
    "relayd_build_info": "gauge",
    "relayd_connections": "gauge",
    "relayd_authenticated_sessions": "gauge",
    "relayd_online_addresses": "gauge",
    "relayd_messages_routed_live_total": "counter",
    "relayd_messages_queued_total": "counter",
    "relayd_messages_delivered_from_queue_total": "counter",
    "relayd_messages_acknowledged_total": "counter",
    "relayd_messages_expired_total": "counter",
    "relayd_messages_refused_total": "counter",
    "relayd_frames_total": "counter",
    "relayd_http_requests_total": "counter",
    "relayd_rate_limit_hits_total": "counter",
    "relayd_auth_failures_total": "counter",
    "relayd_queue_messages": "gauge",
    "relayd_queue_bytes": "gauge",
    "relayd_queue_recipients": "gauge",
    "relayd_storage_commit_seconds": "histogram",
    "relayd_event_loop_lag_seconds": "histogram",
    "relayd_storage_healthy": "gauge",
    "process_cpu_seconds_total": "counter",
    "process_start_time_seconds": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge",
}
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, math.inf)


def scrape(port: int) -> dict[str, dict]:
    reply = http_request(port, "GET", "/metrics")
    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4"), reply.headers
    return prom_parser.parse(reply.body.decode())


def sample(families: dict[str, dict], name: str, **labels: str) -> float:
    family = families.get(name) or families[re.sub(r"_(bucket|sum|count)\Z", "", name)]
    found = [v for n, lab, v in family["samples"] if n == name and lab == labels]
    assert len(found) == 1, f"{name}{labels} not exactly once in {family['samples']}"
    return found[0]


def test_metrics_families_and_counters_follow_traffic(relays, tmp_path):
    relay = relays(tmp_path)
    m0 = scrape(relay.port)
    for name, kind in TELEMETRY_FAMILIES.items():
        assert name in m0, f"missing family {name}"
        assert m0[name]["type"] == kind, (name, m0[name]["type"])
        assert m0[name]["help"], f"{name} has no HELP text"
    assert sample(m0, "relayd_build_info", version=relay.http("GET", "/health").json["version"]) == 1
    assert sample(m0, "relayd_storage_healthy") == 1
    assert sample(m0, "process_resident_memory_bytes") > 0

    a_addr, b_addr = new_address(), new_address()
    n_live, n_queued = 5, 3
    with relay.ws() as a, relay.ws() as b, relay.ws() as idle:
        auth(a, a_addr)
        auth(b, b_addr)
        m1 = scrape(relay.port)
        assert sample(m1, "relayd_authenticated_sessions") == 2  # idle has not authenticated
        assert sample(m1, "relayd_connections") == 3
        assert sample(m1, "relayd_online_addresses") == 2

        for _ in range(n_live):
            mid = new_mid()
            a.send(message(b_addr, mid))
            assert a.recv_type("delivered")["messageId"] == mid
            assert b.recv_type("message")["messageId"] == mid
        m2 = scrape(relay.port)
        live = sample(m2, "relayd_messages_routed_live_total") - sample(m1, "relayd_messages_routed_live_total")
        assert live == n_live
        assert sample(m2, "relayd_frames_total", outcome="ok") - sample(m1, "relayd_frames_total", outcome="ok") \
            == n_live

        a.send("this is not json")
        assert a.recv_type("error")["code"] == "invalid_json"
        m3 = scrape(relay.port)
        assert sample(m3, "relayd_frames_total", outcome="error") \
            - sample(m2, "relayd_frames_total", outcome="error") == 1

        b.close()
        wait_until(lambda: offline(relay, b_addr), what="b offline")
        m4 = scrape(relay.port)
        queued_ids = [new_mid() for _ in range(n_queued)]
        for mid in queued_ids:
            a.send(message(b_addr, mid))
            assert a.recv_type("queued")["messageId"] == mid
        m5 = scrape(relay.port)
        assert sample(m5, "relayd_messages_queued_total") - sample(m4, "relayd_messages_queued_total") == n_queued
        assert sample(m5, "relayd_queue_messages") == n_queued
        assert sample(m5, "relayd_authenticated_sessions") == 1
        assert sample(m5, "relayd_messages_routed_live_total") == sample(m2, "relayd_messages_routed_live_total")

        with relay.ws() as b2:
            backlog = auth(b2, b_addr)
            assert [f["messageId"] for f in backlog if f["type"] == "message"] == queued_ids
            m6 = scrape(relay.port)
            assert sample(m6, "relayd_messages_delivered_from_queue_total") \
                - sample(m5, "relayd_messages_delivered_from_queue_total") == n_queued
            assert sample(m6, "relayd_authenticated_sessions") == 2
            wait_until(lambda: sample(scrape(relay.port), "relayd_queue_messages") == 0, what="queue drained")

    # REST requests by status class; the scrape that read "before" is itself counted after it.
    before = scrape(relay.port)
    for _ in range(4):
        assert relay.http("GET", "/api/public-keys/stats/all").status == 200
    assert relay.http("GET", f"/api/public-keys/{new_address()}").status == 404
    after = scrape(relay.port)
    ok = sample(after, "relayd_http_requests_total", status="2xx") - sample(before, "relayd_http_requests_total",
                                                                             status="2xx")
    assert ok == 4 + 1
    assert sample(after, "relayd_http_requests_total", status="4xx") == 1

    hist = after["relayd_storage_commit_seconds"]
    buckets = [(float(lab["le"]), v) for n, lab, v in hist["samples"] if n.endswith("_bucket")]
    assert tuple(le for le, _ in buckets) == COMMIT_BUCKETS
    assert sample(after, "relayd_storage_commit_seconds_count") == buckets[-1][1]
    assert sample(after, "relayd_storage_commit_seconds_sum") >= 0
    wait_until(lambda: sample(scrape(relay.port), "relayd_event_loop_lag_seconds_count") >= 1, timeout=3,
               what="the housekeeping timer to tick")


def test_metrics_commit_latency_histogram_observes_commits(relays, tmp_path):
    relay = relays(tmp_path)
    with relay.ws() as a:
        auth(a, new_address())
        for _ in range(3):
            a.send(message(new_address(), new_mid()))  # offline recipients: each one a committed write
            assert a.recv_type("queued")
    assert relay.http("POST", "/api/public-keys", {"address": new_address(), "publicKey": "k"}).status == 200
    families = scrape(relay.port)
    assert sample(families, "relayd_storage_commit_seconds_count") >= 4
    assert sample(families, "relayd_storage_commit_seconds_sum") > 0


def test_metrics_disabled_is_404(relays, tmp_path):
    relay = relays(tmp_path, OPEN + "[metrics]\nenabled = false\n")
    reply = relay.http("GET", "/metrics")
    assert reply.status == 404, reply
    assert reply.json["code"] == "not_found"
    assert relay.http("GET", "/health").status == 200


def test_metrics_on_a_separate_listener(relays, tmp_path):
    mport = free_port()
    relay = relays(tmp_path, OPEN + f"[metrics]\nlisten = 127.0.0.1:{mport}\n")
    assert relay.http("GET", "/metrics").status == 404
    with relay.ws() as a:
        auth(a, new_address())
        families = wait_until(lambda: scrape(mport), what="metrics listener")
        assert sample(families, "relayd_authenticated_sessions") == 1
    for name in TELEMETRY_FAMILIES:
        assert name in families
    assert http_request(mport, "GET", "/health").status == 404
    assert http_request(mport, "GET", "/metrics?x=1").status == 200
    assert f"metrics on http://127.0.0.1:{mport}/metrics" in log_of(relay)


# SIGHUP reload


RELOAD_BASE = OPEN + "[server]\nshutdown_timeout_s = 1\n[log]\nlevel = {level}\n[limits]\nrate_limit_max_requests = {limit}\n"


def rest_statuses(relay: ProcessRelay, n: int) -> list[int]:
    return [relay.http("GET", "/api/public-keys/stats/all").status for _ in range(n)]


def test_sighup_reloads_reloadable_keys_and_refuses_broken_config(relays, tmp_path):
    relay = relays(tmp_path, RELOAD_BASE.format(level="info", limit=1000))
    client = relay.ws()
    try:
        auth(client, new_address())
        assert rest_statuses(relay, 3) == [200, 200, 200]
        assert " DEBUG " not in log_of(relay)

        relay.config_path.write_text(RELOAD_BASE.format(level="debug", limit=2))
        relay.signal(signal.SIGHUP)
        log = wait_log(relay, "configuration reloaded")
        assert "configuration reloaded (2 changes applied)" in log
        ping(client)
        # The three requests before the reload still count: the window is kept, the new limit applies.
        limited = relay.http("GET", "/api/public-keys/stats/all")
        assert limited.status == 429 and "retry-after" in limited.headers, limited
        assert relay.http("GET", "/health").status == 200  # exempt
        with relay.ws() as other:
            auth(other, new_address())
        wait_log(relay, " DEBUG relayd.")

        # Broken configurations are refused; the running one stays.
        for n, (broken, key) in enumerate([
            (RELOAD_BASE.format(level="info", limit=1000).replace("[server]\n", "[server]\nport = notanumber\n"),
             "[server] port"),
            (RELOAD_BASE.format(level="info", limit=1000) + "bogus_key = 1\n", "bogus_key"),
        ], 1):
            relay.config_path.write_text(broken)
            relay.signal(signal.SIGHUP)
            log = wait_log(relay, "reload refused", count=n)
            refusal = [line for line in log.splitlines() if "reload refused" in line][-1]
            assert key in refusal, refusal
            assert relay.proc.poll() is None
            ping(client)
            assert 429 in rest_statuses(relay, 3)  # still 2 per window, not 1000
        assert log.count("configuration reloaded") == 1
        debug_lines = log_of(relay).count(" DEBUG ")
        with relay.ws() as other:
            auth(other, new_address())
        wait_until(lambda: log_of(relay).count(" DEBUG ") > debug_lines, what="debug still on")

        # Keys that need a restart are reported and not applied.
        relay.config_path.write_text(RELOAD_BASE.format(level="debug", limit=2)
                                     + "[metrics]\nenabled = false\n[queue]\nexpiry_interval_s = 5\n")
        relay.signal(signal.SIGHUP)
        log = wait_log(relay, "configuration reloaded", count=2)
        assert "[metrics] enabled changed but needs a restart" in log
        assert "[queue] expiry_interval_s changed but needs a restart" in log
        assert "configuration reloaded (0 changes applied)" in log
        assert relay.http("GET", "/metrics").status == 200
        ping(client)
    finally:
        client.close()
    assert relay.stop() == 0


# Graceful shutdown


def raw_ws_handshake(port: int) -> socket.socket:
    """A WebSocket peer that completes the handshake and then never reads nor answers a close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_sigterm_closes_sessions_with_1001_and_exits_0(relays, tmp_path):
    relay = relays(tmp_path, OPEN + "[server]\nshutdown_timeout_s = 1\n")
    a_addr = new_address()
    with relay.ws() as a, relay.ws() as b, relay.ws() as anonymous:
        auth(a, a_addr)
        auth(b, new_address())
        anonymous.send({"type": "ping"})  # open but never authenticated
        assert anonymous.recv_type("error")["code"] == "not_authenticated"
        started = time.monotonic()
        relay.signal(signal.SIGTERM)
        assert recv_close_code(a) == 1001
        assert recv_close_code(b) == 1001
        assert recv_close_code(anonymous) == 1001
        assert relay.proc.wait(1 + 2.5) == 0, log_of(relay)
        assert time.monotonic() - started < 1 + 2.5
    log = log_of(relay)
    assert "shutting down" in log and "stopped" in log
    assert "Traceback" not in log


def test_sigterm_exits_within_shutdown_timeout_despite_an_unresponsive_peer(relays, tmp_path):
    relay = relays(tmp_path, OPEN + "[server]\nshutdown_timeout_s = 1\n")
    stuck = raw_ws_handshake(relay.port)
    try:
        with relay.ws() as a:
            auth(a, new_address())
            started = time.monotonic()
            relay.signal(signal.SIGTERM)
            assert recv_close_code(a) == 1001
            assert relay.proc.wait(1 + 2.5) == 0, log_of(relay)
            assert time.monotonic() - started < 1 + 2.5
    finally:
        stuck.close()


# TLS


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def client_context(cert: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(cert))
    return ctx


def https_get(port: int, path: str, ctx: ssl.SSLContext) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a test certificate")
def test_tls_wss_and_https_and_certificate_reload(relays, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    cert, key = make_cert(certs, "one")
    served_cert, served_key = certs / "served.crt", certs / "served.key"
    shutil.copy(cert, served_cert)
    shutil.copy(key, served_key)
    relay = relays(tmp_path, OPEN + f"[tls]\ncertfile = {served_cert}\nkeyfile = {served_key}\n", wait=False)
    ctx1 = client_context(cert)

    def up() -> bool:
        if relay.proc.poll() is not None:
            raise AssertionError(log_of(relay))
        if "relayd listening" not in log_of(relay):
            return False
        try:
            return https_get(relay.port, "/health/live", ctx1)[0] == 200
        except OSError:
            return False
    wait_until(up, timeout=15, interval=0.05, what="TLS relay up")

    status, body = https_get(relay.port, "/health", ctx1)
    assert status == 200 and json.loads(body)["status"] == "ok"

    url = f"wss://127.0.0.1:{relay.port}"
    a_addr, b_addr = new_address(), new_address()
    with WsClient(url, ssl=ctx1) as a, WsClient(url, ssl=ctx1) as b:
        auth(a, a_addr)
        auth(b, b_addr)
        mid = new_mid()
        a.send(message(b_addr, mid))
        assert a.recv_type("delivered")["messageId"] == mid
        got = b.recv_type("message")
        assert (got["from"], got["messageId"], got["content"]) == (a_addr, mid, CONTENT)
        with pytest.raises(OSError):  # plain HTTP on the TLS port gets nowhere
            relay.http("GET", "/health", timeout=2)

        # Replace the certificate in place and reload: clients stay, new handshakes use the new one.
        cert2, key2 = make_cert(certs, "two")
        os.replace(shutil.copy(key2, certs / "tmp.key"), served_key)
        os.replace(shutil.copy(cert2, certs / "tmp.crt"), served_cert)
        relay.signal(signal.SIGHUP)
        wait_log(relay, "configuration reloaded")
        assert "reload refused" not in log_of(relay)
        ping(a)
        mid2 = new_mid()
        b.send(message(a_addr, mid2))
        assert b.recv_type("delivered")["messageId"] == mid2
        assert a.recv_type("message")["messageId"] == mid2

        ctx2 = client_context(cert2)
        assert https_get(relay.port, "/health/ready", ctx2)[0] == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            https_get(relay.port, "/health", ctx1)
        with WsClient(url, ssl=ctx2) as c:
            auth(c, new_address())
            ping(c)

        # A broken key file is refused; the certificate in use stays.
        served_key.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        relay.signal(signal.SIGHUP)
        wait_log(relay, "reload refused")
        assert relay.proc.poll() is None
        ping(a)
        assert https_get(relay.port, "/health", ctx2)[0] == 200
    assert relay.stop() == 0


# Logs


def chatter(relay: ProcessRelay, a_addr: str, b_addr: str) -> list[str]:
    """Live and queued messages, typing, receipts, acks, keys and status queries; returns the messageIds."""
    mids: list[str] = []
    with relay.ws() as a, relay.ws() as b:
        auth(a, a_addr.upper().replace("0X", "0x"))
        assert auth(b, b_addr, ack=True) == [{"type": "queue_empty"}]
        for _ in range(2):
            mid = new_mid()
            mids.append(mid)
            a.send(message(b_addr, mid))
            assert a.recv_type("delivered")["messageId"] == mid
            assert b.recv_type("message")["messageId"] == mid
            b.send({"type": "ack", "messageIds": [mid]})
        a.send({"type": "typing", "to": b_addr, "isTyping": True})
        assert b.recv_type("typing")["from"] == a_addr.upper().replace("0X", "0x")  # as a signed in
        b.send({"type": "read_receipt", "to": a_addr, "messageId": mids[0]})
        assert a.recv_type("read")["messageId"] == mids[0]
        bad = new_mid()
        mids.append(bad)
        a.send({"type": "message", "to": "0x1234", "content": CONTENT, "messageId": bad})
        assert a.recv_type("error")["messageId"] == bad
        ping(b)
    wait_until(lambda: offline(relay, b_addr) and offline(relay, a_addr), what="both offline")
    with relay.ws() as a:
        auth(a, a_addr)
        for _ in range(2):
            mid = new_mid()
            mids.append(mid)
            a.send(message(b_addr, mid))
            assert a.recv_type("queued")["messageId"] == mid
        a.send({"type": "typing", "to": b_addr, "isTyping": False})
        ping(a)
    wait_until(lambda: offline(relay, a_addr), what="a offline")
    with relay.ws() as b:
        backlog = auth(b, b_addr, ack=True)
        queued = [f["messageId"] for f in backlog if f["type"] == "message"]
        assert queued == mids[-2:]
        b.send({"type": "ack", "messageIds": queued})
        b.send({"type": "read_receipt", "to": a_addr, "messageId": queued[0]})  # a is offline: stored
        ping(b)
    with relay.ws() as a:
        a.auth(a_addr)
        assert a.recv_type("read")["messageId"] == mids[-2]
    assert relay.http("POST", "/api/public-keys", {"address": a_addr, "publicKey": "cHVibGljLWtleQ=="}).status == 200
    assert relay.http("GET", f"/api/public-keys/{a_addr}").status == 200
    assert relay.http("GET", f"/api/public-keys/{b_addr}").status == 404
    assert relay.http("POST", "/api/public-keys/batch", {"addresses": [a_addr, b_addr]}).status == 200
    assert relay.http("GET", f"/api/status/{b_addr}").json["online"] is False
    assert relay.http("POST", "/api/status/batch", {"addresses": [a_addr, b_addr]}).status == 200
    assert relay.http("GET", f"/api/messages/{b_addr}/queue-size").json["queueSize"] == 0
    assert relay.http("GET", f"/api/messages/{b_addr}?limit=5").status == 200
    assert relay.http("GET", f"/api/messages/{b_addr}").status == 200
    return mids


def leaks(log: str, addresses: list[str], mids: list[str]) -> list[str]:
    text = log.lower()
    found = [a for a in addresses if a[2:].lower() in text]
    return found + [m for m in mids if m.lower() in text]


def test_info_logs_hold_no_addresses_or_message_ids(relays, tmp_path):
    relay = relays(tmp_path, OPEN + "[log]\nlevel = info\nformat = text\n")
    a_addr, b_addr = new_address(), new_address()
    mids = chatter(relay, a_addr, b_addr)
    assert relay.stop() == 0
    log = log_of(relay)
    assert "relayd listening" in log and "stopped" in log
    assert leaks(log, [a_addr, b_addr], mids) == []


def test_debug_logs_may_name_addresses(relays, tmp_path):
    relay = relays(tmp_path, OPEN + "[log]\nlevel = debug\n")
    a_addr, b_addr = new_address(), new_address()
    mids = chatter(relay, a_addr, b_addr)
    assert relay.stop() == 0
    assert leaks(log_of(relay), [a_addr, b_addr], mids) != []  # so the info test can fail


def test_json_log_format(relays, tmp_path):
    relay = relays(tmp_path, OPEN + "[log]\nlevel = debug\nformat = json\n")
    chatter(relay, new_address(), new_address())
    relay.config_path.write_text(OPEN + "[log]\nlevel = debug\nformat = json\n[server]\nping_interval_s = 5\n")
    relay.signal(signal.SIGHUP)
    wait_log(relay, "configuration reloaded")
    assert relay.stop() == 0
    lines = log_of(relay).splitlines()
    assert len(lines) >= 5
    records = []
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert {"ts", "level", "logger", "msg"} <= set(record), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"]), line
        records.append(record)
    levels = {r["level"] for r in records}
    assert {"INFO", "DEBUG", "WARNING"} <= levels, levels
    assert all(r["logger"].startswith("relayd") for r in records)


def start_with_journal_stream(tmp: Path, config_text: str, journal_stream: str | None) -> tuple[subprocess.Popen, Path, int]:
    """Like ProcessRelay, but the log file exists first so JOURNAL_STREAM can name its dev:inode."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = tmp / "relayd.conf"
    conf.write_text(config_text)
    log_path = tmp / "relayd.log"
    log_file = open(log_path, "w")
    st = os.fstat(log_file.fileno())
    value = f"{st.st_dev}:{st.st_ino}" if journal_stream is None else journal_stream
    env = clean_env(RELAYD_SERVER_HOST="127.0.0.1", RELAYD_SERVER_PORT=str(port), PYTHONUNBUFFERED="1",
                    JOURNAL_STREAM=value)
    proc = subprocess.Popen([sys.executable, str(ROOT / "relayd.py"), "--config", str(conf)], cwd=tmp, env=env,
                            stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(log_path.read_text())
        if "relayd listening" not in log_path.read_text():  # this child, not another test's on a reused port
            return False
        try:
            return http_request(port, "GET", "/health/live", timeout=1).status == 200
        except OSError:
            return False
    try:
        wait_until(up, timeout=15, interval=0.05, what="relayd up")
    except BaseException:
        proc.kill()
        proc.wait(5)
        raise
    return proc, log_path, port


def stop_proc(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def test_journald_priority_prefixes(tmp_path):
    text = OPEN + "[log]\nlevel = info\n"
    proc, log_path, port = start_with_journal_stream(tmp_path / "journal", text, None)
    try:
        conf = tmp_path / "journal" / "relayd.conf"
        conf.write_text(text + "[server]\nping_interval_s = 5\n")  # needs a restart: a warning
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in log_path.read_text(), what="reload")
        conf.write_text(text + "[server]\nport = notanumber\n")  # refused: an error
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in log_path.read_text(), what="refused reload")
    finally:
        assert stop_proc(proc) == 0
    lines = log_path.read_text().splitlines()
    assert lines
    for line in lines:
        assert re.match(r"<[0-7]>", line), line
        assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", line), line
    prefixes = {line[:3] for line in lines}
    assert {"<6>", "<4>", "<3>"} <= prefixes, prefixes
    assert any(line.startswith("<4>") and "needs a restart" in line for line in lines)
    assert any(line.startswith("<3>") and "reload refused" in line for line in lines)

    # An inherited JOURNAL_STREAM that names another file is not journald: plain timestamped text.
    proc, log_path, port = start_with_journal_stream(tmp_path / "inherited", text, "8:12345")
    assert stop_proc(proc) == 0
    lines = log_path.read_text().splitlines()
    assert lines and all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ relayd", l) for l in lines), lines


# Admin commands


def test_backup_and_stats_while_running_and_restore(relays, tmp_path):
    first = tmp_path / "first"
    relay = relays(first)
    a_addr, b_addr, c_addr = new_address(), new_address(), new_address()
    assert relay.http("POST", "/api/public-keys", {"address": a_addr, "publicKey": "a2V5LW9mLWE="}).status == 200
    mids = [new_mid() for _ in range(3)]
    contents = [f"Y2lwaGVy{i}" for i in range(3)]
    with relay.ws() as a:
        auth(a, a_addr)
        for mid, content in zip(mids, contents):
            a.send(message(b_addr, mid, content))
            assert a.recv_type("queued")["messageId"] == mid
        a.send({"type": "read_receipt", "to": c_addr, "messageId": "m-read"})
        ping(a)

        backup = tmp_path / "backup.db"
        result = run_cli(first, "--config", str(relay.config_path), "backup", str(backup))
        assert result.returncode == 0, result.stderr
        assert backup.is_file()
        result = run_cli(first, "--config", str(relay.config_path), "stats")
        assert result.returncode == 0, result.stderr
        stats = json.loads(result.stdout)
        assert {k: stats[k] for k in ("recipients", "messages", "bytes", "receipts", "keys")} == {
            "recipients": 1, "messages": 3, "bytes": sum(map(len, contents)), "receipts": 1, "keys": 1}
        assert stats["schema_version"] >= 1
        ping(a)  # the running relay did not notice
    assert relay.stop() == 0

    restored = relays(tmp_path / "second", env={"RELAYD_STORAGE_PATH": str(backup)})
    assert restored.port != relay.port
    key = restored.http("GET", f"/api/public-keys/{a_addr}")
    assert key.status == 200 and key.json["publicKey"] == "a2V5LW9mLWE="
    assert restored.http("GET", "/health").json["queuedMessages"] == 3
    with restored.ws() as b:
        got = [f for f in auth(b, b_addr) if f["type"] == "message"]
        assert [(g["messageId"], g["from"], g["content"], g["queued"]) for g in got] == \
            [(m, a_addr, c, True) for m, c in zip(mids, contents)]
    with restored.ws() as c:
        receipts = [(f["type"], f["from"], f["messageId"]) for f in auth(c, c_addr)]
        assert receipts == [("read", a_addr, "m-read")]
    stats = json.loads(run_cli(tmp_path, "--config", str(restored.config_path), "--db", str(backup),
                               "stats").stdout)
    assert stats["messages"] == 0 and stats["keys"] == 1


def test_check_config(tmp_path):
    good = tmp_path / "good.conf"
    good.write_text(OPEN + "[limits]\nrate_limit_max_requests = 5\n[log]\nformat = json\n")
    result = run_cli(tmp_path, "--config", str(good), "--check-config")
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text(OPEN + "[limits]\nrate_limit_max_requests = lots\n")
    result = run_cli(tmp_path, "--config", str(bad), "--check-config")
    assert result.returncode == 2, result.stdout
    assert "[limits] rate_limit_max_requests" in result.stderr
    bad.write_text(OPEN + "[tls]\ncertfile = /nonexistent/cert.pem\nkeyfile = /nonexistent/key.pem\n")
    result = run_cli(tmp_path, "--config", str(bad), "--check-config")
    assert result.returncode == 2 and "[tls] certfile" in result.stderr, result.stderr


# Health


def test_health_endpoints(relays, tmp_path):
    relay = relays(tmp_path)
    health = relay.http("GET", "/health")
    assert health.status == 200
    body = health.json
    assert body["status"] == "ok" and body["version"] == __version__
    assert body["storage"] == {"backend": "sqlite", "status": "ok"}
    live = relay.http("GET", "/health/live")
    assert live.status == 200 and live.json["status"] == "ok"
    ready = relay.http("GET", "/health/ready")
    assert ready.status == 200 and ready.json["status"] == "ready"
    with relay.ws() as a:
        auth(a, new_address())
        assert relay.http("GET", "/health").json["connections"] == 1
