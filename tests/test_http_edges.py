"""HTTP edges: routing errors, bodies (length, chunked, too large), HEAD, trailing
slashes, rate limiting behind proxies, CORS and the WebSocket Origin check."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from typing import Any

import pytest
from support import (A, B, JSON, RawWs, assert_auth_success, assert_refused, chunked, http_head, raw_http, scaled,
                     start_open, wait_until)
from websockets.exceptions import InvalidStatus

from relayd.storage.memory import MemoryStore


def methods(header: str) -> set[str]:
    return {m.strip() for m in header.split(",") if m.strip()}


KEY_BODY = json.dumps({"address": A, "publicKey": "a2V5"}).encode()


# Routing


@pytest.mark.parametrize("method,path", [
    ("GET", "/nope"),
    ("GET", "/api"),
    ("GET", "/api/public-keys/" + A + "/extra"),
    ("POST", "/api/unknown"),
    ("DELETE", "/healthz"),
    ("GET", "/api//public-keys"),
])
def test_unknown_path_is_404_not_found(open_relay, method, path):
    assert_refused(open_relay.http(method, path), 404, "not_found")


@pytest.mark.parametrize("method,path,allowed", [
    ("PUT", "/api/public-keys", {"POST", "OPTIONS"}),
    ("GET", "/api/public-keys", {"POST", "OPTIONS"}),
    ("POST", "/health", {"GET", "HEAD", "OPTIONS"}),
    ("DELETE", "/health/live", {"GET", "HEAD", "OPTIONS"}),
    ("GET", "/api/public-keys/batch", {"POST", "OPTIONS"}),
    ("PATCH", f"/api/public-keys/{A}", {"GET", "HEAD", "DELETE", "OPTIONS"}),
    ("POST", f"/api/messages/{A}", {"GET", "HEAD", "DELETE", "OPTIONS"}),
    ("DELETE", f"/api/status/{A}", {"GET", "HEAD", "OPTIONS"}),
    ("GET", "/api/status/batch", {"POST", "OPTIONS"}),
])
def test_wrong_method_is_405_with_allow(open_relay, method, path, allowed):
    reply = open_relay.http(method, path)
    assert_refused(reply, 405, "method_not_allowed")
    assert methods(reply.headers["allow"]) == allowed


def test_method_not_allowed_does_not_run_any_handler(open_relay):
    reply = open_relay.http("PUT", "/api/public-keys", {"address": A, "publicKey": "k"})
    assert_refused(reply, 405, "method_not_allowed")
    assert_refused(open_relay.http("GET", f"/api/public-keys/{A}"), 404, "key_not_found")


@pytest.mark.parametrize("path", ["/api/public-keys/", "/api/public-keys//"])
def test_trailing_slash_is_tolerated_on_post(open_relay, path):
    reply = open_relay.http("POST", path, {"address": A, "publicKey": "k"})
    assert reply.status == 200 and reply.json["address"] == A
    assert open_relay.http("GET", f"/api/public-keys/{A}/").json["publicKey"] == "k"


def test_trailing_slash_is_tolerated_on_get(open_relay):
    assert open_relay.http("GET", "/health/").json["status"] == "ok"
    body = open_relay.http("GET", f"/api/status/{A}/").json
    assert (body["address"], body["online"]) == (A, False) and set(body) == {"address", "online", "timestamp"}


def test_every_error_response_is_json_with_connection_close(open_relay):
    for reply in (open_relay.http("GET", "/nope"), open_relay.http("PUT", "/health"),
                  open_relay.http("GET", "/api/public-keys/0x1"),
                  open_relay.http("POST", "/api/public-keys", raw_body=b"{")):
        assert reply.headers["connection"].lower() == "close"
        assert reply.headers["content-type"].startswith(JSON)
        assert int(reply.headers["content-length"]) == len(reply.body)
        assert set(reply.json) == {"error", "code"}


def test_head_on_unknown_path_is_404_without_body(open_relay):
    reply = raw_http(open_relay.port, http_head("HEAD", "/nope"))
    assert reply.status == 404 and reply.body == b""
    assert int(reply.headers["content-length"]) == len(open_relay.http("GET", "/nope").body)


# Bodies


def test_post_with_content_length_over_a_raw_socket(open_relay):
    reply = raw_http(open_relay.port, http_head("POST", "/api/public-keys", {"Content-Type": JSON}, KEY_BODY))
    assert reply.status == 200, reply
    assert reply.json["success"] is True and reply.json["address"] == A


@pytest.mark.parametrize("sizes", [(7, 5), (1,), (len(KEY_BODY),)])
def test_chunked_body_is_decoded(open_relay, sizes):
    data = http_head("POST", "/api/public-keys", {"Content-Type": JSON, "Transfer-Encoding": "chunked"})
    reply = raw_http(open_relay.port, data + chunked(KEY_BODY, sizes))
    assert reply.status == 200, reply
    assert (reply.json["success"], reply.json["address"]) == (True, A)
    assert open_relay.http("GET", f"/api/public-keys/{A}").json["publicKey"] == "a2V5"


def test_chunked_body_split_across_tcp_writes(open_relay):
    head = http_head("POST", "/api/public-keys", {"Content-Type": JSON, "Transfer-Encoding": "chunked"})
    body = chunked(KEY_BODY, (3, 4, 5, 6))
    reply = raw_http(open_relay.port, head, chunks=[body[:5], body[5:17], body[17:]])
    assert reply.status == 200, reply
    assert reply.json["address"] == A


def test_chunked_body_from_http_client_like_node(open_relay):
    conn = http.client.HTTPConnection("127.0.0.1", open_relay.port, timeout=5)
    conn.request("POST", "/api/status/batch", body=iter([b'{"addresses": ["', A.encode(), b'"]}']),
                 headers={"Content-Type": JSON}, encode_chunked=True)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 200
    assert body["statuses"] == {A: False}


def test_unsupported_transfer_encoding_is_411(open_relay):
    reply = raw_http(open_relay.port, http_head("POST", "/api/public-keys", {"Transfer-Encoding": "gzip"}))
    assert_refused(reply, 411, "length_required")


def test_body_over_max_body_bytes_announced_by_content_length_is_413(start_relay):
    relay = start_open(start_relay, limits={"max_body_bytes": 100})
    # Only the head is sent; the relay must answer without reading 100 kB.
    reply = raw_http(relay.port, http_head("POST", "/api/public-keys", {"Content-Length": "100000"}))
    assert_refused(reply, 413, "payload_too_large")


def test_body_at_max_body_bytes_is_accepted(start_relay):
    relay = start_open(start_relay, limits={"max_body_bytes": 100})
    body = json.dumps({"address": A, "publicKey": "k"}).encode()
    body = body[:-1] + b" " * (100 - len(body)) + b"}"
    assert len(body) == 100
    reply = raw_http(relay.port, http_head("POST", "/api/public-keys", {}, body))
    assert reply.status == 200, reply


BIG_BODY = json.dumps({"address": A, "publicKey": "k" * 200}).encode()
REFUSED_BODIES = {
    # kind: (head headers, body bytes, status, code)
    "content-length": ({"Content-Length": str(len(BIG_BODY))}, BIG_BODY, 413, "payload_too_large"),
    "chunked": ({"Transfer-Encoding": "chunked"},
                chunked(BIG_BODY, (60, 60)), 413, "payload_too_large"),
    "chunked+content-length": ({"Transfer-Encoding": "chunked", "Content-Length": "10"},
                               chunked(b'{"a": "b"}'), 400, "bad_request"),
    "bad chunk size": ({"Transfer-Encoding": "chunked"}, b"zz\r\n{}\r\n0\r\n\r\n", 400, "bad_request"),
    "negative content-length": ({"Content-Length": "-5"}, b"{}", 400, "bad_request"),
    "two content-lengths": ({"Content-Length": "2", "content-length": "3"}, b"{}", 400, "bad_request"),
}


@pytest.mark.parametrize("kind", list(REFUSED_BODIES))
def test_refused_body_that_was_sent_still_gets_its_error_response(start_relay, quiet_loggers, kind):
    relay = start_open(start_relay, limits={"max_body_bytes": 100})
    headers, body, status, code = REFUSED_BODIES[kind]
    data = http_head("POST", "/api/public-keys", headers, length=False) + body
    try:
        reply = raw_http(relay.port, data)
    except (ConnectionError, AssertionError) as exc:
        pytest.fail(f"no HTTP response: {exc!r}")
    assert_refused(reply, status, code)
    assert relay.http("GET", f"/api/public-keys/{A}").status == 404  # nothing was stored


PIPELINED = {
    "second request in the same segment": (
        http_head("POST", "/api/status/batch", {}, json.dumps({"addresses": [A]}).encode())
        + http_head("GET", "/health")),
    "extra CRLF after a POST body (old clients)": (
        http_head("POST", "/api/status/batch", {}, json.dumps({"addresses": [A]}).encode()) + b"\r\n"),
}


@pytest.mark.parametrize("kind", list(PIPELINED))
def test_bytes_after_a_complete_request_do_not_lose_its_response(open_relay, quiet_loggers, kind):
    try:
        reply = raw_http(open_relay.port, PIPELINED[kind])
    except (ConnectionError, AssertionError) as exc:
        pytest.fail(f"no HTTP response: {exc!r}")
    assert reply.status == 200, reply
    assert reply.headers["connection"].lower() == "close"
    assert reply.json["statuses"] == {A: False}


# Keep-alive


def kept_alive(relay) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=5)
    conn.connect()
    return conn


def exchange(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": JSON, **(headers or {})} if body is not None else (headers or {}))
    reply = conn.getresponse()
    reply.data = reply.read()
    return reply


def test_one_kept_alive_connection_serves_requests_errors_and_304s(open_relay):
    conn = kept_alive(open_relay)
    sock = conn.sock
    try:
        assert exchange(conn, "POST", "/api/public-keys", {"address": A, "publicKey": "pk"}).status == 200
        first = exchange(conn, "GET", f"/api/public-keys/{A}")
        assert first.status == 200 and first.getheader("connection") is None  # HTTP/1.1: kept alive
        cached = exchange(conn, "GET", f"/api/public-keys/{A}", headers={"If-None-Match": first.getheader("etag")})
        assert cached.status == 304 and cached.data == b""
        assert exchange(conn, "GET", f"/api/public-keys/{B}").status == 404
        assert exchange(conn, "HEAD", f"/api/public-keys/{A}").status == 200
        assert exchange(conn, "GET", f"/api/status/{A}").status == 200
        assert conn.sock is sock, "http.client had to reconnect: the relay closed a kept-alive connection"
    finally:
        conn.close()


def test_the_last_request_allowed_on_a_connection_is_answered_with_close(start_relay):
    relay = start_open(start_relay, server={"max_requests_per_connection": 3})
    conn = kept_alive(relay)
    try:
        replies = [exchange(conn, "GET", f"/api/status/{A}") for _ in range(3)]
        assert [r.getheader("connection") for r in replies] == [None, None, "close"]
        assert conn.sock is None or conn.sock.recv(1) == b""
    finally:
        conn.close()


def test_a_request_that_asks_to_close_is_answered_and_its_connection_released_at_once(start_relay):
    """The app's key lookups: the relay closes after its answer without waiting for the client's own close, so
    the connection's slot is free while the client still holds its socket."""
    relay = start_open(start_relay, limits={"max_connections_per_ip": 1, "connections_per_ip_per_s": 0})
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        s.sendall(http_head("GET", "/health/live"))
        data = b""
        while block := s.recv(65536):  # the whole answer, then EOF
            data += block
        assert data.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close\r\n" in data, data
        assert relay.http("GET", "/health/live").status == 200  # not 429: the slot was released


def test_an_idle_kept_alive_connection_is_closed_after_the_idle_timeout(start_relay):
    relay = start_open(start_relay, server={"http_idle_timeout_s": 0.2})
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        s.sendall(http_head("GET", "/health/live", {"Connection": "keep-alive"}))
        data = b""
        while block := s.recv(65536):  # the answer, then EOF once the connection idled 0.2 s
            data += block
    assert data.startswith(b"HTTP/1.1 200 ") and data.count(b"HTTP/1.1") == 1, data


# Rate limit


def test_writes_and_reads_spend_separate_budgets(start_relay):
    relay = start_open(start_relay, limits={"rate_limit_max_requests": 3, "rate_limit_max_reads": 5,
                                            "rate_limit_window_ms": 60000})
    for _ in range(3):
        assert relay.http("POST", "/api/public-keys", {"address": A, "publicKey": "k"}).status == 200
    reply = relay.http("POST", "/api/public-keys", {"address": A, "publicKey": "k"})
    assert_refused(reply, 429, "rate_limited")
    assert 1 <= int(reply.headers["retry-after"]) <= 60
    # Unknown paths, listings, drains and clears are writes too, errors included.
    for method, path in (("GET", "/nope"), ("GET", "/api/public-keys/stats/all"), ("GET", f"/api/messages/{A}"),
                         ("DELETE", f"/api/public-keys/{A}"), ("PUT", "/api/public-keys")):
        assert_refused(relay.http(method, path), 429, "rate_limited")
    # Reads still have their own budget: lookups, HEAD, queue sizes, preflights.
    assert relay.http("GET", f"/api/public-keys/{A}").status == 200
    assert relay.http("HEAD", f"/api/public-keys/{B}").status == 404
    assert relay.http("GET", f"/api/status/{A}").status == 200
    assert relay.http("GET", f"/api/messages/{A}/queue-size").status == 200
    assert relay.http("OPTIONS", f"/api/public-keys/{A}").status == 204
    reply = relay.http("GET", f"/api/public-keys/{A}")
    assert_refused(reply, 429, "rate_limited")
    assert 1 <= int(reply.headers["retry-after"]) <= 60
    metrics = relay.http("GET", "/metrics").body.decode()
    assert 'relayd_rate_limit_hits_total{limit="http"} 6' in metrics
    assert 'relayd_rate_limit_hits_total{limit="http_reads"} 1' in metrics


def test_a_batch_spends_one_read_per_address(start_relay):
    relay = start_open(start_relay, limits={"rate_limit_max_reads": 10, "rate_limit_window_ms": 60000})
    eight = [f"0x{i:040x}" for i in range(1, 9)]
    assert relay.http("POST", "/api/status/batch", {"addresses": eight}).status == 200
    assert relay.http("POST", "/api/public-keys/batch", {"addresses": eight[:1]}).status == 200
    assert relay.http("GET", f"/api/status/{A}").status == 200
    assert_refused(relay.http("GET", f"/api/status/{A}"), 429, "rate_limited")
    assert_refused(relay.http("POST", "/api/public-keys/batch", {"addresses": eight[:1]}), 429, "rate_limited")


def test_a_batch_larger_than_what_is_left_passes_and_fills_the_window(start_relay):
    relay = start_open(start_relay, limits={"rate_limit_max_reads": 5, "rate_limit_window_ms": 60000})
    twenty = [f"0x{i:040x}" for i in range(1, 21)]
    assert relay.http("GET", f"/api/status/{A}").status == 200
    assert relay.http("POST", "/api/status/batch", {"addresses": twenty}).status == 200
    assert_refused(relay.http("POST", "/api/status/batch", {"addresses": twenty}), 429, "rate_limited")
    assert_refused(relay.http("GET", f"/api/status/{A}"), 429, "rate_limited")


def test_health_and_metrics_are_exempt_from_both_budgets(start_relay):
    relay = start_open(start_relay, limits={"rate_limit_max_requests": 1, "rate_limit_max_reads": 1,
                                            "rate_limit_window_ms": 60000})
    relay.http("GET", "/nope")
    relay.http("GET", f"/api/status/{A}")
    assert_refused(relay.http("GET", "/nope"), 429, "rate_limited")
    assert_refused(relay.http("GET", f"/api/status/{A}"), 429, "rate_limited")
    for method, path in (("GET", "/health"), ("GET", "/health/live"), ("GET", "/health/ready"),
                         ("GET", "/health/"), ("HEAD", "/health"), ("GET", "/metrics"), ("OPTIONS", "/health")):
        assert relay.http(method, path).status in (200, 204), (method, path)


def test_websocket_upgrades_are_not_rate_limited_as_rest(start_relay):
    relay = start_open(start_relay, limits={"rate_limit_max_reads": 1, "rate_limit_window_ms": 60000})
    assert relay.http("GET", f"/api/status/{A}").status == 200
    assert_refused(relay.http("GET", f"/api/status/{A}"), 429, "rate_limited")
    with relay.ws() as a:
        assert_auth_success(a.auth(A), A)


def test_trusted_proxy_forwarded_clients_are_counted_separately(start_relay):
    relay = start_open(start_relay, server={"trusted_proxies": "127.0.0.1"},
                       limits={"rate_limit_max_reads": 3, "rate_limit_window_ms": 60000})
    seven = {"X-Forwarded-For": "203.0.113.7"}
    eight = {"X-Forwarded-For": "203.0.113.8"}
    for _ in range(3):
        assert relay.http("GET", f"/api/status/{A}", headers=seven).status == 200
    assert_refused(relay.http("GET", f"/api/status/{A}", headers=seven), 429, "rate_limited")
    for _ in range(3):
        assert relay.http("GET", f"/api/status/{A}", headers=eight).status == 200
    assert_refused(relay.http("GET", f"/api/status/{A}", headers=eight), 429, "rate_limited")
    # The proxy's own requests are a third client.
    assert relay.http("GET", f"/api/status/{A}").status == 200


def test_forwarded_for_is_ignored_without_trusted_proxies(start_relay):
    relay = start_open(start_relay, limits={"rate_limit_max_reads": 3, "rate_limit_window_ms": 60000})
    for ip in ("203.0.113.7", "203.0.113.8", "203.0.113.9"):
        assert relay.http("GET", f"/api/status/{A}", headers={"X-Forwarded-For": ip}).status == 200
    assert_refused(relay.http("GET", f"/api/status/{A}", headers={"X-Forwarded-For": "203.0.113.10"}), 429,
            "rate_limited")


def test_spoofed_hops_left_of_a_trusted_proxy_do_not_escape_the_limit(start_relay):
    """The right-most untrusted hop is the client; whatever it prepends is not believed."""
    relay = start_open(start_relay, server={"trusted_proxies": "127.0.0.1"},
                       limits={"rate_limit_max_reads": 2, "rate_limit_window_ms": 60000})
    for fake in ("198.51.100.1", "198.51.100.2"):
        reply = relay.http("GET", f"/api/status/{A}", headers={"X-Forwarded-For": f"{fake}, 203.0.113.7"})
        assert reply.status == 200
    reply = relay.http("GET", f"/api/status/{A}", headers={"X-Forwarded-For": "198.51.100.3, 203.0.113.7"})
    assert_refused(reply, 429, "rate_limited")


# CORS


def test_cors_with_wildcard_allow_list(open_relay):
    reply = open_relay.http("GET", "/health", headers={"Origin": "https://anything.example"})
    assert reply.status == 200
    assert reply.headers["access-control-allow-origin"] == "*"
    assert reply.headers["vary"] == "Origin"
    plain = open_relay.http("GET", "/health")
    assert "access-control-allow-origin" not in plain.headers


def test_cors_with_an_allow_list_echoes_the_allowed_origin(start_relay):
    relay = start_open(start_relay, server={"allowed_origins": "https://app.example, http://localhost:*"})
    for origin in ("https://app.example", "http://localhost:5173", "HTTPS://APP.EXAMPLE"):
        reply = relay.http("GET", f"/api/status/{A}", headers={"Origin": origin})
        assert reply.status == 200, origin
        assert reply.headers["access-control-allow-origin"] == origin
        assert reply.headers["vary"] == "Origin"
    # Errors carry CORS headers too, so the browser can read them.
    reply = relay.http("GET", "/nope", headers={"Origin": "https://app.example"})
    assert reply.status == 404 and reply.headers["access-control-allow-origin"] == "https://app.example"
    # No Origin (native apps, curl): served, no CORS headers.
    reply = relay.http("GET", f"/api/status/{A}")
    assert reply.status == 200 and "access-control-allow-origin" not in reply.headers


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost.evil:1", "https://app.example.evil",
                                    "http://app.example", "null"])
def test_cors_disallowed_origin_is_403(start_relay, origin):
    relay = start_open(start_relay, server={"allowed_origins": "https://app.example,http://localhost:*"})
    reply = relay.http("POST", "/api/public-keys", {"address": A, "publicKey": "k"}, headers={"Origin": origin})
    assert_refused(reply, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in reply.headers
    assert relay.http("GET", f"/api/public-keys/{A}").status == 404  # nothing was written


def test_cors_preflight(start_relay):
    relay = start_open(start_relay, server={"allowed_origins": "https://app.example"})
    reply = relay.http("OPTIONS", "/api/public-keys", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-client-version"})
    assert reply.status == 204, reply
    assert reply.body == b""
    assert methods(reply.headers["access-control-allow-methods"]) >= {"POST", "OPTIONS"}
    assert reply.headers["access-control-allow-headers"] == "content-type, x-client-version"
    assert int(reply.headers["access-control-max-age"]) > 0
    assert reply.headers["access-control-allow-origin"] == "https://app.example"
    assert reply.headers["vary"] == "Origin"
    on_key = relay.http("OPTIONS", f"/api/public-keys/{A}", headers={"Origin": "https://app.example"})
    assert on_key.status == 204
    assert methods(on_key.headers["access-control-allow-methods"]) >= {"GET", "DELETE"}
    assert on_key.headers["access-control-allow-headers"]


def test_cors_preflight_from_a_disallowed_origin_is_403(start_relay):
    relay = start_open(start_relay, server={"allowed_origins": "https://app.example"})
    reply = relay.http("OPTIONS", "/api/public-keys", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert_refused(reply, 403, "origin_not_allowed")


# Origin on the WebSocket handshake


@pytest.mark.parametrize("origin", ["https://evil.example", "https://app.example.evil"])
def test_websocket_from_a_disallowed_origin_is_refused_403(start_relay, origin):
    relay = start_open(start_relay, server={"allowed_origins": "https://app.example"})
    with pytest.raises(InvalidStatus) as info:
        relay.ws(origin=origin)
    response = info.value.response
    assert response.status_code == 403
    assert json.loads(bytes(response.body))["code"] == "origin_not_allowed"


def test_websocket_from_the_allowed_origin_or_without_origin_is_accepted(start_relay):
    relay = start_open(start_relay, server={"allowed_origins": "https://app.example"})
    with relay.ws(origin="https://app.example") as a:
        assert_auth_success(a.auth(A), A)
    with RawWs(relay.port) as raw:  # no Origin header at all
        assert raw.status == 101
        raw.send_json({"type": "auth", "address": B})
        assert_auth_success(raw.recv_json(), B)


def test_websocket_origin_port_wildcard(start_relay):
    relay = start_open(start_relay, server={"allowed_origins": "http://localhost:*"})
    with relay.ws(origin="http://localhost:5173") as a:
        assert_auth_success(a.auth(A), A)
    with RawWs(relay.port, headers={"Origin": "http://localhost:8080"}) as raw:
        assert raw.status == 101
    for origin in ("http://localhost.evil:1", "http://localhost.evil", "https://localhost:5173"):
        with RawWs(relay.port, headers={"Origin": origin}) as raw:
            assert raw.status == 403, origin


# A new connection's first request: answered on its own when whole, plain and closing; handed over otherwise


def test_a_closing_lookup_reads_the_same_in_one_read_as_in_pieces(open_relay):
    assert open_relay.http("POST", "/api/public-keys", {"address": A, "publicKey": "a2V5"}).status == 200
    request = http_head("GET", f"/api/public-keys/{A}")
    whole = raw_http(open_relay.port, request)
    pieces = raw_http(open_relay.port, request[:9], chunks=[request[9:30], request[30:]])
    assert whole.status == pieces.status == 200
    assert whole.headers.keys() == pieces.headers.keys() and whole.json == pieces.json
    assert whole.headers["connection"] == "close"
    assert int(whole.headers["content-length"]) == len(whole.body)


def test_a_head_request_on_its_own_connection_has_headers_and_no_body(open_relay):
    reply = raw_http(open_relay.port, http_head("HEAD", "/health"))
    assert reply.status == 200 and reply.body == b""
    assert int(reply.headers["content-length"]) > 0 and reply.headers["connection"] == "close"


def test_bytes_after_a_closing_request_in_the_same_read_do_not_cost_its_answer(open_relay):
    reply = raw_http(open_relay.port, http_head("GET", "/health/live") + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.status == 200 and reply.raw.count(b"HTTP/1.1 ") == 1


def test_a_keep_alive_request_then_a_closing_one_share_the_connection(open_relay):
    first = http_head("GET", "/health/live", {"Connection": "keep-alive"})
    reply = raw_http(open_relay.port, first, chunks=[http_head("GET", "/health/live")])
    assert reply.raw.count(b"HTTP/1.1 200 ") == 2
    assert reply.raw.count(b"Connection: close") == 1


def test_a_head_trickling_in_is_timed_from_accept_not_from_its_first_bytes(start_relay):
    """The first read of a connection decides whether it is served on its own or handed to the full connection;
    the handed-over one keeps the deadline counted from accept, so a slow head cannot restart it."""
    timeout = scaled(2)
    relay = start_open(start_relay, server={"head_timeout_s": timeout})
    with socket.create_connection(("127.0.0.1", relay.port)) as s:
        accepted = time.monotonic()
        time.sleep(timeout * 0.6)  # the traffic under test: a client silent for most of the head timeout
        s.sendall(b"GET /health/live HTTP/1.1\r\n")
        s.settimeout(timeout * 3)
        try:
            assert s.recv(4096) == b""
        except ConnectionResetError:
            pass
        cut_after = time.monotonic() - accepted
    assert cut_after < timeout * 1.5, f"cut {cut_after:.2f} s after accept (head timeout {timeout:g} s)"


class HeldKeyLookups(MemoryStore):
    """Key lookups wait until the test lets them go: an answer still being built when the relay stops."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = threading.Event()
        self.go = asyncio.Event()

    async def get_key(self, address: str) -> Any:
        if address == A:
            self.asked.set()
            await self.go.wait()
        return await super().get_key(address)


def test_stopping_waits_for_a_plain_request_being_answered(start_relay):
    store = HeldKeyLookups()
    relay = start_open(start_relay, store=store)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=scaled(10)) as s:
        s.sendall(http_head("GET", f"/api/public-keys/{A}"))
        assert store.asked.wait(scaled(5)), "the lookup did not start"
        stopping = threading.Thread(target=relay.stop)
        stopping.start()
        wait_until(lambda: not relay.server.gateway.server.is_serving(), "the relay to stop listening")
        relay.loop.call_soon_threadsafe(store.go.set)
        reply = b""
        while block := s.recv(65536):
            reply += block
        stopping.join(scaled(20))
    assert reply.startswith(b"HTTP/1.1 404 ") and b'"key_not_found"' in reply
