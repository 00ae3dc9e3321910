"""The status page at ``GET /``: its content over HTTP, and how a real browser (headless Chromium) renders it."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

from support import A, JSON, assert_refused, connect, scaled

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
    assert page.headers["content-security-policy"] == "default-src 'none'; style-src 'unsafe-inline'"
    assert page.headers["cache-control"] == "no-store"
    text = page.body.decode()
    assert f"relayd <small>{relayd.__version__}</small>" in text
    assert "<th>Connections</th><td>1</td>" in text and health["connections"] == 1
    assert "<th>Storage</th><td>memory, ok</td>" in text
    assert "<th>Sign-in mode</th><td>mixed</td>" in text
    assert f"<code>ws://127.0.0.1:{relay.port}</code>" in text
    assert A[2:] not in text.lower()
    assert "<script" not in text and "http://" not in text.replace(f"http://127.0.0.1:{relay.port}", "")


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
