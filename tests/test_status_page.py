"""The status page at ``GET /``: its content over HTTP, and how a real browser (headless Chromium) renders it."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

from support import (A, JSON, DevToolsPage, assert_closed_with, assert_refused, connect, new_address, new_mid, scaled, start_open,
                     wait_until)

import relayd

INSTALL_HINT = "chromium not found on PATH: install it with `apt-get install chromium` (Debian package)"


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium from Debian's package, as root needs it (no sandbox); fails, never skips, without it."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, INSTALL_HINT
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-dev-shm-usage", *args], capture_output=True, text=True, timeout=scaled(60))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_the_status_page_says_what_health_knows_and_never_an_address(relay):
    with connect(relay, A):
        page = relay.http("GET", "/")
        health = relay.http("GET", "/health").json
    assert page.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == ("default-src 'none'; style-src 'unsafe-inline'; "
                                                       "script-src 'self'; connect-src 'self'")
    assert page.headers["cache-control"] == "no-store"
    text = page.body.decode()
    assert f"relayd <small>{relayd.__version__}</small>" in text
    assert '<th>Connections</th><td id="v-connections">1</td>' in text and health["connections"] == 1
    assert '<th>Storage</th><td id="v-storage">memory, ok</td>' in text
    assert '<th>Sign-in mode</th><td id="v-mode">mixed</td>' in text
    assert f"<code>ws://127.0.0.1:{relay.port}</code>" in text
    assert A[2:] not in text.lower()
    assert re.findall(r"<script[^>]*>", text) == ['<script src="/status.js">']  # no inline script
    assert "http://" not in text.replace(f"http://127.0.0.1:{relay.port}", "").replace("http://www.w3.org", "")


def test_a_hostile_host_header_is_escaped(relay):
    page = relay.http("GET", "/", headers={"Host": "<script>x</script>"})
    assert "<script>" not in page.body.decode() and "&lt;script&gt;x&lt;/script&gt;" in page.body.decode()


def test_status_page_false_turns_it_off(start_relay):
    relay = start_relay(server={"status_page": "false"})
    assert_refused(relay.http("GET", "/"), 404, "not_found")
    assert relay.http("GET", "/health").headers["content-type"].startswith(JSON)


def test_headless_chromium_renders_the_status_page(relay, tmp_path):
    url = f"http://127.0.0.1:{relay.port}/"
    dom = chromium("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<h1>relayd <small>" in dom.stdout and "Sign-in mode" in dom.stdout, dom.stdout[:2000]
    shot = tmp_path / "status.png"
    result = chromium(f"--screenshot={shot}", "--window-size=900,700", "--hide-scrollbars", url)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    assert png_size(shot) == (900, 700)
    # A page that rendered is not one flat colour: a blank screenshot compresses to almost nothing.
    assert shot.stat().st_size > 8000, shot.stat().st_size


def test_the_status_json_and_script_routes(relay):
    with connect(relay, A):
        status = relay.http("GET", "/status.json")
    assert status.status == 200 and status.json["ok"] is True
    assert status.json["figures"]["connections"] == "1"
    history = status.json["history"]
    assert set(history) == {"connections", "messages", "refusals"}
    assert all(len(chart["values"]) == 60 for chart in history.values())
    assert history["connections"]["values"][-1] == 1 and history["connections"]["peak"] == 1
    assert A[2:] not in status.body.decode().lower() and "127.0.0.1" not in status.body.decode()
    script = relay.http("GET", "/status.js")
    assert script.status == 200 and script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert b"/status.json" in script.body


def chart_points(page: DevToolsPage) -> dict[str, str]:
    return page.evaluate("Object.fromEntries([...document.querySelectorAll('figure svg polyline')]"
                         ".map(p => [p.parentNode.id, p.getAttribute('points')]))")


def test_headless_chromium_sees_the_page_refresh_and_its_charts_follow_traffic(start_relay, tmp_path):
    denied = new_address()
    relay = start_open(start_relay, server={"status_refresh_s": "0.3"}, access={"deny": denied})
    page = DevToolsPage(f"http://127.0.0.1:{relay.port}/", tmp_path)
    try:
        before = wait_until(lambda: chart_points(page), "the page to load", timeout=15)
        assert set(before) == {"chart-connections", "chart-messages", "chart-refusals"}
        assert page.evaluate("document.getElementById('v-connections').textContent") == "0"
        wait_until(lambda: int(page.evaluate("document.body.dataset.refreshes || 0")) >= 1, "a refresh", 15)

        with relay.ws() as refused:
            refused.send({"type": "auth", "address": denied})
            assert_closed_with(refused, 4003)
        a, b = new_address(), new_address()
        with relay.ws() as alice, relay.ws() as bob:
            for ws, address in ((alice, a), (bob, b)):
                ws.send({"type": "auth", "address": address})
                ws.recv_type("auth_success")
            for _ in range(5):
                alice.send({"type": "message", "to": b, "content": "aGk=", "messageId": new_mid()})
                alice.recv_type("delivered")
            wait_until(lambda: page.evaluate("document.getElementById('v-connections').textContent") == "2",
                       "the connections figure to follow without a reload", 15)
            after = wait_until(lambda: all((p := chart_points(page))[k] != before[k] for k in before) and p,
                               "every chart to change after traffic", 15)
        peaks = page.evaluate("[...document.querySelectorAll('figcaption span')].map(e => e.textContent)")
        assert peaks == ["2", "5", "1"], (peaks, after)
        assert page.evaluate("document.getElementById('stale').hidden") is True
    finally:
        page.close()
