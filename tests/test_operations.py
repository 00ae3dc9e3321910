"""Operations: relayd as a real process under systemd-like conditions.

systemd notify and watchdog, /metrics, SIGHUP reload, graceful shutdown,
TLS, log privacy and formats, admin commands and health endpoints. Every
relay is a child process on 127.0.0.1 (``ProcessRelay``), driven with real
sockets, and stopped by the ``process_relays`` fixture whatever happens.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support import (EVENT_LOOPS, HAS_UVLOOP, ROOT, ProcessRelay, RawWs, WsClient, assert_closed_with, clean_env,
                     cli_ok, client_context, frames_until_pong, free_port, http_request, make_cert, make_config,
                     metric_families, msg, new_address, new_mid, online, pong_next, run_cli, wait_until)

from relayd import __version__

OPEN = "[auth]\nmode = open\n"
CONTENT = "Y2lwaGVydGV4dA=="  # base64 "ciphertext", msg()'s default content


def auth(ws: WsClient, address: str, **extra: Any) -> list[dict[str, Any]]:
    """Authenticate; with ``ack=True`` return the backlog up to and including ``queue_empty``.

    Without ack, the pong after a ping proves the auth frame is done, the backlog flush included (the test
    relays flush without waiting for the session to listen); returns what arrived before that pong.
    """
    ws.auth(address, **extra)
    if extra.get("ack"):
        frames = []
        while (frame := ws.recv())["type"] != "queue_empty":
            frames.append(frame)
        return [*frames, frame]
    return frames_until_pong(ws)


def offline(relay: ProcessRelay, address: str) -> bool:
    return not online(relay, address)


# systemd notify


def watchdog_pings(got: list[dict[str, str]]) -> int:
    return sum(f.get("WATCHDOG") == "1" for f in got)


STATUS_RE = re.compile(r"\d+ sessions, \d+ connections, \d+ queued, storage ok\Z")


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_notify_ready_watchdog_status_reload_and_stop(process_relays, tmp_path, notify_socket):
    relay = process_relays(tmp_path, config_text=OPEN,
                           env={"NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "400000"})
    ready = notify_socket.until_field("READY")[-1]
    assert ready["READY"] == "1"
    assert STATUS_RE.match(ready.get("STATUS", "")), ready

    # Watchdog every WATCHDOG_USEC/2 from the housekeeping tick; plain STATUS updates too.
    seen = notify_socket.until(lambda got: watchdog_pings(got) >= 2, "two watchdog pings")
    pings = [f for f in seen if "WATCHDOG" in f]
    assert all(f == {"WATCHDOG": "1"} for f in pings), pings
    statuses = [f for f in notify_socket.seen if set(f) == {"STATUS"}]
    assert statuses and all(STATUS_RE.match(f["STATUS"]) for f in statuses), notify_socket.seen

    # SIGHUP: RELOADING=1 with a current CLOCK_MONOTONIC stamp, then READY=1 again.
    with relay.ws() as client:
        auth(client, new_address())
        before = monotonic_usec()
        relay.signal(signal.SIGHUP)
        got = notify_socket.until_field("READY")
        after = monotonic_usec()
        reloading = [f for f in got if "RELOADING" in f]
        assert len(reloading) == 1, got
        assert got.index(reloading[0]) < len(got) - 1
        assert reloading[0]["RELOADING"] == "1"
        assert before <= int(reloading[0]["MONOTONIC_USEC"]) <= after, (before, reloading[0], after)
        assert got[-1]["READY"] == "1" and STATUS_RE.match(got[-1]["STATUS"]), got[-1]
        assert got[-1]["STATUS"].startswith("1 sessions, 1 connections"), got[-1]
        relay.wait_log("configuration reloaded")
        pong_next(client)

    # SIGTERM: STOPPING=1, then a clean exit.
    relay.signal(signal.SIGTERM)
    stopping = notify_socket.until_field("STOPPING")[-1]
    assert stopping["STOPPING"] == "1"
    assert relay.proc.wait(10) == 0, relay.log()


def test_notify_abstract_socket(process_relays, tmp_path, notify_abstract):
    relay = process_relays(tmp_path, config_text=OPEN,
                           env={"NOTIFY_SOCKET": notify_abstract.env_value, "WATCHDOG_USEC": "400000"})
    ready = notify_abstract.until_field("READY")[-1]
    assert ready["READY"] == "1" and "STATUS" in ready
    notify_abstract.until(lambda got: watchdog_pings(got) >= 2, "two watchdog pings")
    relay.signal(signal.SIGTERM)
    assert notify_abstract.until_field("STOPPING")[-1]["STOPPING"] == "1"
    assert relay.proc.wait(10) == 0, relay.log()
    assert "sd_notify" not in relay.log()  # no send failure was logged


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
    "relayd_gc_full_pause_seconds": "histogram",
    "relayd_gc_frozen_objects": "gauge",
    "relayd_storage_healthy": "gauge",
    "relayd_ready": "gauge",
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
    return metric_families(reply.body.decode())


def sample(families: dict[str, dict], name: str, **labels: str) -> float:
    family = families.get(name) or families[re.sub(r"_(bucket|sum|count)\Z", "", name)]
    found = [v for n, lab, v in family["samples"] if n == name and lab == labels]
    assert len(found) == 1, f"{name}{labels} not exactly once in {family['samples']}"
    return found[0]


def test_metrics_families_and_counters_follow_traffic(process_relays, tmp_path):
    relay = process_relays(tmp_path, config_text=OPEN)
    m0 = scrape(relay.port)
    for name, kind in TELEMETRY_FAMILIES.items():
        assert name in m0, f"missing family {name}"
        assert m0[name]["type"] == kind, (name, m0[name]["type"])
        assert m0[name]["help"], f"{name} has no HELP text"
    assert sample(m0, "relayd_build_info", version=relay.http("GET", "/health").json["version"]) == 1
    assert sample(m0, "relayd_storage_healthy") == 1
    assert sample(m0, "relayd_ready") == 1
    assert sample(m0, "process_resident_memory_bytes") > 0

    a_addr, b_addr = new_address(), new_address()
    n_live, n_queued = 5, 3
    with relay.ws() as a, relay.ws() as b, relay.ws():  # the third never authenticates
        auth(a, a_addr)
        auth(b, b_addr)
        m1 = scrape(relay.port)
        assert sample(m1, "relayd_authenticated_sessions") == 2  # idle has not authenticated
        assert sample(m1, "relayd_connections") == 3
        assert sample(m1, "relayd_online_addresses") == 2

        for _ in range(n_live):
            mid = new_mid()
            a.send(msg(b_addr, mid))
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
        wait_until(lambda: offline(relay, b_addr), "b offline")
        m4 = scrape(relay.port)
        queued_ids = [new_mid() for _ in range(n_queued)]
        for mid in queued_ids:
            a.send(msg(b_addr, mid))
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
            wait_until(lambda: sample(scrape(relay.port), "relayd_queue_messages") == 0, "the queue drained")

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
    wait_until(lambda: sample(scrape(relay.port), "relayd_event_loop_lag_seconds_count") >= 1,
               "the housekeeping timer to tick", timeout=3)


def test_metrics_commit_latency_histogram_observes_commits(process_relays, tmp_path):
    relay = process_relays(tmp_path, config_text=OPEN)
    with relay.ws() as a:
        auth(a, new_address())
        for _ in range(3):
            a.send(msg(new_address(), new_mid()))  # offline recipients: each one a committed write
            assert a.recv_type("queued")
    assert relay.http("POST", "/api/public-keys", {"address": new_address(), "publicKey": "k"}).status == 200
    families = scrape(relay.port)
    assert sample(families, "relayd_storage_commit_seconds_count") >= 4
    assert sample(families, "relayd_storage_commit_seconds_sum") > 0


def test_metrics_disabled_is_404(process_relays, tmp_path):
    relay = process_relays(tmp_path, config_text=OPEN + "[metrics]\nenabled = false\n")
    reply = relay.http("GET", "/metrics")
    assert reply.status == 404, reply
    assert reply.json["code"] == "not_found"
    assert relay.http("GET", "/health").status == 200


def test_metrics_on_a_separate_listener(process_relays, tmp_path):
    mport = free_port()
    relay = process_relays(tmp_path, config_text=OPEN + f"[metrics]\nlisten = 127.0.0.1:{mport}\n")
    assert relay.http("GET", "/metrics").status == 404
    with relay.ws() as a:
        auth(a, new_address())
        families = wait_until(lambda: scrape(mport), "the metrics listener")
        assert sample(families, "relayd_authenticated_sessions") == 1
    for name in TELEMETRY_FAMILIES:
        assert name in families
    assert http_request(mport, "GET", "/health").status == 404
    assert http_request(mport, "GET", "/metrics?x=1").status == 200
    assert f"metrics on http://127.0.0.1:{mport}/metrics" in relay.log()


# SIGHUP reload


RELOAD_BASE = OPEN + "[server]\nshutdown_timeout_s = 1\n[log]\nlevel = {level}\n[limits]\nrate_limit_max_requests = {limit}\n"


def rest_statuses(relay: ProcessRelay, n: int) -> list[int]:
    return [relay.http("GET", "/api/public-keys/stats/all").status for _ in range(n)]


def test_sighup_reloads_reloadable_keys_and_refuses_broken_config(process_relays, tmp_path):
    relay = process_relays(tmp_path, config_text=RELOAD_BASE.format(level="info", limit=1000))
    client = relay.ws()
    try:
        auth(client, new_address())
        assert rest_statuses(relay, 3) == [200, 200, 200]
        assert " DEBUG " not in relay.log()

        relay.config_path.write_text(RELOAD_BASE.format(level="debug", limit=2))
        relay.signal(signal.SIGHUP)
        log = relay.wait_log("configuration reloaded")
        assert "configuration reloaded: applied [limits] rate_limit_max_requests, [log] level" in log
        pong_next(client)
        # The three requests before the reload still count: the window is kept, the new limit applies.
        limited = relay.http("GET", "/api/public-keys/stats/all")
        assert limited.status == 429 and "retry-after" in limited.headers, limited
        assert relay.http("GET", "/health").status == 200  # exempt
        with relay.ws() as other:
            auth(other, new_address())
        relay.wait_log(" DEBUG relayd.")

        # Broken configurations are refused; the running one stays.
        for n, (broken, key) in enumerate([
            (RELOAD_BASE.format(level="info", limit=1000).replace("[server]\n", "[server]\nport = notanumber\n"),
             "[server] port"),
            (RELOAD_BASE.format(level="info", limit=1000) + "bogus_key = 1\n", "bogus_key"),
        ], 1):
            relay.config_path.write_text(broken)
            relay.signal(signal.SIGHUP)
            log = relay.wait_log("reload refused", count=n)
            refusal = [line for line in log.splitlines() if "reload refused" in line][-1]
            assert key in refusal, refusal
            assert relay.proc.poll() is None
            pong_next(client)
            assert 429 in rest_statuses(relay, 3)  # still 2 per window, not 1000
        assert log.count("configuration reloaded") == 1
        debug_lines = relay.log().count(" DEBUG ")
        with relay.ws() as other:
            auth(other, new_address())
        wait_until(lambda: relay.log().count(" DEBUG ") > debug_lines, "debug logging to stay on")

        # Keys that need a restart are reported and not applied.
        relay.config_path.write_text(RELOAD_BASE.format(level="debug", limit=2)
                                     + "[metrics]\nenabled = false\n[queue]\nexpiry_interval_s = 5\n")
        relay.signal(signal.SIGHUP)
        log = relay.wait_log("configuration reloaded", count=2)
        assert "[metrics] enabled changed but needs a restart" in log
        assert "[queue] expiry_interval_s changed but needs a restart" in log
        assert "configuration reloaded: nothing changed" in log
        assert relay.http("GET", "/metrics").status == 200
        pong_next(client)
    finally:
        client.close()
    assert relay.stop() == 0


# Graceful shutdown


def test_sigterm_closes_sessions_with_1001_and_exits_0(process_relays, tmp_path):
    relay = process_relays(tmp_path, config_text=OPEN + "[server]\nshutdown_timeout_s = 1\n")
    a_addr = new_address()
    with relay.ws() as a, relay.ws() as b, relay.ws() as anonymous:
        auth(a, a_addr)
        auth(b, new_address())
        anonymous.send({"type": "ping"})  # open but never authenticated
        assert anonymous.recv_type("error")["code"] == "not_authenticated"
        started = time.monotonic()
        relay.signal(signal.SIGTERM)
        for client in (a, b, anonymous):
            assert_closed_with(client, 1001)
        assert relay.proc.wait(1 + 2.5) == 0, relay.log()
        assert time.monotonic() - started < 1 + 2.5
    log = relay.log()
    assert "shutting down" in log and "stopped" in log
    assert "Traceback" not in log


def test_sigterm_exits_within_shutdown_timeout_despite_an_unresponsive_peer(process_relays, tmp_path):
    timeout = 0.3
    relay = process_relays(tmp_path, config_text=OPEN + f"[server]\nshutdown_timeout_s = {timeout}\n")
    with RawWs(relay.port) as stuck:  # completes the handshake, then never reads nor answers a close
        assert stuck.status == 101
        with relay.ws() as a:
            auth(a, new_address())
            started = time.monotonic()
            relay.signal(signal.SIGTERM)
            assert_closed_with(a, 1001)
            assert relay.proc.wait(timeout + 2.5) == 0, relay.log()
            assert time.monotonic() - started < timeout + 2.5


# TLS


def https_get(port: int, path: str, ctx: ssl.SSLContext) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a test certificate")
def test_tls_wss_and_https_and_certificate_reload(process_relays, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    cert, key = make_cert(certs, "one")
    served_cert, served_key = certs / "served.crt", certs / "served.key"
    shutil.copy(cert, served_cert)
    shutil.copy(key, served_key)
    relay = process_relays(tmp_path, config_text=OPEN + f"[tls]\ncertfile = {served_cert}\nkeyfile = {served_key}\n",
                           wait=False)
    ctx1 = client_context(cert)

    def up() -> bool:
        if relay.proc.poll() is not None:
            raise AssertionError(relay.log())
        if "relayd listening" not in relay.log():
            return False
        try:
            return https_get(relay.port, "/health/live", ctx1)[0] == 200
        except OSError:
            return False
    wait_until(up, "the TLS relay to start", timeout=15)

    status, body = https_get(relay.port, "/health", ctx1)
    assert status == 200 and json.loads(body)["status"] == "ok"

    url = f"wss://127.0.0.1:{relay.port}"
    a_addr, b_addr = new_address(), new_address()
    with WsClient(url, ssl=ctx1) as a, WsClient(url, ssl=ctx1) as b:
        auth(a, a_addr)
        auth(b, b_addr)
        mid = new_mid()
        a.send(msg(b_addr, mid))
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
        relay.wait_log("configuration reloaded")
        assert "reload refused" not in relay.log()
        pong_next(a)
        mid2 = new_mid()
        b.send(msg(a_addr, mid2))
        assert b.recv_type("delivered")["messageId"] == mid2
        assert a.recv_type("message")["messageId"] == mid2

        ctx2 = client_context(cert2)
        assert https_get(relay.port, "/health/ready", ctx2)[0] == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            https_get(relay.port, "/health", ctx1)
        with WsClient(url, ssl=ctx2) as c:
            auth(c, new_address())
            pong_next(c)

        # A broken key file is refused; the certificate in use stays.
        served_key.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        relay.signal(signal.SIGHUP)
        relay.wait_log("reload refused")
        assert relay.proc.poll() is None
        pong_next(a)
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
            a.send(msg(b_addr, mid))
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
        pong_next(b)
    wait_until(lambda: offline(relay, b_addr) and offline(relay, a_addr), "both offline")
    with relay.ws() as a:
        auth(a, a_addr)
        for _ in range(2):
            mid = new_mid()
            mids.append(mid)
            a.send(msg(b_addr, mid))
            assert a.recv_type("queued")["messageId"] == mid
        a.send({"type": "typing", "to": b_addr, "isTyping": False})
        pong_next(a)
    wait_until(lambda: offline(relay, a_addr), "a offline")
    with relay.ws() as b:
        backlog = auth(b, b_addr, ack=True)
        queued = [f["messageId"] for f in backlog if f["type"] == "message"]
        assert queued == mids[-2:]
        b.send({"type": "ack", "messageIds": queued})
        b.send({"type": "read_receipt", "to": a_addr, "messageId": queued[0]})  # a is offline: stored
        pong_next(b)
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


def test_info_logs_hold_no_addresses_or_message_ids(process_relays, tmp_path):
    relay = process_relays(tmp_path, config_text=OPEN + "[log]\nlevel = info\nformat = text\n")
    a_addr, b_addr = new_address(), new_address()
    mids = chatter(relay, a_addr, b_addr)
    assert relay.stop() == 0
    log = relay.log()
    assert "relayd listening" in log and "stopped" in log
    assert leaks(log, [a_addr, b_addr], mids) == []


def test_debug_logs_may_name_addresses(process_relays, tmp_path):
    relay = process_relays(tmp_path, config_text=OPEN + "[log]\nlevel = debug\n")
    a_addr, b_addr = new_address(), new_address()
    mids = chatter(relay, a_addr, b_addr)
    assert relay.stop() == 0
    assert leaks(relay.log(), [a_addr, b_addr], mids) != []  # so the info test can fail


def test_json_log_format(process_relays, tmp_path):
    relay = process_relays(tmp_path, config_text=OPEN + "[log]\nlevel = debug\nformat = json\n")
    chatter(relay, new_address(), new_address())
    relay.config_path.write_text(OPEN + "[log]\nlevel = debug\nformat = json\n[server]\nping_interval_s = 5\n")
    relay.signal(signal.SIGHUP)
    relay.wait_log("configuration reloaded")
    assert relay.stop() == 0
    lines = relay.log().splitlines()
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


def test_journald_priority_prefixes(process_relays, tmp_path):
    text = OPEN + "[log]\nlevel = info\n"
    relay = process_relays(tmp_path / "journal", config_text=text, journal_stream=True)
    relay.config_path.write_text(text + "[server]\nping_interval_s = 5\n")  # needs a restart: a warning
    relay.signal(signal.SIGHUP)
    relay.wait_log("configuration reloaded")
    relay.config_path.write_text(text + "[server]\nport = notanumber\n")  # refused: an error
    relay.signal(signal.SIGHUP)
    relay.wait_log("reload refused")
    assert relay.stop() == 0
    lines = relay.log().splitlines()
    assert lines
    for line in lines:
        assert re.match(r"<[0-7]>", line), line
        assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", line), line
    prefixes = {line[:3] for line in lines}
    assert {"<6>", "<4>", "<3>"} <= prefixes, prefixes
    assert any(line.startswith("<4>") and "needs a restart" in line for line in lines)
    assert any(line.startswith("<3>") and "reload refused" in line for line in lines)

    # An inherited JOURNAL_STREAM that names another file is not journald: plain timestamped text.
    relay = process_relays(tmp_path / "inherited", config_text=text, journal_stream="8:12345")
    assert relay.stop() == 0
    lines = relay.log().splitlines()
    assert lines and all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ relayd", l) for l in lines), lines


# Admin commands


def test_backup_and_stats_while_running_and_restore(process_relays, tmp_path):
    first = tmp_path / "first"
    relay = process_relays(first, config_text=OPEN)
    a_addr, b_addr, c_addr = new_address(), new_address(), new_address()
    assert relay.http("POST", "/api/public-keys", {"address": a_addr, "publicKey": "a2V5LW9mLWE="}).status == 200
    mids = [new_mid() for _ in range(3)]
    contents = [f"Y2lwaGVy{i}" for i in range(3)]
    with relay.ws() as a:
        auth(a, a_addr)
        for mid, content in zip(mids, contents):
            a.send(msg(b_addr, mid, content))
            assert a.recv_type("queued")["messageId"] == mid
        a.send({"type": "read_receipt", "to": c_addr, "messageId": "m-read"})
        pong_next(a)

        backup = tmp_path / "backup.db"
        cli_ok(first, "--config", str(relay.config_path), "backup", str(backup))
        assert backup.is_file()
        stats = json.loads(cli_ok(first, "--config", str(relay.config_path), "stats").stdout)
        assert {k: stats[k] for k in ("recipients", "messages", "bytes", "receipts", "keys")} == {
            "recipients": 1, "messages": 3, "bytes": sum(map(len, contents)), "receipts": 1, "keys": 1}
        assert stats["schema_version"] >= 1
        pong_next(a)  # the running relay did not notice
    assert relay.stop() == 0

    restored = process_relays(tmp_path / "second", config_text=OPEN, env={"RELAYD_STORAGE_PATH": str(backup)})
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


# Health


def test_health_endpoints(process_relays, tmp_path):
    relay = process_relays(tmp_path, config_text=OPEN)
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


# Activity summary


def test_the_activity_summary_counts_refusals_by_reason_without_addresses(process_relays, tmp_path):
    relay = process_relays(tmp_path, config_text=OPEN + "[log]\nsummary_interval_s = 1\n[queue]\nmax_offline_messages = 1\n"
                                                        "[limits]\nrate_limit_max_reads = 1\n")
    alice, bob, carol = new_address(), new_address(), new_address()
    with relay.ws() as a, relay.ws() as b:
        auth(a, alice)
        auth(b, bob)
        a.send(msg(bob, new_mid()))
        assert a.recv()["type"] == "delivered"
        a.send(msg(carol, new_mid()))
        assert a.recv()["type"] == "queued"
        a.send(msg(carol, "over"))
        assert a.recv()["code"] == "queue_full"
        assert relay.http("GET", f"/api/status/{carol}").status == 200
        assert relay.http("GET", f"/api/status/{carol}").status == 429
        line = wait_until(lambda: next((line for line in relay.log().splitlines()
                                        if "activity in the last" in line and "queue_full" in line), None),
                          "a summary line with the refusal", timeout=5)
    assert "2 sessions (2 addresses online)" in line, line
    assert "messages: 1 live, 1 stored, 0 delivered from storage, 0 expired" in line, line
    assert "refused: 1 messages (queue_full 1), 1 by limits (http_reads 1)" in line, line
    assert line.endswith("; 1 messages stored"), line
    summaries = [line for line in relay.log().splitlines() if "activity in the last" in line]
    assert not any(a in line for line in summaries for a in (alice, bob, carol))


# Start-up block


def start_lines(relay: ProcessRelay) -> list[str]:
    """The log lines up to and including the ready line, without timestamps."""
    lines = [line.split(" ", 1)[1] for line in relay.log().splitlines() if line.strip()]
    return lines[:next(i for i, line in enumerate(lines) if "relayd listening" in line) + 8]


def test_start_up_says_version_urls_sources_storage_and_auth(process_relays, tmp_path):
    relay = process_relays(tmp_path, config_text="[storage]\nsynchronous = full\n[log]\nsummary_interval_s = 0\n",
                           args=("--log-level", "info"))
    text = "\n".join(start_lines(relay))
    port = relay.port
    assert f"INFO relayd.daemon: relayd {__version__} (Python " in text
    assert (f"INFO relayd.daemon: relayd listening on ws://127.0.0.1:{port}, http://127.0.0.1:{port} "
            "(WebSocket and REST on one port)") in text
    assert "INFO relayd.daemon: serving status page at /, metrics at /metrics" in text
    assert (f"INFO relayd.daemon: configuration: defaults (for every key not set below); file {relay.config_path}; "
            "environment RELAYD_QUEUE_FLUSH_DELAY_MS, RELAYD_SERVER_HOST, RELAYD_SERVER_PORT; "
            "command line --log-level") in text
    assert f"INFO relayd.daemon: storage: sqlite {tmp_path / 'relayd-data' / 'relayd.db'} (synchronous = full); " \
           "queued content, receipts, keys and push subscriptions may take " in text
    assert "([storage] max_bytes = -1: " in text
    assert "INFO relayd.daemon: auth: mixed (signatures optional; an address that ever signed must always sign); " \
           "signature verification: " in text
    assert "WARNING" not in text


@pytest.mark.parametrize("setting", ["auto", *EVENT_LOOPS])
def test_start_up_names_the_event_loop_it_runs_on(process_relays, tmp_path, setting):
    relay = process_relays(tmp_path, env={"RELAYD_SERVER_EVENT_LOOP": setting}, args=("--log-level", "info"))
    first = start_lines(relay)[0]
    runs = "uvloop" if setting == "uvloop" or (setting == "auto" and HAS_UVLOOP) else "asyncio"
    assert re.search(rf"websockets [^,]+, event loop {runs}( \d[\w.]*)?\)$", first), first
    with relay.ws() as ws:  # and serves on it
        assert ws.recv()["type"] == "challenge"


def test_uvloop_asked_for_but_missing_stops_the_start_with_the_install_hint(tmp_path):
    sitecustomize = tmp_path / "hide" / "sitecustomize.py"  # makes ``import uvloop`` fail, as where it is missing
    sitecustomize.parent.mkdir()
    sitecustomize.write_text("import sys\nsys.modules['uvloop'] = None\n")
    result = subprocess.run([sys.executable, str(ROOT / "relayd.py"), "--check-config"], cwd=tmp_path,
                            env=clean_env(PYTHONPATH=str(sitecustomize.parent), RELAYD_SERVER_EVENT_LOOP="uvloop"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "[server] event_loop = uvloop, but uvloop is not installed" in result.stderr
    assert "[fast]" in result.stderr


@pytest.mark.parametrize("extra,warned", [("", True), ("trusted_proxies = 127.0.0.1\n", False)])
def test_start_up_warns_when_exposed_on_all_interfaces_without_tls(process_relays, tmp_path, extra, warned):
    relay = process_relays(tmp_path, config_text=f"[server]\n{extra}", env={"RELAYD_SERVER_HOST": "0.0.0.0"})
    text = "\n".join(start_lines(relay))
    assert f"relayd listening on ws://0.0.0.0:{relay.port}, http://0.0.0.0:{relay.port}" in text
    assert ("WARNING relayd.daemon: listening on all interfaces (0.0.0.0) without TLS and without trusted_proxies"
            in text) is warned, text


# The systemd unit


def unit_lines() -> list[str]:
    return [line.strip() for line in (ROOT / "relayd.service").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_the_unit_runs_the_installed_entry_point_and_takes_every_setting_from_the_config_file():
    lines = unit_lines()
    assert "ExecStart=/opt/relayd/bin/relayd --config /etc/relayd/relayd.conf" in lines
    assert [line for line in lines if line.startswith("Environment=") and "RELAYD_" in line] == []
    assert "RestartPreventExitStatus=2" in lines and "Restart=on-failure" in lines
    deploying = (ROOT / "docs" / "deploying.md").read_text()
    assert "sudo python3 -m venv /opt/relayd && sudo /opt/relayd/bin/pip install ." in deploying


def test_systemd_accepts_the_unit_with_this_checkouts_entry_point(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze not found on PATH: install it with `apt-get install systemd` (Debian package)"
    entry = Path(sys.executable).parent / "relayd"
    assert entry.exists(), f"{entry}: the relayd entry point is missing; pip install -e . first"
    unit = tmp_path / "relayd.service"
    unit.write_text((ROOT / "relayd.service").read_text().replace("/opt/relayd/bin/relayd", str(entry)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr



def test_the_container_healthcheck_probes_the_first_address_relayd_listens_on():
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "deploy" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    assert healthcheck.ready_url(make_config(server={"host": "0.0.0.0", "port": 3002})) == \
        "http://127.0.0.1:3002/health/ready"
    assert healthcheck.ready_url(make_config(server={"host": "::, 0.0.0.0", "port": 8080})) == \
        "http://[::1]:8080/health/ready"
    assert healthcheck.ready_url(make_config(server={"host": "10.0.0.5", "port": 1})) == \
        "http://10.0.0.5:1/health/ready"
